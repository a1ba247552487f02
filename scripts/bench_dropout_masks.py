"""What the fused LoRA-dropout kernels spend on drawing their masks (docs/performance.md, eleventh and twelfth
sessions).

This script times the forward kernel (`dropout(x) @ A.T`) and the input-gradient kernel (`(dh @ A) * mask`) of
`qlora_cli/triton_lora.py`'s design with five ways of making the mask, each at its fastest tile of a few
candidates, against cuBLAS's products without dropout:

- philox10: the kernels' mask until the twelfth session (Philox, `tl.randint4x`, 10 rounds, one call per 8 inputs,
  its eight 16-bit draws spread over 8 columns with `tl.interleave`);
- philox7: the same with 7 rounds;
- hash: the kernels' mask now (`triton_lora._keep`: one 32-bit integer hash of each input's index, keyed per row
  by the seed);
- none: no mask (the floor of the kernel as written);
- hash2: one hash for two neighbouring inputs, the first taking its top 16 bits and the second its low 16 bits
  (half the hashing of `hash`; not used by the kernels: timed here to see whether it is worth checking its masks).

    python scripts/bench_dropout_masks.py            # on a CUDA GPU, ~20 s

The hash's masks are checked by tests/test_fast_path.py (rates) and `scripts/bench_lora_dropout.py --check`
(the kernels draw `lora_dropout.hash_keep_mask`'s masks); the Philox variants are here for timing only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora_cli.triton_lora import _keep as keep_hash  # noqa: E402
from qlora_cli.triton_lora import _mix  # noqa: E402

MASKS = ["philox10", "philox7", "hash", "none", "hash2"]
FORWARD = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3),
           (64, 128, 8, 4), (64, 256, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 512, 8, 3), (128, 256, 8, 3)]
GRAD_INPUT = [(32, 128, 4, 2), (32, 256, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (64, 256, 8, 2), (128, 64, 4, 2),
              (128, 128, 8, 2), (128, 256, 8, 2), (128, 512, 8, 2), (256, 128, 8, 2), (64, 512, 8, 2)]


@triton.jit
def _keep(seed, threshold, rows, k0, K, BK: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0 or MODE == 1:
        groups = k0 // 8 + tl.arange(0, BK // 8)
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(K, 8) + groups[None, :], 10 if MODE == 0 else 7)
        w0, w1 = r0.to(tl.uint32, bitcast=True), r1.to(tl.uint32, bitcast=True)
        w2, w3 = r2.to(tl.uint32, bitcast=True), r3.to(tl.uint32, bitcast=True)
        low = tl.interleave(tl.interleave((w0 & 0xFFFF).to(tl.int32), (w0 >> 16).to(tl.int32)),
                            tl.interleave((w1 & 0xFFFF).to(tl.int32), (w1 >> 16).to(tl.int32)))
        high = tl.interleave(tl.interleave((w2 & 0xFFFF).to(tl.int32), (w2 >> 16).to(tl.int32)),
                             tl.interleave((w3 & 0xFFFF).to(tl.int32), (w3 >> 16).to(tl.int32)))
        return tl.interleave(low, high) >= threshold
    elif MODE == 2:
        return keep_hash(seed, threshold, rows, k0, K, BK)
    elif MODE == 4:  # K even: pair j of a row covers its columns 2j and 2j + 1
        pairs = (k0 // 2 + tl.arange(0, BK // 2)).to(tl.uint32)
        base = rows.to(tl.int64) * (K // 2)
        key = _mix((base >> 32).to(tl.uint32) ^ _mix((seed ^ 0x9E3779B9).to(tl.uint32)))
        h = _mix((base.to(tl.uint32)[:, None] + pairs[None, :]) ^ key[:, None])
        return tl.interleave((h >> 16).to(tl.int32), (h & 0xFFFF).to(tl.int32)) >= threshold
    else:
        cols = k0 + tl.arange(0, BK)
        return (rows[:, None] + cols[None, :]) >= 0


@triton.jit
def _forward(x_ptr, a_ptr, h_ptr, seed_ptr, threshold, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
             BK: tl.constexpr, MODE: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, threshold, rm, k0, K, BK, MODE), x * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    tl.store(h_ptr + rm[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _grad_input(dh_ptr, a_ptr, dx_ptr, seed_ptr, threshold, scale, M, K, R, RP: tl.constexpr, BM: tl.constexpr,
                BK: tl.constexpr, MODE: tl.constexpr):
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    rr = tl.arange(0, RP)
    dh = tl.load(dh_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    g = tl.where(_keep(seed, threshold, rm, k0, K, BK, MODE), tl.dot(dh, a) * scale, 0.0)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], g.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


def fastest(launch, candidates: list[tuple]) -> tuple[float, tuple]:
    """(microseconds, tile) of the fastest candidate tile for launch(tile)."""
    times = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25) for c in candidates]
    best = times.index(min(times))
    return times[best] * 1e3, candidates[best]


def main() -> None:
    m, r, p = 8192, 16, 0.05
    cut, scale = round(p * 65536), 1 / (1 - p)
    print(f"{torch.cuda.get_device_name(0)}, {m} rows, rank {r}, microseconds a call at the fastest tile "
          "(rows, columns, warps, stages)")
    for k in (4096, 14336):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
        dh = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        h, dx = torch.empty(m, r, device="cuda", dtype=torch.bfloat16), torch.empty_like(x)
        seed = torch.tensor([7], device="cuda")
        plain_h = triton.testing.do_bench(lambda x=x, a=a: x @ a.T, warmup=10, rep=50) * 1e3
        plain_dx = triton.testing.do_bench(lambda dh=dh, a=a: dh @ a, warmup=10, rep=50) * 1e3
        print(f"input width {k}: cuBLAS without dropout: x @ A.T {plain_h:.1f}, dh @ A {plain_dx:.1f}")
        for mode, name in enumerate(MASKS):
            def forward(c, mode=mode, x=x, a=a, h=h, seed=seed, k=k):
                _forward[(triton.cdiv(m, c[0]),)](x, a, h, seed, cut, scale, m, k, r, RP=16, BM=c[0], BK=c[1],
                                                  MODE=mode, num_warps=c[2], num_stages=c[3])

            def grad_input(c, mode=mode, dh=dh, a=a, dx=dx, seed=seed, k=k):
                _grad_input[(triton.cdiv(m, c[0]), triton.cdiv(k, c[1]))](dh, a, dx, seed, cut, scale, m, k, r,
                                                                          RP=16, BM=c[0], BK=c[1], MODE=mode,
                                                                          num_warps=c[2], num_stages=c[3])

            (fwd_us, fwd_tile), (gin_us, gin_tile) = fastest(forward, FORWARD), fastest(grad_input, GRAD_INPUT)
            print(f"  {name:9s} forward {fwd_us:6.1f} {fwd_tile}   grad_input {gin_us:6.1f} {gin_tile}")


if __name__ == "__main__":
    main()
