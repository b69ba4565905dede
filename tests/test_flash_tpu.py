"""The flash kernel compiled for real TPUs without one: deviceless compiles (libtpu) for described
v5e / v5p / v6e topologies, the Mosaic kernels in the compiled HLO, and the kernels' cost
estimates as XLA's cost analysis reports them. CPU only; each compile takes a few seconds."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mma_jax.attention import attend
from mma_jax.attention import mask as mask_lib
from mma_jax.attention.flash import flash_attention

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}  # 4 chips each
KERNELS = ("mma_flash_fwd", "mma_flash_dq", "mma_flash_dkv")
AXES = ("data", "fsdp", "tensor")


@functools.cache
def tpu_devices(generation):
  """The devices of a described 4-chip TPU topology (no TPU needed); skip without libtpu."""
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(
        platform="tpu", topology_name=TOPOLOGIES[generation], chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False,) * 3).devices
  except Exception as error:  # no libtpu, or one that does not know the topology
    pytest.skip(f"cannot describe a {generation} topology: {error}")


def tpu_mesh(generation, shape=(1, 1, 1)):
  """An Auto-axes (data, fsdp, tensor) mesh over the first prod(shape) described TPU chips."""
  devices = np.array(tpu_devices(generation)[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def specs(mesh, batch, length, heads, kv_heads, head_dim, dtype, spec=P()):
  """ShapeDtypeStructs of (q, k, v, segment_ids, window_lo, window_hi) placed on `mesh`."""
  on = lambda s: NamedSharding(mesh, s)
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype, sharding=on(spec))
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype, sharding=on(spec))
  vec = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=on(P(*spec[:1])))
  return q, kv, kv, vec, vec, vec


def value_and_grads(attention):
  """(q, k, v, seg, lo, hi) -> (out, dq, dk, dv) of sum(out): the forward and every kernel."""
  def run(q, k, v, seg, lo, hi):
    loss = lambda q, k, v: attention(q, k, v, seg, lo, hi).astype(jnp.float32).sum()
    out, (dq, dk, dv) = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, dq, dk, dv
  return run


def compile_for(mesh, fn, args):
  """Deviceless compile of jit(fn) on `mesh` (its devices are the target; the host is a CPU)."""
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


def assert_mosaic_kernels(compiled, kernels=KERNELS):
  text = compiled.as_text()
  assert "tpu_custom_call" in text
  for kernel in kernels:
    assert kernel in text, f"{kernel} is not in the compiled HLO"


# A covering set, not the product: each generation, block size (128/256/512), head dim
# (64/96/128), GQA and MHA, f32 and bf16 appear at least once.
CASES = [  # generation, block_q, block_kv, head_dim, heads, kv_heads, dtype
    ("v5e", 128, 128, 64, 4, 4, "bfloat16"),
    ("v5e", 256, 256, 128, 4, 2, "float32"),
    ("v5p", 512, 512, 96, 4, 1, "bfloat16"),
    ("v5p", 128, 128, 128, 2, 2, "float32"),
    ("v6e", 256, 256, 96, 2, 2, "bfloat16"),
    ("v6e", 512, 512, 64, 4, 2, "float32"),
    ("v6e", 256, 512, 128, 4, 2, "bfloat16"),  # unequal blocks
]


@pytest.mark.parametrize("generation,block_q,block_kv,head_dim,heads,kv_heads,dtype", CASES)
def test_flash_compiles_for_tpu(generation, block_q, block_kv, head_dim, heads, kv_heads, dtype):
  """fwd + grads of flash_attention on one described chip; `interpret` is left to its default,
  which must be False on a TPU target (or the compiled HLO would hold no Mosaic call)."""
  mesh = tpu_mesh(generation)
  length = 2 * max(block_q, block_kv)
  args = specs(mesh, 1, length, heads, kv_heads, head_dim, jnp.dtype(dtype))
  attention = functools.partial(flash_attention, block_q=block_q, block_kv=block_kv)
  assert_mosaic_kernels(compile_for(mesh, value_and_grads(attention), args))


def test_auto_compiles_sharded_flash_for_tpu():
  """attend(impl="auto") on a 2x2 (fsdp, tensor) mesh of v5e chips: dispatch picks flash,
  shard_map splits batch and heads, and each shard runs the Mosaic kernels."""
  mesh = tpu_mesh("v5e", (1, 2, 2))
  args = specs(mesh, 2, 512, 4, 2, 128, jnp.bfloat16, spec=P("fsdp", None, "tensor", None))
  assert_mosaic_kernels(compile_for(mesh, value_and_grads(attend), args))


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a dict in jax 0.10.2
  return float(cost["flops"])


def test_cost_analysis_counts_the_visited_blocks():
  """XLA's flops for the compiled program match the analytic flops of the blocks the kernels
  visit (counted from mask.py's schedules) within 10%: forward alone, and forward + backward.

  The layout is one causal segment filling every row (no padding, no windows): there the
  kernels' static estimate (the causal block triangle) is exact, so a missing or wrong estimate
  fails. Per visited (bq x bkv) block and head: fwd 2 matmuls, dq 3, dkv 4 (2 * bq * bkv * D
  flops each). Everything outside the kernels (scaling q, di, transposes) is O(L * D)."""
  batch, length, heads, kv_heads, head_dim, block = 1, 2048, 4, 2, 128, 512
  seg = np.ones((batch, length), np.int32)
  none = np.zeros_like(seg)
  visited_fwd = mask_lib.count_visited(mask_lib.forward_schedule(seg, none, none, block, block))
  visited_bwd = mask_lib.count_visited(mask_lib.backward_schedule(seg, none, none, block, block))
  assert visited_fwd == visited_bwd == 10  # the 4 x 4 block triangle, per (batch, head)
  per_matmul = batch * heads * 2 * block * block * head_dim
  want_fwd = visited_fwd * 2 * per_matmul
  want_all = want_fwd + visited_fwd * 3 * per_matmul + visited_bwd * 4 * per_matmul

  mesh = tpu_mesh("v5e")
  args = specs(mesh, batch, length, heads, kv_heads, head_dim, jnp.bfloat16)
  attention = functools.partial(flash_attention, block_q=block, block_kv=block)
  forward = lambda q, k, v, seg, lo, hi: attention(q, k, v, seg, lo, hi)
  got_fwd = _flops(compile_for(mesh, forward, args))
  got_all = _flops(compile_for(mesh, value_and_grads(attention), args))
  print(f"compiled vs analytic flops: fwd {got_fwd:.4e} / {want_fwd:.4e}, "
        f"fwd+bwd {got_all:.4e} / {want_all:.4e}")
  assert abs(got_fwd - want_fwd) <= 0.1 * want_fwd
  assert abs(got_all - want_all) <= 0.1 * want_all
