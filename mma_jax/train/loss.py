"""Cross-entropy over answer tokens, as sums so that packing and gradient accumulation stay exact:
the loss of a batch is (sum of token losses) / (number of answer tokens), wherever they sit."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mma_jax.sharding import constrain


def answer_positions(loss_mask, count: int):
  """The first `count` positions per row where loss_mask > 0, in order: (index [B, K], valid
  [B, K], tokens beyond the buffer [B]). Keeps the head's [B, K, V] logits small."""
  length = loss_mask.shape[1]
  on = loss_mask > 0
  order = jnp.argsort(jnp.where(on, jnp.arange(length), length + jnp.arange(length)), axis=1)
  index = order[:, :count]
  valid = jnp.take_along_axis(on, index, axis=1)
  overflow = jnp.maximum(jnp.sum(on, axis=1) - count, 0)
  return index, valid, overflow


def token_loss_sums(model, batch, *, loss_positions: int = 0):
  """(sum of answer-token cross-entropies, number of answer tokens, tokens the position buffer
  could not hold). loss_positions=0 computes logits at every position."""
  hidden = model.hidden(**batch)
  targets, weights = batch["targets"], batch["loss_mask"].astype(jnp.float32)
  overflow = jnp.zeros((), jnp.int32)
  if loss_positions:
    index, valid, overflow = answer_positions(weights, loss_positions)
    hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
    targets = jnp.take_along_axis(targets, index, axis=1)
    weights = jnp.take_along_axis(weights, index, axis=1) * valid
    overflow = jnp.sum(overflow)
  logits = constrain(model.logits(hidden), ("batch", None, "vocab"))
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  losses = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.sum(losses * weights), jnp.sum(weights), overflow
