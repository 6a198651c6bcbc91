"""The nightly retrain: re-collect, and train again only when something changed.

Collecting is cheap (a folder listing, cached downloads); everything after it is skipped when the
kept photos, the review decisions and the settings are those the last LoRA was trained from
(lorapipe/retrain.py): the run then ends in seconds with "nothing new" and no GPU stage at all. Otherwise
it says what changed (photos added or removed, by name; review decisions; settings, old → new) in its logs
and its `<name>-nightly` artifact, and runs the pipeline, where content caching limits the work to the new
or changed photos, and where captions that need a person suspend the run (holding no worker or GPU) until
someone answers.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import MarkdownArtifact

from flows.artifacts import publish
from flows.checks import check_before_stages
from flows.pipeline import build_lora
from flows.review import ReviewTimedOut, failed_for
from flows.stages import run_stage
from lorapipe.config import PipelineConfig
from lorapipe.manifest import read_manifest
from lorapipe.retrain import last_trained, training_fingerprint, training_inputs, what_changed
from lorapipe.workspace import Workspace, slugify

NOTHING_NEW = "nothing new"


@flow(name="nightly")
def nightly(config: PipelineConfig) -> dict:
    """Re-collect the photos; retrain only if photos, review decisions or settings changed."""
    logger = get_run_logger()
    ws = check_before_stages(config, ["collect"])  # the models are checked when it decides to train
    collected, _ = run_stage("collect", config, ws)
    last = last_trained(ws)
    inputs = training_inputs(ws, collected["manifest"], config)
    if last and last["fingerprint"] == training_fingerprint(ws, collected["manifest"], config, inputs):
        files = len(inputs["photos"])  # the kept ones
        message = (f"{NOTHING_NEW}: the {files} files collected, the review decisions and the settings are those "
                   f"{last['lora_latest']} was trained from")
        logger.info(message)
        publish(MarkdownArtifact(key=f"{slugify(config.name)}-nightly", description=NOTHING_NEW,
                                  markdown=f"# Nightly retrain: {NOTHING_NEW}\n\n{message}.\n"))
        return {"status": NOTHING_NEW, "message": message, **last}
    changes = ["no LoRA trained in this workspace yet"] if last is None else what_changed(
        last, inputs, _reviewed(ws))
    logger.info("changed since the last LoRA: %s. Running the pipeline", "; ".join(changes))
    publish(MarkdownArtifact(key=f"{slugify(config.name)}-nightly", description=f"retraining: {changes[0]}",
                              markdown="# Nightly retrain: retraining\n\nChanged since the last LoRA:\n\n"
                              + "".join(f"- {change}\n" for change in changes)))
    try:
        result = build_lora(config)  # in this run, not a subflow: it is the run that asks about captions
    except ReviewTimedOut as err:
        return failed_for(err)
    return {"status": "trained", "changes": changes, **result}


def _reviewed(ws: Workspace) -> list:
    """The latest review manifest's records (they name the images of review decisions), if any."""
    path = ws.latest_manifest("review")
    return read_manifest(path) if path.exists() else []
