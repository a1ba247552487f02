"""LoRA dropout on its own, for one projection of a real shape: is a fused kernel worth building into the layers?

In the compiled layers, each LoRA projection computes `dropout(x) @ A.T`: the dropped-out input is written out
for the matrix product, and a mask is kept for backward, for each of the seven projections of every layer. On an
H200 the recipes' `lora_dropout: 0.05` costs 61 ms of a 0.794 s Mistral-7B step against `lora_dropout: 0`
(docs/performance.md, eighth session). This script measures, per projection input width, the LoRA path
`(dropout(x) @ A.T) @ B.T * scale` forward and backward three ways:

- compiled: what qlora's compiled layers run (torch.compile of the PyTorch expression, as peft writes it);
- dropout 0: the same without dropout (the floor);
- fused: `training.fused_lora_dropout`'s op (qlora_cli/lora_dropout.py): Triton kernels
  (qlora_cli/triton_lora.py) that apply the dropout mask while loading `x` for the product with A, and regenerate
  it (Philox, from a seed) in backward, so that neither the dropped-out input nor a mask is ever stored.

    python scripts/bench_lora_dropout.py --check                   # on a CUDA GPU: kernels == reference, then times
    python scripts/bench_lora_dropout.py --check --interpret       # the kernels' arithmetic on the CPU (fp32, slow)

If the fused row is near the dropout-0 row, `training.fused_lora_dropout` (off by default) is worth turning on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "--interpret" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora_cli import triton_lora  # noqa: E402
from qlora_cli.lora_dropout import hash_keep_mask  # noqa: E402
from qlora_cli.triton_lora import dropout_matmul  # noqa: E402


def op_and_grads(op, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
                 dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dx, dA) of op(x, a, seed, p) through autograd, for the gradient dh of h."""
    x, a = x.detach().requires_grad_(), a.detach().requires_grad_()
    h = op(x, a, seed, p)
    h.backward(dh)
    return h.detach(), x.grad, a.grad


