"""Data: recipe `data` section -> tokenized `datasets.Dataset`s with their loss masks, and a summary.

The path of a row:

1. **load**: local json/jsonl/csv/parquet files (one, several or a glob) or a hub dataset id, via `datasets`;
2. **map columns**: `data.columns` renames the dataset's columns to the format's fields;
3. **format**: alpaca, chat, prompt_completion or text rows become either prompt/completion text pairs or
   chat `messages`; rows with empty fields are skipped and counted (or refused);
4. **tokenize**: `input_ids` plus the mask of tokens that carry loss (`completion_mask` for prompts, or
   `assistant_masks` for chat, found by rendering the chat template turn by turn, so it works with any template).

5. **fit**: examples longer than `max_length` lose the oldest prompt tokens, never the completion they teach.

TRL's SFTTrainer takes it from there: it turns masks into labels and pads or packs.
"""

from __future__ import annotations

import glob as globlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .recipe import DataConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

FIELDS: dict[str, tuple[str, ...]] = {  # required fields of each format (after column mapping)
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"alpaca": ("input",)}
CHAT_ROLES = ("system", "user", "assistant", "tool")
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class SplitStats:
    """What `--dry-run` and the run summary report about one split."""

    rows: int = 0
    skipped: int = 0
    truncated: int = 0  # examples longer than max_length (cut by fit_to_length)
    completion_cut: int = 0  # of those, examples whose answer itself had to be cut
    loss_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class PreparedData:
    format: str
    train: Dataset
    eval: Dataset | None
    train_stats: SplitStats
    eval_stats: SplitStats | None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ loading


def _local_files(source: str | list[str]) -> list[Path] | None:
    """The files a local source names, or None when it looks like a hub id."""
    items = [source] if isinstance(source, str) else source
    files: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in globlib.glob(item, recursive=True))
            if not matched:
                raise UserError(f"no file matches {item!r}", where="data.source", fix="Check the glob pattern")
            files.extend(matched)
        elif Path(item).exists() or Path(item).suffix.lower() in EXTENSIONS or isinstance(source, list):
            if not Path(item).is_file():
                raise UserError(f"data file {item!r} does not exist", where="data.source",
                                fix="Check the path (relative paths start where you run qlora)")
            files.append(Path(item))
        else:
            return None
    return files


def _check_utf8(path: Path) -> None:
    if path.suffix.lower() == ".parquet":
        return
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8 text (byte {data[e.start]:#04x})", where=f"{path} line {line}",
                        fix="Re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def load_source(source: str | list[str], subset: str | None = None, split: str = "train",
                key: str = "data.source") -> Dataset:
    """Rows of a local file set or hub dataset, as one `datasets.Dataset`."""
    from datasets import load_dataset

    files = _local_files(source)
    if files is None:
        try:
            return load_dataset(source, subset, split=split)
        except Exception as e:  # offline, unknown id, unknown split: the library's message is the useful part
            raise UserError(f"cannot load hub dataset {source!r} split {split!r}: {str(e).splitlines()[0]}",
                            where=key, fix="Check the id, split and network, or point to local files") from None
    kinds = {EXTENSIONS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in EXTENSIONS)
        raise UserError(f"{bad} has an unsupported extension", where=key,
                        fix="Use .json, .jsonl, .csv or .parquet files")
    if len(kinds) > 1:
        raise UserError(f"files of different types in one source: {', '.join(map(str, files))}", where=key,
                        fix="Use files of one type")
    for f in files:
        _check_utf8(f)
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty", where=key, fix="Point to a file with rows")
    try:
        return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as e:
        if "corresponds to no data" in str(e):  # `datasets` on a file with a header or `[]` but no rows
            raise UserError(f"the dataset has no rows ({', '.join(map(str, files))})", where=key,
                            fix="Point data.source at a file with examples") from None
        raise UserError(f"cannot read {', '.join(map(str, files))}: {str(e).splitlines()[0]}", where=key,
                        fix="Check that the file is valid for its extension") from None


# ----------------------------------------------------------------------------------------------- formats


def map_columns(ds: Dataset, columns: dict[str, str], where: str) -> Dataset:
    """Rename dataset columns to format fields: {prompt: text} reads the field `prompt` from column `text`."""
    if not columns:
        return ds
    for target, column in columns.items():
        if column not in ds.column_names:
            raise UserError(f"column {column!r} (mapped to {target!r}) is not in the data", where=where,
                            fix=f"Columns found: {', '.join(ds.column_names)}")
    keep = [c for c in ds.column_names if c not in columns.values() and c not in columns]
    return ds.map(lambda row: {t: row[c] for t, c in columns.items()}, remove_columns=[
        c for c in ds.column_names if c not in keep])


def detect_format(columns: list[str]) -> str | None:
    for name in ("chat", "alpaca", "prompt_completion", "text"):
        if all(f in columns for f in FIELDS[name]):
            return name
    return None


def _resolve_format(cfg: DataConfig, ds: Dataset, where: str) -> str:
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(ds.column_names)
        if fmt is None:
            raise UserError(
                f"cannot tell the data format from the columns {', '.join(ds.column_names)}", where=where,
                fix="Set data.format and map your columns with data.columns, "
                "e.g. columns: {prompt: text, completion: category}",
            )
    missing = [f for f in FIELDS[fmt] if f not in ds.column_names]
    if missing:
        raise UserError(
            f"format {fmt} needs column(s) {', '.join(missing)}; columns found: {', '.join(ds.column_names)}",
            where=where,
            fix="Map them with data.columns, e.g. columns: {" + f"{missing[0]}: <your column>" + "}",
        )
    return fmt


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, list) and not value)


