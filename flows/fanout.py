"""Captioning fanned out over a Dask (or Ray) cluster: chunks of images per task, not a task per image.

With `scale_out.task_runner: dask` the images the per-image cache has no caption for are split into
chunks of `scale_out.chunk_size`; a subflow running on prefect-dask's task runner captions the chunks on
the cluster's workers (each loads the VLM once per chunk) into the workspace's per-image cache, which
must therefore be on storage the workers share. The caption stage that follows then finds every answer
cached and only finishes the captions. A task per chunk keeps the Prefect database small (a task run
costs ~20 KB) and the model loads few. Images the workers got no usable caption for are handed to the caption
stage through its failure log (tasks/caption.py), not asked twice in one run; a chunk task is not retried on
a failure no retry can fix (a missing dependency, a rejected key).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped

from lorapipe.config import CaptionConfig, PipelineConfig, ScaleOutConfig
from lorapipe.workspace import Workspace
from tasks.caption import caption_chunk_task, uncaptioned_ids


def task_runner(scale: ScaleOutConfig):
    if scale.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if scale.address:
            return DaskTaskRunner(address=scale.address)
        # One thread per worker process: a VLM per process, and torch's threads are the parallelism inside it.
        return DaskTaskRunner(cluster_kwargs={"n_workers": scale.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if scale.task_runner == "ray":  # documented, not exercised by the test suite (no Ray on CI)
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=scale.address) if scale.address else RayTaskRunner()
    raise ValueError(f"no task runner for {scale.task_runner!r}")


@flow(name="caption-fan-out")
def caption_fan_out(manifest: str, workspace: str, config: CaptionConfig, ids: list[str], chunk_size: int) -> dict:
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    futures = caption_chunk_task.map(manifest=unmapped(manifest), workspace=unmapped(workspace),
                                     config=unmapped(config), ids=chunks)
    results = [f.result() for f in futures]
    stats = {"chunks": len(chunks), "images": sum(r["images"] for r in results),
             "computed": sum(r["computed"] for r in results), "failed": sum(r["failed"] for r in results),
             "worker_pids": sorted({r["pid"] for r in results})}
    get_run_logger().info("captioned %d images in %d chunks on %d workers (%d without a usable caption)",
                          stats["computed"], len(chunks), len(stats["worker_pids"]), stats["failed"])
    return stats


def fan_out_captions(ws: Workspace, manifest: str, config: PipelineConfig) -> dict | None:
    """Caption the uncached images on the configured cluster; None when not configured or nothing to do."""
    scale = config.scale_out
    if scale.task_runner == "none":
        return None
    ids = uncaptioned_ids(manifest, str(ws.root), config.caption)
    if not ids:
        return None
    fan_out = caption_fan_out.with_options(task_runner=task_runner(scale))
    return fan_out(manifest, str(ws.root), config.caption, ids, scale.chunk_size)
