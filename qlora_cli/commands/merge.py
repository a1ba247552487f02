"""`qlora merge`: a run's adapter folded into its base model, saved as a plain 16-bit checkpoint.

Serving stacks (vLLM, TGI, llama.cpp converters) load plain checkpoints. The path:

1. **find** the adapter (a run directory or an adapter directory) and the base (the run's recipe, or ``--base``);
2. **check up front**, reading no weights: adapter files present, adapter shapes fit the base, dtype valid,
   memory needed, disk space for the shards;
3. **reload the base in 16-bit** (bf16/fp16, or fp32), never the 4-bit weights of training: merging into
   quantized weights would round the adapter away; apply the adapter and ``merge_and_unload`` it with PEFT;
4. **verify**: on a few prompts, the merged model's logits must match base + unmerged adapter within a tolerance
   set by the dtype's own rounding noise, measured on the same prompts (``rounding_tolerance``), and must differ
   from the base's where the adapter changes them; the figures are printed and a mismatch fails the command;
5. **save atomically**: sharded safetensors, config, generation config, tokenizer, model card, the run's
   recipe and ``qlora_merge.json`` go to a hidden temporary directory beside ``--out`` that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from .. import __version__
from ..errors import UserError
from ..model import load_config, resolve_model_path
from ..recipe import ModelConfig, Recipe, load_recipe
from ..run_dir import RunDir, atomic_dir, atomic_write_json, check_writable

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The merged-vs-unmerged logit check allows NOISE_MULTIPLIER times the dtype's rounding noise, measured on the
# unmerged model against the same model computed in WIDER (see rounding_tolerance), and never less than
# FLOOR_EPS machine epsilons of the dtype.
NOISE_MULTIPLIER = 4.0
FLOOR_EPS = 4.0
WIDER = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp64"}
MERGE_INFO = "qlora_merge.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FALLBACK_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France?\nAnswer:",
    "def fibonacci(n):",
]
# Test hook: seconds to sleep after the weights are written into the temporary directory and before it is
# renamed to --out, so that a test can kill a merge midway with a real signal.
PAUSE_ENV = "QLORA_TEST_MERGE_PAUSE_S"


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class AdapterSource:
    """An adapter directory and, when it came from `qlora train`, its run directory and resolved recipe."""

    adapter: Path
    run: RunDir | None
    recipe: Recipe | None
    config: dict[str, Any]

    @property
    def recorded_base(self) -> str | None:
        """The base the adapter was trained on, as PEFT wrote it into adapter_config.json."""
        return self.config.get("base_model_name_or_path")


def find_adapter(path: str | Path, overrides: list[str] | None = None) -> AdapterSource:
    """The adapter a run directory or adapter directory holds, with clear errors for missing files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist", where="RUN_DIR",
                        fix="Give a run directory written by qlora train, or its adapter/ directory")
    if (path / "adapter_config.json").is_file():
        adapter = path
        run = RunDir(path.parent) if RunDir(path.parent).recipe.is_file() else None
    elif (path / "adapter").is_dir() or (RunDir(path).recipe.is_file() and not (path / "config.json").is_file()):
        run = RunDir(path)
        adapter = run.adapter
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter} has no adapter_config.json: the run did not finish saving its adapter",
                            where=str(path), fix="Train the run to the end (qlora train), or give another run")
    elif (path / "config.json").is_file():
        raise UserError(f"{path} is a model directory (config.json), not an adapter: nothing to merge",
                        where=str(path), fix="Give the run directory or adapter directory the model came from")
    else:
        raise UserError(f"{path} holds no adapter (no adapter_config.json, no adapter/ directory)",
                        where=str(path), fix="Give a run directory written by qlora train, or a PEFT adapter directory")
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"{adapter} has adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})",
                        where=str(adapter), fix="Copy the complete adapter directory, or train the run again")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"adapter_config.json is not valid JSON ({e})", where=str(adapter),
                        fix="Restore the file from the run that wrote it") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"adapter type {config.get('peft_type')!r} is not LoRA",
                        where=str(adapter / "adapter_config.json"), fix="qlora merges LoRA adapters only")
    recipe = load_recipe(run.recipe, overrides) if run is not None and run.recipe.is_file() else None
    return AdapterSource(adapter, run, recipe, config)


