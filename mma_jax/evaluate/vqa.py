"""Short-answer VQA scoring, exactly as VLMEvalKit's ImageVQADataset.evaluate_heuristic scores it
(VLMEvalKit e8e78f05: vlmeval/dataset/image_vqa.py and vlmeval/dataset/utils/vqa_eval.py), so
that 100 * the mean of `row_score` over a file is the figure VLMEvalKit reports.
tests/test_vqa_scoring.py checks every rule below against VLMEvalKit's own code
(tests/fixtures/vlmevalkit/vqa_cases.json, written by make_vqa_cases.py there).

The rules, restated:
- Method, by substring of the benchmark name, first hit wins: TextVQA -> vqa_score; ChartQA ->
  relaxed_accuracy; OCRVQA or GQA -> accuracy; DocVQA or InfoVQA -> anls; anything else (VQAv2,
  VizWiz, ...) -> vqa_score.
- A row's matches (one per gold answer) become its score by a second substring rule, checked in
  another order: TextVQA -> mean; DocVQA or InfoVQA -> ANLS (below); ChartQA or OCRVQA -> max;
  anything else -> mean. So GQA averages its matches and OCR-VQA takes the best; with one gold
  answer the two agree.
- Gold answers: the answer cell, when it evaluates to a Python list, is that list (its items need
  not be strings); otherwise it is one answer, the cell itself. VLMEvalKit runs `eval` on the
  cell; we only read literals (see `answers_from_cell`). An empty list gives a mean of NaN and an
  error for max and ANLS, as in VLMEvalKit.
- The whole prediction is scored, every line of it (callers pass str(prediction), as VLMEvalKit
  does).
- vqa_score: prediction and gold answers go through `normalize`; the match for gold answer i is
  min(1, (number of the *other* gold answers equal to the prediction) / 3). Averaged over the
  gold answers this is 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ agreeing answers out of 10, and
  always 0 for a single gold answer (it has no others).
- normalize (VLMEvalKit's process_answer): newlines and tabs become spaces and the ends are
  stripped; then each of the marks  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted if
  the text has that mark next to a space, or has a comma between two digits anywhere, and
  otherwise becomes a space; then the first 32 periods that touch no digit on either side are
  deleted (so "U.S.A." -> "USA", while "3.5" and "5." keep theirs); then the text is lowercased
  and split on white space, the number words none/zero..ten become digits ("none" -> "0"), the
  articles a/an/the are dropped, and a few apostrophe-less contractions get their apostrophe
  ("dont" -> "don't"). Everything else stays: %, $, *, #, &, :, apostrophes, accents.
- accuracy: 1 if gold.strip().lower() == prediction.strip().lower(), else 0.
- relaxed_accuracy: the prediction is stripped; when both it and the gold answer read as numbers
  (Python float(); "x%" reads as x/100) and the gold number is nonzero, the match is
  |prediction - gold| / |gold| <= 0.05; otherwise case-insensitive equality of the texts (the
  gold text unstripped, so "0" vs "0.0" do not match).
- anls: both texts are lowercased with white space runs collapsed; distance = Levenshtein
  distance of those / the longer of the two *raw* texts (length after upper(), 0 if both are
  empty). The row's score is 1 - the smallest distance, or 0 when that is below 0.5. The raw
  prediction is used, unstripped, so padding lowers the distance.
"""
from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence

METHODS = ("vqa_score", "accuracy", "relaxed_accuracy", "anls")
REDUCTIONS = ("mean", "max", "anls")

# (substring of the benchmark name, method), in the order VLMEvalKit tries them.
_METHOD_RULES = (("TextVQA", "vqa_score"), ("ChartQA", "relaxed_accuracy"),
                 ("OCRVQA", "accuracy"), ("GQA", "accuracy"), ("DocVQA", "anls"),
                 ("InfoVQA", "anls"))
# (substring, how a row's matches combine); VLMEvalKit's own order, unlike the one above.
_REDUCTION_RULES = (("TextVQA", "mean"), ("DocVQA", "anls"), ("InfoVQA", "anls"),
                    ("ChartQA", "max"), ("OCRVQA", "max"))
# A method's own benchmark's rule, for row_score without a dataset name (accuracy: GQA's).
_METHOD_REDUCTION = {"vqa_score": "mean", "accuracy": "mean", "relaxed_accuracy": "max",
                     "anls": "anls"}
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

