"""Benchmark prompts: the vlmevalkit style against the text VLMEvalKit's own build_prompt methods
made (tests/fixtures/vlmevalkit/prompt_cases.json, make_prompt_cases.py), the official style
against the AKI eval code's CV-Bench prompt, the training style against the SFT prompts."""
import ast
import json
import pathlib
import string

import pytest

from mma_jax.evaluate import prompts
from mma_jax.evaluate.tsv import Question

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures/vlmevalkit/prompt_cases.json"
                      ).read_text())
CASES = FIXTURE["cases"]
IDS = [f"{c['dataset']}-{c['cells']['index']}-{n}" for n, c in enumerate(CASES)]


def question_of(cells: dict) -> Question:
  """As mma_jax.evaluate.tsv reads the row: an empty cell is an absent option, hint or prompt."""
  def present(name):
    return cells.get(name, "") not in ("", "nan", "NaN")

  paths = cells["image_path"]
  images = ast.literal_eval(paths) if paths.startswith("[") else [paths]
  return Question(index=cells["index"], row=int(cells["index"]), question=cells["question"],
                  answers=[cells["answer"]], images=images, image_key=paths,
                  options={l: cells[l] for l in string.ascii_uppercase if present(l)},
                  hint=cells["hint"] if present("hint") else "",
                  prompt=cells["prompt"] if present("prompt") else "")


def vlmevalkit_text(messages: list[dict]) -> str:
  """VLMEvalKit's message list (images, then one text) as our user turn: `<image>\\n` each."""
  kinds = [m["type"] for m in messages]
  assert kinds == ["image"] * (len(kinds) - 1) + ["text"], kinds
  return "<image>\n" * (len(kinds) - 1) + messages[-1]["value"]


def aki_cv_bench_text(question: Question) -> str:
  """What sony/aki's eval_cv_bench/eval.py sends: the instruction, the question, the choices
  lettered and joined by newlines, and a final newline."""
  choices = "\n".join(f"{letter}. {text}" for letter, text in question.options.items())
  return ("<image>\n" * len(question.images) + "Answer with the option's letter from the given "
          f"choices directly. {question.question}\nOptions:\n{choices}\n")


