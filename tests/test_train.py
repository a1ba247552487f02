"""`qlora train` end to end on the tiny model: real NF4 layers, paged 8-bit AdamW and TRL's SFTTrainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, demo_recipe

from qlora_cli.commands.train import StepClock, build_sft_config, dry_run, eval_loss_row, shape_args, train
from qlora_cli.errors import UserError
from qlora_cli.model import Device, meta_model
from qlora_cli.run_dir import RunDir


def test_dry_run_shows_recipe_parameters_data_and_the_loss_carrying_part(tmp_path: Path, console) -> None:
    recipe = demo_recipe(tmp_path)
    dry_run(recipe, console)
    out = console.export_text()
    assert "name_or_path: qlora/tiny-llama" in out
    assert "Parameters: 1,980,160 total, 149,504 trainable" in out
    assert "│ train │   300 │" in out.replace("│ train │  300 │", "│ train │   300 │")
    assert "Classify the banking request:" in out and "green carries loss" in out
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_dry_run_of_a_7b_recipe_reads_no_weights(tmp_path: Path, console, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    from qlora_cli.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "mistral7b.yaml")
    model = meta_model(recipe)
    assert all(p.device.type == "meta" for p in model.parameters())
    dry_run(recipe, console)
    out = console.export_text()
    assert "Parameters: 7,283,675,136 total, 41,943,040 trainable" in out


def test_sft_config_mirrors_the_recipe(tmp_path: Path) -> None:
    recipe = demo_recipe(tmp_path, "training.gradient_accumulation_steps=3", "data.packing=true")
    args = build_sft_config(recipe, RunDir(tmp_path / "run"), Device("cpu", "CPU", None, True), "bf16", True)
    assert args.optim == "paged_adamw_8bit"
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (args.gradient_accumulation_steps, args.max_length, args.packing) == (3, 64, True)
    assert args.bf16 and not args.fp16
    assert args.eval_on_start  # from training.sft_args
    assert not args.accelerator_config.non_blocking and not args.dataloader_pin_memory  # nothing to pin on a CPU


def test_on_a_gpu_batches_are_pinned_and_copied_to_the_device_without_waiting_for_it(tmp_path: Path) -> None:
    """A blocking host-to-GPU copy waits for everything queued before it: the next batch would reach the GPU only
    once the previous step had finished, and its collation would run with the GPU idle."""
    recipe = demo_recipe(tmp_path)
    gpu = Device("cuda", "NVIDIA H200", 143_771 * 2**20, True)
    args = build_sft_config(recipe, RunDir(tmp_path / "run"), gpu, "fp32", True)
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory
    mine = demo_recipe(tmp_path, "training.sft_args={accelerator_config: {non_blocking: false}}")
    assert not build_sft_config(mine, RunDir(tmp_path / "run"), gpu, "fp32", True).accelerator_config.non_blocking


def test_training_lowers_loss_and_saves_a_safetensors_adapter(trained_run) -> None:
    run, summary = trained_run
    assert summary["steps"] == 150
    assert summary["final_eval_loss"] < summary["first_eval_loss"] / 2
    assert summary["comparison"]["adapter_accuracy"] > summary["comparison"]["base_accuracy"] + 0.4
    files = {p.name for p in run.adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] / 2
    assert all("tokens_per_s" in m and "peak_memory_bytes" in m for m in metrics if "loss" in m)
    assert "name_or_path: qlora/tiny-llama" in run.recipe.read_text()
    saved = json.loads(run.summary.read_text())
    assert saved["steps"] == 150 and saved["tokens_per_s"] > 0


def test_adapter_loads_onto_the_4bit_base_and_changes_its_logits(trained_run, tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, _ = trained_run
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16)
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    tok = AutoTokenizer.from_pretrained(run.adapter)
    row = json.loads((REPO / "data" / "tiny-intents" / "train.jsonl").read_text().splitlines()[0])
    ids = tok(f"Classify the banking request: {row['prompt']}\nIntent:", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, run.adapter)
        after = tuned(**ids).logits
        next_token = tok.decode(after[0, -1].argmax())
    assert (after - before).abs().max() > 1.0
    assert row["completion"].startswith(next_token)


def test_an_existing_run_directory_is_not_overwritten(trained_run, console) -> None:
    run, _ = trained_run
    recipe = demo_recipe(run.path.parent)
    with pytest.raises(UserError, match="already exists"):
        train(recipe, console)
    assert run.is_complete()


def test_models_load_without_kernels_from_the_hub(tmp_path: Path) -> None:
    """transformers 5.25 swaps layers for kernels fetched from the Hugging Face Hub at every load unless told not
    to (offline on CUDA the load fails; online the layers qlora compiles are replaced): qlora loads without them."""
    from qlora_cli.model import load_model

    model = load_model(demo_recipe(tmp_path), Device("cpu", "CPU", None, True), "bf16")
    assert not getattr(model, "use_kernels", False)


def test_4bit_training_without_gpu_needs_an_explicit_opt_in(tmp_path: Path, console) -> None:
    recipe = demo_recipe(tmp_path, "training.allow_cpu=false")
    with pytest.raises(UserError, match="no CUDA GPU is visible") as e:
        train(recipe, console)
    assert e.value.where == "training.allow_cpu"
    assert not (tmp_path / "run").exists()


def test_unknown_target_modules_list_the_linear_layers(tmp_path: Path) -> None:
    recipe = demo_recipe(tmp_path, "lora.target_modules=[q_proj, qkv_proj]")
    with pytest.raises(UserError) as e:
        meta_model(recipe)
    assert "qkv_proj" in e.value.message
    assert "gate_proj" in e.value.fix and "q_proj" in e.value.fix


def test_cli_reports_user_errors_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  name_or_path: qlora/tiny-llama\ndata:\n  source: x.jsonl\nlora:\n  rank: 8\n")
    proc = subprocess.run([sys.executable, "-m", "qlora_cli.cli", "train", str(bad), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key `rank` in lora" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") <= 3


def test_cli_help_lists_the_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "qlora_cli.cli", "train", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    for option in ("--set", "--dry-run", "--overwrite"):
        assert option in proc.stdout


def test_compiled_layers_train_evaluate_and_generate_like_eager_layers(tmp_path: Path) -> None:
    """`training.compile_layers: true` (the CUDA default) on the CPU: the same loss curve as eager layers, eval
    runs through the compiled layers, and the base-vs-adapter comparison (generation) runs on eager ones. While
    training, each compiled layer is checkpointed around its compiled call and transformers' own checkpoint stays
    off, though `Trainer.train()` turns it on again when it starts (on transformers 5.23+ it would checkpoint
    inside the compiled graph, where CUDA's flex attention runs unfused)."""
    import torch
    from rich.console import Console
    from transformers import TrainerCallback

    from qlora_cli.model import decoder_layers

    class LayerCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.seen: set[tuple[bool, bool]] = set()  # (transformers' flag, qlora's checkpoint around the call)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen |= {(layer.gradient_checkpointing,
                           getattr(layer._compiled_call_impl, "checkpoint_around", False))
                          for layer in decoder_layers(model)}

    torch._dynamo.reset()  # as in a fresh process: no graph cached by an earlier test's layers of the same shapes
    common = ["training.max_steps=20", "training.logging_steps=5", "training.eval_steps=10",
              "training.save_steps=10", "evaluation.compare_after_training=8"]
    runs, checkpoints = {}, {False: LayerCheckpoints(), True: LayerCheckpoints()}
    for compiled in (False, True):
        console = Console(record=True, width=120, force_terminal=False)
        recipe = demo_recipe(tmp_path / str(compiled), *common, f"training.compile_layers={compiled}")
        summary = train(recipe, console, callbacks=[checkpoints[compiled]])
        runs[compiled] = (summary, console.export_text(), RunDir(tmp_path / str(compiled) / "run"))
    (eager, eager_out, _), (compiled, compiled_out, run) = runs[False], runs[True]
    assert "Compiling 2 decoder layers" in compiled_out and "Compiling" not in eager_out
    assert "compiled no graph" not in compiled_out
    assert checkpoints[True].seen == {(False, True)} and checkpoints[False].seen == {(True, False)}
    losses = {c: [json.loads(x)["loss"] for x in r.metrics.read_text().splitlines() if '"loss"' in x]
              for c, (_, _, r) in runs.items()}
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=5e-2)
    assert compiled["comparison"]["n"] == 8
    assert (run.adapter / "adapter_model.safetensors").is_file()
    # Unpacked batches of varying length: the layers are compiled for any length at the first step, and no later
    # training step compiles (steps that compiled count as warm-up; evaluations' own graphs do not).
    assert compiled["compiles"] >= 1 and compiled["warmup_steps"] == 1
    assert compiled["steady_steps"] >= 15 and compiled["steady_tokens_per_s"] > 0
    assert eager["compiles"] == 0


