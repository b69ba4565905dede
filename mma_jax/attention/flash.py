"""Pallas TPU flash attention for the per-token mask vectors (DESIGN.md §3).

    allowed(i, j) = seg[i] == seg[j] and (j <= i or lo[i] <= j < hi[i])

Three kernels under one custom_vjp: forward (grid batch, heads, q blocks, kv steps), dq (same
grid) and dkv (grid batch, kv heads, kv blocks, heads of the group, q steps, so a kv block sums
its gradient over every query head that reads it). Which blocks a step fetches comes from the
block schedules of mask.py, passed by scalar prefetch into the index maps; steps past a row's
count repeat the last block (no new DMA) and skip compute (`max_steps` can shorten that axis).
Mask tiles are computed in-kernel: q-side vectors arrive as (bq, 128) lane-broadcast blocks, kv
segment ids as (8, bkv) sublane-broadcast blocks, and per-row statistics (m, l, lse, di) live in
lane-replicated (bq, 128) tiles. The softmax scale is applied to q before the kernels;
accumulation is f32. Each pallas_call carries a pl.CostEstimate (_cost_estimate) so XLA's cost
analysis sees the kernels' work.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from mma_jax.attention.mask import allowed, backward_schedule, forward_schedule

LANES, SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK - m) underflows to 0
PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)  # segment id of internal padding: matches nothing real
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
BATCH_AXES, HEAD_AXIS = ("data", "fsdp", "fsdp_transpose"), "tensor"


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel parameters (hashable: a custom_vjp non-differentiable argument)."""
  block_q: int
  block_kv: int
  group: int  # query heads per kv head
  interpret: bool
  max_steps: int | None = None  # grid steps per schedule row when every row fits (else all)


# --- in-kernel helpers ---------------------------------------------------------------------

def _lanes(tile, width):
  """A lane-replicated (rows, 128) tile -> (rows, width) with the same value in every column."""
  if width <= LANES:
    return tile if width == LANES else tile[:, :width]
  tile = jnp.tile(tile, (1, pl.cdiv(width, LANES)))
  return tile if width % LANES == 0 else tile[:, :width]


def _step_block(schedule_ref, row, step):
  """The block a grid step visits for schedule row `row`, and whether the step does work."""
  base = row * 4
  start1, count1 = schedule_ref[base], schedule_ref[base + 1]
  start2, count = schedule_ref[base + 2], schedule_ref[base + 3]
  clamped = jnp.minimum(step, jnp.maximum(count - 1, 0))  # trailing steps repeat the last block
  block = jnp.where(clamped < count1, start1 + clamped, start2 + clamped - count1)
  return block, step < count


def _dot(a, b, dims=NN):
  """An f32-accumulated matmul. bf16 x bf16 products are exact in f32, so those run at Mosaic's
  default precision: Mosaic rejects fp32 contract precision on bf16 operands, which
  jax_default_matmul_precision="highest" (tests, convert) would otherwise ask for. Other dots
  keep the configured precision."""
  bf16 = a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
  return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.DEFAULT if bf16 else None,
                             preferred_element_type=jnp.float32)


def _kv_head(h, group):
  # lax.div: `//` on int32 lowers through sign() in Mosaic; ids are non-negative.
  return h if group == 1 else jax.lax.div(h, jnp.int32(group))


def _mask_tile(q_seg_ref, q_lo_ref, q_hi_ref, kv_seg_ref, q_block, kv_block, bq, bkv):
  """bool (bq, bkv): allowed() for the tile at (q_block, kv_block)."""
  q_pos = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
  k_pos = kv_block * bkv + jax.lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
  return allowed(q_pos, k_pos, _lanes(q_seg_ref[...], bkv), kv_seg_ref[:1, :],
                 _lanes(q_lo_ref[...], bkv), _lanes(q_hi_ref[...], bkv))


def _probs(q, k, lse, keep, bkv):
  """Softmax probabilities of a tile from the saved log-sum-exp; masked entries are exactly 0."""
  s = _dot(q, k, NT)
  return jnp.where(keep, jnp.exp(s - _lanes(lse, bkv)), 0.0)


