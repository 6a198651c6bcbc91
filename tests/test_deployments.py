"""What the Prefect UI shows for a run: the pipeline's settings as a form with defaults and descriptions;
the deployments `lorapipe serve` builds; progress where someone is looking."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema
from rich.console import Console

from flows.pipeline import pipeline
from lorapipe.config import NightlyConfig, PipelineConfig
from tasks.progress import StageProgress


def form(flow=pipeline) -> dict:
    """The run form's schema as Prefect hands it to the UI (the deployment's parameter schema)."""
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    return schema["definitions"][schema["properties"]["config"]["$ref"].rsplit("/", 1)[-1]]


def walk(schema: dict, path: str = ""):
    yield path, schema
    for key, value in schema.get("properties", {}).items():
        yield from walk(value, f"{path}.{key}".lstrip("."))


def test_run_form_puts_what_people_change_first_and_the_rest_under_advanced():
    from flows.nightly import nightly
    from flows.pipeline import dataset_flow, train_flow
    from lorapipe.run_form import SECTIONS

    schema = form()
    assert list(schema["properties"]) == ["name", "images", "rank", "epochs", "learning_rate", "captioner",
                                          "approval", "workspace", "advanced"]
    assert schema["required"] == ["name", "images"]
    top = schema["properties"]
    assert (top["rank"]["title"], top["rank"]["default"], top["rank"]["minimum"]) == ("LoRA rank", 8, 1)
    assert top["approval"]["enum"] == ["auto", "flagged-only", "all"]
    advanced = top["advanced"]["properties"]
    assert {key: value["title"] for key, value in advanced.items()} == {key: SECTIONS[key][0] for key in advanced}
    assert (advanced["train"]["title"], advanced["caption"]["title"]) == ("Training", "Captions")
    assert "rank" not in advanced["train"]["properties"] and "model" not in advanced["caption"]["properties"]
    assert advanced["train"]["properties"]["micro_batch_size"]["anyOf"][1] == {"const": "auto", "type": "string",
                                                                              "title": "auto"}
    for path, prop in walk(schema):  # written for people: no class names, no "None" to pick, a description
        assert not prop.get("title", "").endswith("Config"), path
        assert {"type": "null"} not in prop.get("anyOf", []), path
        assert prop.get("default", "") is not None, path
        assert prop.get("description") or prop.get("type") == "object" or path.count(".") < 2, path
    assert all(form(f) == schema for f in (dataset_flow, train_flow, nightly))  # one form for every flow


def test_form_values_become_the_same_settings_as_job_yaml():
    from flows.demo import DEMO_NAME
    from lorapipe.run_form import form_values

    job = PipelineConfig.model_validate({"name": DEMO_NAME, "images": "/photos", "workspace": "/ws",
                                         "train": {"rank": 16, "micro_batch_size": "auto", "vae": "org/vae"},
                                         "caption": {"model": "/models/llava"}, "review": {"approval": "all"}})
    values = form_values(job)
    assert (values["rank"], values["captioner"], values["approval"]) == (16, "/models/llava", "all")
    assert values["advanced"]["train"]["vae"] == "org/vae" and "rank" not in values["advanced"]["train"]
    assert PipelineConfig.model_validate(values) == job  # the form's values, the settings: one conversion
    assert PipelineConfig.model_validate(job.model_dump(mode="json", by_alias=True)) == job  # job.yaml's shape
    # An empty field is its default; a setting given twice must agree; unknown keys are refused either way.
    assert PipelineConfig.model_validate({**values, "rank": None}).train.rank == 8
    with pytest.raises(ValueError, match=r"rank \(4\) and train.rank \(16\) differ"):
        PipelineConfig.model_validate({"name": DEMO_NAME, "images": "/photos", "rank": 4, "train": {"rank": 16}})
    with pytest.raises(ValueError, match="ranks"):
        PipelineConfig.model_validate({**values, "advanced": {**values["advanced"], "ranks": 4}})


def test_serve_builds_the_deployments_named_for_what_they_do_with_the_nightly_schedule():
    from deployments.serve import DEPLOYMENTS, deployments
    from lorapipe.run_form import form_values

    job = PipelineConfig(name="Jane Doe", images="/photos/jane")
    built = deployments(job, NightlyConfig(cron="30 2 * * *", timezone="Europe/Berlin"))
    assert [(d.flow_name, d.name) for d in built] == [("pipeline", "photos-to-lora"), ("dataset", "photos-to-dataset"),
                                                     ("train", "dataset-to-lora"), ("nightly", "nightly-retrain"),
                                                     ("rank-comparison", "compare-ranks")]
    assert [(d.name, d.description) for d in built] == list(DEPLOYMENTS.values())
    assert all(d.parameters == {"config": form_values(job)} for d in built)  # the form's defaults
    [schedule] = built[3].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 2 * * *", "Europe/Berlin",
                                                                                    True)
    # Without a job the nightly run would not know whose photos to collect: it is built unscheduled.
    [schedule] = deployments(None)[3].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "UTC", False)


def test_prefect_yaml_declares_the_served_deployments_with_a_default_config():
    import yaml

    from deployments.serve import DEPLOYMENTS, POOL_SUFFIX, deployments

    declared = yaml.safe_load((Path(__file__).parent.parent / "deployments" / "prefect.yaml").read_text())
    served = {d.name: d for d in deployments(None)}
    pool = {d["name"]: d for d in declared["deployments"]}
    assert list(pool) == [name + POOL_SUFFIX for name, _ in DEPLOYMENTS.values()]
    for name, description in DEPLOYMENTS.values():
        d = pool[name + POOL_SUFFIX]
        assert d["description"] == description
        assert d["entrypoint"].rsplit(".", 1)[-1] == served[name].entrypoint.rsplit(":", 1)[-1]
        PipelineConfig.model_validate(d["parameters"]["config"])  # a quick run needs no config typed in


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


def test_work_done_counts_per_image_not_per_stage():
    from flows.summary import work_done

    stages = {"collect": {"cached": True, "stats": {"computed": 14, "reused": 0}},
              "caption": {"cached": False, "stats": {"computed": 3, "reused": 10, "failed": 0}},
              "train": {"cached": False, "stats": {"latents": {"computed": 3, "reused": 10},
                                                   "text_embeddings": {"computed": 0, "reused": 0}, "steps": 40}}}
    # A stage re-used whole re-used all it counted; a kind with nothing counted (text embeddings when the
    # text encoders train) is left out.
    assert work_done(stages) == ("files 0 new, 14 re-used; captions 3 new, 10 re-used; latents 3 new, 10 re-used; "
                                 "stages re-used whole 1 of 3")
