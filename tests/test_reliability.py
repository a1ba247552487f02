"""Reliability on the tiny model: resume equals an uninterrupted run, signals save a checkpoint, NaN stops, disk
errors keep what was there, and outputs appear atomically. Subprocess tests use real signals (SIGINT, SIGTERM,
SIGKILL) against the real CLI entry point."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_DATA, DEMO_RECIPE, REPO, demo_recipe
from rich.console import Console

from qlora_cli.commands.train import train
from qlora_cli.errors import UserError
from qlora_cli.reliability import (
    Interrupted,
    complete_checkpoints,
    find_checkpoint,
    missing_checkpoint_files,
    recipe_differences,
)
from qlora_cli.run_dir import RunDir, atomic_dir

# 8 optimizer steps of 4 rows over 20 rows (two epochs: the resumed data position crosses an epoch boundary),
# a loss logged every step, checkpoints at steps 4 and 8.
TINY = ["training.max_steps=8", "training.save_steps=4", "training.logging_steps=1",
        "evaluation.compare_after_training=0", "training.sft_args={}", "training.per_device_train_batch_size=4",
        "data.max_rows=20"]
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-6

# The real CLI entry point, with a pause after every optimizer step (and optionally inside one checkpoint save)
# so that a test can send a signal at a known point. Nothing of qlora is replaced.
SLOW_CLI = """
import sys, time
from transformers import TrainerCallback
from qlora_cli import reliability
from qlora_cli.commands import train as cmd

step_pause, save_pause_at = float(sys.argv[1]), int(sys.argv[2])

class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(step_pause)

original = cmd.train
cmd.train = lambda *a, **k: original(*a, **{**k, "callbacks": [*(k.get("callbacks") or []), Pause()]})
trainer_class = reliability.atomic_checkpoint_trainer()
save_rng_state = trainer_class._save_rng_state
def paused_save_rng_state(self, output_dir):  # adapter and optimizer are written; rng and trainer state are not
    if self.state.global_step == save_pause_at:
        print("PAUSED IN SAVE", flush=True)
        time.sleep(120)
    return save_rng_state(self, output_dir)
trainer_class._save_rng_state = paused_save_rng_state

