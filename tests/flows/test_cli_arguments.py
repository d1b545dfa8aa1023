"""msata's argument checking, in-process with typer's CliRunner, no server: every command's
--help, and a mistake on the command line ends with exit 2 and a message naming the option
and the offending value, without a traceback and before any work starts.

test_cli.py holds the rest (the config-table help text, a missing store, config typos, a
corpus that does not fit its recipe, compare's output).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.recipes import CORPORA
from flows.cli import app

runner = CliRunner()
COMMANDS = ("preprocess", "train", "compare", "predict", "demo", "ablate")


def flat(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text)).strip()


def test_every_command_is_listed_with_its_summary() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for command in COMMANDS:
        assert f" {command} " in text, (command, text)
    assert "Decode a corpus" in text and "Cross-validate msata" in text and "--verbose" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert f"Usage: root {command} [OPTIONS]" in text and "--help" in text, text
    assert "Traceback" not in result.output


def test_preprocess_offers_the_recipes_of_the_registry() -> None:
    text = flat(CliRunner(env={"COLUMNS": "200"}).invoke(app, ["preprocess", "--help"]).output)  # wide: the choices on one line
    assert "--dataset <" + "|".join(CORPORA) + ">" in text, text


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A CREMA-D root with one (fake) clip: enough for the recipe, never decoded here."""
    (tmp_path / "crema" / "AudioWAV").mkdir(parents=True)
    (tmp_path / "crema" / "AudioWAV" / "1001_DFA_ANG_XX.wav").write_bytes(b"\0" * 64)
    return tmp_path / "crema"


