"""MultimodalDecoder: pixels -> vision tower -> connector -> rows scattered into the token
embeddings at `image_token_index` -> decoder LLM under the batch's mask vectors -> logits.
For generation, `prefill` runs the prompt with its images and returns a KV cache; `decode_step`
then feeds text tokens only.

`image_token_index[b, t]` indexes the image rows of batch row b (image n, row r -> n * T + r, with
T rows per image), -1 for text; packing offsets it per row, so every batch row is self-contained
and sharding the batch needs no cross-row gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mma_jax.config import ModelConfig
from mma_jax.models.connector import build_connector, tokens_per_image
from mma_jax.models.llm import DecoderLLM
from mma_jax.models.vision import VisionTower
from mma_jax.sharding import constrain


class MultimodalDecoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, impl: str = "auto",
               blocks: tuple[int, int] = (128, 128), rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
              remat=cfg.remat)
    self.freeze_vision = cfg.freeze_vision
    self.tokens_per_image = tokens_per_image(cfg.connector, cfg.vision)
    self.vision = VisionTower(cfg.vision, rngs=rngs, **kw)
    self.connector = build_connector(cfg.connector, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                     lora=cfg.lora, rngs=rngs, **kw)
    self.llm = DecoderLLM(cfg.llm, impl=impl, blocks=blocks, lora=cfg.lora, rngs=rngs, **kw)

  def image_rows(self, images):
    """images [B, N, H, W, C] -> LLM-width rows [B, N * T, E]."""
    b, n = images.shape[:2]
    # Each device encodes the images of its own batch rows, never the global batch's.
    flat = constrain(images.reshape(b * n, *images.shape[2:]), ("batch", None, None, None))
    features = self.vision(flat)
    if self.freeze_vision:
      features = jax.lax.stop_gradient(features)
    rows = self.connector(features)
    return constrain(rows.reshape(b, n * rows.shape[1], rows.shape[2]), ("batch", None, None))

  def embed(self, tokens, image_token_index, images):
    """Token embeddings with image rows placed where image_token_index >= 0."""
    x = self.llm.embed_tokens(tokens)
    if images is None or images.shape[1] == 0:
      return x
    rows = self.image_rows(images).astype(x.dtype)
    gathered = jnp.take_along_axis(rows, jnp.maximum(image_token_index, 0)[..., None], axis=1)
    return constrain(jnp.where((image_token_index >= 0)[..., None], gathered, x),
                     ("batch", None, None))

  def __call__(self, **batch):
    """The batch contract's fields -> f32 logits [B, L, V]."""
    return self.logits(self.hidden(**batch))

  def hidden(self, *, tokens, positions, segment_ids, window_lo, window_hi, image_token_index,
             images=None, image_valid=None, **unused):
    """The LLM's final hidden states [B, L, E]. (image_valid marks real images; the rows of
    padding images are computed but never gathered. Other batch fields are ignored.)"""
    del image_valid, unused
    x = self.embed(tokens, image_token_index, images)
    return self.llm.hidden(embeddings=x, positions=positions, segment_ids=segment_ids,
                           window_lo=window_lo, window_hi=window_hi)

  def attention_probs(self, layer: int, *, tokens, positions, segment_ids, window_lo, window_hi,
                      image_token_index, images=None, image_valid=None, **unused):
    """Decoder layer `layer`'s attention probabilities f32 [B, H, L, L] on the batch with its
    images (see DecoderLLM.attention_probs); for visualisation, never in training."""
    del image_valid, unused
    x = self.embed(tokens, image_token_index, images)
    return self.llm.attention_probs(layer, embeddings=x, positions=positions,
                                    segment_ids=segment_ids, window_lo=window_lo,
                                    window_hi=window_hi)

  def prefill(self, *, tokens, positions, segment_ids, window_lo, window_hi, image_token_index,
              cache_length: int, images=None, image_valid=None, **unused):
    """The prompt with its images, under its mask vectors (MMA: the image rows' keys and values
    are computed having seen the question) -> (final hidden [B, L, E], KV cache); see
    DecoderLLM.prefill."""
    del image_valid, unused
    x = self.embed(tokens, image_token_index, images)
    return self.llm.prefill(embeddings=x, positions=positions, segment_ids=segment_ids,
                            window_lo=window_lo, window_hi=window_hi, cache_length=cache_length)

  def decode_step(self, *, tokens, positions, cache, layers=None):
    """Generated text tokens [B, T] over the cache (images only enter through the prefill)."""
    return self.llm.decode_step(tokens=tokens, positions=positions, cache=cache, layers=layers)

  def logits(self, hidden):
    return self.llm.logits(hidden)
