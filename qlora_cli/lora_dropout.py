"""LoRA dropout applied inside the product with A (`training.fused_lora_dropout`).

peft computes each LoRA projection as `B(A(dropout(x)))`: the dropped-out input is written to memory for the
product with A and a mask is kept for backward, for each of a layer's seven projections. On an H200 the recipes'
dropout of 0.05 costs 61 ms of a 0.794 s Mistral-7B step against dropout 0 (docs/performance.md, eighth session).
With this option the A projection of every LoRA layer becomes `FusedDropoutLinear`: one op computes
`dropout(x, p) @ A.T` with a mask drawn from a seed, and backward draws the same mask again from the seed, so
neither the dropped-out input nor the mask is stored. On CUDA the op runs Triton kernels (qlora_cli/triton_lora.py);
elsewhere PyTorch with a mask from a generator seeded the same way.

The seed is a tensor drawn from torch's generator at each call, inside the (compiled) layer: a gradient checkpoint
restores the generator before it recomputes a layer, so the recompute draws the same seed and mask, as it does for
peft's dropout. The masks are as random as peft's (each element kept with probability 1 - p, independently per
projection; on CUDA p is rounded to 1/65536, 16-bit draws) but not the same ones, so a run differs from a
peft-dropout run by its random draws only.

`dropout_matmul` below is the PyTorch version, for any device; on CUDA in 16 bits `FusedDropoutLinear` calls the
Triton version, `qlora_cli.triton_lora.dropout_matmul`, which has the same arguments and mask contract.
"""

from __future__ import annotations

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


def keep_mask(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The mask `dropout_matmul` applies to a 2-D x for this seed (True: kept)."""
    if _use_triton(x):
        from qlora_cli import triton_lora

        return triton_lora.keep_mask(seed, p, x.shape[0], x.shape[1], x.device)
    g = torch.Generator().manual_seed(int(seed.item()))
    return (torch.rand(x.shape, generator=g) >= p).to(x.device)


@torch.library.custom_op("qlora::dropout_matmul", mutates_args=())
def dropout_matmul(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a 2-D x (M × K) and weight (R × K), the mask drawn from `seed`."""
    return (x * keep_mask(x, seed, p) / (1 - p)).to(x.dtype) @ weight.T


@dropout_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("qlora::dropout_matmul_backward", mutates_args=())
def dropout_matmul_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `dropout_matmul`, with the mask drawn again from `seed`."""
    keep = keep_mask(x, seed, p)
    dropped = (x * keep / (1 - p)).to(x.dtype)
    return ((grad @ weight) * keep / (1 - p)).to(x.dtype), (grad.T @ dropped).to(weight.dtype)


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


class FusedDropoutLinear(nn.Linear):
    """A LoRA A projection that applies its layer's dropout itself (see the module docstring). Same weight, same
    state-dict keys; in eval mode, or with p = 0, a plain linear layer."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.bias is not None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)  # a custom op is not autocast: peft's cast
        if _use_triton(flat):
            from qlora_cli.triton_lora import dropout_matmul as op
        else:
            op = dropout_matmul
        return op(flat, self.weight, draw_seed(x.device), self.p).reshape(*x.shape[:-1], self.out_features)


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
