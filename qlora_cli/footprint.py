"""GPU memory of a QLoRA training run, predicted from the model's config and the recipe. No torch, no weights.

How to read this module
-----------------------
`estimate()` adds up named terms. Each term is a `Term`: its bytes, the formula with the run's numbers filled
in, whether PyTorch's allocator holds it, and whether it is alive at the peak. The constants below are the facts
the terms rest on, each stated once, with the library code it comes from (bitsandbytes 0.50, PEFT 0.21,
transformers 5, TRL 1.16). Terms marked *rough* are not exact accounting; `docs/footprint.md` says how the
whole was checked against measured runs on a GPU.

Where the peak is
-----------------
A training step has a static part (weights, adapters, their gradients, optimizer state) and a part that rises
and falls with each micro-batch. The peak of the second part is at one of two moments:

- **loss head**: at the end of the forward pass every activation kept for backward is alive, and the loss head
  computes its gradient;
- **last layer's backward**: backward has reached the last decoder layer. With gradient checkpointing this is
  where one layer's activations are recomputed on top of the checkpoints.

The estimate is the larger of the two; the table says which terms are alive then.

What PyTorch sees and what it does not
--------------------------------------
`torch.cuda.max_memory_reserved()` counts what PyTorch's caching allocator holds. The CUDA context, and the
optimizer state that bitsandbytes puts in paged (unified) memory, are on the GPU but outside it; `nvidia-smi`
shows them. The total on the GPU, which the verdicts use, is all three.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from .data import PreparedData
    from .model import Device
    from .recipe import Recipe

GIB = 2**30

# --------------------------------------------------------------------------------------------- constants

# 4-bit weights (bitsandbytes Params4bit). Two weights per byte; one absmax constant per block of 64 weights.
# With double quantization the absmax constants are themselves stored in 8 bits, with one fp32 constant per
# 256 of them: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (4 + 32/64 = 4.5 bits without). Each quantized
# layer also keeps two small code tables (16 + 256 fp32 values).
QUANT_BLOCK = 64
NESTED_BLOCK = 256
QUANT_TABLES_BYTES = (16 + 256) * 4

# 8-bit optimizers (bitsandbytes Optimizer2State): per state, one byte per parameter plus one fp32 absmax per
# 256 parameters; tensors under 4,096 elements keep fp32 states instead. Paged optimizers put the state of
# tensors of 100,000 elements or more in CUDA unified memory, which the driver can move to CPU memory when the
# GPU runs out; smaller tensors' states are ordinary PyTorch tensors.
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096
PAGED_MIN_SIZE = 100_000

# TRL 1.16's SFTTrainer computes the loss with a chunked LM head (trl.kernels.chunked_logprob): it never holds
# the (tokens x vocabulary) logits, only one tile of 4,096 tokens x 32,768 vocabulary entries at a time.
# qlora's head (qlora_cli/lm_head.py, training.lm_head_grad_in_forward) keeps tiles of about the same 256 MiB
# (fewer tokens x the whole vocabulary) and, per token, its fp32 gradient G in place of TRL's bf16 hidden copy.
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768

# Measured on an H100 (docs/footprint.md): what the CUDA context and the kernels of cuBLAS, bitsandbytes and
# Triton take outside PyTorch's allocator, and how much more the caching allocator reserves than it hands out at
# the peak. With checkpointing every layer's recompute allocates and frees tensors of many sizes on top of the
# checkpoints, and freed blocks that the next request cannot reuse stay reserved (4-10 % measured); without it,
# memory grows in forward and shrinks in backward with little waste (under 1 % measured).
CUDA_CONTEXT_BYTES = int(0.85 * GIB)
ALLOCATOR_OVERHEAD = {"checkpointing": 0.08, "no checkpointing": 0.02}

# nvidia-smi's total memory of common GPUs, in MiB. Aliases map other spellings to these names.
GPUS: dict[str, int] = {
    "T4": 15360,
    "L4": 23034,
    "A10G": 23028,
    "RTX 3090": 24576,
    "RTX 4090": 24564,
    "L40S": 46068,
    "RTX A6000": 49140,
    "A100-40GB": 40960,
    "A100-80GB": 81920,
    "H100-80GB": 81559,
    "H200": 143771,
}
COMMON_GPUS = ("T4", "L4", "RTX 4090", "A100-40GB", "A100-80GB", "H100-80GB")
_GPU_ALIASES = {
    "3090": "RTX 3090", "4090": "RTX 4090", "a6000": "RTX A6000", "a100": None, "a10040gb": "A100-40GB",
    "a10080gb": "A100-80GB", "h100": "H100-80GB", "h100sxm": "H100-80GB", "h100pcie": "H100-80GB",
    "h10080gb": "H100-80GB", "h200": "H200",
}

# Decoder layouts modelled term by term; others with the same config keys are assumed to look like Llama.
EXACT_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer of the Llama family, as the memory model needs it."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds biases to q, k and v
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises queries and keys per head
    sliding_window: int | None = None  # Mistral v0.1: attention window of 4,096 tokens

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """From a transformers PretrainedConfig (only its attributes are read)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        model_type = getattr(config, "model_type", "unknown")
        if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
            raise UserError(f"{model_type} is a mixture-of-experts model, which the memory model does not cover",
                            where="model.name_or_path", fix="Measure it instead: qlora footprint RECIPE --measure")
        needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in needed if getattr(config, k, None) is None]
        if missing:
            raise UserError(f"the {model_type} config has no {', '.join(missing)}", where="model.name_or_path",
                            fix="Footprints cover decoder-only models of the Llama family (Llama, Mistral, Qwen)")
        heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if model_type != "mistral" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
        )

    @property
    def defers_down_proj(self) -> bool:
        """Whether compiled, checkpointed layers of this architecture run the MLP's output projection once, outside
        the checkpoint (qlora_cli/recompute.py: Llama, Mistral, Qwen2 and Qwen3 layers)."""
        from .recompute import SUMMED_LAST_PROJECTION

        return self.model_type in {name.removesuffix("DecoderLayer").lower() for name in SUMMED_LAST_PROJECTION}

    @property
    def exact_layout(self) -> bool:
        return self.model_type in EXACT_LAYOUTS

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def quantizable_params(self) -> int:
        """Weights of the decoder layers' linear layers: what 4-bit quantization replaces."""
        return self.layers * sum(i * o for i, o in self.linears.values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings, plus the output head unless it shares their weights."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def small_params(self) -> int:
        """Norm weights and biases: kept in 16 bits."""
        per_layer = 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            per_layer += self.hidden
        if self.mlp_bias:
            per_layer += 2 * self.intermediate + self.hidden
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return self.layers * per_layer + self.hidden

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.embedding_params + self.small_params


# ------------------------------------------------------------------------------------------ run settings


@dataclass(frozen=True)
class RunSettings:
    """Everything in a recipe that moves the memory of a training step."""

    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool = True
    grad_accumulation: int = 1
    load_in_4bit: bool = True
    double_quant: bool = True
    lora_r: int = 16
    target_modules: tuple[str, ...] = LINEAR_NAMES
    lora_dropout: bool = True
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    adapter_bytes: int = 4
    optim: str = "paged_adamw_8bit"
    act_bytes: int = 2
    full_logits: bool = False
    head_grad_in_forward: bool = False  # qlora's loss head (training.lm_head_grad_in_forward) instead of TRL's
    liger: bool = False  # Liger's RMSNorm, SwiGLU and RoPE kernels (training.use_liger_kernel)
    compiled: bool = False  # decoder layers compiled with torch.compile (training.compile_layers)
    keeps_dequantized: bool = False  # the recompute keeps its dequantized NF4 weights for backward
    lora_a_rows: int = 0  # rows of the slots where each layer's fused A projections keep their outputs (0: none)
    # compiled layers run the MLP's output projection outside the checkpoint (when there is one) where the architecture
    # allows it (Architecture.defers_down_proj); its weight is then dequantized again in backward, not kept
    deferred_down_proj: bool = False
    flex: bool = False  # flex attention (packed rows on CUDA): no mask tensors, key/value heads not repeated
    padding: bool = True  # batches may hold sequences of different lengths, so an attention mask is needed
    packing: bool = False
    seq_len_source: str = "data.max_length"
    processes: int = 1  # GPUs of a multi-GPU run; the estimate is per GPU
    fsdp: bool = False  # distributed.strategy: fsdp shards weights, adapters and optimizer state

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def settings_from_recipe(recipe: Recipe, prepared: PreparedData | None = None,
                         hidden_size: int | None = None) -> RunSettings:
    """The recipe's memory-relevant settings; with `prepared` data, the longest batch the data can make.

    Compiled layers, Liger's kernels and flex attention are decided as `qlora train` decides them on a CUDA GPU,
    with liger-kernel installed there (the `gpu` extra), wherever the estimate runs: a laptop and the GPU machine
    give the same estimate.
    """
    from .commands.train import uses_liger
    from .lora_dropout import fuses_dropout, memo_rows
    from .model import Device, resolve_attention, resolve_compile

    t, lora, data = recipe.training, recipe.lora, recipe.data
    seq_len, source, padding = data.max_length, "data.max_length", t.per_device_train_batch_size > 1
    if prepared is not None and prepared.train_stats.lengths and not data.packing:
        longest, shortest = max(prepared.train_stats.lengths), min(prepared.train_stats.lengths)
        if longest < data.max_length:
            seq_len, source = longest, "longest training example"
        padding = padding and shortest < seq_len
    if data.packing:
        padding = False
    targets = LINEAR_NAMES if lora.target_modules == "all-linear" else (
        (lora.target_modules,) if isinstance(lora.target_modules, str) else tuple(lora.target_modules))
    gpu = Device("cuda", "target GPU", None, True)
    compiled = resolve_compile(recipe, gpu, hidden_size) and recipe.distributed.strategy != "fsdp"
    liger = uses_liger(recipe, gpu, installed=True, compiled=compiled)
    if "use_liger_kernel" in t.sft_args:  # passed to SFTConfig after the recipe's own choice
        liger = bool(t.sft_args["use_liger_kernel"])
    # TRL 1.16 keeps its own chunked loss head with or without Liger; only label smoothing builds the full logits.
    label_smoothing = float(t.sft_args.get("label_smoothing_factor") or 0) > 0
    # compiled NF4 layers keep their recompute's dequantized weights for backward under checkpointing
    # (training.keep_dequantized); the down projection runs outside the checkpoint unless recompute_down_proj (or
    # DoRA, or an architecture qlora does not defer it for: estimate() decides that)
    keeps = compiled and t.compile_nf4 and t.keep_dequantized and recipe.quantization.load_in_4bit
    deferred = compiled and not t.recompute_down_proj and not lora.use_dora
    # under checkpointing the fused dropout's A projections keep their outputs for the recompute
    # (training.keep_lora_a_outputs; estimate() counts them only with checkpointing)
    lora_a_rows = memo_rows(recipe) if compiled and fuses_dropout(recipe, compiled) else 0
    return RunSettings(
        micro_batch=t.per_device_train_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=t.gradient_checkpointing,
        grad_accumulation=t.gradient_accumulation_steps,
        load_in_4bit=recipe.quantization.load_in_4bit,
        double_quant=recipe.quantization.bnb_4bit_use_double_quant,
        lora_r=lora.r,
        target_modules=targets,
        # inside the A projections (training.fused_lora_dropout) dropout keeps neither a copy nor a mask
        lora_dropout=lora.lora_dropout > 0 and not fuses_dropout(recipe, compiled),
        use_dora=lora.use_dora,
        modules_to_save=tuple(lora.modules_to_save or ()),
        adapter_bytes=4 if lora.adapter_dtype == "float32" else 2,
        optim=t.optim,
        act_bytes=4 if t.precision == "fp32" else 2,
        full_logits=label_smoothing,
        head_grad_in_forward=t.lm_head_grad_in_forward,
        liger=liger,
        compiled=compiled,
        keeps_dequantized=keeps,
        lora_a_rows=lora_a_rows,
        deferred_down_proj=deferred,
        flex=resolve_attention(recipe, gpu) == "flex_attention",
        padding=padding,
        packing=data.packing,
        seq_len_source=source,
    )


# ------------------------------------------------------------------------------------------------ result


@dataclass
class Term:
    """One component of the memory of a training step."""

    key: str
    name: str
    bytes: int
    formula: str
    at_peak: bool = True  # alive at the peak (or only at the other candidate moment)
    in_torch: bool = True  # held by PyTorch's caching allocator
    pageable: bool = False  # may move to CPU memory when the GPU runs out
    rough: bool = False  # an approximation rather than an exact count

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Estimate:
    """The predicted memory of one training run, by term."""

    model: str
    arch: Architecture
    settings: RunSettings
    terms: list[Term]
    peak_moment: str
    params: dict[str, int]
    notes: list[str] = field(default_factory=list)
    layer_parts: list[str] = field(default_factory=list)  # one layer's activations per token, by part

    def term(self, key: str) -> Term:
        return next(t for t in self.terms if t.key == key)

    @property
    def allocated(self) -> int:
        """PyTorch's allocated memory at the peak (`torch.cuda.max_memory_allocated`)."""
        return sum(t.bytes for t in self.terms if t.at_peak and t.in_torch and t.key != "allocator")

    @property
    def reserved(self) -> int:
        """What PyTorch's caching allocator holds at the peak (`torch.cuda.max_memory_reserved`)."""
        return sum(t.bytes for t in self.terms if t.at_peak and t.in_torch)

    @property
    def paged(self) -> int:
        return sum(t.bytes for t in self.terms if t.pageable)

    @property
    def total(self) -> int:
        """Everything on the GPU at the peak: PyTorch's reserved memory, the CUDA context, paged state."""
        return sum(t.bytes for t in self.terms if t.at_peak)

    def verdict(self, gpu: Gpu) -> str:
        """fits / tight / fits only by paging optimizer state to CPU / does not fit."""
        if self.total <= 0.9 * gpu.bytes:
            return "fits"
        if self.total <= gpu.bytes:
            return "tight"
        if self.total - self.paged <= gpu.bytes:
            return "pages"
        return "no"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": dataclasses.asdict(self.arch),
            "settings": dataclasses.asdict(self.settings),
            "params": self.params,
            "peak_moment": self.peak_moment,
            "terms": [t.to_dict() for t in self.terms],
            "allocated_bytes": self.allocated,
            "reserved_bytes": self.reserved,
            "paged_bytes": self.paged,
            "total_bytes": self.total,
            "notes": self.notes,
            "layer_activation_parts": self.layer_parts,
        }


