"""Benchmark questions -> the user turn the model answers (DESIGN.md §7: the SFT task prompts,
so that evaluation asks in the words training taught).

    multiple choice  <image>\\n{hint}\\n{question}\\nOptions:\\nA. ..\\nB. ..\\n
                     Answer with the option's letter from the given choices directly.
    yes/no           <image>\\n{question} Please answer yes or no.   (unless it already asks so)
    short answer     <image>\\nAnswer the question using a single word or phrase. {question}

With data.flavour=official, multiple choice is asked as the official AKI code asks it
(eval_cv_bench/eval.py; the ScienceQA SFT source adds the hint as `Context:`), instruction first:

    multiple choice  <image>\\nAnswer with the option's letter from the given choices directly.
                     {question}\\nContext: {hint}\\nOptions:\\nA. ..\\nB. ..\\n
"""
from __future__ import annotations

from mma_jax.data.pipeline import VQA_PROMPT
from mma_jax.evaluate.tsv import Question
from mma_jax.layout import Conversation
from mma_jax.templates import IMAGE_TOKEN

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."


def official_multiple_choice(question: Question) -> str:
  context = f"\nContext: {question.hint}" if question.hint else ""
  options = "".join(f"{letter}. {text}\n" for letter, text in question.options.items())
  return f"{MC_INSTRUCTION} {question.question}{context}\nOptions:\n{options}"


def user_text(question: Question, task: str, flavour: str = "default") -> str:
  if task == "multiple_choice" and flavour == "official":
    body = official_multiple_choice(question)
  elif task == "multiple_choice":
    lines = [question.hint] if question.hint else []
    lines += [question.question, "Options:"]
    lines += [f"{letter}. {text}" for letter, text in question.options.items()]
    lines.append(MC_INSTRUCTION)
    body = "\n".join(lines)
  elif task == "yes_no":
    asks = "yes or no" in question.question.lower()
    body = question.question if asks else f"{question.question} {YES_NO_INSTRUCTION}"
  else:
    body = VQA_PROMPT.format(question=question.question)
  return f"{IMAGE_TOKEN}\n" * len(question.images) + body


def conversation(question: Question, task: str, system: str | None,
                 flavour: str = "default") -> Conversation:
  """One user turn, ending where the assistant answers. `system`: as data.system_prompt (None:
  the template's default, "": none); `flavour`: data.flavour."""
  return Conversation([("user", user_text(question, task, flavour))],
                      num_images=len(question.images), system=system)
