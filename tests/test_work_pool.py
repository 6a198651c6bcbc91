"""The work-pool way, as README says: a `process` pool, the `gpu` concurrency limit, `prefect deploy` of
deployments/prefect.yaml, a real `prefect worker start`; two pipelines started together share the GPU
one stage at a time instead of both loading models at once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from flows.demo import demo_config
from served import api, task_runs_under, trigger, wait_final, wait_for_deployment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
POOL = "lorapipe-gpu"


def prefect(server, *args: str) -> str:
    """The prefect CLI against the test server, from the repository root (as README says to run it)."""
    command = [str(Path(sys.executable).with_name("prefect")), *args]
    done = subprocess.run(command, env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


@pytest.fixture(scope="module")
def worker(prefect_server, tmp_path_factory):
    prefect(prefect_server, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect(prefect_server, "concurrency-limit", "create", "gpu", "1")
    prefect(prefect_server, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL, "--limit", "2"],
        env=prefect_server.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    yield process, Path(log.name)
    process.terminate()
    process.wait(timeout=30)


def test_prefect_yaml_deploys_the_five_deployments_to_the_gpu_pool(prefect_server, worker):
    with api(prefect_server) as client:
        deployments = {f: wait_for_deployment(client, f"{f}/gpu-pool") for f in ("pipeline", "dataset", "train",
                                                                                  "nightly", "rank-comparison")}
    assert {d.work_pool_name for d in deployments.values()} == {POOL}
    assert all(d.tags == ["lorapipe"] for d in deployments.values())
    [nightly] = deployments["nightly"].schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.active) == ("0 3 * * *", "UTC", False)
    assert deployments["nightly"].parameters["config"]["name"] == "Jane Doe"


def test_two_pipelines_on_the_worker_take_turns_on_the_gpu(prefect_server, worker, tiny_models,
                                                          demo_photos_master, tmp_path):
    process, log = worker
    runs = []
    with api(prefect_server) as client:
        deployment = wait_for_deployment(client, "pipeline/gpu-pool")
        for person in ("a", "b"):  # two people's photos, started together
            shutil.copytree(demo_photos_master[0], tmp_path / person / "photos")
            config = demo_config(tmp_path / person / "photos", tmp_path / person / "workspace", tiny_models)
            config.train.epochs = 1  # what is measured is who holds the GPU when, not the LoRA
            runs.append(trigger(client, deployment, {"config": config.model_dump(mode="json", by_alias=True)}))
        finished = [wait_final(client, run_id, timeout=480) for run_id in runs]
        assert all(r.state.is_completed() for r in finished), ([r.state for r in finished], log.read_text()[-3000:])
        gpu = {run_id: [t for t in task_runs_under(client, run_id) if "gpu" in t.tags] for run_id in runs}

    for run_id, tasks in gpu.items():  # both did real GPU work: caption, probe, train, evaluate, none from a cache
        assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == ["caption", "evaluate", "probe", "train"]
        assert all(t.state.name == "Completed" for t in tasks)
    spans = [(t.start_time, t.end_time, t.name) for tasks in gpu.values() for t in tasks]
    for (start_a, end_a, a), (start_b, end_b, b) in combinations(spans, 2):
        assert end_a <= start_b or end_b <= start_a, f"{a} and {b} used the GPU at the same time"
    # ...and the runs did overlap in time: the limit, not chance, kept their GPU stages apart.
    assert finished[0].start_time < finished[1].end_time and finished[1].start_time < finished[0].end_time
