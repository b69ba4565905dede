"""Attention: the mask spec (mask.py) and its executors; `attend` picks one.

impl:
  dense   XLA reference (any backend; decode; tests)
  flash   the Pallas kernel of flash.py (TPU; interpret mode elsewhere); per-example layouts
  splash  jax's stock splash kernel with a static MMA mask (one layout for the whole batch,
          concrete vectors only); a baseline
  auto    flash when the target is TPU and it can serve the input, else dense; the choice is
          logged once. The target is flash.target_platform(): the platform of the mesh set with
          jax.set_mesh (a described TPU topology counts), else jax.default_backend()
"""
from __future__ import annotations

import logging

import jax

from mma_jax.attention import flash, splash
from mma_jax.attention.dense import attend_dense, cached_attention, dense_attention
from mma_jax.attention.mask import allowed, materialize
from mma_jax.attention.flash import target_platform

IMPLS = ("auto", "dense", "flash", "splash")
_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def _log_once(choice: str, reason: str) -> None:
  if (choice, reason) not in _logged:
    _logged.add((choice, reason))
    _log.info("attention impl=auto -> %s (%s)", choice, reason)


def _flash_reason(q, k, v):
  """Why flash cannot serve the input here (shapes, dtypes, the context mesh), or None."""
  mesh = _context_mesh()
  return flash.unsupported_reason(q, k, v) or (
      flash.sharding_reason(q, k, mesh) if mesh is not None else None)


def _resolve(impl: str, q, k, v, window_lo, window_hi) -> str:
  """The implementation to run; ValueError when an explicit one cannot serve the input."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; choose one of: {', '.join(IMPLS)}")
  if impl == "flash":
    reason = _flash_reason(q, k, v)
    if reason:
      raise ValueError(f"attention impl 'flash' cannot serve this input: {reason}")
  elif impl == "splash":
    reason = splash.unsupported_reason(q, k, v, window_lo, window_hi)
    if reason:
      raise ValueError(f"attention impl 'splash' cannot serve this input: {reason}")
  elif impl == "auto":
    platform = flash.target_platform()
    if platform != "tpu":
      impl, reason = "dense", (f"target platform is {platform}; the flash kernel runs natively "
                               "on TPU only")
    else:
      reason = _flash_reason(q, k, v)
      impl, reason = ("dense", f"flash cannot serve this input: {reason}") if reason else (
          "flash", "target platform is tpu")
    _log_once(impl, reason)
  return impl


def _context_mesh():
  """The mesh set with jax.set_mesh, if it has any of the axes flash shards over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  wanted = set(flash.BATCH_AXES) | {flash.HEAD_AXIS}
  return mesh if wanted & set(mesh.axis_names) else None


def attend(q, k, v, segment_ids, window_lo, window_hi, *, impl: str = "auto",
           scale: float | None = None, block_q: int = 128, block_kv: int = 128):
  """q [B, L, H, D], k/v [B, L, K, D], mask vectors [B, L] int32 -> [B, L, H, D].

  flash runs under shard_map when a mesh is set (jax.set_mesh): batch over data/fsdp, heads
  over tensor; block_q/block_kv are its tile sizes (config attention.block_q/block_kv).
  """
  impl = _resolve(impl, q, k, v, window_lo, window_hi)
  if impl == "dense":
    return attend_dense(q, k, v, segment_ids, window_lo, window_hi, scale=scale)
  if impl == "splash":
    layout = splash.static_layout_from_vectors(window_lo, window_hi)
    return splash.splash_attention(q, k, v, segment_ids, layout, scale=scale)
  mesh = _context_mesh()
  if mesh is not None:
    return flash.sharded_flash_attention(q, k, v, segment_ids, window_lo, window_hi, mesh=mesh,
                                         scale=scale, block_q=block_q, block_kv=block_kv)
  return flash.flash_attention(q, k, v, segment_ids, window_lo, window_hi, scale=scale,
                               block_q=block_q, block_kv=block_kv)


__all__ = ["attend", "allowed", "materialize", "dense_attention", "cached_attention", "attend_dense",
           "target_platform", "IMPLS"]
