"""The ``msata`` command line: preprocess, train, compare, predict, demo.

Heavy imports (torch, prefect, mlflow) happen inside the commands so that
``msata --help`` is instant and the project-local environment defaults are in
place before any of those libraries read their settings.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.settings import configure_environment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Audio-visual emotion recognition with time-aligned self-attention.")
console = Console()


class Dataset(str, Enum):
    crema_d = "crema-d"
    ravdess = "ravdess"
    folder = "folder"


@app.callback()
def _main() -> None:
    configure_environment()


@app.command()
def preprocess(
    dataset: Dataset = typer.Option(..., help="Corpus recipe to use."),
    root: Path = typer.Option(..., exists=True, file_okay=False, help="Corpus root folder."),
    store: str = typer.Option(..., help="Feature store folder or fsspec URL."),
    csv: Optional[str] = typer.Option(None, help="Labels CSV for --dataset folder (default ROOT/labels.csv)."),
    workers: int = typer.Option(1, min=1, help="Local worker processes (Dask) when > 1."),
    dask_address: Optional[str] = typer.Option(None, help="Run the clip tasks on this Dask scheduler."),
    limit: Optional[int] = typer.Option(None, min=1, help="Process only the first N clips."),
) -> None:
    """Decode a corpus and write timestamped audio and face features to a Zarr store."""
    from flows.preprocess import run_preprocessing

    with _store_progress_bar("preprocessing") as on_progress:
        summary = run_preprocessing(
            dataset.value, root, store, csv_path=csv, workers=workers, dask_address=dask_address, limit=limit, on_progress=on_progress
        )
    print_preprocess_summary(summary)
    if summary.done + summary.skipped == 0:
        raise typer.Exit(code=1)


@contextmanager
def _store_progress_bar(label: str, unit: str = "stored"):
    """A rich progress bar; yields ``on_progress(completed, total)`` (called from a polling thread)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("", total=None)

        def on_progress(completed: int, total: int) -> None:
            progress.update(bar, completed=completed, total=total)

        yield on_progress


def print_preprocess_summary(summary) -> None:
    console.print(
        f"[bold]{summary.done}[/] done, [bold]{summary.skipped}[/] skipped, "
        f"[bold red]{summary.failed}[/] failed, {summary.rejected} rejected by the recipe -> {summary.store} (config {summary.config_hash})"
    )
    if summary.failures:
        table = Table("clip / path", "reason", title="failures", show_lines=False)
        for failure in summary.failures[:50]:
            table.add_row(failure["clip_id"] or failure["path"], failure["reason"][:160])
        if len(summary.failures) > 50:
            table.add_row("...", f"{len(summary.failures) - 50} more: see the store's failures table")
        console.print(table)


def _load_overrides(path: Optional[Path]) -> dict:
    """A run config file (.toml or .json) with optional [train], [model] and [splits] tables."""
    if path is None:
        return {}
    import json
    import tomllib

    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    unknown = set(data) - {"train", "model", "splits"}
    if unknown:
        raise typer.BadParameter(f"{path}: unknown sections {sorted(unknown)}; expected train, model, splits")
    return data


@app.command()
def train(
    store: str = typer.Option(..., help="Feature store built by `msata preprocess`."),
    dataset: str = typer.Option(..., help="crema-d, ravdess, or the name of your own dataset (registered as msata-<dataset>)."),
    folds: Optional[int] = typer.Option(None, min=2, help="Speaker-independent folds (default: 5 for CREMA-D, 5 for RAVDESS)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Maximum epochs per fold (early stopping on validation UAR)."),
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TOML/JSON with [train], [model], [splits] overrides."),
    run_dir: Optional[Path] = typer.Option(None, help="Where checkpoints and split files go (default under MSATA_HOME/runs)."),
    resume: bool = typer.Option(False, help="Continue an interrupted experiment (the default run directory is keyed by store, configs and folds)."),
    register: bool = typer.Option(True, help="Register the selected model in the MLflow registry."),
) -> None:
    """Cross-validate msata on a feature store; log to MLflow and register the model."""
    from modeling.experiment import run_cross_validation
    from modeling.splits import SplitConfig
    from modeling.train_loop import TrainConfig

    overrides = _load_overrides(config)
    train_overrides = dict(overrides.get("train", {}))
    split_overrides = dict(overrides.get("splits", {}))
    if epochs is not None:
        train_overrides["epochs"] = epochs
    if folds is not None:
        split_overrides["n_folds"] = folds
    result = _train_with_progress(
        lambda progress: run_cross_validation(
            store,
            dataset,
            train_config=TrainConfig.from_dict(train_overrides),
            split_config=SplitConfig(**split_overrides) if split_overrides else None,
            model_overrides=overrides.get("model"),
            run_dir=run_dir,
            resume=resume,
            register=register,
            progress=progress,
        )
    )
    print_cv_result(result)


def _train_with_progress(run):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console) as progress:
        bars: dict[int | None, int] = {}

        def on_event(event) -> None:
            fold = event.fold
            if fold not in bars:
                bars[fold] = progress.add_task("", total=event.epochs, title=f"fold {fold}" if fold is not None else "training")
            bar = bars[fold]
            if event.kind == "epoch_end" and event.record is not None:
                r = event.record
                progress.update(bar, completed=event.epoch, total=event.epochs, description=f"loss {r.train_loss:.3f}  val UAR {r.val_uar:.3f}  {r.train_clips_per_s:.0f} clips/s, {100 * r.data_wait_share:.0f}% waiting on data")
            elif event.kind == "step" and event.steps:
                progress.update(bar, description=f"epoch {event.epoch} step {event.step}/{event.steps}")

        return run(on_event)


