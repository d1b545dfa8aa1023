"""The ``msata`` command line: preprocess, train, compare, predict, demo.

Heavy imports (torch, prefect, mlflow) happen inside the commands so that
``msata --help`` is instant and the project-local environment defaults are in
place before any of those libraries read their settings. Printing lives in
``flows/cli_output.py``; errors, stops and feature configs in ``flows/cli_support.py``.

One module of ~370 lines because typer registers every command on one app; each command is a thin wrapper over flows/api.py, cli_support.py and cli_output.py.
"""

from __future__ import annotations

from enum import Enum, StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from features.recipes import CORPORA
from flows.cli_output import (
    compare_table,
    compare_text,
    print_cv_result,
    print_prediction,
    print_preprocess_summary,
    progress_bar,
    train_progress,
)
from flows.cli_support import VERBOSE, UserError, console, feature_config_from, one_line_errors, read_config_file, stop_promptly
from flows.settings import configure_cli_logging, configure_environment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Audio-visual emotion recognition with time-aligned self-attention.")


# The --dataset choices of `msata preprocess`: the recipes of features/recipes, spelt as there.
Dataset = Enum("Dataset", {name.replace("-", "_"): name for name in CORPORA}, type=str)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and Prefect's own log lines.")) -> None:
    VERBOSE["on"] = verbose
    configure_cli_logging(verbose)
    configure_environment()


@app.command()
@one_line_errors
def preprocess(
    dataset: Dataset = typer.Option(..., help="Corpus recipe to use."),
    root: Path = typer.Option(..., exists=True, file_okay=False, help="Corpus root folder."),
    store: str = typer.Option(..., help="Feature store folder or fsspec URL."),
    csv: str | None = typer.Option(None, help="Labels CSV for --dataset folder (default ROOT/labels.csv)."),
    workers: int = typer.Option(1, min=1, help="Clips extracted at once: local Dask worker processes when > 1."),
    dask_address: str | None = typer.Option(None, help="Run the clip tasks on this running Dask scheduler (tcp://host:8786)."),
    limit: int | None = typer.Option(None, min=1, help="Process only the first N recordings (and their --speed-perturb copies)."),
    feature_config: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="TOML/JSON feature settings, keys as FeatureConfig.to_dict() nests them (\\[audio], \\[face], ...).",
    ),
    detect_every: int | None = typer.Option(None, min=1, help="Run face detection on every N-th frame (face.detect_every; default 1)."),
    face_representation: str | None = typer.Option(
        None,
        help="Face features (face.representation): crops (MTCNN face crops, default) or blendshapes (52 MediaPipe FaceLandmarker expression scores per frame).",
    ),
    face_search: str | None = typer.Option(
        None,
        help="Where MTCNN looks (face.search): full (the whole frame, default), near (around the previous frame's face, with the whole frame when that finds none) or track (O-net alone on the previous frame's face between whole-frame searches; fastest, boxes differ by a few px); docs/benchmarks.md.",
    ),
    audio_encoder: str | None = typer.Option(
        None,
        help="Audio representation (audio_encoder.name): log-mel (default), or the hidden states of a packaged pretrained encoder: whisper-base, whisper-tiny.en, or of a local Hugging Face checkpoint directory (Whisper, wav2vec2, HuBERT, WavLM; model.safetensors): hf:/path/to/dir.",
    ),
    device: str = typer.Option(
        "auto",
        help="Where MTCNN and the audio encoder run: auto (CUDA when the worker has a GPU, local workers spread over the GPUs), cpu, cuda or cuda:N. Not part of the features' config.",
    ),
    speed_perturb: str | None = typer.Option(
        None,
        help="Also store speed-perturbed training copies of every clip at these factors, e.g. 0.9,1.1 (each in [0.5, 2], tempo and pitch together; ids CLIP_sp0.9). Training uses them with [data] speed_copies = true, for training speakers only.",
    ),
) -> None:
    """Decode a corpus and write timestamped audio and face features to a Zarr store."""
    from features.recipes import discover
    from features.speed import parse_speed_factors
    from flows.preprocess import check_device, run_preprocessing
    from flows.runners import validate_workers

    validate_workers(workers, dask_address)  # a bad --dask-address fails here, before the recipe scans the corpus
    check_device(device, dask_address)
    speed_factors = parse_speed_factors(speed_perturb)
    config = feature_config_from(
        feature_config,
        {
            "face.detect_every": detect_every,
            "face.representation": face_representation,
            "face.search": face_search,
            "audio_encoder.name": audio_encoder,
        },
    )
    found = discover(dataset.value, str(root), csv)
    if not found.records:
        example = f" (e.g. {found.rejected[0].path}: {found.rejected[0].reason})" if found.rejected else ""
        raise UserError(
            f"no clip under {root} fits the {dataset.value} recipe: {len(found.rejected)} file(s) rejected{example}; is --dataset right?"
        )
    with (
        stop_promptly(f"clips committed so far are kept in {store}; run the same command again to resume"),
        progress_bar("preprocessing", "clips stored") as on_progress,
    ):
        summary = run_preprocessing(
            dataset.value,
            root,
            store,
            csv_path=csv,
            workers=workers,
            dask_address=dask_address,
            limit=limit,
            feature_config=config,
            on_progress=on_progress,
            device=device,
            speed_factors=speed_factors,
        )
    print_preprocess_summary(summary)
    if summary.done + summary.skipped == 0:
        raise typer.Exit(code=1)


