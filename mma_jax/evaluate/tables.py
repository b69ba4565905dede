"""Per-group metric tables of scored prediction rows, shared by the benchmark scorers."""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence


def accuracy(correct: Iterable[bool | float]) -> dict:
  """The mean of per-row hits (bools, or scores in [0, 1]) and the row count."""
  values = [float(c) for c in correct]
  return {"accuracy": sum(values) / len(values) if values else 0.0, "n": len(values)}


def grouped(rows: Sequence[Mapping], key: str, metric) -> dict[str, dict]:
  """{group value: metric(rows of that group)} for rows that have `key` set, sorted by value."""
  groups = collections.defaultdict(list)
  for row in rows:
    if row.get(key) not in (None, ""):
      groups[str(row[key])].append(row)
  return {name: metric(groups[name]) for name in sorted(groups)}
