"""Triton kernels for `dropout(x, p) @ A.T` with the dropout mask applied while `x` is loaded and drawn again from
its seed in backward, so that neither the dropped-out input nor a mask is written to memory.

Each input's 16-bit draw is an integer hash of the seed and the input's index (`_keep`, the same function as
`qlora_cli.lora_dropout.hash_keep_mask`): an input is kept when its draw is at least `threshold(p)` =
round(p × 65536), so the dropout probability is p rounded to 1/65536 (`effective_p`). The draw depends on neither
the tile size nor the kernel, so backward regenerates exactly the forward's mask. Until the twelfth session the
draws came from Philox (`tl.randint4x`, one call per 8 inputs, spread over them with `tl.interleave`), which made the
mask most of what dropout cost the kernels (`scripts/bench_dropout_masks.py`, docs/performance.md).
Tile sizes, warps and pipeline stages are picked per kernel, input width and rank by timing a few candidates on
the GPU at the first call (`triton.autotune`); the mask does not depend on them.

The op training calls, `dropout_matmul`, is a `torch.library.triton_op`: inside the compiled layers inductor sees
its kernels and launches them from its own generated code, as it launches the layer's other kernels (a Python custom
op cost ~0.2 ms of CPU a call there under the profiler, seven calls a layer; in training no tokens/s difference was
measured, docs/performance.md, eleventh session). Imported only on CUDA (and by `scripts/bench_lora_dropout.py`,
which runs the kernels in Triton's CPU interpreter too): CPU torch has no triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from qlora_cli.lora_dropout import effective_p, register_backward, threshold

TILES: tuple[int, int] | None = None
"""(rows, columns) of x for every kernel's tile instead of the tuned choice (tests, Triton's CPU interpreter)."""

# Candidates, timed at the first call for each (kernel, columns, rank, dtype): (rows, columns, warps, stages) of a
# tile.
FORWARD = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3),
           (64, 128, 8, 4), (64, 256, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
GRAD_INPUT = [(32, 128, 4, 2), (32, 256, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (64, 256, 8, 2), (128, 64, 4, 2),
              (128, 128, 8, 2), (128, 256, 8, 2)]
GRAD_WEIGHT = [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (64, 256, 8, 3),
               (128, 64, 8, 3), (128, 128, 8, 3)]


@triton.jit
def _mix(h):
    """lowbias32 of uint32 values (`qlora_cli.lora_dropout.mix32`)."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _keep(seed, threshold, rows, k0, K, BK: tl.constexpr):
    """Keep mask of the tile rows × [k0, k0 + BK) of an input K wide (`hash_keep_mask`'s draws)."""
    cols = (k0 + tl.arange(0, BK)).to(tl.uint32)
    base = rows.to(tl.int64) * K  # flat index of each row's first element
    key = _mix((base >> 32).to(tl.uint32) ^ _mix((seed ^ 0x9E3779B9).to(tl.uint32)))  # lora_dropout.SEED_SALT
    draws = _mix((base.to(tl.uint32)[:, None] + cols[None, :]) ^ key[:, None]) >> 16
    return draws.to(tl.int32) >= threshold


@triton.jit
def _project(x_ptr, a_ptr, seed_ptr, threshold, scale, rm, rr, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
             BK: tl.constexpr):
    """dropout(x) @ A.T for the rows rm, in fp32."""
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, threshold, rm, k0, K, BK), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    return acc


