"""`vsr`: Visual Spatial Reasoning captions turned into yes/no questions (the official VSRDataset).

File vsr/train-random.jsonl under the SFT data root (manual_dir), one caption a line; the image
folder comes from the row's `image_link`: train2017 -> A-OKVQA/train2017/, val2017 ->
vsr/val2017/ (the official config's image_path_train / image_path_val). INPUT `Answer the question
using a single word or phrase. {question} Please answer yes or no.`, TARGET `yes` (label 1) or
`no`; id: the line number.

The question is the caption split at "is", each part lower-cased with "." -> "?", stripped, and
joined after "Is ": "The cat is on the mat." -> "Is the cat on the mat?". The official code splits
at every "is", inside words too ("The dish is ..." -> "Is the d h ..."). Builder configs:
  vsr/fixed           (the default, `vsr`) splits at the first whole word "is" only
  vsr/official_split  the official `caption.split("is")`, for runs that reproduce the official data
They differ only on captions with "is" inside a word or more than one whole-word "is".
Own skip reasons: unknown_image_folder (an image_link outside train2017/val2017), malformed_row
(also for a line that is not JSON).
"""
from __future__ import annotations

import json
import re

import tensorflow_datasets as tfds
from etils import epath

from mma_jax.data.builder_utils import RowError
from mma_jax.data.sft.common import (VSR_PROMPT, Sample, SftBuilder, field, manual_instructions)

IMAGE_FOLDERS = {"train2017": "A-OKVQA/train2017", "val2017": "vsr/val2017"}
_WORD_IS = re.compile(r"\bis\b")


def question(caption: str, official_split: bool = False) -> str:
  """The yes/no question VSR asks about a caption (module docstring)."""
  parts = caption.split("is") if official_split else _WORD_IS.split(caption, maxsplit=1)
  return "Is " + " ".join(p.lower().replace(".", "?").strip() for p in parts)


class VsrConfig(tfds.core.BuilderConfig):
  def __init__(self, *, official_split: bool, **kwargs):
    super().__init__(**kwargs)
    self.official_split = official_split


class Vsr(SftBuilder):
  """VSR (random split) train captions as yes/no questions."""

  name = "vsr"
  FILES = ("vsr/train-random.jsonl", "A-OKVQA/train2017/", "vsr/val2017/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://github.com/cambridgeltl/visual-spatial-reasoning"
  BUILDER_CONFIGS = [
      VsrConfig(name="fixed", official_split=False,
                description="Questions split at the first whole word 'is' (the default)."),
      VsrConfig(name="official_split", official_split=True,
                description="Questions split as the official code does: at every 'is'."),
  ]

  def row_options(self) -> bool:
    return self.builder_config.official_split

  @staticmethod
  def load_rows(root: epath.Path, options):
    path = root / Vsr.FILES[0]
    if not path.is_file():
      raise FileNotFoundError(f"vsr: '{path}' does not exist (manual_dir must be the SFT data "
                              f"root of the official configs)")
    lines = path.read_text(encoding="utf-8").splitlines()
    # blank lines are not rows
    return [(f"line {n}", (n, line)) for n, line in enumerate(lines, 1) if line.strip()]

  @staticmethod
  def samples(row, official_split: bool) -> list[Sample]:
    number, line = row
    try:
      caption_row = json.loads(line)
    except json.JSONDecodeError as e:
      raise RowError("malformed_row", f"not valid JSON: {e}") from None
    link = field(caption_row, "image_link", str).split("/")
    folder = link[-2] if len(link) >= 2 else ""
    if folder not in IMAGE_FOLDERS:
      raise RowError("unknown_image_folder", f"image_link {caption_row['image_link']!r} is in "
                     f"neither {' nor '.join(IMAGE_FOLDERS)}")
    label = field(caption_row, "label", int)
    if label not in (0, 1):
      raise RowError("malformed_row", f"'label' must be 0 or 1, got {label!r}")
    text = question(field(caption_row, "caption", str), official_split)
    return [Sample(str(number), f"{IMAGE_FOLDERS[folder]}/{link[-1]}",
                   VSR_PROMPT.format(question=text), "yes" if label == 1 else "no")]
