"""LoRA adapters (Hu et al. 2021) as PEFT defines them, on our [in, out] kernels:

    y = x W (+ b) + (alpha / r) * (dropout(x) A) B      A [in, r], B [r, out]

A starts as torch's nn.Linear init of PEFT's lora_A (kaiming-uniform with a = sqrt(5): uniform in
+-1/sqrt(in)), B at zero, so a fresh adapter leaves every output bitwise unchanged. A carries the
kernel's input axis name and B its output axis name (the rank axis is unsharded), so the one
rules table in sharding.py shards adapters like the weights they adapt. PEFT stores lora_A.weight
[r, in] and lora_B.weight [out, r] (torch layout): convert/peft.py transposes.

Dropout runs only inside `dropout_scope(key)` (the train step opens it): each adapter draws its
mask from the key folded with the layer index (set by layers.scan_stacked) and its own name, so
layers, projections and steps all differ; evaluation and generation never open the scope.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from mma_jax.config import LoraConfig

ADAPTER_NAMES = ("lora_a", "lora_b")
_DROPOUT_KEY = contextvars.ContextVar("lora_dropout_key", default=None)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What one adapted Linear needs: rank, scale, dropout rate and a name for its dropout key."""
  rank: int
  scale: float
  dropout: float
  name: str

  @property
  def key_id(self) -> int:
    return zlib.crc32(self.name.encode())


def spec_for(lora: LoraConfig | None, target: str, name: str, *,
             connector: bool = False) -> LoraSpec | None:
  """The adapter of projection `target` (q, k, ... or a connector projection), or None when the
  config does not adapt it."""
  if lora is None or not lora.enabled:
    return None
  if (lora.connector if connector else target in lora.targets):
    return LoraSpec(lora.rank, lora.alpha / lora.rank, lora.dropout, name)
  return None


def init_a(key, shape, dtype):
  """torch nn.Linear's kaiming_uniform(a=sqrt(5)) of lora_A [r, in], here [(layers,) in, r]."""
  bound = 1.0 / shape[-2] ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def fresh_adapters(shapes, seed: int) -> dict:
  """{path: numpy array} of new adapters for the adapter paths among `shapes` ({path: (shape,
  dtype)}, as convert.transfer.param_shapes gives): A from (seed, path), B zero. Used when the
  base comes from a checkpoint, so no full model is built on the host to initialise them."""
  import numpy as np

  out = {}
  for path, (shape, dtype) in shapes.items():
    if path.endswith(".lora_a"):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()))
      out[path] = np.asarray(init_a(key, shape, jnp.float32)).astype(dtype)
    elif path.endswith(".lora_b"):
      out[path] = np.zeros(shape, dtype)
  return out


def adapter_delta(x, a, b, spec: LoraSpec, dtype):
  """(alpha / r) * (dropout(x) A) B in `dtype`."""
  key = _DROPOUT_KEY.get()
  if key is not None and spec.dropout > 0:
    keep = jax.random.bernoulli(jax.random.fold_in(key, spec.key_id), 1.0 - spec.dropout,
                                x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
  h = jnp.dot(x.astype(dtype), a.astype(dtype))
  return jnp.dot(h, b.astype(dtype)) * jnp.asarray(spec.scale, dtype)


@contextlib.contextmanager
def dropout_scope(key):
  """Adapter dropout on, drawn from `key`, while tracing inside this block."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def dropout_active() -> bool:
  return _DROPOUT_KEY.get() is not None


@contextlib.contextmanager
def layer_scope(index):
  """Inside a scanned/unrolled layer: the dropout key folded with the layer index."""
  key = _DROPOUT_KEY.get()
  if key is None:
    yield
    return
  token = _DROPOUT_KEY.set(jax.random.fold_in(key, index))
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def has_dropout(model: nnx.Module) -> bool:
  return any(getattr(m, "lora", None) is not None and m.lora.dropout > 0
             for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module))


# model.lora.trainable names -> the parameter path prefix each covers (LLM parts sit under
# `llm` in an MLLM, at the top of a text-only model)
_TRAINABLE = {"connector": ("connector",), "embed": ("llm", "embed"),
              "lm_head": ("llm", "lm_head"), "head_bias": ("llm", "head_bias")}


def trainable_prefix(kind: str, name: str) -> tuple[str, ...]:
  """The path prefix of model.lora.trainable's `name` in a model of `kind` (ModelConfig.kind)."""
  path = _TRAINABLE[name]
  return path if kind == "mllm" or name == "connector" else path[1:]


# ------------------------------------------------------------------------ flat parameter dicts
def is_adapter(path: str) -> bool:
  return path.rsplit(".", 1)[-1] in ADAPTER_NAMES


def adapted_kernels(params) -> list[str]:
  """Kernel paths ('x.kernel') that carry adapters in a flat {path: array} dict."""
  return sorted(p[:-len("lora_a")] + "kernel" for p in params if p.endswith(".lora_a"))


def merged(params, lora: LoraConfig) -> dict:
  """{path: array} with every adapter folded into its kernel (W + scale * A @ B, in f32, then the
  wider of the kernel's and the adapter's dtypes: a bf16 base keeps the f32 adapter's precision)
  and the adapter entries dropped: the plain model's parameters."""
  import numpy as np

  scale = lora.alpha / lora.rank
  out = {p: v for p, v in params.items() if not is_adapter(p)}
  for kernel in adapted_kernels(params):
    stem = kernel[:-len("kernel")]
    w = np.asarray(params[kernel])
    a = np.asarray(params[stem + "lora_a"], np.float32)
    b = np.asarray(params[stem + "lora_b"], np.float32)
    # Stacked layers: a [layers, in, r] @ b [layers, r, out] batches over the layer axis.
    dtype = np.promote_types(w.dtype, np.asarray(params[stem + "lora_a"]).dtype)
    out[kernel] = (w.astype(np.float32) + scale * np.matmul(a, b)).astype(dtype)
  return out
