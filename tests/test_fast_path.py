"""Speed work must not change training: qlora's fast path and the usual recipe give the same loss and gradients.

The usual recipe (what blog posts copy): `prepare_model_for_kbit_training` (every non-quantized weight upcast to
fp32), fp32 LoRA weights, a padded batch with an attention mask. qlora's path: no upcast, bf16 LoRA weights and a
padding-free batch (the examples concatenated into one row, told apart by position ids) through TRL's collator.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import demo_recipe

from qlora_cli import data as datamod
from qlora_cli.commands.train import set_adapter_dtype
from qlora_cli.model import Device, load_model, load_tokenizer, lora_config

# The tests run on the GPU when one is visible (the path users get), else on the CPU (CI).
DEVICE = Device("cuda", "CUDA", None, True) if torch.cuda.is_available() else Device("cpu", "CPU", None, True)


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE.type) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def one_step(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    return loss.item(), grads


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path, tmp_path_factory):
    recipe = demo_recipe(tmp_path_factory.mktemp("fast"), "data.max_rows=3", "lora.lora_dropout=0")
    tokenizer = load_tokenizer(recipe.model)
    prepared = datamod.prepare(recipe.data, tokenizer)
    rows = [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in prepared.train]
    return recipe, tokenizer, rows


def test_fast_path_matches_the_usual_recipe(examples, tiny_model_dir: Path) -> None:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recipe, tokenizer, rows = examples
    for r in rows:  # the labels TRL builds from the completion mask
        r["labels"] = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
    features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

    # The usual recipe: fp32 upcast, fp32 adapters, padded batch.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if DEVICE.is_cuda else None)
    plain = prepare_model_for_kbit_training(plain, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    plain = get_peft_model(plain, lora_config(recipe.lora))
    padded = on_device(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(features))
    assert padded["input_ids"].shape[0] == 3 and "attention_mask" in padded

    # qlora's path: no upcast, bf16 adapters, padding-free batch.
    fast = load_model(recipe, DEVICE, "bf16")
    assert fast.model.norm.weight.dtype == torch.bfloat16  # nothing upcast to fp32
    torch.manual_seed(0)
    fast = get_peft_model(fast, lora_config(recipe.lora))
    set_adapter_dtype(fast, "bfloat16")
    flat = on_device(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features))
    assert flat["input_ids"].shape[0] == 1 and "position_ids" in flat

    # LoRA B starts at zero, so the first step's outputs equal the base model's; put both in the same
    # non-trivial state to compare the gradients that reach every adapter weight.
    with torch.no_grad():
        for (name, p_plain), (_, p_fast) in zip(
            [(n, p) for n, p in plain.named_parameters() if "lora_" in n],
            [(n, p) for n, p in fast.named_parameters() if "lora_" in n],
        ):
            assert p_plain.shape == p_fast.shape, name
            p_plain.copy_(torch.randn_like(p_plain, dtype=torch.float32) * 0.02)
            p_fast.copy_(p_plain.to(p_fast.dtype))

    loss_plain, grads_plain = one_step(plain, padded)
    loss_fast, grads_fast = one_step(fast, flat)
    assert loss_fast == pytest.approx(loss_plain, rel=2e-2)
    assert grads_plain.keys() == grads_fast.keys() and len(grads_plain) == 14
    for name in grads_plain:
        a, b = grads_plain[name].flatten(), grads_fast[name].flatten()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert cosine > 0.98, (name, cosine)
        assert (b.norm() / a.norm()).item() == pytest.approx(1.0, abs=0.05), name


def test_packed_examples_do_not_attend_to_each_other(examples, tiny_model_dir: Path) -> None:
    """Padding-free packing gives each example the logits it has alone (per-sequence attention): the packed
    logits differ from the lone ones by bf16 rounding only, far less than when the examples see each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recipe, tokenizer, rows = examples
    model = load_model(recipe, DEVICE, "bf16")
    features = [{"input_ids": r["input_ids"]} for r in rows]
    flat = on_device(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features))
    with torch.no_grad():
        packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0].float()
        leaky = model(input_ids=flat["input_ids"]).logits[0].float()  # one causal sequence: examples see earlier ones
        start = 0
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r["input_ids"]], device=DEVICE.type)).logits[0].float()
            end = start + len(r["input_ids"])
            error = (packed[start:end] - alone).abs().mean().item()
            assert error < 0.05, (i, error)
            if i > 0:  # what attending across examples would change
                assert (leaky[start:end] - alone).abs().mean().item() > 10 * error, i
            start = end


