"""python -m mma_jax.data.preview CONFIG [section.key=value ...] [--n N] [--jsonl] [--split S]

What the model is fed: the first N training examples of a run config, drawn as training draws
them (the same pipeline, seed and mixture; process 0's shard), laid out by the pipeline's own
MakeExample. Per example: its dataset (the mixture component), id, the prompt text with `<image>`
marks, the trained target text, token counts and the attention mask mode.

  prompt  the decoded text of the example's tokens that are not trained (loss_mask 0 at the
          position predicting them), each image's run of tokens shown as one `<image>`
  target  the decoded text of the trained tokens (the answers, EOS included where the template
          trains it); several answers (multi-turn) are decoded as one run
  tokens, target_tokens, image_tokens, images; mask (the config's mode where the example has
  attention windows, else causal: captions and text-only layouts); truncated

--jsonl prints one JSON object per example with these keys; otherwise a short block each.
Records the pipeline skips are reported on stderr (dataset, id, reason). A config that does not
load or whose data cannot be opened exits with status 2 and the message.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

import numpy as np

from mma_jax.config import ConfigError, load_config

MAX_SKIPS = 1000   # consecutive skipped records before giving up (a source of broken rows only)


def describe(example: dict, *, dataset: str, layout, num_image_tokens: int,
             mask_mode: str) -> dict:
  """One example of MakeExample's output -> what the model sees of it (module docstring)."""
  tokens, image_index = example["tokens"], example["image_token_index"]
  trained = np.zeros(len(tokens), bool)
  trained[1:] = example["loss_mask"][:-1] > 0     # loss at t trains the token at t + 1
  # One `<image>` id per image: the first token of each image's run (they all hold that id).
  shown = (image_index < 0) | (image_index % num_image_tokens == 0)
  prompt_ids = np.where(image_index >= 0, layout.image_token_id, tokens)[~trained & shown]
  decode = lambda ids: layout.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)
  windows = bool((example["window_lo"] < example["window_hi"]).any())
  return {"dataset": dataset, "id": example["id"], "prompt": decode(prompt_ids),
          "target": decode(tokens[trained]), "tokens": int(len(tokens)),
          "target_tokens": int(trained.sum()), "image_tokens": int((image_index >= 0).sum()),
          "images": len(example["images"]), "mask": mask_mode if windows else "causal",
          "truncated": bool(example["truncated"])}


def previews(pipeline, n: int, mask_mode: str, on_skip=None):
  """The first `n` examples of `pipeline` (a DataPipeline) as `describe` dicts; skip records go
  to `on_skip(record)`."""
  layouts = {c.name: m.layout() for c, m in zip(pipeline.components, pipeline.make_examples)}
  found, skips = 0, 0
  for record in pipeline.examples():
    if "skip" in record:
      skips += 1
      if on_skip:
        on_skip(record)
      if skips >= MAX_SKIPS:
        raise ValueError(f"{MAX_SKIPS} records in a row were skipped; see the reasons above")
      continue
    skips = 0
    for example in record["examples"]:
      yield describe(example, dataset=record["dataset"], layout=layouts[record["dataset"]],
                     num_image_tokens=pipeline.num_image_tokens, mask_mode=mask_mode)
      found += 1
      if found >= n:
        return


def block(index: int, item: dict) -> str:
  head = (f"--- {index}. {item['dataset']}  id {item['id']}  mask {item['mask']}  "
          f"{item['tokens']} tokens ({item['image_tokens']} image, {item['target_tokens']} "
          f"target){'  truncated' if item['truncated'] else ''}")
  return f"{head}\n[prompt]\n{item['prompt']}\n[target]\n{item['target']}\n"


def num_image_tokens(config) -> int:
  """Rows per image in the LLM (as the training loop counts them: 1 for a text-only model)."""
  from mma_jax.models.connector import tokens_per_image
  m = config.model
  return tokens_per_image(m.connector, m.vision) if m.kind == "mllm" else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mma_jax.data.preview", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a run config (YAML)")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  parser.add_argument("--n", type=int, default=8, help="examples to show (default 8)")
  parser.add_argument("--jsonl", action="store_true", help="one JSON object per line")
  parser.add_argument("--split", help="the split to read (default: data.train_split, or each "
                      "mixture entry's split)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  logging.getLogger("mma_jax.data.mixture").setLevel(logging.INFO)   # builds on first use
  import mma_jax.data  # noqa: F401  registers the builders
  from mma_jax.data.mixture import MixtureError
  from mma_jax.data.pipeline import DataPipeline
  if args.n < 1:
    parser.error(f"--n {args.n} must be positive")
  try:
    config = load_config(args.config, args.overrides)
    with contextlib.redirect_stdout(sys.stderr):   # tfds narrates builds on stdout
      pipeline = DataPipeline.from_config(
          config, split=args.split or config.data.train_split,
          num_image_tokens=num_image_tokens(config), num_workers=0, process_index=0,
          process_count=1)
  except (ConfigError, MixtureError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  on_skip = lambda r: print(f"skipped {r['dataset']} {r['id']} ({r['skip']}): {r['message']}",
                            file=sys.stderr)
  for index, item in enumerate(previews(pipeline, args.n, config.attention.mask, on_skip), 1):
    print(json.dumps(item, ensure_ascii=False) if args.jsonl else block(index, item), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
