"""The offline demo: tiny models built locally, drawn photos, settings sized for a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

from lorapipe.config import PipelineConfig
from lorapipe.demo_data import write_demo_photos
from lorapipe.tiny_models import TinyModels, ensure_tiny_models

DEMO_NAME = "Jane Doe"


def demo_config(photos: Path, workspace: Path, models: TinyModels) -> PipelineConfig:
    """The recipe's shape at toy scale: same stages and code paths, 256 px instead of 1024, a few steps."""
    return PipelineConfig.model_validate(
        {
            "name": DEMO_NAME,
            "images": str(photos),
            "workspace": str(workspace),
            "dataset": {"crop": {"resolution": 256, "bucket_step": 32}},
            "caption": {"model": str(models.llava), "batch_size": 4, "max_new_tokens": 24, "device": "cpu"},
            # Unattended: flagged captions are listed in the summary and left out, nobody is waited for.
            "review": {"approval": "auto"},
            "train": {
                "base_model": str(models.sdxl),
                "effective_batch_size": 4,
                "micro_batch_size": 2,
                "epochs": 4,
                "learning_rate": 3e-3,
                "sample_steps": 8,
                "device": "cpu",
            },
            "evaluate": {"steps": 8, "prompts": ["a photo of {name} smiling outdoors"],
                         "style_prompts": ["a photo of a person in a park"]},
            "probe": {"steps": 8, "seeds": 2},
        }
    )


def write_job_file(config: PipelineConfig, path: str | Path) -> Path:
    """The demo's settings as a job file: only what differs from the defaults, in the shape of the flow's form."""
    import yaml

    from lorapipe.fsutil import atomic_write_text

    settings = config.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    return atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False))


def prepare_demo(out: str | Path, models_root: str | Path | None = None) -> PipelineConfig:
    out = Path(out).resolve()
    models = ensure_tiny_models(models_root)
    write_demo_photos(out / "photos")
    return demo_config(out / "photos", out / "workspace", models)
