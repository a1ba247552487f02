"""A Hugging Face model folder written as one GGUF file (llama.cpp, Ollama, LM Studio), and checks of the result.

Built on the ``gguf`` package (llama.cpp's own gguf-py): :class:`gguf.GGUFWriter` writes the file, its tensor-name
maps give llama.cpp's names, and its numpy quantizers (tested by llama.cpp against ggml's reference code) produce
the blocks. What llama.cpp's ``convert_hf_to_gguf.py`` does for Llama, Mistral and Qwen2 is done here the same way:
the rotary halves of q/k projections are permuted for the ``llama`` architecture, 1-D tensors stay in F32, rows
that do not fill whole blocks fall back to F16, and the tokenizer becomes a ``gpt2`` (byte-level BPE) or ``llama``
(SentencePiece-style BPE with byte fallback) vocabulary with its merges, special tokens, BOS/EOS behaviour,
pre-tokenizer name and chat template.

Tensors are streamed: the header is written from shapes alone, then each tensor is read, converted and written,
so memory holds one tensor at a time (a 7B model converts in a few GB of RAM).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# --quant value -> (tensor type of 2-D weights, general.file_type). Every type gguf-py can write correctly for any
# model: the float types and the block quantizations whose numpy quantizers match ggml's reference code.
TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
FLOAT_TYPES = ("f32", "f16", "bf16")
# Types llama.cpp has and gguf-py cannot write: K-quants and i-quants need ggml's C quantizers (llama-quantize).
LLAMA_QUANTIZE_ONLY = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                       "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s",
                       "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "mxfp4")
# config.model_type -> llama.cpp architecture. Mistral is llama.cpp's `llama` (convert_hf_to_gguf does the same).
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
# Architectures whose q/k rows llama.cpp expects in interleaved (GPT-J) rotary order.
PERMUTE_QK = {"LLAMA"}

# The regexes of Hugging Face pre-tokenizers that llama.cpp knows by name (see llama-vocab.cpp).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def check_quant(quant: str) -> str:
    """The --quant value in lower case, or one error saying what to run for types gguf-py cannot write."""
    q = quant.lower()
    if q in TYPES:
        return q
    if q in LLAMA_QUANTIZE_ONLY:
        raise UserError(
            f"--quant {quant} cannot be written by the gguf package (K-quants and i-quants need llama.cpp's C "
            "quantizers)", where="--quant",
            fix=f"Export --quant f16, then run llama.cpp: llama-quantize model-f16.gguf model-{q}.gguf {q.upper()}")
    raise UserError(f"--quant {quant!r} is not a GGUF type qlora writes", where="--quant",
                    fix=f"Use one of {', '.join(TYPES)}")


# ------------------------------------------------------------------------------------------------ tokenizer


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos/eos/unk/pad/sep -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None  # "llama": the merge priority of each token (llama.cpp merges by score)
    add_space_prefix: bool | None = None  # "llama": a text starts with "▁" (SentencePiece's dummy prefix)


def _pre_tokenizer_name(spec: dict[str, Any] | None, where: str) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer of tokenizer.json; an error when it has none."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
        if regex == QWEN2_REGEX:
            return "qwen2"
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(spec)[:200]}) has no llama.cpp equivalent qlora "
                    "knows", where=where, fix="Export --format hf and convert it with llama.cpp's "
                    "convert_hf_to_gguf.py, which recognises more tokenizers by their output")


def measured_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the tokenizer really does to a plain text, not what its config claims."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(ids) > len(bare) and ids[0] == bos
    adds_eos = eos is not None and len(ids) > len(bare) and ids[-1] == eos
    return adds_bos, adds_eos


def _merge_scores(merges: list[str]) -> dict[str, float]:
    """Token -> -(rank of the first merge that makes it): llama.cpp's SentencePiece tokenizer merges the adjacent
    pair whose result scores highest, so these scores replay Hugging Face's BPE merges in their order."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        scores.setdefault(merge.replace(" ", ""), -float(rank))
    return scores


