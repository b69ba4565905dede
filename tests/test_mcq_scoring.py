"""multiple_choice.py scores as VLMEvalKit's ImageMCQDataset.evaluate does under exact matching:
its outputs on the benchmarks in tests/fixtures/vlmevalkit/mcq_cases.json (written by
make_mcq_cases.py there, with VLMEvalKit's own code) are what we must give, from the same TSV
read by our reader; and hand-computed cases of its rules.

VLMEvalKit -> ours: report_acc's table (`acc`; PRINT_VANILLA's `vanilla_all` and `vanilla_0`)
-> metrics["table"] (metrics["vanilla"]["table"], metrics["vanilla_0"]["table"]); a row or
question whose log says the judge was not asked under exact matching -> judge_needed.
"""
import base64
import io
import json
import pathlib

import pytest
from PIL import Image

from mma_jax.evaluate.multiple_choice import is_circular, mcq_metrics, row_outcome
from mma_jax.evaluate.tsv import read_tsv

CASES = json.loads((pathlib.Path(__file__).parent /
                    "fixtures/vlmevalkit/mcq_cases.json").read_text())
BENCHMARKS = {b["name"]: b for b in CASES["benchmarks"]}


def tiny_png() -> str:
  out = io.BytesIO()
  Image.new("RGB", (2, 2), (255, 0, 0)).save(out, format="PNG")
  return base64.b64encode(out.getvalue()).decode()


def write_tsv(path, rows):
  """The fixture's rows as a TSV our reader takes (an image column added), cells as written."""
  columns = [c for c in rows[0] if c != "prediction"] + ["image"]
  image = tiny_png()
  lines = ["\t".join(columns)]
  lines += ["\t".join(image if c == "image" else str(row[c]) for c in columns) for row in rows]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def scored_rows(benchmark, tmp_path, predictions=None):
  """Our rows for a fixture benchmark: read by read_tsv, answered as VLMEvalKit read back the
  predictions (its prediction file goes through pandas: "" comes back as "nan")."""
  read = read_tsv(write_tsv(tmp_path / f"{benchmark['name']}.tsv", benchmark["rows"]))
  assert not read.skipped and read.task == "multiple_choice"
  predictions = predictions or benchmark["prediction_read"]
  return read, [{"index": q.index, "generation": predictions[q.index], "options": q.options,
                 "answer": q.answers[0], "category": q.category, "l2_category": q.l2_category,
                 "split": q.split, "extracted": None} for q in read.questions]


def assert_tables(ours, theirs):
  assert list(ours) == list(theirs)                       # splits
  for split in theirs:
    assert list(ours[split]) == list(theirs[split]), split  # columns, in report_acc's order
    for column, value in theirs[split].items():
      if value is None:
        assert ours[split][column] is None, (split, column)
      else:
        assert ours[split][column] == pytest.approx(value, abs=1e-6), (split, column)


def test_fixture_covers_the_cases():
  assert CASES["vlmevalkit_commit"].startswith("e8e78f05")
  mmbench = BENCHMARKS["MMBench_DEV_EN"]
  assert mmbench["circular"] and not BENCHMARKS["SEEDBench_IMG"]["circular"]
  judged = [h["judge"] for h in mmbench["hits"].values()]
  assert any(judged) and not all(judged)
  assert len(mmbench["rows"]) > len(mmbench["hits"])      # rotated copies


@pytest.mark.parametrize("name, circular", CASES["circular_names"].items())
def test_is_circular(name, circular):
  assert is_circular(name) == circular


