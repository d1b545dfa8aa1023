"""features/recipes: the one table of dataset names, label sets and aliases that every reader uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.recipes import CORPORA, canonical_name, corpus, discover, fixed_labels
from features.recipes.crema_d import CREMA_D_LABELS
from features.recipes.ravdess import RAVDESS_LABELS
from modeling.tracking.runs import model_name


def test_one_spelling_per_dataset() -> None:
    assert list(CORPORA) == ["crema-d", "ravdess", "folder"]
    for spelling in ("crema-d", "crema_d", "CREMA-D", " cremad ", "crema"):
        assert canonical_name(spelling) == "crema-d", spelling
    assert canonical_name("My_Set") == "my-set"  # a user's dataset keeps its name, in the same normal form
    assert model_name("crema_d") == "msata-crema-d" and model_name("RAVDESS") == "msata-ravdess"
    every_alias = [a for c in CORPORA.values() for a in c.aliases]
    assert len(every_alias) == len(set(every_alias)) and not set(every_alias) & set(CORPORA)


def test_labels_come_from_the_recipes() -> None:
    assert fixed_labels("crema_d") == CREMA_D_LABELS and fixed_labels("ravdess") == RAVDESS_LABELS
    assert fixed_labels("folder") is None and fixed_labels("my-set") is None  # the store's labels decide


def test_discover_dispatches_and_names_the_known_datasets(tmp_path: Path) -> None:
    (tmp_path / "AudioWAV").mkdir()
    (tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav").write_bytes(b"\0" * 16)
    (tmp_path / "labels.csv").write_text("path,label,speaker\nAudioWAV/1001_DFA_ANG_XX.wav,calm,s1\n")
    for spelling in ("crema-d", "crema_d"):
        [clip] = discover(spelling, str(tmp_path)).records
        assert (clip.dataset, clip.label) == ("crema-d", "angry")  # the record carries the one spelling
    [clip] = discover("folder", str(tmp_path)).records
    assert (clip.dataset, clip.label) == ("folder", "calm")
    with pytest.raises(ValueError, match=r"unknown dataset 'iemocap'; expected one of crema-d, ravdess, folder"):
        corpus("iemocap")
