"""`qlora train`: recipe -> 4-bit model + LoRA -> TRL SFTTrainer -> run directory."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .. import data as datamod
from ..errors import UserError
from ..lm_head import EVERY_POSITION_SHARE, gradient_in_forward
from ..lora_dropout import FusedDropoutLinear, memo_rows, resolve_fused_lora_dropout, use_fused_lora_dropout
from ..lora_fold import folded, use_folded_lora
from ..model import (
    Device,
    check_target_modules,
    compile_layers,
    count_parameters,
    detect_device,
    is_main_process,
    liger_installed,
    load_model,
    load_tokenizer,
    lora_config,
    meta_model,
    packed_masks_without_readback,
    resolve_attention,
    resolve_compile,
    resolve_precision,
    uncompile_layers,
    uses_fsdp,
    world_size,
)
from ..nf4 import use_compiled_dequantization
from ..recipe import Recipe
from ..reliability import (
    Interrupted,
    StopOnNonFinite,
    StopOnSignal,
    atomic_checkpoint_trainer,
    check_disk_space,
    check_remote_code,
    check_resume_recipe,
    checkpoint_bytes,
    checkpoint_global_step,
    complete_checkpoints,
    disk_errors,
    find_checkpoint,
    lora_parameter_count,
    remove_partials,
    truncate_metrics,
)
from ..run_dir import RunDir, append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, check_writable

if TYPE_CHECKING:
    from transformers import TrainerCallback
    from trl import SFTConfig


# ------------------------------------------------------------------------------------------------ config


def build_sft_config(recipe: Recipe, run: RunDir, device: Device, precision: str, has_eval: bool) -> SFTConfig:
    """The recipe's training section (and data shaping) as a trl.SFTConfig."""
    from trl import SFTConfig

    t = recipe.training
    eval_args: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_args = {"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps else {
            "eval_strategy": "epoch"}
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device.is_cuda,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        # transformers would read every micro-batch's loss back to replace a NaN by the running mean, making the CPU
        # wait for the backward pass; a NaN stops the run instead (StopOnNonFinite), so it is logged as it is
        logging_nan_inf_filter=False,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        completion_only_loss=True,
        dataset_num_proc=None,
        use_liger_kernel=uses_liger(recipe, device),
        **eval_args,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        **distributed_args(recipe),
        # on a GPU, each batch is pinned and copied to the device behind the queued work: a blocking copy waited for
        # the GPU to finish the previous step, so the next batch's collation then ran with the GPU idle (~30 ms a
        # step in an H200 profile, docs/performance.md, tenth session)
        **{"accelerator_config": {"non_blocking": device.is_cuda}, "dataloader_pin_memory": device.is_cuda,
           **shape_args(recipe, device), **t.sft_args},
    )


def uses_liger(recipe: Recipe, device: Device, installed: bool | None = None, compiled: bool | None = None) -> bool:
    """Liger's layer kernels, on CUDA when installed and the layers are not compiled (compiling fuses the same
    norms, activations and RoPE itself, and Liger's kernels would split the compiled graphs).

    `installed`: whether liger-kernel is installed where the run trains (default: here); `compiled`: whether the
    layers are compiled (default: `resolve_compile`). `qlora footprint` passes both for the target GPU.
    """
    installed = liger_installed() if installed is None else installed
    compiled = resolve_compile(recipe, device) if compiled is None else compiled
    return bool(recipe.training.use_liger_kernel and device.is_cuda and installed and not compiled)


def distributed_args(recipe: Recipe) -> dict[str, Any]:
    """FSDP-QLoRA through accelerate: decoder layers auto-wrapped and sharded, 4-bit storage sharded with them."""
    if not uses_fsdp(recipe):
        return {}
    import transformers

    from ..model import load_config

    config = load_config(recipe.model)
    model_cls = getattr(transformers, (config.architectures or ["LlamaForCausalLM"])[0])
    layers = list(getattr(model_cls, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": layers,
            "cpu_ram_efficient_loading": recipe.distributed.cpu_ram_efficient_loading,
            "sync_module_states": True,
            "use_orig_params": False,
            "offload_params": False,
        },
    }


