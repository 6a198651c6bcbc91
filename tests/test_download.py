"""The downloader against a real HTTP server on 127.0.0.1, reached only through the allow-list setting."""

from __future__ import annotations

import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import jpeg_bytes, photo
from lorapipe.config import CollectConfig, ValidateConfig
from lorapipe.download import DownloadFailed, Downloader, DownloadPolicy, address_problem
from lorapipe.fsutil import sha256_file
from tasks.collect import collect_sources, collect_key
from tasks.validate import validate_records

PHOTO = jpeg_bytes(photo(800, 800, seed=1))


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    host_header: dict[str, str] = {}
    active = 0
    most_active = 0
    lock = threading.Lock()

    def log_message(self, *args):  # keep test output quiet
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        with Handler.lock:
            Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
            Handler.host_header[self.path] = self.headers.get("Host")
            hits = Handler.hits[self.path]
        self.route(path, hits)

    def route(self, path: str, hits: int):
        if path == "/photo.jpg":
            self.send(200, PHOTO, {"Content-Type": "image/jpeg"})
        elif path == "/slow-photo.jpg":
            with Handler.lock:
                Handler.active += 1
                Handler.most_active = max(Handler.most_active, Handler.active)
            time.sleep(0.3)
            with Handler.lock:
                Handler.active -= 1
            self.send(200, PHOTO)
        elif path == "/page.jpg":
            self.send(200, b"<html><body>Please log in</body></html>", {"Content-Type": "image/jpeg"})
        elif path == "/to-private":
            self.send(302, headers={"Location": "http://10.1.2.3/photo.jpg"})
        elif path == "/to-metadata":
            self.send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/to-file":
            self.send(302, headers={"Location": "file:///etc/passwd"})
        elif path == "/to-photo":
            self.send(302, headers={"Location": "/photo.jpg"})
        elif path == "/big-declared":
            self.send(200, b"\xff\xd8\xff" + b"\0" * 2_000_000)
        elif path == "/big-streamed":  # no Content-Length: only counting while streaming can stop it
            self.send(200, b"\xff\xd8\xff" + b"\0" * 2_000_000, length=False)
        elif path == "/busy":
            if hits == 1:
                self.send(503, b"busy", {"Retry-After": "1"})
            else:
                self.send(200, PHOTO)
        elif path == "/busy-for-an-hour":
            self.send(503, b"busy", {"Retry-After": "3600"})
        elif path == "/hang":
            time.sleep(1.5)
            self.send(200, PHOTO)
        else:
            self.send(404, b"not found")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that gave up (timeouts, caps) are expected
        pass


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def policy(**changes) -> DownloadPolicy:
    config = CollectConfig(allow_addresses=["127.0.0.1"], retries=1, backoff_seconds=0.05, read_timeout=0.5,
                           connect_timeout=0.5)
    return DownloadPolicy.from_config(config.model_copy(update=changes))


def failure(url: str, tmp_path, **changes) -> str:
    dest = Path(tempfile.mkdtemp(dir=tmp_path))
    with pytest.raises(DownloadFailed) as err:
        Downloader(policy(**changes), dest).fetch(url)
    assert not list(dest.iterdir())  # nothing half written
    return err.value.reason


def test_a_photo_is_downloaded_atomically_and_named_by_content(server, tmp_path):
    got = Downloader(policy(), tmp_path).fetch(f"{server}/to-photo")
    assert got.path == tmp_path / f"{got.sha256}.jpg" and got.path.read_bytes() == PHOTO
    assert got.format == "JPEG" and got.final_url == f"{server}/photo.jpg"
    assert [p.name for p in tmp_path.iterdir()] == [got.path.name]


def test_local_addresses_are_refused_unless_allowed(server, tmp_path):
    reason = failure(f"{server}/photo.jpg", tmp_path, allow_addresses=[])
    assert reason == "blocked: 127.0.0.1 resolves to a non-public address (127.0.0.1 is a loopback address)"
    assert failure("ftp://example.com/a.jpg", tmp_path).startswith("bad_url: only http and https")
    for address, kind in [("10.0.0.1", "private"), ("192.168.1.1", "private"), ("169.254.169.254", "link-local"),
                          ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"),
                          ("100.64.0.1", "not a public"), ("0.0.0.0", "unspecified")]:
        assert kind in address_problem(address), address
    assert address_problem("93.184.215.14") is None


def test_redirects_to_private_addresses_are_refused(server, tmp_path):
    reason = failure(f"{server}/to-private", tmp_path)
    assert reason == ("blocked: redirected to http://10.1.2.3/photo.jpg: 10.1.2.3 resolves to a non-public "
                      "address (10.1.2.3 is a private address)")
    assert "169.254.169.254 is a link-local address" in failure(f"{server}/to-metadata", tmp_path)
    assert failure(f"{server}/to-file", tmp_path).startswith("bad_url: redirected to file:///etc/passwd")


