"""The `aki` format: a tiny AKI-format checkpoint (SigLIP + Perceiver + Phi-3 under the official key
names, decoupled embedding and head with its biases, every parameter random) against the PyTorch
reference of the official forward and MMA rule; verify through the CLI; import -> export ->
re-import; base configs from the HF cache or a clear error; the LM-head bias in the model (tied and
untied, never decayed) and its refusal by the HF LLM format. The official code's own checkpoint:
test_aki_official.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from hf_models import save_tiny_llm, tiny_llm_config
from mma_jax.config import ConfigError, LLMConfig, TrainConfig
from mma_jax.convert import operations
from mma_jax.convert.__main__ import main as convert_main
from mma_jax.convert.aki import (AKI, load_reference, our_logits, prompt_batch,
                                 reference_logits)
from mma_jax.convert.llm import HF_LLM
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint
from mma_jax.convert.torch_reference import AKIReference, mma_keep_mask, randomize_
from mma_jax.convert.transfer import build_with_params
from mma_jax.models import build_model
from mma_jax.models.llm import DecoderLLM
from mma_jax.train.optimizer import make_optimizer

BASE_VOCAB, INITIAL = 96, 90   # base rows [90, 96) are dead; 90 = <image>, 91 = <|endofchunk|>
LATENTS, SEQ_LEN = 6, 40       # 40 > original_max_position_embeddings (32): longrope's long factors
LLM_ID, VISION_ID = "microsoft/tiny-phi", "google/tiny-siglip"


def _build(root):
  """Writes root/aki (the checkpoint), root/llm and root/vision (the base configs)."""
  llm = tiny_llm_config("phi3", vocab_size=BASE_VOCAB, pad_token_id=0)
  vision = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
      image_size=28, patch_size=7, vision_use_head=True)   # the unused head is in AKI files too
  torch.manual_seed(0)
  reference = AKIReference(vision, llm, perceiver=dict(depth=2, dim_head=4, heads=8,
                                                       num_latents=LATENTS, ff_mult=2),
                           initial_tokenizer_len=INITIAL)
  randomize_(reference, seed=1, std=0.1)
  tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
  (root / "aki").mkdir()
  save_file(tensors, str(root / "aki" / "model.safetensors"), metadata={"format": "pt"})
  (root / "aki" / "config.json").write_text(json.dumps(dict(
      vision_encoder_path=VISION_ID, lang_model_path=LLM_ID, pad_token_id=0,
      initial_tokenizer_len=INITIAL, num_vision_tokens=LATENTS)))
  llm.save_pretrained(root / "llm")
  # The vision base is a full SiglipConfig, as google/siglip-so400m-patch14-384's is.
  transformers.SiglipConfig(vision_config=vision.to_dict()).save_pretrained(root / "vision")
  return tensors


@pytest.fixture(scope="module")
def aki(tmp_path_factory):
  root = tmp_path_factory.mktemp("aki")
  tensors = _build(root)
  options = dict(llm_config=root / "llm", vision_config=root / "vision" / "config.json")
  return root, tensors, options


def _model(config, params):
  config.attention.impl = "dense"
  return build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)


def test_config_and_key_map(aki):
  root, tensors, options = aki
  config, params = operations.read_hf(AKI, root / "aki", progress=False, **options)
  m = config.model
  assert config.attention.mask == "mma" and m.kind == "mllm"
  assert (m.llm.vocab_size, m.origin.image_token_id, m.origin.base_vocab_size) == (92, 90, 96)
  assert (m.connector.num_latents, m.connector.depth, m.connector.head_dim) == (LATENTS, 2, 4)
  assert (m.origin.llm_path, m.origin.vision_path) == (LLM_ID, VISION_ID)
  assert m.llm.rope.type == "longrope" and m.vision.post_norm and m.vision.feature_layer == -1
  # One table: the original rows, then the added ones; the head likewise (as columns).
  table = params["llm.embed.embedding"]
  np.testing.assert_array_equal(table[:INITIAL],
                                tensors["lang_model.model.embed_tokens.weight"][:INITIAL])
  np.testing.assert_array_equal(
      table[INITIAL:], tensors["lang_model.model.embed_tokens.additional_embedding.weight"])
  head = params["llm.lm_head.kernel"]
  np.testing.assert_array_equal(head[:, :INITIAL],
                                tensors["lang_model.lm_head.weight"][:INITIAL].T)
  np.testing.assert_array_equal(head[:, INITIAL:],
                                tensors["lang_model.lm_head.additional_fc.weight"].T)
  assert m.llm.head_bias   # the official head's biases, concatenated like its rows
  np.testing.assert_array_equal(params["llm.head_bias"], np.concatenate(
      [tensors["lang_model.lm_head.bias"][:INITIAL],
       tensors["lang_model.lm_head.additional_fc.bias"]]))


def test_mma_logits_match_the_reference_and_causal_ones_do_not(aki):
  root, _, options = aki
  config, params = operations.read_hf(AKI, root / "aki", progress=False, **options)
  model = _model(config, params)
  batch = prompt_batch(config, SEQ_LEN, batch=3, seed=0)
  ref = reference_logits(load_reference(root / "aki", config), batch)
  ours = our_logits(model, config, batch)
  assert ours.shape == ref.shape == (3, SEQ_LEN, 92)
  assert np.abs(ref).max() > 1.0   # logits of substance, so that 1e-4 means something
  np.testing.assert_allclose(ours[batch.valid], ref[batch.valid], atol=1e-4, rtol=0)

  # The same model in causal mode: equal before the image, different on its rows.
  config.attention.mask = "causal"
  causal = our_logits(model, config, batch)
  for b, (start, end) in enumerate(batch.image_spans):
    np.testing.assert_allclose(causal[b, :start], ref[b, :start], atol=1e-4, rtol=0)
    assert np.abs(causal[b, start:end] - ref[b, start:end]).max() > 1e-2


def test_reference_keep_mask_is_the_official_rule():
  valid = torch.tensor([True] * 7 + [False])
  keep = mma_keep_mask(valid, image_start=1, image_end=3, assistant=5)
  want = np.tril(np.ones((8, 8), bool))
  want[1:3, 3:6] = True            # image rows see the question through the assistant token
  want[:, 7] = False               # no query sees a padding key
  np.testing.assert_array_equal(keep.numpy(), want)


def test_verify_through_the_cli(aki, capsys):
  root, _, options = aki
  code = convert_main(["verify", "--format", "aki", "--src", str(root / "aki"),
                       "--llm-config", str(options["llm_config"]),
                       "--vision-config", str(options["vision_config"]),
                       "--seq-len", str(SEQ_LEN), "--batch", "2"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert code == 0 and last.startswith("max_abs_logit_diff=")
  assert float(last.split("=")[1]) <= 1e-4


def as_exported(key: str, tensor: np.ndarray, initial: int) -> np.ndarray:
  """What an aki export writes for an official tensor: SigLIP's pooling head and the dead base
  rows [initial, base vocabulary) of the embedding, head and head bias as zeros; the rest as is."""
  if key.startswith("vision_encoder.head."):
    return np.zeros_like(tensor)
  if key in ("lang_model.model.embed_tokens.weight", "lang_model.lm_head.weight",
             "lang_model.lm_head.bias"):
    return np.concatenate([tensor[:initial], np.zeros_like(tensor[initial:])])
  return tensor


def test_import_export_round_trip(aki, tmp_path):
  root, tensors, options = aki
  operations.import_checkpoint(AKI, root / "aki", tmp_path / "ckpt", **options)
  operations.export_checkpoint(AKI, tmp_path / "ckpt", tmp_path / "out")
  # The official key set and equal tensors; what we do not keep is written as zeros: the dead
  # base rows [INITIAL, BASE_VOCAB) and SigLIP's pooling head (unused).
  out = HFCheckpoint(tmp_path / "out")
  assert set(out.keys()) == set(tensors)
  for key, want in tensors.items():
    np.testing.assert_array_equal(out.read(key), as_exported(key, want, INITIAL), err_msg=key)
  out.close()
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  original = json.loads((root / "aki" / "config.json").read_text())
  assert {k: exported[k] for k in original} == original
  # Re-import: identical parameters and config.
  config, params = operations.read_hf(AKI, root / "aki", progress=False, **options)
  again_config, again = operations.read_hf(AKI, tmp_path / "out", progress=False, **options)
  assert again_config.model == config.model and set(again) == set(params)
  for path in params:
    np.testing.assert_array_equal(again[path], params[path], err_msg=path)


def test_base_configs_from_the_hf_cache_or_a_clear_error(aki, tmp_path, monkeypatch):
  root, _, options = aki
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  with pytest.raises(CheckpointError, match=f"'{LLM_ID}'.*--llm-config"):
    AKI.read_config(root / "aki")
  with pytest.raises(CheckpointError, match=f"'{VISION_ID}'.*--vision-config"):
    AKI.read_config(root / "aki", llm_config=options["llm_config"])
  for hub_id, src in ((LLM_ID, options["llm_config"] / "config.json"),
                      (VISION_ID, options["vision_config"])):
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(src.read_text())
  assert AKI.read_config(root / "aki").model == AKI.read_config(root / "aki", **options).model


def test_wrong_base_llm_is_refused(aki, tmp_path):
  root, _, options = aki
  tiny_llm_config("phi3", vocab_size=BASE_VOCAB + 1).save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="vocab_size=97"):
    AKI.read_config(root / "aki", llm_config=tmp_path,
                    vision_config=options["vision_config"])


def test_a_file_without_the_head_bias_is_refused_by_name(aki, tmp_path):
  root, tensors, options = aki
  (tmp_path / "config.json").write_text((root / "aki" / "config.json").read_text())
  save_file({k: v for k, v in tensors.items() if k != "lang_model.lm_head.bias"},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="missing key 'lang_model.lm_head.bias'"):
    operations.read_hf(AKI, tmp_path, progress=False, **options)


@pytest.mark.parametrize("extra,match", [
    ({"decoder_layers_attr_name": "model.layers", "gradient_checkpointing": True,
      "base_img_size": None, "tokenizer": None}, None),
    ({"decoder_layers_attr_name": "transformer.h"}, "decoder_layers_attr_name='transformer.h'"),
    ({"vision_layers": 3}, "'vision_layers', which is not an argument"),
])
def test_config_json_keys_of_the_official_constructor(aki, tmp_path, extra, match):
  root, tensors, options = aki
  config = json.loads((root / "aki" / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **extra}))
  (tmp_path / "model.safetensors").symlink_to(root / "aki" / "model.safetensors")
  if match is None:
    assert AKI.read_config(tmp_path, **options).model.llm.head_bias
  else:
    with pytest.raises(ConfigError, match=match):
      AKI.read_config(tmp_path, **options)


# ------------------------------------------------------------------------------ the LM-head bias
def _tiny_llm(tied: bool, head_bias: bool) -> DecoderLLM:
  cfg = LLMConfig(vocab_size=24, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                  num_kv_heads=2, tie_word_embeddings=tied, head_bias=head_bias)
  return DecoderLLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tied", [False, True])
def test_head_bias_adds_to_the_logits_of_tied_and_untied_heads(tied):
  plain, biased = _tiny_llm(tied, False), _tiny_llm(tied, True)
  assert plain.head_bias is None and biased.head_bias.get_metadata()["out_sharding"] == ("vocab",)
  bias = np.random.default_rng(0).standard_normal(24).astype(np.float32)
  biased.head_bias[...] = bias
  hidden = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(biased.logits(hidden)),
                             np.asarray(plain.logits(hidden)) + bias, atol=1e-6, rtol=0)


def test_head_bias_is_trained_without_weight_decay():
  params = nnx.state(_tiny_llm(False, True), nnx.Param)
  optimizer = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1,
                                         weight_decay=0.5))
  update = jax.jit(lambda grads: optimizer.update(grads, optimizer.init(params), params)[0])
  # With zero gradients only weight decay moves a parameter: the head kernel, not its bias.
  updates = update(jax.tree.map(jnp.zeros_like, params))
  assert np.abs(np.asarray(updates["lm_head"]["kernel"][...])).max() > 0
  assert np.abs(np.asarray(updates["head_bias"][...])).max() == 0
  updates = update(jax.tree.map(jnp.ones_like, params))
  assert np.abs(np.asarray(updates["head_bias"][...])).min() > 0   # but it is trained


def test_hf_llm_export_refuses_a_nonzero_head_bias(tmp_path):
  save_tiny_llm("llama", tmp_path / "hf")
  config, params = operations.read_hf(HF_LLM, tmp_path / "hf", progress=False)
  config.model.llm.head_bias = True
  vocab = config.model.llm.vocab_size
  with pytest.raises(CheckpointError, match="'head_bias'.*model.llm.head_bias"):
    operations.write_hf(HF_LLM, config, {**params, "head_bias": np.ones(vocab, np.float32)},
                        tmp_path / "out")
  assert not (tmp_path / "out").exists()
  # All zeros is no bias: exported as the HF model it is, without a bias key.
  operations.write_hf(HF_LLM, config, {**params, "head_bias": np.zeros(vocab, np.float32)},
                      tmp_path / "zeros")
  exported = HFCheckpoint(tmp_path / "zeros")
  keys = list(exported.keys())
  exported.close()
  assert "lm_head.weight" in keys and not any("bias" in k for k in keys)
