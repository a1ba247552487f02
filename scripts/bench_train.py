"""Training-speed benchmark: the usual transformers+peft+bitsandbytes+TRL recipe vs `qlora train`.

One invocation, one GPU: builds (or reuses) a random-weight checkpoint of a real shape, writes one synthetic
dataset, then runs each variant in its own process (clean CUDA memory statistics) on the same data, micro-batch,
sequence length and steps. Prints a table and writes JSON: tokens/s (real, non-pad tokens, after warm-up), median
step time, peak allocated and reserved memory, load time and the first losses.

    python scripts/bench_train.py --shape mistral7b --steps 12 --warmup 3 --out bench.json
    python scripts/bench_train.py --shape tiny --device cpu --steps 4 --warmup 1       # CPU dry run of the script
    python scripts/bench_train.py --data-kind intents --variants "qlora-data.packing=false;..."  # short rows

Data (`--data-kind`): `text` = documents of pseudo-words, lengths drawn log-normally between 50 and 3,000 words
(many short, some long: TRL's best-fit packing leaves short rows and short last micro-batches); `intents` =
banking77-like prompt -> label rows of 8-40 words, for the short-row recipe (qwen2.5-7b-banking77.yaml).

Variants (`--variants`, comma-separated):
  baseline         prepare_model_for_kbit_training, SDPA, TRL packing, LoRA r16/a32/d0.05 on 7 projections,
                   paged 8-bit AdamW, gradient checkpointing: the recipe blog posts copy
  baseline-liger   the same with TRL's use_liger_kernel=True
  qlora            `qlora train` with its defaults on the equivalent recipe
  qlora-<k=v;...>  `qlora train` with recipe overrides, e.g. "qlora-lora.lora_dropout=0"
  unsloth          the baseline's recipe through unsloth's FastLanguageModel (its own 4-bit loading, LoRA
                   kernels and checkpointing); install it with its pinned trl/datasets into a separate folder
                   and name that folder in UNSLOTH_PATH (docs/bench/unsloth-gpu.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"mistral7b": "mistral-7b.json", "llama3-8b": "llama-3-8b.json", "qwen2.5-7b": "qwen2.5-7b.json"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ set-up


def make_checkpoint(shape: str, path: Path, device: str, layers: int | None = None) -> Path:
    """A random-weight bf16 checkpoint of the shape (with only `layers` decoder layers when given), with a BPE
    tokenizer trained on the synthetic corpus."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_cli.tiny import bpe_tokenizer, ensure_tiny_model

    if (path / "config.json").is_file():
        return path
    if shape == "tiny":
        src = ensure_tiny_model()
        import shutil

        shutil.copytree(src, path)
        return path
    data = json.loads((REPO / "qlora_cli" / "models" / SHAPES[shape]).read_text())
    if layers:
        data["num_hidden_layers"] = layers
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    t0 = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer = bpe_tokenizer(corpus(2000, seed=1), vocab_size=min(config.vocab_size, 16000), chat_template=None)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    del model
    print(f"made {shape} checkpoint in {time.perf_counter() - t0:.0f} s at {path}", flush=True)
    return path


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of pseudo-words with lengths spread like real SFT data (a few hundred to a few thousand words)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "ve", "so", "pi", "de", "gu", "fa", "zo", "hi", "be", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    docs = []
    for _ in range(n_docs):
        n = int(min(3000, max(50, rng.lognormvariate(6.0, 0.8))))
        docs.append(" ".join(rng.choice(words) for _ in range(n)) + ".")
    return docs


