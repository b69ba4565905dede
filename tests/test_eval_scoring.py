"""Benchmark scoring against hand-computed values, the VLMEvalKit TSV reader, prompts, reports."""
import base64
import csv
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from mma_jax.evaluate import prompts, report, scoring
from mma_jax.evaluate.multiple_choice import extract_choice
from mma_jax.evaluate.yes_no import extract_yes_no, mme_metrics, pope_metrics
from mma_jax.evaluate.tsv import BenchmarkError, read_tsv

OPTIONS = {"A": "blue", "B": "red", "C": "green", "D": "yellow"}


# ------------------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("text, expected", [
    ("The answer is (B) red", "B"),
    ("b", None),                                   # VLMEvalKit: letters are upper case
    ("Answer: C.", "C"),
    ("(D)", "D"),
    ("B. red", "B"),
    ("  **C**\n", "C"),
    ("the correct option is D", "D"),
    ("red", "B"),                                  # by the option's text
    ("It is green.", "C"),
    ("I think it is B", "B"),                      # "I" + word is the pronoun, B the option
    ("The answer is a yellow one", "A"),           # VLMEvalKit's "answer is X" takes any case
    ("answer is d", "D"),
    ("Option A is wrong; the answer is C.", "C"),  # two letters: "answer is X" decides
    ("B, because A is wrong", None),               # two letters, no "answer is": no answer
    ("Sorry, I can't help with images of people yet.", None),   # a refusal
    ("red or blue", None),                         # two options named: no answer
    ("I don't know", None),
    ("E", None),                                   # not an option
    ("", None),
])
def test_extract_choice(text, expected):
  assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_option_texts_and_the_article_as_vlmevalkit():
  # Option texts match as substrings, so "red" and "dark red" both occur: no answer; a capital
  # "A" token is option A even as an article (VLMEvalKit's can_infer).
  assert extract_choice("It is dark red.", {"A": "red", "B": "dark red"}) is None
  assert extract_choice("A red circle", {"A": "square", "B": "circle"}) == "A"
  assert extract_choice("A", {"A": "square", "B": "circle"}) == "A"
  assert extract_choice("Reddish-brown.", {"A": "Black.", "B": "Reddish-brown."}) == "B"


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is.", "yes"), ("No.", "no"), ("NO", "no"), ("There is no dog", "no"),
    ("I would say yes", "yes"), ("yes and no", None), ("Maybe yes, maybe no", None),
    ("maybe", None), ("", None), ("**Yes**", None), ("'No'", None), ("Yes\u2026", None),
    ("yes/no", None), ("Yes,there are 1,000 people.", None), ("Yes,there are 12 people.", "yes"),
    ("No. Yes, on closer look there is one.", None)])
def test_extract_yes_no(text, expected):
  assert extract_yes_no(text) == expected


# --------------------------------------------------------------------------------------- metrics
def test_pope_metrics_on_a_hand_table():
  gold = ["yes", "yes", "yes", "no", "no", "no", "yes", "no", "yes"]
  pred = ["yes", "no", "yes", "yes", "no", None, "yes", "no", None]
  # tp 3 (0, 2, 6), fp 1 (3), fn 2 (1, 8: unparsed), right 5 (0, 2, 4, 6, 7), said yes 4
  m = pope_metrics(gold, pred)
  assert m["accuracy"] == pytest.approx(5 / 9)
  assert m["precision"] == pytest.approx(3 / 4)
  assert m["recall"] == pytest.approx(3 / 5)
  assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
  assert m["n"] == 9


def mme_rows():
  def row(category, image, correct):
    return {"category": category, "image_key": image, "correct": correct,
            "extracted": "yes", "answer": "yes"}
  return [row("existence", "e1.jpg", True), row("existence", "e1.jpg", True),   # both right
          row("existence", "e2.jpg", True), row("existence", "e2.jpg", False),  # one right
          row("code_reasoning", "c1.png", False), row("code_reasoning", "c1.png", True)]


