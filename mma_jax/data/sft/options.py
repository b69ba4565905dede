"""Multiple-choice options as the official AKI SFT code writes them, shuffled deterministically.

The official `optionize` (sft_data_utils/base_task.py) shuffles the options and renders them as
`A. first\\nB. second...`, the answer being the letter of the correct option. It shuffles the
record's stored list in place but keeps the original answer index, so from a record's second read
the letter can point at a wrong option. Here a copy is shuffled, with a generator seeded from the
example's key (dataset and id), so a build is deterministic and every letter is right.

Standard library only: tests/fixtures/official_sft/make_expected.py loads this file in the
official code's environment to draw the same order there.
"""
from __future__ import annotations

import hashlib
import random


def option_order(dataset: str, example_id: str, count: int) -> list[int]:
  """The shuffled order of an example's `count` options: a permutation of range(count), the
  same on every build and machine (sha256 of `{dataset}/{example_id}` seeds it, not Python's
  salted hash)."""
  key = f"{dataset}/{example_id}"
  seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
  order = list(range(count))
  random.Random(seed).shuffle(order)
  return order


def letter(index: int) -> str:
  return chr(ord("A") + index)


def options_text(options: list[str], answer_index: int, order: list[int]) -> tuple[str, str]:
  """(`A. ..\\nB. ..` in `order`, the letter of options[answer_index]), as `optionize` renders
  them (upper-case letters with a dot, one option a line, no trailing newline)."""
  lines = [f"{letter(i)}. {options[k]}" for i, k in enumerate(order)]
  return "\n".join(lines), letter(order.index(answer_index))