def check(m: int, k: int, r: int, p: float, dtype: torch.dtype, device: str) -> float:
    """Largest relative error of the op's h, dx, dA (through autograd, eager and, on a GPU, compiled as the layers
    compile it) against fp32 PyTorch under the kernels' own mask."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=device, dtype=dtype)
    a = torch.randn(r, k, generator=g, device=device, dtype=dtype) / k**0.5
    dh = torch.randn(m, r, generator=g, device=device, dtype=dtype)
    seed = torch.tensor([1234], device=device)
    keep = triton_lora.keep_mask(seed, p, m, k, device)
    xf, af = x.float().requires_grad_(), a.float().requires_grad_()
    ref = (xf * keep / (1 - triton_lora.effective_p(p))) @ af.T
    ref.backward(dh.float())
    variants = {"eager": dropout_matmul}
    if device == "cuda":  # inductor launches the kernels itself (triton_op)
        variants["compiled"] = torch.compile(lambda x, a, seed, p: dropout_matmul(x, a, seed, p), fullgraph=True)
    worst = 0.0
    for variant, op in variants.items():
        h, dx, da = op_and_grads(op, x, a, seed, p, dh)
        for name, got, want in (("h", h, ref), ("dx", dx, xf.grad), ("dA", da, af.grad)):
            err = ((got.float() - want).norm() / want.norm()).item()
            worst = max(worst, err)
            print(f"  {variant:8s} {name:3s} relative error {err:.2e}")
    print(f"  kept {keep.float().mean().item():.4f} of the inputs (1 - p = {1 - p:.4f})")
    tiles, triton_lora.TILES = triton_lora.TILES, (16, 128)
    same = torch.equal(triton_lora.keep_mask(seed, p, m, k, device), keep)
    triton_lora.TILES = tiles
    print(f"  the same mask with 16 x 128 tiles: {same}")
    if not same:
        return float("inf")
    same = torch.equal(hash_keep_mask(seed, p, m, k), keep)
    print(f"  the same mask as lora_dropout.hash_keep_mask (torch ops): {same}")
    if not same:
        return float("inf")
    other = triton_lora.keep_mask(seed + 1, p, m, k, device)
    print(f"  {(keep != other).float().mean().item():.4f} of the mask differs for the next seed "
          f"(independent masks: {2 * p * (1 - p):.4f})")
    return worst if check_memo(x, a, seed, p, dh) else float("inf")


def check_memo(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, dh: torch.Tensor) -> bool:
    """`training.keep_lora_a_outputs`' kernel (lora_dropout.RecomputeMemo): in phase STORE the op's output and
    the slot equal the plain kernel's output bit for bit; in phase LOAD it returns the slot whatever x holds; in
    phase COMPUTE it leaves the slot alone. On a GPU also through autograd: eager, the plain op's h, dx and dA
    bit for bit; compiled (inductor may pick other tiles), the same in both phases and within 1e-2 of eager."""
    from qlora_cli.lora_dropout import COMPUTE, LOAD, STORE, memo_product

    plain = triton_lora.forward(x, a, seed, p)
    slot = torch.full((x.shape[0] + 5, a.shape[0]), 7.0, dtype=x.dtype, device=x.device)  # more rows than x
    phase = torch.tensor([STORE], dtype=torch.int32, device=x.device)
    stored = triton_lora.forward(x, a, seed, p, slot, phase)
    ok = {"store: output": torch.equal(stored, plain), "store: slot": torch.equal(slot[:x.shape[0]], plain),
          "store: rows past x untouched": bool((slot[x.shape[0]:] == 7).all())}
    phase.fill_(LOAD)
    ok["load: the slot, not x's product"] = torch.equal(triton_lora.forward(torch.zeros_like(x), a, seed, p, slot,
                                                                              phase), plain)
    phase.fill_(COMPUTE)
    before = slot.clone()
    ok["compute: output"] = torch.equal(triton_lora.forward(x * 2, a, seed, p, slot, phase),
                                        triton_lora.forward(x * 2, a, seed, p))
    ok["compute: slot untouched"] = torch.equal(slot, before)
    if x.is_cuda:
        want = op_and_grads(dropout_matmul, x, a, seed, p, dh)
        memo = {"eager": memo_product, "compiled": torch.compile(memo_product, fullgraph=True)}
        for variant, op in memo.items():
            phase.fill_(STORE)
            stored = op_and_grads(lambda x, a, seed, p, op=op: op(x, a, seed, p, slot, phase), x, a, seed, p, dh)
            phase.fill_(LOAD)
            loaded = op_and_grads(lambda x, a, seed, p, op=op: op(x, a, seed, p, slot, phase), x, a, seed, p, dh)
            ok[f"{variant}: load gives store's h, dx, dA"] = all(map(torch.equal, stored, loaded))
            if variant == "eager":
                ok["eager: the plain op's h, dx, dA"] = all(map(torch.equal, stored, want))
            else:
                errors = [((g.float() - w.float()).norm() / w.float().norm()).item() for g, w in zip(stored, want)]
                ok[f"{variant}: within 1e-2 of eager ({max(errors):.1e})"] = max(errors) < 1e-2
    for name, same in ok.items():
        print(f"  memo {name}: {same}")
    return all(ok.values())


def timed(fn, steps: int, warmup: int) -> float:
    """GPU milliseconds per call: the calls are queued behind a ~0.5 s GPU spin, so the time between the events is
    the GPU's alone, not the CPU's launching (in training the CPU runs ahead of the GPU)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10**9)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    queued = start.query()  # still spinning once every call is queued: nothing of the CPU's time is counted
    end.synchronize()
    if queued:
        print(f"  warning: the GPU caught up with the CPU while {steps} calls were queued; times include launch")
    return start.elapsed_time(end) / steps