def test_mme_accuracy_plus_and_score_on_a_hand_table():
  m = mme_metrics(mme_rows())
  existence, code = m["category"]["existence"], m["category"]["code_reasoning"]
  assert existence["accuracy"] == pytest.approx(0.75)
  assert existence["accuracy_plus"] == pytest.approx(0.5)
  assert existence["score"] == pytest.approx(125.0)
  assert code["accuracy"] == pytest.approx(0.5)
  assert code["accuracy_plus"] == pytest.approx(0.0)
  assert code["score"] == pytest.approx(50.0)
  assert m["overall"]["perception"] == pytest.approx(125.0)
  assert m["overall"]["cognition"] == pytest.approx(50.0)
  assert m["overall"]["score"] == pytest.approx(175.0)
  assert m["overall"]["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("name,task,kind", [
    ("MMBench_DEV_EN", "multiple_choice", "circular"), ("CCBench", "multiple_choice", "circular"),
    ("SEEDBench_IMG", "multiple_choice", "multiple_choice"), ("MME", "yes_no", "mme"),
    ("POPE", "yes_no", "pope"), ("HallusionBench", "yes_no", "hallusionbench"),
    ("AMBER_yn", "yes_no", "yes_no"), ("pope_lowercase", "yes_no", "yes_no"),
    ("TextVQA_VAL", "vqa", "vqa_score"), ("GQA_TestDev_Balanced", "vqa", "exact_match"),
    ("ChartQA_TEST", "vqa", "relaxed_accuracy"), ("DocVQA_VAL", "vqa", "anls"),
    ("my_vqa", "vqa", "vqa_score")])
def test_scoring_is_picked_by_name_as_vlmevalkit_does(name, task, kind):
  assert scoring.kind_for(name, task) == kind


def test_benchmark_metrics_per_task():
  options = {"A": "red", "B": "blue", "C": "green"}
  rows = [{"index": "1", "category": "c1", "l2_category": "x", "split": "dev", "answer": "A",
           "prediction": "A", "options": options},
          {"index": "2", "category": "c1", "l2_category": "x", "split": "dev", "answer": "B",
           "prediction": "no idea", "options": options},
          {"index": "3", "category": "c2", "l2_category": "", "split": "dev", "answer": "C",
           "prediction": "It is green.", "options": options}]
  scored = scoring.score_rows("multiple_choice", "SEEDBench_IMG", rows)
  assert [(r["extracted"], r["correct"]) for r in scored] == [("A", True), (None, False),
                                                              ("C", True)]
  m = scoring.benchmark_metrics("multiple_choice", scored)
  assert m["overall"] == {"accuracy": pytest.approx(2 / 3), "n": 3, "judge_needed": 1}
  assert m["extras"] == {"unparsed": 1, "refused": 0}
  assert m["category"] == {"c1": {"accuracy": 0.5, "n": 2}, "c2": {"accuracy": 1.0, "n": 1}}
  assert m["l2_category"] == {"x": {"accuracy": 0.5, "n": 2}}
  assert m["split"] == {"dev": {"accuracy": pytest.approx(2 / 3), "n": 3}}
  mme = scoring.benchmark_metrics("mme", mme_rows())
  assert mme["overall"]["score"] == pytest.approx(175.0) and mme["extras"]["unparsed"] == 0
  yes_no = [{"category": "random", "answer": "yes", "prediction": "No."},
            {"category": "random", "answer": "no", "prediction": "no"},
            {"category": "random", "answer": "no", "prediction": "Yes and no"}]
  pope = scoring.benchmark_metrics("pope", scoring.score_rows("pope", "POPE", yes_no))
  assert pope["overall"]["accuracy"] == pytest.approx(1 / 3) and pope["overall"]["recall"] == 0
  assert pope["overall"]["judge_needed"] == 1
  assert pope["extras"] == {"unparsed": 1, "yes_ratio": 0.0}
  plain = scoring.benchmark_metrics("yes_no", scoring.score_rows("yes_no", "AMBER", yes_no))
  assert set(plain["overall"]) == {"accuracy", "n", "judge_needed"}
  # a row of "adversarial,popular" counts in both splits and twice overall (VLMEvalKit's POPE)
  pope = scoring.benchmark_metrics("pope", scoring.score_rows("pope", "POPE", [
      {"category": "adversarial,popular", "answer": "yes", "prediction": "yes"},
      {"category": "popular", "answer": "no", "prediction": "Yes"}]))
  assert sorted(pope["category"]) == ["adversarial", "popular"]
  assert pope["category"]["adversarial"]["n"] == 1 and pope["category"]["popular"]["n"] == 2
  assert pope["overall"]["n"] == 3 and pope["overall"]["accuracy"] == pytest.approx(2 / 3)
  # VQA: the whole prediction, leave-one-out VQA score (2 of 10 humans: 0.6), per split
  answers = ["two"] * 2 + ["three"] * 8
  vqa = scoring.score_rows("vqa_score", "TextVQA_VAL", [
      {"answer": answers, "prediction": "It is\n2.", "split": "val"},
      {"answer": answers, "prediction": "3", "split": "val"}])
  assert [r["score"] for r in vqa] == pytest.approx([0.0, 1.0])     # "it is 2." is not "2"
  vqa = scoring.score_rows("vqa_score", "TextVQA_VAL", [{"answer": answers, "prediction": "2"}])
  assert vqa[0]["score"] == pytest.approx(0.6)
  gqa = scoring.score_rows("exact_match", "GQA", [{"answer": "Left", "prediction": " left\n"}])
  assert gqa[0]["score"] == 1.0


