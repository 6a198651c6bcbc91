"""Train: the approved images and captions of a manifest into a LoRA.

The trainer runs in its own process (`python -m trainer job.json`, or `accelerate launch` on several
GPUs): a hang or an out-of-memory crash can be timed out and retried, and a retry resumes from the
last complete checkpoint instead of starting over. The trainer dies with the process that started it
(lorapipe/lifeline.py), and a run folder admits one trainer at a time: a lock (RUN_LOCK) held by this
process and the trainer together, released by the kernel when both have ended.

A run is named by what changes its weights (trainer/identity.py): rerunning with another timeout or
sampling setting resumes the same run; another learning rate is a new run, and the log says which
setting changed since the previous one. Images of a bucket too small to train alone are re-cropped
from their originals, around their faces, to the bucket they join (tasks/crop.py's cropper); the
stage's manifest (manifests/train.jsonl) tells what each image was trained as.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path

from lorapipe.buckets import bucket_name, merge_targets
from lorapipe.config import CropConfig, TrainConfig
from lorapipe.errors import TransientError, UserError
from lorapipe.fsutil import atomic_copy, file_lock, remove_temps
from lorapipe.item_cache import ItemCache
from lorapipe.lifeline import child_env
from lorapipe.manifest import ImageRecord, read_manifest, write_manifest
from lorapipe.workspace import Workspace, slugify, training_image_name
from tasks.crop import crop_to_bucket, cropped_fields
from tasks.progress import StageProgress
from tasks.stage import code_version, manifest_digest, stage_key, stage_task
from trainer.__main__ import PLAIN_LOG_ENV, USER_ERROR_EXIT
from trainer.data import Example, holds, split_holdout
from trainer.identity import RUN_FILE, describe_changes, run_identity, run_key, weight_settings
from trainer.job import JOB_FILE, Job
from trainer.loop import LORA_WEIGHTS

log = logging.getLogger("lorapipe.train")

RUN_LOCK = ".lock"
# What torch says when CUDA (or MPS) runs out of memory, in the trainer's last lines.
OUT_OF_MEMORY = "OutOfMemoryError"


def trainable(record: ImageRecord) -> bool:
    return record.kept and record.review == "approved"


def face_in_image(record: ImageRecord) -> tuple[int, int, int, int] | None:
    """The record's face (original pixels) in pixels of its cropped training image, clipped to it."""
    if not record.face or not record.crop or not record.crop_scale:
        return None
    (left, top, _, _), scale = record.crop, record.crop_scale
    width, height = record.bucket_size
    x0, y0, x1, y1 = record.face
    box = (max(0, round((x0 - left) * scale)), max(0, round((y0 - top) * scale)),
           min(width, round((x1 - left) * scale)), min(height, round((y1 - top) * scale)))
    return box if box[0] < box[2] and box[1] < box[3] else None


def refit_small_buckets(records: list[ImageRecord], ws: Workspace, min_images: int,
                        crop: CropConfig) -> list[ImageRecord]:
    """Approved images of buckets with fewer than `min_images`, re-cropped from their originals to the
    bucket they join, around the face the crop stage found. An image whose face cannot fit that crop is
    rejected ("untrainable: ..."); each says what happened in the manifest and the log.
    """
    counts = Counter(r.bucket_size for r in records if trainable(r))
    targets = merge_targets(counts, min_images)
    cache = ItemCache(ws.cache, "crop")
    out = []
    for record in records:
        target = targets.get(record.bucket_size) if trainable(record) else None
        if target is None:
            out.append(record)
            continue
        why = (f"bucket {record.bucket} has {counts[record.bucket_size]} image(s), fewer than "
               f"train.min_bucket_images {min_images}")
        dest = ws.images / training_image_name(record.source, record.id, bucket_name(target))
        plan = crop_to_bucket(record, ws, crop, target, cache, dest, face=record.face)
        if record.face and not holds(plan["box"], record.face):
            out.append(record.reject(f"untrainable: its face does not fit a {bucket_name(target)} crop ({why})"))
            log.warning("%s: left out of training: its face does not fit a %s crop (%s)", record.source,
                        bucket_name(target), why)
            continue
        note = f"re-cropped from the original to {bucket_name(target)} for training ({why})"
        log.warning("%s: %s", record.source, note)
        out.append(record.model_copy(update={**cropped_fields(record, plan, ws.relative(dest)),
                                             "flags": [*record.flags, note]}))
    return out