# ------------------------------------------------------------------------------------------- the model


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def size(n: float) -> str:
    """GiB from 1 GiB up, MiB below: small terms stay readable."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight matrix: packed weights, absmax constants, code tables."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax + QUANT_TABLES_BYTES


def adapter_tensors(arch: Architecture, s: RunSettings) -> list[int]:
    """Element counts of every trainable tensor: LoRA A and B per adapted layer, DoRA magnitudes, saved modules."""
    sizes = []
    for name in s.target_modules:
        fan_in, fan_out = arch.linears[name]
        sizes += [s.lora_r * fan_in, fan_out * s.lora_r] + ([fan_out] if s.use_dora else [])
    sizes *= arch.layers
    for name in s.modules_to_save:
        if name in ("lm_head", "embed_tokens"):
            sizes.append(arch.vocab * arch.hidden)
    return sizes


def optimizer_bytes(sizes: list[int], optim: str) -> tuple[int, int, str]:
    """(bytes in PyTorch tensors, bytes in paged memory, description) of the optimizer state."""
    name = optim.lower()
    states = 0 if "sgd" in name else 1 if "lion" in name else 2
    eight_bit, paged = "8bit" in name, name.startswith("paged")
    torch_bytes = paged_bytes = 0
    for n in sizes:
        if eight_bit and n >= OPT8_MIN_SIZE:
            big, small = states * n, states * 4 * math.ceil(n / OPT8_BLOCK)  # 1-byte states, fp32 absmax
        else:
            big, small = states * 4 * n, 0
        if paged and n >= PAGED_MIN_SIZE:
            paged_bytes += big
            torch_bytes += small
        else:
            torch_bytes += big + small
    per_param = (torch_bytes + paged_bytes) / max(1, sum(sizes))
    known = any(k in name for k in ("adam", "lion", "sgd"))
    kind = f"{states} state{'s' if states != 1 else ''} × {'8 bit' if eight_bit else '32 bit'}"
    desc = f"{kind} ≈ {per_param:.2f} B/param" + ("" if known else " (unknown optimizer: AdamW assumed)")
    return torch_bytes, paged_bytes, desc


def layer_activation_bytes(arch: Architecture, s: RunSettings) -> tuple[int, list[str]]:
    """Bytes per token that one decoder layer keeps for backward, and the parts they come from.

    Read from the forward code (transformers' Llama/Mistral/Qwen2 layers, PEFT's LoRA layers, bitsandbytes'
    4-bit matmul) under bf16 autocast, the way SFTTrainer runs it:

    - each RMSNorm keeps an fp32 copy of its input and the fp32 reciprocal RMS of each token;
    - attention keeps the rotated queries and keys, the values, its output and an fp32 log-sum-exp per head
      (SDPA's flash or memory-efficient kernel, no seq x seq matrix). With grouped-query attention and no mask,
      keys and values keep their few heads; with a mask, transformers repeats them to all heads first;
    - with a mask, SDPA turns the boolean mask into an additive bf16 bias of batch x seq x seq in every layer;
    - the MLP keeps the gate output (for SiLU's backward), SiLU's output and the up projection (for the product);
    - the frozen 4-bit matmul keeps nothing (bitsandbytes saves only the packed weight); each LoRA adapter keeps
      its input for the gradient of A (shared when inputs are the same tensor, copied per adapter by peft's
      dropout, which also keeps a one-byte mask; dropout inside the A product, `training.fused_lora_dropout`,
      keeps neither) and its rank-r intermediate for the gradient of B.
    """
    b, h, i = s.act_bytes, arch.hidden, arch.intermediate
    targets = set(s.target_modules)
    masked = attention_mask_elements(arch, s) > 0
    # Liger's RMSNorm keeps its bf16 input and the rms, and its SwiGLU recomputes SiLU in backward. Compiled layers
    # keep the same (measured on an H200: 45.4 and 45.0 KB per token and layer less than eager layers, Mistral-7B
    # with and without LoRA dropout; Liger's saving is 45.1 KB): inductor upcasts the norm's input in backward
    # again and recomputes SiLU from the gate. The LoRA dropout masks are kept either way.
    fused = s.liger or s.compiled
    if fused:
        parts: list[tuple[str, int]] = [
            (f"2 RMSNorms ({'Liger' if s.liger else 'compiled'}: input + rms)", 2 * (b * h + 4))]
    else:
        parts = [("2 RMSNorms (fp32 input + rms)", 2 * (4 * h + 4))]
    if arch.qk_norm:
        parts.append(("q/k norms", 4 * (arch.q_dim + arch.kv_dim) + 4 * (arch.heads + arch.kv_heads)))
    kv = arch.q_dim if masked and arch.kv_heads != arch.heads else arch.kv_dim
    parts.append(("attention q, k, v, output, lse", b * (2 * arch.q_dim + 2 * kv) + 4 * arch.heads))
    if masked:
        parts.append(("mask bias", 2 * s.seq_len * (s.micro_batch if s.packing else 1)))
    parts.append(("MLP gate, up" if fused else "MLP gate, SiLU, up", (2 if fused else 3) * b * i))
    lora_inputs = 0
    if s.lora_dropout:
        lora_inputs = sum((1 + b) * arch.linears[name][0] for name in targets)
    else:
        lora_inputs += b * h if targets & {"q_proj", "k_proj", "v_proj"} else 0
        lora_inputs += b * h if targets & {"gate_proj", "up_proj"} else 0
        lora_inputs += b * i if "down_proj" in targets else 0  # the MLP product; o_proj's input SDPA keeps anyway
    parts.append((f"LoRA inputs{' (dropout copies + masks)' if s.lora_dropout else ''}", lora_inputs))
    parts.append(("LoRA rank-r outputs", b * s.lora_r * len(targets)))
    if s.use_dora:
        parts.append(("DoRA base and LoRA outputs", 2 * b * sum(arch.linears[n][1] for n in targets)))
    return sum(n for _, n in parts), [f"{name} {n:,}" for name, n in parts if n]


def attention_mask_elements(arch: Architecture, s: RunSettings) -> int:
    """Elements of the boolean attention mask transformers builds (0 when SDPA can run with is_causal alone).

    A mask is needed when a batch has padding, when packed sequences must not see each other (the packed batch
    is one row of micro_batch x seq_len tokens), or when a sliding window is not longer than the sequence.
    """
    if s.flex:
        return 0  # flex attention takes a block mask of a few bytes per 128 x 128 block
    if s.packing:
        return s.tokens**2
    window = arch.sliding_window is not None and s.seq_len >= arch.sliding_window
    if (s.padding and s.micro_batch > 1) or window:
        return s.micro_batch * s.seq_len**2
    return 0


def estimate(arch: Architecture, s: RunSettings, model: str = "") -> Estimate:
    """The memory of one training step of `arch` under settings `s`, term by term."""
    b, h, n, layers = s.act_bytes, arch.hidden, s.tokens, arch.layers
    terms: list[Term] = []
    notes: list[str] = []

    # Frozen base weights.
    quantized = arch.quantizable_params
    small = arch.embedding_params + arch.small_params
    if s.load_in_4bit:
        per_layer = sum(quantized_bytes(fi * fo, s.double_quant) for fi, fo in arch.linears.values())
        bits = 8 * per_layer * layers / quantized
        terms.append(Term("base_4bit", "4-bit base weights", per_layer * layers,
                          f"{_count(quantized)} params × {bits:.3f} bits (NF4"
                          + (" + double-quant constants)" if s.double_quant else " + constants)")))
    else:
        small += quantized
    terms.append(Term("base_16bit", "16-bit weights: embeddings, lm_head, norms", 2 * small,
                      f"{_count(small)} params × 2 B" + (" (lm_head tied)" if arch.tied_embeddings else "")))

    # Adapters, their gradients and the optimizer state.
    sizes = adapter_tensors(arch, s)
    trainable = sum(sizes)
    adapted = f"r={s.lora_r} on {len(s.target_modules)} linear layers × {layers} decoder layers"
    dtype = "fp32" if s.adapter_bytes == 4 else "bf16"
    terms.append(Term("lora", "LoRA parameters", s.adapter_bytes * trainable,
                      f"{_count(trainable)} params ({adapted}) × {s.adapter_bytes} B ({dtype})"))
    grads_full = s.grad_accumulation > 1
    terms.append(Term("grads", "LoRA gradients", s.adapter_bytes * trainable,
                      f"{_count(trainable)} × {s.adapter_bytes} B; "
                      + ("kept across accumulation steps" if grads_full else "built up during backward (upper bound)")))
    opt_torch, opt_paged, desc = optimizer_bytes(sizes, s.optim)
    terms.append(Term("optimizer", f"optimizer state ({s.optim})", opt_torch,
                      f"{desc}; tensors < {PAGED_MIN_SIZE:,} elements" if opt_paged else desc))
    if opt_paged:
        terms.append(Term("optimizer_paged", "optimizer state, paged", opt_paged,
                          f"tensors ≥ {PAGED_MIN_SIZE:,} elements, in CUDA unified memory", in_torch=False,
                          pageable=True))
    if s.adapter_bytes > b:
        cast_layers = layers if not s.gradient_checkpointing else 1
        terms.append(Term("lora_cast", "bf16 copies of the adapters (autocast)", b * trainable * cast_layers // layers,
                          f"{_count(trainable * cast_layers // layers)} params × {b} B, kept for backward "
                          + ("by every layer" if cast_layers == layers else "by the recomputed layer")))

    # Activations kept for backward.
    per_layer, parts = layer_activation_bytes(arch, s)
    mask_elems = attention_mask_elements(arch, s)
    if s.gradient_checkpointing:
        terms.append(Term("activations", "checkpoints: each layer's input", layers * n * b * h + mask_elems,
                          f"{layers} layers × {n:,} tokens ({s.micro_batch} × {s.seq_len}) × {h:,} hidden × {b} B"
                          + (f" + mask {mask_elems:,} B" if mask_elems else "")))
        terms.append(Term("recompute", "recompute of one layer in backward", n * per_layer,
                          f"{n:,} tokens × {per_layer:,} B (one layer's activations per token, below)",
                          rough=not arch.exact_layout))
        deferred = s.deferred_down_proj and arch.defers_down_proj
        kept = [name for name in arch.linears if not (deferred and name == "down_proj")]
        if s.keeps_dequantized and s.load_in_4bit:
            weights = sum(arch.linears[name][0] * arch.linears[name][1] for name in kept)
            terms.append(Term("dequantized", "dequantized weights kept by the recompute", b * weights,
                              f"{_count(weights)} weights ({len(kept)} projections of one layer) × {b} B "
                              "(training.keep_dequantized)"))
        if s.lora_a_rows:
            adapted = len(s.target_modules)
            terms.append(Term("lora_a_kept", "LoRA A outputs kept for the recompute",
                              layers * adapted * s.lora_a_rows * s.lora_r * s.adapter_bytes,
                              f"{layers} layers × {adapted} projections × {s.lora_a_rows:,} rows (micro-batch × "
                              f"max_length) × r={s.lora_r} × {s.adapter_bytes} B (training.keep_lora_a_outputs)"))
    else:
        terms.append(Term("activations", "activations of all layers", layers * n * per_layer + mask_elems,
                          f"{layers} layers × {n:,} tokens ({s.micro_batch} × {s.seq_len}) × {per_layer:,} B "
                          "(per layer and token, below)" + (f" + mask {mask_elems:,} B" if mask_elems else ""),
                          rough=not arch.exact_layout))

    # Backward through a decoder layer: the gradient flowing in and the one going out (2 hidden), the gradients
    # of the MLP's tensors (2 intermediate: the product's, then SiLU's and up's; Liger's SwiGLU writes those in
    # place of its saved inputs, so 1), and the frozen weight that bitsandbytes dequantizes to bf16 for the
    # gradient of the input.
    biggest = max(fi * fo for fi, fo in arch.linears.values())
    dequant = (2 * biggest + 4 * math.ceil(biggest / QUANT_BLOCK)) if s.load_in_4bit else 0
    mlp_grads = 1 if s.liger else 2
    working = n * b * (2 * h + mlp_grads * arch.intermediate)
    terms.append(Term("backward", "backward buffers (gradients in flight, dequantized weight)", working + dequant,
                      f"{n:,} tokens × {b} B × (2 × {h:,} + {mlp_grads} × {arch.intermediate:,})"
                      + (f" + {_count(biggest)} weights × 2 B" if dequant else ""), rough=True))

    # The loss head: final norm, logits (or TRL's tiles), cross-entropy and its gradient.
    if s.full_logits:
        head = n * (4 * h + 4) + n * arch.vocab * (b + 4 + 4 + 4)
        terms.append(Term("loss", "final norm + full logits and loss", head,
                          f"{n:,} tokens × {arch.vocab:,} vocab × (bf16 logits + fp32 copy + log-softmax + gradient)"
                          f" = {b + 12} B", rough=True))
        notes.append("full logits: label smoothing needs them; without it TRL computes the loss in tiles")
    else:
        # Per token: the final norm's saved input (fp32 copy, or Liger's bf16 one) and rms; what the head keeps from
        # forward (TRL's: a bf16 copy of the hidden states at loss positions; qlora's, training.lm_head_grad_in_forward:
        # the fp32 gradient G); in backward an fp32 gradient and the bf16 copy returned; 44 B of per-token fp32
        # statistics (running max, sums, log-probs, entropy). Plus one tile of logits: TRL's 4,096 x 32,768, or
        # qlora's rows x the whole vocabulary (qlora_cli/lm_head.py sizes it).
        norm = b * h + 4 if s.liger else 4 * h + 4
        if s.head_grad_in_forward:
            from .lm_head import tile_rows

            name, kept, per_token = "gradient in forward", "fp32 G", norm + 4 * h + 4 * h + b * h + 44
            rows, cols = min(n, tile_rows(arch.vocab, b)), arch.vocab
        else:
            name, kept, per_token = "TRL chunked", "hidden copy", norm + b * h + 4 * h + b * h + 44
            rows, cols = min(n, HEAD_TILE_TOKENS), min(arch.vocab, HEAD_TILE_VOCAB)
        terms.append(Term("loss", f"final norm + loss head ({name})", n * per_token + rows * cols * b,
                          f"{n:,} tokens × {per_token:,} B (norm input, {kept}, fp32 + bf16 gradient) + "
                          f"{rows:,} × {cols:,} logit tile × {b} B"))

    # Which moment is the peak: the loss head, or the backward of the last layer? Gradients count at the loss
    # head only when they are kept across accumulation steps.
    size = {t.key: t.bytes for t in terms}
    grads = size["grads"]
    head_moment = size["loss"] + (grads if grads_full else 0)
    layer_moment = size["backward"] + size.get("recompute", 0) + size.get("dequantized", 0) + grads
    if layer_moment >= head_moment:
        moment, off = "backward of the last layer", {"loss"}
    else:
        moment, off = "loss head", {"backward", "recompute", "dequantized"} | (set() if grads_full else {"grads"})
    for t in terms:
        if t.key in off:
            t.at_peak = False

    if s.processes > 1:
        _per_gpu(terms, s, layers, notes)

    allocated = sum(t.bytes for t in terms if t.at_peak and t.in_torch)
    mode = "checkpointing" if s.gradient_checkpointing else "no checkpointing"
    overhead = ALLOCATOR_OVERHEAD[mode]
    terms.append(Term("allocator", "allocator overhead (caching, fragmentation)", int(overhead * allocated),
                      f"{overhead:.0%} of the {gib(allocated)} GiB allocated at the peak ({mode}; measured)",
                      rough=True))
    terms.append(Term("context", "CUDA context and kernels", CUDA_CONTEXT_BYTES,
                      "fixed, measured on an H100 with CUDA 13", in_torch=False, rough=True))

    if not arch.exact_layout:
        notes.append(f"{arch.model_type}: layout assumed Llama-like (q/k/v/o + gated MLP); activations are rough")
    if s.packing and not s.flex:
        notes.append("packing without flex attention: modelled as SDPA masking the flattened micro-batch "
                     "(tokens x tokens)")
    if s.compiled:
        notes.append("compiled layers (training.compile_layers): norms and MLP keep what Liger's kernels keep "
                     "(measured on an H200)")
    if s.use_dora:
        notes.append("DoRA: activation terms are rough")
    if s.act_bytes == 4:
        notes.append("fp32 training: activations counted at 4 bytes; rough")
    dropped = [m for m in s.modules_to_save if m not in ("lm_head", "embed_tokens")]
    if dropped:
        notes.append(f"modules_to_save {', '.join(dropped)} not counted")
    params = {"total": arch.total_params, "quantized": quantized if s.load_in_4bit else 0,
              "sixteen_bit": small, "trainable": trainable}
    return Estimate(model, arch, s, terms, moment, params, notes, parts)


def _per_gpu(terms: list[Term], s: RunSettings, layers: int, notes: list[str]) -> None:
    """Per-GPU figures of an N-process run.

    DDP keeps everything per GPU and adds its gradient buckets (a flat copy of the trainable gradients). FSDP
    shards the parameters, their gradients and the optimizer state N ways, and gathers one decoder layer's
    weights at a time (two with prefetch) for its forward and backward.
    """
    n = s.processes
    if not s.fsdp:
        grads = next(t.bytes for t in terms if t.key == "grads")
        terms.append(Term("ddp_buckets", "DDP gradient buckets", grads, f"a copy of the LoRA gradients ({n} GPUs)",
                          rough=True))
        notes.append(f"DDP on {n} GPUs: per-GPU figures; not measured on GPUs")
        return
    sharded = {"base_4bit", "base_16bit", "lora", "grads", "optimizer", "optimizer_paged"}
    layer = 0
    for t in terms:
        if t.key == "base_4bit":
            layer = t.bytes // layers
        if t.key in sharded:
            t.bytes = -(-t.bytes // n)
            t.formula += f" ÷ {n} GPUs (FSDP shard)"
    terms.append(Term("fsdp_gather", "decoder layers gathered by FSDP (current + prefetched)", 2 * layer,
                      "2 × one layer's 4-bit weights", rough=True))
    notes.append(f"FSDP on {n} GPUs: per-GPU figures; not measured on GPUs")


def check_targets(arch: Architecture, s: RunSettings) -> None:
    unknown = [m for m in s.target_modules if m not in arch.linears]
    if unknown:
        raise UserError(f"target module(s) {', '.join(unknown)} not found in the model", where="lora.target_modules",
                        fix=f"Use `all-linear` or some of the model's linear layers: {', '.join(LINEAR_NAMES)}")


def estimate_for_recipe(recipe: Recipe, prepared: PreparedData | None = None, processes: int = 1) -> Estimate:
    """The estimate for a recipe (per GPU of `processes`), from the model's config alone (local, shipped or hub)."""
    from .model import load_config

    arch = Architecture.from_config(load_config(recipe.model))
    settings = dataclasses.replace(settings_from_recipe(recipe, prepared, arch.hidden), processes=processes,
                                   fsdp=recipe.distributed.strategy == "fsdp")
    check_targets(arch, settings)
    return estimate(arch, settings, recipe.model.name_or_path)


# ----------------------------------------------------------------------------------------- GPUs, VRAM


@dataclass(frozen=True)
class Gpu:
    name: str
    bytes: int


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower()).removeprefix("nvidia").removeprefix("geforce")


def find_gpu(name: str) -> Gpu:
    """A GPU by name (case, spaces and dashes ignored; `4090`, `rtx4090`, `H100` all work)."""
    key = _norm(name)
    table = {_norm(k): k for k in GPUS}
    table.update({k: v for k, v in _GPU_ALIASES.items() if v})
    table.update({"rtx" + k: v for k, v in _GPU_ALIASES.items() if v and k[0].isdigit()})
    if key in table:
        canonical = table[key]
        return Gpu(canonical, GPUS[canonical] * 2**20)
    if key in _GPU_ALIASES:  # known but ambiguous
        options = [k for k in GPUS if _norm(k).startswith(key)]
        raise UserError(f"GPU {name!r} comes in several sizes", where="--gpu", fix=f"Use one of {', '.join(options)}")
    raise UserError(f"unknown GPU {name!r}", where="--gpu",
                    fix=f"Use one of {', '.join(GPUS)}, or give the memory with --vram, e.g. --vram 24GB")


_UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 2**40,
          "tb": 2**40, "tib": 2**40}


