"""The official SFT source builders (mma_jax/data/sft) against the official AKI dataset classes.

tests/fixtures/official_sft/expected.json holds what the official classes make of the fixture
records of tests/sft_fixtures.py (made by make_expected.py, beside it). Each builder reads the
fixture root (with broken rows added) into array_record; its records must hold the official
INPUT and TARGET, laid out (aki template, official flavour) they must be the official tokens
split where the official labels start, and the broken rows must be counted by reason.
The LLaVA-150k records go through the existing llava_instruct builder the same way.
"""
import json
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import mma_jax.data  # noqa: F401  registers the builders
import mma_jax.data.sft as sft
from mma_jax.data.builder_utils import prepare
from mma_jax.data.sft import common
from mma_jax.data.pipeline import READERS, MakeExample, llava_instruct_input
from mma_jax.data.sft.options import option_order
from mma_jax.data.sft.vsr import question
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout

import sft_fixtures

HERE = pathlib.Path(__file__).parent
EXPECTED = json.loads((HERE / "fixtures/official_sft/expected.json").read_text())["records"]
TOKENIZER = HERE / "fixtures/aki_official/tokenizer"
VISION_TOKENS = 3
# Built here: every SFT source, both VSR configs, and LLaVA-150k through llava_instruct.
BUILT = sft.DATASETS + ("llava_instruct",)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(data_dir, root): every dataset built from one fixture root with broken rows."""
  tmp = tmp_path_factory.mktemp("sft")
  root = sft_fixtures.write_root(tmp / "root", broken=True)
  for name in sft.DATASETS:
    prepare(name, tmp / "data", root)
  prepare("llava_instruct", tmp / "data", sft_fixtures.write_llava_manual(root, tmp / "llava"))
  return tmp / "data", root


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(str(TOKENIZER), "phi3", flavour="official")[0]


def read_all(data_dir, name) -> dict[str, dict]:
  source = tfds.data_source(name, split="train", data_dir=str(data_dir))
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def turns(record) -> list[str]:
  return [c.decode() for c in record["conversations"]["content"]]


def expected_of(dataset):
  return [e for e in EXPECTED if e["dataset"] == dataset]


def test_every_source_and_every_expected_record_is_covered():
  assert {e["dataset"] for e in EXPECTED} == set(BUILT) - {"vsr"}
  for name, good in sft_fixtures.GOOD.items():
    if name != "llava_instruct":
      dataset = "vsr/official_split" if name == "vsr" else name
      assert sorted(e["id"] for e in expected_of(dataset)) == sorted(i for i, _ in good), name
  # the official flavour splits the 2-turn LLaVA record: 3 samples from 2 records
  assert sorted((e["id"], e["turn"]) for e in expected_of("llava_instruct")) == [
      ("000000000139", 0), ("000000000139", 1), ("000000000285", 0)]


def test_records_hold_the_official_input_and_target(built):
  data_dir, root = built
  for dataset in BUILT:
    if dataset in ("llava_instruct", "vsr"):
      continue
    records = read_all(data_dir, dataset)
    expected = expected_of(dataset)
    assert sorted(records) == sorted(e["id"] for e in expected), dataset
    for e in expected:
      record = records[e["id"]]
      image = "<image>\n" if e["has_image"] else ""
      assert [r.decode() for r in record["conversations"]["role"]] == ["user", "assistant"]
      assert turns(record) == [image + e["official_input"], e["official_target"]], e["id"]
      files = [f.decode() for f in record["image_files"]]
      assert len(files) == e["has_image"]
      assert [bytes(b) for b in record["images"]] == [(root / f).read_bytes() for f in files]


def test_vsr_fixes_the_official_split_by_default(built):
  """`vsr` (config fixed) splits at the first whole word "is"; `vsr/official_split` reproduces
  the official `caption.split("is")` (checked against the official output above)."""
  assert question("The cat is on the table.") == "Is the cat on the table?"
  assert question("The dish is beside the fish.") == "Is the dish beside the fish?"
  assert question("The dish is beside the fish.", official_split=True) == \
      "Is the d h beside the f h?"
  assert question("The bear is next to the bench which is red.") == \
      "Is the bear next to the bench which is red?"
  fixed = read_all(built[0], "vsr")
  official = {e["id"]: e["official_input"] for e in expected_of("vsr/official_split")}
  fixed_inputs = {i: turns(r)[0].removeprefix("<image>\n") for i, r in fixed.items()}
  assert fixed_inputs["1"] == official["1"]            # one whole-word "is": the same
  assert fixed_inputs["2"] == official["2"].replace("Is the d h beside the f h?",
                                                    "Is the dish beside the fish?")
  assert fixed_inputs["3"] == official["3"].replace("bench which red?", "bench which is red?")
  assert [turns(fixed[i])[1] for i in "123"] == ["yes", "no", "yes"]


def collapsed(tokens: np.ndarray, image_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens with each run of image tokens as one, the kept positions)."""
  keep = np.ones(len(tokens), bool)
  keep[1:] = ~((tokens[1:] == image_id) & (tokens[:-1] == image_id))
  return tokens[keep], np.flatnonzero(keep)


