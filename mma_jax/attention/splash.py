"""jax's stock splash attention with an MMA mask: the baseline for static layouts.

Splash builds its block tables on the host from a mask object, so the windows must be the same
for every example and known at trace time: an image at a fixed offset whose window (the question
slot up to the assistant header) has a fixed size. Segment ids stay traced and carry padding and
packing. flash.py has no such limit (its tables come from the per-token vectors on device);
splash is what it is measured against. Splash has no softmax scale, so q is scaled here.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

LANES = 128
PAD_SEGMENT = int(np.iinfo(np.int32).min)  # segment id of internal padding: matches nothing real

Window = tuple[int, int, int, int]  # rows [row_start, row_end) also see keys [key_start, key_end)


class MMAMask(splash_mask._ComputableMask):
  """Causal plus static windows; computed in the kernel from q/kv position tiles.

  The mask function works on numpy (splash's host-side block analysis) and on in-kernel jnp tiles
  alike: it only compares positions with Python ints.
  """

  def __init__(self, shape: tuple[int, int], windows: tuple[Window, ...], shard_count: int = 1):
    self.windows = tuple(tuple(int(x) for x in w) for w in windows)

    def mask_function(q_ids, kv_ids):
      keep = kv_ids <= q_ids
      for row_start, row_end, key_start, key_end in self.windows:
        keep = keep | ((q_ids >= row_start) & (q_ids < row_end) &
                       (kv_ids >= key_start) & (kv_ids < key_end))
      return keep

    super().__init__(shape=shape, mask_function=mask_function, shard_count=shard_count)

  def __eq__(self, other):
    return (type(other) is type(self) and self.shape == other.shape
            and self.windows == other.windows
            and np.array_equal(self.q_sequence, other.q_sequence))

  def __hash__(self):
    return hash((type(self), self.shape, self.windows, self.q_sequence.tobytes()))


@dataclasses.dataclass(frozen=True)
class StaticLayout:
  """The window part of a mask that is the same for every example (positions in the row)."""
  windows: tuple[Window, ...] = ()

  @classmethod
  def causal(cls) -> StaticLayout:
    return cls(())

  @classmethod
  def mma(cls, image_start: int, image_end: int, header_end: int) -> StaticLayout:
    """One image at a fixed offset; its rows see the question slot [image_end, header_end)."""
    return cls(((image_start, image_end, image_end, header_end),))


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def static_layout_from_vectors(window_lo, window_hi) -> StaticLayout:
  """Concrete [B, L] window vectors shared by every example -> StaticLayout; else ValueError."""
  if _is_traced(window_lo) or _is_traced(window_hi):
    raise ValueError(
        "splash needs its mask on the host at trace time, but the window vectors are traced "
        "(inside jit). Call mma_jax.attention.splash.splash_attention with a StaticLayout, or use "
        "impl='flash', which reads the vectors on device.")
  lo, hi = np.asarray(window_lo), np.asarray(window_hi)
  empty = lo >= hi
  lo, hi = np.where(empty, 0, lo), np.where(empty, 0, hi)
  differs = np.nonzero((lo != lo[:1]).any(axis=1) | (hi != hi[:1]).any(axis=1))[0]
  if differs.size:
    raise ValueError(
        f"splash needs one static window layout for the batch; example {differs[0]} has "
        "different windows from example 0. Use impl='flash' for per-example layouts.")
  windows = []
  row = 0
  while row < lo.shape[1]:  # runs of rows sharing a non-empty window
    end = row + 1
    while end < lo.shape[1] and lo[0, end] == lo[0, row] and hi[0, end] == hi[0, row]:
      end += 1
    if hi[0, row] > lo[0, row]:
      windows.append((row, end, int(lo[0, row]), int(hi[0, row])))
    row = end
  return StaticLayout(tuple(windows))


def unsupported_reason(q, k, v, window_lo, window_hi):
  """Why splash cannot serve these inputs (a sentence), or None."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
    return f"splash is self-attention with q [B, L, H, D] and k = v [B, L, K, D]; got " \
           f"{q.shape}, {k.shape}, {v.shape}"
  if q.shape[2] % k.shape[2]:
    return f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})"
  try:
    static_layout_from_vectors(window_lo, window_hi)
  except ValueError as error:
    return str(error)
  return None


@functools.lru_cache(maxsize=64)
def _kernel(windows, length, heads, block_q, block_kv, interpret):
  """A splash kernel per static layout and shape, cached: building it analyses the mask."""
  with jax.ensure_compile_time_eval():  # its block tables must be constants, never tracers
    return _build_kernel(windows, length, heads, block_q, block_kv, interpret)


def _build_kernel(windows, length, heads, block_q, block_kv, interpret):
  mask = MMAMask((length, length), windows)
  block_sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  return splash.make_splash_mha(splash.MultiHeadMask((mask,) * heads), block_sizes=block_sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def splash_attention(q, k, v, segment_ids, layout: StaticLayout, *, scale=None, block_q=128,
                     block_kv=128, interpret=None):
  """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D].

  The mask is `layout` (causal plus static windows) within segments. L is padded inside to a
  multiple of the blocks (multiples of 128, shrunk to fit short sequences).
  """
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  batch, length, heads, head_dim = q.shape
  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    if block <= 0 or block % LANES:
      raise ValueError(f"splash attention: {name}={block} must be a multiple of {LANES}")
  block_q = min(block_q, _round_up(length, LANES))
  block_kv = min(block_kv, _round_up(length, LANES))
  padded = _round_up(length, np.lcm(block_q, block_kv))
  kernel = _kernel(layout.windows, padded, heads, block_q, block_kv, bool(interpret))

  scale = head_dim ** -0.5 if scale is None else scale
  q = (q * scale).astype(q.dtype)

  def to_kernel_layout(x):  # [B, L, heads, D] -> [B, heads, Lp, D]
    return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  segment_ids = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, padded - length)),
                        constant_values=PAD_SEGMENT)

  def one_example(q, k, v, segments):
    return kernel(q, k, v, segment_ids=splash.SegmentIds(q=segments, kv=segments))

  out = jax.vmap(one_example)(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v),
                              segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :length]
