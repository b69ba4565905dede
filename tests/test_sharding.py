"""Sharding over 8 fake CPU devices: one training step equals the single-device step."""
import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mma_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from mma_jax.sharding import (global_batch, logical_to_spec, make_mesh,
                              mesh_shape)
from mma_jax.train.state import init_train_state, per_device_bytes
from mma_jax.train.step import jit_train_step, make_train_step
from mma_jax.train.loss import token_loss_sums
from test_mllm import tiny_mllm_config

B, L = 8, 16


def tiny_config(**train) -> Config:
  return Config(model=tiny_mllm_config(),
                train=TrainConfig(batch_size=B, steps=10, warmup_steps=2, **train))


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  index = np.full((B, L), -1, np.int32)
  index[:, 1:4] = np.arange(3)
  lo, hi = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
  lo[:, 1:4], hi[:, 1:4] = 4, 9
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[:, 9:13] = 1
  return {"tokens": rng.integers(1, 64, (B, L)).astype(np.int32),
          "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
          "segment_ids": np.ones((B, L), np.int32), "window_lo": lo, "window_hi": hi,
          "targets": rng.integers(0, 64, (B, L)).astype(np.int32), "loss_mask": loss_mask,
          "image_token_index": index,
          "images": rng.standard_normal((B, 1, 16, 16, 3)).astype(np.float32),
          "image_valid": np.ones((B, 1), bool)}


def loss_and_grads(config, mesh):
  graphdef, state, _ = init_train_state(config, mesh)

  def loss(params, frozen, batch):
    total, count, _ = token_loss_sums(nnx.merge(graphdef, params, frozen), batch)
    return total / count

  fn = jax.jit(jax.value_and_grad(loss))
  batch = make_batch() if mesh is None else global_batch(make_batch(), mesh)
  if mesh is None:
    return fn(state["params"], state["frozen"], batch)
  with jax.set_mesh(mesh):
    return fn(state["params"], state["frozen"], batch)


@functools.cache
def single_device_loss_and_grads():
  return loss_and_grads(tiny_config(), None)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_loss_and_gradients_match_single_device(shape):
  ref_loss, ref_grads = single_device_loss_and_grads()
  loss, grads = loss_and_grads(tiny_config(), make_mesh(MeshConfig(*shape)))
  assert abs(float(loss) - float(ref_loss)) <= 1e-5
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0)


def test_sharded_train_step_matches_single_device():
  config = tiny_config()
  results = []
  for mesh in (None, make_mesh(MeshConfig(2, 2, 2))):
    graphdef, state, optimizer = init_train_state(config, mesh)
    batch = make_batch() if mesh is None else global_batch(make_batch(), mesh)
    step = jit_train_step(make_train_step(graphdef, optimizer, config.train), state, mesh, batch)
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state["params"])))
  assert abs(results[0][0] - results[1][0]) <= 1e-5
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_fsdp8_splits_params_and_adam_state_eight_ways():
  config = Config(model=dataclasses.replace(
      tiny_mllm_config(), llm=dataclasses.replace(tiny_mllm_config().llm, hidden_size=64,
                                                  intermediate_size=128, vocab_size=256)),
      train=TrainConfig(batch_size=B))
  mesh = make_mesh(MeshConfig(1, 8, 1))
  _, state, _ = init_train_state(config, mesh)
  params, opt = state["params"], state["opt_state"]
  for leaf in jax.tree.leaves(params):
    if leaf.size >= 1024:  # every large parameter is split 8 ways
      assert int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * 8 == leaf.size, leaf.shape
  for tree in (params, opt):
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    assert abs(per_device_bytes(tree) - total / 8) <= 0.05 * total / 8


def test_rules_replicate_what_does_not_divide_and_use_an_axis_once():
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  assert logical_to_spec(("embed", "mlp"), (64, 96), sizes) == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  assert logical_to_spec(("embed", "mlp"), (6, 96), sizes) == jax.sharding.PartitionSpec(
      None, "tensor")
  # the projection maps vision_embed and embed, both to fsdp: only the first gets it
  assert logical_to_spec(("vision_embed", "embed"), (64, 64), sizes) == (
      jax.sharding.PartitionSpec("fsdp", None))
  assert logical_to_spec(("batch", None), (8, 3), sizes) == jax.sharding.PartitionSpec("fsdp", None)



def test_fsdp_splits_in_two_where_a_weight_does_not_divide():
  """SigLIP's width 1152 on 256 FSDP devices: 1152 takes fsdp=128, the weight's other dim the
  remaining fsdp_transpose=2; a weight that divides 256 ways keeps both on one dim."""
  sizes = {"data": 1, "fsdp": 128, "fsdp_transpose": 2, "tensor": 1}
  assert logical_to_spec(("vision_embed", "vision_mlp"), (1152, 4304), sizes) == (
      jax.sharding.PartitionSpec("fsdp", "fsdp_transpose"))
  assert logical_to_spec(("embed", "mlp"), (3072, 8192), sizes) == (
      jax.sharding.PartitionSpec(("fsdp", "fsdp_transpose"), None))
  params = [((27, 1152, 4304), ("layers", "vision_embed", "vision_mlp"), 4),
            ((3072, 8192), ("embed", "mlp"), 4), ((1152,), ("vision_embed",), 4)]
  assert mesh_shape(MeshConfig(1, 256, 1), 256, params)["fsdp_transpose"] == 2
  assert mesh_shape(MeshConfig(1, 128, 1), 128, params)["fsdp_transpose"] == 1   # 1152 = 128 x 9


def test_mesh_shape_errors_name_the_key():
  assert mesh_shape(MeshConfig(2, -1, 2), 8) == {"data": 2, "fsdp": 2, "fsdp_transpose": 1,
                                                 "tensor": 2}
  assert mesh_shape(MeshConfig(1, 8, 1, fsdp_transpose=2), 8)["fsdp_transpose"] == 2
  with pytest.raises(ConfigError, match="mesh.fsdp_transpose.*3 does not divide mesh.fsdp=8"):
    mesh_shape(MeshConfig(1, 8, 1, fsdp_transpose=3), 8)
  with pytest.raises(ConfigError, match="mesh.fsdp.*cannot fill 8 devices"):
    mesh_shape(MeshConfig(3, -1, 1), 8)
  with pytest.raises(ConfigError, match="= 4 but 8 devices"):
    mesh_shape(MeshConfig(2, 2, 1), 8)
