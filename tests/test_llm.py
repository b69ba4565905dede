"""Decoder LLMs against transformers (tiny random configs), packing, scanned layers."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import save_tiny_llm
from mma_jax.config import Config, LLMConfig, ModelConfig
from mma_jax.convert import operations
from mma_jax.convert.llm import HF_LLM
from mma_jax.models import build_model
from mma_jax.models.llm import DecoderLLM


@pytest.mark.parametrize("family,seq_len", [
    ("llama", 40),   # GQA, llama3 rope scaling
    ("qwen2", 40),   # qkv bias, tied embeddings
    ("phi3", 24),    # longrope, short factors (inside the original 32 positions)
    ("phi3", 48),    # longrope, long factors
])
def test_logits_match_transformers_on_padded_batch(tmp_path, family, seq_len):
  save_tiny_llm(family, tmp_path)
  diff = operations.verify(HF_LLM, tmp_path, seq_len=seq_len, batch=3)
  assert diff <= 1e-4


def _tiny_config(**llm) -> Config:
  return Config(model=ModelConfig(llm=LLMConfig(**{
      "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
      "num_heads": 4, "num_kv_heads": 2, **llm})))


def _run(model, tokens, positions, segment_ids):
  zeros = jnp.zeros_like(segment_ids)
  return model(tokens=tokens, positions=positions, segment_ids=segment_ids,
               window_lo=zeros, window_hi=zeros)


def test_packed_row_equals_separate_examples():
  model = build_model(_tiny_config(qkv_bias=True), nnx.Rngs(0))
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 64, 7), rng.integers(1, 64, 5)
  pad = 4
  row = np.concatenate([a, b, np.zeros(pad, int)])[None]
  positions = np.concatenate([np.arange(7), np.arange(5), np.arange(pad)])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0] * pad])
  packed = _run(model, jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments))
  alone_a = _run(model, jnp.asarray(a[None]), jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
  alone_b = _run(model, jnp.asarray(b[None]), jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[0, 7:12], alone_b[0], atol=1e-5, rtol=0)
  # Without the segment boundary the second example would see the first: the ids matter.
  merged = _run(model, jnp.asarray(row), jnp.asarray(positions),
                jnp.asarray(np.where(segments > 0, 1, 0)))
  assert np.abs(merged[0, 7:12] - alone_b[0]).max() > 1e-3


def test_scanned_layers_give_identical_logits():
  config = _tiny_config()
  unrolled = build_model(config, nnx.Rngs(0))
  scanned = build_model(dataclasses.replace(
      config, model=dataclasses.replace(config.model, scan_layers=True)), nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  ones = jnp.ones((2, 9), jnp.int32)
  run = nnx.jit(_run)
  np.testing.assert_array_equal(run(unrolled, tokens, positions, ones),
                                run(scanned, tokens, positions, ones))


def test_window_reaches_later_keys_and_only_them():
  """An extra key window changes exactly the rows that own it (the MMA hook in the LLM)."""
  model = build_model(_tiny_config(), nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, 10)))
  positions, ones = jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32)
  lo = jnp.zeros((1, 10), jnp.int32).at[0, 2:4].set(4)
  hi = jnp.zeros((1, 10), jnp.int32).at[0, 2:4].set(7)
  causal = _run(model, tokens, positions, ones)
  windowed = model(tokens=tokens, positions=positions, segment_ids=ones, window_lo=lo, window_hi=hi)
  np.testing.assert_array_equal(causal[0, :2], windowed[0, :2])
  assert np.abs(causal[0, 2:4] - windowed[0, 2:4]).min() > 0
  # rows 4.. see rows 2, 3 whose states changed, so they differ too; that is the MMA effect


def test_embeddings_input_equals_tokens_input():
  model = build_model(_tiny_config(), nnx.Rngs(0))
  tokens = jnp.asarray([[3, 5, 7, 9]])
  positions, ones, zeros = jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32)
  by_tokens = _run(model, tokens, positions, ones)
  by_embeddings = model(embeddings=model.embed_tokens(tokens), positions=positions,
                        segment_ids=ones, window_lo=zeros, window_hi=zeros)
  np.testing.assert_array_equal(by_tokens, by_embeddings)


def test_sliding_window_models_refuse_longer_sequences():
  model = DecoderLLM(dataclasses.replace(_tiny_config().model.llm, sliding_window=8),
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sliding_window=8"):
    _run(model, jnp.zeros((1, 9), jnp.int32), jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32))


def test_parameters_carry_logical_axes():
  model = nnx.eval_shape(lambda: build_model(_tiny_config(), nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["layers"]["attn"]["q"]["kernel"].value) == ("layers", "embed", "heads")
  assert tuple(specs["embed"]["embedding"].value) == ("vocab", "embed")
  assert tuple(specs["layers"]["mlp"]["down"]["kernel"].value) == ("layers", "mlp", "embed")
