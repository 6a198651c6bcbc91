"""Retries: a stage retries only what can succeed on retry; out of memory is one line, never a reload."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from flows.cli import app
from lorapipe.errors import TransientError, UserError, is_retryable


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer
    except BaseException as err:
        return err


def _oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("error, retried", [
    (TransientError("training failed (exit code -9)"), True),  # a crash or a timeout: the retry resumes
    (ConnectionResetError("connection reset by peer"), True),
    (TimeoutError("timed out"), True),
    (OSError(errno.EIO, "Input/output error"), True),  # a network file system's hiccup
    (_chained(OSError("We couldn't connect to the hub"), ConnectionError("refused")), True),
    (UserError("job.yaml: train.rank must be at least 1"), False),
    (_oom(), False),  # the same batch runs out of memory again: no reload of a 7B model
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), False),
    (_chained(RuntimeError("caption failed"), UserError("no such model")), False),
    (FileNotFoundError(errno.ENOENT, "No such file", "/models/x"), False),
    (OSError("llava-hf/x is not a local folder and is not a valid model identifier"), False),
    (ValueError("bad shape"), False),  # a bug: fails once, quickly
    (KeyError("text_model"), False),
    (ImportError("no module named bitsandbytes"), False),
])
def test_only_failures_that_can_pass_are_retried(error, retried):
    assert is_retryable(error) is retried


def test_a_caption_stage_out_of_memory_is_one_line_and_loads_the_model_once(tmp_path, prefect_harness, tiny_models,
                                                                            monkeypatch):
    from helpers import cropped_demo_records
    from lorapipe.manifest import write_manifest
    from lorapipe.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws")
    write_manifest(ws.latest_manifest("crop"), cropped_demo_records(tmp_path / "photos", ws, 2))
    job = tmp_path / "job.yaml"
    job.write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\n"
                   f"caption: {{model: {tiny_models.llava}, batch_size: 16}}\ntrain: {{base_model: {tiny_models.sdxl}}}\n")
    loads = []

    class HugeModel:
        identity = {"backend": "transformers"}
        chunk_size = 16

        def __init__(self, *args, **kwargs):
            loads.append(args)

        def describe(self, images, prompt):
            raise _oom()

        def close(self):
            pass

    monkeypatch.setattr("tasks.caption.load_captioner", HugeModel)
    result = CliRunner().invoke(app, ["caption", str(ws.root), "--config", str(job)])
    assert result.exit_code == 2, result.output
    assert len(loads) == 1  # not reloaded by two retries
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("lorapipe: caption: out of memory (CUDA out of memory") and "caption.batch_size (now 16)" in line
    assert "Traceback" not in result.output
