"""Asking a person about captions: the Resume form in the Prefect UI, with the photos, from the run they started.

The run a person started (its top-level flow) asks: Prefect suspends only top-level runs, and that run's page
is the one people open. Each waiting photo appears as a thumbnail above the form, and each caption has its own
prefilled field, so a person edits a caption in place. A deployment's run is suspended (process gone, no
worker or GPU held); any other run pauses in its process.

Whatever the answer, its valid parts are recorded (tasks/review_answers.py) and the rest is sent back: the run
asks again with the problems written above the form. Nobody in time (`review.timeout_hours`): a timer resumes
the run without an answer and `review.on_timeout` decides, continue (train on the approved captions) or fail
with one line. The timer of a paused run is a thread in its process; a suspended run has no process, so its
timer is a Prefect automation on the server: a proactive trigger on the run's own events that resumes it.
Prefect's own pause timeout is set `GRACE_SECONDS` later, as a fallback only (it fails the run with Prefect's
"The flow was paused and never resumed" when the server's automations are off).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Literal

import pydantic
from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run, suspend_flow_run
from prefect.input import RunInput, keyset_from_paused_state, read_flow_run_input
from prefect.states import Paused, Suspended
from PIL import Image

from lorapipe.config import PipelineConfig, ReviewConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_json, read_json
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.plots import data_url
from lorapipe.review_decisions import ReviewDecision, same_text
from lorapipe.workspace import Workspace
from tasks.review import record_answer_task
from tasks.review_answers import display_name, waiting_for_review

log = logging.getLogger("lorapipe.review")
PAUSE_FILE = "review-pause.json"
PAGE = 40  # photos per form: more come in the next one
THUMBNAIL = 160  # px, the longer side
GRACE_SECONDS = 300


class ReviewTimedOut(UserError):
    """Nobody reviewed in time and `review.on_timeout` is "fail"."""


def failed_for(err: ReviewTimedOut):
    """What a top-level flow returns for it: a Failed run whose state message is the one line and whose flow logs
    no traceback (calling the flow in Python, as `lorapipe run` does, still raises the error)."""
    from prefect.states import Failed

    return Failed(message=str(err), data=err)


def is_top_level() -> bool:
    context = FlowRunContext.get()
    return bool(context and context.flow_run and not context.flow_run.parent_task_run_id)


def labels_for(records: list[ImageRecord]) -> dict[str, str]:
    """Image id → the name a person picks it by: the file name, with the id's start where two files share it."""
    names = [display_name(r) for r in records]
    return {r.id: n if names.count(n) == 1 else r.id[:12] for r, n in zip(records, names)}


def caption_field(record: ImageRecord) -> str:
    return f"caption_{record.id[:12]}"


def thumbnail(ws: Workspace, record: ImageRecord) -> str:
    try:
        with Image.open(ws.path(record.image_path)) as image:
            return f"![{display_name(record)}]({data_url(image, THUMBNAIL, photo=True)})"
    except (OSError, TypeError, ValueError):
        return "(no image)"


def review_markdown(ws: Workspace, page: list[ImageRecord], waiting: int, feedback: list[str]) -> str:
    """Above the form: what to do, what was not applied last time, and each photo with its caption and why."""
    cell = lambda text: (text or "").replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        f"### {waiting} captions need a person",
        "Check each photo against its caption. **Change a caption** in its numbered field below the photos "
        "(prefilled), **Approve All** to accept the captions of this form as they then stand, or pick photos "
        "in **Drop** to leave them out of training. Captions nobody approves stay out of this run.",
    ]
    if feedback:
        lines += ["", "**Not applied from your last answer** (fix it and send again):", ""]
        lines += [f"- {cell(p)}" for p in feedback]
    lines += ["", "| photo | caption |", "| --- | --- |"]
    for n, r in enumerate(page, 1):
        why = "; ".join(r.review_reasons) or "approval: all"
        lines.append(f"| {thumbnail(ws, r)} | **{n}. {cell(display_name(r))}** · {cell(r.caption) or '(none)'} "
                     f"· _why: {cell(why)}_ |")
    if waiting > len(page):
        lines.append(f"\n…and {waiting - len(page)} more: they come in the next form.")
    return "\n".join(lines)