def test_a_recipe_with_fused_lora_dropout_trains_like_peft_dropout_and_saves_the_same_adapter(tmp_path: Path) -> None:
    """`training.fused_lora_dropout: true` with `lora.lora_dropout: 0.1`: every LoRA projection's dropout runs inside
    its A projection, the loss curve is that of peft's dropout up to the different random masks, and the adapter
    has the same weights by name, loading like any other. With `lora_dropout: 0` there is nothing to fuse: a
    warning says so."""
    from peft import PeftModel
    from rich.console import Console
    from safetensors import safe_open
    from transformers import TrainerCallback

    from qlora_cli.lora_dropout import FusedDropoutLinear
    from qlora_cli.model import load_model

    class CountFused(TrainerCallback):
        fused = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.fused = sum(isinstance(m, FusedDropoutLinear) for m in model.modules())

    common = ["training.max_steps=12", "training.logging_steps=4", "evaluation.compare_after_training=0",
              "lora.lora_dropout=0.1"]
    runs, counts, printed = {}, {}, {}
    for fused in (False, True):
        counts[fused] = CountFused()
        console = Console(record=True, width=120, force_terminal=False)
        recipe = demo_recipe(tmp_path / str(fused), *common, f"training.fused_lora_dropout={fused}")
        train(recipe, console, callbacks=[counts[fused]])
        runs[fused], printed[fused] = RunDir(tmp_path / str(fused) / "run"), console.export_text()
    assert counts[True].fused == 14 and counts[False].fused == 0  # 7 projections x 2 layers
    assert "LoRA dropout inside the A projection of 14 LoRA layers" in printed[True]
    assert "fused_lora_dropout" not in printed[False]
    console = Console(record=True, width=200, force_terminal=False)
    train(demo_recipe(tmp_path / "p0", *common, "lora.lora_dropout=0", "training.fused_lora_dropout=true",
                      "training.max_steps=1"), console)
    assert "training.fused_lora_dropout is on but no LoRA layer qualifies" in console.export_text()
    losses = {f: [json.loads(x)["loss"] for x in r.metrics.read_text().splitlines() if '"loss"' in x]
              for f, r in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=5e-2)
    names = {}
    for fused, run in runs.items():
        with safe_open(str(run.adapter / "adapter_model.safetensors"), "pt") as f:
            names[fused] = set(f.keys())
    assert names[True] == names[False] and len(names[True]) == 28
    base = load_model(demo_recipe(tmp_path / "load"), Device("cpu", "CPU", None, True), "fp32")
    assert isinstance(PeftModel.from_pretrained(base, str(runs[True].adapter)), PeftModel)


