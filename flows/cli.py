"""`lorapipe`: the whole pipeline (`run`, `demo`) or one stage at a time (`lorapipe dedup WORKSPACE`)."""

from __future__ import annotations

import getpass
import json
import logging
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from pydantic import ValidationError

import flows  # noqa: F401  (sets the environment before prefect is imported)
from lorapipe.errors import UserError
from lorapipe.config import (NightlyConfig, PipelineConfig, deep_merge, flat_settings, read_settings,
                             settings_problems)
from lorapipe.fsutil import atomic_write_json, read_json
from lorapipe.local_server import prefect_api
from lorapipe.policy import ServingPolicy
from lorapipe.workspace import Workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

CONFIG_HELP = "YAML settings, merged over the workspace's config.json (and remembered)"


def _overrides(**flags) -> dict:
    """Flags into the nested config shape; unset flags (None) leave the YAML or defaults alone."""
    out: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _images(images: Optional[List[str]]) -> str | list[str] | None:
    """One --images stays a plain string (the common case, and the shape of older configs)."""
    if not images:
        return None
    return images[0] if len(images) == 1 else list(images)


def _fail(message: str) -> NoReturn:
    """A usage error: one line on stderr, exit status 2 (as main() prints a UserError raised later on)."""
    typer.echo(f"lorapipe: {message}", err=True)
    raise typer.Exit(2)


# The settings `lorapipe run` has a flag for: a problem with one is said in the flag's name.
FLAGS = {"name": "--name", "images": "--images", "workspace": "--workspace", "train.base_model": "--base-model",
         "train.vae": "--vae", "caption.model": "--captioner", "train.rank": "--rank", "train.epochs": "--epochs",
         "train.learning_rate": "--learning-rate", "train.micro_batch_size": "--micro-batch-size",
         "train.effective_batch_size": "--effective-batch-size"}


def _blame(err: ValidationError, flagged: set[str], config_file: Optional[Path]) -> str:
    """Each problem said where it came from: `--epochs 0: ...` for a flag's value, `job.yaml: train.rank:
    ...` for the file's, `--name is missing (...)` for a required setting nobody gave."""
    found: dict[str, list] = {}
    for e in err.errors():  # pydantic names alternatives "constrained-int", "literal['auto']": not settings
        where = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("-" in p or "[" in p)))
        found.setdefault(where, []).append(e)
    problems = []
    for where, errors in found.items():
        flag, message = FLAGS.get(where), " or ".join(e["msg"] for e in errors)
        if errors[0]["type"] == "missing":
            field = PipelineConfig.model_fields.get(where)
            about = f" ({field.description[0].lower()}{field.description[1:]})" if field and field.description else ""
            in_file = f", or `{where}:` in {config_file}" if config_file else ""
            problems.append(f"{flag or where} is missing{about}{in_file}")
        elif where in flagged and flag:
            problems.append(f"{flag} {errors[0].get('input')}: {message}")
        else:
            problems.append(f"{config_file or 'settings'}: {where}: {message}")
    return "; ".join(problems)


def _config(config_file: Optional[Path], overrides: dict) -> PipelineConfig:
    try:
        settings = deep_merge(read_settings(config_file), overrides) if config_file else overrides
        return PipelineConfig.model_validate(settings)
    except ValidationError as err:
        _fail(_blame(err, set(flat_settings(overrides)), config_file))
    except UserError as err:
        _fail(str(err))


