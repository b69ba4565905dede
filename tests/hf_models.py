"""Tiny random transformers models built offline from configs (the parity references)."""
from __future__ import annotations

import pathlib

import torch
import transformers

LONGROPE_HALF = 8  # head_dim 16 -> 8 rotary frequencies


def tiny_llm_config(family: str, **overrides) -> transformers.PretrainedConfig:
  common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=0)
  if family == "llama":  # GQA + Llama 3.1 rope scaling
    return transformers.LlamaConfig(**{**common, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **overrides})
  if family == "qwen2":  # qkv bias + tied embeddings
    return transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
  if family == "phi3":  # fused qkv/gate_up + longrope
    return transformers.Phi3Config(**{
        **common, "original_max_position_embeddings": 32, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(LONGROPE_HALF)],
            "long_factor": [1.5 + 0.4 * i for i in range(LONGROPE_HALF)]}, **overrides})
  raise ValueError(family)


def save_tiny_llm(family: str, directory: pathlib.Path, seed: int = 0, **overrides):
  """Builds, saves (save_pretrained, safetensors) and returns the tiny HF model."""
  torch.manual_seed(seed)
  config = tiny_llm_config(family, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  _perturb_norms_and_biases(model)  # so that a swapped norm or bias key shows up
  model.save_pretrained(directory)
  return model


def _perturb_norms_and_biases(model) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))


def tiny_llava_config(**overrides) -> transformers.LlavaConfig:
  text = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, pad_token_id=0)
  vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=3, num_attention_heads=2,
                                         image_size=28, patch_size=7)
  return transformers.LlavaConfig(text_config=text, vision_config=vision,
                                  image_token_index=95, **overrides)


def save_tiny_llava(directory: pathlib.Path, seed: int = 0, **overrides):
  """A tiny LlavaForConditionalGeneration (CLIP tower, 16 patches + CLS, layer -2)."""
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(tiny_llava_config(**overrides)).eval()
  _perturb_norms_and_biases(model)
  model.save_pretrained(directory)
  return model


def save_tiny_tower(family: str, directory: pathlib.Path, seed: int = 0):
  torch.manual_seed(seed)
  kw = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=7)
  model = (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw))
           if family == "siglip" else
           transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))).eval()
  _perturb_norms_and_biases(model)
  model.save_pretrained(directory)
  return model
