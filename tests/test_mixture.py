"""Dataset mixtures (data.mixture): grain's weighted mixing at the configured frequencies, packing
across components, exact resume, counts per component (skips by reason included), streamed
components joining through IterDataset mixing, and the config side (entries checked, paths under
data.root, datasets built from their manual_dir on first use)."""
import collections
import io
import json
import logging
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

import data_fixtures
from mma_jax.config import ConfigError, from_dict
from mma_jax.data import pipeline as pipeline_module
from mma_jax.data.mixture import MixtureError
from mma_jax.data.pipeline import Component, DataPipeline
from mma_jax.data.tokenizer import load_tokenizer

T = 4


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("gpt2", "phi3")[0]


def png(seed):
  out = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def vqa(i, image=None):
  return {"question": f"What is {i}?", "answer": f"thing{i}", "image_id": i,
          "image": png(i) if image is None else image}


def chat(id, question, answer, images=()):
  return {"id": id, "images": list(images),
          "conversations": {"role": ["user", "assistant"], "content": [question, answer]}}


def caption(name, text, image=None):
  return {"image_file": name, "caption": text, "image": png(len(name)) if image is None else image}


# Three components in the records their builders store, each with rows only the pipeline can
# refuse, and the reasons it must count for each component.
VQA = [vqa(i) for i in range(6)] + [vqa(6, image=b"not a png"), {"question": "no answer"}]
CHAT = [chat("c0", "<image>\nWhat?", "Dots.", [png(20)]), chat("c1", "Hello?", "Hi."),
        chat("bad_order", "x", "y") | {"conversations": {"role": ["assistant", "user"],
                                                        "content": ["Hi.", "<image>\nWhat?"]}},
        chat("c3", "<image>\nAnd?", "Lines.", [png(21)])]
CAPTIONS = [caption("a.png", "Noise."), caption("b.png", "  ")]
SKIPPED = {"vqa": {"undecodable_image": 1, "malformed_row": 1}, "chat": {"bad_turn_order": 1},
           "captions": {"empty_caption": 1}}


def components(stream_chat=False):
  chat_source = CHAT
  if stream_chat:   # as a streamed source hands them: a grain IterDataset of records
    chat_source = grain.MapDataset.source(CHAT + [
        {"skip": "broken_member", "id": "shard-0/7", "message": "truncated tar member"}])
    chat_source = chat_source.repeat().to_iter_dataset()
  return [Component("vqa", "easy_vqa", VQA, 8), Component("chat", "llava_instruct", chat_source, 4),
          Component("captions", "image_captions", CAPTIONS, 2)]


def mixed_pipeline(tokenizer, parts, **kw):
  args = dict(tokenizer=tokenizer, num_image_tokens=T, batch_size=2, max_length=96,
              image_size=8, images_per_row=3, pack_window=5, read_threads=2, seed=3,
              process_index=0, process_count=1)
  return DataPipeline(components=parts, **{**args, **kw})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


# ----------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("streamed", [False, True])
def test_components_are_drawn_at_their_weights(tokenizer, monkeypatch, streamed):
  """10k draws through the pipeline's own sharding, shuffling and mixing (the per-record work
  stubbed: only which component each draw comes from matters here)."""
  monkeypatch.setattr(pipeline_module.MakeExample, "map",
                      lambda self, record: {"examples": [], "id": record})
  source = lambda name: [f"{name}{i}" for i in range(500)]   # (grain's index shuffle is slow
                                                               # on tiny sources)
  parts = [Component(n, "easy_vqa", source(n), w) for n, w in (("a", .6), ("b", .3), ("c", .1))]
  if streamed:
    parts[2] = Component("c", "easy_vqa", grain.MapDataset.source(source("c")).repeat()
                         .to_iter_dataset(), .1)
  records = iter(mixed_pipeline(tokenizer, parts).examples())
  drawn = [next(records) for _ in range(10_000)]
  frequency = collections.Counter(r["dataset"] for r in drawn)
  for name, weight in (("a", .6), ("b", .3), ("c", .1)):
    assert abs(frequency[name] / 10_000 - weight) <= 0.02, frequency
  assert all(r["id"].startswith(r["dataset"]) for r in drawn)   # each labelled with its own
  # Every component goes through its records once per epoch, in a new order each epoch.
  a = [r["id"] for r in drawn if r["dataset"] == "a"]
  assert sorted(a[:500]) == sorted(a[500:1000]) == sorted(source("a"))
  assert a[:500] != a[500:1000]


