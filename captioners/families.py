"""The VLM families lorapipe captions with in process, what each needs installed, and how each is prompted.

A family is found from the model's `config.json` (`model_type`) before anything large is loaded, so a missing
dependency, a model that needs its repository's code, or a model without a chat template is one line naming
the fix, not three loads of the weights and a traceback.

Processors that carry a video processor (LLaVA-OneVision, Qwen2/2.5/3-VL, GLM-4.xV, SmolVLM, and any other
family built that way) need torchvision to load, even for images. Install it from the same index as torch so
the two builds match; PyPI's torchvision does not import beside the CPU torch wheel.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import UserError


@dataclass(frozen=True)
class TaskPrompt:
    """A family trained on fixed task prompts instead of chat: its documented captioning prompt."""

    default: str
    accepts: str  # a regex of the task prompts that caption; any other `caption.prompt` is replaced by `default`
    image_token_first: bool = False  # the processor expects the image token(s) written before the prompt

    def for_prompt(self, prompt: str) -> str:
        return prompt.strip() if re.fullmatch(self.accepts, prompt.strip()) else self.default


@dataclass(frozen=True)
class Family:
    name: str
    extra: str | None = None  # `pip install 'lorapipe[<extra>]'` installs what its processor needs
    modules: tuple[str, ...] = ()  # what its processor imports beyond torchvision
    task: TaskPrompt | None = None  # families without a chat template

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'lorapipe[{self.extra}]'"
        return "install torchvision built for your torch (same index as torch)"


# model_type (config.json) -> family. Families not listed work when they are native to transformers and have
# a chat template; their needs are found from their processor class.
FAMILIES = {
    "llava": Family("LLaVA"),  # LLaVA-1.5, JoyCaption (LLaVA with a Llama-3 template)
    "llava_next": Family("LLaVA-NeXT"),
    "llava_onevision": Family("LLaVA-OneVision", extra="onevision"),
    "qwen2_vl": Family("Qwen2-VL", extra="qwen-vl"),
    "qwen2_5_vl": Family("Qwen2.5-VL", extra="qwen-vl"),
    "qwen3_vl": Family("Qwen3-VL", extra="qwen-vl"),
    "qwen3_vl_moe": Family("Qwen3-VL", extra="qwen-vl"),
    "glm4v": Family("GLM-4.1V", extra="glm-v"),
    "glm4v_moe": Family("GLM-4.5V", extra="glm-v"),
    "glm46v": Family("GLM-4.6V", extra="glm-v"),
    "smolvlm": Family("SmolVLM", extra="smolvlm", modules=("num2words",)),
    "idefics3": Family("Idefics3"),
    "gemma3": Family("Gemma 3"),
    # PaliGemma's documented captioning prefix is "caption <lang>"; the processor adds the image tokens and BOS.
    "paligemma": Family("PaliGemma", task=TaskPrompt("caption en", r"caption [a-z]{2}(-[A-Za-z]+)?",
                                                     image_token_first=True)),
    # Florence-2 (native since transformers 5: florence-community/Florence-2-*) takes only task tokens.
    "florence2": Family("Florence-2", task=TaskPrompt("<MORE_DETAILED_CAPTION>",
                                                      r"<(CAPTION|DETAILED_CAPTION|MORE_DETAILED_CAPTION)>")),
}


def family_of(model_type: str) -> Family:
    return FAMILIES.get(model_type) or Family(model_type)


def model_type_of(model: str, revision: str | None, trust_remote_code: bool) -> str:
    """The model's `model_type`, from its config.json only. UserError when it cannot load here as asked."""
    from transformers import CONFIG_MAPPING, PretrainedConfig, __version__

    looks_local = Path(model).expanduser().is_absolute() or model.startswith(".") or Path(model).exists()
    if looks_local and not (Path(model).expanduser() / "config.json").is_file():
        raise UserError(f"caption.model {model!r}: no config.json there (a model folder or a hub id is expected)")
    config, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    model_type = config.get("model_type", "")
    if model_type in CONFIG_MAPPING:
        return model_type
    if "auto_map" in config and not trust_remote_code:
        raise UserError(
            f"caption.model {model!r} (model_type {model_type!r}) is not native to transformers {__version__} and "
            "needs code from its repository: set caption.trust_remote_code: true if you trust it, or serve it "
            "behind an OpenAI-compatible server (caption.backend: openai)")
    if "auto_map" not in config:
        raise UserError(f"caption.model {model!r}: model_type {model_type!r} is unknown to transformers {__version__}")
    return model_type


def required_modules(model_type: str) -> tuple[str, ...]:
    """What the family's processor imports: torchvision when it carries a video processor, plus its own."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    needs = list(family_of(model_type).modules)
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    if processor_class is not None and "video_processor" in processor_class.get_attributes():
        needs.insert(0, "torchvision")
    return tuple(needs)


def check_installed(model: str, model_type: str) -> None:
    """UserError naming the install extra when the family's processor cannot load here."""
    missing = []
    for module in required_modules(model_type):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(module)
        except Exception as err:  # a torchvision built for another torch fails with RuntimeError, not ImportError
            why = str(err).splitlines()[0][:120] if str(err) else "fails to import"
            missing.append(f"{module} ({type(err).__name__}: {why})")
    if missing:
        family = family_of(model_type)
        raise UserError(f"caption.model {model!r} is a {family.name} model; its processor needs "
                        f"{', '.join(missing)}: {family.install_hint()}")