def base_model_config(source: AdapterSource, base: str | None) -> tuple[ModelConfig, str]:
    """(model section, where it came from): `--base`, else the run's recipe, else adapter_config.json."""
    if base:
        local = base.startswith(("/", ".", "~")) or base.count("/") != 1 or Path(base).exists()
        if local and not (Path(base).expanduser() / "config.json").is_file():
            raise UserError(f"{base!r} is not a model directory (no config.json there)", where="--base",
                            fix="Give a directory saved with save_pretrained, or a hub id such as Qwen/Qwen2.5-7B")
        model = dataclasses.replace(source.recipe.model, name_or_path=base, revision=None, tokenizer=None) \
            if source.recipe else ModelConfig(name_or_path=base)
        return model, "--base"
    if source.recipe is not None:
        return source.recipe.model, f"{source.run.recipe} model.name_or_path"
    if source.recorded_base:
        return ModelConfig(name_or_path=source.recorded_base), f"{source.adapter}/adapter_config.json"
    raise UserError("the adapter does not say which base model it belongs to", where=str(source.adapter),
                    fix="Name the base model with --base")


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000, `500MiB` -> 524_288_000 (the notation of save_pretrained's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"{text!r} is not a size", where="--max-shard-size",
                        fix="Write a number with a unit, e.g. 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size < 2**20:
        raise UserError(f"{text!r} is below 1 MiB", where="--max-shard-size",
                        fix="Use a shard size of at least 1MiB; 5GB suits most serving stacks")
    return size


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported", where="--dtype",
                        fix="Use bf16, fp16 or fp32; 4-bit or 8-bit merges would round the adapter away")
    return dtype


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------- shape checks


def meta_model(config: PretrainedConfig, trust_remote_code: bool) -> torch.nn.Module:
    """The base architecture on the meta device: names and shapes of every weight, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the adapter weights, read from the file header only."""
    path = adapter / "adapter_model.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    import torch

    state = torch.load(adapter / "adapter_model.bin", map_location="meta", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_adapter_fits(source: AdapterSource, base: torch.nn.Module, base_name: str, base_from: str,
                       fix: str = "Merge into the model the adapter was trained on ({trained_on}): drop --base or "
                       "point it there") -> None:
    """Every LoRA matrix must fit the module it adapts in `base`; one error naming adapter and base otherwise."""
    modules = dict(base.named_modules())
    params = {name: tuple(p.shape) for name, p in base.named_parameters()}
    trained_on = source.recorded_base or "its training base"
    hidden = getattr(base.config, "hidden_size", None)
    problems = []
    for key, shape in adapter_shapes(source.adapter).items():
        name = key.removeprefix("base_model.model.")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.\w+)?\.weight", name)
        if match is None:
            match = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.\w+)?(?:\.weight)?", name)
            kind = "magnitude" if match else None
        else:
            kind = match.group(2)
        if kind is None:  # modules_to_save and trainable tokens: a full copy of a base weight
            plain = re.sub(r"\.modules_to_save(\.\w+)?", "", name)
            if plain in params and params[plain] != shape:
                problems.append(f"{plain} is {params[plain]} in the base but {shape} in the adapter")
            continue
        module_name = match.group(1)
        module = modules.get(module_name)
        if module is None:
            problems.append(f"the adapter adapts {module_name}, which the base has no module named")
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        out_features, in_features = tuple(weight.shape)[:2] if weight.dim() == 2 else (None, None)
        if kind == "lora_embedding_A":  # (r, vocab) against an embedding (vocab, dim)
            out_features, in_features = in_features, out_features
        expected = {"lora_A": in_features, "lora_embedding_A": in_features,
                    "lora_B": out_features, "lora_embedding_B": out_features, "magnitude": out_features}[kind]
        got = shape[-1] if kind in ("lora_A", "lora_embedding_A") else shape[0]
        if expected is not None and got != expected:
            side = "input" if kind in ("lora_A", "lora_embedding_A") else "output"
            problems.append(f"{module_name} has {side} size {expected} in the base but {got} in the adapter")
    if problems:
        more = f" (and {len(problems) - 1} more mismatch(es))" if len(problems) > 1 else ""
        raise UserError(
            f"the adapter {source.adapter} (trained on {trained_on}) does not fit the base {base_name}"
            f"{f' (hidden size {hidden})' if hidden else ''}: {problems[0]}{more}",
            where=base_from,
            fix=fix.format(trained_on=trained_on),
        )


