"""The operator's serving policy: what a run started through the Prefect API may reach on the worker.

Whoever can start a run of a served deployment chooses its parameters. Without a policy those parameters
could name any environment variable as the VLM API key and any URL to send it and the photos to, any
folder on the worker to read photos or models from, any folder to write a workspace into, any address to
download from or any cluster to hand work to. So a served deployment runs under a policy the operator fixes
when serving (`lorapipe serve --allow-path ... --api-base-url ... --policy policy.yaml`), which no run
parameter can change:

- paths (photo sources and URL lists, the workspace, the train flow's manifest, local models: base model,
  its config folder, VAE, captioner) must lie under `path_roots`, after symlinks are resolved;
- downloads may reach non-public addresses only inside `allow_addresses` (a run's
  `collect.allow_addresses` must be a subset);
- photos go to a VLM API only at an address that is public or inside `allow_addresses`, or to one of the
  `api_base_urls` the operator listed (which may be private);
- an API key is read only from an environment variable in `api_key_envs` or a Prefect Secret block in
  `api_key_secrets`, and sent only to a server in `api_base_urls`;
- captioning is handed to a Dask/Ray scheduler only in `scale_out_addresses`;
- `caption.trust_remote_code` only if `allow_remote_code`.

`lorapipe serve` puts the policy in its own environment (LORAPIPE_SERVING_POLICY, JSON) before serving;
Prefect starts each flow run as a child process of `serve` with that environment, so every run of every
deployment it serves is checked against it at the start of the flow (`check_run`), and the API key and the
API's address again where they are used. A worker of a work pool gets a policy the same way: set
LORAPIPE_SERVING_POLICY (JSON, or the path of a YAML/JSON file) in the worker's environment. Where the
variable is not set (the CLI on one's own machine) nothing is restricted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError

from lorapipe.config import PipelineConfig, Strict, read_settings, settings_problems
from lorapipe.download import as_sources, is_url
from lorapipe.errors import UserError

POLICY_ENV = "LORAPIPE_SERVING_POLICY"
# A hub repository id: "name" or "owner/name" (what from_pretrained fetches when no such folder exists).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ServingPolicy(Strict):
    """What runs of a served deployment may reach; fixed by the operator, never by a run's parameters."""

    path_roots: list[str] = Field(
        default_factory=list,
        description="Folders runs may name paths under: photo sources, URL lists, workspaces, local models")
    allow_addresses: list[str] = Field(
        default_factory=list,
        description="Non-public addresses or networks downloads and VLM API calls may reach (e.g. 10.0.0.0/8)")
    api_base_urls: list[str] = Field(
        default_factory=list,
        description="VLM API servers runs may use whatever their address (API keys are sent to these only)")
    api_key_envs: list[str] = Field(
        default_factory=list, description="Environment variables a run may name as its API key")
    api_key_secrets: list[str] = Field(
        default_factory=list, description="Prefect Secret blocks a run may name as its API key")
    scale_out_addresses: list[str] = Field(
        default_factory=list, description="Dask/Ray schedulers runs may send captioning to (none: local only)")
    allow_remote_code: bool = Field(False, description="Let runs set caption.trust_remote_code")

    def networks(self) -> list:
        return [ipaddress.ip_network(entry, strict=False) for entry in self.allow_addresses]

    def merged(self, other: "ServingPolicy") -> "ServingPolicy":
        """Both policies' lists together (a policy file plus `lorapipe serve` flags)."""
        data = self.model_dump()
        for key, value in other.model_dump().items():
            data[key] = (data[key] or value) if isinstance(value, bool) else list(dict.fromkeys(data[key] + value))
        return ServingPolicy.model_validate(data)

    def to_env(self) -> str:
        return self.model_dump_json()


