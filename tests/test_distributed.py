"""Two processes through accelerate's launcher (gloo on the CPU): DDP trains, rank 0 alone writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DATA, DEMO_RECIPE, REPO

from qlora_cli.errors import UserError
from qlora_cli.recipe import load_recipe


def qlora_train(out: Path, processes: int, micro_batch: int) -> subprocess.CompletedProcess:
    args = ["-m", "qlora_cli.cli", "train", str(DEMO_RECIPE),
            "--set", f"data.source={DEMO_DATA / 'train.jsonl'}",
            "--set", f"data.eval_source={DEMO_DATA / 'eval.jsonl'}",
            "--set", f"training.output_dir={out}", "--set", "training.max_steps=4",
            "--set", f"training.per_device_train_batch_size={micro_batch}", "--set", "training.logging_steps=1",
            "--set", "training.sft_args={}", "--set", "evaluation.compare_after_training=0"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [*launcher, *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_two_processes_match_one_at_the_same_global_batch(tmp_path: Path) -> None:
    one = qlora_train(tmp_path / "one", processes=1, micro_batch=16)
    assert one.returncode == 0, one.stderr[-3000:]
    two = qlora_train(tmp_path / "two", processes=2, micro_batch=8)
    assert two.returncode == 0, two.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"]) == (2, 16)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(losses(tmp_path / "two")) == 4, "rank 0 alone logs each step"
    assert two.stdout.count("Run summary") == 1, "rank 0 alone reports"
    # Same global batch of the same examples: the per-step losses agree (bf16 all-reduce order aside).
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=2e-3)

    from peft import PeftModel  # the saved adapter is a normal PEFT adapter
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(json.loads(
        (tmp_path / "two" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    PeftModel.from_pretrained(base, tmp_path / "two" / "adapter")


def test_fsdp_needs_a_shardable_4bit_storage_dtype(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bnb_4bit_quant_storage: bfloat16"):
        load_recipe(DEMO_RECIPE, ["distributed.strategy=fsdp"])
    recipe = load_recipe(DEMO_RECIPE, ["distributed.strategy=fsdp", "quantization.bnb_4bit_quant_storage=bfloat16"])
    assert recipe.distributed.strategy == "fsdp"


def test_gpus_option_refuses_more_gpus_than_visible(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "qlora_cli.cli", "train", str(DEMO_RECIPE), "--gpus", "2",
                           "--set", f"training.output_dir={tmp_path / 'x'}"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "--gpus 2 asks for more GPUs than the 0 visible" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_footprint_reports_per_gpu_memory_for_the_strategy() -> None:
    from qlora_cli.footprint import estimate_for_recipe

    llama = REPO / "recipes" / "llama3-8b.yaml"
    one = estimate_for_recipe(load_recipe(llama))
    ddp = estimate_for_recipe(load_recipe(llama), processes=2)
    fsdp = estimate_for_recipe(load_recipe(llama, ["distributed.strategy=fsdp",
                                                   "quantization.bnb_4bit_quant_storage=bfloat16"]), processes=4)
    # DDP: a full copy per GPU plus the gradient buckets.
    assert ddp.term("base_4bit").bytes == one.term("base_4bit").bytes
    assert ddp.term("ddp_buckets").bytes == one.term("grads").bytes
    # FSDP: weights, adapters and optimizer state sharded 4 ways; activations stay per GPU.
    assert fsdp.term("base_4bit").bytes == -(-one.term("base_4bit").bytes // 4)
    assert fsdp.term("optimizer").bytes < one.term("optimizer").bytes
    assert fsdp.term("activations").bytes == one.term("activations").bytes
    assert fsdp.total < one.total
