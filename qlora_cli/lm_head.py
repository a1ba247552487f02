"""The loss head in two vocabulary-sized matrix products a step instead of three.

TRL's SFTTrainer scores each token with `trl.kernels.ChunkedLogProbFunction`, which never holds the
(tokens x vocabulary) logits: forward multiplies the hidden states by the LM head in tiles and keeps running
log-sum-exp statistics; backward multiplies them again to rebuild each tile, turns it into the logits' gradient
and multiplies that by the head. On Llama-3-8B's 128,256-entry vocabulary the three products are ~26 TFLOP for a
4 x 2048 micro-batch, 40 ms of an H200's step (`scripts/bench_lm_head.py`).

`LogProbHead` takes the backward's product in forward instead. Each tile of logits (rows x the whole vocabulary,
about TILE_BYTES) becomes its probabilities p in place (one Triton kernel: two passes over each row), and

    G = d log p(target) / d hidden = scale * (W[target] - p @ W)        (scale = logit_scale / temperature)

is stored per token in fp32; backward multiplies G by the incoming per-token gradient. The same quantities as
TRL's function come out (log-probabilities, and the entropy and top-1 flags SFTTrainer logs), at the same
precision (the probabilities in the compute dtype, their product with W summed in fp32 and rounded once, as TRL
does). G (4 bytes a hidden value) takes the place of the hidden-state copy TRL keeps for backward (2).

Only the log-probabilities carry a gradient: SFTTrainer's losses (NLL, DFT) read nothing else, and a gradient
arriving for the entropy raises instead of being dropped. Where the LM head or its bias trains, or the logits are
soft-capped, TRL's function runs unchanged (`TrlHeadOrOurs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the torch version of the kernel runs instead
    triton = None

TILE_BYTES = 256 * 2**20
"""Logits held at once (rows x vocabulary x element size): TRL's own tile is 4,096 x 32,768 bf16, 256 MiB."""


def tile_rows(vocab: int, element_size: int) -> int:
    """Tokens per logits tile: as many as fit TILE_BYTES, a multiple of 128 between 128 and 4,096."""
    rows = TILE_BYTES // (vocab * element_size) // 128 * 128
    return max(128, min(4096, rows))


if triton is not None:

    @triton.jit
    def _probs_kernel(tile_ptr, stride, targets_ptr, logp_ptr, entropy_ptr, top1_ptr, n_cols, scale,
                      HAS_ENTROPY: tl.constexpr, HAS_TOP1: tl.constexpr, BLOCK: tl.constexpr):
        # One program per token: log-sum-exp, entropy and top-1 of the row's scaled logits (first pass), then the
        # row overwritten with its probabilities (second pass).
        row = tl.program_id(0).to(tl.int64)
        ptr = tile_ptr + row * stride
        target = tl.load(targets_ptr + row)
        scale = tl.cast(scale, tl.float32)
        m = -float("inf")
        s = 0.0
        xs = 0.0
        before = -float("inf")  # largest logit before the target's column (argmax returns the first maximum)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            z = tl.load(ptr + cols, mask=inside, other=0.0).to(tl.float32) * scale
            z = tl.where(inside, z, -float("inf"))
            if HAS_TOP1:
                before = tl.maximum(before, tl.max(tl.where(cols < target, z, -float("inf")), axis=0))
            new_m = tl.maximum(m, tl.max(z, axis=0))
            rescale = tl.exp(m - new_m)
            e = tl.where(inside, tl.exp(z - new_m), 0.0)
            s = s * rescale + tl.sum(e, axis=0)
            if HAS_ENTROPY:
                xs = xs * rescale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)
            m = new_m
        log_z = m + tl.log(s)
        zt = tl.load(ptr + target).to(tl.float32) * scale
        tl.store(logp_ptr + row, zt - log_z)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, log_z - xs / s)
        if HAS_TOP1:
            tl.store(top1_ptr + row, (zt >= m) & (zt > before))
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            z = tl.load(ptr + cols, mask=inside, other=0.0).to(tl.float32) * scale
            tl.store(ptr + cols, tl.exp(z - log_z).to(tile_ptr.dtype.element_ty), mask=inside)


def _probs_torch(tile: torch.Tensor, targets: torch.Tensor, scale: float, logp: torch.Tensor,
                 entropy: torch.Tensor | None, top1: torch.Tensor | None) -> None:
    """`_probs_kernel` in torch, the whole tile at once (devices without Triton)."""
    z = tile.float() * scale
    log_z = torch.logsumexp(z, dim=-1)
    zt = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp.copy_(zt - log_z)
    p = torch.exp(z - log_z.unsqueeze(-1))
    if entropy is not None:
        entropy.copy_(log_z - (p * z).sum(-1))
    if top1 is not None:
        top1.copy_(z.argmax(-1) == targets)
    tile.copy_(p)


