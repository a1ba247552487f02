"""What keeps a long run safe on a machine that may go away: resume, interruption, NaN stop, atomic checkpoints.

- **resume**: :func:`find_checkpoint` picks the run's latest complete checkpoint (or a given one) and
  :func:`recipe_differences` lists the training-relevant keys that changed since the run started; transformers'
  ``Trainer.train(resume_from_checkpoint=...)`` restores adapter weights, optimizer (8-bit paged included),
  scheduler, RNG states and the data position.
- **interruption**: :class:`StopOnSignal` turns SIGINT/SIGTERM into "save a checkpoint at the end of this step and
  stop"; ``qlora train`` then prints the resume command and exits 130 (SIGINT) or 143 (SIGTERM).
- **NaN/inf**: :class:`StopOnNonFinite` stops at the first step whose loss, gradient norm or adapter weights are
  not finite, before that step is saved, so the checkpoints on disk are all from good steps.
- **atomic checkpoints**: :func:`atomic_checkpoint_trainer` is SFTTrainer with checkpoints written to a hidden
  directory and renamed into place; a kill at any moment leaves only complete ``checkpoint-N`` directories.
- **disk**: :func:`check_disk_space` before large writes, :func:`disk_errors` turns "disk full" into one UserError.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UserError
from .run_dir import RunDir, publish_dir

if TYPE_CHECKING:
    import torch

    from .recipe import LoraSection, Recipe

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What transformers needs to resume exactly (rng_state.pth is optional for it, but not for equal losses).
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth")
STAGING_PREFIX = ".partial-"

# Recipe keys that do not change what is trained: a resumed run may change them freely.
RESUME_FREE_KEYS = {
    "training.output_dir", "training.logging_steps", "training.save_steps", "training.save_total_limit",
    "training.eval_steps", "training.per_device_eval_batch_size", "training.allow_cpu",
    "training.use_liger_kernel", "data.eval_source", "data.eval_split",
}
RESUME_FREE_SECTIONS = {"evaluation"}
# Keys that shape the checkpoint's tensors: a resumed run cannot change them, not even with --force.
RESUME_FIXED_KEYS = {
    "model.name_or_path", "model.revision", "lora.r", "lora.target_modules", "lora.use_dora", "lora.bias",
    "lora.modules_to_save", "lora.adapter_dtype", "training.optim",
}
# Keys that --force may change but that the restored optimizer state overrides (the learning rate is applied).
RESUME_KEPT_KEYS = {"training.weight_decay", "training.sft_args.adam_beta1", "training.sft_args.adam_beta2",
                    "training.sft_args.adam_epsilon", "training.sft_args.optim_args"}
RESUME_FREE_SFT_ARGS = re.compile(
    r"^(logging_.*|save_.*|eval_.*|report_to|run_name|push_to_hub|hub_.*|disable_tqdm|log_.*|include_.*"
    r"|dataloader_num_workers|dataloader_pin_memory|dataloader_prefetch_factor|dataloader_persistent_workers)$"
)


class Interrupted(UserError):
    """Training stopped on a signal after saving a checkpoint; exit code 128 + the signal number."""

    def __init__(self, signum: int, message: str, *, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, where=where, fix=fix)
        self.exit_code = 128 + signum


# ------------------------------------------------------------------------------------------------- resume


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_global_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its name)."""
    import json

    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return checkpoint_step(Path(path)) or 0


def missing_checkpoint_files(path: Path) -> list[str]:
    def present(name: str) -> bool:  # a multi-GPU run writes rng_state_<rank>.pth
        return (path / name).is_file() or (name == "rng_state.pth" and any(path.glob("rng_state_*.pth")))

    return [name for name in CHECKPOINT_FILES if not present(name)]


def complete_checkpoints(run: RunDir) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    if not run.checkpoints.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run.checkpoints.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if not missing_checkpoint_files(p)]


