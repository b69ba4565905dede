"""Building blocks shared by the LLM, the vision towers and the connectors.

Every parameter carries logical axis names (DESIGN.md §5) as flax `out_sharding` metadata with eager
sharding off: the names are mapped to mesh axes by the one rules table in sharding.py, never here.
Kernels are stored [in, out] (HF stores [out, in]; convert/ transposes).
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from mma_jax.models import lora as lora_lib
from mma_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
  """A parameter initialised by `init` with its logical axis names attached."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] with logical axes (in_axis, out_axis).

  lora: a LoraSpec adds the adapter lora_a [in, r] (in_axis, None), lora_b [r, out] (None,
  out_axis) to the output (models/lora.py); None: a plain Linear with no extra parameters."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, lora: lora_lib.LoraSpec | None = None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(init_std), (in_features, out_features),
                        axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
                 if use_bias else None)
    self.lora = lora
    if lora is not None:
      self.lora_a = param(rngs, lora_lib.init_a, (in_features, lora.rank), (axes[0], None),
                          param_dtype)
      self.lora_b = param(rngs, nnx.initializers.zeros, (lora.rank, out_features),
                          (None, axes[1]), param_dtype)

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + lora_lib.adapter_delta(x, self.lora_a[...], self.lora_b[...], self.lora,
                                     self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, statistics in f32 (as HF Llama/Qwen2/Phi3)."""

  def __init__(self, dim: int, *, eps: float, axis: str = "embed", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis,), param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with scale and bias, statistics in f32."""

  def __init__(self, dim: int, *, eps: float, axis: str = "embed", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis,), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis,), param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            ).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding table [V, E]; `attend` gives tied-head logits."""

  def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, nnx.initializers.normal(init_std), (vocab_size, dim),
                           ("vocab", "embed"), param_dtype)

  def __call__(self, tokens):
    # Gathered whole before the lookup, as FSDP gathers every weight before use: left free, the
    # partitioner gathers the token ids of the global batch instead and looks them all up in
    # each device's slice of the table.
    table = constrain(self.embedding[...].astype(self.dtype), (None, None))
    return jnp.take(table, tokens, axis=0)

  def attend(self, x):
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs):
  """`num_layers` independent layers built by make_layer(rngs), their parameters stacked on a
  leading `layers` axis: one layout serves both the scanned and the unrolled forward."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(layer_rngs):
    return make_layer(layer_rngs)

  return build(rngs)


# What the backward pass keeps of each layer's forward (the rest is recomputed): nothing but the
# layer input ("full"), every matmul output ("dots"), or the weight matmuls only, not the
# batch-dimension ones such as attention scores ("dots_no_batch").
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_stacked(layers, carry, step, xs=None, *, num_layers: int, scan: bool,
                 remat: str = "none"):
  """(carry, ys): carry, y_i <- step(layer_i, carry, x_i) over the first `num_layers` layers, with
  optional per-layer inputs `xs` and outputs `ys` stacked on a leading axis.

  layers: the stacked module, or a list of per-layer modules from `unstack` (always unrolled).
  scan=True runs one lax.scan over the stacked parameters (compile time independent of depth);
  scan=False unrolls a Python loop over slices of the same parameters (identical results).
  remat: "none" or a REMAT_POLICIES name, applied to each layer (trades compute for memory).
  """
  if isinstance(layers, nnx.Module):
    graphdef, state = nnx.split(layers)
    state = jax.tree.map(lambda a: a[:num_layers], state)
    layer_state = lambda i: jax.tree.map(lambda a: a[i], state)
  else:
    graphdef, scan = nnx.graphdef(layers[0]), False
    layer_state = lambda i: nnx.state(layers[i])

  # LoRA dropout (a training step's scope only) draws other masks in every layer: the layer
  # index rides along as a scan input. Without the scope the program is unchanged.
  indexed = lora_lib.dropout_active()

  def body(carry, inputs):
    layer_state, x, *index = inputs
    with lora_lib.layer_scope(index[0]) if indexed else contextlib.nullcontext():
      return step(nnx.merge(graphdef, layer_state), carry, x)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  extra = (jnp.arange(num_layers),) if indexed else ()
  if scan:
    return jax.lax.scan(body, carry, (state, xs, *extra))
  ys = []
  for i in range(num_layers):
    carry, y = body(carry, (layer_state(i), jax.tree.map(lambda a: a[i], xs),
                            *(e[i] for e in extra)))
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None   # 0 layers: none


def apply_stacked(layers: nnx.Module, x, step, *, num_layers: int, scan: bool,
                  remat: str = "none"):
  """x <- step(layer_i, x) for the first `num_layers` stacked layers (scan_stacked without
  per-layer inputs or outputs)."""
  x, _ = scan_stacked(layers, x, lambda layer, h, _: (step(layer, h), None),
                      num_layers=num_layers, scan=scan, remat=remat)
  return x


def stacked_layer(layers: nnx.Module, index: int) -> nnx.Module:
  """Layer `index` of a stack as a module of its own (its parameter slices)."""
  graphdef, state = nnx.split(layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def unstack(layers: nnx.Module, num_layers: int) -> list[nnx.Module]:
  """The first `num_layers` layers of a stack as separate modules. For a jitted loop, take them
  before the loop: CPU XLA copies a slice of the stacked weights each time the loop body runs (a
  decode step would read every weight twice), a slice taken before the loop only once."""
  return [stacked_layer(layers, i) for i in range(num_layers)]
