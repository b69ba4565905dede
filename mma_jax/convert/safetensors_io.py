"""Streaming access to HF checkpoint directories: safetensors shards (with or without
`model.safetensors.index.json`), and `.bin` pickles only when explicitly allowed.

Tensors are read one at a time with `safe_open(framework="numpy")` (bf16 arrives as
ml_dtypes.bfloat16), shard by shard, so a conversion never holds two full copies of a model.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A user-facing problem with a checkpoint on disk; the message names the file or key."""


class HFCheckpoint:
  """The tensors of an HF directory: `keys()`, `shape(key)`, `read(key)`, in shard order."""

  def __init__(self, directory: str | pathlib.Path, *, allow_pickle: bool = False,
               rename: Callable[[str], str] | None = None):
    """`rename` maps stored names to canonical ones (one format, several key layouts); every
    method then speaks canonical names."""
    self.dir = pathlib.Path(directory)
    if not self.dir.is_dir():
      raise CheckpointError(f"checkpoint directory '{self.dir}' does not exist")
    self._key_to_file: dict[str, pathlib.Path] = {}
    self._stored_name: dict[str, str] = {}   # canonical -> stored, where `rename` changed it
    self._pickled: dict[str, np.ndarray] | None = None
    self._open_file: pathlib.Path | None = None
    self._handle = None
    index = self.dir / INDEX
    shards = sorted(self.dir.glob("*.safetensors"))
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      for key, name in weight_map.items():
        path = self.dir / name
        if not path.is_file():
          raise CheckpointError(f"shard '{path}' listed in {index.name} for '{key}' is missing")
        self._key_to_file[key] = path
    elif shards:
      for path in shards:
        with safe_open(path, framework="numpy") as f:
          for key in f.keys():
            self._key_to_file[key] = path
    else:
      bins = sorted(self.dir.glob("*.bin"))
      if not bins:
        raise CheckpointError(f"no *.safetensors or *.bin weights in '{self.dir}'")
      if not allow_pickle:
        raise CheckpointError(
            f"'{bins[0]}' is a pickle (.bin); loading pickles can run arbitrary code. "
            "Convert it to safetensors, or pass --allow-pickle if you trust it")
      self._pickled = _load_pickles(bins)
    if rename is not None:
      self._rename(rename)

  def _rename(self, rename: Callable[[str], str]) -> None:
    stored = self._pickled if self._pickled is not None else self._key_to_file
    for key in list(stored):
      canonical = rename(key)
      if canonical in self._stored_name:
        raise CheckpointError(f"checkpoint '{self.dir}' holds both '{self._stored_name[canonical]}'"
                              f" and '{key}', two layouts of the same tensor")
      self._stored_name[canonical] = key
    renamed = {rename(k): v for k, v in stored.items()}
    if self._pickled is not None:
      self._pickled = renamed
    else:
      self._key_to_file = renamed

  def keys(self) -> list[str]:
    """All tensor names, grouped by shard so that reading in this order opens each shard once."""
    if self._pickled is not None:
      return list(self._pickled)
    return sorted(self._key_to_file, key=lambda k: (str(self._key_to_file[k]), k))

  def __contains__(self, key: str) -> bool:
    return key in (self._pickled if self._pickled is not None else self._key_to_file)

  def _file(self, key: str):
    path = self._key_to_file[key]
    if path != self._open_file:
      if self._handle is not None:
        self._handle.__exit__(None, None, None)
      self._handle = safe_open(path, framework="numpy").__enter__()
      self._open_file = path
    return self._handle

  def shape(self, key: str) -> tuple[int, ...]:
    if self._pickled is not None:
      return tuple(self._pickled[key].shape)
    return tuple(self._file(key).get_slice(self._stored(key)).get_shape())

  def read(self, key: str) -> np.ndarray:
    if self._pickled is not None:
      return self._pickled[key]
    return self._file(key).get_tensor(self._stored(key))

  def _stored(self, key: str) -> str:
    return self._stored_name.get(key, key)

  def close(self) -> None:
    if self._handle is not None:
      self._handle.__exit__(None, None, None)
      self._handle, self._open_file = None, None


def _load_pickles(paths: list[pathlib.Path]) -> dict[str, np.ndarray]:
  import torch  # only needed for pickles

  tensors = {}
  for path in paths:
    for key, t in torch.load(path, map_location="cpu", weights_only=True).items():
      tensors[key] = (t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
  return tensors


def write_safetensors(directory: str | pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]],
                      *, max_shard_bytes: int = 2 << 30) -> list[pathlib.Path]:
  """Writes (name, array) pairs as HF shards `model-0000k-of-0000n.safetensors` plus the index,
  holding at most one shard in memory; a single shard is written as `model.safetensors`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  written: list[tuple[pathlib.Path, list[str]]] = []
  current: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    nonlocal current, size
    if current:
      path = directory / f"shard-{len(written):05d}.tmp.safetensors"
      save_file(current, str(path), metadata={"format": "pt"})
      written.append((path, list(current)))
      current, size = {}, 0

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if current and size + array.nbytes > max_shard_bytes:
      flush()
    current[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  n = len(written)
  if n == 1:
    final = [directory / "model.safetensors"]
  else:
    final = [directory / f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  weight_map = {}
  for (tmp, names), path in zip(written, final):
    tmp.rename(path)
    weight_map.update({name: path.name for name in names})
  if n > 1:
    (directory / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return final
