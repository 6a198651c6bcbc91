"""The rank comparison: the same reviewed dataset trained at several ranks, every LoRA measured the same way.

`lorapipe compare-ranks WS` and the `rank-comparison` deployment run this flow. Each training is the train
stage as the pipeline runs it (cached by content: a rank trained before is not trained again; the latent
cache is shared by all), exported beside the others without replacing `<name>.safetensors`, and
evaluated with the same prompts and seeds (the base model's renders are made once). LoRA files from
elsewhere, and SVD-resized ones, join the same table. The report is a Prefect artifact
(`<name>-rank-comparison`) and WORKSPACE/reports/rank-comparison.md.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.artifacts import publish_rank_comparison
from flows.checks import TRAIN_STAGES, check_before_stages
from flows.stages import reviewed_manifest, run_stage
from lorapipe.config import PipelineConfig, RankComparisonConfig
from lorapipe.errors import UserError
from tasks.probe import decided, decision_summary
from tasks.rank_comparison import ComparisonRow, report_task, resize_task, row_json
from tasks.stage import call_stage


def _variant(config: PipelineConfig, rank: int, text_encoders: bool) -> PipelineConfig:
    train = config.train.model_copy(update={"rank": rank, "train_text_encoders": text_encoders})
    return config.model_copy(update={"train": train})


@flow(name="rank-comparison")
def rank_comparison(config: PipelineConfig, comparison: RankComparisonConfig | None = None,
                    manifest: str | None = None) -> dict:
    """Train the reviewed dataset at several ranks, measure each LoRA (identity, style pollution, size, time)
    and report the smallest rank within tolerance of the best.

    Args:
        config: The pipeline's settings (the workspace, the recipe, the evaluation prompts)
        comparison: Ranks to train, other LoRA files to include, resized variants, the tolerance
        manifest: A reviewed manifest; empty: the workspace's captions reviewed again (captions edited in
            WORKSPACE/images/*.txt since the last review count)
    """
    comparison = comparison or RankComparisonConfig()
    logger = get_run_logger()
    ws = check_before_stages(config, TRAIN_STAGES, manifest)  # policy, models: one line before any training
    if manifest is None:  # the review stage again, as for `lorapipe train`: edited caption files count
        manifest = reviewed_manifest(config, ws)
    missing = [f for f in comparison.loras if not Path(f).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such LoRA file (comparison.loras)")
    probe, _ = run_stage("probe", config, ws, manifest)
    config = decided(config, probe)
    decided_te = config.train.train_text_encoders
    choices = [decided_te] if comparison.text_encoders == "decided" else [False, True]
    rows: list[ComparisonRow] = []
    for rank in sorted(set(comparison.ranks)):
        for te in choices:
            variant = _variant(config, rank, te)
            train, cached = run_stage("train", variant, ws, manifest)
            train["text_encoders"] = decision_summary(probe) if te == decided_te else {
                "train_text_encoders": te, "reason": "rank comparison variant", "measured": False}
            export, _ = run_stage("export", variant, ws, manifest, train=train, update_latest=False)
            evaluate, _ = run_stage("evaluate", variant, ws, manifest, lora_file=export["lora"])
            label = f"rank {rank}" + (" + text encoders" if te and len(choices) > 1 else "")
            logger.info("%s: %s (%s)", label, "cached" if cached else f"trained in {train['seconds']:.0f} s",
                        export["lora"])
            rows.append(ComparisonRow(label, "trained", rank, export["lora"], export["size_bytes"], train["seconds"],
                                      te, evaluate))
    largest = max((r for r in rows if r.kind == "trained"), key=lambda r: r.rank)
    extra = [(f, "other") for f in comparison.loras]
    for rank in comparison.resize_to:
        resized, _ = call_stage(resize_task, ws, source=largest.file, rank=rank, dest_dir=str(ws.loras))
        extra.append((resized["lora"], f"resized from {largest.rank}"))
    for lora_file, kind in extra:
        evaluate, _ = run_stage("evaluate", config, ws, manifest, lora_file=lora_file)
        rank = evaluate["lora"].get("rank")
        label = f"rank {largest.rank} → {rank} (SVD)" if kind.startswith("resized") else f"other: {Path(lora_file).name}"
        rows.append(ComparisonRow(label, "resized" if kind.startswith("resized") else "other", rank, lora_file,
                                  Path(lora_file).stat().st_size, None, None, evaluate))
    report, _ = call_stage(report_task, ws, workspace=str(ws.root), name=config.name,
                           rows=[row_json(r) for r in rows], tolerance=comparison.tolerance)
    publish_rank_comparison(config.name, report)
    return report
