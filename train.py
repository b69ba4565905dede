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
  from mma_jax.data.builder_utils import prepare_packaged

  prepare_packaged(config.data.dataset, config.data.data_dir)


def evaluate_easy_vqa(config, run) -> list[str]:
  """The easy_vqa test report; eval.py prints the same lines for the run's checkpoint."""
  from mma_jax.evaluate import easy_vqa

  state = run.state
  return easy_vqa.evaluate_config(config, run.graphdef, state["params"], state["frozen"],
                                  mesh=run.mesh).lines()


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
