"""The grain input pipeline: data source(s) -> examples -> packed or padded rows -> batches.

    per component (one dataset, or each entry of a mixture):
      source (tfds.data_source or any len/getitem source)
        [this process's shard] -> shuffle (a new order every epoch) -> repeat
        -> MakeExample: read the record, lay out the conversation or caption, truncate or drop
           what is too long, decode + resize its images (uint8; with augment, the SFT crop +
           flip drawn from (seed, record index, epoch))            (reader threads, or worker
           processes with num_workers > 0: they see the same elements in the same order)
      or a stream: a grain IterDataset of records that shards and repeats itself (webdataset
        shards) -> MakeExample (in a background thread; a skip record of the stream's own
        passes through as it is)
    -> mixed by the components' weights with grain's own mixing (see Mixtures)
    -> RowIterator: windows of `pack_window` examples, first-fit packed into rows (or one per
       padded row); counts kept, truncated and skipped examples          (main process)
    -> BatchIterator: batch_size rows stacked into the batch contract, images normalised for
       the tower as they are copied in                                  (main process)

Batches (DESIGN.md §2), per process: tokens, positions, segment_ids, window_lo, window_hi,
targets, image_token_index int32 [B, L]; loss_mask float32 [B, L]; images float32
[B, N, H, W, 3] (N = images_per_row); image_valid bool [B, N]. The last batch of a finite run is
completed with all-padding rows (no example is dropped).

Bad data never stops a run: MakeExample turns an example it cannot use into a skip record, and
RowIterator counts it under its reason with one warning naming the example. Reasons:
malformed_row (a record that cannot be read), the layout's conversation reasons (bad_turn_order,
image_count_mismatch, ...), missing_image_file, undecodable_image, too_long (data.too_long=drop,
or no answer token fits), too_many_images (more than images_per_row), unexpected_<Error> (a bug:
counted rather than fatal). The counts are `iterator.counts` (DataCounts), logged when the data
ends, and part of the iterator state.

Mixtures: every component's records are read by its own dataset's reader and labelled with
the component's name; grain's weighted mixing interleaves them (`MapDataset.mix` when every
component is a random-access source: one reader pool, and the iterator state is one position that
fixes every component's; `IterDataset.mix` once a streamed component joins: the state holds each
component's). Grain's mixing is a deterministic weighted interleave, not a random draw: the
weights are scaled to integers (the smallest to 100) and over any stretch of draws each component
appears in proportion to its weight; what varies with data.seed is each component's own shuffle
(component k shuffles with seed + k). The official MultiDataset draws a dataset at random per
sample and a record with replacement; the frequencies are the same. A finite (eval) mixture ends
when its first component runs out. Components are packed together (the mixed stream feeds the one
RowIterator) and counted apart: `counts.components[name]` (examples, truncated, tokens, skips by
reason) beside the totals. Worker processes (num_workers) split random-access components only:
a mixture with a stream refuses them.

The iterator is a grain DatasetIterator: `get_state()` / `set_state()` (JSON-able dicts), or
orbax with `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`. A restored
iterator continues with exactly the batches the original would have produced. The state holds the
reader position at the start of the current packing window, the rows of that window already
returned and the counts then; restoring re-reads that one window.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from typing import Any, Callable

import grain
import numpy as np

from mma_jax.data.packing import (TOKEN_FIELDS, example_fields, first_fit, merge_row, num_images,
                                  truncate_answer)
from mma_jax.data.images import (NORMALIZATION, ImageError, apply_augmentation, augment_rng,
                                 draw_augmentation, normalize, resize_rgb, resizes_first)
from mma_jax.layout import ChatLayout, Conversation, ConversationError

logger = logging.getLogger(__name__)

VQA_PROMPT = "Answer the question using a single word or phrase. {question}"   # DESIGN.md §7


# ------------------------------------------------------------------------------- records -> inputs
@dataclasses.dataclass
class LayoutInput:
  """What one record asks the layout for: a conversation or a caption, and its raw images."""
  id: str
  images: list
  conversation: Conversation | None = None
  caption: str | None = None


def as_text(value) -> str:
  """tfds Text features read back as bytes; in-memory sources may hold str."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(f"expected text, got {type(value).__name__}")


