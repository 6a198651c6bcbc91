"""Errors a user caused: not retried by the stage tasks, one line from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorapipe.errors import UserError, is_permanent
from lorapipe.textio import read_user_text


def test_a_user_error_is_not_retried_but_a_transient_one_is(prefect_harness):
    from prefect import flow

    from tasks.stage import stage_task

    calls = {"user": 0, "transient": 0, "bug": 0}

    def failing(kind: str) -> dict:
        calls[kind] += 1
        if kind == "user":
            raise UserError("settings.yaml: rank must be at least 1")
        if kind == "bug":
            raise KeyError("text_model")
        raise ConnectionResetError("connection reset")

    task = stage_task(failing, lambda kind: kind, name="failing", retries=2).with_options(retry_delay_seconds=0)

    @flow
    def run(kind: str):
        return task(kind, return_state=True)

    assert run("user", return_state=True).is_failed() and calls["user"] == 1
    assert run("transient", return_state=True).is_failed() and calls["transient"] == 3
    assert run("bug", return_state=True).is_failed() and calls["bug"] == 1  # the same again would fail the same


def test_is_permanent_follows_the_exception_chain():
    try:
        try:
            raise UserError("bad")
        except UserError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as wrapped:
        assert is_permanent(wrapped)
    assert not is_permanent(RuntimeError("transient"))


@pytest.mark.parametrize("content, expected", [
    (b"\xef\xbb\xbfname: Zo\xc3\xab\r\nrank: 8\r\n", "name: Zoë\nrank: 8\n"),  # Notepad: BOM + CRLF
    (b"name: Zo\xc3\xab\rrank: 8", "name: Zoë\nrank: 8"),  # old Mac line ends
])
def test_user_text_accepts_utf8_with_bom_and_any_line_ends(tmp_path, content, expected):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    assert read_user_text(path) == expected


def test_user_text_in_another_encoding_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "review.csv"
    path.write_bytes("file,caption\nportrait.jpg,Zoë in a café\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"review\.csv: not UTF-8 text \(byte 0xeb at offset 28\).*UTF-8"):
        read_user_text(path, "review sheet")
    with pytest.raises(UserError, match="no such review sheet"):
        read_user_text(tmp_path / "missing.csv", "review sheet")
    with pytest.raises(UserError, match="is a folder"):
        read_user_text(tmp_path, "review sheet")


def test_the_cli_prints_a_user_error_as_one_line(tmp_path, monkeypatch):
    code = (
        "import sys; import flows.cli as cli\n"
        "from lorapipe.errors import UserError\n"
        "@cli.app.command('boom')\n"
        "def boom():\n"
        "    raise UserError('job.yaml: line 3: not a mapping')\n"
        "sys.argv = ['lorapipe', 'boom']; cli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "lorapipe: job.yaml: line 3: not a mapping"
