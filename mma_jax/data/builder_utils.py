"""What the tfds builders share: array_record preparation, build-time image checks, skip counts.

Rows a builder cannot use are skipped with a warning naming the row and the reason, and counted;
the counts of kept and skipped rows per split are stored in the dataset's metadata
(`builder.info.metadata["kept"][split]`, `["skipped"][split][reason]`), so they stay readable
after the build.
"""
from __future__ import annotations

import collections
import io
import logging
import pathlib

import tensorflow_datasets as tfds
from PIL import Image

from mma_jax.data.images import ImageError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def prepare(name: str, data_dir: str | pathlib.Path, manual_dir: str | pathlib.Path | None = None):
  """Builds dataset `name` (a registered builder) into `data_dir` as array_record; returns the
  builder. The same as `tfds.builder(name, data_dir=...).download_and_prepare(
  file_format="array_record", download_config=DownloadConfig(manual_dir=...))`."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  builder.download_and_prepare(file_format="array_record", download_config=config)
  return builder


# Datasets whose source ships with a Python package: built on first use, nothing to download.
PACKAGED = ("easy_vqa",)


def prepare_packaged(name: str, data_dir: str = "") -> None:
  """Builds `name` into `data_dir` (or the tfds default) unless it is built already or does not
  ship with a package (the others need their manual_dir: build them with `prepare`)."""
  if name not in PACKAGED:
    return
  import mma_jax.data  # noqa: F401  registers the builders

  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    logger.info("building %s into %s (once)", name, builder.data_dir)
    prepare(name, data_dir or builder.data_dir_root)


def manual_splits(name: str, manual_dir, suffix: str) -> dict[str, pathlib.Path]:
  """{split: manual_dir/<split><suffix>} for the split files present; none is an error naming
  the files looked for."""
  manual_dir = pathlib.Path(manual_dir)
  files = {split: manual_dir / f"{split}{suffix}" for split in SPLITS}
  found = {split: path for split, path in files.items() if path.is_file()}
  if not found:
    raise FileNotFoundError(f"{name}: manual_dir '{manual_dir}' holds none of "
                            f"{', '.join(p.name for p in files.values())}")
  return found


def checked_image_bytes(path: pathlib.Path) -> bytes:
  """The file's bytes, if it exists and its header parses as an image (PIL verify: cheap, no
  full decode; the pipeline still counts images that fail to decode later)."""
  if not path.is_file():
    raise ImageError("missing_image_file", f"image file '{path}' does not exist")
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError("undecodable_image",
                     f"image file '{path}' is not a readable image: {e}") from None
  return data


class RowError(ValueError):
  """A row a builder skips; `reason` is the key it is counted under."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class SplitTally:
  """Counts kept and skipped rows of one split and records them in the builder's metadata."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, source: pathlib.Path):
    self.builder, self.split, self.source = builder, split, source
    self.kept = 0
    self.skipped: collections.Counter[str] = collections.Counter()

  def skip(self, row: str, reason: str, message: str) -> None:
    self.skipped[reason] += 1
    logger.warning("%s/%s: skipped row %s of %s (%s): %s", self.builder.name, self.split, row,
                   self.source, reason, message)

  def finish(self) -> None:
    """Stores the counts (called after the last row) and refuses a split with no usable row."""
    metadata = self.builder.info.metadata
    metadata.setdefault("kept", {})[self.split] = self.kept
    metadata.setdefault("skipped", {})[self.split] = dict(sorted(self.skipped.items()))
    logger.info("%s/%s: kept %d rows of %s, skipped %d %s", self.builder.name, self.split,
                self.kept, self.source, sum(self.skipped.values()), dict(self.skipped))
    if not self.kept:
      raise ValueError(f"{self.builder.name}/{self.split}: every row of '{self.source}' was "
                       f"skipped ({dict(self.skipped)}); see the warnings above")

