"""`qlora merge` on the tiny trained run: real PEFT merge, real safetensors, a real killed process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qlora_cli.commands.merge import (
    FLOOR_EPS,
    NOISE_MULTIPLIER,
    PAUSE_ENV,
    compare_logits,
    merge,
    parse_size,
    rounding_tolerance,
    wide_logits,
)
from qlora_cli.errors import UserError

PROMPTS = ["Classify the banking request: I lost my visa card yesterday\nIntent: lost_card",
           "Classify the banking request: send 50 euros to anna\nIntent:"]


def _logits(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float(), batch["attention_mask"]


def _base_plus_adapter(run, tiny_model_dir: Path, dtype: torch.dtype):
    """The reference the merge must reproduce: the 16-bit base with the adapter applied, not merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(run.adapter)).eval()


def test_merged_model_loads_without_peft_and_equals_base_plus_adapter(trained_run, tiny_model_dir, tmp_path):
    run, _ = trained_run
    console = Console(record=True, width=200)
    out = tmp_path / "merged"
    info = merge(run.path, out, dtype="fp32", max_shard_size="2MB", console=console)

    # A plain checkpoint: sharded safetensors with their index, config, generation config, tokenizer, card.
    files = {p.name for p in out.iterdir()}
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 4  # 1.83M parameters x 4 bytes in shards of at most 2 MB
    assert all((out / name).stat().st_size <= 2_000_000 for name in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
            "README.md", "recipe.yaml", "qlora_merge.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    card = (out / "README.md").read_text()
    assert "base_model: qlora/tiny-llama" in card and str(run.adapter.resolve()) in card and "recipe.yaml" in card
    assert (out / "recipe.yaml").read_text() == run.recipe.read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    got, mask = _logits(merged, tokenizer)
    reference = _base_plus_adapter(run, tiny_model_dir, torch.float32)
    want, _ = _logits(reference, tokenizer)
    with reference.disable_adapter():
        base, _ = _logits(reference, tokenizer)
    keep = mask.bool()
    assert (got - want).abs()[keep].max() < 1e-3
    assert (base - want).abs()[keep].max() > 1.0, "the adapter changes the logits, so the match means something"

    # The verification the command ran and printed says the same.
    printed = console.export_text()
    assert f"logit difference {info['verification']['max_diff']:.4g}" in printed
    assert info["verification"]["max_diff"] < 1e-3 < info["verification"]["adapter_effect"]
    assert "merge needs about" in printed and "shards of up to 2.00 MB" in printed


def test_default_bf16_merge_from_the_adapter_directory_via_the_cli(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "bf16"
    cli = [sys.executable, "-m", "qlora_cli.cli", "merge", str(run.adapter), "--out", str(out)]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "qlora_merge.json").read_text())
    assert info["dtype"] == "bf16" and info["run"] == str(run.path.resolve())
    assert 0 < info["verification"]["max_diff"] <= info["verification"]["tolerance"]
    assert "max |merged - (base + adapter)| logit difference" in " ".join(proc.stdout.split())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    error = " ".join(again.stderr.split())
    assert error.startswith("error: --out: ") and "already exists" in error and "--overwrite" in error


def test_verification_fails_a_merge_that_lost_the_adapter(trained_run, tmp_path, monkeypatch):
    """PEFT's unload() removes the adapter without merging it: the logits check must catch that."""
    from peft.tuners.lora import LoraModel

    run, _ = trained_run
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    with pytest.raises(UserError, match="logits differ from base \\+ adapter") as err:
        merge(run.path, tmp_path / "bad", console=Console(file=open(os.devnull, "w")))
    assert "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def barely_trained_run(tmp_path_factory, tiny_model_dir):
    """The demo recipe stopped after 2 optimizer steps at the 7B recipes' learning rate: a valid adapter whose
    effect on the logits is small, like the 4-step adapter a user saw refused in bf16."""
    from conftest import demo_recipe

    from qlora_cli.commands.train import train
    from qlora_cli.run_dir import RunDir

    tmp = tmp_path_factory.mktemp("barely")
    recipe = demo_recipe(tmp, "training.max_steps=2", "training.learning_rate=2e-4", "training.warmup_steps=0",
                         "training.sft_args={eval_on_start: false}", "evaluation.compare_after_training=0")
    train(recipe, Console(file=open(os.devnull, "w")))
    return RunDir(tmp / "run")


