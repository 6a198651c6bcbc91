"""What the Prefect UI shows for a run: the pipeline's settings as a form with defaults and descriptions;
the deployments `lorapipe serve` builds; progress where someone is looking."""

from __future__ import annotations

import io

import pytest
from prefect.utilities.callables import parameter_schema
from rich.console import Console

from flows.pipeline import pipeline
from lorapipe.config import NightlyConfig, PipelineConfig
from tasks.progress import StageProgress


def test_flow_parameters_are_the_config_models():
    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    definitions = schema["definitions"]
    train = definitions["TrainConfig"]["properties"]
    assert train["rank"]["default"] == 8 and "LoRA rank" in train["rank"]["description"]
    assert train["optimizer"]["enum"] == ["auto", "lion", "lion-pytorch", "bnb-lion", "bnb-lion8bit"]
    assert "validate" in definitions["DatasetConfig"]["properties"]
    assert definitions["TrainConfig"]["additionalProperties"] is False
    assert definitions["ScaleOutConfig"]["properties"]["task_runner"]["enum"] == ["none", "dask", "ray"]


def test_serve_builds_five_deployments_with_the_nightly_schedule():
    from deployments.serve import deployments

    job = PipelineConfig(name="Jane Doe", images="/photos/jane")
    built = deployments(job, NightlyConfig(cron="30 2 * * *", timezone="Europe/Berlin"))
    assert [(d.flow_name, d.name) for d in built] == [("pipeline", "lorapipe"), ("dataset", "lorapipe"),
                                                     ("train", "lorapipe"), ("nightly", "lorapipe"),
                                                     ("rank-comparison", "lorapipe")]
    assert all(d.parameters == {"config": job.model_dump(mode="json", by_alias=True)} for d in built)
    [schedule] = built[3].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 2 * * *", "Europe/Berlin",
                                                                                    True)
    # Without a job the nightly run would not know whose photos to collect: it is built unscheduled.
    [schedule] = deployments(None)[3].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "UTC", False)


def test_nightly_time_zone_must_exist():
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        NightlyConfig(timezone="Mars/Olympus")


def test_progress_is_a_bar_in_a_terminal_and_log_lines_elsewhere(caplog):
    terminal = io.StringIO()
    with StageProgress("train", 8, "steps", console=Console(file=terminal, force_terminal=True, width=120)) as p:
        for step in range(1, 9):
            p.update(step, epoch=f"{step // 2}/4", loss=0.5 / step, eta_seconds=8 - step)
    assert "train" in terminal.getvalue() and "8/8" in terminal.getvalue() and "━" in terminal.getvalue()

    piped = io.StringIO()
    with caplog.at_level("INFO", logger="lorapipe.progress"):
        with StageProgress("caption", 3, "images", console=Console(file=piped, force_terminal=False)) as p:
            p.update(3, eta_seconds=0)
    assert piped.getvalue() == ""  # no bar drawn into a file or a pipe...
    assert "caption: 3/3 images · ETA 0 s" in caplog.text  # ...the numbers go to the log instead
