"""Markdown tables of a finished cross-validation run directory (what docs/results.md shows).

    .venv/bin/python bench/cv_table.py RUN_DIR [RUN_DIR ...]

Per fold: test and validation actors, best epoch / epochs run, validation UAR (the only figure
used to choose anything), test WA / UAR / macro-F1; then mean ± std (sample std, ddof=1, as `msata train` computes it) over folds,
and the pooled test confusion matrix; then each fold's training curve from its ``fold_k/last.pt``
(validation UAR per epoch, seconds of training, and the largest fall of validation UAR from one
epoch to the next after epoch 3, the figure docs/results.md uses to compare how noisy runs are).
With ``train.members`` a table gives each member's validation UAR beside the ensemble's. With ``train.probe_weight`` a second table gives each fold's probe (C, its own validation UAR), the
validation UAR of the model alone and mixed, and the test figures of the model alone beside the mixed ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.training.checkpoint import load_checkpoint  # noqa: E402


def table(run_dir: Path) -> str:
    spec = json.loads((run_dir / "experiment.json").read_text())
    result = json.loads((run_dir / "cv_result.json").read_text())
    lines = [
        f"Run `{run_dir.name}`: feature config `{spec['feature_config_hash']}`, model {json.dumps({k: spec['model'][k] for k in ('d_model', 'n_layers', 'audio_downsample', 'pooling', 'audio_layers')})}, "
        f"audio_layer_mix={spec['model'].get('audio_layer_mix', 'softmax')}, speaker_norm={spec['train'].get('speaker_norm', False)}, "
        f"ema_decay={spec['train'].get('ema_decay', 0.0)}, probe_weight={spec['train'].get('probe_weight', 0.0)} ({spec['train'].get('probe_mix', 'mean')}), "
        f"mixup_alpha={spec['train'].get('mixup_alpha', 0.0)}",
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
    if all(r.get("probe") for r in result["folds"]):
        lines += ["", *probe_table(result)]
    if all(r.get("members") for r in result["folds"]):
        lines += ["", *members_table(result)]
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
    return "\n".join(lines + ["", *curves(run_dir, len(result["folds"]))])


def probe_table(result: dict) -> list[str]:
    """Markdown lines: per fold, the pooled probe (train.probe_weight) and the model alone beside the mixture."""
    from modeling.training.metrics import mean_std

    lines = [
        "Pooled probe (`train.probe_weight`): the mixed model is the one above; the model alone is reported beside it:",
        "",
        "| fold | probe C | probe val UAR | val UAR, model alone | val UAR, mixed | test UAR, model alone | test UAR, mixed | test WA, model alone | test macro-F1, model alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in result["folds"]:
        p, alone = res["probe"], res["probe"]["test_model"]
        val = " | ".join(f"{p[k]:.3f}" if k in p else "-" for k in ("val_uar_model", "val_uar_mixed"))
        lines.append(
            f"| {res['index']} | {p['C']} | {p['probe_val_uar']:.3f} | {val} | {alone['uar']:.3f} | {res['test']['uar']:.3f} "
            f"| {alone['wa']:.3f} | {alone['macro_f1']:.3f} |"
        )
    cells = []
    for key in ("probe_val_uar", "val_uar_model", "val_uar_mixed"):
        values = [r["probe"][key] for r in result["folds"] if key in r["probe"]]
        cells.append(f"{np.mean(values):.3f}" if values else "-")
    stats = {k: mean_std([r["probe"]["test_model"][k] for r in result["folds"]]) for k in ("uar", "wa", "macro_f1")}
    mixed = mean_std([r["test"]["uar"] for r in result["folds"]])
    lines.append(
        f"| **mean ± std** | | {' | '.join(cells)} | {stats['uar'][0]:.3f} ± {stats['uar'][1]:.3f} | {mixed[0]:.3f} ± {mixed[1]:.3f} "
        f"| {stats['wa'][0]:.3f} ± {stats['wa'][1]:.3f} | {stats['macro_f1'][0]:.3f} ± {stats['macro_f1'][1]:.3f} |"
    )
    return lines


def members_table(result: dict) -> list[str]:
    """Markdown lines: per fold, the seed ensemble (train.members): each member's best epoch and validation UAR,
    the ensemble's validation UAR (what the fold ships, without a probe), and member 0 alone on test beside it.
    The first table's "val UAR" column is member 0's (``best_val_uar``)."""
    from modeling.training.metrics import mean_std

    lines = [
        "Seed ensemble (`train.members`): the first table's test figures are the ensemble's, its val UAR column member 0's:",
        "",
        "| fold | seeds | best epochs | val UAR, each member | val UAR, ensemble | test UAR, member 0 alone | test UAR, ensemble |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for res in result["folds"]:
        m = res["members"]
        each = " / ".join(f"{v:.3f}" for v in m["val_uar_members"])
        lines.append(
            f"| {res['index']} | {' '.join(map(str, m['seeds']))} | {' / '.join(map(str, m['best_epochs']))} | {each} "
            f"| {m['val_uar_ensemble']:.3f} | {m['test_first_member']['uar']:.3f} | {res['test']['uar']:.3f} |"
        )
    folds = result["folds"]
    first = mean_std([r["members"]["test_first_member"]["uar"] for r in folds])
    ensemble = mean_std([r["test"]["uar"] for r in folds])
    val = np.mean([r["members"]["val_uar_ensemble"] for r in folds])
    lines.append(f"| **mean ± std** | | | | {val:.3f} | {first[0]:.3f} ± {first[1]:.3f} | {ensemble[0]:.3f} ± {ensemble[1]:.3f} |")
    return lines


def curves(run_dir: Path, n_folds: int, settle_epochs: int = 3) -> list[str]:
    """Markdown lines: each fold's validation UAR per epoch (first training, not a refit) from its last.pt."""
    lines = [
        "Training curves (validation UAR per epoch, from `fold_k/last.pt`):",
        "",
        f"| fold | validation UAR by epoch | training s | largest fall after epoch {settle_epochs} |",
        "|---|---|---:|---:|",
    ]
    falls = []
    for k in range(n_folds):
        path = run_dir / f"fold_{k}" / "last.pt"
        if not path.exists():
            lines.append(f"| {k} | (no {path.name}) | | |")
            continue
        history = load_checkpoint(path)["history"]
        uar = [r["val_uar"] for r in history]
        fall = max((a - b for a, b in zip(uar[settle_epochs - 1 :], uar[settle_epochs:], strict=False)), default=0.0)
        falls.append(fall)
        seconds = sum(r["seconds"] for r in history)
        lines.append(f"| {k} | {' '.join(f'{u:.3f}' for u in uar)} | {seconds:.0f} | {max(fall, 0.0):.3f} |")
    if falls:
        lines.append(f"| **all** | | | {max(max(falls), 0.0):.3f} |")
    return lines


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(Path(path)))
        print()