# ------------------------------------------------------------------------------------ TSV reader
def png(color) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), color, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def write_tsv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(header)
    for row in rows:
      writer.writerow(row)
  return path


def test_tsv_reader_images_references_paths_and_malformed_rows(tmp_path, caplog):
  red, blue = png((255, 0, 0)), png((0, 0, 255))
  (tmp_path / "blue.png").write_bytes(blue)
  header = ["index", "question", "hint", "A", "B", "C", "answer", "category", "image",
            "image_path"]
  rows = [
      ["10", "What color?", "Look.", "red", "blue", "", "A", "color", b64(red), ""],
      ["11", "Same image?", "nan", "yes", "no", "", "A", "color", "10", ""],       # reference
      ["12", "Cut short", "", "red"],                                              # missing cells
      ["13", "Broken", "", "red", "blue", "", "A", "color", b64(b"not an image" * 8), ""],
      ["14", "Out of range", "", "red", "blue", "green", "E", "color", b64(red), ""],
      ["15", "From a file", "", "red", "blue", "", "B", "color", "", "blue.png"],
      ["16", "Not base64", "", "red", "blue", "", "A", "color", "%" * 80, ""],
      ["17", "Answer as text", "", "red", "blue", "", "blue", "shape", b64(blue), ""],
      ["18", "Unknown reference", "", "red", "blue", "", "A", "shape", "99", ""],
  ]
  path = write_tsv(tmp_path / "MMBench_tiny.tsv", header, rows)
  with caplog.at_level(logging.WARNING):
    bench = read_tsv(path)
  assert bench.name == "MMBench_tiny" and bench.task == "multiple_choice"
  assert [q.index for q in bench.questions] == ["10", "11", "15", "17"]
  q10, q11, q15, q17 = bench.questions
  assert q10.images == [red] and q10.hint == "Look." and q10.options == {"A": "red", "B": "blue"}
  assert q10.answers == ["A"] and q10.category == "color" and q10.row == 1
  assert q11.images == [red] and q11.image_key == q10.image_key and q11.hint == ""
  assert q15.images == [tmp_path / "blue.png"] and q15.image_key == "blue.png"
  assert q17.answers == ["B"]
  assert [(s.index, s.row, s.reason) for s in bench.skipped] == [
      ("12", 3, "missing_column"), ("13", 4, "undecodable_image"),
      ("14", 5, "answer_not_in_options"), ("16", 7, "undecodable_image"),
      ("18", 9, "undecodable_image")]
  for index in ("12", "13", "14", "16", "18"):
    assert f"MMBench_tiny.tsv: skipping row index {index}" in caplog.text


