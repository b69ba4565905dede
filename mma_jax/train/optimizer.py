"""AdamW with warmup + cosine decay to a floor, global-norm clipping, weight decay on Linear
kernels only, and separate learning rates for the connector and the vision tower (LLaVA-style
recipes train a tower slower than the rest; a tower trained from scratch may want it faster). Frozen parameters never reach the
optimizer (train/state.py splits them off), so they get neither updates nor state."""
from __future__ import annotations

import jax
import optax

from mma_jax.config import TrainConfig


def learning_rate(t: TrainConfig, scale: float = 1.0) -> optax.Schedule:
  warmup = min(t.warmup_steps, max(t.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate * scale, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.min_learning_rate * scale)


def _names(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if hasattr(k, "key"))


def _decays(path, decay_embeddings: bool) -> bool:
  names = _names(path)
  # LoRA adapters decay like the kernels they adapt.
  return (names[-1] in ("kernel", "lora_a", "lora_b")
          or (decay_embeddings and names[-1] == "embedding"))


def _scales(t: TrainConfig) -> dict[str, float]:
  """Learning-rate scale per parameter group; a module gets its own group (and its own slot in the
  optimizer state) only when its scale is not 1."""
  modules = {"connector": t.connector_lr_scale, "vision": t.vision_lr_scale}
  return {"main": 1.0, **{name: s for name, s in modules.items() if s != 1.0}}


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  def adamw(scale):
    return optax.adamw(
        learning_rate(t, scale), b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay,
        mask=lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: _decays(path, t.decay_embeddings), params))

  scales = _scales(t)
  group = lambda path, _: _names(path)[0] if _names(path)[0] in scales else "main"
  labels = lambda params: jax.tree_util.tree_map_with_path(group, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.multi_transform({name: adamw(s) for name, s in scales.items()}, labels))
