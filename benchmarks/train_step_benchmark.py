"""Training-step throughput: lorapipe's real step against the plain diffusers+peft loop, in one run.

    python benchmarks/train_step_benchmark.py                   # GPU: SDXL UNet at 1024², CPU: the tiny UNet
    python benchmarks/train_step_benchmark.py --model tiny --micro-batches 1,4
    python benchmarks/train_step_benchmark.py --optimizers      # one Lion step per implementation

What each row runs (same base weights, rank-8 LoRA on kohya's target set, alpha 8, LR 4e-4, one
optimizer step per micro-batch unless --accumulate; bf16 base and autocast on the GPU, fp32 on the CPU;
accelerate's prepare/backward/autocast in every row):
- plain diffusers+peft loop: diffusers' `train_text_to_image_lora_sdxl.py` step: peft's LoRA layers
  (`add_adapter(LoraConfig)`, LoRA weights cast to fp32), fixed latents on the device, noise and
  timesteps drawn there, MSE loss, bitsandbytes' 32-bit Lion, `loss.item()` every step;
- lorapipe step, peft's LoRA layers: lorapipe's step (below) with trainer/lora_layers.py detached;
- lorapipe step: what trainer/loop.py runs per micro-batch and step: `add_lora` + `place` +
  `trainer.lora_layers.attach`; latents drawn from the cached VAE posterior (mean + std * noise) and
  noise from a generator seeded by the micro-batch's position, on the CPU, then copied
  (`trainer.step.sample_training_inputs`); `trainer.step.per_image_loss`; lorapipe's multi-tensor Lion
  (`trainer.optim`, "auto"); one host sync per optimizer step.

The rows take turns (--rounds rounds of --steps steps each) so a busy machine slows them alike; the
table gives each row's median round. Random weights: fine for speed.

Reference (an H200, plain loop): 2.0 samples/s at micro-batch 1, 7.8 at 4, 12.8 at 8 (63.6 GiB). No GPU
was at hand when lorapipe's step was last changed: its GPU rows have not been measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from unets import LABEL, RESOLUTION, build_unet, plain_peft_lora, unet_inputs

from trainer.lora_layers import attach  # noqa: E402  (unets puts the repository on sys.path)
from trainer.models import UNET_TARGETS, add_lora  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.step import Conditioning, micro_batch_generator, per_image_loss, sample_training_inputs  # noqa: E402

REFERENCE = {1: 2.0, 4: 7.8, 8: 12.8}  # H200, plain diffusers+peft loop, SDXL at 1024², samples/s
DIFFERENCES = """what lorapipe's step does differently from the plain loop:
  LoRA layers  trainer/lora_layers.py over peft's weights (the middle row keeps peft's layers)
  optimizer    lorapipe's multi-tensor Lion, not bitsandbytes' Lion (the same arithmetic, bit for bit)
  data         latents drawn from the cached VAE posterior, noise from a generator seeded per
               micro-batch (on the CPU, then copied), so a resumed run gets the same noise
  host syncs   one per optimizer step in both ("s/step" is per optimizer step)"""
LR, WEIGHT_DECAY, RANK, ALPHA = 4e-4, 1e-2, 8, 8.0


class Row:
    """One way of training: its model, optimizer and step function."""

    def __init__(self, label, step, unet, optimizer, accelerator, batch, args, device, dtype):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.label, self.step_fn, self.args, self.device, self.dtype = label, step, args, device, dtype
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.accelerator, self.batch, self.index, self.rates = accelerator, batch, 0, []
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        sample, _, text, added = unet_inputs(unet, batch, args.resolution, "cpu", torch.float32)
        self.cond = Conditioning(text, added["text_embeds"], added["time_ids"])
        self.mean, self.std = sample, torch.full_like(sample, 0.1)  # lorapipe's cached VAE posterior
        self.latents = sample.to(device)  # the plain loop's cached latents and text embeddings, on the device
        self.device_cond = Conditioning(text.to(device, dtype), added["text_embeds"].to(device, dtype),
                                        added["time_ids"].to(device))

    def steps(self, count: int) -> float:
        """Runs `count` optimizer steps; returns samples/s."""
        sync()
        start = clock()
        for _ in range(count):
            self.step_fn(self)
        sync()
        return count * self.args.accumulate * self.batch / (clock() - start)


def clock() -> float:
    """Wall time with a GPU; on the CPU this process's CPU time, which other load on the machine does not
    inflate (the trainer runs one thread per process: OMP_NUM_THREADS=1)."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_step(row: Row) -> None:
    """diffusers' example loop body (train_text_to_image_lora_sdxl.py), accumulating like accelerate does."""
    acc, device, dtype, cond = row.accelerator, row.device, row.dtype, row.device_cond
    for _ in range(row.args.accumulate):
        noise = torch.randn_like(row.latents)
        timesteps = torch.randint(0, 1000, (row.batch,), device=device).long()
        noisy = row.scheduler.add_noise(row.latents, noise, timesteps)
        with acc.autocast():
            pred = row.unet(noisy.to(dtype), timesteps, cond.prompt_embeds,
                            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        acc.backward(loss / row.args.accumulate)
    row.optimizer.step()
    row.lr_scheduler.step()
    row.optimizer.zero_grad()
    loss.detach().item()  # the progress bar's loss


def lorapipe_step(row: Row) -> None:
    """trainer/loop.py's micro-batch and step (one process): the same functions, in the same order."""
    step_loss = torch.zeros((), device=row.device)
    for _ in range(row.args.accumulate):
        latents, noise, timesteps = sample_training_inputs(row.mean, row.std, 0.13025, 1000, 0.0,
                                                           micro_batch_generator(0, row.index))
        row.index += 1
        with row.accelerator.autocast():
            loss = per_image_loss(row.unet, row.scheduler, latents, noise, timesteps, row.cond, row.dtype).sum()
        row.accelerator.backward(loss / (row.batch * row.args.accumulate))
        step_loss += loss.detach()
    step_loss.item()
    row.optimizer.step()
    row.lr_scheduler.step()
    row.optimizer.zero_grad(set_to_none=True)


def make_rows(args, batch, device, dtype, accelerator) -> list[Row]:
    import bitsandbytes as bnb

    from trainer.loop import place

    unet = build_unet(args.model, device, dtype)
    params = plain_peft_lora(unet, "kohya", RANK, ALPHA)
    unet.train()
    rows = [Row("plain diffusers+peft loop", plain_step, unet,
                bnb.optim.Lion(params, lr=LR, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY), accelerator, batch,
                args, device, dtype)]
    for label, fast in (("lorapipe step, peft's LoRA layers", False), ("lorapipe step", True)):
        unet = build_unet(args.model, "cpu", torch.float32)  # as load_sdxl gives it
        params = add_lora(unet, RANK, ALPHA, UNET_TARGETS["kohya"])
        unet.train()
        place(unet, device, dtype)
        if fast:
            attach(unet)
        optimizer = make_optimizer([{"params": params, "lr": LR}], "auto", WEIGHT_DECAY)
        rows.append(Row(label, lorapipe_step, unet, optimizer, accelerator, batch, args, device, dtype))
    return rows


def benchmark_steps(args) -> None:
    from accelerate import Accelerator

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    args.model = args.model or ("sdxl" if device.type == "cuda" else "tiny")
    args.resolution = args.resolution or RESOLUTION[args.model]
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
    table = []
    for batch in [int(b) for b in args.micro_batches.split(",")]:
        rows = make_rows(args, batch, device, dtype, accelerator)
        for row in rows:
            row.steps(args.warmup)
        for _ in range(args.rounds):
            for row in rows:
                row.rates.append(row.steps(args.steps))
        table += [(row.label, batch, statistics.median(row.rates)) for row in rows]
        del rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} thread(s), CPU time)")
    print(f"\n{LABEL[args.model]} at {args.resolution}², {name}, {dtype}, {args.accumulate} micro-batch(es) per "
          f"optimizer step, median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'what runs':<36}{'micro-batch':>12}{'samples/s':>11}{'s/step':>9}{'vs plain':>10}{'reference':>11}")
    plain = {b: r for label, b, r in table if label.startswith("plain")}
    for label, batch, rate in table:
        ref = REFERENCE.get(batch) if label.startswith("plain") and args.model == "sdxl" else None
        print(f"{label:<36}{batch:>12}{rate:>11.2f}{batch * args.accumulate / rate:>9.3f}"
              f"{rate / plain[batch]:>9.2f}x{'-' if ref is None else ref:>11}")
    print("reference: an H200, plain loop, SDXL at 1024², measured earlier (not in this run)")
    print(DIFFERENCES)