# ------------------------------------------------------------------------------ normalisation
_MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
# VLMEvalKit passes re.UNICODE (32) where re.sub takes its count.
_MAX_PERIODS_DELETED = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The VQA contraction table, less the entries that cannot fire after lowercasing (Im, Ive, Id've,
# I'dve) or that map a word to itself. "somebody'd" -> "somebodyd" is the table's own (reversed).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def strip_punctuation(text: str) -> str:
  """The punctuation and period steps of `normalize` (VLMEvalKit's process_punctuation)."""
  # Whether a mark is deleted or spaced out is decided on the text as given, for all marks.
  glue_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in _MARKS:
    glued = glue_all or f"{mark} " in text or f" {mark}" in text
    out = out.replace(mark, "" if glued else " ")
  return _LONE_PERIOD.sub("", out, count=_MAX_PERIODS_DELETED)


def normalize(text: str) -> str:
  """VLMEvalKit's process_answer: the text vqa_score compares (rules in the module docstring)."""
  text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


# ------------------------------------------------------------------------------------ answers
def answers_from_cell(cell: str) -> list:
  """The gold answers of an answer cell: the list it spells, else [cell].

  VLMEvalKit evaluates the cell with Python's eval; we read only literals, so a cell that is a
  list only by computation ("[1/2]", "list('ab')") is one answer here and a list there. Real
  files hold literals or plain text, where the two agree (including "[]" -> [] and "[1, 2]" ->
  [1, 2], whose non-string items VLMEvalKit fails on except under relaxed_accuracy).
  """
  try:
    value = ast.literal_eval(cell)
  except Exception:  # noqa: BLE001 -- any unreadable cell is plain text, as VLMEvalKit has it
    return [cell]
  return value if isinstance(value, list) else [cell]


def _text(answer) -> str:
  if not isinstance(answer, str):
    raise TypeError(f"gold answer {answer!r} is not text (VLMEvalKit fails on it too)")
  return answer


# ------------------------------------------------------------------------------------ methods
def _vqa_score_matches(prediction: str, answers: Sequence) -> list[float]:
  predicted = normalize(prediction)
  golds = [normalize(_text(answer)) for answer in answers]
  agreeing = sum(gold == predicted for gold in golds)
  # Each gold answer is judged by the other humans: leave it out of the count.
  return [min(1.0, (agreeing - (gold == predicted)) / 3) for gold in golds]


def _accuracy_matches(prediction: str, answers: Sequence) -> list[float]:
  predicted = prediction.strip().lower()
  return [1.0 if _text(answer).strip().lower() == predicted else 0.0 for answer in answers]


def _as_number(text: str) -> float | None:
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_match(gold: str, prediction: str) -> bool:
  """ChartQA's relaxed correctness (5% for numbers, else case-insensitive equality)."""
  predicted, target = _as_number(prediction), _as_number(gold)
  if predicted is not None and target:  # a zero (or unreadable) gold number compares as text
    return abs(predicted - target) / abs(target) <= RELAXED_TOLERANCE
  return prediction.lower() == gold.lower()


def _relaxed_matches(prediction: str, answers: Sequence) -> list[float]:
  predicted = prediction.strip()
  return [float(relaxed_match(str(answer), predicted)) for answer in answers]


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions of code points)."""
  if len(a) > len(b):
    a, b = b, a
  previous = list(range(len(a) + 1))
  for j, char_b in enumerate(b, 1):
    current = [j]
    for i, char_a in enumerate(a, 1):
      current.append(min(previous[i] + 1, current[i - 1] + 1,
                         previous[i - 1] + (char_a != char_b)))
    previous = current
  return previous[-1]


def anls_distance(gold: str, prediction: str) -> float:
  """Normalised edit distance of DocVQA's ANLS, as VLMEvalKit computes it."""
  longest = max(len(gold.upper()), len(prediction.upper()))  # raw texts, not the compared ones
  if longest == 0:
    return 0.0
  compared = [" ".join(text.lower().split()) for text in (gold, prediction)]
  return float(edit_distance(*compared)) / float(longest)


def _anls_matches(prediction: str, answers: Sequence) -> list[float]:
  return [anls_distance(_text(answer), prediction) for answer in answers]


_MATCHERS = {"vqa_score": _vqa_score_matches, "accuracy": _accuracy_matches,
             "relaxed_accuracy": _relaxed_matches, "anls": _anls_matches}


def row_matches(method: str, prediction: str, answers: Sequence) -> list[float]:
  """One number per gold answer (VLMEvalKit's `match`; for anls a distance, lower is better)."""
  return _MATCHERS[method](prediction, answers)


def reduce_matches(reduction: str, matches: Sequence[float]) -> float:
  """A row's score from its matches: their mean, their max, or the thresholded ANLS."""
  if reduction == "mean":
    return math.fsum(matches) / len(matches) if matches else math.nan
  if reduction == "max":
    return float(max(matches))
  if reduction == "anls":
    similarity = 1 - min(matches)
    return 0.0 if similarity < ANLS_THRESHOLD else float(similarity)
  raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


# ----------------------------------------------------------------------------------- dispatch
def method_for(dataset_name: str) -> str:
  """The method VLMEvalKit's evaluate_heuristic uses for this benchmark name."""
  return next((method for key, method in _METHOD_RULES if key in dataset_name), "vqa_score")


def reduction_for(dataset_name: str) -> str:
  """How VLMEvalKit combines a row's matches for this benchmark name."""
  return next((rule for key, rule in _REDUCTION_RULES if key in dataset_name), "mean")


def row_score(method: str, prediction: str, answers: Sequence,
              dataset_name: str | None = None) -> float:
  """The row's score as VLMEvalKit averages it (its `hit`), in [0, 1].

  The matches combine by the rule for `dataset_name` when given, else by the rule of the method's
  own benchmark (accuracy: GQA's mean; OCR-VQA takes the max, which differs only for several
  gold answers).
  """
  if method not in _MATCHERS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  reduction = _METHOD_REDUCTION[method] if dataset_name is None else reduction_for(dataset_name)
  return reduce_matches(reduction, row_matches(method, prediction, answers))


def dataset_row_score(dataset_name: str, prediction: str, answer_cell: str) -> float:
  """row_score for a benchmark's row, from the raw answer cell."""
  return row_score(method_for(dataset_name), prediction, answers_from_cell(answer_cell),
                   dataset_name)
