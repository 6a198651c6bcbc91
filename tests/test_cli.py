"""The command line: every stage runs alone on a workspace, without an orchestrator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from lorapipe.manifest import read_manifest

runner = CliRunner()


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "demo", "serve", "collect", "validate", "dedup", "crop", "caption", "review", "train",
                    "export", "evaluate", "compare-ranks", "resize"):
        assert command in out.stdout


def test_dataset_stages_one_at_a_time(demo_photos, tmp_path, tiny_models, prefect_harness):
    photos, _ = demo_photos
    ws = tmp_path / "ws"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: Jane Doe\nimages: {photos}\ndataset:\n  crop:\n    resolution: 256\n    bucket_step: 32\n"
        f"caption:\n  model: {tiny_models.llava}\n  device: cpu\n"
        f"train:\n  base_model: {tiny_models.sdxl}\n  epochs: 1\n  effective_batch_size: 4\n  sample_steps: 2\n  device: cpu\n"
        "evaluate:\n  steps: 2\n  prompts: ['a photo of {name}']\n"
        "probe:\n  steps: 2\n  seeds: 1\n"
    )
    result = runner.invoke(app, ["validate", str(ws), "--config", str(config)])
    assert result.exit_code != 0 and "run `lorapipe collect` first" in result.output

    result = runner.invoke(app, ["collect", str(ws), "--images", str(photos), "--config", str(config)])
    assert result.exit_code == 0, result.output
    for argv in (["validate", str(ws)], ["dedup", str(ws)], ["crop", str(ws)], ["caption", str(ws)],
                 ["review", str(ws)]):  # the workspace remembers the config given to collect
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    summary = json.loads(result.stdout)
    assert summary["stats"] == {"approved": 10, "pending": 0, "rejected_by_reviewer": 0}
    records = read_manifest(ws / "manifests" / "review.jsonl")
    assert sum(r.review == "approved" for r in records) == 10

    # A stage reads the latest manifest of the stage before it: rerunning dedup is a no-op.
    before = (ws / "manifests" / "dedup.jsonl").read_bytes()
    result = runner.invoke(app, ["dedup", str(ws)])
    assert result.exit_code == 0 and (ws / "manifests" / "dedup.jsonl").read_bytes() == before
    # A stage command ends with a table, as `lorapipe run` does (--json gives the result to scripts).
    assert result.stdout.startswith("lorapipe dedup: re-used from the cache") and "near duplicates" in result.stdout
    assert "the counts are from the run that computed it" in result.stdout  # not work done now
    assert f"manifest: {ws / 'manifests' / 'dedup.'}" in result.stdout and "{" not in result.stdout

    result = runner.invoke(app, ["train", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    lora = ws / "loras" / "jane-doe.safetensors"  # one name, the one people load
    assert trained["steps"] >= 2 and trained["lora"] == str(lora)
    assert sorted(p.name for p in lora.parent.iterdir()) == ["jane-doe.diffusers.safetensors", "jane-doe.safetensors",
                                                              "versions"]
    assert lora.samefile(trained["version"]) and lora.stat().st_nlink == 2  # a hard link: no second copy

    # export and evaluate run alone too: export writes the trained LoRA again, evaluate renders the grid.
    shutil.rmtree(ws / "loras")
    result = runner.invoke(app, ["export", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lora"] == str(lora) and lora.exists()
    # Each export is a version; train.keep_lora_versions says how many earlier ones stay (here none).
    keep_none = tmp_path / "keep-none.yaml"
    keep_none.write_text("train: {keep_lora_versions: 0}\n")
    result = runner.invoke(app, ["export", str(ws), "--config", str(keep_none), "--json"])
    assert result.exit_code == 0, result.output
    version = Path(json.loads(result.stdout)["version"])
    assert sorted(p.name for p in version.parent.iterdir()) == [version.name.replace(".safetensors", ".diffusers"
                                                                                     ".safetensors"), version.name]
    assert lora.samefile(version)
    result = runner.invoke(app, ["evaluate", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    # Base row over LoRA row: 1 prompt with the name and the 2 default ones without it, 2 seeds each, labelled.
    assert len(evaluated["columns"]) == 6 and evaluated["pollution"]["pixel_change"] is not None
    width, height = Image.open(evaluated["samples"]).size
    assert Path(evaluated["samples"]).exists() and width > 6 * 256 and 512 < height < 640
    table = runner.invoke(app, ["evaluate", str(ws)], env={"COLUMNS": "200"}).stdout  # cached: what a person reads
    assert "identity, with the LoRA" in table and "style pollution" in table and "{" not in table
    assert f"samples (top: base model, bottom: with the LoRA): {evaluated['samples']}" in table
    shutil.rmtree(ws)


def test_run_says_which_flag_is_missing_or_wrong(tmp_path):
    result = runner.invoke(app, ["run", "--images", "photos"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "lorapipe: --name is missing (the person's real name: the trigger in every caption)"
    job = tmp_path / "job.yaml"
    job.write_text("name: Jane Doe\nimages: photos\ntrain: {rank: 4}\n")
    result = runner.invoke(app, ["run", "--config", str(job), "--epochs", "0"])  # the flag's value, not the file's
    assert result.stderr.strip() == "lorapipe: --epochs 0: Input should be greater than or equal to 1"
    job.write_text("name: Jane Doe\nimages: photos\ntrain: {rank: 0}\n")
    result = runner.invoke(app, ["run", "--config", str(job), "--epochs", "3"])
    assert result.stderr.strip() == f"lorapipe: {job}: train.rank: Input should be greater than or equal to 1"


def test_collect_takes_folders_and_archives_together(tmp_path, prefect_harness):
    import zipfile

    from helpers import jpeg_bytes, photo, save

    save(photo(900, 800, seed=1), tmp_path / "photos" / "a.jpg")
    save(photo(900, 800, seed=4), tmp_path / "single.png")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.writestr("b.jpg", jpeg_bytes(photo(900, 800, seed=2)))
        z.writestr("../../c.jpg", jpeg_bytes(photo(900, 800, seed=3)))
    config = tmp_path / "job.yaml"
    config.write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\n")
    ws = tmp_path / "ws"

    sources = [tmp_path / "photos", tmp_path / "more.zip", tmp_path / "single.png"]
    result = runner.invoke(app, ["collect", str(ws), *[f"--images={s}" for s in sources], "--config", str(config),
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"] == {"files": 4, "computed": 3, "reused": 0, "rejected": 1}
    records = read_manifest(ws / "manifests" / "collect.jsonl")
    assert [r.source.split("/")[-1] for r in records] == ["a.jpg", "b.jpg", "c.jpg", "single.png"]
    assert [r.reason for r in records] == [None, None, "unsafe: archive member name is path traversal (..)", None]
    assert runner.invoke(app, ["validate", str(ws), "--config", str(config)]).exit_code == 0

    result = runner.invoke(app, ["collect", str(ws), "--images", str(tmp_path / "nowhere")])
    message = " ".join(result.output.replace("│", " ").split())  # the error box wraps long lines
    assert result.exit_code != 0 and "nowhere: no such folder, archive or URL list" in message


def test_a_stage_command_is_a_flow_run_on_the_server_PREFECT_API_URL_names(prefect_server, tmp_path):
    from helpers import photo, save
    from served import api

    for seed in (1, 2):
        save(photo(900, 800, seed=seed), tmp_path / "photos" / f"{seed}.jpg")
    (tmp_path / "job.yaml").write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\n")
    lorapipe = str(Path(sys.executable).with_name("lorapipe"))
    done = subprocess.run([lorapipe, "collect", str(tmp_path / "ws"), "--config", str(tmp_path / "job.yaml"), "--json"],
                          env=prefect_server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["stats"]["files"] == 2

    with api(prefect_server) as client:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["stage"])))
    [run] = [r for r in runs if r.parameters["config"]["images"] == str(tmp_path / "photos")]
    assert run.name == "collect" and run.state.is_completed()

    # A CPU stage's command, with its table, loads no torch (seconds of every cached stage command).
    torch_loaded = ("import sys; sys.argv[0] = 'lorapipe'\ntry:\n    from flows.cli import main; main()\n"
                    "finally:\n    print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", torch_loaded, "validate", str(tmp_path / "ws")],
                          env=prefect_server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "lorapipe validate: done" in done.stdout, done.stderr[-2000:]
    assert "torch loaded: False" in done.stderr
