"""Models: decoder LLMs (llm.py), vision towers, connectors, the MultimodalDecoder (mllm.py)."""
from __future__ import annotations

from flax import nnx

from mma_jax.config import Config
from mma_jax.sharding import make_mesh
from mma_jax.models.llm import DecoderLLM
from mma_jax.models.mllm import MultimodalDecoder
from mma_jax.models.vision import VisionTower


def build_model(config: Config, rngs: nnx.Rngs) -> nnx.Module:
  """The model a config describes, with its attention impl, dtypes, layer scanning and remat."""
  m, a = config.model, config.attention
  blocks = (a.block_q, a.block_kv)
  if m.kind == "mllm":
    return MultimodalDecoder(m, impl=a.impl, blocks=blocks, rngs=rngs)
  if m.kind == "vision":
    return VisionTower(m.vision, dtype=m.dtype, param_dtype=m.param_dtype,
                       scan_layers=m.scan_layers, remat=m.remat, rngs=rngs)
  return DecoderLLM(m.llm, impl=a.impl, blocks=blocks, dtype=m.dtype, param_dtype=m.param_dtype,
                    scan_layers=m.scan_layers, remat=m.remat, lora=m.lora, rngs=rngs)


def model_mesh(config: Config, devices=None):
  """The config's mesh over `devices` (default: all), FSDP split for this model's weights."""
  abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return make_mesh(config.mesh, devices, params=nnx.state(abstract))
