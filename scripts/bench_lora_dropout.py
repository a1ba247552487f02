"""LoRA dropout on its own, for one projection of a real shape: is a fused kernel worth building into the layers?

In the compiled layers, each LoRA projection computes `dropout(x) @ A.T`: the dropped-out input is written out
for the matrix product, and a mask is kept for backward, for each of the seven projections of every layer. On an
H200 the recipes' `lora_dropout: 0.05` costs 61 ms of a 0.794 s Mistral-7B step against `lora_dropout: 0`
(docs/performance.md, eighth session). This script measures, per projection input width, the LoRA path
`(dropout(x) @ A.T) @ B.T * scale` forward and backward three ways:

- compiled: what qlora's compiled layers run (torch.compile of the PyTorch expression, as peft writes it);
- dropout 0: the same without dropout (the floor);
- fused: Triton kernels that apply the dropout mask while loading `x` for the product with A, and regenerate
  it (Philox, from a seed) in backward, so that neither the dropped-out input nor a mask is ever stored.

    python scripts/bench_lora_dropout.py --check                   # on a CUDA GPU: fused == reference, then times
    python scripts/bench_lora_dropout.py --check --interpret       # the kernels' arithmetic on the CPU (fp32, slow)

Not used by `qlora train`: if the fused kernels win on the GPU, they go into the layers with a test of their
gradients against peft's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

if "--interpret" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _keep(seed, p, rows, cols, K):
    return tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p


@triton.jit
def fwd(x_ptr, a_ptr, h_ptr, seed, p, scale, M, K, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        inside = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=inside, other=0.0)
        x = tl.where(_keep(seed, p, rm, rk, K), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=rk[:, None] < K, other=0.0)  # A.T tile
        acc += tl.dot(x, a)
    tl.store(h_ptr + rm[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty), mask=rm[:, None] < M)


@triton.jit
def grad_a(x_ptr, dh_ptr, part_ptr, seed, p, scale, M, K, ROWS, R: tl.constexpr, BM: tl.constexpr,
           BK: tl.constexpr):
    """Partial sums of dA = dh.T @ dropout(x) over ROWS rows each (program axis 1), summed by the caller."""
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    rr = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    for m0 in range(split * ROWS, split * ROWS + ROWS, BM):
        rm = m0 + tl.arange(0, BM)
        inside = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=inside, other=0.0)
        x = tl.where(_keep(seed, p, rm, rk, K), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=rm[:, None] < M, other=0.0)
        acc += tl.dot(tl.trans(dh), x)
    tl.store(part_ptr + split * R * K + rr[:, None] * K + rk[None, :], acc, mask=rk[None, :] < K)


@triton.jit
def grad_x(dh_ptr, a_ptr, dx_ptr, seed, p, scale, M, K, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    rr = tl.arange(0, R)
    dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=rm[:, None] < M, other=0.0)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
    g = tl.where(_keep(seed, p, rm, rk, K), tl.dot(dh, a) * scale, 0.0)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], g.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def keep_mask(out_ptr, seed, p, M, K, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], _keep(seed, p, rm, rk, K).to(tl.int8), mask=inside)



BM, BK, SPLIT_ROWS = 64, 64, 512


class FusedLoraADropout(torch.autograd.Function):
    """h = dropout(x, p) @ A.T with the mask drawn from `seed` in each kernel instead of stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        (m, k), r = x2.shape, a.shape[0]
        h = torch.empty(m, r, dtype=x.dtype, device=x.device)
        fwd[(triton.cdiv(m, BM),)](x2, a, h, seed, p, 1.0 / (1.0 - p), m, k, R=r, BM=BM, BK=BK)
        ctx.save_for_backward(x2, a)
        ctx.p, ctx.seed, ctx.shape = p, seed, x.shape
        return h.reshape(*x.shape[:-1], r)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        x2, a = ctx.saved_tensors
        (m, k), r = x2.shape, a.shape[0]
        dh2 = dh.reshape(m, r).contiguous()
        scale = 1.0 / (1.0 - ctx.p)
        dx = torch.empty_like(x2)
        grad_x[(triton.cdiv(m, BM), triton.cdiv(k, BK))](dh2, a, dx, ctx.seed, ctx.p, scale, m, k, R=r, BM=BM, BK=BK)
        splits = triton.cdiv(m, SPLIT_ROWS)
        parts = torch.empty(splits, r, k, dtype=torch.float32, device=x2.device)
        grad_a[(triton.cdiv(k, BK), splits)](x2, dh2, parts, ctx.seed, ctx.p, scale, m, k, SPLIT_ROWS, R=r, BM=BM,
                                             BK=BK)
        return dx.reshape(ctx.shape), parts.sum(0).to(a.dtype), None, None