def find_checkpoint(run: RunDir, given: str | Path | None = None) -> Path:
    """The checkpoint to resume from: `given` (a path, or a checkpoint name in the run), else the latest one."""
    available = complete_checkpoints(run)
    names = ", ".join(p.name for p in available) or "none"
    if given is not None:
        path = Path(given)
        if not path.exists() and (run.checkpoints / str(given)).exists():
            path = run.checkpoints / str(given)
        if not path.is_dir():
            raise UserError(f"checkpoint {str(given)!r} does not exist", where="--resume-from",
                            fix=f"Give a checkpoint directory; complete checkpoints in {run.checkpoints}: {names}")
        missing = missing_checkpoint_files(path)
        if missing:
            raise UserError(f"{path} is not a complete checkpoint (no {', '.join(missing)})", where="--resume-from",
                            fix=f"Give a checkpoint-N directory written by qlora train; complete ones: {names}")
        return path
    if not run.path.is_dir():
        raise UserError(f"there is no run to resume in {run.path}", where="training.output_dir",
                        fix="Start it without --resume, or set training.output_dir to the run's directory")
    if not available:
        raise UserError(f"{run.path} has no complete checkpoint to resume from", where="training.output_dir",
                        fix="Checkpoints are written every training.save_steps steps and on Ctrl-C; "
                        "start the run again with --overwrite")
    return available[-1]


def _flatten(recipe: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for section, values in recipe.items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            if key == "sft_args" and isinstance(value, dict):
                for arg, v in value.items():
                    flat[f"{section}.sft_args.{arg}"] = v
            else:
                flat[f"{section}.{key}"] = value
    return flat


def _training_relevant(key: str) -> bool:
    if key in RESUME_FREE_KEYS or key.split(".", 1)[0] in RESUME_FREE_SECTIONS:
        return False
    if key.startswith("training.sft_args."):
        return not RESUME_FREE_SFT_ARGS.match(key.rsplit(".", 1)[1])
    return True


def saved_recipe(run: RunDir) -> dict[str, Any]:
    """The resolved recipe a run started with, defaults filled in as this version defines them."""
    from .recipe import recipe_from_dict

    try:
        raw = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the run's recipe ({e})", where=str(run.recipe),
                        fix="Restore recipe.yaml in the run directory, or start again with --overwrite") from None
    try:
        return recipe_from_dict(raw).to_dict()
    except UserError:  # written by another version of qlora: compare what is there
        return raw


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every training-relevant key whose value changed."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in [*a, *(k for k in b if k not in a)]:
        if not _training_relevant(key):
            continue
        before, after = a.get(key, "(unset)"), b.get(key, "(unset)")
        if before != after:
            diffs.append(f"{key}: {before!r} -> {after!r}")
    return diffs


def check_resume_recipe(run: RunDir, recipe: Recipe, force: bool) -> list[str]:
    """The differences between the run's recipe and `recipe`; refused unless `force` (some even then)."""
    diffs = recipe_differences(saved_recipe(run), recipe.to_dict())
    fixed = [d for d in diffs if d.split(":", 1)[0] in RESUME_FIXED_KEYS]
    if fixed:
        raise UserError(
            f"{'; '.join(fixed)}: cannot change when resuming {run.path}, because the checkpoint's adapter and "
            "optimizer state have the old shapes",
            where=str(recipe.path or "recipe"),
            fix=f"Resume with the run's own values ({run.recipe}), or start a new run (another "
            "training.output_dir, or --overwrite)",
        )
    diffs = [f"{d} (not applied: the optimizer state keeps the checkpoint's value)"
             if d.split(":", 1)[0] in RESUME_KEPT_KEYS else d for d in diffs]
    if diffs and not force:
        raise UserError(
            f"the recipe differs from the one {run.path} was trained with in {len(diffs)} training "
            f"field(s): {'; '.join(diffs)}",
            where=str(recipe.path or "recipe"),
            fix=f"Resume with the run's own settings ({run.recipe}), or pass --force to continue with the new values",
        )
    return diffs


def truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metrics logged after `step` (a run killed between checkpoints logged steps that will be redone)."""
    import json

    from .run_dir import atomic_write_text

    if not run.metrics.is_file():
        return
    kept = []
    for line in run.metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(run.metrics, "".join(f"{line}\n" for line in kept))


def remove_partials(run: RunDir) -> None:
    """Hidden temporary directories that a killed save left behind."""
    for parent in (run.path, run.checkpoints):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------------------------------- disk space


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def check_disk_space(path: Path, need: int, what: str, where: str = "training.output_dir") -> None:
    """Fail before writing when the filesystem of `path` has less than `need` bytes free."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"{what} needs about {_fmt(need)} of disk, but {probe} has {_fmt(free)} free",
                        where=where, fix="Free some space, or set training.output_dir on a larger disk")


def lora_parameter_count(model: torch.nn.Module, lora: LoraSection) -> int:
    """Trainable parameters LoRA will add to `model` (r x (in + out) per adapted linear layer), for disk estimates."""
    import torch

    targets = None if lora.target_modules == "all-linear" else (
        {lora.target_modules} if isinstance(lora.target_modules, str) else set(lora.target_modules))
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if targets is None or name.rsplit(".", 1)[-1] in targets:
            total += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
    for name in lora.modules_to_save or []:
        for mod_name, module in model.named_modules():
            if mod_name.rsplit(".", 1)[-1] == name:
                total += sum(p.numel() for p in module.parameters())
    return total


def checkpoint_bytes(trainable: int, adapter_dtype: str, optim: str) -> int:
    """Disk for one checkpoint: adapter weights, optimizer state (2 bytes/param in 8 bits, else 8), small files."""
    weight = 2 if adapter_dtype == "bfloat16" else 4
    state = 2 if "8bit" in optim else 8
    return int(trainable * (weight + state) * 1.1) + 64 * 2**20


@contextlib.contextmanager
def disk_errors(what: str, path: Path | str) -> Iterator[None]:
    """Turn "no space left" (and quota, read-only) errors while writing `what` into one UserError."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the filesystem is read-only"}[e.errno]
        raise UserError(f"{reason}: writing {what} failed, and nothing of it was kept", where=str(path),
                        fix="Free some space (earlier checkpoints and outputs are intact), then resume with "
                        "--resume") from None


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk, so that a rename after it never publishes unwritten data."""
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


# ------------------------------------------------------------------------------------------ the trainer


def without_per_parameter_sync(optimizer_cls: type) -> type:
    """bitsandbytes' optimizers (0.50) wait for the GPU after every parameter's update (`sync_gpu(p)` in
    `Optimizer8bit.step`): 448 waits a step for a 7B model's adapter, the GPU idle between updates, and the first
    wait holds the CPU until the backward pass is done. Their kernels run in order on the CUDA default stream, so
    while torch computes on that stream the waits change nothing. This subclass leaves them out, and waits as
    bitsandbytes does on any other stream or device.

    Paged optimizers keep their larger states (>= 100k elements: an r=16 adapter's MLP matrices) in CUDA managed
    memory, which the driver may move to host memory when the GPU runs out. bitsandbytes asks the driver to bring
    each of them back before its update (`cudaMemPrefetchAsync`, 192 calls a step for a 7B adapter, each queued on
    the GPU) and then waits for the whole step. This subclass skips both: a kernel that touches an evicted page
    faults it back by itself (the prefetch is only a hint), torch reaches these tensors only through CUDA work
    queued in order, and a resident state (the usual case: an adapter's states are tens of MB) needs no move at
    all. Same kernels, same order, same weights bit for bit (tests/test_train.py checks it on the CPU, where
    nothing is paged; scripts/bench_optimizer.py checks it on a GPU).

    AdamW with 8-bit states updates a whole parameter group with one blockwise call where its tensors allow it
    (qlora_cli/flat_update.py: one call instead of 448 for a 7-8B adapter, the same weights and states bit for bit).
    Other optimizer classes are returned as they are."""
    import torch
    from bitsandbytes.optim.optimizer import Optimizer8bit
    from bitsandbytes.utils import sync_gpu

    from .flat_update import flat_update

    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer8bit)):
        return optimizer_cls

    def on_default_streams(params: list[torch.Tensor]) -> bool:
        devices = {p.device for p in params}
        return all(d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d)
                   for d in devices)

    @torch.no_grad()
    def step(self, closure=None):  # bitsandbytes' step without the prefetches and with the waits made conditional
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        wait_each = not on_default_streams([p for p in params if p.device.type != "cpu"])
        for gindex, group in enumerate(self.param_groups):
            done = [] if wait_each else flat_update(self, gindex, group, group["params"])
            done_ids = {id(p) for p in done}  # updated together, with one blockwise call (qlora_cli/flat_update.py)
            for pindex, p in enumerate(group["params"]):
                if p.grad is None or id(p) in done_ids:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
                if wait_each:
                    sync_gpu(p)
        return loss

    # transformers recognises bitsandbytes optimizers by "bitsandbytes" in str(class) (trained embeddings then keep
    # 32-bit state), hence the name
    name = f"bitsandbytes_{optimizer_cls.__name__}_without_per_parameter_sync"
    return type(name, (optimizer_cls,), {"step": step, "__doc__": without_per_parameter_sync.__doc__})


