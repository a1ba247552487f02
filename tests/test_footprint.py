"""The memory estimate: parameter counts, the terms' response to the recipe, verdicts, fixes, and errors.

Everything here runs on the CPU from shipped model configs; `docs/footprint.md` has the measured GPU check.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import demo_recipe
from rich.console import Console

from qlora_cli.errors import UserError
from qlora_cli.footprint import (
    GIB,
    Architecture,
    RunSettings,
    estimate,
    estimate_for_recipe,
    find_gpu,
    max_micro_batch,
    optimizer_bytes,
    parse_vram,
    suggestions,
    warn_if_too_big,
)
from qlora_cli.model import KNOWN_MODELS, Device, count_parameters, load_config, meta_model
from qlora_cli.recipe import ModelConfig, load_recipe

MISTRAL = "mistralai/Mistral-7B-v0.1"
LLAMA3 = "meta-llama/Meta-Llama-3-8B"
SHIPPED = sorted({file: name for name, file in KNOWN_MODELS.items()}.values()) + ["qlora/tiny-llama"]


def arch(name: str) -> Architecture:
    return Architecture.from_config(load_config(ModelConfig(name_or_path=name)))


def write_recipe(tmp_path: Path, model: str = MISTRAL, **training) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": model},
        "data": {"source": "train.jsonl", "max_length": 2048},
        "training": {"per_device_train_batch_size": 4, **training},
    }))
    return path


def settings(**kw) -> RunSettings:
    return RunSettings(**{"micro_batch": 4, "seq_len": 2048, "padding": False, **kw})


# ----------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", SHIPPED)
def test_parameter_count_equals_what_transformers_builds(name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(ModelConfig(name_or_path=name)))
    assert arch(name).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,lora", [
    (MISTRAL, []),
    ("Qwen/Qwen2.5-7B", ["lora.r=8", "lora.target_modules=[q_proj,v_proj]"]),
    ("qlora/tiny-llama", ["lora.use_dora=true"]),
])
def test_trainable_count_equals_what_peft_attaches(tmp_path: Path, name: str, lora: list[str]) -> None:
    recipe = load_recipe(write_recipe(tmp_path, name), lora)
    _, trainable = count_parameters(meta_model(recipe))
    assert estimate_for_recipe(recipe).params["trainable"] == trainable


def test_mistral_4bit_weights_match_get_memory_footprint() -> None:
    # After a real 4-bit load on an H100, get_memory_footprint() reported 4.01 GB for Mistral-7B. It counts the
    # packed weights (half a byte each) and the 16-bit rest, but not the quantization constants in each layer's
    # quant_state, which the estimate adds (NF4 + double quant = 4.127 bits per weight).
    a = arch(MISTRAL)
    est = estimate(a, settings())
    weights = est.term("base_4bit").bytes + est.term("base_16bit").bytes
    assert weights == pytest.approx(4.01e9, rel=0.05)
    packed_and_16bit = a.quantizable_params / 2 + 2 * (a.embedding_params + a.small_params)
    assert packed_and_16bit == pytest.approx(4.01e9, rel=0.005)
    assert 8 * est.term("base_4bit").bytes / a.quantizable_params == pytest.approx(4.127, abs=0.001)
    without_dq = estimate(a, settings(double_quant=False))
    assert 8 * without_dq.term("base_4bit").bytes / a.quantizable_params == pytest.approx(4.5, abs=0.001)


# ----------------------------------------------------------------------------------------------- the terms


def test_checkpoints_are_layers_x_tokens_x_hidden_x_2_bytes_and_one_layer_is_recomputed() -> None:
    a = arch(MISTRAL)
    on, off = estimate(a, settings(gradient_checkpointing=True)), estimate(a, settings(gradient_checkpointing=False))
    tokens = 4 * 2048
    assert on.term("activations").bytes == a.layers * tokens * a.hidden * 2
    assert off.term("activations").bytes == a.layers * on.term("recompute").bytes
    assert off.total > 3 * on.total  # for this run, checkpointing saves most of the memory


def test_activations_grow_with_micro_batch_and_length_and_lora_memory_with_rank() -> None:
    a = arch(LLAMA3)
    base = estimate(a, settings(gradient_checkpointing=False))
    double_batch = estimate(a, settings(gradient_checkpointing=False, micro_batch=8))
    double_length = estimate(a, settings(gradient_checkpointing=False, seq_len=4096, micro_batch=2))
    assert double_batch.term("activations").bytes == 2 * base.term("activations").bytes
    assert double_length.term("activations").bytes == base.term("activations").bytes  # same tokens, no mask
    rank32 = estimate(a, settings(lora_r=32))
    assert rank32.term("lora").bytes == 2 * base.term("lora").bytes
    assert rank32.term("grads").bytes == 2 * base.term("grads").bytes
    no_dropout = estimate(a, settings(lora_dropout=False))
    assert no_dropout.term("recompute").bytes < estimate(a, settings()).term("recompute").bytes


def test_an_attention_mask_adds_a_term_quadratic_in_length() -> None:
    # Mistral-7B-v0.1 attends within a 4,096-token window: at 4,096 tokens transformers builds a mask, SDPA gets
    # a bias per layer and keys/values are repeated to all heads. Padded batches need a mask too.
    a = arch(MISTRAL)
    short, long = estimate(a, settings(seq_len=2048, micro_batch=2)), estimate(a, settings(seq_len=4096, micro_batch=1))
    assert long.term("recompute").bytes > short.term("recompute").bytes
    mask = long.term("activations").bytes - a.layers * 4096 * a.hidden * 2
    assert mask == 4096**2
    padded = estimate(a, settings(padding=True))
    assert padded.term("recompute").bytes > estimate(a, settings()).term("recompute").bytes


def test_8bit_paged_adamw_keeps_about_2_bytes_per_parameter_and_pages_the_big_tensors() -> None:
    in_torch, paged, _ = optimizer_bytes([50_000, 200_000], "paged_adamw_8bit")
    assert in_torch == 2 * 50_000 + 2 * 4 * (196 + 782)  # small tensor's states + every tensor's absmax constants
    assert paged == 2 * 200_000
    assert optimizer_bytes([2000], "paged_adamw_8bit") == (2 * 4 * 2000, 0, "2 states × 8 bit ≈ 8.00 B/param")
    assert optimizer_bytes([200_000], "adamw_torch")[:2] == (8 * 200_000, 0)


def test_full_logits_cost_tokens_x_vocab_and_the_chunked_head_does_not(tmp_path: Path) -> None:
    smoothing = "training.sft_args={label_smoothing_factor: 0.1}"
    for name in (MISTRAL, LLAMA3):
        chunked = estimate_for_recipe(load_recipe(write_recipe(tmp_path, name)))
        full = estimate_for_recipe(load_recipe(write_recipe(tmp_path, name), [smoothing]))
        assert full.term("loss").bytes > 14 * 4 * 2048 * full.arch.vocab
        assert chunked.term("loss").bytes < full.term("loss").bytes / 5
    assert "label smoothing" in " ".join(full.notes)


def test_qloras_loss_head_counts_its_fp32_gradient_where_trls_counts_a_hidden_copy(tmp_path: Path) -> None:
    """`training.lm_head_grad_in_forward` (on by default) keeps each scored token's gradient in fp32 (4 bytes a
    hidden value) where TRL's head keeps a bf16 copy of the hidden state (2), and a tile of the whole vocabulary
    of about the size of TRL's 4,096 x 32,768 one."""
    for name in (MISTRAL, LLAMA3):
        ours = estimate_for_recipe(load_recipe(write_recipe(tmp_path, name)))
        trl = estimate_for_recipe(load_recipe(write_recipe(tmp_path, name), ["training.lm_head_grad_in_forward=false"]))
        assert ours.settings.head_grad_in_forward and not trl.settings.head_grad_in_forward
        tokens = ours.settings.micro_batch * ours.settings.seq_len
        extra = ours.term("loss").bytes - trl.term("loss").bytes
        tile_difference = 0.03 * 4096 * 32768 * 2
        assert abs(extra - tokens * 2 * ours.arch.hidden) < tile_difference, name
        assert "gradient in forward" in ours.term("loss").name


