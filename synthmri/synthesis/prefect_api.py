"""A Prefect API for the sample stage's task runner that never outlives the stage.

Prefect flows need an API. When none is configured (``PREFECT_API_URL`` unset: a plain ``dvc repro``),
Prefect starts a temporary server itself, but a ``synthmri sample`` killed with SIGKILL leaves that
server running (re-parented to PID 1, ~260 MB). Here the temporary server is started as our own child
with the kernel's parent-death signal set, so it dies with the stage however the stage ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from synthmri.errors import StageError
from synthmri.logs import get_logger

log = get_logger(__name__)

STARTUP_TIMEOUT_S = 120.0  # a first start on a fresh PREFECT_HOME creates and migrates its database
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def dies_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: between fork and exec it asks the kernel to send the child
    ``sig`` when its parent dies, however the parent ends (SIGKILL included). SIGTERM lets a child that cleans up
    after itself (a server stopping its workers) do so; SIGKILL is for children with nothing to clean up."""

    def set_parent_death_signal() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, sig)

    return set_parent_death_signal


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _send_pending_logs() -> None:
    """Send the flow's queued log records while the temporary server still listens (Prefect sends them from a
    background worker; at interpreter exit, with the server gone, it printed "Error logging to API")."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception as exc:  # logs are a convenience: never fail a finished stage on them
        log.debug("could not send the pending Prefect logs: %s", exc)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the URL of the Prefect API to use: the configured one, else a temporary local server
    (127.0.0.1 only) that is stopped on exit and killed by the kernel if this process dies first."""
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    # Prefect's own temporary-server command, started by us so that the parent-death signal can be set
    server = subprocess.Popen(
        [
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
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=dies_with_parent(signal.SIGKILL),
    )
    try:
        log.info(
            "Starting a temporary Prefect server on 127.0.0.1:%d for this stage (set PREFECT_API_URL to use yours)",
            port,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None:
                raise StageError(f"the temporary Prefect server exited with code {server.returncode} at start-up")
            if time.monotonic() > deadline:
                raise StageError(f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _send_pending_logs()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn may ignore SIGTERM while a request hangs
            server.kill()
            server.wait()
