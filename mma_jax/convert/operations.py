"""The conversion operations, generic over formats: import, export, verify."""
from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np
from flax import nnx

from mma_jax.config import Config, ConfigError
from mma_jax.convert.formats import Format
from mma_jax.convert.llm import HF_LLM
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint, write_safetensors
from mma_jax.convert.store import load_model, save_model
from mma_jax.convert.transfer import build_with_params, export_params, import_params, param_shapes
from mma_jax.models import build_model

FORMATS: dict[str, Format] = {f.name: f for f in (HF_LLM,)}
DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ConfigError(f"--format '{name}' is unknown; choose one of: {', '.join(FORMATS)}")
  return FORMATS[name]


def abstract_model(config: Config) -> nnx.Module:
  return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))


def read_hf(fmt: Format, src, *, allow_pickle: bool = False, dtype=None, progress: bool = True,
            **options) -> tuple[Config, dict[str, np.ndarray]]:
  """An HF directory -> (our config, {path: numpy array}), streamed tensor by tensor."""
  src = pathlib.Path(src)
  config = fmt.read_config(src, **options)
  ckpt = HFCheckpoint(src, allow_pickle=allow_pickle, rename=fmt.rename)
  try:
    params = import_params(fmt.entries(config), ckpt, param_shapes(abstract_model(config)),
                           ignore=fmt.ignored(config), dtype=dtype, progress=progress)
  finally:
    ckpt.close()
  return config, params


def import_checkpoint(fmt: Format, src, dst, *, dtype: str = "f32", allow_pickle: bool = False,
                      **options) -> pathlib.Path:
  config, params = read_hf(fmt, src, allow_pickle=allow_pickle, dtype=DTYPES[dtype], **options)
  config.model.param_dtype = "bfloat16" if dtype == "bf16" else "float32"
  return save_model(dst, params, config)


def write_hf(fmt: Format, config: Config, params, dst, *, dtype: str = "f32") -> pathlib.Path:
  dst = pathlib.Path(dst)
  if (dst / "config.json").exists():
    raise CheckpointError(f"'{dst}' already holds an HF checkpoint; choose another --dst")
  files = fmt.hf_files(config)
  files["config.json"]["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16"}[dtype]
  write_safetensors(dst, export_params(fmt.entries(config), params, dtype=DTYPES[dtype]))
  for name, content in files.items():
    (dst / name).write_text(json.dumps(content, indent=2))
  return dst


def export_checkpoint(fmt: Format, src, dst, *, dtype: str = "f32") -> pathlib.Path:
  config, params = load_model(src)
  return write_hf(fmt, config, params, dst, dtype=dtype)


def verify(fmt: Format, src, *, seq_len: int, batch: int, seed: int = 0,
           allow_pickle: bool = False, **options) -> float:
  """Max |logit difference| between the PyTorch reference and ours, on valid positions."""
  config, params = read_hf(fmt, src, allow_pickle=allow_pickle, dtype=np.float32, **options)
  config.attention.impl = "dense"
  model = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  ours, ref, valid = fmt.compare(pathlib.Path(src), model, config, seq_len, batch, seed)
  if ours.shape != ref.shape:
    raise CheckpointError(f"logits shapes differ: ours {ours.shape}, reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)[valid]))
