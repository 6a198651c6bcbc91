"""A killed command leaves nothing running, and runs on one workspace take turns: the real `lorapipe`
command in its own process (no PREFECT_API_URL: it starts its own Prefect server), SIGKILL, then a look at
what still runs and at what the next command does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml

from flows.demo import demo_config
from helpers import jpeg_bytes, photo

pytestmark = pytest.mark.slow
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))
STAGES = ("collect", "validate", "dedup", "crop", "caption", "review", "train", "export", "evaluate")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The environment of a user's shell: no Prefect server configured; a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    return env


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([LORAPIPE, *argv], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def kill_and_list_survivors(process: subprocess.Popen, timeout: float = 20) -> list[str]:
    """SIGKILL the command; after `timeout` seconds, what it had started and still runs."""
    family = psutil.Process(process.pid).children(recursive=True)
    assert family, "the command had started nothing yet"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in family if alive_process(p)]
        if not alive:
            return []
        time.sleep(0.5)
    for p in alive:  # leave the machine clean for the next test either way
        p.kill()
    return [" ".join(p.cmdline()[:4]) for p in alive if alive_process(p)] or ["(died while listed)"]


def alive_process(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the command ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


# --- a killed collect: its Prefect server goes with it; its temp file goes on the next run ----------


class SlowPhoto(BaseHTTPRequestHandler):
    """Sends the first bytes of a photo, then nothing until released: a download in progress."""

    release = threading.Event()
    started = threading.Event()

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = jpeg_bytes(photo(800, 800, seed=3))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if SlowPhoto.release.is_set():
            self.wfile.write(data)
            return
        self.wfile.write(data[:1000])
        self.wfile.flush()
        SlowPhoto.started.set()
        SlowPhoto.release.wait(120)


def test_killed_collect_leaves_no_server_and_the_rerun_clears_its_temp_file(cli_env, tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowPhoto)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/photo.jpg"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "Jane Doe", "images": url,
        "dataset": {"collect": {"allow_addresses": ["127.0.0.1"], "read_timeout": 300, "retries": 0}}}))
    ws = tmp_path / "ws"
    try:
        process = start(["collect", str(ws), "--config", str(tmp_path / "job.yaml")], cli_env, tmp_path / "1.log")
        wait_for(SlowPhoto.started.is_set, "download", process, tmp_path / "1.log")
        temps = list((ws / "raw").glob(".download-*.tmp"))
        assert len(temps) == 1  # mid-download
        assert kill_and_list_survivors(process) == []  # once: Prefect's temporary server, still listening

        SlowPhoto.release.set()
        done = subprocess.run([LORAPIPE, "collect", str(ws), "--json"], env=cli_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["stats"]["computed"] == 1
        assert [p.suffix for p in (ws / "raw").iterdir()] == [".jpg"]  # the killed run's temp file is gone
    finally:
        SlowPhoto.release.set()
        httpd.shutdown()


# --- two `lorapipe run` on one workspace take turns, stage by stage -----------------------------------


@pytest.fixture(scope="module")
def two_runs(cli_env, tiny_models, demo_photos_master, tmp_path_factory):
    """Two `lorapipe run` on the same workspace started together; (root, job file, their logs)."""
    root = tmp_path_factory.mktemp("two-runs")
    photos = root / "photos"
    photos.mkdir()
    for name in ("portrait_00.jpg", "portrait_01.jpg", "portrait_02.jpg", "portrait_03.png"):
        shutil.copy(demo_photos_master[0] / name, photos / name)
    config = demo_config(photos, root / "ws", tiny_models).model_dump(mode="json", by_alias=True)
    config["train"].update(epochs=1, effective_batch_size=2, sample_prompts=[], holdout_images=0)
    config["evaluate"].update(steps=2)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    logs = [root / "a.log", root / "b.log"]
    runs = [start(["run", "--config", str(job)], cli_env, log) for log in logs]
    for run, log in zip(runs, logs):
        assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    return root, job, [log.read_text() for log in logs]


def test_two_runs_on_one_workspace_do_each_stage_once(two_runs):
    _, _, logs = two_runs
    for stage in STAGES:
        ran = sum(log.count(f"{stage}: ran ") for log in logs)
        reused = sum(log.count(f"{stage}: unchanged input, re-used the cached result") for log in logs)
        assert (ran, reused) == (1, 1), (stage, ran, reused)  # once: both ran every stage, two trainers at once


def test_the_terminal_shows_each_line_once_and_no_library_notes(two_runs):
    """What `lorapipe run` prints: the trainer's lines with one time and name, the preflight in words, none of
    the libraries' notes or loading bars (they ask nothing of the user)."""
    _, _, logs = two_runs
    trained = next(log for log in logs if "train: ran " in log)
    assert re.search(r"^\d\d:\d\d:\d\d lorapipe\.train preflight: 4 images \(0 held out\) in \d buckets \(", trained,
                     re.MULTILINE)
    assert re.search(r"^\d\d:\d\d:\d\d lorapipe\.train step 1/\d+  loss ", trained, re.MULTILINE)
    assert not re.search(r"lorapipe\.train \d\d:\d\d:\d\d lorapipe\.train", trained)  # not prefixed twice
    for noise in ("requires torchvision", "No LoRA keys associated", "Loading weights", "Loading pipeline components",
                  '{"images":'):
        assert noise not in trained, noise


