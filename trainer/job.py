"""A training job as a JSON file, so the trainer runs in its own process (timed out, killed, retried,
resumed, or launched on several GPUs with `accelerate launch`) with nothing but this file.

People edit it by hand (README: run a job by hand): a setting that changes the weights makes it another
run, which its run folder refuses (trainer/identity.py); a malformed file is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from lorapipe.config import TrainConfig
from lorapipe.errors import UserError
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

    def write(self) -> Path:
        return atomic_write_json(self.run_dir / JOB_FILE, {
            "examples": [e.to_json() for e in self.examples],
            "config": self.config.model_dump(mode="json"),
            "run_dir": str(self.run_dir),
            "cache_dir": str(self.cache_dir),
            "name": self.name,
        })

    @classmethod
    def read(cls, path: str | Path) -> "Job":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(
                examples=[Example.from_json(e) for e in data["examples"]],
                config=TrainConfig.model_validate(data["config"]),
                run_dir=Path(data["run_dir"]),
                cache_dir=Path(data["cache_dir"]),
                name=data["name"],
            )
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: config.{where}: {first['msg']}") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a training job ({type(err).__name__}: {err})") from None
