"""Train: the approved images and captions of a manifest into a LoRA.

The trainer runs in its own process (`python -m trainer job.json`, or `accelerate launch` on several
GPUs): a hang or an out-of-memory crash can be timed out and retried, and a retry resumes from the
last complete checkpoint instead of starting over. The trainer dies with the process that started it
(lorapipe/lifeline.py), and a run folder admits one trainer at a time: a lock (RUN_LOCK) held by this
process and the trainer together, released by the kernel when both have ended.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from lorapipe.config import TrainConfig
from lorapipe.fsutil import file_lock, remove_temps
from lorapipe.lifeline import child_env
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace, slugify
from tasks.progress import StageProgress
from tasks.stage import code_version, manifest_digest, stage_key, stage_task
from trainer.data import Example
from trainer.job import Job
from trainer.loop import LORA_WEIGHTS

log = logging.getLogger("lorapipe.train")

RUN_LOCK = ".lock"


def training_examples(records: list[ImageRecord], ws: Workspace) -> list[Example]:
    examples = [
        Example(r.id, ws.path(r.image_path), r.caption, r.bucket_size, tuple(r.original_size), tuple(r.crop_top_left))
        for r in records
        if r.kept and r.review == "approved"
    ]
    waiting = sum(1 for r in records if r.kept and r.review == "pending")
    if waiting:
        log.warning("%d images wait for caption review and are left out of this run", waiting)
    if not examples:
        raise ValueError(
            f"no approved captions to train on ({sum(r.kept for r in records)} images kept, {waiting} waiting for "
            "review): see review_reasons in the review manifest"
        )
    return examples


def trainer_command(job_file, config: TrainConfig) -> list[str]:
    if config.num_processes > 1:
        # --multi_gpu is accelerate's DDP launcher; on a machine without GPUs it runs DDP on the CPU (gloo).
        # The launcher runs under lorapipe.lifeline (it dies with us); its trainers die with it.
        return [sys.executable, "-m", "lorapipe.lifeline", "accelerate.commands.launch", "--multi_gpu",
                "--num_machines", "1", "--num_processes", str(config.num_processes), "--dynamo_backend", "no",
                "--mixed_precision", "bf16" if config.mixed_precision == "bf16" else "no",
                "-m", "trainer", str(job_file)]
    return [sys.executable, "-m", "trainer", str(job_file)]


class ProgressFile:
    """The trainer's progress.json (rewritten atomically after every optimizer step), read when it changes."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "progress.json"
        self.seen: int | None = None

    def read_if_changed(self) -> dict | None:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if stamp == self.seen:
            return None
        self.seen = stamp
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # replaced between stat and read: the next line brings the next one
            return None


def run_trainer(job: Job, progress_key: str | None = None) -> dict:
    """Run the job in a child process, its output in our log; the result is the run's train_result.json.

    The trainer logs a line per optimizer step; after each line its progress.json is checked and, when it
    changed, reported (progress artifact, terminal bar, log line) with epoch, step, loss and ETA.
    Another trainer in the same run folder (a killed run's, not yet gone): this waits for it to end.
    """
    with file_lock(job.run_dir / RUN_LOCK, f"the training run {job.run_dir}") as lock:
        for folder in (job.run_dir, job.run_dir / "checkpoints", job.run_dir / "samples"):
            remove_temps(folder)  # what a killed trainer was writing; we hold the lock, so no one is now
        return _run_locked(job, progress_key, lock.fileno())


def _run_locked(job: Job, progress_key: str | None, lock_fd: int) -> dict:
    job_file = job.write()
    command = trainer_command(job_file, job.config)
    tail: deque[str] = deque(maxlen=30)
    env = child_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    watch = ProgressFile(job.run_dir)
    watch.read_if_changed()  # a resumed run's old progress is not news
    # pass_fds: the trainer holds the run folder's lock too, so it stays locked while either process lives.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          pass_fds=(lock_fd,)) as proc, \
            StageProgress("train", 1, "steps", key=progress_key, log_every=3600) as progress:
        def report() -> None:
            if (p := watch.read_if_changed()) is not None:
                progress.update(p["step"], p["total_steps"], epoch=f"{p['epoch']}/{p['epochs']}", loss=p["loss"],
                                eta_seconds=p["eta_seconds"])

        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("%s", line.rstrip())
            report()
        proc.wait()
        report()  # the last step's progress.json is written after its log line
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit code {proc.returncode}); last lines:\n" + "\n".join(tail))
    return json.loads((job.run_dir / "train_result.json").read_text())


CODE = code_version(__name__, "trainer")


def train_key(manifest: str, workspace: str, config: TrainConfig, name: str) -> str:
    return stage_key("train", CODE, manifest_digest(manifest), workspace, config, name)


def _stage_result(key: str, run_dir: Path, result: dict) -> dict:
    lora_file = f"{result.pop('lora_dir')}/{LORA_WEIGHTS}"
    return {"stage": "train", "key": key, "run_dir": str(run_dir), "lora_file": lora_file, **result,
            "outputs": [lora_file]}


def run_train(manifest: str, workspace: str, config: TrainConfig, name: str) -> dict:
    ws = Workspace.at(workspace)
    key = train_key(manifest, workspace, config, name)
    job = Job(training_examples(read_manifest(manifest), ws), config, ws.runs / key[:16], ws.cache, name, key)
    return _stage_result(key, job.run_dir, run_trainer(job, progress_key=f"{slugify(name)}-train-progress"))


def trained_run(manifest: str, workspace: str, config: TrainConfig, name: str) -> dict | None:
    """What run_train returned for this manifest and config, if that run finished (for `lorapipe export`)."""
    key = train_key(manifest, workspace, config, name)
    run_dir = Workspace.at(workspace).runs / key[:16]
    done = run_dir / "train_result.json"
    return _stage_result(key, run_dir, json.loads(done.read_text())) if done.exists() else None


# retries=1: a crash or timeout reruns the job, which resumes from its last checkpoint.
train_task = stage_task(run_train, train_key, name="train", retries=1, tags=["gpu"])
