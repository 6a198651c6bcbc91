"""Vision-language captioners behind one small interface. No prefect imports: usable from any script.

    captioner = load_captioner("llava", "llava-hf/llava-1.5-7b-hf")
    raw = captioner.describe(images, prompt)          # what the model said
    caption = finish_caption(raw[0], name="Jane Doe", count_tokens=...)   # what we train on
"""

from captioners.base import Captioner
from captioners.postprocess import clip_token_counter, finish_caption


def load_captioner(backend: str, model: str, **options) -> Captioner:
    if backend == "llava":
        from captioners.llava import LlavaCaptioner

        return LlavaCaptioner(model, **options)
    raise ValueError(f"unknown captioner backend {backend!r} (known: llava)")


__all__ = ["Captioner", "clip_token_counter", "finish_caption", "load_captioner"]
