"""python eval.py --checkpoint DIR --benchmark NAME_OR_PATH [--limit N] [--batch-size B]
                  [--output DIR] [section.key=value ...]

Evaluates a training run (runs/<name>/: its newest readable checkpoint) or a converted
checkpoint (config.yaml + params/) on a benchmark, sharded over the config's mesh:

  easy_vqa        the demo's test split: accuracy per question type, then
                  `accuracy=<float> majority=<float> text_only=<float>` -- the lines train.py
                  prints for the same checkpoint and eval settings
  FILE.tsv        a VLMEvalKit benchmark file (MMBench, SEED-Bench, ScienceQA, RealWorldQA,
                  CV-Bench, MME, POPE, short-answer VQA); a bare NAME is NAME.tsv in --data-dir

Prints per-category lines and the headline metrics last; with --output writes report.json,
report.md and predictions.jsonl there (a benchmark file's predictions as each batch finishes:
re-running the same command after an interruption answers only the rest). Exit 2: a missing
checkpoint, an unknown benchmark, an unreadable file or a bad option.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

EXIT_USAGE = 2


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="a run directory (runs/<name>/) or a converted checkpoint directory")
  parser.add_argument("--benchmark", required=True, help="easy_vqa, a .tsv file or a name")
  parser.add_argument("--limit", type=int, help="only the first N questions (eval.limit)")
  parser.add_argument("--batch-size", type=int, help="questions per batch (eval.batch_size)")
  parser.add_argument("--output", help="directory for report.json, report.md, predictions.jsonl")
  parser.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens")
  parser.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                      help="multiple choice: generate and extract the letter (default), or pick "
                           "the option of highest log-likelihood as the answer")
  parser.add_argument("--loglik-choices", choices=("text", "letter"), default="text",
                      help="--mode loglik scores each option's text (default) or its letter")
  parser.add_argument("--length-normalized", action="store_true",
                      help="--mode loglik ranks by the mean log-probability per token of an "
                           "option instead of the sum")
  parser.add_argument("--prompts", choices=("vlmevalkit", "official", "training"),
                      help="benchmark prompts (eval.prompts): as VLMEvalKit builds them "
                           "(default), as the official AKI eval asks, or in our SFT tasks' words")
  parser.add_argument("--task", choices=("multiple_choice", "yes_no", "vqa"),
                      help="override the task detected from the TSV")
  parser.add_argument("--mask", help="attention mask mode (attention.mask): causal, mma, ...")
  parser.add_argument("--data-dir", default=os.environ.get("LMUData", "~/LMUData"),
                      help="where a benchmark NAME is looked up as NAME.tsv "
                           "(default $LMUData or ~/LMUData, as VLMEvalKit)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("overrides", nargs="*", help="section.key=value on the checkpoint's config")
  return parser.parse_args(argv)


def config_overrides(args) -> list[str]:
  """The flags as config overrides (the config is the one place settings live), then the
  user's own. A run's eval.limit is kept for easy_vqa (to print what training printed) but not
  for a benchmark file, which is read whole unless --limit says otherwise."""
  out = [] if args.benchmark == "easy_vqa" else ["eval.limit=0"]
  for flag, key in (("limit", "eval.limit"), ("batch_size", "eval.batch_size"),
                    ("max_new_tokens", "eval.max_new_tokens"), ("mask", "attention.mask"),
                    ("prompts", "eval.prompts")):
    if getattr(args, flag) is not None:
      out.append(f"{key}={getattr(args, flag)}")
  return out + list(args.overrides)


def benchmark_path(name: str, data_dir: str) -> pathlib.Path:
  path = pathlib.Path(name).expanduser()
  if path.suffix.lower() == ".tsv" or path.is_file():
    return path
  candidate = pathlib.Path(data_dir).expanduser() / f"{name}.tsv"
  if candidate.is_file():
    return candidate
  raise FileNotFoundError(f"unknown benchmark {name!r}: it is not easy_vqa, not a .tsv file and "
                          f"there is no {candidate}")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mma_jax.config import ConfigError
  from mma_jax.convert.safetensors_io import CheckpointError
  from mma_jax.evaluate import report as reports
  from mma_jax.evaluate.loading import CheckpointNotFound, load_for_eval
  from mma_jax.evaluate.predictions import PredictionLog, PredictionsError
  from mma_jax.evaluate.runner import EvalError, TsvRun, run_easy_vqa
  from mma_jax.evaluate.tsv import BenchmarkError, read_tsv
  from mma_jax.sharding import initialize_distributed, is_main_process
  from mma_jax.train.loop import TrainingError

  def fail(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE

  initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  try:
    benchmark = None
    if args.benchmark != "easy_vqa":   # read the file first: a bad one fails before the model
      benchmark = read_tsv(benchmark_path(args.benchmark, args.data_dir), task=args.task)
    loaded = load_for_eval(args.checkpoint, config_overrides(args))
    progress = not args.no_progress and is_main_process()
    if benchmark is None:
      report, predictions, lines = run_easy_vqa(loaded, progress)
    else:
      run = TsvRun(loaded, benchmark, args.mode, loglik_choices=args.loglik_choices,
                   length_normalized=args.length_normalized)
      # Predictions are appended as batches finish: the same command after a kill resumes.
      log = (PredictionLog(args.output, run.identity())
             if args.output and is_main_process() else None)
      report, predictions = run.run(progress=progress, log=log)
      lines = reports.summary_lines(report)
  except (FileNotFoundError, BenchmarkError, CheckpointNotFound, CheckpointError, ConfigError,
          EvalError, PredictionsError, TrainingError) as e:
    return fail(e)
  if not is_main_process():
    return 0
  if args.output:
    out = reports.write_outputs(args.output, report, predictions)
    logging.info("wrote report.json, report.md and predictions.jsonl to %s", out)
  for line in lines:
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
