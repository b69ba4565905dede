"""The grain pipeline: image preprocessing equal to the HF processors; every example exactly once
per epoch (packed or padded), shuffled per epoch, sharded per process; bad data counted and
logged; exact resume from get_state/set_state and orbax, also with worker processes."""
import collections
import hashlib
import io
import json
import logging

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import data_fixtures
import mma_jax.data  # noqa: F401  registers the builders
from mma_jax.config import Config, ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
from mma_jax.data.builder_utils import prepare
from mma_jax.data.images import ImageError, preprocess
from mma_jax.data.pipeline import VQA_PROMPT, DataPipeline
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation
from mma_jax.models import build_model

T = 4         # image tokens per image
SIZE = 32     # tower input size (the easy_vqa PNGs are 64x64: a real resize)
BATCH_FIELDS = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
                "window_lo": np.int32, "window_hi": np.int32, "targets": np.int32,
                "loss_mask": np.float32, "image_token_index": np.int32, "images": np.float32,
                "image_valid": np.bool_}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("gpt2", "phi3")[0]


def easy_vqa_source(data_dir, split="test[:120]"):
  return tfds.data_source("easy_vqa", split=split, data_dir=str(data_dir))


def make_pipeline(source, tokenizer, **kw):
  args = dict(dataset="easy_vqa", tokenizer=tokenizer, num_image_tokens=T, batch_size=4,
              max_length=160, image_size=SIZE, pack_window=16, read_threads=2, process_index=0,
              process_count=1)
  return DataPipeline(source, **{**args, **kw})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def digest(array):
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def examples_in(batches):
  """Each example of the batches as (its tokens, digests of its images), checking the row
  invariants on the way: segments 1..k contiguous, positions restarting, padding inert."""
  found = []
  for batch in batches:
    for b in range(len(batch["tokens"])):
      seg = batch["segment_ids"][b]
      k = seg.max()
      assert ((seg[1:] == seg[:-1]) | (seg[1:] == seg[:-1] + 1) | (seg[1:] == 0)).all()
      pad = seg == 0
      assert not batch["loss_mask"][b][pad].any()
      assert (batch["image_token_index"][b][pad] == -1).all()
      used = set()
      for s in range(1, k + 1):
        at = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(batch["positions"][b][at], np.arange(len(at)))
        index = batch["image_token_index"][b][at]
        slots = sorted(set(index[index >= 0] // T))
        used |= set(slots)
        found.append((tuple(batch["tokens"][b][at]),
                      tuple(digest(batch["images"][b, i]) for i in slots)))
      assert used == set(np.flatnonzero(batch["image_valid"][b]))
      assert not batch["images"][b][~batch["image_valid"][b]].any()
  return collections.Counter(found)


def expected_examples(records, tokenizer, num_tokens=T, size=SIZE, system=None):
  layout = ChatLayout("phi3", tokenizer, num_tokens, "mma")
  found = []
  for r in records:
    question = VQA_PROMPT.format(question=r["question"].decode())
    ex = layout.conversation(Conversation(
        [("user", "<image>\n" + question), ("assistant", r["answer"].decode())], 1, system))
    found.append((tuple(ex.tokens), (digest(preprocess(r["image"], size, "siglip")),)))
  return collections.Counter(found)


# ------------------------------------------------------------------------------------- images
def test_preprocessing_equals_the_hf_image_processors():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
  size = {"height": SIZE, "width": SIZE}
  for norm, processor in (("siglip", SiglipImageProcessorPil(size=size)),
                          ("clip", CLIPImageProcessorPil(size=size, do_center_crop=False))):
    theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess(np.asarray(image), SIZE, norm), theirs, atol=1e-6)
  png = io.BytesIO()
  image.save(png, format="PNG")
  np.testing.assert_array_equal(preprocess(png.getvalue(), SIZE, "siglip"),
                                preprocess(np.asarray(image), SIZE, "siglip"))


def test_every_image_mode_becomes_rgb(tmp_path):
  rng = np.random.default_rng(1)
  for mode, array in (("L", rng.integers(0, 256, (9, 7), dtype=np.uint8)),
                      ("RGBA", rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)),
                      ("P", None)):
    image = (Image.fromarray(array) if array is not None else
             Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert("P"))
    image.save(tmp_path / f"{mode}.png")
    out = preprocess(str(tmp_path / f"{mode}.png"), 8, "siglip")
    expected = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out, expected / 127.5 - 1, atol=1e-6)