def test_a_bf16_merge_of_a_barely_trained_adapter_passes_with_a_tolerance_from_measured_rounding(
        barely_trained_run, tmp_path):
    """The tolerance is NOISE_MULTIPLIER x how far bf16 moves these logits from fp32 on the unmerged model, not a
    share of the largest logit; the card and qlora_merge.json say so with the measured figures."""
    console = Console(record=True, width=250)
    out = tmp_path / "merged"
    info = merge(barely_trained_run.path, out, dtype="bf16", console=console)
    v = info["verification"]
    assert 0 < v["rounding_noise"] and 0 < v["max_diff"] <= v["tolerance"]
    assert v["tolerance"] == pytest.approx(max(NOISE_MULTIPLIER * v["rounding_noise"], FLOOR_EPS * 2 ** -7))
    assert v["merged_moved"] > 0 and v["adapter_effect"] > 0  # the merged weights hold (some of) the update
    assert "4 x the measured bf16 rounding noise" in v["tolerance_rule"] and "fp32" in v["tolerance_rule"]
    assert json.loads((out / "qlora_merge.json").read_text())["verification"] == v
    card = " ".join((out / "README.md").read_text().split())
    assert f"within the tolerance {v['tolerance']:.4g}" in card and f"measured noise {v['rounding_noise']:.4g}" in card
    printed = " ".join(console.export_text().split())
    assert f"the bf16 rounding noise {v['rounding_noise']:.4g} measured against fp32" in printed
    if v["adapter_effect"] <= v["tolerance"]:  # too small to tell apart from rounding: the command says so
        assert "this check shows that the merged weights changed" in printed