def review_form(ws: Workspace, records: list[ImageRecord], feedback: list[str]) -> tuple[type[RunInput], list]:
    """The form for the first `PAGE` waiting photos, and those photos."""
    waiting = waiting_for_review(records)
    page = waiting[:PAGE]
    labels = labels_for(page)
    pick = Literal[tuple(labels.values())]  # the UI shows a list to pick from: no file name to type
    base = ReviewDecision.model_fields
    fields: dict = {
        "reviewer": (str, base["reviewer"]),
        "approve_all": (bool, pydantic.Field(False, description="Approve the captions of this form as they stand "
                                             "after your changes")),
    }
    for n, r in enumerate(page, 1):
        why = "; ".join(r.review_reasons) or "approval: all"
        fields[caption_field(r)] = (str, pydantic.Field(r.caption or "", title=f"{n}. {display_name(r)}",
                                                        description=f"why: {why}"))
    fields["drop"] = (list[pick], pydantic.Field(default_factory=list, description="Photos to leave out of training"))
    fields["approve"] = (list[pick], pydantic.Field(default_factory=list,
                                                    description="Approve only these, as they stand"))
    fields["edits"] = (dict[str, str], pydantic.Field(default_factory=dict, description=(
        "Other captions as file name (or image id) → caption, e.g. for photos not in this form")))
    model = pydantic.create_model("ReviewInput", __base__=RunInput, **fields)
    return model.with_initial_data(description=review_markdown(ws, page, len(waiting), feedback)), page


def answer_to_decision(answer: dict, page: list[ImageRecord]) -> tuple[ReviewDecision, list[str]]:
    """The form's answer in the shape every door shares; a caption changed in its field is an edit."""
    labels = labels_for(page)
    names = {label: r.id for r, label in zip(page, labels.values())}
    decision = ReviewDecision(
        approve_all=bool(answer.get("approve_all")), reviewer=answer.get("reviewer") or "",
        approve=[names.get(x, x) for x in answer.get("approve") or []],
        drop=[names.get(x, x) for x in answer.get("drop") or []],
        edits=dict(answer.get("edits") or {}))
    problems = []
    for r in page:
        text = answer.get(caption_field(r))
        if text is None or same_text(text, r.caption):
            continue
        for key in [k for k in decision.edits if k in (r.id, display_name(r), labels[r.id])]:
            problems.append(f"{display_name(r)}: two captions given, its field's was used; from edits: "
                            f"{decision.edits.pop(key)!r}")
        decision.edits[r.id] = text
    return decision, problems


class PauseTimer:
    """Resumes a paused run (in this process) without an answer when the review's time is up."""

    def __init__(self, flow_run_id, seconds: float):
        self._timer = threading.Timer(seconds, self._resume, args=(flow_run_id,))
        self._timer.daemon = True
        self._timer.start()

    def _resume(self, flow_run_id) -> None:
        try:
            resume_flow_run(flow_run_id)
        except (NotPausedError, FlowPauseTimeout, RuntimeError) as err:  # a person was quicker
            log.info("review timer: run %s not resumed: %s", flow_run_id, err)

    def cancel(self) -> None:
        self._timer.cancel()


def timer_name(flow_run_id) -> str:
    return f"lorapipe: review timeout of flow run {flow_run_id}"


