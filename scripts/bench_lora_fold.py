"""One decoder layer's MLP with LoRA on NF4 weights, compiled as `qlora train` compiles it, with and without
`training.fold_lora_b` (qlora_cli/lora_fold.py): milliseconds a forward and a forward + backward call.

The MLP is `down(silu(gate(x)) * up(x))`, each projection a bitsandbytes NF4 `Linear4bit` under a peft LoRA adapter
(r 16, alpha 32, the fused LoRA dropout at the recipes' 0.05; `--dropout 0` for none), adapters in bfloat16, NF4
dequantized inside the compiled graph (qlora_cli/nf4.py). Folded, the gate and up projections (in a whole layer q
and o too) compute `[x | A(x)] @ [W | s·B]^T` in one product. Each variant's outputs and gradients are checked
against the unfolded ones before timing; the variants are timed in turn, `--rounds` times, after `--warmup-s`
seconds of calls each.

    python scripts/bench_lora_fold.py                                   # on a CUDA GPU: Llama-3-8B / Mistral-7B MLP
    python scripts/bench_lora_fold.py --device cpu --hidden 256 --intermediate 704 --rows 512   # a CPU dry run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora_cli.lora_dropout import use_fused_lora_dropout  # noqa: E402
from qlora_cli.lora_fold import use_folded_lora  # noqa: E402
from qlora_cli.nf4 import use_compiled_dequantization  # noqa: E402


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def build(a: argparse.Namespace, fold: bool) -> nn.Module:
    """The MLP with NF4 projections (the same random weights for every variant) and a LoRA adapter."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    mlp = MLP(a.hidden, a.intermediate)
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = getattr(mlp, name)
        nf4 = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.bfloat16,
                                quant_type="nf4", quant_storage=torch.uint8)
        nf4.weight = bnb.nn.Params4bit(dense.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
        setattr(mlp, name, nf4)
    mlp = mlp.to(a.device)  # bitsandbytes quantizes on the move to the device
    mlp.is_loaded_in_4bit = True  # peft then wraps the NF4 layers in its bitsandbytes LoRA layers
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=a.dropout,
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    mlp = inject_adapter_in_model(config, mlp)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            if "lora_" in name:
                p.data = (torch.randn(p.shape, generator=generator) * 0.02).to(a.device, torch.bfloat16)
    if a.dropout:
        use_fused_lora_dropout(mlp)
    use_compiled_dequantization(mlp)
    folded = use_folded_lora(mlp) if fold else 0
    assert folded == (2 if fold else 0), folded
    mlp.train()
    mlp.compile(fullgraph=True)
    return mlp


def call(mlp: nn.Module, x: torch.Tensor, grad: torch.Tensor | None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    x = x.detach().requires_grad_(grad is not None)
    out = mlp(x)
    if grad is None:
        return (out.detach(),)
    mlp.zero_grad(set_to_none=True)
    out.backward(grad)
    lora = [p.grad for n, p in mlp.named_parameters() if "lora_" in n]
    return out.detach(), x.grad, *lora


def time_calls(mlp: nn.Module, x: torch.Tensor, grad: torch.Tensor | None, a: argparse.Namespace) -> float:
    """Milliseconds a call: the median over `--calls` calls timed as one, after `--warmup-s` seconds of calls."""
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    end = time.perf_counter() + a.warmup_s
    while time.perf_counter() < end:
        call(mlp, x, grad)
    sync()
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        for _ in range(a.calls):
            call(mlp, x, grad)
        sync()
        times.append((time.perf_counter() - start) / a.calls * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--rows", type=int, default=8192, help="tokens a call (micro-batch 4 x 2048)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--rounds", type=int, default=3, help="times each variant is timed, in turn")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(a.rows, a.hidden, generator=generator).to(a.device, torch.bfloat16)
    grad = (torch.randn(a.rows, a.hidden, generator=generator) * 1e-2).to(a.device, torch.bfloat16)
    models = {"peft": build(a, fold=False), "folded": build(a, fold=True)}
    reference, errors = None, {}
    for name, mlp in models.items():
        t0 = time.perf_counter()
        got = call(mlp, x, grad)
        first = time.perf_counter() - t0
        reference = reference or got
        errors[name] = max(((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in zip(got, reference))
        print(f"{name}: first call {first:.1f} s (compiling), largest relative error against peft's "
              f"(output, dx, LoRA gradients) {errors[name]:.2e}", flush=True)
    results: dict[str, dict[str, list[float]]] = {n: {"forward": [], "forward+backward": []} for n in models}
    for _ in range(a.rounds):
        for name, mlp in models.items():
            with torch.no_grad():
                results[name]["forward"].append(time_calls(mlp, x, None, a))
            results[name]["forward+backward"].append(time_calls(mlp, x, grad, a))
    device = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"\n{device}, MLP {a.hidden} -> {a.intermediate} -> {a.hidden}, {a.rows} rows, bf16, LoRA r16, dropout "
          f"{a.dropout}; ms a call, median of {a.rounds} rounds (each the median of {a.repeats} x {a.calls} calls)")
    print(f"{'variant':<10}{'forward':>10}{'fwd+bwd':>10}   rounds (fwd+bwd)")
    for name, r in results.items():
        print(f"{name:<10}{statistics.median(r['forward']):>10.3f}{statistics.median(r['forward+backward']):>10.3f}"
              "   " + " ".join(f"{t:.3f}" for t in r["forward+backward"]))
    if a.json:
        a.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(a).items()},
                                      "errors": errors, "ms": results}, indent=1))


if __name__ == "__main__":
    main()
