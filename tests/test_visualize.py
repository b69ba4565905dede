"""python -m mma_jax.visualize: a layer's attention probabilities (DecoderLLM.attention_probs) equal
a hand computation and drive the layer's real output; the CLI draws a PNG whose heatmaps sum to
the masses it prints (image -> question is 0 under causal, positive under MMA); user errors exit
2 with one line. A tiny random MLLM (mlp connector: a 4x4 patch grid) saved as a converted
checkpoint, with the bundled GPT-2 BPE."""
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mma_jax import visualize
from mma_jax.attention import dense_attention, materialize
from mma_jax.config import (Config, ConnectorConfig, DataConfig, EvalConfig, LLMConfig,
                            ModelConfig, VisionConfig)
from mma_jax.convert.store import save_model
from mma_jax.convert.transfer import flatten
from mma_jax.data.images import preprocess
from mma_jax.data.packing import example_fields
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation
from mma_jax.models import build_model
from mma_jax.models.layers import stacked_layer
from mma_jax.models.llm import rotary_tables

SIZE, PATCH = 16, 4          # a 4 x 4 grid of image tokens
GRID = (SIZE // PATCH) ** 2
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("gpt2", "phi3")[0]


def tiny_config(vocab: int) -> Config:
  llm = LLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128)
  vision = VisionConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                        image_size=SIZE, patch_size=PATCH)
  return Config(model=ModelConfig(llm=llm, vision=vision, connector=ConnectorConfig(type="mlp")),
                data=DataConfig(template="phi3", tokenizer="gpt2", system_prompt=""),
                eval=EvalConfig(max_new_tokens=4))


def tiny_model(config: Config):
  model = build_model(config, nnx.Rngs(0))
  for projection in (model.llm.layers.attn.q, model.llm.layers.attn.k):   # far from uniform
    projection.kernel[...] = projection.kernel[...] * 8.0
  return model


@pytest.fixture(scope="module")
def model(tok):
  return tiny_model(tiny_config(len(tok)))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "picture.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(path)
  return path


@pytest.fixture(scope="module")
def checkpoint(model, tok, tmp_path_factory):
  _, state = nnx.split(model, nnx.Param)
  params = {k: np.asarray(v) for k, v in flatten(state.to_pure_dict()).items()}
  return save_model(tmp_path_factory.mktemp("ckpt") / "tiny", params, tiny_config(len(tok)))


# ------------------------------------------------------------------- the probabilities themselves
def example_batch(tok, mode):
  layout = ChatLayout("phi3", tok, GRID, mode)
  example = layout.conversation(Conversation(
      [("user", f"<image>\n{QUESTION}"), ("assistant", "Red")], 1, ""))
  pixels = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  batch = {k: jnp.asarray(v[None]) for k, v in example_fields(example).items()}
  batch["images"] = jnp.asarray(preprocess(pixels, SIZE, "siglip")[None, None])
  return example, batch


def softmax_by_hand(q, k, mask, scale):
  """numpy: q [L, H, D], k [L, K, D], mask [L, L] -> [H, L, L]."""
  k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
  scores = np.einsum("qhd,shd->hqs", q.astype(np.float64), k.astype(np.float64)) * scale
  scores = np.where(mask[None], scores, -np.inf)
  e = np.exp(scores - scores.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("mode", ["mma", "causal"])
def test_attention_probs_are_the_layers_softmax(model, tok, mode):
  example, batch = example_batch(tok, mode)
  llm = model.llm
  mask = materialize(batch["segment_ids"], batch["window_lo"], batch["window_hi"])
  cos, sin = rotary_tables(llm.cfg, batch["positions"])
  vectors = (batch["segment_ids"], batch["window_lo"], batch["window_hi"])
  x = model.embed(batch["tokens"], batch["image_token_index"], batch["images"])
  (i0, i1), header, answer = example.image_spans[0], example.header_ends[0], example.length - 2
  for layer in range(llm.cfg.num_layers):
    probs = np.asarray(model.attention_probs(layer, **batch))              # [1, H, L, L]
    block = stacked_layer(llm.layers, layer)
    q, k, v = block.attn._project(block.attn_norm(x), cos, sin)
    # A hand softmax of the layer's scores under the mask rule.
    expected = softmax_by_hand(np.asarray(q[0]), np.asarray(k[0]), np.asarray(mask[0]),
                               block.attn.head_dim ** -0.5)
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[0][:, ~np.asarray(mask[0])] == 0)
    # probabilities @ v is the dense attention output the layer computes.
    group = llm.cfg.num_heads // llm.cfg.num_kv_heads
    out = np.einsum("bhqs,bshd->bqhd", probs, np.repeat(np.asarray(v), group, axis=2))
    np.testing.assert_allclose(out, np.asarray(dense_attention(q, k, v, mask)), atol=1e-5)
    # The rule: under mma image rows put mass on the question (never on the answer); under
    # causal on nothing after themselves.
    on_question = probs[0, :, i0:i1, i1:header].sum(-1)
    assert np.all(probs[0, :, i0:i1, header:] == 0)
    if mode == "mma":
      assert np.all(on_question > 0)
    else:
      assert np.all(np.triu(probs[0], 1) == 0) and np.all(on_question == 0)
    assert np.all(probs[0, :, answer, i0:i1].sum(-1) > 0)
    x = block(x, cos, sin, *vectors)
  # The last layer's input was the forward's: its final output is the model's hidden state.
  np.testing.assert_allclose(np.asarray(llm.norm(x)), np.asarray(model.hidden(**batch)),
                             atol=1e-5)