def print_cv_result(result) -> None:
    table = Table("fold", "best epoch", "val UAR", "test WA", "test UAR", "test macro-F1", title=f"{result.dataset}: speaker-independent cross-validation")
    for fold in result.folds:
        table.add_row(str(fold.index), str(fold.best_epoch), f"{fold.best_val_uar:.3f}", f"{fold.test['wa']:.3f}", f"{fold.test['uar']:.3f}", f"{fold.test['macro_f1']:.3f}")
    s = result.summary
    table.add_row("mean ± std", "", "", f"{s['wa_mean']:.3f} ± {s['wa_std']:.3f}", f"{s['uar_mean']:.3f} ± {s['uar_std']:.3f}", f"{s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f}")
    console.print(table)
    console.print(f"run directory: {result.run_dir}")
    if result.registered:
        console.print(f"registered: {result.registered}")


@app.command()
def compare(dataset: Optional[str] = typer.Option(None, help="Only models of this dataset.")) -> None:
    """Registered model versions and their cross-validation metrics, side by side."""
    from modeling.experiment import compare_models

    frame = compare_models(dataset)
    if frame.empty:
        console.print("no registered msata models yet" + (f" for {dataset}" if dataset else ""))
        raise typer.Exit(code=0)
    table = Table(*[str(c) for c in frame.columns], title="msata model registry")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


@app.command()
def predict(
    files: list[Path] = typer.Argument(..., help="Video or audio files (a folder runs the predict-folder flow)."),
    model: str = typer.Option("models:/msata-demo@champion", help="MLflow model URI or checkpoint path."),
    out: Optional[Path] = typer.Option(None, help="Write the predictions as JSON lines (or Parquet for a folder: a directory)."),
    plot: Optional[Path] = typer.Option(None, help="Timeline PNG; with several files, one PNG per file with the file's stem appended."),
    window: float = typer.Option(2.0, min=0.1, help="Timeline window length in seconds."),
    hop: float = typer.Option(0.5, min=0.05, help="Timeline hop in seconds."),
) -> None:
    """Predict the emotion of new recordings: label, class probabilities and a timeline."""
    from modeling.inference import load_predictor, predict_files
    from modeling.predictions import write_jsonl

    if len(files) == 1 and files[0].is_dir():
        from flows.predict import run_prediction

        out_dir = out or files[0].with_name(f"{files[0].name}_predictions")
        summary = run_prediction(model, files[0], out_dir, plots=plot is not None, window_s=window, hop_s=hop)
        console.print(f"{summary.n_ok} predicted, {summary.n_failed} failed, {summary.n_with_warnings} with warnings -> {summary.parquet_path}")
        raise typer.Exit(code=0 if summary.n_ok else 1)
    try:
        predictor = load_predictor(model)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]cannot load model:[/] {err}")
        raise typer.Exit(code=2)
    predictions = predict_files(predictor, [str(f) for f in files], window, hop)
    for prediction in predictions:
        print_prediction(prediction)
        if plot is not None and prediction.ok:
            from modeling.timeline_plot import plot_timeline

            target = plot if len(files) == 1 else plot.with_name(f"{plot.stem}_{Path(prediction.path).stem}{plot.suffix or '.png'}")
            plot_timeline(prediction, target)
            console.print(f"  timeline plot: {target}")
    if out is not None:
        write_jsonl(predictions, out)
        console.print(f"predictions written to {out}")
    if not any(p.ok for p in predictions):
        raise typer.Exit(code=1)


def print_prediction(prediction) -> None:
    if not prediction.ok:
        console.print(f"[bold red]{prediction.path}[/]: {prediction.error}")
        return
    probs = "  ".join(f"{k} {v:.2f}" for k, v in sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]))
    console.print(f"[bold]{prediction.path}[/]: [bold green]{prediction.label}[/]  ({probs})  from {'+'.join(prediction.modalities)}, {prediction.duration_s:.2f} s")
    for warning in prediction.warnings:
        console.print(f"  [yellow]warning:[/] {warning}")
    for window in prediction.timeline:
        if window.probabilities:
            top = max(window.probabilities, key=window.probabilities.get)
            console.print(f"  {window.start_s:6.2f}-{window.end_s:6.2f} s  {top:<10} {window.probabilities[top]:.2f}")


@app.command()
def demo(
    epochs: int = typer.Option(12, min=1, help="Maximum epochs per fold."),
) -> None:
    """Synthetic dataset -> preprocess -> train -> register -> predict, all local (a few minutes on a CPU)."""
    import time

    from flows.demo import DemoConfig, run_demo
    from flows.settings import msata_home
    from modeling.tracking import tracking_uri

    start = time.perf_counter()
    home = msata_home()
    result = _train_with_progress(
        lambda progress: run_demo(home, DemoConfig(epochs=epochs), say=lambda s: console.print(f"[bold cyan]{s}"), train_progress=progress)
    )
    print_preprocess_summary(result.preprocess)
    print_cv_result(result.cv)
    print_prediction(result.prediction)
    console.print(f"\n[bold]done in {time.perf_counter() - start:.0f} s.[/] Where to look:")
    console.print(f"  features      {result.store_dir}")
    console.print(f"  model         {result.model_uri}")
    if result.plot:
        console.print(f"  timeline      {result.plot}")
    console.print(f"  MLflow UI     .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")
    console.print(f"  predict       .venv/bin/msata predict YOUR_VIDEO.mp4 --model {result.model_uri} --plot timeline.png")
