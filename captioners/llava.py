"""LLaVA family in process, through transformers' native classes (LLaVA-1.5, LLaVA-NeXT, OneVision).

Batched greedy generation with left padding, so a batch gives the same captions as one at a time.
"""

from __future__ import annotations

import gc

import torch
from PIL import Image

from lorapipe.devices import resolve_device


class LlavaCaptioner:
    def __init__(
        self,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 60,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.identity = {"backend": "llava", "model": model, "revision": revision}
        self.processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        # Decoder-only generation needs the prompt flush against the answer: pad on the left.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            model, revision=revision, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()

    def describe(self, images: list[Image.Image], prompt: str) -> list[str]:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        answers: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, text=[text] * len(batch), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
