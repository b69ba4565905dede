"""Yes/no benchmarks scored as VLMEvalKit's ImageYORNDataset.evaluate scores them without a judge
model (VLMEvalKit e8e78f05: vlmeval/dataset/image_yorn.py, vlmeval/dataset/utils/yorn.py).

Extraction (its YOrN_Extraction): the answer is lower-cased and cleaned of punctuation as its
process_punctuation does (vqa.strip_punctuation); "yes" or "no" when exactly one of the two is a
word of it, else None -- VLMEvalKit's "Unknown", which it would send to its judge model: without
one the row is wrong and counts in `judge_needed`.

The rating, by benchmark name (case-sensitive substrings, first hit wins):
- MME: per category accuracy, accuracy_plus (an image counts when all its questions, one yes and
  one no, are right) and score = 100 * (accuracy + accuracy_plus); perception and cognition
  (VLMEvalKit's "reasoning") sum the scores of their categories (maxima 2000 and 800).
- Hallusion: aAcc (questions), fAcc (figures: the rows of one subcategory, set and figure all
  right) and qAcc (questions asked of several figures: the rows of one subcategory, set and
  question all right), overall, per category and per l2-category; set, figure and question ids
  are the 4th-6th `_`-separated fields of the index.
- POPE: F1, accuracy, precision and recall with "yes" the positive class, overall and per
  category; a row whose category names several splits ("adversarial,popular") counts in each,
  and in the overall figures once per split.
- anything else: accuracy, overall, per category and per l2-category.
Fractions throughout (VLMEvalKit prints percent), except MME's scores, on MME's own scale.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

from mma_jax.evaluate.tables import accuracy, grouped
from mma_jax.evaluate.vqa import strip_punctuation

RATINGS = (("MME", "mme"), ("Hallusion", "hallusionbench"), ("POPE", "pope"))

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def rating_for(dataset_name: str) -> str:
  """mme, hallusionbench, pope or yes_no (VLMEvalKit's default_rating)."""
  return next((rating for key, rating in RATINGS if key in dataset_name), "yes_no")


def extract_yes_no(text: str) -> str | None:
  """"yes" or "no" when just one of the two is a word of the cleaned-up, lower-cased answer;
  None when both or neither are ("Yes and no", "**Yes**", "yes/no", "Yes…")."""
  words = strip_punctuation(str(text).lower()).split()
  has_yes, has_no = "yes" in words, "no" in words
  if has_yes != has_no:
    return "yes" if has_yes else "no"
  return None


# -------------------------------------------------------------------------------------- helpers
def _all_right_share(rows: Sequence[Mapping], key) -> float:
  """The share of groups (rows with equal key(row)) whose rows are all right."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[key(row)].append(bool(row["correct"]))
  return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0


# ------------------------------------------------------------------------------------------ POPE
def split_categories(rows: Sequence[Mapping]) -> list[Mapping]:
  """POPE rows once per split their category names ("adversarial,popular" -> one row of each);
  rows without a category stay once."""
  out = []
  for row in rows:
    category = row.get("category")
    if category in (None, "") or "," not in str(category):
      out.append(row)
    else:
      out.extend({**row, "category": part} for part in str(category).split(","))
  return out


def pope_metrics(gold: Sequence[str], predicted: Sequence[str | None]) -> dict:
  """"yes" is the positive class; an unparsed prediction predicts neither, so it is a false
  negative for a "yes" question and leaves precision alone."""
  tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, predicted))
  fp = sum(g == "no" and p == "yes" for g, p in zip(gold, predicted))
  fn = sum(g == "yes" and p != "yes" for g, p in zip(gold, predicted))
  right = sum(g == p for g, p in zip(gold, predicted))
  n = len(gold)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": right / n if n else 0.0, "precision": precision, "recall": recall,
          "f1": f1, "n": n}


# ------------------------------------------------------------------------------------------- MME
def mme_category(name: str) -> str:
  return "_".join(name.strip().lower().replace("-", " ").split())


def mme_metrics(rows: Sequence[Mapping]) -> dict:
  """MME from rows with `category`, `image_key` and `correct` (see the module docstring)."""
  per_category = {}
  for name, group in grouped(rows, "category", list).items():
    acc = sum(bool(r["correct"]) for r in group) / len(group)
    acc_plus = _all_right_share(group, lambda r: r["image_key"])
    per_category[name] = {"accuracy": acc, "accuracy_plus": acc_plus,
                          "score": 100 * (acc + acc_plus), "n": len(group),
                          "images": len({r["image_key"] for r in group})}
  overall = {}
  for part, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
    scores = [c["score"] for k, c in per_category.items() if mme_category(k) in names]
    if scores:
      overall[part] = sum(scores)
  overall["score"] = sum(c["score"] for c in per_category.values())
  overall.update(accuracy([r["correct"] for r in rows]))
  return {"overall": overall, "category": per_category}


# ------------------------------------------------------------------------------- HallusionBench
def _hallusion_ids(row: Mapping) -> tuple[str, str, str]:
  fields = str(row["index"]).split("_")
  if len(fields) < 6:
    raise ValueError(f"HallusionBench row index {row['index']!r} has no set, figure and "
                     "question ids (expected <category>_<subcategory>_<input>_<set>_<figure>_"
                     "<question>)")
  return fields[3], fields[4], fields[5]


def hallusion_metrics(rows: Sequence[Mapping]) -> dict:
  def rate(group):
    figure = lambda r: (r.get("l2_category"), *_hallusion_ids(r)[:2])
    question = lambda r: (r.get("l2_category"), _hallusion_ids(r)[0], _hallusion_ids(r)[2])
    return accuracy(r["correct"] for r in group) | {
        "figure_accuracy": _all_right_share(group, figure),
        "question_accuracy": _all_right_share(group, question)}

  metrics = {"overall": rate(rows)}
  for key in ("category", "l2_category"):
    groups = grouped(rows, key, rate)
    if groups:
      metrics[key] = groups
  return metrics


# ------------------------------------------------------------------------------------------- all
def yes_no_metrics(rating: str, rows: Sequence[Mapping]) -> dict:
  """Rows with `answer` and `extracted` ("yes"/"no"/None), `correct`, `category`, `l2_category`,
  `image_key`, `index` -> {"overall": ..., grouping: {...}}."""
  if rating == "mme":
    metrics = mme_metrics(rows)
  elif rating == "hallusionbench":
    metrics = hallusion_metrics(rows)
  elif rating == "pope":
    per_split = split_categories(rows)
    pope = lambda group: pope_metrics([r["answer"] for r in group],
                                      [r["extracted"] for r in group])
    metrics = {"overall": pope(per_split), "category": grouped(per_split, "category", pope)}
  else:
    plain = lambda group: accuracy(r["correct"] for r in group)
    metrics = {"overall": plain(rows)}
    for key in ("category", "l2_category"):
      groups = grouped(rows, key, plain)
      if groups:
        metrics[key] = groups
  unknown = sum(r["extracted"] is None for r in rows)
  metrics["overall"] |= {"judge_needed": unknown, "unparsed": unknown, "yes_ratio": (
      sum(r["extracted"] == "yes" for r in rows) / len(rows) if rows else 0.0)}
  return metrics
