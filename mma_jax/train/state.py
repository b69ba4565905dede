"""The train state and its shardings.

    state = {"step": int32 [], "params": trainable nnx.State, "frozen": nnx.State,
             "opt_state": optax state over params}

The frozen vision tower lives in `frozen`: outside the gradient and the optimizer. Under LoRA
(model.lora.rank > 0) so does the whole base model: `params` holds the adapters and the modules
model.lora.trainable names, `frozen` the rest, stored in model.lora.base_dtype. Parameters and
Adam moments carry the same logical axes, so one rules table shards both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mma_jax.config import Config
from mma_jax.models import build_model
from mma_jax.models.lora import ADAPTER_NAMES, trainable_prefix
from mma_jax.sharding import create_sharded, tree_shardings
from mma_jax.train.optimizer import make_optimizer


def _under(prefix: tuple[str, ...]):
  return lambda path, _: tuple(str(k) for k in path[:len(prefix)]) == prefix


def trainable_filter(config: Config):
  """Parameters the optimizer sees: all but the vision tower when it is frozen; under LoRA the
  adapters and the modules model.lora.trainable names."""
  m = config.model
  if m.lora.enabled:
    parts = [nnx.PathContains(name) for name in ADAPTER_NAMES]
    parts += [_under(trainable_prefix(m.kind, name)) for name in m.lora.trainable]
    return nnx.All(nnx.Param, nnx.Any(*parts))
  if m.kind == "mllm" and m.freeze_vision:
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")))
  return nnx.Param


def split_model(model: nnx.Module, config: Config):
  """(graphdef, trainable State, frozen State); under LoRA the frozen base in its base_dtype
  (arrays, or ShapeDtypeStructs of an abstract model)."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(config), ...)
  lora = config.model.lora
  if lora.enabled and lora.base_dtype not in ("", config.model.param_dtype):
    frozen = cast_state(frozen, jnp.dtype(lora.base_dtype))
  return graphdef, params, frozen


def cast_state(state, dtype):
  """Every floating leaf of `state` in `dtype` (abstract leaves keep their sharding)."""
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(cast, state)


def init_train_state(config: Config, mesh: Mesh | None = None, model: nnx.Module | None = None):
  """(graphdef, state, optimizer). The model is built from config.train.seed (or given, e.g.
  from a converted checkpoint); under a mesh every array is born sharded."""
  if model is None:
    build = lambda: build_model(config, nnx.Rngs(config.train.seed))
    model = create_sharded(build, mesh) if mesh is not None else build()
  graphdef, params, frozen = split_model(model, config)
  optimizer = make_optimizer(config.train)
  init = lambda p: optimizer.init(p)
  if mesh is not None:
    abstract = jax.eval_shape(init, params)
    with jax.set_mesh(mesh):
      opt_state = jax.jit(init, out_shardings=tree_shardings(abstract, mesh))(params)
  else:
    opt_state = init(params)
  step = jnp.zeros((), jnp.int32)
  if mesh is not None:  # placed as the jitted step returns it, or the step compiles twice
    step = jax.device_put(step, NamedSharding(mesh, P()))
  state = {"step": step, "params": params, "frozen": frozen, "opt_state": opt_state}
  return graphdef, state, optimizer


def abstract_train_state(config: Config, mesh: Mesh):
  """(graphdef, state, optimizer) as init_train_state builds them on `mesh`, with every array a
  ShapeDtypeStruct carrying its sharding: no parameter is ever materialised."""
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.train.seed)))
  graphdef, params, frozen = split_model(model, config)
  optimizer = make_optimizer(config.train)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "frozen": frozen,
           "opt_state": jax.eval_shape(optimizer.init, params)}
  shardings = tree_shardings(state, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, shardings)
  return graphdef, state, optimizer


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded arrays (the largest shard per leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if hasattr(leaf, "sharding") else np.shape(leaf)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total
