"""Builders: recipe sections -> tokenizer, BitsAndBytesConfig, 4-bit model, LoraConfig.

Nothing here reads the recipe file or trains; each function takes the typed section it needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .gguf_base import ensure_hf_folder, gguf_config, gguf_tokenizer, is_gguf
from .recipe import LoraSection, ModelConfig, QuantizationConfig, Recipe, TrainingConfig
from .tiny import TINY_MODEL_ID, ensure_tiny_model

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Hub ids whose config.json ships in qlora_cli/models/, so dry runs and footprints work offline.
KNOWN_MODELS: dict[str, str] = {
    "mistralai/Mistral-7B-v0.1": "mistral-7b.json",
    "mistralai/Mistral-7B-v0.3": "mistral-7b-v0.3.json",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3.json",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b.json",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b.json",
    "meta-llama/Llama-3.1-8B": "llama-3-8b.json",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3-8b.json",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b.json",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b.json",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b.json",
    "meta-llama/Meta-Llama-3-70B": "llama-3-70b.json",
    "meta-llama/Llama-3.1-70B": "llama-3-70b.json",
}


# --------------------------------------------------------------------------------------------- devices


@dataclass
class Device:
    """What the run executes on and in which precision."""

    type: str  # "cuda" or "cpu"
    name: str
    total_memory: int | None  # bytes, CUDA only
    bf16: bool

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


def visible_device() -> Device:
    """The visible CUDA GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, props.total_memory, torch.cuda.is_bf16_supported())
    return Device("cpu", "CPU", None, True)


def detect_device(training: TrainingConfig) -> Device:
    """The visible CUDA GPU, or the CPU when the recipe allows it; a clear error otherwise."""
    device = visible_device()
    if not device.is_cuda and not training.allow_cpu:
        raise UserError(
            "no CUDA GPU is visible, and 4-bit QLoRA training needs one",
            where="training.allow_cpu",
            fix="Run on a machine with an NVIDIA GPU, or set training.allow_cpu: true for tiny models and tests",
        )
    return device


def resolve_precision(training: TrainingConfig, device: Device) -> str:
    """`auto` -> bf16 where supported, else fp16; a bf16 request on a GPU without it falls back to fp16."""
    wanted = training.precision
    if wanted == "auto":
        return "bf16" if device.bf16 else "fp16"
    if wanted == "bf16" and not device.bf16:
        warnings.warn(f"{device.name} has no bfloat16 support; training in fp16 instead (training.precision).",
                      stacklevel=2)
        return "fp16"
    return wanted


def resolve_attention(recipe: Recipe, device: Device) -> str:
    """`auto` -> flex_attention where it pays (CUDA, packed sequences), else sdpa.

    Packed (padding-free) batches are one long row with a block-diagonal mask; sdpa computes the whole
    row x row score matrix, flex attention skips the blocks between examples (measured in docs/performance.md).
    """
    impl = recipe.model.attn_implementation
    if impl != "auto":
        return impl
    if device.is_cuda and recipe.data.packing:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

            return "flex_attention"
        except ImportError:
            pass
    return "sdpa"


@contextlib.contextmanager
def packed_masks_without_readback() -> Iterator[None]:
    """While open, transformers builds packed rows' attention masks without reading a value back from the GPU.

    transformers' `find_packed_sequence_indices` turns position ids into sequence indices, then checks
    `(indices[:, -1] == 0).all()` in Python to return None where every row holds one sequence. That read-back, at the
    start of every forward pass, made the CPU wait for the GPU to finish the previous step before it queued the
    mask and the first layers, and the GPU then idled while the CPU built them (~20 ms a step at the step boundary
    of an H200 profile, `docs/performance.md`, tenth session). The indices are returned always here: a row holding
    one sequence gets the same causal attention either way.
    """
    import torch
    import transformers.masking_utils as masking

    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor:
        position_diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
        return (position_diff != 1).cumsum(-1)

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def compute_dtype(quant: QuantizationConfig, precision: str) -> torch.dtype:
    import torch

    name = quant.bnb_4bit_compute_dtype
    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------- builders