def write_data(path: Path, n_docs: int, kind: str = "text") -> Path:
    if path.is_file():
        return path
    if kind == "text":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(n_docs)))
        return path
    rng = random.Random(2)
    words = corpus(1, seed=3)[0].split()
    labels = [f"intent_{rng.choice(words)}_{i}" for i in range(77)]
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(int(min(40, max(8, rng.lognormvariate(2.7, 0.4)))))),
             "completion": " " + rng.choice(labels)} for _ in range(n_docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ runs


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


FULL_GC = {"count": 0, "s": 0.0, "start": 0.0}
"""Python's full (generation 2) garbage collections in this process so far: with the millions of objects a
compiled model leaves, one can stop the CPU for a few hundred ms (as long stalls in profiled steps suggested)."""


def _time_full_gc(phase: str, info: dict) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        FULL_GC["start"] = time.perf_counter()
    else:
        FULL_GC["count"] += 1
        FULL_GC["s"] += time.perf_counter() - FULL_GC["start"]


class Timer:
    """A TrainerCallback recording wall time and real tokens at each logged step (every `--log-every` steps).

    Logging reads the loss with `.item()`, which waits for the GPU, so the times between logs are the steps'.
    """

    def __init__(self, profile_to: Path | None = None, profile_steps: tuple[int, int] = (0, 0)) -> None:
        self.records: list[dict] = []
        self.profile_to = profile_to
        self.profile_steps = profile_steps
        if _time_full_gc not in gc.callbacks:
            gc.callbacks.append(_time_full_gc)

    def callback(self):
        from transformers import TrainerCallback

        records = self.records
        timer = self

        class _Timer(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kwargs):
                if timer.profile_to and state.global_step == timer.profile_steps[0]:
                    import torch

                    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if self.prof is not None and state.global_step == timer.profile_steps[1]:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    self.prof.__exit__(None, None, None)
                    averages = self.prof.key_averages()
                    table = averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
                    # and what the CPU spends its time on (launching, Python), for steps the CPU holds back
                    table += "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40,
                                                       max_name_column_width=70)
                    timer.profile_to.write_text(table)
                    # the timeline, for where the GPU waits (scripts/gpu_gaps.py reads it); torch gzips a .gz path
                    trace = timer.profile_to.stem.replace("profile-", "trace-") + ".json.gz"
                    self.prof.export_chrome_trace(str(timer.profile_to.with_name(trace)))
                    self.prof = None

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    records.append({"step": state.global_step, "t": time.perf_counter(), "graphs": compiled_graphs(),
                                    "tokens": state.num_input_tokens_seen, "loss": float(logs["loss"]),
                                    "full_gc": FULL_GC["count"], "full_gc_s": FULL_GC["s"]})

        return _Timer()

    def profiled_steps(self) -> set[int]:
        """Steps whose time the profiler inflated (tracing, writing the table): left out of the timing."""
        return set(range(self.profile_steps[0] + 1, self.profile_steps[1] + 1)) if self.profile_to else set()


def summarize(records: list[dict], warmup: int, load_s: float, device: str, skip: set[int] = frozenset()) -> dict:
    """Tokens/s and step times over the steps after `warmup`, leaving out the steps in `skip` (profiled ones)."""
    import torch

    timed = [r for r in records if r["step"] >= warmup]  # the first interval ends at the next logged step
    intervals = [(b["t"] - a["t"], b["tokens"] - a["tokens"], b["step"] - a["step"]) for a, b in zip(timed, timed[1:])
                 if not skip & set(range(a["step"] + 1, b["step"] + 1))]
    steps = [dt / n for dt, _, n in intervals]  # per step, when logging every few steps
    tokens = sum(t for _, t, _ in intervals)
    elapsed = sum(dt for dt, _, _ in intervals)
    out = {
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "median_step_s": statistics.median(steps) if steps else None,
        "timed_steps": sum(n for _, _, n in intervals),
        "load_s": load_s,
        "losses": [round(r["loss"], 5) for r in records],
        "logged_steps": [r["step"] for r in records],  # step_s and step_tokens are per interval between these
        "step_s": [round(b["t"] - a["t"], 3) for a, b in zip(records, records[1:])],
        "step_tokens": [b["tokens"] - a["tokens"] for a, b in zip(records, records[1:])],
        "compiles_after_warmup": compiled_graphs() - timed[0]["graphs"],
        # full garbage collections between the first and the last timed log (profiled steps included)
        "full_gc_timed": timed[-1].get("full_gc", 0) - timed[0].get("full_gc", 0),
        "full_gc_timed_s": round(timed[-1].get("full_gc_s", 0.0) - timed[0].get("full_gc_s", 0.0), 3),
        "full_gc_per_interval": [b.get("full_gc", 0) - a.get("full_gc", 0) for a, b in zip(records, records[1:])],
    }
    if device == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return out