@app.command()
def run(
    images: Optional[List[str]] = typer.Option(
        None, help="Folder, zip/tar archive, URL list (.txt/.csv) or URL of photos; repeat for several"),
    name: Optional[str] = typer.Option(None, help="The person's real name: the trigger in every caption"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of the settings"),
    workspace: Optional[Path] = typer.Option(None, help="Where outputs go (default workspaces/<name>)"),
    base_model: Optional[str] = typer.Option(None, help="SDXL hub id, diffusers folder or .safetensors file"),
    vae: Optional[str] = typer.Option(None, help="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix"),
    captioner: Optional[str] = typer.Option(None, help="LLaVA hub id or folder"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default 8)"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 12)"),
    learning_rate: Optional[float] = typer.Option(None, help="UNet learning rate (default 4e-4)"),
    micro_batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default 4)"),
    effective_batch_size: Optional[int] = typer.Option(None, help="Images per optimizer step (default 64)"),
) -> None:
    """Run the whole pipeline: photos in, a LoRA out."""
    overrides = _overrides(
        images=_images(images), name=name, workspace=str(workspace) if workspace else None,
        train__base_model=base_model, train__vae=vae, caption__model=captioner, train__rank=rank,
        train__epochs=epochs, train__learning_rate=learning_rate, train__micro_batch_size=micro_batch_size,
        train__effective_batch_size=effective_batch_size,
    )
    _run(_config(config, overrides))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo photos and workspace"),
    prepare_only: bool = typer.Option(
        False, "--prepare-only", help="Only build the tiny models and photos and write OUT/job.yaml (for the UI)"),
) -> None:
    """The offline demo: tiny models and drawn photos, the whole pipeline on the CPU."""
    from flows.demo import prepare_demo, write_job_file

    config = prepare_demo(out)
    if prepare_only:
        job = write_job_file(config, out / "job.yaml")
        typer.echo(f"{job} written: `lorapipe run --config {job}`, or serve it to the UI with "
                   f"`lorapipe serve --config {job}`")
        return
    _run(config)


def _run(config: PipelineConfig) -> None:
    from flows.checks import ALL_STAGES, check_before_stages
    from flows.pipeline import pipeline
    from flows.summary import print_summary

    try:
        check_before_stages(config, ALL_STAGES)  # one line now, not after the CPU stages (no server started)
        with prefect_api():
            result = pipeline(config)
    except UserError as err:
        _fail(str(err))
    print_summary(result)


def _workspace_config(workspace: Path, config_file: Optional[Path]) -> tuple[Workspace, PipelineConfig]:
    try:
        ws = Workspace.at(workspace)
        remembered = ws.root / "config.json"
        saved = {}
        if remembered.exists():
            try:
                saved = read_json(remembered)
            except ValueError as err:
                raise UserError(f"{remembered}: not valid JSON ({err}); pass --config to replace it") from None
        if config_file:
            saved = deep_merge(saved, read_settings(config_file))
        named = saved.get("workspace")
        if named and Workspace.at_path(named) != ws.root:  # the WORKSPACE argument wins
            typer.echo(f"lorapipe: working on {ws.root} (the WORKSPACE given), not the workspace "
                       f"{named} that {config_file or remembered} names", err=True)
        saved["workspace"] = str(ws.root)
        config = PipelineConfig.model_validate(saved)
    except UserError as err:
        _fail(str(err))
    except ValidationError as err:
        if not config_file and not remembered.exists():
            _fail(f"{workspace}: no config.json yet (run `lorapipe run` first, or pass --config)")
        _fail(f"{config_file or remembered}: {settings_problems(err)}")
    if config_file:  # later stage commands on this workspace need no --config
        atomic_write_json(ws.root / "config.json", config.model_dump(mode="json", by_alias=True))
    return ws, config


def _input_manifest(ws: Workspace, stage: str, config: PipelineConfig) -> str:
    from flows.stages import MissingInput, input_for

    try:
        return input_for(stage, ws, config)[0]
    except MissingInput as err:
        _fail(str(err))


def _print(result: dict) -> None:
    typer.echo(json.dumps({k: v for k, v in result.items() if k not in {"losses"}}, indent=2, default=str))


JSON_HELP = "Print the result as JSON (for scripts) instead of a table"


def _report(stage: str, result: dict, as_json: bool) -> None:
    """What a stage command ends with: a table, as `lorapipe run` ends with one; JSON with --json."""
    if as_json:
        _print(result)
        return
    from rich.console import Console
    from rich.table import Table

    from flows.summary import stage_paths, stage_rows

    # A cached result keeps the counts of the run that computed it: say so, or "computed 12" reads as work done now.
    done = ("re-used from the cache (same input, settings and code); the counts are from the run that computed it"
            if result.get("cached") else "done")
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in stage_rows(result):
        table.add_row(label, value)
    console = Console()
    console.print(f"lorapipe {stage}: {done}", soft_wrap=True, highlight=False)
    if table.row_count:
        console.print(table)
    for label, path in stage_paths(result):
        console.print(f"{label}: {path}", soft_wrap=True, highlight=False)


