"""The error catalog of docs/errors.md, one case each.

Every bad input ends in one line on stderr that names the value, where it is (recipe key with its YAML line,
data file and row, option) and the fix; exit code 2; no traceback unless --debug; and nothing written or lost
(the test directory is byte-for-byte the same afterwards, unless the case says what may change). The cases run
the real CLI entry point `qlora_cli.cli.run` in-process (the same renderer as `qlora`), a few through
`python -m qlora_cli.cli` in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DEMO_DATA, REPO

from qlora_cli.cli import run as cli_run

TRAIN = DEMO_DATA / "train.jsonl"


def base_recipe(tmp: Path, source: Path | str = TRAIN, fmt: str = "prompt_completion") -> str:
    return f"""model:
  name_or_path: qlora/tiny-llama
data:
  source: {source}
  format: {fmt}
  max_length: 64
lora:
  r: 8
  lora_dropout: 0.0
training:
  output_dir: {tmp / 'run'}
  max_steps: 4
  save_steps: 2
  logging_steps: 1
  per_device_train_batch_size: 4
  allow_cpu: true
"""


def write(tmp: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(tmp: Path, *sets: str, recipe: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    path = write(tmp, recipe or base_recipe(tmp))
    return ["train", str(path), *(a for s in sets for a in ("--set", s)), *extra]


def tokenizer_copy(tiny: Path, tmp: Path, *, pad: bool = True, chat: bool = True) -> Path:
    """The tiny model's tokenizer files, without its pad token or chat template when asked."""
    out = tmp / "tokenizer"
    out.mkdir()
    shutil.copy(tiny / "tokenizer.json", out)
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    if not pad:
        config.pop("pad_token", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if chat and (tiny / "chat_template.jinja").is_file():
        shutil.copy(tiny / "chat_template.jinja", out)
    return out


CHAT_OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# --------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    argv: Callable[..., list[str]]  # (tmp, tiny_model_dir, fixture_run) -> argv
    expect: tuple[str, ...]  # in the error line: the value, where it is, the fix ("{tmp}" is replaced)
    patch: Callable[..., None] | None = None  # (monkeypatch) -> None: simulate the environment
    check: Callable[[Path, str], None] | None = None  # instead of "nothing changed": what may, and must, be there
    subprocess: bool = False  # run `python -m qlora_cli.cli` instead of in-process
    needs_run: bool = False  # copy a run directory with an untrained adapter into tmp/run
    marks: list = field(default_factory=list)


def _yaml_syntax(tmp, *_):
    return train_argv(tmp, recipe=base_recipe(tmp).replace("  r: 8", "  r: [8"))


def _unknown_key(tmp, *_):
    return train_argv(tmp, recipe=base_recipe(tmp).replace("  lora_dropout:", "  lora_dropuot:"))


def _wrong_type(tmp, *_):
    return train_argv(tmp, recipe=base_recipe(tmp).replace("  r: 8", "  r: eight"))


def _missing_data(tmp, *_):
    return train_argv(tmp, f"data.source={tmp / 'nope.jsonl'}")


def _empty_file(tmp, *_):
    (tmp / "empty.jsonl").write_text("")
    return train_argv(tmp, f"data.source={tmp / 'empty.jsonl'}")


def _no_rows(tmp, *_):
    (tmp / "header.csv").write_text("prompt,completion\n")
    return train_argv(tmp, f"data.source={tmp / 'header.csv'}")


def _missing_columns(tmp, *_):
    src = jsonl(tmp / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    return train_argv(tmp, f"data.source={src}")


def _empty_field_refused(tmp, *_):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}, {"prompt": "e", "completion": "f"}]
    src = jsonl(tmp / "d.jsonl", rows)
    return train_argv(tmp, f"data.source={src}", "data.invalid_rows=error")


