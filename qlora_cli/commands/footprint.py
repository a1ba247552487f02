"""`qlora footprint`: will the run fit the GPU? The estimate by component, verdicts, fixes, and a measurement.

Without `--measure` nothing is loaded but the model's config: the estimate assumes every sequence is
`data.max_length` tokens long. With `--measure` (CUDA only) the recipe's heaviest micro-batches run through
the real training code for a few steps and the measured memory is printed next to the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import UserError
from ..footprint import (
    COMMON_GPUS,
    Estimate,
    Gpu,
    estimate_for_recipe,
    estimate_table,
    find_gpu,
    gib,
    max_micro_batch,
    parse_vram,
    suggestions,
    verdict_table,
)
from ..recipe import Recipe


def footprint(recipe: Recipe, console: Console, gpus: list[str] | None = None, vram: str | None = None,
              max_batch: bool = False, as_json: bool = False, measure: bool = False, steps: int = 2,
              processes: int = 1) -> dict:
    """Print (or return as JSON) the estimate, the verdicts, fixes when it does not fit, and a measurement."""
    targets = [find_gpu(g) for g in gpus or []] + ([parse_vram(vram)] if vram else [])
    measured = None
    if measure:
        measured, est = measure_recipe(recipe, console, steps)
    else:
        est = estimate_for_recipe(recipe, processes=processes)
    shown = targets or [find_gpu(g) for g in COMMON_GPUS]
    target = min(targets, key=lambda g: g.bytes) if targets else None
    fixes = suggestions(est.arch, est.settings, target.bytes) if target and est.total > target.bytes else []

    report: dict[str, Any] = {
        "estimate": est.to_dict(),
        "verdicts": [{"gpu": g.name, "bytes": g.bytes, "verdict": est.verdict(g),
                      **({"max_micro_batch": max_micro_batch(est.arch, est.settings, g.bytes)} if max_batch else {})}
                     for g in shown],
        "suggestions": [dataclasses.asdict(x) | {"for_gpu": target.name} for x in fixes] if target else [],
    }
    if measured is not None:
        report["measurement"] = measured.to_dict()
        report["comparison"] = comparison(est, measured)
    if as_json:
        console.out(json.dumps(report, indent=2), highlight=False)
        return report

    console.print(estimate_table(est))
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(verdict_table(est, shown, max_batch=max_batch))
    if fixes:
        print_suggestions(fixes, target, console)
    elif not targets:
        too_small = [g.name for g in shown if est.verdict(g) in ("no", "pages")]
        if too_small:
            console.print(f"Does not fit on {', '.join(too_small)}: add --gpu NAME (or --vram 24GB) for ranked "
                          "changes that would make it fit.")
    if measured is not None:
        print_comparison(est, measured, console)
    return report


def print_suggestions(fixes: list[Any], target: Gpu, console: Console) -> None:
    table = Table(title=f"To fit {target.name} ({gib(target.bytes)} GiB)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("change")
    table.add_column("total GiB", justify="right")
    table.add_column("fits")
    table.add_column("costs")
    table.add_column("recipe overrides", overflow="fold")
    for i, fix in enumerate(fixes, 1):
        table.add_row(str(i), escape(fix.change), gib(fix.total), "[green]yes[/]" if fix.fits else "[red]no[/]",
                      fix.cost, escape(" ".join(f"--set {o}" for o in fix.overrides)))
    console.print(table)


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Memory measured during a few real training steps (bytes; PyTorch's allocator unless noted)."""

    device: str
    total_memory: int
    micro_batches: int
    tokens_per_micro_batch: int
    used_before_load: int  # by the CUDA context (and any other process), from cudaMemGetInfo
    after_load: int
    after_lora: int
    forward_activations: int  # allocated after the forward pass minus before it, largest micro-batch
    peak_allocated: int
    peak_reserved: int
    outside_torch_after: int  # GPU memory used outside the allocator at the end, minus used_before_load
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what an `inspect` callback found

    @property
    def outside_torch(self) -> int:
        return self.used_before_load + self.outside_torch_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"outside_torch": self.outside_torch}


def measurement_recipe(recipe: Recipe, output_dir: Path, steps: int) -> Recipe:
    """The recipe for a measurement: `steps` optimizer steps of at most 2 micro-batches, no eval, no saving."""
    t = recipe.training
    sft_args = {k: v for k, v in t.sft_args.items() if not k.startswith("eval")}
    training = dataclasses.replace(
        t, max_steps=steps, gradient_accumulation_steps=min(t.gradient_accumulation_steps, 2),
        logging_steps=10**6, save_steps=10**6, eval_steps=None, output_dir=str(output_dir), sft_args=sft_args)
    data = dataclasses.replace(recipe.data, eval_source=None, eval_split=None, eval_fraction=0.0)
    return dataclasses.replace(recipe, training=training, data=data, evaluation=recipe.evaluation)


def heaviest(prepared: Any, rows: int) -> Any:
    """Keep the `rows` longest training examples: the micro-batches that set the peak."""
    from ..data import SplitStats

    lengths = prepared.train_stats.lengths
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:rows]
    stats = SplitStats(rows=len(order), lengths=[lengths[i] for i in order])
    return dataclasses.replace(prepared, train=prepared.train.select(sorted(order)), train_stats=stats)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return out


