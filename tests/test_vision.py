"""SigLIP / CLIP towers: parity with transformers through the real conversion path
(save_pretrained -> HFCheckpoint -> key map -> import), feature selection, export round trip."""
import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          SiglipVisionConfig, SiglipVisionModel)

from mma_jax.config import ConfigError, VisionConfig, validate_vision
from mma_jax.convert.safetensors_io import HFCheckpoint, write_safetensors
from mma_jax.convert.torch_reference import randomize_
from mma_jax.convert.transfer import build_with_params, export_params, import_params, param_shapes
from mma_jax.convert.vision import (hf_vision_entries, hf_vision_ignored, vision_config_from_hf,
                                    vision_config_to_hf, vision_prefix)
from mma_jax.models.vision import VisionTower

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            image_size=16, patch_size=4)


def save_hf(model, directory):
  randomize_(model, seed=1).eval()
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("siglip")
  torch.manual_seed(0)
  # 18 is not a multiple of the patch (as so400m's 384 / 14): the last 2 pixel rows/cols drop.
  config = SiglipVisionConfig(**{**TINY, "image_size": 18}, attn_implementation="eager")
  model = save_hf(SiglipVisionModel(config), directory)
  return directory, model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("clip")
  torch.manual_seed(0)
  model = save_hf(CLIPVisionModel(CLIPVisionConfig(**TINY, attn_implementation="eager")),
                  directory)
  return directory, model


def load_tower(directory, cfg: VisionConfig, **kwargs):
  ckpt = HFCheckpoint(directory)
  prefix = vision_prefix(ckpt.keys())
  build = lambda: VisionTower(cfg, rngs=nnx.Rngs(0), **kwargs)
  params = import_params(hf_vision_entries(cfg, prefix), ckpt, param_shapes(nnx.eval_shape(build)),
                         ignore=hf_vision_ignored(cfg, prefix), progress=False)
  return build_with_params(build, params), params


def read_config(directory, **selection) -> VisionConfig:
  return vision_config_from_hf(json.loads((directory / "config.json").read_text()), **selection)


def images(cfg: VisionConfig, batch=2, seed=0, size=None):
  size = size or cfg.image_size
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def hf_outputs(model, pixels):
  with torch.no_grad():
    return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)


def test_siglip_last_hidden_state_parity(siglip_dir):
  directory, hf = siglip_dir
  cfg = read_config(directory)
  assert (cfg.family, cfg.feature_layer, cfg.post_norm, cfg.drop_cls) == ("siglip", -1, True, False)
  tower, _ = load_tower(directory, cfg)
  pixels = images(cfg)
  ours = np.asarray(tower(pixels))
  ref = hf_outputs(hf, pixels).last_hidden_state.numpy()
  assert ours.shape == ref.shape == (2, cfg.num_features, 32)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# (feature_layer, drop_cls, post_norm) -> the HF tensor it must equal.
CLIP_SELECTIONS = [
    (-2, True, False),   # LLaVA-1.5: hidden_states[-2] without CLS
    (1, False, False),   # after the first block, CLS kept
    (0, True, False),    # embeddings after pre_layrnorm
    (-1, False, True),   # post_layernorm over every token of the last layer
]


@pytest.mark.parametrize("feature_layer,drop_cls,post_norm", CLIP_SELECTIONS)
def test_clip_feature_selection_parity(clip_dir, feature_layer, drop_cls, post_norm):
  directory, hf = clip_dir
  cfg = read_config(directory, feature_layer=feature_layer, drop_cls=drop_cls, post_norm=post_norm)
  tower, _ = load_tower(directory, cfg)
  pixels = images(cfg, seed=feature_layer + 5)
  out = hf_outputs(hf, pixels)
  with torch.no_grad():
    ref = out.hidden_states[feature_layer]
    ref = hf.post_layernorm(ref) if post_norm else ref
  ref = ref.numpy()[:, 1:] if drop_cls else ref.numpy()
  ours = np.asarray(tower(pixels))
  assert ours.shape == ref.shape == (2, cfg.num_features, 32)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_clip_defaults_are_llava_and_scan_matches_unrolled(clip_dir):
  directory, _ = clip_dir
  cfg = read_config(directory)
  assert (cfg.family, cfg.feature_layer, cfg.drop_cls, cfg.post_norm) == ("clip", -2, True, False)
  assert cfg.hidden_act == "quick_gelu" and cfg.num_features == 16 and cfg.layers_to_run == 2
  unrolled, _ = load_tower(directory, cfg)
  scanned, _ = load_tower(directory, cfg, scan_layers=True)
  pixels = images(cfg)
  # Same math; XLA fuses the scanned body differently, hence f32 rounding differences only.
  np.testing.assert_allclose(np.asarray(scanned(pixels)), np.asarray(unrolled(pixels)),
                             atol=1e-5, rtol=0)


