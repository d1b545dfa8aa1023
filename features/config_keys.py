"""The one check behind the ``from_dict`` of the project's config dataclasses: a key the config
does not know is an error (a typo in a run config fails loudly instead of training with a default).

On the ground floor (features; storage imports features, so not storage, whose ``__init__``
loads the feature store), importing nothing of the project: features, modeling.network and
modeling.training share it without importing one another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def reject_unknown_keys(data: Mapping[str, Any], known: type | Iterable[str], what: str) -> None:
    """Raise ``ValueError("unknown <what> keys [...]; known: [...]")`` when ``data`` has keys outside ``known``:
    the field names of a dataclass, or the names themselves."""
    names = {f.name for f in dataclasses.fields(known)} if isinstance(known, type) else set(known)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(names)}")
