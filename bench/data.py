"""Data pipeline benchmark: examples/s, tokens/s and packing efficiency, packing vs padding-only,
for single datasets and a mixture.

Two datasets, both built offline with our tfds builders into a temporary directory:
  easy_vqa         one image, one question, a one-word answer (the demo's SFT data)
  llava_instruct   a fixture in LLaVA format made from easy_vqa's train split: every image with all
                   its questions as one multi-turn conversation (5-14 turns; a stand-in for
                   LLaVA-Instruct's long multi-turn rows, which cannot be downloaded here)
and a fixture mixture of the two (data.mixture's path: grain's weighted MapDataset.mix, one
packer across components; weights --mix-weights, easy_vqa first), standing in for the SFT
mixture's short-answer and conversation sources.
Each is run through DataPipeline (shuffled, phi3 template, the bundled GPT-2 BPE, MMA windows)
with first-fit packing and with one example per padded row. Reported per configuration:
  examples/s   examples leaving the pipeline per second (after a warm-up batch, over at least
               --examples examples)
  tokens/s     non-padding tokens (text + image tokens) leaving the pipeline per second
  efficiency   non-padding fraction of all row tokens (what the model computes usefully)
  rows/ex      rows per example (padding-only: 1)

  python bench/data.py [--examples 2000] [--max-length 1024] [--image-size 384] [--image-tokens 144]
                       [--workers 0] [--threads 8] [--batch-size 8] [--mix-weights 0.7 0.3]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow_datasets as tfds  # noqa: E402

from mma_jax.data.builder_utils import prepare  # noqa: E402
from mma_jax.data.easy_vqa import package_data_dir  # noqa: E402
from mma_jax.data.pipeline import Component, DataPipeline  # noqa: E402
from mma_jax.data.tokenizer import load_tokenizer  # noqa: E402


def write_llava_fixture(manual_dir: pathlib.Path) -> int:
  """easy_vqa train as LLaVA conversations: one per image, its questions as turns."""
  split_dir = package_data_dir() / "train"
  by_image = collections.defaultdict(list)
  for question, answer, image_id in json.loads((split_dir / "questions.json").read_text()):
    by_image[image_id].append((question, answer))
  rows = []
  for image_id, pairs in sorted(by_image.items()):
    turns = []
    for k, (question, answer) in enumerate(pairs):
      turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
      turns.append({"from": "gpt", "value": answer})
    rows.append({"id": str(image_id), "image": f"{image_id}.png", "conversations": turns})
  manual_dir.mkdir(parents=True)
  (manual_dir / "train.json").write_text(json.dumps(rows))
  (manual_dir / "images").symlink_to(split_dir / "images")
  return len(rows)


def measure(pipeline: DataPipeline, min_examples: int) -> dict:
  """Rates over the batches after the first, until `min_examples` examples have passed (many
  packing windows, so read-ahead does not flatter either mode)."""
  iterator = iter(pipeline)
  next(iterator)                       # warm-up: tokenizer, threads, first window
  examples = tokens = batches = 0
  start = time.perf_counter()
  while examples < min_examples:
    batch = next(iterator)
    examples += int(batch["segment_ids"].max(axis=1).sum())
    tokens += int((batch["segment_ids"] > 0).sum())
    batches += 1
  seconds = time.perf_counter() - start
  iterator.close()
  rows = batches * pipeline.batch_size
  return {"examples/s": examples / seconds, "tokens/s": tokens / seconds,
          "efficiency": tokens / (rows * pipeline.max_length), "rows/ex": rows / examples}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=2000, help="examples timed per run")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-length", type=int, default=1024)
  parser.add_argument("--image-size", type=int, default=384)
  parser.add_argument("--image-tokens", type=int, default=144)
  parser.add_argument("--images-per-row", type=int, default=8, help="image slots of a packed row")
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--threads", type=int, default=8)
  parser.add_argument("--mix-weights", type=float, nargs=2, default=(0.7, 0.3),
                      metavar=("EASY_VQA", "LLAVA"), help="the fixture mixture's weights")
  args = parser.parse_args(argv)

  tokenizer = load_tokenizer("gpt2", "phi3")[0]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    start = time.perf_counter()
    prepare("easy_vqa", tmp / "data")
    print(f"easy_vqa built in {time.perf_counter() - start:.1f} s")
    conversations = write_llava_fixture(tmp / "manual")
    start = time.perf_counter()
    prepare("llava_instruct", tmp / "data", tmp / "manual")
    print(f"llava_instruct fixture ({conversations} conversations) built in "
          f"{time.perf_counter() - start:.1f} s")

    print(f"\nbatch {args.batch_size} x {args.max_length} tokens, images {args.image_size} px -> "
          f"{args.image_tokens} tokens, {args.images_per_row} images/row, "
          f"workers {args.workers}, threads {args.threads}, >= {args.examples} examples timed")
    header = f"{'dataset':<16}{'rows':<10}{'examples/s':>12}{'tokens/s':>12}{'efficiency':>12}" \
             f"{'rows/ex':>9}"
    print(header)
    sources = {name: tfds.data_source(name, split="train", data_dir=str(tmp / "data"))
               for name in ("easy_vqa", "llava_instruct")}
    mixture = [Component(name, name, sources[name], weight)
               for name, weight in zip(sources, args.mix_weights)]
    runs = [(name, {"source": source, "dataset": name}) for name, source in sources.items()]
    runs.append(("mixture", {"components": mixture}))
    for label, data in runs:
      for packing in (True, False):
        pipeline = DataPipeline(
            **data, tokenizer=tokenizer, num_image_tokens=args.image_tokens,
            batch_size=args.batch_size, max_length=args.max_length, packing=packing,
            # A padded row holds one example: its image slots need only cover one example
            # (one image in both datasets here); packed rows need room for several.
            images_per_row=args.images_per_row if packing else 1, image_size=args.image_size,
            num_workers=args.workers, read_threads=args.threads, process_index=0,
            process_count=1)
        r = measure(pipeline, args.examples)
        print(f"{label:<16}{'packed' if packing else 'padded':<10}{r['examples/s']:>12.1f}"
              f"{r['tokens/s']:>12.0f}{r['efficiency']:>12.3f}{r['rows/ex']:>9.3f}", flush=True)
    print(f"mixture: the fixture mixture easy_vqa {args.mix_weights[0]} + llava_instruct "
          f"{args.mix_weights[1]} (data.mixture's grain mixing; not the SFT sources)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
