"""python -m mma_jax.evaluate.score --benchmark FILE.tsv --predictions P [--output DIR]
                                   [--name NAME] [--task TASK]

Scores predictions without a model: P is eval.py's predictions.jsonl or a VLMEvalKit prediction
file (.xlsx / .tsv / .csv with its `index` and `prediction` columns), matched to the benchmark's
rows by index. Prints what eval.py prints for the same answers (per-category lines, then the
headline) and with --output writes the same report.json / report.md / predictions.jsonl.
The benchmark's name (its file stem, or --name) picks the scoring, as in VLMEvalKit: a file
named MMBench_DEV_EN.tsv is scored by circular evaluation, POPE.tsv by POPE's metrics, ...
Benchmark rows without a prediction are reported as skipped (no_prediction). Exit 2: a missing
or unreadable file, or predictions matching no row.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from mma_jax.evaluate import report as reports
from mma_jax.evaluate import scoring
from mma_jax.evaluate.predictions import PredictionsError, read_predictions
from mma_jax.evaluate.tsv import TASKS, BenchmarkError, Skipped, read_tsv

logger = logging.getLogger(__name__)


def score_file(benchmark_path, predictions_path, *, name: str | None = None,
               task: str | None = None) -> tuple[dict, list[dict]]:
  """(report, scored rows) for a prediction file against its benchmark file."""
  benchmark = read_tsv(benchmark_path, task=task)
  if name:
    benchmark = dataclasses.replace(benchmark, name=name)
  predicted = read_predictions(predictions_path)
  rows, skipped = [], list(benchmark.skipped)
  for question in benchmark.questions:
    if question.index in predicted:
      rows.append(scoring.question_row(question) | {"prediction": predicted[question.index]})
    else:
      skipped.append(Skipped(question.index, question.row, "no_prediction",
                             f"'{predictions_path}' has no prediction for this index"))
  known = {q.index for q in benchmark.questions} | {s.index for s in benchmark.skipped}
  strays = sorted(set(predicted) - known)
  if not rows:
    raise PredictionsError(f"no prediction in '{predictions_path}' matches a row of "
                           f"'{benchmark_path}' (by index)")
  if strays:
    logger.warning("%s: %d predictions name no row of %s (indices %s%s)", predictions_path,
                   len(strays), benchmark_path, ", ".join(strays[:5]),
                   ", ..." if len(strays) > 5 else "")
  skipped.sort(key=lambda s: s.row)
  return scoring.scored_report(benchmark, rows, skipped,
                               checkpoint={"predictions": str(predictions_path)},
                               settings={"predictions": str(predictions_path),
                                         "predictions_without_row": len(strays)})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--benchmark", required=True, help="the benchmark's VLMEvalKit .tsv file")
  parser.add_argument("--predictions", required=True,
                      help="predictions.jsonl (eval.py) or a VLMEvalKit .xlsx/.tsv/.csv")
  parser.add_argument("--output", help="directory for report.json, report.md, predictions.jsonl")
  parser.add_argument("--name", help="the benchmark name that picks the scoring "
                                     "(default: the file's stem)")
  parser.add_argument("--task", choices=TASKS, help="override the task detected from the TSV")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  try:
    report, rows = score_file(args.benchmark, args.predictions, name=args.name, task=args.task)
  except (BenchmarkError, PredictionsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.output:
    out = reports.write_outputs(args.output, report, rows)
    logger.info("wrote report.json, report.md and predictions.jsonl to %s", out)
  for line in reports.summary_lines(report):
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
