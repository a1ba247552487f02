"""The loss head alone: per-token log-probabilities of `hidden @ W.T` and their gradient, for one micro-batch.

TRL's SFTTrainer scores tokens with a chunked LM head (`trl.kernels.ChunkedLogProbFunction`) that never holds
the full logits: forward multiplies the hidden states by the vocabulary in tiles, and backward multiplies them
again before the gradient's product, three products of tokens x hidden x vocabulary a step. On Llama-3-8B's
128,256-token vocabulary that is about 26 TFLOP a 4 x 2048 micro-batch. This script times, on a CUDA GPU:

- trl: TRL's head, as SFTTrainer calls it (log-probabilities, entropy and top-1 for the metrics);
- qlora: `qlora_cli.lm_head`'s head, which keeps each tile's probabilities long enough to take the gradient's
  product in forward (two products; backward scales a stored per-token gradient).

    python scripts/bench_lm_head.py                  # on a CUDA GPU: both heads agree, then GPU ms per call
    python scripts/bench_lm_head.py --check-only     # agreement only (also on the CPU, small shapes)
    python scripts/bench_lm_head.py --check-only --interpret   # qlora's Triton kernel in Triton's CPU interpreter
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

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks for


def heads() -> dict:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    found = {"trl": lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                                  None, 1.0, OUTPUTS)}
    try:
        from qlora_cli import lm_head
    except ImportError:
        return found
    found["qlora"] = lambda h, w, t: lm_head.LogProbHead.apply(h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                                None, 1.0, OUTPUTS)
    return found


def inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g, device=device, dtype=torch.float32)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g, device=device)
    return h, w, t


def _with_tile_bytes(module, size: int, head, *args):
    size, module.TILE_BYTES = module.TILE_BYTES, size
    try:
        return head(*args)
    finally:
        module.TILE_BYTES = size


def run(head, h, w, t, grad: torch.Tensor):
    h.grad = None
    logp, entropy, _, _, top1 = head(h, w, t)
    logp.backward(grad)
    return logp, entropy, top1, h.grad


def check(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str) -> float:
    """Largest relative difference between the heads' log-probabilities, entropies and input gradients."""
    found = heads()
    h, w, t = inputs(n, hidden, vocab, dtype, device)
    with torch.no_grad():  # a third of the targets are the top-1 token, so that the top-1 flags are tested
        top = torch.cat([(h[i:i + 1024] @ w.T).argmax(-1) for i in range(0, n, 1024)])
    t[::3] = top[::3]
    grad = -torch.ones(n, device=device) / n
    ref = [x.detach().clone() for x in run(found["trl"], h, w, t, grad)]
    worst = 0.0
    if "qlora" in found:  # also in tiles of 128 tokens, the last one partial
        from qlora_cli import lm_head

        small = 128 * vocab * w.element_size()
        found["qlora-128"] = lambda *args: _with_tile_bytes(lm_head, small, found["qlora"], *args)
    for name, head in found.items():
        if name == "trl":
            continue
        got = run(head, h, w, t, grad)
        for what, a, b in zip(("log-probs", "entropy", "top-1", "d hidden"), got, ref):
            if what == "top-1":
                agree = (a == b).float().mean().item()
                print(f"  {name}: top-1 agrees on {agree:.4f} of tokens ({int(b.sum())} of {len(b)} are top-1)")
                continue
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            worst = max(worst, err)
            print(f"  {name}: {what:9s} relative difference {err:.2e}")
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--interpret", action="store_true", help="run qlora's Triton kernel in Triton's CPU interpreter")
    p.add_argument("--tokens", type=int, default=4 * 2047, help="scored tokens a micro-batch (4 x 2048 packed)")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    if a.interpret:
        from qlora_cli import lm_head

        assert lm_head.triton is not None, "--interpret needs triton importable (e.g. PYTHONPATH=<triton>)"
        lm_head._use_triton = lambda device: True
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}")
    shapes = [(a.tokens, 4096, 128256), (a.tokens, 4096, 32000)] if cuda else [(300, 64, 5000), (70, 32, 1000)]
    for n, hidden, vocab in shapes:
        print(f"check: {n} tokens x hidden {hidden} x vocabulary {vocab}")
        check(n, hidden, vocab, dtype, device)
    if a.check_only or not cuda:
        return
    from bench_lora_dropout import timed  # GPU ms per call, queued behind a GPU spin (imports Triton: CUDA only)

    print(f"\n{'tokens':>6s} {'hidden':>6s} {'vocab':>7s} {'head':>8s} {'fwd ms':>8s} {'fwd+bwd ms':>10s}")
    for n, hidden, vocab in shapes:
        h, w, t = inputs(n, hidden, vocab, dtype, device)
        grad = -torch.ones(n, device=device) / n
        found = heads()
        if "qlora" in found:  # tiles of 2 x TILE_BYTES: fewer, larger products for more memory
            from qlora_cli import lm_head

            found["qlora-2x"] = lambda *args, ours=found["qlora"]: _with_tile_bytes(lm_head, 2 * lm_head.TILE_BYTES,
                                                                                    ours, *args)
        for name, head in found.items():
            args = (h, w, t)
            fwd = timed(lambda head=head, args=args: head(*args), a.steps, 2)  # as in training: h requires grad
            both = timed(lambda head=head, args=args, grad=grad: run(head, *args, grad), a.steps, 2)
            print(f"{n:6d} {hidden:6d} {vocab:7d} {name:>8s} {fwd:8.2f} {both:10.2f}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