def vocabulary(model_dir: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocabulary:
    """The GGUF vocabulary of a BPE tokenizer (tokenizer.json), padded to the embedding's rows.

    Byte-level BPE (Llama 3, Qwen2, SmolLM2) becomes llama.cpp's ``gpt2`` vocabulary with its merges and
    pre-tokenizer name. SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B) becomes its ``llama``
    vocabulary: "▁" for spaces, ``<0xXX>`` byte tokens, and scores that replay the merges in order (the merges are
    written too, so transformers' GGUF loader rebuilds the same tokenizer).
    """
    import gguf

    where = str(model_dir / "tokenizer.json")
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{model_dir} has no tokenizer.json", where=str(model_dir),
                        fix="Save the model with a fast tokenizer (tokenizer.save_pretrained)") from None
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"the tokenizer is a {model.get('type')} model; qlora writes BPE vocabularies (Llama, "
                        "Mistral, Qwen2, SmolLM2)", where=where,
                        fix="Export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    sentencepiece = bool(model.get("byte_fallback"))
    pre = "default" if sentencepiece else _pre_tokenizer_name(spec.get("pre_tokenizer"), where)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens but the model's embedding only {vocab_size} rows",
                        where=where, fix="Resize the token embeddings to the tokenizer before merging")
    added = tokenizer.added_tokens_decoder
    ranks = _merge_scores(merges) if sentencepiece else {}
    unk = tokenizer.unk_token_id
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token, score = by_id.get(i, f"[PAD{i}]"), 0.0
        if i not in by_id:
            kind = gguf.TokenType.UNUSED
        elif sentencepiece and i == unk:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            token = added[i].content
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = gguf.TokenType.BYTE  # llama.cpp's byte fallback looks these up by type
        else:
            kind = gguf.TokenType.NORMAL
            # A piece no merge makes must not be merged into by llama.cpp before the pieces merges do make.
            score = ranks.get(token, 0.0 if len(token) == 1 else -1e9) if sentencepiece else 0.0
        tokens.append(token)
        types.append(kind)
        scores.append(score)
    special = {name: tid for name in ("bos", "eos", "unk", "pad", "sep")
               if (tid := getattr(tokenizer, f"{name}_token_id", None)) is not None}
    add_bos, add_eos = measured_special_tokens(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not sentencepiece:
        return Vocabulary("gpt2", pre, tokens, types, merges, special, add_bos, add_eos, template)
    first = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = bool(first) and by_id.get(first[0], "").startswith("\u2581")
    return Vocabulary("llama", pre, tokens, types, merges, special, add_bos, add_eos, template, scores, prefix)


# ---------------------------------------------------------------------------------------------- tensors


@dataclass
class TensorPlan:
    hf_name: str
    name: str  # llama.cpp's name
    shape: tuple[int, ...]
    type: str  # GGMLQuantizationType name
    permute_heads: int | None = None  # rotary permutation for llama.cpp's llama architecture

    @property
    def nbytes(self) -> int:
        import gguf

        qtype = gguf.GGMLQuantizationType[self.type]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return math.prod(self.shape[:-1]) * self.shape[-1] // block * size


def _shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, safetensors file), read from the files' headers only."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no safetensors weights", where=str(model_dir),
                        fix="Give a folder written by qlora merge (or save_pretrained with safetensors)")
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                shapes[k] = (tuple(st.get_slice(k).get_shape()), f)
    return shapes


def tensor_type(name: str, shape: tuple[int, ...], quant: str, tied: bool) -> str:
    """The GGUF type of one tensor, as llama.cpp's converter and llama-quantize choose it."""
    import gguf

    wanted = TYPES[quant][0]
    if len(shape) < 2:
        return "F32"  # norms and biases: tiny, and precision-sensitive
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    if output and quant in ("q5_1", "q5_0", "q4_1", "q4_0"):
        wanted = "Q8_0"  # llama-quantize keeps the output layer at 6 bits (Q6_K); Q8_0 is the nearest gguf-py has
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]]
    if shape[-1] % block:
        return "F16"  # rows that do not fill whole blocks cannot be block-quantized (convert_hf_to_gguf does this)
    return wanted