def test_a_recipe_folding_lora_b_into_the_frozen_product_trains_like_peft_and_saves_the_same_adapter(
        tmp_path: Path) -> None:
    """`training.fold_lora_b` with compiled layers: the run folds the q, o, gate and up projections of both layers,
    says so, compiles as many graphs, logs the losses of the same run without it and saves an adapter with the same
    weight names; without compiled layers nothing qualifies and the run says that it trains with peft's forward."""
    import torch
    from rich.console import Console
    from safetensors import safe_open

    common = ["training.max_steps=6", "training.logging_steps=2", "evaluation.compare_after_training=0",
              "training.compile_layers=true", "lora.lora_dropout=0"]
    runs, printed, compiles = {}, {}, {}
    for fold in (False, True):
        torch._dynamo.reset()
        console = Console(record=True, width=200, force_terminal=False)
        summary = train(demo_recipe(tmp_path / str(fold), *common, f"training.fold_lora_b={fold}"), console)
        runs[fold], printed[fold] = RunDir(tmp_path / str(fold) / "run"), console.export_text()
        compiles[fold] = summary["compiles"]
    assert compiles[True] == compiles[False] > 0  # the folded layers compile once too
    assert "LoRA's B product inside the frozen product of 8 projections" in printed[True]
    assert "fold_lora_b" not in printed[False]
    losses = {f: [json.loads(x)["loss"] for x in r.metrics.read_text().splitlines() if '"loss"' in x]
              for f, r in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-2)
    names = {}
    for fold, run in runs.items():
        with safe_open(str(run.adapter / "adapter_model.safetensors"), "pt") as f:
            names[fold] = set(f.keys())
    assert names[True] == names[False] and len(names[True]) == 28
    console = Console(record=True, width=200, force_terminal=False)
    train(demo_recipe(tmp_path / "eager", "training.max_steps=1", "evaluation.compare_after_training=0",
                      "training.compile_layers=false", "training.fold_lora_b=true"), console)
    assert "training.fold_lora_b is on but no LoRA layer qualifies" in console.export_text()


