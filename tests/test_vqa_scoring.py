"""vqa.py scores short answers as VLMEvalKit does: its outputs on the rows and files in
tests/fixtures/vlmevalkit/vqa_cases.json (written by make_vqa_cases.py there, with VLMEvalKit's
own code) are what we must give; plus the issue's cases worked out by hand.

A fixture value is a number, "nan", or "error:<type>" where VLMEvalKit fails (we must fail too).
"""
import json
import math
import pathlib

import pytest

from mma_jax.evaluate import scoring, vqa

CASES = json.loads(
    (pathlib.Path(__file__).parent / "fixtures/vlmevalkit/vqa_cases.json").read_text())


def row_id(case):
  return f"{case['prediction']!r}|{case['answer']!r}"[:60]


def agrees(ours, theirs, tolerance=1e-9):
  if theirs == "nan":
    return math.isnan(ours)
  return ours == pytest.approx(theirs, abs=tolerance)


def test_fixture_is_substantial():
  assert len(CASES["rows"]) >= 150 and len(CASES["files"]) >= 5


@pytest.mark.parametrize("case", CASES["rows"], ids=row_id)
def test_answer_cell_parse(case):
  assert vqa.answers_from_cell(case["answer"]) == case["answers"]


@pytest.mark.parametrize("case", CASES["rows"], ids=row_id)
def test_matches_per_method(case):
  assert vqa.normalize(case["prediction"]) == case["normalized"]
  answers = vqa.answers_from_cell(case["answer"])
  for method, theirs in case["methods"].items():
    if isinstance(theirs, str):  # VLMEvalKit failed (non-text gold answers)
      with pytest.raises(TypeError):
        vqa.row_matches(method, case["prediction"], answers)
      continue
    ours = vqa.row_matches(method, case["prediction"], answers)
    # relaxed_accuracy's matches are booleans there
    assert ours == pytest.approx([float(m) for m in theirs["match"]], abs=1e-12), method
    if method == "vqa_score":
      assert [vqa.normalize(answer) for answer in answers] == theirs["gt"]


@pytest.mark.parametrize("case", CASES["rows"], ids=row_id)
def test_row_score_per_benchmark(case):
  wrong = {}
  for dataset, theirs in case["overall"].items():
    try:
      ours = 100 * vqa.dataset_row_score(dataset, case["prediction"], case["answer"])
    except (TypeError, ValueError) as error:
      ours = f"error:{type(error).__name__}"
      if isinstance(theirs, str) and theirs.startswith("error:"):
        continue
    if isinstance(theirs, str) and theirs.startswith("error:") or not (
        isinstance(ours, float) and agrees(ours, theirs)):
      wrong[dataset] = (ours, theirs)
  assert not wrong, f"(ours, VLMEvalKit) differ: {wrong}"


@pytest.mark.parametrize("case", CASES["files"], ids=lambda c: c["dataset"])
def test_file_figures(case):
  """The whole file through scoring.py, as eval.py and `python -m mma_jax.evaluate.score` score
  it: VLMEvalKit's figures are percent."""
  columns = case["rows"]
  rows = [{"prediction": p, "answer": vqa.answers_from_cell(a),
           "split": (columns.get("split") or [""] * len(columns["prediction"]))[i],
           "category": (columns.get("category") or [""] * len(columns["prediction"]))[i]}
          for i, (p, a) in enumerate(zip(columns["prediction"], columns["answer"]))]
  kind = scoring.kind_for(case["dataset"], "vqa")
  metrics = scoring.benchmark_metrics(kind, scoring.score_rows(kind, case["dataset"], rows))
  groups = metrics.get("split", metrics.get("category", {}))
  ours = {"Overall": metrics["overall"]["accuracy"]} | {
      name: values["accuracy"] for name, values in groups.items()}
  ours = {name: 100 * value for name, value in ours.items()}
  assert sorted(ours) == sorted(case["figures"])
  for name, theirs in case["figures"].items():
    assert agrees(ours[name], theirs, 1e-6), name


DISPATCH = {  # name: (method, reduction)
    "TextVQA_VAL": ("vqa_score", "mean"), "VQAv2_VAL": ("vqa_score", "mean"),
    "VizWiz": ("vqa_score", "mean"), "GQA_TestDev_Balanced": ("accuracy", "mean"),
    "OCRVQA_TEST": ("accuracy", "max"), "OCRVQA_TESTCORE": ("accuracy", "max"),
    "ChartQA_TEST": ("relaxed_accuracy", "max"), "DocVQA_VAL": ("anls", "anls"),
    "DocVQA_TEST": ("anls", "anls"), "InfoVQA_VAL": ("anls", "anls"),
    "InfoVQA_TEST": ("anls", "anls"), "DocVQA_ChartQA": ("relaxed_accuracy", "anls"),
    "TextVQA_DocVQA": ("vqa_score", "mean"), "GQA_InfoVQA": ("accuracy", "anls"),
    "GQA_OCRVQA": ("accuracy", "max"),
    "MyBench": ("vqa_score", "mean"),
}


