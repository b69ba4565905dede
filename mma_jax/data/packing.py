"""Examples -> rows of the batch contract: first-fit packing, or one example per padded row.

An example (from layout.py) is laid out alone: segment 1, positions from 0, windows counted from
its first token, image_token_index counted from its first image. Placing it at `offset` in a row
that already holds `k - 1` examples with `m` images:
  segment_ids         k (padding stays 0)
  positions           unchanged (they restart per example, so RoPE sees each example alone)
  window_lo/hi        + offset where the example has a window (lo < hi); lo = hi = 0 ("none") stays
  image_token_index   + m * num_image_tokens on image tokens; -1 (text) stays
so every query sees in the row exactly what it saw alone, shifted by `offset`.

Fields are numpy dicts with TOKEN_FIELDS ([L] each); images travel next to them in the pipeline.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mma_jax.layout import Example

TOKEN_FIELDS = ("tokens", "positions", "segment_ids", "window_lo", "window_hi", "targets",
                "loss_mask", "image_token_index")


def example_fields(example: Example) -> dict[str, np.ndarray]:
  """The per-token fields of a laid-out example."""
  return {name: getattr(example, name) for name in TOKEN_FIELDS}


def num_images(fields: dict[str, np.ndarray], num_image_tokens: int) -> int:
  return int(np.count_nonzero(fields["image_token_index"] >= 0)) // num_image_tokens


def truncate_answer(fields: dict[str, np.ndarray], max_length: int) -> dict[str, np.ndarray] | None:
  """An example longer than `max_length` cut inside an answer: the longest prefix of at most
  `max_length` tokens whose last position is still trained. Later turns are dropped whole, and no
  image is ever cut (images sit in prompts, which end before the answer they precede).

  None when no answer token fits, or a kept token's window would reach past the cut.
  """
  trained = np.flatnonzero(fields["loss_mask"][:max_length])
  if not trained.size:
    return None
  cut = int(trained[-1]) + 1
  if fields["window_hi"][:cut].max(initial=0) > cut:
    return None
  return {name: value[:cut] for name, value in fields.items()}


def first_fit(lengths: Sequence[int], image_counts: Sequence[int], max_length: int,
              max_images: int) -> list[list[int]]:
  """Indices of the examples in each row, rows in the order they were opened: each example goes
  into the first row with room for its tokens and its images, else opens a new row."""
  rows: list[list[int]] = []
  free_tokens: list[int] = []
  free_images: list[int] = []
  for i, (length, images) in enumerate(zip(lengths, image_counts)):
    if length > max_length or images > max_images:
      raise ValueError(f"example {i} ({length} tokens, {images} images) does not fit a row of "
                       f"{max_length} tokens and {max_images} images")
    for r in range(len(rows)):
      if free_tokens[r] >= length and free_images[r] >= images:
        break
    else:
      r = len(rows)
      rows.append([])
      free_tokens.append(max_length)
      free_images.append(max_images)
    rows[r].append(i)
    free_tokens[r] -= length
    free_images[r] -= images
  return rows


def empty_row(max_length: int) -> dict[str, np.ndarray]:
  """All padding: segment 0, no windows, no loss, no images."""
  row = {name: np.zeros(max_length, np.int32) for name in TOKEN_FIELDS}
  row["loss_mask"] = np.zeros(max_length, np.float32)
  row["image_token_index"] = np.full(max_length, -1, np.int32)
  return row


def merge_row(examples: Sequence[dict[str, np.ndarray]], max_length: int,
              num_image_tokens: int) -> dict[str, np.ndarray]:
  """Places `examples` one after another in a row of `max_length`, padded at the end."""
  row = empty_row(max_length)
  offset = images_before = 0
  for segment, ex in enumerate(examples, start=1):
    n = len(ex["tokens"])
    if offset + n > max_length:
      raise ValueError(f"examples of {[len(e['tokens']) for e in examples]} tokens exceed a row "
                       f"of {max_length}")
    at = slice(offset, offset + n)
    for name in ("tokens", "positions", "targets", "loss_mask"):
      row[name][at] = ex[name]
    row["segment_ids"][at] = segment
    has_window = ex["window_lo"] < ex["window_hi"]
    row["window_lo"][at] = np.where(has_window, ex["window_lo"] + offset, 0)
    row["window_hi"][at] = np.where(has_window, ex["window_hi"] + offset, 0)
    index = ex["image_token_index"]
    row["image_token_index"][at] = np.where(index >= 0, index + images_before * num_image_tokens,
                                            -1)
    offset += n
    images_before += num_images(ex, num_image_tokens)
  return row
