"""The built-in tiny model `qlora/tiny-llama` and the demo task it learns.

A 2-layer Llama of ~2M parameters with random weights, and a byte-level BPE tokenizer trained with the
`tokenizers` library on the demo task's own words. Both are made on first use from a fixed seed (a second
or two on a CPU) and cached, so the demo and the tests run offline with the real pipeline: bitsandbytes NF4
layers, paged 8-bit AdamW and TRL's SFTTrainer.

The demo task is intent classification of short banking requests, written from templates below so that the
evaluation sentences are not in the training set; `scripts/make_tiny_data.py` writes the shipped files.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

TINY_MODEL_ID = "qlora/tiny-llama"
PROMPT_TEMPLATE = "Classify the banking request: {prompt}\nIntent:"

# A chat template with {% generation %} markers, so that transformers can mark assistant tokens too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

INTENTS: dict[str, list[str]] = {
    "lost_card": [
        "I lost my {card} {when}", "my {card} was stolen {when}", "I cannot find my {card} anywhere",
        "someone took my {card} {when}", "please block my {card}, it is gone", "my {card} went missing {when}",
    ],
    "balance": [
        "how much money is in my {account}", "what is the balance of my {account}",
        "show me my {account} balance", "tell me what is left in my {account}",
        "check the balance on my {account} please", "how much do I have in my {account} {when}",
    ],
    "transfer": [
        "send {amount} to {person}", "transfer {amount} to {person} {when}", "I want to move {amount} to {person}",
        "pay {person} {amount} from my {account}", "wire {amount} to {person} please",
        "make a transfer of {amount} to {person}",
    ],
    "refund": [
        "I want a refund for the {item}", "the {item} I returned was never refunded",
        "give me my money back for the {item}", "where is the refund for my {item}",
        "the shop owes me a refund for the {item}", "I returned the {item} {when} but got no refund",
    ],
    "change_pin": [
        "how do I change the pin of my {card}", "reset the pin on my {card}", "I forgot the pin for my {card}",
        "I need a new pin for my {card}", "can I pick a different pin for my {card}",
        "my {card} pin is blocked after wrong tries",
    ],
    "exchange_rate": [
        "what is the exchange rate for {currency}", "how many {currency} do I get for {amount}",
        "convert {amount} to {currency}", "what rate do you give for {currency} {when}",
        "is the {currency} rate good {when}", "how much is {amount} in {currency}",
    ],
}
SLOTS: dict[str, list[str]] = {
    "card": ["card", "debit card", "credit card", "visa card", "bank card", "travel card", "gold card",
             "business card", "student card", "virtual card"],
    "when": ["today", "yesterday", "last night", "this morning", "on friday", "last week"],
    "account": ["account", "savings account", "checking account", "joint account", "business account",
                "euro account", "current account", "pension account"],
    "amount": ["50 euros", "100 dollars", "20 pounds", "300 euros", "75 dollars", "1000 pounds"],
    "person": ["my mother", "john", "my landlord", "anna", "my brother", "the school"],
    "item": ["shoes", "jacket", "phone", "laptop", "ticket", "lamp"],
    "currency": ["dollars", "euros", "pounds", "yen", "francs", "pesos"],
}


def intent_examples(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Every sentence the templates can make, as {prompt, completion} rows per intent, shuffled with `seed`."""
    rng = random.Random(seed)
    by_intent = {}
    for intent, templates in INTENTS.items():
        rows = []
        for template in templates:
            names = [n for n in SLOTS if "{" + n + "}" in template]
            for values in itertools.product(*(SLOTS[n] for n in names)):
                text = template.format(**dict(zip(names, values)))
                rows.append({"prompt": text, "completion": " " + intent})
        rng.shuffle(rows)
        by_intent[intent] = rows
    return by_intent


def cache_dir() -> Path:
    """Where generated artefacts live: $QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora")


def tiny_model_dir() -> Path:
    return cache_dir() / "tiny-llama-v3"


def bpe_tokenizer(corpus: list[str], vocab_size: int, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `corpus` with the `tokenizers` library (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=chat_template, model_max_length=1 << 20,
    )


def build_tokenizer():
    """The tiny model's tokenizer: byte-level BPE (vocab <= 1024) trained on the demo task's vocabulary."""
    corpus = [PROMPT_TEMPLATE] + [r["prompt"] + r["completion"] for rows in intent_examples().values()
                                  for r in rows]
    corpus += [" ".join(words) for words in SLOTS.values()] + [" ".join(INTENTS)]
    corpus += ["Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request. ### Instruction: ### Input: ### Response: the quick brown fox jumps over the lazy dog"]
    tokenizer = bpe_tokenizer(corpus, 1024)
    tokenizer.model_max_length = 512
    return tokenizer


def tiny_config(vocab_size: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        # Wider than the usual 0.02 so that, like a pretrained model, the output head can give confident logits.
        initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def ensure_tiny_model(path: Path | None = None) -> Path:
    """Create the tiny model (weights + tokenizer) at `path` unless it is there; return the directory."""
    path = Path(path or tiny_model_dir())
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    import tempfile

    import torch
    from transformers import LlamaForCausalLM

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(), torch.device("cpu"):  # real weights, even inside a caller's meta context
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text("Random-weight tiny Llama made by qlora_cli.tiny for demos and tests.\n")
    try:
        tmp.rename(path)
    except OSError:  # made meanwhile by another process
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_demo_data(out_dir: Path, n_eval: int = 10, n_train: int = 50, seed: int = 0) -> None:
    """Write train.jsonl and eval.jsonl of the demo task: per intent, n_train and n_eval distinct sentences."""
    by_intent = intent_examples(seed)
    evals = [r for rows in by_intent.values() for r in rows[:n_eval]]
    trains = [r for rows in by_intent.values() for r in rows[n_eval:n_eval + n_train]]
    rng = random.Random(seed)
    rng.shuffle(evals)
    rng.shuffle(trains)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", evals), ("train", trains)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
