"""Configuration: pydantic models that reject unknown keys.

The same models are the Prefect flow parameters (the UI renders them as forms) and what the CLI reads
from YAML (`lorapipe run --config job.yaml`). Defaults encode the recipe in README.md.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorapipe.errors import UserError
from lorapipe.modelfiles import pickle_name_problem
from lorapipe.textio import read_user_text
from lorapipe.workspace import slugify

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"

DEFAULT_CAPTION_PROMPT = (
    "Describe this photo in one sentence for an image generator. Say what the person wears, their pose and "
    "expression, the setting, the lighting and the framing. Do not describe their face, hair color, age or "
    "ethnicity, and do not start with 'The image shows'."
)

# Tokens people copy from old DreamBooth guides; the recipe uses the person's real name instead.
DEFAULT_PLACEHOLDER_TOKENS = ["ohwx", "sks", "zwx", "xyz person", "[name]", "<name>", "{name}", "<person>"]


# Every numeric setting has bounds: a value outside them is refused when the settings are read, never
# discovered deep in a stage (a negative micro-batch once trained 0 steps and wrote an untrained LoRA).
SEED_MAX = 2**32 - 1  # numpy's and torch's generators both accept 0 .. 2**32-1
MAX_NAME_CHARS = 100  # file names (workspace, LoRA files) are made from it; 255 bytes is the usual limit


class Strict(BaseModel):
    # allow_inf_nan=False: "inf" or "nan" in YAML is never a usable timeout, rate or weight.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CollectConfig(Strict):
    recursive: bool = Field(True, description="Look for images in subfolders (and archive folders) too")
    max_file_bytes: int = Field(
        40_000_000, ge=1, le=2_000_000_000, description="Largest file taken from a download or an archive")
    max_archive_bytes: int = Field(
        2_000_000_000, ge=1, le=10**12,
        description="Most bytes unpacked from one archive in total (zip bombs stop here)",
    )
    max_archive_members: int = Field(
        20_000, ge=1, le=10_000_000,
        description="Most entries one archive may hold (folders and skipped files count); more rejects the archive",
    )
    connect_timeout: float = Field(10.0, gt=0, le=3600, description="Seconds to wait for a download's connection")
    read_timeout: float = Field(30.0, gt=0, le=3600, description="Seconds to wait for the next bytes of a download")
    download_timeout: float = Field(300.0, gt=0, le=86_400, description="Most seconds one download may take in all")
    retries: int = Field(3, ge=0, le=20, description="Retries of a download after a timeout, 429 or 5xx answer")
    backoff_seconds: float = Field(
        1.0, ge=0, le=3600, description="First retry's delay; doubles each retry, with jitter")
    max_retry_after: float = Field(
        60.0, ge=0, le=86_400, description="Longest Retry-After honoured; longer ones fail the URL")
    concurrency: int = Field(8, ge=1, le=64, description="Downloads at once")
    per_host_concurrency: int = Field(2, ge=1, le=64, description="Downloads at once from one host")
    allow_addresses: list[str] = Field(
        default_factory=list,
        description="Non-public addresses or networks downloads may reach anyway (e.g. 127.0.0.1 for a test server)",
    )
    user_agent: str = Field("lorapipe/0.1 (+dataset collection)", description="User-Agent sent with downloads")


class ValidateConfig(Strict):
    min_side: int = Field(
        768, ge=1, le=16_384, description="Reject images whose shorter side is below this many pixels")
    max_pixels: int = Field(
        89_478_485, ge=1, le=1_000_000_000,
        description="Reject larger images (Pillow's decompression-bomb limit) instead of decoding",
    )
    blur_threshold: float = Field(
        15.0, ge=0, le=1e6, description="Flag (but keep) images whose Laplacian variance at 1024 px is below this"
    )


class DedupConfig(Strict):
    phash_threshold: int = Field(
        8,
        ge=0,
        le=64,
        description="Near duplicates: perceptual hashes at most this many bits apart (resize/recompress moves 0-4)",
    )
    workers: int = Field(0, ge=0, le=256, description="Processes hashing images (0: one per CPU core)")


class CropConfig(Strict):
    resolution: int = Field(1024, ge=64, le=4096, description="Training area is resolution² pixels (SDXL: 1024)")
    bucket_step: int = Field(64, ge=8, le=512, description="Bucket sides are multiples of this")
    face_aware: bool = Field(True, description="Place crops to keep the largest face inside (OpenCV Haar cascade)")
    headroom: float = Field(0.4, ge=0, le=2, description="Space kept above a face, in face heights")
    fallback: Literal["saliency", "center"] = Field("saliency", description="Crop placement when no face is found")


class DatasetConfig(Strict):
    collect: CollectConfig = Field(default_factory=CollectConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    crop: CropConfig = Field(default_factory=CropConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CaptionConfig(Strict):
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="transformers: the model in this process; openai: any OpenAI-compatible server"
    )
    model: str = Field(LLAVA_15_7B, description="Hub id or folder (transformers), or the server's model name")
    revision: str | None = Field(None, description="Pin a hub revision (commit or tag)")
    prompt: str = Field(DEFAULT_CAPTION_PROMPT, description="What the VLM is asked")
    max_new_tokens: int = Field(60, ge=1, le=512, description="Longest answer generated")
    batch_size: int = Field(8, ge=1, le=256, description="Images per generate() call (transformers)")
    class_word: str | None = Field(None, description="Optional class word after the name, e.g. 'woman'")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the captioner runs (transformers)")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the VLM in 4 or 8 bits with bitsandbytes, for small GPUs"
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code from the model's repository (only models not native to transformers)"
    )
    api_base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible server, ending in /v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key")
    api_key_secret: str | None = Field(None, description="Or: the name of a Prefect Secret block holding it")
    api_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once")
    api_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="Per request")
    api_max_retries: int = Field(5, ge=0, le=20, description="Retries on 429, 5xx and timeouts")
    api_image_max_side: int | None = Field(
        None, ge=64, le=8192, description="Longest side of the images sent, in px; empty: what the model reads "
        "(OpenAI: short side 768; Gemma 3: 896; LLaVA: 672; others 1024)")
    api_image_detail: Literal["low", "high", "auto"] | None = Field(
        None, description="OpenAI's image detail; empty: high for OpenAI's API, not sent to other servers")

    @model_validator(mode="after")
    def no_pickle_model(self) -> "CaptionConfig":
        if self.backend == "transformers" and (problem := pickle_name_problem(self.model)):
            raise ValueError(f"model: {problem}")
        return self


class ReviewConfig(Strict):
    approval: Literal["auto", "flagged-only", "all"] = Field(
        "flagged-only",
        description="auto: nobody is asked, flagged captions are left out; flagged-only: a person reviews "
        "flagged captions; all: a person reviews every caption",
    )
    wait: Literal["auto", "pause", "suspend"] = Field(
        "auto", description="pause keeps the run's process; suspend frees it (deployments only); auto picks"
    )
    timeout_hours: float = Field(24.0, gt=0, le=24 * 365, description="How long to wait for a person")
    on_timeout: Literal["continue", "fail"] = Field(
        "continue", description="After the wait: train on the approved captions only, or fail the run"
    )
    max_tokens: int = Field(75, ge=1, le=225, description="Longest caption in CLIP tokens (SDXL reads 75)")
    min_words: int = Field(3, ge=1, le=75, description="Shorter captions are flagged")
    placeholder_tokens: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PLACEHOLDER_TOKENS), description="Made-up trigger tokens to flag"
    )


# A LoRA rank, wherever one is named (training, the rank comparison, resizing): a LoRA of rank 0 has no
# weights, and kohya's tools and peft take none above a layer's features (SDXL's largest: 5120 in, 1280 out).
Rank = Annotated[int, Field(ge=1, le=1024)]


class TrainConfig(Strict):
    base_model: str = Field(SDXL_BASE, description="Hub id, local diffusers folder, or one .safetensors checkpoint")
    base_model_config: str | None = Field(
        None, description="For a single-file checkpoint: the diffusers folder or hub id describing it (default SDXL base)"
    )
    revision: str | None = Field(None, description="Pin a hub revision")
    vae: str | None = Field(None, description="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix")
    rank: Rank = Field(8, description="LoRA rank (8 is enough for a person)")
    alpha: float = Field(
        1.0, gt=0, le=1024,
        description="LoRA alpha; scale = alpha/rank. 1.0 as in kohya and OneTrainer, where 4e-4 was tuned",
    )
    targets: Literal["kohya", "attention"] = Field(
        "kohya", description="kohya: every Linear in the UNet's transformer blocks; attention: q/k/v/out only"
    )
    lora_init: Literal["kohya", "gaussian"] = Field(
        "kohya", description="kohya: A kaiming-uniform (std 1/sqrt(3 x in features)), B zero, as kohya's LoRAModule; "
        "gaussian: A ~ N(0, 1/rank) (5-15x larger on SDXL: moves faster under Lion)")
    learning_rate: float = Field(4e-4, gt=0, le=1, description="UNet learning rate")
    optimizer: Literal["auto", "lion", "lion-pytorch", "bnb-lion", "bnb-lion8bit"] = Field(
        "auto", description="auto: the fastest exact Lion (lorapipe's multi-tensor Lion); bnb-lion8bit is not exact"
    )
    weight_decay: float = Field(1e-2, ge=0, le=1, description="Decoupled weight decay (Lion)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "constant", description="How the learning rate changes over training")
    lr_warmup_steps: int = Field(
        0, ge=0, le=1_000_000, description="Warmup steps (constant_with_warmup, cosine, linear)")
    effective_batch_size: int = Field(
        64, ge=1, le=4096, description="Images per optimizer step, by gradient accumulation")
    micro_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        4, description="Images per forward pass; 'auto' probes the largest that fits in GPU memory"
    )
    epochs: int = Field(12, ge=1, le=1000, description="Passes over the training images (12 for ~200 photos)")
    repeats: int = Field(1, ge=1, le=100, description="Times each image is seen per epoch")
    min_bucket_images: int = Field(
        2, ge=1, le=10_000, description="Smaller buckets are merged into the nearest larger one")
    mixed_precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 on GPU; the CPU always uses fp32")
    gradient_checkpointing: bool = Field(False, description="Less memory, ~30% slower steps")
    min_snr_gamma: float | None = Field(
        None, gt=0, le=100, description="Min-SNR loss weighting, e.g. 5.0 (off when empty)")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Noise offset, e.g. 0.0357 for darker darks")
    train_text_encoders: bool | Literal["auto"] = Field(
        "auto", description="LoRA on both text encoders, for people SDXL doesn't know; auto: the probe stage "
        "renders the name with the base model and decides (a face like the photos: frozen; none: trained)")
    text_encoder_lr: float = Field(
        4e-5, gt=0, le=1, description="Learning rate of the CLIP ViT-L text encoder's LoRA")
    text_encoder_2_lr: float = Field(
        4e-5, gt=0, le=1, description="Learning rate of the OpenCLIP bigG text encoder's LoRA")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Same seed, data and settings: the same LoRA")
    checkpoint_every_steps: int = Field(
        20, ge=0, le=1_000_000, description="Also checkpoint every N steps (0: epoch ends only)")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Complete checkpoints kept; older ones are pruned")
    keep_lora_versions: int = Field(
        2, ge=0, le=1000, description="Earlier exported LoRAs kept in loras/versions/ (0: only loras/<name>.safetensors)")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["a photo of {name}", "a portrait of {name}, smiling, outdoors"],
        description="Rendered at epoch ends with {name} as the name and as 'a person'",
    )
    sample_every_epochs: int = Field(
        1, ge=0, le=1000, description="Sample every N epochs (0: only at the end)")
    sample_steps: int = Field(25, ge=1, le=1000, description="Sampling steps for training samples")
    holdout_images: int = Field(
        4, ge=0, le=1000, description="Images kept out of training to measure held-out loss")
    holdout_min_images: int = Field(
        40, ge=1, le=1_000_000, description="Hold images out only from datasets at least this big")
    timeout_minutes: float | None = Field(
        None, gt=0, le=7 * 24 * 60, description="Stop (and let the retry resume) after this long")
    num_processes: int = Field(
        1, ge=1, le=64, description="GPUs to train on (more than 1: accelerate launch, DDP)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("base_model", "base_model_config", "vae")
    @classmethod
    def no_pickle(cls, value: str | None) -> str | None:
        if problem := pickle_name_problem(value):
            raise ValueError(problem)
        return value

    @property
    def tokenizer_source(self) -> str:
        """Where the CLIP tokenizer comes from: a single file carries none, its config folder does."""
        single_file = self.base_model.endswith((".safetensors", ".ckpt"))
        return (self.base_model_config or SDXL_BASE) if single_file else self.base_model


class EvaluateConfig(Strict):
    prompts: list[str] = Field(
        default_factory=lambda: ["a photo of {name}, smiling, outdoors", "a portrait of {name} in a studio"],
        description="Sample prompts; {name} becomes the person's name",
    )
    seed: int = Field(1234, ge=0, le=SEED_MAX, description="Seed of the first prompt's noise (+1 for each next)")
    steps: int = Field(25, ge=1, le=1000, description="Sampling steps")
    guidance_scale: float = Field(5.0, ge=0, le=30, description="Classifier-free guidance scale")
    seeds: int = Field(2, ge=1, le=64, description="Seeds per prompt (identity mean and spread are over them all)")
    style_prompts: list[str] = Field(
        default_factory=lambda: ["a photo of a person in a park", "a city street at golden hour"],
        description="Prompts without the name: how much the LoRA changes them is its style pollution",
    )
    max_reference_photos: int = Field(
        32, ge=1, le=1000, description="Photos of the person whose faces the samples are measured against "
        "(held-out first)")


class ProbeConfig(Strict):
    """Does the base model know this person? Decides train.train_text_encoders when it is auto."""

    prompt: str = Field("a photo of {name}", description="Rendered with the base model; {name} is the person's name")
    seeds: int = Field(4, ge=1, le=64, description="Renders of the prompt, one seed each")
    steps: int = Field(25, ge=1, le=1000, description="Sampling steps")
    guidance_scale: float = Field(5.0, ge=0, le=30, description="Classifier-free guidance scale")
    seed: int = Field(4321, ge=0, le=SEED_MAX, description="Seed of the first render (+1 for each next)")
    known_distance: float = Field(
        0.6, gt=0, le=2, description="Mean face distance to the photos below which the person counts as known "
        "(dlib's same-person threshold)")
    min_face_share: float = Field(
        0.5, ge=0, le=1, description="Share of renders that must show a face to call the person known")


class ScaleOutConfig(Strict):
    task_runner: Literal["none", "dask", "ray"] = Field(
        "none", description="Fan captioning out over a Dask or Ray cluster (prefect-dask / prefect-ray); none: in-process"
    )
    address: str | None = Field(
        None, description="Scheduler of a running cluster, e.g. tcp://10.0.0.5:8786 (Dask) or ray://head:10001; "
        "empty: start a local one"
    )
    workers: int = Field(
        2, ge=1, le=256, description="Worker processes of the local cluster (when no address is given)")
    chunk_size: int = Field(32, ge=1, le=10_000, description="Images per captioning task sent to the cluster")


class PipelineConfig(Strict):
    """Every setting of a run, nested by stage (job.yaml's shape).

    As a flow parameter it is shown as the run form (lorapipe/run_form.py): its JSON schema is the form's,
    and it validates the form's values as well as its own shape, converting them in one place.
    """

    name: str = Field(description="The person's real name: the trigger in every caption")
    images: str | list[str] = Field(
        description="Where the photos are: folders, zip/tar archives, URL lists (.txt or .csv with a url column), URLs"
    )
    workspace: str | None = Field(
        None, description="Where outputs go (default: under workspaces/, named after the person: workspaces/jane-doe)")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    scale_out: ScaleOutConfig = Field(default_factory=ScaleOutConfig)

    @field_validator("name")
    @classmethod
    def real_name(cls, value: str) -> str:
        """Trimmed; refused when blank (every caption would "contain" it), too long for a file name, or
        holding control characters (line breaks, tabs, bidi overrides) that no caption or file name should."""
        value = value.strip()
        if not value:
            raise ValueError("the name is blank: give the person's real name, the trigger in every caption")
        control = next((c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
        if control is not None:
            raise ValueError(f"the name contains the control character U+{ord(control):04X}")
        if len(value) > MAX_NAME_CHARS:
            raise ValueError(f"the name is {len(value)} characters long; at most {MAX_NAME_CHARS} (it names files)")
        return value

    @model_validator(mode="before")
    @classmethod
    def from_run_form(cls, data):
        from lorapipe.run_form import is_form, settings_from_form

        return settings_from_form(data) if is_form(data) else data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler) -> dict:
        from lorapipe.run_form import form_schema

        return form_schema(cls)

    def workspace_path(self) -> Path:
        return Path(self.workspace) if self.workspace else Path("workspaces") / slugify(self.name)


class RankComparisonConfig(Strict):
    """The same reviewed dataset trained at several ranks, each LoRA measured the same way."""

    ranks: list[Rank] = Field(default_factory=lambda: [4, 8, 16, 64, 128], min_length=1,
                             description="LoRA ranks to train (alpha as in train.alpha)")
    text_encoders: Literal["decided", "both"] = Field(
        "decided", description="decided: as the probe (or train.train_text_encoders) says; both: each rank with "
        "and without text-encoder LoRA")
    loras: list[str] = Field(default_factory=list, description="Other kohya-format LoRA files of this person to "
                             "measure alongside (someone else's 64-dim file, a resized one)")
    resize_to: list[Rank] = Field(default_factory=list, description="Also resize the largest trained rank to these "
                                 "ranks by SVD and measure those files")
    tolerance: float = Field(0.03, ge=0, description="A rank whose mean face distance is within this of the best "
                             "counts as good enough (dlib distance; photos of one person spread ~0.05-0.1)")


class NightlyConfig(Strict):
    """The nightly retrain's schedule (a deployment setting, not a run parameter)."""

    cron: str = Field("0 3 * * *", description="When the nightly retrain starts (cron: minute hour day month weekday)")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in, e.g. Europe/Berlin")
    active: bool = Field(True, description="Off: the nightly deployment exists but is not scheduled")

    @field_validator("timezone")
    @classmethod
    def known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from None
        return value


def read_settings(path: str | Path, what: str = "settings file") -> dict:
    """The mapping a YAML settings file holds ({} for an empty file).

    Raises:
        UserError: the file is missing, a folder, not UTF-8, not YAML (with the line), or not a mapping.
    """
    text = read_user_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where} not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected settings as `key: value` lines at the top level, not a "
                        f"{type(data).__name__}")
    return data


