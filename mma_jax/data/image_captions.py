"""tfds builder `image_captions`: image-caption pairs for pre-training, from a manual directory.

manual_dir holds `{split}.jsonl` for any of the splits train, validation, test -- one JSON object
`{"image": "path/relative/to/images", "caption": "..."}` per line -- and an `images/` folder.
Unusable lines are skipped at build time and counted by reason in `info.metadata` (see
builder_utils): malformed_row (bad JSON, missing or non-string fields), empty_caption,
image_outside_user_turn (an `<image>` placeholder in the caption), missing_image_file,
undecodable_image.

Features: image (the encoded image file), image_file, caption. Builds plain or with Apache Beam
(builder_utils.RowsBuilder; under Beam each worker reads blocks of LINES_PER_PART lines).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import (RowError, RowsBuilder, SplitRows, checked_image_bytes,
                                        line_parts, manual_splits, read_lines)
from mma_jax.templates import IMAGE_TOKEN

LINES_PER_PART = 10_000   # lines one Beam worker reads before they are spread out


def parse_line(line: str) -> tuple[str, str]:
  """A JSONL line -> (image path, caption); raises RowError."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise RowError("malformed_row", f"not valid JSON: {e}") from None
  if not (isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"]
          and isinstance(row.get("caption"), str)):
    raise RowError("malformed_row", f"needs string 'image' and 'caption', got {line.strip()!r}")
  # The same rules as layout.caption, so a built row always lays out.
  if not row["caption"].strip():
    raise RowError("empty_caption", "the caption is empty")
  if IMAGE_TOKEN in row["caption"]:
    raise RowError("image_outside_user_turn", f"the caption holds an {IMAGE_TOKEN} placeholder")
  return row["image"], row["caption"]


def caption_example(numbered_line: tuple[int, bytes], images_dir: epath.Path):
  """(line number, raw line) -> [(line number, example)]; raises RowError or ImageError."""
  number, raw = numbered_line
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RowError("malformed_row", f"not UTF-8: {e}") from None
  image_file, caption = parse_line(line)
  image = checked_image_bytes(images_dir / image_file)
  return [(number, {"image": image, "image_file": image_file, "caption": caption})]


class ImageCaptions(RowsBuilder):
  """Image-caption pairs (e.g. BLIP3-Kale exported to JSONL) from manual_dir."""

  code_path = epath.Path(__file__)   # see easy_vqa.py: avoids the missing importlib_resources
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One image and one caption per example."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put `train.jsonl` (and optionally `validation.jsonl`, `test.jsonl`), one
  {"image": ..., "caption": ...} object per line, into manual_dir, with an `images/` folder the
  image paths are relative to.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_file": tfds.features.Text(),
            "caption": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(split, path, manual_dir / "images")
            for split, path in manual_splits("image_captions", manual_dir, ".jsonl").items()}

  def _generate_examples(self, split: str, path: epath.Path, images_dir: epath.Path):
    parts = line_parts(path, LINES_PER_PART if self.builds_with_beam else None)
    return self.split_examples(split, SplitRows(
        source=path, parts=parts, read=functools.partial(read_lines, path),
        examples=functools.partial(caption_example, images_dir=images_dir)))