def easy_vqa_input(record) -> LayoutInput:
  question = as_text(record["question"])
  conversation = Conversation(
      [("user", "<image>\n" + VQA_PROMPT.format(question=question)),
       ("assistant", as_text(record["answer"]))], num_images=1)
  return LayoutInput(f"image {int(record['image_id'])}: {question!r}", [record["image"]],
                     conversation=conversation)


def llava_instruct_input(record) -> LayoutInput:
  turns = record["conversations"]
  roles, contents = turns["role"], turns["content"]
  if len(roles) != len(contents):
    raise TypeError("conversations hold different numbers of roles and contents")
  images = list(record["images"])
  conversation = Conversation([(as_text(r), as_text(c)) for r, c in zip(roles, contents)],
                              num_images=len(images))
  return LayoutInput(as_text(record["id"]), images, conversation=conversation)


def image_captions_input(record) -> LayoutInput:
  return LayoutInput(as_text(record["image_file"]), [record["image"]],
                     caption=as_text(record["caption"]))


def _record_label(record) -> str:
  """Names a record in log lines before it is read (it may be malformed)."""
  for key in ("id", "image_file"):
    try:
      return as_text(record[key])
    except (KeyError, TypeError, IndexError):
      pass
  return "<record without an id>"


# Which reader turns a record of each dataset (the builders' features) into a layout input.
READERS: dict[str, Callable[[Any], LayoutInput]] = {
    "easy_vqa": easy_vqa_input,
    "llava_instruct": llava_instruct_input,
    "image_captions": image_captions_input,
    **dict.fromkeys(("vqav2", "gqa", "vsr", "vsr/official_split", "ocr_vqa", "aokvqa", "scienceqa",
                     "refcoco", "refcoco_plus", "refcocog", "visual_genome"), llava_instruct_input),
}


# ---------------------------------------------------------------------------- record -> example
def with_system(conversation: Conversation, system_prompt: str | None) -> Conversation:
  """The conversation under the run's system prompt (None keeps the template's default)."""
  if system_prompt is None:
    return conversation
  return dataclasses.replace(conversation, system=system_prompt)


