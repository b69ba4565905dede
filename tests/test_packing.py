"""Packing: first-fit placement, packed rows that mean exactly what their examples meant alone
(mask blocks of materialize(), token fields, image indices) and equal logits on a tiny model;
truncating the answer of a too-long example."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mma_jax.attention.mask import materialize
from mma_jax.config import LLMConfig
from mma_jax.data.packing import (TOKEN_FIELDS, empty_row, example_fields, first_fit, merge_row,
                                  num_images, truncate_answer)
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation
from mma_jax.models.llm import DecoderLLM

T = 3      # image tokens per image: small on purpose
L = 192    # row length


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("gpt2", "phi3")[0]


def conversations():
  """Single- and multi-image, single- and multi-turn, text only."""
  return [
      Conversation([("user", "<image>\nWhat shape?"), ("assistant", "A circle.")], 1),
      Conversation([("user", "<image> and <image>: same colour?"), ("assistant", "No."),
                    ("user", "Which is red?"), ("assistant", "The first."),
                    ("user", "And now <image>?"), ("assistant", "Blue.")], 3, system=""),
      Conversation([("user", "Hi"), ("assistant", "Hello!")], 0, system=""),
      Conversation([("user", "<image>\nDescribe it."), ("assistant", "A small green triangle "
                                                                     "on white.")], 1, system=""),
  ]


def laid_out(tokenizer, mode):
  layout = ChatLayout("phi3", tokenizer, T, mode)
  examples = [layout.conversation(c) for c in conversations()]
  return examples + [layout.caption("A red square.", num_images=2)]   # always causal


# ------------------------------------------------------------------------------------ first fit
def test_first_fit_places_each_example_in_the_first_row_with_room():
  rows = first_fit([6, 5, 3, 4, 2, 1], [1, 0, 2, 1, 0, 0], max_length=10, max_images=2)
  # 6 opens row 0; 5 does not fit (4 left) -> row 1; 3 fits row 0 by tokens but not images (2)
  # -> row 1; 4 fits row 0 (4 left); 2 fits row 1 (2 left); 1 fits nowhere -> row 2.
  assert rows == [[0, 3], [1, 2, 4], [5]]


def test_first_fit_refuses_an_example_that_fits_no_row():
  with pytest.raises(ValueError, match="example 1"):
    first_fit([4, 11], [0, 0], max_length=10, max_images=2)
  with pytest.raises(ValueError, match="3 images"):
    first_fit([4], [3], max_length=10, max_images=2)


# ----------------------------------------------------------------------------- packed rows' masks
def pack(examples, max_images=4):
  fields = [example_fields(e) for e in examples]
  groups = first_fit([e.length for e in examples], [e.num_images for e in examples], L, max_images)
  return fields, groups, [merge_row([fields[i] for i in g], L, T) for g in groups]


@pytest.mark.parametrize("mode", ["mma", "mma_bidir_image", "prefix_lm", "causal"])
def test_packed_rows_mean_what_their_examples_meant_alone(tokenizer, mode):
  examples = laid_out(tokenizer, mode)
  fields, groups, rows = pack(examples)
  assert sorted(i for g in groups for i in g) == list(range(len(examples)))
  assert any(len(g) > 1 for g in groups)      # something really was packed
  packed_masks = np.asarray(materialize(*(np.stack([r[f] for r in rows])
                                          for f in ("segment_ids", "window_lo", "window_hi"))))
  for row, group, mask in zip(rows, groups, packed_masks):
    offset = images_before = 0
    for segment, i in enumerate(group, start=1):
      ex, n = examples[i], examples[i].length
      at = slice(offset, offset + n)
      alone = np.asarray(materialize(ex.segment_ids[None], ex.window_lo[None],
                                     ex.window_hi[None]))[0]
      np.testing.assert_array_equal(mask[at, at], alone)
      # ... and nothing outside its own block, in either direction.
      assert not mask[at, :offset].any() and not mask[at, offset + n:].any()
      assert not mask[:offset, at].any() and not mask[offset + n:, at].any()
      for f in ("tokens", "positions", "targets", "loss_mask"):
        np.testing.assert_array_equal(row[f][at], fields[i][f])
      assert (row["segment_ids"][at] == segment).all()
      index = fields[i]["image_token_index"]
      np.testing.assert_array_equal(row["image_token_index"][at],
                                    np.where(index >= 0, index + images_before * T, -1))
      offset += n
      images_before += ex.num_images
    pad = slice(offset, L)
    assert (row["segment_ids"][pad] == 0).all() and (row["loss_mask"][pad] == 0).all()
    assert (row["window_lo"][pad] == 0).all() and (row["window_hi"][pad] == 0).all()
    assert (row["image_token_index"][pad] == -1).all()
    # Image indices of a row count its images 0..m*T-1 in order, with no gap or repeat.
    index = row["image_token_index"]
    np.testing.assert_array_equal(index[index >= 0], np.arange(images_before * T))


def test_windows_are_shifted_only_where_they_exist(tokenizer):
  examples = laid_out(tokenizer, "mma")
  fields = [example_fields(e) for e in examples[:2]]
  row = merge_row(fields, L, T)
  second = slice(examples[0].length, examples[0].length + examples[1].length)
  lo, hi = fields[1]["window_lo"], fields[1]["window_hi"]
  has = lo < hi
  assert has.any() and (~has).any()
  assert (row["window_lo"][second][has] == lo[has] + examples[0].length).all()
  assert (row["window_lo"][second][~has] == 0).all() and (row["window_hi"][second][~has] == 0).all()


def test_images_per_row_caps_packing(tokenizer):
  examples = laid_out(tokenizer, "mma")
  _, groups, rows = pack(examples, max_images=3)
  for g, row in zip(groups, rows):
    assert sum(examples[i].num_images for i in g) <= 3
    assert num_images(row, T) <= 3


# ------------------------------------------------------------------------------------- logits
def tiny_llm():
  cfg = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=256)
  return DecoderLLM(cfg, impl="dense", rngs=nnx.Rngs(0))


def embed(model, fields, image_rows):
  """What the MLLM does: token embeddings, with image rows placed at image_token_index."""
  x = model.embed_tokens((fields["tokens"] % 64)[None])
  index = fields["image_token_index"][None]
  gathered = jnp.take_along_axis(image_rows[None], jnp.maximum(index, 0)[..., None], axis=1)
  return jnp.where((index >= 0)[..., None], gathered, x)


@nnx.jit
def _forward(model, fields, image_rows):
  return model(embeddings=embed(model, fields, image_rows),
               **{f: fields[f][None] for f in ("positions", "segment_ids", "window_lo",
                                                 "window_hi")})[0]


def logits(model, fields, image_rows):
  """Logits of one example or row, run padded to L (segment 0) so jit compiles once."""
  n = len(fields["tokens"])
  padded = {f: np.pad(v, (0, L - n), constant_values=-1 if f == "image_token_index" else 0)
            for f, v in fields.items()}
  rows = jnp.zeros((8 * T, 32)).at[:len(image_rows)].set(image_rows)
  return np.asarray(_forward(model, {f: jnp.asarray(v) for f, v in padded.items()}, rows))[:n]


def test_packed_row_logits_equal_the_examples_alone(tokenizer):
  model = tiny_llm()
  examples = laid_out(tokenizer, "mma")
  fields, groups, rows = pack(examples)
  # Each image becomes T distinct random rows (what a tower + connector would give).
  rng = np.random.default_rng(0)
  rows_of = [jnp.asarray(rng.normal(size=(max(e.num_images, 1) * T, 32)), jnp.float32)
             for e in examples]
  for row, group in zip(rows, groups):
    row_images = jnp.concatenate([rows_of[i][:examples[i].num_images * T] for i in group])
    packed = logits(model, row, row_images)
    offset = 0
    for i in group:
      n = examples[i].length
      alone = logits(model, fields[i], rows_of[i])
      np.testing.assert_allclose(packed[offset:offset + n], alone, atol=1e-5, rtol=0)
      offset += n
  # The check can fail: without the row's image offsets the second example would read the first
  # example's image rows.
  group = next(g for g in groups if len(g) > 1 and min(examples[i].num_images for i in g[:2]))
  row = merge_row([fields[i] for i in group], L, T)
  row["image_token_index"] = np.concatenate([fields[i]["image_token_index"] for i in group]
                                            + [np.full(L - sum(examples[i].length for i in group),
                                                       -1, np.int32)])
  row_images = jnp.concatenate([rows_of[i][:examples[i].num_images * T] for i in group])
  wrong = logits(model, row, row_images)
  first, second = examples[group[0]].length, examples[group[1]].length
  alone = logits(model, fields[group[1]], rows_of[group[1]])
  assert np.abs(wrong[first:first + second] - alone).max() > 1e-3


# ---------------------------------------------------------------------------------- truncation
def test_truncate_cuts_inside_an_answer_and_drops_later_turns(tokenizer):
  layout = ChatLayout("phi3", tokenizer, T, "mma")
  example = layout.conversation(conversations()[1])
  fields = example_fields(example)
  first_answer = int(np.flatnonzero(fields["loss_mask"])[0])
  cut_at = first_answer + 2         # room for the first answer's first few tokens only
  cut = truncate_answer(fields, cut_at)
  assert len(cut["tokens"]) == cut_at
  for name in TOKEN_FIELDS:
    np.testing.assert_array_equal(cut[name], fields[name][:cut_at])
  assert cut["loss_mask"][-1] == 1 and cut["window_hi"].max() <= cut_at
  assert num_images(cut, T) == 2    # the third image (last turn) is gone, the first two whole
  # Between the first and the second answer the cut falls back to the end of the first answer.
  second_prompt = int(example.header_ends[1]) - 1
  cut = truncate_answer(fields, second_prompt)
  assert cut["loss_mask"][-1] == 1 and fields["loss_mask"][len(cut["tokens"])] == 0
  # No answer token fits: nothing to keep.
  assert truncate_answer(fields, first_answer) is None


def test_empty_row_is_padding():
  row = empty_row(8)
  assert set(row) == set(TOKEN_FIELDS)
  assert (row["segment_ids"] == 0).all() and (row["image_token_index"] == -1).all()
  assert row["loss_mask"].dtype == np.float32 and row["tokens"].dtype == np.int32
