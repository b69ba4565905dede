"""tfds builders without TensorFlow: easy_vqa from the installed package (the shipped split
sizes), llava_instruct and image_captions from small fixtures with broken rows (kept and skipped
counts by reason, in the log and in the dataset metadata)."""
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import mma_jax.data  # noqa: F401  registers the builders
from mma_jax.data.builder_utils import prepare
from mma_jax.data.easy_vqa import package_data_dir, question_type

import data_fixtures

# What easy-vqa 1.0 ships (its data/README.md): 38,575 train and 9,673 test questions about
# 4,000 and 1,000 images, 13 answers.
EASY_VQA_SIZES = {"train": 38575, "test": 9673}
EASY_VQA_IMAGES = {"train": 4000, "test": 1000}


def test_easy_vqa_split_sizes_equal_what_the_package_ships(easy_vqa_dir):
  builder = tfds.builder("easy_vqa", data_dir=str(easy_vqa_dir))
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == EASY_VQA_SIZES
  for split, size in EASY_VQA_SIZES.items():
    source = tfds.data_source("easy_vqa", split=split, data_dir=str(easy_vqa_dir))
    assert len(source) == size
    assert len(json.loads((package_data_dir() / split / "questions.json").read_text())) == size
    assert len(list((package_data_dir() / split / "images").glob("*.png"))) == \
        EASY_VQA_IMAGES[split]


def test_easy_vqa_records_match_the_package_files(easy_vqa_dir):
  source = tfds.data_source("easy_vqa", split="test", data_dir=str(easy_vqa_dir))
  shipped = {(q, a, i) for q, a, i in
             json.loads((package_data_dir() / "test" / "questions.json").read_text())}
  answers = set((package_data_dir() / "answers.txt").read_text().split())
  assert len(answers) == 13
  for index in range(0, len(source), 997):   # a spread of records
    record = source[index]
    question, answer = record["question"].decode(), record["answer"].decode()
    image_id = int(record["image_id"])
    assert (question, answer, image_id) in shipped and answer in answers
    assert record["question_type"].decode() == question_type(answer)
    with Image.open(package_data_dir() / "test" / "images" / f"{image_id}.png") as png:
      np.testing.assert_array_equal(record["image"], np.asarray(png.convert("RGB")))


def test_question_types():
  assert [question_type(a) for a in ("yes", "no", "circle", "triangle", "teal")] == \
      ["yes_no", "yes_no", "shape", "shape", "color"]


def test_llava_instruct_builds_from_a_fixture_and_counts_skipped_rows(tmp_path, caplog):
  data_fixtures.write_llava(tmp_path / "manual")
  with caplog.at_level(logging.WARNING, logger="mma_jax.data.builder_utils"):
    builder = prepare("llava_instruct", tmp_path / "data", tmp_path / "manual")
  assert builder.info.splits["train"].num_examples == len(data_fixtures.LLAVA_KEPT) == 6
  # Counts survive the build: a fresh builder reads them from the prepared directory.
  metadata = tfds.builder("llava_instruct", data_dir=str(tmp_path / "data")).info.metadata
  assert metadata["kept"] == {"train": 6}
  assert metadata["skipped"] == {"train": data_fixtures.LLAVA_SKIPPED}
  # One reasoned warning per skipped row, naming it.
  skipped = [r.getMessage() for r in caplog.records if "skipped row" in r.getMessage()]
  assert len(skipped) == sum(data_fixtures.LLAVA_SKIPPED.values())
  for row, reason in data_fixtures.LLAVA_ROWS:
    if reason:
      assert any(f"id {row['id']!r}" in m and f"({reason})" in m for m in skipped), row["id"]

  source = tfds.data_source("llava_instruct", split="train", data_dir=str(tmp_path / "data"))
  records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == sorted(data_fixtures.LLAVA_KEPT)
  turns = records["multi_turn"]["conversations"]
  assert [r.decode() for r in turns["role"]] == ["user", "assistant"] * 3   # whole, mapped roles
  assert turns["content"][3].decode() == "It is a JPEG."
  two = records["two_images"]
  assert [f.decode() for f in two["image_files"]] == ["rgba.png", "gray.png"]
  images_dir = tmp_path / "manual" / "images"
  assert [bytes(b) for b in two["images"]] == [(images_dir / f).read_bytes()
                                              for f in ("rgba.png", "gray.png")]
  assert len(records["text_only"]["images"]) == 0


def test_image_captions_builds_from_a_fixture_and_counts_skipped_rows(tmp_path, caplog):
  data_fixtures.write_captions(tmp_path / "manual")
  with caplog.at_level(logging.WARNING, logger="mma_jax.data.builder_utils"):
    builder = prepare("image_captions", tmp_path / "data", tmp_path / "manual")
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.metadata["kept"] == {"train": 4}
  assert builder.info.metadata["skipped"] == {"train": data_fixtures.CAPTIONS_SKIPPED}
  skipped = [r.getMessage() for r in caplog.records if "skipped row" in r.getMessage()]
  assert len(skipped) == sum(data_fixtures.CAPTIONS_SKIPPED.values())
  assert any("line 10 " in m and "(missing_image_file)" in m and "nowhere.png" in m
             for m in skipped)
  source = tfds.data_source("image_captions", split="train", data_dir=str(tmp_path / "data"))
  got = {source[i]["image_file"].decode(): source[i]["caption"].decode()
         for i in range(len(source))}
  assert sorted(got) == sorted(data_fixtures.CAPTIONS_KEPT)
  assert got["photo.jpg"] == "A noisy photo."


def test_a_manual_dir_without_data_files_is_refused_by_name(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "notes.txt").write_text("no data here")
  with pytest.raises(FileNotFoundError, match="train.json"):
    prepare("llava_instruct", tmp_path / "data", tmp_path / "manual")


def test_a_split_with_no_usable_row_fails_with_the_counts(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "train.jsonl").write_text('{"image": "gone.png", "caption": "x"}\n')
  with pytest.raises(Exception, match="every row .* was skipped .*missing_image_file"):
    prepare("image_captions", tmp_path / "data", tmp_path / "manual")
