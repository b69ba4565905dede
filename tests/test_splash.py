"""The splash baseline: the MMA _ComputableMask and stock splash (interpret mode) vs dense."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mma_jax.attention.dense import attend_dense
from mma_jax.attention.mask import materialize
from mma_jax.attention.splash import (MMAMask, StaticLayout, splash_attention,
                                      static_layout_from_vectors)


def static_mma_vectors(batch, length, image_start, image_end, header_end, example_lengths):
  """One image at a fixed offset in every example; examples end (then padding) at their length."""
  seg = np.zeros((batch, length), np.int32)
  for b, n in enumerate(example_lengths):
    seg[b, :n] = 1
  lo, hi = np.zeros_like(seg), np.zeros_like(seg)
  lo[:, image_start:image_end], hi[:, image_start:image_end] = image_end, header_end
  return seg, lo, hi


def test_mma_mask_hash_eq_and_numpy_slices():
  a = MMAMask((256, 256), ((8, 40, 40, 70),))
  assert a == MMAMask((256, 256), ((8, 40, 40, 70),))
  assert hash(a) == hash(MMAMask((256, 256), ((8, 40, 40, 70),)))
  assert a != MMAMask((256, 256), ((8, 40, 40, 71),))
  assert a != MMAMask((256, 256), ())
  seg, lo, hi = static_mma_vectors(1, 256, 8, 40, 70, [256])
  want = np.asarray(materialize(seg, lo, hi))[0]
  assert (a[:, :] == want).all()
  assert (a[32:96, 0:128] == want[32:96, 0:128]).all()


def test_static_layout_from_vectors():
  seg, lo, hi = static_mma_vectors(2, 128, 5, 20, 31, [128, 100])
  assert static_layout_from_vectors(lo, hi) == StaticLayout.mma(5, 20, 31)
  assert static_layout_from_vectors(0 * lo, 0 * hi) == StaticLayout.causal()
  hi[1, 5:20] = 32
  with pytest.raises(ValueError, match="example 1 has different windows"):
    static_layout_from_vectors(lo, hi)
  with pytest.raises(ValueError, match="traced"):
    jax.jit(static_layout_from_vectors)(lo, hi)


@pytest.mark.parametrize("length,kv_heads,windows", [
    (256, 2, "mma"),      # image at a fixed offset, question slot, padding
    (300, 1, "causal"),   # packed segments, odd length (padded inside), MQA
])
def test_splash_matches_dense(length, kv_heads, windows):
  batch, heads, head_dim = 2, 4, 32
  if windows == "mma":
    seg, lo, hi = static_mma_vectors(batch, length, 10, 70, 100, [length, length - 50])
  else:
    seg = np.repeat(np.array([1] * 120 + [2] * 150 + [0] * 30)[None], batch, 0).astype(np.int32)
    lo = hi = np.zeros_like(seg)
  layout = static_layout_from_vectors(lo, hi)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
  d_out = jax.random.normal(keys[3], (batch, length, heads, head_dim))

  def value_and_grads(attention):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(d_out))

  # Two separate traces share the cached kernel: its tables must not hold tracers.
  forward = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, layout))(q, k, v)
  got = jax.jit(lambda: value_and_grads(
      lambda q, k, v: splash_attention(q, k, v, seg, layout)))()
  assert jnp.array_equal(forward, got[0])
  want = value_and_grads(lambda q, k, v: attend_dense(q, k, v, seg, lo, hi))
  errors = {n: float(jnp.max(jnp.abs(g - w)))
            for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  print(f"splash {windows} L={length} K={kv_heads} max abs errors:",
        " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
  assert max(errors.values()) <= 1e-5, errors


def test_splash_rejects_blocks_off_the_lane_width():
  q = jnp.zeros((1, 128, 2, 16))
  with pytest.raises(ValueError, match="multiple of 128"):
    splash_attention(q, q, q, np.ones((1, 128), np.int32), StaticLayout.causal(), block_q=64)
