"""features/config_keys.py: the unknown-keys check the config dataclasses' ``from_dict`` share."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from features.config import FeatureConfig
from features.config_keys import reject_unknown_keys


@dataclass
class Pair:
    left: int = 0
    right: int = 0


def test_known_keys_pass_and_unknown_ones_are_named_with_the_known() -> None:
    reject_unknown_keys({"left": 1}, Pair, "Pair")
    reject_unknown_keys({}, ["a"], "x")
    with pytest.raises(ValueError, match=r"^unknown Pair keys \['lft', 'z'\]; known: \['left', 'right'\]$"):
        reject_unknown_keys({"z": 1, "lft": 2, "left": 3}, Pair, "Pair")
    with pytest.raises(ValueError, match=r"^unknown data keys \['b'\]; known: \['a'\]$"):
        reject_unknown_keys({"b": 1}, ("a",), "data")


def test_the_feature_config_refuses_an_unknown_key() -> None:
    with pytest.raises(
        ValueError, match=r"unknown feature-config keys \['faces'\]; known: \['audio', 'audio_encoder', 'face', 'format_version'\]"
    ):
        FeatureConfig.from_dict({"faces": {}})
