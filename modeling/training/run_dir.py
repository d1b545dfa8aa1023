"""Which files of a run directory msata wrote, and the rule that it never deletes anything else.

A run directory is msata's when it holds ``experiment.json``, which
``prepare_experiment`` writes before anything else. A fresh (non-resumed) run in
msata's own directory removes only the names msata writes there, so a user's
notes beside them survive; a non-empty folder without ``experiment.json`` is
refused with :class:`RunDirError` before anything is written into it. Run files are
written with :func:`write_json` (atomic: a kill leaves the old file or none).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

SPEC_FILE = "experiment.json"
LOGGER_FILE = "run_logger.json"  # which run logger the experiment logs to (modeling/training/run_logger.py)
# Everything prepare_experiment / run_fold / finalize_experiment write at the top level.
OWNED_FILES = frozenset(
    {SPEC_FILE, LOGGER_FILE, "splits.csv", "splits.json", "cv_result.json", "confusion_pooled.png", "registration.json"}
)
FOLD_DIR = re.compile(r"fold_\d+")


class RunDirError(ValueError):
    """A run directory msata may not use (a non-empty folder it did not create)."""


def _owned(entry: Path) -> bool:
    """A name msata writes in a run directory (only meaningful once experiment.json is there)."""
    if entry.is_dir() and not entry.is_symlink():
        return FOLD_DIR.fullmatch(entry.name) is not None
    return entry.name in OWNED_FILES


def check_run_dir(run_dir: str | Path) -> None:
    """Raise RunDirError when ``run_dir`` is a non-empty folder that msata did not create."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a folder: choose another --run-dir")
    if not run_dir.exists() or (run_dir / SPEC_FILE).is_file():
        return
    found = sorted(p.name for p in run_dir.iterdir())
    if found:
        shown = ", ".join(found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
        raise RunDirError(
            f"run directory {run_dir} is not an msata run directory (no {SPEC_FILE}) and is not empty ({shown}): choose an empty or new --run-dir"
        )


def clear_run_dir(run_dir: str | Path) -> list[str]:
    """Remove what an earlier msata run wrote in ``run_dir`` (and nothing else); returns the names removed."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if not (run_dir / SPEC_FILE).is_file():
        return []
    removed = []
    for entry in sorted(run_dir.iterdir()):
        if not _owned(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic: a kill mid-write leaves the old file or none, never half of one (run files mark progress)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