def test_the_peak_is_the_larger_of_the_loss_head_and_the_last_layers_backward() -> None:
    est = estimate(arch(LLAMA3), settings(seq_len=4096, micro_batch=2, lora_r=8, target_modules=("q_proj",),
                                         full_logits=True))
    assert est.peak_moment == "loss head" and est.term("loss").at_peak and not est.term("recompute").at_peak
    est = estimate(arch(LLAMA3), settings())
    assert est.peak_moment == "backward of the last layer" and not est.term("loss").at_peak
    assert est.total == sum(t.bytes for t in est.terms if t.at_peak)
    assert est.reserved == est.total - est.term("context").bytes - est.paged


def test_dry_run_shows_the_estimate(tmp_path: Path, console: Console, tiny_model_dir: Path) -> None:
    from qlora_cli.commands.train import dry_run

    dry_run(demo_recipe(tmp_path), console)
    out = console.export_text()
    assert "4-bit base weights" in out and "total on the GPU" in out and "longest training example" in out


def test_train_warns_before_loading_when_the_estimate_exceeds_the_gpu(tmp_path: Path, console: Console) -> None:
    recipe = load_recipe(write_recipe(tmp_path, gradient_checkpointing=False))
    warn_if_too_big(recipe, Device("cuda", "Small GPU", 16 * GIB, True), console)
    out = " ".join(console.export_text().split())
    assert "warning: the estimated peak of" in out and "exceeds the 16.00 GiB of Small GPU" in out
    assert "gradient checkpointing on" in out
    warn_if_too_big(recipe, Device("cuda", "Big GPU", 160 * GIB, True), console)
    warn_if_too_big(recipe, Device("cpu", "CPU", None, True), console)
    assert console.export_text() == ""