def _set_epochs_and_folds(train: dict, splits: dict, epochs: int | None, folds: int | None) -> None:
    """--epochs and --folds win over a run config's [train] epochs and [splits] n_folds."""
    if epochs is not None:
        train["epochs"] = epochs
    if folds is not None:
        splits["n_folds"] = folds


def _load_overrides(path: Path | None) -> dict:
    """A run config file (.toml or .json) with optional [train], [model], [splits] and [data] tables
    ([data]: the loaders' augmentation, DataConfig's AUGMENT_FIELDS; checked here, before anything runs)."""
    if path is None:
        return {}
    from modeling.training.experiment_spec import data_overrides

    data = read_config_file(path)
    unknown = set(data) - {"train", "model", "splits", "data"}
    if unknown:
        raise UserError(f"{path}: unknown sections {sorted(unknown)}; expected train, model, splits, data")
    try:
        data_overrides(data.get("data"))
    except ValueError as err:
        raise UserError(f"{path}: [data]: {err}") from None
    return data


@app.command()
@one_line_errors
def train(
    store: str = typer.Option(..., help="Feature store built by `msata preprocess`."),
    dataset: str = typer.Option(
        ..., help=f"{', '.join(n for n in CORPORA if CORPORA[n].labels)}, or the name of your own dataset (registered as msata-<dataset>)."
    ),
    folds: int | None = typer.Option(
        None, min=2, help="Speaker-independent folds (default 5; RAVDESS's 24 actors also split evenly into 6 or 4)."
    ),
    epochs: int | None = typer.Option(None, min=1, help="Maximum epochs per fold (early stopping on validation UAR)."),
    config: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="TOML/JSON run config with \\[train], \\[model], \\[splits] and \\[data] (augmentation) tables of overrides (infra/configs/).",
    ),
    run_dir: Path | None = typer.Option(None, help="Where checkpoints and split files go (default under MSATA_HOME/runs)."),
    resume: bool = typer.Option(
        False, help="Continue an interrupted experiment (the default run directory is keyed by store, configs and folds)."
    ),
    register: bool = typer.Option(True, help="Register the selected model in the MLflow registry."),
    nproc: int = typer.Option(
        1,
        min=1,
        help="Training processes per fold: msata launches torchrun with one process per GPU (gloo processes on CPU); train.batch_size stays the global batch.",
    ),
) -> None:
    """Cross-validate msata on a feature store; log to MLflow and register the model.

    Runs the train-msata Prefect flow (the one deployments run) in this process: the run, its logs and artifacts appear in Prefect.
    """
    import os

    from flows.train import run_training

    if os.environ.get("WORLD_SIZE", "1") != "1":  # `torchrun -m flows.cli train`: N copies of the flow and its MLflow runs
        raise UserError(
            f"msata train is running under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): run it once with --nproc {os.environ['WORLD_SIZE']} instead, it launches torchrun per fold"
        )

    overrides = _load_overrides(config)
    train_overrides = dict(overrides.get("train", {}))
    split_overrides = dict(overrides.get("splits", {}))
    _set_epochs_and_folds(train_overrides, split_overrides, epochs, folds)
    with train_progress() as progress:
        result = run_training(
            store,
            dataset,
            train=train_overrides,
            splits=split_overrides,
            model=overrides.get("model"),
            run_dir=run_dir,
            resume=resume,
            register=register,
            progress=progress,
            nproc=nproc,
            data=overrides.get("data"),
        )
    print_cv_result(result)


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


