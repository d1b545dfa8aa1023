"""The ``msata`` command line: preprocess, train, compare, predict, demo.

Heavy imports (torch, prefect, mlflow) happen inside the commands so that
``msata --help`` is instant and the project-local environment defaults are in
place before any of those libraries read their settings.
"""

from __future__ import annotations

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

    summary = _with_progress(
        "preprocessing",
        lambda on_progress: run_preprocessing(
            dataset.value, root, store, csv_path=csv, workers=workers, dask_address=dask_address, limit=limit, on_progress=on_progress
        ),
    )
    print_preprocess_summary(summary)
    if summary.done + summary.skipped == 0:
        raise typer.Exit(code=1)


def _with_progress(label: str, run):
    """Run ``run(on_progress)`` under a rich progress bar fed by per-item callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console) as progress:
        bar = progress.add_task("", total=None)

        def on_progress(outcome, total: int) -> None:
            progress.update(bar, total=total, advance=1, description=f"{outcome.clip_id}: {outcome.status}")

        return run(on_progress)


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