def start_suspended_timer(flow_run_id, seconds: float) -> None:
    """A Prefect automation that resumes the suspended run, without an answer, if it is still suspended after
    `seconds` (proactive triggers wait at least 10 s)."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import ResumeFlowRun
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    run = f"prefect.flow-run.{flow_run_id}"
    trigger = EventTrigger(
        posture=Posture.Proactive, match={"prefect.resource.id": run}, for_each={"prefect.resource.id"},
        after={"prefect.flow-run.Suspended"},
        expect={f"prefect.flow-run.{s}" for s in ("Resuming", "Running", "Completed", "Failed", "Crashed",
                                                  "Cancelling", "Cancelled")},
        threshold=1, within=timedelta(seconds=max(10.0, seconds)))
    automation = AutomationCore(name=timer_name(flow_run_id), trigger=trigger, actions=[ResumeFlowRun()],
                                description="Created by lorapipe's caption review; removed when the run resumes.")
    stop_suspended_timer(flow_run_id)
    with get_client(sync_client=True) as client:
        for old in client.read_automations():  # timers of runs cancelled or deleted while they waited
            if old.name.startswith(timer_name("")) and not _still_waiting(client, old.name[len(timer_name("")):]):
                client.delete_automation(old.id)
        client.create_automation(automation)


def _still_waiting(client, flow_run_id: str) -> bool:
    try:
        run = client.read_flow_run(flow_run_id)
    except (ObjectNotFound, ValueError):
        return False
    return bool(run.state and run.state.is_paused())


def stop_suspended_timer(flow_run_id) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(timer_name(flow_run_id)):
            client.delete_automation(automation.id)


def tell_the_person(ws: Workspace, waiting: int, wait: str, deadline: datetime) -> None:
    """The run's log line: what waits, until when, and where to answer (the V2 UI Prefect serves by default)."""
    from prefect.runtime import flow_run

    get_run_logger().warning(
        "%d captions wait for a person until %s UTC. In the Prefect UI: Runs → %s, then the ⋮ menu (top right) → "
        "Resume: the form shows each photo with its caption; change a caption in its field, or switch Approve All, "
        "then press Resume (the V1 UI: the Resume button, then Submit). Or in a terminal: `lorapipe review %s`.%s",
        waiting, deadline.strftime("%Y-%m-%d %H:%M"), flow_run.name, ws.root,
        " The run is suspended meanwhile: it holds no worker or GPU." if wait == "suspend" else "")


def ask(ws: Workspace, records: list[ImageRecord], config: ReviewConfig, round_: int,
        feedback: list[str]) -> tuple[dict, list, int] | None:
    """Pause or suspend until a person answers: (their answer, the photos it is about, how many captions waited
    when asked); None when time ran out.

    Suspending ends this process (Prefect raises `Pause` inside); the resumed run starts from the top, reaches
    this call again with the same round, and gets the stored answer back from Prefect.
    """
    run = FlowRunContext.get().flow_run
    wait = config.wait if config.wait != "auto" else ("suspend" if run.deployment_id else "pause")
    key = f"review-{round_}"
    pause = ws.root / PAUSE_FILE
    state = read_json(pause) if pause.exists() else {}
    resumed = state.get("flow_run_id") == str(run.id) and state.get("key") == key
    if resumed:
        deadline = datetime.fromisoformat(state["deadline"])  # resumed: the same question, the same deadline
    else:
        deadline = datetime.now(timezone.utc) + timedelta(hours=config.timeout_hours)
        atomic_write_json(pause, {"flow_run_id": str(run.id), "key": key, "round": round_, "wait": wait,
                                  "deadline": deadline.isoformat(), "waiting": len(waiting_for_review(records))})
    form, page = review_form(ws, records, feedback)
    seconds = max(1.0, (deadline - datetime.now(timezone.utc)).total_seconds())
    prefect_timeout = int(seconds + GRACE_SECONDS)
    asked = state["waiting"] if resumed else len(waiting_for_review(records))
    if not resumed:
        tell_the_person(ws, asked, wait, deadline)
    if wait == "pause":
        timer = PauseTimer(run.id, seconds)
        try:
            pause_flow_run(wait_for_input=form, timeout=prefect_timeout, key=key, poll_interval=2)
        except FlowPauseTimeout:
            return None
        finally:
            timer.cancel()
        keyset = keyset_from_paused_state(Paused(pause_key=key))
    else:
        if not resumed:
            start_suspended_timer(run.id, seconds)
        suspend_flow_run(wait_for_input=form, timeout=prefect_timeout, key=key)  # first time: Pause, process ends
        stop_suspended_timer(run.id)
        keyset = keyset_from_paused_state(Suspended(pause_key=key))
    answer = read_flow_run_input(keyset["response"], flow_run_id=run.id)
    if answer is None and datetime.now(timezone.utc) >= deadline - timedelta(seconds=5):
        return None  # resumed by the timer: nobody answered in time
    return answer or {}, page, asked


