"""Serve lorapipe's deployments from one process, for a single GPU box: `lorapipe serve`.

With a Prefect server running (`prefect server start`, PREFECT_API_URL set), the deployments appear in
the UI, where "Run" shows the pipeline's settings as a form (prefilled from `--config`). Each run
executes in a child process of this one; stopping this process pauses the nightly schedule (Prefect's
serve does that on shutdown) until it is served again. For several machines, use the work pool in
deployments/prefect.yaml instead: same flows, same deployment shapes.

Every run of these deployments is held to the operator's serving policy (lorapipe/policy.py): the paths,
addresses, API servers and keys a run's parameters may name. It is put in this process's environment,
which the flow runs (its child processes) inherit and no run parameter can change.
"""

from __future__ import annotations

import logging
import os

import flows  # noqa: F401  (environment before prefect)
from prefect.schedules import Cron

from flows.nightly import nightly
from flows.pipeline import dataset_flow, pipeline, train_flow
from flows.rank_comparison import rank_comparison
from lorapipe.config import NightlyConfig, PipelineConfig
from lorapipe.errors import UserError
from lorapipe.policy import POLICY_ENV, ServingPolicy, policy_problems

NAME = "lorapipe"  # the deployment name under each flow: pipeline/lorapipe, dataset/lorapipe, ...
TAGS = ["lorapipe"]
GPU_TAG = "gpu"  # the tag of caption, train and evaluate task runs (tasks/*.py)

log = logging.getLogger("lorapipe.serve")


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


def apply_policy(policy: ServingPolicy, defaults: PipelineConfig | None) -> None:
    """Put `policy` in this process's environment, for every flow run it starts; refuse serving a run form
    whose own defaults it would refuse."""
    if defaults is not None and (problems := policy_problems(defaults, policy)):
        raise UserError("--config: the served settings break the serving policy: " + "; ".join(problems))
    os.environ[POLICY_ENV] = policy.to_env()
    log.info("serving policy: paths under %s; API servers %s; API keys %s; extra addresses %s",
             ", ".join(policy.path_roots) or "none", ", ".join(policy.api_base_urls) or "public ones",
             ", ".join(policy.api_key_envs + policy.api_key_secrets) or "none",
             ", ".join(policy.allow_addresses) or "none")


def serve_deployments(defaults: PipelineConfig | None, schedule: NightlyConfig, gpu_slots: int | None,
                      notify_block: str | None = None, policy: ServingPolicy | None = None) -> None:
    from prefect import serve

    from lorapipe.policy import with_defaults

    apply_policy(policy if policy is not None else with_defaults(ServingPolicy(), defaults), defaults)
    if gpu_slots:
        ensure_gpu_limit(gpu_slots)
    if notify_block:
        from deployments.notify import ensure_review_notification

        ensure_review_notification(notify_block)
    serve(*deployments(defaults, schedule))