# ------------------------------------------------------------------------------------------- resources


@dataclass
class Plan:
    """What the merge will need, worked out before any weight is read."""

    parameters: int
    dtype: str
    weights_bytes: int
    adapter_bytes: int
    shard_bytes: int
    device: str
    wide_block_bytes: int = 0  # the largest block in the wider dtype, held during verification's wider pass

    @property
    def memory_bytes(self) -> int:
        """Base weights in the dtype, the adapter in fp32, and the larger of one large layer's update (B @ A,
        while merging) and the largest block in the wider dtype (while measuring the rounding noise)."""
        return int(self.weights_bytes + self.adapter_bytes + max(0.05 * self.weights_bytes, self.wide_block_bytes))

    @property
    def disk_bytes(self) -> int:
        """The shards plus room for tokenizer files and the index."""
        return int(self.weights_bytes * 1.01) + 50 * 10**6


def available_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def choose_device(wanted: str, need: int, console: Console) -> str:
    """`auto` takes the GPU when the merge fits in its free memory, the CPU otherwise."""
    import torch

    if wanted not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {wanted!r} is not supported", where="--device", fix="Use auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if wanted == "cuda" and not has_cuda:
        raise UserError("--device cuda but no CUDA GPU is visible", where="--device",
                        fix="Use --device cpu (or auto): merging runs on the CPU, only slower")
    if wanted == "cpu" or not has_cuda:
        return "cpu"
    free = available_memory("cuda") or 0
    if free >= need:
        return "cuda"
    if wanted == "cuda":
        raise UserError(f"the merge needs about {fmt_bytes(need)} of GPU memory, {fmt_bytes(free)} is free",
                        where="--device cuda", fix="Use --device cpu (it needs the same amount of RAM instead)")
    console.print(f"GPU has {fmt_bytes(free)} free, the merge needs about {fmt_bytes(need)}: merging on the CPU")
    return "cpu"


