"""Checkpoint import: wall time and peak memory of `python -m mma_jax.convert import --format hf-llm`.

Writes a random HF Llama checkpoint of about --params parameters (GQA, SwiGLU; the dimensions of
TinyLlama-1.1B at the default 1e9, smaller ones below) in --shards safetensors shards with a
model.safetensors.index.json, using our streaming writer (convert.safetensors_io.write_safetensors:
tensors are generated one at a time and at most one shard is held in memory), then runs the import
in a subprocess and reports:
  ckpt_GiB      bytes of the safetensors shards
  wall_s        wall time of the import command (python start-up and imports included)
  peak_rss_GiB  the subprocess's peak resident set (os.wait4 rusage ru_maxrss; /proc VmRSS is
                polled too, to say when the peak came)
  over_GiB      peak RSS - checkpoint size; the target is <= 1 GiB (one copy of the model in
                memory, plus the interpreter, jax and one tensor or shard in flight)

  python bench/convert.py [--params 1e9] [--shards 4] [--dtype f32|bf16] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from mma_jax.config import LLMConfig  # noqa: E402
from mma_jax.convert.llm import llm_config_to_hf  # noqa: E402
from mma_jax.convert.safetensors_io import write_safetensors  # noqa: E402
from run_header import run_header  # noqa: E402  (bench/, the script's folder)

GIB = 1 << 30
DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


def llama_config(params: float) -> LLMConfig:
  """Llama dimensions with about `params` parameters: the widest hidden size (from 2048 down)
  whose embedding + head and two layers each take at most half the budget, then as many layers as
  fit."""
  vocab = 32000 if params >= 1e8 else 1024
  for hidden in (2048, 1024, 512, 256, 128, 64):
    heads = hidden // 64
    kv_heads = max(1, heads // 8)
    mlp = 64 * round(2.75 * hidden / 64)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * mlp + 2 * hidden
    if 2 * vocab * hidden <= params / 2 and 2 * per_layer <= params / 2:
      break
  layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
  return LLMConfig(family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                   num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                   eos_token_ids=[2], pad_token_id=0)


def llama_shapes(c: LLMConfig) -> list[tuple[str, tuple[int, ...]]]:
  """HF LlamaForCausalLM tensor names and shapes, in state_dict order."""
  e, q, kv = c.hidden_size, c.num_heads * c.dim_per_head, c.num_kv_heads * c.dim_per_head
  shapes = [("model.embed_tokens.weight", (c.vocab_size, e))]
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes += [(p + "self_attn.q_proj.weight", (q, e)), (p + "self_attn.k_proj.weight", (kv, e)),
               (p + "self_attn.v_proj.weight", (kv, e)), (p + "self_attn.o_proj.weight", (e, q)),
               (p + "mlp.gate_proj.weight", (c.intermediate_size, e)),
               (p + "mlp.up_proj.weight", (c.intermediate_size, e)),
               (p + "mlp.down_proj.weight", (e, c.intermediate_size)),
               (p + "input_layernorm.weight", (e,)), (p + "post_attention_layernorm.weight", (e,))]
  return shapes + [("model.norm.weight", (e,)), ("lm_head.weight", (c.vocab_size, e))]


def random_tensors(shapes, dtype, seed: int = 0):
  """(name, array) pairs generated one at a time: N(0, 0.02) weights, norm scales near 1."""
  rng = np.random.default_rng(seed)
  for name, shape in shapes:
    if len(shape) == 1:
      array = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
      array = rng.standard_normal(shape, dtype=np.float32)
      array *= 0.02
    yield name, array.astype(dtype, copy=False)


def write_checkpoint(directory: pathlib.Path, c: LLMConfig, dtype: str, shards: int) -> float:
  """Writes the checkpoint; returns seconds taken."""
  start = time.perf_counter()
  shapes = llama_shapes(c)
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  total = sum(math.prod(s) for _, s in shapes) * itemsize
  write_safetensors(directory, random_tensors(shapes, DTYPES[dtype]),
                    max_shard_bytes=math.ceil(total / shards))
  hf = llm_config_to_hf(c)
  hf["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16"}[dtype]
  (directory / "config.json").write_text(json.dumps(hf, indent=2))
  return time.perf_counter() - start


def rss_bytes(pid: int) -> int:
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return 0


def run_measured(command: list[str], log: pathlib.Path) -> dict:
  """Runs `command`, polling its RSS; wall time, exit code, peak RSS (rusage) and when it came."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  with open(log, "w") as out:
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    polled, polled_at = 0, 0.0
    while True:
      pid, status, usage = os.wait4(child.pid, os.WNOHANG)
      if pid:
        break
      rss = rss_bytes(child.pid)
      if rss > polled:
        polled, polled_at = rss, time.perf_counter() - start
      time.sleep(0.05)
    wall = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)   # reaped by wait4 above
  return {"wall": wall, "rc": child.returncode, "peak": usage.ru_maxrss * 1024,
          "polled": polled, "polled_at": polled_at}


