"""What the Prefect UI shows for a run: the pipeline's settings as a form with defaults and descriptions."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.pipeline import pipeline


def test_flow_parameters_are_the_config_models():
    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    definitions = schema["definitions"]
    train = definitions["TrainConfig"]["properties"]
    assert train["rank"]["default"] == 8 and "LoRA rank" in train["rank"]["description"]
    assert train["optimizer"]["enum"] == ["auto", "lion", "lion-pytorch", "bnb-lion", "bnb-lion8bit"]
    assert "validate" in definitions["DatasetConfig"]["properties"]
    assert definitions["TrainConfig"]["additionalProperties"] is False


def test_serve_builds_the_deployments():
    from deployments.serve import deployments

    assert [d.name for d in deployments()] == ["lorapipe", "dataset", "train"]
