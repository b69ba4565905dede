"""Prediction files: the ones eval.py writes (predictions.jsonl, appended batch by batch so that a
killed eval resumes), and VLMEvalKit's (.xlsx / .tsv / .csv with `index` and `prediction`
columns), which `python -m mma_jax.evaluate.score` scores without a model.

VLMEvalKit reads its files with pandas and scores `str(cell)`. So that the same file gives the
same numbers, cells are read here as pandas reads them: a cell spelling a missing value ("",
"NA", "N/A", "None", "null", "nan", ...) is NaN and scores as the text "nan"; a column whose
cells are all numbers is numeric (int when every cell is an integer and none is missing, else
float: "5" then scores as "5.0"); any other column keeps its text as written.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import sys

from mma_jax.evaluate.tsv import PANDAS_MISSING

_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|Inf|INF)")
FORMATS = (".jsonl", ".xlsx", ".tsv", ".csv")


class PredictionsError(ValueError):
  """A prediction file that cannot be used (missing, unreadable, no index/prediction column)."""


def as_pandas_reads(cells: list) -> list[str]:
  """A column's cells (str, int, float or None) -> str() of what pandas makes of them."""
  values = [None if c is None or (isinstance(c, str) and c in PANDAS_MISSING) else c
            for c in cells]
  present = [v for v in values if v is not None]
  texts = [v if isinstance(v, str) else repr(v) for v in present]
  if present and all(_INTEGER.fullmatch(t) for t in texts) and len(present) == len(values):
    return [str(int(t)) for t in texts]
  if present and all(_INTEGER.fullmatch(t) or _FLOAT.fullmatch(t) for t in texts):
    return ["nan" if v is None else repr(float(v)) for v in values]
  return ["nan" if v is None else str(v) for v in values]


def read_predictions(path: str | pathlib.Path) -> dict[str, str]:
  """{index: prediction text} from our predictions.jsonl or a VLMEvalKit prediction file."""
  path = pathlib.Path(path)
  if path.suffix.lower() not in FORMATS:
    raise PredictionsError(f"prediction file '{path}' is not one of {', '.join(FORMATS)}")
  if not path.is_file():
    raise PredictionsError(f"prediction file '{path}' does not exist")
  if path.suffix.lower() == ".jsonl":
    return {str(row["index"]): _jsonl_prediction(row, path)
            for row in read_jsonl(path, strict=True)}
  header, rows = _read_table(path)
  for column in ("index", "prediction"):
    if column not in header:
      raise PredictionsError(f"prediction file '{path}' has no {column} column "
                             f"(columns: {', '.join(map(str, header))})")
  columns = {name: as_pandas_reads([r[i] if i < len(r) else None for r in rows])
             for i, name in enumerate(header) if name in ("index", "prediction")}
  return dict(zip(columns["index"], columns["prediction"]))


def _jsonl_prediction(row: dict, path: pathlib.Path) -> str:
  """A generated row's text; a loglik row's chosen letter (what extraction reads back)."""
  if row.get("generation") is not None:
    return row["generation"]
  if row.get("extracted") is not None:
    return str(row["extracted"])
  raise PredictionsError(f"prediction file '{path}': row index {row.get('index')} has neither "
                         "a generation nor an extracted answer")


def _read_table(path: pathlib.Path) -> tuple[list, list[list]]:
  try:
    if path.suffix.lower() == ".xlsx":
      import openpyxl
      book = openpyxl.load_workbook(path, read_only=True, data_only=True)
      table = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
      book.close()
    else:
      csv.field_size_limit(sys.maxsize)
      with open(path, newline="", encoding="utf-8") as f:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        table = list(csv.reader(f, delimiter=delimiter))
  except Exception as e:  # openpyxl raises many kinds; each means the same to the user
    raise PredictionsError(f"prediction file '{path}' cannot be read: {e}") from None
  if not table:
    raise PredictionsError(f"prediction file '{path}' is empty")
  return [str(h).strip() if h is not None else "" for h in table[0]], table[1:]


def read_jsonl(path: pathlib.Path, strict: bool = False) -> list[dict]:
  """The rows of a JSON-lines file. A torn last line (the process was killed while writing it)
  is dropped unless `strict`; a bad line elsewhere is an error."""
  lines = path.read_text(encoding="utf-8").splitlines()
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) and not strict:
        break
      raise PredictionsError(f"'{path}' line {number} is not JSON") from None
    if not isinstance(row, dict) or "index" not in row:
      raise PredictionsError(f"'{path}' line {number} is not a prediction row (no index)")
    rows.append(row)
  return rows


class PredictionLog:
  """predictions.jsonl in an eval's --output directory, written as batches finish.

  run.json beside it records what produced the rows (benchmark file, checkpoint, settings); a
  re-run of the same command reads the rows back and answers only the rest, one with anything
  else changed is refused rather than mixing two evaluations in one report."""

  def __init__(self, directory: str | pathlib.Path, identity: dict):
    self.directory = pathlib.Path(directory)
    self.path = self.directory / "predictions.jsonl"
    self.done: dict[str, dict] = {}
    identity = json.loads(json.dumps(identity))       # as it reads back from run.json
    run_file = self.directory / "run.json"
    if self.path.is_file() and run_file.is_file():
      before = json.loads(run_file.read_text())
      changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
      if changed:
        raise PredictionsError(
            f"'{self.directory}' holds predictions of another evaluation ({', '.join(changed)} "
            "differ); use another --output directory or delete it")
      self.done = {row["index"]: row for row in read_jsonl(self.path)}
    self.directory.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    # Rewritten from the rows read back: drops a torn last line before appending after it.
    with open(self.path, "w", encoding="utf-8") as f:
      for row in self.done.values():
        f.write(json.dumps(row, ensure_ascii=False) + "\n")

  def append(self, rows: list[dict]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      for row in rows:
        if row["index"] not in self.done:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
          self.done[row["index"]] = row
      f.flush()
      os.fsync(f.fileno())