def _row_problem(fmt: str, row: dict[str, Any]) -> str | None:
    for f in FIELDS[fmt]:
        if _empty(row.get(f)):
            return f"field {f!r} is empty"
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list):
            return "`messages` is not a list"
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return "a message is not a {role, content} mapping"
            if m["role"] not in CHAT_ROLES:
                return f"unknown role {m['role']!r} (valid: {', '.join(CHAT_ROLES)})"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant turn to learn from"
    return None


def _join(prompt: str, completion: str) -> str:
    """Completion text as appended to the prompt: one space between them unless either side has whitespace."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        return " " + completion
    return completion


def to_pairs(fmt: str, row: dict[str, Any], template: str | None) -> dict[str, Any]:
    """One validated row in its canonical form: {prompt, completion}, {messages} or {text}."""
    if fmt == "alpaca":
        extra = row.get("input") or ""
        tmpl = template or (ALPACA_TEMPLATE if extra.strip() else ALPACA_TEMPLATE_NO_INPUT)
        prompt = tmpl.format(instruction=row["instruction"], input=extra)
        return {"prompt": prompt, "completion": _join(prompt, str(row["output"]))}
    if fmt == "prompt_completion":
        prompt = template.format(prompt=row["prompt"]) if template else str(row["prompt"])
        return {"prompt": prompt, "completion": _join(prompt, str(row["completion"]))}
    if fmt == "chat":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    return {"text": str(row["text"])}


def format_rows(cfg: DataConfig, ds: Dataset, where: str) -> tuple[str, Dataset, int]:
    """(format, canonical rows, rows skipped)."""
    ds = map_columns(ds, cfg.columns, "data.columns")
    if len(ds) == 0:
        raise UserError("the dataset has no rows", where=where, fix="Point data.source at a file with examples")
    fmt = _resolve_format(cfg, ds, where)
    template = cfg.prompt_template
    if template:
        names = {"alpaca": ("instruction", "input"), "prompt_completion": ("prompt",)}.get(fmt, ())
        try:
            template.format(**{n: "" for n in names})
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"prompt_template has an unknown or broken placeholder ({e})",
                            where="data.prompt_template",
                            fix=f"Use only {', '.join('{' + n + '}' for n in names) or 'no placeholders'}") from None
    keep, skipped = [], 0
    for i, row in enumerate(ds):
        problem = _row_problem(fmt, row)
        if problem is None:
            keep.append(i)
            continue
        if cfg.invalid_rows == "error":
            raise UserError(f"row {i + 1}: {problem}", where=where,
                            fix="Fix or remove the row, or set data.invalid_rows: skip")
        skipped += 1
    if not keep:
        raise UserError(f"all {len(ds)} rows are invalid for format {fmt}", where=where,
                        fix="Check data.format and data.columns")
    ds = ds.select(keep) if skipped else ds
    ds = ds.map(lambda row: to_pairs(fmt, row, template), remove_columns=ds.column_names)
    return fmt, ds, skipped


# -------------------------------------------------------------------------------------------- tokenizing


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_row(fmt: str, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """input_ids and the 0/1 mask of tokens that carry loss."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = tokenizer(text)["input_ids"]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    if fmt == "chat":
        text = _chat_text(tokenizer, row["messages"])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = []
        for i, m in enumerate(row["messages"]):
            if m["role"] == "assistant":
                start = len(_chat_text(tokenizer, row["messages"][:i], generation_prompt=True))
                end = len(_chat_text(tokenizer, row["messages"][: i + 1]))
                spans.append(_assistant_span(text, start, end, m["content"], tokenizer))
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in encoded["offset_mapping"]]
        return {"input_ids": encoded["input_ids"], "assistant_masks": mask}
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    ids = tokenizer(row["prompt"] + row["completion"] + eos)["input_ids"]
    common = 0
    for a, b in zip(prompt_ids, ids):
        if a != b:
            break
        common += 1
    return {"input_ids": ids, "completion_mask": [0] * common + [1] * (len(ids) - common)}


