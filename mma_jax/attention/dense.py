"""XLA reference attention: the dense mask, f32 softmax, GQA. Runs everywhere (CPU tests, decode)."""
from __future__ import annotations

import jax.numpy as jnp

from mma_jax.attention.mask import materialize


def dense_attention(q, k, v, mask, *, scale: float | None = None):
  """q [B, Lq, H, D], k/v [B, Lk, K, D] with K dividing H, mask bool [B, Lq, Lk] -> [B, Lq, H, D].

  Scores and softmax are f32; the output has q's dtype. Rows with no allowed key give zeros
  (never an average of every key).
  """
  return _grouped_attention(q, k, v, mask, scale, kv="bskd")


def cached_attention(q, k_cache, v_cache, mask, *, scale: float):
  """Attention of new tokens over a KV cache stored heads-major: q [B, T, H, D], k_cache/v_cache
  [B, K, S, D], mask bool [B, T, S] -> [B, T, H, D]; same numerics as dense_attention.

  The heads-major cache makes both products plain batched matmuls over (B, K) on CPU; a
  [B, S, K, D] cache costs a transpose of every layer's cache per decoded token (2x slower)."""
  return _grouped_attention(q, k_cache, v_cache, mask, scale, kv="bksd")


def _grouped_attention(q, k, v, mask, scale, *, kv: str):
  """GQA attention with k/v laid out as `kv` (einsum letters b, s, k, d); q [B, Lq, H, D]."""
  b, lq, h, d = q.shape
  kv_heads = k.shape[kv.index("k")]
  if h % kv_heads:
    raise ValueError(f"kv heads ({kv_heads}) must divide query heads ({h})")
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, lq, kv_heads, h // kv_heads, d)
  scores = jnp.einsum(f"bqkgd,{kv}->bkgqs", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32) * scale, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum(f"bkgqs,{kv}->bqkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


def attend_dense(q, k, v, segment_ids, window_lo, window_hi, *, scale: float | None = None):
  """Self-attention over one sequence described by the three mask vectors ([B, L] each)."""
  return dense_attention(q, k, v, materialize(segment_ids, window_lo, window_hi), scale=scale)
