"""What the ``msata`` commands share: one-line errors, prompt stops, feature configs from files.

* ``one_line_errors``: a user mistake (a wrong ``--dataset``, a missing store, an
  unreachable API...) prints ``error: <reason>`` and exits 2; ``msata --verbose``
  shows the traceback instead.
* ``stop_promptly``: Ctrl-C or SIGTERM prints what was kept and ends the process at
  once (exit 130 / 143), without waiting for an abandoned extraction thread.
* ``feature_config_from``: a FeatureConfig from the defaults, a TOML/JSON file whose
  keys nest as ``FeatureConfig.to_dict()`` does, then dotted CLI overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)
VERBOSE = {"on": False}  # set by the app callback (``msata --verbose``)


class UserError(ValueError):
    """A mistake in the command line or its inputs; its message is the whole story."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from flows.api import PrefectApiError
    from storage import StoreError

    types: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, StoreError, PrefectApiError)
    if "mlflow" in sys.modules:  # a model URI that does not resolve, a registry that does not answer
        from mlflow.exceptions import MlflowException

        types += (MlflowException,)
    return types


def one_line_errors(command):
    """Decorator for a typer command: expected errors become ``error: ...`` (exit 2) unless --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _user_error_types() as err:
            if VERBOSE["on"]:
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            err_console.print("(run `msata --verbose ...` for the traceback)", style="dim")
            raise typer.Exit(code=2) from None

    return wrapper


def _hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # threads still extracting an abandoned clip must not hold the exit


@contextmanager
def stop_promptly(what_is_kept: str) -> Iterator[None]:
    """Ctrl-C / SIGTERM: report, then end the process now (130 / 143); a second signal ends it at once."""
    from prefect.exceptions import TerminationSignal

    def on_sigterm(signum: int, frame: Any) -> None:
        raise TerminationSignal(signal=signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)  # Prefect installs its own while a flow runs
    try:
        yield
    except (KeyboardInterrupt, TerminationSignal) as stop:
        signal.signal(signal.SIGINT, lambda *_: _hard_exit(130))
        signal.signal(signal.SIGTERM, lambda *_: _hard_exit(143))
        is_term = isinstance(stop, TerminationSignal)
        console.print(f"\n[bold yellow]stopped[/] by {'SIGTERM' if is_term else 'Ctrl-C'}: {what_is_kept}")
        _hard_exit(143 if is_term else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_keys(data: dict[str, Any], template: Any, where: str) -> None:
    """Every key of ``data`` must be a field of the dataclass ``template`` (recursively)."""
    fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template)}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: unknown feature setting {key!r}; expected one of {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(fields[key]):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key!r} must be a table of settings, got {value!r}")
            _check_keys(value, fields[key], f"{where} [{key}]")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """A .toml or .json file as a dict; one-line errors naming the file."""
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix.lower() != ".json" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {err}") from err


def feature_config_from(path: Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults <- file (keys nested as ``FeatureConfig.to_dict()``) <- ``overrides`` ({"face.detect_every": 3}; None = unset)."""
    from features.config import FeatureConfig

    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
        _check_keys(data, FeatureConfig(), str(path))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    _check_keys(data, FeatureConfig(), "feature settings")
    try:
        return FeatureConfig.from_dict(_merge(FeatureConfig().to_dict(), data))
    except (TypeError, ValueError) as err:
        raise UserError(f"{path or 'feature settings'}: {err}") from err