def test_compiled_layers_that_compile_nothing_are_reported(tmp_path: Path) -> None:
    """When torch.compile falls back to eager for the whole layer (as it did with the checkpoint inside the
    compiled graph on transformers 5.25), the run says so instead of training at eager speed in silence."""
    import torch
    from rich.console import Console

    torch._dynamo.reset()
    console = Console(record=True, width=200, force_terminal=False)
    recipe = demo_recipe(tmp_path, "training.max_steps=1", "training.compile_layers=true",
                         "evaluation.compare_after_training=0")
    with torch.compiler.set_stance("force_eager"):  # what a fallback does: every compiled call runs eagerly
        summary = train(recipe, console)
    assert summary["compiles"] == 0
    assert "the first step compiled no graph, so the 2 compiled decoder layers ran eagerly" in console.export_text()


def test_the_step_bookkeeping_and_the_loss_read_nothing_back_in_a_step_and_log_what_transformers_and_trl_log(
        tmp_path: Path, monkeypatch, console) -> None:
    """Within a step the CPU does not wait for the GPU, so that it queues the backward pass while the GPU finishes
    the forward, and the optimizer step while it finishes the backward: qlora's trainer keeps the token count on the
    device until the step ends, counts the model's parameters for the FLOP estimate once, does not look at each
    micro-batch's loss (transformers' NaN filter; a NaN stops the run instead), and reads TRL's per-micro-batch
    metrics (token accuracy, entropy, tokens seen) back when they are logged. What is logged is what transformers'
    and TRL's own bookkeeping log: the same losses, metrics and token counts, read at the steps that log or save and
    at the end; at the other steps the token count is a step late, so that the step's end does not wait either."""
    from torch.overrides import TorchFunctionMode
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from qlora_cli.reliability import atomic_checkpoint_trainer

    QLORA_DIRS = {"qlora_cli", "commands"}

    class ReadBacks(TorchFunctionMode):
        """Who reads a tensor's value back to Python, and in which part of the step."""

        def __init__(self) -> None:
            super().__init__()
            self.phase, self.seen = "setup", set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "__bool__", "__int__", "__float__", "tolist"):
                frame = sys._getframe(1)
                while frame and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back
                where = f"{Path(frame.f_code.co_filename).parent.name}/{Path(frame.f_code.co_filename).name}"
                self.seen.add((self.phase, where, frame.f_code.co_name))
            return func(*args, **(kwargs or {}))

    class Steps(TrainerCallback):
        def __init__(self, mode: ReadBacks | None) -> None:
            self.mode, self.tokens, self.logs = mode, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mode:
                self.mode.phase = "micro-batches"

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.mode:
                self.mode.phase = "step end"

        def on_step_end(self, args, state, control, **kwargs):
            self.tokens.append(state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({k: v for k, v in (logs or {}).items() if "runtime" not in k and "per_second" not in k})

    overrides = ["training.max_steps=5", "training.gradient_accumulation_steps=2", "training.logging_steps=2",
                 "training.save_steps=100", "evaluation.compare_after_training=0", "training.sft_args={}",
                 "training.eval_steps=4"]
    mode = ReadBacks()
    ours = Steps(mode)
    with mode:
        train(demo_recipe(tmp_path / "a", *overrides), console, callbacks=[ours])
    inside = {(where, fn) for phase, where, fn in mode.seen if phase == "micro-batches"}
    assert not {(w, fn) for w, fn in inside if w == "trainer/sft_trainer.py"}, inside  # the loss reads nothing back
    bookkeeping = {(w, fn) for w, fn in inside if w == "transformers/trainer.py" or w.split("/")[0] in QLORA_DIRS}
    assert not bookkeeping, bookkeeping
    assert ("step end", "qlora_cli/reliability.py", "count_pending_tokens") in mode.seen

    trainer = atomic_checkpoint_trainer()
    for name in ("_track_num_input_tokens", "compute_loss", "log"):  # transformers' and TRL's own
        monkeypatch.setattr(trainer, name, getattr(SFTTrainer, name))
    theirs = Steps(None)
    train(demo_recipe(tmp_path / "b", *overrides), console, callbacks=[theirs])
    # steps that log (2, 4) and the last one have the count up to their end; the others that of the step before,
    # so that their end does not wait for the GPU
    assert [ours.tokens[i] for i in (1, 3, 4)] == [theirs.tokens[i] for i in (1, 3, 4)] and theirs.tokens[0] > 0
    assert [ours.tokens[0], ours.tokens[2]] == [0, theirs.tokens[1]]
    assert [log.keys() for log in ours.logs] == [log.keys() for log in theirs.logs]
    assert any("eval_mean_token_accuracy" in log for log in ours.logs)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= ours.logs[0].keys()
    for mine, trls in zip(ours.logs, theirs.logs):
        assert mine == pytest.approx(trls, rel=1e-5), (mine, trls)


def bnb_8bit_optimizer(tmp_path: Path, **args: float) -> tuple[type, type, dict]:
    """qlora's bitsandbytes optimizer class for `paged_adamw_8bit`, bitsandbytes' own, and their arguments."""
    from transformers import TrainingArguments

    from qlora_cli.reliability import atomic_checkpoint_trainer

    training_args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_8bit", learning_rate=1e-2,
                                      report_to="none", **args)
    ours, kwargs = atomic_checkpoint_trainer().get_optimizer_cls_and_kwargs(training_args)
    return ours, ours.__mro__[1], kwargs


