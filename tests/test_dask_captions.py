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


def test_the_caption_command_sends_captioning_to_the_cluster_scale_out_names(prefect_harness, tiny_models,
                                                                            demo_photos, tmp_path):
    """`lorapipe caption WS` with `scale_out` in its job.yaml fans out as the pipeline does (it used to
    caption in its own process without a word)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.stages import stage_flow

    config = demo_config(demo_photos[0], tmp_path / "workspace", tiny_models)
    config = config.model_copy(update={"scale_out": config.scale_out.model_copy(
        update={"task_runner": "dask", "workers": 2, "chunk_size": 4})})
    for stage in ("collect", "validate", "dedup", "crop"):
        stage_flow(stage, config)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))

    result = CliRunner().invoke(app, ["caption", str(tmp_path / "workspace"), "--config", str(job), "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    fanned = done["fan_out"]
    assert (fanned["chunks"], fanned["computed"]) == (3, 10)
    assert len(fanned["worker_pids"]) == 2 and os.getpid() not in fanned["worker_pids"]
    assert (done["stats"]["computed"], done["stats"]["reused"]) == (0, 10)  # the stage found them cached