def check_disk(out: Path, need: int, what: str = "the merged model",
               fix: str = "Free some space or choose --out on a larger disk") -> None:
    """Fail before any work when the filesystem of `out` has less free space than `what` needs."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"{what} needs about {fmt_bytes(need)} of disk, {probe} has {fmt_bytes(free)} free",
                        where="--out", fix=fix)


def leftover_partials(out: Path) -> list[Path]:
    """Hidden temporary directories of earlier merges into `out` that were killed before finishing."""
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


# ---------------------------------------------------------------------------------------- verification


def verification_texts(source: AdapterSource, tokenizer: Any, n: int = 3) -> tuple[list[str], str]:
    """(texts, where from): a few training examples formatted as in training, or fixed sentences."""
    if source.recipe is None:
        return FALLBACK_PROMPTS[:n], "fixed sentences"
    from .. import data as datamod

    cfg = source.recipe.data
    try:
        eval_source = cfg.eval_source or cfg.source
        raw = datamod.load_source(eval_source, cfg.subset, cfg.eval_split or cfg.split)
        raw = raw.select(range(min(len(raw), 4 * n)))
        fmt, rows, _ = datamod.format_rows(cfg, raw, "data")
    except UserError:  # data moved or out of reach: the check still works on plain sentences
        return FALLBACK_PROMPTS[:n], "fixed sentences (the recipe's data is out of reach)"
    texts = []
    for row in rows.select(range(min(n, len(rows)))):
        if fmt == "chat":
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif fmt == "text":
            texts.append(row["text"])
        else:
            texts.append(row["prompt"] + row["completion"])
    return texts, f"{len(texts)} examples of {eval_source if isinstance(eval_source, str) else 'the data'}"


def logits_for(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Disjoint modules that together hold every parameter, each small: every child of a ModuleList (a decoder
    layer, with its LoRA matrices inside) and every other module with parameters and no ModuleList inside it
    (embeddings, final norm, lm_head). A module with parameters of its own beside a ModuleList is one block."""
    import torch

    if next(module.parameters(), None) is None:
        return []
    if next(module.parameters(recurse=False), None) is not None or not any(
            isinstance(m, torch.nn.ModuleList) for m in module.modules()):
        return [module]
    return [block for child in module.children() for block in _blocks(child)]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def wide_logits(model: torch.nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The logits of `model` computed in the wider `dtype`, holding only one block in that dtype at a time.

    Before each block (see `_blocks`) runs, its parameters and floating-point inputs are cast to `dtype`; after
    it, the original parameter tensors are put back untouched. The activations therefore stay in `dtype` from
    the embedding to the logits, while the extra memory is one decoder layer (or the embedding) in `dtype`,
    not a second copy of the model: an fp32 reference for a 7B bf16 model costs about 1 GB, not 28 GB.
    """
    import torch

    saved: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}

    def before(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        saved[id(block)] = [(p, p.data) for p in block.parameters()]
        for p, data in saved[id(block)]:
            p.data = data.to(dtype) if data.is_floating_point() else data
        return _cast(args, dtype), _cast(kwargs, dtype)

    def after(block: torch.nn.Module, args: tuple, output: Any) -> None:
        for p, data in saved.pop(id(block)):
            p.data = data

    handles = []
    try:
        for block in _blocks(model):
            handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(block.register_forward_hook(after))
        with torch.no_grad():
            return model(**batch).logits.to(dtype)
    finally:
        for handle in handles:
            handle.remove()
        for pairs in saved.values():  # a block that raised: its parameters are put back all the same
            for p, data in pairs:
                p.data = data


def rounding_tolerance(reference: torch.Tensor, wide: torch.Tensor, mask: torch.Tensor,
                       dtype: str) -> tuple[float, float]:
    """(tolerance, measured rounding noise) for comparing merged logits with `reference` in `dtype`.

    The noise is the largest difference, at the real tokens, between the unmerged model's logits computed in
    `dtype` (`reference`) and the same model computed in a wider dtype (`wide`): how much `dtype`'s rounding
    moves the logits through this model's depth on these prompts. Merging changes which values are rounded
    (W + BA once, instead of W x and BA x apart), not how finely, so the merged logits land within a few such
    noises of the reference: the tolerance is NOISE_MULTIPLIER x the noise, and never below the floor of
    FLOOR_EPS machine epsilons of `dtype` (for the rare prompt the wider computation matches exactly). The
    size of the logits plays no part.
    """
    import torch

    keep = mask.bool()
    noise = (reference[keep].double() - wide[keep].double()).abs().max().item()
    floor = FLOOR_EPS * torch.finfo(getattr(torch, DTYPES[dtype])).eps
    return max(NOISE_MULTIPLIER * noise, floor), noise


@dataclass
class Verification:
    """The merged model's logits against base + unmerged adapter, on a few prompts."""

    max_diff: float  # largest |merged - (base + adapter)| at the real tokens
    tolerance: float  # NOISE_MULTIPLIER x rounding_noise, at least the floor
    rounding_noise: float  # largest |(base + adapter) in the dtype - (base + adapter) in the wider dtype|
    logit_scale: float  # largest |logit| of base + adapter, for orientation only
    adapter_effect: float  # largest change the adapter makes to any logit: what a lost adapter would look like
    merged_moved: float  # largest |merged - base|: 0 when the merge lost the adapter (or rounded all of it away)
    top1_agreement: float
    tolerance_rule: str = ""

    @property
    def adapter_lost(self) -> bool:
        """The merged model computes exactly the base's logits although the adapter changes them."""
        return self.adapter_effect > 0 and self.merged_moved == 0

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and not self.adapter_lost

    @property
    def effect_visible(self) -> bool:
        """Whether the adapter moves logits by more than the tolerance, so that losing it could not pass."""
        return self.adapter_effect > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor, dtype: str,
                   base: torch.Tensor, wide: torch.Tensor) -> Verification:
    """How far `merged` logits are from `reference` (base + unmerged adapter in `dtype`) at the real tokens.

    `base` is the base alone (adapter switched off) in `dtype`, `wide` base + adapter computed in the wider dtype
    (see `wide_logits`); the tolerance comes from `rounding_tolerance`.
    """
    keep = mask.bool()
    ref, got = reference[keep], merged[keep]
    tolerance, noise = rounding_tolerance(reference, wide, mask, dtype)
    return Verification(
        max_diff=(ref - got).abs().max().item(),
        tolerance=tolerance,
        rounding_noise=noise,
        logit_scale=ref.abs().max().item(),
        adapter_effect=(ref - base[keep]).abs().max().item(),
        merged_moved=(got - base[keep]).abs().max().item(),
        top1_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        tolerance_rule=f"{NOISE_MULTIPLIER:g} x the measured {dtype} rounding noise (base + unmerged adapter in "
        f"{dtype} against the same computed in {WIDER[dtype]}), at least {FLOOR_EPS:g} x {dtype} epsilon",
    )


