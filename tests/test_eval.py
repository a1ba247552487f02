"""`qlora eval` and `qlora generate` on the tiny trained run: real 4-bit base, real adapter, real files."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import DEMO_DATA
from rich.console import Console

from qlora_cli.commands.eval import evaluate, generate_command
from qlora_cli.errors import UserError
from qlora_cli.plot import loss_points, save_loss_plot
from qlora_cli.recipe import EvaluationConfig
from qlora_cli.run_dir import RunDir
from qlora_cli.scoring import normalize, score


def _console() -> Console:
    return Console(record=True, width=150, force_terminal=False)


@pytest.fixture(scope="module")
def report(trained_run) -> dict:
    """`qlora eval RUN --compare-base` on the 60 held-out rows of the demo."""
    run, _ = trained_run
    console = _console()
    result = evaluate(run.path, compare_base=True, console=console)
    result["_printed"] = console.export_text()
    return result


def test_the_trained_adapter_scores_far_above_the_untrained_base(report) -> None:
    adapter, base = report["results"]["adapter"], report["results"]["base"]
    references = report["references"]
    assert report["data"]["rows"] == len(references) == adapter["n"] == 60
    for result in (adapter, base):  # the scores are computed from the answers written beside them
        hits = [p == r for p, r in zip(result["predictions"], references, strict=True)]
        assert result["accuracy"] == pytest.approx(sum(hits) / len(hits))
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert adapter["accuracy"] > base["accuracy"] + 0.5
    assert adapter["macro_f1"] > base["macro_f1"] + 0.5
    assert adapter["loss"] < base["loss"] / 5
    assert set(adapter["per_class"]) == set(references)
    assert sum(c["support"] for c in adapter["per_class"].values()) == 60
    printed = " ".join(report["_printed"].split())
    assert "base" in printed and "adapter" in printed and "macro-F1" in printed and "perplexity" in printed
    assert "compared after first line, strip, case-sensitive" in printed


def test_loss_uses_the_training_masks(report, trained_run) -> None:
    """The same tokens carry loss as in training, so the numbers agree with the trainer's own eval loss."""
    _, summary = trained_run
    adapter, base = report["results"]["adapter"], report["results"]["base"]
    assert adapter["loss_tokens"] == base["loss_tokens"] == 180  # " intent</s>": 3 tokens x 60 rows (dry-run table)
    assert adapter["loss"] == pytest.approx(summary["final_eval_loss"], rel=0.05, abs=5e-4)  # near 0 when learned
    assert base["loss"] == pytest.approx(summary["first_eval_loss"], rel=0.05)  # eval_on_start: adapter B = 0


