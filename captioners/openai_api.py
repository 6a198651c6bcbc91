"""Any OpenAI-compatible chat-completions server: OpenAI's own API, Ollama's /v1, vLLM, LM Studio, llama.cpp's
server, lmdeploy (which is how CogVLM/CogVLM2 are served today).

Each image is one request, `concurrency` at a time, sent as a JPEG data URL at the size the model reads
(`image_policy`). Every answer stands alone (captioners/base.py):

- a usable caption: the message's `content` (an answer cut at max_tokens keeps its finished clauses);
- no usable caption, kept as the image's reason: a structured `refusal`, `finish_reason: content_filter`, or
  empty content. Reasoning models put their thinking in `reasoning` / `reasoning_content` (Ollama, vLLM); no
  server documents that field as the answer, so it is never used as a caption: empty content with reasoning
  says the thinking used up max_tokens;
- transient trouble (429 without a quota error, 5xx, 408, timeouts, dropped connections) is retried with
  backoff and full jitter, honouring `retry-after-ms` and `Retry-After`, with a log line per retry;
- a request the server rejects for this image (another 4xx) fails that image only, with the server's message;
- a rejection that holds for every image stops at once with the server's message (CaptionServiceError):
  401/402/403/404, OpenAI's `insufficient_quota`, a model without image input (llama.cpp's 500 "image input is
  not supported", vLLM's "not a multimodal model").

The API key is sent, never logged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
from PIL import Image

from captioners.base import Answer, CaptionerStopped, CaptionServiceError
from lorapipe.download import retry_after_seconds

log = logging.getLogger("lorapipe.caption")

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# The key, the account, the model name or the URL: the same answer for every image.
SERVICE_STATUS = {401, 402, 403, 404, 405, 501}
SERVICE_CODES = {"insufficient_quota", "invalid_api_key", "model_not_found", "billing_not_active",
                 "account_deactivated", "unsupported_country_region_territory"}
# A model or server without image input, in the words of llama.cpp, vLLM, Ollama and LM Studio.
NO_IMAGE_INPUT = re.compile(r"image input is not supported|not a multimodal model|does not support (image|vision)"
                            r"|unsupported content part type|mmproj|vision is not supported", re.IGNORECASE)
MAX_WAIT_SECONDS = 120.0


class CaptionAPIError(CaptionerStopped):
    """The server answered nothing usable after every retry (down, hung, unreachable): retried later."""


# --- image size -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePolicy:
    """How an image is sent: at most `max_side` px on its long side and `short_side` on its short side, and
    OpenAI's `detail` when set. Sending more pixels than the model reads costs upload time and nothing else."""

    max_side: int = 1024
    short_side: int | None = None
    detail: str | None = None

    def resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = min(1.0, self.max_side / max(width, height),
                    (self.short_side or max(width, height)) / min(width, height))
        if scale < 1.0:
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
        return image


# What each model reads, by name (served names differ per server: "gemma3:27b", "google/gemma-3-27b-it").
MODEL_IMAGE_SIDES = [
    (re.compile(r"gemma-?3", re.I), 896),  # Gemma 3: SigLIP at 896x896
    (re.compile(r"llama-?3\.2.*vision", re.I), 1120),  # Llama 3.2 Vision: up to 2x2 tiles of 560
    (re.compile(r"cogvlm", re.I), 1344),  # CogVLM2: 1344x1344
    (re.compile(r"llava", re.I), 672),  # LLaVA-NeXT (Ollama's llava): tiles of 336 up to 672x672
]
OPENAI_MODEL = re.compile(r"^(gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4|chatgpt)", re.I)


def image_policy(model: str, base_url: str, max_side: int | None = None, detail: str | None = None) -> ImagePolicy:
    """The size the model reads, unless `max_side` says otherwise; `detail` is sent to OpenAI's API (where
    "high" fits the image in 2048x2048, then its short side in 768 px, and "low" reads 512x512) and when set."""
    openai = urlparse(base_url).hostname == "api.openai.com" or bool(OPENAI_MODEL.match(model))
    if openai:
        detail = detail or "high"
    if max_side:
        return ImagePolicy(max_side=max_side, detail=detail)
    if openai:
        return ImagePolicy(512, detail=detail) if detail == "low" else ImagePolicy(2048, short_side=768, detail=detail)
    side = next((side for pattern, side in MODEL_IMAGE_SIDES if pattern.search(model)), 1024)
    return ImagePolicy(max_side=side, detail=detail)


def data_url(image: Image.Image, policy: ImagePolicy = ImagePolicy()) -> str:
    image = policy.resize(image.convert("RGB"))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def drop_unfinished(text: str) -> str:
    """An answer cut off at max_tokens: keep it up to its last finished sentence or clause."""
    for boundary in (r"[.!?]", r"[;,]"):
        ends = [m.end() for m in re.finditer(boundary, text)]
        if ends:
            return text[: ends[-1]].rstrip(" ,;")
    return text


# --- server errors ----------------------------------------------------------------------------------