# ------------------------------------------------------------------------------------------------ merge


def write_model_card(directory: Path, name: str, info: dict[str, Any]) -> None:
    """README.md of the merged model: base, adapter, recipe, dtype and the verification figures."""
    v = info["verification"]
    recipe = "none (merged from a bare adapter directory)"
    if info.get("recipe"):
        recipe = f"`{info['recipe_source'] or 'the run'}`, resolved copy in `recipe.yaml`"
    text = f"""---
base_model: {info["base"]}
library_name: transformers
tags:
- qlora
- lora
- merged
---

# {name}

A LoRA adapter merged into its base model by `qlora merge` (qlora {__version__}); a plain checkpoint that
`AutoModelForCausalLM.from_pretrained` and serving stacks load without PEFT.

| | |
|---|---|
| base model | `{info["base"]}` |
| adapter | `{info["adapter"]}` |
| recipe | {recipe} |
| run | `{info["run"]}` |
| dtype | {info["dtype"]} |
| parameters | {info["parameters"]:,} |
| merged on | {info["device"]}, {info["created"]} |

The base was reloaded in {info["dtype"]} (not in the 4-bit form used in training) and the adapter merged with
PEFT's `merge_and_unload`. Verification on {info["verification_texts"]}: largest difference between the merged
model's logits and base + unmerged adapter {v["max_diff"]:.4g}, within the tolerance {v["tolerance"]:.4g}
({v["tolerance_rule"]}; measured noise {v["rounding_noise"]:.4g}). The adapter itself moves logits by up to
{v["adapter_effect"]:.4g}, the merged model differs from the base by up to {v["merged_moved"]:.4g}, the largest
logit is {v["logit_scale"]:.4g}; top-1 token agreement {v["top1_agreement"]:.1%}.
"""
    (directory / "README.md").write_text(text, encoding="utf-8")


