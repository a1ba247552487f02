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