def bnb_config(quant: QuantizationConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The quantization section as a BitsAndBytesConfig, or None when 4-bit is off."""
    import torch
    from transformers import BitsAndBytesConfig

    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, quant.bnb_4bit_quant_storage),
    )


def lora_config(lora: LoraSection) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def resolve_model_path(model: ModelConfig) -> str:
    """The directory or hub id that from_pretrained receives: the tiny model is made on first use, and a GGUF file
    is dequantized once into a cached Hugging Face folder (qlora_cli/gguf_base.py)."""
    if model.name_or_path == TINY_MODEL_ID:
        return str(ensure_tiny_model())
    if is_gguf(model.name_or_path):
        return str(ensure_hf_folder(model.name_or_path))
    return model.name_or_path


def load_config(model: ModelConfig) -> PretrainedConfig:
    """The model's architecture, without weights: local config.json, a shipped one, or the hub."""
    from transformers import AutoConfig

    name = model.name_or_path
    local = Path(name)
    if name == TINY_MODEL_ID:  # made on first use; its vocabulary is what the trained tokenizer holds
        return AutoConfig.from_pretrained(ensure_tiny_model())
    if is_gguf(name):  # the file's header; no weights are dequantized
        return gguf_config(name)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model directory {name!r} has no config.json", where="model.name_or_path",
                            fix="Point to a directory saved with save_pretrained, or to a hub id")
        return AutoConfig.from_pretrained(local, trust_remote_code=model.trust_remote_code)
    if name in KNOWN_MODELS:
        data = json.loads(resources.files("qlora_cli.models").joinpath(KNOWN_MODELS[name]).read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    try:
        return AutoConfig.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code,
                                          local_files_only=not hub_reachable())
    except ValueError as e:
        raise remote_code_error(name, e) from None
    except OSError as e:
        raise UserError(
            f"cannot find model {name!r} locally or on the hub ({str(e).splitlines()[0]})",
            where="model.name_or_path",
            fix="Give an existing local directory, check the hub id and network, "
            f"or use a model whose config ships with qlora: {', '.join(sorted(KNOWN_MODELS))}",
        ) from None


def remote_code_error(name: str, error: ValueError) -> Exception:
    """transformers' refusal to run a model's own code, as a user error; any other ValueError unchanged."""
    if "trust_remote_code" not in str(error):
        return error
    return UserError(f"model {name!r} needs its own Python code to load", where="model.trust_remote_code",
                     fix="Set model.trust_remote_code: true if you trust that repository")


def liger_installed() -> bool:
    """Whether Liger's kernels can be used (the `gpu` extra)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_compile(recipe: Recipe, device: Device, hidden_size: int | None = None) -> bool:
    """`auto` -> compile the decoder layers for CUDA training of models with a hidden size of at least 2,048
    (about 1B parameters and up), except under FSDP (whose flat parameters torch.compile does not trace).

    Compiling costs about the same 25-95 s on any model (one decoder layer's forward and backward graphs; the
    2M-parameter demo model took 94 s on an H200) and saves memory traffic in proportion to hidden size x tokens:
    11-13 % of a 7B step (~0.1 s per 8k tokens, docs/performance.md). Below a hidden size of 2,048 the saving
    is a few milliseconds a step, so compiling would take thousands of steps to pay back. Not on CPU either.
    `hidden_size` is read from the model's config when not given.
    """
    setting = recipe.training.compile_layers
    if setting != "auto":
        return bool(setting)
    if not device.is_cuda or uses_fsdp(recipe):
        return False
    if hidden_size is None:
        try:
            config = load_config(recipe.model)
            hidden_size = (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size
        except (UserError, AttributeError):  # an unknown architecture: assume a large model
            return True
    return hidden_size >= 2048


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the largest ModuleList (the decoder layers of every causal LM in transformers)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def compile_layers(model: torch.nn.Module, dynamic: bool | None = None, recompute_down_proj: bool = False,
                   keep_dequantized: bool = False, memo_rows: int = 0, **compile_kwargs: Any) -> int:
    """torch.compile each decoder layer in place (regional compilation); returns how many were compiled.

    Layers share one class, so the first compile is reused by the others. In place (`Module.compile`), so
    parameter names, checkpoints and the saved adapter are unchanged. Under gradient checkpointing the checkpoint
    wraps the compiled call (`checkpoint_around`), whichever transformers version is installed, and the frozen
    part of the MLP's output projection runs outside it, once (`deferrable_projection`), unless
    `recompute_down_proj`; with `keep_dequantized`, the recompute keeps the NF4 weights it dequantized (inside
    the compiled graph, qlora_cli/nf4.py) for the layer's backward; with `memo_rows` > 0, the recompute reads back
    the fused LoRA A projections' outputs of the forward pass (slots for that many rows, grown when a micro-batch
    has more; qlora_cli/lora_dropout.py `RecomputeMemo`). `dynamic=True` compiles once for every sequence
    length (batches whose lengths vary); `None` (torch's default) specialises to the first shape and recompiles,
    dynamic, at the second.
    """
    from .lora_dropout import keep_lora_a_outputs
    from .nf4 import keep_dequantized_in_recompute
    from .recompute import checkpoint_around, deferrable_projection

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic, **compile_kwargs)
        if getattr(layer, "gradient_checkpointing", False):
            base = None if recompute_down_proj else deferrable_projection(layer)
            if keep_dequantized:
                keep_dequantized_in_recompute(layer, base)
            memo = keep_lora_a_outputs(layer, memo_rows) if memo_rows > 0 else None
            checkpoint_around(layer, base, memo, dynamic=dynamic, **compile_kwargs)
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    """Back to eager layers (generation with a KV cache would recompile for every new length)."""
    from .lora_dropout import forget_lora_a_outputs
    from .lora_fold import use_peft_forward
    from .nf4 import use_bitsandbytes_forward
    from .recompute import undefer_projection

    for layer in decoder_layers(model):
        call = layer._compiled_call_impl
        if getattr(call, "checkpoint_around", False):
            layer.gradient_checkpointing = True
            if call.deferred is not None:
                undefer_projection(call.deferred)
            forget_lora_a_outputs(layer)
        layer._compiled_call_impl = None
    use_peft_forward(model)
    use_bitsandbytes_forward(model)  # bitsandbytes' own kernels are the fast ones for generation's small batches


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (one quick TCP connect), so offline runs fail fast."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token guaranteed (the EOS token is reused when there is none)."""
    from transformers import AutoTokenizer

    source = model.tokenizer or model.name_or_path
    try:
        if is_gguf(source):  # read from the file (or its cached folder) without dequantizing the weights
            tokenizer = gguf_tokenizer(source)
        else:
            source = source if model.tokenizer else resolve_model_path(model)
            offline = not Path(source).is_dir() and not hub_reachable()
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=model.revision, trust_remote_code=model.trust_remote_code, local_files_only=offline
            )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the tokenizer from {source!r} ({str(e).splitlines()[0]})",
            where="model.tokenizer" if model.tokenizer else "model.name_or_path",
            fix="Give a directory with tokenizer files (or a reachable hub id) in model.tokenizer",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.qlora_note = f"tokenizer has no pad token; using {tokenizer.pad_token!r} for padding"
    return tokenizer


