"""A local GGUF file as a base model: dequantized once into a cached Hugging Face folder.

`model.name_or_path: path/to/model.gguf` is all a recipe needs. The first command that needs the weights reads the
file with transformers' GGUF loader (architecture, weights, tokenizer, chat template), dequantizes every tensor to
bfloat16 (the dtype the 4-bit base computes in) and writes an ordinary folder (safetensors, tokenizer, generation
config) under ``$QLORA_CACHE/gguf/<name>-<sha256 prefix>/``, atomically. From then on train, eval, generate, merge and
export see a plain Hugging Face folder. Cost: about 30 s and 2 bytes per parameter of disk once per file (SmolLM2-135M:
270 MB; a 7B model: ~14.5 GB); later runs reuse the folder. Dry runs and footprints read only the file's header.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .run_dir import atomic_dir, atomic_write_text
from .tiny import cache_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FORMAT_VERSION = 1  # bump when the folder layout changes


def is_gguf(name: str | Path) -> bool:
    """Whether a model name is a GGUF file path."""
    return str(name).lower().endswith(".gguf")


def _check_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise UserError(f"GGUF file {str(path)!r} does not exist", where=key,
                        fix="Check the path (relative paths start where you run qlora)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')", where=key,
                        fix="Point model.name_or_path at a .gguf file or a Hugging Face model folder")


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered by (path, size, mtime) so a large file is hashed once."""
    path = path.resolve()
    stat = path.stat()
    memo_file = cache_dir() / "gguf" / "hashes.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo_file, json.dumps(memo, indent=1))
    return memo[key]


def describe(path: Path) -> dict[str, Any]:
    """Architecture, name and tensor types from the file's header (no weights are read)."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tensors": len(reader.tensors),
    }


def check_supported(path: Path, key: str = "model.name_or_path") -> dict[str, Any]:
    """The header of a GGUF file (checked by _check_file), or one clear error for an architecture or tensor type
    transformers cannot read."""
    import gguf
    from gguf.quants import _type_traits  # the types gguf-py can dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    info = describe(path)
    arch = info["architecture"]
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in readable:
        raise UserError(f"GGUF architecture {arch!r} of {path.name} cannot be read by transformers", where=key,
                        fix=f"Use a GGUF file of one of {', '.join(readable)}, or the model's Hugging Face folder")
    plain = {"F32", "F16", "BF16", "I8", "I16", "I32", "I64", "F64"}
    known = plain | {t.name for t in _type_traits}
    bad = sorted(t for t in info["tensor_types"] if t not in known)
    if bad:
        raise UserError(f"{path.name} holds tensors of type {', '.join(bad)}, which gguf {gguf.__version__} cannot "
                        "dequantize", where=key,
                        fix="Use a GGUF file quantized to F16, BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1 or a K-quant "
                        "(or upgrade the gguf package)")
    return info


def folder_for(path: Path, sha256: str | None = None) -> Path:
    """The cached Hugging Face folder of a GGUF file (it may not exist yet)."""
    return cache_dir() / "gguf" / f"{path.stem}-{(sha256 or file_sha256(path))[:16]}"


def ensure_hf_folder(path: str | Path, key: str = "model.name_or_path") -> Path:
    """The cached Hugging Face folder for a GGUF file, made on first use (about 30 s for a 135M model)."""
    path = Path(path).expanduser()
    _check_file(path, key)
    sha256 = file_sha256(path)
    folder = folder_for(path, sha256)
    if (folder / "qlora-gguf.json").is_file():
        return folder
    info = check_supported(path, key)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise UserError(f"transformers cannot read {path.name} ({type(e).__name__}: {str(e).splitlines()[0]})",
                        where=key, fix="Use the model's Hugging Face folder, or a GGUF file of a supported "
                        "architecture and tensor type") from None
    # A model loaded from GGUF keeps a `quantization_config` that save_pretrained refuses: rebuild it from a clean
    # config and copy the dequantized weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()
    del loaded
    generation = GenerationConfig.from_model_config(config)
    if tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(path.resolve()), "sha256": sha256, "bytes": path.stat().st_size,
                  "dequantized_to": "bfloat16", "seconds": round(time.perf_counter() - t0, 1),
                  "format_version": FORMAT_VERSION, **info}
        (tmp / "qlora-gguf.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def gguf_config(path: str | Path, key: str = "model.name_or_path") -> PretrainedConfig:
    """The architecture from the file's header alone (dry runs, footprints): no weights are dequantized."""
    from transformers import AutoConfig

    path = Path(path).expanduser()
    _check_file(path, key)
    folder = folder_for(path)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    check_supported(path, key)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a GGUF file (from the cached folder when it exists)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    folder = folder_for(path)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
