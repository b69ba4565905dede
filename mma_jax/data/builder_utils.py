"""What the tfds builders share: array_record preparation, build-time image checks, skip counts,
and one per-row build that runs as a plain generator or as an Apache Beam pipeline.

Rows a builder cannot use are skipped with a warning naming the row and the reason, and counted;
the counts of kept and skipped rows per split are stored in the dataset's metadata
(`builder.info.metadata["kept"][split]`, `["skipped"][split][reason]`), so they stay readable
after the build.

A `RowsBuilder` describes each split as `SplitRows`: small picklable `parts` (index or byte
ranges), `read(part)` -> its labelled rows, `examples(row)` -> the row's (key, example) pairs.
The plain build reads the parts in order; given a Beam runner or options (DownloadConfig,
`prepare(..., beam_flags=[...])` or `python -m mma_jax.data.beam`) the same functions run as

    beam.Create(parts) | FlatMap(read) | Reshuffle() | FlatMap(examples, counting)

on DirectRunner, Dataflow, Flink or Spark; the counts are then Beam counters (namespace
"<dataset>/<split>", names "kept" and "skipped/<reason>"), stored in the same metadata after the
pipeline. The keys come from the rows themselves, so both builds write the same records.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import logging
import pathlib
from typing import Any, Callable, Iterable, Sequence

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mma_jax.data.images import ImageError
from mma_jax.layout import ConversationError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def prepare(name: str, data_dir: str | pathlib.Path, manual_dir: str | pathlib.Path | None = None,
            beam_flags: Sequence[str] | None = None):
  """Builds dataset `name` (a registered builder) into `data_dir` as array_record; returns the
  builder. The same as `tfds.builder(name, data_dir=...).download_and_prepare(
  file_format="array_record", download_config=DownloadConfig(manual_dir=...))`. `beam_flags`
  (e.g. ["--runner=DirectRunner"]) builds a RowsBuilder with Apache Beam."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  if beam_flags is not None:
    beam = tfds.core.lazy_imports.apache_beam
    config.beam_options = beam.options.pipeline_options.PipelineOptions(flags=list(beam_flags))
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


def manual_splits(name: str, manual_dir, suffix: str) -> dict[str, epath.Path]:
  """{split: manual_dir/<split><suffix>} for the split files present; none is an error naming
  the files looked for."""
  manual_dir = epath.Path(manual_dir)
  files = {split: manual_dir / f"{split}{suffix}" for split in SPLITS}
  found = {split: path for split, path in files.items() if path.is_file()}
  if not found:
    raise FileNotFoundError(f"{name}: manual_dir '{manual_dir}' holds none of "
                            f"{', '.join(p.name for p in files.values())}")
  return found


def checked_image_bytes(path: epath.Path | pathlib.Path) -> bytes:
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

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, source):
    self.builder, self.split, self.source = builder, split, source
    self.kept = 0
    self.skipped: collections.Counter[str] = collections.Counter()

  def skip(self, row: str, reason: str, message: str) -> None:
    self.skipped[reason] += 1
    log_skip(f"{self.builder.name}/{self.split}", row, self.source, reason, message)

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


def log_skip(namespace: str, row: str, source, reason: str, message: str) -> None:
  logger.warning("%s: skipped row %s of %s (%s): %s", namespace, row, source, reason, message)


# ------------------------------------------------------------- one per-row build, plain or Beam
# What skips a row (each carries the `reason` it is counted under); anything else stops the build.
SKIPS = (RowError, ImageError, ConversationError)


@dataclasses.dataclass(frozen=True)
class SplitRows:
  """One split's rows, as the plain build and a Beam pipeline both read them.

  source: the file the rows come from (named in warnings).
  parts: small picklable descriptions of disjoint slices of the rows (index ranges, byte
    ranges), in order: what one Beam worker reads; the plain build reads them one after another.
  read: part -> its rows as (label naming the row in warnings, row).
  examples: row -> [(key, example)]; raises one of SKIPS to skip the row. Keys are unique in the
    split and made from the row alone (its index or line, never a running count), so both builds
    write the same records.
  `read` and `examples` must be module-level functions or functools.partial of them (with
  picklable arguments, paths as epath): Beam pickles them to its workers.
  """
  source: Any
  parts: Sequence
  read: Callable[[Any], Iterable[tuple[str, Any]]]
  examples: Callable[[Any], Iterable[tuple[Any, dict]]]


class RowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose `_split_generators` returns {split: self.split_examples(split, rows)}:
  built by the plain generator, or by Apache Beam when download_and_prepare is given a Beam
  runner or Beam options. Its `_info` must hold `metadata=tfds.core.MetadataDict()`."""

  def download_and_prepare(self, *, download_config=None, **kwargs):
    download_config = download_config or tfds.download.DownloadConfig()
    self._beam_sources = ({} if download_config.beam_runner is not None
                          or download_config.beam_options is not None else None)
    return super().download_and_prepare(download_config=download_config, **kwargs)

  @property
  def builds_with_beam(self) -> bool:
    return getattr(self, "_beam_sources", None) is not None

  def split_examples(self, split: str, rows: SplitRows):
    """What `_split_generators` returns for `split`: a generator of (key, example), or under
    Beam the PTransform that makes them."""
    if self.builds_with_beam:
      self._beam_sources[split] = rows.source
      return beam_examples(f"{self.name}/{split}", rows)
    return self._plain_examples(split, rows)

  def _plain_examples(self, split: str, rows: SplitRows):
    tally = SplitTally(self, split, rows.source)
    for part in rows.parts:
      for label, row in rows.read(part):
        try:
          examples = list(rows.examples(row))
        except SKIPS as e:
          tally.skip(label, e.reason, str(e))
          continue
        tally.kept += len(examples)
        yield from examples
    tally.finish()

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After the Beam pipeline: its counters -> info.metadata, as the plain build stores them."""
    beam = tfds.core.lazy_imports.apache_beam
    counters = pipeline_result.metrics().query(beam.metrics.MetricsFilter())["counters"]
    for split, source in self._beam_sources.items():
      tally = SplitTally(self, split, source)
      for counter in counters:
        if counter.key.metric.namespace != f"{self.name}/{split}":
          continue
        # committed: each bundle counted once even when a worker retried it
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        if name == "kept":
          tally.kept += value
        elif name.startswith("skipped/"):
          tally.skipped[name.removeprefix("skipped/")] += value
      tally.finish()


def beam_examples(namespace: str, rows: SplitRows):
  """The Beam PTransform making a split's (key, example) pairs from `rows`."""
  beam = tfds.core.lazy_imports.apache_beam
  return (beam.Create(list(rows.parts))
          | "ReadRows" >> beam.FlatMap(rows.read)
          | "Spread" >> beam.Reshuffle()     # rows of one part go to many workers
          | "Examples" >> beam.FlatMap(_counted_examples, rows.examples, namespace, rows.source))


def _counted_examples(labelled_row, examples, namespace: str, source) -> list:
  from apache_beam.metrics import Metrics
  label, row = labelled_row
  try:
    made = list(examples(row))
  except SKIPS as e:
    Metrics.counter(namespace, f"skipped/{e.reason}").inc()
    log_skip(namespace, label, source, e.reason, str(e))
    return []
  Metrics.counter(namespace, "kept").inc(len(made))
  return made


# ----------------------------------------------------------------------- parts of source files
def index_parts(count: int, per_part: int) -> list[tuple[int, int]]:
  """[start, stop) ranges covering range(count), per_part rows each."""
  return [(start, min(start + per_part, count)) for start in range(0, count, per_part)]


def load_json(path: epath.Path, name: str):
  """A JSON file's value, loaded once per process while the file is unchanged (Beam workers read
  many parts of one file); invalid JSON stops the build naming the file."""
  stat = epath.Path(path).stat()
  return _load_json(str(path), stat.mtime, stat.length, name)


@functools.lru_cache(maxsize=2)
def _load_json(path: str, mtime, length: int, name: str):
  del mtime, length   # part of the cache key only
  try:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{name}: '{path}' is not valid JSON: {e}") from None


def line_parts(path: epath.Path, lines_per_part: int | None) -> list[tuple[int, int, int | None]]:
  """(first line number, start byte, stop byte or None: the end) of consecutive blocks of
  `lines_per_part` lines of a text file (one pass over it); None: the whole file, one part."""
  if lines_per_part is None:
    return [(1, 0, None)]
  starts, offset = [], 0
  with epath.Path(path).open("rb") as file:
    for index, line in enumerate(file):
      if index % lines_per_part == 0:
        starts.append((index + 1, offset))
      offset += len(line)
  stops = [start for _, start in starts[1:]] + [None]
  return [(number, start, stop) for (number, start), stop in zip(starts, stops)]


def read_lines(path: epath.Path, part: tuple[int, int, int | None]):
  """The non-blank lines of one line_parts part, undecoded: ("line N", (N, bytes))."""
  number, start, stop = part
  with epath.Path(path).open("rb") as file:
    file.seek(start)
    offset = start
    for line in file:
      if stop is not None and offset >= stop:
        return
      offset += len(line)
      if line.strip():   # blank lines are not rows
        yield f"line {number}", (number, line)
      number += 1