def test_fixture_covers_the_datasets_in_scope():
  assert FIXTURE["vlmevalkit_commit"].startswith("e8e78f05")
  datasets = {c["dataset"] for c in CASES}
  for name in ("MMBench_DEV_EN", "SEEDBench_IMG", "ScienceQA_VAL", "RealWorldQA", "CV-Bench-2D",
               "CV-Bench-3D", "MME", "POPE", "HallusionBench", "TextVQA_VAL",
               "GQA_TestDev_Balanced", "ChartQA_TEST", "DocVQA_VAL", "OCRVQA_TEST"):
    assert name in datasets, name
  assert {c["vlmeval_class"] for c in CASES} == {
      "ImageMCQDataset", "CVBench", "ImageYORNDataset", "ImageVQADataset", "CustomMCQDataset",
      "CustomVQADataset"}
  assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vlmevalkit_style_is_vlmevalkits_text(case):
  question = question_of(case["cells"])
  ours = prompts.user_text(question, case["task"], benchmark=case["dataset"], style="vlmevalkit")
  assert ours == vlmevalkit_text(case["messages"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_official_style_differs_only_where_the_aki_code_asks_its_own_way(case):
  question = question_of(case["cells"])
  official = prompts.user_text(question, case["task"], benchmark=case["dataset"],
                               style="official")
  if case["vlmeval_class"] == "CVBench":
    assert official == aki_cv_bench_text(question)
    assert official != vlmevalkit_text(case["messages"])
  else:      # run through VLMEvalKit, whose AKI wrapper keeps the dataset's prompt
    assert official == vlmevalkit_text(case["messages"])


def test_official_cv_bench_prompt_exactly():
  question = question_of(next(c for c in CASES if c["dataset"] == "CV-Bench-2D")["cells"])
  assert prompts.user_text(question, "multiple_choice", benchmark="CV-Bench-2D",
                           style="official") == (
      "<image>\nAnswer with the option's letter from the given choices directly. "
      "How many chairs are in the image?\nOptions:\nA. 3\nB. 2\nC. 1\nD. 0\n")


def mc_question(**changes) -> Question:
  fields = {"index": "1", "row": 1, "question": "Which?", "answers": ["A"], "images": [b"png"],
            "image_key": "k", "options": {"A": "red", "B": "blue"}, "hint": "A hint."}
  return Question(**(fields | changes))


def test_training_style_is_the_sft_prompts():
  question = mc_question()
  sft = "<image>\nA hint.\nWhich?\nOptions:\nA. red\nB. blue\n" + prompts.MC_INSTRUCTION
  assert prompts.user_text(question, "multiple_choice") == sft           # the default style
  assert prompts.user_text(question, "multiple_choice", style="training",
                           benchmark="MMBench_DEV_EN") == sft
  assert prompts.user_text(question, "multiple_choice", "official", style="training") == (
      "<image>\nAnswer with the option's letter from the given choices directly. Which?\n"
      "Context: A hint.\nOptions:\nA. red\nB. blue\n")
  question = mc_question(question="Is it red?", options={}, hint="")
  assert prompts.user_text(question, "yes_no", style="training", benchmark="POPE") == (
      "<image>\nIs it red? Please answer yes or no.")
  question.question = "Is it red? Please answer yes or no."
  assert prompts.user_text(question, "yes_no", style="training") == (
      "<image>\nIs it red? Please answer yes or no.")
  question.question = "What color?"
  assert prompts.user_text(question, "vqa", style="training", benchmark="TextVQA_VAL") == (
      "<image>\nAnswer the question using a single word or phrase. What color?")


def test_benchmark_names_dispatch_like_vlmevalkit_and_fall_back_by_task():
  question = mc_question(question="What color?", options={}, hint="")
  suffix = "\nAnswer the question using a single word or phrase."
  for name in ("textvqa_val", "TextVQA", "GQA-subset", "chart qa test", "DocVQA_TEST",
               "OCRVQA_TESTCORE", "InfoVQA_VAL"):
    for task in ("vqa", "yes_no"):          # the name decides, whatever the answers look like
      assert prompts.user_text(question, task, benchmark=name, style="vlmevalkit") == (
          "<image>\nWhat color?" + suffix), (name, task)
  for name in ("MME_tiny", "my_vqa", "", "POPE_adversarial"):
    assert prompts.user_text(question, "vqa", benchmark=name, style="vlmevalkit") == (
        "<image>\nWhat color?")
  assert prompts.user_text(question, "yes_no", benchmark="amber",
                           style="vlmevalkit").endswith("?\nPlease answer yes or no.")
  # CV-Bench by any spelling; a file without a prompt cell is asked as other multiple choice.
  cv = mc_question(prompt="Which? Select from the following choices.\n(A) red\n(B) blue")
  for name in ("cv_bench_2d", "CVBench", "CV-Bench-3D"):
    assert prompts.user_text(cv, "multiple_choice", benchmark=name,
                             style="vlmevalkit") == "<image>\n" + cv.prompt
  assert prompts.user_text(mc_question(), "multiple_choice", benchmark="CV-Bench-2D",
                           style="vlmevalkit") == prompts.user_text(
      mc_question(), "multiple_choice", benchmark="anything", style="vlmevalkit")
  with pytest.raises(ValueError, match="unknown prompt style 'llava'"):
    prompts.user_text(question, "vqa", benchmark="x", style="llava")


def test_conversation_is_one_user_turn_with_the_images():
  question = mc_question(images=[b"a", b"b"])
  conversation = prompts.conversation(question, "multiple_choice", "", "default",
                                      benchmark="ScienceQA_VAL", style="vlmevalkit")
  assert conversation.num_images == 2 and conversation.system == ""
  assert conversation.turns == [("user", prompts.user_text(
      question, "multiple_choice", benchmark="ScienceQA_VAL", style="vlmevalkit"))]
  assert conversation.turns[0][1].startswith("<image>\n<image>\nHint: A hint.\nQuestion: Which?")
