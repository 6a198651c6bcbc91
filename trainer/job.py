"""A training job as a JSON file, so the trainer runs in its own process (timed out, killed, retried,
resumed, or launched on several GPUs with `accelerate launch`) with nothing but this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorapipe.config import TrainConfig
from lorapipe.fsutil import atomic_write_json
from trainer.data import Example

JOB_FILE = "job.json"


@dataclass
class Job:
    examples: list[Example]
    config: TrainConfig
    run_dir: Path
    cache_dir: Path
    name: str
    job_key: str

    def write(self) -> Path:
        return atomic_write_json(self.run_dir / JOB_FILE, {
            "examples": [e.to_json() for e in self.examples],
            "config": self.config.model_dump(mode="json"),
            "run_dir": str(self.run_dir),
            "cache_dir": str(self.cache_dir),
            "name": self.name,
            "job_key": self.job_key,
        })

    @classmethod
    def read(cls, path: str | Path) -> "Job":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            examples=[Example.from_json(e) for e in data["examples"]],
            config=TrainConfig.model_validate(data["config"]),
            run_dir=Path(data["run_dir"]),
            cache_dir=Path(data["cache_dir"]),
            name=data["name"],
            job_key=data["job_key"],
        )