class SkipExample(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class MakeExample(grain.transforms.Map):
  """Record -> {examples: [example dict (TOKEN_FIELDS [L], images [n, S, S, 3] uint8 resized,
  truncated, id), ...]} (one example, or one per turn with data.flavour=official) or a skip
  record {skip: reason, id, message}. Module level and picklable: worker processes receive it;
  the tokenizer and layout are built lazily in each process."""

  def __init__(self, *, dataset: str, tokenizer, template: str, mask_mode: str,
               num_image_tokens: int, max_length: int, too_long: str, images_per_row: int,
               image_size: int, system_prompt: str | None = None, flavour: str = "default"):
    self.read = READERS[dataset]
    self.system_prompt, self.flavour = system_prompt, flavour
    self.tokenizer, self.template, self.mask_mode = tokenizer, template, mask_mode
    self.num_image_tokens, self.max_length, self.too_long = num_image_tokens, max_length, too_long
    self.images_per_row, self.image_size = images_per_row, image_size
    self._layout = None
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_layout", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _layout=None, _lock=threading.Lock())

  def layout(self) -> ChatLayout:
    with self._lock:
      if self._layout is None:
        tokenizer = self.tokenizer
        if isinstance(tokenizer, str):   # a tokenizer source: "gpt2" or a local directory
          from mma_jax.data.tokenizer import load_tokenizer
          tokenizer, _ = load_tokenizer(tokenizer, self.template, self.flavour)
        self._layout = ChatLayout(self.template, tokenizer, self.num_image_tokens, self.mask_mode,
                                  self.flavour)
      return self._layout

  def map(self, record):
    if isinstance(record, dict) and "skip" in record:   # a streamed source's own skip record
      return record
    label = _record_label(record)
    try:
      try:
        item = self.read(record)
      except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise SkipExample("malformed_row", f"cannot read the record: {e!r}") from None
      label = item.id
      return {"examples": self.examples(item)}
    except (SkipExample, ConversationError, ImageError) as e:
      return {"skip": e.reason, "id": label, "message": str(e)}
    except Exception as e:  # noqa: BLE001  a long run outlives one bad example; it is counted
      return {"skip": f"unexpected_{type(e).__name__}", "id": label, "message": repr(e)}

  def examples(self, item: LayoutInput) -> list[dict]:
    layout = self.layout()
    with self._lock:   # a fast tokenizer must not be called from two threads at once
      if item.caption is not None:
        laid_out = [layout.caption(item.caption, num_images=len(item.images))]
      else:
        laid_out = layout.training_examples(with_system(item.conversation, self.system_prompt))
    return [self.fit(example, item) for example in laid_out]

  def fit(self, example, item: LayoutInput) -> dict:
    """A laid-out example cut or refused at max_length, with its images decoded and resized."""
    fields = example_fields(example)
    truncated = example.length > self.max_length
    if truncated:
      fields = (truncate_answer(fields, self.max_length)
                if self.too_long == "truncate" else None)
      if fields is None:
        how = "data.too_long=drop" if self.too_long == "drop" else "no answer token fits"
        raise SkipExample("too_long", f"{example.length} tokens exceed max_length "
                          f"{self.max_length} ({how})")
    count = num_images(fields, self.num_image_tokens)
    if count > self.images_per_row:
      raise SkipExample("too_many_images", f"{count} images exceed images_per_row "
                        f"{self.images_per_row}")
    # Resized only (uint8); BatchIterator normalises. Images of turns cut off by truncation are
    # never decoded.
    images = np.zeros((count, self.image_size, self.image_size, 3), np.uint8)
    for k in range(count):
      images[k] = resize_rgb(item.images[k], self.image_size, name=f"{item.id} image {k}",
                             resize_first=resizes_first(self.flavour, inference=False))
    return {**fields, "images": images, "truncated": truncated, "id": item.id}


def _with_index(index: int, record) -> tuple[int, Any]:
  """A source record with the index grain reads it at (its index in the source, plus the epoch
  times the source's length: grain passes the epoch down to the source)."""
  return index, record


class ReadRecord(grain.transforms.MapWithIndex):
  """(the source index grain read the record at, record) at `index` of the repeated stream ->
  MakeExample's output labelled with its component (`dataset`: the component's name), with the
  official SFT augmentation (data.augment) applied to its examples' images: one draw (crop +
  flip) per example, shared by that example's images as torchvision applies one draw to a
  sample's stacked images, from the generator of (seed, record index, epoch); the epoch is
  index // epoch_length. So every epoch crops a record anew, and a resumed run, any read_threads,
  num_workers or process count draw the same pixels for a record. A streamed component
  (num_records None) draws from (seed, its stream position, 0)."""

  def __init__(self, make_example: MakeExample, *, augment: bool, seed: int,
               num_records: int | None, epoch_length: int | None, component: str):
    self.make_example, self.augment, self.component = make_example, augment, component
    self.seed, self.num_records, self.epoch_length = seed, num_records, epoch_length

  def map_with_index(self, index: int, element):
    read_at, record = element
    out = dict(self.make_example.map(record), dataset=self.component)
    if self.augment and "examples" in out:
      if self.num_records is None:
        rng = augment_rng(self.seed, read_at, 0)
      else:
        rng = augment_rng(self.seed, read_at % self.num_records, index // self.epoch_length)
      for example in out["examples"]:
        if len(example["images"]):
          aug = draw_augmentation(example["images"].shape[1], rng)
          example["images"] = np.stack([apply_augmentation(im, aug) for im in example["images"]])
    return out


# -------------------------------------------------------------------------------------- counts
@dataclasses.dataclass
class DataCounts:
  """Examples that reached a row (of which truncated) and their tokens (text + image), skipped
  ones by reason, rows made; the same per component (`components[name]`, rows 0 there)."""
  examples: int = 0
  truncated: int = 0
  rows: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  tokens: int = 0
  components: dict = dataclasses.field(default_factory=dict)   # name -> DataCounts

  def component(self, name: str) -> DataCounts:
    if name not in self.components:
      self.components[name] = DataCounts()
    return self.components[name]

  def count_example(self, component: str, example: dict) -> None:
    for counts in (self, self.component(component)):
      counts.examples += 1
      counts.truncated += bool(example["truncated"])
      counts.tokens += len(example["tokens"])

  def count_skip(self, component: str, reason: str) -> None:
    self.skipped[reason] += 1
    self.component(component).skipped[reason] += 1

  def to_json(self) -> dict:
    return {"examples": self.examples, "truncated": self.truncated, "rows": self.rows,
            "skipped": dict(sorted(self.skipped.items())), "tokens": self.tokens,
            "components": {name: c.to_json() for name, c in sorted(self.components.items())}}

  @classmethod
  def from_json(cls, state: dict) -> DataCounts:
    # tokens and components are absent from states saved before mixtures existed
    return cls(state["examples"], state["truncated"], state["rows"],
               collections.Counter(state["skipped"]), state.get("tokens", 0),
               {name: cls.from_json(c) for name, c in state.get("components", {}).items()})

  def copy(self) -> DataCounts:
    return DataCounts.from_json(self.to_json())

  def metrics(self, prefix: str = "data/") -> dict[str, float]:
    """Flat metric values: the totals (examples, truncated, rows, tokens, skipped) and per
    component `<name>/examples`, `/truncated`, `/tokens`, `/skipped`, `/skipped/<reason>`."""
    out = {f"{prefix}{k}": float(getattr(self, k))
           for k in ("examples", "truncated", "rows", "tokens")}
    out[f"{prefix}skipped"] = float(sum(self.skipped.values()))
    for name, c in sorted(self.components.items()):
      at = f"{prefix}{name}/"
      out.update({f"{at}{k}": float(getattr(c, k)) for k in ("examples", "truncated", "tokens")})
      out[f"{at}skipped"] = float(sum(c.skipped.values()))
      out.update({f"{at}skipped/{r}": float(n) for r, n in sorted(c.skipped.items())})
    return out

  def summary(self) -> str:
    line = self._line() + f" in {self.rows} rows"
    if len(self.components) > 1:
      line += "; " + "; ".join(f"{name}: {c._line()}" for name, c in sorted(
          self.components.items()))
    return line

  def _line(self) -> str:
    skipped = sum(self.skipped.values())
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) or "none"
    return (f"{self.examples} examples ({self.truncated} truncated, {self.tokens} tokens); "
            f"{skipped} skipped ({reasons})")


# --------------------------------------------------------------------------------------- rows
class RowIterator(grain.DatasetIterator):
  """Example records -> rows (TOKEN_FIELDS [L] and the list of their examples' images).

  Reads `window` records at a time and first-fit packs the usable ones (or gives each its own
  row); rows leave in the order they were opened. The state is the parent's state at the start
  of the current window, how many of its rows were returned, and the counts then."""

  def __init__(self, parent: grain.DatasetIterator, *, packing: bool, max_length: int,
               num_image_tokens: int, images_per_row: int, image_size: int, window: int):
    super().__init__(parent)
    self.packing, self.max_length, self.window = packing, max_length, window
    self.num_image_tokens, self.images_per_row = num_image_tokens, images_per_row
    self.image_shape = (images_per_row, image_size, image_size, 3)
    self.counts = DataCounts()
    self._pending: collections.deque[list[dict]] = collections.deque()  # rows as their examples
    self._window_start = None
    self._counts_at_window_start = self.counts.copy()
    self._rows_returned = 0     # rows of the current window returned so far
    self._replay = 0            # after set_state: rows of the re-read window to pass over
    self._ended = False
    self._summarized = False

  def __next__(self) -> dict:
    while not self._pending:
      self._read_window()
    self._rows_returned += 1
    self.counts.rows += 1
    return self._make_row(self._pending.popleft())

  def _read_window(self) -> None:
    if self._ended:
      self._finish()
    self._window_start = self._parent.get_state()
    self._counts_at_window_start = self.counts.copy()
    quiet = self._replay > 0    # re-reading after a restore: these lines were logged already
    records = []
    for _ in range(self.window):
      try:
        record = next(self._parent)
      except StopIteration:
        self._ended = True
        break
      component = record.get("dataset", "")
      if "skip" in record:
        self.counts.count_skip(component, record["skip"])
        if not quiet:
          logger.warning("skipped example %s (%s): %s", record["id"], record["skip"],
                         record["message"])
        continue
      for example in record["examples"]:
        self.counts.count_example(component, example)
        if example["truncated"] and not quiet:
          logger.info("truncated example %s to max_length %d", example["id"], self.max_length)
        records.append(example)
    if self.packing:
      groups = first_fit([len(r["tokens"]) for r in records],
                                 [len(r["images"]) for r in records],
                                 self.max_length, self.images_per_row)
    else:
      groups = [[i] for i in range(len(records))]
    self._pending.extend([records[i] for i in group] for group in groups)
    for _ in range(self._replay):   # returned before the checkpoint
      self._pending.popleft()
    self.counts.rows += self._replay
    self._rows_returned, self._replay = self._replay, 0
    if self._ended and not self._pending:
      self._finish()

  def _finish(self):
    if not self._summarized:
      logger.info("data ended: %s", self.counts.summary())
      self._summarized = True
    raise StopIteration

  def _make_row(self, examples: list[dict]) -> dict:
    """The row's token fields, and its images [m, S, S, 3] in slot order (BatchIterator places
    them in the batch's N slots: copying each image once)."""
    row = merge_row(examples, self.max_length, self.num_image_tokens)
    row["images"] = [ex["images"] for ex in examples if len(ex["images"])]
    return row

  def empty_row(self) -> dict:
    return self._make_row([])

  def get_state(self) -> dict:
    if self._pending or self._replay:
      return {"window_start": self._window_start, "rows_returned": self._rows_returned,
              "counts": self._counts_at_window_start.to_json()}
    # Between windows: the next window starts at the parent's current position.
    return {"window_start": self._parent.get_state(), "rows_returned": 0,
            "counts": self.counts.to_json()}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["window_start"])
    self._window_start = state["window_start"]
    self.counts = DataCounts.from_json(state["counts"])
    self._counts_at_window_start = self.counts.copy()
    self._pending.clear()
    self._replay = self._rows_returned = state["rows_returned"]
    self._ended = self._summarized = False


