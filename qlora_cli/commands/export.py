"""`qlora export`: a fine-tune in the formats people deploy, checked after writing.

- ``--format gguf``: one GGUF file (qlora_cli/gguf_export.py) with an Ollama ``Modelfile`` and a model card beside
  it. A run or adapter is merged first by ``qlora merge``'s code (into a hidden folder that is removed afterwards).
- ``--format hf``: the merged safetensors folder of ``qlora merge``, with the vLLM / TGI commands that serve it.

The GGUF is verified before anything appears at ``--out``: it is loaded back by transformers' GGUF loader and, when
llama-cpp-python is installed, by llama.cpp itself, and compared with the merged model on rows of the run's data:
the same tokens, logits (float types: within a tight tolerance; quantized types: top-1 agreement and KL divergence
above/below stated thresholds) and greedy answers (float types: all identical). Output is written to a hidden
directory beside ``--out`` and renamed into place only when every check passed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from .. import __version__
from .. import gguf_export as gx
from .. import modelfile as mf
from ..errors import UserError
from ..recipe import Recipe, load_recipe
from ..run_dir import atomic_dir, check_writable
from . import merge as merge_cmd

if TYPE_CHECKING:
    import numpy as np

FORMATS = ("gguf", "hf")
EXPORT_INFO = "qlora_export.json"


@dataclass(frozen=True)
class Thresholds:
    """What a GGUF must reach against the merged model on the verification rows."""

    top1: float  # fraction of positions whose most likely next token is the same
    kl: float  # mean KL(merged || gguf) per position, in nats
    greedy: float | None  # fraction of prompts whose greedy answer (token ids) is identical (None: reported only)
    logit_rtol: float | None = None  # float types: largest logit difference / largest logit (transformers' loader)


# Float types hold the merged weights exactly (bf16 -> f16/f32 is exact) or rounded once: the logits must match and
# every greedy answer must be the same. Quantized types are checked for a broken file, not graded: a wrong tensor or
# tokenizer gives KL > 1 and top-1 < 50 %; these limits pass what llama.cpp's own quantizations give (llama.cpp
# computes Q8_0 products on 8-bit activations too, so it sees more error than the dequantized weights alone). Small
# models lose most at 4 bits: SmolLM2-135M's q4_0 (top-1 ~60 %) is refused; use q8_0 or q5 for them.
THRESHOLDS: dict[str, Thresholds] = {
    "f32": Thresholds(top1=0.99, kl=1e-3, greedy=1.0, logit_rtol=1e-4),
    "f16": Thresholds(top1=0.99, kl=1e-3, greedy=1.0, logit_rtol=1e-2),
    "bf16": Thresholds(top1=0.98, kl=5e-3, greedy=1.0, logit_rtol=5e-2),
    "q8_0": Thresholds(top1=0.90, kl=0.02, greedy=None),
    "q5_1": Thresholds(top1=0.80, kl=0.10, greedy=None),
    "q5_0": Thresholds(top1=0.80, kl=0.10, greedy=None),
    "q4_1": Thresholds(top1=0.70, kl=0.35, greedy=None),
    "q4_0": Thresholds(top1=0.70, kl=0.35, greedy=None),
}
MAX_TOKENS = 256  # longest verification text, in tokens
# Models up to this size are compared in fp32; larger ones in bf16 (the float types' weights are bf16 anyway).
FP32_CHECK_LIMIT = 2 * 10**9


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Source:
    """What is exported: an adapter (run or adapter directory, merged first) or a merged model folder."""

    path: Path
    kind: str  # "adapter" or "merged"
    recipe: Recipe | None
    adapter: merge_cmd.AdapterSource | None = None


def find_source(path: str | Path) -> Source:
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        recipe = load_recipe(path / "recipe.yaml") if (path / "recipe.yaml").is_file() else None
        return Source(path, "merged", recipe)
    adapter = merge_cmd.find_adapter(path)
    return Source(path, "adapter", adapter.recipe, adapter)


def parameter_count(source: Source, base: str | None) -> int:
    """Parameters of the model to export, from its config on the meta device (no weights read)."""
    from ..model import load_config, resolve_model_path
    from ..recipe import ModelConfig

    if source.kind == "merged":
        model_cfg, trust = ModelConfig(name_or_path=str(source.path)), False
    else:
        model_cfg, _ = merge_cmd.base_model_config(source.adapter, base)
        trust = model_cfg.trust_remote_code
    config = load_config(dataclasses.replace(model_cfg, name_or_path=resolve_model_path(model_cfg)))
    return sum(p.numel() for p in merge_cmd.meta_model(config, trust).parameters())


BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q5_1": 6, "q5_0": 5.5, "q4_1": 5, "q4_0": 4.5}


# ---------------------------------------------------------------------------------------- verification


@dataclass
class Rows:
    texts: list[str]  # whole examples, teacher-forced
    prompts: list[str]  # the prompt part, for greedy answers
    add_special: bool  # tokenize with the tokenizer's BOS/EOS (all formats but chat, whose template has them)
    described: str
    max_new_tokens: int


def verification_rows(recipe: Recipe | None, tokenizer: Any, n: int) -> Rows:
    """Held-out rows of the run's data formatted as in training; fixed sentences when there is no recipe or data."""
    from .. import data as datamod
    from .eval import select_rows

    if recipe is not None:
        try:
            try:
                rows = select_rows(recipe, "eval")
            except UserError:  # no held-out rows: the training rows still say what the model was taught
                rows = select_rows(recipe, "train")
        except UserError:
            rows = None
        if rows is not None and len(rows.rows):
            rows.rows = rows.rows.select(range(min(n, len(rows.rows))))
            if rows.format == "text":
                texts = [r["text"] for r in rows.rows]
                prompts = [t[: max(1, len(t) // 2)] for t in texts]
            else:
                pairs = [datamod.prompt_for_generation(rows.format, r, tokenizer) for r in rows.rows]
                prompts = [p for p, _ in pairs]
                texts = [p + a for p, a in pairs]
            return Rows(texts, prompts, rows.format != "chat", f"{len(texts)} rows of {rows.described}",
                        min(recipe.evaluation.max_new_tokens, 32))
    texts = merge_cmd.FALLBACK_PROMPTS
    return Rows(texts, texts, True, f"{len(texts)} fixed sentences (no recipe data)", 16)


@dataclass
class Check:
    """One loader's agreement with the merged model."""

    loader: str
    tokens_match: bool
    top1: float
    kl: float
    max_logit_diff: float
    logit_scale: float
    greedy: float
    greedy_same: int
    prompts: int
    greedy_ties: int = 0  # answers that differ only after a step where the merged model's top-2 were near-tied
    failures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float, float, float]:
    """(top-1 agreement, mean KL(ref || got), largest |logit difference|, largest |logit|) over all positions."""
    import numpy as np

    a, b = np.concatenate(ref).astype(np.float64), np.concatenate(got).astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return top1, kl, float(np.abs(a - b).max()), float(np.abs(a).max())


class HFRunner:
    """A transformers model (the merged folder, or the GGUF loaded by transformers), run in small batches."""

    batch = 4

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"][:MAX_TOKENS]

    def _padded(self, chunk: list[list[int]], left: bool) -> tuple[Any, Any]:
        import torch

        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, x in enumerate(chunk):
            at = slice(width - len(x), width) if left else slice(0, len(x))
            ids[j, at], mask[j, at] = torch.tensor(x), 1
        return ids, mask

    def logits_many(self, all_ids: list[list[int]]) -> list[np.ndarray]:
        """Next-token logits at every position of each sequence (right-padded batches)."""
        import torch

        out = []
        for i in range(0, len(all_ids), self.batch):
            chunk = all_ids[i:i + self.batch]
            ids, mask = self._padded(chunk, left=False)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float().numpy()
            out += [logits[j, :len(x)] for j, x in enumerate(chunk)]
        return out

    def greedy_many(self, all_ids: list[list[int]], n: int, eos: int | None) -> list[list[int]]:
        """Greedy continuations of up to `n` tokens, each cut after its first EOS (left-padded batches)."""
        return self.greedy_with_margins(all_ids, n, eos)[0]

    def greedy_with_margins(self, all_ids: list[list[int]], n: int,
                            eos: int | None) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy continuations, and at each step the gap between the chosen token's logit and the runner-up's."""
        import torch

        out, margins = [], []
        for i in range(0, len(all_ids), self.batch):
            ids, mask = self._padded(all_ids[i:i + self.batch], left=True)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          eos_token_id=eos, pad_token_id=self.pad, output_logits=True,
                                          return_dict_in_generate=True)
            top2 = torch.stack(gen.logits, 1).float().topk(2, dim=-1).values  # (batch, steps, 2)
            for j, row in enumerate(gen.sequences[:, ids.shape[1]:].tolist()):
                row = row[: row.index(eos) + 1] if eos in row else row
                out.append(row)
                margins.append((top2[j, :len(row), 0] - top2[j, :len(row), 1]).tolist())
        return out, margins


class LlamaCppRunner:
    """The GGUF run by llama.cpp (llama-cpp-python)."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=MAX_TOKENS + 64, logits_all=True, verbose=False,
                         n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)[:MAX_TOKENS]

    def logits_many(self, all_ids: list[list[int]]) -> list[np.ndarray]:
        import numpy as np

        out = []
        for ids in all_ids:
            self.llm.reset()
            self.llm.eval(ids)
            out.append(np.array(self.llm.scores[: len(ids)], dtype=np.float32))
        return out

    def greedy_many(self, all_ids: list[list[int]], n: int, eos: int | None) -> list[list[int]]:
        import numpy as np

        answers = []
        for ids in all_ids:
            self.llm.reset()
            self.llm.eval(ids)
            out: list[int] = []
            for _ in range(n):
                token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
                out.append(token)
                if token == eos:
                    break
                self.llm.eval([token])
            answers.append(out)
        return answers


def _parting_margin(a: list[int], b: list[int], margins: list[float]) -> float:
    """The merged model's top-2 logit gap at the first step where answer `a` leaves its answer `b`."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return margins[k] if k < len(margins) else float("inf")


# llama.cpp's SentencePiece tokenizer puts "▁" before the text after every special token, as sentencepiece does;
# transformers 5's LlamaTokenizer only at the start of the text. Rows where that is the difference are reported.
SPM_PREFIX_NOTE = ("llama.cpp adds SentencePiece's '▁' prefix after special tokens (as sentencepiece does), where "
                   "this Hugging Face tokenizer does not; the weights are checked on the Hugging Face tokens")


def check_against(name: str, reference: HFRunner, candidate: Any, rows: Rows, eos: int | None,
                  limits: Thresholds, float_type: bool, ref_cache: dict[str, Any],
                  sentencepiece: bool = False) -> Check:
    """Tokens, logits and greedy answers of `candidate` against the merged model, with the failures found.

    Logits and greedy answers are computed on the Hugging Face tokenizer's ids, so a tokenizer difference and a
    weight difference are told apart."""
    ids = [reference.tokenize(t, rows.add_special) for t in rows.texts]
    cand_ids = [candidate.tokenize(t, rows.add_special) for t in rows.texts]
    tokens_match = ids == cand_ids
    if "logits" not in ref_cache:
        ref_cache["logits"] = reference.logits_many(ids)
        prompt_ids = [reference.tokenize(p, rows.add_special) for p in rows.prompts]
        ref_cache["prompt_ids"] = prompt_ids
        ref_cache["greedy"], ref_cache["margins"] = reference.greedy_with_margins(prompt_ids, rows.max_new_tokens,
                                                                                 eos)
    top1, kl, diff, scale = _compare(ref_cache["logits"], candidate.logits_many(ids))
    answers = candidate.greedy_many(ref_cache["prompt_ids"], rows.max_new_tokens, eos)
    same = sum(a == b for a, b in zip(answers, ref_cache["greedy"]))
    # An answer that parts from the merged model's where the merged model itself was undecided (its two best tokens
    # closer than the logit differences measured above) is a tie broken the other way, not a wrong file.
    ties = sum(a != b and _parting_margin(a, b, m) <= diff
               for a, b, m in zip(answers, ref_cache["greedy"], ref_cache["margins"]))
    check = Check(name, tokens_match, top1, kl, diff, scale, (same + ties) / len(answers), same, len(answers), ties)
    if not tokens_match:
        differ = [i for i, (a, b) in enumerate(zip(ids, cand_ids)) if a != b]
        text = (f"{name} tokenizes {len(differ)} of {len(ids)} rows differently from the Hugging Face tokenizer "
                f"(first: row {differ[0] + 1}")
        if sentencepiece and name == "llama.cpp":
            check.warnings.append(f"{text}; {SPM_PREFIX_NOTE})")
        else:
            check.failures.append(text + ")")
    if float_type and limits.logit_rtol is not None and name == "transformers":
        tolerance = limits.logit_rtol * max(scale, 1.0)
        if diff > tolerance:
            check.failures.append(f"logits differ by up to {diff:.4g} (tolerance {tolerance:.4g})")
    if top1 < limits.top1:
        check.failures.append(f"top-1 agreement {top1:.1%} is below {limits.top1:.1%}")
    if kl > limits.kl:
        check.failures.append(f"mean KL divergence {kl:.4g} is above {limits.kl:g}")
    if limits.greedy is not None and check.greedy < limits.greedy:
        check.failures.append(f"{same}/{len(answers)} greedy answers are identical ({ties} more part at a near-tie), "
                              f"below {limits.greedy:.0%}")
    return check


def verify_gguf(gguf_file: Path, merged_dir: Path, quant: str, rows: Rows, console: Console,
                llama_cpp: bool = True, sentencepiece: bool = False) -> list[Check]:
    """Load the GGUF back (transformers, and llama.cpp when installed) and compare it with the merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limits = THRESHOLDS[quant]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    weights = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))  # 2 bytes a parameter in bf16
    dtype = torch.float32 if weights <= 2 * FP32_CHECK_LIMIT else torch.bfloat16  # 2 fp32 copies of 7B: ~58 GB
    reference = HFRunner(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval(), tokenizer)
    eos = tokenizer.eos_token_id
    cache: dict[str, Any] = {}
    float_type = quant in gx.FLOAT_TYPES
    kwargs = {"gguf_file": gguf_file.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=dtype, **kwargs).eval()
        loaded_tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to read the file back is the finding
        raise UserError(f"transformers cannot read the written GGUF back ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); nothing was written", where="--out",
                        fix="Report this with the model's config.json; --format hf still works") from None
    checks = [check_against("transformers", reference, HFRunner(loaded, loaded_tok), rows, eos, limits,
                            float_type, cache)]
    del loaded
    if llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        checks.append(check_against("llama.cpp", reference, LlamaCppRunner(gguf_file), rows, eos, limits,
                                    float_type, cache, sentencepiece))
    elif llama_cpp:
        console.print("[yellow]note:[/] llama.cpp check skipped: llama-cpp-python is not installed "
                      "(pip install llama-cpp-python)", highlight=False)
    for c in checks:
        verdict = "[bold red]FAILED[/]" if c.failures else "[green]ok[/]"
        console.print(f"  {c.loader:<12} tokens {'same' if c.tokens_match else 'DIFFERENT'}, top-1 {c.top1:.1%}, "
                      f"KL {c.kl:.2e}, max logit diff {c.max_logit_diff:.3g} (of {c.logit_scale:.3g}), greedy "
                      f"answers {c.greedy_same}/{c.prompts} identical"
                      + (f" (+{c.greedy_ties} at near-ties)" if c.greedy_ties else "") + f": {verdict}",
                      highlight=False)
        for w in c.warnings:
            console.print(f"  [yellow]note:[/] {w}", highlight=False)
    return checks