def usual_args(a: argparse.Namespace, output: str, **extra: Any):
    """The usual recipe's trainer arguments (the baseline's; the unsloth variant runs the same ones)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(a.workdir / output), per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=1, max_steps=a.warmup + a.steps + 1, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0.03, optim="paged_adamw_8bit", bf16=True, packing=True,
        max_length=a.seq_len, logging_steps=a.log_every, save_strategy="no", report_to="none",
        include_num_input_tokens_seen="non_padding", use_cpu=a.device != "cuda", seed=42, data_seed=42,
        disable_tqdm=True, max_grad_norm=0.3, **extra,
    )


def run_baseline(ckpt: Path, data: Path, a: argparse.Namespace, liger: bool) -> dict:
    """The usual recipe, written plainly as the blog posts do (without transformers 5.25's Hub kernels, which those
    posts predate and which an offline machine cannot fetch)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

    cuda = a.device == "cuda"
    t0 = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", use_kernels=False,
                                                 device_map={"": 0} if cuda else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    args = usual_args(a, "baseline-out", gradient_checkpointing=True, use_liger_kernel=liger)
    timer = make_timer(a, "baseline-liger" if liger else "baseline")
    ds = load_dataset("json", data_files=str(data), split="train")
    callbacks = [timer.callback()]
    if a.gc_freeze:  # what qlora's training.freeze_gc does, for the usual recipe too
        from qlora_cli.commands.train import freeze_gc_callback

        callbacks.append(freeze_gc_callback())
    if a.baseline_steps:  # fewer steps, the same learning-rate schedule as qlora's run
        callbacks.append(stop_after(a.warmup + a.baseline_steps + 1))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora,
                         callbacks=callbacks)
    trainer.train()
    return summarize(timer.records, a.warmup, load_s, a.device, timer.profiled_steps())


def run_unsloth(ckpt: Path, data: Path, a: argparse.Namespace) -> dict:
    """The same recipe through unsloth (FastLanguageModel: its own 4-bit loading, LoRA kernels and
    "unsloth" gradient checkpointing), on TRL's SFTTrainer with the baseline's arguments.

    unsloth pins older trl/datasets than qlora's; put them (and unsloth) in a folder of their own and name it in
    UNSLOTH_PATH: only this variant's process puts it first on sys.path."""
    import torch
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl on import)
    from datasets import load_dataset
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    cuda = a.device == "cuda"
    t0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(str(ckpt), max_seq_length=a.seq_len, dtype=torch.bfloat16,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=42)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = usual_args(a, "unsloth-out")  # gradient checkpointing: unsloth's own, set in get_peft_model
    timer = make_timer(a, "unsloth")
    ds = load_dataset("json", data_files=str(data), split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         callbacks=[timer.callback()])
    trainer.train()
    return summarize(timer.records, a.warmup, load_s, a.device, timer.profiled_steps())


def stop_after(steps: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_training_stop = True

    return Stop()


def run_qlora(ckpt: Path, data: Path, a: argparse.Namespace, overrides: list[str]) -> dict:
    """`qlora train` on the equivalent recipe, through its own code path."""
    from rich.console import Console

    from qlora_cli.commands import train as train_cmd
    from qlora_cli.recipe import load_recipe

    cuda = a.device == "cuda"
    recipe_path = a.workdir / "bench-recipe.yaml"
    data_fmt = "format: text"
    if a.data_kind == "intents":
        data_fmt = 'format: prompt_completion, prompt_template: "Q: {prompt}\\nA:"'
    recipe_path.write_text(f"""
model: {{name_or_path: {ckpt}}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: {TARGETS}}}
data: {{source: {data}, {data_fmt}, max_length: {a.seq_len}, packing: true}}
training:
  max_steps: {a.warmup + a.steps + 1}
  per_device_train_batch_size: {a.micro_batch}
  gradient_accumulation_steps: 1
  learning_rate: 2.0e-4
  lr_scheduler_type: cosine
  warmup_steps: 0.03
  logging_steps: {a.log_every}
  save_steps: 100000
  allow_cpu: {str(not cuda).lower()}
""")
    recipe = load_recipe(recipe_path, [f"training.output_dir={a.workdir / 'qlora-out'}", *overrides])
    timer = make_timer(a, "qlora" + ("-" + "-".join(overrides) if overrides else ""))
    summary = train_cmd.train(recipe, Console(stderr=True, width=120), overwrite=True,
                              callbacks=[timer.callback()])
    result = summarize(timer.records, a.warmup, summary["load_time_s"], a.device, timer.profiled_steps())
    result["summary"] = {k: summary.get(k) for k in ("steady_tokens_per_s", "tokens_per_s", "train_time_s", "warmup_s",
                                                     "warmup_steps", "steady_steps", "compiles", "steps")}
    return result


def make_timer(a: argparse.Namespace, variant: str) -> Timer:
    if not a.profile_dir:
        return Timer()
    Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in variant)
    # two steps, so the boundary between them (logging, the next batch, the optimizer) is in the timeline
    return Timer(Path(a.profile_dir) / f"profile-{name}.txt", (a.warmup + 1, a.warmup + 3))


