"""The captioner interface: one answer per image, each a caption or the reason there is none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from lorapipe.errors import UserError


@dataclass(frozen=True)
class Answer:
    """What a captioner said about one image.

    `error` is None for a usable answer; otherwise `text` is empty and `error` says why (a refusal with its
    text, a content filter, an empty answer, the server's message), for the person who reviews it.
    `permanent` marks an error asking again cannot change (the server rejects the request itself).
    """

    text: str = ""
    error: str | None = None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class CaptionerStopped(RuntimeError):
    """The captioner stopped before answering every image (say, the server answered nothing at all).

    `answers` holds what it had answered, None where nothing was, so the good answers are kept. The stage
    fails and is retried.
    """

    def __init__(self, message: str, answers: list[Answer | None] | None = None):
        super().__init__(message)
        self.answers = list(answers or [])


class CaptionServiceError(CaptionerStopped, UserError):
    """The captioner cannot caption anything and no retry will change it: a rejected key, no quota, a model
    without image input. Raised at once with the server's message; never retried."""


class Captioner(Protocol):
    identity: dict
    """backend, model id and revision: recorded with every caption and part of its cache key."""

    chunk_size: int
    """How many images to hand `describe` at once: enough to keep the model or the server busy."""

    def describe(self, images: list[Image.Image], prompt: str) -> list[Answer]:
        """One answer per image, in order. Raises CaptionServiceError when nothing can be captioned."""
        ...

    def close(self) -> None:
        """Free the model (and GPU memory) before training needs it."""
        ...
