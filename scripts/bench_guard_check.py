"""What dynamo's guard check costs the CPU before each compiled decoder layer call, with and without guard filters.

Before every call of a compiled layer, torch.compile checks the guards recorded when it compiled (tensor shapes and
dtypes, peft's module attributes, the NF4 quantization state, ...) to pick the compiled graph. On a GPU that check
is CPU time the step spends before it can queue the layer's kernels. This builds the tiny demo model as `qlora
train` does (NF4, LoRA on every projection, LoRA dropout in the A projections, NF4 dequantized in the compiled
graph, gradient checkpointing around the compiled layers), runs a few training steps on the CPU, and prints the
profiler's "TorchDynamo Cache Lookup" time a call, the loss, and two evaluation losses under different seeds
(equal when the compiled graph for evaluation has dropout off), for each `--filter`:

  none      torch.compile's guards (what `qlora train` does)
  modules   torch.compiler.skip_guard_on_all_nn_modules_unsafe: no guards on nn.Module attributes
  training  the same, but the guards on modules' `training` flags kept

    python scripts/bench_guard_check.py                 # all three, one process each
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(filter_name: str, steps: int) -> dict:
    import torch
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_cli import data as datamod
    from qlora_cli.commands.train import set_adapter_dtype
    from qlora_cli.lora_dropout import use_fused_lora_dropout
    from qlora_cli.model import Device, compile_layers, load_model, load_tokenizer, lora_config
    from qlora_cli.nf4 import use_compiled_dequantization
    from qlora_cli.recipe import load_recipe

    data = REPO / "data" / "tiny-intents"
    recipe = load_recipe(REPO / "recipes" / "tiny-demo.yaml", [
        f"data.source={data / 'train.jsonl'}", f"data.eval_source={data / 'eval.jsonl'}", "data.max_rows=8",
        "lora.lora_dropout=0.05", "training.output_dir=/tmp/qlora-guard-check"])
    device = Device("cpu", "CPU", None, True)
    tokenizer = load_tokenizer(recipe.model)
    prepared = datamod.prepare(recipe.data, tokenizer)
    model = load_model(recipe, device, "bf16")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(recipe.lora))
    model.train()
    set_adapter_dtype(model, recipe.lora.adapter_dtype)
    use_fused_lora_dropout(model)
    use_compiled_dequantization(model)

    def keep_training_flags(entries: list) -> list[bool]:
        keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
        return [k or "training" in e.name for k, e in zip(keep, entries)]

    filters = {"modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "training": keep_training_flags}
    options = {"options": {"guard_filter_fn": filters[filter_name]}} if filter_name in filters else {}
    compile_layers(model, dynamic=True, keep_dequantized=True, **options)
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in (prepared.train[i] for i in range(4))]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):  # compiles
        step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    lookup = next(e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup")
    torch.manual_seed(0)
    loss = step()
    model.eval()
    evals = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            evals.append(model(**batch).loss.item())
    return {"filter": filter_name, "lookup_us": round(lookup.self_cpu_time_total / lookup.count, 1),
            "lookups": lookup.count, "loss": round(loss, 6), "eval_losses": [round(v, 6) for v in evals]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", choices=["none", "modules", "training"], help="one filter in this process")
    p.add_argument("--steps", type=int, default=5, help="profiled training steps")
    a = p.parse_args()
    if a.filter:
        print(json.dumps(run(a.filter, a.steps)))
        return
    rows = []
    for name in ("none", "modules", "training"):  # a process each: dynamo's caches start empty
        out = subprocess.run([sys.executable, __file__, "--filter", name, "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| guards | check a call, µs (CPU, profiled) | calls | loss | evaluation losses, seeds 0 and 1 |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['filter']} | {r['lookup_us']} | {r['lookups']} | {r['loss']} | "
              f"{r['eval_losses'][0]}, {r['eval_losses'][1]} |")


if __name__ == "__main__":
    main()