def child(a: argparse.Namespace) -> None:
    """Run one variant and print its result as the last line (JSON)."""
    ckpt, data = Path(a.ckpt), Path(a.data)
    variant = a.child
    if variant == "baseline":
        result = run_baseline(ckpt, data, a, liger=False)
    elif variant == "baseline-liger":
        result = run_baseline(ckpt, data, a, liger=True)
    elif variant == "unsloth":
        result = run_unsloth(ckpt, data, a)
    else:
        overrides = [o for o in variant.removeprefix("qlora").lstrip("-").split(";") if o]
        result = run_qlora(ckpt, data, a, overrides)
    result["variant"] = variant
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ main


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral7b", choices=[*SHAPES, "tiny"])
    p.add_argument("--variants", default="baseline,baseline-liger,qlora")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline-steps", type=int, default=None, help="timed steps of the baseline variants "
                   "(default: --steps)")
    p.add_argument("--log-every", type=int, default=1, help="log (and time) every N steps; each log reads the loss "
                   "back, so the CPU waits for the GPU there (real runs log every 10); --warmup and --steps should be "
                   "multiples of N")
    p.add_argument("--docs", type=int, default=3000, help="synthetic documents (rows)")
    p.add_argument("--data-kind", default="text", choices=["text", "intents"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile-dir", default=None, help="write a torch profiler table and timeline "
                   "(trace-*.json.gz, for scripts/gpu_gaps.py) of two steps per variant here (left out of the timing)")
    p.add_argument("--gc-freeze", action="store_true", help="the baseline variants too: after the first step, one "
                   "full garbage collection and gc.freeze(), so that later full collections skip the objects alive "
                   "then, as qlora's `training.freeze_gc` does by default (`qlora-training.freeze_gc=false` turns it "
                   "off for a qlora variant)")
    p.add_argument("--report", type=Path, default=None, help="print the table of a saved --out file and stop")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.report:
        print_report(json.loads(a.report.read_text()))
        return
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a)
        return

    ckpt = make_checkpoint(a.shape, a.workdir / f"ckpt-{a.shape}", a.device)
    data = write_data(a.workdir / f"data-{a.data_kind}-{a.docs}.jsonl", a.docs, a.data_kind)
    results = []
    for variant in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--ckpt", str(ckpt), "--data", str(data),
               "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--device", a.device, "--workdir", str(a.workdir),
               "--data-kind", a.data_kind, "--log-every", str(a.log_every),
               *(["--baseline-steps", str(a.baseline_steps)] if a.baseline_steps else [])]
        if a.profile_dir:
            cmd += ["--profile-dir", a.profile_dir]
        if a.gc_freeze:
            cmd += ["--gc-freeze"]
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if variant == "unsloth" and os.environ.get("UNSLOTH_PATH"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ["UNSLOTH_PATH"], env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"--- {variant} failed (exit {proc.returncode}) ---\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            results.append({"variant": variant, "error": proc.stderr[-2000:]})
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        result["wall_s"] = time.perf_counter() - t0
        # what unsloth says it changed (optimizer, packing, attention) belongs next to its figures
        result["notes"] = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Unsloth")]
        results.append(result)
        rate = result.get("tokens_per_s")  # None when no logged interval fell after the warm-up (short profiled runs)
        print(f"{variant}: " + (f"{rate:.0f} tok/s" if rate is not None else "no timed interval"), flush=True)

    report = {"shape": a.shape, "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": a.steps,
              "warmup": a.warmup, "gc_freeze": a.gc_freeze, "device": device_name(a.device), "versions": versions(),
              "results": results}
    print_report(report)
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))