def _assistant_span(text: str, start: int, end: int, content: str, tokenizer: PreTrainedTokenizerBase
                    ) -> tuple[int, int]:
    """Character span of one assistant turn's loss: its content and the end-of-turn token that follows it.

    `text[start:end]` is what the chat template adds for the turn (e.g. ChatML's `Paris<|im_end|>\n`). The model
    must learn the content and the token that ends the turn (so that generation stops), not the template's
    whitespace after it. When the content cannot be found verbatim (a template that rewrites it), the whole
    rendered turn carries loss.
    """
    body = content.strip()
    found = text.find(body, start, end) if body else -1
    if found < 0:
        return start, end
    content_end = found + len(body)
    tail = text[content_end:end]
    offset = len(tail) - len(tail.lstrip())  # the end token may follow whitespace, nothing else
    ends = [t for t in dict.fromkeys([tokenizer.eos_token, *tokenizer.all_special_tokens])
            if t and tail.startswith(t, offset)]
    return start, content_end + (offset + max(map(len, ends)) if ends else 0)


def fit_to_length(fmt: str, ids: list[int], mask: list[int], max_length: int, bos_id: int | None
                  ) -> tuple[list[int], list[int], bool]:
    """Cut an example to `max_length` tokens without losing what it teaches; returns (ids, mask, completion_cut).

    Prompt-completion and chat examples lose their oldest tokens first (a leading BOS stays), so the completion or
    last assistant turn is kept whole. A completion that alone is longer than `max_length` keeps the last
    `max_length // 2` prompt tokens and as much of its start as fits. Plain text is cut at the end.
    """
    if len(ids) <= max_length:
        return ids, mask, False
    if fmt == "text":
        return ids[:max_length], mask[:max_length], False
    keep_bos = bos_id is not None and ids[0] == bos_id and mask[0] == 0
    head = [ids[0]] if keep_bos else []
    head_mask = [0] if keep_bos else []
    budget = max_length - len(head)
    first_loss = mask.index(1) if 1 in mask else len(mask)
    if fmt == "prompt_completion" or fmt == "alpaca":
        completion = len(ids) - first_loss
        if completion <= budget:
            return head + ids[len(ids) - budget:], head_mask + mask[len(mask) - budget:], False
        prompt_keep = min(first_loss - len(head), budget // 2)
        start = first_loss - prompt_keep
        stop = first_loss + budget - prompt_keep
        return head + ids[start:stop], head_mask + mask[start:stop], True
    cut_ids, cut_mask = head + ids[len(ids) - budget:], head_mask + mask[len(mask) - budget:]
    if any(cut_mask):
        return cut_ids, cut_mask, False
    return ids[:max_length], mask[:max_length], True  # the only assistant turns are early: keep the start


def mask_key(fmt: str) -> str:
    return "assistant_masks" if fmt == "chat" else "completion_mask"


def tokenize(fmt: str, ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[Dataset, SplitStats]:
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format is chat but the tokenizer has no chat template",
                        where="data.format",
                        fix="Use a tokenizer with a chat template (model.tokenizer), or a prompt_completion format")
    if fmt == "chat" and not tokenizer.is_fast:
        raise UserError("chat format needs a fast tokenizer to find assistant tokens", where="model.tokenizer",
                        fix="Use a tokenizer with a tokenizer.json")
    key = mask_key(fmt)
    bos_id = tokenizer.bos_token_id

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        encoded = tokenize_row(fmt, row, tokenizer)
        length = len(encoded["input_ids"])
        ids, mask, cut = fit_to_length(fmt, encoded["input_ids"], encoded[key], max_length, bos_id)
        return {"input_ids": ids, key: mask, "full_length": length, "completion_cut": cut}

    tokenized = ds.map(encode, desc="Tokenizing")
    lengths = list(tokenized["full_length"])
    masks = tokenized[key]
    if not any(any(m) for m in masks):
        raise UserError(f"no row has a loss-carrying token within {max_length} tokens",
                        where="data.max_length", fix="Raise data.max_length or shorten the prompts")
    stats = SplitStats(
        rows=len(tokenized),
        truncated=sum(n > max_length for n in lengths),
        completion_cut=sum(tokenized["completion_cut"]),
        loss_tokens=sum(sum(m) for m in masks),
        lengths=lengths,
    )
    return tokenized.remove_columns(["full_length", "completion_cut"]), stats


# ------------------------------------------------------------------------------------------------ the lot


@dataclass
class FormattedData:
    """Rows in their canonical form, before tokenizing."""

    format: str
    train: Dataset
    eval: Dataset | None
    skipped: int = 0
    eval_skipped: int = 0
    notes: list[str] = field(default_factory=list)


def load_rows(cfg: DataConfig, seed: int = 42) -> FormattedData:
    """Load and format the training (and evaluation) rows of a recipe."""
    where = cfg.source if isinstance(cfg.source, str) else ", ".join(cfg.source)
    raw = load_source(cfg.source, cfg.subset, cfg.split)
    if cfg.max_rows:
        raw = raw.select(range(min(cfg.max_rows, len(raw))))
    fmt, rows, skipped = format_rows(cfg, raw, where)
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} row(s) with empty or invalid fields in {where}")
    eval_rows, eval_skipped = None, 0
    if cfg.eval_fraction:
        if len(rows) < 2:
            raise UserError("too few rows to hold some out for evaluation", where="data.eval_fraction",
                            fix="Set eval_fraction: 0 or add rows")
        parts = rows.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        rows, eval_rows = parts["train"], parts["test"]
    elif cfg.eval_source or cfg.eval_split:
        eval_source = cfg.eval_source or cfg.source
        eval_where = eval_source if isinstance(eval_source, str) else ", ".join(eval_source)
        eval_raw = load_source(eval_source, cfg.subset, cfg.eval_split or "train", key="data.eval_source")
        eval_fmt, eval_rows, eval_skipped = format_rows(cfg, eval_raw, eval_where)
        if eval_fmt != fmt:
            raise UserError(f"evaluation data is in format {eval_fmt}, training data in {fmt}",
                            where="data.eval_source", fix="Use the same format for both, or set data.format")
        if eval_skipped:
            notes.append(f"skipped {eval_skipped} evaluation row(s) with empty or invalid fields")
    return FormattedData(fmt, rows, eval_rows, skipped, eval_skipped, notes)