from qlora_cli.cli import run
run(sys.argv[3:])
"""


def console() -> Console:
    return Console(width=200, force_terminal=False, record=True)


def cli_args(tmp: Path, *extra: str) -> list[str]:
    sets = [f"data.source={DEMO_DATA / 'train.jsonl'}", f"data.eval_source={DEMO_DATA / 'eval.jsonl'}",
            f"training.output_dir={tmp / 'run'}", *TINY]
    return ["train", str(DEMO_RECIPE), *(a for s in sets for a in ("--set", s)), *extra]


def losses(run: RunDir) -> dict[int, float]:
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert len(by_step) == len([r for r in records if "loss" in r]), "each step is logged once"
    return by_step


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def compare(reference: RunDir, resumed: RunDir) -> tuple[float, float]:
    """(max per-step loss difference, max adapter weight difference), after checking both are complete."""
    a, b = losses(reference), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    loss_diff = max(abs(a[s] - b[s]) for s in a)
    wa, wb = adapter_weights(reference.adapter), adapter_weights(resumed.adapter)
    assert wa.keys() == wb.keys() and wa
    assert all(wa[k].dtype == wb[k].dtype for k in wa), "the resumed adapter keeps the recipe's dtype"
    weight_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"resume equality: max per-step loss difference {loss_diff:.3g}, max adapter weight difference "
          f"{weight_diff:.3g}")
    assert loss_diff <= LOSS_TOL
    assert weight_diff <= WEIGHT_TOL
    return loss_diff, weight_diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> RunDir:
    """8 uninterrupted steps."""
    tmp = tmp_path_factory.mktemp("reference")
    train(demo_recipe(tmp, *TINY), console())
    return RunDir(tmp / "run")


def copy_run(reference: RunDir, tmp: Path) -> RunDir:
    shutil.copytree(reference.path, tmp / "run")
    return RunDir(tmp / "run")


def start_slow_cli(tmp: Path, *extra: str, step_pause: float = 0.3, save_pause_at: int = 0) -> subprocess.Popen:
    script = tmp / "slow_cli.py"
    script.write_text(SLOW_CLI)
    return subprocess.Popen([sys.executable, str(script), str(step_pause), str(save_pause_at), *cli_args(tmp, *extra)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the signal:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def logged_step(run: RunDir) -> int:
    if not run.metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


# ------------------------------------------------------------------------------------ interruption and resume


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_prints_the_resume_command_and_resume_matches(
        tmp_path: Path, reference: RunDir, sig: signal.Signals, code: int) -> None:
    run = RunDir(tmp_path / "run")
    proc = start_slow_cli(tmp_path)
    wait_for(lambda: logged_step(run) >= 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    stopped = logged_step(run)
    assert 2 <= stopped < 8
    assert f"{sig.name}: saving a checkpoint" in err
    assert f"training stopped by {sig.name} at step {stopped} of 8" in err
    assert "Traceback" not in err
    resume_command = re.search(r"Resume with: (qlora train .*--resume)", err).group(1)
    assert "--set training.max_steps=8" in resume_command
    assert [p.name for p in complete_checkpoints(run)][-1] == f"checkpoint-{stopped}"
    assert not run.adapter.exists() and not run.summary.exists()

    if sig == signal.SIGTERM:  # the same resume path; SIGINT's run checks it
        return
    summary = train(demo_recipe(tmp_path, *TINY), console(), resume=True)
    assert summary["steps"] == 8 and summary["resumed_from"].endswith(f"checkpoint-{stopped}")
    compare(reference, run)


def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(tmp_path: Path,
                                                                                reference: RunDir) -> None:
    """SIGKILL (no handler runs) halfway through writing checkpoint-8: only complete checkpoints are visible."""
    run = RunDir(tmp_path / "run")
    proc = start_slow_cli(tmp_path, step_pause=0.05, save_pause_at=8)
    wait_for(lambda: any(p.name.startswith(".partial-checkpoint-8") and (p / "checkpoint-8" / "optimizer.pt").is_file()
                         for p in run.checkpoints.glob(".*")) if run.checkpoints.is_dir() else False, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-4"]
    assert not (run.checkpoints / "checkpoint-8").exists()
    assert all(not missing_checkpoint_files(p) for p in run.checkpoints.glob("checkpoint-*"))
    assert logged_step(run) == 8  # steps 5-8 were logged, and will be redone

    train(demo_recipe(tmp_path, *TINY), console(), resume=True)
    assert not list(run.checkpoints.glob(".partial-*")), "leftovers of the killed save are removed"
    compare(reference, run)


def test_resume_from_a_given_checkpoint(tmp_path: Path, reference: RunDir) -> None:
    run = copy_run(reference, tmp_path)
    shutil.rmtree(run.adapter)
    run.summary.unlink()
    from qlora_cli.cli import run as cli_run

    with pytest.raises(SystemExit) as e:
        cli_run(cli_args(tmp_path, "--resume-from", "checkpoint-4"))
    assert e.value.code in (0, None)
    compare(reference, run)
    resumed, first = json.loads(run.summary.read_text()), json.loads(reference.summary.read_text())
    assert resumed["tokens"] == first["tokens"], "the same rows were seen"
    at_checkpoint = json.loads((run.checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    session = resumed["tokens"] - at_checkpoint["num_input_tokens_seen"]
    assert session > 0
    assert resumed["tokens_per_s"] * resumed["train_time_s"] == pytest.approx(session, rel=0.05), \
        "throughput counts this session's tokens only"


def test_resuming_with_changed_training_fields_is_refused_with_the_list(tmp_path: Path, reference: RunDir) -> None:
    run = copy_run(reference, tmp_path)
    before = run.recipe.read_text()
    changed = demo_recipe(tmp_path, *TINY, "lora.lora_alpha=8", "training.learning_rate=1e-3",
                          "training.logging_steps=2")
    with pytest.raises(UserError) as e:
        train(changed, console(), resume=True)
    message = e.value.render()
    assert "differs from the one" in message and "2 training field(s)" in message
    assert "lora.lora_alpha: 32.0 -> 8.0" in message and "training.learning_rate: 0.002 -> 0.001" in message
    assert "logging_steps" not in message, "logging cadence may change"
    assert "--force" in e.value.fix
    with pytest.raises(UserError, match=r"lora.r: 16 -> 8: cannot change when resuming"):
        train(demo_recipe(tmp_path, *TINY, "lora.r=8"), console(), resume=True, force=True)
    assert run.recipe.read_text() == before


def test_force_resumes_with_a_changed_recipe_and_warns(tmp_path: Path, reference: RunDir) -> None:
    run = copy_run(reference, tmp_path)
    out = console()
    summary = train(demo_recipe(tmp_path, *TINY, "training.learning_rate=1e-3"), out, resume="checkpoint-4",
                    force=True)
    text = out.export_text()
    assert "warning: resuming with a changed recipe (--force): training.learning_rate: 0.002 -> 0.001" in text
    assert summary["steps"] == 8
    assert "learning_rate: 0.001" in run.recipe.read_text()
    a, b = losses(reference), losses(run)
    assert all(a[s] == b[s] for s in range(1, 6)) and a[6] != b[6], "steps after 4 ran with the new rate"


def test_recipe_differences_ignore_logging_and_output() -> None:
    old = {"training": {"learning_rate": 1e-4, "logging_steps": 10, "output_dir": "a",
                        "sft_args": {"report_to": "none", "neftune_noise_alpha": 5}},
           "evaluation": {"max_new_tokens": 8}, "lora": {"r": 16}}
    new = {"training": {"learning_rate": 1e-4, "logging_steps": 1, "output_dir": "b",
                        "sft_args": {"report_to": "wandb"}},
           "evaluation": {"max_new_tokens": 32}, "lora": {"r": 16}}
    assert recipe_differences(old, new) == ["training.sft_args.neftune_noise_alpha: 5 -> '(unset)'"]


def test_resume_needs_a_run_with_a_complete_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run to resume"):
        find_checkpoint(RunDir(tmp_path / "nope"))
    (tmp_path / "run" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(RunDir(tmp_path / "run"))
    with pytest.raises(UserError, match=r"not a complete checkpoint \(no trainer_state.json"):
        find_checkpoint(RunDir(tmp_path / "run"), "checkpoint-3")


# --------------------------------------------------------------------------------------------- NaN / inf


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A real NaN: a learning rate of 1e30 (after one warm-up step at lr 0) blows the adapter up."""
    recipe = demo_recipe(tmp_path, *TINY, "training.learning_rate=1e30", "training.save_steps=2")
    with pytest.raises(UserError) as e:
        train(recipe, console())
    run = RunDir(tmp_path / "run")
    step = int(re.search(r"at step (\d+)", e.value.message).group(1))
    assert "NaN or infinite" in e.value.message and e.value.where.endswith(f"step {step}")
    assert "learning_rate (now 1e+30)" in e.value.fix
    good = complete_checkpoints(run)
    assert good and all(int(p.name.split("-")[1]) < step for p in good)
    assert str(good[-1]) in e.value.fix
    assert not run.adapter.exists() and not run.summary.exists()
    import torch

    assert all(torch.isfinite(w).all() for w in adapter_weights(good[-1]).values())


