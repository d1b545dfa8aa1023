"""Prefect flow ``ablate-msata``: the paper's ablation grid on one feature store, side by side.

Variants (``VARIANTS``): TaRoPE / index RoPE / no positions / late fusion, each with and
without CTM, then audio only and video only. Every variant is the ``train-msata``
machinery unchanged (``modeling.training.experiment.cross_validation_chain``: prepare -> one
task per fold -> finalize, never registered), on the **same folds** (one ``SplitConfig``, so one fold assignment) and
the **same training seeds** (``seeds``: each variant runs once per seed). Only the model
settings and ``lambda_ctm`` differ from the base config:

* with CTM: the base config's ``lambda_ctm`` (the training default, 0.1, when the base sets 0);
  without: 0;
* audio only / video only: ``MsataConfig.modalities`` (the model never reads the other
  stream; the store and folds are the same), no CTM (it needs both streams).

MLflow: one parent run ``ablation-<dataset>-<key>`` in ``msata-<dataset>``; each variant x
seed is a cross-validation run nested under it (tag ``mlflow.parentRunId``), its folds
nested under that. The table (mean +- std of test WA / UAR / macro-F1 over every fold of
every seed) is printed by ``msata ablate``, written as ``ablation.md`` and ``ablation.json``
in the ablation directory, logged on the parent run, and published as the Prefect markdown
artifact ``ablation-<dataset>``. A rerun with the same settings resumes: finished folds are
read back, not retrained.

One module of ~320 lines because the variant table, the flow and the side-by-side table it renders belong to one command.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.settings import configure_environment, flush_api_logs
from flows.train import finalize_task, fold_task, progress_hook, run_logger
from flows.train_params import DataParams, ModelOverrides, SplitParams, TrainParams

TABLE_FILE, JSON_FILE, STATE_FILE = "ablation.md", "ablation.json", "ablation_run.json"
METRICS = (("wa", "WA"), ("uar", "UAR"), ("macro_f1", "macro-F1"))


@dataclass(frozen=True)
class Variant:
    name: str  # CLI and directory name
    label: str  # table row
    model: dict[str, Any]  # MsataConfig overrides on top of the base config
    ctm: bool
    needs: tuple[str, ...] = ("audio", "video")  # streams the store must hold


def _joint(positions: str) -> dict[str, Any]:
    return {"positions": positions, "fusion": "joint", "modalities": ["audio", "video"]}


VARIANTS: tuple[Variant, ...] = (
    Variant("tarope-ctm", "TaRoPE + CTM", _joint("tarope"), True),
    Variant("tarope", "TaRoPE", _joint("tarope"), False),
    Variant("index-ctm", "index RoPE + CTM", _joint("index"), True),
    Variant("index", "index RoPE", _joint("index"), False),
    Variant("none-ctm", "no positions + CTM", _joint("none"), True),
    Variant("none", "no positions", _joint("none"), False),
    Variant("late-ctm", "late fusion + CTM", {**_joint("tarope"), "fusion": "late"}, True),
    Variant("late", "late fusion", {**_joint("tarope"), "fusion": "late"}, False),
    Variant("audio-only", "audio only", {**_joint("tarope"), "modalities": ["audio"]}, False, ("audio",)),
    Variant("video-only", "video only", {**_joint("tarope"), "modalities": ["video"]}, False, ("video",)),
)
BY_NAME = {v.name: v for v in VARIANTS}


def select_variants(names: Sequence[str] | None) -> list[Variant]:
    """The named variants in table order; all of them for None or empty."""
    if not names:
        return list(VARIANTS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; expected some of {list(BY_NAME)}")
    return [v for v in VARIANTS if v.name in names]


def variant_settings(variant: Variant, train: dict[str, Any], model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, model) dicts of one variant: the base with the variant's model settings and CTM weight."""
    from modeling.training.train_loop import TrainConfig

    base_lambda = float(train.get("lambda_ctm", 0.0)) or TrainConfig().lambda_ctm
    return {**train, "lambda_ctm": base_lambda if variant.ctm else 0.0}, {**model, **variant.model}


@dataclass
class VariantResult:
    name: str
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)  # per seed: seed, run_dir, parent_run_id, summary
    folds: list[dict[str, float]] = field(default_factory=list)  # test metrics of every fold of every seed
    summary: dict[str, float] = field(default_factory=dict)  # <metric>_mean / _std over ``folds``


