"""The rank comparison's own stages: resizing a LoRA by SVD, and the report (table, verdict, labelled grid).

The report is a markdown file (and its JSON and grid) in WORKSPACE/reports, the same text as the Prefect
artifact. Rows: each LoRA compared (trained at a rank, resized, or brought from outside) with its file size,
training time, identity distance (mean ± spread over the samples with the name, and how many had no
face), and style pollution (1 − SSIM and mean pixel change over the prompts without the name). The
verdict names the smallest rank whose mean identity distance is within `tolerance` of the best one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from lorapipe.fsutil import atomic_copy, atomic_path, atomic_write_json, atomic_write_text, sha256_file
from lorapipe.identity import SAME_PERSON
from lorapipe.plots import human_size
from lorapipe.workspace import Workspace
from tasks.evaluate import identity_line, load_images
from tasks.stage import code_version, stage_key, stage_task
from trainer.resize import resize_lora
from trainer.sampling import grid

log = logging.getLogger("lorapipe.rank_comparison")

CELL = 256  # px per sample in the comparison grid: 8 columns of 1024² renders would make a 50 MP sheet


@dataclass
class ComparisonRow:
    label: str  # "rank 8", "rank 8 + text encoders", "rank 128 → 8 (SVD)", "other: file.safetensors"
    kind: str  # trained | resized | other
    rank: int | None
    file: str
    size_bytes: int
    train_seconds: float | None  # None: not trained here
    text_encoders: bool | None
    evaluate: dict  # the evaluate stage's result

    @property
    def identity(self) -> dict:
        return (self.evaluate.get("identity") or {}).get("lora") or {}

    @property
    def pollution(self) -> dict:
        return self.evaluate.get("pollution") or {}


def resize_key(source: str, rank: int, dest_dir: str) -> str:
    return stage_key("resize", RESIZE_CODE, sha256_file(source), rank, dest_dir)


def run_resize(source: str, rank: int, dest_dir: str) -> dict:
    key = resize_key(source, rank, dest_dir)
    dest = Path(dest_dir) / f"{Path(source).stem}-rank{rank}.safetensors"
    report = resize_lora(source, dest, rank)
    log.info("%s resized to rank %d: %.1f%% of the energy kept", Path(source).name, rank, 100 * report.energy_kept)
    return {"stage": "resize", "key": key, "lora": str(dest), "from_rank": report.from_rank,
            "to_rank": report.to_rank, "energy_kept": report.energy_kept, "outputs": [str(dest)]}


RESIZE_CODE = code_version(__name__, "trainer.resize")
resize_task = stage_task(run_resize, resize_key, name="resize")


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def verdict(rows: list[ComparisonRow], tolerance: float) -> tuple[ComparisonRow | None, str]:
    """The smallest rank whose mean identity distance is within `tolerance` of the best, and the sentence."""
    measured = [r for r in rows if r.identity.get("mean") is not None and r.rank is not None]
    if not measured:
        why = identity_line(rows[0].evaluate) if rows else "nothing was compared"
        return None, (f"No verdict: identity was not measured for any LoRA ({why}). On a model that draws faces "
                      f"(real SDXL) this names the smallest rank within {tolerance} of the best.")
    best = min(measured, key=lambda r: r.identity["mean"])
    good = [r for r in measured if r.identity["mean"] <= best.identity["mean"] + tolerance]
    chosen = min(good, key=lambda r: (r.rank, r.size_bytes))
    return chosen, (f"**{chosen.label}** ({human_size(chosen.size_bytes)}) is the smallest rank whose mean identity "
                    f"distance ({chosen.identity['mean']:.3f}) is within {tolerance} of the best "
                    f"({best.identity['mean']:.3f}, {best.label}).")


def table_rows(rows: list[ComparisonRow], base: dict) -> list[dict]:
    out = [{"LoRA": "base model (no LoRA)", "rank": "—", "file size": "—", "training time": "—",
            "identity mean": _number(base.get("mean"), ".3f"), "identity spread": _number(base.get("spread"), ".3f"),
            "no face": f"{base.get('no_face_share', 0):.0%}", "1 − SSIM": "0", "pixel change": "0"}]
    for r in rows:
        out.append({
            "LoRA": r.label, "rank": str(r.rank) if r.rank is not None else "?", "file size": human_size(r.size_bytes),
            "training time": f"{r.train_seconds:.0f} s" if r.train_seconds is not None else "—",
            "identity mean": _number(r.identity.get("mean"), ".3f"),
            "identity spread": _number(r.identity.get("spread"), ".3f"),
            "no face": f"{r.identity.get('no_face_share', 0):.0%}" if r.identity else "—",
            "1 − SSIM": _number(r.pollution.get("style_change"), ".3g"),
            "pixel change": _number(r.pollution.get("pixel_change"), ".2f"),
        })
    return out


def comparison_grid(rows: list[ComparisonRow]) -> Image.Image:
    """Base model on top, then one row per LoRA; the same prompts and seeds across, every cell labelled."""
    first = rows[0].evaluate
    columns = first["columns"]

    def shrink(paths):
        return [img.resize((CELL, CELL * img.height // img.width)) for img in load_images([Path(p) for p in paths])]

    sheet = [shrink(first["renders"]["base"])] + [shrink(r.evaluate["renders"]["lora"]) for r in rows]
    # Pillow's built-in font has no arrow glyph: "->" in the picture, "→" in the text.
    labels = ["base model"] + [f"{r.label} · {human_size(r.size_bytes)}".replace("→", "->") for r in rows]
    return grid(sheet, labels, columns, "rank comparison: the same prompts and seeds; columns with the name first, "
                "then without it")


def report_markdown(name: str, rows: list[ComparisonRow], tolerance: float, grid_url: str, files: dict) -> str:
    """The report; `grid_url` is where the grid is shown from (its file name beside the report, or a data URL
    in the Prefect artifact)."""
    base = rows[0].evaluate["identity"]["base"] if rows else {}
    table = table_rows(rows, base)
    header = "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n"
    body = "".join("| " + " | ".join(row.values()) + " |\n" for row in table)
    _, sentence = verdict(rows, tolerance)
    first = rows[0].evaluate if rows else {}
    lines = {r.label: identity_line(r.evaluate) for r in rows}
    notes = [
        f"Identity: mean (± spread, the standard deviation) over the samples with the name of each sample's "
        f"face distance to {first.get('reference_photos', 0)} {first.get('references', 'photos')} of {name} "
        f"(dlib ResNet descriptor; lower is closer, below {SAME_PERSON} reads as the same person). "
        f"\"no face\": share of those samples where no usable face was found.",
        "Style pollution: over the prompts without the name, 1 − SSIM between the base model's image and the "
        "LoRA's with the same seed (0 = unchanged), and the mean pixel change (0-255).",
        "Identity, in words: " + ("; ".join(f"{label}: {line}" for label, line in lines.items())
                                  if len(set(lines.values())) > 1 else f"every row: {next(iter(lines.values()), '—')}"),
    ]
    return (f"# Rank comparison: {name}\n\n{sentence}\n\n{header}{body}\n"
            + "".join(f"- {n}\n" for n in notes)
            + f"\n![rank comparison grid]({grid_url})\n\nFiles: report `{files['markdown']}`, grid `{files['grid']}`, "
              f"numbers `{files['json']}`.\n")


def report_key(workspace: str, name: str, rows: list[dict], tolerance: float) -> str:
    return stage_key("rank-report", REPORT_CODE, workspace, name, rows, tolerance)


def run_report(workspace: str, name: str, rows: list[dict], tolerance: float) -> dict:
    """Write WORKSPACE/reports/rank-comparison-<key>.{md,json,png} and rank-comparison.md (the latest)."""
    ws = Workspace.at(workspace)
    key = report_key(workspace, name, rows, tolerance)
    compared = [ComparisonRow(**r) for r in rows]
    folder = ws.root / "reports"
    stem = folder / f"rank-comparison-{key[:8]}"
    files = {"markdown": str(stem.with_suffix(".md")), "grid": str(stem.with_suffix(".png")),
             "json": str(stem.with_suffix(".json"))}
    sheet = comparison_grid(compared)
    with atomic_path(files["grid"], suffix=".png") as tmp:
        sheet.save(tmp)
    chosen, sentence = verdict(compared, tolerance)
    atomic_write_json(files["json"], {"name": name, "tolerance": tolerance, "verdict": sentence,
                                      "smallest_good_rank": chosen.rank if chosen else None,
                                      "rows": [{**asdict(r), "identity": r.identity, "pollution": r.pollution}
                                               for r in compared]})
    markdown = report_markdown(name, compared, tolerance, Path(files["grid"]).name, files)
    atomic_write_text(files["markdown"], markdown)
    atomic_copy(files["markdown"], folder / "rank-comparison.md")
    log.info("rank comparison: %s (report %s)", sentence, files["markdown"])
    return {"stage": "rank-report", "key": key, "verdict": sentence, "smallest_good_rank": chosen.rank if chosen else
            None, "table": table_rows(compared, compared[0].evaluate["identity"]["base"]), **files, "outputs": list(files.values())}


REPORT_CODE = code_version(__name__, "tasks.evaluate", "lorapipe.plots")
report_task = stage_task(run_report, report_key, name="rank-report")


def row_json(row: ComparisonRow) -> dict:
    return json.loads(json.dumps(asdict(row), default=str))
