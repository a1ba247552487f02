"""`qlora eval` and `qlora generate`: how good is the fine-tune, and what does it answer.

`qlora eval` takes a run directory, an adapter directory or a merged model directory and reports, on the
recipe's evaluation rows (or `--data`), formatted exactly as in training:

- **loss and perplexity**: mean cross-entropy over the tokens that carry loss in training (the completion, or
  the assistant turns), the same masks as training; perplexity = exp(loss);
- **generation metrics** for prompt -> answer data: batched greedy answers, normalised as the recipe's
  `evaluation` section says (first line, strip, lowercase), scored by exact-match accuracy and macro-F1 with
  per-class scores and the most confused pairs;
- with `--compare-base`, the same for the untrained base (the adapter switched off), side by side.

Results go to `eval.json` in the evaluated directory and the run's loss curve is redrawn to `loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import __version__, scoring
from .. import data as datamod
from ..errors import UserError
from ..recipe import DataConfig, EvaluationConfig, ModelConfig, Recipe, load_recipe, parse_override, recipe_from_dict
from ..run_dir import RunDir, atomic_write_json
from ..scoring import Generation, Scores, generate, normalize, score
from .merge import MERGE_INFO, AdapterSource, check_adapter_fits, find_adapter, meta_model

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


# ------------------------------------------------------------------------------------------------ target


@dataclass
class Target:
    """What is evaluated: an adapter (on its base) or a merged model, and the recipe that describes its data."""

    kind: str  # "adapter" or "merged"
    path: Path  # the adapter directory or the merged model directory
    run: RunDir | None
    recipe: Recipe
    base: ModelConfig  # the base model (for an adapter: what it is loaded on; for a merged model: --compare-base)
    adapter: AdapterSource | None = None
    base_from: str = "model.name_or_path"  # where the base was named, for error messages

    @property
    def results_dir(self) -> Path:
        return self.run.path if self.run is not None else self.path


def _recipe_with(raw: dict[str, Any], overrides: list[str] | None) -> Recipe:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return recipe_from_dict(raw)


def resolve_target(path: str | Path, recipe_file: str | Path | None = None, data: str | None = None,
                   overrides: list[str] | None = None) -> Target:
    """The model behind `path` and the recipe whose data and evaluation sections apply.

    The recipe is the run's (or the merged model's copy of it); `--recipe` replaces its data and evaluation
    sections; `--set` overrides keys of either. A directory without a recipe needs `--recipe` or `--data`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist", where="PATH",
                        fix="Give a run directory, an adapter directory or a merged model directory")
    own: Recipe | None = None
    source: AdapterSource | None = None
    is_model = (path / "config.json").is_file()
    if (path / "adapter_config.json").is_file() or (path / "adapter").is_dir() or (
            RunDir(path).recipe.is_file() and not is_model):
        source = find_adapter(path, overrides)
        kind, model_path, run, own = "adapter", source.adapter, source.run, source.recipe
        base = own.model if own else ModelConfig(name_or_path=source.recorded_base or "")
    elif is_model:
        kind, model_path, run = "merged", path, None
        if (path / "recipe.yaml").is_file():
            own = load_recipe(path / "recipe.yaml", overrides)
        info = _merge_info(path)
        base = ModelConfig(name_or_path=info.get("base_path") or info.get("base") or "") if info else (
            own.model if own else ModelConfig(name_or_path=""))
    else:
        raise UserError(f"{path} is neither a run, an adapter nor a model directory", where=str(path),
                        fix="Give a directory written by qlora train or qlora merge (or any model directory)")

    if recipe_file is not None:
        given = load_recipe(recipe_file, overrides)
        own = dataclasses.replace(own, data=given.data, evaluation=given.evaluation) if own else given
        if not base.name_or_path:
            base = given.model
    if own is None:
        if not data:
            raise UserError(f"{path} has no recipe.yaml to say what data and format to evaluate on",
                            where=str(path), fix="Pass --recipe RECIPE.yaml, or --data FILE")
        own = _recipe_with({"model": {"name_or_path": base.name_or_path or str(path)}, "data": {"source": data}},
                           overrides)
    if kind == "adapter" and not base.name_or_path:
        raise UserError("the adapter does not say which base model it belongs to", where=str(model_path),
                        fix="Pass --recipe with the model section of the run that trained it")
    base_from = f"{run.recipe} model.name_or_path" if run is not None else str(model_path)
    if any(o.strip().startswith("model.name_or_path=") for o in overrides or []):
        base_from = "--set model.name_or_path"
    return Target(kind, model_path, run, own, base, source, base_from)