# ------------------------------------------------------------------------------------ batches
def batch_shapes(config, *, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every batch-contract field the pipeline of `config` hands a step of
  `batch_size` rows (what BatchIterator stacks), for tracing programs without data."""
  data, vision = config.data, config.model.vision
  size = data.image_size or (vision.image_size if vision else 0)   # text-only: no image bytes
  length = data.max_length
  shapes = {name: ((batch_size, length), np.dtype(np.int32)) for name in TOKEN_FIELDS}
  shapes["loss_mask"] = ((batch_size, length), np.dtype(np.float32))
  shapes["images"] = ((batch_size, data.images_per_row, size, size, 3), np.dtype(np.float32))
  shapes["image_valid"] = ((batch_size, data.images_per_row), np.dtype(bool))
  return shapes


class BatchIterator(grain.DatasetIterator):
  """batch_size rows -> one batch of the batch contract; its state is the row iterator's state
  between batches. `counts` are the pipeline's example counts."""

  def __init__(self, rows: RowIterator, batch_size: int, image_norm: str):
    super().__init__(rows)
    self.batch_size, self.image_norm = batch_size, image_norm

  @property
  def counts(self) -> DataCounts:
    return self._parent.counts

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for _ in range(self.batch_size):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    if not rows:
      raise StopIteration
    rows += [self._parent.empty_row() for _ in range(self.batch_size - len(rows))]
    batch = {name: np.stack([row[name] for row in rows]) for name in TOKEN_FIELDS}
    batch["images"] = np.zeros((self.batch_size,) + self._parent.image_shape, np.float32)
    batch["image_valid"] = np.zeros(batch["images"].shape[:2], bool)
    for b, row in enumerate(rows):
      slot = 0
      for images in row["images"]:   # normalised as they are copied in: one pass
        normalize(images, self.image_norm, out=batch["images"][b, slot:slot + len(images)])
        slot += len(images)
      batch["image_valid"][b, :slot] = True
    return batch

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


# ----------------------------------------------------------------------------------- pipeline
@dataclasses.dataclass(frozen=True)
class Component:
  """One dataset of a pipeline: `name` labels its counts; `dataset` chooses the reader of its
  records (a READERS key); `source` is a len/getitem source of records (read through grain's
  random access: sharded, shuffled, repeated here) or a grain IterDataset of records that
  shards, shuffles and repeats itself (a stream); `weight` its share of a mixture."""
  name: str
  dataset: str
  source: Any
  weight: float = 1.0

  @property
  def streamed(self) -> bool:
    return isinstance(self.source, grain.IterDataset)


class DataPipeline:
  """A grain pipeline over `source` for one dataset kind, or over a mixture of `components`
  (see module docstring).

  source: tfds.data_source(...) of `dataset`, or any len/getitem source of such records.
  dataset: easy_vqa | llava_instruct | image_captions | ... (READERS: how a record is read).
  components: instead of source and dataset, several Components mixed by their weights.
  tokenizer: a tokenizer, or its source ("gpt2" or a local directory; loaded in each process).
  num_image_tokens: rows each image becomes in the LLM (the connector's output length).
  batch_size: rows per batch on this process.
  packing: first-fit several examples per row; False gives each example its own padded row.
  too_long: "truncate" (cut inside an answer) or "drop" for examples over max_length.
  images_per_row: N, the image slots of a row (an example with more is skipped).
  image_size / image_norm: the tower's input size and normalisation ("siglip" or "clip").
  seed / shuffle / num_epochs: the order (a new shuffle every epoch); num_epochs None = forever.
  pack_window: examples packed together (bigger: fuller rows, more memory, slower restore).
  num_workers: worker processes for MakeExample (0: threads of this process only; the output is
    the same either way; not with a streamed component). read_threads: reader threads per
    process.
  process_index / process_count: this JAX process's shard (default: jax.process_index/count).
  system_prompt: conversations' system prompt (None: the template's default; "": none).
  flavour: "default", or "official": the phi3 template as the official AKI code lays it out.
  augment: the official SFT image augmentation (random resized crop, scale 0.5-1, + horizontal
    flip; images.py), drawn from (seed, record index, epoch): training data only.
  """

  def __init__(self, source=None, *, dataset: str | None = None,
               components: list[Component] | None = None, tokenizer, num_image_tokens: int,
               batch_size: int, max_length: int = 256, template: str = "phi3",
               mask_mode: str = "mma", packing: bool = True, too_long: str = "truncate",
               images_per_row: int = 4, image_size: int = 384, image_norm: str = "siglip",
               seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
               pack_window: int = 128, num_workers: int = 0, read_threads: int = 8,
               process_index: int | None = None, process_count: int | None = None,
               system_prompt: str | None = None, flavour: str = "default",
               augment: bool = False):
    if components is None:
      components = [Component(dataset, dataset, source)]
    elif source is not None or dataset is not None:
      raise ValueError("data pipeline: give source and dataset, or components, not both")
    checks = {
        "components": (len(components) > 0, "at least one"),
        "too_long": (too_long in ("truncate", "drop"), "truncate or drop"),
        "image_norm": (image_norm in NORMALIZATION, f"one of {', '.join(NORMALIZATION)}"),
        "batch_size": (batch_size > 0, "positive"),
        "max_length": (max_length > 0, "positive"),
        "num_image_tokens": (num_image_tokens > 0, "positive"),
        "image_size": (image_size > 0, "positive"),
        "images_per_row": (images_per_row >= 0, "non-negative"),
        "pack_window": (pack_window > 0, "positive"),
        "num_workers": (num_workers >= 0, "non-negative"),
        "num_epochs": (num_epochs is None or num_epochs > 0, "positive or None (forever)"),
    }
    for name, (ok, allowed) in checks.items():
      if not ok:
        raise ValueError(f"data pipeline: {name}={locals()[name]!r} must be {allowed}")
    for c in components:
      where = "" if len(components) == 1 else f"component {c.name}: "
      if c.dataset not in READERS:
        raise ValueError(f"data pipeline: {where}dataset={c.dataset!r} must be one of "
                         f"{', '.join(READERS)}")
      if not c.weight > 0:
        raise ValueError(f"data pipeline: {where}weight={c.weight!r} must be positive")
    streamed = [c.name for c in components if isinstance(c.source, grain.IterDataset)]
    if num_workers and streamed:
      raise ValueError(f"data pipeline: num_workers={num_workers} cannot split the streamed "
                       f"component(s) {', '.join(streamed)} over worker processes; use "
                       "num_workers=0 (streams are read in a thread of their own)")
    if len({c.name for c in components}) < len(components):
      raise ValueError(f"data pipeline: component names {[c.name for c in components]} "
                       "must be unique")
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.components, self.batch_size, self.packing = list(components), batch_size, packing
    self.max_length, self.num_image_tokens = max_length, num_image_tokens
    self.images_per_row, self.image_size, self.image_norm = images_per_row, image_size, image_norm
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.pack_window, self.num_workers, self.read_threads = pack_window, num_workers, read_threads
    self.process_index, self.process_count = process_index, process_count
    self.augment = augment
    self.make_examples = [MakeExample(
        dataset=c.dataset, tokenizer=tokenizer, template=template, mask_mode=mask_mode,
        num_image_tokens=num_image_tokens, max_length=max_length, too_long=too_long,
        images_per_row=images_per_row, image_size=image_size, system_prompt=system_prompt,
        flavour=flavour) for c in self.components]

  @property
  def make_example(self) -> MakeExample:
    """The first component's MakeExample (the only one of a single-dataset pipeline)."""
    return self.make_examples[0]

  @property
  def source(self):
    return self.components[0].source

  @classmethod
  def from_config(cls, config, *, split: str, num_image_tokens: int, training: bool = True,
                  **overrides) -> DataPipeline:
    """The pipeline a run config asks for: `config.data` (dataset or mixture, data_dir,
    template, ...), the tower's image size and normalisation (unless data.image_size /
    data.image_norm say otherwise), the mask mode of `config.attention.mask`, and per-process
    batch rows from train.batch_size (training: shuffled, forever) or eval.batch_size (one
    ordered pass). With data.mixture, `split` is each entry's split (training) or eval split
    (data/mixture.py; a `split` other than data.train_split / data.eval_split overrides them
    all)."""
    import jax
    import tensorflow_datasets as tfds   # (the builders are registered: this is mma_jax.data)
    data, vision = config.data, config.model.vision
    if vision is None and not (data.image_size and data.image_norm != "auto"):
      raise ValueError("data: a text-only model config needs data.image_size and data.image_norm")
    global_batch = config.train.batch_size if training else config.eval.batch_size
    if global_batch % jax.process_count():
      raise ValueError(f"batch size {global_batch} does not divide over "
                       f"{jax.process_count()} processes")
    kwargs = dict(
        tokenizer=data.tokenizer, num_image_tokens=num_image_tokens,
        batch_size=global_batch // jax.process_count(), max_length=data.max_length,
        template=data.template, mask_mode=config.attention.mask, packing=data.packing,
        too_long=data.too_long, images_per_row=data.images_per_row,
        image_size=data.image_size or vision.image_size,
        image_norm=vision.family if data.image_norm == "auto" else data.image_norm,
        seed=data.seed, shuffle=training, num_epochs=None if training else 1,
        pack_window=data.pack_window, num_workers=data.num_workers,
        read_threads=data.read_threads, system_prompt=data.system_prompt, flavour=data.flavour,
        augment=data.augment and training)
    kwargs.update(overrides)
    if data.mixture:
      from mma_jax.data.mixture import open_components
      default = data.train_split if training else data.eval_split
      components = open_components(
          data, training=training, split=None if split == default else split,
          process_index=kwargs.get("process_index", jax.process_index()),
          process_count=kwargs.get("process_count", jax.process_count()))
      return cls(components=components, **kwargs)
    from mma_jax.data.mixture import resolve
    source = tfds.data_source(data.dataset, split=split,
                              data_dir=resolve(data.root, data.data_dir) or None)
    return cls(source, dataset=data.dataset, **kwargs)

  def _component_records(self, k: int) -> grain.MapDataset | grain.IterDataset:
    """Component k's example (or skip) records, labelled with its name: this process's shard,
    shuffled with seed + k, repeated (a stream shards, shuffles and repeats itself)."""
    component, make_example = self.components[k], self.make_examples[k]
    if component.streamed:   # read and laid out in a background thread, ahead of the packer
      records = component.source.map_with_index(_with_index).map_with_index(ReadRecord(
          make_example, augment=self.augment, seed=self.seed + k, num_records=None,
          epoch_length=None, component=component.name))
      return grain.experimental.ThreadPrefetchIterDataset(
          records, prefetch_buffer_size=self.pack_window)
    ds = grain.MapDataset.source(component.source).map_with_index(_with_index)
    per_process = len(ds) // self.process_count   # equal shards: every process makes as many
    where = f" of {component.name}" if len(self.components) > 1 else ""
    if per_process == 0:
      raise ValueError(f"data: {len(ds)} records{where} cannot be shared by "
                       f"{self.process_count} processes")
    left_out = len(ds) - per_process * self.process_count
    if left_out:
      logger.warning("data: the last %d of %d records%s are left out so that %d processes "
                     "read %d each", left_out, len(ds), where, self.process_count, per_process)
    ds = ds[self.process_index:per_process * self.process_count:self.process_count]
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed + k)
    return ds.repeat(self.num_epochs).map_with_index(ReadRecord(
        make_example, augment=self.augment, seed=self.seed + k,
        num_records=len(component.source), epoch_length=per_process,
        component=component.name))

  def examples(self) -> grain.IterDataset:
    """Example (or skip) records of this process's shard, in order, before packing; each
    carries its component's name as `dataset`."""
    parts = [self._component_records(k) for k in range(len(self.components))]
    weights = [c.weight for c in self.components]
    options = grain.ReadOptions(num_threads=self.read_threads,
                                prefetch_buffer_size=self.pack_window)
    if all(isinstance(p, grain.MapDataset) for p in parts):
      mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
      records = mixed.to_iter_dataset(options)
    else:   # a stream joins: each random-access component reads ahead by its share
      total = sum(weights)
      parts = [p if isinstance(p, grain.IterDataset) else p.to_iter_dataset(grain.ReadOptions(
                   num_threads=max(1, round(self.read_threads * w / total)),
                   prefetch_buffer_size=max(1, math.ceil(self.pack_window * w / total))))
               for p, w in zip(parts, weights)]
      records = grain.IterDataset.mix(parts, weights)
    if self.num_workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()   # grain reads absl flags in its worker processes
      records = records.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return records

  def __iter__(self) -> BatchIterator:
    rows = RowIterator(iter(self.examples()), packing=self.packing, max_length=self.max_length,
                       num_image_tokens=self.num_image_tokens,
                       images_per_row=self.images_per_row, image_size=self.image_size,
                       window=self.pack_window)
    return BatchIterator(rows, self.batch_size, self.image_norm)