def _all_rows_null(tmp, *_):
    src = jsonl(tmp / "d.jsonl", [{"prompt": "a", "completion": None}, {"prompt": None, "completion": "b"}])
    return train_argv(tmp, f"data.source={src}")


def _not_utf8(tmp, *_):
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n'
                                       b'{"prompt": "caf\xe9", "completion": "c"}\n')
    return train_argv(tmp, f"data.source={tmp / 'latin1.jsonl'}")


def _chat_unknown_role(tmp, *_):
    src = jsonl(tmp / "chat.jsonl", [{"messages": CHAT_OK}, {"messages": [{"role": "bot", "content": "x"}, *CHAT_OK]}])
    return train_argv(tmp, recipe=base_recipe(tmp, src, "chat")) + ["--set", "data.invalid_rows=error"]


def _chat_no_assistant(tmp, *_):
    src = jsonl(tmp / "chat.jsonl", [{"messages": CHAT_OK}, {"messages": [{"role": "user", "content": "x"}]}])
    return train_argv(tmp, recipe=base_recipe(tmp, src, "chat")) + ["--set", "data.invalid_rows=error"]


def _chat_no_template(tmp, tiny, _):
    src = jsonl(tmp / "chat.jsonl", [{"messages": CHAT_OK}] * 3)
    tok = tokenizer_copy(tiny, tmp, chat=False)
    return train_argv(tmp, f"model.tokenizer={tok}", recipe=base_recipe(tmp, src, "chat"))


def _remote_code(tmp, *_):
    custom = tmp / "custom-model"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {
        "AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}}))
    return train_argv(tmp, f"model.name_or_path={custom}")


def _exists(tmp, *_):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("my earlier run")
    return train_argv(tmp)


def _fake_run_with_checkpoint(tmp: Path) -> None:
    """A run directory as train leaves it after 2 steps (checkpoint files present; only names are read)."""
    from qlora_cli.recipe import load_recipe
    from qlora_cli.reliability import CHECKPOINT_FILES

    recipe = load_recipe(write(tmp, base_recipe(tmp)))
    ckpt = tmp / "run" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (tmp / "run" / "recipe.yaml").write_text(recipe.to_yaml())
    for name in CHECKPOINT_FILES:
        (ckpt / name).write_text(json.dumps({"global_step": 2}))


def _resume_changed(tmp, *_):
    _fake_run_with_checkpoint(tmp)
    return train_argv(tmp, "lora.lora_alpha=4", "training.learning_rate=1e-3", extra=("--resume",))


def _resume_shape_change(tmp, *_):
    _fake_run_with_checkpoint(tmp)
    return train_argv(tmp, "lora.r=4", extra=("--resume", "--force"))


def _resume_nothing(tmp, *_):
    (tmp / "run").mkdir()
    (tmp / "run" / "recipe.yaml").write_text("model: {}\n")
    return train_argv(tmp, extra=("--resume",))


def _disk_full_patch(monkeypatch):
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _disk_small_patch(monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 10**6, 5 * 10**6))


def _after_disk_full(tmp: Path, line: str) -> None:
    ckpts = tmp / "run" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.is_dir()], "no checkpoint, complete or partial, is left"
    assert not (tmp / "run" / "adapter").exists()


