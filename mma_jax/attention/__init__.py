"""Attention: the mask spec (mask.py) and its executors; `attend` picks one."""
from __future__ import annotations

import logging

import jax

from mma_jax.attention.dense import attend_dense, dense_attention
from mma_jax.attention.mask import allowed, materialize

IMPLS = ("auto", "dense")
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; choose one of: {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  choice, reason = "dense", f"backend is {jax.default_backend()}"
  if choice not in _logged:
    _logged.add(choice)
    _log.info("attention impl=auto -> %s (%s)", choice, reason)
  return choice


def attend(q, k, v, segment_ids, window_lo, window_hi, *, impl: str = "auto",
           scale: float | None = None):
  """q [B, L, H, D], k/v [B, L, K, D], mask vectors [B, L] int32 -> [B, L, H, D]."""
  impl = _resolve(impl)
  return attend_dense(q, k, v, segment_ids, window_lo, window_hi, scale=scale)


__all__ = ["attend", "allowed", "materialize", "dense_attention", "attend_dense"]
