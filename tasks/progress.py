"""Progress of a long stage (captioning, training), shown wherever someone is looking.

Inside a Prefect run it is a progress artifact (the run page shows a bar, the description carries the
numbers: epoch, step, loss, ETA); in a terminal it is a rich progress bar; and a log line goes out at
most every `log_every` seconds, so plain logs (CI, `docker logs`) have the numbers too. Prefect is
imported only when a run is active: the stage functions stay usable without an orchestrator.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("lorapipe.progress")


def describe(numbers: dict[str, Any]) -> str:
    """`epoch 2/4 · step 5/8 · loss 0.1234 · ETA 12 s` from whichever numbers are known."""
    parts = []
    for name, value in numbers.items():
        if value is None:
            continue
        if name == "eta_seconds":
            parts.append(f"ETA {format_seconds(value)}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4g}")
        else:
            parts.append(f"{name} {value}")
    return " · ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


_ROOTS: dict = {}


def root_flow_run_id():
    """The flow run a person started (a subflow's outermost parent), or None outside a run.

    Artifacts go there: people open the run they triggered, not the `dataset` or `train` subflow in it.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if not context or not context.flow_run:
        return None
    run = context.flow_run
    if run.id not in _ROOTS:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while run.parent_task_run_id:
                run = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
        _ROOTS[context.flow_run.id] = run.id
    return _ROOTS[context.flow_run.id]


class StageProgress:
    """`with StageProgress("caption", total=200, unit="images") as p: p.update(done, loss=...)`."""

    def __init__(self, stage: str, total: int, unit: str, key: str | None = None, console: Console | None = None,
                 log_every: float = 10.0, artifact_every: float = 2.0):
        self.stage, self.total, self.unit, self.key = stage, total, unit, key
        self.log_every, self.artifact_every = log_every, artifact_every
        self.done = 0
        self.numbers: dict[str, Any] = {}
        self._last_log = self._last_artifact = 0.0
        self._artifact_id = None
        console = console or Console(stderr=True)
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[numbers]}"), TimeElapsedColumn(), console=console,
                                 transient=False)
            self._bar_task = self._bar.add_task(stage, total=total, numbers="")

    def __enter__(self) -> "StageProgress":
        if self._bar:
            self._bar.start()
        try:
            if root := root_flow_run_id():
                from prefect.artifacts import ProgressArtifact

                self._artifact_id = ProgressArtifact(progress=0.0, key=self.key, description=self._description(),
                                                     flow_run_id=root).create().id
        except Exception as err:  # progress is a courtesy: never fail the stage over it
            log.warning("could not create a progress artifact: %s", err)
        return self

    def update(self, done: int, total: int | None = None, **numbers: Any) -> None:
        self.done = done
        self.total = total or self.total
        self.numbers = numbers
        now = time.monotonic()
        if self._bar:
            self._bar.update(self._bar_task, completed=done, total=self.total, numbers=describe(numbers))
        finished = done >= self.total
        if finished or now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("%s", self._description())
        if self._artifact_id and (finished or now - self._last_artifact >= self.artifact_every):
            self._last_artifact = now
            self._push()

    def _description(self) -> str:
        head = f"{self.stage}: {self.done}/{self.total} {self.unit}"
        details = describe(self.numbers)
        return f"{head} · {details}" if details else head

    def _push(self) -> None:
        from prefect.artifacts import update_progress_artifact

        percent = 100.0 * self.done / self.total if self.total else 100.0
        try:
            update_progress_artifact(self._artifact_id, min(percent, 100.0), description=self._description())
        except Exception as err:
            log.warning("could not update the progress artifact: %s", err)

    def __exit__(self, *exc) -> None:
        if self._artifact_id:  # the last numbers, even if the previous push was moments ago
            self._push()
        if self._bar:
            self._bar.stop()
