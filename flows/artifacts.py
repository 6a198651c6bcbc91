"""What a run shows in the Prefect UI (its Artifacts tab, and the Artifacts page by key).

Every run publishes, on the run a person started (not on the `dataset`/`train` subflow inside it):
a dataset table (every photo, kept or rejected and why, duplicates, buckets), a caption table (image,
caption, review status), a markdown summary (steps, time, loss, file sizes, where the LoRA is), and the
loss curve and the sample grid as images embedded in markdown. Keys are `<name>-dataset`,
`<name>-captions`, `<name>-summary`, `<name>-loss-curve`, `<name>-samples` (and `<name>-rank-comparison`
from the rank comparison), so the Artifacts page
keeps each person's history. An artifact that cannot be written costs a warning, never the run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image
from prefect import get_run_logger
from prefect.artifacts import MarkdownArtifact, TableArtifact

from flows.summary import evidence_rows, work_done
from lorapipe.manifest import ImageRecord, read_manifest, rejection_counts
from lorapipe.plots import MAX_DATA_URL_CHARS, data_url, human_size, loss_chart
from lorapipe.workspace import slugify
from tasks.probe import decision_summary
from tasks.progress import format_seconds, root_flow_run_id


def publish(artifact) -> None:
    try:
        artifact.model_copy(update={"flow_run_id": root_flow_run_id()}).create()
    except Exception as err:  # the LoRA matters more than its report
        get_run_logger().warning("could not publish artifact %s: %s", artifact.key, err)


def dataset_rows(records: list[ImageRecord]) -> list[dict]:
    by_id = {r.id: r for r in records}
    return [{
        "file": r.file_name,
        "status": r.status,
        "bucket": r.bucket or "",
        "size": f"{r.width}x{r.height}" if r.width else "",
        "reason": r.reason or "",
        "duplicate_of": by_id[r.duplicate_of].file_name if r.duplicate_of in by_id else "",
        "crop": r.crop_method or "",
        "flags": ", ".join(r.flags),
        "id": r.id[:12],
    } for r in records]


def caption_rows(records: list[ImageRecord]) -> list[dict]:
    return [{
        "image": r.file_name,
        "caption": r.caption or "",
        "review": r.review or "",
        "why": "; ".join(r.review_reasons),
        "reviewed_by": r.reviewed_by or "",
        "path": r.image_path or "",
    } for r in records if r.kept]


def publish_dataset(name: str, manifest: str, stages: dict | None = None) -> None:
    records = read_manifest(manifest)
    kept = [r for r in records if r.kept]
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(rejection_counts(records).items())) or "none"
    buckets = ", ".join(f"{b} ×{n}" for b, n in sorted(Counter(r.bucket for r in kept if r.bucket).items()))
    slug = slugify(name)
    publish(TableArtifact(key=f"{slug}-dataset", table=dataset_rows(records), description=(
        f"**{len(records)} photos in, {len(kept)} kept**; rejected: {reasons}. Buckets: {buckets or 'none'}."
        + (f" Work done: {work_done(stages)}." if stages else ""))))
    review = Counter(r.review for r in kept)
    publish(TableArtifact(key=f"{slug}-captions", table=caption_rows(records), description=(
        f"**{len(kept)} captions**: {review.get('approved', 0)} approved, {review.get('pending', 0)} waiting for "
        f"a person, {review.get('rejected', 0)} dropped.")))


def summary_markdown(name: str, train: dict, export: dict, evaluate: dict, stages: dict,
                     probe: dict | None = None) -> str:
    preflight = train.get("preflight") or {}
    held_out = train.get("held_out_losses") or []
    rows = [
        ("LoRA (kohya: ComfyUI, A1111, Forge)", f"`{export['lora']}` ({human_size(export['size_bytes'])})"),
        ("LoRA (diffusers)", f"`{export['diffusers']}` ({human_size(Path(export['diffusers']).stat().st_size)})"),
        ("images trained on", str(train.get("images"))),
        ("optimizer steps", f"{train.get('steps')}" + (f" ({preflight['epochs']} epochs)" if "epochs" in preflight
                                                       else "")),
        ("training time", format_seconds(train.get("seconds") or 0)),
        ("final loss", f"{train['final_loss']:.4f}"),
        ("held-out loss by epoch", ", ".join(f"{v:.4f}" for v in held_out) or "not measured (small dataset)"),
        ("LoRA vs base (mean pixel change)", f"{evaluate['mean_abs_difference']:.2f} / 255"),
        *evidence_rows(evaluate, decision_summary(probe) if probe else None),
        ("sample grid", f"`{evaluate['samples']}`"),
        ("work done (per image: new, re-used from cache)", work_done(stages)),
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    return f"# {name}: LoRA ready\n\n| | |\n|---|---|\n{table}\n"


def publish_training(name: str, train: dict, export: dict, evaluate: dict, stages: dict,
                     probe: dict | None = None) -> None:
    slug = slugify(name)
    publish(MarkdownArtifact(key=f"{slug}-summary", markdown=summary_markdown(name, train, export, evaluate, stages,
                                                                              probe),
                              description=f"{name}: {train.get('steps')} steps, final loss {train['final_loss']:.4f}"))
    epochs = (train.get("preflight") or {}).get("epochs")
    chart = loss_chart(train.get("losses") or [], train.get("held_out_losses"), epochs)
    publish(MarkdownArtifact(key=f"{slug}-loss-curve", description="Training loss per optimizer step", markdown=(
        f"# Loss: {name}\n\n![loss curve]({data_url(chart)})\n\n{len(train.get('losses') or [])} optimizer steps, "
        f"final loss {train['final_loss']:.4f}.\n")))
    with Image.open(evaluate["samples"]) as grid:
        samples = data_url(grid, max_side=768, photo=True)  # a preview: the full grid is the file named below
    prompts = "\n".join(f"- {p}" for p in evaluate.get("prompts", []))
    publish(MarkdownArtifact(key=f"{slug}-samples", description="Top row: base model; bottom row: with the LoRA",
                              markdown=(f"# Samples: {name}\n\nTop row: the base model. Bottom row: the same seeds "
                                        f"with the LoRA (each row and column is labelled in the picture).\n\n"
                                        f"![sample grid]({samples})\n\nPrompts with the name:\n\n{prompts}\n\n"
                                        f"Full size: `{evaluate['samples']}`\n")))


def publish_rank_comparison(name: str, report: dict) -> None:
    """The rank comparison's report as `<name>-rank-comparison`: the file's markdown, its grid embedded."""
    markdown = Path(report["markdown"]).read_text(encoding="utf-8")
    with Image.open(report["grid"]) as grid:
        # Started by hand, not nightly: a larger preview than a run's (a grid of ranks must stay legible).
        url = data_url(grid, max_side=2048, photo=True, max_chars=4 * MAX_DATA_URL_CHARS)
    markdown = markdown.replace(f"]({Path(report['grid']).name})", f"]({url})")
    publish(MarkdownArtifact(key=f"{slugify(name)}-rank-comparison", markdown=markdown,
                             description=report["verdict"].replace("**", "")[:250]))