def policy_from_settings(data: dict, source: str) -> ServingPolicy:
    try:
        policy = ServingPolicy.model_validate(data)
        policy.networks()
    except ValidationError as err:
        raise UserError(f"{source}: {settings_problems(err)}") from None
    except ValueError as err:
        raise UserError(f"{source}: allow_addresses: {err}") from None
    for url in policy.api_base_urls:
        if urlsplit(url).scheme not in ("http", "https"):
            raise UserError(f"{source}: api_base_urls: {url!r} is not an http(s) URL")
    if (policy.api_key_envs or policy.api_key_secrets) and not policy.api_base_urls:
        raise UserError(f"{source}: API keys are sent only to the servers in api_base_urls (--api-base-url); "
                        "list the server these keys are for")
    return policy


def read_policy_file(path: str | Path) -> ServingPolicy:
    return policy_from_settings(read_settings(path, "serving policy"), str(path))


def current_policy() -> ServingPolicy | None:
    """The policy this process runs under (LORAPIPE_SERVING_POLICY), or None: nothing is restricted."""
    value = os.environ.get(POLICY_ENV, "").strip()
    if not value:
        return None
    if value.startswith("{"):
        try:
            return policy_from_settings(json.loads(value), POLICY_ENV)
        except json.JSONDecodeError as err:
            raise UserError(f"{POLICY_ENV}: not valid JSON ({err})") from None
    return read_policy_file(value)


def default_policy(config: PipelineConfig | None, cwd: Path | None = None) -> ServingPolicy:
    """What `lorapipe serve` allows when the operator names no path roots: the paths of the served job
    file (`--config`: its sources, workspace and local models) and `workspaces/` under the current folder
    (where a run without a workspace writes), and the job's own VLM API server and key."""
    roots = [str((cwd or Path.cwd()) / "workspaces")]
    if config is None:
        return ServingPolicy(path_roots=roots)
    roots += [*local_sources(config), str(config.workspace_path()), *(path for _, path in local_models(config))]
    caption = config.caption
    api = {}
    if caption.backend == "openai":
        keys = ({"api_key_secrets": [caption.api_key_secret]} if caption.api_key_secret
                else {"api_key_envs": [caption.api_key_env]} if caption.api_key_env else {})
        api = {"api_base_urls": [caption.api_base_url], **keys}
    return ServingPolicy(path_roots=[str(Path(r).expanduser().resolve()) for r in roots], **api)


def local_sources(config: PipelineConfig) -> list[str]:
    return [s for s in as_sources(config.images) if not is_url(s)]


def is_local_model(value: str) -> bool:
    """A model named by path (or by a name that exists as a path here), as opposed to a hub id."""
    return not HUB_ID.match(value) or Path(value).expanduser().exists()


def local_models(config: PipelineConfig) -> list[tuple[str, str]]:
    """(setting, path) of each model the settings name by a local path."""
    train, caption = config.train, config.caption
    named = [("train.base_model", train.base_model), ("train.base_model_config", train.base_model_config),
             ("train.vae", train.vae), ("caption.model", caption.model if caption.backend == "transformers" else None)]
    return [(setting, value) for setting, value in named if value and is_local_model(value)]


def _under(path: str, roots: list[Path]) -> bool:
    resolved = Path(path).expanduser().resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def path_problems(config: PipelineConfig, policy: ServingPolicy, manifest: str | None = None) -> list[str]:
    roots = [Path(r).expanduser().resolve() for r in policy.path_roots]
    named = [("images", s) for s in local_sources(config)]
    named.append(("workspace", str(config.workspace_path())))
    named += local_models(config)
    if manifest:
        named.append(("manifest", manifest))
    allowed = ", ".join(policy.path_roots) or "none"
    return [f"{setting}: {value} is outside the folders this deployment may use ({allowed})"
            for setting, value in named if not _under(value, roots)]


def api_problems(config: PipelineConfig, policy: ServingPolicy) -> list[str]:
    caption = config.caption
    problems = []
    if caption.trust_remote_code and not policy.allow_remote_code:
        problems.append("caption.trust_remote_code: this deployment does not run code from model repositories")
    if caption.backend == "openai":
        if key_problem := api_key_problem(caption.api_key_env, caption.api_key_secret, policy):
            problems.append(key_problem)
        if where := caption_destination_problem(caption, policy):
            problems.append(f"caption.api_base_url: {where}")
    return problems


