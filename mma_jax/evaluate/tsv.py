"""Benchmarks in VLMEvalKit's TSV format (MMBench, SEED-Bench, ScienceQA, RealWorldQA, CV-Bench,
MME, POPE, short-answer VQA sets).

Columns: `index`, `question`, `answer`, the options `A`, `B`, ..., the image as base64 `image`
or as `image_path`, and optionally `hint`, `category`, `l2-category`, `split`. As VLMEvalKit
reads them (with pandas), a cell pandas takes for missing -- empty, "nan", "None", "NA", "N/A",
"null", ...: PANDAS_MISSING -- is an absent option (likewise an absent hint, prompt or image).
As in VLMEvalKit, an `image` cell of at most 64 characters that names another row's index stands
for that row's image (files store a repeated image once), and a cell holding a Python list
literal holds several images.

The task is read from the file: options present -> multiple choice; every answer yes or no ->
yes/no; otherwise short-answer VQA. A row that cannot be used (a missing cell, an image that
does not decode, an answer that is not among its options) is skipped with a warning naming the
file and the row's index, and kept in `Benchmark.skipped` for the report.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import hashlib
import io
import logging
import pathlib
import string
import sys

from PIL import Image

from mma_jax.data.images import ImageError
from mma_jax.evaluate import vqa

logger = logging.getLogger(__name__)

TASKS = ("multiple_choice", "yes_no", "vqa")
# Cells VLMEvalKit sees as missing: it reads files with pandas, whose default missing-value
# spellings (read_csv's na_values, pandas >= 2) these are; matched case-sensitively ("none" and
# "Null" are text), on the cell as stripped here (pandas would keep a padded " NA").
PANDAS_MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_REFERENCE_MAX = 64                              # VLMEvalKit: a shorter image cell is an index


class BenchmarkError(ValueError):
  """A benchmark file that cannot be read at all (missing, no header, required columns absent)."""


@dataclasses.dataclass
class Question:
  index: str                       # the file's `index` cell (the row number when it has none)
  row: int                         # data row, 1-based (the header is row 0)
  question: str
  answers: list[str]               # gold: the option letter, "yes"/"no", or accepted answers
  images: list                     # encoded bytes or file paths
  image_key: str                   # same image -> same key (MME pairs questions by image)
  options: dict[str, str] = dataclasses.field(default_factory=dict)   # letter -> text
  hint: str = ""
  category: str = ""
  l2_category: str = ""
  split: str = ""
  prompt: str = ""                 # a ready-made prompt cell (CV-Bench's `prompt` column)


@dataclasses.dataclass
class Skipped:
  index: str
  row: int
  reason: str                      # missing_column, undecodable_image, missing_image_file, ...
  message: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Benchmark:
  name: str
  path: pathlib.Path
  task: str
  questions: list[Question]
  skipped: list[Skipped]


class _RowError(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def read_tsv(path: str | pathlib.Path, task: str | None = None) -> Benchmark:
  """Reads a VLMEvalKit TSV; `task` (one of TASKS) overrides the detected task."""
  path = pathlib.Path(path)
  header, rows = _read_rows(path)
  if "question" not in header or "answer" not in header:
    raise BenchmarkError(f"benchmark file '{path}' has no "
                         f"{'question' if 'question' not in header else 'answer'} column "
                         f"(columns: {', '.join(header)})")
  if "image" not in header and "image_path" not in header:
    raise BenchmarkError(f"benchmark file '{path}' has neither an image nor an image_path column")
  letters = _option_columns(header)
  task = task or detect_task(rows, letters)
  if task not in TASKS:
    raise BenchmarkError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")

  # Rows by index, so that image cells can refer to them.
  by_index = {}
  for number, cells in rows:
    if "index" in cells and cells["index"] not in by_index:
      by_index[cells["index"]] = cells.get("image", "")
  images = _ImageCells(path.parent, by_index)

  questions, skipped = [], []
  for number, cells in rows:
    index = cells.get("index") or str(number)
    try:
      if cells.get("_missing"):
        raise _RowError("missing_column", f"the row has no {', '.join(cells['_missing'])} cell "
                        f"({len(header) - len(cells['_missing'])} of {len(header)} fields)")
      questions.append(_question(cells, index, number, task, letters, images))
    except (_RowError, ImageError) as e:
      skip = Skipped(index, number, e.reason, str(e))
      logger.warning("%s: skipping row index %s (%s): %s", path, index, skip.reason, skip.message)
      skipped.append(skip)
  return Benchmark(path.stem, path, task, questions, skipped)


def _read_rows(path: pathlib.Path) -> tuple[list[str], list[tuple[int, dict]]]:
  """The header and, per data row, its 1-based number and {column: cell}; a short row lists the
  columns it lacks under `_missing`."""
  csv.field_size_limit(sys.maxsize)       # base64 images are far longer than csv's default
  try:
    with open(path, newline="", encoding="utf-8") as f:
      table = list(csv.reader(f, delimiter="\t"))
  except FileNotFoundError:
    raise BenchmarkError(f"benchmark file '{path}' does not exist") from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise BenchmarkError(f"benchmark file '{path}' cannot be read: {e}") from None
  if not table:
    raise BenchmarkError(f"benchmark file '{path}' is empty")
  header = [name.strip() for name in table[0]]
  rows = []
  for number, fields in enumerate(table[1:], start=1):
    if not any(f.strip() for f in fields):
      continue                                            # blank line
    cells = {name: field.strip() for name, field in zip(header, fields)}
    if len(fields) < len(header):
      cells["_missing"] = header[len(fields):]
    rows.append((number, cells))
  return header, rows


def _option_columns(header: list[str]) -> list[str]:
  """Option columns A, B, C, ... as far as they run consecutively."""
  letters = []
  for letter in string.ascii_uppercase:
    if letter not in header:
      break
    letters.append(letter)
  return letters


def _present(cell: str | None) -> bool:
  return cell is not None and cell not in PANDAS_MISSING


def detect_task(rows, letters: list[str]) -> str:
  if letters and any(_present(cells.get("A")) for _, cells in rows):
    return "multiple_choice"
  answers = [cells.get("answer", "").lower() for _, cells in rows if cells.get("answer")]
  if answers and all(a in ("yes", "no") for a in answers):
    return "yes_no"
  return "vqa"


def _question(cells: dict, index: str, number: int, task: str, letters: list[str],
              images: _ImageCells) -> Question:
  question = cells.get("question", "")
  if not question:
    raise _RowError("missing_column", "the question cell is empty")
  answer = cells.get("answer", "")
  if not answer:
    raise _RowError("missing_column", "the answer cell is empty")
  options = {}
  if task == "multiple_choice":
    options = {l: cells[l] for l in letters if _present(cells.get(l))}
    if len(options) < 2:
      raise _RowError("too_few_options", f"the row has {len(options)} option(s)")
    answers = [_option_letter(answer, options)]
  elif task == "yes_no":
    if answer.lower() not in ("yes", "no"):
      raise _RowError("answer_not_yes_no", f"the answer {answer!r} is neither yes nor no")
    answers = [answer.lower()]
  else:
    answers = vqa.answers_from_cell(answer)
    if not answers or not all(isinstance(a, str) for a in answers):
      raise _RowError("answer_not_text", f"the answer cell {answer!r} is not text or a list of "
                      "texts")
  loaded, key = images.load(cells, index)
  return Question(index=index, row=number, question=question, answers=answers, images=loaded,
                  image_key=key, options=options,
                  hint=cells["hint"] if _present(cells.get("hint")) else "",
                  category=cells.get("category", ""), l2_category=cells.get("l2-category", ""),
                  split=cells.get("split", ""),
                  prompt=cells["prompt"] if _present(cells.get("prompt")) else "")


def _option_letter(answer: str, options: dict[str, str]) -> str:
  """The gold letter: the answer cell names a letter, or (some files) the option's text."""
  letter = answer.strip().strip("().").upper()
  if letter in options:
    return letter
  by_text = [l for l, text in options.items() if text.strip() == answer.strip()]
  if len(by_text) == 1:
    return by_text[0]
  raise _RowError("answer_not_in_options",
                  f"the answer {answer!r} is not among the options {', '.join(options)}")