# -------------------------------------------------------------------------------------------- disk errors


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch,
                                                                    reference: RunDir) -> None:
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-8" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as e:
        train(demo_recipe(tmp_path, *TINY), console())
    assert e.value.message == "the disk is full: writing checkpoint checkpoint-8 failed, and nothing of it was kept"
    assert "--resume" in e.value.fix
    run = RunDir(tmp_path / "run")
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-4"]
    assert [p.name for p in run.checkpoints.iterdir() if p.is_dir()] == ["checkpoint-4"], "no partial left"

    monkeypatch.setattr(torch, "save", real_save)  # space was freed
    train(demo_recipe(tmp_path, *TINY), console(), resume=True)
    compare(reference, run)


def test_disk_full_while_saving_the_adapter_keeps_the_previous_adapter(tmp_path: Path, monkeypatch,
                                                                        reference: RunDir) -> None:
    import peft.peft_model

    run = copy_run(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in run.adapter.iterdir()}
    real = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if ".adapter.partial-" in str(filename):
            Path(filename).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(UserError, match="the disk is full: writing the adapter failed"):
        train(demo_recipe(tmp_path, *TINY), console(), resume=True)  # at step 8 already: only saves again
    assert {p.name: p.read_bytes() for p in run.adapter.iterdir()} == before
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")]


def test_disk_space_is_checked_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match=r"a checkpoint and the adapter needs about \d+ MB of disk, but .* has 1 MB"):
        train(demo_recipe(tmp_path, *TINY), console())
    assert not (tmp_path / "run").exists()


def test_atomic_dir_killed_midway_leaves_the_previous_content(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    script = (f"import time; from pathlib import Path; from qlora_cli.run_dir import atomic_dir\n"
              f"with atomic_dir(Path({str(target)!r}), overwrite=True) as tmp:\n"
              f"    (tmp / 'weights').write_text('new, half')\n    print('WRITING', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (target / "weights").read_text() == "old"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".adapter.partial-")) == ["adapter"]


# ----------------------------------------------------------------------------------------------- security


def test_no_unsafe_loading_or_shell_in_the_package() -> None:
    source = {p: p.read_text() for p in (REPO / "qlora_cli").rglob("*.py")}
    for path, text in source.items():
        assert not re.search(r"yaml\.(load|full_load|unsafe_load)\(|yaml\.(Unsafe|Full)?Loader\b", text), path
        assert "shell=True" not in text and "os.system(" not in text and "os.popen(" not in text, path
        assert "trust_remote_code=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    from qlora_cli.recipe import ModelConfig

    assert ModelConfig(name_or_path="m").trust_remote_code is False


def test_checkpoints_hold_safetensors_weights_and_resume_loads_with_weights_only(reference: RunDir) -> None:
    checkpoint = complete_checkpoints(reference)[-1]
    names = {p.name for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in names and "adapter_model.bin" not in names
    import inspect

    from transformers import Trainer

    for method in (Trainer._load_optimizer_and_scheduler, Trainer._load_rng_state):
        calls = re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", inspect.getsource(method))
        assert calls and all("weights_only=True" in c for c in calls)


def test_interrupted_carries_the_signal_exit_code() -> None:
    assert Interrupted(signal.SIGINT, "x").exit_code == 130
    assert Interrupted(signal.SIGTERM, "x").exit_code == 143
    assert UserError("x").exit_code == 2


def test_run_dir_check_probes_a_real_write(tmp_path: Path) -> None:
    from qlora_cli.run_dir import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_writable(tmp_path / "file" / "run")
    if Path("/proc").is_dir():
        with pytest.raises(UserError, match="is not writable"):
            check_writable(Path("/proc/qlora-run"))
    check_writable(tmp_path / "new" / "run")
    assert os.listdir(tmp_path) == ["file"]
