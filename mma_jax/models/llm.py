"""Decoder-only LLMs: llama (1/2/3/3.x), qwen2 (qkv bias), phi3 (Phi-3/3.5, longrope).

The three families share one architecture: pre-norm RMSNorm blocks, GQA attention with rotary
embeddings (HF's rotate_half layout, so HF weights load without permutation), SwiGLU MLP. They
differ only in config (qkv bias, tied embeddings, rope scaling); Phi-3's fused projections are
split at conversion time. Attention sees the batch contract's mask vectors through `attend`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mma_jax.attention import attend, cached_attention, materialize
from mma_jax.config import LLMConfig, LoraConfig, RopeConfig
from mma_jax.models.layers import (DTYPES, Embed, Linear, RMSNorm, apply_stacked, param,
                                   scan_stacked, stack_layers, stacked_layer)
from mma_jax.models.lora import spec_for
from mma_jax.sharding import constrain


# ---------------------------------------------------------------------------------------- rotary
def inverse_frequencies(rope: RopeConfig, head_dim: int, max_positions: int
                        ) -> tuple[np.ndarray, np.ndarray | None, float]:
  """(inv_freq, long inv_freq or None, cos/sin scale) as HF computes them, in numpy (static)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
  base = rope.theta ** exponents
  inv = (1.0 / base).astype(np.float32)
  if rope.type == "linear":
    return inv / rope.factor, None, 1.0
  if rope.type == "llama3":
    old = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), None, 1.0
  if rope.type == "longrope":
    original = rope.original_max_position_embeddings
    factor = max_positions / original
    scale = rope.attention_factor
    if scale is None:
      scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = (1.0 / (np.asarray(rope.short_factor, np.float32) * base)).astype(np.float32)
    long = (1.0 / (np.asarray(rope.long_factor, np.float32) * base)).astype(np.float32)
    return short, long, float(scale)
  return inv, None, 1.0


