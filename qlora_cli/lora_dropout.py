"""LoRA dropout applied inside the product with A (`training.fused_lora_dropout`).

peft computes each LoRA projection as `B(A(dropout(x)))`: the dropped-out input is written to memory for the
product with A and a mask is kept for backward, for each of a layer's seven projections. On an H200 the recipes'
dropout of 0.05 costs 61 ms of a 0.794 s Mistral-7B step against dropout 0 (docs/performance.md, eighth session).
With this option the A projection of every LoRA layer becomes `FusedDropoutLinear`: one op computes
`dropout(x, p) @ A.T` with a mask drawn from a seed, and backward draws the same mask again from the seed, so
neither the dropped-out input nor the mask is stored. On CUDA the op runs Triton kernels (qlora_cli/triton_lora.py);
elsewhere PyTorch ops, with the same mask.

The seed is a tensor drawn from torch's generator at each call, inside the (compiled) layer: a gradient checkpoint
restores the generator before it recomputes a layer, so the recompute draws the same seed and mask, as it does for
peft's dropout. Each element's 16-bit draw is a hash of the seed and the element's index (`keep_mask`): the same
on every device and in every kernel, whatever its tiles. An element is kept when its draw is at least
round(p × 65536), so the dropout probability is p rounded to 1/65536 (`effective_p`), each element kept with
probability 1 - p (tests/test_fast_path.py checks the rate, and that neighbouring elements, rows and seeds draw
independently; each call, so each projection, draws its own seed). The masks are not peft's, so a run differs
from a peft-dropout run by its random draws only.

`dropout_matmul` below is the PyTorch version, for any device; on CUDA in 16 bits `FusedDropoutLinear` calls the
Triton version, `qlora_cli.triton_lora.dropout_matmul`, which has the same arguments and mask.

Under gradient checkpointing the layer's recompute needs each projection's output again; `RecomputeMemo`
(`training.keep_lora_a_outputs`) keeps it from the forward pass instead of computing it a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .recipe import Recipe


def resolve_fused_lora_dropout(recipe: Recipe, compiled: bool) -> bool:
    """`training.fused_lora_dropout: auto` -> on where the decoder layers are compiled (CUDA training of models
    with hidden size >= 2048, not FSDP), the setting it was measured in; true/false as written."""
    setting = recipe.training.fused_lora_dropout
    return compiled if setting == "auto" else bool(setting)


def fuses_dropout(recipe: Recipe, compiled: bool) -> bool:
    """Whether training will run the recipe's LoRA dropout inside the A projections: the option resolved, and a
    dropout and adapters it applies to (plain LoRA, bfloat16 adapters where it runs on the GPU)."""
    lora = recipe.lora
    return (resolve_fused_lora_dropout(recipe, compiled) and lora.lora_dropout > 0 and not lora.use_dora
            and lora.adapter_dtype != "float32")


def draw_seed(device: torch.device) -> torch.Tensor:
    """The seed of one call's mask: drawn from torch's generator, so a checkpoint's recompute draws it again."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def threshold(p: float) -> int:
    """The 16-bit draw below which an input is dropped."""
    return min(max(round(p * 65536), 0), 65535)


def effective_p(p: float) -> float:
    """The dropout probability applied for p: p rounded to 1/65536."""
    return threshold(p) / 65536


U32 = 0xFFFFFFFF
SEED_SALT = 0x9E3779B9
"""Mixed into the seed before it is hashed (the golden-ratio constant): seed 0 does not hash a zero key."""


def _times(h: torch.Tensor, c: int) -> torch.Tensor:
    """h × c modulo 2^32 for uint32 values held in int64, in two halves so that no product leaves int64."""
    return ((h & 0xFFFF) * c + (((h >> 16) * c & 0xFFFF) << 16)) & U32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' integer hash: two multiplies, three xor-shifts) of uint32 values held in int64; the
    Triton kernels compute the same function (`qlora_cli.triton_lora._mix`)."""
    h = h ^ (h >> 16)
    h = _times(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _times(h, 0x846CA68B)
    return h ^ (h >> 16)


def hash_keep_mask(seed: torch.Tensor, p: float, m: int, k: int, first_row: int = 0) -> torch.Tensor:
    """The mask (True: kept) of an m × k input for `seed`, in torch ops on the seed's device (rows from `first_row`
    on: a part of a larger input's mask).

    Element (row, col) has the flat index i = row × k + col. Its draw is the top 16 bits of
    mix32((row × k mod 2^32 + col) mod 2^32 XOR key), key = mix32((row × k div 2^32) XOR mix32(seed XOR SEED_SALT)):
    below 2^32 elements every element of a call hashes a different value (mix32 is a bijection)."""
    seed_key = mix32((seed.reshape(()).to(torch.int64) ^ SEED_SALT) & U32)
    base = torch.arange(first_row, first_row + m, device=seed.device, dtype=torch.int64) * k
    key = mix32(((base >> 32) ^ seed_key) & U32)
    cols = torch.arange(k, device=seed.device, dtype=torch.int64)
    draws = mix32((((base & U32)[:, None] + cols[None, :]) & U32) ^ key[:, None]) >> 16
    return draws >= threshold(p)


def keep_mask(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The mask `dropout_matmul` applies to a 2-D x for this seed (True: kept), on x's device."""
    if _use_triton(x):
        from qlora_cli import triton_lora

        return triton_lora.keep_mask(seed, p, x.shape[0], x.shape[1], x.device)
    return hash_keep_mask(seed.to(x.device), p, x.shape[0], x.shape[1])