def server_message(response: httpx.Response) -> tuple[str, str]:
    """(message, code) from an error body: OpenAI's {"error": {...}}, vLLM's {"message": ...}, FastAPI's
    {"detail": ...}, Ollama's {"error": "..."}, or the text itself."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300], ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)
        code = str(error.get("code") or error.get("type") or "")
    else:
        message, code = str(error), ""
    return " ".join(str(message).split())[:300], code


def retry_wait(response: httpx.Response) -> float | None:
    """OpenAI's `retry-after-ms` (milliseconds), else `Retry-After` (seconds or an HTTP date)."""
    millis = response.headers.get("retry-after-ms")
    try:
        if millis is not None:
            return float(millis) / 1000.0
    except ValueError:
        pass
    return retry_after_seconds(response.headers.get("retry-after"))


# --- the captioner ----------------------------------------------------------------------------------


class OpenAICaptioner:
    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        max_new_tokens: int = 60,
        concurrency: int = 4,
        timeout_seconds: float = 60.0,
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        image_max_side: int | None = None,
        image_detail: str | None = None,
        **_ignored,
    ):
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_tokens = max_new_tokens
        self.concurrency = concurrency
        self.chunk_size = 4 * concurrency  # enough images to keep `concurrency` requests in flight
        self.timeout = timeout_seconds
        self.max_retries = max_retries
        self.backoff = backoff_seconds
        self.images = image_policy(model, base_url, image_max_side, image_detail)
        self.identity = {"backend": "openai", "model": model, "base_url": base_url.rstrip("/"), "revision": None}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_seconds, connect=10.0))
        self._answered = 0  # usable answers so far: none at all means the server, not the image, is the problem

    def describe(self, images: list[Image.Image], prompt: str) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(images)
        stop = threading.Event()
        stopped: list[CaptionerStopped] = []

        def ask(i: int) -> None:
            if stop.is_set():
                return
            try:
                answers[i] = self._describe_one(images[i], prompt, stop)
            except CaptionerStopped as err:
                stopped.append(err)
                stop.set()

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:  # at most `concurrency` requests in flight
            list(pool.map(ask, range(len(images))))
        if stopped:
            raise type(stopped[0])(str(stopped[0]), answers)
        return answers

    def _payload(self, image: Image.Image, prompt: str) -> dict:
        picture = {"url": data_url(image, self.images)}
        if self.images.detail:
            picture["detail"] = self.images.detail
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": picture},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }

    def _describe_one(self, image: Image.Image, prompt: str, stop: threading.Event) -> Answer | None:
        payload = self._payload(image, prompt)
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(1, attempts + 1):
            wait = None
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last_error = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as err:
                last_error = f"connection failed ({type(err).__name__})"
            else:
                if response.status_code < 400:
                    answer = self._answer(response)
                    if answer.ok:
                        self._answered += 1
                    return answer
                message, code = server_message(response)
                status = f"HTTP {response.status_code}: {message}"
                if (response.status_code in SERVICE_STATUS or code in SERVICE_CODES
                        or NO_IMAGE_INPUT.search(message)):
                    raise CaptionServiceError(f"{self.url}: {status}")
                if response.status_code not in RETRY_STATUS:
                    return Answer(error=f"the server rejected this image: {status}", permanent=True)
                last_error, wait = status, retry_wait(response)
            if attempt == attempts:
                break
            wait = min(self._backoff(attempt) if wait is None else wait, MAX_WAIT_SECONDS)
            log.warning("%s: %s (attempt %d of %d); retrying in %.1f s", self.url, last_error, attempt, attempts, wait)
            if stop.wait(wait):  # another request stopped the run: leave this image unanswered
                return None
        gave_up = f"{self.url}: gave up after {attempts} attempts ({last_error})"
        if not self._answered:
            raise CaptionAPIError(gave_up)  # nothing answered yet: the server, not this image, is the problem
        return Answer(error=gave_up)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(MAX_WAIT_SECONDS, self.backoff * 2 ** (attempt - 1)))  # "full jitter"

    def _answer(self, response: httpx.Response) -> Answer:
        try:
            choice = response.json()["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Answer(error=f"unexpected response from {self.url}: {' '.join(response.text.split())[:300]}")
        content, refusal = message.get("content"), message.get("refusal")
        if isinstance(content, list):  # content parts (some servers), possibly with a refusal part
            refusal = refusal or " ".join(p.get("refusal", "") for p in content if isinstance(p, dict)).strip()
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = (content or "").strip()
        finish = choice.get("finish_reason")
        if refusal:
            return Answer(error=f"refused: {' '.join(str(refusal).split())}")
        if finish == "content_filter":
            return Answer(error="stopped by the server's content filter"
                                + (f" after: {content}" if content else " (finish_reason: content_filter)"))
        if not content:
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if reasoning and finish == "length":
                why = (f"the model's reasoning used up max_tokens={self.max_tokens}: raise caption.max_new_tokens "
                       "or turn its thinking off")
            elif reasoning:
                why = "the model answered with reasoning only"
            else:
                why = f"finish_reason: {finish}" if finish else "no content"
            return Answer(error=f"empty answer ({why})")
        if finish == "length":
            log.info("answer cut at max_tokens=%d; keeping its finished part", self.max_tokens)
            content = drop_unfinished(content)
        return Answer(content)

    def close(self) -> None:
        self.client.close()