def test_a_packed_batch_gets_its_attention_mask_without_a_read_back_and_the_same_logits(examples) -> None:
    """While training, transformers builds a packed row's per-sequence mask without reading a value back from the
    device (`packed_masks_without_readback`; its own check waits for the GPU at every forward pass), and the
    logits are the same as with transformers' own mask, for a row of several examples and for a row of one."""
    from torch.overrides import TorchFunctionMode
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_cli.model import packed_masks_without_readback

    class ReadBacks(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "__bool__", "__int__", "__float__", "tolist"):
                frame = sys._getframe(1)
                while frame and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back
                self.seen.append(frame.f_code.co_name)
            return func(*args, **(kwargs or {}))

    recipe, tokenizer, rows = examples
    model = load_model(recipe, DEVICE, "bf16")
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    for batch in (rows, rows[:1]):
        flat = on_device(collate([{"input_ids": r["input_ids"]} for r in batch]))
        with torch.no_grad():
            theirs = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits
            with packed_masks_without_readback(), ReadBacks() as mode:
                ours = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits
        assert torch.equal(ours, theirs)
        assert "find_packed_sequence_indices" not in mode.seen
    with ReadBacks() as mode, torch.no_grad():  # what transformers does on its own
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"])
    assert "find_packed_sequence_indices" in mode.seen


# ------------------------------------------------------------------------------------------------ compiled layers
# `training.compile_layers` (on by default for CUDA training) runs each decoder layer through torch.compile.


def compile_backend() -> str:
    """inductor (what training uses) where it can build kernels; without a C compiler on a CPU-only machine,
    aot_eager still traces the layers and their backward through dynamo and AOT autograd."""
    import shutil

    return "inductor" if DEVICE.is_cuda or shutil.which("cc") or shutil.which("gcc") else "aot_eager"


def lora_model(recipe, compiled: bool, precision: str = "bf16", nf4_in_graph: bool = False):
    from peft import get_peft_model

    from qlora_cli.model import compile_layers
    from qlora_cli.nf4 import use_compiled_dequantization

    model = load_model(recipe, DEVICE, precision)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(recipe.lora))
    set_adapter_dtype(model, "bfloat16" if precision == "bf16" else "float32")
    with torch.no_grad():  # a non-trivial adapter state, the same in every model built here
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.train()
    if nf4_in_graph:
        assert use_compiled_dequantization(model) == 14  # 7 projections x 2 layers
    if compiled:  # fullgraph: the whole layer, LoRA and 4-bit matmuls included, is one graph
        assert compile_layers(model, backend=compile_backend(), fullgraph=nf4_in_graph) == 2
    return model  # load_model placed it on the GPU, if any


def packed_batch(tokenizer, rows) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    features = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    return on_device(flat)


def seeded_step(model, batch: dict, seed: int = 123) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_give_the_eager_loss_and_gradients(examples, tiny_model_dir: Path) -> None:
    """Compiling fuses LoRA, norms and activations; with dropout 0 the step is the eager step up to bf16 rounding."""
    recipe, tokenizer, rows = examples  # lora_dropout 0, gradient checkpointing on
    batch = packed_batch(tokenizer, rows)
    loss_eager, grads_eager = seeded_step(lora_model(recipe, compiled=False), batch)
    loss_compiled, grads_compiled = seeded_step(lora_model(recipe, compiled=True), batch)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-2)
    assert grads_eager.keys() == grads_compiled.keys() and len(grads_eager) == 28
    for name, a in grads_eager.items():
        b = grads_compiled[name]
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        assert cosine > 0.995, (name, cosine)
        assert (b.norm() / a.norm()).item() == pytest.approx(1.0, abs=0.02), name


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_weights_dequantized_in_torch_ops_are_the_weights_bitsandbytes_dequantizes(double_quant: bool) -> None:
    """`training.compile_nf4` dequantizes inside the compiled graph with torch ops (qlora_cli/nf4.py); they must
    give bitsandbytes' weights bit for bit, nested absmax (`bnb_4bit_use_double_quant`) or not, including a
    weight whose absmax count is not a multiple of the 256 the nested quantization groups them by."""
    from bitsandbytes import functional as bnbf

    from qlora_cli.nf4 import dequantize, state_parts

    torch.manual_seed(0)
    for shape in [(64, 128), (300, 4096), (96, 64 * 257)]:
        weight = torch.randn(shape, dtype=torch.bfloat16, device=DEVICE.type)
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        absmax, code, *nested = state_parts(state)
        ours = dequantize(packed, absmax, code, state.blocksize, tuple(state.shape), torch.bfloat16, *nested)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state)), shape


def test_a_pre_quantized_4bit_checkpoint_takes_the_compiled_nf4_path_with_the_same_weights(examples, tmp_path) -> None:
    """A checkpoint saved already quantized (the `*-bnb-4bit` uploads) loads its quantization state from disk,
    with the nested offset as a CPU scalar; the compiled NF4 path reads it to the same weights."""
    from bitsandbytes import functional as bnbf
    from transformers import AutoModelForCausalLM

    from qlora_cli.nf4 import dequantize, state_parts, use_compiled_dequantization

    recipe, _, _ = examples
    load_model(recipe, DEVICE, "bf16").save_pretrained(tmp_path / "4bit")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "4bit", device_map={"": DEVICE.type})
    assert use_compiled_dequantization(model) == 14
    for module in model.modules():
        if "forward" in vars(module):
            weight, state = module.weight, module.weight.quant_state
            assert state.nested and state.offset.device == weight.device
            absmax, code, *nested = state_parts(state)
            ours = dequantize(weight.data, absmax, code, state.blocksize, tuple(state.shape), torch.bfloat16, *nested)
            assert torch.equal(ours, bnbf.dequantize_4bit(weight.data, state))