def bench(m: int, k: int, n: int, r: int, p: float, steps: int,
          warmup: int) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """One projection's LoRA path, x of m × k, output width n: ((variant, forward ms, forward + backward ms), ...)
    and the A product's kernels alone ((part, without dropout (cuBLAS) ms, fused kernel ms), ...)."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    a = (torch.randn(r, k, device=dev, dtype=dt) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dt) / r**0.5).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=dt)
    dh = torch.randn(m, r, device=dev, dtype=dt)
    seed = torch.tensor([7], device=dev)
    scale = 2.0
    compiled = torch.compile(lambda x, a, b: (torch.nn.functional.dropout(x, p) @ a.T) @ b.T * scale)
    plain = torch.compile(lambda x, a, b: (x @ a.T) @ b.T * scale)

    def fused():
        return (dropout_matmul(x, a, torch.randint(0, 1 << 30, (1,), device=dev), p) @ b.T) * scale

    rows = []
    for name, f in {"compiled (peft's expression)": lambda: compiled(x, a, b), "dropout 0": lambda: plain(x, a, b),
                    "fused Triton": fused}.items():
        forward = timed(f, steps, warmup)  # in grad mode, as the checkpoint's first pass runs it
        both = timed(lambda f=f: f().backward(dy), steps, warmup)
        rows.append((name, forward, both))
    xd, ad = x.detach(), a.detach()
    parts = [("h = x @ A.T", timed(lambda: xd @ ad.T, steps, warmup),
              timed(lambda: triton_lora.forward(xd, ad, seed, p), steps, warmup)),
             ("dx, dA", timed(lambda: (dh @ ad, dh.T @ xd), steps, warmup),  # one backward: both kernels
              timed(lambda: triton_lora.backward(dh, xd, ad, seed, p), steps, warmup))]
    return rows, parts


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
    if a.interpret:
        triton_lora.TILES = (64, 64)
    if a.check:
        if a.interpret:  # small and ragged shapes, a rank below tl.dot's 16
            shapes = [(256, 192, a.rank), (200, 130, a.rank), (96, 80, 8)]
        else:
            shapes = [(a.tokens, 4096, a.rank), (1000, 14336, a.rank)]
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
          f"GPU time per call, mean of {a.steps} queued calls after {a.warmup}")
    print(f"{'input width':>11}  {'variant':30s} {'forward ms':>10} {'fwd+bwd ms':>10} {'ckpt ms':>8}")
    per_width: dict[int, dict[str, float]] = {}
    kernels = []
    for k in (int(w) for w in a.widths.split(",")):
        rows, parts = bench(a.tokens, k, a.out_width, a.rank, a.dropout, a.steps, a.warmup)
        kernels += [(k, *part) for part in parts]
        for name, forward, both in rows:
            per_width.setdefault(k, {})[name] = forward + both
            print(f"{k:>11}  {name:30s} {forward:>10.3f} {both:>10.3f} {forward + both:>8.3f}")
    print("ckpt: forward + (forward + backward), what a step under gradient checkpointing runs per projection")
    if {4096, 14336} <= per_width.keys():
        print("per step of a 32-layer Mistral-7B / Llama-3-8B shape (6 projections of width 4096, 1 of 14336):")
        for name, cost in per_width[4096].items():
            print(f"  {name:30s} {32 * (6 * cost + per_width[14336][name]):8.1f} ms")
    print("the A product's kernels alone (ms): cuBLAS without dropout vs the fused kernel")
    for k, part, plain_ms, fused_ms in kernels:
        print(f"{k:>11}  {part:16s} {plain_ms:8.3f} {fused_ms:8.3f}")
    print("tuned tiles (eager calls; key: input width, rank, dtypes):")
    for name, kernel in triton_lora.TUNED.items():
        for key, config in sorted(kernel.cache.items(), key=str):
            print(f"  {name:12s} {key} -> {config}")


if __name__ == "__main__":
    main()
