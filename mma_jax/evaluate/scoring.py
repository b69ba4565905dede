"""Answers out of generated text, and the metrics the benchmarks report.

Extraction is rule based (VLMEvalKit falls back to an LLM judge where rules fail; we have none, so
an unparsed answer counts as wrong and is counted as `unparsed`):
- multiple choice: the option letter ("B", "b", "(B)", "B.", "Answer: C.", "The answer is (B)
  red"), else the one option whose text the answer names, else a lone capital option letter;
- yes/no: the first word when it is yes or no, else the one of the two that occurs;
- short answers: VQA-style normalisation, then exact match against any gold answer.

Metrics are fractions in [0, 1] except the MME score, which is on MME's own scale (per category
accuracy*100 + accuracy_plus*100, summed over categories).
"""
from __future__ import annotations

import collections
import re
from typing import Iterable, Mapping, Sequence

# ------------------------------------------------------------------------------ multiple choice
# "answer is (B)", "Answer: C", "option B", "the correct choice is: D" -- the keyword is matched
# in any case, the letter only as a capital (so "the answer is a square" names no option).
_KEYWORD_LETTER = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*\(?([A-Z])(?![A-Za-z])")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^([A-Z])\s*[.):]")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
# Around a bare letter answer: brackets, quotes, markdown bold, trailing punctuation.
_DECORATION = " \t\n()[]{}<>'\"*`.:,;!"


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
  """The option letter `text` answers with, or None. `options`: letter -> option text."""
  stripped = text.strip()
  bare = stripped.strip(_DECORATION)
  if len(bare) == 1 and bare.upper() in options:     # "B", "b", "(B)", "B."
    return bare.upper()
  for pattern in (_KEYWORD_LETTER, _PARENTHESISED, _LEADING):
    for match in pattern.finditer(stripped):
      if match.group(1) in options:
        return match.group(1)
  by_text = _choice_by_text(stripped, options)
  if by_text is not None:
    return by_text
  return _lone_capital(stripped, options)


def _simplify(text: str) -> str:
  """Lower case, punctuation as spaces, single spaces: for matching option texts."""
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _choice_by_text(text: str, options: Mapping[str, str]) -> str | None:
  """The one option whose text the answer equals, or else contains as whole words. An option
  contained in a longer contained option ("red" in "dark red") does not count on its own."""
  answer = _simplify(text)
  if not answer:
    return None
  texts = {letter: _simplify(option) for letter, option in options.items()}
  equal = [letter for letter, t in texts.items() if t and t == answer]
  if len(equal) == 1:
    return equal[0]
  contained = {letter: t for letter, t in texts.items() if t and f" {t} " in f" {answer} "}
  maximal = [letter for letter, t in contained.items()
             if not any(t != u and f" {t} " in f" {u} " for u in contained.values())]
  return maximal[0] if len(maximal) == 1 else None


def _lone_capital(text: str, options: Mapping[str, str]) -> str | None:
  """The only capital option letter standing as a word ("B is right"); "A" or "I" followed by a
  word is the article or the pronoun ("A red circle", "I think"), not an option."""
  found = set()
  for match in _LONE_CAPITAL.finditer(text):
    letter = match.group(1)
    if letter not in options:
      continue
    if letter in "AI" and re.match(r"\s+[a-z]", text[match.end():]):
      continue
    found.add(letter)
  return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------------------- yes/no
def extract_yes_no(text: str) -> str | None:
  """"yes", "no" or None: the first word if it is one of them, else the one that occurs."""
  words = re.sub(r"[^a-z]", " ", text.lower()).split()
  if words and words[0] in ("yes", "no"):
    return words[0]
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
    return {"overall": pope(rows) | unparsed, "category": grouped(rows, "category", pope)}
  plain = lambda group: accuracy(r["correct"] for r in group)
  metrics = {"overall": plain(rows) | (unparsed if scoring == "multiple_choice" else {})}
  for key in ("category", "l2_category", "split"):
    groups = grouped(rows, key, plain)
    if groups:
      metrics[key] = groups
  return metrics
