"""Run a training job: `python -m trainer RUN_DIR/job.json`.

On several GPUs: `accelerate launch --num_processes 2 -m trainer RUN_DIR/job.json`. Rerunning the same
job resumes from its newest complete checkpoint. A job the run folder cannot take (settings that change
the weights edited since the run started, a bad file, a refused model) exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lorapipe.errors import UserError
from lorapipe.lifeline import die_with_parent
from lorapipe.logs import quiet_libraries
from trainer.job import Job
from trainer.loop import train_lora

USER_ERROR_EXIT = 2
PLAIN_LOG_ENV = "LORAPIPE_TRAINER_PLAIN_LOG"  # set by tasks/train.py, which adds the time and name itself


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("job", help="job.json written by lorapipe's train stage")
    args = parser.parse_args(argv)
    die_with_parent()  # a killed `lorapipe train` (or accelerate launcher) takes its trainer with it
    # Run by lorapipe's train stage, each line is logged again there, with its own time and name: plain here.
    plain = os.environ.get(PLAIN_LOG_ENV) == "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s" if plain else "%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_libraries()
    try:
        job = Job.read(args.job)
        train_lora(job.examples, job.config, job.run_dir, job.cache_dir, name=job.name)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