def check_adapter_base(target: Target) -> None:
    """Before any weight is read: the adapter's matrices must fit the base it is about to be loaded on."""
    from ..model import load_config, resolve_model_path

    if target.adapter is None:
        return
    try:
        config = load_config(dataclasses.replace(target.base, name_or_path=resolve_model_path(target.base)))
    except UserError as e:
        raise UserError(e.message, where=target.base_from, fix=e.fix) from None
    skeleton = meta_model(config, target.base.trust_remote_code)
    check_adapter_fits(target.adapter, skeleton, target.base.name_or_path, target.base_from,
                       fix="Evaluate it on the model it was trained on ({trained_on}): set model.name_or_path to it")


def _merge_info(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MERGE_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# -------------------------------------------------------------------------------------------------- data


@dataclass
class EvalData:
    format: str
    rows: Dataset  # canonical rows: {prompt, completion}, {messages} or {text}
    described: str  # where they come from, e.g. "data/eval.jsonl" or "data/train.jsonl (0.1 held out, seed 42)"
    skipped: int = 0  # invalid rows left out
    row_numbers: list[int] = field(default_factory=list)  # 0-based row of each row in its source file(s)
    total: int = 0  # rows before --limit
    sampling: dict[str, Any] | None = None  # how --limit chose the rows: method, seed, classes

    @property
    def note(self) -> str:
        return f" ({self.skipped} invalid skipped)" if self.skipped else ""

    @property
    def count_text(self) -> str:
        """`60 rows`, or with --limit e.g. `400 of 3,080 rows, stratified by answer across 77 classes (seed 42)`."""
        if self.sampling is None:
            return f"{len(self.rows):,} rows"
        how = (f"stratified by answer across {self.sampling['classes']} classes"
               if self.sampling["method"] == "stratified" else "a random sample")
        return f"{len(self.rows):,} of {self.total:,} rows, {how} (seed {self.sampling['seed']})"


def select_rows(recipe: Recipe, split: str = "eval", data: str | None = None) -> EvalData:
    """The rows to evaluate, in the training format, with their row numbers in the source file(s).

    `split` is `eval` (the recipe's held-out rows: eval_source, eval_split or the eval_fraction hold-out),
    `train` (the training rows), or the name of a split of the recipe's hub dataset (e.g. `test`).
    With `data`, every row of that file (or the `split` of that hub dataset) is used instead.
    """
    cfg = recipe.data
    if data is not None:
        local = Path(data).exists() or Path(data).suffix.lower() in datamod.EXTENSIONS or any(c in data for c in "*?[")
        if not local and split in ("eval", "train"):
            raise UserError(f"--data {data!r} looks like a hub dataset; name its split", where="--split",
                            fix="Pass e.g. --split test")
        raw = datamod.load_source(data, cfg.subset, "train" if local else split, key="--data")
        fmt, rows, skipped = datamod.format_rows(cfg, raw, data)
        numbers = _kept_rows(cfg, fmt, skipped, len(rows), lambda: raw)
        described = f"{data}" + ("" if local else f" ({split} split)")
    elif split in ("eval", "train"):
        formatted = datamod.load_rows(cfg, recipe.training.seed)
        fmt, rows, skipped = formatted.format, formatted.train, formatted.skipped
        described = f"{_names(cfg.source)} (training rows)"
        kept = len(rows) + (len(formatted.eval) if cfg.eval_fraction and formatted.eval is not None else 0)
        numbers = _kept_rows(cfg, fmt, skipped, kept, lambda: _training_source(cfg))
        if split == "eval":
            if formatted.eval is None:
                raise UserError("the recipe has no evaluation rows", where="data.eval_source",
                                fix="Pass --data FILE, --split train, or set data.eval_source, data.eval_split "
                                "or data.eval_fraction")
            rows, skipped = formatted.eval, formatted.eval_skipped
            if cfg.eval_fraction:
                described = f"{_names(cfg.source)} ({cfg.eval_fraction:g} held out, seed {recipe.training.seed})"
            else:
                eval_source = cfg.eval_source or cfg.source
                numbers = _kept_rows(cfg, fmt, skipped, len(rows), lambda: datamod.load_source(
                    eval_source, cfg.subset, cfg.eval_split or "train", key="data.eval_source"))
                described = _names(eval_source) + (f" ({cfg.eval_split} split)" if cfg.eval_split else "")
        if cfg.eval_fraction:  # load_rows held rows out with train_test_split, a permutation fixed by count + seed
            from datasets import Dataset

            parts = Dataset.from_dict({"n": list(range(kept))}).train_test_split(
                test_size=cfg.eval_fraction, seed=recipe.training.seed)
            numbers = [numbers[i] for i in parts["test" if split == "eval" else "train"]["n"]]
    else:
        source = cfg.eval_source or cfg.source
        raw = datamod.load_source(source, cfg.subset, split, key="--split")
        fmt, rows, skipped = datamod.format_rows(cfg, raw, _names(source))
        numbers = _kept_rows(cfg, fmt, skipped, len(rows), lambda: raw)
        described = f"{_names(source)} ({split} split)"
    return EvalData(fmt, rows, described, skipped, numbers, len(rows))


def _training_source(cfg: DataConfig) -> Dataset:
    """The recipe's training rows as load_rows reads them, before formatting (data.max_rows applied)."""
    raw = datamod.load_source(cfg.source, cfg.subset, cfg.split)
    return raw.select(range(min(cfg.max_rows, len(raw)))) if cfg.max_rows else raw


def _kept_rows(cfg: DataConfig, fmt: str, skipped: int, kept: int, load: Callable[[], Dataset]) -> list[int]:
    """0-based source row numbers of the `kept` rows that format_rows kept; it leaves out invalid rows."""
    if not skipped:
        return list(range(kept))
    raw = datamod.map_columns(load(), cfg.columns, "data.columns")
    return [i for i, row in enumerate(raw) if datamod._row_problem(fmt, row) is None]


def sample_rows(count: int, limit: int, seed: int, answers: list[str] | None = None) -> tuple[list[int], int]:
    """(positions of min(limit, count) of `count` rows, drawn reproducibly with `seed`, ascending; the number of
    classes the sample is stratified over, 0 for a plain sample).

    When the rows are prompt -> short-answer pairs (`answers` given, at least two rows per distinct answer on
    average) the sample is stratified by answer: with `limit` at most the number of classes, one row of each of
    `limit` classes taken in seeded order; otherwise one row of every class and the rest shared in proportion
    to each class's remaining rows (largest remainders first), so the sample keeps the file's class mix and
    every class appears. Other rows (text, free-form answers) get a plain seeded sample.
    """
    rng = random.Random(seed)
    limit = min(limit, count)
    if answers is None or len(set(answers)) > count // 2:
        return sorted(rng.sample(range(count), limit)), 0
    by_class: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        by_class.setdefault(answer, []).append(i)
    classes = list(by_class)
    rng.shuffle(classes)
    if limit <= len(classes):
        return sorted(rng.choice(by_class[c]) for c in classes[:limit]), len(classes)
    spare = limit - len(classes)
    left = {c: len(by_class[c]) - 1 for c in classes}
    quota = {c: spare * left[c] / sum(left.values()) for c in classes}
    take = {c: 1 + int(quota[c]) for c in classes}
    for c in sorted(classes, key=lambda c: quota[c] - int(quota[c]), reverse=True)[:limit - sum(take.values())]:
        take[c] += 1
    return sorted(i for c in classes for i in rng.sample(by_class[c], take[c])), len(classes)


def limit_rows(rows: EvalData, limit: int, seed: int, answers: list[str] | None) -> tuple[EvalData, list[int]]:
    """(`rows` cut to a sample of `limit` chosen by `sample_rows`, in file order; the positions kept)."""
    chosen, classes = sample_rows(len(rows.rows), limit, seed, answers)
    chosen.sort(key=rows.row_numbers.__getitem__)  # file order (the eval_fraction hold-out is shuffled)
    sampling = {"method": "stratified" if classes else "random", "seed": seed, "limit": limit}
    if classes:
        sampling["classes"] = classes
    return dataclasses.replace(rows, rows=rows.rows.select(chosen), sampling=sampling,
                               row_numbers=[rows.row_numbers[i] for i in chosen]), chosen


def _names(source: str | list[str]) -> str:
    return source if isinstance(source, str) else ", ".join(source)


# ------------------------------------------------------------------------------------------------ models


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer_for(target: Target) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the weights (the one training used), else the base's."""
    from ..model import load_tokenizer

    if (target.path / "tokenizer_config.json").is_file():
        return load_tokenizer(dataclasses.replace(target.recipe.model, tokenizer=str(target.path), revision=None))
    return load_tokenizer(target.base if target.kind == "adapter" else target.recipe.model)


def load_adapter_model(target: Target) -> Any:
    """The base loaded as training loaded it (4-bit when the recipe's quantization says so) + the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..model import bnb_config, compute_dtype, resolve_model_path, resolve_precision, visible_device

    check_adapter_base(target)
    dev = visible_device()
    precision = resolve_precision(target.recipe.training, dev)
    attention = target.base.attn_implementation
    attention = "sdpa" if attention == "auto" else attention  # `auto` picks a kernel for packed training only
    dtype = compute_dtype(target.recipe.quantization, precision)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(target.base), dtype=dtype, quantization_config=bnb_config(target.recipe.quantization, dtype),
        attn_implementation=attention, revision=target.base.revision,
        trust_remote_code=target.base.trust_remote_code, device_map={"": 0 if dev.is_cuda else "cpu"},
    )
    model = PeftModel.from_pretrained(model, str(target.path))
    model.eval()
    return model


def load_plain_model(path: str, model_cfg: ModelConfig | None = None, dtype: Any = "auto") -> Any:
    """A merged (or any plain) checkpoint in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    from ..model import resolve_model_path

    kwargs: dict[str, Any] = {}
    if model_cfg is not None:
        path = resolve_model_path(model_cfg)
        kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    device = _device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"},
                                                 **kwargs)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------- metrics


