"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that checks every request and answers
the way each server documents: OpenAI (refusals, content filter, quota, retry-after-ms), Ollama's /v1 with a
thinking model, vLLM, llama.cpp without its vision projector."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from captioners import CaptionServiceError, load_captioner
from captioners.openai_api import CaptionAPIError, drop_unfinished
from lorapipe.config import CaptionConfig
from lorapipe.demo_data import draw, scenes
from lorapipe.errors import UserError

KEY = "sk-test-not-a-real-key-1234"
CAPTION = "a woman smiling, in a park."


@dataclass
class Reply:
    """One answer of the fake server: a chat completion (status 200) or an error body."""

    status: int = 200
    content: str | None = CAPTION
    finish: str | None = "stop"
    message: dict = field(default_factory=dict)  # more fields of the message: refusal, reasoning ...
    headers: dict = field(default_factory=dict)
    error: dict | None = None  # the error body for status >= 400
    delay: float = 0.0

    def body(self) -> bytes:
        if self.status >= 400:
            return json.dumps(self.error or {"error": {"message": "slow down"}}).encode()
        message = {"role": "assistant", "content": self.content, **self.message}
        return json.dumps({"id": "chatcmpl-1", "object": "chat.completion",
                           "choices": [{"index": 0, "message": message, "finish_reason": self.finish}]}).encode()


# Error bodies as the servers send them.
LLAMA_CPP_NO_MMPROJ = Reply(500, error={"error": {
    "code": 500, "type": "server_error",
    "message": "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"}})