def last_step_s(r: dict) -> float | None:
    """Seconds a step over the last logged interval: the baseline is still getting faster 10-20 steps after the
    warm-up (2.60 -> 2.32 -> 2.09 -> 2.14 -> 2.08 s in a 50-step Llama-3-8B run), qlora's steps are flat."""
    logged, seconds = r.get("logged_steps") or [], r.get("step_s") or []
    return seconds[-1] / (logged[-1] - logged[-2]) if len(logged) >= 2 and seconds else None


def print_report(report: dict) -> None:
    """The table of one run (also of a saved --out file: `bench_train.py --report FILE`)."""
    results = report["results"]
    base = next((r for r in results if r["variant"] == "baseline" and "error" not in r), None)
    base_last = last_step_s(base) if base else None
    print(f"\nshape {report['shape']}, micro-batch {report['micro_batch']} x {report['seq_len']} tokens, "
          f"{report['steps']} timed steps after {report['warmup']} warm-up, device {report['device']}")
    print(f"{'variant':<34}{'tok/s':>9}{'x base':>8}{'step s':>8}{'last s':>8}{'x last':>7}{'alloc GB':>10}"
          f"{'resv GB':>9}{'x mem':>7}{'load s':>8}{'compiles':>9}{'late':>5}{'warm-up s':>10}{'steady*':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<34} FAILED")
            continue
        rate, median = r.get("tokens_per_s") or float("nan"), r.get("median_step_s") or float("nan")
        speed = rate / base["tokens_per_s"] if base and base.get("tokens_per_s") else float("nan")
        last = last_step_s(r)
        last_speed = base_last / last if base_last and last else float("nan")
        alloc, resv = r.get("peak_allocated_gb", 0.0), r.get("peak_reserved_gb", 0.0)
        mem = alloc / base["peak_allocated_gb"] if base and base.get("peak_allocated_gb") else float("nan")
        run = r.get("summary") or {}
        print(f"{r['variant'][:33]:<34}{rate:>9.0f}{speed:>8.2f}{median:>8.3f}"
              f"{last or float('nan'):>8.3f}{last_speed:>7.2f}{alloc:>10.2f}{resv:>9.2f}{mem:>7.2f}{r['load_s']:>8.1f}"
              f"{run.get('compiles') or 0:>9}{r.get('compiles_after_warmup', 0):>5}{run.get('warmup_s') or 0:>10.1f}"
              f"{run.get('steady_tokens_per_s') or 0:>9.0f}")
    print("last s, x last: seconds a step over the last logged interval and its ratio to the baseline's (the baseline "
          "still speeds up after the warm-up); compiles: graphs torch.compile compiled in the run; late: of them after "
          "the warm-up steps; warm-up s and steady*: what `qlora train` itself reports (summary.json)")
    print("full garbage collections in the timed steps (count, seconds; per logged interval):"
          + ("  [--gc-freeze: the baseline's frozen after step 1 too]" if report.get("gc_freeze") else ""))
    for r in results:
        if "error" not in r and "full_gc_timed" in r:
            print(f"  {r['variant']:<34}{r['full_gc_timed']:>3} {r['full_gc_timed_s']:>7.3f} s   "
                  + " ".join(str(n) for n in r["full_gc_per_interval"]))
    print("\nfirst losses:")
    for r in results:
        if "error" not in r:
            print(f"  {r['variant']:<34}" + " ".join(f"{x:.4f}" for x in r["losses"][:8]))
    for r in results:
        for note in r.get("notes", []):
            print(f"  {r['variant']}: {note}")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
