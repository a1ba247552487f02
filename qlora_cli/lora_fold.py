"""LoRA's B product folded into the frozen projection's matrix product (`training.fold_lora_b`).

peft computes a LoRA projection as `base(x) + B(A(dropout(x))) * s`: two matrix products each write an output of
the projection's full size, and the sum reads both back. In the MLP's gate and up projections (14336 outputs
from 4096 inputs at 7-8B) these are the layer's largest tensors: 235 MB each per 4 × 2048 micro-batch. Folded,
one product computes the sum, `[x | h] @ [W | s·B]^T` with `h = A(dropout(x))` (K grows by the rank): the LoRA
output is never written nor read back. Backward: one product `g @ [W | s·B]` gives the gradients of x and h
(reading the output gradient g once, not twice), and `dB = s · g^T h`; the frozen weight gets no gradient.

The price is writing x into `[x | h]` for each folded projection (and K a rank longer), so only projections with
at least as many outputs as inputs (`MIN_WIDENING`) are folded: q, o, gate and up at Llama/Mistral/Qwen shapes.
By the bytes inductor's kernels move (scripts/bench_layer_bytes.py, a layer 1024 / 3584 wide, C++ kernels'
count): a step's 4.961 GB become 4.126 folding gate and up, 3.978 adding q and o, 3.997 adding k and v too (narrower
out than in); under a GPU's (Triton's) fusion rules 4.890 become 3.974 with q, o, gate and up. Those bytes did not
become speed: on an H200, Llama-3-8B trained 0.9 % slower folded, with a 0.70 GB lower peak (10.01 against 10.71
GB; docs/performance.md, fifteenth session), hence `training.fold_lora_b` is off by default.

Used with compiled NF4 layers (qlora_cli/nf4.py), plain LoRA (no DoRA or other variant, one adapter, no bias),
adapters in the layer's compute dtype. The weights, checkpoints and saved adapters are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .nf4 import dequantized_weight, routed, routed_through

MIN_WIDENING = 1
"""A projection is folded when out_features >= MIN_WIDENING × in_features (see the module docstring)."""


def _append(weight: torch.Tensor, scaled_b: torch.Tensor) -> torch.Tensor:
    return torch.cat((weight, scaled_b.to(weight.dtype)), dim=1)


class _FoldedProduct(torch.autograd.Function):
    """`[x | h] @ folded.T` with `folded = [W | s·B]`; gradients for x, h and B (through `lora_b`), none for W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, h: torch.Tensor, folded: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        ctx.save_for_backward(h, folded)
        ctx.scaling = scaling
        ctx.in_features = x.shape[-1]
        return torch.cat((x, h.to(x.dtype)), dim=-1) @ folded.T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, folded = ctx.saved_tensors
        both = grad @ folded
        grad_b = (grad.T @ h.to(grad.dtype)) * ctx.scaling
        k = ctx.in_features
        return both[:, :k], both[:, k:].to(h.dtype), None, grad_b, None


def _folded_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA forward, `base(x) + B(A(dropout(x))) * s`, as one folded product; peft's own forward when the
    adapter is off, merged or not the only active one, or the call has extra arguments."""
    names = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    dtype = lora_b.weight.dtype
    scaling = self.scaling[name]
    cast = x.to(dtype)
    h = lora_a(self.lora_dropout[name](cast))
    folded = dequantized_weight(self.base_layer, dtype, _append, lora_b.weight.detach() * scaling)
    out = _FoldedProduct.apply(cast.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), folded, lora_b.weight,
                               scaling)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def foldable(module: nn.Module) -> bool:
    """A peft LoRA layer on a compiled-NF4 linear layer (qlora_cli/nf4.py) that `use_folded_lora` can fold: one
    plain adapter, no bias, adapters in the layer's compute dtype, at least `MIN_WIDENING` times as many outputs as
    inputs."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    if not isinstance(lora_a, nn.ModuleDict) or len(lora_a) != 1 or base is None or not routed(base):
        return False
    (name,) = lora_a.keys()
    b = lora_b[name] if isinstance(lora_b, nn.ModuleDict) and name in lora_b else None
    if (getattr(module, "lora_variant", None) or any(getattr(module, "use_dora", {}).values())
            or not isinstance(b, nn.Linear) or b.bias is not None or base.bias is not None):
        return False
    if (base.compute_dtype or b.weight.dtype) != b.weight.dtype or lora_a[name].weight.dtype != b.weight.dtype:
        return False
    out_features, in_features = base.weight.quant_state.shape
    return out_features >= MIN_WIDENING * in_features


def folded(module: nn.Module) -> bool:
    """Whether `use_folded_lora` routed this LoRA layer through the folded product."""
    return routed_through(module, _folded_forward)


def use_folded_lora(model: nn.Module) -> int:
    """Route every `foldable` LoRA layer through the folded product; returns how many."""
    count = 0
    for module in model.modules():
        if foldable(module):
            module.forward = types.MethodType(_folded_forward, module)
            count += 1
    return count


def use_peft_forward(model: nn.Module) -> None:
    """Undo `use_folded_lora`."""
    for module in model.modules():
        if folded(module):
            del module.forward
