"""The MMA ablation on the demo task: the same model, seeds and data order, trained and evaluated
under each attention mask mode.

    python -m mma_jax.ablation configs/demo.yaml --seeds 3 [--modes causal mma mma_bidir_image]
        [--output runs/ablation] [section.key=value ...]

Each (mode, seed) is an ordinary training run under OUTPUT/<mode>/seed<k>/ (train.seed = data.seed
= k, so every mode sees the same batches), so an interrupted ablation resumes where it stopped:
finished runs are only re-evaluated. Writes OUTPUT/results.json (every run's accuracies),
OUTPUT/ablation.md (mean ± std per question type) and OUTPUT/ablation.png (a bar chart).
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys

MODES = ("causal", "mma", "mma_bidir_image")
COLUMNS = ("yes_no", "shape", "color", "overall")


def run_one(config_path: str, overrides: list[str], mode: str, seed: int,
            run_dir: pathlib.Path) -> dict[str, float]:
  """Trains (or resumes) one run and returns its test accuracies per question type + overall."""
  from mma_jax.config import load_config
  from mma_jax.evaluate.easy_vqa import evaluate_config
  from mma_jax.train.loop import Run

  config = load_config(config_path, [*overrides, f"attention.mask={mode}", f"train.seed={seed}",
                                     f"data.seed={seed}", f"checkpoint.dir={run_dir}"])
  run = Run(config, run_dir)
  graphdef, state, _ = run.train()
  report = evaluate_config(config, graphdef, state["params"], state["frozen"], mesh=run.mesh)
  return {**report.per_type, "overall": report.accuracy}


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple]]:
  """{mode: {column: (mean, std)}}; std is the sample standard deviation (0 for one seed)."""
  table = {}
  for mode, runs in results.items():
    table[mode] = {}
    for column in COLUMNS:
      values = [r[column] for r in runs if column in r]
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      table[mode][column] = (statistics.fmean(values), std)
  return table


def markdown(table: dict, seeds: int, command: str) -> str:
  lines = [f"`{command}` — test accuracy, mean ± std over {seeds} seed(s)", "",
           "| mask | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for mode, row in table.items():
    cells = [f"{mean:.4f} ± {std:.4f}" for mean, std in (row[c] for c in COLUMNS)]
    lines.append(f"| {mode} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def bar_chart(table: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")   # files only, no display
  import matplotlib.pyplot as plt
  import numpy as np

  modes = list(table)
  x = np.arange(len(COLUMNS))
  width = 0.8 / len(modes)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  for i, mode in enumerate(modes):
    means = [table[mode][c][0] for c in COLUMNS]
    stds = [table[mode][c][1] for c in COLUMNS]
    ax.bar(x + (i - (len(modes) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
           label=mode)
  ax.set_xticks(x, COLUMNS)
  ax.set_ylim(0, 1)
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config")
  parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--modes", nargs="+", default=list(MODES))
  parser.add_argument("--output", default="runs/ablation")
  args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mma_jax.config import MASK_MODES, ConfigError, load_config

  bad = [m for m in args.modes if m not in MASK_MODES]
  if bad or args.seeds < 1:
    print(f"error: --modes must be among {MASK_MODES} and --seeds >= 1 (got {bad or args.seeds})",
          file=sys.stderr)
    return 2
  try:
    load_config(args.config, args.overrides)   # fail on a bad key before any training
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  from mma_jax.data.builder_utils import prepare_packaged
  data = load_config(args.config, args.overrides).data
  prepare_packaged(data.dataset, data.data_dir)

  results = {mode: [] for mode in args.modes}
  for seed in range(args.seeds):
    for mode in args.modes:
      accuracies = run_one(args.config, args.overrides, mode, seed, output / mode / f"seed{seed}")
      results[mode].append({"seed": seed, **accuracies})
      print(f"{mode} seed={seed} " + " ".join(f"{k}={v:.4f}" for k, v in accuracies.items()),
            flush=True)
  (output / "results.json").write_text(json.dumps(results, indent=1))
  table = summarize({m: [{k: v for k, v in r.items() if k != "seed"} for r in runs]
                     for m, runs in results.items()})
  command = "python -m mma_jax.ablation " + " ".join(sys.argv[1:] if argv is None else argv)
  text = markdown(table, args.seeds, command)
  (output / "ablation.md").write_text(text)
  bar_chart(table, output / "ablation.png",
            f"{pathlib.Path(args.config).stem}: attention mask ablation ({args.seeds} seeds)")
  print(text, end="")
  print(f"wrote {output / 'ablation.md'} and {output / 'ablation.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
