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

ADAPTER = "default"
# Sibling Linears that attention modules call on one input (diffusers' Attention; CLIP's attention).
SHARED_INPUT = [("to_q", "to_k", "to_v"), ("q_proj", "k_proj", "v_proj")]


class _Group:
    """Adapted Linears that read one input. Their A matrices are rows of one (members x rank) x in view."""

    def __init__(self, layers: list, offset: int, first_index: int):
        a = layers[0].lora_A[ADAPTER].weight
        self.rank, self.in_features, self.scale = a.shape[0], a.shape[1], float(layers[0].scaling[ADAPTER])
        self.a_off, self.cache = offset, None
        offset += len(layers) * a.numel()
        self.slots = []
        for row, layer in enumerate(layers):
            self.slots.append(_Slot(self, layer, row, offset, first_index + row))
            offset += layer.lora_B[ADAPTER].weight.numel()
        self.end = offset

    def a_view(self, flat: torch.Tensor, slot: _Slot | None = None) -> torch.Tensor:
        rows = self.rank * len(self.slots)
        a = flat.narrow(0, self.a_off, rows * self.in_features).view(rows, self.in_features)
        return a if slot is None else a.narrow(0, slot.row * self.rank, self.rank)


class _Slot:
    """One adapted Linear: its peft layer, its row in its group, where its B sits in the flat tensor."""

    def __init__(self, group: _Group, layer, row: int, b_off: int, index: int):
        self.group, self.layer, self.row, self.b_off, self.index = group, layer, row, b_off, index

    def b_view(self, flat: torch.Tensor) -> torch.Tensor:
        out = self.layer.base_layer.out_features
        return flat.narrow(0, self.b_off, out * self.group.rank).view(out, self.group.rank)

    def cols(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return t.narrow(dim, self.row * self.group.rank, self.group.rank)


class _Pass:
    """One forward of the module: the LoRA weights in the compute dtype and, with autograd on, the buffer
    backward writes their gradients into (`written_a/b[i]`: slot i's gradient is in the buffer)."""

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor | None, slots: int):
        self.flat, self.grad = flat, grad
        self.written_a, self.written_b = [False] * slots, [False] * slots
        self.shared: list[_Shared] = []


class _Shared:
    """One call of a group's down-projection: x A_cat^T for every member, computed once."""

    def __init__(self, pass_: _Pass, x: torch.Tensor, x2: torch.Tensor, h: torch.Tensor):
        self.pass_, self.x, self.x2, self.h = pass_, weakref.ref(x), x2, h  # x2: x as N x in, compute dtype
        self.used: list[int] = []  # rows of the members that consumed it
        self.g_h = None  # backward: (members x rank) x N, the gradient reaching h, transposed
        self.remaining = None


class _Gather(torch.autograd.Function):
    """Forward: every LoRA weight, concatenated and cast to the compute dtype (two operations).
    Backward: each weight's gradient, a view of the buffer the layers wrote, cast back (one operation)."""

    @staticmethod
    def forward(ctx, owner, dtype, training, *params):
        flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
        ctx.owner = owner
        ctx.set_materialize_grads(False)
        ctx.pass_ = owner.current = _Pass(flat, torch.empty_like(flat) if training else None, len(owner.slots))
        return flat

    @staticmethod
    def backward(ctx, _):
        owner, pass_ = ctx.owner, ctx.pass_
        if any(s.remaining for s in pass_.shared):
            raise RuntimeError("fast LoRA: an attention projection's output was not used; detach trainer.lora_layers")
        complete = all(pass_.written_a) and all(pass_.written_b)
        grad, pass_.grad, pass_.shared = pass_.grad, None, []
        if complete and owner.grads_are_views():
            # A later micro-batch of gradient accumulation: one add instead of one per LoRA tensor.
            owner.grad.add_(grad)
            return (None,) * (3 + len(owner.params))
        full = grad.to(owner.param_dtype)
        owner.grad = full if complete else None
        grads = []
        for slot in owner.slots:  # in the order of owner.params: per group, its A's, then its B's
            if slot.row == 0:
                grads += [slot.group.a_view(full, s) if pass_.written_a[s.index] else None for s in slot.group.slots]
            grads.append(slot.b_view(full) if pass_.written_b[slot.index] else None)
        return (None, None, None, *(g if g is None else g.view(p.shape) for g, p in zip(grads, owner.params)))


