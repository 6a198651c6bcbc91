"""Serve lorapipe's flows from one process, for a single GPU box: `python -m deployments.serve`.

With a Prefect server running (`prefect server start`, PREFECT_API_URL set), the deployments appear in
the UI, where "Run" shows the pipeline's settings as a form.
"""

from __future__ import annotations

import flows  # noqa: F401  (environment before prefect)
from prefect import serve

from flows.pipeline import dataset_flow, pipeline, train_flow


def deployments():
    return [
        pipeline.to_deployment(name="lorapipe", description="Photos of a person in, a LoRA out.", tags=["lorapipe"]),
        dataset_flow.to_deployment(name="dataset", description="Collect → review only.", tags=["lorapipe"]),
        train_flow.to_deployment(name="train", description="Train on a reviewed manifest.", tags=["lorapipe"]),
    ]


if __name__ == "__main__":
    serve(*deployments())
