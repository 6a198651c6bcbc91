"""The Prefect API a CLI command talks to when no server is configured: one lorapipe starts and owns.

Without PREFECT_API_URL, Prefect starts a temporary server of its own and stops it when the command exits
normally; a command killed with SIGKILL left that server running (~220 MB each, still listening minutes
later). So lorapipe starts the same server itself, as a child that dies with the command
(lorapipe/lifeline.py): Prefect's API app as its temporary server runs it
(`prefect.server.api.server.create_app(ephemeral=True)`: no UI, the services a temporary server runs, the
profile's database), served by uvicorn on 127.0.0.1, on a socket the command bound and handed over (no port
race). With PREFECT_API_URL set, the command uses that server and starts none.

    python -m lorapipe.local_server FD     # what `prefect_api()` runs: serve on the listening socket FD
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

from lorapipe.lifeline import child_env, die_with_parent


_SERVER: dict[str, str] = {}  # this process's local server, once started: {"url": ...}


@contextlib.contextmanager
def prefect_api(timeout: float | None = None) -> Iterator[str | None]:
    """Within the block, Prefect talks to a server: the configured one, or this process's local one
    (started on first use, stopped when the process exits, killed with it). Yields its URL, or None when
    a server is configured.

    The local server outlives the block until the process exits, as Prefect's own temporary server does:
    Prefect sends the last logs and events from its exit hooks, after the block.

    Raises:
        RuntimeError: the server did not answer within `timeout` seconds (default: Prefect's
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    url = _SERVER.get("url") or start_local_server(timeout)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # for child processes too (a local Dask cluster's workers)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def start_local_server(timeout: float | None = None) -> str:
    """Start this process's local Prefect server; returns its API URL."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        process = subprocess.Popen([sys.executable, "-m", "lorapipe.local_server", str(listener.fileno())],
                                   pass_fds=(listener.fileno(),), env=child_env(), stdin=subprocess.DEVNULL)
    atexit.register(stop, process)
    wait_healthy(url, process, timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    _SERVER["url"] = url
    return url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorapipe's local Prefect server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"lorapipe's local Prefect server did not answer within {timeout:.0f} s; raise "
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one: `prefect server start`")


def main() -> None:
    die_with_parent()
    import uvicorn
    from prefect.server.api.server import create_app

    listener = socket.socket(fileno=int(sys.argv[1]))
    config = uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