def usage_error(args: list[str]) -> str:
    """The flattened output of a command line that click refuses (exit 2, usage and the reason)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    text = flat(result.output)
    assert "Usage: root" in text and "Error" in text, text
    return text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--dataset": "iemocap"}, "Invalid value for '--dataset': Value error, 'iemocap' is not one of 'crema-d', 'ravdess', 'folder'."),
        ({"--dataset": "crema_d"}, "'crema_d' is not one of"),  # one spelling on the command line
        ({"--root": "MISSING"}, "Invalid value for '--root': dir"),
        ({"--workers": "0"}, "Invalid value for '--workers': Input should be greater than or equal to 1"),
        ({"--workers": "two"}, "Invalid value for '--workers': Input should be a valid integer"),
        ({"--limit": "0"}, "Invalid value for '--limit'"),
        ({"--detect-every": "0"}, "Invalid value for '--detect-every'"),
        ({"--feature-config": "MISSING"}, "Invalid value for '--feature-config': file"),
        ({"--store": None}, "Missing option '--store'."),
    ],
)
def test_preprocess_argument_errors(corpus: Path, tmp_path: Path, change: dict, expected: str) -> None:
    options = {"--dataset": "crema-d", "--root": str(corpus), "--store": str(tmp_path / "store")} | change
    options = {k: (str(tmp_path / "missing") if v == "MISSING" else v) for k, v in options.items() if v is not None}
    text = usage_error(["preprocess", *[part for item in options.items() for part in item]])
    assert expected in text, text
    if "MISSING" in change.values():
        assert str(tmp_path / "missing") in text  # the offending path is named
    assert not (tmp_path / "store").exists()


def test_face_search_is_a_feature_setting_checked_before_any_work(corpus: Path, tmp_path: Path) -> None:
    from flows.cli_support import feature_config_from

    assert feature_config_from(None, {"face.search": "near"}).face.search == "near"
    assert feature_config_from(None, {"face.search": None}).face.search == "full"  # unset: the default
    args = ["preprocess", "--dataset", "crema-d", "--root", str(corpus), "--store", str(tmp_path / "store"), "--face-search", "wide"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[0] == "error: feature settings: face search 'wide'; expected one of ('full', 'near', 'track')", (
        result.output
    )
    assert not (tmp_path / "store").exists()


def test_bad_dask_address_is_one_line_before_any_work(corpus: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "preprocess",
            "--dataset",
            "crema-d",
            "--root",
            str(corpus),
            "--store",
            str(tmp_path / "store"),
            "--dask-address",
            "localhost:8786",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert lines[0] == "error: dask_address must be a scheduler address such as tcp://host:8786, got 'localhost:8786'", result.output
    assert len(lines) == 2 and not (tmp_path / "store").exists()  # the second line: how to see the traceback


@pytest.mark.parametrize(
    ("device", "first_line"),
    [
        ("gpu", "error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("cuda:9", None),  # no GPU here: "asks for a GPU"; on a GPU host: "sees N CUDA device(s)"
    ],
)
def test_bad_device_is_one_line_before_any_work(corpus: Path, tmp_path: Path, device: str, first_line: str | None) -> None:
    import torch

    args = ["preprocess", "--dataset", "crema-d", "--root", str(corpus), "--store", str(tmp_path / "store"), "--device", device]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    if first_line is None:
        if torch.cuda.device_count() > 9:
            pytest.skip("this host has a tenth GPU")
        expected = (
            "asks for a GPU, but this worker sees no CUDA device" if not torch.cuda.is_available() else "CUDA device(s), numbered 0 to"
        )
        assert lines[0].startswith("error: device='cuda:9'") and expected in lines[0], result.output
    else:
        assert lines[0] == first_line, result.output
    assert len(lines) == 2 and not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--folds", "1"], "Invalid value for '--folds'"),
        (["--epochs", "0"], "Invalid value for '--epochs'"),
        (["--config", "MISSING"], "Invalid value for '--config': file"),
        (["--register", "yes"], "Got unexpected extra argument(s) (yes)"),  # a flag: --register / --no-register
    ],
)
def test_train_argument_errors(tmp_path: Path, extra: list[str], expected: str) -> None:
    extra = [str(tmp_path / "missing.toml") if part == "MISSING" else part for part in extra]
    text = usage_error(["train", "--store", str(tmp_path / "store"), "--dataset", "crema-d", *extra])
    assert expected in text, text


def test_train_needs_a_store_and_a_dataset() -> None:
    assert "Missing option '--store'." in usage_error(["train", "--dataset", "crema-d"])
    assert "Missing option '--dataset'." in usage_error(["train", "--store", "somewhere"])


def test_train_config_with_an_unknown_section_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[trian]\nepochs = 3\n")
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "no-store"), "--dataset", "crema-d", "--config", str(config)])
    assert result.exit_code == 2, result.output
    first = result.output.splitlines()[0]
    assert first == f"error: {config}: unknown sections ['trian']; expected train, model, splits, data", result.output


def test_train_config_data_table_is_checked_before_any_work(tmp_path: Path) -> None:
    """[data] holds the augmentation only; a loader setting TrainConfig owns, or a typo, is one line."""
    for table, expected in (
        ("[data]\nmax_duration_s = 3.0\n", "[data]: data settings ['max_duration_s'] are set in [train] (TrainConfig), not [data]"),
        ("[data]\ntime_mask = 1\n", "[data]: unknown data keys ['time_mask']"),
    ):
        config = tmp_path / "run.toml"
        config.write_text(table)
        result = runner.invoke(app, ["train", "--store", str(tmp_path / "no-store"), "--dataset", "crema-d", "--config", str(config)])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[0].startswith(f"error: {config}: {expected}"), result.output


def test_predict_argument_errors(tmp_path: Path) -> None:
    assert "Missing argument 'files'." in usage_error(["predict"])
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"\0" * 64)
    assert "Invalid value for '--window'" in usage_error(["predict", str(clip), "--window", "0"])
    assert "Invalid value for '--hop'" in usage_error(["predict", str(clip), "--hop", "0"])


def test_predict_with_a_model_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"\0" * 64)
    model = tmp_path / ("a-long-folder-name-so-that-the-message-is-wider-than-a-terminal" * 2) / "none.pt"
    result = runner.invoke(app, ["predict", str(clip), "--model", str(model)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [f"cannot load model: model {str(model)!r}: no such checkpoint file or model folder"], (
        result.output
    )


def test_compare_and_demo_argument_errors() -> None:
    assert "Invalid value for '--format': Value error, 'xml' is not one of 'table', 'json', 'csv'." in usage_error(
        ["compare", "--format", "xml"]
    )
    assert "Invalid value for '--epochs'" in usage_error(["demo", "--epochs", "0"])
    assert "No such command 'trian'." in usage_error(["trian"])


def test_ablate_argument_errors(tmp_path: Path) -> None:
    def error(args: list[str]) -> str:
        result = runner.invoke(app, ["ablate", *args])
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        return flat(result.output)

    assert "--variants: unknown ablation variant(s) ['rope']" in error(
        ["--store", str(tmp_path), "--dataset", "x", "--variants", "tarope,rope"]
    )
    assert "--seeds '0,a': expected comma-separated integers" in error(["--store", str(tmp_path), "--dataset", "x", "--seeds", "0,a"])
    assert "give --store and --dataset (got store=None, dataset='x'), or --demo" in error(["--dataset", "x"])
    assert "--demo builds its own store" in error(["--demo", "--store", str(tmp_path)])
