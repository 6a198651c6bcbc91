"""Serve lorapipe's deployments from one process, for a single GPU box: `lorapipe serve`.

With a Prefect server running (`prefect server start`, PREFECT_API_URL set), the deployments appear in
the UI, where "Run" shows the pipeline's settings as a form (prefilled from `--config`). Each run
executes in a child process of this one; stopping this process pauses the nightly schedule (Prefect's
serve does that on shutdown) until it is served again. For several machines, use the work pool in
deployments/prefect.yaml instead: same flows, same deployment shapes.
"""

from __future__ import annotations

import flows  # noqa: F401  (environment before prefect)
from prefect.schedules import Cron

from flows.nightly import nightly
from flows.pipeline import dataset_flow, pipeline, train_flow
from flows.rank_comparison import rank_comparison
from lorapipe.config import NightlyConfig, PipelineConfig

NAME = "lorapipe"  # the deployment name under each flow: pipeline/lorapipe, dataset/lorapipe, ...
TAGS = ["lorapipe"]
GPU_TAG = "gpu"  # the tag of caption, train and evaluate task runs (tasks/*.py)


def deployments(defaults: PipelineConfig | None = None, schedule: NightlyConfig | None = None, name: str = NAME):
    """The five deployments (pipeline, dataset, train, nightly, rank-comparison); `defaults` prefill the UI's form (and are the nightly run's parameters)."""
    schedule = schedule or NightlyConfig()
    params = {"config": defaults.model_dump(mode="json", by_alias=True)} if defaults else None
    # Without defaults the nightly run would not know whose photos to collect: it exists, unscheduled.
    cron = Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active and defaults is not None)
    return [
        pipeline.to_deployment(name, description="Photos of a person in, a LoRA out: every stage.", tags=TAGS,
                               parameters=params),
        dataset_flow.to_deployment(name, description="Collect → review only: a workspace of approved images.",
                                   tags=TAGS, parameters=params),
        train_flow.to_deployment(name, description="Train, export and evaluate from a reviewed workspace.",
                                 tags=TAGS, parameters=params),
        nightly.to_deployment(name, description="Re-collect; retrain only when photos, decisions or settings "
                              "changed.", tags=TAGS, parameters=params, schedules=[cron]),
        rank_comparison.to_deployment(name, description="Train the reviewed dataset at several ranks and report "
                                      "size, time, identity and style pollution.", tags=TAGS, parameters=params),
    ]


def ensure_gpu_limit(slots: int) -> None:
    """A tag concurrency limit: at most `slots` GPU task runs at once across every process on this server.

    Two pipelines started together then queue for the GPU instead of running out of its memory.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)


def serve_deployments(defaults: PipelineConfig | None, schedule: NightlyConfig, gpu_slots: int | None,
                      notify_block: str | None = None) -> None:
    from prefect import serve

    if gpu_slots:
        ensure_gpu_limit(gpu_slots)
    if notify_block:
        from deployments.notify import ensure_review_notification

        ensure_review_notification(notify_block)
    serve(*deployments(defaults, schedule))