def test_layers_dequantizing_nf4_in_the_compiled_graph_give_the_bitsandbytes_loss_and_gradients(examples) -> None:
    """The fast path CUDA training takes (compiled layers, NF4 dequantized in the graph) computes the step of
    bitsandbytes' eager layers: in fp32 (no bf16 rounding to tell apart) the same loss and gradients, and the
    layer compiles as one graph. Back to bitsandbytes' forward for generation after `uncompile_layers`."""
    from qlora_cli.model import uncompile_layers

    recipe, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    loss_bnb, grads_bnb = seeded_step(lora_model(recipe, compiled=False, precision="fp32"), batch)
    fast = lora_model(recipe, compiled=True, precision="fp32", nf4_in_graph=True)
    loss_fast, grads_fast = seeded_step(fast, batch)
    assert loss_fast == pytest.approx(loss_bnb, rel=1e-5)
    assert grads_fast.keys() == grads_bnb.keys() and len(grads_bnb) == 28
    for name, a in grads_bnb.items():
        assert ((grads_fast[name] - a).norm() / a.norm()).item() < 1e-4, name
    uncompile_layers(fast)
    assert not any("forward" in vars(m) for m in fast.modules())


def test_compiled_nf4_layers_keep_no_16_bit_weight_from_forward_to_backward(tmp_path: Path, examples) -> None:
    """Memory: like bitsandbytes, the compiled fast path dequantizes each weight again in backward instead of
    saving the dequantized copy (on a 7B step, saving them cost 0.3 GB of peak memory). Without gradient
    checkpointing, so that what the compiled layers save is what the hook sees."""
    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    recipe = demo_recipe(tmp_path, "lora.lora_dropout=0", "training.gradient_checkpointing=false")
    model = lora_model(recipe, compiled=True, nf4_in_graph=True)
    weight_shapes = {tuple(m.weight.quant_state.shape) for m in model.modules()
                     if hasattr(getattr(m, "weight", None), "quant_state")}
    saved: list[tuple[int, ...]] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    assert saved and len(weight_shapes) >= 3
    assert not weight_shapes & set(saved), weight_shapes & set(saved)


def test_under_checkpointing_the_recompute_keeps_the_dequantized_weights_for_backward_with_the_same_gradients(
        tmp_path: Path, examples) -> None:
    """With `training.keep_dequantized` each checkpointed layer's recompute hands the 16-bit weights it
    dequantized to the layer's backward (6 of them; the down projection runs outside the checkpoint and still
    dequantizes again), instead of dequantizing them a third time; the same loss and gradients (fp32)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from qlora_cli.model import compile_layers, uncompile_layers
    from qlora_cli.nf4 import use_compiled_dequantization

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    recipe = demo_recipe(tmp_path, "lora.lora_dropout=0", "training.gradient_checkpointing=true")
    results = {}
    for keep in (False, True):
        model = lora_model(recipe, compiled=False, precision="fp32")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert use_compiled_dequantization(model) == 14
        weights = {tuple(m.weight.quant_state.shape) for m in model.modules()
                   if hasattr(getattr(m, "weight", None), "quant_state")}
        saved: list[tuple[int, ...]] = []  # what the backward graphs take from their forward graphs

        def backward(gm: torch.fx.GraphModule, example_inputs, saved=saved):
            saved.extend(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor))
            return gm

        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=backward,
                               partition_fn=min_cut_rematerialization_partition)
        assert compile_layers(model, backend=backend, keep_dequantized=keep) == 2
        results[keep] = seeded_step(model, batch), [s for s in saved if s in weights]
        uncompile_layers(model)
        assert not any("qlora_keep_dequantized" in vars(m) for m in model.modules())
    ((loss, grads), none_kept), ((kept_loss, kept_grads), kept) = results[False], results[True]
    assert none_kept == [] and len(kept) == 6  # one backward graph serves both layers: q, k, v, o, gate, up
    assert kept_loss == pytest.approx(loss, rel=1e-6)
    for name, a in grads.items():
        assert ((kept_grads[name] - a).norm() / a.norm()).item() < 1e-5, name


def test_compiled_layers_recompute_the_same_dropout_under_checkpointing(tmp_path: Path, examples) -> None:
    """Gradient checkpointing reruns each compiled layer in backward; the rerun must draw the dropout masks of
    the first pass, or the gradients would silently be wrong. In fp32 (no bf16 rounding to tell apart),
    checkpointed and stored activations give the same loss and gradients."""
    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    torch._dynamo.reset()  # a full compile cache would leave one of the two models eager (another dropout RNG)
    models = {}
    for checkpointing in (True, False):
        recipe = demo_recipe(tmp_path, "lora.lora_dropout=0.3", f"training.gradient_checkpointing={checkpointing}")
        models[checkpointing] = lora_model(recipe, compiled=True, precision="fp32")
    loss_ckpt, grads_ckpt = seeded_step(models[True], batch)
    loss_stored, grads_stored = seeded_step(models[False], batch)
    _, grads_other_masks = seeded_step(models[False], batch, seed=7)
    name = next(iter(grads_stored))
    assert ((grads_stored[name] - grads_other_masks[name]).norm() / grads_stored[name].norm()).item() > 1e-2
    assert loss_ckpt == pytest.approx(loss_stored, rel=1e-6)
    for name, a in grads_stored.items():
        assert ((a - grads_ckpt[name]).norm() / a.norm()).item() < 1e-4, name


def test_an_evaluation_does_not_cut_the_gradient_through_4bit_weights(examples) -> None:
    """bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs after a no-grad forward, and its
    inference kernel passes no gradient back; qlora's models keep the training layout (eval_on_start is common)."""
    recipe, _, _ = examples
    layer = load_model(recipe, DEVICE, "bf16").model.layers[0].self_attn.q_proj
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16, device=DEVICE.type, requires_grad=True)
    grad_out = torch.randn(4, layer.out_features, dtype=torch.bfloat16, device=DEVICE.type)
    layer(x).backward(grad_out)
    before, x.grad = x.grad.clone(), None
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    layer.train()
    layer(x).backward(grad_out)
    assert x.grad is not None and torch.equal(x.grad, before)