def ablation_table(results: Sequence[VariantResult], title: str) -> str:
    """Markdown: one row per variant, mean +- std of each metric over folds (and seeds)."""
    lines = [f"### {title}", "", "| variant | " + " | ".join(m for _, m in METRICS) + " | folds |", "|---|" + "---|" * (len(METRICS) + 1)]
    for r in results:
        cells = [f"{r.summary[f'{k}_mean']:.3f} ± {r.summary[f'{k}_std']:.3f}" for k, _ in METRICS]
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {len(r.folds)} |")
    return "\n".join(lines) + "\n"


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _check_store(store_path: str, variants: Sequence[Variant]) -> list[str]:
    """The streams the store holds; a variant that needs one it lacks is refused before any training."""
    from modeling.training.experiment import trained_modalities
    from storage.feature_store import FeatureStore

    held = trained_modalities(FeatureStore.open(store_path).manifest())
    missing = {v.name: sorted(set(v.needs) - set(held)) for v in variants if set(v.needs) - set(held)}
    if missing:
        raise ValueError(
            f"store {store_path} holds {held or 'no stream'}; these variants need what it lacks: {missing} (choose others with --variants)"
        )
    return held


@task(name="ablation-parent", cache_policy=NO_CACHE)
def parent_task(out_dir: str, dataset: str, params: dict[str, Any], track: bool) -> str | None:
    """The parent run, created once per ablation directory (a rerun reuses it); None when not tracked."""
    from modeling.training.run_dir import write_json

    state_path = Path(out_dir) / STATE_FILE
    if not track:  # an untracked ablation has no parent, whatever an earlier tracked one left
        return None
    tracker = run_logger(track)
    if state_path.exists():
        run_id = json.loads(state_path.read_text())["parent_run_id"]
        tracker.reopen(run_id)
        return run_id
    ref = tracker.start_experiment(dataset, f"ablation-{dataset}-{Path(out_dir).name}", {"msata.ablation_dir": out_dir})
    with tracker.ended_on_failure(ref.parent_run_id):
        tracker.log_params(ref.parent_run_id, params)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(state_path, {"parent_run_id": ref.parent_run_id, "experiment_id": ref.experiment_id})
    return ref.parent_run_id


@task(name="prepare-variant", cache_policy=NO_CACHE, task_run_name="prepare-{variant}-seed-{seed}")
def prepare_variant_task(
    store_path: str,
    dataset: str,
    variant: str,
    seed: int,
    train: dict[str, Any],
    splits: dict[str, Any],
    model: dict[str, Any],
    run_dir: str,
    parent: str | None,
    data: dict[str, Any] | None = None,
) -> str:
    from modeling.data.splits import SplitConfig
    from modeling.training.experiment import prepare_experiment
    from modeling.training.train_loop import TrainConfig

    tags = (
        {"mlflow.parentRunId": parent, "mlflow.runName": f"{variant} seed {seed}", "msata.variant": variant, "msata.seed": str(seed)}
        if parent
        else None
    )
    train_config = TrainConfig.from_dict({**train, "seed": seed})
    return str(
        prepare_experiment(
            store_path,
            dataset,
            train_config,
            SplitConfig(**splits),
            model,
            run_dir=run_dir,
            resume=True,
            logger=run_logger(parent is not None),
            run_tags=tags,
            data_overrides=data,
        )
    )