# --- kernels ---------------------------------------------------------------------------------

def _fwd_kernel(schedule_ref, q_ref, k_ref, v_ref, q_seg_ref, q_lo_ref, q_hi_ref, kv_seg_ref,
                o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, bq, bkv, n_q, steps):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_block, active = _step_block(schedule_ref, b * n_q + i, j)
  head_dim = acc_scratch.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full_like(m_scratch, MASK_VALUE)
    l_scratch[...] = jnp.zeros_like(l_scratch)
    acc_scratch[...] = jnp.zeros_like(acc_scratch)

  @pl.when(active)
  def _accumulate():
    keep = _mask_tile(q_seg_ref, q_lo_ref, q_hi_ref, kv_seg_ref, i, kv_block, bq, bkv)
    s = _dot(q_ref[...], k_ref[...], NT)
    s = jnp.where(keep, s, MASK_VALUE)
    m_prev = m_scratch[...]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # (bq, 128)
    p = jnp.where(keep, jnp.exp(s - _lanes(m_next, bkv)), 0.0)  # a masked key never counts
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + p.sum(axis=1, keepdims=True)
    pv = _dot(p.astype(v_ref.dtype), v_ref[...])
    acc_scratch[...] = _lanes(alpha, head_dim) * acc_scratch[...] + pv
    m_scratch[...] = m_next

  @pl.when(j == steps - 1)
  def _finish():
    l = l_scratch[...]
    l = jnp.where(l == 0.0, 1.0, l)  # a row with no allowed key (none exists by our rule) -> 0
    o_ref[...] = (acc_scratch[...] * _lanes(1.0 / l, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = m_scratch[...] + jnp.log(l)


def _dq_kernel(schedule_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, q_lo_ref,
               q_hi_ref, kv_seg_ref, dq_ref, acc_scratch, *, bq, bkv, n_q, steps):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_block, active = _step_block(schedule_ref, b * n_q + i, j)

  @pl.when(j == 0)
  def _init():
    acc_scratch[...] = jnp.zeros_like(acc_scratch)

  @pl.when(active)
  def _accumulate():
    keep = _mask_tile(q_seg_ref, q_lo_ref, q_hi_ref, kv_seg_ref, i, kv_block, bq, bkv)
    p = _probs(q_ref[...], k_ref[...], lse_ref[...], keep, bkv)
    dp = _dot(do_ref[...], v_ref[...], NT)
    ds = p * (dp - _lanes(di_ref[...], bkv))
    acc_scratch[...] += _dot(ds.astype(k_ref.dtype), k_ref[...])

  @pl.when(j == steps - 1)
  def _finish():
    dq_ref[...] = acc_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(schedule_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, q_lo_ref,
                q_hi_ref, kv_seg_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, bq, bkv, n_kv,
                group, steps):
  b, kj, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_block, active = _step_block(schedule_ref, b * n_kv + kj, t)

  @pl.when((g == 0) & (t == 0))  # first query head of the group, first step
  def _init():
    dk_scratch[...] = jnp.zeros_like(dk_scratch)
    dv_scratch[...] = jnp.zeros_like(dv_scratch)

  @pl.when(active)
  def _accumulate():
    q, do = q_ref[...], do_ref[...]
    keep = _mask_tile(q_seg_ref, q_lo_ref, q_hi_ref, kv_seg_ref, q_block, kj, bq, bkv)
    p = _probs(q, k_ref[...], lse_ref[...], keep, bkv)
    dv_scratch[...] += _dot(p.T.astype(do.dtype), do)
    dp = _dot(do, v_ref[...], NT)
    ds = p * (dp - _lanes(di_ref[...], bkv))
    dk_scratch[...] += _dot(ds.T.astype(q.dtype), q)

  @pl.when((g == group - 1) & (t == steps - 1))
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


# --- cost estimates (what XLA's cost analysis sees of each pallas_call) ----------------------
#
# The blocks a kernel visits are data-dependent (the schedules arrive by scalar prefetch), so
# the estimate assumes the causal block triangle per (batch, head): one causal sequence filling
# each row. That is exact for that layout (the common case); packing and padding visit fewer
# blocks, MMA windows a few more. Each schedule row is capped by the grid's `steps` (max_steps
# may shorten it).

_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}  # (bq x bkv x D) matmuls per visited block and head


def _causal_visits(kernel, n_q, n_kv, bq, bkv, steps):
  """Visited blocks per (batch, head) under the causal-triangle assumption, capped by the grid:
  q block i needs kv blocks 0..((i+1)bq - 1) // bkv; kv block j is needed by q blocks
  j bkv // bq..n_q - 1 (dkv walks these)."""
  if kernel == "dkv":
    return sum(min(n_q - j * bkv // bq, steps) for j in range(n_kv))
  return sum(min(((i + 1) * bq - 1) // bkv + 1, n_kv, steps) for i in range(n_q))


def _cost_estimate(kernel, q, k, steps, cfg):
  """pl.CostEstimate of one kernel ("fwd", "dq", "dkv") on kernel-layout q [B, H, Lp, D], k."""
  batch, heads, length, head_dim = q.shape
  kv_heads = k.shape[1]
  bq, bkv = cfg.block_q, cfg.block_kv
  n_q, n_kv = length // bq, length // bkv
  visits = _causal_visits(kernel, n_q, n_kv, bq, bkv, steps)
  tile = bq * bkv
  q_tile, kv_tile = bq * head_dim * q.dtype.itemsize, bkv * head_dim * k.dtype.itemsize
  row_stat = bq * LANES * 4  # one lane-replicated f32 statistic (lse, di)
  q_vectors = 3 * bq * LANES * 4  # segment ids, window lo/hi, lane-broadcast int32
  kv_vector = SUBLANES * bkv * 4  # kv segment ids, sublane-broadcast int32
  # bytes once per grid row (per head of the row axis) and once per visited block (per head)
  if kernel == "fwd":  # row: q in, o and lse out; visit: k, v
    row_heads, n_rows = heads, n_q
    per_row, per_visit = 2 * q_tile + row_stat + q_vectors, 2 * kv_tile + kv_vector
  elif kernel == "dq":  # row: q, do in, dq out, lse, di; visit: k, v
    row_heads, n_rows = heads, n_q
    per_row, per_visit = 3 * q_tile + 2 * row_stat + q_vectors, 2 * kv_tile + kv_vector
  else:  # dkv, row per kv head: k, v in, dk, dv out; visit per query head: q, do, lse, di
    row_heads, n_rows = kv_heads, n_kv
    per_row, per_visit = 4 * kv_tile + kv_vector, 2 * q_tile + 2 * row_stat + q_vectors
  schedule = n_rows * 4 * 4  # int32 (start1, count1, start2, count) per row
  return pl.CostEstimate(
      flops=batch * heads * visits * 2 * _MATMULS[kernel] * tile * head_dim,
      transcendentals=batch * heads * visits * tile,  # the exps of the score tile (recomputed)
      bytes_accessed=batch * (row_heads * n_rows * per_row + heads * visits * per_visit
                              + schedule))


# --- pallas_call wrappers (arrays in kernel layout: q/k/v [B, heads, Lp, D]) ------------------

def _with_steps(run, schedule, n_blocks, max_steps):
  """run(steps) on a grid of `max_steps` steps per schedule row when every row fits, else on
  the full `n_blocks`. The check runs on device (lax.cond), so results never depend on it."""
  if max_steps is None or max_steps >= n_blocks:
    return run(n_blocks)
  fits = schedule[..., 3].max() <= max_steps
  return jax.lax.cond(fits, lambda: run(max_steps), lambda: run(n_blocks))


def _mask_operands(segment_ids, window_lo, window_hi):
  """q-side vectors as [B, Lp, 128] (lane-broadcast), kv segment ids as [B, 8, Lp]."""
  batch, length = segment_ids.shape
  lanes = lambda x: jax.lax.broadcast_in_dim(x, (batch, length, LANES), (0, 1))
  kv_seg = jax.lax.broadcast_in_dim(segment_ids, (batch, SUBLANES, length), (0, 2))
  return lanes(segment_ids), lanes(window_lo), lanes(window_hi), kv_seg


def _compiler_params(n_parallel, n_arbitrary):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _forward(q, k, v, vectors, fwd_schedule, cfg):
  batch, heads, length, head_dim = q.shape
  bq, bkv, group = cfg.block_q, cfg.block_kv, cfg.group
  n_q, n_kv = length // bq, length // bkv

  def kv_block(b, i, j, sched):
    return _step_block(sched, b * n_q + i, j)[0]

  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, s: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim),
                         lambda b, h, i, j, s: (b, _kv_head(h, group), kv_block(b, i, j, s), 0))
  q_vec_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, s: (b, i, 0))
  kv_vec_spec = pl.BlockSpec((None, SUBLANES, bkv),
                             lambda b, h, i, j, s: (b, 0, kv_block(b, i, j, s)))
  row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, s: (b, h, i, 0))

  def run(steps):
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bq=bq, bkv=bkv, n_q=n_q, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, n_q, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_vec_spec, q_vec_spec, q_vec_spec, kv_vec_spec],
            out_specs=[q_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, length, LANES), jnp.float32)],
        compiler_params=_compiler_params(3, 1),
        interpret=cfg.interpret,
        cost_estimate=_cost_estimate("fwd", q, k, steps, cfg),
        name="mma_flash_fwd",
    )(fwd_schedule.reshape(-1), q, k, v, *vectors)

  out, lse = _with_steps(run, fwd_schedule, n_kv, cfg.max_steps)
  return out, lse[..., 0]


