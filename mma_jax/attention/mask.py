"""The one mask representation (DESIGN.md §1) and its dense specification.

Per token, three int32 vectors describe every mask we support:
  segment_ids[t]  packed example of token t (0 = padding, its own segment)
  window_lo[t], window_hi[t]  an extra key window [lo, hi) that query t sees beyond causal

    allowed(i, j) = seg[i] == seg[j] and (j <= i or lo[i] <= j < hi[i])

`layout.py` decides the vectors; everything in attention/ only executes them.
"""
from __future__ import annotations

import jax.numpy as jnp


def allowed(q_pos, k_pos, q_segment, k_segment, q_lo, q_hi):
  """The visibility rule on broadcastable operands (numpy, jnp or in-kernel tiles)."""
  return (q_segment == k_segment) & ((k_pos <= q_pos) | ((q_lo <= k_pos) & (k_pos < q_hi)))


def materialize(segment_ids, window_lo, window_hi):
  """[B, L] int vectors -> bool[B, L, L] with mask[b, i, j] = allowed(i, j). The specification."""
  segment_ids, window_lo, window_hi = map(jnp.asarray, (segment_ids, window_lo, window_hi))
  length = segment_ids.shape[-1]
  pos = jnp.arange(length)
  return allowed(pos[:, None], pos[None, :],
                 segment_ids[..., :, None], segment_ids[..., None, :],
                 window_lo[..., :, None], window_hi[..., :, None])


def causal_vectors(segment_ids):
  """Windows that add nothing (lo = hi = 0): the plain causal mask within segments."""
  zeros = jnp.zeros_like(jnp.asarray(segment_ids))
  return zeros, zeros
