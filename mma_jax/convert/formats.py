"""What a checkpoint format is: how an HF directory's config and tensors map onto an mma_jax
model, and how to run its PyTorch reference for `verify`. Formats live beside their key maps
(llm.py, vision.py, llava.py, aki.py); operations.py runs them."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import numpy as np

from mma_jax.config import Config
from mma_jax.convert.keymap import Entry
from mma_jax.convert.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  # (HF dir, options) -> our config; options: llm_config / vision_config paths (AKI's base models)
  read_config: Callable[..., Config]
  # our config -> {file name: JSON dict} written by export (config.json at least)
  hf_files: Callable[[Config], dict[str, dict]]
  entries: Callable[[Config], list[Entry]]
  ignored: Callable[[Config], tuple[str, ...]]
  # (HF dir, our model, config, seq_len, batch, seed) -> (ours, reference, valid) logits
  compare: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
  rename: Callable[[str], str] | None = None   # stored key -> canonical key (several layouts)
  # export records torch_dtype in config.json, as transformers configs do (AKI's config.json
  # holds its constructor's arguments only)
  config_dtype: bool = True


def read_json(path: str | pathlib.Path) -> dict:
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise CheckpointError(f"'{path}' does not exist")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None


def right_padded_batch(batch: int, seq_len: int, vocab: int, seed: int):
  """Random tokens with per-row lengths in [seq_len/2, seq_len], right padding (id 0); row 0 is
  full length. Returns (tokens int32 [B, L], valid bool [B, L])."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=batch)
  lengths[0] = seq_len
  valid = np.arange(seq_len)[None, :] < lengths[:, None]
  tokens = np.where(valid, rng.integers(0, vocab, size=(batch, seq_len)), 0).astype(np.int32)
  return tokens, valid