def matmul_counting_backend(graphs: list[tuple[str, int]], calls: list[int]):
    """An AOT-autograd backend (inductor's partitioner) that records each compiled graph's kind and matmul count
    in `graphs`, and how often each graph runs in `calls`."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def counting(kind: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            index = len(graphs)
            graphs.append((kind, sum(n.op == "call_function" and "mm" in str(n.target) for n in gm.graph.nodes)))
            calls.append(0)

            def run(args):
                calls[index] += 1
                return gm(*args)
            run._boxed_call = True
            return run
        return compiler

    return aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"),
                        partition_fn=min_cut_rematerialization_partition)


def executed_matmuls(graphs: list[tuple[str, int]], calls: list[int]) -> dict[str, int]:
    done = {"forward": 0, "backward": 0}
    for (kind, matmuls), n in zip(graphs, calls, strict=True):
        done[kind] += matmuls * n
    return done


def test_gradient_checkpointing_wraps_the_compiled_layer_call_on_any_transformers_version() -> None:
    """transformers 5.23+ checkpoints each layer's `forward`, which would put the checkpoint inside the compiled
    graph; with flex attention (the CUDA default for packed rows) that layout ran the layers with unfused flex
    attention (an H200 step of a 2-layer 7B-width model: 0.62 s and 58 GB instead of 0.08 s and 3.8 GB). qlora keeps the
    checkpoint around the compiled call: the compiled forward graph runs twice per layer, in forward and again in
    backward, and the backward graph holds only the input-gradient matmuls (inside, it would recompute 6
    projections itself), also after `Trainer.train()` enables transformers' checkpointing again when it starts.
    The frozen down projection runs outside the checkpoint, once per layer (its own small graph); with
    `training.recompute_down_proj: true` the one layer graph holds all 7 projections.
    `uncompile_layers` gives transformers its own checkpointing back."""
    from transformers import MistralConfig, MistralForCausalLM

    from qlora_cli.model import compile_layers, uncompile_layers

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, use_cache=False)
    for recompute_down_proj, expected_graphs, expected_calls in [
        (True, [("forward", 7), ("backward", 7)], [4, 2]),  # 2 layers: forward, recompute; backward
        (False, [("forward", 6), ("forward", 1), ("backward", 1), ("backward", 6)], [4, 2, 2, 2]),
    ]:
        model = MistralForCausalLM(config).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, p in model.named_parameters():
            p.requires_grad_("embed" in name)  # frozen projections, as the 4-bit base weights are
        torch._dynamo.reset()
        graphs: list[tuple[str, int]] = []
        calls: list[int] = []
        backend = matmul_counting_backend(graphs, calls)
        assert compile_layers(model, backend=backend, recompute_down_proj=recompute_down_proj) == 2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # Trainer's
        ids = torch.randint(0, 100, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        assert (graphs, calls) == (expected_graphs, expected_calls)
        uncompile_layers(model)
        assert all(layer.gradient_checkpointing and layer._compiled_call_impl is None for layer in model.model.layers)
        assert not any("forward" in vars(m) or "qlora_deferral" in vars(m) for m in model.modules())


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_recompute_in_backward_skips_the_mlp_output_projection_with_the_same_gradients(architecture: str) -> None:
    """Under gradient checkpointing the layer's forward runs again in backward, but the MLP's output projection
    only feeds the residual sum, and its weight is frozen: backward needs neither its output nor its input. qlora
    runs its frozen part once, outside the checkpoint, so each layer's recompute does 6 of the 7 projections'
    matmuls (27 % less recomputed matmul work at Llama/Mistral widths). With LoRA on all 7 projections and
    dropout (whose masks the recompute must draw again), the loss and every gradient are those of the plain
    checkpoint, in fp32, for each architecture qlora does this for."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_cli.model import compile_layers, uncompile_layers
    from qlora_cli.recompute import SUMMED_LAST_PROJECTION, deferrable_projection

    config = AutoConfig.for_model(architecture, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                                  use_cache=False)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for recompute_down_proj in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)  # a non-zero adapter, so that its gradients reach every layer
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = model.base_model.model.model.layers
        assert type(layers[0]).__name__ in SUMMED_LAST_PROJECTION and deferrable_projection(layers[0]) is not None
        torch._dynamo.reset()
        graphs: list[tuple[str, int]] = []
        calls: list[int] = []
        compile_layers(model, backend=matmul_counting_backend(graphs, calls), recompute_down_proj=recompute_down_proj)
        torch.manual_seed(1)  # the dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        uncompile_layers(model)
        results[recompute_down_proj] = loss.item(), grads, executed_matmuls(graphs, calls)
    plain_loss, plain_grads, plain_matmuls = results[True]
    loss, grads, matmuls = results[False]
    # forward matmuls per layer: 7 base + 14 LoRA in forward, the same again in the recompute, minus one base
    assert plain_matmuls["forward"] == 2 * 2 * 21 and matmuls["forward"] == plain_matmuls["forward"] - 2
    assert matmuls["backward"] == plain_matmuls["backward"]
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2
    for name, a in plain_grads.items():
        assert ((grads[name] - a).norm() / a.norm()).item() < 1e-5, name