def _use_triton(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


class LogProbHead(torch.autograd.Function):
    """Per-token log-probabilities of `hidden @ weight.T (+ bias)` under `scale = logit_scale / temperature`, with
    the entropy and top-1 flags on request; arguments and outputs as `trl.kernels.ChunkedLogProbFunction`'s
    (`chunk_size` and `softcap` are accepted and unused: the tiles span the whole vocabulary, and soft-capped heads
    go to TRL's function)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, chunk_size: int, softcap: float | None = None, logit_scale: float = 1.0,
                outputs: tuple[str, ...] = ("log_probs",)):
        from trl.kernels.chunked_logprob import _addmm_fp32

        ctx.set_materialize_grads(False)
        device = hidden.device
        n_tokens, width = hidden.shape
        vocab = weight.shape[0]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        scale = logit_scale / temperature
        logp = torch.empty(n_tokens, device=device, dtype=torch.float32)
        entropy = torch.empty_like(logp) if "entropy" in outputs else None
        top1 = torch.empty(n_tokens, device=device, dtype=torch.bool) if "is_top1" in outputs else None
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        want_grad = ctx.needs_input_grad[0]
        # fp32, like TRL's gradient accumulator: rounded once, when backward scales it
        grad = torch.empty((n_tokens, width), device=device, dtype=torch.float32) if want_grad else None
        rows = max(1, min(n_tokens, tile_rows(vocab, w.element_size())))
        buf = torch.empty((rows, vocab), device=device, dtype=dtype)
        for start in range(0, n_tokens, rows):
            end = min(start + rows, n_tokens)
            n = end - start
            tile, t = buf[:n], targets[start:end]
            torch.mm(hidden[start:end].to(dtype), w.t(), out=tile)
            if b is not None:
                tile.add_(b)
            part = (logp[start:end], None if entropy is None else entropy[start:end],
                    None if top1 is None else top1[start:end])
            if _use_triton(device):  # outputs not asked for get the log-probabilities' pointer, never written
                _probs_kernel[(n,)](tile, tile.stride(0), t, *(part[0] if x is None else x for x in part), vocab,
                                    scale, HAS_ENTROPY=entropy is not None, HAS_TOP1=top1 is not None, BLOCK=2048,
                                    num_warps=8)
            else:
                _probs_torch(tile, t, scale, *part)
            if want_grad:
                g = grad[start:end].zero_()
                _addmm_fp32(g, tile, w)  # p @ W, summed in fp32 (TRL's helper; bf16 inputs on torch >= 2.8)
                torch.sub(w[t].float(), g, out=g)
                if scale != 1.0:
                    g.mul_(scale)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        if top1 is not None:
            ctx.mark_non_differentiable(top1)
        return logp, entropy, None, None, top1

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_):  # type: ignore[override]
        if grad_entropy is not None:
            raise RuntimeError("qlora's loss head gives the log-probabilities a gradient, not the entropy; set "
                               "`training.lm_head_grad_in_forward: false` to differentiate the entropy")
        (grad,) = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 9
        dh = (grad * grad_logp.float().unsqueeze(-1)).to(ctx.hidden_dtype)
        return (dh,) + (None,) * 8


class TrlHeadOrOurs:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` in TRL's fused LM head: `LogProbHead` where it computes
    the same thing, TRL's function where it does not (a head or bias that trains, soft-capped logits)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        from trl.kernels import ChunkedLogProbFunction

        trains_head = weight.requires_grad or (bias is not None and bias.requires_grad)
        if trains_head or softcap is not None:
            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                                logit_scale, outputs)
        return LogProbHead.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                                 outputs)


EVERY_POSITION_SHARE = 0.9
"""Share of the training tokens with a loss from which `qlora train` scores every position (`gradient_in_forward`)."""


@contextlib.contextmanager
def gradient_in_forward(enabled: bool, every_position: bool = False) -> Iterator[bool]:
    """While open, TRL's fused LM head (SFTTrainer's loss) runs `LogProbHead`. Yields whether it does: not when
    `enabled` is false, or where the installed TRL has no chunked head (it then computes full logits itself).

    `every_position`: the head also scores the positions without a label (their log-probabilities are then zeroed,
    as TRL does on devices without Triton), instead of TRL's selection of the labelled ones with
    `hidden_states[mask]`, which makes the CPU wait for the forward pass to finish before it can queue the head (the
    number of rows is read back). `qlora train` sets it when at least EVERY_POSITION_SHARE of the training tokens
    carry a loss (plain text, packed conversations with long answers): the few extra rows cost less than the wait.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        trl_utils = None
    original = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if not enabled or original is None:
        yield False
        return
    compact = getattr(trl_utils, "_use_triton", None)  # TRL's choice between the two ways (trl/trainer/utils.py)
    trl_utils._ChunkedLogProbFunction = TrlHeadOrOurs
    if every_position and compact is not None:
        trl_utils._use_triton = lambda device: False
    try:
        yield True
    finally:
        trl_utils._ChunkedLogProbFunction = original
        if compact is not None:
            trl_utils._use_triton = compact