@flow(name="ablate-msata", log_prints=True)
def ablate_msata(
    store_path: str,
    dataset: str,
    variants: list[str] | None = None,
    seeds: list[int] = [0],  # noqa: B006 - Prefect parameters: a plain list shows in the UI form
    train: TrainParams = TrainParams(),  # noqa: B008 - immutable pydantic defaults
    splits: SplitParams = SplitParams(),  # noqa: B008
    model: ModelOverrides = ModelOverrides(),  # noqa: B008
    out_dir: str | None = None,
    track: bool = True,
    data: DataParams = DataParams(),  # noqa: B008
) -> dict[str, Any]:
    """Run the ablation grid on ``store_path``; returns ``{"out_dir", "table", "variants": [...]}``.

    ``train`` / ``splits`` / ``model`` / ``data`` are the base config (as for ``train-msata``);
    ``variants`` picks rows of the grid (default all, see ``VARIANTS``); ``seeds`` are the
    training seeds every variant runs with (the folds are the same for all)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.artifacts import artifact_key
    from modeling.training.experiment import cross_validation_chain
    from modeling.training.metrics import summarize_folds
    from modeling.training.run_dir import write_json
    from storage.home import msata_home

    configure_environment()
    logger = get_run_logger()
    chosen = select_variants(variants)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give one or more distinct training seeds")
    held = _check_store(store_path, chosen)
    base_train, base_splits, base_model = train.to_config().to_dict(), asdict(splits.to_config()), model.overrides()
    base_data = data.overrides()
    params = {
        "store_path": store_path,
        "dataset": dataset,
        "variants": [v.name for v in chosen],
        "seeds": list(seeds),
        "train": base_train,
        "splits": base_splits,
        "model": base_model,
    } | ({"data": base_data} if base_data != DataParams().overrides() else {})  # default augmentation keeps older keys
    out = Path(out_dir) if out_dir else msata_home() / "ablations" / dataset / _key({k: v for k, v in params.items() if k != "variants"})
    parent = parent_task(str(out), dataset, params, track)
    tracker = run_logger(parent is not None)
    results: list[VariantResult] = []
    with tracker.ended_on_failure(parent):
        for variant in chosen:
            v_train, v_model = variant_settings(variant, base_train, base_model)
            result = VariantResult(variant.name, variant.label)
            for seed in seeds:
                run_dir = str(out / variant.name / f"seed-{seed}")
                _, cv = cross_validation_chain(
                    lambda run_dir=run_dir, seed=seed, v_train=v_train, v_model=v_model, variant=variant: prepare_variant_task(
                        store_path, dataset, variant.name, seed, v_train, base_splits, v_model, run_dir, parent, base_data
                    ),
                    lambda path, index: fold_task(path, index),
                    lambda path: finalize_task(path, False),
                )
                result.folds += [f["test"] for f in cv["folds"]]
                result.runs.append({"seed": seed, "run_dir": run_dir, "parent_run_id": cv.get("parent_run_id"), "summary": cv["summary"]})
            result.summary = summarize_folds(result.folds)
            logger.info(
                "%s: test UAR %.4f +- %.4f over %d folds",
                variant.label,
                result.summary["uar_mean"],
                result.summary["uar_std"],
                len(result.folds),
            )
            results.append(result)
        title = f"{dataset}: ablation, test mean ± std over {len(results[0].folds) // len(seeds)} speaker-independent folds x {len(seeds)} seed(s)"
        table = ablation_table(results, title)
        out.mkdir(parents=True, exist_ok=True)
        (out / TABLE_FILE).write_text(table)
        payload = {**params, "streams": held, "table": table, "variants": [asdict(r) for r in results]}
        write_json(out / JSON_FILE, payload)
        metrics = {f"{k}_{stat}.{r.name}": r.summary[f"{k}_{stat}"] for r in results for k, _ in METRICS for stat in ("mean", "std")}
        tracker.log_metrics(parent, metrics)
        tracker.log_artifact(parent, out / TABLE_FILE)
        tracker.log_artifact(parent, out / JSON_FILE)
        tracker.end(parent)
    create_markdown_artifact(
        table + f"\nablation directory: `{out}`\n", key=artifact_key("ablation", dataset), description=f"msata ablation grid on {dataset}"
    )
    return {"out_dir": str(out), "table": table, "parent_run_id": parent, "variants": [asdict(r) for r in results]}


def run_ablation(
    store_path: str,
    dataset: str,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    train: dict[str, Any] | None = None,
    splits: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    track: bool = True,
    progress: Callable[[Any], None] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``ablate-msata`` in this process against PREFECT_API_URL or a temporary API (``msata ablate``).
    Arguments are checked before any server starts."""
    from prefect.exceptions import ParameterTypeError

    from flows.api import prefect_api

    select_variants(variants)
    params = {
        "store_path": str(store_path),
        "dataset": dataset,
        "variants": list(variants) if variants else None,
        "seeds": [int(s) for s in seeds],
        "train": train or {},
        "splits": splits or {},
        "model": model or {},
        "out_dir": str(out_dir) if out_dir else None,
        "track": track,
        "data": data or {},
    }
    try:
        ablate_msata.validate_parameters(params)
    except ParameterTypeError as err:
        raise ValueError(str(err)) from err
    _check_store(str(store_path), select_variants(variants))
    with prefect_api(), progress_hook(progress) if progress else nullcontext():
        try:
            return ablate_msata(**params)
        finally:
            flush_api_logs()
