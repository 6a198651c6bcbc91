"""The table a run ends with: what went in, what was kept and why not, what came out."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorapipe.manifest import read_manifest, rejection_counts
from lorapipe.plots import human_size


# What a stage's per-item counts ("computed", "reused" in its stats) count, in the words of the summary.
ITEMS = {"collect": "files", "validate": "checks", "dedup": "hashes", "crop": "crops", "caption": "captions",
         "caption-fan-out": "captions on the cluster"}


def item_counts(stages: dict) -> list[tuple[str, int, int]]:
    """(what, new, re-used) per kind of per-item work: a stage's own counts, or a stage's groups of them
    (train: latents, text embeddings). A stage re-used whole re-used every item it counted."""
    rows = []
    for stage, s in stages.items():
        stats = s.get("stats") or {}
        groups = ({ITEMS.get(stage, stage): stats} if "computed" in stats else
                  {k.replace("_", " "): v for k, v in stats.items() if isinstance(v, dict) and "computed" in v})
        for what, counts in groups.items():
            new, reused = counts["computed"], counts.get("reused", 0)
            if not new + reused:  # nothing of that kind this run (text embeddings when the encoders train)
                continue
            rows.append((what, 0, new + reused) if s.get("cached") else (what, new, reused))
    return rows


def work_done(stages: dict) -> str:
    """`captions 3 new, 10 re-used; latents 3 new, 10 re-used; ...; stages re-used whole 4 of 9`."""
    items = [f"{what} {new} new, {reused} re-used" for what, new, reused in item_counts(stages)]
    return "; ".join([*items, f"stages re-used whole {sum(s['cached'] for s in stages.values())} of {len(stages)}"])


def summary_rows(result: dict) -> list[tuple[str, str]]:
    records = read_manifest(result["manifest"])
    kept = [r for r in records if r.kept]
    reasons = rejection_counts(records)
    rejected = ", ".join(f"{kind} {n}" for kind, n in sorted(reasons.items())) or "none"
    approved = sum(1 for r in kept if r.review == "approved")
    pending = sum(1 for r in kept if r.review == "pending")
    lora = Path(result["lora"])
    stages = result["stages"]
    return [
        ("images in", str(len(records))),
        ("kept", str(len(kept))),
        ("rejected", f"{len(records) - len(kept)} ({rejected})"),
        ("captions", f"{sum(1 for r in kept if r.caption)} ({approved} approved, {pending} waiting for review)"),
        ("optimizer steps", str(result["steps"])),
        ("final loss", f"{result['final_loss']:.4f}"),
        ("LoRA file", f"{lora.name}: {human_size(result['lora_bytes'])}"),
        ("LoRA vs base (mean pixel change)", f"{result['mean_abs_difference']:.2f} / 255"),
        *evidence_rows(result.get("evaluate") or {}, result.get("text_encoders")),
        ("work done (per image: new, re-used from cache)", work_done(stages)),
    ]


def evidence_rows(evaluate: dict, text_encoders: dict | None) -> list[tuple[str, str]]:
    """The measured rows: text-encoder decision, identity (base model, with the LoRA), style pollution."""
    from tasks.evaluate import identity_line, pollution_line

    rows = []
    if text_encoders:
        verdict = "trained" if text_encoders["train_text_encoders"] else "frozen"
        rows.append(("text encoders", f"{verdict}: {text_encoders['reason']}"))
    if evaluate:
        against = f" (vs {evaluate.get('reference_photos', 0)} {evaluate.get('references', 'photos')})"
        rows += [("identity, base model" + against, identity_line(evaluate, "base")),
                 ("identity, with the LoRA" + against, identity_line(evaluate, "lora")),
                 ("style pollution", pollution_line(evaluate))]
    return rows


def print_summary(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"lorapipe: {result['name']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)

    records = read_manifest(result["manifest"])
    rejected = [r for r in records if not r.kept]
    if rejected:
        reasons = Table(title="rejected files", show_header=True)
        reasons.add_column("file")
        reasons.add_column("reason")
        for r in rejected:
            reasons.add_row(Path(r.source).name, r.reason)
        console.print(reasons)
    flagged = [r for r in records if r.kept and r.review == "pending"]
    if flagged:
        review = Table(title="captions waiting for review", show_header=True)
        review.add_column("file")
        review.add_column("caption")
        review.add_column("why")
        for r in flagged:
            review.add_row(Path(r.source).name, r.caption or "", "; ".join(r.review_reasons))
        console.print(review)
    console.print(f"samples (top: base model, bottom: with the LoRA): {result['samples']}")
    console.print(f"LoRA: [bold]{result['lora_latest']}[/bold]")


# A stage result's paths, in the order a person looks for them, with their labels.
STAGE_PATHS = [("lora", "LoRA"), ("diffusers", "LoRA (diffusers)"), ("samples", "samples"), ("manifest", "manifest"),
               ("run_dir", "training run")]


def stage_paths(result: dict) -> list[tuple[str, str]]:
    """(label, path) of what a stage wrote, printed below its table, one a line (whole, to copy)."""
    paths = []
    for key, label in STAGE_PATHS:
        value = result.get(key)
        if isinstance(value, list):  # the samples rendered during training: the folder
            value, label = str(Path(value[-1]).parent) if value else None, "samples during training"
        elif key == "samples":
            label = "samples (top: base model, bottom: with the LoRA)"
        if isinstance(value, str) and value:  # evaluate's "lora" is the LoRA's facts, not a path
            paths.append((label, value))
    return paths


def stage_rows(result: dict) -> list[tuple[str, str]]:
    """The rows of a stage command's table: its counts (per-image caches as new/reused) and numbers."""
    rows = []
    for key, value in (result.get("stats") or {}).items():
        rows.append((key.replace("_", " "), ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    for key, value in (result.get("cache") or {}).items():  # train: latents and text embeddings
        rows.append((key.replace("_", " "), f"{value.get('computed', 0)} new, {value.get('reused', 0)} reused"))
    if result.get("steps") is not None:
        rows.append(("optimizer steps", str(result["steps"])))
    if result.get("final_loss") is not None:
        rows.append(("final loss", f"{result['final_loss']:.4f}"))
    if result.get("mean_abs_difference") is not None:
        rows.append(("LoRA vs base (mean pixel change)", f"{result['mean_abs_difference']:.2f} / 255"))
    if result.get("size_bytes"):
        rows.append(("LoRA size", human_size(result["size_bytes"])))
    # train: the text-encoder decision; evaluate: identity and style pollution, as `lorapipe run` shows them
    # (only then: tasks.evaluate imports torch, seconds of a cached dedup command)
    evaluated = result if result.get("stage") == "evaluate" else {}
    if evaluated or result.get("text_encoders"):
        rows += evidence_rows(evaluated, result.get("text_encoders"))
    return rows
