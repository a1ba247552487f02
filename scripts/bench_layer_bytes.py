"""Bytes a training step moves through one compiled decoder layer, as inductor itself counts them, per variant.

For a change that removes memory traffic (training.fold_lora_b, qlora_cli/lora_fold.py) this is evidence that a
CPU can give: inductor's scheduler sums the bytes each kernel of a compiled graph reads and writes
(`GraphLowering.count_bytes`, logged with TORCH_LOGS=inductor_metrics), matrix products included.
The script builds a one-layer Llama of the given widths with random weights, loads it in NF4 and adds
the LoRA adapter as `qlora train` does (`finish_trainer_model`: fused dropout, NF4 in the graph, compiled layer,
gradient checkpointing), runs one forward and backward pass of `--rows` × `--seq` tokens, and prints the bytes of
the layer's forward and backward graphs. Under gradient checkpointing the forward graph runs twice a step (the
first pass and the recompute), so a step moves 2 × forward + backward (+ the deferred down projection's own small
graphs, the same for every variant here and left out). Each variant runs in its own process, without inductor's
graph cache (a cached graph logs no count). Bytes only: matrix products are bound by their FLOPs, not their bytes,
and nothing here is timed.

Which kernels exist (what fuses with what) depends on inductor's backend: on this CPU the graphs run as C++ kernels,
while a GPU gets Triton kernels, which fuse by other rules (peft's forward, 1024 / 3584 wide: 4.961 GB a step
counted as C++ kernels, 4.890 as Triton's). So by default (`--fusion triton`) each graph,
after it is compiled and run as C++, is scheduled again under Triton's fusion rules (`cpu_backend="triton"`, which
needs no GPU and no triton package: scheduling only, no code generated) and those kernels' bytes are counted;
`--fusion cpp` counts the C++ kernels that ran. Attention is the CPU's (SDPA), not the GPU's flex attention.

    python scripts/bench_layer_bytes.py                     # 1024 / 3584 wide (Llama-3-8B's shape / 4), ~3 min
    python scripts/bench_layer_bytes.py --variants "qlora,qlora-training.fold_lora_b=true;lora.lora_dropout=0"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_cli.commands.train import finish_trainer_model
    from qlora_cli.model import Device, load_model, lora_config
    from qlora_cli.recipe import load_recipe

    counts: list[tuple[str, int]] = []

    class Counts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"'num_bytes_accessed': (\d+)", record.getMessage())
            if found:
                compile_id = torch._guards.CompileContext.current_compile_id()
                counts.append((str(getattr(compile_id, "frame_id", compile_id)), int(found.group(1))))

    if a.fusion == "triton":
        import torch._inductor.config as inductor_config
        from torch._inductor.graph import GraphLowering

        count_bytes = GraphLowering.count_bytes

        def count_bytes_as_triton(self):  # the compiled graph's operations scheduled again as for a GPU
            ran = self.scheduler
            try:
                with inductor_config.patch(cpu_backend="triton"):
                    self._update_scheduler()
                    return count_bytes(self)
            finally:
                self.scheduler = ran

        GraphLowering.count_bytes = count_bytes_as_triton
    torch._logging.set_logs(inductor_metrics=True)
    logging.getLogger("torch._inductor.compile_fx").addHandler(Counts())
    workdir = Path(a.workdir)
    ckpt = workdir / f"llama-{a.hidden}-{a.intermediate}-{a.heads}-{a.kv_heads}"
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=1,
                             num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=512,
                             max_position_embeddings=max(4096, a.seq))
        LlamaForCausalLM(config).save_pretrained(ckpt)
    overrides = [o for o in a.child.removeprefix("qlora").lstrip("-").split(";") if o]
    recipe = load_recipe(REPO / "recipes" / "tiny-demo.yaml", [
        f"model.name_or_path={ckpt}", f"training.output_dir={workdir / 'run'}", "lora.lora_dropout=0.05",
        "training.compile_layers=true", "training.gradient_checkpointing=true", *overrides])
    device = Device("cpu", "CPU", None, True)
    model = get_peft_model(load_model(recipe, device, a.precision), lora_config(recipe.lora))
    model.train()
    assert finish_trainer_model(model, recipe, device) == 1
    ids = torch.randint(0, 512, (a.rows, a.seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {"variant": a.child, "graph_bytes": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="qlora,qlora-training.fold_lora_b=true",
                   help="comma-separated; qlora-<k=v;...> adds recipe overrides, as in bench_train.py")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="the model's compute dtype (the "
                   "adapters are the recipe's, bfloat16: folding needs the two equal)")
    p.add_argument("--fusion", default="triton", choices=["triton", "cpp"], help="count the kernels of Triton's "
                   "fusion rules (a GPU's; default) or of the C++ kernels this CPU ran")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "qlora-layer-bytes"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return
    results = []
    for variant in a.variants.split(","):
        args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("variants", "json", "child")]
        env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        proc = subprocess.run([sys.executable, __file__, *args, "--child", variant], capture_output=True, text=True,
                              env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(line.removeprefix("RESULT "))
        # (frame, bytes) in compile order; frame "0" is the decoder layer (its forward, then its backward), "1" the
        # deferred down projection added after it
        graphs = result["graph_bytes"]
        layer = [n for frame, n in graphs if frame == "0"]
        assert len(layer) == 2, graphs
        result["forward"], result["backward"] = layer
        result["step"] = 2 * layer[0] + layer[1]
        results.append(result)
        print(f"{variant}: bytes of each compiled graph {graphs}", flush=True)
    first = results[0]["step"]
    print(f"\none decoder layer {a.hidden} / {a.intermediate} wide, {a.heads}/{a.kv_heads} heads, {a.rows} x {a.seq} "
          f"tokens, {a.precision}, gradient checkpointing; GB that inductor's kernels read and write "
          f"({a.fusion} fusion)")
    print(f"{'variant':<48}{'forward':>9}{'backward':>10}{'a step':>9}{'x':>7}")
    for r in results:
        print(f"{r['variant'][:47]:<48}{r['forward'] / 1e9:>9.3f}{r['backward'] / 1e9:>10.3f}{r['step'] / 1e9:>9.3f}"
              f"{r['step'] / first:>7.3f}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