def test_legacy_prefixed_keys_load_the_same(siglip_dir, tmp_path):
  """Older transformers save a standalone tower under `vision_model.`; both layouts import."""
  directory, _ = siglip_dir
  ckpt = HFCheckpoint(directory)
  assert vision_prefix(ckpt.keys()) == ""
  save_file({"vision_model." + k: ckpt.read(k) for k in ckpt.keys()},
            str(tmp_path / "model.safetensors"))
  assert vision_prefix(HFCheckpoint(tmp_path).keys()) == "vision_model."
  cfg = read_config(directory)
  _, plain = load_tower(directory, cfg)
  _, legacy = load_tower(tmp_path, cfg)
  assert plain.keys() == legacy.keys()
  for k in plain:
    np.testing.assert_array_equal(plain[k], legacy[k])


def test_full_clip_model_checkpoint(tmp_path):
  """A full CLIPModel (LLaVA-1.5's tower is published as one): vision_config read from the full
  config, the text tower and contrastive heads ignored."""
  torch.manual_seed(0)
  config = CLIPConfig(vision_config=dict(TINY), text_config=dict(
      hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
      vocab_size=50), projection_dim=8, attn_implementation="eager")
  hf = save_hf(CLIPModel(config), tmp_path)
  cfg = read_config(tmp_path)
  assert cfg.family == "clip" and cfg.num_layers == 3
  tower, _ = load_tower(tmp_path, cfg)
  pixels = images(cfg)
  with torch.no_grad():
    ref = hf.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                          output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
  np.testing.assert_allclose(np.asarray(tower(pixels)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["siglip", "clip"])
def test_export_round_trip(which, siglip_dir, clip_dir, tmp_path):
  """import -> export gives back every mapped tensor bit for bit, and the exported directory
  (config + weights) loads in transformers with the same outputs."""
  directory, hf = {"siglip": siglip_dir, "clip": clip_dir}[which]
  cfg = read_config(directory)
  _, params = load_tower(directory, cfg)
  ckpt = HFCheckpoint(directory)
  exported = dict(export_params(hf_vision_entries(cfg), params))
  ignored = {"siglip": {k for k in ckpt.keys() if k.startswith("head.")}, "clip": set()}[which]
  assert set(exported) == set(ckpt.keys()) - ignored
  for key, array in exported.items():
    np.testing.assert_array_equal(array, ckpt.read(key), err_msg=key)

  write_safetensors(tmp_path, exported.items())
  (tmp_path / "config.json").write_text(json.dumps(vision_config_to_hf(cfg)))
  assert read_config(tmp_path) == cfg
  cls = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[which]
  reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
  pixels = images(cfg)
  np.testing.assert_allclose(hf_outputs(reloaded, pixels).last_hidden_state.numpy(),
                             hf_outputs(hf, pixels).last_hidden_state.numpy(), atol=1e-6, rtol=0)


def test_bad_inputs_give_clear_errors(siglip_dir):
  directory, _ = siglip_dir
  cfg = read_config(directory)
  tower, _ = load_tower(directory, cfg)
  with pytest.raises(ValueError, match=r"images \[B, 18, 18, 3\]"):
    tower(images(cfg, size=16))
  with pytest.raises(ConfigError, match="feature_layer"):
    validate_vision(VisionConfig(num_layers=3, feature_layer=-5))
  with pytest.raises(ConfigError, match="patch_size"):
    validate_vision(VisionConfig(image_size=8, patch_size=14))
  validate_vision(VisionConfig())  # so400m: 384 is not a multiple of 14, and that is fine
  with pytest.raises(ConfigError, match="model_type 'llama'"):
    vision_config_from_hf({"model_type": "llama"})