OPENAI_NO_QUOTA = Reply(429, error={"error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}})
OPENAI_BAD_KEY = Reply(401, error={"error": {
    "message": "Incorrect API key provided: sk-test-****1234.", "type": "invalid_request_error", "param": None,
    "code": "invalid_api_key"}})
VLLM_TEXT_ONLY = Reply(400, error={"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                                   "message": "Qwen2ForCausalLM is not a multimodal model"})


class FakeVLMServer:
    """A chat-completions endpoint answering from a script of Replies (then CAPTION), counting requests in flight."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[Reply | tuple] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    reply = server.script.pop(0) if server.script else Reply()
                    if isinstance(reply, tuple):  # (status, headers, answer, delay, finish), as other tests script
                        status, headers, answer, delay, finish = reply
                        reply = Reply(status, content=answer, finish=finish, headers=headers, delay=delay)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(reply.delay)
                    payload = reply.body()
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

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


def captioner(server, model="cogvlm2-llama3-chat-19B", **options):
    return load_captioner("openai", model, base_url=server.url, api_key=KEY, backoff_seconds=0.01, **options)


def sent_image(request) -> tuple[Image.Image, dict]:
    picture = request["body"]["messages"][0]["content"][1]["image_url"]
    return Image.open(io.BytesIO(base64.b64decode(picture["url"].split(",", 1)[1]))), picture


def test_request_shape_and_answer(server):
    image = draw(scenes(1)[0])  # 960x1280
    [answer] = captioner(server, model="some-vlm").describe([image], "Describe the photo.")
    assert answer.ok and answer.text == CAPTION
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "some-vlm" and body["max_tokens"] == 60 and body["temperature"] == 0
    assert body["messages"][0]["content"][0] == {"type": "text", "text": "Describe the photo."}
    sent, picture = sent_image(request)
    assert picture["url"].startswith("data:image/jpeg;base64,") and sent.format == "JPEG"
    assert max(sent.size) == 1024 and "detail" not in picture  # a model lorapipe knows nothing of: 1024 px


@pytest.mark.parametrize("model, options, size, detail", [
    ("gpt-4o", {}, (768, 1024), "high"),  # OpenAI "high": short side 768
    ("gpt-4o", {"image_detail": "low"}, (384, 512), "low"),  # "low" reads 512x512
    ("gemma3:27b", {}, (672, 896), None),  # Gemma 3 reads 896x896
    ("llava:13b", {}, (504, 672), None),  # LLaVA-NeXT tiles up to 672
    ("some-vlm", {"image_max_side": 512}, (384, 512), None),  # the setting wins
])
def test_image_size_follows_the_model_or_the_setting(server, model, options, size, detail):
    captioner(server, model=model, **options).describe([draw(scenes(1)[0])], "Describe.")
    sent, picture = sent_image(server.requests[0])
    assert sent.size == size and picture.get("detail") == detail


def test_429_waits_for_retry_after_then_succeeds(server, caplog):
    server.script = [Reply(429, headers={"Retry-After": "1"}), Reply(content="a man at the beach.")]
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        [answer] = captioner(server).describe([draw(scenes(1)[0])], "Describe.")
    assert answer.text == "a man at the beach."
    assert time.monotonic() - started >= 1.0  # honoured Retry-After instead of its own short backoff
    assert len(server.requests) == 2
    assert KEY not in caplog.text


def test_retry_after_ms_is_honoured(server):
    server.script = [Reply(429, headers={"retry-after-ms": "1500"}), Reply()]  # OpenAI's header, in milliseconds
    started = time.monotonic()
    [answer] = captioner(server).describe([draw(scenes(1)[0])], "Describe.")
    assert answer.ok and time.monotonic() - started >= 1.5


def test_a_timeout_is_retried_with_a_log_line(server, caplog):
    server.script = [Reply(content="late", delay=1.5), Reply(content="a woman in a studio.")]
    with caplog.at_level(logging.WARNING, logger="lorapipe.caption"):
        [answer] = captioner(server, timeout_seconds=0.5).describe([draw(scenes(1)[0])], "Describe.")
    assert answer.text == "a woman in a studio."
    assert "timed out after 0.5 s (attempt 1 of 6); retrying" in caplog.text


def test_an_answer_cut_at_max_tokens_keeps_its_finished_part(server):
    server.script = [Reply(content="a woman smiling, wearing a red coat, standing on a bus", finish="length")]
    [answer] = captioner(server).describe([draw(scenes(1)[0])], "Describe.")
    assert answer.text == "a woman smiling, wearing a red coat"
    assert drop_unfinished("One sentence. And half a") == "One sentence."


def test_giving_up_names_the_server_and_its_message_not_the_key(server):
    server.script = [Reply(503)] * 3
    with pytest.raises(CaptionAPIError, match=r"127\.0\.0\.1.*gave up after 3 attempts \(HTTP 503: slow down\)") as err:
        captioner(server, max_retries=2).describe([draw(scenes(1)[0])], "Describe.")
    assert KEY not in str(err.value) and not isinstance(err.value, UserError)  # transient: the stage retries later


@pytest.mark.parametrize("reply, reason", [
    # Ollama /v1, a thinking model: the thinking took max_tokens, the answer is empty.
    (Reply(content="", finish="length", message={"reasoning": "The user wants a caption. Let me look at"}),
     "empty answer (the model's reasoning used up max_tokens=60"),
    (Reply(content=None, finish="stop", message={"reasoning_content": "Okay, so the image shows"}),  # vLLM
     "empty answer (the model answered with reasoning only)"),
    (Reply(content=None), "empty answer (finish_reason: stop)"),
    (Reply(content=None, message={"refusal": "I'm sorry, I can't help with identifying people in images."}),
     "refused: I'm sorry, I can't help with identifying people in images."),  # OpenAI's structured refusal
    (Reply(content="a woman standing in a", finish="content_filter"),
     "stopped by the server's content filter after: a woman standing in a"),
])
def test_an_answer_without_a_caption_is_a_failure_with_its_reason(server, reply, reason):
    server.script = [reply]
    [answer] = captioner(server).describe([draw(scenes(1)[0])], "Describe.")
    assert not answer.ok and answer.text == "" and answer.error.startswith(reason) and not answer.permanent


@pytest.mark.parametrize("reply, message", [
    (LLAMA_CPP_NO_MMPROJ, "HTTP 500: image input is not supported - hint: if this is unexpected, you may need to "
                          "provide the mmproj"),
    (OPENAI_NO_QUOTA, "HTTP 429: You exceeded your current quota"),
    (OPENAI_BAD_KEY, "HTTP 401: Incorrect API key provided"),
    (VLLM_TEXT_ONLY, "HTTP 400: Qwen2ForCausalLM is not a multimodal model"),
])
def test_a_permanent_error_stops_at_once_with_the_servers_message(server, reply, message):
    server.script = [reply] * 10
    with pytest.raises(CaptionServiceError, match=message) as err:
        captioner(server, concurrency=1).describe([draw(s) for s in scenes(3)], "Describe.")
    assert len(server.requests) == 1 and isinstance(err.value, UserError)  # no retry, no further image
    assert err.value.answers == [None, None, None]


def test_a_request_rejected_for_one_image_fails_that_image_only(server):
    server.script = [Reply(), Reply(400, error={"error": {"message": "Invalid image.", "type": "invalid_request_error",
                                                          "code": "invalid_image"}}), Reply()]
    answers = captioner(server, concurrency=1).describe([draw(s) for s in scenes(3)], "Describe.")
    assert [a.ok for a in answers] == [True, False, True]
    assert answers[1].error.endswith("HTTP 400: Invalid image.") and answers[1].permanent


# --- the caption stage ------------------------------------------------------------------------------


@pytest.fixture
def api_config(server, monkeypatch):
    monkeypatch.setenv("VLM_KEY", KEY)
    return CaptionConfig(backend="openai", model="gpt-4o", api_base_url=server.url, api_key_env="VLM_KEY",
                         api_concurrency=1, api_max_retries=1)


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """Three drawn portraits collected, validated and cropped once (cropping is the slow part)."""
    from helpers import cropped_demo_records
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("cropped")
    return root, cropped_demo_records(root / "photos", Workspace.at(root / "workspace"), 3)


@pytest.fixture
def workspace(cropped, tmp_path):
    """A private copy of the cropped workspace: nothing captioned yet."""
    import shutil

    from lorapipe.workspace import Workspace

    shutil.copytree(cropped[0] / "workspace", tmp_path / "workspace")
    return Workspace.at(tmp_path / "workspace")


@pytest.fixture
def records(cropped, workspace):
    return cropped[1]


def test_caption_stage_with_the_api_backend(server, records, workspace, tiny_models, api_config):
    from tasks.caption import caption_records

    config = api_config.model_copy(update={"api_concurrency": 2})
    out, stats = caption_records(records, workspace, config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["computed"] == 3 and [r.caption for r in out] == ["Jane Doe smiling, in a park."] * 3
    assert out[0].caption_by["base_url"] == server.url
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    _, stats = caption_records(records, workspace, config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["computed"] == 0 and len(server.requests) == 3  # cached per image: no new requests


def test_one_refused_image_keeps_the_others_and_is_asked_again(server, records, workspace, tiny_models,
                                                               api_config, caplog):
    from tasks.caption import caption_records

    refusal = "I'm sorry, I can't help with that."
    server.script = [Reply(), Reply(content=None, message={"refusal": refusal}), Reply()]
    with caplog.at_level(logging.WARNING, logger="lorapipe.caption"):
        out, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert stats == {"computed": 3, "reused": 0, "captions": 3, "failed": 1}
    assert [r.caption for r in out] == ["Jane Doe smiling, in a park.", "", "Jane Doe smiling, in a park."]
    assert out[1].kept and out[1].caption_error == f"refused: {refusal}" and out[0].caption_error is None
    assert "1 of 3 images got no usable caption (1x refused: I'm sorry" in caplog.text

    # The refusal was not cached: the next run asks about that image only, and this time it is answered.
    out, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert len(server.requests) == 4 and stats == {"computed": 1, "reused": 2, "captions": 3, "failed": 0}
    assert out[1].caption == "Jane Doe smiling, in a park." and out[1].caption_error is None


def test_an_empty_answer_from_a_thinking_model_is_not_cached(server, records, workspace, tiny_models, api_config):
    from tasks.caption import caption_records

    server.script = [Reply(content="", finish="length", message={"reasoning": "Let me think about the"})] * 3
    out, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["failed"] == 3 and all("reasoning used up max_tokens" in r.caption_error for r in out)
    out, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert stats["failed"] == 0 and len(server.requests) == 6 and all(r.caption for r in out)


def test_requests_in_flight_follow_api_concurrency_not_batch_size(server, records, workspace, tiny_models,
                                                                  api_config):
    from tasks.caption import caption_records

    server.script = [Reply(delay=0.4) for _ in range(3)]
    config = api_config.model_copy(update={"api_concurrency": 3, "batch_size": 1})
    caption_records(records, workspace, config, "Jane Doe", str(tiny_models.sdxl))
    assert server.max_in_flight == 3


def test_a_permanent_error_fails_the_stage_and_keeps_the_answers_before_it(server, records, workspace,
                                                                           tiny_models, api_config):
    from tasks.caption import caption_records

    server.script = [Reply(), Reply(), OPENAI_NO_QUOTA]
    with pytest.raises(UserError, match="HTTP 429: You exceeded your current quota"):
        caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert len(server.requests) == 3
    _, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert (stats["computed"], stats["reused"], len(server.requests)) == (1, 2, 4)  # the two answers were kept


def test_every_image_rejected_alike_fails_the_stage_in_one_line(server, records, workspace, tiny_models,
                                                                api_config):
    from tasks.caption import caption_records

    too_large = Reply(413, error={"error": {"message": "Request Entity Too Large"}})
    server.script = [too_large] * 3
    with pytest.raises(UserError, match=r"^caption: every image failed: .*HTTP 413: Request Entity Too Large$"):
        caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))


def test_a_fan_out_failure_reaches_the_caption_stage_without_asking_twice(server, records, workspace, tmp_path,
                                                                          tiny_models, api_config):
    from lorapipe.manifest import write_manifest
    from tasks.caption import caption_records, run_caption_chunk

    manifest = write_manifest(tmp_path / "crop.jsonl", records)
    server.script = [Reply(), Reply(content="a woman in a", finish="content_filter"), Reply()]
    chunk = run_caption_chunk(str(manifest), str(workspace.root), api_config, [r.id for r in records])
    assert (chunk["computed"], chunk["failed"]) == (3, 1)
    out, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert len(server.requests) == 3 and stats["failed"] == 1  # the worker's failure, not asked again
    assert out[1].caption_error.startswith("stopped by the server's content filter")
    _, stats = caption_records(records, workspace, api_config, "Jane Doe", str(tiny_models.sdxl))
    assert len(server.requests) == 4 and stats["failed"] == 0  # the next run asks again


# --- through the command line and Prefect ----------------------------------------------------------


def caption_workspace(tmp_path, records, workspace, server, tiny_models) -> str:
    from lorapipe.fsutil import atomic_write_json
    from lorapipe.manifest import write_manifest

    write_manifest(workspace.latest_manifest("crop"), records)
    atomic_write_json(workspace.root / "config.json", {
        "name": "Jane Doe", "images": str(tmp_path / "photos"), "workspace": str(workspace.root),
        "caption": {"backend": "openai", "model": "gpt-4o", "api_base_url": server.url, "api_key_env": "VLM_KEY",
                    "api_concurrency": 1, "api_max_retries": 1},
        "train": {"base_model": str(tiny_models.sdxl)}})
    return str(workspace.root)


def test_lorapipe_caption_keeps_going_past_a_refusal_and_asks_again(server, records, workspace, tmp_path,
                                                                     tiny_models, prefect_harness, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from lorapipe.manifest import read_manifest

    monkeypatch.setenv("VLM_KEY", KEY)
    ws = caption_workspace(tmp_path, records, workspace, server, tiny_models)
    server.script = [Reply(), Reply(content=None, message={"refusal": "I can't help with that."}), Reply()]
    result = CliRunner().invoke(app, ["caption", ws, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["failed"] == 1
    captioned = read_manifest(workspace.latest_manifest("caption"))
    assert [r.caption_error for r in captioned] == [None, "refused: I can't help with that.", None]

    result = CliRunner().invoke(app, ["caption", ws, "--json"])  # not the stage's cached result: one image to ask again
    assert result.exit_code == 0, result.output
    assert len(server.requests) == 4 and json.loads(result.stdout)["stats"]["failed"] == 0


def test_lorapipe_caption_stops_at_once_on_a_server_without_image_input(server, records, workspace, tmp_path,
                                                                         tiny_models, prefect_harness, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("VLM_KEY", KEY)
    ws = caption_workspace(tmp_path, records, workspace, server, tiny_models)
    server.script = [LLAMA_CPP_NO_MMPROJ] * 20
    result = CliRunner().invoke(app, ["caption", ws])
    assert result.exit_code == 2  # one line, no traceback
    assert "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj" in (
        result.stderr)
    assert len(server.requests) == 1  # neither the request nor the stage was retried
