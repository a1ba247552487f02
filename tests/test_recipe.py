"""The recipe schema: defaults, overrides, and one clear error for each kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_cli.errors import UserError
from qlora_cli.recipe import field_docs, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
MINIMAL = "model:\n  name_or_path: qlora/tiny-llama\ndata:\n  source: data/tiny-intents/train.jsonl\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> UserError:
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value


@pytest.mark.parametrize("name", ["tiny-demo", "mistral7b", "qwen2.5-7b-banking77", "llama3-8b"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.output_dir == Path("runs") / name


def test_defaults_are_the_qlora_recipe(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.quantization.load_in_4bit and r.quantization.bnb_4bit_quant_type == "nf4"
    assert r.quantization.bnb_4bit_use_double_quant
    assert r.training.optim == "paged_adamw_8bit"
    assert r.training.gradient_checkpointing is True
    assert r.model.trust_remote_code is False
    assert r.lora.target_modules == "all-linear"


def test_mistral_recipe_matches_the_classic_settings() -> None:
    r = load_recipe(REPO / "recipes" / "mistral7b.yaml")
    assert (r.lora.r, r.lora.lora_alpha, r.lora.lora_dropout) == (16, 32, 0.05)
    assert sorted(r.lora.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert (r.data.max_length, r.data.packing) == (2048, True)
    assert (r.training.learning_rate, r.training.lr_scheduler_type) == (2e-4, "cosine")


def test_set_overrides_values_and_reads_them_as_yaml(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, MINIMAL), ["training.learning_rate=1e-4", "lora.r=8",
                                               "lora.target_modules=[q_proj, v_proj]", "data.packing=true"])
    assert r.training.learning_rate == 1e-4
    assert r.lora.r == 8
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.packing is True


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, MINIMAL), ["training.sft_args={eval_on_start: true}"])
    again = load_recipe(write(tmp_path, r.to_yaml()))
    assert again.to_dict() == r.to_dict()


def test_misspelled_key_names_the_closest_valid_one_and_its_line(tmp_path: Path) -> None:
    e = error_of(tmp_path, MINIMAL + "lora:\n  r: 8\n  lora_alpah: 16\n")
    assert "lora_alpah" in e.message and "lora" in e.message
    assert "lora.lora_alpha" in e.fix
    assert e.where.endswith("r.yaml:7 lora.lora_alpah")


def test_misspelled_section_is_suggested(tmp_path: Path) -> None:
    e = error_of(tmp_path, MINIMAL + "trainng:\n  max_steps: 3\n")
    assert "`training`" in e.fix


def test_key_in_the_wrong_section_says_where_it_belongs(tmp_path: Path) -> None:
    e = error_of(tmp_path, MINIMAL + "training:\n  r: 8\n")
    assert "lora.r" in e.fix


def test_other_sft_fields_point_to_sft_args(tmp_path: Path) -> None:
    e = error_of(tmp_path, MINIMAL + "training:\n  neftune_noise_alpha: 5\n")
    assert "sft_args" in e.fix


def test_sft_args_are_validated_against_sftconfig(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, MINIMAL + "training:\n  sft_args:\n    neftune_noise_alpha: 5\n"))
    assert r.training.sft_args == {"neftune_noise_alpha": 5}
    e = error_of(tmp_path, MINIMAL + "training:\n  sft_args:\n    neftune_noise_alpa: 5\n")
    assert "neftune_noise_alpha" in e.fix and "trl.SFTConfig" in e.message
    e = error_of(tmp_path, MINIMAL + "training:\n  sft_args:\n    max_length: 5\n")
    assert "data.max_length" in e.fix


@pytest.mark.parametrize(
    ("yaml_text", "key", "expected"),
    [
        ("lora:\n  r: sixteen\n", "lora.r", "an integer"),
        ("lora:\n  r: 1.5\n", "lora.r", "an integer"),
        ("training:\n  learning_rate: fast\n", "training.learning_rate", "a number"),
        ("training:\n  gradient_checkpointing: 'yes'\n", "training.gradient_checkpointing", "true or false"),
        ("quantization:\n  bnb_4bit_quant_type: nf3\n", "quantization.bnb_4bit_quant_type", "'nf4'"),
        ("lora:\n  target_modules: 3\n", "lora.target_modules", "a list of a string"),
    ],
)
def test_wrong_types_name_the_key_and_expected_type(tmp_path: Path, yaml_text: str, key: str,
                                                    expected: str) -> None:
    e = error_of(tmp_path, MINIMAL + yaml_text)
    assert key in e.message and expected in e.message
    assert "r.yaml:" in e.where


@pytest.mark.parametrize(
    ("override", "bound"),
    [("lora.r=0", "> 0"), ("training.learning_rate=-1e-4", "> 0"), ("lora.lora_dropout=1.0", "< 1"),
     ("lora.lora_dropout=-0.1", ">= 0"), ("data.max_length=0", "> 0")],
)
def test_out_of_range_values_are_refused(tmp_path: Path, override: str, bound: str) -> None:
    e = error_of(tmp_path, MINIMAL, [override])
    assert "out of range" in e.message and bound in e.fix
    assert e.where.startswith("--set")


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    e = error_of(tmp_path, "model:\n  name_or_path: [unclosed\ndata: {}\n")
    assert "YAML syntax error" in e.message
    assert "r.yaml:" in e.where


def test_missing_file_and_missing_section(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    e = error_of(tmp_path, "model:\n  name_or_path: x\n")
    assert "`data`" in e.message


def test_malformed_override_is_explained(tmp_path: Path) -> None:
    e = error_of(tmp_path, MINIMAL, ["learning_rate"])
    assert "section.key=value" in e.message


def test_recipe_from_dict_checks_cross_field_rules() -> None:
    with pytest.raises(UserError, match="both `data.eval_fraction` and a separate eval set"):
        recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"source": "a.jsonl", "eval_fraction": 0.1, "eval_source": "b.jsonl"}})


def test_every_key_is_documented() -> None:
    docs = field_docs()
    assert len(docs) > 40
    assert all(help_text for _, _, help_text in docs)
    assert ("training.optim", "'paged_adamw_8bit'") in [(k, d) for k, d, _ in docs]