def load_model(recipe: Recipe, device: Device, precision: str) -> PreTrainedModel:
    """The base model in 4-bit (or 16-bit when quantization is off), ready for LoRA training.

    Instead of `peft.prepare_model_for_kbit_training`, which upcasts every non-quantized weight to fp32
    (memory and speed for no gain with bf16 compute), only what training needs is done: input embeddings
    that require grad, so non-reentrant gradient checkpointing reaches the adapters.
    """
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(recipe.quantization, precision)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": resolve_attention(recipe, device),
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "quantization_config": bnb_config(recipe.quantization, dtype),
    }
    if device.is_cuda and not uses_fsdp(recipe):  # FSDP places (and shards) the weights itself
        kwargs["device_map"] = {"": _local_cuda_index()}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model), **kwargs)
    except ValueError as e:
        raise remote_code_error(recipe.model.name_or_path, e) from None
    model.config.use_cache = False
    keep_4bit_training_layout(model)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def keep_4bit_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for inference on AVX512-BF16 CPUs.

    bitsandbytes 0.50 repacks a Linear4bit's weight on its first no-grad CPU forward (an evaluation) and then
    runs every later forward, training ones too, through an inference kernel whose output carries no gradient
    to the layer's input: training after an evaluation silently loses the gradient through the frozen weights
    (measured on the tiny model: loss 7.23 instead of 6.02 after 8 steps). No effect on CUDA.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def world_size() -> int:
    """Processes in this run (set by accelerate launch / torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def uses_fsdp(recipe: Recipe) -> bool:
    return recipe.distributed.strategy == "fsdp" and world_size() > 1


def _local_cuda_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_target_modules(model: torch.nn.Module, lora: LoraSection) -> None:
    """Fail early, listing the linear layers found, when `lora.target_modules` names none of them."""
    if lora.target_modules == "all-linear":
        return
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    names = linear_module_names(model)
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(
            f"target module(s) {', '.join(missing)} not found in the model",
            where="lora.target_modules",
            fix=f"Use `all-linear` or some of the model's linear layers: {', '.join(sorted(names))}",
        )


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Last name parts of the model's linear layers (4-bit ones included), without the output head."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def meta_model(recipe: Recipe) -> torch.nn.Module:
    """The architecture with LoRA attached on the meta device: parameter counts without reading weights."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = load_config(recipe.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    check_target_modules(model, recipe.lora)
    return get_peft_model(model, lora_config(recipe.lora))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable
