"""The training run: SDXL UNet + rank-8 LoRA (peft) + Lion + gradient accumulation over aspect buckets.

1. Data: merge tiny buckets, hold a few images out, lay out every micro-batch of the run (seeded).
2. Encode every image once with the VAE and, unless the text encoders train, every caption once
   (both cached on disk, keyed on content).
3. LoRA on the UNet's transformer blocks (kohya's target set), optionally on both text encoders.
4. Resume from the newest complete checkpoint of this job, if there is one.
5. Each optimizer step: its micro-batches (one bucket each, noise seeded by position), backward,
   one Lion step. Checkpoints, held-out loss and samples at epoch ends and every N steps.
6. Save the LoRA in diffusers format, with adapter metadata so alpha != rank reloads exactly.

Runs in one process or under `accelerate launch` (DDP: each process takes its share of every step's
micro-batches; only the main process writes).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorapipe.config import TrainConfig
from lorapipe.fsutil import atomic_dir, atomic_path, atomic_write_json, stable_hash
from trainer import checkpoint as ckpt
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
from trainer.models import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    load_lora_state,
    load_sdxl,
    lora_state,
    model_identity,
)
from trainer.optim import make_optimizer, resolve_optimizer
from trainer.preflight import estimate_memory_gib, preflight
from trainer.sampling import training_samples
from trainer.step import Conditioning, micro_batch_generator, per_image_loss, sample_training_inputs, time_ids_for

log = logging.getLogger("lorapipe.train")

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
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


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    from lorapipe.devices import resolve_device

    device = resolve_device(config.device)
    bf16 = device == "cuda" and config.mixed_precision == "bf16"
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device == "cpu"), bf16


def place(module: torch.nn.Module, device, dtype) -> None:
    """Move to the device; frozen weights in the compute dtype, trainable (LoRA) weights stay fp32."""
    module.to(device)
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def probe_micro_batch(unet, bucket, cond_dims, device, dtype, candidates=(16, 8, 4, 2, 1)) -> int:
    """The largest micro-batch whose forward+backward fits in GPU memory with 10% to spare."""
    if device.type != "cuda":
        return 4
    total = torch.cuda.get_device_properties(device).total_memory
    for size in candidates:
        try:
            torch.cuda.reset_peak_memory_stats(device)
            latents = torch.randn(size, 4, bucket[1] // 8, bucket[0] // 8, device=device, dtype=dtype)
            out = unet(latents, torch.full((size,), 500, device=device),
                       torch.randn(size, 77, cond_dims[0], device=device, dtype=dtype),
                       added_cond_kwargs={"text_embeds": torch.randn(size, cond_dims[1], device=device, dtype=dtype),
                                          "time_ids": torch.ones(size, 6, device=device)}).sample
            out.float().mean().backward()
            unet.zero_grad(set_to_none=True)
            if torch.cuda.max_memory_allocated(device) < 0.9 * total:
                return size
        except torch.cuda.OutOfMemoryError:
            pass
        unet.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return 1


def train_lora(examples: list[Example], config: TrainConfig, run_dir: str | Path, cache_dir: str | Path,
               name: str = "", job_key: str | None = None) -> TrainResult:
    if not examples:
        raise ValueError("no approved images to train on")
    started = time.monotonic()
    if config.train_text_encoders == "auto":  # the pipeline's probe stage decides; the trainer alone keeps them frozen
        config = config.model_copy(update={"train_text_encoders": False})
    run_dir, cache_dir = Path(run_dir), Path(cache_dir)
    job_key = job_key or stable_hash([e.to_json() for e in examples], config.model_dump(mode="json"), name)
    accelerator, bf16 = make_accelerator(config)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(config.seed)

    # 1. Data.
    examples = merge_small_buckets(examples, config.min_bucket_images)
    examples, holdout = split_holdout(examples, config.holdout_images, config.holdout_min_images, config.seed)

    # 2. Models and LoRA adapters, on the CPU: the plan is printed before any GPU work.
    parts = load_sdxl(config.base_model, config.revision, config.vae, config.base_model_config)
    identity = model_identity(config.base_model, config.revision, config.vae)
    unet = parts.unet
    param_groups = [{"params": add_lora(unet, config.rank, config.alpha, UNET_TARGETS[config.targets]),
                     "lr": config.learning_rate}]
    encoders = [parts.text_encoder, parts.text_encoder_2]
    tokenizers = [parts.tokenizer, parts.tokenizer_2]
    if config.train_text_encoders:
        for encoder, lr in zip(encoders, (config.text_encoder_lr, config.text_encoder_2_lr)):
            param_groups.append({"params": add_lora(encoder, config.rank, config.alpha, TEXT_ENCODER_TARGETS),
                                 "lr": lr})
            encoder.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    for module in (unet, *encoders):
        place(module, device, weight_dtype)
    largest = max({e.bucket for e in examples}, key=lambda b: b[0] * b[1])
    micro_batch_size = config.micro_batch_size
    if micro_batch_size == "auto":
        micro_batch_size = probe_micro_batch(unet, largest, (unet.config.cross_attention_dim,
                                             unet.config.projection_class_embeddings_input_dim - 6 *
                                             unet.config.addition_time_embed_dim), device, weight_dtype)
    micro_batch_size = min(micro_batch_size, config.effective_batch_size)
    schedule = micro_batch_schedule(examples, micro_batch_size, config.epochs, config.repeats, config.seed)
    steps = group_into_steps(schedule, config.effective_batch_size, min_micro_batches=world)
    per_epoch = len(schedule) // config.epochs  # every epoch has the same micro-batches, reshuffled
    # A step may straddle an epoch boundary (accumulation carries over): it ends the epoch it finishes.
    ends_epoch = {}
    for n, indices in enumerate(steps):
        finished = [i // per_epoch for i in indices if (i + 1) % per_epoch == 0]
        if finished:
            ends_epoch[n] = finished[-1]
    lora_params = sum(p.numel() for g in param_groups for p in g["params"])
    memory = estimate_memory_gib(sum(p.numel() for p in unet.parameters()) - lora_params, lora_params, largest,
                                 micro_batch_size, bf16, config.gradient_checkpointing)
    info = preflight(examples, holdout, schedule, steps, config, micro_batch_size, memory)

    # 3. Caches: the VAE runs in fp32 on the CPU and bf16 on the GPU (fp16 overflows in SDXL's VAE).
    place(parts.vae, device, weight_dtype)
    latent_cache = TensorCache(cache_dir / "latents")
    latents = cache_latents(examples + holdout, parts.vae, latent_cache, identity, device, weight_dtype)
    scaling_factor = parts.vae.config.scaling_factor
    text_cache = TensorCache(cache_dir / "text")
    embeddings = {}
    if not config.train_text_encoders:
        embeddings = cache_text_embeddings(examples + holdout, tokenizers, encoders, text_cache, identity, device)
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
    resume = ckpt.latest_checkpoint(run_dir / "checkpoints", job_key)
    if resume:
        state = ckpt.read_checkpoint(resume)
        for key, module in trained_modules.items():
            load_lora_state(accelerator.unwrap_model(module), state["lora"][key])
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
                run_dir / "checkpoints", step + 1, job_key,
                {k: lora_state(accelerator.unwrap_model(m)) for k, m in trained_modules.items()},
                optimizer, lr_scheduler, {"losses": losses, "held_out_losses": held_out_losses, "samples": samples},
                config.keep_checkpoints)
        accelerator.wait_for_everyone()
        if deadline and time.monotonic() > deadline and not done:
            raise TimeoutError(f"training stopped after {config.timeout_minutes} minutes at step {step + 1}; "
                               "rerun to resume from the last checkpoint")

    # 6. Save.
    lora_dir = run_dir / "lora"
    result = TrainResult(
        lora_dir=str(lora_dir), steps=len(losses), images=len(examples), losses=losses,
        final_loss=losses[-1] if losses else float("nan"), seconds=round(time.monotonic() - started, 2),
        skipped_steps=skipped, resumed_from_step=start, held_out_losses=held_out_losses, samples=samples,
        preflight=info, optimizer=resolve_optimizer(config.optimizer),
        cache={"latents": latent_cache.stats(), "text_embeddings": text_cache.stats()},
    )
    if accelerator.is_main_process:
        save_lora(lora_dir, {k: accelerator.unwrap_model(m) for k, m in trained_modules.items()})
        atomic_write_json(run_dir / "train_result.json", asdict(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def epoch_of_step(indices: list[int], per_epoch: int) -> int:
    return indices[-1] // per_epoch + 1


def write_progress(run_dir: Path, done_here: int, step: int, total: int, epoch: int, epochs: int, loss: float,
                   started: float) -> None:
    """run_dir/progress.json after every optimizer step, for whoever watches (the CLI, Prefect artifacts)."""
    elapsed = time.monotonic() - started
    eta = elapsed / done_here * (total - step) if done_here else None
    atomic_write_json(run_dir / "progress.json", {
        "step": step, "total_steps": total, "epoch": epoch, "epochs": epochs, "loss": loss,
        "elapsed_seconds": round(elapsed, 1), "eta_seconds": None if eta is None else round(eta, 1),
    })


@torch.no_grad()
def held_out_loss(holdout: list[Example], micro_batch_loss, seed: int) -> float:
    """Loss on images never trained on, with the same noise every time so epochs compare."""
    total = 0.0
    for n, ex in enumerate(holdout):  # one at a time: held-out images may sit in different buckets
        total += micro_batch_loss([ex], micro_batch_generator(seed, -1 - n)).sum().item()
    return total / len(holdout)


def save_samples(run_dir, label, parts, unet, encoders, config, name, size, device, bf16) -> Path:
    movable = [parts.vae, *encoders]
    if not config.train_text_encoders:
        for module in movable:
            module.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        sheet = training_samples(parts, unet, encoders, config.sample_prompts, name or "a person", config.seed,
                                 config.sample_steps, size, title=f"training samples · {label} · rank {config.rank}")
    if not config.train_text_encoders and device.type == "cuda":
        for module in movable:
            module.to("cpu")
    dest = run_dir / "samples" / f"{label}.png"
    with atomic_path(dest, suffix=".png") as tmp:
        sheet.save(tmp)
    return dest


def save_lora(lora_dir: Path, modules: dict[str, torch.nn.Module]) -> Path:
    from diffusers import StableDiffusionXLPipeline

    states = {name: lora_state(module) for name, module in modules.items()}
    bad = [k for state in states.values() for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"LoRA weights are not finite: {bad[:5]}")
    kwargs = {}
    for name, module in modules.items():
        kwargs[f"{name}_lora_layers"] = states[name]
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    with atomic_dir(lora_dir) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name=LORA_WEIGHTS, **kwargs)
    return lora_dir / LORA_WEIGHTS
