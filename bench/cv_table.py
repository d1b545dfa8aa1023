"""Markdown tables of a finished cross-validation run directory (what docs/results.md shows).

    .venv/bin/python bench/cv_table.py RUN_DIR [RUN_DIR ...]

Per fold: test and validation actors, best epoch / epochs run, validation UAR (the only figure
used to choose anything), test WA / UAR / macro-F1; then mean ± std (population std) over folds,
and the pooled test confusion matrix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def table(run_dir: Path) -> str:
    spec = json.loads((run_dir / "experiment.json").read_text())
    result = json.loads((run_dir / "cv_result.json").read_text())
    lines = [
        f"Run `{run_dir.name}`: feature config `{spec['feature_config_hash']}`, model {json.dumps({k: spec['model'][k] for k in ('d_model', 'n_layers', 'audio_downsample', 'pooling', 'audio_layers')})}, "
        f"speaker_norm={spec['train'].get('speaker_norm', False)}",
        "",
        "| fold | test actors | val actors | best epoch / run | val UAR | test WA | test UAR | test macro-F1 |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for fold, res in zip(spec["folds"], result["folds"], strict=False):
        t = res["test"]
        lines.append(
            f"| {fold['index']} | {' '.join(fold['test_speakers'])} | {' '.join(fold['val_speakers'])} | {res['best_epoch']} / {res['epochs_run']} "
            f"| {res['best_val_uar']:.3f} | {t['wa']:.3f} | {t['uar']:.3f} | {t['macro_f1']:.3f} |"
        )
    s = result["summary"]
    val = np.mean([r["best_val_uar"] for r in result["folds"]])
    lines.append(
        f"| **mean ± std** | | | | {val:.3f} | **{s['wa_mean']:.3f} ± {s['wa_std']:.3f}** | **{s['uar_mean']:.3f} ± {s['uar_std']:.3f}** "
        f"| **{s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f}** |"
    )
    names = result["label_names"]
    confusion = np.asarray(result["confusion"])
    lines += [
        "",
        "Pooled test confusion (rows = truth):",
        "",
        "| | " + " | ".join(names) + " | recall |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for i, name in enumerate(names):
        row = " | ".join(f"**{v}**" if j == i else str(v) for j, v in enumerate(confusion[i]))
        lines.append(f"| {name} | {row} | {confusion[i, i] / max(confusion[i].sum(), 1):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(Path(path)))
        print()
