"""Vision-language models in process, through transformers' native classes (`AutoModelForImageTextToText`):
LLaVA-1.5/NeXT/OneVision, JoyCaption, Qwen2/2.5/3-VL, GLM-4.xV, Idefics3/SmolVLM, Gemma 3 through their chat
templates; PaliGemma and Florence-2 through their documented task prompts (captions/families.py).

Batched greedy generation, so a batch gives the same captions as one at a time: decoder-only models pad on
the left (the prompt flush against the answer) and their answer is what follows the prompt; encoder-decoder
models (Florence-2) keep the tokenizer's padding and their whole output is the answer.

Prompts go through the processor's own chat-template path (`apply_chat_template(tokenize=True)`): one list of
images per prompt, as every processor expects, and no second BOS when the template writes it (Gemma 3,
Idefics3, Llama-3 templates): rendering to text and tokenizing again would add the tokenizer's BOS a second time.
"""

from __future__ import annotations

import gc
import logging

import torch
from PIL import Image

from captioners.base import Answer
from captioners.families import Family, check_installed, family_of, model_type_of
from lorapipe.devices import resolve_device
from lorapipe.errors import UserError

log = logging.getLogger("lorapipe.caption")


def require_prompt_format(model: str, family: Family, processor) -> None:
    """A chat template, or a family with a documented task prompt: otherwise nothing says how to ask."""
    if family.task is None and not processor.chat_template:
        raise UserError(f"caption.model {model!r} has no chat template and is not a family captioned through a "
                        "task prompt (PaliGemma, Florence-2): pick its instruction-tuned (-instruct/-it) variant")


class TransformersCaptioner:
    """Captions with a loaded model and its processor; `from_pretrained` loads them from a hub id or folder."""

    def __init__(self, model, processor, batch_size: int = 8, max_new_tokens: int = 60, identity: dict | None = None):
        self.model = model.eval()
        self.processor = processor
        self.family: Family = family_of(model.config.model_type)
        self.batch_size = self.chunk_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = next(model.parameters()).dtype
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        self.identity = identity or {"backend": "transformers", "model": model.name_or_path, "revision": None}
        if not self.encoder_decoder:
            processor.tokenizer.padding_side = "left"
        require_prompt_format(self.identity["model"], self.family, processor)
        self._told_task = False

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 60,
        quantization: str = "none",
        trust_remote_code: bool = False,
    ) -> "TransformersCaptioner":
        """Load `model` (hub id or folder). Everything that no retry can fix is a UserError, raised before the
        weights load: an unknown or remote-code model, a missing dependency, no chat template, 4/8-bit on CPU."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(device)
        if quantization != "none" and device != "cuda":
            raise UserError(f"caption.quantization: {quantization} loading needs a CUDA GPU (bitsandbytes); "
                            f"device is {device}")
        model_type = model_type_of(model, revision, trust_remote_code)
        check_installed(model, model_type)
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            processor = AutoProcessor.from_pretrained(model, **kwargs)
        except ImportError as err:  # a requirement check_installed does not know of
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"caption.model {model!r}: its processor cannot load here: {first_line}") from err
        require_prompt_format(model, family_of(model_type), processor)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
            )
            kwargs["device_map"] = {"": 0}
        # safetensors only: a repository's pickle weights (.bin) are never read (lorapipe/modelfiles.py)
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, use_safetensors=True, **kwargs)
        if quantization == "none":
            vlm.to(device)
        identity = {"backend": "transformers", "model": model, "revision": revision, "quantization": quantization}
        return cls(vlm, processor, batch_size=batch_size, max_new_tokens=max_new_tokens, identity=identity)

    def inputs(self, images: list[Image.Image], prompt: str):
        """The model's inputs for one batch: token ids (padded), pixel values and the family's extras."""
        images = [img.convert("RGB") for img in images]
        if self.family.task is not None:
            task = self.family.task.for_prompt(prompt)
            if self.family.task.image_token_first:  # PaliGemma's processor then adds BOS after the image tokens
                task = self.processor.image_token + task
            inputs = self.processor(images=images, text=[task] * len(images), return_tensors="pt", padding=True)
        else:
            conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": prompt}]}] for image in images]
            inputs = self.processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True})
        inputs.pop("labels", None)  # PaliGemma's processor builds training labels: generation has no use for them
        return inputs

    def describe(self, images: list[Image.Image], prompt: str) -> list[Answer]:
        if self.family.task is not None and not self._told_task:
            self._told_task = True
            log.info("%s answers task prompts, not instructions: asking %r", self.family.name,
                     self.family.task.for_prompt(prompt))
        answers: list[Answer] = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.inputs(images[start : start + self.batch_size], prompt).to(self.model.device)
            inputs = {k: v.to(self.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
            with torch.inference_mode():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            if not self.encoder_decoder:  # a decoder-only model returns the prompt and the answer
                generated = generated[:, inputs["input_ids"].shape[1] :]
            for text in self.processor.batch_decode(generated, skip_special_tokens=True):
                text = text.strip()
                answers.append(Answer(text) if text else Answer(error="the model gave an empty answer"))
        return answers

    def close(self) -> None:
        """Free the model so training gets the whole GPU."""
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
