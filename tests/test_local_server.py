"""`lorapipe server start`: one local Prefect server for a person's stage after stage, with a clear lifetime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import photo, save

pytestmark = pytest.mark.slow
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))


def test_stage_commands_use_the_server_started_once_and_it_stops_when_idle(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")

    def lorapipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LORAPIPE, *args], env=env, capture_output=True, text=True, timeout=300)

    for seed in (1, 2):
        save(photo(900, 800, seed=seed), tmp_path / "photos" / f"{seed}.jpg")
    (tmp_path / "job.yaml").write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\n")
    ws = str(tmp_path / "ws")
    started = lorapipe("server", "start", "--idle-minutes", "0.3")
    assert started.returncode == 0, started.stderr[-1500:]
    state = json.loads(next((tmp_path / "prefect-home").glob("lorapipe-server-*.json")).read_text())
    try:
        for argv in (["collect", ws, "--config", str(tmp_path / "job.yaml")], ["validate", ws]):
            done = lorapipe(*argv, "--json")
            assert done.returncode == 0, done.stderr[-2000:]
            assert "temporary Prefect server" not in done.stderr  # it used the running one
            assert state["url"].removesuffix("/api") in done.stderr  # "View at http://127.0.0.1:PORT/runs/..."
        assert "local Prefect server at" in lorapipe("server", "status").stdout
        server = psutil.Process(state["pid"])
        server.wait(timeout=90)  # 18 s without a command using it (polled every 5 s): it ends by itself
        assert "no local Prefect server runs" in lorapipe("server", "status").stdout
        done = lorapipe("validate", ws, "--json")  # none running: the command starts its own, and says how not to
        assert done.returncode == 0 and "`lorapipe server start` keeps one running" in done.stderr
    finally:
        if psutil.pid_exists(state["pid"]):
            psutil.Process(state["pid"]).kill()
