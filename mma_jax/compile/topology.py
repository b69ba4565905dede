"""TPU slices as Cloud TPU names them, described without a chip (libtpu compiles for them).

    describe("v5p-256")   -> Slice(generation v5p, 128 chips, topology "4x4x8", 95 GiB HBM)
    slice.devices()       -> the 128 described devices (jax.experimental.topologies)

Cloud TPU counts TensorCores in v4 and v5p names (two per chip: v5p-256 is 128 chips) and chips in
v5e and v6e names (v5litepod-16 / v5e-16: 16 chips). JAX shows one device per chip on all four
(v4 and v5p as megacore), so a mesh over a slice has `chips` devices. The raw libtpu form
("v5p:4x4x8") is accepted too.
"""
from __future__ import annotations

import dataclasses
import math
import re

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str               # libtpu's topology prefix
  aliases: tuple[str, ...]
  cores_per_name_unit: int  # TensorCores per chip counted in the Cloud TPU name (1: chips)
  dims: int               # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  hbm_bytes: int          # per chip (Cloud TPU system architecture pages)
  chip_config: str        # libtpu chip config giving one device per chip


GENERATIONS = (
    Generation("v4", ("v4",), 2, 3, 32 * GiB, "megacore"),
    Generation("v5e", ("v5e", "v5litepod"), 1, 2, 16 * GiB, "default"),
    Generation("v5p", ("v5p",), 2, 3, 95 * GiB, "default"),
    Generation("v6e", ("v6e",), 1, 2, 32 * GiB, "default"),
)
_BY_ALIAS = {alias: g for g in GENERATIONS for alias in g.aliases}


class TopologyError(ValueError):
  """A topology name that is not a TPU slice we can describe."""


def known_names() -> str:
  return ("v4-8 .. v4-4096, v5e-1 .. v5e-256 (or v5litepod-N), v5p-8 .. v5p-8192 (powers of two), "
          "v6e-1 .. v6e-256, or libtpu's form such as v5p:4x4x8")


def _shape(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: double the smallest dimension (the last of equals)
  from 1x1 (2-D: 2x2, 2x4, 4x4, ... 16x16) or 2x2x1 (3-D: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips is not a power of two")
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  if chips < math.prod(shape):
    raise TopologyError("3-D slices start at 4 chips (2x2x1)")
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  generation: Generation
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    return "x".join(map(str, self.shape))

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes

  def devices(self):
    """The described devices, one per chip (needs libtpu; no TPU, no network)."""
    from jax.experimental import topologies

    from mma_jax.platform import quiet_deviceless_tpu

    quiet_deviceless_tpu(f"{self.generation.name}:{self.topology}")
    shape3 = self.shape + (1,) * (3 - len(self.shape))
    host = tuple(min(s, b) for s, b in zip(shape3, (2, 2, 1)))   # 4 chips per host
    return topologies.get_topology_desc(
        platform="tpu", topology_name=f"{self.generation.name}:{self.topology}",
        chip_config_name=self.generation.chip_config, chips_per_host_bounds=host,
        num_slices=1, wrap=(False, False, False)).devices


def describe(name: str) -> Slice:
  """'v5p-256', 'v5litepod-16', 'v6e-256', 'v4-128' or 'v5p:4x4x8' -> Slice."""
  raw = re.fullmatch(r"(v\w+?):(\d+(?:x\d+){1,2})", name)
  if raw:
    generation = _BY_ALIAS.get(raw.group(1))
    shape = tuple(int(s) for s in raw.group(2).split("x"))
    if generation is None or len(shape) != generation.dims:
      raise TopologyError(f"unknown topology {name!r}; known: {known_names()}")
    return Slice(name, generation, shape)
  cloud = re.fullmatch(r"(v\w+?)-(\d+)", name)
  generation = _BY_ALIAS.get(cloud.group(1)) if cloud else None
  if generation is None:
    raise TopologyError(f"unknown topology {name!r}; known: {known_names()}")
  units = int(cloud.group(2))
  chips, rest = divmod(units, generation.cores_per_name_unit)
  try:
    if rest:
      raise TopologyError(f"{generation.name} names count TensorCores, 2 per chip")
    return Slice(name, generation, _shape(chips, generation.dims))
  except TopologyError as e:
    raise TopologyError(f"unknown topology {name!r} ({e}); known: {known_names()}") from None
