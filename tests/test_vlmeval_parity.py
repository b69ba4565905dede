"""Extraction and the yes/no ratings score as VLMEvalKit does: its outputs on the cases in tests/fixtures/vlmevalkit/
cases.json (written by make_cases.py there, with VLMEvalKit's own code) are what we must give.

VLMEvalKit -> ours: YOrN_Extraction "Yes" / "No" / "Unknown" -> "yes" / "no" / None; can_infer
letter -> letter, False or "Z" (no answer; "Z" when the model refused) -> None; POPE_rating's
Overall (F1), acc, precision, recall (percent) -> f1, accuracy, precision, recall (fractions);
MME_rating's per category scores, perception and reasoning (our cognition).
"""
import json
import pathlib

import pytest

from mma_jax.evaluate import scoring
from mma_jax.evaluate.multiple_choice import extract_choice
from mma_jax.evaluate.yes_no import extract_yes_no

CASES = json.loads((pathlib.Path(__file__).parent / "fixtures/vlmevalkit/cases.json").read_text())
YES_NO = {"Yes": "yes", "No": "no", "Unknown": None}


def test_fixture_is_substantial():
  assert len(CASES["yes_no"]) + len(CASES["multiple_choice"]) >= 150


@pytest.mark.parametrize("case", CASES["yes_no"], ids=lambda c: repr(c["prediction"])[:40])
def test_yes_no_extraction(case):
  assert extract_yes_no(case["prediction"]) == YES_NO[case["vlmeval"]], (
      f"VLMEvalKit reads {case['prediction']!r} as {case['vlmeval']} "
      f"(after process_punctuation: {case['process_punctuation']!r})")


def choice_id(case):
  return repr(case["prediction"])[:40] + "|" + ",".join(case["options"].values())[:20]


@pytest.mark.parametrize("case", CASES["multiple_choice"], ids=choice_id)
def test_choice_extraction(case):
  expected = case["vlmeval"] if case["vlmeval"] not in (False, "Z") else None
  assert extract_choice(case["prediction"], case["options"]) == expected, (
      f"VLMEvalKit's can_infer({case['prediction']!r}, {case['options']}) = {case['vlmeval']!r}")


def yes_no_rows(rows):
  out = []
  for row in rows:
    extracted = extract_yes_no(row["prediction"])
    answer = row["answer"].lower()
    out.append({"category": row["category"], "image_key": row.get("image_path"),
                "answer": answer, "extracted": extracted, "correct": extracted == answer})
  return out


def test_pope_counts_a_row_in_every_split_it_names():
  metrics = scoring.benchmark_metrics("pope", yes_no_rows(CASES["pope"]["rows"]))
  ours = {"Overall": metrics["overall"]} | metrics["category"]
  assert sorted(ours) == sorted(CASES["pope"]["rating"])
  for split, theirs in CASES["pope"]["rating"].items():
    got = {"Overall": 100 * ours[split]["f1"], "acc": 100 * ours[split]["accuracy"],
           "precision": 100 * ours[split]["precision"], "recall": 100 * ours[split]["recall"]}
    assert got == pytest.approx(theirs), split


def test_mme_scores():
  metrics = scoring.benchmark_metrics("mme", yes_no_rows(CASES["mme"]["rows"]))
  theirs = dict(CASES["mme"]["rating"])
  assert metrics["overall"]["perception"] == pytest.approx(theirs.pop("perception"))
  assert metrics["overall"]["cognition"] == pytest.approx(theirs.pop("reasoning"))
  assert {k: v["score"] for k, v in metrics["category"].items()} == pytest.approx(theirs)
