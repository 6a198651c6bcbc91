"""Waiting for a person to review captions: the run pauses (or suspends) with a form in the Prefect UI.

The form is `ReviewInput`; above it the UI shows the captions waiting, as markdown. `lorapipe review
WORKSPACE` resumes the same run from a terminal.
"""

from __future__ import annotations

import pydantic
from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput

from lorapipe.config import ReviewConfig
from lorapipe.fsutil import atomic_write_json, stable_hash
from lorapipe.manifest import read_manifest
from lorapipe.review_decisions import ReviewDecision
from lorapipe.workspace import Workspace
from tasks.review import review_markdown, waiting_for_review

PAUSE_FILE = "review-pause.json"


class ReviewInput(RunInput, ReviewDecision):
    """The caption review form."""


def input_type_with(description: str) -> type[ReviewInput]:
    # A subclass carrying the markdown; RunInput.with_initial_data would drop the fields' descriptions.
    model = pydantic.create_model("ReviewInput", __base__=ReviewInput)
    model._description = description
    return model


def ask_a_person(ws: Workspace, manifest: str, config: ReviewConfig) -> ReviewDecision | None:
    """Pause until a reviewer answers; None when nobody did in time and the settings say carry on."""
    logger = get_run_logger()
    records = read_manifest(manifest)
    waiting = waiting_for_review(records)
    context = FlowRunContext.get()
    wait = config.wait
    if wait == "auto":  # suspending frees the worker, but only a deployment can be started again
        wait = "suspend" if context and context.flow_run.deployment_id else "pause"
    key = "review-" + stable_hash([(r.id, r.caption) for r in waiting])[:16]
    atomic_write_json(ws.root / PAUSE_FILE, {"flow_run_id": str(context.flow_run.id), "key": key,
                                             "waiting": len(waiting)})
    logger.warning(
        "%d captions wait for a person: open this run in the Prefect UI and press Resume, or run "
        "`lorapipe review %s` in a terminal", len(waiting), ws.root,
    )
    pause = suspend_flow_run if wait == "suspend" else pause_flow_run
    try:
        answer = pause(wait_for_input=input_type_with(review_markdown(records)),
                       timeout=int(config.timeout_hours * 3600), key=key)
    except FlowPauseTimeout:
        if config.on_timeout == "fail":
            raise RuntimeError(f"nobody reviewed {len(waiting)} captions within {config.timeout_hours} hours")
        logger.warning("nobody reviewed the captions in time: training on the approved ones only")
        return None
    finally:
        (ws.root / PAUSE_FILE).unlink(missing_ok=True)
    return ReviewDecision.model_validate(answer.model_dump(include=set(ReviewDecision.model_fields)))


def resume_paused_run(ws: Workspace, reviewer: str) -> str | None:
    """Resume the run that paused for this workspace's review; its review stage applies the stored decisions."""
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    from lorapipe.fsutil import read_json

    pause = ws.root / PAUSE_FILE
    if not pause.exists():
        return None
    flow_run_id = read_json(pause)["flow_run_id"]
    try:
        resume_flow_run(flow_run_id, run_input=ReviewDecision(reviewer=reviewer).model_dump())
    except (ObjectNotFound, RuntimeError) as err:  # gone, or no longer paused
        pause.unlink(missing_ok=True)
        get_logger().warning("could not resume flow run %s: %s", flow_run_id, err)
        return None
    return flow_run_id


def get_logger():
    import logging

    return logging.getLogger("lorapipe.review")
