"""python -m mma_jax.evaluate.easy_vqa_mcq OUT.tsv [--split test] [--limit N] [--options 4]
                                          [--seed 0] [--data-dir DIR]

Writes easy_vqa as a multiple-choice benchmark in VLMEvalKit's TSV format, so that the demo
checkpoint can be scored the way the paper's MCQ benchmarks are (eval.py --benchmark OUT.tsv, in
generate or loglik mode). Each question's options are its answer and distractors drawn from the
answers of its own question type (up to --options; a yes/no question offers yes and no, a shape
question the three shapes), shuffled, so that no option can be ruled out by its type alone; the
seed makes the file reproducible. Columns: index, question, A.., answer (letter), category (question type), image
(base64 PNG, stored once and referred to by index afterwards, as VLMEvalKit's files do).
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import pathlib
import string
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm


def answer_vocabulary(source) -> dict[str, list[str]]:
  """{question type: its answers, sorted}."""
  from mma_jax.data.pipeline import as_text
  answers = {}
  for i in range(len(source)):
    record = source[i]
    answers.setdefault(as_text(record["question_type"]), set()).add(as_text(record["answer"]))
  return {kind: sorted(values) for kind, values in sorted(answers.items())}


def write_mcq_tsv(source, path: str | pathlib.Path, *, answers: dict[str, list[str]],
                  num_options: int = 4, limit: int = 0, seed: int = 0,
                  progress: bool = True) -> pathlib.Path:
  from mma_jax.data.pipeline import as_text
  if not 2 <= num_options <= 26:
    raise ValueError(f"--options must be between 2 and 26, got {num_options}")
  rng = np.random.default_rng(seed)
  letters = list(string.ascii_uppercase[:num_options])
  count = min(limit, len(source)) if limit else len(source)
  image_rows: dict[bytes, int] = {}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "question", *letters, "answer", "category", "image"])
    for i in tqdm(range(count), desc="easy_vqa mcq", unit="question", disable=not progress):
      record = source[i]
      gold, kind = as_text(record["answer"]), as_text(record["question_type"])
      others = [a for a in answers[kind] if a != gold]
      count = min(num_options - 1, len(others))
      options = [gold, *rng.choice(others, count, replace=False).tolist()]
      options = [options[k] for k in rng.permutation(len(options))]
      image = np.asarray(record["image"]).tobytes()
      if image in image_rows:
        image_cell = str(image_rows[image])
      else:
        image_rows[image] = i
        image_cell = _png_base64(np.asarray(record["image"]))
      cells = options + [""] * (num_options - len(options))       # an empty cell: no option
      writer.writerow([i, as_text(record["question"]), *cells, letters[options.index(gold)],
                       kind, image_cell])
  return path


def _png_base64(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("output", help="the .tsv file to write")
  parser.add_argument("--split", default="test")
  parser.add_argument("--limit", type=int, default=0, help="only the first N questions")
  parser.add_argument("--options", type=int, default=4, help="options per question")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir", default="", help="tfds data_dir (default: tfds' own)")
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds

  from mma_jax.data.builder_utils import prepare_packaged
  prepare_packaged("easy_vqa", args.data_dir)
  open_split = lambda split: tfds.data_source("easy_vqa", split=split,
                                              data_dir=args.data_dir or None)
  try:
    source = open_split(args.split)
  except (ValueError, KeyError) as e:
    print(f"error: easy_vqa has no split {args.split!r} ({e})", file=sys.stderr)
    return 2
  try:
    out = write_mcq_tsv(source, args.output, answers=answer_vocabulary(open_split("train")),
                        num_options=args.options, limit=args.limit, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
