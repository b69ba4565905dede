"""Caption shards in the webdataset layout as a streaming, resumable grain source (pre-training).

BLIP3-Kale and BLIP3-OCR-200m, as the official AKI pre-training reads them, are tar shards whose
members are grouped into samples by KEY (the member path up to the first dot of its file name;
a sample's members are consecutive): `KEY.jpg|jpeg|png|webp` the encoded image and `KEY.txt` the
caption (what the official reader takes, stripped), or `KEY.json` holding the caption under
`caption_key` ("caption" by default). Other members (metadata, ...) are ignored. With
txt_format="blip3_ocr_200m" the `.txt` holds a JSON list and the caption is its element [1]
"text", as the official code reads BLIP3-OCR-200m.

    CaptionShards(shards, process_index=..., process_count=...)  -> grain.IterDataset of
      {"image": bytes (not decoded), "image_file": "<shard>:<KEY>", "caption": str}
      or skip records {"skip": reason, "id": "<shard>:<KEY>", "message": ...}

the records of the `image_captions` builder, so the pipeline reads both alike: it decodes the
images (an undecodable one is counted there as undecodable_image) and counts skip records under
their reason: missing_image, missing_caption, malformed_caption (a `.txt` that is not UTF-8, or
not the OCR-200m JSON), malformed_caption_json, truncated_shard (the shard
ends inside a member or header: what came before is kept, then one skip record, then the next
shard) and unreadable_shard (it cannot be opened or is not a tar). A bad shard never stops a run.

Each JAX process reads only its shards (shard i of the sorted list goes to process i % count),
opened through etils epath, so local paths and gs:// alike. Epochs repeat forever with
num_epochs=None; shuffle_shards draws a new shard order per epoch from (seed, epoch).

Resuming is exact: the state is (epoch, shard position in this process's order, byte offset of
the next sample's first header in that shard); set_state seeks there and streams on.

Why the standard library's tarfile in stream mode ("r|") and not the `webdataset` package: it
reads a shard front to back without unpacking or seeking backwards, gives each member's header
offset (the resume point), and raises on a member cut short -- everything needed here, with no
new dependency; the package's own iterators keep no seekable position to resume from. Shards are
plain (uncompressed) tars, as webdataset writes them: the images are compressed already, and a
byte offset into a compressed stream could not be seeked to.
"""
from __future__ import annotations

import json
import re
import tarfile
from typing import Iterator, Sequence

import grain
import numpy as np
from etils import epath

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TXT_FORMATS = ("plain", "blip3_ocr_200m")
_BLOCK = tarfile.BLOCKSIZE


def expand_shards(shards: str | Sequence[str]) -> list[str]:
  """Shard paths from a list of paths or patterns: a directory (its *.tar), a glob (`*`, `?`) or
  a webdataset brace range (`shard-{00000..00099}.tar`); sorted and without duplicates."""
  patterns = [shards] if isinstance(shards, (str, epath.Path)) else list(shards)
  found = set()
  for pattern in map(str, patterns):
    for name in _brace_range(pattern):
      path = epath.Path(name)
      if any(c in name for c in "*?["):
        matches = list(epath.Path(path.parent).glob(path.name))
        if not matches:
          raise FileNotFoundError(f"caption shards: no file matches '{name}'")
        found.update(str(m) for m in matches)
      elif path.is_dir():
        found.update(str(m) for m in path.glob("*.tar"))
      else:
        found.add(name)
  if not found:
    raise FileNotFoundError(f"caption shards: no shard in {patterns}")
  return sorted(found)


def _brace_range(pattern: str) -> list[str]:
  match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  width = len(first)
  names = [pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():]
           for i in range(int(first), int(last) + 1)]
  return [n for name in names for n in _brace_range(name)]


def split_key(member_name: str) -> tuple[str, str]:
  """"dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg"): the webdataset key and extension."""
  directory, _, file_name = member_name.rpartition("/")
  stem, _, extension = file_name.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


