"""Multiple-choice sources of the official AKI SFT mixture: `aokvqa`, `scienceqa`.

INPUT `Answer with the option's letter from the given choices directly. {question}\\n`
[`Context: {hint, or N/A}\\n` for ScienceQA] `Options:\\nA. ..\\nB. ..\\n`, TARGET the letter of the
correct option, as the official AOKVQADataset and ScienceQADataset with the "default" template.
The options are shuffled per example with a seeded copy (options.py), not the official in-place
shuffle. Files, under the SFT data root (manual_dir):

  aokvqa     A-OKVQA/aokvqa_v1p0_train.json (a list), images A-OKVQA/train2017/{image_id:012}.jpg;
             rows of split "train"; id: the question_id.
  scienceqa  ScienceQA/problems.json ({pid: problem}; pid_splits.json is not read), rows of split
             "train" (the others are not train rows, not skips), image
             ScienceQA/images/train/{pid}/{image} when `image` is set, else a text-only sample
             (no `<image>` line); id: the pid.
Own skip reason: bad_answer_index (the correct option's index is not one of the options).
"""
from __future__ import annotations

from etils import epath

from mma_jax.data.builder_utils import RowError
from mma_jax.data.sft.common import (MC_PROMPT, SCIENCEQA_PROMPT, Sample, SftBuilder, field,
                                     load_json, manual_instructions)
from mma_jax.data.sft.options import option_order, options_text


def shuffled_options(dataset: str, example_id: str, options: list, answer: int) -> tuple[str, str]:
  """(the option lines, the answer letter) of an example, its options in their seeded order."""
  if not options or not all(isinstance(o, str) for o in options):
    raise RowError("malformed_row", f"the choices must be a non-empty list of strings, got "
                   f"{options!r}")
  if not 0 <= answer < len(options):
    raise RowError("bad_answer_index", f"the answer index {answer} is not one of the "
                   f"{len(options)} choices")
  return options_text(options, answer, option_order(dataset, example_id, len(options)))


class Aokvqa(SftBuilder):
  """A-OKVQA train questions as multiple choice (the official AOKVQADataset)."""

  name = "aokvqa"
  FILES = ("A-OKVQA/aokvqa_v1p0_train.json", "A-OKVQA/train2017/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://allenai.org/project/a-okvqa"

  @staticmethod
  def load_rows(root: epath.Path, options):
    path = root / Aokvqa.FILES[0]
    rows = load_json(path, Aokvqa.name, list, "a JSON list of questions")
    return [(f"{index} (question_id "
             f"{row.get('question_id') if isinstance(row, dict) else None!r})", row)
            for index, row in enumerate(rows)]

  @staticmethod
  def samples(row, options) -> list[Sample]:
    if field(row, "split", str) != "train":
      return []
    example_id = field(row, "question_id", str)
    option_lines, letter = shuffled_options("aokvqa", example_id, field(row, "choices", list),
                                            field(row, "correct_choice_idx", int))
    image = f"A-OKVQA/train2017/{field(row, 'image_id', int):012}.jpg"
    text = MC_PROMPT.format(question=field(row, "question", str), options=option_lines)
    return [Sample(example_id, image, text, letter)]


class Scienceqa(SftBuilder):
  """ScienceQA train problems as multiple choice with their context (the official
  ScienceQADataset); problems without an image are text-only samples."""

  name = "scienceqa"
  FILES = ("ScienceQA/problems.json", "ScienceQA/images/train/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://scienceqa.github.io/"

  @staticmethod
  def load_rows(root: epath.Path, options):
    path = root / Scienceqa.FILES[0]
    problems = load_json(path, Scienceqa.name, dict, "an object {pid: problem}")
    return [(f"pid {pid!r}", (pid, problem)) for pid, problem in problems.items()]

  @staticmethod
  def samples(row, options) -> list[Sample]:
    pid, problem = row
    if field(problem, "split", str) != "train":
      return []
    image = field(problem, "image", (str, type(None)))
    option_lines, letter = shuffled_options("scienceqa", pid, field(problem, "choices", list),
                                            field(problem, "answer", int))
    context = field(problem, "hint", str) or "N/A"
    text = SCIENCEQA_PROMPT.format(question=field(problem, "question", str), context=context,
                                   options=option_lines)
    image_file = None if image is None else f"ScienceQA/images/train/{pid}/{image}"
    return [Sample(pid, image_file, text, letter)]
