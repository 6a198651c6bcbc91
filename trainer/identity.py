"""What names a training run: the settings and data that change the trained weights, and nothing else.

A setting in RUN_ONLY_SETTINGS (a timeout, how often to checkpoint or sample, how many GPUs) can change
between attempts of one run: the rerun resumes. Any other TrainConfig setting, an image or a caption
changes the weights: it is a different run. A setting added to TrainConfig names runs until it is listed
here, the safe default.

Each run folder keeps the identity it was started with in run.json; a job whose identity differs from
its folder's (a hand-edited job.json) is refused in one line naming what changed, never resumed with the
old optimizer state or crashed on a shape mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.config import TrainConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_json, sha256_file, stable_hash

RUN_FILE = "run.json"
RESULT_FILE = "train_result.json"

RUN_ONLY_SETTINGS = frozenset({
    "timeout_minutes", "checkpoint_every_steps", "keep_checkpoints", "sample_prompts", "sample_every_epochs",
    "sample_steps", "num_processes", "device", "gradient_checkpointing", "keep_lora_versions",
})


def weight_settings(config: TrainConfig | dict) -> dict:
    """The settings that name a run (a TrainConfig, or one as JSON from an older job.json)."""
    data = config.model_dump(mode="json") if isinstance(config, TrainConfig) else config
    return {k: v for k, v in data.items() if k not in RUN_ONLY_SETTINGS}


def example_identity(example) -> dict:
    """An example by content: the training image's bytes, not where it lies."""
    data = example.to_json()
    data.pop("image_path")
    return {**data, "image_sha256": sha256_file(example.image_path)}


def run_identity(examples: list, config: TrainConfig) -> dict:
    """As JSON would give it back (lists, not tuples): compared with the copy kept in run.json."""
    identity = {"settings": weight_settings(config), "examples": [example_identity(e) for e in examples]}
    return json.loads(json.dumps(identity))


def run_key(identity: dict, *extra) -> str:
    return stable_hash("run", identity, *extra)


def describe_changes(old: dict, new: dict) -> list[str]:
    """What differs between two identities, for people: 'learning_rate 0.0004 -> 0.0001', ..."""
    changes = []
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"{key} {json.dumps(old_settings.get(key))} -> {json.dumps(new_settings.get(key))}")
    old_examples = {e["image_id"]: e for e in old.get("examples", [])}
    new_examples = {e["image_id"]: e for e in new.get("examples", [])}
    added, removed = set(new_examples) - set(old_examples), set(old_examples) - set(new_examples)
    edited = [i for i in set(old_examples) & set(new_examples) if old_examples[i] != new_examples[i]]
    for count, what in ((len(added), "added"), (len(removed), "removed"), (len(edited), "changed")):
        if count:
            changes.append(f"{count} training image(s) {what}")
    return changes


def progress_in(run_dir: Path) -> str | None:
    """What a run folder already holds: 'finished', 'a checkpoint at step N', or None."""
    from trainer.checkpoint import complete_checkpoints

    if (run_dir / RESULT_FILE).exists():
        return "finished"
    done = complete_checkpoints(run_dir / "checkpoints")
    return f"a checkpoint at step {int(done[-1].name.split('-')[1])}" if done else None


def claim_run(run_dir: Path, identity: dict, write: bool = True) -> dict:
    """This run's record (run.json): written for a fresh folder; on a rerun, the record if it is the same
    run. A folder holding progress of other settings or data is refused (UserError, one line).
    """
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.exists() else None
    if record is not None and record.get("identity") == identity:
        return record
    progress = progress_in(run_dir)
    if progress:
        what = describe_changes(record["identity"], identity) if record else ["settings unknown (no run.json)"]
        raise UserError(
            f"{run_dir}: {'; '.join(what)} since this run started ({progress}): a run cannot change its weights' "
            "settings midway. Give the job a new run_dir, or delete this folder's checkpoints to start over")
    record = {"identity": identity}
    if write:
        atomic_write_json(path, record)
    return record


def update_run(run_dir: Path, record: dict, **facts) -> dict:
    """Add facts decided once per run (the micro-batch size 'auto' chose) to run.json."""
    record = {**record, **facts}
    atomic_write_json(run_dir / RUN_FILE, record)
    return record
