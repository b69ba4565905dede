"""ViT image towers: SigLIP and CLIP, as HF's SiglipVisionModel / CLIPVisionModel compute them.

The two families share pre-LN encoder blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP
-> residual) with biased q/k/v/o and fc1/fc2. They differ only in the stem: SigLIP has a biased
patch conv and no CLS token; CLIP has a bias-free patch conv, a CLS token and a LayerNorm before
the first block ("pre_layrnorm" in HF). Which hidden state leaves the tower (layer, post-norm,
CLS dropped) is `VisionConfig` data, so AKI's and LLaVA's choices are the same code.

Images come in as [B, H, W, C] float (already normalised); features go out as [B, N, E].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mma_jax.attention.dense import dense_attention
from mma_jax.config import VisionConfig
from mma_jax.models.layers import DTYPES, LayerNorm, Linear, apply_stacked, param, stack_layers
from mma_jax.sharding import constrain


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions (gelu_pytorch_tanh is the tanh approximation).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


def full_attention(q, k, v, *, scale: float):
  """Unmasked multi-head attention: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

  The scale is applied to q (as the official Perceiver does); the softmax runs in f32."""
  mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), dtype=bool)
  return dense_attention(q * jnp.asarray(scale, q.dtype), k, v, mask, scale=1.0)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> E, i.e. HF's stride-p Conv2d, as one einsum.

  kernel [p, p, C, E] (HF's conv weight [E, C, p, p] transposed), patches read row-major so the
  token order matches HF's flatten(2) of the conv output. Like the conv ("valid" padding), pixels
  past the last whole patch are dropped (so400m: 384 = 27 * 14 + 6)."""

  def __init__(self, cfg: VisionConfig, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    p, c, e = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    self.patch_size, self.dtype = p, dtype
    self.kernel = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, e), (None, None, None, "vision_embed"), param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (e,), ("vision_embed",), param_dtype)
                 if use_bias else None)

  def __call__(self, images):
    b, h, w, c = images.shape
    p = self.patch_size
    rows, cols = h // p, w // p
    patches = images[:, :rows * p, :cols * p].reshape(b, rows, p, cols, p, c).astype(self.dtype)
    x = jnp.einsum("byixjc,ijce->byxe", patches, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      x = x + self.bias[...].astype(self.dtype)
    return x.reshape(b, rows * cols, -1)


class VisionAttention(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e = cfg.hidden_size
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.head_dim = cfg.num_heads, e // cfg.num_heads
    self.q = Linear(e, e, ("vision_embed", "vision_heads"), **kw)
    self.k = Linear(e, e, ("vision_embed", "vision_heads"), **kw)
    self.v = Linear(e, e, ("vision_embed", "vision_heads"), **kw)
    self.o = Linear(e, e, ("vision_heads", "vision_embed"), **kw)

  def __call__(self, x):
    b, n, e = x.shape
    split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
    out = full_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                         scale=self.head_dim ** -0.5)
    return self.o(out.reshape(b, n, e))


class VisionMLP(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
    self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=cfg.layer_norm_eps, axis="vision_embed", **kw)
    self.attn_norm = LayerNorm(cfg.hidden_size, **norm)
    self.attn = VisionAttention(cfg, **kw)
    self.mlp_norm = LayerNorm(cfg.hidden_size, **norm)
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x):
    x = constrain(x, ("batch", None, None))
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class VisionTower(nnx.Module):
  """images [B, H, W, C] -> selected features [B, cfg.num_features, E_vision]."""

  def __init__(self, cfg: VisionConfig, *, dtype: str = "float32", param_dtype: str = "float32",
               scan_layers: bool = False, remat: str = "none", rngs: nnx.Rngs):
    self.cfg, self.scan_layers, self.remat = cfg, scan_layers, remat
    kw = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype])
    e, clip = cfg.hidden_size, cfg.family == "clip"
    norm = dict(eps=cfg.layer_norm_eps, axis="vision_embed", rngs=rngs, **kw)
    self.dtype = kw["dtype"]
    self.patch_embed = PatchEmbed(cfg, use_bias=not clip, rngs=rngs, **kw)
    self.cls_token = (param(rngs, nnx.initializers.normal(e ** -0.5), (e,), ("vision_embed",),
                            kw["param_dtype"]) if clip else None)
    self.position_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.num_positions, e),
                                    (None, "vision_embed"), kw["param_dtype"])
    self.pre_norm = LayerNorm(e, **norm) if clip else None
    self.layers = stack_layers(lambda r: EncoderLayer(cfg, rngs=r, **kw), cfg.num_layers, rngs)
    # Kept for every family so checkpoints round-trip, even when features skip it.
    self.post_norm = LayerNorm(e, **norm)

  def __call__(self, images):
    cfg = self.cfg
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"vision tower expects images [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}], got {tuple(images.shape)}")
    x = self.patch_embed(images)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embedding[...].astype(self.dtype)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = apply_stacked(self.layers, x, lambda layer, h: layer(h), num_layers=cfg.layers_to_run,
                      scan=self.scan_layers, remat=self.remat)
    if cfg.post_norm:
      x = self.post_norm(x)
    if cfg.drop_cls:
      x = x[:, 1:]
    return x
