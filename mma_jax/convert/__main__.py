"""python -m mma_jax.convert {import,export,verify,assemble} ...

  import    --format FMT --src HF_DIR --dst CKPT_DIR [--dtype bf16|f32] [--allow-pickle]
  export    --format FMT --src CKPT_DIR|RUN_DIR --dst HF_DIR [--dtype bf16|f32]
            [--peft [--base-name NAME]]   (a LoRA run: merged weights, or a PEFT adapter)
  verify    --format FMT --src HF_DIR [--seq-len N] [--batch B] [--tol T]
            (last line: max_abs_logit_diff=<float>; exit 1 above --tol)
  assemble  --llm HF_DIR --vision HF_DIR (--connector perceiver|mlp | --config MODEL_YAML)
            --dst CKPT_DIR [--add-tokens N]   (--config: exactly that model, for model.init_from)

Formats: hf-llm (Llama/Qwen2/Phi-3), hf-vision (SigLIP/CLIP tower), llava, aki (AKI needs its
base models' config.json files: --llm-config, --vision-config, or a local HF cache).
"""
from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
  from mma_jax.convert.operations import FORMATS

  parser = argparse.ArgumentParser(prog="python -m mma_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("import", "export", "verify"):
    p = sub.add_parser(name)
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--src", required=True)
    if name != "verify":
      p.add_argument("--dst", required=True)
      p.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    if name == "export":
      p.add_argument("--peft", action="store_true",
                     help="a LoRA run as a PEFT adapter (adapter_model.safetensors + "
                          "adapter_config.json) instead of merged weights")
      p.add_argument("--base-name", help="--peft: adapter_config's base_model_name_or_path "
                                         "(default: the run's model.init_from)")
    if name != "export":
      p.add_argument("--allow-pickle", action="store_true",
                     help="load *.bin pickles (torch.load with weights_only=True)")
      p.add_argument("--llm-config", help="aki: the base LLM's config.json (file or directory)")
      p.add_argument("--vision-config", help="aki: the base vision model's config.json")
    if name == "verify":
      p.add_argument("--seq-len", type=int, default=32)
      p.add_argument("--batch", type=int, default=2)
      p.add_argument("--seed", type=int, default=0)
      p.add_argument("--tol", type=float, default=1e-4)
  p = sub.add_parser("assemble")
  p.add_argument("--llm", required=True, help="an HF LLM directory (hf-llm)")
  p.add_argument("--vision", required=True, help="an HF SigLIP/CLIP directory (hf-vision)")
  target = p.add_mutually_exclusive_group(required=True)
  target.add_argument("--connector", choices=("perceiver", "mlp"),
                      help="a fresh connector of this type, with its default sizes")
  target.add_argument("--config", help="the model to build, e.g. configs/model/aki_phi35.yaml: "
                      "its connector, vocabulary and head bias; the HF parts must match it")
  p.add_argument("--dst", required=True)
  p.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
  p.add_argument("--add-tokens", type=int, default=0,
                 help="new embedding rows for added special tokens (e.g. <image>)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--allow-pickle", action="store_true")
  return parser


def _source(src):
  """(config, params) of a training run directory (a LoRA run: its base + what it trained), or
  None for a converted checkpoint, which export reads itself."""
  import pathlib

  if not (pathlib.Path(src) / "checkpoints").is_dir():
    return None
  from mma_jax.train.base import read_base

  return read_base(src)


def _base_configs(args) -> dict:
  return {"llm_config": args.llm_config, "vision_config": args.vision_config}


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from mma_jax.config import ConfigError, load_config
  from mma_jax.convert import operations as ops
  from mma_jax.convert.safetensors_io import CheckpointError

  try:
    fmt = ops.get_format(args.format) if args.command != "assemble" else None
    if args.command == "import":
      out = ops.import_checkpoint(fmt, args.src, args.dst, dtype=args.dtype,
                                  allow_pickle=args.allow_pickle, **_base_configs(args))
      print(f"wrote {out}")
    elif args.command == "assemble":
      target = load_config(args.config).model if args.config else None
      out = ops.assemble(args.llm, args.vision, args.dst, connector=args.connector,
                         target=target, dtype=args.dtype,
                         add_tokens=args.add_tokens, seed=args.seed,
                         allow_pickle=args.allow_pickle)
      print(f"wrote {out}")
    elif args.command == "export":
      out = ops.export_checkpoint(fmt, args.src, args.dst, dtype=args.dtype, peft=args.peft,
                                  base_name=args.base_name, loaded=_source(args.src))
      print(f"wrote {out}")
    else:
      diff = ops.verify(fmt, args.src, seq_len=args.seq_len, batch=args.batch, seed=args.seed,
                        allow_pickle=args.allow_pickle, **_base_configs(args))
      print(f"tolerance={args.tol:g} {'ok' if diff <= args.tol else 'EXCEEDED'}")
      print(f"max_abs_logit_diff={diff:.6g}")
      return 0 if diff <= args.tol else 1
  except (CheckpointError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
