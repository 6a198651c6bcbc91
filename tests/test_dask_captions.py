"""Captioning fanned out over a local Dask cluster (prefect-dask), on the CPU: chunks of images per task,
run in the cluster's worker processes, landing in the same per-image cache the caption stage reads."""

from __future__ import annotations

import os

import pytest

from flows.demo import demo_config
from lorapipe.manifest import read_manifest

pytestmark = pytest.mark.slow


def test_captions_fan_out_over_a_local_dask_cluster_in_chunks(prefect_harness, tiny_models, demo_photos, tmp_path):
    from flows.pipeline import dataset_flow

    config = demo_config(demo_photos[0], tmp_path / "workspace", tiny_models)
    config = config.model_copy(update={"scale_out": config.scale_out.model_copy(
        update={"task_runner": "dask", "workers": 2, "chunk_size": 4})})
    result = dataset_flow(config)

    fanned = result["stages"]["caption-fan-out"]["stats"]
    assert (fanned["chunks"], fanned["images"], fanned["computed"]) == (3, 10, 10)  # 10 kept images, 4 a task
    assert len(fanned["worker_pids"]) == 2 and os.getpid() not in fanned["worker_pids"]  # two worker processes
    caption = result["stages"]["caption"]["stats"]
    assert (caption["computed"], caption["reused"]) == (0, 10)  # the caption stage found every answer cached
    kept = [r for r in read_manifest(result["manifest"]) if r.kept]
    assert len(kept) == 10 and all(r.caption and "Jane Doe" in r.caption for r in kept)
