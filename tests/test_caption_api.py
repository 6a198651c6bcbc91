"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that checks every request."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from captioners import load_captioner
from captioners.openai_api import CaptionAPIError, drop_unfinished
from lorapipe.config import CaptionConfig
from lorapipe.demo_data import draw, scenes

KEY = "sk-test-not-a-real-key-1234"


class FakeVLMServer:
    """A chat-completions endpoint with a script of responses: (status, headers, body or answer, delay)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, headers, answer, delay, finish = (server.script.pop(0) if server.script
                                                          else (200, {}, "a woman smiling, in a park.", 0, "stop"))
                time.sleep(delay)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer},
                                                   "finish_reason": finish}]} if status == 200
                                     else {"error": {"message": "slow down"}}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FakeVLMServer()
    yield s
    s.close()


def captioner(server, **options):
    return load_captioner("openai", "cogvlm2-llama3-chat-19B", base_url=server.url, api_key=KEY,
                          backoff_seconds=0.01, **options)


def test_request_shape_and_answer(server):
    image = draw(scenes(1)[0])
    assert captioner(server).describe([image], "Describe the photo.") == ["a woman smiling, in a park."]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "cogvlm2-llama3-chat-19B" and body["max_tokens"] == 60 and body["temperature"] == 0
    text, picture = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "Describe the photo."}
    url = picture["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "JPEG" and max(sent.size) == 1024  # large photos are sent at most 1024 px


def test_429_waits_for_retry_after_then_succeeds(server, caplog):
    server.script = [(429, {"Retry-After": "1"}, None, 0, None), (200, {}, "a man at the beach.", 0, "stop")]
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        assert captioner(server).describe([draw(scenes(1)[0])], "Describe.") == ["a man at the beach."]
    assert time.monotonic() - started >= 1.0  # honoured Retry-After instead of its own short backoff
    assert len(server.requests) == 2
    assert KEY not in caplog.text


def test_a_timeout_is_retried(server):
    server.script = [(200, {}, "late", 1.5, "stop"), (200, {}, "a woman in a studio.", 0, "stop")]
    answer = captioner(server, timeout_seconds=0.5).describe([draw(scenes(1)[0])], "Describe.")
    assert answer == ["a woman in a studio."]


def test_an_answer_cut_at_max_tokens_keeps_its_finished_part(server):
    server.script = [(200, {}, "a woman smiling, wearing a red coat, standing on a bus", 0, "length")]
    assert captioner(server).describe([draw(scenes(1)[0])], "Describe.") == ["a woman smiling, wearing a red coat"]
    assert drop_unfinished("One sentence. And half a") == "One sentence."


def test_giving_up_names_the_server_not_the_key(server):
    server.script = [(503, {}, None, 0, None)] * 3
    with pytest.raises(CaptionAPIError, match=r"127\.0\.0\.1.*gave up after 3 attempts \(HTTP 503\)") as err:
        captioner(server, max_retries=2).describe([draw(scenes(1)[0])], "Describe.")
    assert KEY not in str(err.value)


def test_caption_stage_with_the_api_backend(server, tmp_path, workspace, tiny_models, monkeypatch):
    from helpers import cropped_demo_records
    from tasks.caption import caption_records

    monkeypatch.setenv("VLM_KEY", KEY)
    records = cropped_demo_records(tmp_path / "photos", workspace, 3)
    config = CaptionConfig(backend="openai", model="gpt-4o", api_base_url=server.url, api_key_env="VLM_KEY",
                           api_concurrency=2)
    out, stats = caption_records(records, workspace, config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["computed"] == 3 and [r.caption for r in out] == ["Jane Doe smiling, in a park."] * 3
    assert out[0].caption_by["base_url"] == server.url
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    _, stats = caption_records(records, workspace, config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["computed"] == 0 and len(server.requests) == 3  # cached per image: no new requests