# ------------------------------------------------------------------------------------- verdicts and fixes


def test_verdicts_for_common_gpus(tmp_path: Path) -> None:
    seventy = estimate(arch("meta-llama/Meta-Llama-3-70B"), settings(micro_batch=1))
    assert seventy.verdict(find_gpu("T4")) == "no" and seventy.verdict(find_gpu("H100")) == "fits"
    tiny = estimate_for_recipe(demo_recipe(tmp_path))
    assert all(tiny.verdict(find_gpu(g)) == "fits" for g in ("T4", "L4", "4090", "A100-40GB"))


def test_suggestions_are_ranked_and_give_the_total_their_overrides_give(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, gradient_checkpointing=False, per_device_train_batch_size=8)
    est = estimate_for_recipe(load_recipe(path))
    l4 = find_gpu("L4")
    assert est.verdict(l4) == "no"
    fixes = suggestions(est.arch, est.settings, l4.bytes)
    assert fixes[0].fits and fixes[0].change == "turn gradient checkpointing on"
    assert [f.fits for f in fixes] == sorted((f.fits for f in fixes), reverse=True)
    for fix in fixes:  # each suggestion is a set of --set overrides whose estimate is the total shown
        assert estimate_for_recipe(load_recipe(path, fix.overrides)).total == fix.total


def test_max_micro_batch_is_the_largest_that_fits() -> None:
    a, s = arch(MISTRAL), settings()
    for gpu in ("T4", "A100-80GB"):
        capacity = find_gpu(gpu).bytes
        best = max_micro_batch(a, s, capacity)
        assert best >= 1
        assert estimate(a, dataclasses.replace(s, micro_batch=best)).total <= capacity
        assert estimate(a, dataclasses.replace(s, micro_batch=best + 1)).total > capacity
    assert max_micro_batch(arch("meta-llama/Meta-Llama-3-70B"), s, find_gpu("T4").bytes) == 0


# --------------------------------------------------------------------------------------------- bad input