# ------------------------------------------------------------------------------------------------ fused LoRA dropout
# `training.fused_lora_dropout` (qlora_cli/lora_dropout.py): each LoRA layer's dropout inside its A projection.


def fused_dropout_model(recipe, reference: bool = False):
    """The 4-bit LoRA model of `lora_model`, fp32, with the dropout moved into the A projections; `reference`: A
    projections that draw the same seed and apply the op's mask with PyTorch ops instead of the op."""
    import torch.nn.functional as F

    from qlora_cli.lora_dropout import FusedDropoutLinear, draw_seed, effective_p, keep_mask, use_fused_lora_dropout

    class ReferenceDropoutLinear(FusedDropoutLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            keep = keep_mask(x.reshape(-1, x.shape[-1]), draw_seed(x.device), self.p).reshape(x.shape)
            return F.linear(x * keep / (1 - effective_p(self.p)), self.weight)

    model = lora_model(recipe, compiled=False, precision="fp32")
    assert use_fused_lora_dropout(model) == 14  # 7 projections x 2 layers
    for module in model.modules():
        if reference and isinstance(module, FusedDropoutLinear):
            module.__class__ = ReferenceDropoutLinear
    return model


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_the_dropout_masks_drop_each_input_with_probability_p_independently_of_its_neighbours_and_seeds(p) -> None:
    """The fused dropout's masks (the same hash in the Triton kernels and on other devices) drop each input with
    probability p, independently of the next column, the next row and the next seed: each rate within 5 standard
    deviations of its expectation over 2^20 inputs."""
    from qlora_cli.lora_dropout import effective_p, hash_keep_mask

    m, k = 1024, 1024
    n = m * k

    def close(observed: torch.Tensor, expected: float, count: int) -> bool:
        return abs(observed.float().mean().item() - expected) < 5 * (expected * (1 - expected) / count) ** 0.5

    q = effective_p(p)
    assert abs(q - p) <= 2**-17
    for seed in (0, 1, 2**31 - 2):
        dropped = ~hash_keep_mask(torch.tensor([seed]), p, m, k)
        following = ~hash_keep_mask(torch.tensor([seed + 1]), p, m, k)
        assert close(dropped, q, n)
        assert close(dropped[:, 1:] & dropped[:, :-1], q * q, n)  # next column
        assert close(dropped[1:] & dropped[:-1], q * q, n)  # next row
        assert close(dropped & following, q * q, n)  # next seed
        assert len({tuple(row.tolist()) for row in dropped}) == m  # no two rows alike
    # rows 2^12 on of an input 2^20 wide start past 2^32 inputs: the flat index's high word changes the row's key
    first, past = hash_keep_mask(torch.tensor([5]), p, 1, 2**20), hash_keep_mask(torch.tensor([5]), p, 2, 2**20, 2**12)
    assert close(~past, q, past.numel()) and not torch.equal(past[0], first[0])


def test_fused_lora_dropout_gives_the_loss_and_gradients_of_peft_dropout_with_the_same_masks(tmp_path: Path,
                                                                                            examples) -> None:
    """With `training.fused_lora_dropout`, one op per LoRA projection computes dropout(x) @ A.T, drawing its mask
    from a seed and drawing it again in backward instead of storing it. Given the masks of a reference that
    applies the same mask with PyTorch ops, the checkpointed 4-bit model traced layer by layer through dynamo and
    AOT autograd gives the reference's loss and gradients (fp32); in eval mode it is the model without dropout,
    and the adapter keeps the names of its weights."""
    from peft import get_peft_model_state_dict

    from qlora_cli.model import compile_layers

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    recipe = demo_recipe(tmp_path, "lora.lora_dropout=0.3", "training.gradient_checkpointing=true")
    plain = lora_model(recipe, compiled=False, precision="fp32")
    fused = fused_dropout_model(recipe)
    assert get_peft_model_state_dict(fused).keys() == get_peft_model_state_dict(plain).keys()
    assert not any(isinstance(m, torch.nn.Dropout) for m in fused.modules())
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(**batch).logits, plain(**batch).logits)
    fused.train()
    torch._dynamo.reset()
    assert compile_layers(fused, backend="aot_eager") == 2
    reference = fused_dropout_model(recipe, reference=True)
    loss, grads = seeded_step(fused, batch)
    ref_loss, ref_grads = seeded_step(reference, batch)
    _, other_masks = seeded_step(reference, batch, seed=7)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name, a in ref_grads.items():
        assert ((grads[name] - a).norm() / a.norm()).item() < 1e-5, name
    name = next(iter(ref_grads))
    assert ((ref_grads[name] - other_masks[name]).norm() / ref_grads[name].norm()).item() > 1e-2


