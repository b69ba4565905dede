"""The programs train.py and eval.py run, traced on a mesh from shapes alone (no arrays, no chips).

    traced = trace_program(config, mesh, "train")       # jax.stages.Traced
    compiled = traced.lower().compile()                  # XLA (+ Mosaic for the flash kernel)

`train` is `train/step.py`'s sharded step on the config's global batch, state donated, exactly as
the loop jits it; `prefill` and `decode` are `generate.jit_programs` on the eval shapes (eval
batch rounded up to the batch shards, a left-padded prompt of `prompt_length` tokens with
`images` images, `max_new_tokens` new tokens; greedy, as evaluation decodes).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mma_jax.config import Config
from mma_jax.data.pipeline import batch_shapes
from mma_jax.generate import (PROMPT_FIELDS, SamplingConfig, carry_shardings, controls_for,
                              jit_programs, round_up)
from mma_jax.models import build_model
from mma_jax.sharding import batch_sharding, batch_shards, tree_shardings
from mma_jax.train.state import abstract_train_state
from mma_jax.train.step import check_batch_split, make_train_step, sharded_train_step

PROGRAMS = ("train", "prefill", "decode")
STOP_SLOTS = 8   # controls_for pads the stop ids to a multiple of 8: one slot group compiles


@dataclasses.dataclass(frozen=True)
class EvalShapes:
  batch: int            # rows, a multiple of the batch shards
  prompt_length: int    # left-padded prompt tokens (image tokens included)
  images: int           # image slots per prompt
  max_new_tokens: int


def eval_shapes(config: Config, mesh: Mesh, *, prompt_length: int | None = None,
                images: int = 1) -> EvalShapes:
  """eval.py's shapes for the config: eval.batch_size rounded up to the batch shards (as the
  Generator pads), the prompt bucketed to 64 (default: data.max_length), eval.max_new_tokens."""
  shards = batch_shards(mesh)
  length = prompt_length or config.data.max_length
  return EvalShapes(batch=round_up(config.eval.batch_size, shards),
                    prompt_length=round_up(length, 64), images=images,
                    max_new_tokens=config.eval.max_new_tokens)


def _abstract(shapes: dict, mesh: Mesh) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _replicated(tree, mesh: Mesh):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=NamedSharding(mesh, P())), tree)


def trace_train(config: Config, mesh: Mesh):
  check_batch_split(config.train, mesh)
  graphdef, state, optimizer = abstract_train_state(config, mesh)
  batch = _abstract(batch_shapes(config, batch_size=config.train.batch_size), mesh)
  jitted = sharded_train_step(make_train_step(graphdef, optimizer, config.train), state, mesh,
                              batch)
  with jax.set_mesh(mesh):
    return jitted.trace(state, batch), batch


def _eval_arguments(config: Config, mesh: Mesh, shapes: EvalShapes):
  """(graphdef, abstract model state, prompt batch, rng, controls) as the Generator holds them."""
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, tree_shardings(state, mesh))
  b, length = shapes.batch, shapes.prompt_length
  fields = {name: ((b, length), np.dtype(np.int32)) for name in PROMPT_FIELDS}
  if config.model.kind == "mllm":
    size = config.data.image_size or config.model.vision.image_size
    fields["images"] = ((b, shapes.images, size, size, 3), np.dtype(np.float32))
    fields["image_valid"] = ((b, shapes.images), np.dtype(bool))
  controls, _ = controls_for(SamplingConfig(max_new_tokens=shapes.max_new_tokens),
                             tuple(range(STOP_SLOTS)))
  rng = _replicated(jax.random.PRNGKey(0), mesh)      # the Generator's raw uint32[2] key
  return graphdef, state, _abstract(fields, mesh), rng, _replicated(controls, mesh)


def trace_prefill(config: Config, mesh: Mesh, shapes: EvalShapes):
  graphdef, state, batch, rng, controls = _eval_arguments(config, mesh, shapes)
  prefill, _ = jit_programs(graphdef, mesh)
  with jax.set_mesh(mesh):
    traced = prefill.trace(state, batch, rng, controls,
                           cache_length=shapes.prompt_length + shapes.max_new_tokens,
                           max_new_tokens=shapes.max_new_tokens, greedy=True)
  return traced, (batch, rng, controls)


def trace_decode(config: Config, mesh: Mesh, shapes: EvalShapes):
  graphdef, state, batch, rng, controls = _eval_arguments(config, mesh, shapes)
  prefill, decode = jit_programs(graphdef, mesh)
  cache_length = shapes.prompt_length + shapes.max_new_tokens
  with jax.set_mesh(mesh):
    _, carry = jax.eval_shape(
        lambda *a: prefill(*a, cache_length=cache_length, max_new_tokens=shapes.max_new_tokens,
                           greedy=True), state, batch, rng, controls)
    carry = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         carry, carry_shardings(carry, mesh))
    until = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return decode.trace(state, carry, until, controls, greedy=True), (carry, until, controls)


def trace_program(config: Config, mesh: Mesh, program: str, *, prompt_length: int | None = None,
                  images: int = 1):
  """(traced program (jax.stages.Traced) `program` of PROGRAMS on `mesh`, its inputs besides
  the model state: the batch, or the decode loop's state, as sharded ShapeDtypeStructs)."""
  if program == "train":
    return trace_train(config, mesh)
  shapes = eval_shapes(config, mesh, prompt_length=prompt_length, images=images)
  trace = {"prefill": trace_prefill, "decode": trace_decode}[program]
  return trace(config, mesh, shapes)