@pytest.mark.parametrize("name", DISPATCH)
def test_dispatch(name):
  assert (vqa.method_for(name), vqa.reduction_for(name)) == DISPATCH[name]


def test_fixture_names_are_in_the_dispatch_table():
  assert set(CASES["datasets"]) <= set(DISPATCH)


# ------------------------------------------------------------------------- the issue, by hand
@pytest.mark.parametrize("agreeing, score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                             (10, 1.0)])
def test_vqa_score_averages_leave_one_out(agreeing, score):
  answers = ["red"] * agreeing + ["blue"] * (10 - agreeing)
  assert vqa.row_score("vqa_score", "Red.", answers) == pytest.approx(score)


def test_vqa_score_of_a_single_gold_answer_is_zero():
  assert vqa.row_score("vqa_score", "red", ["red"]) == 0.0


def test_periods_between_letters_are_deleted():
  assert vqa.normalize("U.S.A.") == "usa"
  assert vqa.row_score("vqa_score", "U.S.A.", ["usa"] * 10) == 1.0
  assert vqa.normalize("It is 5.") == "it is 5."  # a period touching a digit stays


def test_percent_dollar_star_and_apostrophes_stay():
  assert vqa.normalize("50%") == "50%" and vqa.normalize("$5") == "$5"
  assert vqa.normalize("*yes*") == "*yes*" and vqa.normalize("it's") == "it's"
  assert vqa.row_score("vqa_score", "50%", ["50"] * 10) == 0.0
  assert vqa.row_score("vqa_score", "$5", ["$5"] * 10) == 1.0
  assert vqa.normalize("dont") == "don't"


def test_marks_are_deleted_near_spaces_or_after_a_digit_comma():
  assert vqa.normalize("red-white") == "red white"
  assert vqa.normalize("red -white red-white") == "red white redwhite"
  assert vqa.normalize("1,000 red-white") == "1000 redwhite"


def test_numbers_and_articles():
  assert vqa.normalize("The Two dogs") == "2 dogs"
  assert vqa.normalize("none") == "0"


def test_gqa_is_plain_equality_after_strip_and_lower():
  assert vqa.method_for("GQA_TestDev_Balanced") == "accuracy"
  assert vqa.row_score("accuracy", " Yes\n", ["yes"]) == 1.0
  assert vqa.row_score("accuracy", "yes.", ["yes"]) == 0.0
  assert vqa.row_score("accuracy", "the dog", ["dog"]) == 0.0


def test_the_whole_prediction_is_scored():
  assert vqa.row_score("vqa_score", "red\nThe car is red.", ["red"] * 10) == 0.0
  assert vqa.row_score("vqa_score", "big\nred", ["big red"] * 10) == 1.0
  assert vqa.row_score("accuracy", "Stephen King\nauthor", ["Stephen King"]) == 0.0


def test_anls_threshold_and_raw_lengths():
  assert vqa.row_score("anls", "ab", ["ac"]) == 0.5  # distance 1/2: kept
  assert vqa.row_score("anls", "abcd", ["abxy"]) == 0.5
  assert vqa.row_score("anls", "abc", ["xyz"]) == 0.0
  assert vqa.row_score("anls", "abc     ", ["abd"]) == pytest.approx(1 - 1 / 8)


def test_relaxed_accuracy():
  assert vqa.row_score("relaxed_accuracy", "12.6", ["12"]) == 1.0
  assert vqa.row_score("relaxed_accuracy", "12.61", ["12"]) == 0.0
  assert vqa.row_score("relaxed_accuracy", "0.12", ["12%"]) == 1.0
  assert vqa.row_score("relaxed_accuracy", "0.0", ["0"]) == 0.0  # a zero gold compares as text


def test_answer_cells():
  assert vqa.answers_from_cell("['a', 'b']") == ["a", "b"]
  assert vqa.answers_from_cell("[a]") == ["[a]"]
  assert vqa.answers_from_cell("('a', 'b')") == ["('a', 'b')"]
  assert vqa.answers_from_cell("[]") == []
  assert math.isnan(vqa.row_score("vqa_score", "a", []))
