"""Every model a run will load, found before the first stage: a local folder or file, the Hugging Face
cache, or the hub when it can be reached.

Without this a machine that cannot reach the hub (an air-gapped GPU box, a proxy, an outage) ran the CPU
stages, then spent minutes in the hub client's retries times the stage's, and ended in a traceback. Now
such a run stops before anything runs, with one line per model saying which setting names it, where it
was looked for and how to get it.

The hub's offline setting is honoured: with `HF_HUB_OFFLINE=1` only the cache counts and nothing is asked
of the network. Otherwise a model that is not cached is looked up on the hub once (`HfApi.model_info`,
one request, a few seconds' timeout, no retries): reachable, it will download when its stage loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lorapipe.config import SDXL_BASE, PipelineConfig
from lorapipe.errors import UserError
from lorapipe.modelfiles import pickle_name_problem
from lorapipe.policy import is_local_model

HUB_TIMEOUT_SECONDS = 8.0
# The stages that load each kind of model.
LOADS_BASE_MODEL = {"probe", "train", "export", "evaluate"}  # export reads the UNet's config for kohya's block names
LOADS_CAPTIONER = {"caption"}
COUNTS_TOKENS = {"caption", "review"}  # captions are cut to 75 CLIP tokens with the base model's tokenizer


@dataclass(frozen=True)
class ModelSource:
    setting: str  # e.g. "train.base_model"
    value: str  # a hub id, a folder or a file
    revision: str | None = None
    marker: str = "config.json"  # a file every copy of such a model has, looked up in the hub cache


def models_to_load(config: PipelineConfig, stages: list[str] | set[str]) -> list[ModelSource]:
    """The models the given stages load, each once (the first setting that names it)."""
    stages = set(stages)
    train, caption = config.train, config.caption
    wanted: list[ModelSource] = []
    base_files = stages & (LOADS_BASE_MODEL | COUNTS_TOKENS)
    if base_files:
        single_file = Path(train.base_model).suffix == ".safetensors"
        if stages & LOADS_BASE_MODEL or not single_file:
            wanted.append(ModelSource("train.base_model", train.base_model, train.revision,
                                      "" if single_file else "model_index.json"))
        if single_file:  # its component configs and tokenizers come from another folder or hub id
            wanted.append(ModelSource("train.base_model_config", train.base_model_config or SDXL_BASE,
                                      None, "model_index.json"))
    if stages & LOADS_BASE_MODEL and train.vae:
        wanted.append(ModelSource("train.vae", train.vae, None, "" if train.vae.endswith(".safetensors") else
                                  "config.json"))
    if stages & LOADS_CAPTIONER and caption.backend == "transformers":
        wanted.append(ModelSource("caption.model", caption.model, caption.revision, "config.json"))
    seen, unique = set(), []
    for source in wanted:
        if (source.value, source.revision) not in seen:
            seen.add((source.value, source.revision))
            unique.append(source)
    return unique


def check_models(config: PipelineConfig, stages: list[str] | set[str]) -> None:
    """Raise a UserError naming every model the stages cannot load; nothing is loaded or downloaded.

    Raises:
        UserError: one line: each model that is missing with its setting, where it was looked for, and how
            to get it (models the hub would give, were it reachable, share one explanation).
    """
    problems = [p for source in models_to_load(config, stages) if (p := model_problem(source))]
    if not problems:
        return
    own = [p.text for p in problems if not p.download]
    to_download = [p for p in problems if p.download]
    if to_download:
        named = " and ".join(f"{p.source.setting} {p.source.value}" for p in to_download)
        commands = " and ".join(f"`hf download {p.source.value}`" for p in to_download)
        verb = "is" if len(to_download) == 1 else "are"
        own.append(f"{named} {verb} not in the Hugging Face cache ({hub_cache_dir()}) and {to_download[0].text}: "
                   f"run {commands} on a machine with internet and copy its cache here (or point "
                   f"HF_HOME at it), or set {' and '.join(p.source.setting for p in to_download)} to a local "
                   "folder" + ("" if offline() else "; once cached, HF_HUB_OFFLINE=1 keeps runs off the network"))
    raise UserError("; ".join(own))


@dataclass(frozen=True)
class Problem:
    source: ModelSource
    text: str  # the whole problem; or, when `download`, why it cannot be downloaded now
    download: bool = False  # a hub model that only needs downloading (the hub is offline or unreachable)


def model_problem(source: ModelSource) -> Problem | None:
    """Why `source` cannot be loaded; None when it can."""
    what = f"{source.setting} {source.value}" + (f" (revision {source.revision})" if source.revision else "")
    if problem := pickle_name_problem(source.value):
        return Problem(source, f"{source.setting}: {problem}")
    if is_local_model(source.value):
        if not Path(source.value).expanduser().exists():
            return Problem(source, f"{what}: no such folder or file (a local model is a diffusers or transformers "
                                   "folder, or one .safetensors file)")
        return None
    if in_hub_cache(source.value, source.revision, source.marker):
        return None
    if offline():
        return Problem(source, "HF_HUB_OFFLINE is set, so nothing is downloaded", download=True)
    return _hub_problem(source, what)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def in_hub_cache(repo_id: str, revision: str | None, marker: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, marker or "config.json", revision=revision), str)


@lru_cache(maxsize=64)
def _hub_problem(source: ModelSource, what: str) -> Problem | None:
    """One request to the hub (remembered for this process: the CLI and the flow both check)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(source.value, revision=source.revision, timeout=HUB_TIMEOUT_SECONDS)
        return None
    except GatedRepoError:
        return Problem(source, f"{what}: gated on the hub: accept its terms at {constants.ENDPOINT}/{source.value}, "
                               "then `hf auth login` (or set HF_TOKEN)")
    except RevisionNotFoundError:
        return Problem(source, f"{what}: the hub has no such revision of it")
    except RepositoryNotFoundError:
        return Problem(source, f"{what}: no such model on the hub ({constants.ENDPOINT}), or it is private "
                               "(`hf auth login`): check the id, or name a local folder")
    except Exception as err:  # no connection, a proxy's error page, a timeout: the hub cannot be reached
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Problem(source, f"the hub at {constants.ENDPOINT} cannot be reached ({reason[:100]})", download=True)
