"""Connectors: vision features [B, N, E_vision] -> LLM input rows [B, T, E_llm].

`PerceiverResampler` is AKI's vision tokenizer with the official structure (sony/aki,
open_flamingo/src/helpers.py): learned latents cross-attend to [features ; latents] in every layer,
each layer being `latents += attn(norm_media(x), norm_latents(latents))` then
`latents += ff(latents)`; a final LayerNorm and a biased projection to the LLM width. The official
fused to_kv is held as separate k and v kernels here (split/fused by the key map). LayerNorms use
torch's default eps (1e-5), GELU is the exact erf form, and the softmax scale multiplies q.

`MLPProjector` is LLaVA's linear_1 -> act -> linear_2, one output row per feature row.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mma_jax.config import ConnectorConfig, LoraConfig, VisionConfig
from mma_jax.models.layers import DTYPES, LayerNorm, Linear, apply_stacked, param, stack_layers
from mma_jax.models.vision import ACTIVATIONS, full_attention
from mma_jax.models.lora import spec_for
from mma_jax.sharding import constrain


def _spec(lora: LoraConfig | None, name: str):
  return spec_for(lora, name, f"connector.{name}", connector=True)


class PerceiverAttention(nnx.Module):
  """Latents [B, T, E] attend to [features ; latents]; no biases on any projection."""

  def __init__(self, cfg: ConnectorConfig, dim: int, *, dtype, param_dtype,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=cfg.layer_norm_eps, axis="vision_embed", **kw)
    adapter = lambda name: dict(lora=_spec(lora, f"attn.{name}"))
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.norm_media = LayerNorm(dim, **norm)
    self.norm_latents = LayerNorm(dim, **norm)
    self.q = Linear(dim, inner, ("vision_embed", "connector_heads"), **adapter("q"), **kw)
    self.k = Linear(dim, inner, ("vision_embed", "connector_heads"), **adapter("k"), **kw)
    self.v = Linear(dim, inner, ("vision_embed", "connector_heads"), **adapter("v"), **kw)
    self.o = Linear(inner, dim, ("connector_heads", "vision_embed"), **adapter("o"), **kw)

  def __call__(self, features, latents):
    x, latents = self.norm_media(features), self.norm_latents(latents)
    kv_input = jnp.concatenate([x, latents], axis=1)
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
    out = full_attention(split(self.q(latents)), split(self.k(kv_input)), split(self.v(kv_input)),
                         scale=self.head_dim ** -0.5)
    return self.o(out.reshape(*out.shape[:2], -1))


class FeedForward(nnx.Module):
  """LayerNorm -> Linear up (no bias) -> exact GELU -> Linear down (no bias)."""

  def __init__(self, cfg: ConnectorConfig, dim: int, *, dtype, param_dtype,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=cfg.layer_norm_eps, axis="vision_embed", **kw)
    self.up = Linear(dim, dim * cfg.ff_mult, ("vision_embed", "connector_mlp"),
                     lora=_spec(lora, "ff.up"), **kw)
    self.down = Linear(dim * cfg.ff_mult, dim, ("connector_mlp", "vision_embed"),
                       lora=_spec(lora, "ff.down"), **kw)

  def __call__(self, x):
    return self.down(ACTIVATIONS["gelu"](self.up(self.norm(x))))


class PerceiverLayer(nnx.Module):
  def __init__(self, cfg: ConnectorConfig, dim: int, *, dtype, param_dtype,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
    self.attn = PerceiverAttention(cfg, dim, **kw)
    self.ff = FeedForward(cfg, dim, **kw)

  def __call__(self, features, latents):
    # The residual adds the un-normalised latents: attn normalises its own inputs.
    features = constrain(features, ("batch", None, None))
    latents = constrain(latents, ("batch", None, None))
    latents = latents + self.attn(features, latents)
    return latents + self.ff(latents)


class PerceiverResampler(nnx.Module):
  """features [B, N, vision_dim] -> [B, num_latents, llm_dim]."""

  def __init__(self, cfg: ConnectorConfig, vision_dim: int, llm_dim: int, *,
               dtype: str = "float32", param_dtype: str = "float32", scan_layers: bool = False,
               remat: str = "none", lora: LoraConfig | None = None, rngs: nnx.Rngs):
    self.cfg, self.scan_layers, self.remat = cfg, scan_layers, remat
    kw = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype])
    self.dtype = kw["dtype"]
    # The official init is randn (std 1).
    self.latents = param(rngs, nnx.initializers.normal(1.0), (cfg.num_latents, vision_dim),
                         (None, "vision_embed"), kw["param_dtype"])
    self.layers = stack_layers(lambda r: PerceiverLayer(cfg, vision_dim, lora=lora, rngs=r, **kw),
                               cfg.depth, rngs)
    self.norm = LayerNorm(vision_dim, eps=cfg.layer_norm_eps, axis="vision_embed", rngs=rngs, **kw)
    self.projection = Linear(vision_dim, llm_dim, ("vision_embed", "embed"), use_bias=True,
                             lora=_spec(lora, "projection"), rngs=rngs, **kw)

  def __call__(self, features):
    features = features.astype(self.dtype)
    latents = jnp.broadcast_to(self.latents[...].astype(self.dtype),
                               (features.shape[0], *self.latents.shape))
    latents = apply_stacked(self.layers, latents, lambda layer, h: layer(features, h),
                            num_layers=self.cfg.depth, scan=self.scan_layers,
                            remat=self.remat)
    return self.projection(self.norm(latents))


class MLPProjector(nnx.Module):
  """LLaVA: features [B, N, vision_dim] -> linear_1 -> act -> linear_2 -> [B, N, llm_dim]."""

  def __init__(self, cfg: ConnectorConfig, vision_dim: int, llm_dim: int, *,
               dtype: str = "float32", param_dtype: str = "float32",
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype],
              rngs=rngs)
    self.act = ACTIVATIONS[cfg.mlp_act]
    self.linear_1 = Linear(vision_dim, llm_dim, ("vision_embed", "connector_mlp"),
                           lora=_spec(lora, "linear_1"), **kw)
    self.linear_2 = Linear(llm_dim, llm_dim, ("connector_mlp", "embed"),
                           lora=_spec(lora, "linear_2"), **kw)

  def __call__(self, features):
    return self.linear_2(self.act(self.linear_1(features)))


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, *,
                    dtype: str = "float32", param_dtype: str = "float32",
                    scan_layers: bool = False, remat: str = "none",
                    lora: LoraConfig | None = None, rngs: nnx.Rngs) -> nnx.Module:
  """lora: adapters on every projection when lora.connector is set."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
  if cfg.type == "perceiver":
    return PerceiverResampler(cfg, vision_dim, llm_dim, scan_layers=scan_layers, remat=remat,
                              **kw)
  return MLPProjector(cfg, vision_dim, llm_dim, **kw)


def tokens_per_image(connector: ConnectorConfig, vision: VisionConfig) -> int:
  """How many LLM rows one image becomes (what each `<image>` placeholder expands to)."""
  return connector.num_latents if connector.type == "perceiver" else vision.num_features