def test_unusable_images_raise_errors_naming_the_input(tmp_path):
  with pytest.raises(ImageError, match="cannot decode image 'row 7 image 0'") as e:
    preprocess(b"not an image", SIZE, "siglip", name="row 7 image 0")
  assert e.value.reason == "undecodable_image"
  with pytest.raises(ImageError, match="gone.png' does not exist") as e:
    preprocess(str(tmp_path / "gone.png"), SIZE, "siglip")
  assert e.value.reason == "missing_image_file"
  with pytest.raises(ImageError, match="uint8"):
    preprocess(np.zeros((4, 4, 3), np.float32), SIZE, "siglip")


# ------------------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("packing", [True, False])
def test_an_epoch_holds_every_example_exactly_once(easy_vqa_dir, tokenizer, packing):
  source = easy_vqa_source(easy_vqa_dir)
  it = iter(make_pipeline(source, tokenizer, packing=packing, num_epochs=1))
  batches = list(it)
  for name, dtype in BATCH_FIELDS.items():
    assert batches[0][name].dtype == dtype, name
  assert batches[0]["tokens"].shape == (4, 160)
  assert batches[0]["images"].shape == (4, 4, SIZE, SIZE, 3)
  assert batches[0]["image_valid"].shape == (4, 4)
  assert examples_in(batches) == expected_examples([source[i] for i in range(120)], tokenizer)
  counts = it.counts
  assert (counts.examples, counts.truncated, dict(counts.skipped)) == (120, 0, {})
  rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
  assert counts.rows == rows
  if packing:
    # ~70-token examples: two fit a 160-token row, so rows are about half the examples.
    assert rows <= 65
  else:
    assert rows == 120


def test_same_seed_same_batches_and_a_new_order_every_epoch(easy_vqa_dir, tokenizer):
  source = easy_vqa_source(easy_vqa_dir, "test[:24]")
  order = lambda seed: [key for batch in take(iter(make_pipeline(
      source, tokenizer, packing=False, seed=seed, batch_size=6)), 8)
      for key in examples_in([{k: v[i:i + 1] for k, v in batch.items()}
                              for i in range(6)])]
  first, again, other = order(0), order(0), order(1)
  assert first == again
  epoch0, epoch1 = first[:24], first[24:]
  assert collections.Counter(epoch0) == collections.Counter(epoch1)   # same examples...
  assert epoch0 != epoch1                                             # ...in a new order
  assert other[:24] != epoch0


def test_each_process_reads_its_own_shard(easy_vqa_dir, tokenizer, caplog):
  source = easy_vqa_source(easy_vqa_dir, "test[:100]")
  with caplog.at_level(logging.WARNING, logger="mma_jax.data.pipeline"):
    shards = [examples_in(list(make_pipeline(source, tokenizer, num_epochs=1, process_index=i,
                                             process_count=3)))
              for i in range(3)]
  assert "the last 1 of 100 records are left out" in caplog.text
  assert [sum(s.values()) for s in shards] == [33, 33, 33]   # equal shards; one record unused
  assert sum(shards, collections.Counter()) == expected_examples(
      [source[i] for i in range(99)], tokenizer)


# ----------------------------------------------------------------------------------- bad data
def png_bytes(seed, size=(12, 10)):
  out = io.BytesIO()
  array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def llava_record(id, turns, images):
  return {"id": id, "images": images,
          "conversations": {"role": [r for r, _ in turns], "content": [c for _, c in turns]}}


LONG = " ".join(["word"] * 150)


def llava_records(tmp_path):
  """Records as llava_instruct stores them, with problems only the pipeline can see."""
  ok = lambda i: llava_record(f"ok{i}", [("user", "<image>\nWhat?"), ("assistant", f"Dots {i}.")],
                              [png_bytes(i)])
  return [
      ok(0), ok(1),
      llava_record("two_turns", [("user", "<image>\nA?"), ("assistant", "B."), ("user", "C?"),
                                 ("assistant", "D.")], [png_bytes(2)]),
      {"id": "no_conversations", "images": []},
      llava_record("bad_order", [("assistant", "Hi."), ("user", "<image>\nWhat?")],
                   [png_bytes(3)]),
      llava_record("bad_bytes", [("user", "<image>\nWhat?"), ("assistant", "?")], [b"garbage"]),
      llava_record("gone_file", [("user", "<image>\nWhat?"), ("assistant", "?")],
                   [str(tmp_path / "gone.png")]),
      llava_record("long_answer", [("user", "<image>\nTell me."), ("assistant", LONG)],
                   [png_bytes(4)]),
      llava_record("long_question", [("user", "<image>\n" + LONG), ("assistant", "Yes.")],
                   [png_bytes(5)]),
      llava_record("three_images", [("user", "<image><image><image>\nSame?"), ("assistant", "No.")],
                   [png_bytes(6), png_bytes(7), png_bytes(8)]),
      ok(2), ok(3),
  ]