def step_reports(args: Any, state: Any, control: Any = None) -> bool:
    """Whether this step's end logs, saves, evaluates or ends training (transformers' `DefaultFlowCallback` steps,
    or a callback that already asked for it): what is read back from the GPU must be current then."""
    if control is not None and (control.should_log or control.should_save or control.should_evaluate
                                or control.should_training_stop):
        return True
    step = state.global_step
    if step >= state.max_steps or (step == 1 and args.logging_first_step):
        return True
    every = ((args.logging_strategy, state.logging_steps), (args.save_strategy, state.save_steps),
             (args.eval_strategy, state.eval_steps))
    return any(strategy == "steps" and n and step % n == 0 for strategy, n in every)


class LaggedReadback:
    """Device values read back a step later instead of at once: reading a value the GPU is still computing makes the
    CPU wait with nothing queued behind it, so the GPU then idles while the CPU prepares the next step. `put` starts
    a copy to host memory that the GPU makes when it gets there; `take` returns the values put so far (by then long
    copied, on CUDA), or all but the newest with `keep_latest`; taking everything at once waits for the newest, as
    the steps that log or save do."""

    def __init__(self) -> None:
        self._pending: list[tuple[Any, Any, Any]] = []  # (host tensor, CUDA event or None, tag)

    def put(self, value: torch.Tensor, tag: Any = None) -> None:
        import torch

        value = value.detach()
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event, tag))
        else:
            self._pending.append((value.clone(), None, tag))

    def take(self, keep_latest: bool = False) -> list[tuple[Any, Any]]:
        """(value as a Python number, tag) for what was put so far, oldest first; `keep_latest` leaves the newest
        in flight."""
        ready, self._pending = (self._pending[:-1], self._pending[-1:]) if keep_latest else (self._pending, [])
        out = []
        for host, event, tag in ready:
            if event is not None:
                event.synchronize()
            out.append((host.item() if host.dim() == 0 else host.tolist(), tag))
        return out


