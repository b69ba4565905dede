"""Connectors: the AKI Perceiver against a PyTorch reference of the official module, LLaVA's
projector against transformers' own, both loaded through their key maps; export round trips."""
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mma_jax.config import ConfigError, ConnectorConfig, VisionConfig, from_dict
from mma_jax.convert.safetensors_io import HFCheckpoint
from mma_jax.convert.torch_reference import PerceiverResampler as TorchPerceiver
from mma_jax.convert.torch_reference import randomize_
from mma_jax.convert.transfer import build_with_params, export_params, import_params, param_shapes
from mma_jax.convert.vision import (connector_entries, mlp_projector_config_from_hf,
                                    perceiver_config_from_shapes)
from mma_jax.models.connector import (MLPProjector, PerceiverResampler, build_connector,
                                      tokens_per_image)

VISION_DIM, LLM_DIM = 32, 48


def save_torch(module, prefix, directory):
  save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()},
            str(directory / "model.safetensors"))
  return HFCheckpoint(directory)


def load(build, entries, ckpt):
  params = import_params(entries, ckpt, param_shapes(nnx.eval_shape(build)), progress=False)
  return build_with_params(build, params), params


def features(batch, n, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, n, VISION_DIM)).astype(np.float32)


def check_export(entries, params, ckpt):
  exported = dict(export_params(entries, params))
  assert set(exported) == set(ckpt.keys())
  for key, array in exported.items():
    np.testing.assert_array_equal(array, ckpt.read(key), err_msg=key)


def test_perceiver_matches_official_structure(tmp_path):
  """Sizes read off the tensors (as the AKI format must: heads fixed at 8), weights through the
  official key names under `vision_tokenizer.`, fused to_kv split and fused back."""
  torch.manual_seed(0)
  ref = randomize_(TorchPerceiver(dim=VISION_DIM, dim_inner=LLM_DIM, depth=3, dim_head=4, heads=8,
                                  num_latents=5, ff_mult=4), seed=2).eval()
  ckpt = save_torch(ref, "vision_tokenizer.", tmp_path)
  cfg = perceiver_config_from_shapes({k: ckpt.shape(k) for k in ckpt.keys()})
  assert (cfg.num_latents, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.ff_mult) == (5, 3, 8, 4, 4)
  entries = connector_entries(cfg, "vision_tokenizer.")
  ours, params = load(lambda: PerceiverResampler(cfg, VISION_DIM, LLM_DIM, rngs=nnx.Rngs(0)),
                      entries, ckpt)
  x = features(batch=3, n=11)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(ours(x))
  assert got.shape == want.shape == (3, 5, LLM_DIM)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  check_export(entries, params, ckpt)


def test_perceiver_other_head_split_and_scan(tmp_path):
  """2 heads x 16 (a different split of the same inner width must matter), scanned layers."""
  torch.manual_seed(0)
  ref = randomize_(TorchPerceiver(dim=VISION_DIM, dim_inner=LLM_DIM, depth=2, dim_head=16,
                                  heads=2, num_latents=4, ff_mult=2), seed=3).eval()
  ckpt = save_torch(ref, "", tmp_path)
  cfg = ConnectorConfig(num_latents=4, depth=2, num_heads=2, head_dim=16, ff_mult=2)
  build = lambda: PerceiverResampler(cfg, VISION_DIM, LLM_DIM, scan_layers=True, rngs=nnx.Rngs(0))
  ours, _ = load(build, connector_entries(cfg, ""), ckpt)
  x = features(batch=2, n=7, seed=1)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours(x)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("act,bias", [("gelu", True), ("quick_gelu", False)])
def test_mlp_projector_matches_llava(tmp_path, act, bias):
  hf_config = LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=VISION_DIM, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4),
      text_config=LlamaConfig(hidden_size=LLM_DIM, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, vocab_size=64),
      projector_hidden_act=act, multimodal_projector_bias=bias)
  torch.manual_seed(0)
  ref = randomize_(LlavaMultiModalProjector(hf_config), seed=4).eval()
  ckpt = save_torch(ref, "multi_modal_projector.", tmp_path)
  cfg = mlp_projector_config_from_hf(hf_config.to_dict())
  assert (cfg.type, cfg.mlp_act, cfg.mlp_bias) == ("mlp", act, bias)
  entries = connector_entries(cfg, "multi_modal_projector.")
  ours, params = load(lambda: MLPProjector(cfg, VISION_DIM, LLM_DIM, rngs=nnx.Rngs(0)), entries,
                      ckpt)
  x = features(batch=2, n=9, seed=2)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours(x)), want, atol=1e-5, rtol=0)
  check_export(entries, params, ckpt)


def test_tokens_per_image_and_builder():
  vision = VisionConfig(family="clip", image_size=16, patch_size=4, feature_layer=-2,
                        drop_cls=True, post_norm=False)
  assert tokens_per_image(ConnectorConfig(type="mlp"), vision) == 16
  assert tokens_per_image(ConnectorConfig(num_latents=7), vision) == 7
  build = lambda cfg: nnx.eval_shape(lambda: build_connector(cfg, 8, 12, rngs=nnx.Rngs(0)))
  assert isinstance(build(ConnectorConfig(type="mlp")), MLPProjector)
  perceiver = build(ConnectorConfig(num_latents=3, depth=2, num_heads=2, head_dim=4))
  assert isinstance(perceiver, PerceiverResampler)
  assert param_shapes(perceiver)["layers.attn.k.kernel"][0] == (2, 8, 8)
  assert param_shapes(perceiver)["projection.kernel"][0] == (8, 12)


def test_connector_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="model.connector.type"):
    from_dict({}, ["model.connector.type=qformer"])
  with pytest.raises(ConfigError, match="model.connector.depth"):
    from_dict({}, ["model.connector.depth=0"])
  with pytest.raises(ConfigError, match="model.vision.feature_layer"):
    from_dict({}, ["model.vision.feature_layer=40"])
