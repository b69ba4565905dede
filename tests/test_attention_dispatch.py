"""`attend` dispatch: auto picks and logs, explicit impls run or say why they cannot."""
import logging

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh

import mma_jax.attention as attention
from mma_jax.attention import attend, flash
from test_flash_tpu import tpu_mesh


def inputs(batch=2, length=128, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
  seg = np.ones((batch, length), np.int32)
  seg[:, length - 9:] = 0  # padding
  lo, hi = np.zeros_like(seg), np.zeros_like(seg)
  lo[:, 4:40], hi[:, 4:40] = 40, 70  # one image at a fixed offset sees its question
  return q, k, v, seg, lo, hi


@pytest.fixture
def fresh_log(caplog):
  attention._logged.clear()
  caplog.set_level(logging.INFO, logger="mma_jax.attention")
  return caplog


def test_auto_picks_dense_off_tpu_and_logs_once(fresh_log):
  q, k, v, seg, lo, hi = inputs()
  want = attend(q, k, v, seg, lo, hi, impl="dense")
  for _ in range(2):
    got = attend(q, k, v, seg, lo, hi)
  assert jnp.array_equal(got, want)
  messages = [r.getMessage() for r in fresh_log.records]
  assert messages == ["attention impl=auto -> dense (target platform is cpu; the flash kernel "
                      "runs natively on TPU only)"]


def test_auto_on_tpu_prefers_flash_and_says_why_not(fresh_log, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # no mesh: the backend decides
  q, k, v, seg, lo, hi = inputs()
  assert attention._resolve("auto", q, k, v, lo, hi) == "flash"
  assert attention._resolve("auto", q[:, :1], k, v, lo, hi) == "dense"  # decode-shaped
  messages = [r.getMessage() for r in fresh_log.records]
  assert messages[0] == "attention impl=auto -> flash (target platform is tpu)"
  assert "flash cannot serve this input: flash is self-attention" in messages[1]


@pytest.mark.parametrize("impl", ["flash", "splash"])
def test_explicit_kernels_match_dense(impl):
  q, k, v, seg, lo, hi = inputs()
  got = attend(q, k, v, seg, lo, hi, impl=impl, scale=0.2)
  want = attend(q, k, v, seg, lo, hi, impl="dense", scale=0.2)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5


def test_flash_under_a_mesh_runs_sharded():
  q, k, v, seg, lo, hi = inputs()
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  want = attend(q, k, v, seg, lo, hi, impl="dense")
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda *a: attend(*a, impl="flash")).trace(q, k, v, seg, lo, hi).lower()
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    got = jax.jit(lambda *a: attend(*a, impl="flash"))(q, k, v, seg, lo, hi)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5


def test_flash_under_a_mesh_it_cannot_split(fresh_log):
  q, k, v, seg, lo, hi = inputs(kv_heads=1)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="kv heads 1 must both split"):
      attend(q, k, v, seg, lo, hi, impl="flash")
  with jax.set_mesh(tpu_mesh("v5e", (2, 1, 2))):  # a TPU target: auto would pick flash
    assert attention._resolve("auto", q, k, v, lo, hi) == "dense"
  assert "kv heads 1 must both split" in fresh_log.records[-1].getMessage()


def test_target_platform_follows_the_mesh(fresh_log, monkeypatch):
  """Under a mesh of described TPU chips (on this CPU host) auto picks flash and flash's
  interpret default is off; a mesh of CPU devices keeps dense even if the backend says tpu."""
  q, k, v, seg, lo, hi = inputs()
  assert flash.target_platform() == "cpu" and flash._default_interpret()
  with jax.set_mesh(tpu_mesh("v5e", (2, 1, 2))):
    assert flash.target_platform() == "tpu"
    assert not flash._default_interpret()
    assert attention._resolve("auto", q, k, v, lo, hi) == "flash"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with jax.set_mesh(Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))):
    assert flash.target_platform() == "cpu"
    assert attention._resolve("auto", q, k, v, lo, hi) == "dense"
  messages = [r.getMessage() for r in fresh_log.records]
  assert messages == ["attention impl=auto -> flash (target platform is tpu)",
                      "attention impl=auto -> dense (target platform is cpu; the flash kernel "
                      "runs natively on TPU only)"]


@pytest.mark.parametrize("impl,args,message", [
    ("flash", lambda q, k, v: (q[:, :1], k, v), "must share"),
    ("flash", lambda q, k, v: (q[:, :, :3], k, v), "must divide query heads"),
    ("flash", lambda q, k, v: (q.astype(jnp.float16), k, v), "float32 or bfloat16"),
    ("splash", lambda q, k, v: (q[:, :, :3], k, v), "must divide query heads"),
    ("nope", lambda q, k, v: (q, k, v), "not available"),
])
def test_explicit_impl_that_cannot_serve_raises(impl, args, message):
  q, k, v, seg, lo, hi = inputs()
  with pytest.raises(ValueError, match=message):
    attend(*args(q, k, v), seg, lo, hi, impl=impl)


def test_splash_refuses_traced_and_per_example_windows():
  q, k, v, seg, lo, hi = inputs()
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda *a: attend(*a, impl="splash"))(q, k, v, seg, lo, hi)
  hi[1, 4:40] = 71
  with pytest.raises(ValueError, match="one static window layout"):
    attend(q, k, v, seg, lo, hi, impl="splash")
