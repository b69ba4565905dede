"""The one mask representation (DESIGN.md §1) and its dense specification.

Per token, three int32 vectors describe every mask we support:
  segment_ids[t]  packed example of token t (0 = padding, its own segment)
  window_lo[t], window_hi[t]  an extra key window [lo, hi) that query t sees beyond causal

    allowed(i, j) = seg[i] == seg[j] and (j <= i or lo[i] <= j < hi[i])

`layout.py` decides the vectors; everything in attention/ only executes them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


# ---------------------------------------------------------------------------------------------
# Block schedules: which kv blocks each q block needs (and, transposed, which q blocks each kv
# block needs). A blocked kernel visits only these tiles of the L x L score matrix.
#
# A q block needs the union of two ranges of kv blocks:
#   causal  [first segment start of its rows, its last row]
#   window  [min window_lo, max window_hi) over its rows whose window is not empty
# Each range is an interval of blocks, so a schedule row is at most two intervals, stored as
# int32 (start1, count1, start2, count): step s visits block start1 + s for s < count1, else
# start2 + s - count1; steps s >= count repeat the last block and do no work.
# ---------------------------------------------------------------------------------------------

SCHEDULE_FIELDS = 4  # start1, count1, start2, count


def segment_starts(segment_ids):
  """[B, L] -> [B, L]: the first position of each token's segment id (O(L) per example).

  Ids are hashed modulo L + 1 into a scatter-min table; a collision (ids beyond L) only moves a
  start earlier, which widens a schedule but never drops a needed block. Ids need not be
  contiguous runs: a segment that reappears later still starts at its first token.
  """
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  batch, length = segment_ids.shape
  slot = jnp.remainder(segment_ids, length + 1)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  first = jnp.full((batch, length + 1), length, jnp.int32)
  first = first.at[jnp.arange(batch)[:, None], slot].min(positions)
  return jnp.take_along_axis(first, slot, axis=1)


def _q_block_ranges(segment_ids, window_lo, window_hi, block_q, block_kv):
  """Per q block, its causal and window kv-block ranges (inclusive; empty when lo > hi).

  Returns four [B, nq] int32 arrays. The causal lower bound is made non-decreasing over q blocks
  (a suffix minimum; a no-op for contiguous segments) so the transposed sets stay intervals.
  """
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  batch, length = segment_ids.shape
  if length % block_q or length % block_kv:
    raise ValueError(f"length {length} must be a multiple of block_q {block_q} and "
                     f"block_kv {block_kv} (pad first)")
  n_q = length // block_q
  starts = segment_starts(segment_ids).reshape(batch, n_q, block_q).min(axis=-1)
  starts = jnp.flip(jax.lax.cummin(jnp.flip(starts, 1), axis=1), 1)
  last_rows = jnp.arange(1, n_q + 1, dtype=jnp.int32) * block_q - 1
  causal_lo = starts // block_kv
  causal_hi = jnp.broadcast_to(last_rows // block_kv, (batch, n_q))

  lo = jnp.clip(jnp.asarray(window_lo, jnp.int32), 0, length)
  hi = jnp.clip(jnp.asarray(window_hi, jnp.int32), 0, length)
  has_window = lo < hi
  lo = jnp.where(has_window, lo, length).reshape(batch, n_q, block_q).min(axis=-1)
  hi = jnp.where(has_window, hi, 0).reshape(batch, n_q, block_q).max(axis=-1)
  any_window = lo < hi
  window_lo_blk = jnp.where(any_window, lo // block_kv, 1)
  window_hi_blk = jnp.where(any_window, (hi - 1) // block_kv, 0)
  return causal_lo, causal_hi, window_lo_blk, window_hi_blk


def _union_of_intervals(a_lo, a_hi, b_lo, b_hi):
  """Two inclusive block intervals (either may be empty: lo > hi) -> [..., 4] schedule rows."""
  a_empty, b_empty = a_lo > a_hi, b_lo > b_hi
  b_first = ~b_empty & (a_empty | (b_lo < a_lo))
  first_lo, first_hi = jnp.where(b_first, b_lo, a_lo), jnp.where(b_first, b_hi, a_hi)
  second_lo, second_hi = jnp.where(b_first, a_lo, b_lo), jnp.where(b_first, a_hi, b_hi)
  first_empty = first_lo > first_hi
  second_empty = (second_lo > second_hi) | first_empty
  touching = ~second_empty & (second_lo <= first_hi + 1)  # overlapping or adjacent: merge
  count1 = jnp.where(first_empty, 0,
                     jnp.where(touching, jnp.maximum(first_hi, second_hi), first_hi) - first_lo + 1)
  count2 = jnp.where(second_empty | touching, 0, second_hi - second_lo + 1)
  start1 = jnp.where(first_empty, 0, first_lo)
  start2 = jnp.where(count2 > 0, second_lo, start1)
  return jnp.stack([start1, count1, start2, count1 + count2], axis=-1).astype(jnp.int32)


def forward_schedule(segment_ids, window_lo, window_hi, block_q, block_kv):
  """[B, L] vectors (L a multiple of both blocks) -> int32 [B, L // block_q, 4]: the kv blocks
  each q block visits (forward and dq kernels)."""
  return _union_of_intervals(*_q_block_ranges(segment_ids, window_lo, window_hi,
                                              block_q, block_kv))


def backward_schedule(segment_ids, window_lo, window_hi, block_q, block_kv):
  """[B, L] vectors -> int32 [B, L // block_kv, 4]: the q blocks each kv block is visited by
  (dkv kernel). The transpose of the forward ranges: the causal part exactly (an interval, as both
  causal bounds are non-decreasing in the q block), the window part as the interval spanning every
  q block whose window covers the kv block. Work is O(nq * nk) per example on block indices."""
  causal_lo, causal_hi, window_lo_blk, window_hi_blk = _q_block_ranges(
      segment_ids, window_lo, window_hi, block_q, block_kv)
  n_q, n_kv = causal_lo.shape[1], jnp.asarray(segment_ids).shape[1] // block_kv
  kv = jnp.arange(n_kv, dtype=jnp.int32)[None, None, :]
  q = jnp.arange(n_q, dtype=jnp.int32)[None, :, None]

  def q_span(covers):  # [B, nq, nk] bool -> inclusive q-block interval per kv block
    return (jnp.where(covers, q, n_q).min(axis=1), jnp.where(covers, q, -1).max(axis=1))

  causal = q_span((causal_lo[..., None] <= kv) & (kv <= causal_hi[..., None]))
  window = q_span((window_lo_blk[..., None] <= kv) & (kv <= window_hi_blk[..., None]))
  return _union_of_intervals(*causal, *window)


def schedule_blocks(schedule, n_other):
  """Schedule [B, n, 4] -> bool [B, n, n_other]: which (row block, other block) pairs it visits.
  numpy; for tests and benchmarks."""
  schedule = np.asarray(schedule)
  steps = np.arange(n_other)
  start1, count1, start2, count = (schedule[..., f, None] for f in range(SCHEDULE_FIELDS))
  blocks = np.where(steps < count1, start1 + steps, start2 + steps - count1)
  visited = np.zeros(schedule.shape[:2] + (n_other,), bool)
  b, r, s = np.nonzero(steps < count)
  visited[b, r, blocks[b, r, s]] = True
  return visited


def count_visited(schedule) -> int:
  """Number of (q block, kv block) tiles a schedule visits, summed over the batch (per head)."""
  return int(np.asarray(schedule)[..., 3].sum())


def needed_blocks(segment_ids, window_lo, window_hi, block_q, block_kv):
  """bool [B, nq, nk]: tiles holding at least one allowed pair -- the exact minimum any blocked
  kernel must visit. Materializes the L x L mask: for tests and benchmarks only."""
  mask = np.asarray(jax.jit(materialize)(segment_ids, window_lo, window_hi))
  batch, length, _ = mask.shape
  return mask.reshape(batch, length // block_q, block_q,
                      length // block_kv, block_kv).any(axis=(2, 4))
