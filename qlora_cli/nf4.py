"""NF4 weights dequantized inside the compiled decoder layers, instead of through bitsandbytes' Python ops.

bitsandbytes runs a training-size NF4 matmul as its `gemm_4bit` op: Python code that dequantizes the nested
absmax, the weights, then calls `F.linear` (0.1-0.3 ms of CPU per call under the profiler); a 7B step makes ~670
such calls (forward, recompute and backward of 7 projections x 32 layers), and the step is partly CPU-bound
(docs/performance.md). Here the same arithmetic (4-bit code -> NF4 value x block absmax, the absmax itself
8-bit quantized when `bnb_4bit_use_double_quant`) is written in torch ops, so inductor fuses each dequantization
into one kernel launched from its generated code, and the matmul is a plain `mm` in the compiled graph.

Used with compiled layers (`training.compile_layers`) on CUDA, NF4 weights in uint8 storage.
The weights, checkpoints and saved adapters are unchanged; only the layers' forward differs.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """The weight bitsandbytes' `dequantize_4bit` returns, from its parts (for `torch.compile` to fuse).

    `packed`: two 4-bit codes per byte, the first element in the high nibble; `code`: the 16 values (NF4 or FP4);
    `absmax`: one scale per `blocksize` elements, or (nested) its 8-bit codes into `code2`, scaled per `blocksize2`
    absmax values by `absmax2`, plus `offset`.
    """
    packed = packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).to(torch.int32)
    values = code[codes]
    if absmax2 is not None:
        blocks = absmax.numel()
        group = torch.arange(blocks, device=absmax.device) // blocksize2
        absmax = code2[absmax.to(torch.int32)] * absmax2[group] + offset
    weight = values.view(-1, blocksize) * absmax.float().view(-1, 1)
    return weight.to(dtype).view(shape)


def state_parts(quant_state: Any) -> tuple[torch.Tensor, ...]:
    """The tensors `dequantize` reads from a bitsandbytes QuantState (absmax, code[, absmax2, code2, offset])."""
    if quant_state.nested:
        state2 = quant_state.state2
        return quant_state.absmax, quant_state.code, state2.absmax, state2.code, quant_state.offset
    return quant_state.absmax, quant_state.code


def _weight(packed, parts, blocksize, shape, blocksize2, dtype, then=None, *extra) -> torch.Tensor:
    absmax, code, *nested = parts
    absmax2, code2, offset = nested if nested else (None, None, None)
    weight = dequantize(packed, absmax, code, blocksize, shape, dtype, absmax2, code2, offset, blocksize2)
    return weight if then is None else then(weight, *extra)


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype, then: Any = None, *extra: torch.Tensor
                       ) -> torch.Tensor:
    """The NF4 layer's weight in `dtype`, passed through `then(weight, *extra)` when given (qlora_cli/lora_fold.py
    appends LoRA's B to it), in torch ops.

    The dequantization runs under `checkpoint`: in the compiled graph that marks it "recompute", so backward
    dequantizes again from the packed weight (as bitsandbytes does) instead of keeping the 16-bit weight of all
    7 projections from forward to backward (+0.3 GB peak on a 7B step when it did: docs/performance.md). Layers
    that are themselves checkpointed keep it (`keep_dequantized_in_recompute`): their first pass saves nothing,
    and their recompute keeps one layer's weights until that layer's backward.
    """
    state = module.weight.quant_state
    blocksize2 = state.state2.blocksize if state.nested else 256
    args = (module.weight.data, state_parts(state), state.blocksize, tuple(state.shape), blocksize2, dtype, then,
            *extra)
    if getattr(module, "qlora_keep_dequantized", False):
        return _weight(*args)
    return checkpoint(_weight, *args, use_reentrant=False)


def _forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`bnb.nn.Linear4bit.forward` with the weight dequantized in torch ops (`dequantized_weight`)."""
    input_dtype = x.dtype
    dtype = self.compute_dtype or x.dtype
    weight = dequantized_weight(self, dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias).to(input_dtype)


def eligible(module: torch.nn.Module) -> bool:
    """A bitsandbytes NF4 linear layer whose weights `dequantize` reads: uint8 storage, whole blocks."""
    from bitsandbytes.nn import Linear4bit

    if not isinstance(module, Linear4bit):
        return False
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or module.weight.dtype != torch.uint8:
        return False
    return math.prod(state.shape) % state.blocksize == 0


def use_compiled_dequantization(model: torch.nn.Module) -> int:
    """Route every eligible NF4 linear layer through `_forward`; returns how many layers now use it."""
    count = 0
    for module in model.modules():
        if eligible(module):
            state = module.weight.quant_state
            if state.nested:  # a pre-quantized checkpoint loads the offset as a CPU scalar: keep it by its weight
                state.offset = torch.as_tensor(state.offset, dtype=torch.float32, device=module.weight.device)
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def routed_through(module: Any, function: Any) -> bool:
    """Whether the module's own `forward` attribute is `function` bound to it (how qlora reroutes a layer's forward
    here and in qlora_cli/lora_fold.py); False for anything else, None included."""
    return getattr(getattr(module, "__dict__", {}).get("forward"), "__func__", None) is function


def routed(module: torch.nn.Module) -> bool:
    """Whether `use_compiled_dequantization` routed this layer through `_forward`."""
    return routed_through(module, _forward)


def keep_dequantized_in_recompute(layer: torch.nn.Module, deferred: torch.nn.Module | None) -> int:
    """Let the NF4 layers inside a checkpointed decoder layer save their dequantized weights for backward (all but
    `deferred`, which runs outside the checkpoint: it would keep its weight from forward to backward); returns how
    many. Under the checkpoint the first pass saves nothing, and the recompute in backward keeps the weights of
    this one layer until its backward has run, instead of dequantizing them again (`training.keep_dequantized`)."""
    count = 0
    for module in layer.modules():
        if module is not deferred and routed(module):
            module.qlora_keep_dequantized = True
            count += 1
    return count


def use_bitsandbytes_forward(model: torch.nn.Module) -> None:
    """Undo `use_compiled_dequantization` (eager generation: bitsandbytes' kernels are faster for small batches)."""
    for module in model.modules():
        if routed(module):
            del module.forward
        vars(module).pop("qlora_keep_dequantized", None)