def training_examples(records: list[ImageRecord], ws: Workspace) -> list[Example]:
    examples = [
        Example(r.id, ws.path(r.image_path), r.caption, r.bucket_size, tuple(r.original_size), tuple(r.crop_top_left),
                face_in_image(r))
        for r in records
        if trainable(r)
    ]
    waiting = sum(1 for r in records if r.kept and r.review == "pending")
    if waiting:
        log.warning("%d images wait for caption review and are left out of this run", waiting)
    if not examples:
        raise UserError(
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
    env = child_env({**os.environ, "PYTHONUNBUFFERED": "1", PLAIN_LOG_ENV: "1"})
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
            line = line.rstrip().rsplit("\r", 1)[-1]  # a progress bar's last state, if one slipped through
            if not line.strip():
                continue
            tail.append(line)
            log.info("%s", line)
            report()
        proc.wait()
        report()  # the last step's progress.json is written after its log line
    if proc.returncode == USER_ERROR_EXIT:  # the trainer refused the job: its one line, never retried
        raise UserError(tail[-1].removeprefix("error: ") if tail else "the trainer refused the job")
    if proc.returncode != 0 and any(OUT_OF_MEMORY in line for line in tail):
        # The same micro-batch on the same GPU runs out again: one line saying what to change, no retry.
        c = job.config
        raise UserError(f"train: out of GPU memory at train.micro_batch_size {c.micro_batch_size}: lower it, or set "
                        "train.micro_batch_size: auto (the largest that fits)"
                        + ("" if c.gradient_checkpointing else ", or train.gradient_checkpointing: true"))
    if proc.returncode != 0:  # a crash or the run's timeout: the retry resumes from the last checkpoint
        raise TransientError(f"training failed (exit code {proc.returncode}); last lines:\n" + "\n".join(tail))
    return json.loads((job.run_dir / "train_result.json").read_text())


CODE = code_version(__name__, "trainer", "tasks.crop")


def train_key(manifest: str, workspace: str, config: TrainConfig, name: str, crop: CropConfig | None = None) -> str:
    """The stage's cache key: every input. The run folder is named by fewer (`plan_run`)."""
    return stage_key("train", CODE, manifest_digest(manifest), workspace, config, name, crop)


def plan_run(manifest: str, workspace: str, config: TrainConfig, name: str,
             crop: CropConfig | None = None) -> tuple[Job, list[ImageRecord], str]:
    """The job, the records as they will be trained, and the run's key: the folder runs/<key[:16]> is
    named by the trainer's code and what changes the weights (settings, images, captions), nothing else."""
    ws = Workspace.at(workspace)
    records = refit_small_buckets(read_manifest(manifest), ws, config.min_bucket_images, crop or CropConfig())
    examples = training_examples(records, ws)
    key = run_key(run_identity(examples, config), CODE)
    return Job(examples, config, ws.runs / key[:16], ws.cache, name), records, key


def announce_run(ws: Workspace, job: Job) -> None:
    """Say whether this resumes a run or starts one, and what changed since the previous run."""
    if (job.run_dir / JOB_FILE).exists():
        log.info("train: run %s again (only settings that leave the weights alone may differ): resuming it",
                 job.run_dir.name)
        return
    earlier = sorted(ws.runs.glob(f"*/{JOB_FILE}"), key=lambda p: p.stat().st_mtime)
    if not earlier:
        log.info("train: new run %s", job.run_dir.name)
        return
    previous = earlier[-1].parent
    old = {"settings": weight_settings(json.loads(earlier[-1].read_text()).get("config", {}))}
    new = {"settings": weight_settings(job.config)}
    if (previous / RUN_FILE).exists():
        old = json.loads((previous / RUN_FILE).read_text())["identity"]
        new = run_identity(job.examples, job.config)
    changes = describe_changes(old, new) or ["lorapipe's trainer changed"]
    log.warning("train: new run %s: %s since run %s", job.run_dir.name, "; ".join(changes), previous.name)


def write_trained_manifest(ws: Workspace, key: str, records: list[ImageRecord], job: Job) -> Path:
    """manifests/train.jsonl: the records as trained (re-crops, images left out, images held out)."""
    config = job.config
    _, held = split_holdout(job.examples, config.holdout_images, config.holdout_min_images, config.seed)
    held_ids = {e.image_id for e in held}
    note = "held out of training: measures the held-out loss"
    records = [r.model_copy(update={"flags": [*r.flags, note]}) if r.id in held_ids else r for r in records]
    out = write_manifest(ws.stage_manifest("train", key), records)
    atomic_copy(out, ws.latest_manifest("train"))
    return out


def _stage_result(key: str, run_dir: Path, result: dict, manifest: Path) -> dict:
    lora_file = f"{result.pop('lora_dir')}/{LORA_WEIGHTS}"
    return {"stage": "train", "key": key, "run_dir": str(run_dir), "lora_file": lora_file, **result,
            "manifest": str(manifest), "outputs": [lora_file, str(manifest)]}


def run_train(manifest: str, workspace: str, config: TrainConfig, name: str, crop: CropConfig | None = None) -> dict:
    ws = Workspace.at(workspace)
    job, records, key = plan_run(manifest, workspace, config, name, crop)
    announce_run(ws, job)
    trained_manifest = write_trained_manifest(ws, key, records, job)
    result = run_trainer(job, progress_key=f"{slugify(name)}-train-progress")
    return _stage_result(key, job.run_dir, result, trained_manifest)


def trained_run(manifest: str, workspace: str, config: TrainConfig, name: str,
                crop: CropConfig | None = None) -> dict | None:
    """What run_train returned for this manifest and config, if that run finished (for `lorapipe export`)."""
    ws = Workspace.at(workspace)
    job, _, key = plan_run(manifest, workspace, config, name, crop)
    done = job.run_dir / "train_result.json"
    if not done.exists():
        return None
    return _stage_result(key, job.run_dir, json.loads(done.read_text()), ws.stage_manifest("train", key))


# retries=1: a crash or timeout reruns the job, which resumes from its last checkpoint.
train_task = stage_task(run_train, train_key, name="train", retries=1, tags=["gpu"])
