"""The work-pool way, with README's own commands: a `process` pool, the `gpu` concurrency limit, `prefect
deploy` of deployments/prefect.yaml, and README's worker command started on two "GPU machines". Two
pipelines started together run one per machine (never both on one), and their GPU stages take turns under
the `gpu` limit; a quick run from the form needs nothing typed in.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path

import pytest

from deployments.serve import DEPLOYMENTS, deployment_name
from flows.demo import demo_config
from served import api, log_lines, task_runs_under, trigger, wait_final, wait_for_deployment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
POOL = "lorapipe-gpu"


def readme_commands() -> list[list[str]]:
    """The `prefect ...` commands of README's work-pool section, as written (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Work pools"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("prefect ")]


def prefect(server, *args: str) -> str:
    """The prefect CLI against the test server, from the repository root (as README says to run it)."""
    command = [str(Path(sys.executable).with_name("prefect")), *args]
    done = subprocess.run(command, env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


@pytest.fixture(scope="module")
def workers(prefect_server, tmp_path_factory):
    """README's commands: the pool, the limit, the deployments; its worker command on two machines."""
    commands = readme_commands()
    start = [c for c in commands if c[1:3] == ["worker", "start"]]
    assert len(start) == 1, commands
    for command in commands:
        if command not in start:
            prefect(prefect_server, *command[1:], *(["--overwrite"] if command[1:3] == ["work-pool", "create"]
                                                    else []))
    logs, processes = [], []
    for machine in ("gpu-box-1", "gpu-box-2"):
        logs.append(tmp_path_factory.mktemp(machine) / "worker.log")
        processes.append(subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), *start[0][1:], "--name", machine],
            env=prefect_server.env, cwd=ROOT, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    yield logs
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_prefect_yaml_deploys_the_deployments_to_the_gpu_pool_with_a_quick_run_ready(prefect_server, workers):
    from prefect.states import Scheduled

    with api(prefect_server) as client:
        deployments = {f: wait_for_deployment(client, deployment_name(f, pool=True)) for f in DEPLOYMENTS}
        assert {d.work_pool_name for d in deployments.values()} == {POOL}
        assert all(d.tags == ["lorapipe"] for d in deployments.values())
        [nightly] = deployments["nightly"].schedules
        assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.active) == ("0 3 * * *", "UTC", False)
        # The Run button with nothing typed: every deployment has a config to start from (the form's defaults).
        later = Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=1))  # no worker takes it
        for deployment in deployments.values():
            assert deployment.parameters["config"]["name"] == "Jane Doe"
            run = client.create_flow_run_from_deployment(deployment.id, state=later)
            client.delete_flow_run(run.id)


def test_two_pipelines_run_one_per_machine_and_take_turns_on_the_gpu(prefect_server, workers, tiny_models,
                                                                     demo_photos_master, tmp_path):
    runs = []
    with api(prefect_server) as client:
        deployment = wait_for_deployment(client, deployment_name("pipeline", pool=True))
        for person in ("a", "b"):  # two people's photos, started together
            shutil.copytree(demo_photos_master[0], tmp_path / person / "photos")
            config = demo_config(tmp_path / person / "photos", tmp_path / person / "workspace", tiny_models)
            config.train.epochs = 1  # what is measured is who runs what when, not the LoRA: fewest renders too
            config.evaluate.steps = config.probe.steps = 2
            config.evaluate.seeds = config.probe.seeds = 1
            runs.append(trigger(client, deployment, {"config": config.model_dump(mode="json", by_alias=True)}))
        finished = [wait_final(client, run_id, timeout=480) for run_id in runs]
        logs = [log.read_text() for log in workers]
        assert all(r.state.is_completed() for r in finished), ([r.state for r in finished], logs)
        gpu = {run_id: [t for t in task_runs_under(client, run_id) if "gpu" in t.tags] for run_id in runs}
        # The worker's runs log lorapipe's numbers too (its flow-run process imports prefect before lorapipe).
        deadline = time.monotonic() + 30  # the last lines arrive as the run's process exits
        while not any("lorapipe.export | LoRA written to" in line for line in log_lines(client, runs[0])["train"]):
            assert time.monotonic() < deadline, log_lines(client, runs[0])
            time.sleep(1)
    # One run per GPU machine: each worker took one of the two runs (without --limit 1, one took both). Two
    # workers may both try to submit a run; the server lets one have it and the other logs "Aborted submission".
    took = [[str(run_id) for run_id in runs if f"submitting flow run '{run_id}'" in log
             and f"Aborted submission of flow run '{run_id}'" not in log] for log in logs]
    assert sorted(len(t) for t in took) == [1, 1], took
    for run_id, tasks in gpu.items():  # both did real GPU work: caption, probe, train, evaluate, none cached
        assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == ["caption", "evaluate", "probe", "train"]
        assert all(t.state.name == "Completed" for t in tasks)
    spans = [(t.start_time, t.end_time, t.name) for tasks in gpu.values() for t in tasks]
    for (start_a, end_a, a), (start_b, end_b, b) in combinations(spans, 2):  # README's limit: one GPU slot
        assert end_a <= start_b or end_b <= start_a, f"{a} and {b} used the GPU at the same time"
    # ...and the runs did overlap in time: the limit, not chance, kept their GPU stages apart.
    assert finished[0].start_time < finished[1].end_time and finished[1].start_time < finished[0].end_time
