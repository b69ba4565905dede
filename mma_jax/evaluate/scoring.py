"""Scoring a benchmark's predictions as VLMEvalKit scores them, dispatched as its dataset classes
dispatch: by the task of the file and the benchmark's name (the TSV's file stem).

    multiple choice  multiple_choice.py  circular for MMBench-family names, else per row
    yes/no           yes_no.py           MME, HallusionBench, POPE or plain accuracy
    short answer     vqa.py              VQA score, exact match, relaxed accuracy or ANLS

The prediction text scored is what VLMEvalKit scores: a prediction file's cell as pandas reads it,
and for our own generations what it would read back had it written them (`with_predictions`: an
empty answer is "nan", ...), so that eval.py's numbers are the ones VLMEvalKit's would be for the
same answers. Figures are fractions (VLMEvalKit prints most in percent)
except MME's scores; metrics["overall"] holds VLMEvalKit's figures (and judge_needed: the rows or
questions VLMEvalKit would have sent to its judge model, scored without one as it does), while
metrics["extras"] holds ours (unparsed answers, yes ratio, ...) apart from them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from mma_jax.evaluate import multiple_choice, vqa, yes_no
from mma_jax.evaluate.predictions import as_pandas_reads
from mma_jax.evaluate.report import build_report
from mma_jax.evaluate.tables import accuracy, grouped
from mma_jax.evaluate.tsv import Benchmark, Skipped

# Scoring kinds per task; a kind names the VLMEvalKit evaluation a file gets.
KINDS = {"multiple_choice": ("multiple_choice", "circular"),
         "yes_no": ("yes_no", "pope", "mme", "hallusionbench"),
         "vqa": ("vqa_score", "exact_match", "relaxed_accuracy", "anls")}
_VQA_KINDS = {"vqa_score": "vqa_score", "accuracy": "exact_match",
              "relaxed_accuracy": "relaxed_accuracy", "anls": "anls"}
# Our own figures, reported apart from VLMEvalKit's.
EXTRAS = ("unparsed", "refused", "yes_ratio", "unscored", "incomplete")


def kind_for(benchmark_name: str, task: str) -> str:
  if task == "multiple_choice":
    return "circular" if multiple_choice.is_circular(benchmark_name) else "multiple_choice"
  if task == "yes_no":
    return yes_no.rating_for(benchmark_name)
  return _VQA_KINDS[vqa.method_for(benchmark_name)]


def task_of(kind: str) -> str:
  return next(task for task, kinds in KINDS.items() if kind in kinds)


def question_row(question) -> dict:
  """A prediction row's fields from its tsv.Question: what scoring reads, and what a reader of
  predictions.jsonl wants beside the answer."""
  gold = question.answers[0] if len(question.answers) == 1 else question.answers
  row = {"index": question.index, "row": question.row, "question": question.question}
  if question.options:
    row["options"] = question.options
  return row | {"answer": gold, "category": question.category,
                "l2_category": question.l2_category, "split": question.split,
                "image_key": question.image_key}


def score_rows(kind: str, benchmark_name: str, rows: Sequence[Mapping]) -> list[dict]:
  """The rows with `extracted`, `correct` and, for short answers, `score` (the row's share in
  [0, 1]) set. A row holds the gold `answer` (a letter, "yes"/"no", or the list of accepted
  answers) and the `prediction` text to score -- or None for a log-likelihood answer, whose
  `extracted` letter stands."""
  task, out = task_of(kind), []
  for row in rows:
    row, text = dict(row), row.get("prediction")
    if text is None:
      row["correct"] = row["extracted"] == row["answer"]
    elif task == "multiple_choice":
      row["extracted"] = multiple_choice.extract_choice(text, row["options"])
      row["correct"] = row["extracted"] == row["answer"]
    elif task == "yes_no":
      row["extracted"] = yes_no.extract_yes_no(text)
      row["correct"] = row["extracted"] == row["answer"]
    else:
      answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
      method = vqa.method_for(benchmark_name)
      row["extracted"] = vqa.normalize(text) if method == "vqa_score" else text.strip()
      row["score"] = vqa.row_score(method, text, answers, benchmark_name)
      row["correct"] = row["score"] >= 1.0
    out.append(row)
  return out


def with_predictions(rows: Sequence[Mapping]) -> list[dict]:
  """Our generated rows with `prediction` set: each generation as VLMEvalKit would read it back
  from the prediction file it writes (the column read as pandas reads it)."""
  texts = iter(as_pandas_reads([r["generation"] for r in rows if r.get("generation") is not None]))
  return [dict(r, prediction=next(texts) if r.get("generation") is not None else None)
          for r in rows]


def benchmark_metrics(kind: str, rows: Sequence[Mapping]) -> dict:
  """{"overall": VLMEvalKit's figures, grouping: {group: {...}}, "extras": ours} for rows scored
  by score_rows."""
  task = task_of(kind)
  if task == "multiple_choice":
    metrics = multiple_choice.mcq_metrics(rows, circular=kind == "circular")
  elif task == "yes_no":
    metrics = yes_no.yes_no_metrics(kind, rows)
  else:
    metrics = _vqa_metrics(rows)
  extras = {k: metrics["overall"].pop(k) for k in EXTRAS if k in metrics["overall"]}
  return metrics | {"extras": extras}


def _vqa_metrics(rows: Sequence[Mapping]) -> dict:
  """The mean row score, per split when the file has splits (VLMEvalKit then ignores the
  categories), else per category."""
  mean = lambda group: accuracy(r["score"] for r in group)
  metrics = {"overall": mean(rows)}
  key = "split" if any(r.get("split") for r in rows) else "category"
  groups = grouped(rows, key, mean)
  if groups:
    metrics[key] = groups
  return metrics


def scored_report(benchmark: Benchmark, rows: list[dict], skipped: list[Skipped], *,
                  checkpoint: dict, settings: dict) -> tuple[dict, list[dict]]:
  """(report, scored rows) for a benchmark's prediction rows (each with its `prediction`)."""
  kind = kind_for(benchmark.name, benchmark.task)
  rows = score_rows(kind, benchmark.name, rows)
  report = build_report(
      benchmark=benchmark.name, source=str(benchmark.path), task=benchmark.task, scoring=kind,
      metrics=benchmark_metrics(kind, rows), n_scored=len(rows),
      skipped=[s.to_json() for s in skipped], checkpoint=checkpoint, settings=settings)
  return report, rows