def test_gpu_names_and_memory_sizes() -> None:
    assert find_gpu("rtx4090").name == find_gpu("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert find_gpu("h100").bytes == 81559 * 2**20
    assert parse_vram("24GB").bytes == parse_vram("24 GiB").bytes == 24 * GIB
    assert parse_vram("16000MiB").bytes == 16000 * 2**20


@pytest.mark.parametrize("name", ["V100000", "rtx 9999"])
def test_an_unknown_gpu_lists_the_known_ones(name: str) -> None:
    with pytest.raises(UserError) as e:
        find_gpu(name)
    assert e.value.where == "--gpu" and name in e.value.message
    assert "RTX 4090" in e.value.fix and "A100-80GB" in e.value.fix and "--vram" in e.value.fix


def test_an_ambiguous_gpu_names_its_sizes() -> None:
    with pytest.raises(UserError, match="several sizes") as e:
        find_gpu("A100")
    assert e.value.fix == "Use one of A100-40GB, A100-80GB"


@pytest.mark.parametrize("text", ["lots", "24 parsecs", "-8GB", "0GB", ""])
def test_nonsense_vram_is_refused(text: str) -> None:
    with pytest.raises(UserError, match="cannot read GPU memory") as e:
        parse_vram(text)
    assert e.value.where == "--vram" and "24GB" in e.value.fix


def test_unknown_target_modules_are_named(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path), ["lora.target_modules=[q_proj, qkv_proj]"])
    with pytest.raises(UserError, match="qkv_proj") as e:
        estimate_for_recipe(recipe)
    assert "gate_proj" in e.value.fix