def _backward(q, k, v, vectors, fwd_schedule, bwd_schedule, out, lse, d_out, cfg):
  batch, heads, length, head_dim = q.shape
  kv_heads = k.shape[1]
  bq, bkv, group = cfg.block_q, cfg.block_kv, cfg.group
  n_q, n_kv = length // bq, length // bkv
  # Row statistics as lane-replicated [B, H, Lp, 128] f32 (the saved residual is [B, H, Lp]).
  di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  row_shape = (batch, heads, length, LANES)
  lse, di = (jax.lax.broadcast_in_dim(x, row_shape, (0, 1, 2)) for x in (lse, di))

  # dq: the forward grid and schedule.
  def kv_block(b, i, j, sched):
    return _step_block(sched, b * n_q + i, j)[0]

  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, s: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim),
                         lambda b, h, i, j, s: (b, _kv_head(h, group), kv_block(b, i, j, s), 0))
  row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, s: (b, h, i, 0))
  q_vec_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, s: (b, i, 0))
  kv_vec_spec = pl.BlockSpec((None, SUBLANES, bkv),
                             lambda b, h, i, j, s: (b, 0, kv_block(b, i, j, s)))

  def run_dq(steps):
    return pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bkv=bkv, n_q=n_q, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, n_q, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                      q_vec_spec, q_vec_spec, q_vec_spec, kv_vec_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(3, 1),
        interpret=cfg.interpret,
        cost_estimate=_cost_estimate("dq", q, k, steps, cfg),
        name="mma_flash_dq",
    )(fwd_schedule.reshape(-1), q, k, v, d_out, lse, di, *vectors)
  dq = _with_steps(run_dq, fwd_schedule, n_kv, cfg.max_steps)

  # dkv: grid (B, K, kv blocks, group heads, q steps); the transposed schedule picks q blocks.
  def q_block(b, kj, t, sched):
    return _step_block(sched, b * n_kv + kj, t)[0]

  def q_head(kh, g):
    return kh * group + g

  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, kh, kj, g, t, s: (
      b, q_head(kh, g), q_block(b, kj, t, s), 0))
  row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, kh, kj, g, t, s: (
      b, q_head(kh, g), q_block(b, kj, t, s), 0))
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), lambda b, kh, kj, g, t, s: (b, kh, kj, 0))
  q_vec_spec = pl.BlockSpec((None, bq, LANES),
                            lambda b, kh, kj, g, t, s: (b, q_block(b, kj, t, s), 0))
  kv_vec_spec = pl.BlockSpec((None, SUBLANES, bkv), lambda b, kh, kj, g, t, s: (b, 0, kj))

  def run_dkv(steps):
    return pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, bkv=bkv, n_kv=n_kv, group=group, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, kv_heads, n_kv, group, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                      q_vec_spec, q_vec_spec, q_vec_spec, kv_vec_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32),
                            pltpu.VMEM((bkv, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(3, 2),
        interpret=cfg.interpret,
        cost_estimate=_cost_estimate("dkv", q, k, steps, cfg),
        name="mma_flash_dkv",
    )(bwd_schedule.reshape(-1), q, k, v, d_out, lse, di, *vectors)
  dk, dv = _with_steps(run_dkv, bwd_schedule, n_q, cfg.max_steps)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, vectors, fwd_schedule, bwd_schedule, cfg):
  return _forward(q, k, v, vectors, fwd_schedule, cfg)[0]