def test_tsv_task_detection_and_file_errors(tmp_path):
  image = b64(png((0, 255, 0)))
  yes_no = write_tsv(tmp_path / "POPE.tsv", ["index", "question", "answer", "category", "image"],
                     [["1", "Is there a dog?", "Yes", "random", image],
                      ["2", "Is there a cat?", "no", "random", "1"]])
  bench = read_tsv(yes_no)
  assert bench.task == "yes_no" and [q.answers for q in bench.questions] == [["yes"], ["no"]]
  vqa = write_tsv(tmp_path / "vqa.tsv", ["index", "question", "answer", "image"],
                  [["1", "How many?", "['2', 'two']", image], ["2", "What?", "dog", "1"]])
  bench = read_tsv(vqa)
  assert bench.task == "vqa" and bench.questions[0].answers == ["2", "two"]
  with pytest.raises(BenchmarkError, match="does not exist"):
    read_tsv(tmp_path / "missing.tsv")
  no_question = write_tsv(tmp_path / "bad.tsv", ["index", "answer", "image"], [["1", "a", image]])
  with pytest.raises(BenchmarkError, match="no question column"):
    read_tsv(no_question)


def test_prompts_follow_the_sft_task_prompts(tmp_path):
  image = b64(png((0, 0, 0)))
  path = write_tsv(tmp_path / "mc.tsv", ["index", "question", "hint", "A", "B", "answer", "image"],
                   [["1", "Which?", "A hint.", "red", "blue", "A", image]])
  question = read_tsv(path).questions[0]
  assert prompts.user_text(question, "multiple_choice") == (
      "<image>\nA hint.\nWhich?\nOptions:\nA. red\nB. blue\n"
      "Answer with the option's letter from the given choices directly.")
  # data.flavour=official: as the official eval_cv_bench/eval.py asks (hint as ScienceQA's Context)
  assert prompts.user_text(question, "multiple_choice", "official") == (
      "<image>\nAnswer with the option's letter from the given choices directly. Which?\n"
      "Context: A hint.\nOptions:\nA. red\nB. blue\n")
  question.hint = ""
  assert prompts.user_text(question, "multiple_choice", "official") == (
      "<image>\nAnswer with the option's letter from the given choices directly. Which?\n"
      "Options:\nA. red\nB. blue\n")
  question.question = "Is it red?"
  assert prompts.user_text(question, "yes_no") == "<image>\nIs it red? Please answer yes or no."
  question.question = "Is it red? Please answer yes or no."
  assert prompts.user_text(question, "yes_no") == "<image>\nIs it red? Please answer yes or no."
  assert prompts.user_text(question, "vqa") == (
      "<image>\nAnswer the question using a single word or phrase. "
      "Is it red? Please answer yes or no.")


def test_report_files(tmp_path):
  metrics = scoring.benchmark_metrics("mme", mme_rows())
  r = report.build_report(benchmark="MME", source="MME.tsv", task="yes_no", scoring="mme",
                          metrics=metrics, n_scored=6,
                          skipped=[{"index": "7", "row": 7, "reason": "undecodable_image",
                                    "message": "bad | image"}],
                          checkpoint={"path": "/ckpt", "kind": "run", "step": 4},
                          settings={"batch_size": 8})
  report.write_outputs(tmp_path, r, [{"index": "1", "correct": True}])
  loaded = json.loads((tmp_path / "report.json").read_text())
  assert loaded["n_skipped"] == 1 and loaded["skipped_by_reason"] == {"undecodable_image": 1}
  assert loaded["headline"] == {"perception": 125.0, "cognition": 50.0}
  assert loaded["metrics"]["extras"] == {"unparsed": 0, "yes_ratio": 1.0}
  md = (tmp_path / "report.md").read_text()
  assert "| existence | 0.7500 | 0.5000 | 125.0000 | 4 | 2 |" in md
  assert "bad \\| image" in md
  assert (tmp_path / "predictions.jsonl").read_text() == '{"index": "1", "correct": true}\n'
  assert "## Extras (ours, not VLMEvalKit's)" in md and "| yes_ratio | 1.0000 |" in md
  assert report.summary_lines(r)[-1] == ("perception=125.0000 cognition=50.0000 "
                                         "judge_needed=0 n_scored=6 n_skipped=1")