def dir_bytes(directory: pathlib.Path, pattern: str = "**/*") -> int:
  return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params", type=float, default=1e9, help="about this many parameters")
  parser.add_argument("--shards", type=int, default=4, help="about this many safetensors shards")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                      help="checkpoint dtype; the import keeps it (--dtype of the import)")
  parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary dir)")
  parser.add_argument("--keep", action="store_true",
                      help="keep the checkpoints (a later run with the same --workdir, --params, "
                           "--shards and --dtype reuses the HF checkpoint)")
  args = parser.parse_args(argv)
  header = run_header("convert.py", argv)

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
  workdir.mkdir(parents=True, exist_ok=True)
  c = llama_config(args.params)
  hf_dir = workdir / f"hf-llama-{args.params:.0e}-{args.dtype}-{args.shards}"
  out_dir = workdir / f"imported-{args.params:.0e}-{args.dtype}-{args.shards}"
  try:
    if (hf_dir / "config.json").is_file():
      wrote = "reused"
    else:
      shutil.rmtree(hf_dir, ignore_errors=True)
      wrote = f"written in {write_checkpoint(hf_dir, c, args.dtype, args.shards):.1f} s"
    shutil.rmtree(out_dir, ignore_errors=True)
    shards = sorted(hf_dir.glob("*.safetensors"))
    ckpt = sum(p.stat().st_size for p in shards)
    count = sum(math.prod(s) for _, s in llama_shapes(c))
    import_cmd = [sys.executable, "-m", "mma_jax.convert", "import", "--format", "hf-llm",
                  "--src", str(hf_dir), "--dst", str(out_dir), "--dtype", args.dtype]
    result = run_measured(import_cmd, workdir / "import.log")
    if result["rc"] != 0:
      print((workdir / "import.log").read_text()[-3000:], file=sys.stderr)
      print(f"error: the import exited with {result['rc']} (log: {workdir / 'import.log'})",
            file=sys.stderr)
      return 1
    imported = dir_bytes(out_dir)
    over = result["peak"] - ckpt
    print(header)
    print(f"# checkpoint: llama E={c.hidden_size} layers={c.num_layers} heads={c.num_heads}/"
          f"{c.num_kv_heads} mlp={c.intermediate_size} vocab={c.vocab_size}: {count:,} "
          f"parameters, {args.dtype}, {len(shards)} shards + index, {ckpt / GIB:.3f} GiB "
          f"({wrote}); our checkpoint (orbax) {imported / GIB:.3f} GiB")
    print(f"# import: {' '.join(shlex.quote(a) for a in ['python'] + import_cmd[1:])}")
    print(f"# peak RSS from os.wait4 ru_maxrss; /proc VmRSS polling saw "
          f"{result['polled'] / GIB:.3f} GiB at {result['polled_at']:.1f} s of "
          f"{result['wall']:.1f} s; {os.cpu_count()} CPUs")
    print(f"{'params':>14}{'ckpt_GiB':>10}{'shards':>8}{'wall_s':>9}{'peak_rss_GiB':>14}"
          f"{'over_GiB':>10}  target")
    print(f"{count:>14,}{ckpt / GIB:>10.3f}{len(shards):>8}{result['wall']:>9.1f}"
          f"{result['peak'] / GIB:>14.3f}{over / GIB:>10.3f}  "
          f"{'ok' if over <= GIB else 'OVER'} (peak RSS <= checkpoint + 1 GiB)")
  finally:
    if not args.keep:
      shutil.rmtree(out_dir, ignore_errors=True)
      shutil.rmtree(hf_dir, ignore_errors=True)
      if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
      else:
        (workdir / "import.log").unlink(missing_ok=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