def shape_args(recipe: Recipe, device: Device) -> dict[str, Any]:
    """Packed rows padded to one length, micro-batch x max_length tokens, when flex attention or compiled layers
    run them: one shape per run, so nothing is compiled again after the first step.

    Flex attention and the compiled layers are specialised to the row length. Best-fit packing fills nearly every
    row (the bench data: ~8,000 of 8,192 tokens), so the padding costs little; only a short last row pays. The
    old bucketing (multiples of 1,024) still recompiled: a 7,168-token batch at step 32 of a Llama-3-8B run
    stalled it for 30 s (issue #14). Padding tokens carry no loss and are not counted as trained tokens.
    Unpacked batches are not padded: their layers are compiled for any length (`finish_trainer_model`).
    Override with training.sft_args.pad_to_multiple_of.
    """
    packed_shape = resolve_attention(recipe, device) == "flex_attention" or resolve_compile(recipe, device)
    if recipe.data.packing and packed_shape:
        return {"pad_to_multiple_of": recipe.training.per_device_train_batch_size * recipe.data.max_length}
    return {}


def set_adapter_dtype(model: Any, dtype_name: str) -> None:
    """Cast the trainable weights (TRL makes them bfloat16 on quantized models) to the recipe's dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def finish_trainer_model(model: Any, recipe: Recipe, device: Device) -> int:
    """What the trainer's (PEFT-wrapped) model gets before training: adapters in the recipe's dtype, LoRA dropout
    inside the A projections where `training.fused_lora_dropout` says so (qlora_cli/lora_dropout.py), and the
    decoder layers compiled where `training.compile_layers` says so, their NF4 weights dequantized inside the
    compiled graph (`training.compile_nf4`, qlora_cli/nf4.py), projections folded with their LoRA B where
    `training.fold_lora_b` says so (qlora_cli/lora_fold.py), the fused A projections' outputs kept for the recompute
    where `training.keep_lora_a_outputs` says so (`lora_dropout.RecomputeMemo`); returns how many layers were
    compiled.

    Packed rows have one length (`shape_args`), so the layers are compiled for it; unpacked batches vary in
    length, so the layers are compiled for any length from the start (one compile instead of a static one and
    a dynamic recompile at the second length).
    """
    set_adapter_dtype(model, recipe.lora.adapter_dtype)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    compiled = resolve_compile(recipe, device, hidden)
    if resolve_fused_lora_dropout(recipe, compiled):
        use_fused_lora_dropout(model)
    if not compiled:
        return 0
    t = recipe.training
    if t.compile_nf4:
        use_compiled_dequantization(model)
        if t.fold_lora_b:
            use_folded_lora(model)
    return compile_layers(model, dynamic=None if recipe.data.packing else True,
                          recompute_down_proj=t.recompute_down_proj,
                          keep_dequantized=t.keep_dequantized,  # acts on compile_nf4's layers only
                          memo_rows=memo_rows(recipe))  # acts on checkpointed layers with fused LoRA dropout only


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's count, recompiles included)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def no_recompile_callback() -> TrainerCallback:
    """After the first optimizer step, a training step whose inputs would need another compile runs the layers
    eagerly instead (`torch.compiler.set_stance("eager_on_recompile")`): an odd shape costs one slower step, never
    a compile stall. Evaluation, between steps, keeps the default stance: its no-grad graphs compile once."""
    import torch
    from transformers import TrainerCallback

    class NoRecompile(TrainerCallback):
        steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.steps:
                torch.compiler.set_stance("eager_on_recompile")

        def on_step_end(self, args, state, control, **kwargs):
            torch.compiler.set_stance("default")
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            torch.compiler.set_stance("default")

    return NoRecompile()


def freeze_gc_callback() -> TrainerCallback:
    """`training.freeze_gc`: at the end of the run's first optimizer step (model loaded, layers compiled), one full
    garbage collection, then `gc.freeze()`, so that Python's later full collections, which it starts by itself every
    so often, skip the millions of objects alive then instead of stopping the step for ~0.5 s to walk them all.
    `release()` (on_train_end, and after an error) gives them back to the collector."""
    import gc

    from transformers import TrainerCallback

    class FreezeGc(TrainerCallback):
        frozen = False

        def on_step_end(self, args, state, control, **kwargs):
            if not self.frozen:
                gc.collect()
                gc.freeze()
                self.frozen = True

        def on_train_end(self, args, state, control, **kwargs):
            self.release()

        def release(self) -> None:
            if self.frozen:
                gc.unfreeze()
                self.frozen = False

    return FreezeGc()


def trainer_columns(ds: Any, fmt: str) -> Any:
    """Only what SFTTrainer needs: token ids and the loss mask."""
    return ds.select_columns(["input_ids", datamod.mask_key(fmt)])


# ---------------------------------------------------------------------------------------------- progress


def _memory(device: Device) -> tuple[int, str]:
    """(peak bytes, label) of the process's memory: CUDA allocated, or CPU resident set size."""
    if device.is_cuda:
        import torch

        return torch.cuda.max_memory_allocated(), "GPU"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "RSS"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass
class StepClock:
    """Training wall time split three ways, one optimizer step at a time (the time between two step ends):

    - warm-up: the first step, and any step during which torch.compile compiled a graph;
    - evaluation and saving: a step interval in which an evaluation or a checkpoint save ran;
    - steady: every other step. Steady tokens/s = tokens of steady steps / their time: the rate the run
      settles at, which compile time does not dilute.

    The token count is read each micro-batch with `.item()` (TRL's non-padding count), which waits for the GPU,
    so step times on the host are GPU step times.
    """

    warmup_s: float = 0.0
    warmup_steps: int = 0
    other_s: float = 0.0
    steady_s: float = 0.0
    steady_steps: int = 0
    steady_tokens: int = 0
    compiles: int = 0

    def add(self, seconds: float, tokens: int, compiled: int, first: bool, eval_or_save: bool) -> str:
        """Account one step interval; returns its kind: warm-up, other or steady."""
        self.compiles += compiled
        if first or (compiled and not eval_or_save):
            self.warmup_s += seconds
            self.warmup_steps += 1
            return "warm-up"
        if eval_or_save:
            self.other_s += seconds
            return "other"
        self.steady_s += seconds
        self.steady_steps += 1
        self.steady_tokens += tokens
        return "steady"

    @property
    def tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_s if self.steady_s > 0 else None