def _recipe_source(run: RunDir | None) -> str | None:
    """The recipe file the run was trained from, as its summary.json records it."""
    try:
        return json.loads(run.summary.read_text(encoding="utf-8")).get("recipe") if run else None
    except (OSError, json.JSONDecodeError):
        return None


def _publishable(directory: Path) -> None:
    """The temporary directory is private (0700); give it and its files the modes the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def merge(path: str | Path, out: str | Path, base: str | None = None, dtype: str = "bf16",
          max_shard_size: str = "5GB", device: str = "auto", overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Merge the adapter of `path` (run or adapter directory) into its 16-bit base and save it to `out`.

    Returns what `qlora_merge.json` in the output holds: base, adapter, dtype, sizes and the verification.
    """
    console = console or Console()
    out = Path(out)
    dtype = check_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    source = find_adapter(path)
    model_cfg, base_from = base_model_config(source, base)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", where="--out", fix="Choose another directory or pass --overwrite")
    if out.resolve() in (source.adapter.resolve(), *([source.run.path.resolve()] if source.run else [])):
        raise UserError(f"--out {out} is the adapter's own directory", where="--out",
                        fix="Write the merged model to a new directory")
    check_writable(out.parent)

    # Reading no weights: does the adapter fit, how much memory and disk.
    base_name = model_cfg.name_or_path
    try:  # the config on disk (the built-in tiny model's vocabulary is sized to its tokenizer)
        config = load_config(dataclasses.replace(model_cfg, name_or_path=resolve_model_path(model_cfg)))
    except UserError as e:
        raise UserError(e.message, where=base_from, fix=e.fix) from None
    skeleton = meta_model(config, model_cfg.trust_remote_code)
    check_adapter_fits(source, skeleton, base_name, base_from)
    parameters = sum(p.numel() for p in skeleton.parameters())
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in _blocks(skeleton)), default=0)
    del skeleton
    adapter_bytes = 4 * sum(math.prod(s) for s in adapter_shapes(source.adapter).values())
    plan = Plan(parameters, dtype, parameters * DTYPE_BYTES[dtype], adapter_bytes, shard_bytes, "cpu",
                largest_block * (8 if WIDER[dtype] == "fp64" else 4))
    console.print(f"Merging {source.adapter} into {base_name} ({base_from}) in {dtype}: "
                  f"{parameters:,} parameters, {fmt_bytes(plan.weights_bytes)} in safetensors shards "
                  f"of up to {fmt_bytes(shard_bytes)}", highlight=False)
    check_disk(out, plan.disk_bytes)
    for old in leftover_partials(out):
        console.print(f"[yellow]note:[/] {old} is left from an interrupted merge; delete it to free its space",
                      highlight=False)
    plan.device = choose_device(device, plan.memory_bytes, console)
    available = available_memory(plan.device)
    label = "GPU memory" if plan.device == "cuda" else "RAM"
    console.print(f"The merge needs about {fmt_bytes(plan.memory_bytes)} of {label} on {plan.device}"
                  + (f" ({fmt_bytes(available)} available)" if available is not None else ""), highlight=False)
    if available is not None and available < plan.memory_bytes:
        console.print(f"[yellow]warning:[/] less {label} is available than the merge needs; it may be killed "
                      "for memory", highlight=False)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..model import load_tokenizer

    t0 = time.perf_counter()
    torch_dtype = getattr(torch, DTYPES[dtype])
    tokenizer_cfg = model_cfg
    if (source.adapter / "tokenizer_config.json").is_file():  # the tokenizer training used (pad token included)
        tokenizer_cfg = dataclasses.replace(model_cfg, tokenizer=str(source.adapter), revision=None)
    tokenizer = load_tokenizer(tokenizer_cfg)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_cfg), dtype=torch_dtype, revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code, device_map={"": plan.device},
    )
    model = PeftModel.from_pretrained(model, str(source.adapter))
    model.eval()

    texts, texts_from = verification_texts(source, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128).to(plan.device)
    tokenizer.padding_side = side
    reference = logits_for(model, batch)
    wide = wide_logits(model, batch, torch.float64 if WIDER[dtype] == "fp64" else torch.float32)
    with model.disable_adapter():
        base_logits = logits_for(model, batch)
    merged = model.merge_and_unload()
    check = compare_logits(reference, logits_for(merged, batch), batch["attention_mask"], dtype, base_logits, wide)
    del reference, base_logits, wide
    verdict = "[green]match[/]" if check.ok else "[bold red]MISMATCH[/]"
    console.print(f"Verification ({texts_from}): max |merged - (base + adapter)| logit difference "
                  f"{check.max_diff:.4g} (tolerance {check.tolerance:.4g} = {NOISE_MULTIPLIER:g} x the {dtype} "
                  f"rounding noise {check.rounding_noise:.4g} measured against {WIDER[dtype]}; the adapter moves "
                  f"logits by up to {check.adapter_effect:.4g}; top-1 agreement {check.top1_agreement:.1%}): "
                  f"{verdict}", highlight=False)
    if check.max_diff > check.tolerance:
        raise UserError(
            f"the merged model's logits differ from base + adapter by {check.max_diff:.4g}, more than the "
            f"{dtype} tolerance {check.tolerance:.4g} ({NOISE_MULTIPLIER:g} x the measured rounding noise "
            f"{check.rounding_noise:.4g}); nothing was written",
            where=str(source.adapter), fix="Merge in a wider dtype (--dtype fp32) to see whether rounding is the "
            "cause; otherwise the adapter and base do not belong together",
        )
    if check.adapter_lost:
        raise UserError(
            f"the merged model's logits equal the base's although the adapter moves them by up to "
            f"{check.adapter_effect:.4g}: the merge lost the adapter or {dtype} rounded all of it away; "
            "nothing was written", where=str(source.adapter),
            fix="Merge with --dtype fp32, which keeps updates that 16-bit weights round away" if dtype != "fp32"
            else "Check that PEFT loads and merges this adapter (PeftModel.from_pretrained, merge_and_unload)",
        )
    if not check.effect_visible:
        console.print(f"[yellow]note:[/] the adapter moves logits by at most {check.adapter_effect:.4g}, within "
                      f"the {dtype} tolerance: this check shows that the merged weights changed, not that they "
                      "hold the whole update; --dtype fp32 checks it more finely", highlight=False)

    merged.config.use_cache = True
    if merged.generation_config is None:
        merged.generation_config = GenerationConfig.from_model_config(merged.config)
    info: dict[str, Any] = {
        "base": base_name,
        "base_path": resolve_model_path(model_cfg),
        "adapter": str(source.adapter.resolve()),
        "run": str(source.run.path.resolve()) if source.run else None,
        "recipe": "recipe.yaml" if source.run and source.run.recipe.is_file() else None,
        "recipe_source": _recipe_source(source.run),
        "dtype": dtype,
        "parameters": parameters,
        "weights_bytes": plan.weights_bytes,
        "max_shard_size": shard_bytes,
        "device": plan.device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qlora_version": __version__,
        "verification_texts": texts_from,
        "verification": check.to_dict(),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=shard_bytes)
        tokenizer.save_pretrained(tmp)
        _pause_for_tests()
        if info["recipe"]:
            shutil.copyfile(source.run.recipe, tmp / "recipe.yaml")
        write_model_card(tmp, out.name, info)
        atomic_write_json(tmp / MERGE_INFO, info)  # written last: its presence marks a complete merge
        _publishable(tmp)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    console.print(f"Saved {out} ({fmt_bytes(size)} of safetensors) in {time.perf_counter() - t0:.1f} s. "
                  f"Load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); next: qlora eval {out}",
                  highlight=False)
    return info


def _pause_for_tests() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        print(f"pausing {seconds} s before renaming the merge into place ({PAUSE_ENV})", flush=True)
        time.sleep(float(seconds))
