"""A cached stage command, end to end: what a person running stage after stage waits for each time.

    make bench-cli
    .venv/bin/python benchmarks/cli_stage_benchmark.py --runs 5

Builds a workspace of the 14 demo photos (collect, validate), then times `lorapipe dedup WS` whose dedup
stage is cached (the same input: the task is `Cached`), as a separate process each time, the way a shell runs
it, in a Prefect home of its own:

- the reference: without PREFECT_API_URL, each command starts a temporary Prefect server and stops it;
- lorapipe's way to skip that: `lorapipe server start` once, then the same commands (they find it);
- the floor: the same process importing the CLI and the stage flow, running nothing.

Wall time is the median of --runs; CPU is the user+system time of the command and every process it started
(the temporary server included). Goal: a cached stage command under 5 s on 2 cores. The load average is
printed: on a shared machine, wall time grows with it; CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of it and its children) of one command, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def row(label: str, argv: list[str], env: dict, runs: int) -> tuple[str, float, float]:
    times = [timed(argv, env) for _ in range(runs)]
    return label, statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="Commands timed per row (median)")
    args = parser.parse_args()

    from lorapipe.demo_data import write_demo_photos

    root = Path(tempfile.mkdtemp(prefix="lorapipe-cli-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(root / "prefect-home"), OMP_NUM_THREADS="1")
    write_demo_photos(root / "photos")
    (root / "job.yaml").write_text(f"name: Jane Doe\nimages: {root / 'photos'}\n")
    ws = str(root / "ws")
    for stage in ("collect", "validate", "dedup"):  # dedup once, so the timed ones are cached
        argv = [LORAPIPE, stage, ws] + (["--config", str(root / "job.yaml")] if stage == "collect" else [])
        timed(argv, env)

    stage = [LORAPIPE, "dedup", ws]
    rows = [row("`lorapipe dedup WS`, cached, temporary server per command (no PREFECT_API_URL)", stage, env,
                args.runs)]
    timed([LORAPIPE, "server", "start", "--idle-minutes", "5"], env)
    try:
        rows.append(row("`lorapipe dedup WS`, cached, after `lorapipe server start`", stage, env, args.runs))
        floor = [sys.executable, "-c", "import flows.cli, flows.checks, flows.stages"]
        rows.append(row("floor: `python -c 'import flows.cli, flows.checks, flows.stages'` (no run)", floor, env,
                        args.runs))
    finally:
        timed([LORAPIPE, "server", "stop"], env)
        shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()
    print(f"\n{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); "
          f"median of {args.runs} runs\n")
    print("| what runs | wall | CPU (all processes) |\n|---|---|---|")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.1f} s | {cpu:.1f} s |")
    goal = rows[1][1] < 5
    print(f"\ngoal (cached stage command under 5 s): {'met' if goal else 'not met'} at {rows[1][1]:.1f} s")


if __name__ == "__main__":
    main()
