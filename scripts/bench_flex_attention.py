"""Flex attention alone, as `qlora train` runs it on packed rows: which kernel configuration is fastest on this GPU.

The shape is a 7-8B layer's (32 query heads, 8 key/value heads, head dim 128, bf16; Llama-3-8B and Mistral-7B share
it), micro-batch `--rows` x `--seq-len`, rows packed with documents whose lengths are drawn as scripts/bench_train.py
draws its text rows (log-normal words, `--tokens-per-word` tokens a word), causal within each document. For each
variant: the first forward + backward call (compiling, seconds), then milliseconds a call of the forward and of
forward + backward (CUDA events: calls for `--warmup-s` seconds untimed, so that the GPU's clocks are up, then
`--steps` timed calls, median), and what that makes a
training step of `--layers` layers under gradient checkpointing (forward twice, backward once).

Variants (`--variants`, comma-separated):
  default       torch.compile(flex_attention), inductor's heuristic configuration (what transformers compiles)
  autotune      torch.compile(flex_attention, mode="max-autotune-no-cudagraphs"): inductor times its candidate
                configurations and keeps the fastest (printed as AUTOTUNE tables on stderr)
  tma           default with kernel_options USE_TMA (Hopper's tensor memory accelerator for loads)
  autotune-tma  both
  sdpa-causal   reference: F.scaled_dot_product_attention(is_causal=True) over whole rows (no document mask, so more
                work; the GQA heads repeated first)

    python scripts/bench_flex_attention.py                      # every variant
    python scripts/bench_flex_attention.py --variants default,autotune --steps 50
    python scripts/bench_flex_attention.py --variants default,f64,default2 \
        --options 'f64={"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4}' \
        --options 'default2={}'

The first variant timed has come out slower than the same configuration timed again last (mode ai: forward 0.467 against
0.328 ms, on an H200), even after 2 s of calls; repeat `default` last (as `default2={}`) and compare against that.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F


def document_ids(rows: int, seq_len: int, tokens_per_word: float, seed: int = 0) -> torch.Tensor:
    """Each position's document number, rows filled in order; a document longer than the room left is cut."""
    rng = random.Random(seed)
    ids = torch.empty(rows, seq_len, dtype=torch.int32)
    doc = 0
    for r in range(rows):
        pos = 0
        while pos < seq_len:
            words = int(min(3000, max(50, rng.lognormvariate(6.0, 0.8))))
            n = min(seq_len - pos, max(1, int(words * tokens_per_word)))
            ids[r, pos:pos + n] = doc
            pos += n
            doc += 1
    return ids


def time_calls(fn, warmup_s: float, steps: int) -> float:
    """Median milliseconds a call, after calling it for `warmup_s` seconds (the GPU's clocks come up meanwhile)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        for _ in range(10):
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


def run_variant(name: str, a: argparse.Namespace, docs: torch.Tensor) -> dict:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    torch._dynamo.reset()
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    shape_q = (a.rows, a.heads, a.seq_len, a.head_dim)
    shape_kv = (a.rows, a.kv_heads, a.seq_len, a.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    grad_out = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, generator=g)
    scale = a.head_dim ** -0.5

    if name == "sdpa-causal":
        group = a.heads // a.kv_heads

        def forward():
            kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
        compiled = forward
    else:
        doc = docs.to(dev)

        def same_document_causal(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(same_document_causal, a.rows, None, a.seq_len, a.seq_len, device=dev)
        options = a.named_options.get(name)
        if name.endswith("tma"):
            options = {"USE_TMA": True}
        mode = "max-autotune-no-cudagraphs" if name.startswith("autotune") else None
        compiled_flex = torch.compile(flex_attention, mode=mode)

        def forward():
            out, _aux = compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True, scale=scale,
                                      kernel_options=options, return_aux=AuxRequest(lse=True))
            return out
        compiled = forward

    def forward_backward():
        out = compiled()
        out.backward(grad_out)
        q.grad = k.grad = v.grad = None

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward_backward()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    with torch.no_grad():
        fwd_ms = time_calls(compiled, a.warmup_s, a.steps)
    fwd_bwd_ms = time_calls(forward_backward, a.warmup_s, a.steps)
    with torch.no_grad():
        out = compiled().float()
    row = {"variant": name, "kernel_options": None if name == "sdpa-causal" else options,
           "first_call_s": round(first_s, 1), "forward_ms": round(fwd_ms, 3),
           "forward_backward_ms": round(fwd_bwd_ms, 3),
           "step_ms": round(a.layers * (fwd_ms + fwd_bwd_ms), 1),  # forward twice + backward once a layer
           "output_checksum": round(out.abs().mean().item(), 6)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="default,autotune,tma,autotune-tma,sdpa-causal")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens-per-word", type=float, default=2.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--options", action="append", default=[], metavar="NAME=JSON",
                   help="a variant NAME running flex attention with these kernel_options (e.g. fwd_BLOCK_M, "
                        "bwd_num_warps); name it in --variants")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    a.named_options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.options)}
    if not torch.cuda.is_available():
        raise SystemExit("bench_flex_attention.py needs a CUDA GPU.")
    docs = document_ids(a.rows, a.seq_len, a.tokens_per_word)
    lengths = torch.unique_consecutive(docs.flatten(), return_counts=True)[1]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {a.rows} x {a.seq_len} tokens, "
          f"{len(lengths)} documents (median {int(lengths.median())} tokens), heads {a.heads}/{a.kv_heads}, "
          f"head dim {a.head_dim}", flush=True)
    rows = [run_variant(v, a, docs) for v in a.variants.split(",")]
    base = next((r for r in rows if r["variant"] == "default"), rows[0])
    print(f"\n| variant | first call s | forward ms | forward+backward ms | a {a.layers}-layer step, ms | vs default |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['first_call_s']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
              f"{r['step_ms']:.1f} | {r['step_ms'] - base['step_ms']:+.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
