"""Data: every source type and format becomes token ids with the right loss mask, and bad data is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_cli import data as datamod
from qlora_cli.errors import UserError
from qlora_cli.recipe import DataConfig

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loss_text(tokenizer, prepared: datamod.PreparedData, i: int = 0) -> str:
    row = prepared.train[i]
    return "".join(t for t, loss in datamod.loss_segments(tokenizer, row["input_ids"],
                                                           row[datamod.mask_key(prepared.format)]) if loss)


def test_prompt_completion_carries_loss_on_the_completion_only(tmp_path: Path, tokenizer) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    prepared = datamod.prepare(DataConfig(source=str(src), prompt_template="Q: {prompt}\nA:"), tokenizer)
    assert prepared.format == "prompt_completion"
    assert loss_text(tokenizer, prepared) == " answer 0</s>"
    assert prepared.train_stats.rows == 10


def test_alpaca_uses_the_template_and_learns_the_output(tmp_path: Path, tokenizer) -> None:
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    src = write_jsonl(tmp_path / "a.json", rows)
    prepared = datamod.prepare(DataConfig(source=str(src), format="alpaca"), tokenizer)
    first = tokenizer.decode(prepared.train[0]["input_ids"])
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" in first
    assert loss_text(tokenizer, prepared) == "5</s>"
    assert "### Input" not in tokenizer.decode(prepared.train[1]["input_ids"])


def test_chat_carries_loss_on_every_assistant_turn_only(tmp_path: Path, tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    prepared = datamod.prepare(DataConfig(source=str(src)), tokenizer)
    assert prepared.format == "chat"
    segments = datamod.loss_segments(tokenizer, prepared.train[0]["input_ids"], prepared.train[0]["assistant_masks"])
    learned = [t for t, loss in segments if loss]
    assert [t.strip() for t in learned] == ["hello</s>", "see you</s>"]
    assert not any("bye" in t or "be brief" in t for t in learned)


def test_text_format_learns_everything(tmp_path: Path, tokenizer) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}])
    prepared = datamod.prepare(DataConfig(source=str(src)), tokenizer)
    assert prepared.format == "text"
    assert loss_text(tokenizer, prepared) == "the quick brown fox</s>"


def test_csv_columns_are_mapped_to_prompt_and_completion(tmp_path: Path, tokenizer) -> None:
    src = tmp_path / "intents.csv"
    src.write_text("text,category\nmy card is lost,lost_card\nsend money,transfer\n")
    cfg = DataConfig(source=str(src), format="prompt_completion", columns={"prompt": "text", "completion": "category"},
                     prompt_template="Request: {prompt}\nIntent:")
    prepared = datamod.prepare(cfg, tokenizer)
    assert loss_text(tokenizer, prepared, 1) == " transfer</s>"


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_every_local_file_type_loads(tmp_path: Path, tokenizer, kind: str) -> None:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        frame.to_parquet(path)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    else:
        write_jsonl(path, ROWS)
    assert datamod.prepare(DataConfig(source=str(path)), tokenizer).train_stats.rows == 10


def test_several_files_and_globs(tmp_path: Path, tokenizer) -> None:
    a = write_jsonl(tmp_path / "part-1.jsonl", ROWS[:4])
    b = write_jsonl(tmp_path / "part-2.jsonl", ROWS[4:])
    assert datamod.prepare(DataConfig(source=[str(a), str(b)]), tokenizer).train_stats.rows == 10
    assert datamod.prepare(DataConfig(source=str(tmp_path / "part-*.jsonl")), tokenizer).train_stats.rows == 10


def test_eval_split_by_fraction_and_by_file(tmp_path: Path, tokenizer) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    prepared = datamod.prepare(DataConfig(source=str(src), eval_fraction=0.2), tokenizer)
    assert (prepared.train_stats.rows, prepared.eval_stats.rows) == (8, 2)
    ev = write_jsonl(tmp_path / "e.jsonl", ROWS[:3])
    prepared = datamod.prepare(DataConfig(source=str(src), eval_source=str(ev)), tokenizer)
    assert (prepared.train_stats.rows, prepared.eval_stats.rows) == (10, 3)


def test_long_examples_are_counted_as_truncated(tmp_path: Path, tokenizer) -> None:
    rows = ROWS + [{"prompt": "word " * 200, "completion": "end"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = datamod.prepare(DataConfig(source=str(src), max_length=32), tokenizer)
    assert prepared.train_stats.truncated == 1
    assert any("longer than max_length=32" in n for n in prepared.notes)
    assert prepared.train_stats.percentiles()["max"] > 32


def test_rows_with_empty_fields_are_skipped_and_counted_or_refused(tmp_path: Path, tokenizer) -> None:
    rows = ROWS[:3] + [{"prompt": "q", "completion": ""}, {"prompt": None, "completion": "a"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = datamod.prepare(DataConfig(source=str(src)), tokenizer)
    assert (prepared.train_stats.rows, prepared.train_stats.skipped) == (3, 2)
    with pytest.raises(UserError, match="row 4: field 'completion' is empty"):
        datamod.prepare(DataConfig(source=str(src), invalid_rows="error"), tokenizer)


def test_missing_columns_list_the_columns_found(tmp_path: Path, tokenizer) -> None:
    src = tmp_path / "d.csv"
    src.write_text("text,category\na,b\n")
    with pytest.raises(UserError) as e:
        datamod.prepare(DataConfig(source=str(src), format="prompt_completion"), tokenizer)
    assert "columns found: text, category" in e.value.message
    assert "data.columns" in e.value.fix


def test_unknown_format_from_columns_is_explained(tmp_path: Path, tokenizer) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "label": "b"}])
    with pytest.raises(UserError, match="cannot tell the data format"):
        datamod.prepare(DataConfig(source=str(src)), tokenizer)


def test_bad_files_name_the_file_and_place(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(UserError, match="does not exist"):
        datamod.prepare(DataConfig(source=str(tmp_path / "missing.jsonl")), tokenizer)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt,completion\ncaf\xe9,ok\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        datamod.prepare(DataConfig(source=str(latin)), tokenizer)
    assert "not UTF-8" in e.value.message and e.value.where.endswith("line 2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        datamod.prepare(DataConfig(source=str(empty)), tokenizer)


def test_chat_rows_with_unknown_roles_or_no_assistant_are_refused(tmp_path: Path, tokenizer) -> None:
    bad_role = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    src = write_jsonl(tmp_path / "c.jsonl", [bad_role])
    with pytest.raises(UserError, match="unknown role 'human'"):
        datamod.prepare(DataConfig(source=str(src), invalid_rows="error"), tokenizer)
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    src = write_jsonl(tmp_path / "c2.jsonl", [no_answer])
    with pytest.raises(UserError, match="no assistant turn"):
        datamod.prepare(DataConfig(source=str(src), invalid_rows="error"), tokenizer)


def test_chat_needs_a_chat_template(tmp_path: Path, tokenizer) -> None:
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(UserError, match="no chat template"):
        datamod.prepare(DataConfig(source=str(src)), plain)