def plan_tensors(model_dir: Path, config: PretrainedConfig, arch: str, quant: str) -> list[TensorPlan]:
    import gguf

    shapes = _shapes(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    plans = []
    for hf_name, (shape, _) in shapes.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"the weight {hf_name} has no llama.cpp name for architecture {arch.lower()}",
                            where=str(model_dir), fix="Export --format hf and convert it with llama.cpp's "
                            "convert_hf_to_gguf.py")
        permute = None
        if arch in PERMUTE_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = heads
        elif arch in PERMUTE_QK and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = kv_heads
        plans.append(TensorPlan(hf_name, name, shape, tensor_type(name, shape, quant, tied), permute))
    return plans


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(plan: TensorPlan, files: dict[str, Path]) -> np.ndarray:
    import gguf
    import torch
    from safetensors import safe_open

    with safe_open(str(files[plan.hf_name]), "pt") as st:
        w = st.get_tensor(plan.hf_name).to(torch.float32).numpy()
    if plan.permute_heads:
        w = permute_rotary(w, plan.permute_heads)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[plan.type])


# ------------------------------------------------------------------------------------------------ writer


def check_architecture(config: PretrainedConfig, where: str) -> str:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"model type {config.model_type!r} is not one qlora writes to GGUF", where=where,
                        fix=f"GGUF export covers {', '.join(sorted(ARCHITECTURES))}; for others export --format hf "
                        "and run llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"rope scaling {kind!r} is not written by qlora's GGUF export", where=where,
                        fix="Export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    return arch


def _rope_freqs(config: PretrainedConfig, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency factors, as convert_hf_to_gguf computes the rope_freqs tensor."""
    import numpy as np

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(model_dir: str | Path, path: str | Path, quant: str, name: str) -> dict[str, Any]:
    """Write the model in `model_dir` (a Hugging Face folder) to the GGUF file `path`; returns what was written."""
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    quant = check_quant(quant)
    config = AutoConfig.from_pretrained(model_dir)
    arch = check_architecture(config, str(model_dir / "config.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = vocabulary(model_dir, tokenizer, config.vocab_size)
    plans = plan_tensors(model_dir, config, arch, quant)
    files = {k: f for k, (_, f) in _shapes(model_dir).items()}
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[TYPES[quant][1]])
    if quant not in FLOAT_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for key, tid in vocab.special.items():
        getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                         "pad": "add_pad_token_id", "sep": "add_sep_token_id"}[key])(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    extra: list[tuple[str, np.ndarray]] = []
    if kind == "llama3":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs(config, rope)))
    for tname, data in extra:
        writer.add_tensor_info(tname, data.shape, data.dtype, data.nbytes)
    for p in plans:
        qtype = gguf.GGMLQuantizationType[p.type]
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype) if p.type not in ("F32", "F16") else p.shape
        dtype = {"F32": np.float32, "F16": np.float16}.get(p.type, np.uint8)
        writer.add_tensor_info(p.name, byte_shape, dtype, p.nbytes, raw_dtype=None if p.type in ("F32", "F16")
                               else qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in extra:
        writer.write_tensor_data(data)
    for p in plans:
        writer.write_tensor_data(_tensor_data(p, files))
    writer.close()
    from collections import Counter

    return {"architecture": arch.lower(), "quant": quant, "tensors": len(plans) + len(extra),
            "tensor_types": dict(Counter(p.type for p in plans)), "tokenizer": vocab.model, "tokenizer_pre": vocab.pre,
            "add_bos": vocab.add_bos, "vocab_size": config.vocab_size, "bytes": path.stat().st_size}
