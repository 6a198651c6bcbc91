"""Vision-language models in process, through transformers' native classes: LLaVA-1.5, LLaVA-NeXT (1.6),
LLaVA-OneVision, GLM-4.xV, and anything else `AutoModelForImageTextToText` loads with a chat template.

Batched greedy generation with left padding, so a batch gives the same captions as one at a time.
"""

from __future__ import annotations

import gc
import logging

import torch
from PIL import Image

from lorapipe.devices import resolve_device

log = logging.getLogger("lorapipe.caption")


class TransformersCaptioner:
    def __init__(
        self,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 60,
        quantization: str = "none",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.identity = {"backend": "transformers", "model": model, "revision": revision,
                         "quantization": quantization}
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(model, **kwargs)
        # Decoder-only generation needs the prompt flush against the answer: pad on the left.
        self.processor.tokenizer.padding_side = "left"
        if quantization != "none":
            if self.device != "cuda":
                raise ValueError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); device is {self.device}")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
            )
            kwargs["device_map"] = {"": 0}
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype, **kwargs)
        if quantization == "none":
            self.model.to(self.device)
        self.model.eval()

    def prompt_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def describe(self, images: list[Image.Image], prompt: str) -> list[str]:
        text = self.prompt_text(prompt)
        answers: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, text=[text] * len(batch), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def close(self) -> None:
        """Free the model so training gets the whole GPU."""
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
