"""A LoRA training step that dispatches far fewer operations than peft's layers, on peft's own weights.

peft stays how the LoRA is described, saved and loaded: `attach(module)` only replaces the forward of
peft's `lora.Linear` layers (an instance attribute: module names, parameters, `state_dict`, saving and
loading are untouched) and adds one forward pre-hook to the module; `detach()` undoes both.

Why: a peft LoRA Linear with fp32 LoRA weights on a bf16 base runs its base matmul, a cast of the
input to fp32, two matmuls, a multiply by the scale, an add and a cast back, and in backward about as
many again. On SDXL's kohya target set (722 Linears) that takes one forward+backward from 6,409
dispatched operations (bare UNet) to 17,061, and a GPU at micro-batch 1 spends most of a step launching
them (`benchmarks/step_ops.py` counts them). Here each adapted Linear is one autograd function:

- no per-call casts: all LoRA weights are cast to the compute dtype in one operation per forward of
  the module (a pre-hook concatenates them into one flat tensor; layers read views of it), and each
  layer writes its weights' gradients into one flat buffer, cast back to fp32 once at the end of backward;
- the scale folded into the matmuls (`alpha=` of `addmm`), never a separate multiply;
- Linears that read the same input (q/k/v of self-attention, k/v of cross-attention) share one
  down-projection matmul forward, and one matmul each for their A gradients and their input's gradient
  backward: their A matrices sit next to each other in the flat tensor.

The LoRA branch computes in the base weights' dtype (bf16 on the GPU), as peft's layers do under
autocast and kohya's in mixed precision; gradients reach peft's fp32 parameters through autograd, so
optimizers, gradient accumulation, DDP and gradient checkpointing see ordinary `.grad`s.

Layers it does not cover (dropout, DoRA and other variants, a LoRA bias, several active adapters,
non-Linear bases) keep peft's forward, and so does any call with a disabled or merged adapter.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

ADAPTER = "default"
# Sibling Linears that attention modules call on one input (diffusers' Attention; CLIP's attention).
SHARED_INPUT = [("to_q", "to_k", "to_v"), ("q_proj", "k_proj", "v_proj")]


class _Group:
    """Adapted Linears that read one input. In the flat tensor: their A's (one (members x rank) x in
    block, so one matmul projects the input for all), then their B's."""

    def __init__(self, layers: list, offset: int, first_index: int):
        a = layers[0].lora_A[ADAPTER].weight
        self.rank, self.in_features, self.scale = a.shape[0], a.shape[1], float(layers[0].scaling[ADAPTER])
        self.a_off, self.cache = offset, None
        offset += len(layers) * a.numel()
        self.slots = []
        for row, layer in enumerate(layers):
            self.slots.append(_Slot(self, layer, row, offset, first_index + row))
            offset += layer.lora_B[ADAPTER].weight.numel()
        self.end, self.single = offset, len(layers) == 1

    def bind(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        """Views of the weights (`flat`) and of their gradients (`grad`), made once per buffer."""
        rows = self.rank * len(self.slots)
        self.a = flat.narrow(0, self.a_off, rows * self.in_features).view(rows, self.in_features)
        self.a_t = self.a.t()
        self.ga = grad.narrow(0, self.a_off, rows * self.in_features).view(rows, self.in_features)
        for slot in self.slots:
            slot.bind(flat, grad)


class _Slot:
    """One adapted Linear: its base layer, its row in its group, its views of the flat tensors."""

    def __init__(self, group: _Group, layer, row: int, b_off: int, index: int):
        self.group, self.layer, self.row, self.b_off, self.index = group, layer, row, b_off, index
        # Parameter objects outlive dtype and device moves (those replace their .data).
        self.weight, self.bias, self.out_features = layer.base_layer.weight, layer.base_layer.bias, \
            layer.base_layer.out_features
        self.col = row * group.rank  # its columns of the group's x A^T

    def bind(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        out, rank = self.out_features, self.group.rank
        self.a, self.ga = self.group.a.narrow(0, self.col, rank), self.group.ga.narrow(0, self.col, rank)
        self.b_t = flat.narrow(0, self.b_off, out * rank).view(out, rank).t()
        self.gb = grad.narrow(0, self.b_off, out * rank).view(out, rank)


class _Pass:
    """One forward of the module (`written_a/b[i]`: slot i's gradient is in the buffer)."""

    def __init__(self, slots: int, training: bool):
        self.training = training
        self.written_a, self.written_b = [False] * slots, [False] * slots
        self.shared: list[_Shared] = []


class _Shared:
    """One call of a group's down-projection: x A^T for every member, computed once."""

    def __init__(self, pass_: _Pass, x: torch.Tensor, x2: torch.Tensor, h: torch.Tensor):
        self.pass_, self.x, self.x2, self.h = pass_, weakref.ref(x), x2, h  # x2: x as N x in, compute dtype
        self.used: list[int] = []  # rows of the members that consumed it
        self.g_h = None  # backward: (members x rank) x N, the gradient reaching h, transposed
        self.remaining = None


class _Gather(torch.autograd.Function):
    """Forward: every LoRA weight into the flat tensor, in the compute dtype (one or two operations), and
    a token that makes autograd run this backward after every layer's. Backward: each weight's gradient,
    a view of one copy of the buffer the layers wrote, in the weights' dtype (one operation)."""

    @staticmethod
    def forward(ctx, owner, training, *params):
        flat = owner.flat
        if flat.dtype == owner.param_dtype:
            torch.cat([p.view(-1) for p in params], out=flat)
        else:
            flat.copy_(torch.cat([p.view(-1) for p in params]))
        ctx.owner = owner
        ctx.set_materialize_grads(False)
        ctx.pass_ = owner.current = _Pass(len(owner.slots), training)
        return flat.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        owner, pass_ = ctx.owner, ctx.pass_
        if any(s.remaining for s in pass_.shared):
            raise RuntimeError("fast LoRA: an attention projection's output was not used; detach trainer.lora_layers")
        pass_.shared = []
        complete = all(pass_.written_a) and all(pass_.written_b)
        if complete and owner.grads_are_views():
            # A later micro-batch of gradient accumulation: one add instead of one per LoRA tensor.
            owner.grad.add_(owner.grad_buffer)
            return (None,) * (2 + len(owner.params))
        full = owner.grad_buffer.to(owner.param_dtype, copy=True)
        owner.grad = full if complete else None
        written = [w for g in owner.groups for w in  # owner.params' order: per group, its A's, then its B's
                   [pass_.written_a[s.index] for s in g.slots] + [pass_.written_b[s.index] for s in g.slots]]
        chunks = full.split(owner.sizes)
        return (None, None, *(c.view(p.shape) if w else None for c, p, w in zip(chunks, owner.params, written)))


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + bias + scale * (x A^T) B^T, with A and B views of the flat tensor."""

    @staticmethod
    def forward(ctx, x, token, pass_, slot):
        group, shared = slot.group, None
        if group.single:
            x2 = x.reshape(-1, x.shape[-1]).to(group.a.dtype)
            h = h_all = torch.mm(x2, group.a_t)
        else:
            shared = group.cache
            if shared is None or shared.pass_ is not pass_ or shared.x() is not x or slot.row in shared.used:
                x2 = x.reshape(-1, x.shape[-1]).to(group.a.dtype)
                shared = group.cache = _Shared(pass_, x, x2, torch.mm(x2, group.a_t))
                if pass_.training:
                    pass_.shared.append(shared)
            x2, h_all = shared.x2, shared.h
            h = h_all.narrow(1, slot.col, group.rank)
            shared.used.append(slot.row)
            if len(shared.used) == len(group.slots):
                shared.x2 = None  # held only until the group's last member has read it
        y = F.linear(x2, slot.weight, slot.bias)
        y.addmm_(h, slot.b_t, alpha=group.scale)
        ctx.save_for_backward(x2, h_all)
        ctx.pass_, ctx.slot, ctx.shared, ctx.x_shape = pass_, slot, shared, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, h = ctx.saved_tensors
        pass_, slot, shared = ctx.pass_, ctx.slot, ctx.shared
        group = slot.group
        g2 = g.reshape(-1, g.shape[-1])
        if shared is None:
            g_h = torch.mm(slot.b_t, g2.t())  # the gradient reaching x A^T, transposed: rank x N
        else:
            whole = len(shared.used) == len(group.slots)  # every member read this input
            if shared.g_h is None:
                shared.remaining = len(shared.used) if whole else 0
                shared.g_h = h.new_empty(len(group.slots) * group.rank, g2.shape[0])
            g_h = torch.mm(slot.b_t, g2.t(), out=shared.g_h.narrow(0, slot.col, group.rank))
            h = h.narrow(1, slot.col, group.rank)
            shared.remaining -= whole
        slot.gb.addmm_(g2.t(), h, beta=int(pass_.written_b[slot.index]), alpha=group.scale)
        pass_.written_b[slot.index] = True
        grad_x = torch.mm(g2, slot.weight) if ctx.needs_input_grad[0] else None
        if shared is not None and whole:
            if shared.remaining:  # the group's other members have yet to run: the last does A and dx for all
                return None if grad_x is None else grad_x.view(ctx.x_shape), None, None, None
            slots, g_h, a = group.slots, shared.g_h, group.a
        else:  # alone, or the group's members did not share this input
            slots, a = [slot], slot.a
        _write_a(pass_, slots, g_h, x2)
        if grad_x is not None:
            grad_x.addmm_(g_h.t(), a, alpha=group.scale)
        return None if grad_x is None else grad_x.view(ctx.x_shape), None, None, None


def _write_a(pass_: _Pass, slots: list[_Slot], g_h: torch.Tensor, x2: torch.Tensor) -> None:
    """grad A (+)= scale * g_h x for `slots` (g_h: their rows), in one matmul when they are the whole group."""
    group = slots[0].group
    written = {pass_.written_a[s.index] for s in slots}
    if len(written) == 1:
        ga = group.ga if len(slots) == len(group.slots) else slots[0].ga
        ga.addmm_(g_h, x2, beta=int(written.pop()), alpha=group.scale)
    else:
        for s in slots:
            s.ga.addmm_(g_h.narrow(0, s.col, group.rank), x2, beta=int(pass_.written_a[s.index]), alpha=group.scale)
    for s in slots:
        pass_.written_a[s.index] = True


def _covered(layer) -> bool:
    """Whether `layer` is a plain peft LoRA Linear this module can run (see the module docstring)."""
    from peft.tuners.lora import Linear as LoraLinear

    return (
        isinstance(layer, LoraLinear)
        and isinstance(layer.base_layer, torch.nn.Linear)
        and list(layer.active_adapters) == [ADAPTER]
        and ADAPTER in layer.lora_A
        and ADAPTER not in layer.lora_variant
        and isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity)
        and layer.lora_B[ADAPTER].bias is None
        and not layer.fan_in_fan_out
    )


def _groups(module: torch.nn.Module) -> list[list]:
    """The covered layers of `module`, in module order, grouped by the input they share."""
    covered = [m for m in module.modules() if _covered(m)]
    grouped, groups = set(), {}
    for parent in module.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT:
            if getattr(parent, "is_cross_attention", False):  # diffusers: to_q reads the image, k/v the text
                names = names[1:]
            members = [children[n] for n in names if n in children and _covered(children[n])]
            a = [m.lora_A[ADAPTER].weight for m in members]
            if len(members) > 1 and len({(t.shape, t.dtype) for t in a}) == 1 and \
                    len({float(m.scaling[ADAPTER]) for m in members}) == 1:
                groups[id(members[0])] = members
                grouped.update(id(m) for m in members)
    return [groups[id(m)] if id(m) in groups else [m] for m in covered if id(m) in groups or id(m) not in grouped]


class FastLoRA:
    """The fast forward/backward on every plain peft LoRA Linear of `module` (see the module docstring).
    One forward's backward must run before the next forward with autograd on (as in any training loop)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.current = module, None
        self.groups: list[_Group] = []
        offset = 0
        for layers in _groups(module):
            group = _Group(layers, offset, sum(len(g.slots) for g in self.groups))
            self.groups.append(group)
            offset = group.end
        self.slots = [s for g in self.groups for s in g.slots]
        self.params = [p for g in self.groups for p in [s.layer.lora_A[ADAPTER].weight for s in g.slots] +
                       [s.layer.lora_B[ADAPTER].weight for s in g.slots]]
        # Where each parameter starts in the flat tensor (and in `self.grad`, their accumulated gradients).
        self.offsets = [o for g in self.groups for o in [g.a_off + s.row * g.rank * g.in_features for s in g.slots]
                        + [s.b_off for s in g.slots]]
        self.grad: torch.Tensor | None = None
        self.param_dtype = self.params[0].dtype if self.params else torch.float32
        if any(p.dtype != self.param_dtype for p in self.params):
            raise ValueError("LoRA weights of mixed dtypes: cast them to one dtype first")
        self.sizes = [p.numel() for p in self.params]
        self.flat = self.grad_buffer = None  # the weights in the compute dtype; their gradients (one pass)
        self._hook = module.register_forward_pre_hook(self._gather) if self.slots else None
        for slot in self.slots:
            slot.layer.forward = self._forward_for(slot)

    def grads_are_views(self) -> bool:
        """Whether every LoRA weight's .grad is still the view of `self.grad` that backward handed to
        autograd (so adding to `self.grad` accumulates them all). Never under torch.distributed: DDP
        all-reduces gradients from hooks that only run when autograd delivers them."""
        if self.grad is None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        base, size = self.grad.data_ptr(), self.grad.element_size()
        return all(p.grad is not None and p.grad.data_ptr() == base + offset * size
                   for p, offset in zip(self.params, self.offsets))

    def _gather(self, module, args):
        weight = self.slots[0].weight  # the compute dtype and device: the base weights'
        if self.flat is None or self.flat.dtype != weight.dtype or self.flat.device != weight.device:
            self.flat = torch.empty(sum(self.sizes), dtype=weight.dtype, device=weight.device)
            self.grad_buffer = torch.empty_like(self.flat)
            for group in self.groups:
                group.bind(self.flat, self.grad_buffer)
        self.token = _Gather.apply(self, torch.is_grad_enabled(), *self.params)

    def _forward_for(self, slot: _Slot):
        layer, peft_forward = slot.layer, type(slot.layer).forward

        def forward(x, *args, **kwargs):
            pass_ = self.current
            if (args or kwargs or pass_ is None or layer.disable_adapters or layer.merged
                    or layer.active_adapters != [ADAPTER]):
                return peft_forward(layer, x, *args, **kwargs)
            dtype = self.flat.dtype
            if x.dtype != dtype and not (  # autocast: a norm's fp32 output, cast like autocast would
                    torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == dtype):
                return peft_forward(layer, x, *args, **kwargs)
            return _LoRALinear.apply(x, self.token, pass_, slot)

        return forward

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        for slot in self.slots:
            slot.layer.__dict__.pop("forward", None)
        self.current = self.token = self.flat = self.grad_buffer = None
        for group in self.groups:
            group.cache = None


def attach(module: torch.nn.Module) -> FastLoRA:
    """Run `module`'s peft LoRA Linears with the fast step (until `.detach()`)."""
    return FastLoRA(module)
