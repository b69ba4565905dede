"""Multiple-choice scores as VLMEvalKit's ImageMCQDataset.evaluate gives them under exact matching
(no judge model), circular evaluation included.

A row's letter comes from extract_choice (VLMEvalKit's can_infer); VLMEvalKit's exact
matching path reads nothing else. Where the rules find no letter VLMEvalKit tells two cases apart,
and so do we (`row_outcome`):
- a refusal (can_infer's "Z": a refusal phrase, or a lone "Z" token and no option letter) is
  simply wrong;
- anything else is where VLMEvalKit would ask its judge model. Without one it records "Z", so the
  row is wrong too; we count it as `judge_needed`.

Vanilla evaluation (most files): a row is right when its letter is the gold one; accuracy is over
rows, and judge_needed counts rows.

Circular evaluation (`is_circular`: MMBench, CCBench, MMCR and "*circular*" files): the file
holds each question once per rotation of its options, the copies at index + k * 1e6. The rows
whose index is its own remainder modulo 1e6 are the questions; a question is right only when
every row with its index modulo 1e6 is right -- the rows the file has, however many (a group
missing rotations is judged on those present); copies whose question is not in the file are not
scored.
A question needs the judge when some rotation found no letter and none found a wrong letter or
refused (those settle it without a judge); judge_needed counts questions. Accuracy is over
questions; beside it, what VLMEvalKit prints with PRINT_VANILLA=1: vanilla evaluation of every row
("vanilla", VLMEvalKit's vanilla_all) and of the questions' own rows ("vanilla_0").

Tables as VLMEvalKit's report_acc makes them (fractions): per split (all rows in one split
"none" when the file names none), "Overall", then each l2-category and each category in sorted
order, MMBench's l2-categories under their abbreviations (CP, FP-S, ...); a category named like an
earlier column replaces it, as in report_acc. A split without rows of a column reads None
(VLMEvalKit's NaN).

VLMEvalKit scores its prediction file as pandas reads it back: an empty answer, or one spelled
"None", "NA", ..., is scored as the text "nan" (which contains an option "Na"). Pass generations
read that way to get its numbers for such answers. Not restated here: MMMU's rewriting of open
questions, LEGO's ordering questions, and report_acc's variants for MMT-Bench, MMSci and MMVP.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

from mma_jax.evaluate.tables import accuracy, grouped

# Dataset names VLMEvalKit evaluates circularly: containing any of these, in any case.
CIRCULAR_MARKERS = ("mmbench", "ccbench", "circular", "mmcr")
ROTATION_STRIDE = 1_000_000            # rotation k of question i has index i + k * 1e6

# report_acc's short column names for MMBench's l2-categories.
ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}

OUTCOMES = ("right", "wrong", "refused", "unmatched")


# ------------------------------------------------------------------------------ extraction
# VLMEvalKit's rules (vlmeval/utils/matching_util.py: can_infer = can_infer_option, else
# can_infer_text), restated:
# - an answer holding one of the refusal phrases is a refusal (no answer); one holding the API
#   failure message skips the letter rules;
# - letters: the answer with .()[],:;!*#{} as spaces, split on white space; when exactly one
#   option letter is a token (case-sensitive) and its first occurrence is among the last four
#   tokens, that letter; when no option letter is but "Z" is, a refusal;
# - else the first "answer is X" (any case, X in A-D, bold allowed) names X if X is an option;
# - else, for an answer at most twice as long as all option texts together, the one option whose
#   lower-cased text occurs in the lower-cased answer (as a substring).
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_TOKEN_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
_ANSWER_IS = re.compile(r"answer\s+is\s+\**([abcd])", re.IGNORECASE)


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
  """The option letter `text` answers with, or None. `options`: letter -> option text."""
  text = str(text)
  if _API_FAILURE not in text:
    if any(phrase in text for phrase in _REFUSALS):
      return None
    tokens = _TOKEN_SEPARATORS.sub(" ", text).split()
    named = [letter for letter in options if letter in tokens]
    if len(named) == 1 and tokens.index(named[0]) >= len(tokens) - 4:
      return named[0]
    if not named and "Z" in tokens:
      return None
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in options:
      return match.group(1).upper()
  return _choice_by_text(text, options)


def _choice_by_text(text: str, options: Mapping[str, str]) -> str | None:
  """The one option whose text occurs in a short answer (case-insensitive), else None."""
  answer = text.lower()
  if len(answer) > 2 * sum(len(str(option)) for option in options.values()):
    return None
  found = [letter for letter, option in options.items() if str(option).lower() in answer]
  return found[0] if len(found) == 1 else None


def is_circular(dataset_name: str) -> bool:
  """Whether VLMEvalKit scores a dataset of this name by circular evaluation."""
  name = dataset_name.lower()
  return any(marker in name for marker in CIRCULAR_MARKERS)


def _refused(text: str, options: Mapping[str, str]) -> bool:
  """can_infer's "Z" (which extract_choice reports as None like any failure): a refusal phrase,
  or a "Z" token with no option letter among the tokens. A message of a failed API call turns
  the letter rules off, refusals included."""
  if _API_FAILURE in text:
    return False
  if any(phrase in text for phrase in _REFUSALS):
    return True
  tokens = _TOKEN_SEPARATORS.sub(" ", text).split()
  return "Z" in tokens and not any(letter in tokens for letter in options)


def row_outcome(text: str, options: Mapping[str, str], answer: str) -> str:
  """One of OUTCOMES: the gold letter, another letter, a refusal, or no letter at all (where
  VLMEvalKit would call its judge model)."""
  text = str(text)
  choice = extract_choice(text, options)
  if choice is not None:
    return "right" if choice == answer else "wrong"
  return "refused" if _refused(text, options) else "unmatched"


def _text(row: Mapping) -> str:
  """What is scored: the prediction as read back (scoring.score_rows), else the generation; for a
  row answered without one (log-likelihood mode), its chosen letter."""
  for key in ("prediction", "generation", "extracted"):
    if row.get(key) is not None:
      return str(row[key])
  return ""


def _integer_index(index) -> int:
  try:
    return int(index)
  except ValueError:
    pass
  try:
    number = float(index)
  except ValueError:
    number = None
  if number is None or not number.is_integer():
    raise ValueError(f"circular evaluation needs integer indices; row index {index!r} is not one")
  return int(number)


def _item(row: Mapping, outcome: str, hit: bool, judge: bool) -> dict:
  return {"hit": hit, "judge": judge, "outcome": outcome, "split": row.get("split") or "",
          "category": row.get("category") or "", "l2_category": row.get("l2_category") or ""}


def _mean(hits: list[bool]) -> float | None:
  return sum(hits) / len(hits) if hits else None


def report_table(items: Sequence[Mapping]) -> dict[str, dict[str, float | None]]:
  """{split: {column: accuracy}} as report_acc lays it out (see the module docstring)."""
  columns = {"Overall": list(items)}
  for key in ("l2_category", "category"):
    for name in sorted({item[key] for item in items if item[key]}):
      columns[ABBREVIATIONS.get(name, name)] = [item for item in items if item[key] == name]
  splits = sorted({item["split"] or "none" for item in items})
  return {split: {column: _mean([item["hit"] for item in group
                                 if (item["split"] or "none") == split])
                  for column, group in columns.items()}
          for split in splits}


def _summary(items: Sequence[Mapping], rows: Sequence[Mapping]) -> dict:
  """Accuracy over `items` (rows or questions), grouped and tabled; counts over `rows`."""
  plain = lambda group: accuracy(item["hit"] for item in group)
  outcomes = collections.Counter(row["outcome"] for row in rows)
  overall = plain(items) | {"judge_needed": sum(item["judge"] for item in items),
                            "unparsed": outcomes["refused"] + outcomes["unmatched"],
                            "refused": outcomes["refused"]}
  metrics = {"overall": overall}
  for key in ("category", "l2_category", "split"):
    groups = grouped(items, key, plain)
    if groups:
      metrics[key] = groups
  metrics["table"] = report_table(items)
  return metrics


def mcq_metrics(rows: Sequence[Mapping], *, circular: bool) -> dict:
  """Scores multiple-choice prediction rows as VLMEvalKit does under exact matching.

  rows: dicts with `index` (the TSV cell), `generation` (the text answered; for a row without
  one, its `extracted` letter is read), `options` (letter -> text, absent options left out),
  `answer` (the gold letter) and `category`, `l2_category`, `split` ("" where the file has none).

  Returns {"overall": {"accuracy", "n", "judge_needed", "unparsed", "refused", ...},
  "category" / "l2_category" / "split": {name: {"accuracy", "n"}}, "table": report_acc's table};
  circular also gives in overall "rows", "vanilla_accuracy", "vanilla_0_accuracy", "unscored"
  (rotated copies without their question) and "incomplete" (questions with fewer rows than
  options: a partial file), and the vanilla evaluations in full under "vanilla" / "vanilla_0".
  Accuracies are fractions; n counts rows, or questions when circular.
  """
  scored = []
  for row in rows:
    outcome = row_outcome(_text(row), row["options"], row["answer"])
    scored.append(_item(row, outcome, outcome == "right", outcome == "unmatched"))
  if not circular:
    return _summary(scored, scored)

  keys = [_integer_index(row["index"]) for row in rows]
  groups = collections.defaultdict(list)
  for key, item in zip(keys, scored):
    groups[key % ROTATION_STRIDE].append(item)
  questioned = {key for key in keys if key == key % ROTATION_STRIDE}
  questions, originals, incomplete = [], [], 0
  for row, key, item in zip(rows, keys, scored):
    if key not in questioned:
      continue
    group = [member["outcome"] for member in groups[key]]
    settled_wrong = any(o in ("wrong", "refused") for o in group)
    judge = not settled_wrong and "unmatched" in group
    questions.append(_item(row, item["outcome"], all(o == "right" for o in group), judge))
    originals.append(item)
    incomplete += len(group) < len(row["options"])
  metrics = _summary(questions, scored)
  vanilla, vanilla_0 = _summary(scored, scored), _summary(originals, originals)
  metrics["overall"].update(
      rows=len(scored), vanilla_accuracy=vanilla["overall"]["accuracy"],
      vanilla_0_accuracy=vanilla_0["overall"]["accuracy"],
      unscored=sum(key % ROTATION_STRIDE not in questioned for key in keys),
      incomplete=incomplete)
  metrics["vanilla"], metrics["vanilla_0"] = vanilla, vanilla_0
  return metrics
