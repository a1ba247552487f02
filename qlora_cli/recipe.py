"""The recipe schema: one YAML file describes a whole QLoRA run.

Each section mirrors the library object it becomes, with the same key names, so what you know about
``BitsAndBytesConfig``, ``LoraConfig`` and ``SFTConfig`` carries over:

- ``model``          what to load (``from_pretrained`` arguments)
- ``quantization``   ``transformers.BitsAndBytesConfig``
- ``lora``           ``peft.LoraConfig``
- ``data``           where the examples are, their format, and how they are shaped into sequences
- ``training``       ``trl.SFTConfig`` (``transformers.TrainingArguments``), plus ``sft_args`` for any other field

Every default is written once, here, next to its field; ``qlora train --dry-run`` prints the resolved recipe.
Loading validates everything: an unknown key names the closest valid one, a wrong type or out-of-range value
names the key, its YAML line and what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError, closest

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


def _f(default: Any = dataclasses.MISSING, help: str = "", **checks: Any) -> Any:
    """A recipe field: its default, its one-line documentation and its range checks (gt, ge, lt, le)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The base model (arguments of ``AutoModelForCausalLM.from_pretrained``)."""

    name_or_path: str = _f(
        help="Local directory, hub id or local .gguf file (dequantized once into a cached folder) of the base "
        "model; `qlora/tiny-llama` is built in."
    )
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) of the model and tokenizer.")
    tokenizer: str | None = _f(None, help="Tokenizer directory or hub id, when not the model's own.")
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = _f(
        "auto",
        help="Attention kernel; `auto` = flex_attention for packed sequences on CUDA (skips the masked blocks "
        "between packed examples), else sdpa.",
    )
    trust_remote_code: bool = _f(False, help="Run Python code shipped with the model. Only for models you trust.")


@dataclass
class QuantizationConfig:
    """How the frozen base weights are stored (``transformers.BitsAndBytesConfig``)."""

    load_in_4bit: bool = _f(True, help="Quantize the base model to 4 bits (QLoRA). false trains plain LoRA.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", help="4-bit data type; NF4 suits normal weights.")
    bnb_4bit_use_double_quant: bool = _f(True, help="Quantize the quantization constants too (~0.4 bit/param).")
    bnb_4bit_compute_dtype: Dtype = _f(
        "auto", help="dtype of the matmuls; `auto` = bfloat16, or float16 on GPUs without bf16 (e.g. T4)."
    )
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = _f(
        "uint8", help="Container dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype."
    )


@dataclass
class LoraSection:
    """The adapters (``peft.LoraConfig``)."""

    r: int = _f(16, help="LoRA rank.", gt=0)
    lora_alpha: float = _f(32, help="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).", gt=0)
    lora_dropout: float = _f(0.05, help="Dropout on the LoRA input; 0 takes PEFT's faster path.", ge=0, lt=1)
    target_modules: str | list[str] = _f(
        "all-linear", help="Module names to adapt, or `all-linear` (every linear layer but the output head)."
    )
    bias: Literal["none", "all", "lora_only"] = _f("none", help="Which biases to train.")
    use_rslora: bool = _f(False, help="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = _f(False, help="Weight-decomposed LoRA (DoRA); slower, sometimes better.")
    modules_to_save: list[str] | None = _f(None, help="Modules trained in full and saved with the adapter.")
    adapter_dtype: Literal["bfloat16", "float32"] = _f(
        "bfloat16", help="dtype of the trainable weights; float32 is ~25% slower but keeps updates bf16 rounds away."
    )


DataFormat = Literal["auto", "alpaca", "chat", "prompt_completion", "text"]


@dataclass
class DataConfig:
    """The examples and how they become training sequences."""

    source: str | list[str] = _f(
        help="Local file, list of files or glob (.json, .jsonl, .csv, .parquet), or a hub dataset id."
    )
    format: DataFormat = _f(
        "auto",
        help="alpaca (instruction/input/output), chat (messages), prompt_completion, text, or auto (from columns).",
    )
    columns: dict[str, str] = _f(
        {}, help="Format field -> dataset column, e.g. {prompt: text, completion: category}."
    )
    prompt_template: str | None = _f(
        None,
        help="Prompt text around the fields: alpaca uses {instruction} and {input}; prompt_completion {prompt}.",
    )
    subset: str | None = _f(None, help="Hub dataset configuration name.")
    split: str = _f("train", help="Split of `source` to train on.")
    eval_source: str | list[str] | None = _f(None, help="Separate evaluation file(s) or hub id.")
    eval_split: str | None = _f(None, help="Split of `source` (or `eval_source`) to evaluate on.")
    eval_fraction: float = _f(0.0, help="Fraction of the training rows held out for evaluation.", ge=0, lt=1)
    max_length: int = _f(
        2048, help="Longest training sequence in tokens; longer examples lose prompt tokens from the left (the "
        "completion is kept), plain text is cut at the end.", gt=0,
    )
    packing: bool = _f(False, help="Pack several examples into each sequence (TRL best-fit packing).")
    invalid_rows: Literal["skip", "error"] = _f(
        "skip", help="Rows with empty or missing fields: skip them (and count) or stop with an error."
    )
    max_rows: int | None = _f(None, help="Use only the first N training rows (quick experiments).", gt=0)


Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class TrainingConfig:
    """The optimisation (``trl.SFTConfig`` / ``transformers.TrainingArguments`` names)."""

    output_dir: str | None = _f(None, help="Run directory; default `runs/<recipe file name>`.")
    num_train_epochs: float = _f(1.0, help="Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = _f(-1, help="Stop after this many optimizer steps; -1 uses num_train_epochs.")
    per_device_train_batch_size: int = _f(4, help="Micro-batch: sequences per forward pass per GPU.", gt=0)
    per_device_eval_batch_size: int | None = _f(None, help="Eval micro-batch; default = training micro-batch.", gt=0)
    gradient_accumulation_steps: int = _f(4, help="Micro-batches per optimizer step.", gt=0)
    learning_rate: float = _f(2e-4, help="Peak learning rate.", gt=0)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
    ] = _f("cosine", help="Learning-rate schedule after warm-up.")
    warmup_steps: float = _f(0.03, help="Warm-up steps; a value below 1 is a fraction of all steps.", ge=0)
    weight_decay: float = _f(0.0, help="AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(0.3, help="Gradient clipping norm (QLoRA paper: 0.3).", gt=0)
    optim: str = _f("paged_adamw_8bit", help="Optimizer; paged 8-bit AdamW keeps its state in 2 bytes/param.")
    gradient_checkpointing: bool = _f(True, help="Recompute activations in backward: far less memory, ~30% time.")
    precision: Precision = _f("auto", help="Mixed precision; `auto` = bf16 where supported, else fp16.")
    seed: int = _f(42, help="Seed for weights init, data order and dropout.")
    logging_steps: int = _f(10, help="Log loss, learning rate and throughput every N steps.", gt=0)
    eval_steps: int | None = _f(None, help="Evaluate every N steps; default once per epoch and at the end.", gt=0)
    save_steps: int = _f(500, help="Checkpoint every N steps.", gt=0)
    save_total_limit: int | None = _f(2, help="Keep at most N checkpoints.", gt=0)
    use_liger_kernel: bool = _f(
        True, help="Liger's fused RMSNorm/SwiGLU/RoPE kernels, on CUDA when liger-kernel is installed and the "
        "layers are not compiled (compile_layers fuses the same ops).",
    )
    compile_layers: bool | Literal["auto"] = _f(
        "auto",
        help="torch.compile each decoder layer (fuses LoRA, norms and activations; far fewer kernel launches); "
        "`auto` = on for CUDA training of models with hidden size >= 2048 (~1B parameters and up; smaller ones "
        "save less than the 25-95 s compile costs). The first step is slower while it compiles.",
    )
    compile_nf4: bool = _f(
        True, help="With compiled layers, dequantize the NF4 weights inside the compiled graph (one fused kernel "
        "per weight, no bitsandbytes Python per matmul; same weights bit for bit); false = bitsandbytes' 4-bit "
        "matmul.",
    )
    recompute_down_proj: bool = _f(
        False, help="With compiled layers and gradient checkpointing, rerun the MLP's frozen output projection in "
        "backward like the rest of the layer; false = run it once, outside the checkpoint (backward needs neither "
        "its output nor its input: ~27 % less recomputed matmul work on Llama/Mistral/Qwen layers, same memory).",
    )
    keep_dequantized: bool = _f(
        True, help="With compiled NF4 layers and gradient checkpointing, each layer's recompute in backward keeps "
        "the 16-bit weights it dequantized for that layer's backward (all but the deferred down projection) "
        "instead of dequantizing them a third time; +2 bytes a weight of one layer of peak memory. On an H200, "
        "Llama-3-8B: +1.1 % tokens/s, +0.29 GB peak (docs/performance.md, twelfth session). false = dequantize "
        "again in backward, as bitsandbytes does.",
    )
    keep_lora_a_outputs: bool = _f(
        True, help="With compiled layers, gradient checkpointing and the fused LoRA dropout, each LoRA A projection "
        "keeps its output (rank values a token) from the forward pass for the recompute in backward, which reads it "
        "back instead of reading the projection's input and drawing its mask again; same values and gradients, "
        "+2 bytes × rank × 7 projections × layers a token of the micro-batch (Llama-3-8B, 4 × 2,048 tokens, rank "
        "16: 59 MB). false = recompute the A products too.",
    )
    fold_lora_b: bool = _f(
        False, help="With compiled NF4 layers, compute each projection with at least as many outputs as inputs (q, "
        "o, gate and up) as one matrix product [x | A(x)] @ [W | s·B]^T instead of peft's two products and a sum, so "
        "LoRA's full-size output is never written and read back (qlora_cli/lora_fold.py); plain LoRA only. Same loss "
        "and gradients up to rounding; on an H200 (Llama-3-8B) 0.9 % slower, 0.70 GB less peak memory.",
    )
    fused_lora_dropout: bool | Literal["auto"] = _f(
        "auto", help="Apply LoRA dropout inside the product with A (Triton kernels on CUDA, a mask regenerated from "
        "a seed in backward) instead of writing the dropped-out input and a mask for each projection; plain LoRA "
        "with lora_dropout > 0 only (on CUDA: bfloat16 adapters). Same distribution of masks as peft's, other "
        "draws. `auto` = on where the decoder layers are compiled (compile_layers): +0.3 to +5.7 % tokens/s and "
        "0.35 GB less peak memory on 7-8B shapes on an H200 (docs/performance.md, ninth session).",
    )
    lm_head_grad_in_forward: bool = _f(
        True, help="Take the loss head's gradient with respect to the hidden states in forward, while each tile of "
        "logits is at hand (qlora_cli/lm_head.py): two vocabulary-sized matrix products a step instead of TRL's "
        "three, the same log-probabilities, entropy and accuracy; false = TRL's chunked head. 26.6 instead of "
        "38.9 ms a 4 x 2048 micro-batch on Llama-3-8B's 128k vocabulary, 6.5 instead of 9.6 on Mistral-7B's 32k "
        "(H200), +1 to +2 % tokens/s in training (docs/performance.md, tenth session). Only the log-probabilities "
        "get a gradient; heads that train or soft-cap their logits always use TRL's.",
    )
    freeze_gc: bool = _f(
        True, help="After the first optimizer step, leave every Python object alive then out of the garbage "
        "collector's full passes (gc.freeze; given back when training ends). A compiled 7B model leaves millions of "
        "objects: each full pass otherwise stopped training for ~0.46 s every 15-20 steps, 4 % of the steady rate "
        "on an H200 (docs/performance.md, eleventh session); false = Python's default.",
    )
    allow_cpu: bool = _f(False, help="Train on the CPU when no CUDA GPU is visible (tiny models and tests only).")
    sft_args: dict[str, Any] = _f(
        {}, help="Any other trl.SFTConfig / TrainingArguments field, passed through after validation."
    )


@dataclass
class DistributedConfig:
    """Several GPUs (`qlora train --gpus N`, or `accelerate launch`): how the work is split."""

    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp",
        help="ddp: one full 4-bit copy per GPU, batches split (more throughput); fsdp: the 4-bit weights sharded "
        "across GPUs (models that do not fit one GPU; needs quantization.bnb_4bit_quant_storage: bfloat16).",
    )
    cpu_ram_efficient_loading: bool = _f(
        True, help="FSDP: only rank 0 reads the weights into CPU memory, the others get them sharded."
    )


@dataclass
class EvaluationConfig:
    """How answers are generated and scored (`qlora eval`, and the comparison printed after training)."""

    compare_after_training: int = _f(
        0, help="After training, generate answers for N eval prompts with and without the adapter.", ge=0
    )
    max_new_tokens: int = _f(32, help="Longest generated answer, in tokens.", gt=0)
    batch_size: int = _f(8, help="Prompts generated at once.", gt=0)
    strip: bool = _f(True, help="Compare answers with surrounding whitespace removed.")
    lowercase: bool = _f(False, help="Compare answers case-insensitively.")
    first_line: bool = _f(True, help="Keep only the first line of a generated answer.")


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    path: Path | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, in file order (what `recipe.yaml` in a run directory holds)."""
        return {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "run"

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir or f"runs/{self.name}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "lora": LoraSection,
    "data": DataConfig,
    "training": TrainingConfig,
    "distributed": DistributedConfig,
    "evaluation": EvaluationConfig,
}
# Fields that other keys of the recipe own; `training.sft_args` may not set them.
OWNED_SFT_FIELDS = {
    "max_length": "data.max_length",
    "packing": "data.packing",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "use_cpu": "training.allow_cpu",
    "gradient_checkpointing_kwargs": "training.gradient_checkpointing",
    "completion_only_loss": "data.format",
    "assistant_only_loss": "data.format",
    "dataset_text_field": "data.format",
    "warmup_ratio": "training.warmup_steps (a value below 1 is a fraction)",
    "model_init_kwargs": "model and quantization",
    "fsdp": "distributed.strategy",
    "fsdp_config": "distributed.strategy",
}


