"""hybridvlm: hybrid (Mamba-2 + attention) video VLMs in JAX/Flax NNX.

Public API:
  from_pretrained(path, dtype=None, *, mesh=None, **overrides) -> NemotronHForCausalLM | NemotronHVLModel
      (an HF or hybridvlm checkpoint directory; `mesh` places every tensor on its shards)
  export_hf(model, directory, *, dtype=None, ...) -> files written (an HF directory transformers loads)
  NemotronHForCausalLM(config, rngs=..., dtype=...)
  LMConfig, load_tokenizer, generate
"""

from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.generate import generate
from hybridvlm.hf_export import export_hf
from hybridvlm.hf_import import CheckpointError
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.loading import from_pretrained
from hybridvlm.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LMConfig",
    "NemotronHForCausalLM",
    "export_hf",
    "from_pretrained",
    "generate",
    "load_tokenizer",
]
__version__ = "0.1.0"
