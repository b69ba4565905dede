"""Answers out of generated text, and the metrics the benchmarks report.

Extraction follows VLMEvalKit's rule-based matching (its `exact_matching` judge), so that our
numbers are the numbers users get from VLMEvalKit; tests/test_vlmeval_parity.py checks this
against cases run through VLMEvalKit itself (tests/fixtures/vlmevalkit/). VLMEvalKit falls back
to an LLM judge where the rules fail; we have none, so an unparsed answer counts as wrong and is
counted as `unparsed`.
- multiple choice: an option letter standing as a token near the end of the answer, else "answer
  is X", else the one option whose text occurs in a short answer; None for no answer, several
  letters, or a refusal (VLMEvalKit's "Z");
- yes/no: "yes" or "no" when exactly one of them is a word of the answer after VLMEvalKit's
  punctuation clean-up, else None (VLMEvalKit's "Unknown");
- short answers: VQA-style normalisation, then exact match against any gold answer.

Metrics are fractions in [0, 1] except the MME score, which is on MME's own scale (per category
accuracy*100 + accuracy_plus*100, summed over categories). POPE rows whose category names several
splits ("adversarial,popular") count in each of them, and in the overall numbers once per split.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Mapping, Sequence

# ------------------------------------------------------------------------------ multiple choice
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


# ----------------------------------------------------------------------------------------- yes/no
# VLMEvalKit's clean-up before looking for the words (vlmeval/smp/misc.py:process_punctuation):
# each of these characters is deleted when the text has it next to a space or has a thousands
# comma ("1,000") anywhere, else turned into a space; then periods not next to a digit are
# deleted, only the first 32 of them (VLMEvalKit passes re.UNICODE where re.sub takes the count).
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS = re.compile(r"\d,\d")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _clean_punctuation(text: str) -> str:
  thousands = _THOUSANDS.search(text) is not None
  out = text
  for char in _PUNCTUATION:
    delete = thousands or f"{char} " in text or f" {char}" in text
    out = out.replace(char, "" if delete else " ")
  return _LONE_PERIOD.sub("", out, count=32)


def extract_yes_no(text: str) -> str | None:
  """"yes" or "no" when just one of the two is a word of the cleaned-up, lower-cased answer;
  None when both or neither are ("Yes and no", "**Yes**", "yes/no", "Yes…")."""
  words = _clean_punctuation(str(text).lower()).split()
  has_yes, has_no = "yes" in words, "no" in words
  if has_yes != has_no:
    return "yes" if has_yes else "no"
  return None


# ------------------------------------------------------------------------------------ short answer
# The VQA evaluation's number words (it maps "none" to "0" as well) and articles.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
  """VQA-style normalisation: lower case; thousands commas and periods dropped except decimal
  points; apostrophes dropped (don't -> dont); other punctuation as spaces; number words as
  digits; articles removed; single spaces."""
  text = text.strip().lower()
  text = re.sub(r"(?<=\d),(?=\d)", "", text)            # 1,000 -> 1000
  text = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", text)       # keep 3.5, drop "yes."
  text = text.replace("'", "").replace("\u2019", "")
  text = re.sub(r"[^\w\s.]|_", " ", text)
  words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
  return " ".join(words)


def vqa_match(prediction: str, answers: Sequence[str]) -> bool:
  """Normalised exact match against any of the gold answers."""
  predicted = normalize_answer(prediction)
  return any(predicted == normalize_answer(a) for a in answers)


# ------------------------------------------------------------------------------------------ metrics
def accuracy(correct: Iterable[bool]) -> dict:
  flags = [bool(c) for c in correct]
  return {"accuracy": sum(flags) / len(flags) if flags else 0.0, "n": len(flags)}


def grouped(rows: Sequence[Mapping], key: str, metric) -> dict[str, dict]:
  """{group value: metric(rows of that group)} for rows that have `key` set, sorted by value."""
  groups = collections.defaultdict(list)
  for row in rows:
    if row.get(key) not in (None, ""):
      groups[str(row[key])].append(row)
  return {name: metric(groups[name]) for name in sorted(groups)}


def split_categories(rows: Sequence[Mapping]) -> list[Mapping]:
  """POPE rows once per split their category names: "adversarial,popular" is a row of
  adversarial and one of popular (as VLMEvalKit's POPE_rating counts them, in the overall numbers
  too). The parts are taken as written, spaces included; rows without a category stay once."""
  out = []
  for row in rows:
    category = row.get("category")
    if category in (None, "") or "," not in str(category):
      out.append(row)
    else:
      out.extend({**row, "category": part} for part in str(category).split(","))
  return out


def pope_metrics(gold: Sequence[str], predicted: Sequence[str | None]) -> dict:
  """POPE's metrics with "yes" the positive class. An unparsed prediction (None) is wrong: it
  predicts neither class, so it is a false negative for a "yes" question and leaves precision
  alone."""
  tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, predicted))
  fp = sum(g == "no" and p == "yes" for g, p in zip(gold, predicted))
  fn = sum(g == "yes" and p != "yes" for g, p in zip(gold, predicted))
  right = sum(g == p for g, p in zip(gold, predicted))
  n = len(gold)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": right / n if n else 0.0, "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": sum(p == "yes" for p in predicted) / n if n else 0.0, "n": n}


# MME's two parts (VLMEvalKit's category names, lower case with underscores).
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_category(name: str) -> str:
  return "_".join(name.strip().lower().replace("-", " ").split())


def looks_like_mme(categories: Iterable[str]) -> bool:
  """True when most categories are MME's."""
  names = {mme_category(c) for c in categories if c}
  return bool(names) and len(names & set(MME_PERCEPTION + MME_COGNITION)) * 2 > len(names)


def mme_metrics(rows: Sequence[Mapping]) -> dict:
  """MME from rows with `category`, `image_key` and `correct`.

  Per category: accuracy over questions, accuracy_plus over images (an image counts when every
  one of its questions -- MME asks two per image, one yes and one no -- is right) and score =
  100 * (accuracy + accuracy_plus). perception / cognition sum the scores of their categories
  (maxima 2000 and 800 on the full benchmark); total sums all categories.
  """
  per_category = {}
  for name, group in grouped(rows, "category", list).items():
    by_image = collections.defaultdict(list)
    for row in group:
      by_image[row["image_key"]].append(bool(row["correct"]))
    acc = sum(bool(r["correct"]) for r in group) / len(group)
    acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
    per_category[name] = {"accuracy": acc, "accuracy_plus": acc_plus,
                          "score": 100 * (acc + acc_plus), "n": len(group),
                          "images": len(by_image)}
  parts = {"perception": MME_PERCEPTION, "cognition": MME_COGNITION}
  overall = {"score": sum(c["score"] for c in per_category.values())}
  for part, names in parts.items():
    scores = [c["score"] for k, c in per_category.items() if mme_category(k) in names]
    if scores:
      overall[part] = sum(scores)
  overall.update(accuracy([r["correct"] for r in rows]))
  return {"overall": overall, "category": per_category}


def benchmark_metrics(scoring: str, rows: Sequence[Mapping]) -> dict:
  """{"overall": {...}, grouping: {group: {...}}} for scored prediction rows (keys `answer`,
  `extracted`, `correct`, `category`, `l2_category`, `split`, `image_key`).

  scoring: "multiple_choice" / "vqa" (accuracy by category, l2_category and split), "yes_no"
  (POPE's metrics, by category) or "mme" (MME's, by category).
  """
  unparsed = {"unparsed": sum(r["extracted"] is None for r in rows)}
  if scoring == "mme":
    metrics = mme_metrics(rows)
    metrics["overall"].update(unparsed)
    return metrics
  if scoring == "yes_no":
    pope = lambda group: pope_metrics([r["answer"] for r in group],
                                      [r["extracted"] for r in group])
    per_split = split_categories(rows)
    return {"overall": pope(per_split) | unparsed,
            "category": grouped(per_split, "category", pope)}
  plain = lambda group: accuracy(r["correct"] for r in group)
  metrics = {"overall": plain(rows) | (unparsed if scoring == "multiple_choice" else {})}
  for key in ("category", "l2_category", "split"):
    groups = grouped(rows, key, plain)
    if groups:
      metrics[key] = groups
  return metrics
