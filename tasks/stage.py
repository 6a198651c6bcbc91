"""What every stage task shares: content-based cache keys, retries, results kept in the workspace.

Prefect's INPUTS policy would hash a manifest *path* as a string; our keys hash the manifest's
*content*, the stage's settings and the stage's source code, so an edited photo, setting or stage
invalidates exactly what it should. Results are small JSON documents (paths, hashes, counts).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import task

from lorapipe.errors import is_permanent
from lorapipe.fsutil import atomic_copy, sha256_file, stable_hash
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


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect's retry condition: a UserError (a bad setting, a missing file or dependency) is not retried."""
    return not is_permanent(state.result(raise_on_failure=False))


def stage_task(fn: Callable, key_fn: Callable[..., str], name: str, retries: int = 2, **options):
    """The stage as a Prefect task: cached on `key_fn(**parameters)`, retried unless the failure is a
    UserError (lorapipe/errors.py), result persisted as JSON."""

    def cache_key(context, parameters: dict) -> str:
        return f"{name}-{key_fn(**parameters)}"

    return task(
        fn,
        name=name,
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=[2, 10, 30][: max(retries, 1)],
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_unless_permanent,
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