def _after_nan(tmp: Path, line: str) -> None:
    step = int(re.search(r"at step (\d+)", line).group(1))
    ckpts = [p.name for p in (tmp / "run" / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert all(int(n.split("-")[1]) < step for n in ckpts), "nothing from the bad step or later is saved"
    assert not (tmp / "run" / "adapter").exists() and not (tmp / "run" / "summary.json").exists()


def _merge_mismatch(tmp, tiny, other):
    return ["merge", str(tmp / "run"), "--base", str(other), "--out", str(tmp / "merged")]


def _eval_mismatch(tmp, tiny, other):
    return ["eval", str(tmp / "run"), "--set", f"model.name_or_path={other}", "--limit", "2"]


CASES = [
    Case("recipe-yaml-syntax", _yaml_syntax, ("YAML syntax error", "r.yaml:9:", "Check indentation"),
         subprocess=True),
    Case("recipe-unknown-key", _unknown_key, ("unknown key `lora_dropuot` in lora", "r.yaml:9 lora.lora_dropuot",
                                              "Did you mean `lora.lora_dropout`?")),
    Case("recipe-wrong-type", _wrong_type, ("`lora.r` is 'eight'", "r.yaml:8 lora.r", "an integer")),
    Case("recipe-range-lora-r", lambda t, *_: train_argv(t, "lora.r=0"), ("`lora.r` is 0", "--set lora.r", "> 0")),
    Case("recipe-range-learning-rate", lambda t, *_: train_argv(t, "training.learning_rate=-1e-4"),
         ("`training.learning_rate` is -0.0001", "--set training.learning_rate", "> 0")),
    Case("recipe-range-dropout", lambda t, *_: train_argv(t, "lora.lora_dropout=1.0"),
         ("`lora.lora_dropout` is 1.0", "--set lora.lora_dropout", ">= 0 and < 1")),
    Case("recipe-max-steps", lambda t, *_: train_argv(t, "training.max_steps=0"),
         ("`training.max_steps` is 0", "--set training.max_steps", "-1")),
    Case("recipe-missing-file", lambda t, *_: ["train", str(t / "nope.yaml")],
         ("recipe file", "nope.yaml' does not exist", "Check the path"), subprocess=True),
    Case("recipe-missing-section",
         lambda t, *_: ["train", str(write(t, "model:\n  name_or_path: qlora/tiny-llama\n"))],
         ("r.yaml", "no `data` section", "Add a `data:` section")),
    Case("recipe-bad-override", lambda t, *_: train_argv(t, "learning_rate"),
         ("--set", "'learning_rate' is not of the form section.key=value", "--set training.learning_rate=1e-4")),
    Case("recipe-sft-args-owned", lambda t, *_: train_argv(t, "training.sft_args={bf16: true}"),
         ("--set training.sft_args.bf16", "`bf16` is set by the recipe itself", "training.precision")),
    Case("data-missing-file", _missing_data, ("data.source", "nope.jsonl' does not exist", "Check the path")),
    Case("data-empty-file", _empty_file, ("data.source", "empty.jsonl is empty", "Point to a file with rows")),
    Case("data-no-rows", _no_rows, ("header.csv", "the dataset has no rows", "Point data.source")),
    Case("data-unsupported-extension", lambda t, *_: train_argv(t, f"data.source={write(t, 'x', 'data.txt')}"),
         ("data.source", "data.txt has an unsupported extension", ".jsonl")),
    Case("data-missing-columns", _missing_columns,
         ("qa.jsonl", "needs column(s) prompt, completion; columns found: question, answer", "data.columns")),
    Case("data-empty-fields-refused", _empty_field_refused,
         ("d.jsonl", "row 2: field 'completion' is empty", "data.invalid_rows: skip")),
    Case("data-all-rows-invalid", _all_rows_null,
         ("d.jsonl", "all 2 rows are invalid for format prompt_completion", "data.format and data.columns")),
    Case("data-not-utf8", _not_utf8, ("latin1.jsonl line 2", "is not UTF-8 text (byte 0xe9)", "iconv")),
    Case("data-shell-characters", lambda t, *_: train_argv(t, "data.source=$(touch pwned).jsonl"),
         ("data.source", "'$(touch pwned).jsonl' does not exist", "Check the path")),
    Case("chat-unknown-role", _chat_unknown_role, ("chat.jsonl", "row 2: unknown role 'bot'", "invalid_rows: skip")),
    Case("chat-no-assistant", _chat_no_assistant, ("chat.jsonl", "row 2: no assistant turn", "invalid_rows: skip")),
    Case("chat-no-template", _chat_no_template,
         ("data.format", "the tokenizer has no chat template", "prompt_completion")),
    Case("model-target-modules", lambda t, *_: train_argv(t, "lora.target_modules=[q_proj, qkv_proj]"),
         ("lora.target_modules", "qkv_proj not found", "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")),
    Case("model-remote-code", _remote_code,
         ("model.trust_remote_code", "modeling_mine.py", "trust_remote_code: true if you trust it")),
    Case("device-no-cuda", lambda t, *_: train_argv(t, "training.allow_cpu=false"),
         ("training.allow_cpu", "no CUDA GPU is visible", "training.allow_cpu: true")),
    Case("output-exists", _exists, ("training.output_dir", "run directory {tmp}/run already exists", "--overwrite")),
    Case("output-not-writable", lambda t, *_: train_argv(t, "training.output_dir=/proc/qlora-test-run"),
         ("/proc/qlora-test-run", "/proc is not writable", "Choose an output directory"),
         marks=[pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")]),
    Case("output-resume-and-overwrite", lambda t, *_: train_argv(t, extra=("--resume", "--overwrite")),
         ("qlora train", "--resume and --overwrite contradict", "Pass --resume")),
    Case("disk-too-small", lambda t, *_: train_argv(t), ("training.output_dir", "has 5 MB free", "Free some space"),
         patch=_disk_small_patch),
    Case("disk-full-during-save", lambda t, *_: train_argv(t),
         ("checkpoint-2", "the disk is full: writing checkpoint checkpoint-2 failed", "--resume"),
         patch=_disk_full_patch, check=_after_disk_full),
    Case("training-nan-loss", lambda t, *_: train_argv(t, "training.learning_rate=1e30", "training.save_steps=1"),
         ("run step", "became NaN or infinite at step", "Lower training.learning_rate (now 1e+30)"), check=_after_nan),
    Case("resume-changed-recipe", _resume_changed,
         ("r.yaml", "training field(s): lora.lora_alpha: 32.0 -> 4.0; training.learning_rate: 0.0002 -> 0.001",
          "--force")),
    Case("resume-shape-change", _resume_shape_change,
         ("r.yaml", "lora.r: 8 -> 4: cannot change when resuming", "start a new run")),
    Case("resume-no-checkpoint", _resume_nothing,
         ("training.output_dir", "has no complete checkpoint to resume from", "--overwrite")),
    Case("merge-adapter-mismatch", _merge_mismatch, ("--base", "does not fit the base", "Merge into the model"),
         needs_run=True),
    Case("eval-adapter-mismatch", _eval_mismatch,
         ("--set model.name_or_path", "does not fit the base", "Evaluate it on the model it was trained on"),
         needs_run=True),
]
assert len(CASES) >= 25


# ------------------------------------------------------------------------------------------------- harness


@pytest.fixture(autouse=True)
def _no_dataset_progress_bars():
    """`qlora` turns them off before `datasets` is imported; in one pytest process another test may import it first."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if enabled:
        datasets.enable_progress_bars()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_run(argv)
    return e.value.code, capsys.readouterr().err


def run_subprocess(argv: list[str], cwd: Path, *debug: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "qlora_cli.cli", *debug, *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(a run directory holding an untrained LoRA adapter of the tiny model, a base model of another width)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_cli.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("adapter-run")
    run = tmp / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "adapter")
    eval_source = f"  eval_source: {DEMO_DATA}/eval.jsonl\n"
    with_eval = base_recipe(tmp).replace("  max_length: 64\n", "  max_length: 64\n" + eval_source)
    recipe = load_recipe(write(tmp, with_eval))
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    (run / "summary.json").write_text("{}\n")
    other = tmp / "other-base"
    config = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    return run, other


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gives_one_line_with_value_place_and_fix(case: Case, tmp_path: Path, monkeypatch, capsys,
                                                           tiny_model_dir: Path, request) -> None:
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands where the snapshot sees it
    other = None
    if case.needs_run:
        run, other = request.getfixturevalue("adapter_run")
        shutil.copytree(run, tmp_path / "run")
    argv = case.argv(tmp_path, tiny_model_dir, other)
    if case.patch:
        case.patch(monkeypatch)
    before = snapshot(tmp_path)
    code, err = run_subprocess(argv, tmp_path) if case.subprocess else run_in_process(argv, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    print(f"\n[{case.id}] {line}")
    for part in case.expect:
        assert part.replace("{tmp}", str(tmp_path)) in line, f"{part!r} not in {line!r}"
    if case.check is not None:
        case.check(tmp_path, line)
    else:
        assert snapshot(tmp_path) == before, "a refused command writes nothing and loses nothing"
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, err = run_subprocess(_unknown_key(tmp_path), tmp_path, "--debug")
    assert code != 0
    assert "Traceback" in err and "UserError" in err and "unknown key `lora_dropuot` in lora" in err


# ---------------------------------------------------------------------------- handled, and said so (exit 0)


def test_long_examples_are_truncated_and_counted(tmp_path: Path, capsys) -> None:
    src = jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 80, "completion": "x"}, {"prompt": "a", "completion": "b"}])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_run(train_argv(tmp_path, f"data.source={src}", "data.max_length=32", extra=("--dry-run",)))
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at 80 columns
    assert e.value.code in (0, None)
    assert ("1 training example(s) are longer than max_length=32 tokens; their prompts are cut from the left so "
            "the answer is kept") in out


def test_rows_with_empty_fields_are_skipped_and_counted(tmp_path: Path, capsys) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}, {"prompt": "", "completion": "d"}]
    src = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        cli_run(train_argv(tmp_path, f"data.source={src}", extra=("--dry-run",)))
    assert e.value.code in (0, None)
    assert "skipped 2 row(s) with empty or invalid fields in" in " ".join(capsys.readouterr().out.split())


def test_a_tokenizer_without_pad_token_is_handled_and_said_so(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    tok = tokenizer_copy(tiny_model_dir, tmp_path, pad=False)
    with pytest.raises(SystemExit) as e:
        cli_run(train_argv(tmp_path, f"model.tokenizer={tok}", extra=("--dry-run",)))
    assert e.value.code in (0, None)
    assert "tokenizer has no pad token; using '</s>' for padding" in " ".join(capsys.readouterr().out.split())


def test_bf16_on_a_gpu_without_bf16_falls_back_to_fp16_and_says_so() -> None:
    from qlora_cli.model import Device, resolve_precision
    from qlora_cli.recipe import TrainingConfig

    t4 = Device("cuda", "Tesla T4", 16 * 2**30, bf16=False)
    with pytest.warns(UserWarning, match="Tesla T4 has no bfloat16 support; training in fp16 instead"):
        assert resolve_precision(TrainingConfig(precision="bf16"), t4) == "fp16"
    assert resolve_precision(TrainingConfig(precision="auto"), t4) == "fp16"


def test_4bit_on_cpu_runs_only_in_the_explicit_test_mode(tmp_path: Path) -> None:
    from qlora_cli.model import detect_device
    from qlora_cli.recipe import TrainingConfig

    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    assert detect_device(TrainingConfig(allow_cpu=True)).type == "cpu"


# ------------------------------------------------------------------------------------------------- the docs


def test_the_catalog_in_docs_lists_every_case() -> None:
    text = (REPO / "docs" / "errors.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.MULTILINE))
    tested = {c.id for c in CASES}
    assert tested <= documented, f"undocumented: {sorted(tested - documented)}"
    handled = {"data-truncated", "data-rows-skipped", "tokenizer-no-pad", "precision-bf16-fallback",
               "device-cpu-test-mode"}
    assert documented - tested == handled, sorted(documented - tested)