def optimizer_steps(cls: type, kwargs: dict, shapes, steps: int, reload_from: Path | None = None,
                    reload_after: int | None = None):
    """`steps` optimizer steps on bf16 tensors of `shapes` with seeded random gradients (optionally saving the state
    dict after `reload_after` steps and going on with a new optimizer loaded from it); (optimizer, start weights,
    weights, state tensors)."""
    import torch

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.bfloat16)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = cls(params, **kwargs)
    for step in range(steps):
        if step == reload_after:
            torch.save(opt.state_dict(), reload_from)
            opt = cls(params, **kwargs)
            opt.load_state_dict(torch.load(reload_from, weights_only=False))
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.bfloat16)
        opt.step()
    states = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return opt, start, [p.detach().clone() for p in params], states


def test_bitsandbytes_optimizers_step_like_bitsandbytes_without_waiting_after_each_parameter(tmp_path: Path) -> None:
    """`training.optim: paged_adamw_8bit` (and the other bitsandbytes optimizers) become bitsandbytes' class with
    its step minus the wait for the GPU after every parameter (on the CUDA default stream; elsewhere it waits as
    bitsandbytes does) and, for paged states, minus the prefetch before each update and the wait at the end. Three
    steps leave the same weights and 8-bit state as bitsandbytes' own step, bit for bit. transformers still
    recognises it as bitsandbytes (trained embeddings keep 32-bit state)."""
    import torch

    ours, theirs, kwargs = bnb_8bit_optimizer(tmp_path)
    assert theirs.__module__.startswith("bitsandbytes") and "bitsandbytes" in str(ours) and ours.step is not theirs.step
    # (16, 8192): paged state on CUDA (>= 100k elements); (16, 300): 32-bit state (< 4096 elements)
    shapes = ((16, 4096), (4096, 16), (16, 8192), (16, 300))
    runs = [optimizer_steps(cls, kwargs, shapes, 3) for cls in (ours, theirs)]
    for _, start, weights, _ in runs:
        assert all(not torch.equal(p, p0) for p, p0 in zip(weights, start))  # every weight moved
    (_, _, w1, s1), (_, _, w2, s2) = runs
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and len(s1) == len(s2) > 0
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_8bit_adamw_updates_a_whole_group_with_one_call_bit_for_bit_and_resumes_from_its_state_dict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 8-bit AdamW states, qlora's step updates a parameter group whose tensors are whole 256-element blocks
    with one bitsandbytes call over the tensors laid end to end (qlora_cli/flat_update.py): the weights and the
    8-bit states equal bitsandbytes' own per-tensor step bit for bit, each tensor's state is a view into the
    group's buffers, and a state dict saved after two steps and loaded into a new optimizer continues the same
    way. Tensors that are not whole blocks, or small enough for 32-bit states, update one by one as before. (On
    CUDA only by default: the CPU's update is faster tensor by tensor; here it runs on the CPU's kernels.)"""
    import torch

    from qlora_cli import flat_update

    monkeypatch.setattr(flat_update, "DEVICES", ("cuda", "cpu"))
    ours, theirs, kwargs = bnb_8bit_optimizer(tmp_path, weight_decay=0.1)
    shapes = ((16, 4096), (4096, 16), (16, 14336), (1024, 16), (16, 1024))  # a 7-8B adapter's, fewer

    opt, _, w_ours, s_ours = optimizer_steps(ours, kwargs, shapes, 4)
    _, _, w_theirs, s_theirs = optimizer_steps(theirs, kwargs, shapes, 4)
    assert all(torch.equal(a, b) for a, b in zip(w_ours, w_theirs))
    assert len(s_ours) == len(s_theirs) == 6 * len(shapes)  # state1, qmap1, state2, qmap2, absmax1, absmax2
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(s_ours, s_theirs))
    (flat,) = opt.qlora_flat.values()  # one group, one buffer each
    assert flat.state1.numel() == sum(a * b for a, b in shapes)
    assert all(opt.state[p]["state1"].untyped_storage().data_ptr() == flat.state1.untyped_storage().data_ptr()
               for p in flat.params)
    assert {opt.state[p]["step"] for p in flat.params} == {4}

    opt, _, w_resumed, s_resumed = optimizer_steps(ours, kwargs, shapes, 4, tmp_path / "optimizer.pt", 2)
    assert all(torch.equal(a, b) for a, b in zip(w_resumed, w_theirs))
    assert all(torch.equal(a, b) for a, b in zip(s_resumed, s_theirs))
    assert len(opt.qlora_flat) == 1  # the loaded states were laid end to end again

    # 4,800 elements: 8-bit state, not whole blocks; 3,200: a 32-bit state (below 4,096 elements)
    odd = (*shapes, (16, 300), (16, 200))
    opt, _, w_odd, s_odd = optimizer_steps(ours, kwargs, odd, 3)
    _, _, w_odd_theirs, s_odd_theirs = optimizer_steps(theirs, kwargs, odd, 3)
    assert all(torch.equal(a, b) for a, b in zip(w_odd, w_odd_theirs))
    assert len(s_odd) == len(s_odd_theirs) and all(torch.equal(a, b) for a, b in zip(s_odd, s_odd_theirs))
    (flat,) = opt.qlora_flat.values()
    assert [tuple(p.shape) for p in flat.params] == list(shapes)  # the other two updated one by one


def test_when_the_one_call_update_fails_at_its_first_step_the_tensors_update_one_by_one_and_a_warning_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bitsandbytes whose update call rejects the laid-out buffers (a version or device the one-call update was
    not checked on) costs nothing but the speed: the first step warns, and every step updates tensor by tensor with
    bitsandbytes' weights and states."""
    import bitsandbytes.functional as F
    import torch

    from qlora_cli import flat_update

    monkeypatch.setattr(flat_update, "DEVICES", ("cuda", "cpu"))
    ours, theirs, kwargs = bnb_8bit_optimizer(tmp_path)
    update = F.optimizer_update_8bit_blockwise

    def rejects_long_buffers(name, g, p, *rest, **kw):
        if p.numel() > 16 * 4096:
            raise RuntimeError("no such kernel")
        return update(name, g, p, *rest, **kw)

    shapes = ((16, 4096), (4096, 16), (16, 1024))
    _, _, w_theirs, s_theirs = optimizer_steps(theirs, kwargs, shapes, 3)
    monkeypatch.setattr(F, "optimizer_update_8bit_blockwise", rejects_long_buffers)
    with pytest.warns(UserWarning, match="could not update the adapter's tensors with one bitsandbytes call"):
        _, _, w_mine, s_mine = optimizer_steps(ours, kwargs, shapes, 3)
    mine, theirs_all = w_mine + s_mine, w_theirs + s_theirs
    assert len(mine) == len(theirs_all) and all(torch.equal(a, b) for a, b in zip(mine, theirs_all))


