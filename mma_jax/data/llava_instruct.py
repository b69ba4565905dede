"""tfds builder `llava_instruct`: LLaVA-format instruction data from a manual directory.

manual_dir holds `{split}.json` for any of the splits train, validation, test (e.g.
llava_instruct_150k.json saved as train.json) and an `images/` folder the rows' image paths are
relative to (e.g. a link to COCO train2017). A row is

    {"id": "...", "image": "a.jpg" (or a list of paths, or absent for text only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", ...}, ...]}

Conversations are kept whole (every turn). Rows that cannot be laid out are skipped at build time,
counted by reason in `info.metadata` (see builder_utils): malformed_row, unknown_role, the layout's
conversation checks (bad_turn_order, missing_answer, empty_answer, image_count_mismatch, ...),
missing_image_file, undecodable_image.

Features: id, images (the encoded image files, in placeholder order), image_files, conversations
{role: "user" | "assistant", content}. Builds plain or with Apache Beam (builder_utils.RowsBuilder;
under Beam each worker loads the JSON file once and reads blocks of ROWS_PER_PART rows).
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import (RowError, RowsBuilder, SplitRows, checked_image_bytes,
                                        index_parts, load_json, manual_splits)
from mma_jax.layout import Conversation
from mma_jax.layout import _check_conversation as check_conversation   # the layout's own rules

ROWS_PER_PART = 1_000   # rows one Beam worker reads before they are spread out
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_row(row) -> tuple[str | None, list[str], list[tuple[str, str]]]:
  """A LLaVA row -> (id, image paths, [(role, content)]); raises RowError or ConversationError."""
  if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
    raise RowError("malformed_row", "a row must be an object with a 'conversations' list")
  image = row.get("image")
  images = [] if image is None else [image] if isinstance(image, str) else image
  if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
    raise RowError("malformed_row", f"'image' must be a path or a list of paths, got {image!r}")
  turns = []
  for i, turn in enumerate(row["conversations"]):
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str)):
      raise RowError("malformed_row", f"turn {i} must have string 'from' and 'value', got {turn!r}")
    if turn["from"] not in ROLES:
      raise RowError("unknown_role",
                     f"turn {i} is from {turn['from']!r}; known: {', '.join(ROLES)}")
    turns.append((ROLES[turn["from"]], turn["value"]))
  check_conversation(Conversation(turns, num_images=len(images)), generation_prompt=False)
  row_id = row.get("id")
  return (None if row_id is None else str(row_id)), images, turns


def load_rows(path: epath.Path) -> list:
  rows = load_json(path, "llava_instruct")
  if not isinstance(rows, list):
    raise ValueError(f"llava_instruct: '{path}' must hold a JSON list of rows")
  return rows


def read_rows(path: epath.Path, part: tuple[int, int]):
  """Rows [start, stop) of the file: (label, (index, row))."""
  rows = load_rows(path)
  for index in range(*part):
    row = rows[index]
    label = f"{index}" + (f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else "")
    yield label, (index, row)


def llava_example(indexed_row: tuple[int, object], images_dir: epath.Path):
  """(index, row) -> [(index, example)]; raises RowError, ConversationError or ImageError."""
  index, row = indexed_row
  row_id, image_files, turns = parse_row(row)
  images = [checked_image_bytes(images_dir / f) for f in image_files]
  return [(index, {
      "id": row_id if row_id is not None else str(index),
      "images": images,
      "image_files": image_files,
      "conversations": [{"role": role, "content": content} for role, content in turns],
  })]


def conversation_features() -> tfds.features.FeaturesDict:
  """The record schema of conversation datasets (this builder and every SFT source in sft/), so
  that one pipeline reader reads them all."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "image_files": tfds.features.Sequence(tfds.features.Text()),
      "conversations": tfds.features.Sequence({
          "role": tfds.features.Text(),
          "content": tfds.features.Text(),
      }),
  })


class LlavaInstruct(RowsBuilder):
  """LLaVA-format conversations with their images, from manual_dir."""

  code_path = epath.Path(__file__)   # see easy_vqa.py: avoids the missing importlib_resources
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Whole multi-turn, multi-image conversations."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put `train.json` (and optionally `validation.json`, `test.json`) in LLaVA format, e.g.
  llava_instruct_150k.json, into manual_dir, with an `images/` folder the rows' "image" paths are
  relative to (for LLaVA-Instruct-150k: a link to COCO train2017).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=conversation_features(),
        metadata=tfds.core.MetadataDict(),
        homepage="https://llava-vl.github.io/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(split, path, manual_dir / "images")
            for split, path in manual_splits("llava_instruct", manual_dir, ".json").items()}

  def _generate_examples(self, split: str, path: epath.Path, images_dir: epath.Path):
    count = len(load_rows(path))
    parts = index_parts(count, ROWS_PER_PART if self.builds_with_beam else max(count, 1))
    return self.split_examples(split, SplitRows(
        source=path, parts=parts, read=functools.partial(read_rows, path),
        examples=functools.partial(llava_example, images_dir=images_dir)))