def test_results_are_written_to_the_run_directory(report, trained_run) -> None:
    run, _ = trained_run
    written = json.loads(run.eval_results.read_text())
    assert written["results"] == report["results"] and written["kind"] == "adapter"
    assert written["normalization"] == {"first_line": True, "strip": True, "lowercase": False}
    assert run.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_labelled_csv_is_formatted_and_scored_like_the_training_data(trained_run, tmp_path) -> None:
    """Intent classification from a `text,category` csv: mapped with data.columns, same prompts, same answers."""
    run, _ = trained_run
    rows = [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()]
    path = tmp_path / "intents.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows([r["prompt"], r["completion"].strip()] for r in rows)
    from_csv = evaluate(run.path, data=str(path), overrides=["data.columns={prompt: text, completion: category}"],
                        limit=12, console=_console(), write=False)
    from_jsonl = evaluate(run.path, limit=12, console=_console(), write=False)
    chosen = from_jsonl["data"]["row_numbers"]  # the same answers and seed: the same sample from either file
    assert from_csv["data"]["row_numbers"] == chosen
    assert from_csv["references"] == from_jsonl["references"] == [rows[i]["completion"].strip() for i in chosen]
    a, b = from_csv["results"]["adapter"], from_jsonl["results"]["adapter"]
    assert a["predictions"] == b["predictions"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert a["accuracy"] == b["accuracy"] and a["macro_f1"] == b["macro_f1"]


def test_limit_samples_every_class_of_a_file_sorted_by_label(trained_run, tmp_path) -> None:
    """--limit on a file sorted by answer: a seeded sample stratified by answer, not the first rows (which would
    all be one class); the same seed picks the same rows; eval.json names them by file row number."""
    run, _ = trained_run
    rows = [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["completion"])
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    classes = {r["completion"].strip() for r in rows}
    k = len(classes)  # 6 intents, 10 rows each
    assert {r["completion"].strip() for r in rows[:2 * k]} != classes  # the first 2K rows miss classes

    console = _console()
    first = evaluate(run.path, data=str(path), limit=2 * k, console=console, write=False)
    again = evaluate(run.path, data=str(path), limit=2 * k, console=_console(), write=False)
    chosen = first["data"]["row_numbers"]
    assert set(first["references"]) == classes and first["results"]["adapter"]["n"] == 2 * k
    assert chosen == sorted(chosen) and again["data"]["row_numbers"] == chosen  # file order; reproducible
    assert first["references"] == [rows[i]["completion"].strip() for i in chosen]
    assert first["data"]["sampling"] == {"method": "stratified", "seed": 42, "limit": 2 * k, "classes": k}
    assert first["data"]["rows_total"] == 60 and first["data"]["rows"] == 2 * k
    printed = " ".join(console.export_text().split())
    assert f"{2 * k} of 60 rows, stratified by answer across {k} classes (seed 42)" in printed

    other_seed = evaluate(run.path, data=str(path), limit=2 * k, overrides=["training.seed=7"], console=_console(),
                          write=False)
    assert other_seed["data"]["row_numbers"] != chosen and set(other_seed["references"]) == classes


def test_sample_rows_keeps_the_class_mix_and_falls_back_to_a_plain_sample() -> None:
    from collections import Counter

    from qlora_cli.commands.eval import sample_rows

    banking = [f"intent_{i // 40}" for i in range(3080)]  # banking77's test set: 77 classes x 40, sorted
    chosen, classes = sample_rows(3080, 400, 42, banking)
    counts = Counter(banking[i] for i in chosen)
    assert classes == 77 and len(chosen) == len(set(chosen)) == 400 and chosen == sorted(chosen)
    assert len(counts) == 77 and set(counts.values()) == {5, 6}  # 400 / 77 = 5.2 rows a class
    assert sample_rows(3080, 400, 42, banking) == (chosen, 77)
    assert sample_rows(3080, 400, 43, banking)[0] != chosen

    skewed = ["a"] * 900 + ["b"] * 90 + ["c"] * 10  # proportional, and the rare class is not left out
    assert Counter(skewed[i] for i in sample_rows(1000, 50, 0, skewed)[0]) == {"a": 43, "b": 5, "c": 2}
    assert len(sample_rows(1000, 2, 0, skewed)[0]) == 2  # fewer rows than classes: one each of 2 classes

    free_text = [f"answer {i}" for i in range(100)]  # every answer different: no classes to stratify by
    chosen, classes = sample_rows(100, 10, 42, free_text)
    assert classes == 0 and len(set(chosen)) == 10 and chosen == sorted(chosen)
    assert sample_rows(100, 10, 42, None) == (chosen, 0)  # text rows: the same plain seeded sample
    assert sample_rows(5, 10, 42, None) == ([0, 1, 2, 3, 4], 0)


def test_row_numbers_are_rows_of_the_source_file(tmp_path) -> None:
    """Invalid rows are skipped and the eval_fraction hold-out is shuffled; the row numbers still point at the
    file row each evaluated row came from."""
    from conftest import demo_recipe

    from qlora_cli.commands.eval import select_rows

    rows = [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()]
    for i in (3, 17, 40):
        rows[i]["completion"] = ""  # skipped as invalid
    path = tmp_path / "with-gaps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = demo_recipe(tmp_path, f"data.source={path}", "data.eval_source=null", "data.eval_fraction=0.25")
    for split in ("eval", "train"):
        selected = select_rows(recipe, split)
        assert len(selected.row_numbers) == len(selected.rows)
        for row, number in zip(selected.rows, selected.row_numbers, strict=True):
            assert row["completion"].strip() == rows[number]["completion"].strip()
            assert rows[number]["prompt"] in row["prompt"]
    held_out, training = select_rows(recipe, "eval").row_numbers, select_rows(recipe, "train").row_numbers
    assert sorted(held_out + training) == [i for i in range(60) if i not in (3, 17, 40)]
    assert select_rows(recipe, data=str(path)).row_numbers == [i for i in range(60) if i not in (3, 17, 40)]


def test_answer_normalisation_is_configurable(trained_run) -> None:
    run, _ = trained_run
    shouting = evaluate(run.path, limit=6, overrides=["evaluation.lowercase=true"], console=_console(), write=False)
    assert shouting["normalization"]["lowercase"] is True
    cfg = EvaluationConfig(lowercase=True)
    assert normalize("  Lost_Card \nand more", cfg) == "lost_card"
    assert normalize("  Lost_Card \nand more", EvaluationConfig()) == "Lost_Card"
    assert normalize(" a\nb ", EvaluationConfig(first_line=False, strip=False)) == " a\nb "


def test_macro_f1_matches_a_hand_computed_example() -> None:
    references = ["a", "a", "a", "b", "b", "c"]
    predictions = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2, fp 0, fn 1 -> P 1,   R 2/3 -> F1 0.8
    # b: tp 1, fp 1, fn 1 -> P 1/2, R 1/2 -> F1 0.5
    # c: tp 1, fp 1, fn 0 -> P 1/2, R 1   -> F1 2/3
    s = score(predictions, references)
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.per_class["a"]["f1"] == pytest.approx(0.8)
    assert s.per_class["b"]["f1"] == pytest.approx(0.5)
    assert s.per_class["c"]["f1"] == pytest.approx(2 / 3)
    assert s.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 0.6556
    assert sorted(s.confusions) == [("a", "b", 1), ("b", "c", 1)]
    # An answer that is no class at all is a miss for its row's class and nobody's false positive.
    assert score(["a", "zzz"], ["a", "b"]).per_class["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                              "support": 1}


def test_a_merged_model_is_evaluated_from_its_own_directory(trained_run, tmp_path) -> None:
    from qlora_cli.commands.merge import merge

    run, _ = trained_run
    merged = tmp_path / "merged"
    merge(run.path, merged, console=Console(file=open("/dev/null", "w")))
    result = evaluate(merged, compare_base=True, console=_console())
    assert result["kind"] == "merged" and result["data"]["rows"] == 60  # the copied recipe names the data
    m, b = result["results"]["merged"], result["results"]["base"]
    assert m["accuracy"] > b["accuracy"] + 0.5 and m["loss"] < b["loss"] / 5
    assert json.loads((merged / "eval.json").read_text())["results"]["merged"]["accuracy"] == m["accuracy"]


def test_generate_answers_in_the_training_format(trained_run) -> None:
    run, _ = trained_run
    evaluated = evaluate(run.path, limit=1, console=_console(), write=False)
    [number] = evaluated["data"]["row_numbers"]
    first = json.loads((DEMO_DATA / "eval.jsonl").read_text().splitlines()[number])
    console = _console()
    [(prompt, answer)] = generate_command(run.path, [first["prompt"]], console=console)
    assert prompt == first["prompt"]
    assert normalize(answer, EvaluationConfig()) == evaluated["results"]["adapter"]["predictions"][0]

    lines = iter(["send 20 pounds to anna", "how much is 50 euros in yen"])

    def read_line() -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    answered = generate_command(run.path, console=console, read_line=read_line)
    assert [p for p, _ in answered] == ["send 20 pounds to anna", "how much is 50 euros in yen"]
    assert all(a.strip() for _, a in answered)


def test_eval_json_flag_prints_only_json_on_stdout(trained_run) -> None:
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    run, _ = trained_run
    result = CliRunner().invoke(app, ["eval", str(run.path), "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert parsed["results"]["adapter"]["n"] == 4 and parsed["data"]["limit"] == 4


def test_the_loss_curve_is_drawn_from_metrics(trained_run, tmp_path) -> None:
    from qlora_cli.recipe import load_recipe

    run, summary = trained_run
    every = load_recipe(run.recipe).training.logging_steps
    train, evals = loss_points(run)
    assert [step for step, _ in train] == list(range(every, summary["steps"] + 1, every))
    assert train[-1][1] == pytest.approx(summary["final_train_loss"])
    assert evals[0] == (0, pytest.approx(summary["first_eval_loss"]))
    assert run.loss_plot.is_file()  # drawn by qlora train at the end
    assert save_loss_plot(RunDir(tmp_path)) is None  # nothing logged, nothing drawn


# ------------------------------------------------------------------------------------------------ errors


def test_a_directory_without_a_recipe_asks_for_one(trained_run, tmp_path) -> None:
    import shutil

    run, _ = trained_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run.adapter, adapter)
    with pytest.raises(UserError, match="no recipe.yaml") as err:
        evaluate(adapter, console=_console())
    assert "--recipe" in err.value.fix and "--data" in err.value.fix


def test_asking_for_rows_that_do_not_exist_is_a_clear_error(trained_run) -> None:
    run, _ = trained_run
    with pytest.raises(UserError, match="has no evaluation rows"):
        evaluate(run.path, overrides=["data.eval_source=null"], console=_console())
    with pytest.raises(UserError, match="looks like a hub dataset; name its split"):
        evaluate(run.path, data="PolyAI/banking77", console=_console())
    with pytest.raises(UserError, match="--limit 0"):
        evaluate(run.path, limit=0, console=_console())


def test_an_adapter_that_does_not_fit_the_base_is_refused_before_loading(trained_run, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    run, _ = trained_run
    other = tmp_path / "narrow-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=693, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(UserError, match=f"does not fit the base {other} \\(hidden size 128\\)") as err:
        evaluate(run.path, overrides=[f"model.name_or_path={other}"], limit=2, console=_console())
    assert err.value.where == "--set model.name_or_path"
    assert "tiny-llama" in str(err.value)  # the base it was trained on