def test_one_pass_counts_every_components_skips(tokenizer, caplog):
  """Weights in proportion to the components' sizes: one pass draws every record once, so each
  component's counts must equal its fixture's: kept examples, tokens and skips by reason."""
  with caplog.at_level(logging.INFO, logger="mma_jax.data.pipeline"):
    it = iter(mixed_pipeline(tokenizer, components(), num_epochs=1, shuffle=False))
    batches = list(it)
  counts = it.counts
  for name, records in (("vqa", VQA), ("chat", CHAT), ("captions", CAPTIONS)):
    part = counts.components[name]
    assert dict(part.skipped) == SKIPPED[name], name
    assert part.examples == len(records) - sum(SKIPPED[name].values()), name
  assert counts.examples == 6 + 3 + 1 and sum(counts.skipped.values()) == 4
  assert counts.tokens == sum(c.tokens for c in counts.components.values())
  assert counts.tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  # Packed across components: rows hold examples of several datasets.
  kinds = lambda text: ("vqa" if "Answer the question" in text else
                        "captions" if "Noise." in text else "chat")
  rows = [{kinds(tokenizer.decode(b["tokens"][r][b["segment_ids"][r] == s]))
           for s in range(1, b["segment_ids"][r].max() + 1)} for b in batches for r in range(2)]
  assert any(len(row) > 1 for row in rows)
  metrics = counts.metrics()
  assert metrics["data/examples"] == 10 and metrics["data/skipped"] == 4
  assert metrics["data/vqa/skipped/undecodable_image"] == 1 and metrics["data/chat/examples"] == 3
  assert metrics["data/captions/tokens"] == counts.components["captions"].tokens
  ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ended")]
  assert ended and "vqa: 6 examples" in ended[0] and "chat: 3 examples" in ended[0]


# ------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("streamed", [False, True])
def test_resume_continues_a_mixture_exactly(tokenizer, streamed):
  """Stop after k batches, restore the state (through JSON, as a checkpoint stores it) into a
  new pipeline: the next batches and every component's counts equal an uninterrupted run's."""
  pipeline = lambda: iter(mixed_pipeline(tokenizer, components(streamed)))
  reference = pipeline()
  batches = take(reference, 14)
  first = pipeline()
  inside_a_window = set()
  for stop_after in range(1, 7):
    next(first)
    state = json.loads(json.dumps(first.get_state()))
    inside_a_window.add(state["rows_returned"] > 0)
    resumed = pipeline()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 14 - stop_after), batches[stop_after:])
    assert resumed.counts == reference.counts
  assert inside_a_window == {True, False}
  parts = reference.counts.components
  assert set(parts) == {"vqa", "chat", "captions"}
  assert parts["chat"].skipped["bad_turn_order"] >= 1
  if streamed:   # the stream's own skip record reached the counts, under its component
    assert parts["chat"].skipped["broken_member"] >= 1
    assert set(parts["chat"].skipped) == {"bad_turn_order", "broken_member"}


def test_pipeline_arguments_name_the_component(tokenizer):
  parts = components()
  with pytest.raises(ValueError, match="component chat: dataset='coco'"):
    mixed_pipeline(tokenizer, [parts[0], Component("chat", "coco", CHAT)])
  with pytest.raises(ValueError, match="component chat: weight=0"):
    mixed_pipeline(tokenizer, [parts[0], Component("chat", "llava_instruct", CHAT, 0)])
  with pytest.raises(ValueError, match="must be unique"):
    mixed_pipeline(tokenizer, [parts[0], parts[0]])
  with pytest.raises(ValueError, match="num_workers=2 cannot split the streamed component"):
    mixed_pipeline(tokenizer, components(stream_chat=True), num_workers=2)


# ------------------------------------------------------------------------------------- config
ENTRY = {"dataset": "llava_instruct", "weight": 0.5, "manual_dir": "llava"}


def data_config(**data):
  return from_dict({"data": data})


def test_entries_are_checked_by_name():
  config = data_config(mixture=[ENTRY, dict(ENTRY, name="again", weight=2)], root="/r")
  assert config.data.dataset == "mixture" and config.data.mixture[1].weight == 2.0
  cases = [
      ([dict(ENTRY, wieght=1)], r"'data.mixture\[0\].wieght' is unknown"),
      ([ENTRY, dict(ENTRY, weight=0)], r"'data.mixture\[1\] \(llava_instruct\).weight': needs "
                                       "a positive weight .*, got 0.0"),
      ([ENTRY, dict(ENTRY, weight="heavy")], r"data.mixture\[1\].weight' expects float"),
      ([{"weight": 1}], r"'data.mixture\[0\]': needs a dataset"),
      ([ENTRY, ENTRY], r"'llava_instruct' is also the name of data.mixture\[0\]"),
      ([{"dataset": "webdataset", "weight": 1}], r"webdataset entry needs its tar shards"),
      ([dict(ENTRY, shards=["a.tar"])], r"only webdataset entries read shards"),
  ]
  for mixture, message in cases:
    with pytest.raises(ConfigError, match=message):
      data_config(mixture=mixture)
  with pytest.raises(ConfigError, match="'llava_instruct' and data.mixture are alternatives"):
    data_config(dataset="llava_instruct", mixture=[ENTRY])


