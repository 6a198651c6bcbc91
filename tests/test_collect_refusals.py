"""Collect judges each URL-list line and each archive on its own, caps archive entries, and writes every
file in raw/ with one file mode, whatever brought it there.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from flows.cli import app
from helpers import jpeg_bytes, photo, save
from lorapipe.config import CollectConfig
from lorapipe.manifest import read_manifest
from tasks.collect import collect_sources

PHOTO = jpeg_bytes(photo(800, 800, seed=7))
runner = CliRunner()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/photo.jpg":
            body, status, headers = PHOTO, 200, {"Content-Type": "image/jpeg"}
        elif self.path == "/to-data":  # a redirect httpx itself cannot even parse
            body, status, headers = b"", 302, {"Location": "data:image/png;base64,iVBORw0KGgo="}
        else:
            body, status, headers = b"not found", 404, {}
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_each_url_list_line_is_judged_on_its_own_with_its_line(server, tmp_path, prefect_harness):
    lines = [
        "# Jane's photos",
        f"{server}/photo.jpg",
        "http://[::1",  # once: ValueError: Invalid IPv6 URL, the whole collect lost
        "",
        "http://exa mple.com/x.jpg",
        f"{server}/to-data",  # once: a traceback in the log
        "http://" + "a" * 64 + ".example/x.jpg",  # a label longer than 63 characters
        "http://-bad-.example/x.jpg",
        "ftp://example.com/x.jpg",
        f"{server}/missing.jpg",
    ]
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    # A retry would wait 15 s or more: an invalid host is a typo, not a network hiccup.
    (tmp_path / "job.yaml").write_text(
        f"name: Jane Doe\nimages: {urls}\ndataset:\n  collect:\n    allow_addresses: ['127.0.0.1']\n"
        "    retries: 3\n    backoff_seconds: 30\n")
    started = time.monotonic()
    result = runner.invoke(app, ["collect", str(tmp_path / "ws"), "--config", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 15

    records = read_manifest(tmp_path / "ws" / "manifests" / "collect.jsonl")
    reasons = {r.source: r.reason for r in records}
    assert len(records) == 8 and reasons[f"{server}/photo.jpg"] is None
    for n, line in enumerate(lines, 1):
        if line.startswith("http") and "photo.jpg" not in line or line.startswith("ftp"):
            assert reasons[line].endswith(f"(urls.txt line {n})"), (line, reasons[line])
    assert reasons["http://[::1"].startswith("bad_url: Invalid IPv6 URL")
    assert reasons["http://exa mple.com/x.jpg"].startswith("bad_url: 'exa mple.com' is not a valid host name")
    assert reasons[f"{server}/to-data"].startswith(f"bad_url: redirected from {server}/to-data to an unusable URL")
    assert reasons[lines[6]].startswith("bad_url:") and reasons[lines[7]].startswith("bad_url:")
    assert reasons[f"{server}/missing.jpg"] == "http_error: 404 Not Found (urls.txt line 10)"


def zip_of(names: list[str], photos: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, name in enumerate(names):
            z.writestr(name, jpeg_bytes(photo(96, 96, seed=i)) if i < photos else b"x")
    return buf.getvalue()


def tar_of(names: list[str], photos: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for i, name in enumerate(names):
            data = jpeg_bytes(photo(96, 96, seed=i)) if i < photos else b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("make, suffix", [(zip_of, ".zip"), (tar_of, ".tar.gz")])
def test_an_archive_with_more_entries_than_the_cap_is_refused_whole(make, suffix, tmp_path, workspace):
    archive = tmp_path / f"photos{suffix}"
    # The first five are photos: a tar is read as a stream, so they are unpacked before the cap is reached.
    archive.write_bytes(make([f"p{i}.jpg" for i in range(30)], photos=5))
    records, stats = collect_sources([str(archive)], workspace, CollectConfig(max_archive_members=10))
    assert [r.reason for r in records] == [
        "unsafe: the archive has more than 10 entries (collect.max_archive_members)"]
    assert list(workspace.raw.iterdir()) == []  # what was unpacked before the cap went with the archive
    records, _ = collect_sources([str(archive)], workspace, CollectConfig(max_archive_members=30))
    assert len(records) == 30 and sum(r.kept for r in records) == 30


def test_the_default_cap_stops_a_flood_of_tiny_members_fast(tmp_path, workspace):
    archive = tmp_path / "flood.zip"
    archive.write_bytes(zip_of([f"d/{i}.jpg" for i in range(CollectConfig().max_archive_members + 1)]))
    started = time.monotonic()
    records, _ = collect_sources([str(archive)], workspace, CollectConfig())
    assert time.monotonic() - started < 5 and len(records) == 1 and records[0].reason.startswith("unsafe: ")
    assert list(workspace.raw.iterdir()) == []


MODES = """
import json, os, sys
os.umask(0o002)  # a shared volume's group-writable setup
from lorapipe.config import CollectConfig
from lorapipe.workspace import Workspace
from tasks.collect import collect_sources
ws = Workspace.at(sys.argv[1])
records, _ = collect_sources(sys.argv[2:], ws, CollectConfig(allow_addresses=["127.0.0.1"], retries=0))
print(json.dumps({r.source: oct(os.stat(ws.path(r.raw_path)).st_mode & 0o777) for r in records}))
"""


def test_files_in_raw_have_one_mode_whether_copied_unpacked_or_downloaded(server, tmp_path):
    save(photo(800, 800, seed=1), tmp_path / "photos" / "a.jpg")
    (tmp_path / "more.zip").write_bytes(zip_of(["b.jpg"], photos=1))
    sources = [str(tmp_path / "photos"), str(tmp_path / "more.zip"), f"{server}/photo.jpg"]
    done = subprocess.run([sys.executable, "-c", MODES, str(tmp_path / "ws"), *sources], capture_output=True,
                          text=True, timeout=300, check=True)
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(modes) == 3 and set(modes.values()) == {"0o664"}, modes  # once 0o600 from archives and URLs


def test_temp_files_a_killed_collect_left_are_removed_by_the_next(tmp_path, prefect_harness):
    save(photo(800, 800, seed=1), tmp_path / "photos" / "a.jpg")
    (tmp_path / "job.yaml").write_text(f"name: Jane Doe\nimages: {tmp_path / 'photos'}\n")
    raw = tmp_path / "ws" / "raw"
    raw.mkdir(parents=True)
    left = [raw / ".download-k2j3h4.tmp", raw / ".unpack-9x8y7z.tmp", raw / ".3f2a.jpg.abc123.tmp"]
    for path in left:
        path.write_bytes(b"")  # what SIGKILL mid-download leaves: a zero-byte temp file nobody owns
    result = runner.invoke(app, ["collect", str(tmp_path / "ws"), "--config", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in left)
    assert [p.suffix for p in raw.iterdir()] == [".jpg"]