def test_laid_out_records_are_the_official_tokens_split_at_the_labels(built, tokenizer):
  """Through the pipeline's reader and the official-flavour layout, every expected sample is the
  official `encode_prompt` ids (image tokens collapsed back to one `<image>`), its trained tokens
  start where the official labels start, and the two parts decode to `prompt` / `target` and
  re-tokenize from the official string split there (BOS and EOS included)."""
  layout = ChatLayout("phi3", tokenizer, VISION_TOKENS, "mma", "official")
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  data_dir = built[0]
  sources = {d: read_all(data_dir, d) for d in BUILT if d != "vsr"}
  for e in EXPECTED:
    item = READERS[e["dataset"]](sources[e["dataset"]][e["id"]])
    example = layout.training_examples(item.conversation)[e["turn"]]
    tokens, kept = collapsed(example.tokens, image_id)
    label = (e["dataset"], e["id"], e["turn"])
    assert tokens.tolist() == e["input_ids"], label
    first_trained = int(np.flatnonzero(example.loss_mask)[0]) + 1   # loss at t trains t + 1
    assert np.flatnonzero(example.loss_mask).tolist() == list(range(first_trained - 1,
                                                                     example.length - 1))
    start = int(np.searchsorted(kept, first_trained))
    assert start == e["target_start"], label
    assert tokenizer.decode(tokens[:start].tolist()) == e["prompt"], label
    assert tokenizer.decode(tokens[start:].tolist()) == e["target"], label
    text_ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    assert text_ids(e["prompt_text"]) == tokens[:start].tolist(), label
    assert text_ids(e["prompt_text"] + e["target_text"]) == tokens.tolist(), label
    assert e["prompt_text"] + e["target_text"] == "<s>" + e["text"] + "<|endoftext|>"


def option_lines(text: str) -> dict[str, str]:
  return dict(re.findall(r"^([A-Z])\. (.*)$", text.split("\nOptions:\n")[1], re.M))


def test_options_are_a_seeded_shuffle_of_a_copy_with_the_right_letter():
  """Our order is option_order(dataset, id) (make_expected drove the official shuffle with it,
  so the exact strings above cover the rendering); against the undriven official output: the
  same question and options, and the letter names the same answer."""
  checked = 0
  for e in expected_of("aokvqa") + expected_of("scienceqa"):
    ours, official = e["official_input"], e["official_random"]["input"]
    assert ours.split("\nOptions:\n")[0] == official.split("\nOptions:\n")[0]
    ours_options, official_options = option_lines(ours), option_lines(official)
    assert sorted(ours_options.values()) == sorted(official_options.values())
    assert ours_options[e["official_target"]] == \
        official_options[e["official_random"]["target"]]
    checked += 1
  assert checked == 4
  assert option_order("aokvqa", "x", 4) == option_order("aokvqa", "x", 4)
  orders = {tuple(option_order("aokvqa", str(i), 4)) for i in range(40)}
  assert len(orders) > 10 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
  # the fixture's answers land on different letters, not always where they were
  letters = [e["official_target"] for e in expected_of("aokvqa") + expected_of("scienceqa")]
  assert len(set(letters)) > 1


def test_broken_rows_are_skipped_and_counted_by_reason(built):
  data_dir = built[0]
  for name in sft.DATASETS:
    metadata = tfds.builder(name, data_dir=str(data_dir)).info.metadata
    base = name.split("/")[0]
    assert metadata["kept"] == {"train": len(sft_fixtures.GOOD[base])}, name
    assert metadata["skipped"] == {"train": sft_fixtures.BROKEN[base]}, name


def test_a_data_file_that_is_missing_or_not_json_is_named(tmp_path):
  root = sft_fixtures.write_root(tmp_path / "root")
  (root / "GQA/train_balanced_questions.json").write_text('{"02930152": {"imageId": ')
  with pytest.raises(ValueError, match="train_balanced_questions.json' is not valid JSON"):
    prepare("gqa", tmp_path / "data", root)
  (root / "ScienceQA/problems.json").unlink()
  with pytest.raises(FileNotFoundError, match="problems.json' does not exist"):
    prepare("scienceqa", tmp_path / "data", root)


def test_the_pipeline_reads_every_source_with_the_llava_instruct_reader(built, tokenizer):
  assert all(READERS[name] is llava_instruct_input for name in sft.DATASETS)
  record = read_all(built[0], "scienceqa")["2"]     # text only: no image, no <image> line
  make = MakeExample(dataset="scienceqa", tokenizer=tokenizer, template="phi3", mask_mode="mma",
                     num_image_tokens=VISION_TOKENS, max_length=512, too_long="truncate",
                     images_per_row=1, image_size=14, flavour="official")
  (example,) = make.map(record)["examples"]
  assert example["images"].shape == (0, 14, 14, 3)
  assert example["tokens"].tolist() == [e for e in EXPECTED if e["dataset"] == "scienceqa"
                                        and e["id"] == "2"][0]["input_ids"]


def as_python(value):
  if isinstance(value, dict):
    return {k: as_python(v) for k, v in value.items()}
  return value.tolist() if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("name", ["visual_genome", "vsr/official_split"])
def test_the_beam_build_writes_the_plain_build_records_and_counts(name, built, tmp_path,
                                                                  monkeypatch):
  """DirectRunner, parts of 2 rows (VG: regions of one image entry in several parts; VSR: the
  builder config's choice travels to the workers)."""
  data_dir, root = built
  monkeypatch.setattr(common, "ROWS_PER_PART", 2)
  prepare(name, tmp_path, root, beam_flags=["--runner=DirectRunner"])
  plain, beam = read_all(data_dir, name), read_all(tmp_path, name)
  assert {k: as_python(v) for k, v in beam.items()} == {k: as_python(v) for k, v in plain.items()}
  for d in (data_dir, tmp_path):
    assert tfds.builder(name, data_dir=str(d)).info.metadata["skipped"] == \
        {"train": sft_fixtures.BROKEN[name.split("/")[0]]}
  shards = lambda d: [f.read_bytes() for f in sorted(
      (d / name / "1.0.0").glob("*.array_record*"))]
  assert shards(tmp_path) == shards(data_dir)   # the same keys: the same files
