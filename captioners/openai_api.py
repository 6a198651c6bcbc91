"""Any OpenAI-compatible chat-completions server: GPT-4o-class hosted models, Ollama's /v1, vLLM,
LM Studio, llama.cpp's server, lmdeploy (which is how CogVLM/CogVLM2 are served today).

Images go as base64 JPEG data URLs. Requests run a few at a time; 429s, 5xx and timeouts are retried
with exponential backoff and jitter, honouring Retry-After. The API key is sent, never logged.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from lorapipe.download import retry_after_seconds

log = logging.getLogger("lorapipe.caption")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_WAIT_SECONDS = 120.0


class CaptionAPIError(RuntimeError):
    pass


def data_url(image: Image.Image, max_side: int = 1024) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
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
        **_ignored,
    ):
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_tokens = max_new_tokens
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff_seconds
        self.identity = {"backend": "openai", "model": model, "base_url": base_url.rstrip("/"), "revision": None}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_seconds, connect=10.0))

    def describe(self, images: list[Image.Image], prompt: str) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda image: self._describe_one(image, prompt), images))

    def _describe_one(self, image: Image.Image, prompt: str) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait)
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last_error, wait = "timed out", self._backoff(attempt)
                continue
            except httpx.TransportError as err:
                last_error, wait = f"connection failed ({type(err).__name__})", self._backoff(attempt)
                continue
            if response.status_code in RETRY_STATUS:
                last_error = f"HTTP {response.status_code}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
                wait = min(self._backoff(attempt) if retry_after is None else retry_after, MAX_WAIT_SECONDS)
                log.info("%s: %s, retrying in %.1f s", self.url, last_error, wait)
                continue
            if response.status_code >= 400:
                raise CaptionAPIError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}")
            return self._answer(response)
        raise CaptionAPIError(f"{self.url}: gave up after {self.max_retries + 1} attempts ({last_error})")

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(MAX_WAIT_SECONDS, self.backoff * 2**attempt))  # "full jitter"

    def _answer(self, response: httpx.Response) -> str:
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise CaptionAPIError(f"{self.url}: unexpected response: {response.text[:300]}") from err
        if isinstance(content, list):  # some servers answer with content parts
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        content = (content or "").strip()
        if choice.get("finish_reason") == "length":
            log.info("answer cut at max_tokens=%d; keeping its finished part", self.max_tokens)
            content = drop_unfinished(content)
        return content

    def close(self) -> None:
        self.client.close()