@triton.jit
def _forward(x_ptr, a_ptr, h_ptr, seed_ptr, slot_ptr, phase_ptr, threshold, scale, M, K, R, RP: tl.constexpr,
             BM: tl.constexpr, BK: tl.constexpr, MEMO: tl.constexpr):
    """h = dropout(x) @ A.T; with MEMO, the phase at phase_ptr (`lora_dropout.RecomputeMemo`) says whether h is
    also stored to the slot (1) or read from it instead of computed (2)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    out = h_ptr + rm[:, None] * R + rr[None, :]
    inside = (rm[:, None] < M) & (rr[None, :] < R)
    if MEMO:
        phase = tl.load(phase_ptr)
        slot = slot_ptr + rm[:, None] * R + rr[None, :]
        if phase == 2:
            tl.store(out, tl.load(slot, mask=inside), mask=inside)
        else:
            h = _project(x_ptr, a_ptr, seed_ptr, threshold, scale, rm, rr, M, K, R, RP, BM, BK).to(
                h_ptr.dtype.element_ty)
            tl.store(out, h, mask=inside)
            if phase == 1:
                tl.store(slot, h, mask=inside)
    else:
        h = _project(x_ptr, a_ptr, seed_ptr, threshold, scale, rm, rr, M, K, R, RP, BM, BK)
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_weight(x_ptr, dh_ptr, part_ptr, seed_ptr, threshold, scale, M, K, R, ROWS, RP: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr):
    """Partial sums of dA = dh.T @ dropout(x) over ROWS rows each (program axis 1); the caller adds them up."""
    seed = tl.load(seed_ptr)
    k0 = tl.program_id(0) * BK
    rk = k0 + tl.arange(0, BK)
    split = tl.program_id(1)
    rr = tl.arange(0, RP)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for m0 in range(split * ROWS, split * ROWS + ROWS, BM):
        rm = m0 + tl.arange(0, BM)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, threshold, rm, k0, K, BK), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(dh), x)
    tl.store(part_ptr + split * R * K + rr[:, None] * K + rk[None, :], acc,
             mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _grad_input(dh_ptr, a_ptr, dx_ptr, seed_ptr, threshold, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
                BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    rr = tl.arange(0, RP)
    dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    g = tl.where(_keep(seed, threshold, rm, k0, K, BK), tl.dot(dh, a) * scale, 0.0)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], g.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _keep_mask(out_ptr, seed_ptr, threshold, M, K, BM: tl.constexpr, BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    keep = _keep(seed, threshold, rm, k0, K, BK)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs each side ≥ 16, tl.arange a power of two


def _configs(candidates: list[tuple]) -> list[triton.Config]:
    return [triton.Config({"BM": bm, "BK": bk}, num_warps=warps, num_stages=stages)
            for bm, bk, warps, stages in candidates]


# The kernels as launched: Triton times the candidates at the first call for each input width, rank and dtype
# (inside compiled layers, inductor does the same when it first runs its graph). `TILES` bypasses them.
_forward_tuned = triton.autotune(_configs(FORWARD), key=["K", "R"])(_forward)
_grad_input_tuned = triton.autotune(_configs(GRAD_INPUT), key=["K", "R"])(_grad_input)
_grad_weight_tuned = triton.autotune(_configs(GRAD_WEIGHT), key=["K", "R"])(_grad_weight)
TUNED = {"forward": _forward_tuned, "grad_input": _grad_input_tuned, "grad_weight": _grad_weight_tuned}


def _kernel(tuned, plain) -> tuple:
    """(kernel, extra launch arguments): the autotuned kernel, or the plain one with `TILES` and 4 warps."""
    if TILES is None:
        return wrap_triton(tuned), {}
    bm, bk = TILES
    assert min(bm, bk) >= 16, TILES  # tl.dot's minimum
    return wrap_triton(plain), {"BM": bm, "BK": bk, "num_warps": 4, "num_stages": 2}


def rows_per_program(m: int) -> int:
    """Rows of x each weight-gradient program sums over (a multiple of every candidate's BM)."""
    return 4 * TILES[0] if TILES is not None else min(2048, max(256, triton.next_power_of_2(m) // 16))


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, slot: torch.Tensor | None = None,
            phase: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a contiguous 2-D x (M × K) and weight (R × K); with a memo's `slot` (at least
    M × R, contiguous) and `phase`, stored or loaded as `lora_dropout.dropout_matmul_memo` says."""
    (m, k), r = x.shape, weight.shape[0]
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    kernel, extra = _kernel(_forward_tuned, _forward)
    memo = slot is not None
    kernel[lambda meta: (triton.cdiv(m, meta["BM"]),)](
        x, weight, h, seed, slot if memo else h, phase if memo else seed, threshold(p), 1.0 / (1.0 - effective_p(p)),
        m, k, r, RP=_rank_block(r), MEMO=memo, **extra)
    return h


def backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
             p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `forward` for the gradient dh (M × R) of its output."""
    (m, k), r = x.shape, weight.shape[0]
    cut, scale, rp = threshold(p), 1.0 / (1.0 - effective_p(p)), _rank_block(r)
    dx = torch.empty_like(x)
    kernel, extra = _kernel(_grad_input_tuned, _grad_input)
    kernel[lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(k, meta["BK"]))](
        dh, weight, dx, seed, cut, scale, m, k, r, RP=rp, **extra)
    rows = rows_per_program(m)  # partial sums of dweight, one per `rows` rows of x, added up in fp32
    parts = torch.empty(triton.cdiv(m, rows), r, k, dtype=torch.float32, device=x.device)
    kernel, extra = _kernel(_grad_weight_tuned, _grad_weight)
    kernel[lambda meta: (triton.cdiv(k, meta["BK"]), parts.shape[0])](
        x, dh, parts, seed, cut, scale, m, k, r, rows, RP=rp, **extra)
    return dx, parts.sum(0).to(weight.dtype)


@triton_op("qlora::dropout_matmul_cuda", mutates_args=())
def dropout_matmul(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """`qlora::dropout_matmul` on CUDA: the same product and mask contract, but a triton_op, so that the compiled
    layers launch its kernels from inductor's own code instead of through a Python custom op at each call."""
    return forward(x.contiguous(), weight.contiguous(), seed, p)


@triton_op("qlora::dropout_matmul_memo_cuda", mutates_args={"slot"})
def dropout_matmul_memo(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, slot: torch.Tensor,
                        phase: torch.Tensor) -> torch.Tensor:
    """`qlora::dropout_matmul_memo` on CUDA (`lora_dropout.RecomputeMemo`; no gradient, `lora_dropout.memo_product`
    gives it one): the phase is read by the kernel, so one graph serves the forward pass, its recompute and
    anything else."""
    return forward(x.contiguous(), weight.contiguous(), seed, p, slot, phase)


@triton_op("qlora::dropout_matmul_cuda_backward", mutates_args=())
def dropout_matmul_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `dropout_matmul`, with the mask drawn again from `seed`."""
    return backward(grad.contiguous(), x.contiguous(), weight.contiguous(), seed, p)


register_backward(dropout_matmul, dropout_matmul_backward)


def keep_mask(seed: torch.Tensor, p: float, m: int, k: int, device: torch.device | str) -> torch.Tensor:
    """The mask the kernels use for an M × K input (True: kept), for tests."""
    bm, bk = TILES or (64, 64)
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    _keep_mask[(triton.cdiv(m, bm), triton.cdiv(k, bk))](out, seed, threshold(p), m, k, BM=bm, BK=bk)
    return out.bool()
