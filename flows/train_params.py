"""Typed parameters of the ``train-msata`` flow: the Prefect UI shows them as a form.

Each is a pydantic model generated from the dataclass the training code uses, field
for field (names, types, defaults), so the two never drift apart:

* ``TrainParams`` <- ``modeling.training.train_loop.TrainConfig`` (``.to_config()``);
* ``SplitParams`` <- ``modeling.data.splits.SplitConfig`` (``.to_config()``);
* ``DataParams`` <- the augmentation fields of ``modeling.data.examples.DataConfig``
  (``AUGMENT_FIELDS``: SpecAugment masks, face-crop jitter; ``.overrides()``); its other
  fields mirror ``TrainConfig``'s and are set through ``TrainParams`` only;
* ``ModelOverrides`` <- ``modeling.network.encoder.MsataConfig`` with every field optional:
  only the fields given override the defaults (``.overrides()``), the store and the
  labels decide the rest (n_classes, input sizes).

Unknown keys are refused (``extra="forbid"``): a typo in a deployment's parameters
fails the run at validation instead of being ignored. Dicts still work everywhere a
config is expected (``prefect deployment run --params``, ``train_msata(train={...})``):
Prefect validates them into these models.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from modeling.data.examples import AUGMENT_FIELDS, LATER_DATA_DEFAULTS, DataConfig
from modeling.data.splits import SplitConfig
from modeling.network.encoder import MsataConfig
from modeling.training.train_loop import TrainConfig


class _ConfigParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _config_class: typing.ClassVar[type]

    def to_config(self) -> Any:
        return self._config_class(**self.model_dump())


class _OverrideParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as plain data (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name} has no default: a flow parameter form needs one")


class _DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def overrides(self) -> dict[str, Any]:
        """Every [data] setting, less those at their LATER_DATA_DEFAULTS value (older runs' and ablations' keys)."""
        values = self.model_dump()
        return {k: v for k, v in values.items() if not (k in LATER_DATA_DEFAULTS and v == LATER_DATA_DEFAULTS[k])}


def _params_model(config: type, base: type[BaseModel], optional: bool, only: tuple[str, ...] | None = None) -> type[BaseModel]:
    hints = typing.get_type_hints(config)
    spec: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if only is not None and field.name not in only:
            continue
        kind, default = hints[field.name], _field_default(field)
        spec[field.name] = (kind | None, None) if optional else (kind, default)
    suffix = "Overrides" if optional else "Augmentation" if only else ""
    model = create_model(config.__name__ + suffix, __base__=base, __module__=__name__, **spec)
    if not optional and only is None:
        model._config_class = config
    return model


TrainParams = _params_model(TrainConfig, _ConfigParams, optional=False)
SplitParams = _params_model(SplitConfig, _ConfigParams, optional=False)
ModelOverrides = _params_model(MsataConfig, _OverrideParams, optional=True)
DataParams = _params_model(DataConfig, _DataParams, optional=False, only=AUGMENT_FIELDS)
