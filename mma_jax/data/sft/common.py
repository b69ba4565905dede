"""What the SFT source builders share: the task prompts, the record schema, the build loop.

Every builder reads one source's original release files under the SFT data root (manual_dir: the
`root` of the official configs/sft_datasets/*.yaml, each file at the path those configs name) and
emits the `llava_instruct` schema -- id, images (encoded bytes), image_files (relative to the
root), conversations {role, content} -- with the official INPUT as the user turn (after an
`<image>\\n` line when the sample has an image) and the official TARGET as the assistant turn. So
the pipeline reads them all with one reader (`llava_instruct_input`), and the official flavour's
layout gives the official text: `<|system|>\\n{SYS}<|end|>\\n<|user|>\\n<image>\\n{INPUT}<|end|>
\\n<|assistant|>\\n{TARGET}` between BOS and EOS.

A source row that cannot become a sample is skipped and counted by reason (builder_utils): the
reasons every source shares are malformed_row (a missing or mistyped field), missing_image_file,
undecodable_image and the layout's conversation checks (empty_answer, ...); each module names its
own. A data file that is missing or is not JSON stops the build with a message naming it.

The builders are builder_utils.RowsBuilder: the plain build reads the rows in order, and given
Beam options the same per-row functions run as an Apache Beam pipeline (parts of ROWS_PER_PART
rows; each worker loads the source file once). Keys come from the rows' labels, so both builds
write the same records. A builder defines `load_rows(root, options)` -> [(label, row)] (the
labels unique) and `samples(row, options)` -> [Sample], both static and picklable by reference.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import (RowError, RowsBuilder, SplitRows, checked_image_bytes,
                                        index_parts)
from mma_jax.data.builder_utils import load_json as cached_json
from mma_jax.data.llava_instruct import conversation_features
from mma_jax.data.pipeline import VQA_PROMPT
from mma_jax.layout import Conversation
from mma_jax.layout import _check_conversation as check_conversation   # the layout's own rules
from mma_jax.templates import IMAGE_TOKEN

# The official task prompts (sft_data_utils/templates/templates.py, template "default").
# (evaluate/prompts.py asks the same questions at evaluation: it imports these instructions.)
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."
MC_PROMPT = MC_INSTRUCTION + " {question}\nOptions:\n{options}\n"
SCIENCEQA_PROMPT = MC_INSTRUCTION + " {question}\nContext: {context}\nOptions:\n{options}\n"
VSR_PROMPT = VQA_PROMPT + " " + YES_NO_INSTRUCTION
REGION_PROMPT = "Provide a short description for this region. {bbox}"

ROWS_PER_PART = 20_000   # rows per Beam work item
NUMBER = (int, float)


def box_text(x, y, w, h, width, height) -> str:
  """A box as the official preprocess_bbox writes it: corners over the image size, 3 decimals
  (Python's float formatting, round-half-even on the binary value), not clamped."""
  corners = (x / width, y / height, (x + w) / width, (y + h) / height)
  x1, y1, x2, y2 = (f"{v:.3f}" for v in corners)
  return f"<bbox>[{x1}, {y1}][{x2}, {y2}]</bbox>"


@dataclasses.dataclass(frozen=True)
class Sample:
  """One official SFT sample: `image` is relative to the root (None: text only)."""
  id: str
  image: str | None
  input: str
  target: str


def load_json(path: epath.Path, source: str, kind: type | None = None, holds: str = ""):
  """A source's JSON file (loaded once per process); a missing or invalid file, or one whose top
  level is not of type `kind` (described by `holds`), stops the build naming it."""
  if not path.is_file():
    raise FileNotFoundError(f"{source}: '{path}' does not exist (manual_dir must be the SFT data "
                            f"root of the official configs)")
  data = cached_json(path, source)
  if kind is not None and not isinstance(data, kind):
    raise ValueError(f"{source}: '{path}' must hold {holds}")
  return data


def field(row, key: str, kind: type | tuple[type, ...]):
  """row[key] if `row` is an object holding it with the type `kind`, else RowError."""
  if not isinstance(row, dict) or key not in row:
    raise RowError("malformed_row", f"the row has no {key!r}")
  value = row[key]
  # bool is an int in Python; no field of these sources is a boolean.
  if isinstance(value, bool) or not isinstance(value, kind):
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise RowError("malformed_row", f"{key!r} must be {names}, got {value!r}")
  return value


def manual_instructions(files: tuple[str, ...]) -> str:
  return ("manual_dir is the SFT data root of the official AKI configs (configs/sft_datasets/"
          "*.yaml `root`); it must hold " + ", ".join(files) + ".")


class SftBuilder(RowsBuilder, skip_registration=True):
  """The build of the SFT sources: subclasses name their files, load and parse their rows."""

  code_path = epath.Path(__file__)   # see easy_vqa.py: avoids the missing importlib_resources
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The official AKI SFT samples from the original release files."}
  FILES: tuple[str, ...] = ()        # what it reads, relative to the root (the first: its rows)
  HOMEPAGE = ""

  @staticmethod
  def load_rows(root: epath.Path, options: Hashable) -> list[tuple[str, Any]]:
    """The source's rows in file order, each with a label naming it (unique in the source)."""
    raise NotImplementedError

  @staticmethod
  def samples(row, options: Hashable) -> list[Sample]:
    """A row's samples (none for a row of another split); raises RowError."""
    raise NotImplementedError

  def row_options(self) -> Hashable:
    """What load_rows and samples need beyond the row (the builder config's choices)."""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=conversation_features(),
        metadata=tfds.core.MetadataDict(),
        homepage=self.HOMEPAGE or None,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(epath.Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: epath.Path):
    # The files' versions: rows cached in a process are reused only while the files are unchanged.
    stamp = tuple((f.stat().mtime, f.stat().length) for f in (root / n for n in self.FILES)
                  if f.is_file())
    source = (type(self), root, self.row_options(), stamp)
    count = len(labelled_rows(*source))
    parts = index_parts(count, ROWS_PER_PART if self.builds_with_beam else max(count, 1))
    return self.split_examples("train", SplitRows(
        source=root / self.FILES[0], parts=parts,
        read=functools.partial(read_rows, source),
        examples=functools.partial(examples, source)))


Source = tuple   # (builder class, root, row_options(), the files' (mtime, size)): picklable


@functools.lru_cache(maxsize=2)   # once per process: Beam workers read many parts of a file
def labelled_rows(builder: type[SftBuilder], root: epath.Path, options, stamp) -> list:
  del stamp   # part of the cache key only
  return builder.load_rows(root, options)


def read_rows(source: Source, part: tuple[int, int]):
  """The labelled rows [start, stop) of the source: (label, (label, row))."""
  for label, row in labelled_rows(*source)[slice(*part)]:
    yield label, (label, row)


def examples(source: Source, labelled_row):
  """(label, row) -> [(key, record)]: the row's samples in the llava_instruct schema, keyed by
  the label; raises RowError, ConversationError or ImageError."""
  builder, root, options, _ = source
  label, row = labelled_row
  return [(f"{label}/{k}", record(sample, root))
          for k, sample in enumerate(builder.samples(row, options))]


@functools.lru_cache(maxsize=16)   # consecutive rows often share an image
def image_bytes(path: epath.Path) -> bytes:
  return checked_image_bytes(path)


def record(sample: Sample, root: epath.Path) -> dict:
  """A sample in the llava_instruct schema; raises what the layout or the image check raise."""
  images = [] if sample.image is None else [sample.image]
  user = (f"{IMAGE_TOKEN}\n" if images else "") + sample.input
  turns = [("user", user), ("assistant", sample.target)]
  check_conversation(Conversation(turns, num_images=len(images)), generation_prompt=False)
  return {
      "id": sample.id,
      "images": [image_bytes(root / f) for f in images],
      "image_files": images,
      "conversations": [{"role": role, "content": content} for role, content in turns],
  }