# --------------------------------------------------------------------------------------------------- loading


class _Source:
    """Where each key of the raw recipe came from, for error messages."""

    def __init__(self, file: str, lines: dict[tuple[str, ...], int]) -> None:
        self.file = file
        self.lines = lines
        self.overrides: set[tuple[str, ...]] = set()

    def where(self, path: tuple[str, ...]) -> str:
        key = ".".join(path)
        for i in range(len(path), 0, -1):
            if path[:i] in self.overrides:
                return f"--set {key}"
            if path[:i] in self.lines:
                return f"{self.file}:{self.lines[path[:i]]} {key}"
        return f"{self.file} {key}" if key else self.file


def _key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    return lines


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`training.learning_rate=1e-4` -> (("training", "learning_rate"), 1e-4); the value is read as YAML."""
    key, sep, value = text.partition("=")
    path = tuple(p for p in key.strip().split(".") if p)
    if not sep or len(path) < 2:
        raise UserError(
            f"override {text!r} is not of the form section.key=value",
            where="--set",
            fix="Write e.g. --set training.learning_rate=1e-4",
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        hint = sorted(str(p) for p in Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
        raise UserError(
            f"recipe file {str(path)!r} does not exist",
            fix="Check the path" + (f"; shipped recipes: {', '.join(hint)}" if hint else ""),
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"recipe is not UTF-8 text ({e.reason} at byte {e.start})", where=str(path),
                        fix="Save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"YAML syntax error: {problem}", where=where,
                        fix="Check indentation, colons and quoting on that line") from None
    source = _Source(str(path), _key_lines(node) if node is not None else {})
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError("a recipe must be a mapping of sections (model, data, ...)", where=str(path),
                        fix="See recipes/tiny-demo.yaml for the layout")
    for text_override in overrides or []:
        keys, value = parse_override(text_override)
        target = raw
        for k in keys[:-1]:
            if not isinstance(target.get(k), dict):
                target[k] = {}
            target = target[k]
        target[keys[-1]] = value
        source.overrides.add(keys)
    recipe = recipe_from_dict(raw, source)
    recipe.path = path
    return recipe


def recipe_from_dict(raw: dict[str, Any], source: _Source | None = None) -> Recipe:
    """Validate plain data (e.g. a parsed YAML file) into a Recipe."""
    source = source or _Source("recipe", {})
    for name in raw:
        if name not in SECTIONS:
            _unknown_key(name, (), list(SECTIONS), source)
    for required in ("model", "data"):
        if required not in raw:
            raise UserError(f"the recipe has no `{required}` section", where=source.file,
                            fix=f"Add a `{required}:` section; see recipes/tiny-demo.yaml")
    values = {name: _build(cls, raw.get(name) or {}, (name,), source) for name, cls in SECTIONS.items()}
    recipe = Recipe(**values)
    _check_recipe(recipe, source)
    return recipe


def _unknown_key(name: str, prefix: tuple[str, ...], valid: list[str], source: _Source) -> None:
    path = (*prefix, name)
    section = ".".join(prefix) or "the top level"
    guess = closest(name, valid)
    fix = f"Did you mean `{'.'.join((*prefix, guess))}`?" if guess else f"Valid keys: {', '.join(valid)}"
    # A key that is valid in another section.
    for other, cls in SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        if prefix and other != prefix[0] and name in names:
            fix = f"`{name}` belongs in the `{other}` section: write it as {other}.{name}"
    if prefix == ("training",) and not guess and name in _sft_field_names():
        fix = f"Pass other SFTConfig fields under training.sft_args, e.g. sft_args: {{{name}: ...}}"
    raise UserError(f"unknown key `{name}` in {section}", where=source.where(path), fix=fix)


def _build(cls: type, raw: Any, prefix: tuple[str, ...], source: _Source) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"`{'.'.join(prefix)}` must be a mapping of keys, got {type(raw).__name__}",
                        where=source.where(prefix), fix=f"Indent the keys of `{prefix[-1]}` under it")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            _unknown_key(str(name), prefix, list(fields), source)
    kwargs = {}
    for name, f in fields.items():
        path = (*prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"required key `{'.'.join(path)}` is missing", where=source.where(prefix),
                                fix=f"Add `{name}:` ({f.metadata['help']})")
            continue
        value = _coerce(raw[name], hints[name], path, source)
        _check_range(value, f, path, source)
        kwargs[name] = value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: tuple[str, ...], source: _Source) -> Any:
    """Return ``value`` as type ``tp`` or raise a UserError naming the key and the expected type."""
    ok, result = _try_coerce(value, tp)
    if ok:
        return result
    raise UserError(
        f"`{'.'.join(path)}` is {value!r} ({type(value).__name__}), expected {_type_name(tp)}",
        where=source.where(path),
        fix="Change the value to " + _type_name(tp),
    )


def _try_coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, None
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, result = _try_coerce(value, arg)
            if ok:
                return True, result
        return False, None
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        items = [_try_coerce(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        key_tp, value_tp = typing.get_args(tp)
        items = {k: _try_coerce(v, value_tp) for k, v in value.items()}
        ok = all(isinstance(k, str) for k in value) and all(ok for ok, _ in items.values())
        return ok, {k: v for k, (_, v) in items.items()}
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return math.isfinite(value), float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                number = float(value)
            except ValueError:
                return False, None
            return math.isfinite(number), number
        return False, None
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


_BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
           "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def _check_range(value: Any, f: dataclasses.Field, path: tuple[str, ...], source: _Source) -> None:
    if value is None or isinstance(value, (str, list, dict, bool)):
        return
    failed = [f"{op} {f.metadata[k]}" for k, (op, test) in _BOUNDS.items()
              if k in f.metadata and not test(value, f.metadata[k])]
    if failed:
        wanted = " and ".join(f"{op} {f.metadata[k]}" for k, (op, _) in _BOUNDS.items() if k in f.metadata)
        raise UserError(f"`{'.'.join(path)}` is {value!r}, out of range", where=source.where(path),
                        fix=f"Use a value {wanted}")


def _sft_field_names() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def _check_recipe(recipe: Recipe, source: _Source) -> None:
    """Checks that involve more than one key."""
    if not recipe.model.name_or_path.strip():
        raise UserError("`model.name_or_path` is empty", where=source.where(("model", "name_or_path")),
                        fix="Give a local model directory or a hub id such as mistralai/Mistral-7B-v0.1")
    if isinstance(recipe.data.source, list) and not recipe.data.source:
        raise UserError("`data.source` is an empty list", where=source.where(("data", "source")),
                        fix="List at least one data file")
    if recipe.data.eval_fraction and (recipe.data.eval_source or recipe.data.eval_split):
        raise UserError("both `data.eval_fraction` and a separate eval set are given",
                        where=source.where(("data", "eval_fraction")),
                        fix="Use eval_fraction or eval_source/eval_split, not both")
    if recipe.training.max_steps == 0 or recipe.training.max_steps < -1:
        raise UserError(f"`training.max_steps` is {recipe.training.max_steps}",
                        where=source.where(("training", "max_steps")),
                        fix="Use a positive number of steps, or -1 to train for num_train_epochs")
    if recipe.distributed.strategy == "fsdp" and recipe.quantization.load_in_4bit and (
        recipe.quantization.bnb_4bit_quant_storage == "uint8"
    ):
        raise UserError("FSDP cannot shard 4-bit weights stored as uint8",
                        where=source.where(("quantization", "bnb_4bit_quant_storage")),
                        fix="Set quantization.bnb_4bit_quant_storage: bfloat16 (the compute dtype)")
    sft_args = recipe.training.sft_args
    if sft_args:
        valid = _sft_field_names()
        for key in sft_args:
            path = ("training", "sft_args", key)
            if key in OWNED_SFT_FIELDS:
                raise UserError(f"`{key}` is set by the recipe itself", where=source.where(path),
                                fix=f"Use {OWNED_SFT_FIELDS[key]} instead")
            own = [f.name for f in dataclasses.fields(TrainingConfig)]
            if key in own:
                raise UserError(f"`{key}` has its own key", where=source.where(path),
                                fix=f"Set training.{key} instead of training.sft_args.{key}")
            if key not in valid:
                guess = closest(key, valid)
                raise UserError(f"`{key}` is not a field of trl.SFTConfig", where=source.where(path),
                                fix=f"Did you mean `{guess}`?" if guess else "See trl.SFTConfig for valid names")


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, help) for every recipe key, for docs and `qlora recipe-keys`."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            rows.append((f"{section}.{f.name}", default, f.metadata.get("help", "")))
    return rows