def _stage(stage: str, workspace: Path, config_file: Optional[Path], as_json: bool = False, **overrides) -> None:
    """Run one stage as a one-task flow (cached; visible in the UI when PREFECT_API_URL is set)."""
    from flows.stages import stage_flow

    from flows.checks import check_before_stages

    ws, cfg = _workspace_config(workspace, config_file)
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    # A missing input, source or model is a usage error, said before any flow (or server) starts.
    try:
        check_before_stages(cfg, [stage, "export"] if stage == "train" else [stage])
        if stage != "collect":
            _input_manifest(ws, stage, cfg)
        with prefect_api():
            result = stage_flow(stage, cfg)
    except UserError as err:
        _fail(str(err))
    _report(stage, result, as_json)


@app.command()
def collect(
    workspace: Path,
    images: Optional[List[str]] = typer.Option(
        None, help="Folder, zip/tar archive, URL list (.txt/.csv) or URL; repeat for several (default: the config's)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings (remembered by the workspace)"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Copy photos from folders, archives and URLs into WORKSPACE/raw and write the first manifest."""
    sources = _images(images)
    _stage("collect", workspace, config, as_json, **({"images": sources} if sources else {}))


def _stage_command(stage: str, doc: str) -> None:
    """`lorapipe <stage> WORKSPACE [--config job.yaml]`: the stages that need nothing but the workspace."""

    def command(workspace: Path, config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
                as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
        _stage(stage, workspace, config, as_json)

    command.__doc__ = doc
    app.command(name=stage)(command)


for _name, _doc in {
    "validate": "Decode every collected file; reject unreadable and too-small images with the reason.",
    "dedup": "Drop exact and near duplicates (perceptual hash), keeping the best of each cluster.",
    "crop": "Crop kept images to their SDXL buckets into WORKSPACE/images.",
    "caption": "Caption the cropped images with the configured VLM (a progress bar in a terminal).",
}.items():
    _stage_command(_name, _doc)


@app.command()
def review(
    workspace: Path,
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Decisions: edited captions, action approve/drop"),
    approve_all: bool = typer.Option(False, "--approve-all", help="Approve every waiting caption as written"),
    approve: list[str] = typer.Option([], "--approve", help="File name or image id to approve as written (repeatable)"),
    edit: list[str] = typer.Option([], "--edit", help="FILE=CAPTION: a new caption for one image (repeatable)"),
    drop: list[str] = typer.Option([], "--drop", help="File name or image id to leave out (repeatable)"),
    reviewer: str = typer.Option(getpass.getuser(), help="Recorded with each decision"),
    resume: bool = typer.Option(False, "--resume", help="Resume a paused run even if captions still wait"),
    config: Optional[Path] = typer.Option(None, "--config"),
) -> None:
    """Review captions from a terminal: edits in WORKSPACE/images/*.txt, a CSV or flags; then resume a waiting run.

    Caption files you changed are read first (never overwritten). Without decisions it lists the captions
    waiting and writes WORKSPACE/review.csv to edit. Parts of an answer that cannot be used are listed (exit 2);
    the rest is recorded.
    """
    from rich.console import Console
    from rich.table import Table

    from flows.review import PAUSE_FILE, resume_paused_run
    from lorapipe.manifest import read_manifest
    from lorapipe.review_decisions import DecisionStore, ReviewDecision
    from tasks.review import edit_check, run_review
    from tasks.review_answers import (decision_from_csv, display_name, record_answer, waiting_for_review,
                                      write_review_csv)

    ws, cfg = _workspace_config(workspace, config)
    args = (_input_manifest(ws, "review", cfg), str(ws.root), cfg.review, cfg.name, cfg.train.tokenizer_source)
    with ws.lock("review"):  # one writer of the review stage's files: a run on this workspace waits meanwhile
        ws.remove_stale_temps("review")
        result = run_review(*args, reviewer=reviewer)  # reads the caption files you edited, before anything else
        from_files = len(result["caption_files_read"])
        records = read_manifest(result["manifest"])
        edits = dict(e.split("=", 1) for e in edit if "=" in e)
        problems = [f"--edit {e!r}: expected FILE=CAPTION" for e in edit if "=" not in e]
        answer = ReviewDecision(approve_all=approve_all, approve=list(approve), drop=list(drop), edits=edits,
                                reviewer=reviewer)
        if csv_file:
            from_csv, csv_problems = decision_from_csv(records, csv_file, reviewer)
            problems += csv_problems
            answer.edits = {**from_csv.edits, **answer.edits}
            answer.drop = from_csv.drop + answer.drop
            answer.approve = from_csv.approve + answer.approve
        recorded = 0
        if not answer.is_empty():
            from captioners import clip_token_counter

            check = edit_check(cfg.name, cfg.review, clip_token_counter(cfg.train.tokenizer_source))
            source = "csv" if csv_file else "cli"
            outcome = record_answer(records, DecisionStore(ws.cache), answer, source, check=check)
            recorded, problems = outcome.recorded, problems + outcome.problems
            if recorded:
                result = run_review(*args, reviewer=reviewer)
                records = read_manifest(result["manifest"])
        waiting = waiting_for_review(records)
    problems += [why for r in waiting for why in r.review_reasons if why.startswith("caption_file:")]

    console = Console(stderr=True)  # stdout is the JSON summary
    if waiting:
        table = Table(title=f"{len(waiting)} captions wait for review")
        for column in ("file", "id", "caption", "why"):
            table.add_column(column)
        for r in waiting:
            table.add_row(display_name(r), r.id[:8], r.caption or "", "; ".join(r.review_reasons) or "approval: all")
        console.print(table)
        sheet = ws.root / "review.csv"
        if not (problems and csv_file and csv_file.resolve() == sheet.resolve()):  # keep a sheet with rows to fix
            write_review_csv(records, sheet)
        console.print(f"Edit captions or set action to approve/drop in {sheet}, then: lorapipe review {ws.root} "
                      f"--csv {sheet}   (or --approve-all, or edit {ws.images}/<id>.txt)")
    resumed = None
    if (resume or not waiting) and (ws.root / PAUSE_FILE).exists():  # a server only when a run waits
        with prefect_api():
            resumed = resume_paused_run(ws, reviewer)
    _print({"decisions_recorded": recorded + from_files, "from_caption_files": from_files, "waiting": len(waiting),
            "stats": result["stats"], "manifest": result["manifest"], "resumed_flow_run": resumed,
            "not_applied": problems})
    if problems:
        for problem in problems:
            typer.echo(f"lorapipe: not applied: {problem}", err=True)
        raise typer.Exit(2)


for _name, _doc in {
    "train": "Train the LoRA on the reviewed manifest (WORKSPACE/manifests/review.jsonl) and export it to loras/.",
    "export": "Write the trained LoRA again (kohya and diffusers files in WORKSPACE/loras), e.g. after deleting them.",
    "evaluate": "Render the evaluation prompts with and without WORKSPACE/loras/<name>.safetensors into one grid.",
}.items():
    _stage_command(_name, _doc)


COMPARISON_FLAGS = {"ranks": "--rank", "loras": "--lora", "resize_to": "--resize-to",
                    "text_encoders": "--text-encoders", "tolerance": "--tolerance"}


@app.command(name="compare-ranks")
def compare_ranks(
    workspace: Path,
    ranks: Optional[List[int]] = typer.Option(None, "--rank", help="A rank to train (repeat; default 4 8 16 64 128)"),
    lora: Optional[List[Path]] = typer.Option(None, "--lora", help="Another kohya LoRA file to measure (repeat)"),
    resize_to: Optional[List[int]] = typer.Option(
        None, "--resize-to", help="Also resize the largest trained rank to this rank by SVD (repeat)"),
    text_encoders: Optional[str] = typer.Option(
        None, help="decided (as the probe says) or both (each rank with and without text-encoder LoRA)"),
    tolerance: Optional[float] = typer.Option(None, help="Identity distance within which a rank counts as good "
                                                         "enough (default 0.03)"),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Train the reviewed dataset at several ranks and compare them: size, time, identity, style pollution.

    Writes WORKSPACE/reports/rank-comparison.md (and a Prefect artifact) naming the smallest good rank.
    """
    from flows.checks import TRAIN_STAGES, check_before_stages
    from flows.rank_comparison import rank_comparison
    from lorapipe.config import RankComparisonConfig

    # The flags first: a bad one is one line naming it, before anything runs or is written.
    try:
        comparison = RankComparisonConfig.model_validate(_overrides(
            ranks=list(ranks) if ranks else None, loras=[str(p) for p in lora] if lora else None,
            resize_to=list(resize_to) if resize_to else None, text_encoders=text_encoders, tolerance=tolerance))
    except ValidationError as err:
        raise UserError("; ".join(f"{COMPARISON_FLAGS.get(e['loc'][0], e['loc'][0])} {e.get('input')}: {e['msg']}"
                                  for e in err.errors())) from None
    for path in comparison.loras:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such LoRA file (--lora)")
    ws, cfg = _workspace_config(workspace, config)
    manifest = _input_manifest(ws, "train", cfg)  # nothing reviewed yet: one line
    check_before_stages(cfg, TRAIN_STAGES, manifest)  # a missing model: one line, before a server starts
    with prefect_api():
        report = rank_comparison(cfg, comparison)  # reviews again first: caption files edited since count
    typer.echo(Path(report["markdown"]).read_text(encoding="utf-8").split("![")[0], err=True)
    _print({k: report[k] for k in ("verdict", "smallest_good_rank", "markdown", "grid", "json")})


@app.command()
def resize(
    lora: Path,
    rank: int = typer.Option(..., "--rank", help="The new rank (e.g. 4)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default LORA-rankN.safetensors)"),
) -> None:
    """Resize a kohya-format SDXL LoRA to a lower rank by SVD; reports the energy kept per module and overall."""
    from trainer.resize import resize_lora

    dest = out or lora.with_name(f"{lora.stem}-rank{rank}.safetensors")
    report = resize_lora(lora, dest, rank)
    per_module = atomic_write_json(dest.with_name(f"{dest.stem}.resize.json"), report.to_json())
    for m in report.least_kept(5):
        typer.echo(f"  {m.energy_kept:7.2%} kept  {m.module} (rank {m.rank} → {m.new_rank})", err=True)
    _print({"lora": str(dest), "from_rank": report.from_rank, "to_rank": report.to_rank,
            "energy_kept": round(report.energy_kept, 6), "modules": len(report.modules), "per_module": str(per_module),
            "least_kept": {m.module: round(m.energy_kept, 6) for m in report.least_kept(5)}})


@app.command()
def serve(
    config: Optional[Path] = typer.Option(
        None, "--config", help="YAML settings: the run form's defaults and the nightly retrain's parameters"),
    nightly_cron: str = typer.Option(NightlyConfig().cron, help="When the nightly retrain starts (cron)"),
    timezone: str = typer.Option(NightlyConfig().timezone, help="Time zone of the cron, e.g. Europe/Berlin"),
    no_nightly: bool = typer.Option(False, "--no-nightly", help="Create the nightly deployment unscheduled"),
    gpu_slots: int = typer.Option(1, help="GPU task runs at once on this server (a `gpu` tag concurrency limit; "
                                          "0 leaves the limit alone)"),
    notify: Optional[str] = typer.Option(
        None, help="Notification block TYPE/NAME (e.g. slack-webhook/team) told when captions wait for review"),
    policy: Optional[Path] = typer.Option(
        None, "--policy", help="Serving policy YAML: what runs may reach (the options below add to it)"),
    allow_path: List[Path] = typer.Option(
        [], help="Folder runs may name paths under (repeat; default: the --config's paths and ./workspaces)"),
    allow_address: List[str] = typer.Option(
        [], help="Non-public address or network downloads and VLM APIs may reach, e.g. 10.0.0.0/8 (repeat)"),
    api_base_url: List[str] = typer.Option(
        [], help="VLM API server runs may use, whatever its address; keys go to these only (repeat)"),
    api_key_env: List[str] = typer.Option([], help="Environment variable runs may name as the API key (repeat)"),
    api_key_secret: List[str] = typer.Option([], help="Prefect Secret block runs may name as the API key (repeat)"),
    scale_out_address: List[str] = typer.Option([], help="Dask/Ray scheduler runs may send captioning to (repeat)"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help="Let runs set trust_remote_code"),
) -> None:
    """Serve the five deployments (photos-to-lora, ..., compare-ranks: deployments/serve.py) for the Prefect UI.

    Needs a server: `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`.
    Runs are held to a serving policy fixed here (see README, "A team server"): the folders, addresses,
    API servers and API keys their parameters may name.
    """
    import os

    from deployments.serve import serve_deployments

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            _fail("no Prefect server: run `prefect server start`, then "
                  "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    try:
        schedule = NightlyConfig(cron=nightly_cron, timezone=timezone, active=not no_nightly)
    except ValidationError as err:
        _fail("; ".join(e["msg"] for e in err.errors()))
    defaults = _config(config, {}) if config else None
    try:
        serving = _serving_policy(defaults, policy, ServingPolicy(
            path_roots=[str(p.expanduser().resolve()) for p in allow_path], allow_addresses=allow_address,
            api_base_urls=api_base_url, api_key_envs=api_key_env, api_key_secrets=api_key_secret,
            scale_out_addresses=scale_out_address, allow_remote_code=allow_remote_code))
        serve_deployments(defaults, schedule, gpu_slots or None, notify, serving)
    except UserError as err:
        _fail(str(err))


def _serving_policy(defaults: Optional[PipelineConfig], policy_file: Optional[Path], flags) -> "ServingPolicy":
    """The policy file (or LORAPIPE_SERVING_POLICY) with the flags added, defaults where both say nothing."""
    from lorapipe.policy import current_policy, policy_from_settings, read_policy_file, with_defaults

    base = read_policy_file(policy_file) if policy_file else current_policy()
    merged = base.merged(flags) if base else flags
    return with_defaults(policy_from_settings(merged.model_dump(), "serve options"), defaults)


server_app = typer.Typer(no_args_is_help=True, help=(
    "A local Prefect server kept running between commands: stage after stage without a server start each "
    "time. Without PREFECT_API_URL every command uses it while it runs."))
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    idle_minutes: float = typer.Option(30, min=0.1, help="Stop after this long without a lorapipe command using it"),
) -> None:
    """Start a local Prefect server in the background (this Prefect home's database, no UI)."""
    from lorapipe.local_server import shared_server_state, start_shared_server

    if data := shared_server_state():
        typer.echo(f"lorapipe: a local Prefect server already runs at {data['url']} (pid {data['pid']})", err=True)
        return
    data = start_shared_server(idle_minutes)
    typer.echo(f"lorapipe: local Prefect server at {data['url']} (pid {data['pid']}); commands without "
               f"PREFECT_API_URL use it; it stops after {idle_minutes:g} idle minutes, or `lorapipe server stop`",
               err=True)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server `lorapipe server start` started."""
    from lorapipe.local_server import stop_shared_server

    data = stop_shared_server()
    typer.echo(f"lorapipe: stopped the local Prefect server at {data['url']}" if data else
               "lorapipe: no local Prefect server runs", err=True)


@server_app.command("status")
def server_status() -> None:
    """Say whether a local Prefect server runs, and where."""
    from lorapipe.local_server import shared_server_state

    data = shared_server_state()
    typer.echo(f"local Prefect server at {data['url']} (pid {data['pid']}, stops after {data['idle_minutes']:g} "
               "idle minutes)" if data else "no local Prefect server runs")


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: while a progress bar is drawn, that is rich's proxy,
    which prints the line above the bar instead of through it. (Prefect replaces root handlers whose class
    name starts with "_", so this one has a public name.)"""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[CurrentStderrHandler()])
    for noisy in ("httpx", "httpcore", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        app()  # typer shows its own usage errors and exits; anything else comes out here
    except UserError as err:  # something the user gave us: one line, no traceback
        typer.echo(f"lorapipe: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
