"""Checkpoint formats and the three operations on them: import, export, verify.

A `Format` says how an HF directory's config and tensors map onto an mma_jax model and how to run
the HF reference for `verify`. The operations below are generic over formats.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import ml_dtypes
import numpy as np
from flax import nnx

from mma_jax.config import Config, ConfigError, ModelConfig
from mma_jax.convert import llm as llm_maps
from mma_jax.convert.keymap import Entry, expand
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint, write_safetensors
from mma_jax.convert.store import load_model, save_model
from mma_jax.convert.transfer import build_with_params, export_params, import_params, param_shapes
from mma_jax.models import build_model

DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  read_config: Callable[[pathlib.Path], Config]          # HF dir -> our config
  hf_config: Callable[[Config], dict]                    # our config -> config.json
  entries: Callable[[Config], list[Entry]]
  ignored: Callable[[Config], tuple[str, ...]]
  # (HF dir, our model, config, seq_len, batch, seed) -> (ours, reference, valid) logits
  compare: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise CheckpointError(f"'{path}' does not exist")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None


# -------------------------------------------------------------------------------------------- hf-llm
def _llm_read_config(src: pathlib.Path) -> Config:
  return Config(model=ModelConfig(llm=llm_maps.llm_config_from_hf(read_json(src / "config.json"))),
                attention=dataclasses.replace(Config().attention, mask="causal"))


def right_padded_batch(batch: int, seq_len: int, vocab: int, seed: int):
  """Random tokens with per-row lengths in [seq_len/2, seq_len], right padding (id 0)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=batch)
  lengths[0] = seq_len
  valid = np.arange(seq_len)[None, :] < lengths[:, None]
  tokens = np.where(valid, rng.integers(0, vocab, size=(batch, seq_len)), 0).astype(np.int32)
  return tokens, valid


def _llm_compare(src, model, config: Config, seq_len: int, batch: int, seed: int):
  import torch
  import transformers

  tokens, valid = right_padded_batch(batch, seq_len, config.model.llm.vocab_size, seed)
  reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = reference(input_ids=torch.from_numpy(tokens).long(),
                    attention_mask=torch.from_numpy(valid.astype(np.int64))).logits.numpy()
  segment_ids = valid.astype(np.int32)
  zeros = np.zeros_like(segment_ids)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  ours = np.asarray(model(tokens=tokens, positions=positions, segment_ids=segment_ids,
                          window_lo=zeros, window_hi=zeros))
  return ours, ref, valid


HF_LLM = Format(
    name="hf-llm",
    read_config=_llm_read_config,
    hf_config=lambda c: llm_maps.llm_config_to_hf(c.model.llm),
    entries=lambda c: expand(llm_maps.llm_rules(c.model.llm), c.model.llm.num_layers),
    ignored=lambda c: llm_maps.llm_ignored(c.model.llm),
    compare=_llm_compare,
)

FORMATS: dict[str, Format] = {f.name: f for f in (HF_LLM,)}


# ------------------------------------------------------------------------------------- operations
def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ConfigError(f"--format '{name}' is unknown; choose one of: {', '.join(FORMATS)}")
  return FORMATS[name]


def _abstract(config: Config):
  return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))


def read_hf(fmt: Format, src: pathlib.Path, *, allow_pickle: bool = False, dtype=None,
            progress: bool = True) -> tuple[Config, dict[str, np.ndarray]]:
  """An HF directory -> (our config, {path: numpy array}), streamed tensor by tensor."""
  config = fmt.read_config(src)
  ckpt = HFCheckpoint(src, allow_pickle=allow_pickle)
  try:
    params = import_params(fmt.entries(config), ckpt, param_shapes(_abstract(config)),
                           ignore=fmt.ignored(config), dtype=dtype, progress=progress)
  finally:
    ckpt.close()
  return config, params


def import_checkpoint(fmt: Format, src, dst, *, dtype: str = "f32", allow_pickle: bool = False
                      ) -> pathlib.Path:
  config, params = read_hf(fmt, pathlib.Path(src), allow_pickle=allow_pickle,
                           dtype=DTYPES[dtype])
  config.model.param_dtype = "bfloat16" if dtype == "bf16" else "float32"
  return save_model(dst, params, config)


def export_checkpoint(fmt: Format, src, dst, *, dtype: str = "f32") -> pathlib.Path:
  config, params = load_model(src)
  dst = pathlib.Path(dst)
  if (dst / "config.json").exists():
    raise CheckpointError(f"'{dst}' already holds an HF checkpoint; choose another --dst")
  hf_config = fmt.hf_config(config)
  hf_config["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16"}[dtype]
  write_safetensors(dst, export_params(fmt.entries(config), params, dtype=DTYPES[dtype]))
  (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
  return dst


def verify(fmt: Format, src, *, seq_len: int, batch: int, seed: int = 0,
           allow_pickle: bool = False) -> float:
  """Max |logit difference| between the HF PyTorch model and ours, on valid positions."""
  src = pathlib.Path(src)
  config, params = read_hf(fmt, src, allow_pickle=allow_pickle, dtype=np.float32)
  config.attention.impl = "dense"
  model = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  ours, ref, valid = fmt.compare(src, model, config, seq_len, batch, seed)
  if ours.shape != ref.shape:
    raise CheckpointError(f"logits shapes differ: ours {ours.shape}, reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)[valid]))
