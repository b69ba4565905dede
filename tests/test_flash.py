"""The Pallas flash kernel (interpret mode on CPU) against the dense reference, its block
schedules against the exact minimum, its TPU lowering, and its shard_map wrapper."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh

from mma_jax.attention import mask as mask_lib
from mma_jax.attention.dense import attend_dense
from mma_jax.attention.flash import flash_attention, sharded_flash_attention

# --- a small random-layout generator (independent of mma_jax.layout) -------------------------

WINDOW_MODES = ("causal", "mma", "mma_bidir_image", "prefix_lm")


def conversation(rng, budget, turns, images_per_turn, mode):
  """Window vectors (lo, hi) of one example of at most `budget` tokens, positions from 0.

  Each turn: text, then images each followed by text, a question, a one-token assistant header,
  an answer. Image rows see [image end (or start), header end) of their turn; prefix_lm rows up to
  the first header end see [0, that header end).
  """
  unit = max(budget // (turns * (images_per_turn + 3) * 2), 1)
  lo, hi = np.zeros(budget + 1, np.int32), np.zeros(budget + 1, np.int32)
  pos = 0
  for turn in range(turns):
    pos += rng.integers(1, unit + 1)                                  # text
    images = []
    for _ in range(images_per_turn):
      start, pos = pos, pos + rng.integers(unit, 2 * unit + 1)        # image
      images.append((start, pos))
      pos += rng.integers(0, unit + 1)                                # text after the image
    pos += rng.integers(1, unit + 1) + 1                              # question, header
    header_end = min(pos, budget)
    for start, end in images:
      start, end = min(start, budget), min(end, budget)
      if mode in ("mma", "mma_bidir_image"):
        lo[start:end] = end if mode == "mma" else start
        hi[start:end] = header_end
    if mode == "prefix_lm" and turn == 0:
      lo[:header_end], hi[:header_end] = 0, header_end
    pos += rng.integers(1, unit + 1)                                  # answer
  length = min(pos, budget)
  return lo[:length], hi[:length]


def random_layout(rng, batch, length, *, segments=1, turns=1, images=1, mode="mma",
                  padding=True):
  """[B, L] (segment_ids, window_lo, window_hi): `segments` packed examples per row (ids 1..n),
  then padding (segment 0) filling the rest."""
  seg, lo, hi = (np.zeros((batch, length), np.int32) for _ in range(3))
  for b in range(batch):
    pos = 0
    room = length - (rng.integers(1, length // 8 + 1) if padding else 0)
    for s in range(segments):
      budget = (room - pos) // (segments - s)
      t = turns if turns > 0 else int(rng.integers(1, 3))
      n = images if images > 0 else int(rng.integers(1, 3))
      win_lo, win_hi = conversation(rng, budget, t, n, mode)
      if not padding and s == segments - 1:  # the last example runs to the end of the row
        win_lo = np.pad(win_lo, (0, budget - len(win_lo)))
        win_hi = np.pad(win_hi, (0, budget - len(win_hi)))
      end = pos + len(win_lo)
      seg[b, pos:end] = s + 1
      has_window = win_hi > win_lo
      lo[b, pos:end] = np.where(has_window, win_lo + pos, 0)
      hi[b, pos:end] = np.where(has_window, win_hi + pos, 0)
      pos = end
  return seg, lo, hi


LAYOUTS = {  # name -> random_layout keyword arguments
    "one_image": dict(),
    "several_images": dict(images=3),
    "multi_turn": dict(turns=3),
    "packed": dict(segments=3, turns=0, images=0),  # three segments + padding
    "prefix_lm": dict(mode="prefix_lm"),
    "bidir_image": dict(mode="mma_bidir_image", images=2),
    "causal": dict(mode="causal", padding=False),
}


def make_inputs(key, batch, length, heads, kv_heads, head_dim, dtype):
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, length, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, length, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, length, kv_heads, head_dim), jnp.float32)
  d_out = jax.random.normal(kd, (batch, length, heads, head_dim), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, d_out))


def value_and_grads(attention, q, k, v, d_out):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(d_out))


# --- numerics vs dense -----------------------------------------------------------------------

CASES = [  # layout, L, H, K, block_q, block_kv, dtype
    ("one_image", 128, 4, 4, 64, 64, "float32"),
    ("several_images", 384, 4, 2, 64, 128, "float32"),
    ("multi_turn", 384, 4, 1, 128, 64, "float32"),
    ("packed", 384, 4, 2, 128, 128, "float32"),
    ("prefix_lm", 128, 4, 1, 64, 64, "float32"),
    ("bidir_image", 200, 4, 2, 64, 64, "float32"),  # odd length: padded inside
    ("packed", 1024, 4, 2, 128, 128, "float32"),
    ("one_image", 384, 4, 2, 128, 128, "bfloat16"),
    ("packed", 384, 4, 1, 64, 128, "bfloat16"),
    ("multi_turn", 1024, 4, 1, 128, 128, "bfloat16"),
]


@pytest.mark.parametrize("layout,length,heads,kv_heads,block_q,block_kv,dtype", CASES)
def test_flash_matches_dense(layout, length, heads, kv_heads, block_q, block_kv, dtype):
  rng = np.random.default_rng(length + heads * kv_heads + block_q)
  seg, lo, hi = random_layout(rng, 2, length, **LAYOUTS[layout])
  dtype = jnp.dtype(dtype)
  q, k, v, d_out = make_inputs(jax.random.PRNGKey(length), 2, length, heads, kv_heads, 32, dtype)

  flash = jax.jit(lambda q, k, v, d: value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, seg, lo, hi, block_q=block_q, block_kv=block_kv),
      q, k, v, d))
  dense = jax.jit(lambda q, k, v, d: value_and_grads(
      lambda q, k, v: attend_dense(q, k, v, seg, lo, hi), q, k, v, d))
  got = flash(q, k, v, d_out)
  # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
  want = dense(*(x.astype(jnp.float32) for x in (q, k, v, d_out)))
  errors = {}
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == dtype, name
    errors[name] = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
    if dtype != jnp.float32:  # relative to the largest reference value
      errors[name] /= float(jnp.max(jnp.abs(w)))
  print(f"{layout} L={length} K={kv_heads} blocks={block_q}/{block_kv} {dtype.name} "
        + ("max abs" if dtype == jnp.float32 else "relative") + " errors: "
        + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
  limit = 1e-5 if dtype == jnp.float32 else 2e-2
  assert max(errors.values()) <= limit, errors


@pytest.mark.parametrize("slack", [0, -1])  # the grid fits every row / one row needs more
def test_max_steps_never_changes_results(slack):
  rng = np.random.default_rng(11)
  seg, lo, hi = random_layout(rng, 2, 512, **LAYOUTS["packed"])
  fwd, bwd = schedules(seg, lo, hi, 64, 64)
  need = int(max(fwd[..., 3].max(), bwd[..., 3].max()))
  assert need < 512 // 64  # shorter than the full grid
  q, k, v, d_out = make_inputs(jax.random.PRNGKey(5), 2, 512, 2, 1, 16, jnp.float32)
  got = jax.jit(lambda q, k, v, d: value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, seg, lo, hi, block_q=64, block_kv=64,
                                      max_steps=need + slack), q, k, v, d))(q, k, v, d_out)
  want = value_and_grads(lambda q, k, v: attend_dense(q, k, v, seg, lo, hi), q, k, v, d_out)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert float(jnp.max(jnp.abs(g - w))) <= 1e-5, name


def test_flash_scale_and_padding_rows():
  """A custom softmax scale; user padding (segment 0) and internal padding stay separate."""
  rng = np.random.default_rng(7)
  seg, lo, hi = random_layout(rng, 2, 100, **LAYOUTS["one_image"])
  q, k, v, _ = make_inputs(jax.random.PRNGKey(1), 2, 100, 2, 2, 16, jnp.float32)
  got = flash_attention(q, k, v, seg, lo, hi, scale=0.3, block_q=64, block_kv=64)
  want = attend_dense(q, k, v, seg, lo, hi, scale=0.3)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5


# --- block accounting ------------------------------------------------------------------------

def _first_positions(segment_ids):
  first = {}
  return np.array([first.setdefault(s, t) for t, s in enumerate(segment_ids)])


def bounding_ranges(seg, lo, hi, block_q, block_kv):
  """Independent (python) bounds: per q block the causal and window kv-block ranges as bool
  [B, nq, nk] each, straight from the definition in DESIGN.md §3."""
  batch, length = seg.shape
  n_q, n_kv = length // block_q, length // block_kv
  causal, window = (np.zeros((batch, n_q, n_kv), bool) for _ in range(2))
  for b in range(batch):
    starts = _first_positions(seg[b].tolist())
    for i in range(n_q):
      rows = slice(i * block_q, (i + 1) * block_q)
      last_row = (i + 1) * block_q - 1
      causal[b, i, starts[rows].min() // block_kv:last_row // block_kv + 1] = True
      has = lo[b, rows] < hi[b, rows]
      if has.any():
        first, last = lo[b, rows][has].min(), hi[b, rows][has].max() - 1
        window[b, i, first // block_kv:last // block_kv + 1] = True
  return causal, window


def transposed_bound(part):
  """bool [B, nq, nk] -> the q-block interval spanning every q block that needs each kv block."""
  out = np.zeros_like(part)
  for b, kj in zip(*np.nonzero(part.any(axis=1))):
    rows = np.nonzero(part[b, :, kj])[0]
    out[b, rows.min():rows.max() + 1, kj] = True
  return out


BLOCKS = [(64, 64), (64, 128), (128, 64), (128, 128)]


@jax.jit(static_argnums=(3, 4))
def schedules(seg, lo, hi, block_q, block_kv):
  return (mask_lib.forward_schedule(seg, lo, hi, block_q, block_kv),
          mask_lib.backward_schedule(seg, lo, hi, block_q, block_kv))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_block_schedules(layout):
  rng = np.random.default_rng(sorted(LAYOUTS).index(layout))
  totals = []
  for length in (128, 384, 1024, 2048):  # 2048: where bounding ranges exceed the minimum
    seg, lo, hi = random_layout(rng, 3, length, **LAYOUTS[layout])
    for block_q, block_kv in BLOCKS:
      fwd, bwd = schedules(seg, lo, hi, block_q, block_kv)
      n_q, n_kv = length // block_q, length // block_kv
      fwd_pairs = mask_lib.schedule_blocks(fwd, n_kv)
      dkv_pairs = mask_lib.schedule_blocks(bwd, n_q).transpose(0, 2, 1)
      needed = mask_lib.needed_blocks(seg, lo, hi, block_q, block_kv)
      causal, window = bounding_ranges(seg, lo, hi, block_q, block_kv)
      assert mask_lib.count_visited(fwd) == fwd_pairs.sum()
      assert mask_lib.count_visited(bwd) == dkv_pairs.sum()
      # Never miss a needed tile, never leave the bounding ranges.
      assert not (needed & ~fwd_pairs).any(), "forward misses a needed block"
      assert not (needed & ~dkv_pairs).any(), "dkv misses a needed block"
      assert not (fwd_pairs & ~(causal | window)).any()
      assert not (dkv_pairs & ~(transposed_bound(causal) | transposed_bound(window))).any()
      if layout in ("one_image", "prefix_lm", "causal"):  # one window per example: exact
        assert (fwd_pairs == needed).all()
        assert (dkv_pairs == needed).all()
      totals.append((int(needed.sum()), int(fwd_pairs.sum()), int(dkv_pairs.sum())))
  print(layout, "needed/fwd/dkv per config:", totals)


def test_segment_starts_handles_reused_ids():
  seg = np.array([[1, 1, 0, 0, 1, 1, 0, 7]])
  assert mask_lib.segment_starts(seg).tolist() == [[0, 0, 2, 2, 0, 0, 2, 7]]


# --- TPU lowering (no TPU needed) ------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,max_steps", [(8, None), (2, 4)])
def test_flash_lowers_for_tpu(kv_heads, max_steps):
  batch, length, heads, head_dim = 1, 2048, 8, 128
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def forward(q, k, v, seg, lo, hi):
    return flash_attention(q, k, v, seg, lo, hi, max_steps=max_steps, interpret=False)

  def grads(q, k, v, seg, lo, hi):
    loss = lambda q, k, v: forward(q, k, v, seg, lo, hi).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  fwd_text = jax.jit(forward).trace(q, kv, kv, vec, vec, vec).lower(
      lowering_platforms=("tpu",)).as_text()
  bwd_text = jax.jit(grads).trace(q, kv, kv, vec, vec, vec).lower(
      lowering_platforms=("tpu",)).as_text()
  assert "mma_flash_fwd" in fwd_text
  for kernel in ("mma_flash_fwd", "mma_flash_dq", "mma_flash_dkv"):
    assert kernel in bwd_text


# --- shard_map ---------------------------------------------------------------------------------

@pytest.mark.parametrize("axes,shape", [(("data", "tensor"), (2, 2)),
                                         (("data", "fsdp", "tensor"), (1, 2, 2))])
def test_sharded_flash_matches_unsharded(axes, shape):
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(shape), axes)
  rng = np.random.default_rng(3)
  seg, lo, hi = random_layout(rng, 2, 256, **LAYOUTS["packed"])
  q, k, v, d_out = make_inputs(jax.random.PRNGKey(3), 2, 256, 4, 2, 32, jnp.float32)

  def run(attention):
    return jax.jit(lambda q, k, v, d: value_and_grads(
        lambda q, k, v: attention(q, k, v, seg, lo, hi, block_q=128, block_kv=128),
        q, k, v, d))(q, k, v, d_out)

  sharded = run(lambda *a, **kw: sharded_flash_attention(*a, mesh=mesh, **kw))
  plain = run(flash_attention)
  for name, a, b in zip(("out", "dq", "dk", "dv"), sharded, plain):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6, name


def test_sharded_flash_rejects_indivisible_heads():
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  q, k, v, _ = make_inputs(jax.random.PRNGKey(0), 2, 64, 4, 1, 16, jnp.float32)
  seg = np.ones((2, 64), np.int32)
  with pytest.raises(ValueError, match="kv heads 1 must both split"):
    sharded_flash_attention(q, k, v, seg, 0 * seg, 0 * seg, mesh=mesh)
