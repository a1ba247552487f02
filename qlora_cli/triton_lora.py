"""Triton kernels for `dropout(x, p) @ A.T` with the dropout mask applied while `x` is loaded and regenerated
from a Philox seed in backward, so that neither the dropped-out input nor a mask is written to memory.

The mask of element (row, col) of a row-major `x` of width K is `tl.rand(seed, row * K + col) >= p`, the same in
every kernel. Imported only on CUDA (and by `scripts/bench_lora_dropout.py`, which can run the kernels in
Triton's CPU interpreter): a CPU install of torch has no triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BM, BK, SPLIT_ROWS = 64, 64, 512


@triton.jit
def _keep(seed, p, rows, cols, K):
    return tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p


@triton.jit
def _forward(x_ptr, a_ptr, h_ptr, seed_ptr, p, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
             BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, p, rm, rk, K), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    tl.store(h_ptr + rm[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _grad_weight(x_ptr, dh_ptr, part_ptr, seed_ptr, p, scale, M, K, R, ROWS, RP: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr):
    """Partial sums of dA = dh.T @ dropout(x) over ROWS rows each (program axis 1); the caller adds them up."""
    seed = tl.load(seed_ptr)
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    rr = tl.arange(0, RP)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for m0 in range(split * ROWS, split * ROWS + ROWS, BM):
        rm = m0 + tl.arange(0, BM)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, p, rm, rk, K), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(dh), x)
    tl.store(part_ptr + split * R * K + rr[:, None] * K + rk[None, :], acc,
             mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _grad_input(dh_ptr, a_ptr, dx_ptr, seed_ptr, p, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
                BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    rr = tl.arange(0, RP)
    dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    g = tl.where(_keep(seed, p, rm, rk, K), tl.dot(dh, a) * scale, 0.0)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], g.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _keep_mask(out_ptr, seed_ptr, p, M, K, BM: tl.constexpr, BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], _keep(seed, p, rm, rk, K).to(tl.int8),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs each side ≥ 16, tl.arange a power of two


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a contiguous 2-D x (M × K) and weight (R × K)."""
    (m, k), r = x.shape, weight.shape[0]
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    _forward[(triton.cdiv(m, BM),)](x, weight, h, seed, p, 1.0 / (1.0 - p), m, k, r, RP=_rank_block(r), BM=BM,
                                    BK=BK)
    return h


def backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
             p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `forward` for the gradient dh (M × R) of its output."""
    (m, k), r = x.shape, weight.shape[0]
    scale, rp = 1.0 / (1.0 - p), _rank_block(r)
    dx = torch.empty_like(x)
    _grad_input[(triton.cdiv(m, BM), triton.cdiv(k, BK))](dh, weight, dx, seed, p, scale, m, k, r, RP=rp, BM=BM,
                                                          BK=BK)
    splits = triton.cdiv(m, SPLIT_ROWS)
    parts = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _grad_weight[(triton.cdiv(k, BK), splits)](x, dh, parts, seed, p, scale, m, k, r, SPLIT_ROWS, RP=rp, BM=BM,
                                               BK=BK)
    return dx, parts.sum(0).to(weight.dtype)


def keep_mask(seed: torch.Tensor, p: float, m: int, k: int, device: torch.device | str) -> torch.Tensor:
    """The mask the kernels use for an M × K input (True: kept), for tests."""
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    _keep_mask[(triton.cdiv(m, BM), triton.cdiv(k, BK))](out, seed, p, m, k, BM=BM, BK=BK)
    return out.bool()
