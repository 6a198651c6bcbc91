"""The run form: how the Prefect UI shows a run's settings (the `config` parameter), and its values.

The settings (`PipelineConfig`) nest by stage, as job.yaml does and as the code reads them
(`config.train.rank`, `config.caption.model`). Shown in that shape, a form puts ~90 settings in front of a
person, the few they change among downloader internals. The form lifts those few to the top (`QUICK`:
one table) beside the name, the photos and the workspace, and keeps every other setting under "Advanced
settings", in the settings' own shape (`advanced.train.micro_batch_size`), with titles written for people.

Form values become settings in one place, `settings_from_form`, which `PipelineConfig` applies when it
validates: a flow run started from the form gets the same `PipelineConfig` as one started from job.yaml.
Values in the settings' own shape (job.yaml's, `config.model_dump()`) pass through unchanged, so scripts and
API calls that send them keep working; the form's top level therefore admits them (no
`additionalProperties: false` there), and the settings model still refuses unknown keys.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, create_model

ADVANCED = "advanced"

# The settings people change, lifted from their section to the top of the form: form field → (section, key).
QUICK: dict[str, tuple[str, str]] = {
    "rank": ("train", "rank"),
    "epochs": ("train", "epochs"),
    "learning_rate": ("train", "learning_rate"),
    "captioner": ("caption", "model"),
    "approval": ("review", "approval"),
}
TOP = ("name", "images", *QUICK, "workspace")  # the form's order above the advanced settings

# Titles (and, where the settings' own description is not enough, descriptions) by dotted path; a setting
# not listed keeps the settings model's title. Sections are the advanced settings' groups.
SECTIONS: dict[str, tuple[str, str]] = {
    ADVANCED: ("Advanced settings", "Everything else, in job.yaml's sections; the defaults follow the recipe"),
    "dataset": ("Photos: collecting, checking, duplicates, cropping", ""),
    "dataset.collect": ("Collecting from folders, archives and URLs", ""),
    "dataset.validate": ("Checking each image", ""),
    "dataset.dedup": ("Duplicates", ""),
    "dataset.crop": ("Cropping to SDXL's buckets", ""),
    "caption": ("Captions", "How the vision-language model is run or reached"),
    "review": ("Caption review", "When a person is asked, and which captions are flagged"),
    "train": ("Training", "The LoRA recipe beyond rank, epochs and learning rate"),
    "evaluate": ("Samples after training", "Images rendered with and without the LoRA"),
    "scale_out": ("Captioning on a cluster", "Dask or Ray, for many photos"),
    "probe": ("Does the base model know this person?", "The renders that decide whether to train the text "
              "encoders (when Training → Train both text encoders is auto)"),
}
TITLES: dict[str, str | tuple[str, str]] = {
    "name": "Name",
    "images": ("Photos", "Folders, zip/tar archives, URL lists (.txt, or .csv with a url column) or URLs; "
               "several as a list"),
    "workspace": ("Workspace", "Folder for this person's outputs (default: workspaces/<name>)"),
    "rank": ("LoRA rank", "8 is enough for a person: a larger rank makes a larger file that changes more of "
             "the base model's style"),
    "epochs": "Epochs",
    "learning_rate": ("Learning rate", "The UNet's learning rate (Lion: the recipe's 4e-4)"),
    "captioner": ("Captioner", "The vision-language model: hub id or folder (LLaVA by default), or an API "
                  "server's model name (Advanced settings → Captions → Where captions come from)"),
    "approval": "Caption approval",
    "dataset.collect.max_file_bytes": "Largest file (bytes)",
    "dataset.collect.max_archive_bytes": "Most bytes unpacked from one archive",
    "dataset.collect.max_archive_members": "Most entries in one archive",
    "dataset.collect.connect_timeout": "Connect timeout (seconds)",
    "dataset.collect.read_timeout": "Read timeout (seconds)",
    "dataset.collect.download_timeout": "Download timeout (seconds)",
    "dataset.collect.retries": "Download retries",
    "dataset.collect.backoff_seconds": "First retry's delay (seconds)",
    "dataset.collect.max_retry_after": "Longest Retry-After honoured (seconds)",
    "dataset.collect.concurrency": "Downloads at once",
    "dataset.collect.per_host_concurrency": "Downloads at once from one host",
    "dataset.collect.allow_addresses": "Private addresses downloads may reach",
    "dataset.collect.user_agent": "User-Agent",
    "dataset.validate.min_side": "Shortest side (pixels)",
    "dataset.validate.max_pixels": "Most pixels",
    "dataset.validate.blur_threshold": "Blur threshold",
    "dataset.dedup.phash_threshold": "Near-duplicate distance (bits)",
    "dataset.dedup.workers": "Hashing processes",
    "dataset.crop.resolution": "Resolution (pixels)",
    "dataset.crop.bucket_step": "Bucket step (pixels)",
    "dataset.crop.face_aware": "Keep the face in the crop",
    "dataset.crop.headroom": "Headroom above the face",
    "dataset.crop.fallback": "Crop without a face",
    "caption.backend": "Where captions come from",
    "caption.revision": "Captioner revision",
    "caption.max_new_tokens": "Longest answer (tokens)",
    "caption.batch_size": "Images per batch",
    "caption.quantization": "Quantization",
    "caption.trust_remote_code": "Run the model repository's own code",
    "caption.api_base_url": "API server",
    "caption.api_key_env": "API key: environment variable",
    "caption.api_key_secret": "API key: Prefect Secret block",
    "caption.api_concurrency": "API requests at once",
    "caption.api_timeout_seconds": "API request timeout (seconds)",
    "caption.api_max_retries": "API request retries",
    "review.wait": "How the run waits for a person",
    "review.timeout_hours": "Longest wait (hours)",
    "review.on_timeout": "When nobody answered in time",
    "review.max_tokens": "Longest caption (CLIP tokens)",
    "review.min_words": "Shortest caption (words)",
    "review.placeholder_tokens": "Made-up trigger words to flag",
    "train.base_model": "Base model",
    "train.base_model_config": "Base model's configuration (single-file checkpoints)",
    "train.revision": "Base model revision",
    "train.vae": "VAE",
    "train.alpha": "LoRA alpha",
    "train.targets": "Layers the LoRA adapts",
    "train.lora_init": "LoRA initialisation",
    "train.weight_decay": "Weight decay",
    "train.lr_scheduler": "Learning-rate schedule",
    "train.lr_warmup_steps": "Warm-up steps",
    "train.effective_batch_size": "Images per optimizer step",
    "train.micro_batch_size": "Images per forward pass",
    "train.repeats": "Repeats per epoch",
    "train.min_bucket_images": "Fewest images in a bucket",
    "train.mixed_precision": "Precision",
    "train.min_snr_gamma": "Min-SNR gamma",
    "train.train_text_encoders": "Train both text encoders",
    "train.text_encoder_lr": "Learning rate: CLIP ViT-L text encoder",
    "train.text_encoder_2_lr": "Learning rate: OpenCLIP bigG text encoder",
    "train.checkpoint_every_steps": "Checkpoint every (steps)",
    "train.keep_checkpoints": "Checkpoints kept",
    "train.sample_prompts": "Sample prompts while training",
    "train.sample_every_epochs": "Sample every (epochs)",
    "train.sample_steps": "Sampling steps while training",
    "train.holdout_images": "Held-out images",
    "train.holdout_min_images": "Hold out only from datasets of at least",
    "train.timeout_minutes": "Time limit (minutes)",
    "train.num_processes": "GPUs",
    "train.device": ("Device", "Where training runs; auto: the GPU when there is one"),
    "evaluate.steps": "Sampling steps",
    "evaluate.guidance_scale": "Guidance scale",
    "evaluate.seeds": "Seeds per prompt",
    "evaluate.style_prompts": "Prompts without the person (style pollution)",
    "evaluate.max_reference_photos": "Photos to measure identity against",
    "probe.seeds": "Renders",
    "probe.steps": "Sampling steps",
    "probe.guidance_scale": "Guidance scale",
    "probe.seed": "First seed",
    "probe.known_distance": "Face distance that counts as known",
    "probe.min_face_share": "Share of renders with a face",
    "scale_out.task_runner": "Cluster",
    "scale_out.address": "Scheduler address",
    "scale_out.workers": "Local cluster's workers",
    "scale_out.chunk_size": "Images per cluster task",
}
# What a choice between types is called on its tab (the UI would say "str", "list", "int").
CHOICE_TITLES = {"string": "text", "array": "list", "integer": "number", "number": "number", "boolean": "yes/no"}


def is_form(data: Any) -> bool:
    """Values from the run form (rather than in the settings' own shape)."""
    return isinstance(data, dict) and (ADVANCED in data or any(field in data for field in QUICK))


def settings_from_form(data: dict) -> dict:
    """The settings' shape of the form's values: `rank` → `train.rank`, `advanced.X` → `X`, ...

    An empty (None) quick field means its default. Values in the settings' own shape come back unchanged.

    Raises:
        ValueError: a setting given twice with different values (`rank` and `train.rank`), or
            `advanced` that is not a mapping.
    """
    data = dict(data)
    advanced = data.pop(ADVANCED, None) or {}
    if not isinstance(advanced, dict):
        raise ValueError(f"{ADVANCED}: expected the settings' sections (train, caption, ...), not "
                         f"{type(advanced).__name__}")
    quick = {field: value for field in QUICK if (value := data.pop(field, None)) is not None}
    for key, value in advanced.items():
        if key in data and data[key] != value:
            raise ValueError(f"{key} is given both at the top and under {ADVANCED}: give it once")
        data[key] = value
    for field, value in quick.items():
        section, key = QUICK[field]
        group = dict(data.get(section) or {})
        if group.get(key, value) != value:
            raise ValueError(f"{field} ({value!r}) and {section}.{key} ({group[key]!r}) differ: give one")
        data[section] = {**group, key: value}
    return data


def form_values(config: BaseModel) -> dict:
    """`config` as the form's values (what a deployment prefills the form with)."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)  # empty fields mean None
    top = {field: data.pop(field) for field in list(data) if not isinstance(data[field], dict)}  # not sections
    for field, (section, key) in QUICK.items():
        top[field] = data[section].pop(key)
    return _in_form_order(top) | {ADVANCED: data}


def form_schema(settings: type[BaseModel]) -> dict:
    """The JSON schema of the form for the settings model `settings` (what Prefect hands the UI).

    Built from the settings' own schema: sections inlined, the QUICK fields lifted out of their sections,
    "X or None" shown as X (empty means None), titles from SECTIONS and TITLES.
    """
    # The settings' own schema, without the override that makes PipelineConfig's schema this form.
    plain = create_model(f"{settings.__name__}Fields", __base__=BaseModel,
                         **{name: (f.annotation, f) for name, f in settings.model_fields.items()})
    raw = plain.model_json_schema(by_alias=True)
    settings_schema = _inline(raw, raw.pop("$defs", {}))
    props = settings_schema["properties"]
    sections = {key: value for key, value in props.items() if value.get("type") == "object"}
    top = {key: value for key, value in props.items() if key not in sections}
    for field, (section, key) in QUICK.items():
        top[field] = sections[section]["properties"].pop(key)
    advanced = {"type": "object", "properties": sections, "additionalProperties": False}
    properties = _in_form_order(top) | {ADVANCED: advanced}
    properties = {key: _for_people(value, key) for key, value in properties.items()}
    return {"title": "Run settings", "type": "object", "properties": properties,
            "required": [f for f in settings_schema.get("required", []) if f in properties]}


def _in_form_order(top: dict) -> dict:
    """TOP's fields first, in its order; any other top-level setting after them."""
    return {field: top[field] for field in TOP if field in top} | {k: v for k, v in top.items() if k not in TOP}


def _inline(schema: Any, defs: dict) -> Any:
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]])
        return _inline({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    return {key: _inline(value, defs) for key, value in schema.items()}


def _for_people(schema: dict, path: str) -> dict:
    """One property of the form, people's titles applied, "X or None" shown as X, nested ones too."""
    schema = dict(schema)
    options = schema.get("anyOf")
    if options and {"type": "null"} in options:  # an empty field means None: no "None" choice to make
        rest = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        schema = {**rest[0], **schema} if len(rest) == 1 else {**schema, "anyOf": rest}
        if schema.get("default", ...) is None:
            del schema["default"]
    if "anyOf" in schema:
        schema["anyOf"] = [{**option, "title": str(option["const"]) if "const" in option else
                            CHOICE_TITLES.get(option.get("type"), option.get("type", "value"))}
                           for option in schema["anyOf"]]
    title = SECTIONS.get(path) or TITLES.get(path)
    if isinstance(title, tuple):
        schema["title"], description = title
        if description:
            schema["description"] = description
    elif title:
        schema["title"] = title
    elif path not in SECTIONS:  # a setting nobody titled: its name, as a sentence ("Gradient checkpointing")
        schema["title"] = path.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    if schema.get("type") == "object" and "properties" in schema:
        schema["properties"] = {key: _for_people(value, key if path == ADVANCED else f"{path}.{key}")
                                for key, value in schema["properties"].items()}
    return schema