def parse_vram(text: str) -> Gpu:
    """`24GB`, `24 GiB`, `16000MiB` or `80` (GB) -> bytes. GB means GiB here, as on GPU spec sheets."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"cannot read GPU memory {text!r}", where="--vram",
                        fix="Write a size such as 24GB, 40GiB or 16000MiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    return Gpu(f"{m.group(1)} {'GB' if _UNITS[unit] == GIB else m.group(2)}", size)


# ------------------------------------------------------------------------------------------ suggestions


@dataclass
class Suggestion:
    """A change to the recipe and the total it would give."""

    change: str
    overrides: list[str]
    total: int
    fits: bool
    cost: str  # what the change costs: speed, data, capacity of the adapter


def largest(candidates: list[int], fits: Any) -> int | None:
    """The largest candidate value for which fits(value) holds (candidates in increasing order)."""
    best = None
    for c in candidates:
        if fits(c):
            best = c
    return best


def max_micro_batch(arch: Architecture, s: RunSettings, capacity: int, limit: int = 4096) -> int:
    """The largest micro-batch that fits `capacity` bytes (0 when even 1 does not)."""
    def fits(batch: int) -> bool:
        return estimate(arch, dataclasses.replace(s, micro_batch=batch)).total <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi); memory grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def suggestions(arch: Architecture, s: RunSettings, capacity: int) -> list[Suggestion]:
    """Changes that lower the peak, ranked: those that fit first, cheapest first (speed before data before
    adapter capacity); each with the total it gives."""
    out: list[Suggestion] = []

    def add(change: str, overrides: list[str], new: RunSettings, cost: str) -> None:
        total = estimate(arch, new).total
        out.append(Suggestion(change, overrides, total, total <= capacity, cost))

    if not s.gradient_checkpointing:
        add("turn gradient checkpointing on", ["training.gradient_checkpointing=true"],
            dataclasses.replace(s, gradient_checkpointing=True), "~30% slower steps")
    if s.micro_batch > 1:
        batch = max_micro_batch(arch, s, capacity) or 1
        batch = min(batch, s.micro_batch // 2) or 1
        accum = math.ceil(s.micro_batch * s.grad_accumulation / batch)
        add(f"micro-batch {batch} with {accum} accumulation steps (same global batch)",
            [f"training.per_device_train_batch_size={batch}", f"training.gradient_accumulation_steps={accum}"],
            dataclasses.replace(s, micro_batch=batch, grad_accumulation=accum), "slower steps")
    if s.full_logits:
        add("drop label smoothing, so TRL computes the loss in tiles", ["training.sft_args.label_smoothing_factor=0"],
            dataclasses.replace(s, full_logits=False), "none")
    lengths = [n for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if n < s.seq_len]
    if lengths:
        def fits_len(n: int) -> bool:
            return estimate(arch, dataclasses.replace(s, seq_len=n)).total <= capacity

        length = largest(lengths, fits_len) or lengths[0]
        add(f"max length {length}", [f"data.max_length={length}"], dataclasses.replace(s, seq_len=length),
            "longer examples are truncated")
    if s.lora_r > 4:
        ranks = [r for r in (4, 8, 16, 32, 64, 128) if r < s.lora_r]

        def fits_rank(r: int) -> bool:
            return estimate(arch, dataclasses.replace(s, lora_r=r)).total <= capacity

        rank = largest(ranks, fits_rank) or ranks[0]
        add(f"LoRA rank {rank}", [f"lora.r={rank}"], dataclasses.replace(s, lora_r=rank), "smaller adapter")
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    if set(s.target_modules) - set(attention):
        targets = tuple(m for m in s.target_modules if m in attention) or ("q_proj", "v_proj")
        add("adapt the attention layers only", [f"lora.target_modules=[{','.join(targets)}]"],
            dataclasses.replace(s, target_modules=targets), "smaller adapter")
    if not any(x.fits for x in out):
        lightest = dataclasses.replace(s, gradient_checkpointing=True, micro_batch=1,
                                       grad_accumulation=s.micro_batch * s.grad_accumulation, full_logits=False)
        overrides = ["training.gradient_checkpointing=true", "training.per_device_train_batch_size=1",
                     f"training.gradient_accumulation_steps={lightest.grad_accumulation}"]
        add("checkpointing on and micro-batch 1", overrides, lightest, "slower steps")
    out.sort(key=lambda x: not x.fits)  # stable: within each group, the order above (cheapest first)
    return out


# ---------------------------------------------------------------------------------------------- output


VERDICTS = {
    "fits": "[green]fits[/]",
    "tight": "[yellow]tight[/] (within 10 %)",
    "pages": "[yellow]only if optimizer state pages to CPU[/]",
    "no": "[red]does not fit[/]",
}


def estimate_table(est: Estimate) -> Any:
    from rich.markup import escape
    from rich.table import Table

    s = est.settings
    title = (f"Memory of one training step: {est.model or est.arch.model_type}, micro-batch {s.micro_batch} × "
             f"{s.seq_len} tokens ({s.seq_len_source}), checkpointing {'on' if s.gradient_checkpointing else 'off'}")
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column("size", justify="right")
    table.add_column("formula")
    table.add_column("note")
    for t in est.terms:
        note = []
        if not t.at_peak:
            note.append("not at the peak")
        if not t.in_torch:
            note.append("outside PyTorch")
        if t.pageable:
            note.append("pageable")
        if t.rough:
            note.append("rough")
        style = "dim" if not t.at_peak else None
        table.add_row(t.name, size(t.bytes), escape(t.formula), ", ".join(note), style=style)
    table.add_section()
    table.add_row("PyTorch allocated at the peak", size(est.allocated), f"peak: {est.peak_moment}", "",
                  style="bold")
    table.add_row("PyTorch reserved", size(est.reserved), "torch.cuda.max_memory_reserved()", "", style="bold")
    table.add_row("total on the GPU", size(est.total), "reserved + CUDA context + paged optimizer state", "",
                  style="bold")
    return table


def verdict_table(est: Estimate, gpus: list[Gpu], max_batch: bool = False) -> Any:
    from rich.table import Table

    table = Table(title="Verdict", title_justify="left")
    table.add_column("GPU")
    table.add_column("GiB", justify="right")
    table.add_column("verdict")
    table.add_column("headroom GiB", justify="right")
    if max_batch:
        table.add_column("max micro-batch", justify="right")
    for gpu in gpus:
        row = [gpu.name, gib(gpu.bytes), VERDICTS[est.verdict(gpu)], gib(gpu.bytes - est.total)]
        if max_batch:
            row.append(str(max_micro_batch(est.arch, est.settings, gpu.bytes) or "none"))
        table.add_row(*row)
    return table


def print_estimate(est: Estimate, console: Console, gpus: list[Gpu] | None = None) -> None:
    """The component table, totals and verdicts (for `qlora footprint` and `qlora train --dry-run`)."""
    console.print(estimate_table(est))
    console.print(f"One layer's activations per token (bytes): {'; '.join(est.layer_parts)}", style="dim",
                  highlight=False)
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(verdict_table(est, gpus or [find_gpu(g) for g in COMMON_GPUS]))


def warn_if_too_big(recipe: Recipe, device: Device, console: Console, prepared: PreparedData | None = None) -> None:
    """Before loading weights: warn when the estimate exceeds the visible GPU's memory, with the best fix."""
    if not device.is_cuda or not device.total_memory:
        return
    try:
        est = estimate_for_recipe(recipe, prepared)
    except UserError:  # an architecture the model does not cover: no estimate, no warning
        return
    if est.total <= device.total_memory:
        return
    console.print(f"[yellow]warning:[/] the estimated peak of {gib(est.total)} GiB exceeds the "
                  f"{gib(device.total_memory)} GiB of {device.name}; training will probably run out of memory.")
    fixes = [x for x in suggestions(est.arch, est.settings, device.total_memory) if x.fits]
    if fixes:
        from rich.markup import escape

        fix = escape(f"{fixes[0].change}: {' '.join('--set ' + o for o in fixes[0].overrides)}")
        console.print(f"  e.g. {fix} ({gib(fixes[0].total)} GiB). Details: qlora footprint {recipe.path or 'RECIPE'}",
                      highlight=False)
