"""Run parameters never reach a worker's secrets or paths: the serving policy lorapipe serve fixes.

Fast checks of the policy itself, then the user's door: `lorapipe serve` against a real `prefect server
start`, and runs created through the API with each parameter pointed at a local listener (or at a folder
outside the served paths), while the serving process holds a secret in its environment. Nothing reaches
the listener, nothing outside is written, every run is refused naming the parameter.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deployments.serve import deployment_name
from flows.cli import app
from flows.demo import demo_config
from helpers import sha256_tree
from lorapipe.config import PipelineConfig
from lorapipe.errors import UserError
from lorapipe.run_form import form_values
from served import api, trigger, wait_final, wait_for_deployment

SECRET = "sk-this-must-never-leave-the-worker"


class Listener:
    """A TCP port on 127.0.0.1 that records every connection and what was sent on it."""

    def __init__(self):
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.received.append(conn.recv(65536) or b"(connected)")
            except OSError:
                self.received.append(b"(connected)")
            conn.close()

    def close(self):
        self.sock.close()


def bad_parameters(listener: Listener, outside: Path) -> dict[str, tuple[dict, str]]:
    """Each case: settings changed from the served job's (one thing each), and what the refusal names."""
    return {
        "API key to the listener": ({"caption": {"backend": "openai", "model": "gpt-4o", "api_base_url":
                                    f"{listener.url}/v1", "api_key_env": "LORAPIPE_TEST_SECRET"}},
                                    "caption.api_key_env: 'LORAPIPE_TEST_SECRET'"),
        "photos to the listener, no key": ({"caption": {"backend": "openai", "model": "gpt-4o", "api_key_env": "",
                                            "api_base_url": f"{listener.url}/v1"}},
                                           "caption.api_base_url: blocked"),
        "download from the listener": ({"images": f"{listener.url}/photo.jpg",
                                        "dataset": {"collect": {"allow_addresses": ["127.0.0.0/8"]}}},
                                       "dataset.collect.allow_addresses: 127.0.0.0/8"),
        "photos outside": ({"images": str(outside / "photos")}, "images: "),
        "URL list outside": ({"images": str(outside / "urls.txt")}, "images: "),
        "workspace outside": ({"workspace": str(outside / "ws")}, "workspace: "),
        "base model outside": ({"train": {"base_model": str(outside / "model")}}, "train.base_model: "),
        "VAE outside": ({"train": {"vae": str(outside / "vae.safetensors")}}, "train.vae: "),
        "captioner outside": ({"caption": {"model": str(outside / "model")}}, "caption.model: "),
        "cluster at the listener": ({"scale_out": {"task_runner": "dask",
                                                   "address": f"tcp://127.0.0.1:{listener.port}"}},
                                    "scale_out.address: "),
        "remote code": ({"caption": {"trust_remote_code": True}}, "caption.trust_remote_code"),
    }


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- the policy itself ------------------------------------------------------------------------------


def test_each_parameter_beyond_the_policy_is_refused_naming_it(tmp_path, monkeypatch):
    from lorapipe.policy import POLICY_ENV, ServingPolicy, check_run

    listener = Listener()
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    served = {"name": "Jane Doe", "images": str(inside / "photos"), "workspace": str(inside / "ws")}
    policy = ServingPolicy(path_roots=[str(inside)])
    monkeypatch.setenv(POLICY_ENV, policy.to_env())
    check_run(PipelineConfig.model_validate(served))  # what the operator serves passes
    for case, (change, named) in bad_parameters(listener, outside).items():
        with pytest.raises(UserError, match="refused by this deployment's serving policy") as err:
            check_run(PipelineConfig.model_validate(merged(served, change)))
        assert named in str(err.value), case
    with pytest.raises(UserError, match="manifest: "):
        check_run(PipelineConfig.model_validate(served), manifest=str(outside / "review.jsonl"))
    # A symlink inside the served folder that points outside is outside.
    inside.mkdir()
    (inside / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="images: "):
        check_run(PipelineConfig.model_validate({**served, "images": str(inside / "link")}))
    listener.close()
    assert listener.received == []


