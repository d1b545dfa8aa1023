"""The Prefect API msata's flows report to.

``PREFECT_API_URL`` set (a running ``prefect server start``, a shared server, Prefect
Cloud): it is checked once and used; nothing is started. Not set: msata starts a
temporary API server (the same app Prefect's "ephemeral" mode runs) for the length
of the command and stops it afterwards. Prefect's own ephemeral start gives up after
a fixed time (it failed runs on a loaded machine before any clip was touched); this
one waits as long as the server process is alive, fails at once with its log when
the process dies, and says how to skip the wait with a running server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

RUNNING_SERVER_HINT = (
    "to use a running server instead: `prefect server start` in another terminal, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


class PrefectApiError(RuntimeError):
    """The Prefect API in PREFECT_API_URL does not answer, or the temporary one could not start."""


def api_healthy(url: str, timeout_s: float = 5.0, any_answer: bool = False) -> bool:
    """True when ``url``/health answers 200 (any HTTP answer with ``any_answer``: Prefect Cloud wants a key)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return any_answer
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a server never outlives the msata process that started it


class TemporaryApiServer:
    """A Prefect API server in a child process, bound to a free port on 127.0.0.1."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen:
        import prefect
        from prefect.settings import get_current_settings

        self.port = _free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(prefect.__file__).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                args,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def start(self, say: Callable[[str], None] | None = None, notice_every_s: float = 30.0) -> str:
        """Start and wait until healthy, however long that takes on a busy machine."""
        self.process = self._spawn()
        started = last_notice = time.monotonic()
        while not api_healthy(self.api_url, timeout_s=2.0):
            code = self.process.poll()
            if code == PORT_IN_USE:  # the free port was taken meanwhile: try another one
                self.process = self._spawn()
            elif code is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.exists() else []
                raise PrefectApiError(
                    f"the temporary Prefect API server exited with code {code} before answering "
                    f"({tail[0] if tail else 'no output'}; log: {self.log_path}); {RUNNING_SERVER_HINT}"
                )
            now = time.monotonic()
            if say is not None and now - last_notice >= notice_every_s:
                say(f"still starting the temporary Prefect API server ({now - started:.0f} s); {RUNNING_SERVER_HINT}")
                last_notice = now
            time.sleep(0.2)
        return self.api_url

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@contextmanager
def prefect_api(say: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield the API URL flows in this block report to (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        if not api_healthy(url, any_answer=True):
            raise PrefectApiError(
                f"PREFECT_API_URL={url} does not answer: start that server (`prefect server start`) "
                "or unset PREFECT_API_URL to let msata start a temporary one"
            )
        yield url
        return
    from flows.settings import msata_home

    server = TemporaryApiServer(msata_home() / "prefect" / "temporary-server.log")
    if say is not None:
        say(f"starting a temporary Prefect API server (PREFECT_API_URL is not set); {RUNNING_SERVER_HINT}")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.start(say)}):
            yield server.api_url
    finally:
        server.stop()