@app.command()
@one_line_errors
def ablate(
    store: str | None = typer.Option(None, help="Feature store built by `msata preprocess` (or --demo)."),
    dataset: str | None = typer.Option(None, help="Dataset name as for `msata train` (runs go to the MLflow experiment msata-<dataset>)."),
    demo: bool = typer.Option(
        False, help="Build (or reuse) the synthetic demo store under MSATA_HOME/demo and ablate on it: runs from a fresh clone."
    ),
    folds: int | None = typer.Option(None, min=2, help="Speaker-independent folds, the same for every variant (default 5; 3 with --demo)."),
    seeds: str = typer.Option("0", help="Training seeds, comma-separated: every variant runs once per seed on the same folds."),
    epochs: int | None = typer.Option(None, min=1, help="Maximum epochs per fold."),
    variants: str | None = typer.Option(
        None,
        help="Comma-separated subset of: tarope-ctm, tarope, index-ctm, index, none-ctm, none, late-ctm, late, audio-only, video-only (default all).",
    ),
    config: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="TOML/JSON base run config (\\[train], \\[model], \\[splits], \\[data]) that every variant starts from.",
    ),
    out: Path | None = typer.Option(
        None, help="Ablation directory (default MSATA_HOME/ablations/<dataset>/<key>): runs, ablation.md, ablation.json."
    ),
) -> None:
    """The paper's ablation grid on one store: TaRoPE / index RoPE / no positions / late fusion, each with and without CTM,
    audio only and video only, on the same folds and seeds; one MLflow parent run; a side-by-side table (mean ± std)."""
    from flows.ablation import run_ablation, select_variants
    from flows.cli_output import print_ablation

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    try:
        select_variants(names)
    except ValueError as err:
        raise UserError(f"--variants: {err}") from None
    seed_list = _int_list(seeds, "--seeds")
    if not seed_list:
        raise UserError(f"--seeds {seeds!r}: give at least one seed")
    overrides = _load_overrides(config)
    train_overrides, split_overrides, model_overrides = (
        dict(overrides.get("train", {})),
        dict(overrides.get("splits", {})),
        dict(overrides.get("model", {})),
    )
    if demo:
        if store or dataset:
            raise UserError(f"--demo builds its own store: leave out --store ({store}) and --dataset ({dataset})")
        from flows.demo import DemoConfig, build_demo_store
        from flows.settings import msata_home

        demo_config = DemoConfig()
        with progress_bar("preprocessing", "clips stored") as on_progress:
            store_path, _, _ = build_demo_store(
                msata_home() / "demo", demo_config, say=lambda s: console.print(f"[bold cyan]{s}"), preprocess_progress=on_progress
            )
        store, dataset = str(store_path), "demo"
        train_overrides = {"epochs": demo_config.epochs, "seed": demo_config.seed, **demo_config.train, **train_overrides}
        model_overrides = {**demo_config.model, **model_overrides}
        split_overrides = {"n_folds": demo_config.n_folds, **split_overrides}
    elif not store or not dataset:
        raise UserError(f"give --store and --dataset (got store={store!r}, dataset={dataset!r}), or --demo")
    _set_epochs_and_folds(train_overrides, split_overrides, epochs, folds)
    with train_progress() as progress:
        result = run_ablation(
            store,
            dataset,
            names,
            seed_list,
            train_overrides,
            split_overrides,
            model_overrides,
            out,
            progress=progress,
            data=overrides.get("data"),
        )
    print_ablation(result)


