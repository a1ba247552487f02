"""Generating answers and scoring them: exact match, macro-F1, per-class scores, confusions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .recipe import EvaluationConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def normalize(answer: str, cfg: EvaluationConfig) -> str:
    """The answer as compared: first line only, stripped, lower-cased, as the recipe's evaluation section says."""
    if cfg.first_line:
        answer = answer.strip().split("\n", 1)[0] if answer.strip() else ""
    if cfg.strip:
        answer = answer.strip()
    if cfg.lowercase:
        answer = answer.lower()
    return answer


@dataclass
class Scores:
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusions: list[tuple[str, str, int]] = field(default_factory=list)  # (expected, predicted, count)

    def to_dict(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class": self.per_class,
                "confusions": [list(c) for c in self.confusions]}


def score(predictions: list[str], references: list[str], top_confusions: int = 5) -> Scores:
    """Exact-match accuracy and macro-F1 over the reference classes.

    Macro-F1 averages the per-class F1 over the classes that appear in the references; a prediction that is
    no reference class counts as a false negative for its row's class only.
    """
    assert len(predictions) == len(references)
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    classes = sorted(set(references))
    per_class = {}
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    macro = sum(v["f1"] for v in per_class.values()) / len(per_class) if per_class else 0.0
    pairs = Counter((r, p) for p, r in zip(predictions, references) if p != r)
    return Scores(n, correct / n if n else 0.0, macro, per_class,
                  [(r, p, k) for (r, p), k in pairs.most_common(top_confusions)])


@dataclass
class Generation:
    """One greedy answer: its text (special tokens removed), how many tokens it took, and whether the model ended
    it itself with its end-of-sequence token (rather than running into max_new_tokens)."""

    text: str
    tokens: int
    stopped: bool


def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     cfg: EvaluationConfig, add_special_tokens: bool = True) -> list[Generation]:
    """Greedy answers to `prompts`, in batches, left-padded."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    eos = tokenizer.eos_token_id
    answers: list[Generation] = []
    try:
        for i in range(0, len(prompts), cfg.batch_size):
            batch = tokenizer(prompts[i:i + cfg.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            for ids in out[:, batch["input_ids"].shape[1]:].tolist():
                ends = [j for j, t in enumerate(ids) if t == eos]
                kept = ids[: ends[0] + 1] if ends else ids
                answers.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), bool(ends)))
    finally:
        tokenizer.padding_side = side
    return answers


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             cfg: EvaluationConfig, add_special_tokens: bool = True) -> list[str]:
    """Greedy answers to `prompts` as text, special tokens removed."""
    return [g.text for g in generate_answers(model, tokenizer, prompts, cfg, add_special_tokens)]