@pytest.mark.parametrize("name", BENCHMARKS)
def test_options_read_as_vlmevalkit_reads_them(name, tmp_path):
  read, _ = scored_rows(BENCHMARKS[name], tmp_path)
  assert {q.index: q.options for q in read.questions} == BENCHMARKS[name]["options"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_rows_as_vlmevalkit_scores_them(name, tmp_path):
  """Each row's outcome against VLMEvalKit's vanilla evaluation of it."""
  benchmark = BENCHMARKS[name]
  hits = benchmark.get("vanilla_hits", benchmark["hits"])
  _, rows = scored_rows(benchmark, tmp_path)
  for row in rows:
    outcome = row_outcome(row["generation"], row["options"], row["answer"])
    assert (outcome == "right", outcome == "unmatched") == (
        bool(hits[row["index"]]["hit"]), hits[row["index"]]["judge"]), (row, outcome)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_metrics_match_vlmevalkit(name, tmp_path):
  benchmark = BENCHMARKS[name]
  _, rows = scored_rows(benchmark, tmp_path)
  metrics = mcq_metrics(rows, circular=is_circular(name))
  assert_tables(metrics["table"], benchmark["acc"])
  hits = benchmark["hits"]
  overall = metrics["overall"]
  assert overall["n"] == len(hits)
  assert overall["accuracy"] == pytest.approx(
      sum(h["hit"] for h in hits.values()) / len(hits), abs=1e-6)
  assert overall["judge_needed"] == sum(h["judge"] for h in hits.values())
  if benchmark["circular"]:
    assert_tables(metrics["vanilla"]["table"], benchmark["vanilla_all"])
    assert_tables(metrics["vanilla_0"]["table"], benchmark["vanilla_0"])
    vanilla = benchmark["vanilla_hits"]
    assert overall["rows"] == metrics["vanilla"]["overall"]["n"] == len(vanilla)
    assert overall["vanilla_accuracy"] == pytest.approx(
        sum(h["hit"] for h in vanilla.values()) / len(vanilla), abs=1e-6)
    assert metrics["vanilla"]["overall"]["judge_needed"] == sum(
        h["judge"] for h in vanilla.values())


def test_mmbench_fixture_headline(tmp_path):
  """The circular MMBench file by hand: questions 1, 6, 7, 11, 13 of 12 are right (11 because
  its empty answers read back as "nan", which holds option "Na"); 3, 9, 10 wait for a judge;
  the two rotated copies of question 8 (not in the file) are not scored."""
  _, rows = scored_rows(BENCHMARKS["MMBench_DEV_EN"], tmp_path)
  overall = mcq_metrics(rows, circular=True)["overall"]
  assert (overall["n"], overall["rows"], overall["unscored"]) == (12, 44, 2)
  assert overall["accuracy"] == pytest.approx(5 / 12)
  assert overall["judge_needed"] == 3
  assert overall["incomplete"] == 2          # question 6 (2 of 4 rows), question 7 (1 of 4)
  assert overall["vanilla_accuracy"] == pytest.approx(35 / 44)


# ---------------------------------------------------------------------------------- hand-computed
COLOURS = ["red", "blue", "green", "yellow"]


def rotated(question, gold, predictions, **columns):
  """Question `question` and its rotations (index + k * 1e6, options turned k places), each
  answered with predictions[k] formatted with {gold} / {wrong} letters."""
  rows = []
  for k, prediction in enumerate(predictions):
    letter, wrong = "ABCD"[(gold - k) % 4], "ABCD"[(gold - k + 1) % 4]
    rows.append({"index": str(question + k * 1_000_000),
                 "options": {l: COLOURS[(i + k) % 4] for i, l in enumerate("ABCD")},
                 "answer": letter, "generation": prediction.format(gold=letter, wrong=wrong),
                 "category": "image_style", "l2_category": "coarse_perception", "split": "dev"})
  return rows


def test_one_wrong_rotation_fails_the_question():
  rows = rotated(1, 2, ["{gold}", "{gold}", "{wrong}", "{gold}"])
  metrics = mcq_metrics(rows, circular=True)
  overall = metrics["overall"]
  assert (overall["accuracy"], overall["n"], overall["judge_needed"]) == (0.0, 1, 0)
  assert overall["vanilla_accuracy"] == 0.75 and overall["vanilla_0_accuracy"] == 1.0
  assert metrics["table"] == {"dev": {"Overall": 0.0, "CP": 0.0, "image_style": 0.0}}
  assert metrics["vanilla"]["table"]["dev"]["Overall"] == 0.75


def test_all_rotations_right():
  rows = rotated(7, 0, ["{gold}", "({gold})", "The answer is {gold}.", "red"])
  assert mcq_metrics(rows, circular=True)["overall"]["accuracy"] == 1.0


def test_no_letter_needs_the_judge_unless_another_rotation_settles_it():
  unsure = rotated(3, 1, ["{gold}", "I am not sure.", "{gold}", "{gold}"])
  overall = mcq_metrics(unsure, circular=True)["overall"]
  assert (overall["accuracy"], overall["judge_needed"], overall["unparsed"]) == (0.0, 1, 1)
  assert mcq_metrics(unsure, circular=False)["overall"]["judge_needed"] == 1

  settled = rotated(3, 1, ["I am not sure.", "{wrong}", "{gold}", "{gold}"])
  assert mcq_metrics(settled, circular=True)["overall"]["judge_needed"] == 0
  refused = rotated(3, 1, ["I am not sure.", "Cannot determine the answer", "{gold}", "{gold}"])
  overall = mcq_metrics(refused, circular=True)["overall"]
  assert (overall["judge_needed"], overall["refused"], overall["unparsed"]) == (0, 1, 2)
  # Vanilla: the refusal is wrong outright, the unsure row would go to the judge.
  assert mcq_metrics(refused, circular=False)["overall"]["judge_needed"] == 1


def test_partial_groups_and_orphan_rotations():
  rows = rotated(5, 0, ["{gold}", "{gold}"])                         # 2 of 4 rotations
  rows += rotated(6, 0, ["{gold}", "{gold}", "{gold}"])[1:]           # copies without question 6
  overall = mcq_metrics(rows, circular=True)["overall"]
  assert (overall["accuracy"], overall["n"], overall["rows"]) == (1.0, 1, 4)
  assert (overall["incomplete"], overall["unscored"]) == (1, 2)


def test_groups_by_index_modulo_a_million():
  rows = rotated(2, 0, ["{gold}", "{gold}"]) + rotated(12, 0, ["{gold}", "{wrong}"])
  rows[1]["index"] = "1000002"
  metrics = mcq_metrics(rows, circular=True)
  assert metrics["overall"]["accuracy"] == 0.5 and metrics["overall"]["n"] == 2


def test_circular_needs_integer_indices():
  rows = rotated(1, 0, ["{gold}"])
  rows[0]["index"] = "q1"
  with pytest.raises(ValueError, match="integer"):
    mcq_metrics(rows, circular=True)
  assert mcq_metrics(rows, circular=False)["overall"]["accuracy"] == 1.0


def test_report_table_layout():
  """Per split; Overall, then l2-categories, then categories, each sorted; MMBench l2 names
  abbreviated; a category of the same column name replaces the l2-category's column; a split
  without such rows reads None; no split -> "none"."""
  def row(split, l2, category, right):
    return {"index": "1", "options": {"A": "x", "B": "y"}, "answer": "A",
            "generation": "A" if right else "B", "split": split, "l2_category": l2,
            "category": category}
  rows = [row("val", "logic_reasoning", "diagram", True),
          row("val", "coarse_perception", "coarse_perception", True),
          row("val", "coarse_perception", "image_style", False),
          row("test", "logic_reasoning", "diagram", False)]
  table = mcq_metrics(rows, circular=False)["table"]
  assert table == {"test": {"Overall": 0.0, "CP": None, "LR": 0.0, "diagram": 0.0,
                            "image_style": None},
                   "val": {"Overall": 2 / 3, "CP": 1.0, "LR": 1.0, "diagram": 1.0,
                           "image_style": 0.0}}
  for r in rows:
    r["split"] = r["l2_category"] = ""
  assert list(mcq_metrics(rows, circular=False)["table"]) == ["none"]


def test_missing_value_option_cells_are_absent(tmp_path):
  """Option cells pandas reads as missing are no options (case-sensitive: "none" and "Null" are
  option texts), so a prediction naming one matches nothing instead of a wrong letter."""
  header = ["index", "question", "A", "B", "C", "D", "E", "answer", "image"]
  cells = [["1", "Q?", "red", "blue", "None", "NA", "N/A", "A"],
           ["2", "Q?", "red", "null", "blue", "NaN", "", "C"],
           ["3", "Q?", "none", "Null", "two", "#N/A", "<NA>", "A"]]
  image = tiny_png()
  text = "\n".join("\t".join(r) for r in [header] + [c + [image] for c in cells]) + "\n"
  (tmp_path / "options.tsv").write_text(text)
  read = read_tsv(tmp_path / "options.tsv")
  assert [q.options for q in read.questions] == [
      {"A": "red", "B": "blue"}, {"A": "red", "C": "blue"},
      {"A": "none", "B": "Null", "C": "two"}]
  assert [q.answers for q in read.questions] == [["A"], ["C"], ["A"]]
  first = read.questions[0]
  assert row_outcome("C", first.options, "A") == "unmatched"
  assert row_outcome("none", read.questions[2].options, "A") == "right"