# ---------------------------------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_cli.cli", "footprint", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_json_has_terms_verdicts_suggestions_and_max_batch(tmp_path: Path) -> None:
    proc = cli(str(write_recipe(tmp_path)), "--set", "training.gradient_checkpointing=false", "--gpu", "L4",
               "--max-batch", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["estimate"]["total_bytes"] == sum(t["bytes"] for t in report["estimate"]["terms"] if t["at_peak"])
    assert report["verdicts"][0]["gpu"] == "L4" and report["verdicts"][0]["verdict"] == "no"
    assert report["verdicts"][0]["max_micro_batch"] >= 0
    assert report["suggestions"][0]["fits"] and report["suggestions"][0]["for_gpu"] == "L4"


def test_cli_errors_for_bad_gpu_and_for_measure_without_cuda(tmp_path: Path) -> None:
    recipe = str(write_recipe(tmp_path))
    proc = cli(recipe, "--gpu", "Voodoo5")
    assert proc.returncode == 2 and "unknown GPU 'Voodoo5'" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(recipe, "--measure")
    error = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "--measure: real training steps need a CUDA GPU, and none is visible" in error


def test_liger_and_compiling_are_decided_for_the_target_gpu_not_the_machine_that_estimates(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    """A laptop without liger-kernel and the GPU machine with it give the same estimate."""
    import qlora_cli.model

    recipe = load_recipe(write_recipe(tmp_path))
    estimates = []
    for installed in (False, True):
        monkeypatch.setattr(qlora_cli.model, "liger_installed", lambda installed=installed: installed)
        estimates.append(estimate_for_recipe(recipe).total)
    assert estimates[0] == estimates[1]
    compiled = estimate_for_recipe(recipe).settings  # Mistral-7B on a GPU: layers compiled, so no Liger
    assert compiled.compiled and not compiled.liger
    eager = estimate_for_recipe(load_recipe(write_recipe(tmp_path), ["training.compile_layers=false"])).settings
    assert eager.liger and not eager.compiled  # liger-kernel assumed installed on the GPU (the `gpu` extra)


def test_compiled_layers_keep_what_liger_keeps_and_the_dropout_masks() -> None:
    """Measured on an H200 (docs/footprint.md): compiled layers keep a bf16 norm input and no SiLU output, like
    Liger's kernels; the LoRA dropout masks stay."""
    a = arch(MISTRAL)
    eager = estimate(a, settings(gradient_checkpointing=False))
    compiled = estimate(a, settings(gradient_checkpointing=False, compiled=True))
    liger = estimate(a, settings(gradient_checkpointing=False, liger=True))
    per_token_layer = (eager.term("activations").bytes - compiled.term("activations").bytes) / (a.layers * 4 * 2048)
    assert per_token_layer == 2 * 2 * a.hidden + 2 * a.intermediate  # fp32 -> bf16 norm inputs, no SiLU output
    assert compiled.term("activations").bytes == liger.term("activations").bytes


def test_dropout_inside_the_a_projections_keeps_no_copies_or_masks_where_the_layers_are_compiled(
        tmp_path: Path) -> None:
    """`training.fused_lora_dropout: auto` follows the compiled layers (a 7B recipe on the GPU), and the estimate
    follows it: the LoRA inputs are kept once, as without dropout; with peft's dropout (`false`, or eager layers,
    or float32 adapters the kernels skip) each adapter's copy and mask are counted."""
    def lora_inputs(*overrides: str) -> tuple[bool, int]:
        est = estimate_for_recipe(load_recipe(write_recipe(tmp_path), list(overrides)))
        part = next(p for p in est.layer_parts if p.startswith("LoRA inputs"))
        return est.settings.lora_dropout, int(part.rsplit(" ", 1)[1].replace(",", ""))

    fused, peft = lora_inputs(), lora_inputs("training.fused_lora_dropout=false")
    assert fused[0] is False and peft[0] is True
    assert lora_inputs("lora.lora_dropout=0") == fused  # the dropout-free layout
    assert fused[1] < peft[1]
    assert lora_inputs("training.compile_layers=false")[0] is True
    assert lora_inputs("lora.adapter_dtype=float32")[0] is True
    assert lora_inputs("training.compile_layers=false", "training.fused_lora_dropout=true")[0] is False


def test_the_recompute_keeps_every_dequantized_weight_but_a_down_projection_that_runs_outside_it(
        tmp_path: Path) -> None:
    """With compiled NF4 layers under checkpointing (`training.keep_dequantized`), the recompute keeps one layer's
    dequantized weights for backward: on Llama/Mistral/Qwen layers all but the MLP's output projection, which runs
    once outside the checkpoint; with `training.recompute_down_proj`, or on layers qlora does not split that way,
    that projection's weight is kept too."""
    def kept_bytes(model_type: str | None = None, *overrides: str) -> int:
        recipe = load_recipe(write_recipe(tmp_path, gradient_checkpointing=True), list(overrides))
        est = estimate_for_recipe(recipe)
        if model_type is not None:  # the same shape under another architecture's name
            est = estimate(dataclasses.replace(est.arch, model_type=model_type), est.settings)
        return next((t.bytes for t in est.terms if t.key == "dequantized"), 0)

    a = arch(MISTRAL)
    six = 2 * sum(fi * fo for name, (fi, fo) in a.linears.items() if name != "down_proj")
    down = 2 * a.intermediate * a.hidden
    assert kept_bytes() == six  # 304 MiB on Mistral-7B
    assert kept_bytes(None, "training.recompute_down_proj=true") == six + down
    assert kept_bytes("gemma") == six + down
    assert kept_bytes(None, "training.keep_dequantized=false") == 0


def test_the_lora_a_outputs_kept_for_the_recompute_are_counted_where_training_keeps_them(tmp_path: Path) -> None:
    """Under checkpointing with compiled layers and the fused dropout (`training.keep_lora_a_outputs`), every
    layer's A projections keep rank values a row for micro-batch × max_length rows (the slots train allocates):
    Mistral-7B, 7 projections, rank 16, 2 × 512 rows, 2 bytes: 32 × 7 × 1,024 × 16 × 2 = 7 MiB."""
    def kept_bytes(*overrides: str) -> int:
        recipe = load_recipe(write_recipe(tmp_path, gradient_checkpointing=True, per_device_train_batch_size=2),
                             ["data.max_length=512", *overrides])
        return next((t.bytes for t in estimate_for_recipe(recipe).terms if t.key == "lora_a_kept"), 0)

    assert kept_bytes() == 32 * 7 * 2 * 512 * 16 * 2
    assert kept_bytes("training.keep_lora_a_outputs=false") == 0
    assert kept_bytes("lora.lora_dropout=0") == 0  # no fused dropout: peft's A product, recomputed
    assert kept_bytes("training.gradient_checkpointing=false") == 0
    assert kept_bytes("training.compile_layers=false") == 0


def test_packed_rows_under_flex_attention_build_no_mask() -> None:
    a = arch(LLAMA3)
    sdpa = estimate(a, settings(packing=True, gradient_checkpointing=False))
    flex = estimate(a, settings(packing=True, gradient_checkpointing=False, flex=True))
    assert flex.term("activations").bytes < sdpa.term("activations").bytes
    assert not any(part.startswith("mask bias") for part in flex.layer_parts)
    assert any(part.startswith("mask bias") for part in sdpa.layer_parts)
