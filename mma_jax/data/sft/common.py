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
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import RowError, SplitTally, checked_image_bytes
from mma_jax.data.images import ImageError
from mma_jax.data.pipeline import VQA_PROMPT
from mma_jax.layout import Conversation, ConversationError
from mma_jax.layout import _check_conversation as check_conversation   # the layout's own rules
from mma_jax.templates import IMAGE_TOKEN

# The official task prompts (sft_data_utils/templates/templates.py, template "default").
MC_PROMPT = ("Answer with the option's letter from the given choices directly. {question}\n"
             "Options:\n{options}\n")
SCIENCEQA_PROMPT = ("Answer with the option's letter from the given choices directly. {question}\n"
                    "Context: {context}\nOptions:\n{options}\n")
VSR_PROMPT = VQA_PROMPT + " Please answer yes or no."
REGION_PROMPT = "Provide a short description for this region. {bbox}"


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


def load_json(path: pathlib.Path, source: str, *, lines: bool = False):
  """A source's JSON file (or, with `lines`, its lines, unparsed); a missing or invalid file
  stops the build naming it."""
  if not path.is_file():
    raise FileNotFoundError(f"{source}: '{path}' does not exist (manual_dir must be the SFT data "
                            f"root of the official configs)")
  text = path.read_text(encoding="utf-8")
  if lines:
    return text.splitlines()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{source}: '{path}' is not valid JSON: {e}") from None


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


NUMBER = (int, float)

# (label naming the row in warnings, unique in the source; parse: () -> the row's samples,
# raising RowError)
Rows = Iterator[tuple[str, Callable[[], list[Sample]]]]


class SftBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The build loop of the SFT sources: subclasses name their files and parse their rows."""

  code_path = epath.Path(__file__)   # see easy_vqa.py: avoids the missing importlib_resources
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The official AKI SFT samples from the original release files."}
  FILES: tuple[str, ...] = ()        # what it reads, relative to the root (the first: its rows)
  HOMEPAGE = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_files": tfds.features.Sequence(tfds.features.Text()),
            "conversations": tfds.features.Sequence({
                "role": tfds.features.Text(),
                "content": tfds.features.Text(),
            }),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage=self.HOMEPAGE or None,
    )

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    return {"train": self._generate_examples(root)}

  def rows(self, root: pathlib.Path) -> Rows:
    raise NotImplementedError

  def _generate_examples(self, root: pathlib.Path):
    tally = SplitTally(self, "train", root / self.FILES[0])
    image_bytes = functools.lru_cache(maxsize=16)(checked_image_bytes)  # rows share images
    for label, parse in self.rows(root):
      try:
        records = [record(sample, image_bytes, root) for sample in parse()]
      except (RowError, ImageError, ConversationError) as e:
        tally.skip(label, e.reason, str(e))
        continue
      for k, item in enumerate(records):
        tally.kept += 1
        yield f"{label}/{k}", item   # keys from the rows, not a running count
    tally.finish()


def record(sample: Sample, image_bytes, root: pathlib.Path) -> dict:
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
