"""Models: decoder LLMs (llm.py) and the shared building blocks (layers.py)."""
from __future__ import annotations

from flax import nnx

from mma_jax.config import Config
from mma_jax.models.llm import DecoderLLM


def build_model(config: Config, rngs: nnx.Rngs) -> nnx.Module:
  """The model a config describes, with its attention impl, dtypes and layer scanning."""
  m = config.model
  return DecoderLLM(m.llm, impl=config.attention.impl, dtype=m.dtype, param_dtype=m.param_dtype,
                    scan_layers=m.scan_layers, rngs=rngs)