def _cell_list(cell: str) -> list[str]:
  """A cell holding a list literal of strings (several answers, images or paths) -> that list;
  any other cell -> [cell]."""
  if cell.startswith("["):
    try:
      value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
      return [cell]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      return value
  return [cell]


class _ImageCells:
  """Resolves a row's images: paths (relative to the file) or base64, following index
  references; decoded bytes are shared between the rows that use the same image."""

  def __init__(self, directory: pathlib.Path, by_index: dict[str, str]):
    self.directory = directory
    self.by_index = by_index
    self._decoded: dict[str, bytes] = {}

  def load(self, cells: dict, index: str) -> tuple[list, str]:
    """(images, key). The key is the image_path cell when there is one (MME pairs its questions
    by it, and some files hold both columns), else a hash of the image data."""
    path_cell = cells.get("image_path") if _present(cells.get("image_path")) else None
    cell = cells.get("image", "")
    if not _present(cell):
      if path_cell is None:
        raise _RowError("missing_column", "the row has neither an image nor an image_path cell")
      return [self._path(p) for p in _cell_list(path_cell)], path_cell
    # A short cell naming another row stands for that row's image.
    if len(cell) <= _REFERENCE_MAX and cell in self.by_index and cell != index:
      source = self.by_index[cell]
      if len(source) <= _REFERENCE_MAX:
        raise _RowError("undecodable_image", f"the image cell refers to row index {cell}, "
                        "which holds no image")
      cell = source
    elif len(cell) <= _REFERENCE_MAX:
      raise _RowError("undecodable_image", f"the image cell {cell!r} is neither an image nor "
                      "the index of another row")
    encoded = _cell_list(cell)
    data = [self._decode(e) for e in encoded]
    return data, path_cell or "|".join(hashlib.sha1(e.encode()).hexdigest() for e in encoded)

  def _path(self, text: str) -> pathlib.Path:
    path = pathlib.Path(text)
    path = path if path.is_absolute() else self.directory / path
    if not path.is_file():
      raise ImageError("missing_image_file", f"image file '{path}' does not exist")
    return path

  def _decode(self, encoded: str) -> bytes:
    key = hashlib.sha1(encoded.encode()).hexdigest()
    if key in self._decoded:
      return self._decoded[key]
    try:
      data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ImageError("undecodable_image", f"the image cell is not base64 ({e})") from None
    try:   # the header names a known format: cheap; full decoding happens per batch
      with Image.open(io.BytesIO(data)) as image:
        image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
      raise ImageError("undecodable_image", f"the image cell's {len(data)} bytes are not an "
                       "image PIL can read") from None
    self._decoded[key] = data
    return data
