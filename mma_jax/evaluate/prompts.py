"""Benchmark questions -> the user turn the model answers, in one of three styles.

vlmevalkit (the default for TSV benchmarks): the text VLMEvalKit's dataset class builds (its
  build_prompt, commit e8e78f05), the class picked from the benchmark's name (the file's stem;
  compared lower-cased without '-', '_' and spaces, by the fragments in VLMEVALKIT_BY_NAME), and
  from the task when no fragment matches, as VLMEvalKit falls back to its custom datasets:
    multiple choice (ImageMCQDataset: MMBench, SEED-Bench, ScienceQA, RealWorldQA, ... and any
    file with options)   [Hint: {hint}\\n]Question: {question}\\nOptions:\\nA. ..\\nB. ..\\n
                         Please select the correct answer from the options above. \\n
    CV-Bench             the row's own `prompt` cell, as it is (the text above if it has none)
    yes/no (ImageYORNDataset: MME, POPE, HallusionBench)    {question}, as it is (MME's own
                         questions end in "Please answer yes or no."); AMBER adds
                         \\nPlease answer yes or no.
    short answer named TextVQA, GQA, ChartQA, DocVQA, InfoVQA or OCRVQA (ImageVQADataset)
                         {question}\\nAnswer the question using a single word or phrase.
    any other short answer or yes/no file (VLMEvalKit's custom VQA)   {question}, as it is
official: how the AKI authors asked. Their own eval code (sony/aki c764231) defines one prompt,
  CV-Bench's (eval_cv_bench/eval.py), taken here for any benchmark named CV-Bench:
      Answer with the option's letter from the given choices directly. {question}\\nOptions:\\n
      A. ..\\nB. ..\\n
  and runs every other benchmark through VLMEvalKit (scripts/run_eval_vlmkit.sh: MME, MMBench,
  SEED-Bench, POPE, RealWorldQA, ...), whose AKI wrapper has no prompt of its own: the dataset's
  prompt, i.e. the vlmevalkit style.
training: our SFT task prompts (DESIGN.md §7), so that evaluation asks in the words training
  taught; `flavour` (data.flavour) picks the multiple-choice form:
    multiple choice      {hint}\\n{question}\\nOptions:\\nA. ..\\nB. ..\\n
                         Answer with the option's letter from the given choices directly.
      flavour official   Answer with the option's letter from the given choices directly.
                         {question}\\nContext: {hint}\\nOptions:\\nA. ..\\nB. ..\\n
                         (eval_cv_bench's form; the ScienceQA SFT source gives hints as Context:)
    yes/no               {question} Please answer yes or no.   (unless it already asks so)
    short answer         Answer the question using a single word or phrase. {question}

Images come first, one `<image>` line each, as training laid them out. (VLMEvalKit's messages
are likewise images then text; its AKI wrapper writes `<image>` straight before the text, with no
newline, and keeps only the first image.)
"""
from __future__ import annotations

from collections.abc import Callable

from mma_jax.data.pipeline import VQA_PROMPT
from mma_jax.data.sft.common import MC_INSTRUCTION, YES_NO_INSTRUCTION
from mma_jax.evaluate.tsv import Question
from mma_jax.layout import Conversation
from mma_jax.templates import IMAGE_TOKEN

STYLES = ("vlmevalkit", "official", "training")

# VLMEvalKit's strings, exactly (the space before the last newline included).
VLMEVALKIT_MC_INSTRUCTION = "Please select the correct answer from the options above. \n"
VLMEVALKIT_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
VLMEVALKIT_AMBER = "\nPlease answer yes or no."

Builder = Callable[[Question], str]


def option_lines(question: Question) -> str:
  return "".join(f"{letter}. {text}\n" for letter, text in question.options.items())


# ------------------------------------------------------------------------------------ vlmevalkit
def vlmevalkit_multiple_choice(question: Question) -> str:
  hint = f"Hint: {question.hint}\n" if question.hint else ""
  text = f"{hint}Question: {question.question}\n"
  if question.options:
    text += f"Options:\n{option_lines(question)}{VLMEVALKIT_MC_INSTRUCTION}"
  return text


