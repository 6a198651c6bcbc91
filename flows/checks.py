"""What is checked before the first stage runs, by the flows and by the CLI before it starts any flow.

A run that cannot finish for a reason the user can fix (a photo folder that does not exist, a URL list that
is not UTF-8, a model that is neither local, cached nor reachable, a workspace where a file is in the way,
a parameter the serving policy refuses) fails at once with one line naming the input and the fix, before
any stage has run: not after the CPU stages, and not as a traceback.
"""

from __future__ import annotations

from lorapipe.config import PipelineConfig
from lorapipe.errors import UserError
from lorapipe.model_sources import check_models
from lorapipe.policy import check_run
from lorapipe.workspace import Workspace

DATASET_STAGES = ("collect", "validate", "dedup", "crop", "caption", "review")
TRAIN_STAGES = ("train", "export", "evaluate")
ALL_STAGES = DATASET_STAGES + TRAIN_STAGES


def check_sources(config: PipelineConfig) -> None:
    """Every photo source exists; URL lists read as UTF-8 (with a url column, for a CSV).

    Raises:
        UserError: `<path>: no such folder, archive or URL list`, or what is wrong with a URL list.
    """
    from tasks.collect import resolve_sources, source_kind, url_list_lines

    for source in resolve_sources(config.images):
        try:
            kind = source_kind(source)
        except FileNotFoundError as err:
            raise UserError(f"images: {err}") from None
        if kind == "url_list":
            url_list_lines(source)


def check_before_stages(config: PipelineConfig, stages: tuple[str, ...] | list[str],
                        manifest: str | None = None) -> Workspace:
    """Everything about `config` the given stages need, checked before the first of them runs; returns the
    workspace (created).

    Raises:
        UserError: the first kind of problem found (policy, sources, models, workspace), in one line.
    """
    check_run(config, manifest)  # a served deployment's serving policy; nothing without one
    if "collect" in stages:
        check_sources(config)
    check_models(config, stages)
    return Workspace.at(config.workspace_path())  # created only for a run that can start
