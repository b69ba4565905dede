"""The jitted training step: gradient accumulation over micro-batches, exact across packing
(loss = sum of answer-token losses / number of answer tokens, over the whole batch)."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mma_jax.config import ConfigError, TrainConfig
from mma_jax.models import lora
from mma_jax.sharding import batch_sharding, batch_shards, tree_shardings
from mma_jax.train.loss import token_loss_sums
from mma_jax.train.optimizer import learning_rate


def check_batch_split(t: TrainConfig, mesh: Mesh) -> None:
  """ConfigError unless each micro-batch's rows split evenly over the mesh's batch shards."""
  shards = batch_shards(mesh)
  if (t.batch_size // t.grad_accum) % shards:
    raise ConfigError(f"config key 'train.batch_size': {t.batch_size} rows (/ grad_accum "
                      f"{t.grad_accum}) do not split over data x fsdp = {shards} devices")


def make_train_step(graphdef, optimizer: optax.GradientTransformation, t: TrainConfig):
  """step(state, batch) -> (state, metrics); batch fields are [B, ...] with B = t.batch_size."""
  schedule = learning_rate(t)

  def sums(params, frozen, micro, key):
    model = nnx.merge(graphdef, params, frozen)
    # LoRA dropout draws from (train.seed, step, micro-batch); a model without it ignores the key.
    scope = lora.dropout_scope(key) if lora.has_dropout(model) else contextlib.nullcontext()
    with scope:
      total, count, overflow = token_loss_sums(model, micro, loss_positions=t.loss_positions)
    return total, (count, overflow)

  grad_fn = jax.value_and_grad(sums, has_aux=True)

  def step(state, batch):
    params, frozen = state["params"], state["frozen"]
    micro = jax.tree.map(
        lambda x: x.reshape(t.grad_accum, x.shape[0] // t.grad_accum, *x.shape[1:]), batch)

    step_key = jax.random.fold_in(jax.random.PRNGKey(t.seed), state["step"])

    def accumulate(carry, inputs):
      grads, total, count, overflow = carry
      mb, index = inputs
      (s, (n, o)), g = grad_fn(params, frozen, mb, jax.random.fold_in(step_key, index))
      return (jax.tree.map(jnp.add, grads, g), total + s, count + n, overflow + o), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero, jnp.zeros((), jnp.int32))
    (grads, total, count, overflow), _ = jax.lax.scan(accumulate, init,
                                                      (micro, jnp.arange(t.grad_accum)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "frozen": frozen, "opt_state": opt_state}
    metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state["step"]), "answer_tokens": count,
               "loss_overflow": overflow}
    return new_state, metrics

  return step


def sharded_train_step(step, state, mesh: Mesh, batch_example):
  """jax.jit of `step` with explicit shardings: the state per the rules table (donated), the batch
  over the batch axes. Call it (or .trace it) under jax.set_mesh(mesh). The arguments may be
  arrays or ShapeDtypeStructs (mma_jax.compile traces the same program without devices)."""
  state_shardings = tree_shardings(state, mesh)
  batch_shardings = jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), batch_example)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def jit_train_step(step, state, mesh: Mesh | None, batch_example=None):
  """The step as train.py runs it: sharded_train_step entered under its mesh; without a mesh a
  plain jit with donation."""
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  if batch_example is None:
    raise ValueError("jit_train_step under a mesh needs a batch example for the shardings")
  jitted = sharded_train_step(step, state, mesh, batch_example)

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  return run
