"""How the ``msata`` commands print: summaries, progress bars, the model comparison."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.table import Table

from flows.cli_support import console

# `msata compare`'s readable default: (header, column, std column or None); every column with --format json/csv.
COMPARE_COLUMNS = (
    ("model", "model", None),
    ("version", "version", None),
    ("aliases", "aliases", None),
    ("folds", "n_folds", None),
    ("val UAR", "val_uar_mean", None),
    ("test UAR", "test_uar_mean", "test_uar_std"),
    ("test WA", "test_wa_mean", "test_wa_std"),
    ("test macro-F1", "test_macro_f1_mean", None),
    ("fold", "selected_fold", None),
)


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def compare_table(frame) -> Table:
    table = Table(title="msata model registry (all columns: --format json or csv)")
    shown = [(h, c, s) for h, c, s in COMPARE_COLUMNS if c in frame.columns]
    for header, column, _ in shown:
        table.add_column(header, no_wrap=column in ("model", "version"), overflow="fold")
    for _, row in frame.iterrows():
        cells = []
        for _, column, std in shown:
            text = _cell(row[column])
            if std and std in frame.columns and text != "-" and _cell(row[std]) != "-":
                text += f" ± {_cell(row[std])}"
            cells.append(text)
        table.add_row(*cells)
    return table


def compare_text(frame, fmt: str) -> str:
    """All columns as JSON records or CSV (missing values: null / empty)."""
    if fmt == "json":
        return frame.to_json(orient="records", indent=1)
    return frame.to_csv(index=False)


@contextmanager
def progress_bar(label: str, unit: str) -> Iterator[Any]:
    """A rich progress bar; yields ``on_progress(completed, total)`` (safe to call from a polling thread)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("", total=None)

        def on_progress(completed: int, total: int) -> None:
            progress.update(bar, completed=completed, total=total)

        yield on_progress


@contextmanager
def train_progress() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.fields[title]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
    ) as progress:
        bars: dict[tuple[int | None, str], int] = {}

        def on_event(event) -> None:
            fold, phase = event.fold, event.phase
            if (fold, phase) not in bars:
                title = f"fold {fold}" if fold is not None else "training"
                bars[fold, phase] = progress.add_task("", total=event.epochs, title=title if phase == "train" else f"{title} {phase}")
            bar = bars[fold, phase]
            if event.kind == "epoch_end" and event.record is not None:
                r = event.record
                val = f"  val UAR {r.val_uar:.3f}" if phase != "refit" else ""  # a refit has no validation speakers
                progress.update(
                    bar,
                    completed=event.epoch,
                    total=event.epochs,
                    description=f"loss {r.train_loss:.3f}{val}  {r.train_clips_per_s:.0f} clips/s, {100 * r.data_wait_share:.0f}% waiting on data",
                )
            elif event.kind == "step" and event.steps:
                progress.update(bar, description=f"epoch {event.epoch} step {event.step}/{event.steps}")

        yield on_event


def print_preprocess_summary(summary) -> None:
    console.print(
        f"[bold]{summary.done}[/] done, [bold]{summary.skipped}[/] skipped, "
        f"[bold red]{summary.failed}[/] failed, {summary.rejected} rejected by the recipe -> {summary.store} (config {summary.config_hash})"
    )
    if summary.failures:
        table = Table("clip / path", "reason", title="failures", show_lines=False)
        for failure in summary.failures[:20]:
            table.add_row(failure["clip_id"] or failure["path"], failure["reason"][:160])
        if len(summary.failures) > 20:
            table.add_row("...", f"{len(summary.failures) - 20} more: see the store's failures table")
        console.print(table)


