"""Prefect artifacts a person reads in the UI (a flow run's "Artifacts" tab and the Artifacts page).

* ``train-msata``: the cross-validation table (one row per fold, then mean +- std) and
  a link to the MLflow parent run;
* ``preprocess-dataset``: the summary (done / skipped / failed / rejected) with a table
  of the failures and their reasons.

Keys name the dataset (``cv-crema-d``, ``mlflow-run-crema-d``, ``preprocess-crema-d``)
so the UI keeps each one's history across runs. Called from inside a flow run.
"""

from __future__ import annotations

import re
from typing import Any

MAX_FAILURE_ROWS = 200  # the store's failures table has them all


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def cv_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the cross-validation table from ``asdict(CVResult)``."""
    rows: list[dict[str, Any]] = []
    for fold in result["folds"]:
        test = fold["test"]
        rows.append(
            {
                "fold": str(fold["index"]),
                "best epoch": fold["best_epoch"],
                "val UAR": round(fold["best_val_uar"], 4),
                "test WA": round(test["wa"], 4),
                "test UAR": round(test["uar"], 4),
                "test macro-F1": round(test["macro_f1"], 4),
            }
        )
    s = result["summary"]
    rows.append(
        {
            "fold": "mean ± std",
            "best epoch": "",
            "val UAR": "",
            "test WA": f"{s['wa_mean']:.4f} ± {s['wa_std']:.4f}",
            "test UAR": f"{s['uar_mean']:.4f} ± {s['uar_std']:.4f}",
            "test macro-F1": f"{s['macro_f1_mean']:.4f} ± {s['macro_f1_std']:.4f}",
        }
    )
    return rows


def mlflow_run_link(experiment_id: str, run_id: str) -> tuple[str, str]:
    """(URL, how to open it): the tracking server's own UI, or `mlflow ui` on the SQLite store."""
    from modeling.tracking.runs import tracking_uri

    uri = tracking_uri()
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}", f"MLflow run {run_id} on {uri}"
    return f"http://127.0.0.1:5000/{path}", f"MLflow run {run_id}; the store is {uri}: open it with `mlflow ui --backend-store-uri {uri}`"


def publish_cv_artifacts(result: dict[str, Any], experiment_id: str | None) -> None:
    from prefect.artifacts import create_link_artifact, create_table_artifact

    dataset = result["dataset"]
    s = result["summary"]
    create_table_artifact(
        cv_table(result),
        key=artifact_key("cv", dataset),
        description=f"{dataset}: speaker-independent cross-validation, test UAR {s['uar_mean']:.4f} ± {s['uar_std']:.4f} over {len(result['folds'])} fold(s); run directory {result['run_dir']}",
    )
    if result.get("parent_run_id") and experiment_id:
        link, description = mlflow_run_link(experiment_id, result["parent_run_id"])
        registered = result.get("registered") or {}
        if registered.get("model_uri"):
            description += f"; registered {registered['model_uri']}"
        create_link_artifact(
            link, link_text=f"MLflow run {result['parent_run_id']}", key=artifact_key("mlflow-run", dataset), description=description
        )


def preprocess_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Preprocessing summary: {summary['store']}",
        "",
        "| done | skipped | failed | rejected by the recipe | feature config |",
        "|---|---|---|---|---|",
        f"| {summary['done']} | {summary['skipped']} | {summary['failed']} | {summary['rejected']} | `{summary['config_hash']}` |",
        "",
    ]
    failures = summary["failures"]
    if not failures:
        return "\n".join(lines + ["No failures."])
    lines += [f"## Failures ({len(failures)})", "", "| clip | path | reason |", "|---|---|---|"]
    for failure in failures[:MAX_FAILURE_ROWS]:
        cells = (failure.get("clip_id") or "-", failure.get("path") or "-", failure.get("reason") or "-")
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if len(failures) > MAX_FAILURE_ROWS:
        lines += ["", f"{len(failures) - MAX_FAILURE_ROWS} more: see the store's failures table."]
    return "\n".join(lines)


def publish_preprocess_summary(dataset: str, summary: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        preprocess_markdown(summary),
        key=artifact_key("preprocess", dataset),
        description=f"{summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed, {summary['rejected']} rejected -> {summary['store']}",
    )