def test_steady_tokens_per_s_leaves_out_warm_up_compiles_evaluations_and_saves() -> None:
    clock = StepClock()
    assert clock.add(40.0, 8000, compiled=3, first=True, eval_or_save=False) == "warm-up"  # first step compiles
    assert clock.add(1.0, 8000, compiled=0, first=False, eval_or_save=False) == "steady"
    assert clock.add(30.0, 8000, compiled=2, first=False, eval_or_save=False) == "warm-up"  # a recompile
    assert clock.add(9.0, 8000, compiled=1, first=False, eval_or_save=True) == "other"  # eval compiled its graph
    assert clock.add(1.0, 6000, compiled=0, first=False, eval_or_save=False) == "steady"
    assert clock.tokens_per_s == 7000.0
    assert (clock.warmup_s, clock.warmup_steps, clock.other_s, clock.compiles) == (70.0, 2, 9.0, 6)


def test_eval_loss_is_labelled_start_only_when_an_evaluation_ran_before_training() -> None:
    at_start = {"first_eval_loss": 7.41, "final_eval_loss": 0.002, "first_eval_step": 0}
    assert eval_loss_row(at_start) == ("eval loss (start -> end)", "7.4100 -> 0.0020")
    later = {**at_start, "first_eval_step": 50}
    assert eval_loss_row(later) == ("eval loss (first at step 50 -> end)", "7.4100 -> 0.0020")
    assert eval_loss_row({"first_eval_loss": None, "final_eval_loss": None, "first_eval_step": None}) == (
        "eval loss (end)", "-")