def benchmark_optimizers(args) -> None:
    """One step of each Lion over the LoRA tensors of the model's kohya set (CPU; shapes from a meta build)."""
    from trainer.optim import LION_BETAS

    model = args.model or "sdxl"
    meta = build_unet(model, "meta", torch.float32)
    shapes = [p.shape for p in add_lora(meta, RANK, ALPHA, UNET_TARGETS["kohya"])]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    names = ["auto", "lion-pytorch", "bnb-lion", "bnb-lion8bit"]
    results, times = {}, {n: [] for n in names}
    optimizers = {}
    for name in names:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizers[name] = (params, make_optimizer([{"params": params, "lr": LR}], name, WEIGHT_DECAY))
    for step in range(args.warmup + args.steps):
        for name, (params, optimizer) in optimizers.items():  # take turns, as above
            for p, g in zip(params, grads[step % len(grads)]):
                p.grad = g
            begin = clock()
            optimizer.step()
            if step >= args.warmup:
                times[name].append(clock() - begin)
    for name, (params, _) in optimizers.items():
        results[name] = torch.cat([p.detach().flatten() for p in params])
    values = sum(s.numel() for s in shapes)
    print(f"\none Lion step (betas {LION_BETAS}) over {len(shapes):,} LoRA tensors ({values / 1e6:.1f} M values) "
          f"of the {LABEL[model]}'s kohya set, CPU ({torch.get_num_threads()} thread(s), CPU time), "
          f"median of {args.steps}")
    print(f"{'optimizer (train.optimizer)':<34}{'ms/step':>9}{'vs lion-pytorch':>17}{'result':>34}")
    ref = statistics.median(times["lion-pytorch"])
    for name in names:
        ms = statistics.median(times[name])
        diff = (results[name] - results["lion-pytorch"]).abs().max().item()
        same = "identical to lion-pytorch" if diff == 0 else f"max diff {diff:.1e}"
        label = "auto (lorapipe's multi-tensor Lion)" if name == "auto" else name
        print(f"{label:<34}{ms * 1e3:>9.1f}{ref / ms:>16.2f}x{same:>34}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sdxl", "tiny"], help="default: sdxl on a GPU, tiny on the CPU")
    parser.add_argument("--micro-batches", default=None, help="default: 1,4,8 on a GPU, 1,4 on the CPU")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--resolution", type=int, help="pixels (default: 1024 for sdxl, 256 for tiny)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="the CPU even where a GPU is")
    parser.add_argument("--optimizers", action="store_true", help="time one step of each Lion instead")
    args = parser.parse_args()
    if args.optimizers:
        benchmark_optimizers(args)
        return
    args.micro_batches = args.micro_batches or ("1,4,8" if torch.cuda.is_available() and not args.cpu else "1,4")
    benchmark_steps(args)


if __name__ == "__main__":
    main()
