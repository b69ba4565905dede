"""`data.mixture` -> the components of a mixed pipeline: paths resolved, datasets built, sources
opened.

A mixture is a list of entries (config.MixtureEntry): `{dataset, weight, name, split,
eval_split, data_dir, manual_dir}`, or `{dataset: webdataset, weight, shards, caption_key}` for
caption tar shards streamed by webdataset.CaptionShards. Relative paths resolve under `data.root`, so one
override moves every path. An entry whose tfds dataset is not built in its data_dir is built
there from its manual_dir (the original release files) before it is read, with a log line naming
both (the build runs in every process that finds it missing: on a pod, build once beforehand
with `python -c "from mma_jax.data.builder_utils import prepare; prepare(NAME, DATA_DIR,
MANUAL_DIR)"` or one process's run). Problems an entry can have (a missing directory, a dataset
neither built nor buildable, a split the built dataset lacks) raise one error naming the entry.

How the components are drawn, packed and counted is pipeline.py's part: grain's own weighted
mixing (`MapDataset.mix`, or `IterDataset.mix` once a streamed component joins), one RowIterator
packing across components, DataCounts per component.
"""
from __future__ import annotations

import logging
import pathlib

from mma_jax.data.pipeline import READERS, Component

logger = logging.getLogger(__name__)

STREAMED = {"webdataset": "image_captions"}   # streamed kinds -> the reader of their records


class MixtureError(ValueError):
  """An entry of data.mixture that cannot be read; the message names it."""


def resolve(root: str, path: str) -> str:
  """`path` under `root` when it is relative (and root is set); "" stays ""."""
  if not path or not root or pathlib.PurePath(path).is_absolute() or "://" in path:
    return path
  return str(pathlib.Path(root) / path)


def reader_of(dataset: str) -> str:
  """The READERS key of a dataset: itself, its builder's name without `/config` or `:version`,
  or the reader of a streamed kind."""
  if dataset in STREAMED:
    return STREAMED[dataset]
  return dataset if dataset in READERS else dataset.split("/")[0].split(":")[0]


def _split_names(split: str) -> list[str]:
  """The split names a tfds split string reads: "train[:90%]+validation" -> train, validation."""
  return [part.split("[")[0].strip() for part in split.split("+")]


class Entry:
  """One entry with its paths resolved and its defaults filled in."""

  def __init__(self, index: int, entry, data):
    self.index, self.dataset, self.weight = index, entry.dataset, entry.weight
    self.name = entry.component_name   # its label in counts, metrics and previews
    self.label = f"data.mixture[{index}] ({self.name})"
    self.split = entry.split or data.train_split
    self.eval_split = entry.eval_split or data.eval_split
    self.data_dir = resolve(data.root, entry.data_dir or data.data_dir)
    self.manual_dir = resolve(data.root, entry.manual_dir)
    self.shards = [resolve(data.root, s) for s in entry.shards]
    self.caption_key = entry.caption_key

  def error(self, message: str) -> MixtureError:
    return MixtureError(f"{self.label}: {message}")

  def builder(self):
    import tensorflow_datasets as tfds
    import mma_jax.data  # noqa: F401  registers the builders
    try:
      return tfds.builder(self.dataset, data_dir=self.data_dir or None)
    except Exception as e:  # noqa: BLE001  tfds raises several kinds for an unknown name
      raise self.error(f"no tfds builder {self.dataset!r}: {e}") from None

  def ensure_built(self):
    """The entry's builder, built from manual_dir first when it is not built yet."""
    from mma_jax.data.builder_utils import PACKAGED, prepare, prepare_packaged
    if self.manual_dir and not pathlib.Path(self.manual_dir).is_dir():
      raise self.error(f"manual_dir '{self.manual_dir}' is not a directory")
    if self.data_dir and not self.manual_dir and not pathlib.Path(self.data_dir).is_dir():
      raise self.error(f"data_dir '{self.data_dir}' is not a directory")
    builder = self.builder()
    if builder.is_prepared():
      return builder
    if self.manual_dir:
      logger.info("%s: building %s from %s into %s (once)", self.label, self.dataset,
                  self.manual_dir, builder.data_dir)
      try:
        prepare(self.dataset, self.data_dir or builder.data_dir_root, self.manual_dir)
      except (FileNotFoundError, ValueError) as e:
        raise self.error(f"building from manual_dir '{self.manual_dir}' failed: {e}") from None
    elif self.dataset.split("/")[0] in PACKAGED:
      prepare_packaged(self.dataset, self.data_dir)
    else:
      raise self.error(f"{self.dataset} is not built in {builder.data_dir} and the entry has "
                       "no manual_dir to build it from")
    return self.builder()

  def has_split(self, builder, split: str) -> bool:
    return all(name in builder.info.splits for name in _split_names(split))

  def open(self, split: str, *, process_index: int, process_count: int, seed: int,
           shuffle: bool, num_epochs: int | None) -> Component:
    if self.dataset in STREAMED:
      return Component(self.name, reader_of(self.dataset), self._stream(
          process_index=process_index, process_count=process_count, seed=seed, shuffle=shuffle,
          num_epochs=num_epochs), self.weight)
    import tensorflow_datasets as tfds
    builder = self.ensure_built()
    if not self.has_split(builder, split):
      raise self.error(f"split {split!r} is not in {builder.data_dir} (it has: "
                       f"{', '.join(builder.info.splits) or 'none'})")
    source = tfds.data_source(self.dataset, split=split, data_dir=self.data_dir or None,
                              download=False)
    return Component(self.name, reader_of(self.dataset), source, self.weight)

  def _stream(self, *, process_index: int, process_count: int, seed: int, shuffle: bool,
              num_epochs: int | None):
    """A grain IterDataset of caption records (or skip records) from the entry's tar shards:
    this process's shards, a new shard order every epoch when training."""
    from mma_jax.data.webdataset import CaptionShards
    try:
      return CaptionShards(self.shards, process_index=process_index,
                           process_count=process_count, num_epochs=num_epochs,
                           shuffle_shards=shuffle, seed=seed,
                           caption_key=self.caption_key or "caption")
    except (FileNotFoundError, ValueError) as e:
      raise self.error(str(e)) from None


def entries(data) -> list[Entry]:
  return [Entry(i, entry, data) for i, entry in enumerate(data.mixture)]


def open_components(data, *, training: bool, process_index: int, process_count: int,
                    split: str | None = None) -> list[Component]:
  """The components of `data.mixture` on each entry's training split (training) or eval split
  (otherwise; entries whose built dataset lacks it are left out with a warning, and so are
  streamed ones: their shards have no splits, they are training data). `split` overrides every
  entry's split."""
  components, left_out = [], []
  for entry in entries(data):
    chosen = split or (entry.split if training else entry.eval_split)
    if not training and not split and (entry.dataset in STREAMED or
                                       not entry.has_split(entry.ensure_built(), chosen)):
      left_out.append(entry)
      continue
    components.append(entry.open(chosen, process_index=process_index,
                                 process_count=process_count, seed=data.seed, shuffle=training,
                                 num_epochs=None if training else 1))
  for entry in left_out:
    logger.warning("%s: no %r split; left out of the held-out mixture", entry.label,
                   entry.eval_split)
  if not components:
    raise MixtureError(f"data.mixture: no entry has its eval split ("
                       f"{', '.join(repr(e.eval_split) for e in left_out)})")
  return components
