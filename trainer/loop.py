"""The training run: SDXL UNet + rank-8 LoRA (peft) + Lion + gradient accumulation over aspect buckets.

0. The run: its identity (the settings that change the weights, and the data) must be its folder's
   (trainer/identity.py); a finished run is not trained again.
1. Data: merge tiny buckets (refitted around the face), hold a few images out, lay out every
   micro-batch of the run (seeded).
2. Models on the CPU, refusals (trainer/checks.py), LoRA on the UNet's transformer blocks (kohya's
   target set and initialisation), optionally on both text encoders; the preflight; then the GPU.
3. Encode every image once with the VAE and, unless the text encoders train, every caption once
   (both cached on disk, keyed on content).
4. Resume from the newest complete checkpoint of this run, if there is one.
5. Each optimizer step: its micro-batches (one bucket each, noise seeded by position), backward,
   one Lion step. Checkpoints, held-out loss and samples at epoch ends and every N steps.
6. Save the LoRA in diffusers format, with adapter metadata so alpha != rank reloads exactly.

Runs in one process or under `accelerate launch` (DDP: each process takes its share of every step's
micro-batches; only the main process writes).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorapipe.config import TrainConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_json
from trainer import checkpoint as ckpt
from trainer.checks import check_noise_scheduler, model_facts
from trainer.data import (
    Example,
    TensorCache,
    cache_latents,
    cache_text_embeddings,
    encode_prompts,
    group_into_steps,
    merge_small_buckets,
    micro_batch_schedule,
    split_holdout,
)
from trainer.devices import make_accelerator, place, probe_micro_batch
from trainer.identity import RESULT_FILE, claim_run, run_identity, run_key, update_run
from trainer.models import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    load_lora_state,
    load_sdxl,
    lora_state,
    model_identity,
)
from trainer.lora_layers import attach as attach_fast_lora
from trainer.optim import make_optimizer, resolve_optimizer
from trainer.outputs import (
    LORA_WEIGHTS,
    epoch_of_step,
    held_out_loss,
    save_lora,
    save_samples,
    write_progress,
)
from trainer.preflight import estimate_memory_gib, preflight, report_probed
from trainer.step import Conditioning, micro_batch_generator, per_image_loss, sample_training_inputs, time_ids_for

log = logging.getLogger("lorapipe.train")

__all__ = ["LORA_WEIGHTS", "TrainResult", "train_lora"]

MAX_BAD_STEPS = 3


@dataclass
class TrainResult:
    lora_dir: str
    steps: int
    images: int
    losses: list[float]
    final_loss: float
    seconds: float
    skipped_steps: int
    resumed_from_step: int = 0
    held_out_losses: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    preflight: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # latents / text embeddings computed vs re-used
    optimizer: str = ""
    micro_batch_size: int = 0  # as trained ("auto" resolved once per run, kept on resume)
    model: dict = field(default_factory=dict)  # prediction type, precision, base model version (checks.py)
    image_ids: list[str] = field(default_factory=list)  # trained on
    held_out_image_ids: list[str] = field(default_factory=list)
    run_key: str = ""


def finished_result(run_dir: Path) -> TrainResult:
    return TrainResult(**json.loads((run_dir / RESULT_FILE).read_text()))


def train_lora(examples: list[Example], config: TrainConfig, run_dir: str | Path, cache_dir: str | Path,
               name: str = "") -> TrainResult:
    if not examples:
        raise UserError("no approved images to train on")
    started = time.monotonic()
    if config.train_text_encoders == "auto":  # the pipeline's probe stage decides; the trainer alone keeps them frozen
        config = config.model_copy(update={"train_text_encoders": False})
    run_dir, cache_dir = Path(run_dir), Path(cache_dir)
    accelerator, bf16 = make_accelerator(config)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(config.seed)

    # 0. Which run this is: the folder's own, or refused (trainer/identity.py); a finished one is not redone.
    identity = run_identity(examples, config)
    key = run_key(identity)
    record = claim_run(run_dir, identity, write=accelerator.is_main_process)
    if (run_dir / RESULT_FILE).exists() and (run_dir / "lora" / LORA_WEIGHTS).exists():
        log.info("%s: this run already finished (%s); nothing to train", run_dir, run_dir / "lora")
        return finished_result(run_dir)

    # 1. Data.
    examples = merge_small_buckets(examples, config.min_bucket_images)
    if not examples:
        raise UserError("no images left to train on after merging small buckets (see the warnings above)")
    examples, holdout = split_holdout(examples, config.holdout_images, config.holdout_min_images, config.seed)

    # 2. Models and LoRA adapters, on the CPU: refusals and the plan come before any GPU work.
    parts = load_sdxl(config.base_model, config.revision, config.vae, config.base_model_config)
    check_noise_scheduler(parts.noise_scheduler, config.base_model, config.min_snr_gamma)
    facts = model_facts(parts.noise_scheduler, parts.unet, [parts.text_encoder, parts.text_encoder_2], bf16)
    identity_of_model = model_identity(config.base_model, config.revision, config.vae)
    unet = parts.unet
    param_groups = [{"params": add_lora(unet, config.rank, config.alpha, UNET_TARGETS[config.targets],
                                        config.lora_init), "lr": config.learning_rate}]
    encoders = [parts.text_encoder, parts.text_encoder_2]
    tokenizers = [parts.tokenizer, parts.tokenizer_2]
    if config.train_text_encoders:
        for encoder, lr in zip(encoders, (config.text_encoder_lr, config.text_encoder_2_lr)):
            param_groups.append({"params": add_lora(encoder, config.rank, config.alpha, TEXT_ENCODER_TARGETS,
                                                    config.lora_init), "lr": lr})
            encoder.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    largest = max({e.bucket for e in examples}, key=lambda b: b[0] * b[1])
    # "auto" is probed once per run and kept: a resumed run must see the same micro-batches.
    micro_batch_size = config.micro_batch_size if config.micro_batch_size != "auto" else record.get(
        "micro_batch_size", "auto")
    lora_params = sum(p.numel() for g in param_groups for p in g["params"])
    unet_params = sum(p.numel() for p in unet.parameters()) - lora_params

    def plan(size: int):
        size = min(size, config.effective_batch_size)
        schedule = micro_batch_schedule(examples, size, config.epochs, config.repeats, config.seed)
        memory = estimate_memory_gib(unet_params, lora_params, largest, size, bf16, config.gradient_checkpointing)
        return size, schedule, group_into_steps(schedule, config.effective_batch_size, min_micro_batches=world), memory

    planned = plan(1 if micro_batch_size == "auto" else micro_batch_size)
    info = preflight(examples, holdout, planned[1], planned[2], config, micro_batch_size, planned[3])

    for module in (unet, *encoders):
        place(module, device, weight_dtype)
        attach_fast_lora(module)  # peft's LoRA Linears, run with far fewer operations (same weights)
    if micro_batch_size == "auto":
        probed = probe_micro_batch(unet, largest, (unet.config.cross_attention_dim,
                                   unet.config.projection_class_embeddings_input_dim - 6 *
                                   unet.config.addition_time_embed_dim), device, weight_dtype)
        probed = int(accelerator.gather(torch.tensor([probed], device=device)).min())  # every GPU must fit it
        planned = plan(probed)
        info = report_probed(info, planned[1], planned[2], config, planned[0], planned[3])
    micro_batch_size, schedule, steps, _ = planned
    if accelerator.is_main_process and record.get("micro_batch_size") != micro_batch_size:
        record = update_run(run_dir, record, micro_batch_size=micro_batch_size)
    per_epoch = len(schedule) // config.epochs  # every epoch has the same micro-batches, reshuffled
    # A step may straddle an epoch boundary (accumulation carries over): it ends the epoch it finishes.
    ends_epoch = {}
    for n, indices in enumerate(steps):
        finished = [i // per_epoch for i in indices if (i + 1) % per_epoch == 0]
        if finished:
            ends_epoch[n] = finished[-1]

    # 3. Caches: the VAE runs in fp32 on the CPU and bf16 on the GPU (fp16 overflows in SDXL's VAE).
    place(parts.vae, device, weight_dtype)
    latent_cache = TensorCache(cache_dir / "latents")
    latents = cache_latents(examples + holdout, parts.vae, latent_cache, identity_of_model, device, weight_dtype)
    scaling_factor = parts.vae.config.scaling_factor
    text_cache = TensorCache(cache_dir / "text")
    embeddings = {}
    if not config.train_text_encoders:
        embeddings = cache_text_embeddings(examples + holdout, tokenizers, encoders, text_cache, identity_of_model,
                                           device)
    sampling = bool(config.sample_prompts) and accelerator.is_main_process
    if not sampling and not config.train_text_encoders:
        parts.text_encoder = parts.text_encoder_2 = encoders = None
    elif not config.train_text_encoders and device.type == "cuda":
        for module in encoders + [parts.vae]:  # needed again only to render samples
            module.to("cpu")
    if not sampling:
        parts.vae = None
    gc.collect()
    optimizer = make_optimizer(param_groups, config.optimizer, config.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=len(steps))
    trained_modules = {"unet": unet}
    if config.train_text_encoders:
        trained_modules.update(text_encoder=encoders[0], text_encoder_2=encoders[1])
    prepared = accelerator.prepare(*trained_modules.values(), optimizer)
    trained_modules = dict(zip(trained_modules, prepared[:-1]))
    optimizer = prepared[-1]
    unet = trained_modules["unet"]

    # 4. Resume.
    losses, held_out_losses, samples, start = [], [], [], 0
    resume = ckpt.latest_checkpoint(run_dir / "checkpoints", key)
    if resume:
        state = ckpt.read_checkpoint(resume)
        for component, module in trained_modules.items():
            load_lora_state(accelerator.unwrap_model(module), state["lora"][component])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_states(state["rng"])
        start = state["info"]["step"]
        losses, held_out_losses, samples = (state["info"][k] for k in ("losses", "held_out_losses", "samples"))
        log.info("resuming from %s (step %d of %d)", resume, start, len(steps))

    def conditioning(batch) -> Conditioning:
        if config.train_text_encoders:
            out = encode_prompts([ex.caption for ex in batch], tokenizers,
                                 [trained_modules["text_encoder"], trained_modules["text_encoder_2"]], device)
            return Conditioning(out["prompt_embeds"], out["pooled"], time_ids_for(batch))
        return Conditioning(
            torch.stack([embeddings[ex.caption]["prompt_embeds"] for ex in batch]),
            torch.stack([embeddings[ex.caption]["pooled"] for ex in batch]), time_ids_for(batch))

    def micro_batch_loss(batch, generator) -> torch.Tensor:
        mean = torch.stack([latents[ex.image_id]["mean"] for ex in batch])
        std = torch.stack([latents[ex.image_id]["std"] for ex in batch])
        model_input, noise, timesteps = sample_training_inputs(
            mean, std, scaling_factor, parts.noise_scheduler.config.num_train_timesteps, config.noise_offset,
            generator)
        with accelerator.autocast():
            return per_image_loss(unet, parts.noise_scheduler, model_input, noise, timesteps, conditioning(batch),
                                  weight_dtype, config.min_snr_gamma)

    # 5. The loop.
    skipped, bad_in_a_row = 0, 0
    started_loop = time.monotonic()
    deadline = started + config.timeout_minutes * 60 if config.timeout_minutes else None
    for step in range(start, len(steps)):
        mine = steps[step][rank::world]
        images_in_step = sum(len(schedule[i]) for i in steps[step])
        step_loss = torch.zeros((), device=device)
        for n, index in enumerate(mine):
            batch = [examples[i] for i in schedule[index]]
            sync = n == len(mine) - 1
            with contextlib.ExitStack() as stack:
                if not sync:  # gradients are all-reduced once per step, on the last micro-batch
                    for module in trained_modules.values():
                        stack.enter_context(accelerator.no_sync(module))
                loss = micro_batch_loss(batch, micro_batch_generator(config.seed, index)).sum()
                accelerator.backward(loss * world / images_in_step)  # DDP averages over processes
            step_loss += loss.detach()
        step_loss = accelerator.reduce(step_loss, "sum").item() / images_in_step  # one host sync per step

        if not math.isfinite(step_loss):
            skipped += 1
            bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: loss is %s; step skipped", step + 1, step_loss)
            if bad_in_a_row >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"{bad_in_a_row} optimizer steps in a row had a non-finite loss (last at step {step + 1}): "
                    "lower the learning rate, or use fp32 / the fp16-fix VAE"
                )
            continue
        bad_in_a_row = 0
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        log.info("step %d/%d  loss %.4f  lr %.2e", step + 1, len(steps), step_loss, lr_scheduler.get_last_lr()[0])
        if accelerator.is_main_process:
            write_progress(run_dir, step + 1 - start, step + 1, len(steps), epoch_of_step(steps[step], per_epoch),
                           config.epochs, step_loss, started_loop)

        epoch = ends_epoch.get(step)
        done = step + 1 == len(steps)
        if epoch is not None and holdout:
            held_out_losses.append(held_out_loss(holdout, micro_batch_loss, config.seed))
            log.info("epoch %d: held-out loss %.4f", epoch + 1, held_out_losses[-1])
        if sampling and (done or (epoch is not None and config.sample_every_epochs
                                  and (epoch + 1) % config.sample_every_epochs == 0)):
            samples.append(str(save_samples(run_dir, "final" if done else f"epoch-{epoch + 1:03d}", parts,
                                            accelerator.unwrap_model(unet), encoders, config, name, largest,
                                            device, bf16)))
        periodic = config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0
        if (epoch is not None or periodic) and not done and accelerator.is_main_process:
            ckpt.write_checkpoint(
                run_dir / "checkpoints", step + 1, key,
                {k: lora_state(accelerator.unwrap_model(m)) for k, m in trained_modules.items()},
                optimizer, lr_scheduler, {"losses": losses, "held_out_losses": held_out_losses, "samples": samples},
                config.keep_checkpoints)
        accelerator.wait_for_everyone()
        if deadline and time.monotonic() > deadline and not done:
            raise TimeoutError(f"training stopped after {config.timeout_minutes} minutes at step {step + 1}; "
                               "rerun to resume from the last checkpoint")

    # 6. Save: never a LoRA no optimizer step changed (it would equal the base model, and replace a good one).
    if not losses:
        raise RuntimeError(f"training took no optimizer step ({len(steps)} planned, {skipped} skipped for "
                           "non-finite losses): no LoRA written")
    lora_dir = run_dir / "lora"
    result = TrainResult(
        lora_dir=str(lora_dir), steps=len(losses), images=len(examples), losses=losses,
        final_loss=losses[-1] if losses else float("nan"), seconds=round(time.monotonic() - started, 2),
        skipped_steps=skipped, resumed_from_step=start, held_out_losses=held_out_losses, samples=samples,
        preflight=info, optimizer=resolve_optimizer(config.optimizer),
        cache={"latents": latent_cache.stats(), "text_embeddings": text_cache.stats()},
        micro_batch_size=micro_batch_size, model=facts, image_ids=[e.image_id for e in examples],
        held_out_image_ids=[e.image_id for e in holdout], run_key=key,
    )
    if accelerator.is_main_process:
        save_lora(lora_dir, {k: accelerator.unwrap_model(m) for k, m in trained_modules.items()})
        atomic_write_json(run_dir / RESULT_FILE, asdict(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