def test_fused_lora_dropout_in_compiled_layers_recomputes_the_same_masks_under_checkpointing(tmp_path: Path,
                                                                                           examples) -> None:
    """Compiled as training compiles them, the layers draw each op's seed again when the checkpoint reruns them,
    so checkpointed and stored activations give the same loss and gradients."""
    from qlora_cli.model import compile_layers

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    results = {}
    for checkpointing in (True, False):
        recipe = demo_recipe(tmp_path, "lora.lora_dropout=0.3", f"training.gradient_checkpointing={checkpointing}")
        model = fused_dropout_model(recipe)
        torch._dynamo.reset()
        assert compile_layers(model, backend=compile_backend()) == 2
        results[checkpointing] = seeded_step(model, batch)
    (loss_ckpt, grads_ckpt), (loss_stored, grads_stored) = results[True], results[False]
    assert loss_ckpt == pytest.approx(loss_stored, rel=1e-6)
    for name, a in grads_stored.items():
        assert ((a - grads_ckpt[name]).norm() / a.norm()).item() < 1e-4, name


def test_the_recompute_reads_back_the_lora_a_outputs_of_its_forward_pass_with_the_same_gradients(
        tmp_path: Path, examples, monkeypatch) -> None:
    """With `training.keep_lora_a_outputs` each checkpointed layer's fused A projections keep their outputs in
    forward and the recompute in backward reads them back: the A products are computed 14 times a step (2 layers
    × 7 projections, forward only) instead of again in the recompute, with the same loss and gradients. The
    recompute really reads the slots (zeroing them between forward and backward changes the gradients); when a
    layer ran forward twice before backward, the older pass's recompute computes its products again (42 products
    for two passes) and the gradients stay right. Slots smaller than a micro-batch grow to it."""
    from qlora_cli import lora_dropout
    from qlora_cli.commands.train import compiled_graphs
    from qlora_cli.model import compile_layers, uncompile_layers

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    other = packed_batch(tokenizer, rows[1:])
    recipe = demo_recipe(tmp_path, "lora.lora_dropout=0.3", "training.gradient_checkpointing=true")
    computed = []  # the products the memo's op computes (it calls `dropout_matmul` when it runs, opaque to dynamo)
    product = lora_dropout.dropout_matmul

    def two_passes(model) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        model.zero_grad()
        (model(**batch).loss + model(**other).loss).backward()
        return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}

    results, graphs = {}, {}
    for rows_kept in (0, 8):  # 8 rows: the slots grow to the micro-batch's 57 at its first pass
        model = fused_dropout_model(recipe)
        if rows_kept:
            monkeypatch.setattr(lora_dropout, "dropout_matmul", lambda *a: computed.append(1) or product(*a))
        torch._dynamo.reset()
        assert compile_layers(model, backend=compile_backend(), memo_rows=rows_kept) == 2
        before = compiled_graphs()
        computed.clear()
        step = seeded_step(model, batch)
        calls = len(computed)
        computed.clear()
        twice = two_passes(model)
        results[rows_kept] = step, (calls, len(computed)), twice
        graphs[rows_kept] = compiled_graphs() - before
        if rows_kept:
            slots = [m.qlora_memo_slot for m in model.modules() if hasattr(m, "qlora_memo_slot")]
            assert len(slots) == 14 and all(s.shape[0] >= batch["input_ids"].numel() for s in slots)
            model.zero_grad()
            torch.manual_seed(123)
            loss = model(**batch).loss
            for slot in slots:
                slot.zero_()
            loss.backward()
            zeroed = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
            uncompile_layers(model)
            assert not any(hasattr(m, "qlora_memo_slot") for m in model.modules())
    ((loss, grads), calls, twice), ((kept_loss, kept_grads), kept_calls, kept_twice) = results[0], results[8]
    assert kept_calls == (14, 42)
    assert graphs[8] == graphs[0], graphs  # one graph for the forward pass, its recompute and a second pass
    assert kept_loss == pytest.approx(loss, rel=1e-6)
    for name, a in grads.items():
        assert ((kept_grads[name] - a).norm() / a.norm()).item() < 1e-5, name
        assert ((kept_twice[name] - twice[name]).norm() / twice[name].norm()).item() < 1e-5, name
    lora_a = [n for n in grads if "lora_A" in n]
    assert max(((zeroed[n] - kept_grads[n]).norm() / kept_grads[n].norm()).item() for n in lora_a) > 1e-2