def write_shard(path, samples):
  """A webdataset tar: KEY.png + KEY.txt per (key, caption); caption None: no .txt member."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for key, text in samples:
      members = [(f"{key}.png", png(len(key)))] + ([(f"{key}.txt", text.encode())] if text else [])
      for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_entries_build_under_the_root_and_flow_through(tmp_path, tokenizer, caplog):
  """Relative paths resolve under data.root; a dataset not built yet is built from its
  manual_dir into its data_dir (logged); webdataset shards join as a streamed component; then
  one pipeline reads all three."""
  data_fixtures.write_llava(tmp_path / "manual" / "llava")
  data_fixtures.write_captions(tmp_path / "manual" / "captions")
  write_shard(tmp_path / "shards" / "s0.tar", [("k0", "A shard caption."), ("k1", None)])
  write_shard(tmp_path / "shards" / "s1.tar", [("k2", "Another one.")])
  mixture = [dict(ENTRY, manual_dir="manual/llava", data_dir="tfds"),
             {"dataset": "image_captions", "weight": 0.5, "manual_dir": "manual/captions",
              "data_dir": "tfds", "name": "caps"},
             {"dataset": "webdataset", "weight": 0.5, "shards": ["shards/*.tar"]}]
  config = from_dict({"train": {"batch_size": 2},
                      "data": {"mixture": mixture, "root": str(tmp_path), "max_length": 128,
                               "pack_window": 8, "image_size": 8, "image_norm": "siglip"}})
  with caplog.at_level(logging.INFO, logger="mma_jax.data.mixture"):
    pipeline = DataPipeline.from_config(config, split="train", num_image_tokens=T,
                                        tokenizer=tokenizer)
  built = [r.getMessage() for r in caplog.records if "building" in r.getMessage()]
  assert len(built) == 2 and f"into {tmp_path / 'tfds'}" in built[0]
  assert "data.mixture[0] (llava_instruct): building llava_instruct from" in built[0]
  assert [(c.name, c.weight) for c in pipeline.components] == [
      ("llava_instruct", .5), ("caps", .5), ("webdataset", .5)]
  it = iter(pipeline)
  take(it, 6)
  parts = it.counts.components
  assert set(parts) == {"llava_instruct", "caps", "webdataset"}
  assert parts["webdataset"].examples >= 2 and parts["webdataset"].skipped["missing_caption"] >= 1
  assert set(parts["webdataset"].skipped) == {"missing_caption"}
  state = it.get_state()
  assert set(state["window_start"]) >= {"parents"}     # IterDataset.mix: every component's state
  reference = take(it, 3)
  resumed = iter(DataPipeline.from_config(config, split="train", num_image_tokens=T,
                                          tokenizer=tokenizer))
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), reference)
  again = DataPipeline.from_config(config, split="train", num_image_tokens=T, tokenizer=tokenizer)
  assert len(again.components[0].source) == len(data_fixtures.LLAVA_KEPT)   # built once
  # Held out: the entries' eval splits; the fixtures have train only, shards no splits at all.
  with pytest.raises(MixtureError, match="no entry has its eval split"):
    DataPipeline.from_config(config, split="test", num_image_tokens=T, training=False)
  config.data.mixture[1].eval_split = "train[:2]"
  held_out = DataPipeline.from_config(config, split="test", num_image_tokens=T, training=False)
  assert [(c.name, len(c.source)) for c in held_out.components] == [("caps", 2)]


def test_entry_problems_name_the_entry(tmp_path):
  def problem(entry, message):
    config = from_dict({"data": {"mixture": [entry], "root": str(tmp_path), "image_size": 8,
                                 "image_norm": "siglip"}})
    with pytest.raises(MixtureError, match=message):
      DataPipeline.from_config(config, split="train", num_image_tokens=T)
  problem(dict(ENTRY, manual_dir="nowhere"),
          r"data.mixture\[0\] \(llava_instruct\): manual_dir '.*nowhere' is not a directory")
  (tmp_path / "empty").mkdir()
  problem({"dataset": "llava_instruct", "weight": 1, "data_dir": "empty"},
          r"data.mixture\[0\] \(llava_instruct\): llava_instruct is not built in .*empty.* no "
          "manual_dir")
  problem({"dataset": "no_such_builder", "weight": 1, "data_dir": "empty"},
          r"data.mixture\[0\] \(no_such_builder\): no tfds builder")
