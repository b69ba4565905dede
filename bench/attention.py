"""Attention benchmark: block counts (any machine) and timings (--tpu).

Default mode counts, for AKI-like rows (one 144-token image per example, a 16-256 token question,
short answers), the (q block, kv block) tiles each implementation visits per row and head:
  dense          every tile (XLA computes the full L x L scores)
  splash_causal  stock splash with a static causal mask: the lower triangle; its block skipping
                 sees the static mask only, not the segment ids
  splash_mma     stock splash with a static MMA mask (only for the "slots" layout, where every
                 image sits at a fixed offset and every question in a fixed-size slot)
  flash_fwd/dkv  our kernel's schedules (forward and dq visit flash_fwd tiles, dkv flash_dkv)
  flash_causal   our kernel's forward schedule for the same rows with causal windows (pre-training
                 mask): what MMA costs over causal within the same packing
  exact          tiles holding at least one allowed pair: the minimum any blocked kernel needs
Two layouts: "packed" (examples packed greedily into the row, then padding) and "slots" (fixed
slots of prefix + image + 256-token question slot + 128-token answer slot; what splash can take).
Implied attention FLOPs are proportional to visited tiles; `x causal` divides by splash_causal.

--tpu times forward and forward+backward of flash, flash_trimmed (max_steps = the most blocks any
row needs), splash-causal, splash-MMA and dense on the "slots" layout (the one layout all of them
can run). --dry-run runs that timing code on CPU in
interpret mode at a toy size, to check it end to end without a TPU.

  python bench/attention.py [--lengths 1024 2048 4096 8192] [--blocks 128 512] [--rows 4]
  python bench/attention.py --tpu [--heads 32 --kv-heads 32 --head-dim 96 --batch 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mma_jax.attention import mask as mask_lib  # noqa: E402
from mma_jax.attention.dense import attend_dense  # noqa: E402
from mma_jax.attention.flash import flash_attention  # noqa: E402
from mma_jax.attention.splash import MMAMask, StaticLayout, splash_attention  # noqa: E402

IMAGE_TOKENS = 144
PREFIX = 12          # <s>, system block, <|user|>\n before the image
HEADER = 4           # \n after the image ... <|end|>\n<|assistant|> (the window ends after it)
QUESTION_SLOT, ANSWER_SLOT = 256, 128
SLOT = PREFIX + IMAGE_TOKENS + QUESTION_SLOT + HEADER + ANSWER_SLOT


def aki_example(rng):
  """(length, image_start, image_end, header_end) of one AKI-like example."""
  image_start = PREFIX
  image_end = image_start + IMAGE_TOKENS
  header_end = image_end + int(rng.integers(16, QUESTION_SLOT + 1)) + HEADER
  return header_end + int(rng.integers(1, ANSWER_SLOT + 1)), image_start, image_end, header_end


def packed_row(rng, length):
  """Examples packed greedily (segments 1, 2, ...), padding (segment 0) after the last one."""
  seg, lo, hi = (np.zeros(length, np.int32) for _ in range(3))
  pos, segment = 0, 1
  while True:
    n, start, end, header_end = aki_example(rng)
    if pos + n > length:
      break
    seg[pos:pos + n] = segment
    lo[pos + start:pos + end], hi[pos + start:pos + end] = pos + end, pos + header_end
    pos, segment = pos + n, segment + 1
  return seg, lo, hi


def slot_row(rng, length):
  """Fixed slots: image at a fixed offset, question padded to its slot; windows are static."""
  seg, lo, hi = (np.zeros(length, np.int32) for _ in range(3))
  for slot in range(length // SLOT):
    pos = slot * SLOT
    seg[pos:pos + SLOT] = slot + 1
    start, end = pos + PREFIX, pos + PREFIX + IMAGE_TOKENS
    lo[start:end], hi[start:end] = end, end + QUESTION_SLOT + HEADER
  return seg, lo, hi


def layout(kind, rng, rows, length):
  make = packed_row if kind == "packed" else slot_row
  seg, lo, hi = zip(*(make(rng, length) for _ in range(rows)))
  return np.stack(seg), np.stack(lo), np.stack(hi)


def static_windows(lo, hi):
  """The static windows of a slots row (the same in every row) for splash's MMA mask."""
  windows, row, length = [], 0, lo.shape[1]
  while row < length:
    end = row
    while end < length and (lo[0, end], hi[0, end]) == (lo[0, row], hi[0, row]):
      end += 1
    if hi[0, row] > lo[0, row]:
      windows.append((row, end, int(lo[0, row]), int(hi[0, row])))
    row = end
  return tuple(windows)


def static_mask_blocks(length, block, windows):
  """Tiles a static splash mask visits: those where the static mask has any allowed pair."""
  mask = MMAMask((length, length), windows)[:, :]
  n = length // block
  return int(mask.reshape(n, block, n, block).any(axis=(1, 3)).sum())