# `training.fold_lora_b` (qlora_cli/lora_fold.py): LoRA's B product inside the frozen projection's product.


@pytest.mark.parametrize(("keep", "dropout"), [(False, 0.0), (True, 0.3)])
def test_lora_b_folded_into_the_frozen_product_gives_the_same_loss_and_gradients(tmp_path: Path, examples,
                                                                                 keep: bool, dropout: float) -> None:
    """With `training.fold_lora_b` the projections with at least as many outputs as inputs (q and o, 256 -> 256
    here, gate and up, 256 -> 704; not k, v and down) compute `base(x) + B(A(x)) · s` as one product
    `[x | A(x)] @ [W | s·B]^T`.
    Compiled as training compiles them (NF4 in the graph, checkpointed layers whose recompute keeps its weights or
    not, the fused dropout or none), the same loss and gradients as peft's forward (fp32); `uncompile_layers` gives
    peft's forward back."""
    from qlora_cli.lora_fold import folded, use_folded_lora
    from qlora_cli.model import compile_layers, uncompile_layers
    from qlora_cli.nf4 import use_compiled_dequantization

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    recipe = demo_recipe(tmp_path, f"lora.lora_dropout={dropout}", "training.gradient_checkpointing=true")
    results = {}
    for fold in (False, True):
        model = fused_dropout_model(recipe) if dropout else lora_model(recipe, compiled=False, precision="fp32")
        assert use_compiled_dequantization(model) == 14
        if fold:
            assert use_folded_lora(model) == 8
            assert sorted({n.split(".")[-1] for n, m in model.named_modules() if folded(m)}) == [
                "gate_proj", "o_proj", "q_proj", "up_proj"]
        torch._dynamo.reset()
        assert compile_layers(model, backend=compile_backend(), keep_dequantized=keep, fullgraph=True) == 2
        results[fold] = seeded_step(model, batch)
        if fold:
            uncompile_layers(model)
            assert not any(folded(m) for m in model.modules())
    (loss, grads), (folded_loss, folded_grads) = results[False], results[True]
    assert folded_loss == pytest.approx(loss, rel=1e-6)
    assert folded_grads.keys() == grads.keys() and len(grads) == 28
    for name, a in grads.items():
        assert ((folded_grads[name] - a).norm() / a.norm()).item() < 1e-5, name


