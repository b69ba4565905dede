"""Compile a run's program for a TPU slice on any machine (libtpu, no TPU, no network):

    python -m mma_jax.compile CONFIG.yaml --topology v5p-256 [--program train|prefill|decode]
        [--prompt-length P] [--images N] [--dump DIR] [section.key=value ...]

compiles exactly what `train.py CONFIG` runs (or eval.py's prefill / decode for the config's eval
shapes), the flash kernel by Mosaic, and prints the mesh, the compile time, the per-chip bytes of
the compiled executable beside the analytic planner's figure and the chip's HBM. The last lines:

    per_chip_bytes=<int>    arguments + temporaries + outputs - aliased (donated state)
    hbm_bytes=<int>
    fits=yes|no

Exit 0 when it fits, 1 when it does not, 2 on bad input. `--dump DIR` writes XLA's optimised HLO
there (--xla_dump_to). Topologies: v4-N and v5p-N count TensorCores (2 per chip), v5e-N /
v5litepod-N and v6e-N count chips; libtpu's own form (v5p:4x4x8) works too.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mma_jax.compile", add_help=True,
                              description="Deviceless TPU compile of a run's program.")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.key=value")
  p.add_argument("--topology", required=True, help="e.g. v5p-256, v5e-16, v6e-256, v4-128")
  p.add_argument("--program", default="train", choices=("train", "prefill", "decode"))
  p.add_argument("--prompt-length", type=int, default=None,
                 help="prefill/decode prompt tokens (default data.max_length, bucketed to 64)")
  p.add_argument("--images", type=int, default=1, help="prefill/decode image slots per prompt")
  p.add_argument("--dump", default=None, help="write the optimised HLO to this directory")
  return p


def main(argv=None) -> int:
  args = _parser().parse_intermixed_args(argv)
  if args.dump:  # read by XLA when the backend starts: before anything compiles
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump}"
  from mma_jax.compile.report import compile_report
  from mma_jax.compile.topology import TopologyError
  from mma_jax.config import ConfigError

  try:
    report = compile_report(args.config, args.overrides, topology=args.topology,
                            program=args.program, prompt_length=args.prompt_length,
                            images=args.images, progress=lambda line: print(line, flush=True))
  except (ConfigError, TopologyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report.lines))
  return 0 if report.fits else 1


if __name__ == "__main__":
  raise SystemExit(main())