# ------------------------------------------------------------------------------------------------ writing


def serve_commands(kind: str, out: Path, base: str | None = None, adapter: Path | None = None) -> list[str]:
    """Commands that serve what was exported."""
    if kind == "gguf":
        return [f"llama-server -m {out}", f"cd {out.parent} && ollama create {out.parent.name} -f Modelfile"]
    lines = [f"vllm serve {out}",
             f"docker run --gpus all -p 8080:80 -v {out.resolve()}:/model "
             "ghcr.io/huggingface/text-generation-inference --model-id /model"]
    if base and adapter:
        lines.append(f"vllm serve {base} --enable-lora --lora-modules adapter={adapter.resolve()}  "
                     "# the adapter alone, on its base")
    return lines


def _greedy_rule(t: dict[str, Any]) -> str:
    rule = ", every greedy answer identical" if t["greedy"] == 1.0 else ""
    return rule + (f", logits within {t['logit_rtol']:g} x the largest logit (transformers)" if t["logit_rtol"] else "")


def write_card(directory: Path, name: str, info: dict[str, Any]) -> None:
    checks = "\n".join(
        f"| {c['loader']} | {'same' if c['tokens_match'] else 'different'} | {c['top1']:.1%} | {c['kl']:.2e} | "
        f"{c['max_logit_diff']:.3g} | {c['greedy_same']}/{c['prompts']} |" for c in info["verification"])
    t = info["thresholds"]
    notes = "".join(f"\nNote ({c['loader']}): {w}.\n" for c in info["verification"] for w in c.get("warnings", []))
    text = f"""---
base_model: {info["base"]}
tags:
- gguf
- qlora
---

# {name}

`{info["file"]}`: a LoRA fine-tune merged into its base and written as GGUF ({info["quant"]}) by `qlora export`
(qlora {__version__}); {info["bytes"] / 1e6:.1f} MB, architecture `{info["architecture"]}`, tokenizer pre-type
`{info["tokenizer_pre"]}`.

```
llama-server -m {info["file"]}
ollama create {name} -f Modelfile && ollama run {name}
```

Checked against the merged model on {info["verification_rows"]} before this folder was written:

| loader | tokens | top-1 agreement | mean KL | max logit diff | greedy answers identical |
|---|---|---|---|---|---|
{checks}

Thresholds for {info["quant"]}: top-1 >= {t["top1"]:.1%}, KL <= {t["kl"]:g}{_greedy_rule(t)}.
{notes}"""
    (directory / "README.md").write_text(text, encoding="utf-8")