def _write_a(pass_: _Pass, slots: list[_Slot], g_h: torch.Tensor, x2: torch.Tensor) -> None:
    """grad A (+)= scale * g_h x for `slots`, in one matmul when they are the whole group, written alike."""
    group = slots[0].group
    written = {pass_.written_a[s.index] for s in slots}
    if len(slots) == len(group.slots) and len(written) == 1:
        group.a_view(pass_.grad).addmm_(g_h, x2, beta=int(written.pop()), alpha=group.scale)
    else:
        for s in slots:
            group.a_view(pass_.grad, s).addmm_(s.cols(g_h, 0), x2, beta=int(pass_.written_a[s.index]),
                                               alpha=group.scale)
    for s in slots:
        pass_.written_a[s.index] = True


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + bias + scale * (x A^T) B^T, with A and B read from the pass's flat tensor."""

    @staticmethod
    def forward(ctx, x, flat, pass_, slot):
        group, base = slot.group, slot.layer.base_layer
        shared = group.cache
        if (len(group.slots) == 1 or shared is None or shared.pass_ is not pass_ or shared.x() is not x
                or slot.row in shared.used):
            x2 = x.reshape(-1, x.shape[-1]).to(pass_.flat.dtype)
            shared = _Shared(pass_, x, x2, torch.mm(x2, group.a_view(pass_.flat).t()))
            if len(group.slots) > 1:
                group.cache = shared
                if pass_.grad is not None:
                    pass_.shared.append(shared)
        x2 = shared.x2
        shared.used.append(slot.row)
        if len(shared.used) == len(group.slots):
            shared.x2 = None  # held only until the group's last member has read it
        y = torch.addmm(base.bias, x2, base.weight.t()) if base.bias is not None else torch.mm(x2, base.weight.t())
        y.addmm_(slot.cols(shared.h), slot.b_view(pass_.flat).t(), alpha=group.scale)
        ctx.save_for_backward(x2, shared.h)
        ctx.pass_, ctx.slot, ctx.shared, ctx.x_shape = pass_, slot, shared, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, h = ctx.saved_tensors
        pass_, slot, shared = ctx.pass_, ctx.slot, ctx.shared
        group = slot.group
        g2 = g.reshape(-1, g.shape[-1])
        b_t = slot.b_view(pass_.flat).t()
        members = len(group.slots)
        if shared.g_h is None:
            shared.remaining = len(shared.used)
            shared.g_h = torch.mm(b_t, g2.t()) if members == 1 else h.new_empty(members * group.rank, g2.shape[0])
        if members > 1:
            torch.mm(b_t, g2.t(), out=slot.cols(shared.g_h, 0))
        slot.b_view(pass_.grad).addmm_(g2.t(), slot.cols(h), beta=int(pass_.written_b[slot.index]),
                                       alpha=group.scale)
        pass_.written_b[slot.index] = True
        grad_x = torch.mm(g2, slot.layer.base_layer.weight) if ctx.needs_input_grad[0] else None
        shared.remaining -= 1
        whole = len(shared.used) == members
        if whole and shared.remaining == 0:  # the last member of the group: A gradients and dx for all
            _write_a(pass_, group.slots, shared.g_h, x2)
            if grad_x is not None:
                grad_x.addmm_(shared.g_h.t(), group.a_view(pass_.flat), alpha=group.scale)
        elif not whole:  # the members did not share this input: each its own
            _write_a(pass_, [slot], shared.g_h, x2)
            if grad_x is not None:
                grad_x.addmm_(slot.cols(shared.g_h, 0).t(), group.a_view(pass_.flat, slot), alpha=group.scale)
        return None if grad_x is None else grad_x.view(ctx.x_shape), None, None, None


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
        dtype = self.slots[0].layer.base_layer.weight.dtype
        _Gather.apply(self, dtype, torch.is_grad_enabled(), *self.params)

    def _forward_for(self, slot: _Slot):
        layer, peft_forward = slot.layer, type(slot.layer).forward

        def forward(x, *args, **kwargs):
            pass_ = self.current
            if (args or kwargs or pass_ is None or layer.disable_adapters or layer.merged
                    or list(layer.active_adapters) != [ADAPTER]):
                return peft_forward(layer, x, *args, **kwargs)
            if x.dtype != pass_.flat.dtype and not (  # autocast: a norm's fp32 output, cast like autocast would
                    torch.is_autocast_enabled(x.device.type)
                    and torch.get_autocast_dtype(x.device.type) == pass_.flat.dtype):
                return peft_forward(layer, x, *args, **kwargs)
            return _LoRALinear.apply(x, pass_.flat, pass_, slot)

        return forward

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        for slot in self.slots:
            slot.layer.__dict__.pop("forward", None)
        self.current = None
        for group in self.groups:
            group.cache = None


def attach(module: torch.nn.Module) -> FastLoRA:
    """Run `module`'s peft LoRA Linears with the fast step (until `.detach()`)."""
    return FastLoRA(module)