def make_progress_callback(run: RunDir, device: Device, console: Console) -> TrainerCallback:
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """Rich progress bar with loss, learning rate, steady tokens/s and peak memory; logs go to metrics.jsonl."""

        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task = None
            self.start = time.perf_counter()
            self.clock = StepClock()
            self.window = (0, 0.0)  # steady tokens and seconds since the last log
            self.train_logs: list[dict] = []
            self.eval_logs: list[dict] = []
            self.compiled_layers = 0  # set by `train` once it knows

        def _mark(self, state) -> None:
            self.last = (time.perf_counter(), state.num_input_tokens_seen, _compiled_graphs_or_0())

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self._mark(state)  # tokens are not 0 when resuming
            self.first, self.eval_or_save = True, False
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(), console=console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, stats="")

        def on_step_end(self, args, state, control, **kwargs):
            (t0, tokens0, graphs0), now = self.last, time.perf_counter()
            tokens = state.num_input_tokens_seen - tokens0
            graphs = _compiled_graphs_or_0() - graphs0
            kind = self.clock.add(now - t0, tokens, graphs, self.first, self.eval_or_save)
            if self.first and self.compiled_layers and not graphs and state.is_world_process_zero:
                console.print(f"[yellow]warning:[/] the first step compiled no graph, so the {self.compiled_layers} "
                              "compiled decoder layers ran eagerly (torch.compile fell back; typically a library "
                              "version it cannot trace); set `training.compile_layers: false` to skip compiling")
            if kind == "steady":
                self.window = (self.window[0] + tokens, self.window[1] + now - t0)
            self.first = self.eval_or_save = False
            self._mark(state)
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step == 0 and self.first:  # eval_on_start: evaluation time, not the first step's
                self.clock.other_s += time.perf_counter() - self.last[0]
                self._mark(state)
                return
            self.eval_or_save = True

        def on_save(self, args, state, control, **kwargs):
            self.eval_or_save = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:  # rank 0 writes metrics.jsonl
                return
            logs = dict(logs or {})
            now = time.perf_counter()
            record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                                      "time_s": round(now - self.start, 3)}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            peak, _ = _memory(device)
            record["peak_memory_bytes"] = peak
            if "loss" in logs:
                tokens, seconds = self.window
                record["tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else None  # steady steps only
                record["warmup_s"] = round(self.clock.warmup_s, 2)
                self.window = (0, 0.0)
            append_jsonl(run.metrics, record)
            if "eval_loss" in logs:
                self.eval_logs.append(record)
                line = f"step {state.global_step:>5}  eval_loss {logs['eval_loss']:.4f}"
            elif "loss" in logs:
                self.train_logs.append(record)
                rate = record["tokens_per_s"]
                speed = f"{rate:,.0f} tok/s" if rate is not None else "warming up"
                if self.clock.warmup_s:
                    speed += f" (warm-up {self.clock.warmup_s:.0f} s, {self.clock.compiles} compiles)"
                line = (f"step {state.global_step:>5}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                        f"  {speed}  peak {fmt_bytes(peak)}")
                if self.progress is not None:
                    self.progress.update(self.task, stats=line.split("  ", 1)[1])
            else:
                return
            (self.progress.console if self.progress else console).print(line, highlight=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return RichProgress()


def _compiled_graphs_or_0() -> int:
    try:
        return compiled_graphs()
    except ImportError:
        return 0


# ---------------------------------------------------------------------------------------------- dry run


def print_data_summary(prepared: datamod.PreparedData, console: Console) -> None:
    table = Table(title=f"Data ({prepared.format})", title_justify="left")
    for col in ("split", "rows", "skipped", "truncated", "tokens", "loss tokens", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, stats in (("train", prepared.train_stats), ("eval", prepared.eval_stats)):
        if stats is None:
            continue
        pct = stats.percentiles()
        table.add_row(name, f"{stats.rows:,}", f"{stats.skipped:,}", f"{stats.truncated:,}", f"{stats.tokens:,}",
                      f"{stats.loss_tokens:,}", *(f"{pct.get(k, 0):,}" for k in ("p50", "p90", "p99", "max")))
    console.print(table)
    for note in prepared.notes:
        console.print(f"[yellow]note:[/] {note}")


def print_example(prepared: datamod.PreparedData, tokenizer: Any, console: Console) -> None:
    row = prepared.train[0]
    key = datamod.mask_key(prepared.format)
    text = Text()
    for segment, loss in datamod.loss_segments(tokenizer, row["input_ids"], row[key]):
        text.append(segment, style="bold green" if loss else "dim")
    console.print(f"First training example ({len(row['input_ids'])} tokens; [bold green]green[/] carries loss):")
    console.print(text)


def stand_in_tokenizer(rows: datamod.FormattedData, recipe: Recipe) -> Any:
    """A byte-level BPE tokenizer trained on the data itself, for dry runs when the real one is out of reach."""
    from ..model import load_config
    from ..tiny import bpe_tokenizer

    vocab = min(getattr(load_config(recipe.model), "vocab_size", 32000), 32000)
    return bpe_tokenizer(datamod.sample_texts(rows), vocab)


def dry_run(recipe: Recipe, console: Console) -> None:
    """Everything but the weights: the resolved recipe, parameter counts, data summary, first example."""
    from rich.syntax import Syntax

    console.print(Syntax(recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    model = meta_model(recipe)
    total, trainable = count_parameters(model)
    console.print(f"Parameters: {total:,} total, {trainable:,} trainable "
                  f"({100 * trainable / total:.3f} %) with LoRA r={recipe.lora.r}")
    rows = datamod.load_rows(recipe.data, recipe.training.seed)
    try:
        tokenizer = load_tokenizer(recipe.model)
    except UserError as e:
        tokenizer = stand_in_tokenizer(rows, recipe)
        console.print(f"[yellow]note:[/] {e.message}; token counts below come from a stand-in BPE tokenizer "
                      "trained on your data, so they are approximate.", highlight=False)
    prepared = datamod.tokenize_rows(rows, tokenizer, recipe.data.max_length)
    print_data_summary(prepared, console)
    print_example(prepared, tokenizer, console)
    try:
        from ..footprint import estimate_for_recipe, print_estimate
    except ImportError:  # the estimator is optional in this build
        return
    print_estimate(estimate_for_recipe(recipe, prepared), console)


# ---------------------------------------------------------------------------------------------- training


def prepare_run_dir(recipe: Recipe, overwrite: bool, resume: bool = False) -> RunDir:
    """Check that the run directory may be used (free, --overwrite, or --resume); writes nothing."""
    run = RunDir(recipe.output_dir)
    check_writable(run.path)
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other", where="qlora train",
                            fix="Pass --resume to continue the run, or --overwrite to start it again")
        return run
    if run.path.exists() and any(run.path.iterdir()) and not overwrite:
        found = complete_checkpoints(run)
        hint = (f"Pass --resume to continue it from {found[-1].name}, --overwrite to replace it"
                if found and not run.is_complete() else "Pass --overwrite to replace it")
        raise UserError(f"run directory {run.path} already exists", where="training.output_dir",
                        fix=f"{hint}, or set another training.output_dir")
    return run


def start_run_dir(run: RunDir, recipe: Recipe, overwrite: bool) -> None:
    """Create the run directory (an old one, with --overwrite, is renamed away in one step, then deleted)."""
    if overwrite and run.path.exists():
        old = run.path.with_name(f".{run.path.name}.old-{os.getpid()}")
        os.replace(run.path, old)
        shutil.rmtree(old, ignore_errors=True)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe, recipe.to_yaml())


def resume_run_dir(run: RunDir, recipe: Recipe, checkpoint: Path) -> None:
    """Make the run directory match `checkpoint`: leftovers of killed saves and metrics of later steps go."""
    remove_partials(run)
    truncate_metrics(run, checkpoint_global_step(checkpoint))
    if not run.recipe.is_file() or run.recipe.read_text(encoding="utf-8") != recipe.to_yaml():
        atomic_write_text(run.recipe, recipe.to_yaml())


def final_evaluation(trainer: Any) -> dict[str, float]:
    """The eval metrics of the trained adapter: those of an evaluation that already ran at the last step (the
    schedule often ends on one), else a new evaluation. With load_best_model_at_end the weights may have changed
    since, so it always evaluates."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def train(recipe: Recipe, console: Console, overwrite: bool = False,
          callbacks: list[TrainerCallback] | None = None, resume: bool | str | Path = False,
          force: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run the recipe; return the summary that is also written to the run directory.

    `resume`: True continues from the run's latest checkpoint, a path or `checkpoint-N` from that one; a recipe
    whose training fields changed is refused unless `force`. Every check runs, and the model is loaded, before
    anything is written. SIGINT/SIGTERM save a checkpoint at the next step and raise `Interrupted`; a NaN/inf
    loss stops before its step is saved. `command` is how the user started the run (for the resume hint).
    """
    import warnings

    import torch
    from transformers.trainer_callback import PrinterCallback

    command = command or f"qlora train {recipe.path or 'RECIPE'}"
    device = detect_device(recipe.training)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision = resolve_precision(recipe.training, device)
    for w in caught:
        console.print(f"[yellow]note:[/] {w.message}", highlight=False)
    check_remote_code(recipe.model.name_or_path, recipe.model.tokenizer, recipe.model.trust_remote_code)
    main = is_main_process()
    if not main:  # other ranks of a multi-GPU run: rank 0 reports and writes
        console = Console(quiet=True)
    run = prepare_run_dir(recipe, overwrite, resume=bool(resume)) if main else RunDir(recipe.output_dir)
    checkpoint = None
    if resume:
        checkpoint = find_checkpoint(run, None if resume is True else resume)
        for diff in check_resume_recipe(run, recipe, force):
            console.print(f"[yellow]warning:[/] resuming with a changed recipe (--force): {diff}", highlight=False)
    tokenizer = load_tokenizer(recipe.model)
    prepared = datamod.prepare(recipe.data, tokenizer, recipe.training.seed)
    print_data_summary(prepared, console)

    q = recipe.quantization
    weights = f"4-bit {q.bnb_4bit_quant_type}" if q.load_in_4bit else "16-bit"
    from ..footprint import warn_if_too_big  # the memory estimate, before any weight is read
    warn_if_too_big(recipe, device, console, prepared)
    console.print(f"Loading {recipe.model.name_or_path} ({weights}, {precision}) on {device.name}")
    t0 = time.perf_counter()
    model = load_model(recipe, device, precision)
    check_target_modules(model, recipe.lora)
    load_s = time.perf_counter() - t0
    need = checkpoint_bytes(lora_parameter_count(model, recipe.lora), recipe.lora.adapter_dtype,
                            recipe.training.optim)
    check_disk_space(run.path, 2 * need, "a checkpoint and the adapter")
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats()

    if main and checkpoint is not None:
        resume_run_dir(run, recipe, checkpoint)
        console.print(f"Resuming from {checkpoint} (step {checkpoint_global_step(checkpoint)})")
    elif main:
        start_run_dir(run, recipe, overwrite)
    args = build_sft_config(recipe, run, device, precision, prepared.eval is not None)
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # the run directory is ready before any rank writes to it
    if checkpoint is not None:
        args.eval_on_start = False  # evaluated when the run started
    progress = make_progress_callback(run, device, console)
    stop_signal, stop_nan = StopOnSignal(), StopOnNonFinite()
    freeze_gc = freeze_gc_callback() if recipe.training.freeze_gc else None
    trainer = atomic_checkpoint_trainer()(
        model=model,
        args=args,
        train_dataset=trainer_columns(prepared.train, prepared.format),
        eval_dataset=trainer_columns(prepared.eval, prepared.format) if prepared.eval is not None else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
        callbacks=[progress, stop_signal.callback, stop_nan.callback, no_recompile_callback(),
                   *([freeze_gc] if freeze_gc else []), *(callbacks or [])],
    )
    trainer.checkpoint_estimate, trainer.adapter_dtype = need, recipe.lora.adapter_dtype
    trainer.remove_callback(PrinterCallback)  # our progress callback reports the logs
    compiled = progress.compiled_layers = finish_trainer_model(trainer.model, recipe, device)
    total, trainable = count_parameters(trainer.model)
    console.print(f"LoRA r={recipe.lora.r}: {trainable:,} trainable parameters; "
                  f"global batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps}"
                  f" x {args.world_size} sequences of up to {recipe.data.max_length} tokens")
    if compiled:
        console.print(f"Compiling {compiled} decoder layers with torch.compile (training.compile_layers); the first "
                      "steps are slower while it compiles")
    fused = sum(isinstance(m, FusedDropoutLinear) for m in trainer.model.modules())
    if fused:
        console.print(f"LoRA dropout inside the A projection of {fused} LoRA layers (training.fused_lora_dropout)")
    elif recipe.training.fused_lora_dropout is True:
        console.print("[yellow]training.fused_lora_dropout is on but no LoRA layer qualifies (it needs "
                      "lora.lora_dropout > 0, plain LoRA, and on CUDA bfloat16 adapters); training with peft's "
                      "dropout[/yellow]")
    kept = sum(hasattr(m, "qlora_memo_slot") for m in trainer.model.modules())
    if kept:
        console.print(f"The recompute reads back the outputs of {kept} LoRA A projections kept from forward "
                      "(training.keep_lora_a_outputs)")
    folds = sum(folded(m) for m in trainer.model.modules())
    if folds:
        console.print(f"LoRA's B product inside the frozen product of {folds} projections (training.fold_lora_b)")
    elif recipe.training.fold_lora_b:
        console.print("[yellow]training.fold_lora_b is on but no LoRA layer qualifies (it needs compiled layers with "
                      "NF4 in the graph, plain LoRA, adapters in the compute dtype and projections with at least as "
                      "many outputs as inputs); training with peft's forward[/yellow]")
    t1 = time.perf_counter()
    stats = prepared.train_stats
    labelled = stats.loss_tokens / max(1, sum(min(n, recipe.data.max_length) for n in stats.lengths))
    head = gradient_in_forward(recipe.training.lm_head_grad_in_forward, labelled >= EVERY_POSITION_SHARE)
    with stop_signal, head, packed_masks_without_readback():
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        except Exception as e:
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise UserError(f"torch.compile failed on the decoder layers ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:300]})", where="training.compile_layers",
                                fix="Set `training.compile_layers: false` to train with eager layers") from e
            raise
        finally:
            torch.compiler.set_stance("default")  # an error skipped on_step_end
            if freeze_gc is not None:  # and on_train_end
                freeze_gc.release()
            if progress.progress is not None:  # an error skipped on_train_end: stop the live display
                progress.progress.stop()
    train_s = time.perf_counter() - t1
    if stop_nan.step is not None:
        raise non_finite_error(stop_nan, run, recipe)
    if stop_signal.signum is not None:
        step = trainer.state.global_step
        raise Interrupted(stop_signal.signum,
                          f"training stopped by {stop_signal.name} at step {step} of {trainer.state.max_steps}; "
                          f"checkpoint saved in {run.checkpoints / f'checkpoint-{step}'}",
                          where=str(run.path), fix=f"Resume with: {command} --resume")
    final_eval = final_evaluation(trainer) if prepared.eval is not None else {}
    if final_eval:
        console.print(f"final eval_loss {final_eval['eval_loss']:.4f}")
    if uses_fsdp(recipe):  # gather the sharded adapter into one state dict before saving
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if not main:
        return {"steps": trainer.state.global_step, "rank": int(os.environ.get("RANK", "0"))}

    check_disk_space(run.path, need, "the adapter")
    with disk_errors("the adapter", run.adapter), atomic_dir(run.adapter, overwrite=True) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    peak, label = _memory(device)
    clock = progress.clock
    tokens = trainer.state.num_input_tokens_seen
    session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)  # a resumed run counts on
    summary: dict[str, Any] = {
        "recipe": str(recipe.path) if recipe.path else None,
        "model": recipe.model.name_or_path,
        "device": device.name,
        "precision": precision,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        "train_time_s": round(train_s, 2),  # all of it: warm-up, steady steps, evaluation and saving
        "load_time_s": round(load_s, 2),
        "tokens": tokens,
        "tokens_per_s": round(session_tokens / train_s, 1) if train_s > 0 else None,  # over train_time_s
        "steady_tokens_per_s": round(clock.tokens_per_s, 1) if clock.tokens_per_s else None,
        "steady_steps": clock.steady_steps,
        "warmup_s": round(clock.warmup_s, 2),
        "warmup_steps": clock.warmup_steps,
        "eval_save_s": round(clock.other_s, 2),
        "compiles": clock.compiles,
        f"peak_{label.lower()}_bytes": peak,
        "trainable_parameters": trainable,
        "world_size": args.world_size,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "train_loss": round(result.training_loss, 6),
        "final_train_loss": progress.train_logs[-1]["loss"] if progress.train_logs else None,
        "first_eval_loss": progress.eval_logs[0]["eval_loss"] if progress.eval_logs else None,
        "first_eval_step": progress.eval_logs[0]["step"] if progress.eval_logs else None,
        "final_eval_loss": final_eval.get("eval_loss"),
    }
    if checkpoint is not None:
        summary["resumed_from"] = str(checkpoint)
    if device.is_cuda:
        summary["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    uncompile_layers(trainer.model)  # generation below, and the caller, get eager layers
    if recipe.evaluation.compare_after_training and prepared.eval is not None and prepared.format != "text":
        summary["comparison"] = compare_base_and_adapter(recipe, prepared, trainer.model, tokenizer, console)
    with disk_errors("the run summary", run.summary):
        atomic_write_json(run.summary, summary)
    from ..plot import save_loss_plot  # loss.png in the run directory: train and eval loss by step
    save_loss_plot(run)
    print_summary(summary, run, console)
    return summary


def launch(n: int, cli_args: list[str]) -> int:
    """Run `qlora <cli_args>` in n processes, one per GPU, under accelerate's launcher; return its exit code.

    The arguments go to the processes as a list (no shell). Each process trains on its GPU; rank 0 reports,
    logs and writes the run directory.
    """
    import subprocess
    import sys

    import torch

    visible = torch.cuda.device_count()
    if visible < n:
        raise UserError(f"--gpus {n} asks for more GPUs than the {visible} visible", where="--gpus",
                        fix=f"Use --gpus {visible}" if visible > 1 else "Run on a machine with several GPUs")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "qlora_cli.cli", *cli_args]
    return subprocess.run(cmd).returncode


def non_finite_error(stop: StopOnNonFinite, run: RunDir, recipe: Recipe) -> UserError:
    """The step where training went NaN/inf, the last good checkpoint, and what to change."""
    good = [p for p in complete_checkpoints(run) if checkpoint_global_step(p) < (stop.step or 0)]
    then = (f"then continue from the last good checkpoint, {good[-1]}, with --resume --force" if good
            else "then start again with --overwrite (no checkpoint was saved before it)")
    return UserError(
        f"{stop.what} became NaN or infinite at step {stop.step}: training stopped, and that step was not saved",
        where=f"{run.path} step {stop.step}",
        fix=f"Lower training.learning_rate (now {recipe.training.learning_rate:g}) or training.max_grad_norm, or "
        f"use training.precision: fp32; {then}",
    )


def compare_base_and_adapter(recipe: Recipe, prepared: datamod.PreparedData, model: Any, tokenizer: Any,
                             console: Console) -> dict[str, Any]:
    """Greedy answers to held-out prompts with the adapter off and on, scored by exact match."""
    from ..scoring import generate, normalize, score

    cfg = recipe.evaluation
    rows = prepared.eval.select(range(min(cfg.compare_after_training, len(prepared.eval))))
    pairs = [datamod.prompt_for_generation(prepared.format, r, tokenizer) for r in rows]
    prompts = [p for p, _ in pairs]
    refs = [normalize(a, cfg) for _, a in pairs]
    special = prepared.format != "chat"
    model.eval()
    with model.disable_adapter():
        base = [normalize(a, cfg) for a in generate(model, tokenizer, prompts, cfg, special)]
    tuned = [normalize(a, cfg) for a in generate(model, tokenizer, prompts, cfg, special)]
    base_scores, tuned_scores = score(base, refs), score(tuned, refs)
    table = Table(title=f"Held-out prompts: base vs adapter ({len(refs)} eval rows, exact match)",
                  title_justify="left")
    table.add_column("prompt")
    table.add_column("expected")
    table.add_column("base model")
    table.add_column("with adapter")
    for i in range(min(5, len(refs))):
        table.add_row(shown_prompt(prompts[i], recipe.data.prompt_template), refs[i], base[i][:30],
                      Text(tuned[i][:30], style="green" if tuned[i] == refs[i] else "red"))
    console.print(table)
    console.print(f"accuracy: base {base_scores.accuracy:.1%}  ->  adapter {tuned_scores.accuracy:.1%}   "
                  f"(macro-F1 {base_scores.macro_f1:.3f} -> {tuned_scores.macro_f1:.3f})")
    return {"n": len(refs), "base_accuracy": base_scores.accuracy, "adapter_accuracy": tuned_scores.accuracy,
            "base_macro_f1": base_scores.macro_f1, "adapter_macro_f1": tuned_scores.macro_f1}


def shown_prompt(prompt: str, template: str | None, width: int = 60) -> str:
    """The user's text of a formatted prompt (the recipe's prompt_template around it removed), on one line."""
    if template and template.count("{prompt}") == 1:
        before, after = template.split("{prompt}")
        if prompt.startswith(before) and prompt.endswith(after):
            prompt = prompt[len(before):len(prompt) - len(after)]
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= width else "…" + prompt[-(width - 1):]


def print_summary(summary: dict[str, Any], run: RunDir, console: Console) -> None:
    table = Table(title=f"Run summary: {run.path}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    peak = summary.get("peak_gpu_bytes") or summary.get("peak_rss_bytes")
    steady = summary.get("steady_tokens_per_s")
    warmup = f"{summary.get('warmup_s', 0):.1f} s in {summary.get('warmup_steps', 0)} step(s)"
    if summary.get("compiles"):
        warmup += f", {summary['compiles']} compiled graphs"
    rows = [
        ("steps", f"{summary['steps']:,}"),
        ("train time (all)", f"{summary['train_time_s']:.1f} s"),
        ("tokens/s, steady", f"{steady:,.0f} ({summary['steady_steps']} steps)" if steady else "-"),
        ("warm-up (first step, compiling)", warmup),
        ("tokens/s over the train time", f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-"),
        ("peak GPU memory (allocated)" if "peak_gpu_bytes" in summary else "peak process RSS", fmt_bytes(peak)),
        ("final train loss", _num(summary["final_train_loss"])),
        eval_loss_row(summary),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    console.print(f"Adapter: {run.adapter}   next: qlora eval {run.path}   |   qlora merge {run.path} --out DIR")


def eval_loss_row(summary: dict[str, Any]) -> tuple[str, str]:
    """`eval loss (start -> end)` only when an evaluation ran before the first step; otherwise it names the step
    of the first evaluation."""
    first, end, step = summary.get("first_eval_loss"), summary.get("final_eval_loss"), summary.get("first_eval_step")
    if first is None:
        return "eval loss (end)", _num(end)
    label = "eval loss (start -> end)" if step == 0 else f"eval loss (first at step {step} -> end)"
    return label, f"{_num(first)} -> {_num(end)}"


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

