"""Prediction files: cells read as pandas (and so VLMEvalKit) reads them, the file formats a
user brings, and the log that lets a killed eval resume."""
import json

import openpyxl
import pytest

from mma_jax.evaluate.predictions import (PredictionLog, PredictionsError, as_pandas_reads,
                                          read_predictions)


# Expectations: what str() of pandas 3.1.1's read_csv / read_excel cells gives for these columns
# (checked by hand in the VLMEvalKit venv).
@pytest.mark.parametrize("cells,expected", [
    (["5", "None", "NA", "05", "1,000", "yes"], ["5", "nan", "nan", "05", "1,000", "yes"]),
    (["5", "6", "10"], ["5", "6", "10"]),                    # an integer column
    (["5", "6", "", "8"], ["5.0", "6.0", "nan", "8.0"]),     # integers with a gap: floats
    (["0.5", "2", "1e3"], ["0.5", "2.0", "1000.0"]),
    (["null", "N/A", "n/a", "<NA>", "NULL"], ["nan"] * 5),
    ([" yes", "No.", "none"], [" yes", "No.", "none"]),      # only the exact spellings are NaN
    ([3, None, "x"], ["3", "nan", "x"]),                     # typed .xlsx cells
])
def test_cells_read_as_pandas_reads_them(cells, expected):
  assert as_pandas_reads(cells) == expected


def write_xlsx(path, header, rows):
  book = openpyxl.Workbook()
  sheet = book.active
  for row in [header, *rows]:
    sheet.append(row)
  book.save(path)
  return path


def test_prediction_file_formats(tmp_path):
  rows = [["1", "B"], ["2", "NA"], ["1000001", "the answer is C"]]
  expected = {"1": "B", "2": "nan", "1000001": "the answer is C"}
  xlsx = write_xlsx(tmp_path / "p.xlsx", ["index", "question", "prediction"],
                    [[int(i), "q", p] for i, p in rows])
  assert read_predictions(xlsx) == expected
  (tmp_path / "p.tsv").write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows))
  assert read_predictions(tmp_path / "p.tsv") == expected
  (tmp_path / "p.csv").write_text("prediction,index\n" + "".join(f"{p},{i}\n" for i, p in rows))
  assert read_predictions(tmp_path / "p.csv") == expected
  ours = [{"index": "1", "generation": "B"}, {"index": "2", "generation": None, "extracted": "A"}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
  assert read_predictions(tmp_path / "p.jsonl") == {"1": "B", "2": "A"}


@pytest.mark.parametrize("name,content,message", [
    ("p.txt", "x", "is not one of .jsonl, .xlsx, .tsv, .csv"),
    ("missing.tsv", None, "does not exist"),
    ("p.tsv", "index\tanswer\n1\tA\n", "has no prediction column"),
    ("p.tsv", "", "is empty"),
    ("p.xlsx", "not a zip", "cannot be read"),
    ("p.jsonl", '{"index": "1", "generation": "A"}\n{"index": \n{"index": "3"}\n',
     "line 2 is not JSON"),
])
def test_bad_prediction_files_name_the_file(tmp_path, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_text(content)
  with pytest.raises(PredictionsError, match=message) as error:
    read_predictions(path)
  assert str(path) in str(error.value)


def test_log_resumes_after_a_torn_line_and_refuses_another_evaluation(tmp_path):
  identity = {"benchmark": "b.tsv", "settings": {"mode": "generate", "mesh": (1, 2)}}
  log = PredictionLog(tmp_path, identity)
  log.append([{"index": "1", "generation": "A"}, {"index": "2", "generation": "B"}])
  with open(log.path, "a") as f:
    f.write('{"index": "3", "gener')                       # killed mid-line
  again = PredictionLog(tmp_path, identity)
  assert list(again.done) == ["1", "2"]
  again.append([{"index": "2", "generation": "B"}, {"index": "3", "generation": "C"}])
  assert [json.loads(l)["index"] for l in again.path.read_text().splitlines()] == ["1", "2", "3"]
  with pytest.raises(PredictionsError, match=r"another evaluation \(settings differ\)"):
    PredictionLog(tmp_path, identity | {"settings": {"mode": "loglik"}})
