"""tfds builder `easy_vqa`: the easy-VQA shapes data bundled in the `easy-vqa` PyPI package.

64x64 RGB PNGs of one shape each, with questions about its shape and colour (13 answers). Built
offline from the package's files: one example per question (train 38,575, test 9,673).

Features: image (uint8 [64, 64, 3], stored as the shipped PNG bytes), image_id, question, answer,
question_type ("shape", "color" or "yes_no"; easy-vqa ships no type, so it is read off the answer
vocabulary: the shape names, yes/no, otherwise a colour). Builds plain or with Apache Beam
(builder_utils.RowsBuilder); no row is ever skipped.
"""
from __future__ import annotations

import functools
import pathlib

import easy_vqa as easy_vqa_package
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import RowsBuilder, SplitRows, index_parts, load_json

SHAPES = ("circle", "rectangle", "triangle")
IMAGE_SIZE = 64


def package_data_dir() -> pathlib.Path:
  return pathlib.Path(easy_vqa_package.__file__).parent / "data"


def question_type(answer: str) -> str:
  if answer in ("yes", "no"):
    return "yes_no"
  return "shape" if answer in SHAPES else "color"


QUESTIONS_PER_PART = 5_000   # rows one Beam worker reads before they are spread out


def read_questions(split_dir: epath.Path, part: tuple[int, int]):
  """Questions [start, stop) of a split: (label, (index, [question, answer, image_id]))."""
  questions = load_json(split_dir / "questions.json", "easy_vqa")
  for index in range(*part):
    yield f"question {index}", (index, questions[index])


@functools.lru_cache(maxsize=8192)   # one image serves ~10 questions: read each file once
def image_file_bytes(split_dir: str, image_id: int) -> bytes:
  return (epath.Path(split_dir) / "images" / f"{image_id}.png").read_bytes()


def question_example(indexed_question, split_dir: str):
  index, (question, answer, image_id) = indexed_question
  return [(index, {
      "image": image_file_bytes(split_dir, image_id),
      "image_id": image_id,
      "question": question,
      "answer": answer,
      "question_type": question_type(answer),
  })]


class EasyVqa(RowsBuilder):
  """easy-VQA (github.com/vzhou842/easy-VQA) from the installed package; no download."""

  # tfds finds a builder's source through the `importlib_resources` backport, which is not
  # installed; naming the file directly avoids it (tfds would fail in download_and_prepare).
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Questions, answers and PNG images of easy-vqa 1.0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format="png"),
            "image_id": np.int32,
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "question_type": tfds.features.Text(),
        }),
        homepage="https://github.com/vzhou842/easy-VQA",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager   # everything ships with the package
    return {split: self._generate_examples(package_data_dir() / split)
            for split in ("train", "test")}

  def _generate_examples(self, split_dir: pathlib.Path):
    split_dir = epath.Path(split_dir)
    count = len(load_json(split_dir / "questions.json", "easy_vqa"))
    parts = index_parts(count, QUESTIONS_PER_PART if self.builds_with_beam else max(count, 1))
    return self.split_examples(split_dir.name, SplitRows(
        source=split_dir / "questions.json", parts=parts,
        read=functools.partial(read_questions, split_dir),
        examples=functools.partial(question_example, split_dir=str(split_dir))))
