"""Probe: does the base model know this person? Decides `train.train_text_encoders: auto` before training.

The recipe: text encoders stay frozen for people the base model knows (their name already means their
face), and train, both of SDXL's, for people it doesn't, or the look is lost on fine-tuned checkpoints.
The probe renders the name alone ("a photo of {name}") with the base model and measures the faces
against the person's photos (lorapipe/identity.py):

- a face in at least `min_face_share` of the renders, and their mean distance below `known_distance`
  (dlib's same-person 0.6): known → UNet only;
- otherwise (other faces, or none at all): unknown → LoRA on both text encoders;
- nothing to measure with (dlib not installed, no face in the photos): the text encoders train, the
  choice that cannot lose a person the base model does not know, and the reason says so.

An explicit `train_text_encoders: true/false` skips the renders. The decision and its numbers are written
to WORKSPACE/manifests/probe.json (and a copy named by the probe's key), shown in the summary, and carried
into the LoRA's metadata by the export.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorapipe.config import PipelineConfig, ProbeConfig, TrainConfig
from lorapipe.fsutil import atomic_copy, atomic_path, atomic_write_json, read_json, sha256_file
from lorapipe.identity import IdentityStats
from lorapipe.workspace import Workspace
from tasks.evaluate import Renderer, load_images, measure_identity, reference_photos, samples_of
from tasks.stage import code_version, stage_key, stage_task
from trainer.sampling import grid

log = logging.getLogger("lorapipe.probe")

CODE = code_version(__name__, "tasks.evaluate", "lorapipe.identity")
REFERENCE_LIMIT = 32


@dataclass
class ProbeDecision:
    train_text_encoders: bool
    reason: str
    measured: bool  # False: set in the settings, or nothing to measure with
    prompt: str | None = None
    identity: dict = field(default_factory=dict)  # IdentityStats.to_json() of the renders
    samples: str | None = None  # the renders as one labelled grid

    def to_json(self) -> dict:
        return asdict(self)


def decide(stats: IdentityStats, prompt: str, probe: ProbeConfig) -> tuple[bool, str]:
    """(train the text encoders?, why) from the renders' identity numbers."""
    faces = len(stats.distances)
    if stats.note:
        return True, (f"could not measure ({stats.describe().removeprefix('not measured: ')}): training the text "
                      "encoders, which cannot lose a person the base model does not know")
    if stats.samples == 0 or faces / stats.samples < probe.min_face_share:
        return True, (f"the base model drew no usable face in {stats.samples - faces} of {stats.samples} renders of "
                      f"'{prompt}': it does not know this person, so the text encoders train")
    if stats.mean <= probe.known_distance:
        return False, (f"renders of '{prompt}' are {stats.mean:.3f} from the photos (< {probe.known_distance}): the "
                       "base model knows this person, so only the UNet trains")
    return True, (f"renders of '{prompt}' show faces {stats.mean:.3f} from the photos (>= {probe.known_distance}): "
                  "someone else, so the text encoders train")


def probe_key(manifest: str, workspace: str, train: TrainConfig, probe: ProbeConfig, name: str,
              resolution: int) -> str:
    model = train.model_dump(mode="json", include={"base_model", "base_model_config", "revision", "vae", "device",
                                                   "train_text_encoders", "holdout_images", "holdout_min_images",
                                                   "min_bucket_images", "seed"})
    return stage_key("probe", CODE, sha256_file(manifest), workspace, model, probe, name, resolution)


def decision_path(ws: Workspace, key: str) -> Path:
    return ws.manifests / f"probe.{key[:16]}.json"


def run_probe(manifest: str, workspace: str, train: TrainConfig, probe: ProbeConfig, name: str,
              resolution: int) -> dict:
    ws = Workspace.at(workspace)
    key = probe_key(manifest, workspace, train, probe, name, resolution)
    if train.train_text_encoders != "auto":
        decision = ProbeDecision(bool(train.train_text_encoders), "set in the settings (train.train_text_encoders: "
                                 f"{str(train.train_text_encoders).lower()})", measured=False)
    else:
        prompt = probe.prompt.replace("{name}", name)
        samples = samples_of([probe.prompt], name, probe.seed, probe.seeds)
        renderer = Renderer(ws, train, probe.steps, probe.guidance_scale, (resolution, resolution))
        images = load_images(renderer.images(samples))
        # The person's photos, all of them: does the base model's "{name}" look like them?
        photos, _ = reference_photos(ws, manifest, train.model_copy(update={"holdout_images": 0}), REFERENCE_LIMIT)
        stats = measure_identity(ws, photos, {"renders": images})["renders"]
        use_te, reason = decide(stats, prompt, probe)
        sheet = ws.runs / f"probe-{key[:8]}.png"
        with atomic_path(sheet, suffix=".png") as tmp:
            grid([images], ["base model"], [s.label for s in samples], f"probe: does the base model know {name}? "
                 f"{stats.describe()}").save(tmp)
        decision = ProbeDecision(use_te, reason, measured=stats.note is None, prompt=prompt,
                                 identity=stats.to_json(), samples=str(sheet))
    log.info("text encoders %s: %s", "train" if decision.train_text_encoders else "frozen", decision.reason)
    out = atomic_write_json(decision_path(ws, key), decision.to_json())
    atomic_copy(out, ws.manifests / "probe.json")
    return {"stage": "probe", "key": key, **decision.to_json(), "decision": str(out),
            "outputs": [str(out)] + ([decision.samples] if decision.samples else [])}


def decided(config: PipelineConfig, probe: dict) -> PipelineConfig:
    """The settings training runs with: train_text_encoders as the probe decided."""
    train = config.train.model_copy(update={"train_text_encoders": probe["train_text_encoders"]})
    return config.model_copy(update={"train": train})


def recorded_decision(ws: Workspace, manifest: str, config: PipelineConfig) -> dict | None:
    """The probe's stored decision for this manifest and these settings, if it ran (for `lorapipe export`)."""
    key = probe_key(manifest, str(ws.root), config.train, config.probe, config.name, config.dataset.crop.resolution)
    path = decision_path(ws, key)
    return {"key": key, **read_json(path)} if path.exists() else None


def decision_summary(probe: dict) -> dict:
    """What goes into the LoRA's metadata: the decision, why, and the numbers."""
    identity = probe.get("identity") or {}
    return {"train_text_encoders": probe["train_text_encoders"], "reason": probe["reason"],
            "measured": probe["measured"], "prompt": probe.get("prompt"),
            "mean_distance": identity.get("mean"), "no_face_share": identity.get("no_face_share"),
            "samples": identity.get("samples")}


probe_task = stage_task(run_probe, probe_key, name="probe", tags=["gpu"])