def measure_recipe(recipe: Recipe, console: Console, steps: int = 2, require_cuda: bool = True,
                   inspect: Callable[[Any], dict] | None = None) -> tuple[Measurement, Estimate]:
    """Run `steps` training steps of the recipe's heaviest micro-batches and measure memory at each phase.

    The same code as `qlora train` (load_model, SFTTrainer, adapters cast to the recipe's dtype, layers compiled
    where the recipe says so); the estimate returned is for exactly what ran. `require_cuda=False` runs on the CPU
    (memory figures 0), for tests of the validation script. `inspect(trainer)`, called after the measurement, may
    add diagnostics.
    """
    import torch

    from .. import data as datamod
    from ..model import detect_device, load_model, load_tokenizer, lora_config, resolve_precision
    from ..run_dir import RunDir
    from .train import build_sft_config, finish_trainer_model, trainer_columns

    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        raise UserError("real training steps need a CUDA GPU, and none is visible", where="--measure",
                        fix="Run it on the machine you will train on, or leave out --measure for the estimate alone")
    from trl import SFTTrainer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-measure-") as tmp:
        recipe = measurement_recipe(recipe, Path(tmp) / "run", steps)
        device = detect_device(recipe.training)
        precision = resolve_precision(recipe.training, device)
        tokenizer = load_tokenizer(recipe.model)
        prepared = datamod.prepare(recipe.data, tokenizer, recipe.training.seed)
        t = recipe.training
        prepared = heaviest(prepared, t.per_device_train_batch_size * t.gradient_accumulation_steps * steps)
        est = estimate_for_recipe(recipe, prepared)

        def allocated() -> int:
            return torch.cuda.memory_allocated() if device.is_cuda else 0

        used_before = 0
        if device.is_cuda:
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            used_before = total - free
        console.print(f"Measuring {recipe.model.name_or_path} on {device.name}: {steps} steps of "
                      f"{t.gradient_accumulation_steps} micro-batch(es) of {t.per_device_train_batch_size}")
        model = load_model(recipe, device, precision)
        after_load = allocated()
        forward: list[int] = []
        tokens: list[int] = []

        class ProbeTrainer(SFTTrainer):
            """SFTTrainer that notes the memory the forward pass leaves for backward."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                before = allocated()
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
                if model.training:
                    forward.append(allocated() - before)
                    tokens.append(int(inputs["input_ids"].numel()))
                return result

        run = RunDir(Path(recipe.training.output_dir))
        run.path.mkdir(parents=True, exist_ok=True)
        trainer = ProbeTrainer(
            model=model,
            args=build_sft_config(recipe, run, device, precision, has_eval=False),
            train_dataset=trainer_columns(prepared.train, prepared.format),
            processing_class=tokenizer,
            peft_config=lora_config(recipe.lora),
        )
        finish_trainer_model(trainer.model, recipe, device)
        after_lora = allocated()
        trainer.train()
        outside_after = peak_allocated = peak_reserved = 0
        if device.is_cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            outside_after = total - free - torch.cuda.memory_reserved() - used_before
            peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        measured = Measurement(
            device=device.name, total_memory=device.total_memory or 0, micro_batches=len(forward),
            tokens_per_micro_batch=max(tokens, default=0), used_before_load=used_before, after_load=after_load,
            after_lora=after_lora, forward_activations=max(forward, default=0), peak_allocated=peak_allocated,
            peak_reserved=peak_reserved, outside_torch_after=outside_after,
            seconds=round(time.perf_counter() - start, 1), versions=library_versions(),
        )
        if inspect is not None:
            measured.extra = inspect(trainer)
    return measured, est


def predicted_phases(est: Estimate) -> dict[str, int]:
    """The estimate's figures for the moments a measurement sees."""
    size = {t.key: t.bytes for t in est.terms}
    s, h = est.settings, est.arch.hidden
    weights = size.get("base_4bit", 0) + size["base_16bit"]
    forward = size["activations"] + s.tokens * (4 * h + 4 + s.act_bytes * h)  # + final norm input, hidden copy
    if not s.gradient_checkpointing:
        forward += size.get("lora_cast", 0)
    return {
        "after_load": weights,
        "after_lora": weights + size["lora"],
        "forward_activations": forward,
        "peak_allocated": est.allocated,
        "peak_reserved": est.reserved,
        "outside_torch": size["context"] + est.paged,
        "total": est.total,
    }


def comparison(est: Estimate, m: Measurement) -> dict[str, dict[str, float]]:
    measured = {
        "after_load": m.after_load, "after_lora": m.after_lora, "forward_activations": m.forward_activations,
        "peak_allocated": m.peak_allocated, "peak_reserved": m.peak_reserved, "outside_torch": m.outside_torch,
        "total": m.peak_reserved + m.outside_torch,
    }
    out = {}
    for key, predicted in predicted_phases(est).items():
        got = measured[key]
        out[key] = {"predicted": predicted, "measured": got,
                    "error_pct": round(100 * (predicted - got) / got, 1) if got else None}
    return out


LABELS = {
    "after_load": "after loading the base model",
    "after_lora": "after attaching LoRA",
    "forward_activations": "kept by the forward pass",
    "peak_allocated": "peak allocated (max_memory_allocated)",
    "peak_reserved": "peak reserved (max_memory_reserved)",
    "outside_torch": "outside PyTorch (context, paged optimizer)",
    "total": "total on the GPU",
}


def print_comparison(est: Estimate, m: Measurement, console: Console) -> None:
    table = Table(title=f"Measured on {m.device}: {m.micro_batches} micro-batches of {m.tokens_per_micro_batch:,} "
                  f"tokens ({m.seconds:.0f} s)", title_justify="left")
    for col in ("moment", "predicted GiB", "measured GiB", "error"):
        table.add_column(col, justify="left" if col == "moment" else "right")
    for key, row in comparison(est, m).items():
        error = "-" if row["error_pct"] is None else f"{row['error_pct']:+.1f} %"
        table.add_row(LABELS[key], gib(row["predicted"]), gib(row["measured"]), error)
    console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in m.versions.items()), style="dim")
