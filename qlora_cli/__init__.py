"""qlora: fine-tune large language models with QLoRA from a YAML recipe."""

__version__ = "0.1.0"