def test_wide_logits_equal_a_full_fp32_copy_and_leave_the_model_as_it_was(tiny_model_dir):
    """The fp32 reference is computed one block at a time, yet equals casting the whole bf16 model to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wide = wide_logits(model, batch, torch.float32)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, before[name]) for name, p in model.named_parameters())
    with torch.no_grad():
        bf16 = model(**batch).logits.float()
        full = model.float()(**batch).logits
    keep = batch["attention_mask"].bool()
    assert (wide - full)[keep].abs().max() < 1e-4
    assert (bf16 - full)[keep].abs().max() > 100 * (wide - full)[keep].abs().max()  # bf16 really rounds


def test_the_tolerance_follows_the_measured_rounding_not_the_logit_scale() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last position is padding
    wide = torch.randn(1, 5, 16)
    bump = torch.zeros(1, 5, 16)
    bump[0, 2, 3] = 0.1  # rounding moved one logit by 0.1
    bump[0, 4, 0] = 50.0  # padding is never compared
    for scale in (1.0, 10.0, 1000.0):  # logits 1000x larger, same rounding: same tolerance
        tolerance, noise = rounding_tolerance(wide * scale + bump, wide * scale, mask, "bf16")
        assert noise == pytest.approx(0.1, rel=1e-3) and tolerance == pytest.approx(NOISE_MULTIPLIER * 0.1, rel=1e-3)
    tolerance, noise = rounding_tolerance(wide + 3 * bump, wide, mask, "bf16")  # 3x the rounding: 3x the tolerance
    assert tolerance == pytest.approx(3 * NOISE_MULTIPLIER * 0.1, rel=1e-3)
    assert rounding_tolerance(wide, wide, mask, "bf16") == (FLOOR_EPS * 2 ** -7, 0.0)  # exact: the floor
    assert rounding_tolerance(wide, wide, mask, "fp32")[0] == FLOOR_EPS * torch.finfo(torch.float32).eps

    reference, base = wide + bump, wide - 2.0  # base + adapter in bf16, and the base alone
    assert compare_logits(reference, reference + 0.3, mask, "bf16", base, wide).ok  # within 4 x 0.1
    assert not compare_logits(reference, reference + 0.5, mask, "bf16", base, wide).ok  # beyond it
    lost = compare_logits(reference, base, mask, "bf16", base, wide)  # merged == base: the adapter is gone
    assert lost.adapter_lost and not lost.ok and lost.max_diff == pytest.approx(2.1)
    # An adapter too small to see beside rounding is still refused when the merge dropped it entirely.
    faint = compare_logits(wide + 0.05, wide, mask, "bf16", wide, wide)
    assert faint.max_diff <= faint.tolerance and faint.adapter_lost and not faint.ok


def test_an_adapter_merged_onto_another_base_is_refused_and_nothing_written(trained_run, tiny_model_dir,
                                                                          tmp_path, monkeypatch):
    """Same architecture, other weights: the merged logits are far outside bf16's rounding of base + adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
    from transformers import AutoConfig, AutoModelForCausalLM

    run, _ = trained_run
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.bfloat16)
    real_merge = LoraModel.merge_and_unload
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: real_merge(
        PeftModel.from_pretrained(other, str(run.adapter)).base_model, **kwargs))
    with pytest.raises(UserError, match="logits differ from base \\+ adapter") as err:
        merge(run.path, tmp_path / "bad", console=_quiet())
    assert "measured rounding noise" in str(err.value) and "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_barely_trained_adapter_that_the_merge_lost_is_refused(barely_trained_run, tmp_path, monkeypatch):
    """Even when the adapter moves logits by less than the tolerance, a merge that computes exactly the base's
    logits (PEFT's unload() drops the adapter) is refused."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    with pytest.raises(UserError, match="equal the base's") as err:
        merge(barely_trained_run.path, tmp_path / "bad", console=_quiet())
    assert "nothing was written" in str(err.value) and "--dtype fp32" in err.value.fix
    assert list(tmp_path.iterdir()) == []


def test_a_merge_killed_midway_leaves_no_complete_looking_output(trained_run, tmp_path):
    """SIGKILL while the shards are written: --out never appears; only a hidden .partial directory is left,
    which the next merge names so its space can be freed."""
    run, _ = trained_run
    out = tmp_path / "merged"
    env = {**os.environ, PAUSE_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_cli.cli", "merge", str(run.path), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".merged.partial-*/model.safetensors"))
            if partial:
                break
            time.sleep(0.1)
        assert partial, "the merge should be writing into a temporary directory"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".merged.partial-")
    assert not (tmp_path / left[0] / "qlora_merge.json").exists()

    console = Console(record=True, width=200)
    merge(run.path, out, console=console)
    assert (out / "qlora_merge.json").is_file()
    assert f"{tmp_path / left[0]} is left from an interrupted merge" in console.export_text()


def test_an_interrupted_merge_cleans_up_after_itself(trained_run, tmp_path):
    """Ctrl-C (SIGINT) unwinds: the temporary directory is removed and an existing --out is kept as it was."""
    run, _ = trained_run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    env = {**os.environ, PAUSE_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_cli.cli", "merge", str(run.path), "--out", str(out),
                             "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the command says when it pauses with the weights written
            if PAUSE_ENV in line:
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------------ errors


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def test_a_base_of_another_shape_is_refused_naming_both(trained_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    run, _ = trained_run
    other = tmp_path / "other-base"
    config = LlamaConfig(vocab_size=693, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(UserError) as err:
        merge(run.path, tmp_path / "out", base=str(other), console=_quiet())
    message = str(err.value)
    assert f"does not fit the base {other}" in message and "hidden size 128" in message
    assert "trained on" in message and "tiny-llama" in message
    assert err.value.where == "--base"
    assert not (tmp_path / "out").exists()


def test_missing_adapter_files_are_named(trained_run, tmp_path):
    run, _ = trained_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run.adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter weights"):
        merge(adapter, tmp_path / "out", console=_quiet())

    unfinished = tmp_path / "run"
    (unfinished / "adapter").mkdir(parents=True)
    shutil.copy(run.recipe, unfinished / "recipe.yaml")
    with pytest.raises(UserError, match="has no adapter_config.json"):
        merge(unfinished, tmp_path / "out", console=_quiet())

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no adapter"):
        merge(tmp_path / "empty", tmp_path / "out", console=_quiet())


@pytest.mark.parametrize("dtype", ["int4", "bfloat8", "q4_k_m"])
def test_unsupported_dtypes_are_refused(trained_run, tmp_path, dtype):
    run, _ = trained_run
    with pytest.raises(UserError, match=f"dtype '{dtype}' is not supported") as err:
        merge(run.path, tmp_path / "out", dtype=dtype, console=_quiet())
    assert "bf16, fp16 or fp32" in err.value.fix


def test_too_little_disk_space_is_found_before_any_weight_is_read(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1_000_000, 1_000_000))
    with pytest.raises(UserError, match=r"needs about [\d.]+ MB of disk, .* has 1.00 MB free"):
        merge(run.path, tmp_path / "out", console=_quiet())
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_sizes_are_parsed(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        merge(run.path, tmp_path / "out", console=_quiet())
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20
    with pytest.raises(UserError, match="is not a size"):
        parse_size("five gigs")