@functools.cache
def atomic_checkpoint_trainer() -> type:
    """trl.SFTTrainer whose checkpoints appear in one rename, checked for disk space first, and whose steps do not
    wait for the GPU before the optimizer step."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import rotate_checkpoints
    from trl import SFTTrainer

    class TokenCountAtStepEnd(TrainerCallback):
        """Brings the trainer's device-side token count into its state, before other callbacks, logging and
        checkpoints read it: at once at the steps that log, save or evaluate, at epoch ends and when training
        ends (a stop between micro-batches); a step late at the other steps, so that their ends do not wait."""

        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            self.trainer.count_pending_tokens(wait=step_reports(args, state, control))

        def on_epoch_end(self, args, state, control, **kwargs):
            self.trainer.count_pending_tokens()

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.count_pending_tokens()

    class AtomicCheckpointTrainer(SFTTrainer):
        """Checkpoints are written into a hidden directory beside the others, flushed, and renamed into place.

        The step's bookkeeping does not make the CPU wait for the GPU between the backward pass and the optimizer
        step (transformers reads the token count back after every micro-batch): the CPU queues the optimizer step
        and the next batch while the GPU finishes the backward pass (docs/performance.md, fifth H200 session).
        Nor does the loss between the forward and the backward pass: TRL's metrics of each micro-batch (token
        accuracy, entropy, tokens seen) are read back when they are logged (`compute_loss`).
        """

        checkpoint_estimate: int = 0  # bytes one checkpoint needs; set by `qlora train`
        adapter_dtype: str | None = None  # the recipe's lora.adapter_dtype; set by `qlora train`
        _staging: Path | None = None
        _params_for_flops: int | None = None
        _tokens_pending: Any = None  # tokens of the micro-batches since the last step end, on the device

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._tokens_readback = LaggedReadback()  # counts of earlier steps on their way to the host
            self._metric_sums = {"train": LaggedReadback(), "eval": LaggedReadback()}  # see compute_loss
            self.callback_handler.callbacks.insert(0, TokenCountAtStepEnd(self))  # before the others read it

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """TRL's loss of the fused LM head (negative log-likelihood or DFT, over the micro-batch's or the
            batch's label tokens), its metrics read back when `log` reports them.

            TRL reads each micro-batch's token accuracy, entropy and token count back to Python as soon as the
            forward pass has queued them: the CPU waits for the GPU to finish the forward pass, and the backward
            pass then starts from an empty queue. Here the sums they come from go to the host behind the GPU's
            work and become the same per-micro-batch values in TRL's `_metrics` at the next `log`. Other losses
            (label smoothing, `compute_loss_func`, MoE auxiliary loss, sequence parallelism), several processes
            and `return_outputs` take TRL's own path."""
            import torch

            plain = (not return_outputs and self.compute_loss_func is None and not self.aux_loss_enabled
                     and (self.label_smoother is None or self.args.loss_type != "nll")
                     and self.accelerator.num_processes == 1 and getattr(self, "_tp_size", 1) == 1)
            if not plain:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_token_loss = -outputs.log_probs  # zero on ignored positions
            if self.args.loss_type == "dft":
                per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            masked = torch.zeros((), device=loss.device)  # tokens seen: the attention mask's, on the device
            seen = 0  # or (padding-free) the row's length, known here
            if mode == "train" and "attention_mask" in inputs:
                masked = inputs["attention_mask"].sum()
            elif mode == "train" and "position_ids" in inputs:
                seen = inputs["position_ids"].size(1)
            elif mode == "train":
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            sums = (outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum(), masked)
            self._metric_sums[mode].put(torch.stack([v.double() for v in sums]), seen)
            return loss

        def take_metrics(self, mode: str) -> None:
            """Bring the sums `compute_loss` put aside into TRL's `_metrics[mode]`, as TRL would have put them."""
            for (valid, entropy, correct, masked), seen in self._metric_sums[mode].take():
                self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
                self._total_train_tokens += int(masked) + seen
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            for mode in ("train", "eval"):  # train first: TRL's eval metrics count the tokens trained so far
                self.take_metrics(mode)
            super().log(logs, start_time)

        @staticmethod
        def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
            """transformers' choice for `training.optim`; bitsandbytes' without its wait after every parameter."""
            optimizer_cls, kwargs = SFTTrainer.get_optimizer_cls_and_kwargs(args, model)
            return without_per_parameter_sync(optimizer_cls), kwargs

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            """transformers' estimate (6 × tokens × parameters without embeddings) with the parameters counted
            once: counting walks every module and parameter, ~10 ms of Python per micro-batch on a 7B model."""
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._params_for_flops is None:
                self._params_for_flops = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._params_for_flops

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            """transformers' count of the tokens seen, summed on the device until the step ends (one process;
            with several, transformers gathers the count across ranks at every micro-batch)."""
            how, main = self.args.include_num_input_tokens_seen, getattr(self.model, "main_input_name", "input_ids")
            if how not in ("all", "non_padding") or self.accelerator.num_processes > 1 or main not in inputs:
                return super()._track_num_input_tokens(inputs)
            pad = getattr(self.processing_class, "pad_token_id", None)
            if how == "non_padding" and "attention_mask" in inputs:
                count = inputs["attention_mask"].sum()
            elif how == "non_padding" and pad is not None:
                count = (inputs[main] != pad).sum()
            else:
                count = inputs[main].numel()
            self._tokens_pending = count if self._tokens_pending is None else self._tokens_pending + count

        def count_pending_tokens(self, wait: bool = True) -> None:
            """Add the device-side count to `state.num_input_tokens_seen`: that of every micro-batch so far (waits
            for the GPU once), or with `wait=False` that of the micro-batches before the previous step end, long
            copied by then, while this step's count is copied behind the GPU's queued work."""
            for count, _ in self._tokens_readback.take():
                self.state.num_input_tokens_seen += int(count)
            if self._tokens_pending is None:
                return
            if wait:
                self.state.num_input_tokens_seen += int(self._tokens_pending)
            else:
                self._tokens_readback.put(self._tokens_pending)
            self._tokens_pending = None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            """Load the adapter weights, then give them back the recipe's dtype: PEFT's load_adapter upcasts
            bf16 adapters to fp32, and a resumed run would then no longer compute what the first one did."""
            import torch

            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if self.adapter_dtype:
                dtype = getattr(torch, self.adapter_dtype)
                for p in (model or self.model).parameters():
                    if p.requires_grad and p.dtype != dtype:
                        p.data = p.data.to(dtype)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            """Resume the optimizer and schedule, but at the recipe's peak learning rate (it may change with --force).

            The checkpoint's scheduler state holds the old peak rate (`base_lrs`) and its optimizer state the
            old current rate, so without this a changed `training.learning_rate` would silently not apply.
            """
            super()._load_optimizer_and_scheduler(checkpoint)
            scheduler, lr = self.lr_scheduler, self.args.learning_rate
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if checkpoint is None or not lambdas or all(b == lr for b in scheduler.base_lrs):
                return
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            current = [lr * f(scheduler.last_epoch) for f in lambdas]
            for group, value in zip(self.optimizer.param_groups, current):
                group["initial_lr"], group["lr"] = lr, value
            scheduler._last_lr = current

        def _get_output_dir(self, trial: Any) -> str:
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """Every rank writes into one hidden staging directory; rank 0 publishes it once all are done."""
            self.count_pending_tokens()  # trainer_state.json holds the count up to this step
            root = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            final, staging = root / name, root / f"{STAGING_PREFIX}{name}"
            main = self.args.should_save
            latest = max((p for p in root.glob("checkpoint-*") if p.is_dir()), key=os.path.getmtime, default=None)
            need = max(self.checkpoint_estimate, _tree_size(latest) if latest else 0)
            check_disk_space(root, need, f"checkpoint {name}")  # on every rank: all stop, or none
            if main:
                shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
            self.accelerator.wait_for_everyone()
            self._staging = staging
            try:
                with disk_errors(f"checkpoint {name}", final):
                    super()._save_checkpoint(model, trial)
                    staged = staging / name
                    best = self.state.best_global_step
                    if best and (root / f"checkpoint-{best}").is_dir():  # best checkpoints live in `root`
                        self.state.best_model_checkpoint = str(root / f"checkpoint-{best}")
                    elif best == self.state.global_step:
                        self.state.best_model_checkpoint = str(final)
                    if main and (staged / "trainer_state.json").is_file():
                        self.state.save_to_json(str(staged / "trainer_state.json"))
                    fsync_tree(staged)
            except BaseException:
                if main:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if main:
                publish_dir(staged, final)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            self.accelerator.wait_for_everyone()

    return AtomicCheckpointTrainer


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -------------------------------------------------------------------------------------------- callbacks


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class StopOnSignal:
    """SIGINT/SIGTERM -> save a checkpoint at the end of the current step and stop; a second signal stops at once.

    Use as a context manager around ``trainer.train()``; ``callback`` goes into the trainer's callbacks.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.step: int | None = None
        self._previous: dict[int, Any] = {}
        outer = self

        class _Callback(_callback_base()):
            def on_step_end(self, args, state, control, **kwargs):
                if args.world_size > 1:  # a signal on any rank stops all of them at the same step
                    outer.signum = _max_over_ranks(outer.signum or 0) or None
                if outer.signum is not None:
                    outer.step = state.global_step
                    control.should_save = True
                    control.should_training_stop = True
                    control.should_evaluate = False
                return control

        self.callback = _Callback()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now, without a checkpoint of this step
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)\n".encode())

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _max_over_ranks(value: int) -> int:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    tensor = torch.tensor([value], device=PartialState().device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class StopOnNonFinite:
    """Stop at the first step whose loss, gradient norm or trainable weights are NaN or infinite, unsaved.

    The weights are checked at every step end, but read a step later (the step's own NaN loss, logged or not, then
    reaches the weights of the next one), except at steps that log, save or evaluate, which read their own.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.found: list[str] = []
        self.readback = LaggedReadback()  # each step's weights check, read at the next step end (or at once)
        outer = self

        class _Callback(_callback_base()):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if outer.step is not None or model is None:
                    return control
                outer.readback.put(_weights_finite(model), state.global_step)
                # this step's check is read at the next step end, unless this step logs or saves
                for finite, step in outer.readback.take(keep_latest=not step_reports(args, state, control)):
                    if not finite:
                        outer._stop(step, "the adapter weights", control)
                        break
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                for key, name in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                    value = (logs or {}).get(key)  # logged right after on_step_end of the same step
                    bad = isinstance(value, float) and not math.isfinite(value)
                    if bad and outer.step in (None, state.global_step):
                        outer._stop(state.global_step, f"the {name} ({value})", control)
                return control

        self.callback = _Callback()

    @property
    def what(self) -> str:
        """What went non-finite, the cause (loss, gradient norm) first."""
        return " and ".join(sorted(self.found, key=lambda w: w.startswith("the adapter")))

    def _stop(self, step: int, what: str, control: Any) -> None:
        self.step = step
        self.found.append(what)
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True


