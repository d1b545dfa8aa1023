"""train-msata's typed parameters (a form in the Prefect UI) and the in-process progress hooks; no training here."""

from __future__ import annotations

from dataclasses import fields

import pytest


def test_flow_parameters_are_typed_configs_with_every_field() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.train import train_msata
    from modeling.data.splits import SplitConfig
    from modeling.network.encoder import MsataConfig
    from modeling.training.train_loop import TrainConfig

    schema = parameter_schema(train_msata).model_dump_for_openapi()
    defs = schema["definitions"]
    for param, config in (("train", TrainConfig), ("splits", SplitConfig), ("model", MsataConfig)):
        ref = schema["properties"][param]["$ref"].rsplit("/", 1)[-1]
        assert set(defs[ref]["properties"]) == {f.name for f in fields(config)}, param
        assert defs[ref]["additionalProperties"] is False, param
    assert defs["TrainConfig"]["properties"]["epochs"]["default"] == 40
    assert defs["SplitConfig"]["properties"]["n_folds"]["default"] == 5


def test_the_data_parameter_is_the_augmentation_of_data_config() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.train import train_msata
    from flows.train_params import DataParams
    from modeling.data.examples import AUGMENT_FIELDS, DataConfig

    schema = parameter_schema(train_msata).model_dump_for_openapi()
    ref = schema["properties"]["data"]["$ref"].rsplit("/", 1)[-1]
    props = schema["definitions"][ref]["properties"]
    assert set(props) == set(AUGMENT_FIELDS)
    assert {k: v["default"] for k, v in props.items()} == {k: getattr(DataConfig(), k) for k in AUGMENT_FIELDS}  # one default
    assert DataParams(time_masks=0).overrides()["time_masks"] == 0


def test_dicts_are_validated_into_configs_and_typos_refused() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.train import train_msata
    from modeling.data.splits import SplitConfig
    from modeling.training.train_loop import TrainConfig

    base = {"store_path": "s", "dataset": "crema-d"}
    params = train_msata.validate_parameters(base | {"train": {"epochs": 3}, "splits": {"n_folds": 2}, "model": {"d_model": 64}})
    assert params["train"].to_config() == TrainConfig(epochs=3)
    assert params["splits"].to_config() == SplitConfig(n_folds=2)
    assert params["model"].overrides() == {"d_model": 64}  # only what was given: the store decides the rest
    defaults = train_msata.validate_parameters(base)
    assert defaults["train"].to_config() == TrainConfig() and defaults["model"].overrides() == {}
    with pytest.raises(ParameterTypeError, match="epoch"):
        train_msata.validate_parameters(base | {"train": {"epoch": 3}})
    with pytest.raises(ParameterTypeError, match="epochs"):
        train_msata.validate_parameters(base | {"train": {"epochs": "many"}})


def test_progress_hooks_reach_only_registered_callbacks() -> None:
    from flows.train import progress_hook, report_progress

    seen: list[str] = []
    report_progress("ignored")  # nobody listening: nothing happens
    with progress_hook(seen.append):
        report_progress("a")
        with progress_hook(lambda e: seen.append(f"inner {e}")):
            report_progress("b")
    report_progress("c")
    assert seen == ["a", "b", "inner b"]