def rotary_tables(cfg: LLMConfig, positions):
  """positions [B, L] -> (cos, sin) [B, L, D] in f32.

  longrope switches to the long factors when the batch reaches past the original context
  (HF decides from max(position) + 1, per batch; so do we)."""
  inv, long_inv, scale = inverse_frequencies(cfg.rope, cfg.dim_per_head, cfg.max_position_embeddings)
  pos = positions.astype(jnp.float32)[..., None]
  freqs = pos * jnp.asarray(inv)
  if long_inv is not None:
    use_long = jnp.max(positions) + 1 > cfg.rope.original_max_position_embeddings
    freqs = jnp.where(use_long, pos * jnp.asarray(long_inv), freqs)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rotary(x, cos, sin):
  """x [B, L, N, D]; HF rotate_half convention (first half pairs with second half)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# ---------------------------------------------------------------------------------------- blocks
class Attention(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, impl: str, blocks: tuple[int, int], dtype, param_dtype,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    adapter = lambda name: dict(lora=spec_for(lora, name, f"llm.attn.{name}"))
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
    self.impl, self.blocks = impl, blocks
    self.q = Linear(e, h * d, ("embed", "heads"), use_bias=cfg.qkv_bias, **adapter("q"), **kw)
    self.k = Linear(e, k * d, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **adapter("k"), **kw)
    self.v = Linear(e, k * d, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **adapter("v"), **kw)
    self.o = Linear(h * d, e, ("heads", "embed"), **adapter("o"), **kw)

  def __call__(self, x, cos, sin, segment_ids, window_lo, window_hi):
    return self.prefill(x, cos, sin, segment_ids, window_lo, window_hi)[0]

  def prefill(self, x, cos, sin, segment_ids, window_lo, window_hi):
    """Self-attention under the mask vectors -> (output, (k, v)); the rotated keys and values
    [B, L, K, D] are what a KV cache keeps."""
    q, k, v = self._project(x, cos, sin)
    out = attend(q, k, v, segment_ids, window_lo, window_hi, impl=self.impl,
                 scale=self.head_dim ** -0.5, block_q=self.blocks[0], block_kv=self.blocks[1])
    return self._output(out), (k, v)

  def decode(self, x, cos, sin, cache, key_valid, index, layer):
    """x [B, T, E]: new tokens written to slots [index, index + T) of layer `layer` of the stacked
    cache = (k, v) [layers, B, K, S, D], which is updated in place and returned. Key s is visible
    to new token t iff key_valid[b, s] (the prompt's non-padding slots and every slot written
    since) and s <= index + t (causal among the new tokens). T is 1 in generation."""
    q, k, v = self._project(x, cos, sin)
    at = (layer, 0, 0, index, 0)
    cache_k, cache_v = (jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2)[None].astype(c.dtype),
                                                     at) for c, new in zip(cache, (k, v)))
    slots = jnp.arange(cache_k.shape[3])
    causal = slots[None, :] <= index + jnp.arange(x.shape[1])[:, None]          # [T, S]
    mask = key_valid[:, None, :] & causal[None]                                 # [B, T, S]
    out = cached_attention(q, cache_k[layer], cache_v[layer], mask,
                           scale=self.head_dim ** -0.5)
    return self._output(out), (cache_k, cache_v)

  def probabilities(self, x, cos, sin, segment_ids, window_lo, window_hi):
    """Analysis only (never on the training path): the softmax attention probabilities f32
    [B, H, L, L] this layer uses, under the dense mask `materialize` gives (the same scores,
    scale and GQA grouping as dense_attention; probabilities @ v is its output). Rows sum to 1
    over the allowed keys and are exactly 0 elsewhere; no row is empty (a token sees itself)."""
    q, k, _ = self._project(x, cos, sin)
    k = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)    # head h reads kv h // group
    scores = jnp.einsum("bqhd,bshd->bhqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * self.head_dim ** -0.5
    mask = materialize(segment_ids, window_lo, window_hi)[:, None]
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)

  def _project(self, x, cos, sin):
    b, length, _ = x.shape
    q = self.q(x).reshape(b, length, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

  def _output(self, out):
    b, length = out.shape[:2]
    return self.o(out.reshape(b, length, self.num_heads * self.head_dim))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, lora: LoraConfig | None = None,
               rngs: nnx.Rngs):
    e, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    adapter = lambda name: dict(lora=spec_for(lora, name, f"llm.mlp.{name}"))
    self.gate = Linear(e, f, ("embed", "mlp"), **adapter("gate"), **kw)
    self.up = Linear(e, f, ("embed", "mlp"), **adapter("up"), **kw)
    self.down = Linear(f, e, ("mlp", "embed"), **adapter("down"), **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, impl: str, blocks: tuple[int, int], dtype, param_dtype,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.attn = Attention(cfg, impl=impl, blocks=blocks, lora=lora, **kw)
    self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, lora=lora, **kw)

  def __call__(self, x, cos, sin, segment_ids, window_lo, window_hi):
    x = constrain(x, ("batch", None, None))
    x = x + self.attn(self.attn_norm(x), cos, sin, segment_ids, window_lo, window_hi)
    return x + self.mlp(self.mlp_norm(x))

  def prefill(self, x, cos, sin, segment_ids, window_lo, window_hi):
    """(output, this layer's (k, v)) for the cache."""
    h, kv = self.attn.prefill(self.attn_norm(x), cos, sin, segment_ids, window_lo, window_hi)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv

  def decode(self, x, cos, sin, cache, key_valid, index, layer):
    """(output, the stacked (k, v) cache with this layer's slots written); see Attention.decode."""
    h, cache = self.attn.decode(self.attn_norm(x), cos, sin, cache, key_valid, index, layer)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class DecoderLLM(nnx.Module):
  """tokens or input embeddings + the mask vectors -> f32 logits [B, L, V].

  impl/blocks: the attention implementation and its (block_q, block_kv) tiles (flash).
  lora: adapters on the projections model.lora.targets names (None or rank 0: none)."""

  def __init__(self, cfg: LLMConfig, *, impl: str = "auto", blocks: tuple[int, int] = (128, 128),
               dtype: str = "float32", param_dtype: str = "float32", scan_layers: bool = False,
               remat: str = "none", lora: LoraConfig | None = None, rngs: nnx.Rngs):
    self.cfg, self.scan_layers, self.remat = cfg, scan_layers, remat
    kw = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype])
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
    self.layers = stack_layers(
        lambda r: DecoderLayer(cfg, impl=impl, blocks=tuple(blocks), lora=lora, rngs=r, **kw),
        cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, **kw))
    # AKI's head has a bias (HF LLMs' have none). It is its own parameter, not the Linear's, so
    # that tied and untied heads add it alike, in f32 after the matmul: a trained bias of size
    # ~1 would lose its low bits to a bf16 addition.
    self.head_bias = (param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                            DTYPES[param_dtype]) if cfg.head_bias else None)

  def embed_tokens(self, tokens):
    return self.embed(tokens)

  def __call__(self, *, positions, segment_ids, window_lo, window_hi, tokens=None,
               embeddings=None):
    return self.logits(self.hidden(positions=positions, segment_ids=segment_ids,
                                   window_lo=window_lo, window_hi=window_hi, tokens=tokens,
                                   embeddings=embeddings))

  def hidden(self, *, positions, segment_ids, window_lo, window_hi, tokens=None, embeddings=None,
             **unused):
    """The final normalised hidden states [B, L, E] (the head's input). Other batch-contract
    fields (targets, loss_mask, images of a text-only model, ...) are ignored."""
    x = self._inputs(tokens, embeddings, x_length=None)
    cos, sin = rotary_tables(self.cfg, positions)

    def step(layer, h):
      return layer(h, cos, sin, segment_ids, window_lo, window_hi)

    x = apply_stacked(self.layers, x, step, num_layers=self.cfg.num_layers, scan=self.scan_layers,
                      remat=self.remat)
    return self.norm(x)

  # ------------------------------------------------------------------- attention maps (analysis)
  def attention_probs(self, layer: int, *, positions, segment_ids, window_lo, window_hi,
                      tokens=None, embeddings=None, **unused):
    """Decoder layer `layer`'s attention probabilities f32 [B, H, L, L] (query, key) on the
    batch: layers 0..layer-1 run exactly as in `hidden`, then Attention.probabilities on the
    layer's normed input. For visualisation (mma_jax.visualize); training never calls it."""
    if not 0 <= layer < self.cfg.num_layers:
      raise ValueError(f"layer {layer} is out of range: the decoder has {self.cfg.num_layers} "
                       f"layers (0..{self.cfg.num_layers - 1})")
    x = self._inputs(tokens, embeddings, x_length=None)
    cos, sin = rotary_tables(self.cfg, positions)

    def step(block, h):
      return block(h, cos, sin, segment_ids, window_lo, window_hi)

    x = apply_stacked(self.layers, x, step, num_layers=layer, scan=self.scan_layers)
    block = stacked_layer(self.layers, layer)
    return block.attn.probabilities(block.attn_norm(x), cos, sin, segment_ids, window_lo,
                                    window_hi)

  # ------------------------------------------------------------------------------- KV cache
  # cache = {"k", "v": [layers, B, K, S, D] rotated keys/values, stacked like the layers and
  #          heads-major (see cached_attention); "valid": bool [B, S], the slots a new token may
  #          see (filled, non-padding); "index": int32 [], the next slot to write}.
  # One example per row: validity replaces segment ids after the prompt. Decoding carries the
  # whole cache through the layer loop and writes only the new slots (dynamic_update_slice in
  # place): passing each layer's slice in and stacking the outputs would copy the cache per token.

  def prefill(self, *, positions, segment_ids, window_lo, window_hi, cache_length: int,
              tokens=None, embeddings=None, **unused):
    """The prompt [B, L] under its mask vectors (the MMA windows included) -> (final hidden
    [B, L, E], a cache of `cache_length` slots holding the prompt in slots [0, L)). Padding
    (segment 0) is never visible to later tokens."""
    x = self._inputs(tokens, embeddings, x_length=cache_length)
    length = x.shape[1]
    if cache_length < length:
      raise ValueError(f"cache_length {cache_length} is shorter than the prompt ({length})")
    cos, sin = rotary_tables(self.cfg, positions)

    def step(layer, h, _):
      return layer.prefill(h, cos, sin, segment_ids, window_lo, window_hi)

    x, (k, v) = scan_stacked(self.layers, x, step, num_layers=self.cfg.num_layers,
                             scan=self.scan_layers)
    grow = ((0, 0), (0, 0), (0, 0), (0, cache_length - length), (0, 0))
    cache = {"k": jnp.pad(k.swapaxes(2, 3), grow), "v": jnp.pad(v.swapaxes(2, 3), grow),
             "valid": jnp.pad(segment_ids > 0, ((0, 0), (0, cache_length - length))),
             "index": jnp.asarray(length, jnp.int32)}
    return self.norm(x), cache

  def decode_step(self, *, positions, cache, tokens=None, embeddings=None, layers=None):
    """New tokens [B, T] (T = 1 when generating) at their RoPE `positions` [B, T], attending to
    the cache causally -> (final hidden [B, T, E], the cache with them written). `layers`: this
    model's layers as `unstack` gives them, taken once outside a decode loop (else self.layers)."""
    x = self._inputs(tokens, embeddings, x_length=None)
    b, count = x.shape[:2]
    index = cache["index"]
    valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((b, count), bool), (0, index))
    cos, sin = rotary_tables(self.cfg, positions)

    def step(layer, carry, i):
      h, kv = carry
      return layer.decode(h, cos, sin, kv, valid, index, i), None

    count_layers = self.cfg.num_layers
    (x, (k, v)), _ = scan_stacked(self.layers if layers is None else layers,
                                  (x, (cache["k"], cache["v"])), step, jnp.arange(count_layers),
                                  num_layers=count_layers, scan=self.scan_layers)
    return self.norm(x), {"k": k, "v": v, "valid": valid, "index": index + count}

  def _inputs(self, tokens, embeddings, *, x_length):
    """The input embeddings; `x_length` (the cache length) is what must fit the window."""
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens or embeddings")
    x = self.embed_tokens(tokens) if embeddings is None else embeddings.astype(self.embed.dtype)
    window, length = self.cfg.sliding_window, x_length or x.shape[1]
    if window and length > window:
      # Exact for sequences inside the window; windowed attention itself is not implemented.
      raise ValueError(f"sequence length {length} exceeds the model's sliding_window={window}")
    return x

  def logits(self, hidden):
    """hidden [..., E] -> f32 logits [..., V] (+ the head bias); training calls it on answer
    positions only, generation on the last one: every path to logits comes here."""
    logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    logits = logits.astype(jnp.float32)
    if self.head_bias is not None:
      logits = logits + self.head_bias[...].astype(jnp.float32)
    return logits