def settings_problems(err: ValidationError) -> str:
    """A pydantic error as one line: `train.rank: Input should be greater than or equal to 1; ...`.

    A setting with alternatives (`micro_batch_size`: a number or 'auto') gets one entry, the alternatives
    joined by "or", instead of pydantic's one entry per alternative under internal names.
    """
    problems: dict[str, list[str]] = {}
    for e in err.errors():  # pydantic names alternatives "constrained-int", "literal['auto']": not settings
        where = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("-" in p or "[" in p)))
        problems.setdefault(where or "settings", []).append(e["msg"])
    return "; ".join(f"{where}: {' or '.join(msgs)}" for where, msgs in problems.items())


def load_config(path: str | Path, **overrides) -> PipelineConfig:
    """The settings in a YAML file with `overrides` merged over them.

    Raises:
        UserError: the file cannot be read as settings, or a setting is missing or out of bounds.
    """
    data = read_settings(path)
    try:
        return PipelineConfig.model_validate(deep_merge(data, overrides))
    except ValidationError as err:
        raise UserError(f"{path}: {settings_problems(err)}") from None


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """A nested settings mapping as {dotted name: value}, e.g. {"train.epochs": 12}."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def deep_merge(base: dict, overrides: dict) -> dict:
    """`overrides` merged into `base`, section by section. A `None` (YAML `null`, or an empty value) removes
    the setting, so its default applies again: `vae: null` clears a remembered VAE override."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