def test_attention_probs_rejects_a_layer_out_of_range(model, tok):
  _, batch = example_batch(tok, "mma")
  with pytest.raises(ValueError, match="out of range"):
    model.attention_probs(2, **batch)


# --------------------------------------------------------------------------------------- the CLI
def masses(lines, key):
  return [float(m) for m in re.findall(rf"^{re.escape(key)}(?:\[\d+\])?=([-\d.e]+)",
                                       "\n".join(lines), re.M)]


def check_sums(maps, lines):
  """Every heatmap row sums to the mass printed for it; the totals to the headline masses."""
  heat = maps.image_to_words
  assert heat.shape == (len(maps.words), GRID)
  np.testing.assert_allclose(heat.sum(1), masses(lines, "image_to_word_mass"), atol=1e-6)
  assert masses(lines, "image_to_question_mass") == pytest.approx([heat.sum()], abs=1e-6)
  assert maps.answer_map().shape == (4, 4)            # the patch grid
  np.testing.assert_allclose(maps.answer_rows.sum(1), masses(lines, "answer_token_image_mass"),
                             atol=1e-6)
  assert masses(lines, "answer_to_image_mass") == pytest.approx([maps.answer_map().sum()],
                                                                abs=1e-6)


def test_cli_draws_the_masses_it_prints(checkpoint, image_file, tmp_path, capsys, monkeypatch):
  out = tmp_path / "figs" / "mma.png"
  argv = ["--checkpoint", str(checkpoint), "--image", str(image_file), "--question", QUESTION,
          "--output", str(out), "--answer", "It is red.", "--layer", "-1"]
  done = []   # what the CLI's run() returned: the arrays it drew
  run = visualize.run
  monkeypatch.setattr(visualize, "run", lambda args: done.append(run(args)) or done[-1])
  assert visualize.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  (maps, returned), = done
  assert lines == returned and lines[-1] == f"wrote {out}"
  with Image.open(out) as png:
    assert png.format == "PNG" and png.size[0] > 500
  check_sums(maps, lines)
  assert maps.layer == 1 and maps.head == "mean" and maps.mask == "mma"
  # The rows are the words after the image through the assistant header, in order.
  assert maps.words[1:6] == ["What", "colour", "is", "the", "shape?"]
  assert maps.words[-1] == "<|assistant|>" and maps.image_to_question_mass > 0
  assert maps.answer_tokens == ["It", " is", " red", "."]

  # Causal, head 2, the greedy answer: images see nothing of the question.
  causal, lines = visualize.run(visualize.parse_args(
      ["--checkpoint", str(checkpoint), "--image", str(image_file), "--question", QUESTION,
       "--output", str(tmp_path / "causal.png"), "--mask", "causal", "--head", "2",
       "--layer", "0"]))
  check_sums(causal, lines)
  assert causal.mask == "causal" and causal.layer == 0 and causal.head == "2"
  assert causal.image_to_question_mass == 0 and "image_to_question_mass=0.000000" in lines
  assert 1 <= len(causal.answer_tokens) <= 4 and causal.answer_to_image_mass > 0


def test_draw_without_a_grid(tmp_path):
  """A perceiver's latents have no patch grid: panel (b) is bars over the latents."""
  rng = np.random.default_rng(0)
  maps = visualize.Maps(
      layer=0, head="mean", mask="mma", answer="yes", image_span=(2, 8), question_span=(8, 11),
      answer_span=(12, 13), words=["Is", "it", "<|assistant|>"],
      word_spans=[(8, 9), (9, 10), (10, 11)], image_to_words=rng.random((3, 6)) / 20,
      answer_tokens=["yes"], answer_rows=rng.random((1, 6)) / 10, grid=None)
  assert maps.answer_map().shape == (1, 6)
  visualize.draw(maps, rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8), tmp_path / "p.png")
  with Image.open(tmp_path / "p.png") as png:
    assert png.format == "PNG"


def test_user_errors_exit_2_with_one_line(checkpoint, image_file, tmp_path, capsys):
  def error(*argv):
    assert visualize.main(["--question", QUESTION, "--output", str(tmp_path / "x.png"),
                           *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]

  assert "does not exist" in error("--checkpoint", checkpoint, "--image", tmp_path / "no.png")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  assert "cannot decode" in error("--checkpoint", checkpoint, "--image", tmp_path / "bad.png")
  assert "does not exist" in error("--checkpoint", tmp_path / "missing", "--image", image_file)
  assert "neither" in error("--checkpoint", tmp_path, "--image", image_file)
  assert "--layer 5 is out of range" in error("--checkpoint", checkpoint, "--image", image_file,
                                              "--layer", 5, "--answer", "red")
  assert "--head 4 is out of range" in error("--checkpoint", checkpoint, "--image", image_file,
                                             "--head", 4, "--answer", "red")
  assert not (tmp_path / "x.png").exists()