def settle_review(config: PipelineConfig, ws: Workspace, review: dict, captioned: str,
                  stages: dict | None = None) -> dict:
    """Ask a person until no caption waits, or time runs out; returns the last review stage result.

    Only the run a person started asks (a subflow leaves it to that run). Each answer's valid parts are
    recorded, the review stage runs again, and whatever still waits is asked again, with the problems of the
    last answer above the form. `stages`: the run's stage results so far, for the dataset artifact's work
    done line.
    """
    from flows.artifacts import publish_dataset
    from flows.stages import run_stage

    settings = config.review
    if settings.approval == "auto" or not review["stats"]["pending"]:
        return review
    logger = get_run_logger()
    if not is_top_level():
        logger.info("%d captions wait for a person: the run that started this one asks", review["stats"]["pending"])
        return review
    pause = ws.root / PAUSE_FILE
    state = read_json(pause) if pause.exists() else {}
    round_ = state.get("round", 0) if state.get("flow_run_id") == str(FlowRunContext.get().flow_run.id) else 0
    feedback: list[str] = []
    while waiting := waiting_for_review(records := read_manifest(review["manifest"])):
        asked = ask(ws, records, settings, round_, feedback)
        ref, round_ = f"{FlowRunContext.get().flow_run.id}/review-{round_}", round_ + 1
        if asked is None:
            pause.unlink(missing_ok=True)
            message = (f"nobody reviewed {len(waiting)} captions within {settings.timeout_hours:g} hours "
                       f"(review.timeout_hours)")
            if settings.on_timeout == "fail":
                raise ReviewTimedOut(f"{message}; review.on_timeout is fail: review them with `lorapipe review "
                                     f"{ws.root}` and run again")
            logger.warning("%s: carrying on with the %d approved captions only", message, review["stats"]["approved"])
            return review
        answer, page, asked_about = asked
        decision, feedback = answer_to_decision(answer, page)
        outcome = record_answer_task(
            manifest=review["manifest"], workspace=str(ws.root), answer=decision, config=settings,
            name=config.name, tokenizer_from=config.train.tokenizer_source, source="form",
            ref=ref, scope=[r.id for r in page])
        feedback += outcome["problems"]
        for problem in feedback:
            logger.warning("review answer not applied: %s", problem)
        review, _ = run_stage("review", config, ws, captioned)
        publish_dataset(config.name, review["manifest"], stages)
        if not feedback and review["stats"]["pending"] >= asked_about:  # (`lorapipe review` may have decided)
            feedback = ["your answer decided nothing: change a caption, Approve All, or pick photos to drop"]
    pause.unlink(missing_ok=True)
    return review


def resume_paused_run(ws: Workspace, reviewer: str) -> str | None:
    """Resume the run waiting for this workspace's review; it applies the decisions stored meanwhile."""
    pause = ws.root / PAUSE_FILE
    if not pause.exists():
        return None
    flow_run_id = read_json(pause)["flow_run_id"]
    try:
        resume_flow_run(flow_run_id, run_input={"reviewer": reviewer})
    except (ObjectNotFound, NotPausedError, FlowPauseTimeout, RuntimeError) as err:  # gone, or no longer waiting
        pause.unlink(missing_ok=True)
        log.warning("could not resume flow run %s: %s", flow_run_id, err)
        return None
    return flow_run_id
