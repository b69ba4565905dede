"""python train.py configs/X.yaml [section.key=value ...]

Trains the model a config describes: from scratch or from a converted checkpoint
(model.init_from=CKPT_DIR), causal pre-training or MMA SFT (attention.mask), on one CPU, a TPU VM
or a pod slice (mesh.*). Writes under runs/<config name>/ (checkpoint.dir overrides) and resumes
from its newest checkpoint. On easy_vqa it ends with the test accuracy per question type and
`accuracy=<float> majority=<float> text_only=<float>`.

Multi-host outside TPU VMs: --coordinator HOST:PORT --num-processes N --process-id I.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a YAML file in configs/")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
  return parser.parse_args(argv)


def prepare_data(config) -> None:
  """Builds the dataset on first use when it ships with a package (easy_vqa)."""
  import tensorflow_datasets as tfds

  import mma_jax.data  # noqa: F401  registers the builders
  from mma_jax.data.builder_utils import prepare

  data = config.data
  if data.dataset != "easy_vqa":
    return
  builder = tfds.builder(data.dataset, data_dir=data.data_dir or None)
  if not builder.is_prepared():
    logging.info("building %s into %s (once)", data.dataset, builder.data_dir)
    prepare(data.dataset, data.data_dir or builder.data_dir_root)


def evaluate_easy_vqa(config, run) -> list[str]:
  import tensorflow_datasets as tfds

  from mma_jax.data.tokenizer import load_tokenizer
  from mma_jax.evaluate import easy_vqa
  from mma_jax.layout import ChatLayout
  from mma_jax.train.loop import image_tokens

  data = config.data
  source = lambda split: tfds.data_source("easy_vqa", split=split, data_dir=data.data_dir or None)
  tokenizer, _ = load_tokenizer(data.tokenizer, data.template)
  layout = ChatLayout(data.template, tokenizer, image_tokens(config), mode=config.attention.mask)
  state = run.state
  vision = config.model.vision
  tally = easy_vqa.evaluate(run.graphdef, state["params"], state["frozen"], layout,
                            source(data.eval_split), image_size=vision.image_size,
                            image_norm=vision.family, batch_size=config.eval.batch_size,
                            max_length=data.max_length, limit=config.eval.limit,
                            system_prompt=data.system_prompt)
  majority, text_only = easy_vqa.baselines(source(data.train_split), source(data.eval_split))
  return easy_vqa.report(tally, majority, text_only).lines()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every file it writes
  from mma_jax.config import ConfigError, load_config
  from mma_jax.sharding import initialize_distributed, is_main_process
  from mma_jax.train.loop import Run, TrainingError

  try:
    config = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  run_dir = pathlib.Path(config.checkpoint.dir or f"runs/{pathlib.Path(args.config).stem}")
  try:
    prepare_data(config)
    run = Run(config, run_dir)
    _, state, _ = run.train()
  except (TrainingError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  finished = int(state["step"]) >= config.train.steps
  if finished and not args.no_eval and config.data.dataset == "easy_vqa" and is_main_process():
    for line in evaluate_easy_vqa(config, run):
      print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
