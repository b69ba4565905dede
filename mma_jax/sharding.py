"""Device meshes, the one logical-axis rules table, sharded creation, multi-host start-up.

Parameters and activations carry logical axis names (models/); `RULES` maps each name to mesh
axes. A mesh axis is used at most once per array (the first logical axis claiming it wins); a
dimension takes the longest prefix of its mesh axes that divides it, and stays replicated when
none does, so any model fits any mesh.

The FSDP devices form two mesh axes, `fsdp` x `fsdp_transpose` (the config's `mesh.fsdp` is their
product): a weight whose first dimension does not divide by every FSDP device (SigLIP's width
1152 on 256 chips) shards that dimension over `fsdp` and its other dimension over
`fsdp_transpose`. `mesh.fsdp_transpose: 0` picks the split that minimises the bytes a device
holds of the model's parameters (1, the plain layout, whenever every weight divides).

    python -m mma_jax.sharding describe configs/X.yaml mesh.fsdp=256 ...
prints the plan per parameter group and ends with `per_device_bytes=<int>`; it needs no devices.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mma_jax.config import ConfigError, MeshConfig
from mma_jax.platform import distributed_cluster, on_tpu_host

MESH_AXES = ("data", "fsdp", "fsdp_transpose", "tensor")
BATCH = ("data", "fsdp", "fsdp_transpose")
_FSDP = ("fsdp", "fsdp_transpose")
_SPLIT = ("tensor", "fsdp_transpose")   # a weight's output-side dim: tensor, else FSDP's 2nd factor

# logical axis -> mesh axes (or None: replicated). Parameters and activations share the table.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH),
    ("layers", None),
    ("length", None),
    ("vocab", _SPLIT),
    ("embed", _FSDP),
    ("heads", _SPLIT),
    ("kv_heads", _SPLIT),
    ("mlp", _SPLIT),
    ("vision_embed", _FSDP),
    ("vision_heads", _SPLIT),
    ("vision_mlp", _SPLIT),
    ("connector_heads", _SPLIT),
    ("connector_mlp", _SPLIT),
)
_RULES = dict(RULES)


# ------------------------------------------------------------------------------------------- mesh
def mesh_shape(cfg: MeshConfig, num_devices: int,
               params: Iterable[tuple[tuple[int, ...], tuple, int]] | None = None) -> dict[str, int]:
  """Axis sizes of MESH_AXES with the -1 axis resolved; refuses shapes that do not use every
  device. `params` ((shape, logical axes, itemsize) per parameter) lets fsdp_transpose=0 choose."""
  sizes = {name: getattr(cfg, name) for name in ("data", "fsdp", "tensor")}
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
  fsdp, inner = sizes["fsdp"], cfg.fsdp_transpose
  if inner and fsdp % inner:
    raise ConfigError(f"config key 'mesh.fsdp_transpose': {inner} does not divide "
                      f"mesh.fsdp={fsdp}")
  if not inner:
    inner = best_fsdp_transpose(sizes, list(params or ()))
  return {"data": sizes["data"], "fsdp": fsdp // inner, "fsdp_transpose": inner,
          "tensor": sizes["tensor"]}


def best_fsdp_transpose(sizes: Mapping[str, int], params: list) -> int:
  """The smallest fsdp_transpose factor of sizes["fsdp"] whose per-device parameter bytes are
  within 1% of the fewest any factor gives: a split only where it saves real memory (any split
  shards a few more biases), so a model whose weights all divide keeps the plain layout."""
  fsdp = sizes["fsdp"]

  def device_bytes(inner):
    split = {**sizes, "fsdp": fsdp // inner, "fsdp_transpose": inner}
    return sum(math.prod(shard_shape(shape, logical_to_spec(axes, shape, split), split)) * size
               for shape, axes, size in params)

  costs = {f: device_bytes(f) for f in range(1, fsdp + 1) if fsdp % f == 0}
  return min(f for f, cost in costs.items() if cost <= 1.01 * min(costs.values()))


def param_shapes(state) -> list[tuple[tuple[int, ...], tuple, int]]:
  """(shape, logical axes, itemsize) of every nnx Variable of an (abstract) state."""
  out = []
  for _, variable in nnx.to_flat_state(state):
    value = variable.get_value()
    axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * value.ndim)
    out.append((tuple(value.shape), axes, np.dtype(value.dtype).itemsize))
  return out


def mesh_text(sizes: Mapping[str, int]) -> str:
  """'data=1 fsdp=128 fsdp_transpose=2 tensor=1' (fsdp_transpose shown only when it splits)."""
  return " ".join(f"{a}={sizes[a]}" for a in MESH_AXES
                  if a != "fsdp_transpose" or sizes.get(a, 1) > 1)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None, *,
              params=None) -> Mesh:
  """A (data, fsdp, fsdp_transpose, tensor) mesh with Auto axes (jax.make_mesh would default to
  Explicit). params: the model's abstract state, for fsdp_transpose=0 (models.model_mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices), None if params is None else param_shapes(params))
  grid = np.asarray(devices).reshape(tuple(shape[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------- specs
def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int],
                    sizes: Mapping[str, int]) -> P:
  """Logical axis names of an array of `shape` -> PartitionSpec on a mesh of axis `sizes`."""
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    mesh_axes = _RULES.get(name) if name else None
    names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    names = tuple(n for n in names if n not in used and sizes.get(n, 1) > 1)
    while names and dim % math.prod(sizes[n] for n in names):
      names = names[:-1]
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The block of `shape` one device holds under `spec`."""
  def ways(entry):
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(sizes[n] for n in names)
  return tuple(d // ways(e) for d, e in zip(shape, tuple(spec) + (None,) * len(shape)))


def constrain(x, axes: Sequence[str | None]):
  """An array pinned to its logical axes on the context mesh (jax.set_mesh): dims the rules
  shard are sharded, the rest replicated. Without a mesh of ours (plain jit, CPU tests), or
  inside shard_map: x itself.

  The partitioner, left alone, may replicate a whole branch over the batch shards (SigLIP on
  every image of the global batch when its weights are FSDP-sharded): batch on (data, fsdp,
  fsdp_transpose) at a branch's entry and in each layer keeps every device on its own rows."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names or mesh.manual_axes:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, dict(mesh.shape)))


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


def batch_shards(mesh: Mesh | None) -> int:
  """How many ways the batch splits on `mesh` (1 without one)."""
  return 1 if mesh is None else math.prod(mesh.shape.get(a, 1) for a in BATCH)


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
  # The planner lives above models and train (mma_jax/compile); this keeps its documented name.
  from mma_jax.compile.planner import main

  raise SystemExit(main())