@app.command()
@one_line_errors
def compare(
    dataset: str | None = typer.Option(None, help="Only models of this dataset."),
    format: OutputFormat = typer.Option(
        OutputFormat.table, "--format", help="table: the main columns; json / csv: every column, to stdout."
    ),
) -> None:
    """Registered model versions and their cross-validation metrics, side by side."""
    from modeling.tracking.registry import compare_models

    frame = compare_models(dataset)
    if format is not OutputFormat.table:
        typer.echo(compare_text(frame, format.value), nl=False)
        return
    if frame.empty:
        console.print("no registered msata models yet" + (f" for {dataset}" if dataset else ""))
        return
    console.print(compare_table(frame))


@app.command()
@one_line_errors
def predict(
    files: list[Path] = typer.Argument(..., help="Video or audio files (a folder runs the predict-folder flow)."),
    model: str = typer.Option("models:/msata-demo@champion", help="MLflow model URI or checkpoint path."),
    out: Path | None = typer.Option(None, help="Write the predictions as JSON lines (or Parquet for a folder: a directory)."),
    plot: Path | None = typer.Option(None, help="Timeline PNG; with several files, one PNG per file with the file's stem appended."),
    window: float = typer.Option(2.0, min=0.1, help="Timeline window length in seconds."),
    hop: float = typer.Option(0.5, min=0.05, help="Timeline hop in seconds."),
) -> None:
    """Predict the emotion of new recordings: label, class probabilities and a timeline."""
    from modeling.inference.predictions import write_jsonl
    from modeling.inference.predictor import load_predictor, predict_files

    if len(files) == 1 and files[0].is_dir():
        from flows.predict import run_prediction

        out_dir = out or files[0].with_name(f"{files[0].name}_predictions")
        with stop_promptly(f"finished parts are kept under {out_dir}"), progress_bar("predicting", "files") as on_progress:
            summary = run_prediction(model, files[0], out_dir, plots=plot is not None, window_s=window, hop_s=hop, on_progress=on_progress)
        console.print(
            f"{summary.n_ok} predicted, {summary.n_failed} failed, {summary.n_with_warnings} with warnings -> {summary.parquet_path}"
        )
        raise typer.Exit(code=0 if summary.n_ok else 1)
    try:
        predictor = load_predictor(model)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]cannot load model:[/] {escape(str(err))}", soft_wrap=True)  # one line, however long the path
        raise typer.Exit(code=2) from None
    predictions = predict_files(predictor, [str(f) for f in files], window, hop)
    for prediction in predictions:
        print_prediction(prediction)
        if plot is not None and prediction.ok:
            from modeling.inference.timeline_plot import plot_timeline

            target = plot if len(files) == 1 else plot.with_name(f"{plot.stem}_{Path(prediction.path).stem}{plot.suffix or '.png'}")
            plot_timeline(prediction, target)
            console.print(f"  timeline plot: {target}")
    if out is not None:
        write_jsonl(predictions, out)
        console.print(f"predictions written to {out}")
    if not any(p.ok for p in predictions):
        raise typer.Exit(code=1)


@app.command()
@one_line_errors
def demo(
    epochs: int = typer.Option(12, min=1, help="Maximum epochs per fold."),
) -> None:
    """Synthetic dataset -> preprocess -> train -> register -> predict, all local (a few minutes on a CPU)."""
    import time

    from flows.demo import DemoConfig, run_demo
    from flows.settings import msata_home
    from modeling.tracking.runs import tracking_uri

    start = time.perf_counter()
    home = msata_home()
    with train_progress() as progress:
        result = run_demo(home, DemoConfig(epochs=epochs), say=lambda s: console.print(f"[bold cyan]{s}"), train_progress=progress)
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