def test_a_key_goes_only_to_the_listed_server_and_only_an_allowed_one(monkeypatch):
    from lorapipe.config import CaptionConfig
    from lorapipe.policy import POLICY_ENV, ServingPolicy
    from tasks.caption import api_key, check_api_destination

    policy = ServingPolicy(api_base_urls=["http://10.0.0.5:8000/v1"], api_key_envs=["VLM_KEY"])
    monkeypatch.setenv(POLICY_ENV, policy.to_env())
    monkeypatch.setenv("VLM_KEY", "allowed")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never")
    listed = CaptionConfig(backend="openai", api_base_url="http://10.0.0.5:8000/v1", api_key_env="VLM_KEY")
    assert api_key(listed) == "allowed"
    check_api_destination(listed)  # listed: fine though private
    with pytest.raises(UserError, match="'AWS_SECRET_ACCESS_KEY' is not an environment variable"):
        api_key(listed.model_copy(update={"api_key_env": "AWS_SECRET_ACCESS_KEY"}))
    with pytest.raises(UserError, match="'prod-db' is not a Secret block"):
        api_key(listed.model_copy(update={"api_key_secret": "prod-db"}))
    with pytest.raises(UserError, match="an API key is sent only to the servers the operator listed"):
        check_api_destination(listed.model_copy(update={"api_base_url": "https://93.184.216.34/v1"}))
    for private in ("http://169.254.169.254/v1", "http://[::ffff:127.0.0.1]:8000/v1", "http://10.0.0.6/v1"):
        with pytest.raises(UserError, match="blocked"):
            check_api_destination(listed.model_copy(update={"api_base_url": private, "api_key_env": ""}))


def test_serve_refuses_keys_without_a_server_for_them_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted: refused before
    result = CliRunner().invoke(app, ["serve", "--api-key-env", "OPENAI_API_KEY"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("lorapipe: serve options: API keys are sent only to the servers in "
                                     "api_base_urls (--api-base-url); list the server these keys are for")


# --- through a served deployment --------------------------------------------------------------------


@pytest.mark.slow
def test_runs_started_through_the_api_reach_nothing_beyond_the_policy(prefect_server, tiny_models,
                                                                     demo_photos_master, tmp_path):
    listener = Listener()
    root, outside = tmp_path / "served", tmp_path / "outside"
    (outside / "photos").mkdir(parents=True)
    shutil.copy(demo_photos_master[0] / "portrait_00.jpg", outside / "photos")
    (outside / "urls.txt").write_text(f"{listener.url}/photo.jpg\n")
    shutil.copytree(tiny_models.sdxl, outside / "model")
    (outside / "vae.safetensors").write_bytes(b"")
    shutil.copytree(demo_photos_master[0], root / "photos")
    config = demo_config(root / "photos", root / "ws", tiny_models)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    before = sha256_tree(outside)
    env = {**prefect_server.env, "LORAPIPE_TEST_SECRET": SECRET}
    log = open(root / "serve.log", "w")
    process = subprocess.Popen([str(Path(sys.executable).with_name("lorapipe")), "serve", "--config", str(job),
                                "--no-nightly", "--gpu-slots", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    served = config.model_dump(mode="json", by_alias=True)
    cases = bad_parameters(listener, outside)
    try:
        with api(prefect_server) as client:
            dataset = wait_for_deployment(client, deployment_name("dataset"), process)
            train = wait_for_deployment(client, deployment_name("train"), process)
            runs = {case: trigger(client, dataset, {"config": merged(served, change)})
                    for case, (change, _) in cases.items()}
            # The run form's values are held to it the same way (the captioner is one of its top fields).
            form = {**form_values(config), "captioner": str(outside / "model")}
            runs["captioner outside, from the form"] = trigger(client, dataset, {"config": form})
            runs["manifest outside"] = trigger(client, train, {"config": served,
                                                               "manifest": str(outside / "review.jsonl")})
            # Job variables are the run's to set too; with `serve` they never reach the run's environment.
            escape = client.create_flow_run_from_deployment(
                dataset.id, parameters={"config": merged(served, cases["API key to the listener"][0])},
                job_variables={"env": {"LORAPIPE_SERVING_POLICY": ""}})
            runs["policy unset by job variables"] = escape.id
            finals = {case: wait_final(client, run_id, timeout=300) for case, run_id in runs.items()}
        time.sleep(2)  # anything still on its way to the listener arrives
    finally:
        process.terminate()
        process.wait(timeout=30)
        listener.close()

    expected = {case: named for case, (_, named) in cases.items()}
    expected.update({"manifest outside": "manifest: ", "policy unset by job variables": "caption.api_key_env",
                     "captioner outside, from the form": "caption.model: "})
    outcomes = {case: (run.state.name, run.state.message or "") for case, run in finals.items()}
    for case, (state, message) in outcomes.items():
        assert state == "Failed" and "refused by this deployment's serving policy" in message, (case, state, message)
        assert expected[case] in message, (case, message)
    assert listener.received == []  # no photo, no key, no scheduler handshake
    assert sha256_tree(outside) == before and not (outside / "ws").exists()
    assert SECRET not in (root / "serve.log").read_text()