SKIPPED = {"malformed_row": 1, "bad_turn_order": 1, "undecodable_image": 1,
           "missing_image_file": 1, "too_long": 1, "too_many_images": 1}


def llava_pipeline(records, tokenizer, **kw):
  return make_pipeline(records, tokenizer, dataset="llava_instruct", images_per_row=2,
                       max_length=128, **kw)


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_bad_examples_are_skipped_counted_and_logged(tmp_path, tokenizer, caplog, too_long):
  records = llava_records(tmp_path)
  with caplog.at_level(logging.INFO, logger="mma_jax.data.pipeline"):
    it = iter(llava_pipeline(records, tokenizer, num_epochs=1, shuffle=False, too_long=too_long))
    batches = list(it)
  skipped = dict(SKIPPED, too_long=1 + (too_long == "drop"))
  assert dict(it.counts.skipped) == skipped
  assert it.counts.examples == len(records) - sum(skipped.values())
  assert it.counts.truncated == (too_long == "truncate")
  assert sum(examples_in(batches).values()) == it.counts.examples
  lines = [r.getMessage() for r in caplog.records]
  for id, reason in (("no_conversations", "malformed_row"), ("bad_order", "bad_turn_order"),
                     ("bad_bytes", "undecodable_image"), ("gone_file", "missing_image_file"),
                     ("long_question", "too_long"), ("three_images", "too_many_images")):
    assert any(f"skipped example {id} ({reason})" in line for line in lines), (id, reason)
  assert any("bad_bytes image 0" in line for line in lines)     # which image of the example
  assert any(line.startswith("data ended:") and "too_many_images: 1" in line for line in lines)
  if too_long == "truncate":
    assert any("truncated example long_answer" in line for line in lines)
    # The truncated example ends its row's segment with a trained token at max_length.
    ends = [b["loss_mask"][r][b["segment_ids"][r] > 0][-1] for b in batches for r in range(4)
            if (b["segment_ids"][r] > 0).sum() == 128]
    assert ends == [1.0]


@pytest.mark.parametrize("dataset", ["llava_instruct", "image_captions"])
def test_built_fixtures_flow_through_the_pipeline(tmp_path, tokenizer, dataset):
  write = {"llava_instruct": data_fixtures.write_llava,
           "image_captions": data_fixtures.write_captions}[dataset]
  write(tmp_path / "manual")
  prepare(dataset, tmp_path / "data", tmp_path / "manual")
  source = tfds.data_source(dataset, split="train", data_dir=str(tmp_path / "data"))
  it = iter(make_pipeline(source, tokenizer, dataset=dataset, num_epochs=1, max_length=128))
  batches = list(it)
  kept = {"llava_instruct": data_fixtures.LLAVA_KEPT,
          "image_captions": data_fixtures.CAPTIONS_KEPT}[dataset]
  assert (it.counts.examples, dict(it.counts.skipped)) == (len(kept), {})
  assert it.counts.truncated == (dataset == "llava_instruct")        # the long answer
  assert sum(examples_in(batches).values()) == len(kept)
  images = sum(int(b["image_valid"].sum()) for b in batches)
  # llava: one image each, two in two_images and image_per_turn, none in text_only.
  assert images == {"llava_instruct": 7, "image_captions": 4}[dataset]
  if dataset == "image_captions":    # pre-training: plain causal, whatever the mask mode
    assert all(not b["window_hi"].any() for b in batches)