def _flash_fwd(q, k, v, vectors, fwd_schedule, bwd_schedule, cfg):
  out, lse = _forward(q, k, v, vectors, fwd_schedule, cfg)
  return out, (q, k, v, vectors, fwd_schedule, bwd_schedule, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, vectors, fwd_schedule, bwd_schedule, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, vectors, fwd_schedule, bwd_schedule, out, lse, d_out, cfg)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- public API ----------------------------------------------------------------------------

def unsupported_reason(q, k, v, *, block_q=128, block_kv=128, interpret=None):
  """Why flash cannot serve these inputs (a sentence), or None when it can."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    return f"q, k, v must be [B, L, heads, D]; got ranks {q.ndim}, {k.ndim}, {v.ndim}"
  if k.shape != v.shape:
    return f"k {k.shape} and v {v.shape} differ"
  if q.shape[:2] != k.shape[:2]:
    return (f"flash is self-attention over one sequence: q {q.shape[:2]} and k {k.shape[:2]} "
            "must share [B, L] (decode with a KV cache uses dense)")
  if q.shape[3] != k.shape[3]:
    return f"q head dim {q.shape[3]} differs from k head dim {k.shape[3]}"
  if q.shape[2] % k.shape[2]:
    return f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})"
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
    return f"flash takes float32 or bfloat16 inputs, got {sorted(map(str, dtypes))}"
  interpret = _default_interpret() if interpret is None else interpret
  align = SUBLANES if interpret else LANES
  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    if block <= 0 or block % align:
      where = "in interpret mode" if interpret else "on TPU"
      return f"{name}={block} must be a positive multiple of {align} {where}"
  return None


def target_platform() -> str:
  """The platform the program being traced will run on: that of the mesh's devices when one is
  set with jax.set_mesh (a described TPU topology counts, even when compiling on a CPU host),
  else jax.default_backend()."""
  device = jax.sharding.get_abstract_mesh().abstract_device  # None without a (concrete) mesh
  return device.platform if device is not None else jax.default_backend()


def _default_interpret():
  return target_platform() != "tpu"


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def flash_attention(q, k, v, segment_ids, window_lo, window_hi, *, scale=None, block_q=128,
                    block_kv=128, max_steps=None, interpret=None):
  """q [B, L, H, D], k/v [B, L, K, D] (K divides H), mask vectors [B, L] int32 -> [B, L, H, D].

  Any L: sequences are padded inside to a multiple of both blocks (blocks shrink to fit short
  sequences); padded tokens get a segment id matching no real one and are sliced off.
  `max_steps`: grid steps per q block (and per kv block in dkv). None walks every block, and
  at long L with packed short examples most steps then idle; a bound on the blocks a row needs
  (see mask.count_visited / the schedules' counts) cuts that per-step overhead. A batch with a
  row that needs more runs on the full grid (checked on device), so it never changes results.
  `interpret` defaults to True unless the target (target_platform()) is TPU. Differentiable in
  q, k, v.
  """
  interpret = _default_interpret() if interpret is None else interpret
  reason = unsupported_reason(q, k, v, block_q=block_q, block_kv=block_kv, interpret=interpret)
  if reason:
    raise ValueError(f"flash attention: {reason}")
  batch, length, heads, head_dim = q.shape
  align = SUBLANES if interpret else LANES
  block_q = min(block_q, _round_up(length, align))
  block_kv = min(block_kv, _round_up(length, align))
  padded = _round_up(length, math.lcm(block_q, block_kv))
  cfg = _Config(block_q=block_q, block_kv=block_kv, group=heads // k.shape[2],
                interpret=bool(interpret), max_steps=max_steps)

  scale = head_dim ** -0.5 if scale is None else scale
  q = (q * scale).astype(q.dtype)  # the kernel's scores are q . k; autodiff carries the scale

  def to_kernel_layout(x):  # [B, L, heads, D] -> [B, heads, Lp, D]
    return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  pad = ((0, 0), (0, padded - length))
  segment_ids = jnp.pad(jnp.asarray(segment_ids, jnp.int32), pad, constant_values=PAD_SEGMENT)
  window_lo = jnp.pad(jnp.asarray(window_lo, jnp.int32), pad)
  window_hi = jnp.pad(jnp.asarray(window_hi, jnp.int32), pad)
  fwd_schedule = forward_schedule(segment_ids, window_lo, window_hi, block_q, block_kv)
  bwd_schedule = backward_schedule(segment_ids, window_lo, window_hi, block_q, block_kv)
  vectors = _mask_operands(segment_ids, window_lo, window_hi)
  out = _flash(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v), vectors,
               fwd_schedule, bwd_schedule, cfg)
  return out.transpose(0, 2, 1, 3)[:, :length]


def _mesh_axes(mesh):
  """(batch axes, head axis or None) of `mesh` that flash shards over."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return batch_axes, HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None


def sharding_reason(q, k, mesh):
  """Why these shapes cannot be split over `mesh` the way flash shards them, or None."""
  batch_axes, head_axis = _mesh_axes(mesh)
  batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
  head_shards = mesh.shape[head_axis] if head_axis else 1
  if q.shape[0] % batch_shards:
    return f"batch {q.shape[0]} does not split over mesh axes {batch_axes} ({batch_shards} shards)"
  if q.shape[2] % head_shards or k.shape[2] % head_shards:
    return (f"heads {q.shape[2]} and kv heads {k.shape[2]} must both split over mesh axis "
            f"{head_axis!r} ({head_shards} shards)")
  return None


def sharded_flash_attention(q, k, v, segment_ids, window_lo, window_hi, *, mesh, scale=None,
                            block_q=128, block_kv=128, max_steps=None, interpret=None):
  """flash_attention under shard_map: batch over the mesh's data and FSDP axes, heads over
  "tensor" (whichever of them the mesh has). Each shard computes its own block schedules."""
  reason = sharding_reason(q, k, mesh)
  if reason:
    raise ValueError(f"flash attention: {reason}")
  batch_axes, head_axis = _mesh_axes(mesh)
  batch_spec = batch_axes or None
  heads_spec = P(batch_spec, None, head_axis, None)
  vector_spec = P(batch_spec, None)
  local = functools.partial(flash_attention, scale=scale, block_q=block_q, block_kv=block_kv,
                            max_steps=max_steps, interpret=interpret)
  return jax.shard_map(
      local, mesh=mesh, in_specs=(heads_spec,) * 3 + (vector_spec,) * 3, out_specs=heads_spec,
      check_vma=False,
  )(q, k, v, segment_ids, window_lo, window_hi)
