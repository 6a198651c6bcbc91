"""Vision-language captioners behind one small interface. No prefect imports: usable from any script.

    captioner = load_captioner("transformers", "llava-hf/llava-1.5-7b-hf")
    answers = captioner.describe(images, prompt)                            # one Answer per image
    caption = finish_caption(answers[0].text, name="Jane Doe", count_tokens=...)  # what we train on
    # answers[i].error: why there is no usable caption (a refusal, a content filter, the server's message)
    captioner.close()                                                       # free the GPU
"""

from captioners.base import Answer, Captioner, CaptionerStopped, CaptionServiceError
from captioners.postprocess import clip_token_counter, finish_caption

# "llava" and "glm4v" name the same in-process code path: transformers' AutoModelForImageTextToText.
BACKENDS = {"transformers": "transformers", "llava": "transformers", "glm4v": "transformers", "openai": "openai"}


def load_captioner(backend: str, model: str, **options) -> Captioner:
    kind = BACKENDS.get(backend)
    if kind == "transformers":
        from captioners.transformers_vlm import TransformersCaptioner

        allowed = ("revision", "device", "batch_size", "max_new_tokens", "quantization", "trust_remote_code")
        return TransformersCaptioner.from_pretrained(model, **{k: v for k, v in options.items() if k in allowed})
    if kind == "openai":
        from captioners.openai_api import OpenAICaptioner

        return OpenAICaptioner(model, **options)
    raise ValueError(f"unknown captioner backend {backend!r} (known: {', '.join(BACKENDS)})")


__all__ = ["Answer", "Captioner", "CaptionerStopped", "CaptionServiceError", "clip_token_counter", "finish_caption",
           "load_captioner"]
