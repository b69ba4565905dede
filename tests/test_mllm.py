"""MultimodalDecoder: image rows land where image_token_index says, a frozen tower gets no
gradient; hf-vision conversion and assembling a fresh MLLM."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import save_tiny_llm, save_tiny_tower
from mma_jax.config import (Config, ConnectorConfig, LLMConfig, ModelConfig, VisionConfig,
                            ConfigError, validate)
from mma_jax.convert import operations
from mma_jax.convert.__main__ import main as convert_main
from mma_jax.convert.store import load_model
from mma_jax.convert.transfer import build_with_params
from mma_jax.convert.vision import HF_VISION
from mma_jax.models import build_model
from mma_jax.models.mllm import MultimodalDecoder


def tiny_mllm_config(connector="perceiver", freeze=True) -> ModelConfig:
  return ModelConfig(
      llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2),
      vision=VisionConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          image_size=16, patch_size=8),
      connector=ConnectorConfig(type=connector, num_latents=3, depth=1, num_heads=2, head_dim=8),
      freeze_vision=freeze)


def _batch(rows_per_image: int, length=12):
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, length)))
  index = np.full((2, length), -1, np.int32)
  index[0, 2:2 + rows_per_image] = np.arange(rows_per_image)
  index[1, 1:1 + 2 * rows_per_image] = np.arange(2 * rows_per_image)  # two images
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 16, 16, 3))
  ones, zeros = jnp.ones((2, length), jnp.int32), jnp.zeros((2, length), jnp.int32)
  return dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(length), (2, length)),
              segment_ids=ones, window_lo=zeros, window_hi=zeros,
              image_token_index=jnp.asarray(index), images=images)


@pytest.mark.parametrize("connector,rows", [("perceiver", 3), ("mlp", 4)])
def test_image_rows_are_scattered_at_their_index(connector, rows):
  model = MultimodalDecoder(tiny_mllm_config(connector), rngs=nnx.Rngs(0))
  batch = _batch(rows)
  embedded = model.embed(batch["tokens"], batch["image_token_index"], batch["images"])
  image_rows = model.image_rows(batch["images"])
  assert image_rows.shape == (2, 2 * rows, 32)
  np.testing.assert_array_equal(embedded[0, 2:2 + rows], image_rows[0, :rows])
  np.testing.assert_array_equal(embedded[1, 1:1 + 2 * rows], image_rows[1])
  np.testing.assert_array_equal(embedded[0, :2], model.llm.embed_tokens(batch["tokens"][0, :2]))
  # and the logits follow the embeddings
  logits = model(**batch)
  np.testing.assert_allclose(
      logits, model.llm(embeddings=embedded, **{k: batch[k] for k in (
          "positions", "segment_ids", "window_lo", "window_hi")}), atol=1e-6, rtol=0)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vision_stops_gradients_into_the_tower(freeze):
  model = MultimodalDecoder(tiny_mllm_config(freeze=freeze), rngs=nnx.Rngs(0))
  batch = _batch(3)
  grads = nnx.grad(lambda m: jnp.sum(m(**batch) ** 2))(model)
  tower = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["vision"]))
  connector = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["connector"]))
  assert connector > 0
  assert (tower == 0) == freeze


def test_connector_without_tower_is_a_config_error():
  config = Config(model=dataclasses.replace(tiny_mllm_config(), vision=None))
  with pytest.raises(ConfigError, match="model.vision"):
    validate(config)


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_hf_vision_verify_and_round_trip(tmp_path, family, capsys):
  save_tiny_tower(family, tmp_path / "hf")
  assert convert_main(["verify", "--format", "hf-vision", "--src", str(tmp_path / "hf")]) == 0
  assert float(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1]) <= 1e-4
  operations.import_checkpoint(HF_VISION, tmp_path / "hf", tmp_path / "ckpt")
  operations.export_checkpoint(HF_VISION, tmp_path / "ckpt", tmp_path / "out")
  assert operations.verify(HF_VISION, tmp_path / "out", seq_len=0, batch=2) <= 1e-4


def test_assemble_a_fresh_mllm(tmp_path, capsys):
  save_tiny_llm("phi3", tmp_path / "llm")
  save_tiny_tower("siglip", tmp_path / "tower")
  assert convert_main(["assemble", "--llm", str(tmp_path / "llm"), "--vision",
                       str(tmp_path / "tower"), "--connector", "perceiver", "--add-tokens", "2",
                       "--dst", str(tmp_path / "ckpt")]) == 0
  config, params = load_model(tmp_path / "ckpt")
  assert config.model.kind == "mllm" and config.attention.mask == "causal"
  assert config.model.llm.vocab_size == 98 and params["llm.embed.embedding"].shape == (98, 64)
  assert params["llm.lm_head.kernel"].shape == (64, 98)
  # The LLM's and the tower's weights are the HF ones, untouched.
  _, llm = operations.read_hf(operations.HF_LLM, tmp_path / "llm")
  np.testing.assert_array_equal(params["llm.embed.embedding"][:96], llm["embed.embedding"])
  np.testing.assert_array_equal(params["llm.layers.mlp.up.kernel"], llm["layers.mlp.up.kernel"])
  _, tower = operations.read_hf(HF_VISION, tmp_path / "tower")
  np.testing.assert_array_equal(params["vision.patch_embed.kernel"], tower["patch_embed.kernel"])
  # It builds and runs.
  model = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  batch = _batch(144, length=300)
  batch["images"] = jnp.zeros((2, 2, 28, 28, 3))
  assert model(**batch).shape == (2, 300, 98)


def test_assemble_to_a_model_config_is_what_init_from_accepts(tmp_path, capsys):
  """`assemble --config`: exactly the configured model (AKI's table: the first vocab_size - N HF
  rows and N new ones; a head bias), which model.init_from loads; an HF part of another
  architecture is refused, naming the field."""
  from mma_jax.config import to_yaml
  from mma_jax.sharding import make_mesh
  from mma_jax.train.loop import initial_model

  save_tiny_llm("phi3", tmp_path / "llm")
  save_tiny_tower("siglip", tmp_path / "tower")
  hf_llm, llm = operations.read_hf(operations.HF_LLM, tmp_path / "llm")
  hf_tower, _ = operations.read_hf(HF_VISION, tmp_path / "tower")
  target = ModelConfig(
      llm=dataclasses.replace(hf_llm.model.llm, vocab_size=92, head_bias=True, pad_token_id=91),
      vision=hf_tower.model.vision,
      connector=ConnectorConfig(type="perceiver", num_latents=4, depth=1, num_heads=2, head_dim=16))
  (tmp_path / "model.yaml").write_text(to_yaml(Config(model=target)))
  args = ["assemble", "--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "tower"),
          "--config", str(tmp_path / "model.yaml"), "--add-tokens", "2"]
  assert convert_main(args + ["--dst", str(tmp_path / "ckpt")]) == 0
  config, params = load_model(tmp_path / "ckpt")
  assert (config.model.llm, config.model.connector) == (target.llm, target.connector)
  table, head = params["llm.embed.embedding"], params["llm.lm_head.kernel"]
  assert table.shape == (92, 64) and head.shape == (64, 92)
  np.testing.assert_array_equal(table[:90], llm["embed.embedding"][:90])
  np.testing.assert_array_equal(head[:, :90], llm["lm_head.kernel"][:, :90])
  assert 0.01 < table[90:].std() < 0.03 and not np.allclose(table[90:], llm["embed.embedding"][90:92])
  bias = params["llm.head_bias"]
  assert bias.shape == (92,) and 0 < np.abs(bias).max() <= 1 / np.sqrt(64)

  run = Config(model=dataclasses.replace(target, init_from=str(tmp_path / "ckpt")))
  _, loaded = nnx.split(initial_model(run, make_mesh(run.mesh)), nnx.Param)
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["head_bias"][...]), bias)

  other = dataclasses.replace(target, llm=dataclasses.replace(target.llm, num_layers=3))
  (tmp_path / "model.yaml").write_text(to_yaml(Config(model=other)))
  capsys.readouterr()
  assert convert_main(args + ["--dst", str(tmp_path / "other")]) == 2
  assert "num_layers: config 3, checkpoint 2" in capsys.readouterr().err
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("preset", sorted(p.name for p in
                                    (pathlib.Path(__file__).parents[1] / "configs/model").glob("*.yaml")))
def test_model_presets_are_what_the_hf_readers_make_of_their_config_json(preset, tmp_path):
  """A preset's LLM and tower, written as HF config.json and read back, are the preset (but for
  what an MLLM sets itself): otherwise `assemble --config` and model.init_from refuse the converted
  weights (as a sliding_window of 262144, which the reader reads as none, once did)."""
  from mma_jax.config import load_config
  from mma_jax.convert.llm import llm_config_from_hf

  config = load_config(pathlib.Path(__file__).parents[1] / "configs/model" / preset)
  operations._check_matches(config.model.llm, llm_config_from_hf(
      operations.HF_LLM.hf_files(config)["config.json"]), preset, ignore=operations._NAMING_FIELDS)
  if config.model.vision is not None:
    for name, content in HF_VISION.hf_files(config).items():
      (tmp_path / name).write_text(json.dumps(content))
    operations._check_matches(config.model.vision, HF_VISION.read_config(tmp_path).model.vision,
                              preset, ignore=operations._FEATURE_CHOICE_FIELDS)


def test_flash_kernel_in_the_model_matches_dense_logits_and_gradients():
  """The whole tiny MLLM in mma mode: impl=flash (interpret) vs dense, logits and every grad."""
  batch = _batch(3, length=20)
  lo, hi = np.zeros((2, 20), np.int32), np.zeros((2, 20), np.int32)
  lo[0, 2:5], hi[0, 2:5] = 5, 9            # image rows 2..4 see the question through the header
  lo[1, 1:7], hi[1, 1:7] = 7, 12           # two images in one turn
  segments = np.ones((2, 20), np.int32)
  segments[1, 14:] = 2                     # a second packed example
  segments[0, 17:] = 0                     # padding
  batch.update(window_lo=jnp.asarray(lo), window_hi=jnp.asarray(hi),
               segment_ids=jnp.asarray(segments))
  targets = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 20)))

  def loss(model):
    logits = model(**batch)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked), logits

  outputs = {}
  for impl in ("dense", "flash"):
    model = build_model(Config(model=tiny_mllm_config(freeze=False),
                               attention=dataclasses.replace(Config().attention, impl=impl,
                                                             block_q=16, block_kv=16)),
                        nnx.Rngs(0))
    outputs[impl] = nnx.value_and_grad(loss, has_aux=True)(model)
  (dense_loss, dense_logits), dense_grads = outputs["dense"]
  (flash_loss, flash_logits), flash_grads = outputs["flash"]
  np.testing.assert_allclose(flash_logits, dense_logits, atol=1e-5, rtol=0)
  assert abs(float(flash_loss - dense_loss)) <= 1e-5
  for g_flash, g_dense in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(g_flash, g_dense, atol=1e-5, rtol=0)
  # The windows matter: the same model with causal vectors gives other logits at image rows.
  causal = dict(batch, window_lo=jnp.zeros_like(batch["window_lo"]),
                window_hi=jnp.zeros_like(batch["window_hi"]))
  model = build_model(Config(model=tiny_mllm_config()), nnx.Rngs(0))
  assert float(jnp.abs(model(**causal)[0, 2:5] - dense_logits[0, 2:5]).max()) > 1e-4


@pytest.mark.parametrize("remat,scan", [("full", False), ("full", True), ("dots_no_batch", True)])
def test_remat_keeps_loss_and_gradients_and_recomputes(remat, scan):
  """Every layer stack (tower, perceiver, decoder) rematerialised: same loss and grads as without;
  the backward program really holds checkpointed (recomputed) layers."""
  batch = _batch(3)

  def loss(model):
    return jnp.mean(model(**batch) ** 2)

  def grads_and_program(remat):
    config = dataclasses.replace(tiny_mllm_config(freeze=False), remat=remat, scan_layers=scan)
    model = build_model(Config(model=config), nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    grad_fn = jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s)))
    return grad_fn(state), str(jax.make_jaxpr(grad_fn)(state))

  (base_loss, base_grads), base_program = grads_and_program("none")
  (loss_value, grads), program = grads_and_program(remat)
  assert abs(float(loss_value - base_loss)) <= 1e-6
  for g, g_base in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(g, g_base, atol=1e-6, rtol=0)
  # The backward of a rematerialised layer is a `remat2[differentiated=True]` equation.
  assert "remat2" not in base_program
  assert program.count("differentiated=True") >= (3 if scan else 5)   # per stack, or per layer