def _weights_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether every trainable weight is finite, as a device bool, in one multi-tensor reduction: a check per tensor
    costs two kernel launches each (448 adapter tensors on a 7B model, ~40 ms with the GPU idle at every step end).
    The sum of absolute values is NaN or infinite exactly when some weight is (or when it exceeds 3e38)."""
    import torch

    weights = [p.detach() for p in model.parameters() if p.requires_grad]
    if not weights:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(weights, norm_type=1.0))


# ---------------------------------------------------------------------------------------------- remote code


def check_remote_code(model_dir: str, tokenizer_dir: str | None, trust: bool) -> None:
    """A local model or tokenizer directory that ships Python code needs model.trust_remote_code: true."""
    if trust:
        return
    import json

    for directory in filter(None, (model_dir, tokenizer_dir)):
        for name in ("config.json", "tokenizer_config.json"):
            path = Path(directory) / name
            if not path.is_file():
                continue
            try:
                auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
            except (ValueError, OSError, AttributeError):
                continue
            if auto_map:
                code = sorted({str(v if isinstance(v, str) else next(iter(v), "")).split(".")[0]
                               for v in auto_map.values()} - {""})
                raise UserError(
                    f"{path} asks to run Python code shipped with the model ({', '.join(c + '.py' for c in code)})",
                    where="model.trust_remote_code",
                    fix="Read that code, then set model.trust_remote_code: true if you trust it",
                )