# --- a killed `lorapipe train`: its trainer dies with it; the rerun resumes ----------------------------


def test_killed_train_takes_its_trainer_along_and_the_rerun_resumes(two_runs, cli_env):
    root, job, _ = two_runs
    ws = root / "ws"
    config = yaml.safe_load(job.read_text())
    config["train"].update(epochs=3, checkpoint_every_steps=1)  # a new training: 6 steps, killed after 2
    job.write_text(yaml.safe_dump(config))
    log = root / "train.log"
    process = start(["train", str(ws), "--config", str(job)], cli_env, log)

    def progressed() -> bool:
        return any(json.loads(p.read_text())["step"] >= 2 for p in (ws / "runs").glob("*/progress.json")
                   if p.stat().st_size)

    for old in (ws / "runs").glob("*/progress.json"):
        old.unlink()  # the first training's
    wait_for(progressed, "second optimizer step", process, log)
    assert kill_and_list_survivors(process) == []  # once: the trainer kept training, and writing checkpoints

    done = subprocess.run([LORAPIPE, "train", str(ws), "--json"], env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["resumed_from_step"] >= 1 and not result["cached"]
    run_dir = Path(result["run_dir"])
    assert not list((run_dir / "checkpoints").glob(".*")) and not list(run_dir.glob(".*.tmp*"))


HOLD = """
import sys, time
from lorapipe.fsutil import file_lock
with file_lock(sys.argv[1], "a test's run folder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_folder_admits_one_trainer_until_the_holder_dies(two_runs):
    """A trainer still running in the run folder (a killed run's, say) holds it: the next waits for it."""
    import logging

    from lorapipe.config import PipelineConfig
    from lorapipe.manifest import read_manifest
    from lorapipe.workspace import Workspace
    from tasks.train import RUN_LOCK, run_trainer, training_examples
    from trainer.job import Job

    root, job_file, _ = two_runs
    config = PipelineConfig.model_validate(yaml.safe_load(job_file.read_text()))
    ws = Workspace.at(root / "ws")
    examples = training_examples(read_manifest(ws.latest_manifest("review")), ws)
    job = Job(examples, config.train.model_copy(update={"epochs": 1}), ws.runs / "one-writer", ws.cache,
              config.name)
    job.run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(job.run_dir / RUN_LOCK)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    result: dict = {}
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("lorapipe").addHandler(handler)
    thread = threading.Thread(target=lambda: result.update(run_trainer(job)))
    thread.start()
    time.sleep(5)
    logging.getLogger("lorapipe").removeHandler(handler)
    trainers = [p for p in psutil.Process().children(recursive=True) if "trainer" in " ".join(p.cmdline())]
    assert thread.is_alive() and trainers == []  # once: a second trainer in the same folder at once
    assert any(f"waiting for the training run {job.run_dir}: pid {holder.pid} on" in line for line in said), said

    holder.send_signal(signal.SIGKILL)  # the holder dies without a word: its successor takes the folder
    holder.wait()
    thread.join(timeout=300)
    assert result["steps"] >= 1
