"""Declarative HF <-> mma_jax key maps, used in both directions.

A `Rule` ties one HF tensor to one or more of our parameters through a `Hook` (a pair of inverse
functions). A rule whose HF key holds `{i}` is a per-layer rule: layer i of the HF checkpoint fills
slice i of our stacked parameter (leading `layers` axis). `expand` turns rules into concrete
`Entry`s for a given depth; `prefixed` composes maps of sub-models (vision tower, connector, LLM).

Our parameter paths are the nnx state paths joined by '.', e.g. `layers.attn.q.kernel`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Hook:
  """to_ours(hf_array) -> tuple of our arrays; to_hf(tuple of our arrays) -> hf_array."""
  name: str
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


IDENTITY = Hook("identity", lambda a: (a,), lambda xs: xs[0])
# HF nn.Linear weights are [out, in]; our kernels are [in, out].
LINEAR = Hook("linear", lambda a: (a.T,), lambda xs: xs[0].T)


def unkept(shape: Sequence[int]) -> Hook:
  """A tensor the HF model holds and we do not keep (use it in an Entry with no slots): on
  import only its shape is checked, on export it is written as zeros, for loaders that want
  every key."""
  shape = tuple(shape)
  return Hook(f"unkept{shape}", lambda a: (), lambda xs: np.zeros(shape, np.float32))


def split_rows(sizes: Sequence[int], transpose: bool = True) -> Hook:
  """A fused HF tensor whose first axis concatenates parts of `sizes` (Phi-3 qkv_proj and
  gate_up_proj, the Perceiver's to_kv): split on import, concatenated on export."""
  cuts = np.cumsum(sizes)[:-1]

  def to_ours(a):
    parts = np.split(a, cuts, axis=0)
    return tuple(p.T if transpose else p for p in parts)

  def to_hf(xs):
    return np.concatenate([x.T if transpose else x for x in xs], axis=0)

  return Hook(f"split_rows{tuple(sizes)}", to_ours, to_hf)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                            # HF key; '{i}' marks a per-layer rule
  ours: str | tuple[str, ...]        # our parameter path(s)
  hook: Hook = IDENTITY
  region: tuple = ()                 # a numpy index into ours (after the layer index): the HF
                                     # tensor fills only that part (AKI's decoupled embeddings)

  @property
  def our_paths(self) -> tuple[str, ...]:
    return (self.ours,) if isinstance(self.ours, str) else self.ours


@dataclasses.dataclass(frozen=True)
class Entry:
  """One concrete HF key and the slots of ours it fills: (path, numpy index into our array)."""
  hf: str
  slots: tuple[tuple[str, tuple], ...]
  hook: Hook


def expand(rules: Sequence[Rule], num_layers: int) -> list[Entry]:
  entries = []
  for rule in rules:
    layers = range(num_layers) if "{i}" in rule.hf else [None]
    for i in layers:
      index = rule.region if i is None else (i, *rule.region)
      entries.append(Entry(rule.hf.format(i=i) if i is not None else rule.hf,
                           tuple((p, index) for p in rule.our_paths), rule.hook))
  return entries


def prefixed(entries: Sequence[Entry], hf_prefix: str, our_prefix: str) -> list[Entry]:
  """The entries of a sub-model placed under HF key prefix and our path prefix."""
  return [Entry(hf_prefix + e.hf, tuple((our_prefix + p, i) for p, i in e.slots), e.hook)
          for e in entries]