def test_packed_rows_have_one_shape_where_layers_or_attention_are_compiled(tmp_path: Path) -> None:
    gpu, cpu = Device("cuda", "GPU", None, True), Device("cpu", "CPU", None, True)
    packed = demo_recipe(tmp_path, "data.packing=true", "training.per_device_train_batch_size=4")
    assert shape_args(packed, gpu) == {"pad_to_multiple_of": 4 * 64}  # micro-batch x max_length: one length
    assert shape_args(packed, cpu) == {}  # eager layers, sdpa: nothing is specialised to a length
    compiled = demo_recipe(tmp_path, "data.packing=true", "training.compile_layers=true")
    assert shape_args(compiled, cpu) == {"pad_to_multiple_of": 16 * 64}
    assert shape_args(demo_recipe(tmp_path, "training.compile_layers=true"), gpu) == {}  # unpacked: any length


def test_compile_layers_auto_compiles_only_models_large_enough_to_pay_it_back(tmp_path: Path, monkeypatch) -> None:
    from qlora_cli.model import resolve_compile
    from qlora_cli.recipe import load_recipe

    monkeypatch.chdir(REPO)
    gpu, cpu = Device("cuda", "GPU", None, True), Device("cpu", "CPU", None, True)
    tiny = demo_recipe(tmp_path)  # hidden size 256: compiling (~90 s) would take longer than the whole run
    assert tiny.training.compile_layers == "auto" and not resolve_compile(tiny, gpu)
    mistral = load_recipe(REPO / "recipes" / "mistral7b.yaml")  # hidden size 4096
    assert resolve_compile(mistral, gpu) and not resolve_compile(mistral, cpu)
    assert resolve_compile(demo_recipe(tmp_path, "training.compile_layers=true"), cpu)  # asked for: always


def test_the_comparison_table_shows_the_users_text_without_the_prompt_template() -> None:
    from qlora_cli.commands.train import shown_prompt

    template = "Bank customer request: {prompt}\nIntent:"
    assert shown_prompt(template.format(prompt="cancel my\nstanding order"), template) == "cancel my standing order"
    assert shown_prompt("a" * 100, None, width=10) == "…" + "a" * 9


