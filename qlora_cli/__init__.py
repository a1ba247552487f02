"""qlora: fine-tune large language models with QLoRA from a YAML recipe."""

import os

__version__ = "0.1.0"

# transformers 5.25 replaces layers with kernels it downloads from the Hugging Face Hub at every model load, unless
# told not to: offline (on CUDA) the load fails, and online the replaced layers are not the ones qlora compiles and
# measures. qlora loads models as transformers up to 5.24 did; USE_HUB_KERNELS=YES in the environment opts back in.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