def test_the_folded_product_neither_keeps_nor_takes_a_gradient_for_the_frozen_weight(tmp_path: Path,
                                                                                     examples) -> None:
    """The folded weight `[W | s·B]` is built from a detached B: backward computes B's gradient as `s · g^T h`
    and no product of the frozen weight's shape, and (no checkpointing, the recompute not keeping weights) the
    forward graph hands backward neither W nor `[W | s·B]`: backward dequantizes again, as for unfolded layers."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from qlora_cli.lora_fold import use_folded_lora
    from qlora_cli.model import compile_layers
    from qlora_cli.nf4 import use_compiled_dequantization

    _, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    recipe = demo_recipe(tmp_path, "lora.lora_dropout=0", "training.gradient_checkpointing=false")
    model = lora_model(recipe, compiled=False, precision="fp32")
    assert use_compiled_dequantization(model) == 14
    assert use_folded_lora(model) == 8
    rank = recipe.lora.r
    frozen = {(704, 256), (704, 256 + rank), (256, 256), (256, 256 + rank)}  # W and [W | s·B]: gate/up, q/o
    saved: list[tuple[int, ...]] = []
    products: list[tuple[int, ...]] = []

    def backward(gm: torch.fx.GraphModule, example_inputs, saved=saved):
        saved.extend(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor))
        products.extend(tuple(n.meta["val"].shape) for n in gm.graph.nodes
                        if n.op == "call_function" and n.target in (torch.ops.aten.mm.default,))
        return gm

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=backward,
                           partition_fn=min_cut_rematerialization_partition)
    assert compile_layers(model, backend=backend) == 2
    seeded_step(model, batch)
    assert (704, rank) in products  # B's gradient
    assert (batch["input_ids"].numel(), 256 + rank) in products  # x's and h's gradients from one product
    assert not frozen & set(products), frozen & set(products)
    assert not frozen & set(saved), frozen & set(saved)


# `training.lm_head_grad_in_forward` (qlora_cli/lm_head.py): the loss head's input gradient taken in forward.
def _heads(h, w, t, *, bias=None, temperature=1.0, logit_scale=1.0, outputs=("log_probs", "entropy", "is_top1")):
    """TRL's chunked head and qlora's on the same inputs: (log-probs, entropy, top-1, d hidden) of each."""
    from trl.kernels import ChunkedLogProbFunction

    from qlora_cli.lm_head import LogProbHead

    results = []
    for head in (ChunkedLogProbFunction, LogProbHead):
        x = h.detach().clone().requires_grad_()
        logp, entropy, _, _, top1 = head.apply(x, w, bias, t, temperature, 32768, None, logit_scale, outputs)
        (-logp.sum() / len(t)).backward()
        results.append((logp.detach(), None if entropy is None else entropy.detach(), top1, x.grad))
    return results


@pytest.mark.parametrize("rows", [4096, 128])  # one tile, or three (the last one partial)
def test_the_loss_head_with_its_gradient_in_forward_gives_trls_log_probs_entropy_accuracy_and_gradient(
        rows: int, monkeypatch) -> None:
    from qlora_cli import lm_head

    monkeypatch.setattr(lm_head, "TILE_BYTES", rows * 3000 * 4)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(300, 48, generator=g), torch.randn(3000, 48, generator=g) * 0.3
    t = torch.randint(0, 3000, (300,), generator=g)
    t[::3] = (h @ w.T).argmax(-1)[::3]  # a third of the tokens are the model's top-1
    bias = torch.randn(3000, generator=g)
    for kwargs in ({}, {"bias": bias, "temperature": 0.7, "logit_scale": 1.5}):
        (logp, entropy, top1, dh), (q_logp, q_entropy, q_top1, q_dh) = _heads(h, w, t, **kwargs)
        assert torch.allclose(q_logp, logp, atol=1e-4) and torch.allclose(q_entropy, entropy, atol=1e-4)  # fp32
        assert torch.equal(q_top1, top1) and 20 <= int(top1.sum()) < 300
        assert torch.allclose(q_dh, dh, atol=1e-7, rtol=1e-4)
    assert lm_head.tile_rows(3000, 4) == rows


def test_where_most_tokens_carry_a_loss_the_head_scores_every_position_instead_of_selecting_the_labelled_ones(
        examples, monkeypatch) -> None:
    """TRL's fused head selects the labelled positions on Triton devices (`hidden_states[mask]`, which waits for
    the forward pass to know how many); with `every_position` qlora's head scores every position and TRL zeroes the
    unlabelled ones: the same loss, log-probabilities, metrics and adapter gradients (fp32)."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from qlora_cli.lm_head import TrlHeadOrOurs, gradient_in_forward

    recipe, tokenizer, rows = examples
    batch = packed_batch(tokenizer, rows)
    batch["labels"][0, :7] = -100  # a prompt without a loss
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    model = lora_model(recipe, compiled=False, precision="fp32")
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)  # TRL's choice on a GPU: labelled rows only
    scored, apply = [], TrlHeadOrOurs.apply  # rows the head scores

    def counted(hidden, *args, **kwargs):
        scored.append(len(hidden))
        return apply(hidden, *args, **kwargs)

    monkeypatch.setattr(TrlHeadOrOurs, "apply", counted)
    results = []
    for every_position in (False, True):
        with gradient_in_forward(True, every_position):
            model.zero_grad()
            out = model(**batch, fused_lm_head=True)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    assert scored == [labelled, batch["input_ids"].numel() - 1] and scored[0] < scored[1]
    assert trl_utils._use_triton(torch.device("cpu"))  # given back
    (selected, grads), (every, every_grads) = results
    assert every.loss.item() == pytest.approx(selected.loss.item(), rel=1e-6)
    for name in ("log_probs", "entropy"):
        assert torch.allclose(getattr(every, name), getattr(selected, name), atol=1e-5), name
    assert torch.equal(every.is_top1, selected.is_top1) and torch.equal(every.label_mask, selected.label_mask)
    for name, g in grads.items():
        assert torch.allclose(every_grads[name], g, rtol=1e-4, atol=1e-7), name


def test_the_loss_head_refuses_an_entropy_gradient_and_leaves_heads_that_train_to_trl() -> None:
    from trl.kernels import ChunkedLogProbFunction

    from qlora_cli.lm_head import LogProbHead, TrlHeadOrOurs, gradient_in_forward

    h, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(50, 8), torch.randint(0, 50, (20,))
    logp, entropy, *_ = LogProbHead.apply(h, w, None, t, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
    with pytest.raises(RuntimeError, match="lm_head_grad_in_forward: false"):
        (logp.sum() + entropy.sum()).backward()
    with gradient_in_forward(True) as on:
        import trl.trainer.utils as trl_utils

        assert on and trl_utils._ChunkedLogProbFunction is TrlHeadOrOurs
        trained = w.clone().requires_grad_()  # a head that trains gets its gradient from TRL's function
        logp, *_ = TrlHeadOrOurs.apply(h, trained, None, t, 1.0, 32768)
        logp.sum().backward()
        assert trained.grad is not None and logp.grad_fn.name() == "ChunkedLogProbFunctionBackward"
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    with gradient_in_forward(False) as on:
        assert not on and trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