def test_an_evaluation_at_the_last_step_is_not_run_again_after_training(tmp_path: Path, console) -> None:
    """The eval schedule here ends on the last step: its loss is the run's final eval loss, and training does not
    evaluate the same weights a second time (19 s of the CPU demo's 4 minutes)."""
    from transformers import TrainerCallback

    class Evaluations(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.losses: list[float] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.steps.append(state.global_step)
            self.losses.append(metrics["eval_loss"])

    seen = Evaluations()
    recipe = demo_recipe(tmp_path, "training.max_steps=4", "training.eval_steps=2", "training.save_steps=100",
                         "evaluation.compare_after_training=0", "training.sft_args={}")
    summary = train(recipe, console, callbacks=[seen])
    assert seen.steps == [2, 4]
    assert summary["final_eval_loss"] == pytest.approx(seen.losses[-1])


def test_training_with_the_loss_heads_gradient_taken_in_forward_follows_trls_head(tmp_path: Path, monkeypatch) -> None:
    """`training.lm_head_grad_in_forward` (on by default) scores every training token with qlora_cli/lm_head.py's
    head, two vocabulary products instead of TRL's three: the same loss curve, evaluation loss and token accuracy
    as TRL's own head (`false`), and TRL's module is left as it was once training ends."""
    import trl.trainer.utils as trl_utils
    from rich.console import Console

    from qlora_cli import lm_head

    calls = []
    apply = lm_head.LogProbHead.apply
    monkeypatch.setattr(lm_head.LogProbHead, "apply", lambda *a: calls.append(a[0].requires_grad) or apply(*a))
    trl_head = trl_utils._ChunkedLogProbFunction
    common = ["training.max_steps=8", "training.logging_steps=2", "evaluation.compare_after_training=0"]
    metrics = {}
    for ours in (True, False):
        recipe = demo_recipe(tmp_path / str(ours), *common, f"training.lm_head_grad_in_forward={ours}")
        train(recipe, Console(record=True, width=120, force_terminal=False))
        rows = [json.loads(x) for x in RunDir(tmp_path / str(ours) / "run").metrics.read_text().splitlines()]
        metrics[ours] = {k: [r[k] for r in rows if k in r] for k in ("loss", "mean_token_accuracy", "eval_loss")}
        if ours:
            assert calls.count(True) == 8 and False in calls  # every training step; evaluations without gradient
            calls.clear()
    assert calls == [] and trl_utils._ChunkedLogProbFunction is trl_head
    assert len(metrics[True]["loss"]) == 4 and metrics[True]["eval_loss"]
    # The first steps agree to float rounding; Adam's normalised (and 8-bit) updates then amplify rounding-level
    # differences in near-zero gradients, to 0.1 % of the loss after 8 steps (0.02 % with fp32 adamw_torch).
    assert metrics[True]["loss"][0] == pytest.approx(metrics[False]["loss"][0], rel=1e-5)
    for key in ("loss", "mean_token_accuracy", "eval_loss"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=3e-3), key


def test_after_the_first_step_training_keeps_the_objects_alive_then_out_of_full_garbage_collections(
        tmp_path: Path) -> None:
    """`training.freeze_gc` (on by default): after the first optimizer step, the objects alive then (the model, its
    compiled layers, the data) are frozen out of Python's full garbage collections, which otherwise walk all of them
    every so often in the middle of a step; training gives them back when it ends, also when it fails. With
    `freeze_gc: false` nothing is frozen."""
    import gc

    from rich.console import Console
    from transformers import TrainerCallback

    class FrozenAtStepEnd(TrainerCallback):
        def __init__(self, fail_at: int | None = None) -> None:
            self.frozen, self.fail_at = [], fail_at

        def on_train_begin(self, args, state, control, **kwargs):
            self.frozen.append(gc.get_freeze_count())

        def on_step_end(self, args, state, control, **kwargs):
            self.frozen.append(gc.get_freeze_count())
            if state.global_step == self.fail_at:
                raise RuntimeError("a failing step")

    common = ["training.max_steps=3", "training.logging_steps=1", "evaluation.compare_after_training=0"]
    assert gc.get_freeze_count() == 0
    default = FrozenAtStepEnd()
    train(demo_recipe(tmp_path / "on", *common), Console(file=None, quiet=True), callbacks=[default])
    assert default.frozen[0] == 0 and min(default.frozen[1:]) > 10_000  # torch, transformers, the model...
    assert gc.get_freeze_count() == 0
    failing = FrozenAtStepEnd(fail_at=2)
    with pytest.raises(RuntimeError, match="a failing step"):
        train(demo_recipe(tmp_path / "fail", *common), Console(quiet=True), callbacks=[failing])
    assert failing.frozen[-1] > 0 and gc.get_freeze_count() == 0
    off = FrozenAtStepEnd()
    train(demo_recipe(tmp_path / "off", *common, "training.freeze_gc=false"), Console(quiet=True), callbacks=[off])
    assert set(off.frozen) == {0}
