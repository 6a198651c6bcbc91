"""What every stage task shares: content-based cache keys, retries, results kept in the workspace.

Prefect's INPUTS policy would hash a manifest *path* as a string; our keys hash the manifest's
*content*, the stage's settings and the stage's source code, so an edited photo, setting or stage
invalidates exactly what it should. Results are small JSON documents (paths, hashes, counts).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import task

from lorapipe.errors import UserError, is_out_of_memory, is_permanent, is_retryable
from lorapipe.fsutil import atomic_copy, sha256_file, stable_hash
from lorapipe.logs import quiet_libraries
from lorapipe.manifest import ImageRecord, write_manifest
from lorapipe.workspace import Workspace

log = logging.getLogger("lorapipe")


def code_version(*module_names: str) -> str:
    """Hash of the source of the named modules (a package counts all its .py files)."""
    digest = hashlib.sha256()
    for name in module_names:
        module = importlib.import_module(name)
        path = Path(module.__file__)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, code: str, *inputs: Any) -> str:
    return stable_hash(stage, code, *[dump(i) for i in inputs])


def dump(value: Any) -> Any:
    """Settings models as plain JSON, so keys don't depend on object identity."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def manifest_digest(path: str | Path) -> str:
    return sha256_file(path)


def finish_manifest_stage(
    ws: Workspace, stage: str, key: str, records: Iterable[ImageRecord], stats: dict
) -> dict:
    """Write the stage's new manifest (content-addressed, plus `<stage>.jsonl` as the latest copy)."""
    out = write_manifest(ws.stage_manifest(stage, key), records)
    atomic_copy(out, ws.latest_manifest(stage))
    return {"stage": stage, "key": key, "manifest": str(out), "stats": stats, "outputs": [str(out)]}


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: only a failure a retry can get past (lorapipe/errors.py, `is_retryable`)."""
    return is_retryable(state.result(raise_on_failure=False))


# What to change when a stage runs out of (GPU) memory, from the task's arguments. The training process
# says its own (tasks/train.py).
OUT_OF_MEMORY_HINTS: dict[str, Callable[[dict], str]] = {
    "caption": lambda a: (f"lower caption.batch_size (now {a['config'].batch_size})"
                          + (", or set caption.quantization: 4bit" if a["config"].quantization == "none" else "")),
    "caption-chunk": lambda a: f"lower caption.batch_size (now {a['config'].batch_size})",
    "evaluate": lambda a: (f"it renders at {a['resolution']} px (dataset.crop.resolution): free the GPU of other "
                           "work, or run `lorapipe evaluate` on a GPU with more memory"),
    "probe": lambda a: (f"it renders at {a['resolution']} px (dataset.crop.resolution): free the GPU of other "
                        "work, or set train.train_text_encoders to true or false (no probe)"),
}


# The model libraries a stage loads in this process (their notes and loading bars are quieted first).
LOADS_LIBRARIES: dict[str, tuple[str, ...]] = {
    "caption": ("transformers",), "caption-chunk": ("transformers",), "evaluate": ("transformers", "diffusers"),
    "probe": ("transformers", "diffusers"),
}


def stage_boundary(fn: Callable, name: str) -> Callable:
    """`fn` as a stage runs it: the libraries it loads quieted (lorapipe/logs.py), and torch's out-of-memory
    error turned into a UserError naming the stage and the setting to change: one line for the person
    instead of a traceback, and never retried (the same batch on the same GPU runs out again)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if name in LOADS_LIBRARIES:
            quiet_libraries(LOADS_LIBRARIES[name])
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_out_of_memory(err) or is_permanent(err):
                raise
            arguments = inspect.signature(fn).bind(*args, **kwargs).arguments
            hint = OUT_OF_MEMORY_HINTS.get(name, lambda a: "free the GPU or use a larger one")(arguments)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{name}: out of memory ({first[:160]}): {hint}") from err

    return run


def stage_task(fn: Callable, key_fn: Callable[..., str], name: str, retries: int = 2, **options):
    """The stage as a Prefect task: cached on `key_fn(**parameters)`, retried only when the failure is
    transient (lorapipe/errors.py), out of memory as a UserError, result persisted as JSON."""

    def cache_key(context, parameters: dict) -> str:
        return f"{name}-{key_fn(**parameters)}"

    return task(
        stage_boundary(fn, name),
        name=name,
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=[2, 10, 30][: max(retries, 1)],
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_if_transient,
        **options,
    )


def call_stage(stage, ws: Workspace, **parameters) -> tuple[dict, bool]:
    """Run a stage task with results stored in the workspace; returns (result, was_cached).

    A cached result whose output files were deleted is recomputed (refresh_cache) instead of
    handing later stages paths that no longer exist. The stage runs holding the workspace's lock for it:
    a second run on the same workspace waits, then finds this one's result in the cache.
    """
    storage = ws.cache / "prefect-results"
    with ws.lock(stage.name):
        ws.remove_stale_temps(stage.name)
        state = stage.with_options(result_storage=storage)(**parameters, return_state=True)
        result = state.result()
        cached = state.name == "Cached"
        if cached and not all(Path(p).exists() for p in result.get("outputs", [])):
            log.warning("%s: cached result points at missing files; recomputing", stage.name)
            state = stage.with_options(result_storage=storage, refresh_cache=True)(**parameters, return_state=True)
            result, cached = state.result(), False
    return result, cached
