"""tfds builder `image_captions`: image-caption pairs for pre-training, from a manual directory.

manual_dir holds `{split}.jsonl` for any of the splits train, validation, test -- one JSON object
`{"image": "path/relative/to/images", "caption": "..."}` per line -- and an `images/` folder.
Unusable lines are skipped at build time and counted by reason in `info.metadata` (see
builder_utils): malformed_row (bad JSON, missing or non-string fields), empty_caption,
image_outside_user_turn (an `<image>` placeholder in the caption), missing_image_file,
undecodable_image.

Features: image (the encoded image file), image_file, caption.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import RowError, SplitTally, checked_image_bytes, manual_splits
from mma_jax.data.images import ImageError
from mma_jax.templates import IMAGE_TOKEN


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


class ImageCaptions(tfds.core.GeneratorBasedBuilder):
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
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(split, path, manual_dir / "images")
            for split, path in manual_splits("image_captions", manual_dir, ".jsonl").items()}

  def _generate_examples(self, split: str, path: pathlib.Path, images_dir: pathlib.Path):
    tally = SplitTally(self, split, path)
    with path.open(encoding="utf-8") as lines:
      for number, line in enumerate(lines, start=1):
        if not line.strip():
          continue    # blank lines are not rows
        try:
          image_file, caption = parse_line(line)
          image = checked_image_bytes(images_dir / image_file)
        except (RowError, ImageError) as e:
          tally.skip(f"line {number}", e.reason, str(e))
          continue
        tally.kept += 1
        yield number, {"image": image, "image_file": image_file, "caption": caption}
    tally.finish()