def tokenize_rows(rows: FormattedData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreparedData:
    """Tokenize formatted rows; count lengths, truncation and loss-carrying tokens."""
    train, train_stats = tokenize(rows.format, rows.train, tokenizer, max_length)
    train_stats.skipped = rows.skipped
    eval_ds, eval_stats = None, None
    if rows.eval is not None:
        eval_ds, eval_stats = tokenize(rows.format, rows.eval, tokenizer, max_length)
        eval_stats.skipped = rows.eval_skipped
    notes = list(rows.notes)
    if train_stats.truncated:
        notes.append(truncation_note(train_stats, rows.format, max_length, "training"))
    note = getattr(tokenizer, "qlora_note", None)
    if note:
        notes.append(note)
    return PreparedData(rows.format, train, eval_ds, train_stats, eval_stats, notes)


def truncation_note(stats: SplitStats, fmt: str, max_length: int, split: str) -> str:
    """What happened to the examples longer than max_length."""
    if fmt == "text":
        return (f"{stats.truncated} {split} example(s) are longer than max_length={max_length} tokens; "
                "their ends are cut")
    note = (f"{stats.truncated} {split} example(s) are longer than max_length={max_length} tokens; their prompts are "
            "cut from the left so the answer is kept")
    if stats.completion_cut:
        note += (f"; {stats.completion_cut} answer(s) do not fit on their own and keep only their start after the "
                 "last max_length/2 prompt tokens (raise data.max_length to keep them whole)")
    return note


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 42) -> PreparedData:
    """Load, format and tokenize the training (and evaluation) rows of a recipe."""
    return tokenize_rows(load_rows(cfg, seed), tokenizer, cfg.max_length)


def sample_texts(rows: FormattedData, limit: int = 2000) -> list[str]:
    """Plain text of up to `limit` training rows (to train a stand-in tokenizer)."""
    texts = []
    for row in rows.train.select(range(min(limit, len(rows.train)))):
        if rows.format == "chat":
            texts.append("\n".join(m["content"] for m in row["messages"]))
        elif rows.format == "text":
            texts.append(row["text"])
        else:
            texts.append(row["prompt"] + row["completion"])
    return texts


def loss_segments(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """The decoded example cut into runs of (text, carries_loss)."""
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or mask[i] != mask[start]:
            segments.append((tokenizer.decode(input_ids[start:i]), bool(mask[start])))
            start = i
    return segments


def prompt_for_generation(fmt: str, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt text to generate from, reference answer) of a canonical row, formatted as in training."""
    if fmt == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _chat_text(tokenizer, messages[:last], generation_prompt=True), messages[last]["content"]
    if fmt == "text":
        raise UserError("the text format has no prompt/answer pairs to generate from", where="data.format",
                        fix="Use a prompt_completion, alpaca or chat dataset for generation metrics")
    return row["prompt"], row["completion"]
