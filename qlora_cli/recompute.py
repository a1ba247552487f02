"""Gradient checkpointing around the compiled decoder layers, and the last projection run outside it.

Checkpointing reruns each layer's forward in backward to get back what backward needs. A layer that ends in
`residual + mlp.down_proj(x)` does not need that projection's output again, nor (its weight being frozen) its
input for a weight gradient: only the gradient flowing through it. Running its frozen part outside the checkpoint
keeps the recompute from doing that matmul again (`training.recompute_down_proj: false`, the default).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .lora_dropout import COMPUTE, RecomputeMemo
from .lora_fold import folded


def checkpoint_around(layer: torch.nn.Module, deferred: torch.nn.Module | None = None,
                      memo: RecomputeMemo | None = None, **compile_kwargs: Any) -> None:
    """Take the layer's gradient checkpoint around its compiled call, not inside the compiled graph.

    transformers 5.23+ checkpoints each layer's `forward`, which `Module.compile` compiles: the checkpoint is then
    traced by torch.compile, and flex attention (the CUDA default for packed rows) cannot be traced inside one, so
    it ran unfused (a 7B-shape run did not finish 34 steps in 400 s on an H200; docs/performance.md).
    transformers up to 5.22 checkpointed `__call__`, around the compiled call, which is what this restores.
    transformers' own checkpoint is kept off at every call, since `Trainer.train()` enables it again when it starts
    (on 5.17 that nested a second checkpoint around this one in the first step only); `uncompile_layers` gives it
    back.

    `deferred`, the frozen linear layer that ends the layer (`deferrable_projection`), then runs after the
    checkpointed call, compiled on its own: the checkpointed call adds nothing for it and returns its input, and
    its output is added to the layer's. Backward needs neither its output nor its input (the weight is frozen),
    so the recompute in backward skips its matmul: on Llama and Mistral shapes 27 % of a layer's matmul work.

    `memo` (`lora_dropout.keep_lora_a_outputs`): the checkpoint tells the layer's fused A projections to keep their
    outputs in the forward pass and to read them back in its recompute.
    """
    compiled = layer._compiled_call_impl
    add_projection = None
    if deferred is not None:
        state = defer_projection(deferred)
        add_projection = AddProjection(deferred)
        add_projection.compile(**compile_kwargs)

        def without_projection(*args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
            state.active = True  # also when the checkpoint reruns this in backward
            try:
                out = compiled(*args, **kwargs)
            finally:
                state.active = False
            projection_input, state.input = state.input, None
            return out, projection_input

    def call(*args: Any, **kwargs: Any) -> Any:
        layer.gradient_checkpointing = False  # Trainer.train() turns transformers' own back on when it starts
        if not (layer.training and torch.is_grad_enabled()):
            if memo is not None:
                memo.set(COMPUTE)
            return compiled(*args, **kwargs)
        if memo is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            contexts = memo.contexts(hidden.numel() // hidden.shape[-1])
            kwargs = {**kwargs, "context_fn": lambda: contexts}
        if add_projection is None:
            return checkpoint(compiled, *args, use_reentrant=False, **kwargs)
        out, projection_input = checkpoint(without_projection, *args, use_reentrant=False, **kwargs)
        if isinstance(out, tuple):  # layers of older transformers versions return (hidden_states, ...)
            return (add_projection(out[0], projection_input), *out[1:])
        return add_projection(out, projection_input)

    call.checkpoint_around = True
    call.deferred = deferred
    layer.gradient_checkpointing = False
    layer._compiled_call_impl = call


# Decoder layers whose output is `residual + mlp.down_proj(x)`, with MLP `down_proj(act(gate_proj(x)) * up_proj(x))`
# and nothing after the down projection (tests/test_fast_path.py runs each against the plain checkpoint).
SUMMED_LAST_PROJECTION = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def deferrable_projection(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen linear layer inside `layer.mlp.down_proj` when the layer's output is the residual plus its output
    (a plain LoRA adapter on top, or none); None for other layers, DoRA and other LoRA variants."""
    if type(layer).__name__ not in SUMMED_LAST_PROJECTION:
        return None
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if getattr(down, "lora_variant", None) or any(getattr(down, "use_dora", {}).values()) or folded(down):
        return None  # a folded layer (qlora_cli/lora_fold.py) computes its frozen product together with B's
    base = down.get_base_layer() if hasattr(down, "get_base_layer") else down
    if not isinstance(base, torch.nn.Linear) or any(p.requires_grad for p in base.parameters()):
        return None
    return base


class _Deferral:
    """While `active`, a deferred projection keeps its input here and adds nothing."""

    def __init__(self, forward: Any) -> None:
        self.active = False
        self.input: torch.Tensor | None = None
        self.forward = forward  # the layer's own `forward` attribute (qlora_cli/nf4.py sets one), or None


def _deferred_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state = self.qlora_deferral
    if state.active:
        state.input = x
        return x.new_zeros(())  # the adapter's output adds to it; the layer's output is the residual plus that
    if state.forward is not None:
        return state.forward(x, *args, **kwargs)
    return type(self).forward(self, x, *args, **kwargs)


def defer_projection(base: torch.nn.Module) -> _Deferral:
    """Route `base` through `_deferred_forward`; returns the state that switches it."""
    state = _Deferral(vars(base).get("forward"))
    base.qlora_deferral = state
    base.forward = types.MethodType(_deferred_forward, base)
    return state


def undefer_projection(base: torch.nn.Module) -> None:
    """Undo `defer_projection`."""
    state = vars(base).pop("qlora_deferral")
    if state.forward is not None:
        base.forward = state.forward
    else:
        del base.forward


class AddProjection(torch.nn.Module):
    """`out + base(x)`: the deferred projection, compiled on its own (one graph serves every layer)."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out + self.base(x)