def print_cv_result(result) -> None:
    table = Table(
        "fold",
        "best epoch",
        "val UAR",
        "test WA",
        "test UAR",
        "test macro-F1",
        title=f"{result.dataset}: speaker-independent cross-validation",
    )
    for fold in result.folds:
        table.add_row(
            str(fold.index),
            str(fold.best_epoch),
            f"{fold.best_val_uar:.3f}",
            f"{fold.test['wa']:.3f}",
            f"{fold.test['uar']:.3f}",
            f"{fold.test['macro_f1']:.3f}",
        )
    s = result.summary
    table.add_row(
        "mean ± std",
        "",
        "",
        f"{s['wa_mean']:.3f} ± {s['wa_std']:.3f}",
        f"{s['uar_mean']:.3f} ± {s['uar_std']:.3f}",
        f"{s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f}",
    )
    console.print(table)
    if "selection_uar_mean" in result.extra:  # train.refit
        e = result.extra
        console.print(
            f"test figures of the refit models (training + validation speakers); before the refit, the models chosen on "
            f"validation scored UAR {e['selection_uar_mean']:.3f} ± {e['selection_uar_std']:.3f}"
        )
    if "model_alone_uar_mean" in result.extra:  # train.probe_weight
        e, probes = result.extra, [f.probe for f in result.folds]
        mixed_val = [p["val_uar_mixed"] for p in probes if "val_uar_mixed" in p]
        val = f"; validation UAR with the probe {sum(mixed_val) / len(mixed_val):.3f} (mean)" if len(mixed_val) == len(probes) else ""
        console.print(
            f"test figures with the pooled probe mixed in (weight {probes[0]['weight']}); the models alone scored test UAR "
            f"{e['model_alone_uar_mean']:.3f} ± {e['model_alone_uar_std']:.3f}{val}"
        )
    if "first_member_uar_mean" in result.extra:  # train.members
        e, records = result.extra, [f.members for f in result.folds]
        val = sum(r["val_uar_ensemble"] for r in records) / len(records)
        first_val = sum(r["val_uar_members"][0] for r in records) / len(records)
        console.print(
            f"test figures of {records[0]['members']}-member seed ensembles (validation UAR {val:.3f}, mean); member 0 alone scored "
            f"test UAR {e['first_member_uar_mean']:.3f} ± {e['first_member_uar_std']:.3f} (validation {first_val:.3f})"
        )
    console.print(f"run directory: {result.run_dir}")
    if result.registered:
        console.print(f"registered: {result.registered}")


def print_prediction(prediction) -> None:
    if not prediction.ok:
        console.print(f"[bold red]{prediction.path}[/]: {prediction.error}")
        return
    probs = "  ".join(f"{k} {v:.2f}" for k, v in sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]))
    console.print(
        f"[bold]{prediction.path}[/]: [bold green]{prediction.label}[/]  ({probs})  from {'+'.join(prediction.modalities)}, {prediction.duration_s:.2f} s"
    )
    for warning in prediction.warnings:
        console.print(f"  [yellow]warning:[/] {warning}")
    for window in prediction.timeline:
        if window.probabilities:
            top = max(window.probabilities, key=window.probabilities.get)
            console.print(f"  {window.start_s:6.2f}-{window.end_s:6.2f} s  {top:<10} {window.probabilities[top]:.2f}")


def print_ablation(result: dict) -> None:
    """The ablation grid (``flows.ablation``): one row per variant, test mean ± std over folds and seeds."""
    rows = result["variants"]
    table = Table("variant", "test WA", "test UAR", "test macro-F1", "folds", title="ablation: test mean ± std over folds and seeds")
    for r in rows:
        s = r["summary"]
        cells = [f"{s[k + '_mean']:.3f} ± {s[k + '_std']:.3f}" for k in ("wa", "uar", "macro_f1")]
        table.add_row(r["label"], *cells, str(len(r["folds"])))
    console.print(table)
    console.print(f"table and per-run results: {result['out_dir']}/ablation.md, ablation.json")
    if result.get("parent_run_id"):
        console.print(f"MLflow parent run: {result['parent_run_id']}")