def test_size_cap_holds_with_and_without_content_length(server, tmp_path):
    assert failure(f"{server}/big-declared", tmp_path, max_file_bytes=1_000_000) == (
        "too_large: Content-Length 2000003 > 1000000 bytes")
    assert failure(f"{server}/big-streamed", tmp_path, max_file_bytes=1_000_000) == (
        "too_large: more than 1000000 bytes")


def test_content_is_checked_by_magic_bytes_not_content_type(server, tmp_path):
    assert failure(f"{server}/page.jpg", tmp_path) == (
        "not_an_image: the server sent an HTML page (Content-Type: image/jpeg)")


def test_503_is_retried_after_the_time_the_server_asks(server, tmp_path):
    start = time.monotonic()
    got = Downloader(policy(), tmp_path).fetch(f"{server}/busy?t=1")
    assert got.path.read_bytes() == PHOTO
    assert Handler.hits["/busy?t=1"] == 2 and time.monotonic() - start >= 0.95
    reason = failure(f"{server}/busy-for-an-hour", tmp_path)
    assert reason.startswith("http_error: 503") and "asked to wait 3600 s" in reason


def test_a_server_that_does_not_answer_times_out(server, tmp_path):
    start = time.monotonic()
    assert failure(f"{server}/hang", tmp_path, read_timeout=0.2, retries=1).startswith("timeout:")
    assert Handler.hits["/hang"] == 2 and time.monotonic() - start < 1.4  # two tries, neither waited it out


def test_one_host_gets_at_most_per_host_downloads_at_once(server, tmp_path):
    Handler.most_active = 0
    urls = [f"{server}/slow-photo.jpg?n={i}" for i in range(4)]
    results = Downloader(policy(per_host_concurrency=1, concurrency=4), tmp_path).fetch_all(urls)
    assert Handler.most_active == 1 and all(not isinstance(r, DownloadFailed) for r in results.values())


def test_url_lists_collect_what_they_can_and_record_the_rest(server, tmp_path, workspace):
    urls = tmp_path / "urls.csv"
    urls.write_text(f"name,url\nok,{server}/photo.jpg\nlogin,{server}/page.jpg\nevil,{server}/to-private\n"
                    f"gone,{server}/missing.jpg\n")
    config = CollectConfig(allow_addresses=["127.0.0.1"], retries=0)

    records, stats = collect_sources([str(urls)], workspace, config)
    assert [r.source for r in records] == [f"{server}/{p}" for p in ("photo.jpg", "page.jpg", "to-private",
                                                                     "missing.jpg")]
    assert records[0].kept and sha256_file(workspace.path(records[0].raw_path)) == records[0].id
    assert [r.reason.split(":")[0] for r in records[1:]] == ["not_an_image", "blocked", "http_error"]
    assert records[3].reason == "http_error: 404 Not Found (urls.csv line 5)"  # the list and its line
    validated, _ = validate_records(records, workspace, ValidateConfig(min_side=512))
    assert validated[0].kept and (validated[0].width, validated[0].height) == (800, 800)

    hits = Handler.hits.get("/photo.jpg", 0)
    again, stats = collect_sources([str(urls)], workspace, config)
    assert Handler.hits["/photo.jpg"] == hits and stats["reused"] == 1  # downloaded once, retried failures only
    assert [r.model_dump() for r in again] == [r.model_dump() for r in records]
    # While a URL is failing the stage is never served from the Prefect cache: each run retries it.
    assert collect_key(str(urls), str(workspace.root), config) != collect_key(str(urls), str(workspace.root), config)


def self_signed_certificate(folder: Path, name: str = "localhost") -> Path:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = folder / "server.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path):
    import ssl

    pem = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pem)
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    trust = ssl.create_default_context(cafile=str(pem))
    try:
        pinned = policy(retries=0)
        pinned.verify = trust
        # The name goes in SNI and Host, the connection to 127.0.0.1: the certificate for "localhost" checks out.
        got = Downloader(pinned, tmp_path / "raw").fetch(f"https://localhost:{port}/photo.jpg?tls")
        assert got.path.read_bytes() == PHOTO and Handler.host_header["/photo.jpg?tls"] == f"localhost:{port}"
        # The same server reached by its address: the certificate does not name it, so no download.
        with pytest.raises(DownloadFailed) as err:
            Downloader(pinned, tmp_path / "raw").fetch(f"https://127.0.0.1:{port}/photo.jpg")
        assert err.value.reason.startswith("tls_error: 127.0.0.1:")
    finally:
        httpd.shutdown()
        httpd.server_close()
