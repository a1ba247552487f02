"""The optimizer step alone, on the LoRA adapter of a real shape (r=16 on the seven projections, bf16 weights):
bitsandbytes' optimizer as transformers builds it for `training.optim` against qlora's subclass without
bitsandbytes' wait after every parameter and, for paged states, without its prefetches and its wait at the end of
the step (`without_per_parameter_sync` in qlora_cli/reliability.py), tensor by tensor and (qlora's default for
8-bit AdamW) with one blockwise call for all of a group's tensors (qlora_cli/flat_update.py).

    python scripts/bench_optimizer.py --shape mistral7b --steps 30            # on a CUDA GPU
    python scripts/bench_optimizer.py --device cpu --steps 3 --warmup 1       # a dry run on the CPU

Prints, per variant, the median wall time of a step on an idle GPU and of a step queued behind ~50 ms of other GPU
work (as it is behind the backward pass's tail in training; that work's own time, measured in the same iteration,
is subtracted), the CPU time the queued step takes to return (what the GPU waits for at a step's end when the CPU
is behind), and whether each variant leaves bitsandbytes' weights, bit for bit, after the same steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from bench_train import REPO, SHAPES  # scripts/ is on the path when this file runs


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def adapter(shape: str, rank: int, seed: int, device: str) -> list[torch.nn.Parameter]:
    """The adapter's weights (with gradients) for the shape's config in qlora_cli/models, as bench_train uses it."""
    cfg = json.loads((REPO / "qlora_cli" / "models" / SHAPES[shape]).read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or hidden // cfg["num_attention_heads"])
    dims = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
            (inter, hidden)]  # q k v o gate up down: (in, out)
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _ in range(layers):
        for d_in, d_out in dims:
            for rows, cols in ((rank, d_in), (d_out, rank)):
                p = torch.nn.Parameter(torch.randn(rows, cols, device=device, generator=g, dtype=torch.bfloat16) / 64)
                p.grad = torch.randn(rows, cols, device=device, generator=g, dtype=torch.bfloat16) / 1000
                params.append(p)
    return params


def build(optim: str, params: list[torch.nn.Parameter], unsynced: bool) -> torch.optim.Optimizer:
    from transformers import Trainer, TrainingArguments

    from qlora_cli.reliability import without_per_parameter_sync

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, optim=optim, learning_rate=2e-4, report_to="none")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    return (without_per_parameter_sync(cls) if unsynced else cls)(params, **kwargs)


def work(device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Operands and a count of matrix products that take about 50 ms on an H100/H200-class GPU."""
    a = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    return a, b, 100 if device == "cuda" else 1


def run(optim: str, variant: str, a: argparse.Namespace) -> dict:
    from qlora_cli import flat_update

    params = adapter(a.shape, a.rank, 0, a.device)
    opt = build(optim, params, variant != "bitsandbytes")
    flat, devices = flat_update.uses_flat_update, flat_update.DEVICES
    if variant == "per-tensor":
        flat_update.uses_flat_update = lambda optimizer: False
    elif variant == "flat":
        flat_update.DEVICES = (a.device,)  # CUDA's default; on the CPU (a dry run) too
    try:
        x, w, n = work(a.device)
        alone, behind, busy, cpu = [], [], [], []
        for i in range(a.warmup + a.steps):
            sync(a.device)
            t0 = time.perf_counter()
            for _ in range(n):  # the other work alone
                x @ w
            sync(a.device)
            t1 = time.perf_counter()
            opt.step()  # the step alone
            sync(a.device)
            t2 = time.perf_counter()
            for _ in range(n):  # the step queued behind the same work
                x @ w
            t_queued = time.perf_counter()
            opt.step()
            t_returned = time.perf_counter()
            sync(a.device)
            t3 = time.perf_counter()
            if i >= a.warmup:
                busy.append(t1 - t0)
                alone.append(t2 - t1)
                behind.append(t3 - t2 - (t1 - t0))
                cpu.append(t_returned - t_queued)
    finally:
        flat_update.uses_flat_update, flat_update.DEVICES = flat, devices
    return {"alone_ms": 1e3 * statistics.median(alone), "behind_ms": 1e3 * statistics.median(behind),
            "busy_ms": 1e3 * statistics.median(busy), "cpu_ms": 1e3 * statistics.median(cpu),
            "weights": [p.detach().clone() for p in params], "tensors": len(params),
            "calls": "one a group" if getattr(opt, "qlora_flat", None) else "one a tensor"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral7b", choices=sorted(SHAPES))
    p.add_argument("--optim", default="paged_adamw_8bit,adamw_bnb_8bit")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"{name}, {a.shape} adapter r={a.rank}, {a.steps} timed steps after {a.warmup}")
    print(f"{'optim':<18}{'variant':<38}{'tensors':>8}{'updates':>14}{'alone ms':>10}{'behind ms':>11}"
          f"{'CPU ms':>8}{'same weights':>14}")
    labels = {"bitsandbytes": "bitsandbytes' step", "per-tensor": "qlora's: no waits, no prefetches",
              "flat": "qlora's, one call a group (CUDA default)"}
    for optim in a.optim.split(","):
        ref = None
        for variant, label in labels.items():
            r = run(optim, variant, a)
            ref = ref or r
            same = all(torch.equal(x, y) for x, y in zip(ref["weights"], r["weights"]))
            print(f"{optim:<18}{label:<38}{r['tensors']:>8}{r['calls']:>14}{r['alone_ms']:>10.2f}"
                  f"{r['behind_ms']:>11.2f}{r['cpu_ms']:>8.2f}{str(same):>14}", flush=True)
    print(f"behind: the step queued after {ref['busy_ms']:.1f} ms of matrix products (median), that time subtracted "
          "(measured in the same iteration)")


if __name__ == "__main__":
    main()
