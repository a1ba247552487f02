"""Triton kernels for `dropout(x, p) @ A.T` with the dropout mask applied while `x` is loaded and regenerated
from a Philox seed in backward, so that neither the dropped-out input nor a mask is written to memory.

One Philox call (`tl.randint4x`, four 32-bit words) draws the masks of 8 consecutive inputs of a row, 16 bits
each: an input is kept when its 16-bit draw is at least `threshold(p)` = round(p × 65536), so the dropout
probability is p rounded to 1/65536 (`effective_p`). Every kernel computes a tile's mask with `_keep`, whose
mapping from (row, column) to (Philox counter, 16-bit lane) depends on neither the tile size nor the kernel, so
backward regenerates exactly the forward's mask (one call per 8 inputs, where `tl.rand` makes one per input).
Tile sizes, warps and pipeline stages are picked per kernel and input shape by timing a few candidates on the GPU
at the first call (`_launch`); the mask does not depend on them. Imported only on CUDA (and by
`scripts/bench_lora_dropout.py`, which runs the kernels in Triton's CPU interpreter too): CPU torch has no triton.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl
import triton.testing

TILES: tuple[int, int] | None = None
"""(rows, columns) of x for every kernel's tile instead of the tuned choice (tests, Triton's CPU interpreter)."""

# Candidates, timed at the first call for each (kernel, rows rounded up to a power of two, columns, rank, dtype):
# (rows, columns, warps, stages) of a tile; the weight-gradient kernel also sums over a number of rows per program.
FORWARD = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3),
           (64, 128, 8, 4), (64, 256, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
GRAD_INPUT = [(32, 128, 4, 2), (32, 256, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (64, 256, 8, 2), (128, 64, 4, 2),
              (128, 128, 8, 2), (128, 256, 8, 2)]
GRAD_WEIGHT = [(32, 64, 256, 4, 3), (32, 128, 256, 4, 3), (64, 64, 512, 4, 3), (64, 128, 512, 4, 3),
               (64, 128, 1024, 8, 3), (64, 256, 1024, 8, 3), (128, 64, 1024, 8, 3), (128, 128, 2048, 8, 3)]
_chosen: dict[tuple, tuple] = {}
T = TypeVar("T")


@triton.jit
def _keep(seed, threshold, rows, k0, K8, BK: tl.constexpr):
    """Keep mask of the tile rows × [k0, k0 + BK) (k0 and BK multiples of 8; K8 = groups of 8 columns a row)."""
    groups = k0 // 8 + tl.arange(0, BK // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * K8 + groups[None, :])
    w0, w1 = r0.to(tl.uint32, bitcast=True), r1.to(tl.uint32, bitcast=True)
    w2, w3 = r2.to(tl.uint32, bitcast=True), r3.to(tl.uint32, bitcast=True)
    low = tl.interleave(tl.interleave((w0 & 0xFFFF).to(tl.int32), (w0 >> 16).to(tl.int32)),
                        tl.interleave((w1 & 0xFFFF).to(tl.int32), (w1 >> 16).to(tl.int32)))
    high = tl.interleave(tl.interleave((w2 & 0xFFFF).to(tl.int32), (w2 >> 16).to(tl.int32)),
                         tl.interleave((w3 & 0xFFFF).to(tl.int32), (w3 >> 16).to(tl.int32)))
    draws = tl.interleave(low, high)  # BM × BK: each group of 8 columns gets its call's eight 16-bit draws
    return draws >= threshold


@triton.jit
def _forward(x_ptr, a_ptr, h_ptr, seed_ptr, threshold, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
             BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, threshold, rm, k0, tl.cdiv(K, 8), BK), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    tl.store(h_ptr + rm[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


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
        x = tl.where(_keep(seed, threshold, rm, k0, tl.cdiv(K, 8), BK), x * scale, 0.0).to(x_ptr.dtype.element_ty)
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
    g = tl.where(_keep(seed, threshold, rm, k0, tl.cdiv(K, 8), BK), tl.dot(dh, a) * scale, 0.0)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], g.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _keep_mask(out_ptr, seed_ptr, threshold, M, K, BM: tl.constexpr, BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    keep = _keep(seed, threshold, rm, k0, tl.cdiv(K, 8), BK)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs each side ≥ 16, tl.arange a power of two


def threshold(p: float) -> int:
    """The 16-bit draw below which an input is dropped."""
    return min(max(round(p * 65536), 0), 65535)


def effective_p(p: float) -> float:
    """The dropout probability the kernels apply for p: p rounded to 1/65536."""
    return threshold(p) / 65536


def _launch(kernel: str, shape: tuple, candidates: list[tuple], run: Callable[[tuple], T]) -> T:
    """run(config) with the fastest of `candidates` for this kernel and shape, timed once per shape on the GPU;
    with `TILES` set, a config of the candidates' form with those tiles, 4 warps and 2 stages (and, for the
    weight gradient, 4 tiles of rows per program) instead."""
    if TILES is not None:
        bm, bk = TILES
        assert bk % 8 == 0 and min(bm, bk) >= 16, TILES  # whole groups of 8 columns; tl.dot's minimum
        return run((bm, bk, 4 * bm, 4, 2) if len(candidates[0]) == 5 else (bm, bk, 4, 2))
    m, *rest = shape
    key = (kernel, triton.next_power_of_2(m), *rest)
    if key not in _chosen:
        times = [triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in candidates]
        _chosen[key] = candidates[times.index(min(times))]
    return run(_chosen[key])


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a contiguous 2-D x (M × K) and weight (R × K)."""
    (m, k), r = x.shape, weight.shape[0]
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)

    def run(c: tuple) -> None:
        bm, bk, warps, stages = c
        _forward[(triton.cdiv(m, bm),)](x, weight, h, seed, threshold(p), 1.0 / (1.0 - effective_p(p)), m, k, r,
                                        RP=_rank_block(r), BM=bm, BK=bk, num_warps=warps, num_stages=stages)

    _launch("forward", (m, k, r, x.dtype), FORWARD, run)
    return h


def backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
             p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `forward` for the gradient dh (M × R) of its output."""
    (m, k), r = x.shape, weight.shape[0]
    cut, scale, rp = threshold(p), 1.0 / (1.0 - effective_p(p)), _rank_block(r)
    dx = torch.empty_like(x)

    def run_dx(c: tuple) -> None:
        bm, bk, warps, stages = c
        _grad_input[(triton.cdiv(m, bm), triton.cdiv(k, bk))](dh, weight, dx, seed, cut, scale, m, k, r, RP=rp,
                                                              BM=bm, BK=bk, num_warps=warps, num_stages=stages)

    def run_dw(c: tuple) -> torch.Tensor:  # partial sums of dweight, one per `rows` rows of x
        bm, bk, rows, warps, stages = c
        parts = torch.empty(triton.cdiv(m, rows), r, k, dtype=torch.float32, device=x.device)
        _grad_weight[(triton.cdiv(k, bk), parts.shape[0])](x, dh, parts, seed, cut, scale, m, k, r, rows, RP=rp,
                                                           BM=bm, BK=bk, num_warps=warps, num_stages=stages)
        return parts

    _launch("grad_input", (m, k, r, x.dtype), GRAD_INPUT, run_dx)
    return dx, _launch("grad_weight", (m, k, r, x.dtype), GRAD_WEIGHT, run_dw).sum(0).to(weight.dtype)


def keep_mask(seed: torch.Tensor, p: float, m: int, k: int, device: torch.device | str) -> torch.Tensor:
    """The mask the kernels use for an M × K input (True: kept), for tests."""
    bm, bk = TILES or (64, 64)
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    _keep_mask[(triton.cdiv(m, bm), triton.cdiv(k, bk))](out, seed, threshold(p), m, k, BM=bm, BK=bk)
    return out.bool()
