"""The nightly retrain: re-collect, and train again only when something changed.

Collecting is cheap (a folder listing, cached downloads); everything after it is skipped when the
kept photos, the review decisions and the settings are those the last LoRA was trained from
(lorapipe/retrain.py): the run then ends in seconds with "nothing new" and no GPU stage at all. Otherwise
it runs the pipeline, where content caching limits the work to the new or changed photos, and where
captions that need a person suspend the run (holding no worker or GPU) until someone answers.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import MarkdownArtifact

from flows.artifacts import publish
from flows.checks import check_before_stages
from flows.pipeline import pipeline
from flows.stages import run_stage
from lorapipe.config import PipelineConfig
from lorapipe.manifest import read_manifest
from lorapipe.retrain import last_trained, training_fingerprint
from lorapipe.workspace import slugify

NOTHING_NEW = "nothing new"


@flow(name="nightly")
def nightly(config: PipelineConfig) -> dict:
    """Re-collect the photos; retrain only if photos, review decisions or settings changed."""
    logger = get_run_logger()
    ws = check_before_stages(config, ["collect"])  # the models are checked when it decides to train
    collected, _ = run_stage("collect", config, ws)
    last = last_trained(ws)
    if last and last["fingerprint"] == training_fingerprint(ws, collected["manifest"], config):
        files = sum(r.kept for r in read_manifest(collected["manifest"]))
        message = (f"{NOTHING_NEW}: the {files} files collected, the review decisions and the settings are those "
                   f"{last['lora_latest']} was trained from")
        logger.info(message)
        publish(MarkdownArtifact(key=f"{slugify(config.name)}-nightly", description=NOTHING_NEW,
                                  markdown=f"# Nightly retrain: {NOTHING_NEW}\n\n{message}.\n"))
        return {"status": NOTHING_NEW, "message": message, **last}
    logger.info("new or changed photos, decisions or settings since the last LoRA: running the pipeline")
    result = pipeline(config)
    return {"status": "trained", **result}
