"""Corpus recipes and the one table of what a dataset is.

Each recipe module turns a corpus folder into ClipRecords (``prepare_*(root) ->
RecipeResult``). ``CORPORA`` below is the only place that names the corpora: the
preprocess flow, the CLI's ``--dataset`` choices, the fixed class lists of the
splits and the MLflow experiment / registered model names (``msata-<name>``) all
read it, so a dataset has one spelling everywhere (``crema-d``, ``ravdess``,
``folder``). Any other name is a user's own dataset (trained from a ``folder``
store): it keeps its own spelling, lower-cased, with ``_`` written ``-``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from features.manifest import RecipeResult
from features.recipes import crema_d, folder, ravdess


@dataclass(frozen=True)
class Corpus:
    name: str  # the one spelling: CLI value, ClipRecord.dataset, experiment and model name msata-<name>
    prepare: Callable[[str, str | None], RecipeResult]  # (root, labels CSV or None) -> clips and rejections
    labels: tuple[str, ...] | None  # fixed class order; None: the store's labels, sorted
    aliases: tuple[str, ...] = ()  # other spellings accepted on input, never written


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        # The labels CSV only means something to the folder recipe; the corpora ignore it.
        Corpus(crema_d.DATASET, lambda root, _csv: crema_d.prepare_crema_d(root), crema_d.CREMA_D_LABELS, ("cremad", "crema")),
        Corpus(ravdess.DATASET, lambda root, _csv: ravdess.prepare_ravdess(root), ravdess.RAVDESS_LABELS),
        Corpus(folder.DATASET, lambda root, csv: folder.prepare_folder(root, csv), None),
    )
}
_BY_ALIAS = {alias: c.name for c in CORPORA.values() for alias in c.aliases}


def canonical_name(dataset: str) -> str:
    """The one spelling of a dataset name: a corpus alias maps to its name; every name
    is first lower-cased with ``_`` -> ``-`` (``crema_d`` -> ``crema-d``, ``My_Set`` -> ``my-set``)."""
    key = dataset.strip().lower().replace("_", "-")
    return _BY_ALIAS.get(key, key)


def corpus(dataset: str) -> Corpus:
    """The recipe entry of ``dataset`` (aliases accepted); ValueError names the known ones."""
    name = canonical_name(dataset)
    if name not in CORPORA:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(CORPORA)}")
    return CORPORA[name]


def fixed_labels(dataset: str) -> tuple[str, ...] | None:
    """The fixed class list of a known corpus, None for a user's dataset or the folder recipe."""
    entry = CORPORA.get(canonical_name(dataset))
    return entry.labels if entry is not None else None


def discover(dataset: str, root: str, csv_path: str | None = None) -> RecipeResult:
    """Run the dataset's recipe over ``root``; an unknown name raises with the accepted ones."""
    return corpus(dataset).prepare(root, csv_path)