def caption_destination_problem(caption, policy: ServingPolicy) -> str | None:
    """Why photos (and an API key) may not go to `caption.api_base_url`, or None.

    A server the operator listed is fine whatever its address; any other must be public (or inside
    `allow_addresses`) and gets no key.
    """
    if caption.api_base_url.rstrip("/") in {u.rstrip("/") for u in policy.api_base_urls}:
        return None
    if problem := destination_problem(caption.api_base_url, policy):
        return problem
    if caption.api_key_secret or caption.api_key_env:
        return (f"an API key is sent only to the servers the operator listed "
                f"({', '.join(policy.api_base_urls) or 'none'}), not to {caption.api_base_url}")
    return None


def api_key_problem(env: str | None, secret: str | None, policy: ServingPolicy) -> str | None:
    """Why a run may not read this key (a variable or Secret block the operator did not allow), or None."""
    if secret:
        if secret not in policy.api_key_secrets:
            return (f"caption.api_key_secret: {secret!r} is not a Secret block this deployment may use "
                    f"(allowed: {', '.join(policy.api_key_secrets) or 'none'})")
    elif env and env not in policy.api_key_envs:
        return (f"caption.api_key_env: {env!r} is not an environment variable this deployment may read "
                f"(allowed: {', '.join(policy.api_key_envs) or 'none'}; an empty value sends no key)")
    return None


def destination_problem(url: str, policy: ServingPolicy) -> str | None:
    """Why photos may not be sent to `url`: not http(s), or a host that is not public and not allowed."""
    from lorapipe.download import DownloadFailed, resolve_checked, split_url

    try:
        _, host, port = split_url(url)
        resolve_checked(host, port, policy.networks())
    except DownloadFailed as err:
        return err.reason
    return None


def network_problems(config: PipelineConfig, policy: ServingPolicy) -> list[str]:
    problems = []
    allowed = policy.networks()
    for entry in config.dataset.collect.allow_addresses:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue  # the downloader names it
        if not any(net.version == a.version and net.subnet_of(a) for a in allowed):
            problems.append(f"dataset.collect.allow_addresses: {entry} is not among the addresses this deployment "
                            f"may reach ({', '.join(policy.allow_addresses) or 'public ones only'})")
    address = config.scale_out.address
    if config.scale_out.task_runner != "none" and address and address not in policy.scale_out_addresses:
        problems.append(f"scale_out.address: {address} is not a cluster this deployment may use "
                        f"({', '.join(policy.scale_out_addresses) or 'local clusters only'})")
    return problems


def check_run(config: PipelineConfig, manifest: str | None = None) -> None:
    """Refuse a run whose parameters reach beyond the serving policy (no-op without one).

    Raises:
        UserError: every problem found, in one line.
    """
    policy = current_policy()
    if policy is None:
        return
    if problems := policy_problems(config, policy, manifest):
        raise UserError("refused by this deployment's serving policy: " + "; ".join(problems))


def policy_problems(config: PipelineConfig, policy: ServingPolicy, manifest: str | None = None) -> list[str]:
    """Every way `config` (and the train flow's `manifest`) reaches beyond `policy`, one phrase each."""
    return path_problems(config, policy, manifest) + api_problems(config, policy) + network_problems(config, policy)


def with_defaults(policy: ServingPolicy, config: PipelineConfig | None) -> ServingPolicy:
    """`policy`, with `default_policy(config)`'s path roots if it names none, and its API server and key
    if it names no API server or key."""
    default = default_policy(config)
    update = {}
    if not policy.path_roots:
        update["path_roots"] = default.path_roots
    if not (policy.api_base_urls or policy.api_key_envs or policy.api_key_secrets):
        update.update(api_base_urls=default.api_base_urls, api_key_envs=default.api_key_envs,
                      api_key_secrets=default.api_key_secrets)
    return policy.model_copy(update=update)