def keep_of(seed: int, p: float, m: int, k: int, device: str) -> torch.Tensor:
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    keep_mask[(triton.cdiv(m, BM), triton.cdiv(k, BK))](out, seed, p, m, k, BM=BM, BK=BK)
    return out.bool()


def check(m: int, k: int, r: int, p: float, dtype: torch.dtype, device: str) -> float:
    """Largest relative error of h, dx, dA of the fused kernels against fp32 PyTorch with the kernels' own mask."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, generator=g, device=device, dtype=dtype) / k**0.5).requires_grad_()
    dh = torch.randn(m, r, generator=g, device=device, dtype=dtype)
    h = FusedLoraADropout.apply(x, a, p, 1234)
    h.backward(dh)
    keep = keep_of(1234, p, m, k, device)
    xf, af = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    ref = (xf * keep / (1 - p)) @ af.T
    ref.backward(dh.float())
    worst = 0.0
    for name, got, want in (("h", h, ref), ("dx", x.grad, xf.grad), ("dA", a.grad, af.grad)):
        err = ((got.float() - want).norm() / want.norm()).item()
        worst = max(worst, err)
        print(f"  {name:3s} relative error {err:.2e}")
    print(f"  kept {keep.float().mean().item():.4f} of the inputs (1 - p = {1 - p:.4f})")
    return worst


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(m: int, k: int, n: int, r: int, p: float, steps: int, warmup: int) -> list[tuple[str, float, float]]:
    """(variant, forward ms, forward + backward ms) for one projection's LoRA path, x of m × k, output width n."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    a = (torch.randn(r, k, device=dev, dtype=dt) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dt) / r**0.5).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=dt)
    scale = 2.0
    compiled = torch.compile(lambda x, a, b: (torch.nn.functional.dropout(x, p) @ a.T) @ b.T * scale)
    plain = torch.compile(lambda x, a, b: (x @ a.T) @ b.T * scale)
    seeds = iter(range(1, 1 << 30))
    variants = {"compiled (peft's expression)": lambda: compiled(x, a, b),
                "dropout 0": lambda: plain(x, a, b),
                "fused Triton": lambda: (FusedLoraADropout.apply(x, a, p, next(seeds)) @ b.T) * scale}
    rows = []
    for name, f in variants.items():
        with torch.no_grad():
            forward = timed(f, steps, warmup)
        both = timed(lambda f=f: f().backward(dy), steps, warmup)
        rows.append((name, forward, both))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="rows of x: micro-batch × sequence length")
    p.add_argument("--widths", default="4096,14336", help="input widths to time (Mistral-7B: 4096, down 14336)")
    p.add_argument("--out-width", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check", action="store_true", help="compare the fused kernels with PyTorch first")
    p.add_argument("--interpret", action="store_true", help="run the kernels on the CPU (fp32; checks only)")
    a = p.parse_args()
    device = "cpu" if a.interpret else "cuda"
    if a.check:
        shapes = [(256, 192, a.rank), (200, 130, a.rank)] if a.interpret else [(a.tokens, 4096, a.rank),
                                                                                (1000, 14336, a.rank)]
        worst = 0.0
        for m, k, r in shapes:
            print(f"check {m} × {k}, rank {r}, p {a.dropout}, {device}")
            worst = max(worst, check(m, k, r, a.dropout, torch.float32 if a.interpret else torch.bfloat16,
                                     device))
        limit = 1e-4 if a.interpret else 2e-2
        print(f"largest relative error {worst:.2e} (limit {limit:.0e})")
        if worst > limit:
            sys.exit(1)
    if a.interpret:
        return
    print(f"{torch.cuda.get_device_name(0)}, {a.tokens} tokens, rank {a.rank}, dropout {a.dropout}, "
          f"{a.steps} timed calls after {a.warmup} (median)")
    print(f"{'input width':>11}  {'variant':30s} {'forward ms':>10} {'fwd+bwd ms':>10}")
    for k in (int(w) for w in a.widths.split(",")):
        for name, forward, both in bench(a.tokens, k, a.out_width, a.rank, a.dropout, a.steps, a.warmup):
            print(f"{k:>11}  {name:30s} {forward:>10.3f} {both:>10.3f}")
    print("a step under gradient checkpointing runs each projection's forward twice and its backward once")


if __name__ == "__main__":
    main()