# ------------------------------------------------------------------------------ through a model
def test_mllm_logits_of_packed_rows_equal_those_of_padded_rows(tmp_path, tokenizer):
  """Pipeline batches straight into a tiny MultimodalDecoder (tower, Perceiver, LLM): every
  example's logits in a packed row equal its logits alone in a padded row."""
  config = ModelConfig(
      llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2),
      vision=VisionConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          image_size=16, patch_size=8),
      connector=ConnectorConfig(num_latents=T, depth=1, num_heads=2, head_dim=8))
  model = build_model(Config(model=config), nnx.Rngs(0))
  forward = nnx.jit(lambda model, batch: model(**batch))
  records = llava_records(tmp_path)

  def logits_by_example(packing):
    pipeline = llava_pipeline(records, tokenizer, packing=packing, num_epochs=1, shuffle=False,
                              image_size=16)
    found, shared_rows = {}, 0
    for batch in pipeline:
      shared_rows += int((batch["segment_ids"].max(axis=1) > 1).sum())
      batch = dict(batch, tokens=batch["tokens"] % 64)     # the tiny vocabulary
      logits = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in batch.items()}))
      for b in range(len(batch["tokens"])):
        for s in range(1, batch["segment_ids"][b].max() + 1):
          at = batch["segment_ids"][b] == s
          found[tuple(batch["tokens"][b][at])] = logits[b][at]
    return found, shared_rows

  (packed, shared_rows), (padded, _) = logits_by_example(True), logits_by_example(False)
  assert packed.keys() == padded.keys() and len(packed) == 6
  assert shared_rows >= 2                   # rows holding several examples, images included
  for key, value in packed.items():
    np.testing.assert_allclose(value, padded[key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- resume
def test_resume_continues_exactly(easy_vqa_dir, tokenizer):
  source = easy_vqa_source(easy_vqa_dir)
  reference = take(iter(make_pipeline(source, tokenizer)), 12)
  first = iter(make_pipeline(source, tokenizer))
  inside_a_window = set()
  for stop_after in range(1, 7):
    assert_same_batches([next(first)], reference[stop_after - 1:stop_after])
    state = json.loads(json.dumps(first.get_state()))     # what a checkpoint stores
    inside_a_window.add(state["rows_returned"] > 0)
    resumed = iter(make_pipeline(source, tokenizer))
    resumed.set_state(state)
    assert resumed.get_state() == state
    assert_same_batches(take(resumed, 6), reference[stop_after:stop_after + 6])
    assert resumed.counts.rows == (stop_after + 6) * 4
  assert inside_a_window == {True, False}   # both kinds of state were restored


def test_resume_keeps_the_skip_counts_exact(tmp_path, tokenizer):
  records = llava_records(tmp_path)
  pipeline = lambda: iter(llava_pipeline(records, tokenizer, pack_window=5, batch_size=2, seed=3))
  reference = pipeline()
  batches = take(reference, 12)
  first = pipeline()
  inside_a_window = set()
  for stop_after in range(1, 6):
    next(first)
    state = first.get_state()
    inside_a_window.add(state["rows_returned"] > 0)
    resumed = pipeline()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 12 - stop_after), batches[stop_after:])
    assert resumed.counts == reference.counts
  assert inside_a_window == {True, False}
  assert sum(reference.counts.skipped.values()) > len(SKIPPED)   # more than one epoch counted


def test_resume_through_an_orbax_checkpoint(easy_vqa_dir, tokenizer, tmp_path):
  source = easy_vqa_source(easy_vqa_dir)
  reference = take(iter(make_pipeline(source, tokenizer)), 8)
  first = iter(make_pipeline(source, tokenizer))
  take(first, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)))
    manager.wait_until_finished()
  resumed = iter(make_pipeline(source, tokenizer))
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_same_batches(take(resumed, 3), reference[5:])


def test_worker_processes_give_the_same_batches_and_resume(easy_vqa_dir, tokenizer):
  source = easy_vqa_source(easy_vqa_dir)
  reference = take(iter(make_pipeline(source, tokenizer)), 9)
  first = iter(make_pipeline(source, tokenizer, num_workers=2))
  try:
    assert_same_batches(take(first, 5), reference[:5])
    state = first.get_state()
  finally:
    first.close()
  resumed = iter(make_pipeline(source, tokenizer, num_workers=2))
  try:
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), reference[5:])
  finally:
    resumed.close()


def test_from_config_takes_the_towers_size_and_normalisation(easy_vqa_dir):
  config = Config(model=ModelConfig(vision=VisionConfig(family="clip", image_size=16)))
  config.data.data_dir = str(easy_vqa_dir)
  config.data.max_length = 128
  config.train.batch_size, config.eval.batch_size = 4, 2
  train = DataPipeline.from_config(config, split="test[:40]", num_image_tokens=T)
  assert (train.image_size, train.image_norm) == (16, "clip")
  assert (train.batch_size, train.shuffle, train.num_epochs) == (4, True, None)
  batch = next(iter(train))
  assert batch["tokens"].shape == (4, 128) and batch["images"].shape == (4, 4, 16, 16, 3)
  evaluation = DataPipeline.from_config(config, split="test[:40]", num_image_tokens=T,
                                        training=False)
  assert (evaluation.batch_size, evaluation.shuffle, evaluation.num_epochs) == (2, False, 1)
  config.data.image_size, config.data.image_norm = 24, "siglip"
  own = DataPipeline.from_config(config, split="test[:40]", num_image_tokens=T)
  assert (own.image_size, own.image_norm) == (24, "siglip")


def test_arguments_are_checked_by_name(tokenizer):
  with pytest.raises(ValueError, match="too_long='cut' must be truncate or drop"):
    make_pipeline([], tokenizer, too_long="cut")
  with pytest.raises(ValueError, match="dataset='coco'"):
    make_pipeline([], tokenizer, dataset="coco")
