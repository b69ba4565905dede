"""Plans a model's memory on a mesh without the devices:

    python -m mma_jax.sharding describe CONFIG.yaml [--devices N] [section.key=value ...]

prints, for every parameter, its shape, logical axes, PartitionSpec and the bytes one device holds,
subtotals per top-level module, and the per-device estimate: parameters + optimizer state (AdamW's
mu and nu for every trainable parameter, sharded like it) + the train step's batch rows the device
receives (the batch contract; images dominate). The last line is `per_device_bytes=<int>`.
Everything is abstract (nnx.eval_shape, an AbstractMesh): `mesh.fsdp=256` plans on a laptop.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from mma_jax.config import Config, ConfigError, load_config
from mma_jax.data.pipeline import batch_shapes
from mma_jax.models import build_model
from mma_jax.sharding import BATCH, MESH_AXES, logical_to_spec, mesh_shape, mesh_text, param_shapes
from mma_jax.train.state import trainable_filter

USAGE = "usage: python -m mma_jax.sharding describe CONFIG.yaml [--devices N] [section.key=value ...]"
ADAM_MOMENTS = 2  # mu and nu, each shaped, typed and sharded like its parameter (optax's default)


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  path: str
  shape: tuple[int, ...]
  itemsize: int
  axes: tuple[str | None, ...]
  spec: P
  shard_shape: tuple[int, ...]
  trainable: bool

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def device_bytes(self) -> int:
    return math.prod(self.shard_shape) * self.itemsize

  @property
  def optimizer_bytes(self) -> int:
    return ADAM_MOMENTS * self.device_bytes if self.trainable else 0


def mesh_sizes(config: Config, devices: int | None) -> dict[str, int]:
  """Axis sizes from the config alone (fsdp split for the model's weights as a run splits it);
  a -1 axis needs the device count to resolve."""
  given = {name: getattr(config.mesh, name) for name in ("data", "fsdp", "tensor")}
  if devices is None:
    fill = [name for name, size in given.items() if size == -1]
    if fill:
      raise ConfigError(f"config key 'mesh.{fill[0]}' is -1 (the remaining devices): give "
                        f"--devices N, or set every mesh axis, to plan without devices")
    devices = math.prod(given.values())
  abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return mesh_shape(config.mesh, devices, param_shapes(nnx.state(abstract)))


def plan(config: Config, sizes: dict[str, int]) -> list[ParamPlan]:
  """One ParamPlan per variable of the model, from abstract shapes only."""
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  trainable = {path for path, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(config)))}
  mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))
  lora = config.model.lora   # a LoRA run stores its frozen base in lora.base_dtype
  base_dtype = lora.base_dtype if lora.enabled and lora.base_dtype else None
  plans = []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    value = variable.get_value()
    axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * value.ndim)
    spec = logical_to_spec(axes, value.shape, sizes)
    dtype = base_dtype if base_dtype and path not in trainable else value.dtype
    plans.append(ParamPlan(
        path=".".join(map(str, path)), shape=tuple(value.shape),
        itemsize=jnp.dtype(dtype).itemsize, axes=axes, spec=spec,
        shard_shape=tuple(NamedSharding(mesh, spec).shard_shape(value.shape)),
        trainable=path in trainable))
  return plans


def batch_bytes(config: Config, sizes: dict[str, int]) -> int:
  """Bytes of the train step's global batch that one device holds: its rows of every batch-contract
  field (the batch splits over the BATCH axes; a batch smaller than them still puts a row here)."""
  shards = math.prod(sizes.get(a, 1) for a in BATCH)
  rows = -(-config.train.batch_size // shards)
  return sum(math.prod(shape[1:]) * rows * dtype.itemsize
             for shape, dtype in batch_shapes(config, batch_size=1).values())


# ------------------------------------------------------------------------------------- printing
def _bytes(n: int) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def _count(n: int) -> str:
  for unit, scale in (("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def _spec(spec: P) -> str:
  names = ["-" if s is None else s if isinstance(s, str) else "+".join(s) for s in spec]
  return "(" + ", ".join(names) + ")"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def report(config: Config, plans: list[ParamPlan], sizes: dict[str, int]) -> list[str]:
  m = config.model
  devices = math.prod(sizes.values())
  parts = ([f"{m.vision.family} tower"] if m.vision else []) + (
      [f"{m.connector.type} connector"] if m.connector else []) + (
      [f"{m.llm.family} LLM"] if m.kind != "vision" else [])
  if m.kind == "mllm" and m.freeze_vision:
    parts.append("tower frozen")
  lines = [f"model: {m.kind} ({', '.join(parts)}), param_dtype {m.param_dtype}",
           f"mesh: {mesh_text(sizes)} ({devices} devices)", ""]
  lines += _table([("parameter", "shape", "logical axes", "spec", "per device", "")] + [
      (p.path, "x".join(map(str, p.shape)) or "()", _spec(P(*p.axes)), _spec(p.spec),
       _bytes(p.device_bytes), "" if p.trainable else "frozen") for p in plans])

  groups: dict[str, list[ParamPlan]] = {}
  for p in plans:
    groups.setdefault(p.path.split(".")[0], []).append(p)
  rows = [("group", "parameters", "trainable", "params/device", "adam/device")]
  for name, members in [*groups.items(), ("total", plans)]:
    rows.append((name, _count(sum(p.size for p in members)),
                 _count(sum(p.size for p in members if p.trainable)),
                 _bytes(sum(p.device_bytes for p in members)),
                 _bytes(sum(p.optimizer_bytes for p in members))))
  lines += [""] + _table(rows)

  params = sum(p.device_bytes for p in plans)
  optimizer = sum(p.optimizer_bytes for p in plans)
  grads = sum(p.device_bytes for p in plans if p.trainable)
  batch = batch_bytes(config, sizes)
  total = params + optimizer + batch
  lines += ["",
            f"per device: parameters {params:,} B + optimizer state {optimizer:,} B "
            f"(AdamW mu and nu of the trainable parameters, in the parameter dtype) "
            f"+ its rows of the train batch {batch:,} B = {total:,} B ({_bytes(total)})",
            f"not included: gradients during a step (+{_bytes(grads)} per device), activations, "
            f"XLA temporaries, optimizer step counters (a few bytes)",
            f"per_device_bytes={total}"]
  return lines


def describe(path: str, overrides: Sequence[str] = (), devices: int | None = None) -> list[str]:
  config = load_config(path, overrides)
  sizes = mesh_sizes(config, devices)
  return report(config, plan(config, sizes), sizes)


def _parse(args: list[str]) -> tuple[str, list[str], int | None]:
  if not args or args[0] != "describe":
    raise ConfigError(f"expected the command 'describe'; {USAGE}")
  rest, positional, devices = args[1:], [], None
  while rest:
    arg = rest.pop(0)
    if arg == "--devices" or arg.startswith("--devices="):
      text = arg.partition("=")[2] or (rest.pop(0) if rest else "")
      if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--devices expects a positive integer, got {text!r}")
      devices = int(text)
    elif arg.startswith("-"):
      raise ConfigError(f"unknown option {arg!r}; {USAGE}")
    else:
      positional.append(arg)
  if not positional:
    raise ConfigError(f"expected a config file; {USAGE}")
  return positional[0], positional[1:], devices


def main(argv: Sequence[str] | None = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if args and args[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  try:
    path, overrides, devices = _parse(args)
    lines = describe(path, overrides, devices)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0
