"""Check `qlora footprint` against measured GPU memory: predicted vs measured peak for several real shapes.

On a CUDA machine without a model hub:

    python scripts/validate_footprint.py --group a --out results/ --jobs 2

(group a: Mistral-7B and Llama-3-8B shapes, the first GPU run; group b: new shapes, Qwen2.5-7B and padded
batches, the second; group c: compiled decoder layers, the third; docs/footprint.md has the results.)

1. makes random-weight checkpoints of the real shapes (the configs qlora ships for Mistral-7B and Llama-3-8B),
   in bf16, with a stand-in tokenizer (the tiny model's);
2. for each configuration (sequence length, micro-batch, checkpointing, LoRA settings) writes a recipe and a
   jsonl of synthetic text rows longer than the sequence length, and runs it in its own process through
   `measure_recipe`, the code behind `qlora footprint --measure` (2 optimizer steps of 2 micro-batches);
3. prints and writes (results.json, results.md) predicted vs measured `max_memory_reserved`, and the other
   measured moments.

`--jobs 2` runs two configurations at a time when their predicted totals fit the GPU together: PyTorch's
memory statistics are per process, so they stay exact. `--tiny` does all of it on the CPU with a 2-layer model
(no memory figures): a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {"mistral-7b": "mistralai/Mistral-7B-v0.1", "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
          "qwen2.5-7b": "Qwen/Qwen2.5-7B"}


@dataclass
class Config:
    name: str
    model: str  # key of MODELS
    seq_len: int
    batch: int
    checkpointing: bool
    r: int = 16
    dropout: float = 0.05
    liger: bool = False
    padded: bool = False  # rows of different lengths: batches are padded and need an attention mask
    compiled: bool = False  # training.compile_layers (groups a and b ran before it existed: eager layers)
    fused_dropout: bool = False  # training.fused_lora_dropout (on by default with compiled layers since the ninth
    # session; the runs before it measured peft's dropout)
    group: str = "a"  # a: the first GPU run, which the model's measured terms were fitted to; b: the second


CONFIGS = [  # Mistral without Liger's kernels, Llama-3 with them (the recipe default when liger-kernel is installed)
    Config("mistral-512x1-ckpt", "mistral-7b", 512, 1, True),
    Config("mistral-2048x4-ckpt", "mistral-7b", 2048, 4, True),
    Config("mistral-4096x8-ckpt", "mistral-7b", 4096, 8, True),  # sliding window = 4096: SDPA gets a mask
    Config("mistral-1024x2-nockpt", "mistral-7b", 1024, 2, False),
    Config("llama3-4096x2-ckpt-liger", "llama-3-8b", 4096, 2, True, liger=True),
    Config("llama3-1024x8-ckpt-nodropout-liger", "llama-3-8b", 1024, 8, True, dropout=0.0, liger=True),
    Config("llama3-1024x4-nockpt-liger", "llama-3-8b", 1024, 4, False, liger=True),
    Config("llama3-1024x4-nockpt", "llama-3-8b", 1024, 4, False),
    Config("llama3-2048x1-nockpt-r64-liger", "llama-3-8b", 2048, 1, False, r=64, liger=True),
    # Group b: new shapes, a new model (Qwen2.5: vocabulary 152k, q/k/v biases, 4 KV heads) and padded batches.
    Config("qwen2.5-2048x4-ckpt-liger", "qwen2.5-7b", 2048, 4, True, liger=True, group="b"),
    Config("qwen2.5-1024x2-nockpt", "qwen2.5-7b", 1024, 2, False, group="b"),
    Config("qwen2.5-4096x1-ckpt-r64", "qwen2.5-7b", 4096, 1, True, r=64, group="b"),
    Config("qwen2.5-1024x4-ckpt-padded", "qwen2.5-7b", 1024, 4, True, padded=True, group="b"),
    Config("mistral-3072x2-ckpt-padded", "mistral-7b", 3072, 2, True, padded=True, group="b"),
    Config("mistral-512x8-nockpt-padded", "mistral-7b", 512, 8, False, padded=True, group="b"),
    Config("mistral-4096x1-nockpt", "mistral-7b", 4096, 1, False, group="b"),  # sliding-window mask, every layer
    Config("mistral-2048x2-nockpt-liger", "mistral-7b", 2048, 2, False, liger=True, group="b"),
    # Group c: compiled decoder layers (the CUDA default for 7B models since issue #14's work).
    Config("mistral-2048x2-nockpt-compiled", "mistral-7b", 2048, 2, False, compiled=True, group="c"),
    Config("mistral-2048x2-nockpt-compiled-nodropout", "mistral-7b", 2048, 2, False, dropout=0.0, compiled=True,
           group="c"),
    Config("mistral-2048x4-ckpt-compiled", "mistral-7b", 2048, 4, True, compiled=True, group="c"),
    Config("mistral-2048x2-nockpt-compiled-fused", "mistral-7b", 2048, 2, False, compiled=True, fused_dropout=True,
           group="c"),
]
STEPS, ACCUMULATION = 2, 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- checkpoints


def make_checkpoint(model_key: str, out: Path, tiny: bool) -> Path:
    """A random-weight bf16 checkpoint of the real shape (or a 2-layer one with --tiny) and a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_cli.model import load_config
    from qlora_cli.recipe import ModelConfig
    from qlora_cli.tiny import build_tokenizer

    path = out / model_key
    if (path / "config.json").is_file():
        return path
    config = load_config(ModelConfig(name_or_path=MODELS[model_key]))
    if tiny:
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:2]
        config.update({"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024})
        if getattr(config, "sliding_window", None):
            config.sliding_window = 256
    t0 = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    build_tokenizer().save_pretrained(tmp)
    tmp.rename(path)
    log(f"made {path} in {time.perf_counter() - t0:.0f} s")
    return path


def write_inputs(cfg: Config, ckpt: Path, work: Path, tiny: bool) -> Path:
    """A recipe and synthetic text rows, each longer than the sequence length (so every batch is full)."""
    import yaml

    from qlora_cli.recipe import TrainingConfig

    rng = random.Random(0)
    words = ("card balance transfer refund pin exchange rate account money yesterday today euros dollars "
             "pounds shoes jacket phone laptop ticket lamp mother brother landlord school").split()
    rows = cfg.batch * ACCUMULATION * STEPS
    data = work / f"{cfg.name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in range(rows):
            n = int(cfg.seq_len * 1.1) + 8  # more words than tokens fit: truncated to exactly seq_len tokens
            if cfg.padded and row % 2:
                n = rng.randint(cfg.seq_len // 4, cfg.seq_len // 2)
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    training = {
        "per_device_train_batch_size": cfg.batch, "gradient_accumulation_steps": ACCUMULATION,
        "gradient_checkpointing": cfg.checkpointing, "max_steps": STEPS, "allow_cpu": tiny,
        "output_dir": str(work / "runs" / cfg.name),
    }
    if "compile_layers" in TrainingConfig.__dataclass_fields__:
        training["compile_layers"] = cfg.compiled
    if "fused_lora_dropout" in TrainingConfig.__dataclass_fields__:
        training["fused_lora_dropout"] = cfg.fused_dropout
    if "use_liger_kernel" in TrainingConfig.__dataclass_fields__:
        training["use_liger_kernel"] = cfg.liger
    elif cfg.liger:
        training["sft_args"] = {"use_liger_kernel": True}
    recipe = {
        "model": {"name_or_path": str(ckpt)},
        "quantization": {"load_in_4bit": True},
        "lora": {"r": cfg.r, "lora_alpha": 2 * cfg.r, "lora_dropout": cfg.dropout, "target_modules": "all-linear"},
        "data": {"source": str(data), "format": "text", "max_length": cfg.seq_len},
        "training": training,
    }
    path = work / f"{cfg.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ one run


def census(trainer) -> dict:
    """Bytes per token that one forward pass keeps for backward, by source line (1 row of at most 512 tokens,
    checkpointing off, parameters left out): the breakdown behind the activation terms."""
    import traceback

    import torch

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v[:1, :512] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
    batch = trainer._prepare_inputs(batch)
    tokens = int(batch["input_ids"].numel())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename]
            where = f"{frames[-1].filename.rsplit('site-packages/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
            seen[ptr] = (t.untyped_storage().nbytes(), f"{where} {t.dtype} {tuple(t.shape)}")
        return t

    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    was = getattr(base, "is_gradient_checkpointing", False)
    if was:
        base.gradient_checkpointing_disable()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(model, batch)
    del loss
    by_site: dict[str, int] = {}
    for nbytes, site in seen.values():
        key = site.rsplit(" (", 1)[0]
        by_site[key] = by_site.get(key, 0) + nbytes
    if was:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return {"tokens": tokens, "bytes_per_token": {k: round(v / tokens, 1) for k, v in
                                                   sorted(by_site.items(), key=lambda kv: -kv[1])}}


def run_one(recipe_path: Path, result_path: Path, tiny: bool) -> None:
    """Measure one recipe (in this process) and write the estimate, the measurement and their comparison."""
    from rich.console import Console

    from qlora_cli.commands.footprint import comparison, measure_recipe, print_comparison
    from qlora_cli.recipe import load_recipe

    console = Console(width=140)
    recipe = load_recipe(recipe_path)
    result: dict = {"recipe": str(recipe_path)}
    try:
        measured, est = measure_recipe(recipe, console, steps=STEPS, require_cuda=not tiny, inspect=safe_census)
        result |= {"estimate": est.to_dict(), "measurement": measured.to_dict(),
                   "comparison": comparison(est, measured)}
        if not tiny:
            print_comparison(est, measured, console)
    except Exception as e:  # an OOM or a bug: recorded, the other configurations still run
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result_path.write_text(json.dumps(result, indent=2))


def safe_census(trainer) -> dict:
    try:
        return {"census": census(trainer)}
    except Exception as e:  # diagnostics only
        return {"census_error": f"{type(e).__name__}: {e}"}


def context_probe() -> dict:
    """GPU memory a process uses outside PyTorch's allocator once CUDA, cuBLAS and a matmul have run."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    before = total - free
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"context_after_init": before, "outside_torch_after_matmul": total - free - torch.cuda.memory_reserved(),
            "device": torch.cuda.get_device_name(0), "total_memory": total,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


# ------------------------------------------------------------------------------------------------- driver


def predicted_total(recipe_path: Path) -> int:
    from qlora_cli.footprint import estimate_for_recipe
    from qlora_cli.recipe import load_recipe

    return estimate_for_recipe(load_recipe(recipe_path)).total


def helper(*args: str, tiny: bool) -> subprocess.Popen:
    """This script in a new process (so that this one never holds GPU memory)."""
    return subprocess.Popen([sys.executable, __file__, *args, *(["--tiny"] if tiny else [])], env=os.environ.copy())


def run_all(configs: list[Config], work: Path, tiny: bool, jobs: int, deadline: float, gpu_bytes: int,
            save: Callable[[list[dict]], None]) -> list[dict]:
    """Each configuration in its own process, up to `jobs` at a time while their predicted totals fit."""
    budget = int(0.85 * gpu_bytes)
    models = sorted({c.model for c in configs})
    makers = [helper("--make-checkpoint", m, "--work", str(work), tiny=tiny) for m in models]  # in parallel
    if any(p.wait() for p in makers):
        raise SystemExit("making a checkpoint failed")
    pending = list(configs)
    running: list[tuple[Config, subprocess.Popen, int, Path]] = []
    results: list[dict] = []
    paths = {cfg.name: write_inputs(cfg, work / "ckpt" / cfg.model, work, tiny) for cfg in configs}
    while pending or running:
        for item in list(running):
            cfg, proc, _, result_path = item
            if proc.poll() is not None:
                running.remove(item)
                failed = {"error": f"exit {proc.returncode}"}
                data = json.loads(result_path.read_text()) if result_path.is_file() else failed
                log_text = (work / f"{cfg.name}.log").read_text(errors="replace")
                results.append({"config": cfg.__dict__, **data, "log_tail": log_text[-3000:]})
                log(f"done {cfg.name} ({data.get('error', 'ok')})")
                save(results)
        if pending and time.time() > deadline:
            log(f"deadline reached; skipping {', '.join(c.name for c in pending)}")
            for cfg in pending:
                results.append({"config": cfg.__dict__, "error": "skipped: deadline"})
            pending = []
        in_use = sum(need for _, _, need, _ in running)
        if pending and len(running) < jobs:
            cfg = pending[0]
            need = int(1.15 * predicted_total(paths[cfg.name]))
            if not running or tiny or in_use + need <= budget:
                pending.pop(0)
                result_path = work / f"{cfg.name}.result.json"
                result_path.unlink(missing_ok=True)
                cmd = [sys.executable, __file__, "--run-one", str(paths[cfg.name]), "--result", str(result_path)]
                if tiny:
                    cmd.append("--tiny")
                log(f"start {cfg.name} (predicted {need / 2**30:.1f} GiB with margin; {len(running)} running)")
                with open(work / f"{cfg.name}.log", "w") as logfile:
                    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=os.environ.copy())
                running.append((cfg, proc, need, result_path))
                continue
        time.sleep(0.5)
    order = {c.name: i for i, c in enumerate(configs)}
    results.sort(key=lambda r: order[r["config"]["name"]])
    return results


def _cells(cmp: dict, key: str) -> list[str]:
    row = cmp[key]
    err = "-" if row["error_pct"] is None else f"{row['error_pct']:+.1f} %"
    return [f"{row['predicted'] / 2**30:.2f}", f"{row['measured'] / 2**30:.2f}", err]


def table(results: list[dict]) -> str:
    """Markdown: predicted vs measured peak reserved and allocated, and what the forward pass kept."""
    head = ["configuration", "tokens (B × T)", "checkpointing", "predicted reserved GiB", "measured reserved GiB",
            "error", "predicted allocated GiB", "measured allocated GiB", "error", "kept by forward: pred / meas GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        c = r["config"]
        cells = [c["name"], f"{c['batch']} × {c['seq_len']}", "on" if c["checkpointing"] else "off"]
        if "comparison" not in r:
            cells += [r.get("error", "?")] + [""] * (len(head) - 4)
        else:
            cmp = r["comparison"]
            forward = _cells(cmp, "forward_activations")
            cells += _cells(cmp, "peak_reserved") + _cells(cmp, "peak_allocated") + [f"{forward[0]} / {forward[1]}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("footprint-validation"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-validate"))
    parser.add_argument("--tiny", action="store_true", help="2-layer models on the CPU: checks the script only")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--group", default="all", choices=["a", "b", "c", "all"], help="configurations of one GPU run")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=400, help="start no configuration after this many s")
    parser.add_argument("--run-one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.run_one:
        run_one(args.run_one, args.result, args.tiny)
        return
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.work / "ckpt", args.tiny)
        return
    if args.probe:
        args.probe.write_text(json.dumps(context_probe()))
        return
    deadline = time.time() + args.time_limit
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    configs = [c for c in CONFIGS if (not args.only or c.name in args.only.split(","))
               and args.group in ("all", c.group)]
    probe = None
    if not args.tiny:
        probe_path = args.work / "probe.json"
        if helper("--probe", str(probe_path), tiny=False).wait() == 0:
            probe = json.loads(probe_path.read_text())
        log(f"context probe: {probe}")
    gpu_bytes = probe["total_memory"] if probe else 0

    def save(results: list[dict]) -> dict:
        versions = next((r["measurement"]["versions"] for r in results if "measurement" in r), {})
        summary = {"probe": probe, "versions": versions, "results": results}
        (args.out / "results.json").write_text(json.dumps(summary, indent=2))
        return summary

    results = run_all(configs, args.work, args.tiny, args.jobs, deadline, gpu_bytes, save)
    versions = save(results)["versions"]
    text = table(results)
    device = probe["device"] if probe else "CPU (--tiny: no memory figures)"
    md = f"Device: {device}; {', '.join(f'{k} {v}' for k, v in versions.items())}\n\n{text}\n"
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