def export(path: str | Path, out: str | Path, fmt: str = "gguf", quant: str = "f16", base: str | None = None,
           overwrite: bool = False, rows: int = 16, llama_cpp: bool = True,
           console: Console | None = None) -> dict[str, Any]:
    """Export the run, adapter or merged folder `path` to `out` as GGUF or a merged Hugging Face folder."""
    console = console or Console()
    out = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported", where="--format", fix="Use gguf or hf")
    if fmt == "gguf":
        quant = gx.check_quant(quant)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", where="--out", fix="Choose another directory or pass --overwrite")
    if out.suffix.lower() == ".gguf":
        raise UserError(f"--out {out} names a file; export writes a folder (the GGUF, a Modelfile, a model card)",
                        where="--out", fix=f"Give a directory, e.g. --out {out.with_suffix('')}")
    if rows < 1:
        raise UserError(f"--rows {rows} is not a positive number of rows", where="--rows", fix="Use --rows 1 or more")
    source = find_source(path)
    check_writable(out.parent)

    if fmt == "hf":
        if source.kind == "merged":
            raise UserError(f"{source.path} is already a merged Hugging Face folder", where=str(source.path),
                            fix=f"Serve it as it is (vllm serve {source.path}), or export it with --format gguf")
        info = merge_cmd.merge(path, out, base=base, overwrite=overwrite, console=console)
        console.print("Serve it with:", highlight=False)
        for line in serve_commands("hf", out, info["base_path"], source.adapter.adapter):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        return info

    t0 = time.perf_counter()
    parameters = parameter_count(source, base)
    gguf_bytes = int(parameters * BITS[quant] / 8 * 1.01) + 20 * 10**6
    merged_bytes = parameters * (4 if quant == "f32" else 2) if source.kind == "adapter" else 0
    merge_cmd.check_disk(out, gguf_bytes + merged_bytes,
                         f"the {quant} export (the merged model and the GGUF)",
                         fix="Free some space, choose --out on a larger disk, or pick a smaller --quant")
    console.print(f"Exporting {source.path} ({source.kind}, {parameters:,} parameters) to GGUF {quant}: about "
                  f"{merge_cmd.fmt_bytes(gguf_bytes)}", highlight=False)
    merged_tmp = out.parent / f".{out.name}.merged-{os.getpid()}"
    try:
        if source.kind == "adapter":
            merge_cmd.merge(path, merged_tmp, base=base, dtype="fp32" if quant == "f32" else "bf16",
                            overwrite=True, console=_merge_console(console))
            merged = merged_tmp
        else:
            merged = source.path
        info = _write_gguf_folder(source, merged, out, quant, rows, overwrite, llama_cpp, console)
    finally:
        shutil.rmtree(merged_tmp, ignore_errors=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    console.print(f"Saved {out / info['file']} ({merge_cmd.fmt_bytes(info['bytes'])}) in {info['seconds']:.1f} s. "
                  "Run it with:", highlight=False)
    for line in serve_commands("gguf", out / info["file"]):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    return info


def _merge_console(console: Console) -> Console:
    """A console for the merge step that passes on its verification line only (its folder is temporary)."""
    import io

    class MergeConsole(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            text = " ".join(str(o) for o in objects)
            if text.startswith(("Merging", "Verification")):
                console.print(text, **kwargs)

    return MergeConsole(file=io.StringIO())


def _write_gguf_folder(source: Source, merged: Path, out: Path, quant: str, n_rows: int, overwrite: bool,
                       llama_cpp: bool, console: Console) -> dict[str, Any]:
    """GGUF + Modelfile + README.md into a hidden folder, verified, then renamed to `out`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    name = out.name
    file = f"{name}.gguf" if name.lower().endswith(quant) else f"{name}-{quant}.gguf"
    rows = verification_rows(source.recipe, tokenizer, n_rows)
    base = json.loads((merged / merge_cmd.MERGE_INFO).read_text()).get("base") \
        if (merged / merge_cmd.MERGE_INFO).is_file() else str(merged)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        written = gx.write_gguf(merged, tmp / file, quant, name)
        seconds = time.perf_counter() - t0
        console.print(f"Wrote {file} in {seconds:.1f} s ({merge_cmd.fmt_bytes(written['bytes'])}; "
                      f"{written['tensor_types']}); verifying on {rows.described}:", highlight=False)
        checks = verify_gguf(tmp / file, merged, quant, rows, console, llama_cpp, written["tokenizer"] == "llama")
        failures = [f"{c.loader}: {f}" for c in checks for f in c.failures]
        if failures:
            raise UserError(f"the {quant} GGUF does not match the merged model ({'; '.join(failures)}); nothing was "
                            "written", where="--out", fix="Try a wider type (--quant q8_0 or f16); if f16 fails, "
                            "report it with the model's config.json")
        fmt = source.recipe.data.format if source.recipe else None
        if fmt == "auto" and source.recipe is not None:
            from .eval import resolve_format

            fmt = resolve_format(source.recipe)
        template = source.recipe.data.prompt_template if source.recipe else None
        modelfile = mf.build(tokenizer, fmt, template, written["add_bos"])
        template_ok = _check_template(modelfile, tokenizer, fmt, template)
        if not template_ok:
            note = "TEMPLATE does not reproduce the training format exactly; check it before use."
            modelfile.notes.append(note)
            console.print(f"[yellow]warning:[/] the Modelfile's {note}", highlight=False)
        (tmp / "Modelfile").write_text(modelfile.text(file), encoding="utf-8")
        info = {**written, "file": file, "base": base, "source": str(source.path.resolve()),
                "export_seconds": round(seconds, 1), "verification_rows": rows.described,
                "verification": [c.to_dict() for c in checks],
                "thresholds": dataclasses.asdict(THRESHOLDS[quant]), "modelfile_template_checked": template_ok,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "qlora_version": __version__}
        write_card(tmp, name, info)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _check_template(modelfile: mf.Modelfile, tokenizer: Any, fmt: str | None, template: str | None) -> bool:
    """The Modelfile's TEMPLATE renders a conversation (or a prompt) as training formatted it."""
    if fmt in ("prompt_completion", "alpaca"):
        prompt = "How do I reset my pin?"
        if fmt == "alpaca":
            from ..data import ALPACA_TEMPLATE_NO_INPUT

            want = (template or ALPACA_TEMPLATE_NO_INPUT).format(instruction=prompt, input="")
        else:
            want = (template or "{prompt}").format(prompt=prompt)
        return mf.render(modelfile.template, [], prompt=prompt) == want
    if "{{ range" not in modelfile.template:
        return True
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "What can you do?"}]
    want = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    got = mf.render(modelfile.template, convo, system=modelfile.system)
    return got == want or (bos and want.startswith(bos) and got == want[len(bos):])
