"""Moving tensors between an HF checkpoint and our parameters, driven by key-map entries.

Import fills preallocated numpy arrays tensor by tensor in shard order (one HF tensor in flight);
export yields HF tensors one by one for the streaming writer. Every mismatch stops with a message
naming the key: a missing key, an unexpected key, or a shape mismatch with both shapes.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mma_jax.convert.keymap import Entry
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint

log = logging.getLogger(__name__)


def param_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """'a.b.c' -> (shape, dtype) of every parameter; works on nnx.eval_shape'd (abstract) models."""
  return {".".join(map(str, path)): (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _expected_hf_shape(entry: Entry, our_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
  # Run the export hook on zero-strided stand-ins: no memory, exact shape arithmetic.
  stand_ins = tuple(np.broadcast_to(np.zeros((), np.float32), s) for s in our_shapes)
  return tuple(entry.hook.to_hf(stand_ins).shape)


def _slot_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
  return np.broadcast_to(np.zeros((), np.int8), shape)[index].shape


def check_keys(entries: Sequence[Entry], ckpt: HFCheckpoint, ignore: Sequence[str] = ()) -> None:
  wanted = {e.hf for e in entries}
  # An entry that fills none of our parameters exists for export only (a tensor the HF loader
  # wants and we do not keep): shape-checked on import when present, never required.
  missing = sorted(e.hf for e in entries if e.slots and e.hf not in ckpt)
  if missing:
    raise CheckpointError(f"checkpoint '{ckpt.dir}' is missing key '{missing[0]}'"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
  unexpected = sorted(k for k in ckpt.keys() if k not in wanted
                      and not any(fnmatch.fnmatchcase(k, pat) for pat in ignore))
  if unexpected:
    raise CheckpointError(f"checkpoint '{ckpt.dir}' has unexpected key '{unexpected[0]}'"
                          f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}"
                          " that this format does not map; is --format right?")


def import_params(entries: Sequence[Entry], ckpt: HFCheckpoint,
                  targets: Mapping[str, tuple[tuple[int, ...], np.dtype]], *,
                  ignore: Sequence[str] = (), dtype=None, progress: bool = True
                  ) -> dict[str, np.ndarray]:
  """HF tensors -> {our path: numpy array} shaped as `targets` (cast to `dtype` if given)."""
  check_keys(entries, ckpt, ignore)
  mapped = {p for e in entries for p, _ in e.slots}
  unmapped = sorted(set(targets) - mapped)
  if unmapped:
    raise CheckpointError(f"no checkpoint key maps to our parameter '{unmapped[0]}'")
  out = {p: np.empty(shape, dtype or dt) for p, (shape, dt) in targets.items()}
  by_key = {e.hf: e for e in entries}
  order = [k for k in ckpt.keys() if k in by_key]
  # disable=None: a bar on terminals, nothing in logs.
  for key in tqdm(order, desc="import", unit="tensor", disable=None if progress else True,
                  leave=False):
    entry = by_key[key]
    slot_shapes = [_slot_shape(out[p].shape, index) for p, index in entry.slots]
    expected = _expected_hf_shape(entry, slot_shapes)
    found = ckpt.shape(key)
    if found != expected:
      raise CheckpointError(f"shape mismatch for '{key}': checkpoint has {found}, "
                            f"our model expects {expected} (for {entry.slots[0][0]})")
    for (path, index), array in zip(entry.slots, entry.hook.to_ours(ckpt.read(key))):
      out[path][index] = array
  return out


def check_exportable(entries: Sequence[Entry], params: Mapping[str, np.ndarray], fmt: str
                     ) -> None:
  """Export must not lose a parameter silently: one that no entry writes is refused by name,
  unless it is all zeros (an LM-head bias of zeros is no bias), which is dropped with a log line."""
  written = {p for e in entries for p, _ in e.slots}
  for path in sorted(set(params) - written):
    if np.any(np.asarray(params[path])):
      hint = (" (the LM-head bias of model.llm.head_bias=true: HF LLMs have no head bias; the aki "
              "format keeps it)" if path.endswith("head_bias") else "")
      raise CheckpointError(f"our parameter '{path}' has no key in the '{fmt}' format and is not "
                            f"all zeros, so exporting would drop it{hint}")
    log.info("export: our parameter '%s' is all zeros and has no key in '%s': not written",
             path, fmt)


def export_params(entries: Sequence[Entry], params: Mapping[str, np.ndarray], *, dtype=None
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """{our path: array} -> (HF key, numpy array) pairs, one tensor at a time."""
  for entry in entries:
    parts = tuple(np.asarray(params[p])[index] for p, index in entry.slots)
    array = entry.hook.to_hf(parts)
    yield entry.hf, (array.astype(dtype) if dtype is not None else array)


def nest(flat: Mapping[str, object]) -> dict:
  """{'a.b.c': x} -> {'a': {'b': {'c': x}}}: the pure-dict form orbax and nnx take."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """The inverse of `nest`."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.update(flatten(value, path + ".") if isinstance(value, Mapping) else {path: value})
  return out


def build_with_params(build, params: Mapping[str, np.ndarray]) -> nnx.Module:
  """The module `build()` would make, with `params` as its weights and no random init spent."""
  abstract = nnx.eval_shape(build)
  shapes = param_shapes(abstract)
  for path, (shape, _) in shapes.items():
    if path not in params:
      raise CheckpointError(f"no value for our parameter '{path}'")
    if tuple(params[path].shape) != shape:
      raise CheckpointError(f"shape mismatch for '{path}': checkpoint has "
                            f"{tuple(params[path].shape)}, model expects {shape}")
  extra = sorted(set(params) - set(shapes))
  if extra:
    raise CheckpointError(f"checkpoint has parameter '{extra[0]}' that the model does not")
  graphdef, state = nnx.split(abstract)
  values = {p: jax.numpy.asarray(params[p], dtype=dt) for p, (_, dt) in shapes.items()}
  nnx.replace_by_pure_dict(state, nest(values))
  return nnx.merge(graphdef, state)


def module_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """{path: numpy array} of a live module's parameters (paths as in `param_shapes`)."""
  return {".".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
