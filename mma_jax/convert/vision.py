"""HF vision towers (SigLIP, CLIP) and the connectors (AKI Perceiver, LLaVA projector) <-> ours:
config translation, key maps, and the `hf-vision` format (a tower alone).

Rules here are relative: a format places them under its prefixes with `keymap.prefixed` (AKI:
`vision_encoder.` + tower rules, `vision_tokenizer.` + Perceiver rules; LLaVA: `vision_tower.` +
`vision_model.` + tower rules, `multi_modal_projector.` + projector rules). A standalone tower
checkpoint stores its keys with or without `vision_model.` depending on the transformers version
(5.x drops it); `vision_prefix` finds out which.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from mma_jax.config import (Config, ConfigError, ConnectorConfig, ModelConfig, OriginConfig,
                            VisionConfig, validate_vision)
from mma_jax.convert.formats import Format, read_json
from mma_jax.convert.keymap import IDENTITY, LINEAR, Hook, Rule, expand, prefixed, split_rows
from mma_jax.convert.safetensors_io import CheckpointError

FAMILIES = {"siglip": "siglip", "siglip_vision_model": "siglip",
            "clip": "clip", "clip_vision_model": "clip"}
HF_VISION_ARCHITECTURES = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel"}
HF_VISION_MODEL_TYPES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}
# HF `hidden_act` aliases of the activations we implement.
HIDDEN_ACTS = {"gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
               "gelu_fast": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}
# Feature selection when the caller says nothing: AKI's (SigLIP) and LLaVA-1.5's (CLIP) choices.
DEFAULT_FEATURES = {"siglip": dict(feature_layer=-1, post_norm=True, drop_cls=False),
                    "clip": dict(feature_layer=-2, post_norm=False, drop_cls=True)}
# The official Perceiver fixes its heads; only depth, latents and widths vary between checkpoints.
PERCEIVER_HEADS = 8

# HF conv weight [E, C, p, p] <-> our patch kernel [p, p, C, E].
PATCH_CONV = Hook("patch_conv", lambda a: (a.transpose(2, 3, 1, 0),),
                  lambda xs: xs[0].transpose(3, 2, 0, 1))


# ------------------------------------------------------------------------------------------ config
# What transformers assumes for keys a config.json leaves out (SiglipVisionConfig /
# CLIPVisionConfig defaults), so sparse configs read as transformers would read them.
HF_DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=16, layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32, layer_norm_eps=1e-5),
}


def vision_config_from_hf(hf: dict, *, feature_layer: int | None = None,
                          post_norm: bool | None = None, drop_cls: bool | None = None
                          ) -> VisionConfig:
  """A SigLIP/CLIP config.json (the full model's, with `vision_config`, or a vision-only one)
  -> VisionConfig. Feature selection defaults to the family's usual choice (DEFAULT_FEATURES)."""
  if hf.get("model_type") in ("siglip", "clip") or "vision_config" in hf:
    model_type = hf.get("model_type")
    hf = dict(hf.get("vision_config") or {})
    hf.setdefault("model_type", f"{model_type}_vision_model")
  family = FAMILIES.get(hf.get("model_type", ""))
  if family is None:
    raise ConfigError(f"config.json: model_type '{hf.get('model_type')}' is not a vision tower "
                      "we convert (siglip, clip and their *_vision_model)")
  act = hf.get("hidden_act", "gelu_pytorch_tanh" if family == "siglip" else "quick_gelu")
  if act not in HIDDEN_ACTS:
    raise ConfigError(f"config.json: vision hidden_act '{act}' is not supported "
                      f"(supported: {', '.join(HIDDEN_ACTS)})")
  chosen = {k: v for k, v in dict(feature_layer=feature_layer, post_norm=post_norm,
                                  drop_cls=drop_cls).items() if v is not None}
  defaults = HF_DEFAULTS[family]
  cfg = VisionConfig(
      family=family,
      hidden_size=hf.get("hidden_size", defaults["hidden_size"]),
      intermediate_size=hf.get("intermediate_size", defaults["intermediate_size"]),
      num_layers=hf.get("num_hidden_layers", defaults["num_hidden_layers"]),
      num_heads=hf.get("num_attention_heads", defaults["num_attention_heads"]),
      image_size=hf.get("image_size", defaults["image_size"]),
      patch_size=hf.get("patch_size", defaults["patch_size"]),
      num_channels=hf.get("num_channels", 3),
      layer_norm_eps=float(hf.get("layer_norm_eps", defaults["layer_norm_eps"])),
      hidden_act=HIDDEN_ACTS[act], **{**DEFAULT_FEATURES[family], **chosen})
  validate_vision(cfg, prefix="config.json vision_config")
  return cfg


def vision_config_to_hf(cfg: VisionConfig) -> dict:
  """A standalone SiglipVisionConfig / CLIPVisionConfig dict (no SigLIP pooling head: we have
  none of its weights)."""
  hf = {
      "architectures": [HF_VISION_ARCHITECTURES[cfg.family]],
      "model_type": HF_VISION_MODEL_TYPES[cfg.family],
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "image_size": cfg.image_size, "patch_size": cfg.patch_size,
      "num_channels": cfg.num_channels, "layer_norm_eps": cfg.layer_norm_eps,
      "hidden_act": cfg.hidden_act, "attention_dropout": 0.0, "torch_dtype": "float32",
  }
  if cfg.family == "siglip":
    hf["vision_use_head"] = False
  return hf


# ---------------------------------------------------------------------------------------- key maps
def vision_rules(cfg: VisionConfig) -> list[Rule]:
  """Tower key map, HF names relative to the vision transformer (no `vision_model.`)."""
  layer = "encoder.layers.{i}."
  rules = [
      Rule("embeddings.patch_embedding.weight", "patch_embed.kernel", PATCH_CONV),
      Rule("embeddings.position_embedding.weight", "position_embedding"),
      Rule("post_layernorm.weight", "post_norm.scale"),
      Rule("post_layernorm.bias", "post_norm.bias"),
  ]
  if cfg.family == "siglip":
    rules.append(Rule("embeddings.patch_embedding.bias", "patch_embed.bias"))
  else:
    rules += [Rule("embeddings.class_embedding", "cls_token"),
              Rule("pre_layrnorm.weight", "pre_norm.scale"),
              Rule("pre_layrnorm.bias", "pre_norm.bias")]
  for hf, ours in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                   ("self_attn.v_proj", "attn.v"), ("self_attn.out_proj", "attn.o"),
                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
    rules += [Rule(f"{layer}{hf}.weight", f"layers.{ours}.kernel", LINEAR),
              Rule(f"{layer}{hf}.bias", f"layers.{ours}.bias")]
  for hf, ours in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
    rules += [Rule(f"{layer}{hf}.weight", f"layers.{ours}.scale"),
              Rule(f"{layer}{hf}.bias", f"layers.{ours}.bias")]
  return rules


def vision_ignored(cfg: VisionConfig) -> tuple[str, ...]:
  """Relative key patterns a tower checkpoint may hold that we do not use: SigLIP's attention
  pooling head (AKI and LLaVA read hidden states, never the pooled output)."""
  return ("head.*",) if cfg.family == "siglip" else ()


def siglip_head_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
  """Relative key -> shape of SigLIP's attention pooling head (transformers'
  SiglipMultiheadAttentionPoolingHead: a probe, an nn.MultiheadAttention, a LayerNorm, an MLP)."""
  e, f = cfg.hidden_size, cfg.intermediate_size
  return {"head.probe": (1, 1, e), "head.attention.in_proj_weight": (3 * e, e),
          "head.attention.in_proj_bias": (3 * e,), "head.attention.out_proj.weight": (e, e),
          "head.attention.out_proj.bias": (e,), "head.layernorm.weight": (e,),
          "head.layernorm.bias": (e,), "head.mlp.fc1.weight": (f, e), "head.mlp.fc1.bias": (f,),
          "head.mlp.fc2.weight": (e, f), "head.mlp.fc2.bias": (e,)}


# A full SiglipModel / CLIPModel checkpoint (e.g. openai/clip-vit-large-patch14-336, the LLaVA-1.5
# tower) also carries the text tower and the contrastive heads.
FULL_MODEL_EXTRAS = ("text_model.*", "logit_scale", "logit_bias", "visual_projection.*",
                     "text_projection.*")


def vision_prefix(keys: Iterable[str]) -> str:
  """'vision_model.' or '' — how a SigLIP/CLIP checkpoint names its tower's tensors."""
  keys = set(keys)
  for prefix in ("vision_model.", ""):
    if prefix + "embeddings.patch_embedding.weight" in keys:
      return prefix
  raise CheckpointError("no 'embeddings.patch_embedding.weight' (with or without "
                        "'vision_model.') in the checkpoint: not a SigLIP/CLIP vision tower")


def hf_vision_entries(cfg: VisionConfig, prefix: str = ""):
  """Concrete entries for a tower stored under `prefix` (e.g. '', 'vision_model.')."""
  return prefixed(expand(vision_rules(cfg), cfg.num_layers), prefix, "")


def hf_vision_ignored(cfg: VisionConfig, prefix: str = "") -> tuple[str, ...]:
  extras = FULL_MODEL_EXTRAS if prefix == "vision_model." else ()
  return tuple(prefix + p for p in vision_ignored(cfg)) + extras


def perceiver_rules(cfg: ConnectorConfig) -> list[Rule]:
  """Official AKI names relative to `vision_tokenizer.` (DESIGN.md §4). Layer i is an
  nn.ModuleList [PerceiverAttention, FeedForward]; the FeedForward is an nn.Sequential
  [LayerNorm, Linear up, GELU, Linear down]. to_kv rows are k then v."""
  inner = cfg.num_heads * cfg.head_dim
  attn, ff = "layers.{i}.0.", "layers.{i}.1."
  rules = [Rule("latents", "latents")]
  for name in ("norm_media", "norm_latents"):
    rules += [Rule(f"{attn}{name}.weight", f"layers.attn.{name}.scale"),
              Rule(f"{attn}{name}.bias", f"layers.attn.{name}.bias")]
  rules += [
      Rule(attn + "to_q.weight", "layers.attn.q.kernel", LINEAR),
      Rule(attn + "to_kv.weight", ("layers.attn.k.kernel", "layers.attn.v.kernel"),
           split_rows([inner, inner])),
      Rule(attn + "to_out.weight", "layers.attn.o.kernel", LINEAR),
      Rule(ff + "0.weight", "layers.ff.norm.scale"),
      Rule(ff + "0.bias", "layers.ff.norm.bias"),
      Rule(ff + "1.weight", "layers.ff.up.kernel", LINEAR),
      Rule(ff + "3.weight", "layers.ff.down.kernel", LINEAR),
      Rule("norm.weight", "norm.scale"),
      Rule("norm.bias", "norm.bias"),
      Rule("projection.weight", "projection.kernel", LINEAR),
      Rule("projection.bias", "projection.bias", IDENTITY),
  ]
  return rules


def mlp_projector_rules(cfg: ConnectorConfig) -> list[Rule]:
  """LLaVA names relative to `multi_modal_projector.`."""
  rules = []
  for name in ("linear_1", "linear_2"):
    rules.append(Rule(f"{name}.weight", f"{name}.kernel", LINEAR))
    if cfg.mlp_bias:
      rules.append(Rule(f"{name}.bias", f"{name}.bias"))
  return rules


def connector_rules(cfg: ConnectorConfig) -> list[Rule]:
  return perceiver_rules(cfg) if cfg.type == "perceiver" else mlp_projector_rules(cfg)


def connector_entries(cfg: ConnectorConfig, hf_prefix: str, our_prefix: str = ""):
  depth = cfg.depth if cfg.type == "perceiver" else 0
  return prefixed(expand(connector_rules(cfg), depth), hf_prefix, our_prefix)


# ------------------------------------------------------------------- connector configs from tensors
def perceiver_config_from_shapes(shapes: dict[str, tuple[int, ...]],
                                 prefix: str = "vision_tokenizer.") -> ConnectorConfig:
  """The Perceiver's sizes read off an AKI checkpoint's tensor shapes ({key: shape}): the
  official constructor arguments are not saved, and heads (8) are fixed in its code."""
  def shape(name):
    if prefix + name not in shapes:
      raise CheckpointError(f"AKI checkpoint has no '{prefix + name}'")
    return shapes[prefix + name]

  num_latents, dim = shape("latents")
  inner = shape("layers.0.0.to_q.weight")[0]
  ff = shape("layers.0.1.1.weight")[0]
  layer_ids = {int(k[len(prefix):].split(".")[1]) for k in shapes
               if k.startswith(prefix + "layers.")}
  depth = max(layer_ids) + 1
  if layer_ids != set(range(depth)):
    raise CheckpointError(f"AKI checkpoint: Perceiver layers {sorted(layer_ids)} are not 0..n-1")
  if inner % PERCEIVER_HEADS or ff % dim:
    raise CheckpointError(f"AKI checkpoint: Perceiver widths (inner {inner}, ff {ff}, dim {dim}) "
                          f"do not fit {PERCEIVER_HEADS} heads and an integer ff_mult")
  return ConnectorConfig(type="perceiver", num_latents=num_latents, depth=depth,
                         num_heads=PERCEIVER_HEADS, head_dim=inner // PERCEIVER_HEADS,
                         ff_mult=ff // dim)


def mlp_projector_config_from_hf(llava_hf: dict) -> ConnectorConfig:
  """LLaVA config.json (projector_hidden_act, multimodal_projector_bias) -> ConnectorConfig."""
  act = llava_hf.get("projector_hidden_act", "gelu")
  if act not in HIDDEN_ACTS:
    raise ConfigError(f"config.json: projector_hidden_act '{act}' is not supported "
                      f"(supported: {', '.join(HIDDEN_ACTS)})")
  return ConnectorConfig(type="mlp", mlp_act=HIDDEN_ACTS[act],
                         mlp_bias=bool(llava_hf.get("multimodal_projector_bias", True)))


# ------------------------------------------------------------------------- the hf-vision format
def _strip_vision_model(key: str) -> str:
  # transformers 4 saved standalone towers under `vision_model.`; 5 does not.
  return key[len("vision_model."):] if key.startswith("vision_model.") else key


def _read_tower_config(src, **_) -> Config:
  return Config(model=ModelConfig(vision=vision_config_from_hf(read_json(src)),
                                  origin=OriginConfig(format="hf-vision")))


def _compare_tower(src, model, config: Config, seq_len: int, batch: int, seed: int):
  """Selected features of the HF tower vs ours on random images (seq_len is unused)."""
  import torch
  import transformers

  del seq_len
  cfg = config.model.vision
  images = np.random.default_rng(seed).standard_normal(
      (batch, cfg.image_size, cfg.image_size, cfg.num_channels)).astype(np.float32)
  cls = getattr(transformers, HF_VISION_ARCHITECTURES[cfg.family])
  reference = cls.from_pretrained(src, dtype=torch.float32).eval()
  with torch.no_grad():
    out = reference(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                    output_hidden_states=True)
  hidden = out.hidden_states[cfg.layers_to_run]
  if cfg.post_norm:  # transformers 5 towers hold their layers directly (no `.vision_model`)
    with torch.no_grad():
      hidden = getattr(reference, "vision_model", reference).post_layernorm(hidden)
  ref = hidden.numpy()[:, int(cfg.drop_cls):]
  ours = np.asarray(model(images))
  return ours, ref, np.ones(ours.shape[:2], bool)


HF_VISION = Format(
    name="hf-vision",
    read_config=_read_tower_config,
    hf_files=lambda c: {"config.json": vision_config_to_hf(c.model.vision)},
    entries=lambda c: expand(vision_rules(c.model.vision), c.model.vision.num_layers),
    ignored=lambda c: vision_ignored(c.model.vision) + FULL_MODEL_EXTRAS,
    compare=_compare_tower,
    rename=_strip_vision_model,
)