def mean_loss(model: Any, tokenized: Dataset, fmt: str, max_length: int, batch_size: int,
              pad_id: int) -> tuple[float, int]:
    """(mean cross-entropy per loss-carrying token, number of such tokens), with training's masks and truncation."""
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    key = datamod.mask_key(fmt)
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start:start + batch_size]
        ids = [list(x[:max_length]) for x in chunk["input_ids"]]
        masks = [list(m[:max_length]) for m in chunk[key]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        for j, (x, m) in enumerate(zip(ids, masks)):
            row = torch.tensor(x, dtype=torch.long)
            input_ids[j, :len(x)] = row
            attention[j, :len(x)] = 1
            labels[j, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), row, -100)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        targets = labels[:, 1:].to(device)
        keep = targets != -100
        if keep.any():
            total += F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum").item()
            count += int(keep.sum().item())
    return (total / count if count else float("nan")), count


@dataclass
class ModelResult:
    label: str
    loss: float
    perplexity: float
    loss_tokens: int
    scores: Scores | None = None
    predictions: list[str] | None = None
    stopped: float | None = None  # share of answers the model ended itself (EOS) before max_new_tokens
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss, "perplexity": self.perplexity, "loss_tokens": self.loss_tokens,
                               "seconds": round(self.seconds, 2)}
        if self.scores is not None:
            out.update(self.scores.to_dict())
            out["stopped"] = self.stopped
            out["predictions"] = self.predictions
        return out