def cv_bench(question: Question) -> str:
  # VLMEvalKit needs the file's prompt cell; without one the generic form beats failing.
  return question.prompt or vlmevalkit_multiple_choice(question)


def question_only(question: Question) -> str:
  return question.question


def amber(question: Question) -> str:
  return question.question + VLMEVALKIT_AMBER


def short_answer(question: Question) -> str:
  return question.question + VLMEVALKIT_SHORT_ANSWER


# (name fragments, builder): the first match wins, whatever the file's task.
VLMEVALKIT_BY_NAME: tuple[tuple[tuple[str, ...], Builder], ...] = (
    (("cvbench",), cv_bench),
    (("amber",), amber),
    (("textvqa", "docvqa", "infovqa", "chartqa", "ocrvqa", "gqa"), short_answer),
)
VLMEVALKIT_BY_TASK: dict[str, Builder] = {
    "multiple_choice": vlmevalkit_multiple_choice,
    "yes_no": question_only,
    "vqa": question_only,
}


# -------------------------------------------------------------------------------------- official
def aki_cv_bench(question: Question) -> str:
  return f"{MC_INSTRUCTION} {question.question}\nOptions:\n{option_lines(question)}"


OFFICIAL_BY_NAME: tuple[tuple[tuple[str, ...], Builder], ...] = (
    (("cvbench",), aki_cv_bench),
)


# -------------------------------------------------------------------------------------- training
def training_text(question: Question, task: str, flavour: str = "default") -> str:
  if task == "multiple_choice" and flavour == "official":
    context = f"\nContext: {question.hint}" if question.hint else ""
    return f"{MC_INSTRUCTION} {question.question}{context}\nOptions:\n{option_lines(question)}"
  if task == "multiple_choice":
    lines = [question.hint] if question.hint else []
    lines += [question.question, "Options:"]
    lines += [f"{letter}. {text}" for letter, text in question.options.items()]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)
  if task == "yes_no":
    asks = "yes or no" in question.question.lower()
    return question.question if asks else f"{question.question} {YES_NO_INSTRUCTION}"
  return VQA_PROMPT.format(question=question.question)


# -------------------------------------------------------------------------------------- dispatch
def _normalized(name: str) -> str:
  return "".join(c for c in name.lower() if c not in "-_ ")


def _by_name(table, benchmark: str) -> Builder | None:
  name = _normalized(benchmark)
  for fragments, builder in table:
    if any(fragment in name for fragment in fragments):
      return builder
  return None


def builder_for(benchmark: str, task: str, style: str) -> Builder:
  """The text builder of a non-training style for this benchmark name and task."""
  if style == "official":
    builder = _by_name(OFFICIAL_BY_NAME, benchmark)
    if builder is not None:
      return builder
  return _by_name(VLMEVALKIT_BY_NAME, benchmark) or VLMEVALKIT_BY_TASK.get(task, question_only)


def user_text(question: Question, task: str, flavour: str = "default", *, benchmark: str = "",
              style: str = "training") -> str:
  """The user turn: `<image>\\n` per image, then the question in `style` (one of STYLES) for the
  benchmark named `benchmark`. `flavour` (data.flavour) matters to the training style only."""
  if style not in STYLES:
    raise ValueError(f"unknown prompt style {style!r}; choose one of: {', '.join(STYLES)}")
  if style == "training":
    body = training_text(question, task, flavour)
  else:
    body = builder_for(benchmark, task, style)(question)
  return f"{IMAGE_TOKEN}\n" * len(question.images) + body


def conversation(question: Question, task: str, system: str | None, flavour: str = "default", *,
                 benchmark: str = "", style: str = "training") -> Conversation:
  """One user turn, ending where the assistant answers. `system`: as data.system_prompt (None:
  the template's default, "": none); the rest as user_text."""
  return Conversation([("user", user_text(question, task, flavour, benchmark=benchmark,
                                          style=style))],
                      num_images=len(question.images), system=system)
