"""Device meshes, the one logical-axis rules table, sharded creation, multi-host start-up.

Parameters carry logical axis names (models/layers.py); `RULES` maps each name to a mesh axis.
A mesh axis is used at most once per array (the first logical axis claiming it wins) and a
dimension that does not divide evenly stays replicated, so any model fits any mesh.

    python -m mma_jax.sharding describe configs/X.yaml mesh.fsdp=256 ...
prints the plan per parameter group and ends with `per_device_bytes=<int>`; it needs no devices.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mma_jax.config import ConfigError, MeshConfig
from mma_jax.platform import distributed_cluster, on_tpu_host

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis -> mesh axis (or None: replicated). Parameters and activations share the table.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH),
    ("layers", None),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("connector_heads", "tensor"),
    ("connector_mlp", "tensor"),
)
_RULES = dict(RULES)


# ------------------------------------------------------------------------------------------- mesh
def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with the -1 axis resolved; refuses shapes that do not use every device."""
  sizes = {name: getattr(cfg, name) for name in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if num_devices % fixed:
        raise ConfigError(f"config key 'mesh.{name}': -1 cannot fill {num_devices} devices "
                          f"when the other axes multiply to {fixed}")
      sizes[name] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config key 'mesh': data x fsdp x tensor = "
                      f"{' x '.join(map(str, sizes.values()))} = {math.prod(sizes.values())} "
                      f"but {num_devices} devices are available")
  return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (jax.make_mesh would default to Explicit)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  grid = np.asarray(devices).reshape(tuple(shape[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------- specs
def _size(mesh_axes, sizes: Mapping[str, int]) -> int:
  names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return math.prod(sizes[n] for n in names)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int],
                    sizes: Mapping[str, int]) -> P:
  """Logical axis names of an array of `shape` -> PartitionSpec on a mesh of axis `sizes`."""
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    mesh_axes = _RULES.get(name) if name else None
    names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    names = tuple(n for n in names if n not in used and sizes.get(n, 1) > 1)
    if not names or dim % _size(names, sizes):
      out.append(None)
      continue
    used.update(names)
    out.append(names[0] if len(names) == 1 else names)
  return P(*out)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of nnx Variables (by their logical axes; same structure) and
  plain arrays (replicated: step counters, schedules' counts)."""
  sizes = dict(mesh.shape)

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value()
      if not hasattr(value, "shape"):  # optax's MaskedNode: a placeholder without arrays
        return leaf
      axes = tuple(leaf.get_metadata().get("out_sharding") or ())
      return leaf.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, sizes)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build, mesh: Mesh) -> nnx.Module:
  """build() run under jit with sharded outputs: every parameter is born on its devices, never
  materialised whole on one."""
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = tree_shardings(abstract_state, mesh)

  @jax.jit
  def init():
    return nnx.state(build())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-contract arrays: leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


# ------------------------------------------------------------------------------------ multi-host
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-process JAX; call it before anything touches the devices. On TPU VMs every
  argument is discovered automatically, and so under Open MPI, SLURM or Kubernetes (with the
  `kubernetes` package), as jax finds them; other clusters pass the coordinator address, process
  count and this process's id. Without arguments anywhere else: one process, at once."""
  if coordinator is None and num_processes is None:
    # Asking jax.default_backend() would start the backend, after which jax.distributed refuses
    # to initialise: decide from local facts (TPU device files, the environment), never from the
    # network, and only then let jax find the pod slice or cluster.
    if not (on_tpu_host() or distributed_cluster()):
      return
    try:
      jax.distributed.initialize()
    except ValueError:  # no cluster found (jax asks for a coordinator address): one process
      pass
    return
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of every batch field -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0


if __name__ == "__main__":
  from mma_jax.sharding_describe import main  # the planner imports models: kept off this module's path

  raise SystemExit(main())
