"""LLaVA (LlavaForConditionalGeneration) <-> MultimodalDecoder: the `llava` format.

Two key layouts exist: on disk (what transformers 5 `save_pretrained` writes, and older hub files)
`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower[.vision_model].*`,
`multi_modal_projector.*`; in memory (transformers 5) `model.language_model.*`, `lm_head.weight`,
`model.vision_tower.*`, `model.multi_modal_projector.*`. Both import; export writes the on-disk one.
"""
from __future__ import annotations

import numpy as np

from mma_jax.config import Config, ConfigError, ModelConfig, OriginConfig
from mma_jax.convert.formats import Format, read_json, right_padded_batch
from mma_jax.convert.keymap import expand, prefixed
from mma_jax.convert.llm import llm_config_from_hf, llm_config_to_hf, llm_ignored, llm_rules
from mma_jax.convert.vision import (connector_entries, mlp_projector_config_from_hf,
                                    vision_config_from_hf, vision_config_to_hf, vision_ignored,
                                    vision_rules)

# stored prefix -> canonical (on-disk) prefix, applied in order
_LAYOUTS = (("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("vision_tower.vision_model.", "vision_tower."))


def canonical_key(key: str) -> str:
  for stored, canonical in _LAYOUTS:
    if key.startswith(stored):
      key = canonical + key[len(stored):]
  return key


def _complete(sub: dict) -> dict:
  """A sub-config as transformers reads it: keys left out take the class defaults."""
  import transformers

  model_type = sub.get("model_type")
  if model_type not in transformers.CONFIG_MAPPING:
    raise ConfigError(f"config.json: sub-config model_type '{model_type}' is unknown")
  return transformers.CONFIG_MAPPING[model_type](**sub).to_dict()


def _read_config(src, **_) -> Config:
  hf = read_json(src)
  if hf.get("model_type") != "llava":
    raise ConfigError(f"config.json: model_type '{hf.get('model_type')}' is not 'llava'")
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConfigError(f"config.json: vision_feature_layer={layer} (several layers) is not supported")
  strategy = hf.get("vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    raise ConfigError(f"config.json: vision_feature_select_strategy '{strategy}' is not supported")
  image_token = hf.get("image_token_index", hf.get("image_token_id"))
  model = ModelConfig(
      llm=llm_config_from_hf(_complete(hf["text_config"])),
      vision=vision_config_from_hf(_complete(hf["vision_config"]), feature_layer=layer,
                                   post_norm=False, drop_cls=strategy == "default"),
      connector=mlp_projector_config_from_hf(hf),
      origin=OriginConfig(format="llava", image_token_id=int(image_token)))
  config = Config(model=model)
  config.attention.mask = "causal"  # how LLaVA was trained; MMA fine-tuning overrides it
  return config


def _hf_files(config: Config) -> dict[str, dict]:
  m = config.model
  return {"config.json": {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
      "text_config": llm_config_to_hf(m.llm), "vision_config": vision_config_to_hf(m.vision),
      "image_token_index": m.origin.image_token_id,
      "projector_hidden_act": m.connector.mlp_act,
      "multimodal_projector_bias": m.connector.mlp_bias,
      "vision_feature_layer": m.vision.feature_layer,
      "vision_feature_select_strategy": "default" if m.vision.drop_cls else "full",
      "image_seq_length": m.vision.num_features,
      "tie_word_embeddings": m.llm.tie_word_embeddings,
  }}


def _entries(config: Config):
  m = config.model
  return (prefixed(expand(llm_rules(m.llm), m.llm.num_layers), "language_model.", "llm.")
          + prefixed(expand(vision_rules(m.vision), m.vision.num_layers), "vision_tower.",
                     "vision.")
          + connector_entries(m.connector, "multi_modal_projector.", "connector."))


def _ignored(config: Config) -> tuple[str, ...]:
  m = config.model
  return (tuple("language_model." + p for p in llm_ignored(m.llm))
          + tuple("vision_tower." + p for p in vision_ignored(m.vision)))


def image_batch(config: Config, seq_len: int, batch: int, seed: int):
  """Right-padded rows, each holding one image span of T tokens at offset 1: (tokens, valid,
  image_token_index, images [B, 1, H, W, C])."""
  m = config.model
  rows = m.vision.num_features
  if seq_len < rows + 2:
    raise ConfigError(f"--seq-len {seq_len} cannot hold an image of {rows} tokens plus text")
  tokens, valid = right_padded_batch(batch, seq_len, m.llm.vocab_size, seed)
  valid[:, :rows + 2] = True
  image_id = m.origin.image_token_id
  tokens = np.where(tokens == image_id, (image_id + 1) % m.llm.vocab_size, tokens)
  index = np.full(tokens.shape, -1, np.int32)
  index[:, 1:rows + 1] = np.arange(rows)
  tokens[:, 1:rows + 1] = image_id
  tokens = np.where(valid, tokens, 0)
  size, channels = m.vision.image_size, m.vision.num_channels
  images = np.random.default_rng(seed + 1).standard_normal(
      (batch, 1, size, size, channels)).astype(np.float32)
  return tokens, valid, index, images


def _compare(src, model, config: Config, seq_len: int, batch: int, seed: int):
  import torch
  import transformers

  tokens, valid, index, images = image_batch(config, seq_len, batch, seed)
  reference = transformers.LlavaForConditionalGeneration.from_pretrained(
      src, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = reference(input_ids=torch.from_numpy(tokens).long(),
                    pixel_values=torch.from_numpy(images[:, 0]).permute(0, 3, 1, 2),
                    attention_mask=torch.from_numpy(valid.astype(np.int64))).logits.numpy()
  segment_ids = valid.astype(np.int32)
  zeros = np.zeros_like(segment_ids)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  ours = np.asarray(model(tokens=tokens, positions=positions, segment_ids=segment_ids,
                          window_lo=zeros, window_hi=zeros, image_token_index=index,
                          images=images))
  return ours, ref, valid


LLAVA = Format(name="llava", read_config=_read_config, hf_files=_hf_files, entries=_entries,
               ignored=_ignored, compare=_compare, rename=canonical_key)
