"""The captioner interface."""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Captioner(Protocol):
    identity: dict
    """backend, model id and revision: recorded with every caption and part of its cache key."""

    def describe(self, images: list[Image.Image], prompt: str) -> list[str]:
        """One raw answer per image, in order."""
        ...

    def close(self) -> None:
        """Free the model (and GPU memory) before training needs it."""
        ...