@torch.library.custom_op("qlora::dropout_matmul", mutates_args=())
def dropout_matmul(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a 2-D x (M × K) and weight (R × K), the mask drawn from `seed`."""
    return (x * keep_mask(x, seed, p) / (1 - effective_p(p))).to(x.dtype) @ weight.T


@dropout_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("qlora::dropout_matmul_backward", mutates_args=())
def dropout_matmul_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `dropout_matmul`, with the mask drawn again from `seed`."""
    keep = keep_mask(x, seed, p)
    scale = 1 / (1 - effective_p(p))
    dropped = (x * keep * scale).to(x.dtype)
    return ((grad @ weight) * keep * scale).to(x.dtype), (grad.T @ dropped).to(weight.dtype)


@dropout_matmul_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
      p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def register_backward(op, backward_op) -> None:
    """Give `op(x, weight, seed, p)` the gradient `backward_op(grad, x, weight, seed, p)` -> (dx, dweight): only the
    inputs and the seed are kept, the mask is drawn again (also for the Triton op, qlora_cli/triton_lora.py)."""

    def setup_context(ctx, inputs, output) -> None:
        x, weight, seed, p = inputs
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p

    def backward(ctx, grad: torch.Tensor):
        x, weight, seed = ctx.saved_tensors
        dx, dweight = backward_op(grad, x, weight, seed, ctx.p)
        return dx, dweight, None, None

    op.register_autograd(backward, setup_context=setup_context)


register_backward(dropout_matmul, dropout_matmul_backward)

# The phases of a memo (`RecomputeMemo`), read by the op from a one-element int32 tensor on the device.
COMPUTE, STORE, LOAD = 0, 1, 2


@torch.library.custom_op("qlora::dropout_matmul_memo", mutates_args=("slot",))
def dropout_matmul_memo(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, slot: torch.Tensor,
                        phase: torch.Tensor) -> torch.Tensor:
    """`dropout_matmul`'s value with a memo: in phase STORE it is also written to the first rows of `slot`; in
    phase LOAD it is read back from there instead of computed (a checkpoint's recompute of the same call); in
    phase COMPUTE the slot is left alone. No gradient (an op that writes to an input cannot have one):
    `memo_product` gives it `dropout_matmul`'s."""
    rows, now = x.shape[0], int(phase.item())
    if now == LOAD:
        return slot[:rows].clone()
    h = dropout_matmul(x, weight, seed, p)
    if now == STORE:
        slot[:rows].copy_(h)
    return h


@dropout_matmul_memo.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, slot: torch.Tensor,
      phase: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class _WithProductGradient(torch.autograd.Function):
    """h, with the gradient of h = dropout_matmul(x, weight, seed, p) for x and weight."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                p: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, seed = ctx.saved_tensors
        if _use_triton(x):
            from qlora_cli.triton_lora import dropout_matmul_backward as backward_op
        else:
            backward_op = dropout_matmul_backward
        dx, dweight = backward_op(grad, x, weight, seed, ctx.p)
        return None, dx, dweight, None, None


def memo_product(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, slot: torch.Tensor,
                 phase: torch.Tensor) -> torch.Tensor:
    """dropout(x, p) @ weight.T as `dropout_matmul` (value and gradient), through the memo `slot` and `phase`."""
    if _use_triton(x):
        from qlora_cli.triton_lora import dropout_matmul_memo as op
    else:
        op = dropout_matmul_memo
    h = op(x.detach(), weight.detach(), seed, p, slot, phase)
    return _WithProductGradient.apply(h, x, weight, seed, p)


class RecomputeMemo:
    """The outputs of a checkpointed layer's fused A projections, kept from its forward pass for the recompute in
    backward (`training.keep_lora_a_outputs`).

    Gradient checkpointing reruns the layer in backward, and with it each A projection `dropout(x) @ A.T`: a
    read of the projection's whole input and its mask drawn again, for an output of only rank columns a row
    (8,192 × 16 for a micro-batch of 4 × 2,048 at rank 16, 256 KiB). So each projection keeps its output in a
    slot of its own, and the recompute reads it back instead: the same values (the recompute would compute them
    bit for bit from the same input, weight and seed), the same gradient (backward still draws the mask from the
    seed). One `phase` tensor on the device tells the layer's ops whether to store (forward pass), load (the
    recompute of that forward pass) or only compute (anything else); the checkpoint sets it on entering each
    pass (`contexts`), so the compiled layer runs one graph for all three.

    The slots hold `capacity` rows (every projection of the layer, rank columns each, in the adapter's dtype),
    allocated up front and grown if a micro-batch has more rows; a recompute whose forward pass was not the
    layer's latest (two forward passes before their backward) computes again instead of loading."""

    def __init__(self, modules: list[nn.Module], capacity: int) -> None:
        self.modules = modules
        weight = modules[0].weight
        self.phase = torch.full((1,), COMPUTE, dtype=torch.int32, device=weight.device)
        self.owner: object | None = None
        self.grow(capacity)
        for module in modules:
            module.qlora_memo_phase = self.phase

    @property
    def capacity(self) -> int:
        """Rows the slots hold (0 before the first allocation)."""
        slot = getattr(self.modules[0], "qlora_memo_slot", None)
        return 0 if slot is None else slot.shape[0]

    def grow(self, rows: int) -> None:
        """Slots of at least `rows` rows (a compiled layer recompiles once for the new slot size)."""
        if rows <= self.capacity:
            return
        for module in self.modules:
            module.qlora_memo_slot = torch.empty(rows, module.out_features, dtype=module.weight.dtype,
                                                 device=module.weight.device)

    def set(self, phase: int) -> None:
        self.phase.fill_(phase)

    def contexts(self, rows: int) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(forward, recompute) context managers for one checkpointed call over `rows` rows (the `context_fn` of
        torch.utils.checkpoint)."""
        self.grow(rows)
        token = object()

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            self.owner = token
            self.set(STORE)
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            self.set(LOAD if self.owner is token else COMPUTE)
            try:
                yield
            finally:
                self.set(COMPUTE)

        return forward(), recompute()


def memo_rows(recipe: Recipe) -> int:
    """Rows of each `RecomputeMemo` slot training allocates for the recipe: a micro-batch's most tokens
    (micro-batch × data.max_length), or 0 with `training.keep_lora_a_outputs: false`."""
    t = recipe.training
    return t.per_device_train_batch_size * recipe.data.max_length if t.keep_lora_a_outputs else 0


def keep_lora_a_outputs(layer: nn.Module, capacity: int) -> RecomputeMemo | None:
    """Give the fused A projections of a checkpointed decoder layer a `RecomputeMemo` (None: the layer has none)."""
    modules = [m for m in layer.modules() if isinstance(m, FusedDropoutLinear)]
    return RecomputeMemo(modules, capacity) if modules else None


def forget_lora_a_outputs(layer: nn.Module) -> None:
    """Undo `keep_lora_a_outputs` (the slots are freed)."""
    for module in layer.modules():
        vars(module).pop("qlora_memo_slot", None)
        vars(module).pop("qlora_memo_phase", None)


class FusedDropoutLinear(nn.Linear):
    """A LoRA A projection that applies its layer's dropout itself (see the module docstring). Same weight, same
    state-dict keys; in eval mode, or with p = 0, a plain linear layer."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.bias is not None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)  # a custom op is not autocast: peft's cast
        seed = draw_seed(x.device)
        if getattr(self, "qlora_memo_slot", None) is not None:
            h = memo_product(flat, self.weight, seed, self.p, self.qlora_memo_slot, self.qlora_memo_phase)
        elif _use_triton(flat):
            from qlora_cli.triton_lora import dropout_matmul as op

            h = op(flat, self.weight, seed, self.p)
        else:
            h = dropout_matmul(flat, self.weight, seed, self.p)
        return h.reshape(*x.shape[:-1], self.out_features)


def use_fused_lora_dropout(model: nn.Module) -> int:
    """Move each plain LoRA layer's dropout into its A projection; returns how many layers changed. Left as they
    are: DoRA and other variants, layers without dropout, A projections that are not `nn.Linear`, and float32
    adapters on CUDA."""
    changed = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, linear in lora_a.items():
            dropout = dropouts[name] if name in dropouts else None
            if (name in variants or type(linear) is not nn.Linear or linear.bias is not None
                    or not isinstance(dropout, nn.Dropout) or dropout.p == 0):
                continue
            if linear.weight.is_cuda and linear.weight.dtype not in (torch.bfloat16, torch.float16):
                continue  # fp32 adapters on CUDA keep peft's dropout: the kernels multiply in 16 bits
            linear.__class__ = FusedDropoutLinear
            linear.p = float(dropout.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
