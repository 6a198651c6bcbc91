"""The command line's settings: the WORKSPACE argument, --config merged over what a workspace remembers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from helpers import photo, save

runner = CliRunner()


def test_the_workspace_argument_wins_and_null_clears_a_remembered_setting(tmp_path, prefect_harness):
    for seed in (1, 2):
        save(photo(900, 800, seed=seed), tmp_path / "photos" / f"{seed}.jpg")
    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    job = tmp_path / "job.yaml"  # what `lorapipe demo --prepare-only` writes has a workspace: line
    job.write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\nworkspace: {ws1}\n"
                   "train: {vae: madebyollin/sdxl-vae-fp16-fix, timeout_minutes: 30, min_snr_gamma: 5.0, rank: 4}\n"
                   "caption: {revision: main}\n")
    result = runner.invoke(app, ["collect", str(ws2), "--config", str(job)])
    assert result.exit_code == 0, result.output
    assert (ws2 / "manifests" / "collect.jsonl").exists() and not (ws1 / "manifests" / "collect.jsonl").exists()
    assert f"working on {ws2}" in result.stderr  # said, not silent
    remembered = json.loads((ws2 / "config.json").read_text())
    assert remembered["workspace"] == str(ws2)
    assert remembered["train"]["vae"] == "madebyollin/sdxl-vae-fp16-fix"

    clear = tmp_path / "clear.yaml"  # null: back to the default, whatever the workspace remembered
    clear.write_text("train: {vae: null, timeout_minutes: null, min_snr_gamma: ~, rank: null}\ncaption:\n  revision:\n")
    result = runner.invoke(app, ["collect", str(ws2), "--config", str(clear)])
    assert result.exit_code == 0, result.output
    remembered = json.loads((ws2 / "config.json").read_text())
    train = remembered["train"]
    assert (train["vae"], train["timeout_minutes"], train["min_snr_gamma"], train["rank"]) == (None, None, None, 8)
    assert remembered["caption"]["revision"] is None and remembered["name"] == "Jane Doe"