def count_blocks(args):
  print(f"# visited (q block, kv block) tiles per row and head, mean over {args.rows} rows; "
        f"fwd GFLOP = 4 * tiles * block^2 * D * H for H={args.heads}, D={args.head_dim}")
  header = (f"{'layout':7} {'L':>5} {'blk':>4} {'dense':>7} {'spl_causal':>10} {'spl_mma':>8} "
            f"{'flash_fwd':>9} {'flash_dkv':>9} {'exact':>8} {'flash_causal':>12} "
            f"{'flash x causal':>14} {'exact x causal':>14} {'flash GFLOP':>11}")
  print(header)
  rng = np.random.default_rng(0)
  for length in args.lengths:
    for kind in ("packed", "slots"):
      seg, lo, hi = layout(kind, rng, args.rows, length)
      for block in args.blocks:
        if length % block:
          continue
        n = length // block
        fwd = mask_lib.forward_schedule(seg, lo, hi, block, block)
        bwd = mask_lib.backward_schedule(seg, lo, hi, block, block)
        exact = sum(int(mask_lib.needed_blocks(seg[r:r + 1], lo[r:r + 1], hi[r:r + 1],
                                               block, block).sum()) for r in range(args.rows))
        causal = n * (n + 1) // 2
        splash_mma = (static_mask_blocks(length, block, static_windows(lo, hi))
                      if kind == "slots" else None)
        flash_fwd = mask_lib.count_visited(fwd) / args.rows
        flash_dkv = mask_lib.count_visited(bwd) / args.rows
        no_window = np.zeros_like(lo)
        flash_causal = mask_lib.count_visited(mask_lib.forward_schedule(
            seg, no_window, no_window, block, block)) / args.rows
        exact /= args.rows
        gflop = 4 * flash_fwd * block * block * args.head_dim * args.heads / 1e9
        print(f"{kind:7} {length:5d} {block:4d} {n * n:7d} {causal:10d} "
              f"{'-' if splash_mma is None else splash_mma:>8} {flash_fwd:9.1f} {flash_dkv:9.1f} "
              f"{exact:8.1f} {flash_causal:12.1f} {flash_fwd / causal:14.3f} "
              f"{exact / causal:14.3f} {gflop:11.2f}")


def time_call(fn, *args, reps):
  """Compile, then the median wall time of `reps` runs, in ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def time_kernels(args, interpret):
  """Forward and forward+backward times on the slots layout (bf16)."""
  print(f"# backend={jax.default_backend()} devices={jax.devices()[0].device_kind} "
        f"B={args.batch} H={args.heads} K={args.kv_heads} D={args.head_dim} bf16; "
        f"median of {args.reps} runs, ms; slots layout")
  print(f"{'L':>5} {'blk':>4} {'impl':13} {'fwd_ms':>9} {'fwd+bwd_ms':>11}")
  rng = np.random.default_rng(0)
  for length in args.lengths:
    seg, lo, hi = layout("slots", rng, args.batch, length)
    if not static_windows(lo, hi):
      print(f"{length:5d}: shorter than one slot ({SLOT} tokens); skipped")
      continue
    mma = StaticLayout(static_windows(lo, hi))
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    q = jax.random.normal(keys[0], (args.batch, length, args.heads, args.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (args.batch, length, args.kv_heads, args.head_dim),
                              jnp.bfloat16) for key in keys[1:])
    for block in args.blocks:
      if length % block:
        continue
      blocks = dict(block_q=block, block_kv=block, interpret=interpret)
      # The most blocks any row needs: a grid that short drops flash's idle steps.
      need = max(int(np.asarray(schedule(seg, lo, hi, block, block))[..., 3].max())
                 for schedule in (mask_lib.forward_schedule, mask_lib.backward_schedule))
      impls = {
          "flash": lambda q, k, v: flash_attention(q, k, v, seg, lo, hi, **blocks),
          "flash_trimmed": lambda q, k, v: flash_attention(q, k, v, seg, lo, hi,
                                                           max_steps=need, **blocks),
          "splash_causal": lambda q, k, v: splash_attention(q, k, v, seg, StaticLayout.causal(),
                                                            **blocks),
          "splash_mma": lambda q, k, v: splash_attention(q, k, v, seg, mma, **blocks),
          "dense": lambda q, k, v: attend_dense(q, k, v, seg, lo, hi),
      }
      for name, attention in impls.items():
        if name == "dense" and block != args.blocks[0]:
          continue  # dense has no blocks
        forward = jax.jit(attention)
        backward = jax.jit(jax.grad(
            lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        try:
          fwd_ms = time_call(forward, q, k, v, reps=args.reps)
          bwd_ms = time_call(backward, q, k, v, reps=args.reps)
          print(f"{length:5d} {block:4d} {name:13} {fwd_ms:9.2f} {bwd_ms:11.2f}")
        except Exception as error:  # e.g. dense out of memory at long L: report, keep going
          print(f"{length:5d} {block:4d} {name:13} failed: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:100]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  parser.add_argument("--blocks", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--rows", type=int, default=4, help="rows averaged in the block counts")
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=96)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--tpu", action="store_true", help="time the kernels (needs a TPU)")
  parser.add_argument("--dry-run", action="store_true",
                      help="run the --tpu timing code on CPU in interpret mode at a toy size")
  args = parser.parse_args()
  if args.dry_run:
    args.lengths, args.blocks, args.heads, args.kv_heads = [1024], [128], 2, 1
    args.head_dim, args.batch, args.reps = 32, 1, 1
    time_kernels(args, interpret=True)
  elif args.tpu:
    if jax.default_backend() != "tpu":
      sys.exit(f"--tpu needs a TPU; the backend is {jax.default_backend()} (try --dry-run)")
    time_kernels(args, interpret=False)
  else:
    count_blocks(args)


if __name__ == "__main__":
  main()