class SampleError(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def sample_record(shard_name: str, key: str, members: dict[str, bytes], caption_key: str,
                  txt_format: str = "plain") -> dict:
  """One sample's members {extension: bytes} -> a caption record; raises SampleError."""
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    raise SampleError("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member "
                      f"(members: {', '.join(sorted(members)) or 'none'})")
  if "txt" in members:
    try:
      caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      raise SampleError("malformed_caption", f"{key}.txt is not UTF-8: {e}") from None
    if txt_format == "blip3_ocr_200m":
      caption = ocr_200m_caption(key, caption)
  elif "json" in members:
    try:
      meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SampleError("malformed_caption_json", f"{key}.json is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or caption_key not in meta:
      raise SampleError("missing_caption", f"{key}.json has no '{caption_key}' field")
    caption = meta[caption_key]
    if not isinstance(caption, str):
      raise SampleError("malformed_caption_json", f"{key}.json '{caption_key}' is "
                        f"{type(caption).__name__}, not a string")
  else:
    raise SampleError("missing_caption", f"no .txt or .json member (members: "
                      f"{', '.join(sorted(members))})")
  return {"image": image, "image_file": f"{shard_name}:{key}", "caption": caption.strip()}


def ocr_200m_caption(key: str, text: str) -> str:
  """A BLIP3-OCR-200m `.txt` (a JSON list) -> its element [1]["text"], as the official reader."""
  try:
    caption = json.loads(text)[1]["text"]
  except (json.JSONDecodeError, IndexError, KeyError, TypeError) as e:
    raise SampleError("malformed_caption", f"{key}.txt is not an OCR-200m list with a [1]"
                      f"['text'] caption: {e!r}") from None
  if not isinstance(caption, str):
    raise SampleError("malformed_caption", f"{key}.txt [1]['text'] is not a string")
  return caption


def read_shard(path: str, start: int = 0, caption_key: str = "caption",
               txt_format: str = "plain") -> Iterator[tuple[dict, int | None]]:
  """(record, offset of the next sample's first header, or None after the shard's last record)
  for every sample of the tar shard at `path`, streamed from byte `start` (a sample boundary)."""
  name = epath.Path(path).name
  # Bound locally: a generator closed at interpreter exit still matches these (module globals
  # may be gone by then).
  read_errors = (tarfile.TarError, OSError)
  try:
    size = epath.Path(path).stat().length
    file = epath.Path(path).open("rb")
  except (OSError, ValueError) as e:
    yield _skip("unreadable_shard", name, "", f"cannot open shard '{path}': {e}"), None
    return
  with file:
    try:
      file.seek(start)
      tar = tarfile.open(fileobj=file, mode="r|")
    except read_errors as e:
      yield _skip("unreadable_shard", name, "", f"shard '{path}' is not a readable tar "
                  f"(compressed shards are not supported): {e}"), None
      return
    key, members, sample_start = None, {}, start
    try:
      while (member := tar.next()) is not None:
        if not member.isfile():
          continue
        member_key, extension = split_key(member.name)
        if member_key != key and key is not None:
          # The previous sample is complete; the next one starts at this member's header.
          yield _record(name, key, members, caption_key, txt_format), start + member.offset
          members, sample_start = {}, start + member.offset
        key = member_key
        members[extension] = tar.extractfile(member).read()
      # A tar ends with two zero blocks after its last member; a shorter file was cut inside a
      # header (tarfile reads that as the end).
      truncated = size < start + tar.offset + 2 * _BLOCK
      error = f"the file ends at byte {size}, inside a header"
    except read_errors as e:
      truncated, error = True, str(e)
    if truncated:
      yield _skip("truncated_shard", name, key or f"@{sample_start}",
                  f"shard '{path}' is cut short ({error}); the samples before were kept"), None
    elif key is not None:
      yield _record(name, key, members, caption_key, txt_format), None


def _record(shard_name, key, members, caption_key, txt_format) -> dict:
  try:
    return sample_record(shard_name, key, members, caption_key, txt_format)
  except SampleError as e:
    return _skip(e.reason, shard_name, key, f"shard '{shard_name}' sample '{key}': {e}")


def _skip(reason: str, shard_name: str, key: str, message: str) -> dict:
  return {"skip": reason, "id": f"{shard_name}:{key}", "message": message}


class CaptionShards(grain.IterDataset):
  """Caption records of this process's webdataset shards (see the module docstring).

  shards: paths or patterns (expand_shards), local or any epath location (gs://...).
  process_index / process_count: this JAX process's share: shard i goes to process i % count.
  num_epochs: passes over the shards (None: forever).
  shuffle_shards / seed: a new order of this process's shards every epoch, from (seed, epoch).
  caption_key: the field of a `.json` member holding the caption (when there is no `.txt`).
  txt_format: "plain" (the `.txt` is the caption) or "blip3_ocr_200m" (see the module docstring).
  """

  def __init__(self, shards: str | Sequence[str], *, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = 1, shuffle_shards: bool = False,
               seed: int = 0, caption_key: str = "caption", txt_format: str = "plain"):
    super().__init__()
    if not 0 <= process_index < process_count:
      raise ValueError(f"caption shards: process_index {process_index} is not in "
                       f"[0, {process_count})")
    if txt_format not in TXT_FORMATS:
      raise ValueError(f"caption shards: txt_format={txt_format!r} must be one of "
                       f"{', '.join(TXT_FORMATS)}")
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"caption shards: num_epochs={num_epochs} must be positive or None")
    every = expand_shards(shards)
    self.shards = every[process_index::process_count]
    if not self.shards:
      raise ValueError(f"caption shards: {len(every)} shards cannot be shared by "
                       f"{process_count} processes (process {process_index} has none)")
    self.num_epochs, self.shuffle_shards, self.seed = num_epochs, shuffle_shards, seed
    self.caption_key, self.txt_format = caption_key, txt_format

  def order(self, epoch: int) -> list[str]:
    """This process's shards in the order epoch `epoch` reads them."""
    if not self.shuffle_shards:
      return list(self.shards)
    permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
    return [self.shards[i] for i in permutation]

  def __iter__(self) -> CaptionShardIterator:
    return CaptionShardIterator(self)


class CaptionShardIterator(grain.DatasetIterator):
  """Streams CaptionShards; state {epoch, shard (position in the epoch's order), offset}."""

  def __init__(self, dataset: CaptionShards):
    super().__init__()
    self.dataset = dataset
    self.epoch, self.position, self.offset = 0, 0, 0
    self._reader = None    # the open shard's read_shard generator

  def __next__(self) -> dict:
    while True:
      if self.position == len(self.dataset.shards):
        self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
      if self.dataset.num_epochs is not None and self.epoch >= self.dataset.num_epochs:
        raise StopIteration
      if self._reader is None:
        path = self.dataset.order(self.epoch)[self.position]
        self._reader = read_shard(path, self.offset, self.dataset.caption_key,
                                  self.dataset.txt_format)
      item = next(self._reader, None)
      if item is None:     # an empty shard
        self._next_shard()
        continue
      record, next_offset = item
      if next_offset is None:
        self._next_shard()
      else:
        self.offset = next_offset
      return record

  def _next_shard(self) -> None:
    if self._reader is not None:
      self._reader.close()
    self._reader, self.position, self.offset = None, self.position + 1, 0

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "shard": self.position, "offset": self.offset}

  def set_state(self, state: dict) -> None:
    if self._reader is not None:
      self._reader.close()
    self._reader = None
    self.epoch, self.position, self.offset = state["epoch"], state["shard"], state["offset"]
