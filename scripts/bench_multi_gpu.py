"""Multi-GPU scaling of `qlora train`: 1 process vs N processes at the same global batch, DDP or FSDP-QLoRA.

Each run is a real `qlora train` (N > 1 through `accelerate launch --multi_gpu`), on a random-weight
checkpoint of a real shape made by scripts/bench_train.py's helper, on the same synthetic data. Prints and
writes JSON: tokens/s (real tokens, all ranks), the first losses of each run, peak memory of rank 0, and whether
the saved adapter loads with PEFT.

    python scripts/bench_multi_gpu.py --shape mistral7b --gpus 2 --steps 12
    python scripts/bench_multi_gpu.py --shape llama3-8b --gpus 2 --strategy fsdp --steps 6
    python scripts/bench_multi_gpu.py --shape tiny --device cpu --gpus 2 --steps 4   # CPU check of the script (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def run(a: argparse.Namespace, ckpt: Path, data: Path, processes: int) -> dict:
    out = a.workdir / f"run-{a.strategy}-{processes}"
    micro = a.global_batch // processes
    storage = "bfloat16" if a.strategy == "fsdp" else "uint8"
    recipe = a.workdir / "recipe.yaml"
    recipe.write_text(f"""
model: {{name_or_path: {ckpt}}}
quantization: {{bnb_4bit_quant_storage: {storage}}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: all-linear}}
data: {{source: {data}, format: text, max_length: {a.seq_len}, packing: true}}
training:
  max_steps: {a.steps}
  per_device_train_batch_size: {micro}
  gradient_accumulation_steps: 1
  logging_steps: 1
  save_steps: 100000
  allow_cpu: {str(a.device == "cpu").lower()}
distributed: {{strategy: {a.strategy}}}
""")
    args = ["-m", "qlora_cli.cli", "train", str(recipe), "--overwrite", "--set", f"training.output_dir={out}"]
    env = dict(os.environ)
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"processes": processes, "error": proc.stderr[-3000:]}
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    from peft import PeftConfig

    PeftConfig.from_pretrained(out / "adapter")
    return {"processes": processes, "micro_batch": micro, "tokens_per_s": summary["tokens_per_s"],
            "peak_rank0_bytes": summary.get("peak_gpu_bytes") or summary.get("peak_rss_bytes"),
            "peak_rank0_reserved_bytes": summary.get("peak_gpu_reserved_bytes"), "losses": losses,
            "global_batch": summary["global_batch"], "adapter_loads": True}


def main() -> None:
    from bench_train import make_checkpoint, write_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral7b", choices=["mistral7b", "llama3-8b", "qwen2.5-7b", "tiny"])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-multi"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(a.shape, a.workdir / f"ckpt-{a.shape}", a.device)
    data = write_data(a.workdir / "data.jsonl", 600)
    results = [run(a, ckpt, data, 1), run(a, ckpt, data, a.gpus)]
    print(f"\n{a.shape}, {a.strategy}, global batch {a.global_batch} x {a.seq_len}, {a.steps} steps")
    print(f"{'processes':>10}{'micro':>7}{'tok/s':>10}{'peak rank0 GB':>15}  first losses")
    for r in results:
        if "error" in r:
            print(f"{r['processes']:>10}  FAILED\n{r['error']}")
            continue
        peak = (r["peak_rank0_bytes"] or 0) / 1e9
        print(f"{r['processes']:>10}{r['micro_batch']:>7}{r['tokens_per_s']:>10.0f}{peak:>15.2f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"][:6]))
    if all("error" not in r for r in results):
        print(f"scaling: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x with {a.gpus} processes")
    if a.out:
        a.out.write_text(json.dumps({"shape": a.shape, "strategy": a.strategy, "results": results}, indent=2))


if __name__ == "__main__":
    main()