def evaluate_model(label: str, model: Any, tokenizer: PreTrainedTokenizerBase, data: EvalData,
                   tokenized: Dataset, prompts: list[str] | None, references: list[str] | None,
                   recipe: Recipe, console: Console) -> ModelResult:
    """Loss and perplexity, and (for prompt -> answer data) generation scores of one model."""
    cfg = recipe.evaluation
    t0 = time.perf_counter()
    with console.status(f"{label}: loss on {len(tokenized):,} rows") if console.is_terminal else nullcontext():
        loss, tokens = mean_loss(model, tokenized, data.format, recipe.data.max_length, cfg.batch_size,
                                 tokenizer.pad_token_id)
    result = ModelResult(label, loss, math.exp(loss) if loss < 700 else float("inf"), tokens)
    if prompts is not None and references is not None:
        answers = generate_answers(label, model, tokenizer, prompts, cfg, data.format != "chat", console)
        result.predictions = [normalize(a.text, cfg) for a in answers]
        result.stopped = sum(a.stopped for a in answers) / len(answers) if answers else None
        result.scores = score(result.predictions, references)
    result.seconds = time.perf_counter() - t0
    return result


def generate_answers(label: str, model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     cfg: EvaluationConfig, add_special_tokens: bool, console: Console) -> list[Generation]:
    answers: list[Generation] = []
    with Progress(TextColumn(f"[bold]{label}[/] generating"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("generate", total=len(prompts))
        for i in range(0, len(prompts), cfg.batch_size):
            answers.extend(scoring.generate_answers(model, tokenizer, prompts[i:i + cfg.batch_size], cfg,
                                                    add_special_tokens))
            progress.update(task, completed=len(answers))
    return answers


def normalization_text(cfg: EvaluationConfig) -> str:
    steps = [s for s, on in (("first line", cfg.first_line), ("strip", cfg.strip), ("lowercase", cfg.lowercase)) if on]
    return (", ".join(steps) or "none") + ("" if cfg.lowercase else ", case-sensitive")


# ----------------------------------------------------------------------------------------------- command


def evaluate(path: str | Path, recipe_file: str | Path | None = None, data: str | None = None, split: str = "eval",
             compare_base: bool = False, limit: int | None = None, overrides: list[str] | None = None,
             console: Console | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate a run, adapter or merged model; print the report, write eval.json and return its content."""
    console = console or Console()
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit} is not a positive number of rows", where="--limit",
                        fix="Use --limit 1 or more")
    target = resolve_target(path, recipe_file, data, overrides)
    recipe = target.recipe
    rows = select_rows(recipe, split, data)
    tokenizer = load_tokenizer_for(target)
    labelled = rows.format != "text"
    prompts = references = None
    if labelled:
        pairs = [datamod.prompt_for_generation(rows.format, r, tokenizer) for r in rows.rows]
        prompts = [p for p, _ in pairs]
        references = [normalize(a, recipe.evaluation) for _, a in pairs]
    if limit is not None and limit < len(rows.rows):
        rows, chosen = limit_rows(rows, limit, recipe.training.seed, references)
        if labelled:
            prompts, references = [prompts[i] for i in chosen], [references[i] for i in chosen]
    tokenized, stats = datamod.tokenize(rows.format, rows.rows, tokenizer, recipe.data.max_length)
    name = target.run.path if target.run else target.path
    what = f"adapter on {target.base.name_or_path}" if target.kind == "adapter" else "merged model"
    console.print(f"Evaluating {name} ({what}) on {rows.described}, {rows.count_text}{rows.note}; "
                  f"format {rows.format}", highlight=False)
    if stats.truncated:
        console.print(f"[yellow]note:[/] {stats.truncated} row(s) are longer than data.max_length="
                      f"{recipe.data.max_length} and are truncated as in training", highlight=False)
    if labelled:
        console.print(f"Answers: greedy, up to {recipe.evaluation.max_new_tokens} new tokens, compared after "
                      f"{normalization_text(recipe.evaluation)} (evaluation.* in the recipe; change with --set)",
                      highlight=False)

    results: dict[str, ModelResult] = {}
    if target.kind == "adapter":
        model = load_adapter_model(target)
        results["adapter"] = evaluate_model("adapter", model, tokenizer, rows, tokenized, prompts, references,
                                            recipe, console)
        if compare_base:
            with model.disable_adapter():
                results["base"] = evaluate_model("base", model, tokenizer, rows, tokenized, prompts, references,
                                                 recipe, console)
    else:
        model = load_plain_model(str(target.path))
        results["merged"] = evaluate_model("merged", model, tokenizer, rows, tokenized, prompts, references,
                                           recipe, console)
        if compare_base:
            if not target.base.name_or_path:
                raise UserError(f"{target.path} does not say which base model it was merged from",
                                where="--compare-base", fix="Pass --recipe with the run's recipe")
            dtype = model.dtype
            del model
            base = load_plain_model("", target.base, dtype)
            results["base"] = evaluate_model("base", base, tokenizer, rows, tokenized, prompts, references,
                                             recipe, console)

    report = {
        "evaluated": str(Path(path)),
        "kind": target.kind,
        "model": target.base.name_or_path if target.kind == "adapter" else str(target.path),
        "data": {"source": rows.described, "split": split if data is None else None, "format": rows.format,
                 "rows": len(rows.rows), "rows_total": rows.total, "skipped_invalid": rows.skipped, "limit": limit,
                 "sampling": rows.sampling, "row_numbers": rows.row_numbers},
        "normalization": {"first_line": recipe.evaluation.first_line, "strip": recipe.evaluation.strip,
                          "lowercase": recipe.evaluation.lowercase},
        "max_new_tokens": recipe.evaluation.max_new_tokens,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qlora_version": __version__,
        "results": {k: results[k].to_dict() for k in ("base", "adapter", "merged") if k in results},
        "references": references,
    }
    print_report(results, references, console)
    if write:
        atomic_write_json(target.results_dir / "eval.json", report)
        console.print(f"Results: {target.results_dir / 'eval.json'}", highlight=False)
    if target.run is not None:
        from ..plot import save_loss_plot

        plot = save_loss_plot(target.run)
        if plot is not None:
            console.print(f"Loss curve: {plot}", highlight=False)
    return report


def print_report(results: dict[str, ModelResult], references: list[str] | None, console: Console) -> None:
    order = [k for k in ("base", "adapter", "merged") if k in results]
    table = Table(title="Evaluation", title_justify="left")
    table.add_column("metric")
    for k in order:
        table.add_column(k, justify="right")
    table.add_row("loss (per loss token)", *(f"{results[k].loss:.4f}" for k in order))
    table.add_row("perplexity", *(_ppl(results[k].perplexity) for k in order))
    table.add_row("loss tokens", *(f"{results[k].loss_tokens:,}" for k in order))
    if references is not None:
        table.add_row("accuracy (exact match)", *(f"{results[k].scores.accuracy:.1%}" for k in order))
        table.add_row("macro-F1", *(f"{results[k].scores.macro_f1:.3f}" for k in order))
        table.add_row("answers that end by themselves", *(f"{results[k].stopped:.1%}" for k in order))
    table.add_row("time", *(f"{results[k].seconds:.1f} s" for k in order))
    console.print(table)
    if references is None:
        return
    main = results[order[-1]].scores
    classes = main.per_class
    if len(classes) >= len(references):  # every answer different: free text, not classes
        return
    worst = sorted(classes.items(), key=lambda kv: (kv[1]["f1"], kv[0]))
    shown = worst[:15]
    per_class = Table(title=f"Per class ({order[-1]}" + (f"; the {len(shown)} lowest F1 of {len(classes)}" if
                      len(classes) > len(shown) else "") + ")", title_justify="left")
    for col in ("class", "support", "precision", "recall", "F1"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    if "base" in results and order[-1] != "base":
        per_class.add_column("F1 base", justify="right")
    for name, s in sorted(shown, key=lambda kv: kv[0]):
        row = [name, f"{s['support']}", f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}"]
        if "base" in results and order[-1] != "base":
            row.append(f"{results['base'].scores.per_class[name]['f1']:.3f}")
        per_class.add_row(*row)
    console.print(per_class)
    if main.confusions:
        console.print("Most confused (expected -> predicted): " + "; ".join(
            f"{r} -> {p or '(empty)'} ({n})" for r, p, n in main.confusions), highlight=False)


def _ppl(x: float) -> str:
    return "inf" if math.isinf(x) else (f"{x:,.1f}" if x >= 100 else f"{x:.3f}")


# ---------------------------------------------------------------------------------------------- generate


def format_prompt(fmt: str, text: str, recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str:
    """A bare user prompt shaped as training shaped prompts (template, chat template, alpaca layout)."""
    if fmt == "text":
        return text
    if fmt == "chat":
        row = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    elif fmt == "alpaca":
        row = datamod.to_pairs("alpaca", {"instruction": text, "input": "", "output": ""},
                               recipe.data.prompt_template)
    else:
        row = datamod.to_pairs("prompt_completion", {"prompt": text, "completion": ""}, recipe.data.prompt_template)
    return datamod.prompt_for_generation(fmt, row, tokenizer)[0]


def resolve_format(recipe: Recipe) -> str:
    """The recipe's data format; `auto` is read from the columns of its data."""
    if recipe.data.format != "auto":
        return recipe.data.format
    raw = datamod.load_source(recipe.data.source, recipe.data.subset, recipe.data.split)
    raw = datamod.map_columns(raw.select(range(min(1, len(raw)))), recipe.data.columns, "data.columns")
    return datamod.detect_format(raw.column_names) or "text"


def generate_command(path: str | Path, prompts: list[str] | None = None, max_new_tokens: int | None = None,
                     raw: bool = False, no_adapter: bool = False, overrides: list[str] | None = None,
                     console: Console | None = None, read_line: Any = None) -> list[tuple[str, str]]:
    """Answer `prompts` (or lines read interactively) with the model behind `path`; return (prompt, answer)."""
    console = console or Console()
    target = resolve_target(path, None, None, overrides) if not raw else _raw_target(path, overrides)
    if no_adapter and target.kind != "adapter":
        raise UserError(f"{target.path} is a merged model: there is no adapter to switch off", where="--no-adapter",
                        fix="Give the run directory it was merged from")
    recipe = target.recipe
    fmt = "text" if raw else resolve_format(recipe)
    cfg = recipe.evaluation
    if max_new_tokens is not None:
        cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens)
    cfg = dataclasses.replace(cfg, batch_size=max(1, len(prompts or [None])))
    tokenizer = load_tokenizer_for(target)
    model = load_adapter_model(target) if target.kind == "adapter" else load_plain_model(str(target.path))
    console.print(f"{target.kind} {target.path}; prompts formatted as {fmt}"
                  + (" (--raw: as typed)" if raw else " (as in training)"), highlight=False)

    def answer(batch: list[str]) -> list[str]:
        shaped = [format_prompt(fmt, p, recipe, tokenizer) for p in batch]
        if no_adapter and target.kind == "adapter":
            with model.disable_adapter():
                return generate(model, tokenizer, shaped, cfg, fmt != "chat")
        return generate(model, tokenizer, shaped, cfg, fmt != "chat")

    done: list[tuple[str, str]] = []
    if prompts:
        for p, a in zip(prompts, answer(prompts)):
            _show(p, a, console)
            done.append((p, a))
        return done
    read_line = read_line or (lambda: console.input("[bold]prompt>[/] "))
    console.print("Type a prompt and press Enter; an empty line or Ctrl-D ends.")
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            break
        if not line or not line.strip():
            break
        a = answer([line])[0]
        _show(line, a, console)
        done.append((line, a))
    return done


def _raw_target(path: str | Path, overrides: list[str] | None) -> Target:
    try:
        return resolve_target(path, None, None, overrides)
    except UserError:  # a directory without a recipe: prompts are used as typed anyway
        return resolve_target(path, None, "-", overrides)


def _show(prompt: str, answer: str, console: Console) -> None:
    console.print(f"[dim]{prompt}[/]")
    console.print(f"[bold green]{answer.strip() or '(empty answer)'}[/]")
