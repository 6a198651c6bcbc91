"""The Prefect API a CLI command talks to when no server is configured: one lorapipe starts and owns.

Without PREFECT_API_URL, Prefect starts a temporary server of its own and stops it when the command exits
normally; a command killed with SIGKILL left that server running (~220 MB each, still listening minutes
later). So lorapipe starts the same server itself, as a child that dies with the command
(lorapipe/lifeline.py): Prefect's API app as its temporary server runs it
(`prefect.server.api.server.create_app(ephemeral=True)`: no UI, the services a temporary server runs, the
profile's database), served by uvicorn on 127.0.0.1, on a socket the command bound and handed over (no port
race). With PREFECT_API_URL set, the command uses that server and starts none.

A person running stage after stage can keep one server for all their commands instead:
`lorapipe server start` starts the same server detached (`start_shared_server`), for this Prefect home and
database, and every later command without PREFECT_API_URL finds it (`shared_server_url`) and starts none.
Its lifetime is clear: it stops after `--idle-minutes` (30) in which no lorapipe command used it (each
command holds a shared lock on its clients file while it runs; the server polls for an exclusive one), or at
`lorapipe server stop`. A command that started a temporary server says so in one line, with the command that
saves the start next time.

    python -m lorapipe.local_server FD                        # what `prefect_api()` runs: serve on socket FD
    python -m lorapipe.local_server FD --shared IDLE_MINUTES  # what `lorapipe server start` runs, detached
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from lorapipe.lifeline import PARENT_ENV, child_env, die_with_parent


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
    url = _SERVER.get("url") or shared_server_url()
    if url is None:
        started = time.monotonic()
        url = start_local_server(timeout)
        print(f"lorapipe: started a temporary Prefect server for this command ({time.monotonic() - started:.1f} s); "
              "`lorapipe server start` keeps one running for the next commands", file=sys.stderr, flush=True)
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


def _shared_files() -> tuple[Path, Path, Path]:
    """(state, clients lock, log) of the shared server for this Prefect home and database."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    database = settings.server.database.connection_url
    key = hashlib.sha256((database.get_secret_value() if database else "").encode()).hexdigest()[:8]
    home = Path(settings.home).expanduser()
    return tuple(home / f"lorapipe-server-{key}{suffix}" for suffix in (".json", ".clients", ".log"))


def _hold(clients: Path) -> int:
    """A shared lock on the clients file, held until this process exits: the server is in use."""
    clients.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(clients, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def shared_server_state() -> dict | None:
    """{"url", "pid", "idle_minutes"} of the shared server if one answers, else None."""
    state, _, _ = _shared_files()
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    return data if _answers(data.get("url", "")) else None


def shared_server_url() -> str | None:
    """The shared server's URL (held by this process from now until it exits), or None when none runs."""
    _, clients, _ = _shared_files()
    fd = _hold(clients)  # before looking: the server cannot find itself idle in between
    if (data := shared_server_state()) is None:
        os.close(fd)
        return None
    _SERVER.update(url=data["url"], clients_fd=str(fd))
    return data["url"]


def start_shared_server(idle_minutes: float, timeout: float | None = None) -> dict:
    """Start the shared local server, detached (it outlives this process); returns its state.

    Raises:
        RuntimeError: it did not answer in time (see `wait_healthy`).
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    state, clients, log = _shared_files()
    state.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener, open(log, "ab") as out:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        process = subprocess.Popen(
            [sys.executable, "-m", "lorapipe.local_server", str(listener.fileno()), "--shared", str(idle_minutes)],
            pass_fds=(listener.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True)  # its own session: a Ctrl-C in this terminal does not stop it
    wait_healthy(url, process, timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    data = {"url": url, "pid": process.pid, "idle_minutes": idle_minutes, "log": str(log)}
    state.write_text(json.dumps(data))
    return data


def stop_shared_server(timeout: float = 30) -> dict | None:
    """Stop the shared server (SIGTERM, as uvicorn expects); returns the state it had, or None."""
    data = shared_server_state()
    if data is None:
        return None
    os.kill(data["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _answers(data["url"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    _shared_files()[0].unlink(missing_ok=True)
    return data


def _answers(url: str) -> bool:
    """A gone server refuses at once; a busy one on a loaded machine may take seconds to answer."""
    import httpx

    try:
        return bool(url) and httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_when_idle(server, clients: Path, idle_seconds: float, poll: float = 5.0) -> None:
    """Ask uvicorn to exit once no lorapipe command has held `clients` for `idle_seconds` since it started
    serving (its start, database migrations included, can take longer than a short idle time on a busy
    machine: counted from before it, the server stopped while `lorapipe server start` still waited)."""
    while not server.started and not server.should_exit:
        time.sleep(0.2)
    idle_since = time.monotonic()
    while not server.should_exit:
        time.sleep(poll)
        fd = os.open(clients, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no command holds it shared
            fcntl.flock(fd, fcntl.LOCK_UN)
            if time.monotonic() - idle_since > idle_seconds:
                server.should_exit = True
        except BlockingIOError:
            idle_since = time.monotonic()
        finally:
            os.close(fd)


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
    shared = "--shared" in sys.argv
    if not shared:
        die_with_parent()
    import uvicorn
    from prefect.server.api.server import create_app

    listener = socket.socket(fileno=int(sys.argv[1]))
    config = uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error", lifespan="on")
    server = uvicorn.Server(config)
    if shared:
        import threading

        state, clients, _ = _shared_files()
        idle_seconds = float(sys.argv[sys.argv.index("--shared") + 1]) * 60
        threading.Thread(target=_stop_when_idle, args=(server, clients, idle_seconds), daemon=True).start()
        try:
            server.run(sockets=[listener])
        finally:
            try:
                if json.loads(state.read_text()).get("pid") == os.getpid():
                    state.unlink()
            except (OSError, ValueError):
                pass
        return
    server.run(sockets=[listener])


if __name__ == "__main__":
    main()
