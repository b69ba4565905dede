"""The conversion operations, generic over formats: import, export, verify; and assemble."""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import ml_dtypes
import numpy as np
from flax import nnx

from mma_jax.config import Config, ConfigError, ConnectorConfig, ModelConfig, OriginConfig, validate
from mma_jax.convert.aki import AKI
from mma_jax.convert.formats import Format
from mma_jax.convert.llava import LLAVA
from mma_jax.convert.llm import HF_LLM
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint, write_safetensors
from mma_jax.convert.store import load_model, save_model
from mma_jax.convert.transfer import (build_with_params, check_exportable, export_params,
                                     import_params, module_params, param_shapes)
from mma_jax.convert.vision import HF_VISION
from mma_jax.models import build_model
from mma_jax.models.connector import build_connector
from mma_jax.models.lora import merged

FORMATS: dict[str, Format] = {f.name: f for f in (HF_LLM, HF_VISION, LLAVA, AKI)}
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
  entries = fmt.entries(config)
  check_exportable(entries, params, fmt.name)
  files = fmt.hf_files(config)
  if fmt.config_dtype:
    files["config.json"]["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16"}[dtype]
  write_safetensors(dst, export_params(entries, params, dtype=DTYPES[dtype]))
  for name, content in files.items():
    (dst / name).write_text(json.dumps(content, indent=2))
  return dst


def plain_config(config: Config) -> Config:
  """The config without LoRA: what a LoRA model is once its adapters are merged."""
  import dataclasses

  return dataclasses.replace(config, model=dataclasses.replace(
      config.model, lora=dataclasses.replace(config.model.lora, rank=0)))


def export_checkpoint(fmt: Format, src, dst, *, dtype: str = "f32", peft: bool = False,
                      base_name: str | None = None, loaded=None) -> pathlib.Path:
  """A converted checkpoint (or `loaded` = (config, params), e.g. a training run's) as `fmt`'s
  HF files; a LoRA model as merged weights, or with peft=True as a PEFT adapter directory."""
  config, params = loaded or load_model(src)
  lora = config.model.lora
  if peft:
    if not lora.enabled:
      raise CheckpointError(f"--peft: '{src}' is not a LoRA run (model.lora.rank is 0)")
    from mma_jax.convert.peft import write_adapter
    return write_adapter(fmt, config, params, dst, dtype=DTYPES[dtype],
                         base_name=base_name or config.model.init_from or None)
  if lora.enabled:
    params, config = merged(params, lora), plain_config(config)
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


def assemble(llm_src, vision_src, dst, *, connector: str = "", target: ModelConfig | None = None,
             dtype: str = "f32", add_tokens: int = 0, seed: int = 0,
             allow_pickle: bool = False) -> pathlib.Path:
  """A fresh MLLM, the start of pre-training: an HF LLM + an HF vision tower (each family's usual
  feature selection) + a newly initialised `connector`; `add_tokens` appends rows to the LLM's
  embedding (and head) for special tokens such as <image>.

  With `target` (a model config, e.g. configs/model/aki_phi35.yaml) the result is exactly that
  model, so `model.init_from` accepts it: the HF parts must have its architecture; its table is the
  first vocab_size - add_tokens HF rows plus `add_tokens` new ones (AKI's Decoupled embedding and
  head: the base rows past its tokenizer are dropped); a head bias starts as torch's nn.Linear
  bias (uniform within 1/sqrt(hidden)), as AKI's DecoupledLinear does.
  """
  llm_config, llm_params = read_hf(HF_LLM, llm_src, allow_pickle=allow_pickle, dtype=np.float32)
  tower_config, tower_params = read_hf(HF_VISION, vision_src, allow_pickle=allow_pickle,
                                       dtype=np.float32)
  llm, vision = llm_config.model.llm, tower_config.model.vision
  if target is None:
    connector_cfg = ConnectorConfig(type=connector)
    model = ModelConfig(llm=dataclasses.replace(llm, vocab_size=llm.vocab_size + add_tokens),
                        vision=vision, connector=connector_cfg,
                        origin=OriginConfig(format="assembled"))
  else:
    _check_matches(target.llm, llm, llm_src, ignore=_NAMING_FIELDS)
    _check_matches(target.vision, vision, vision_src, ignore=_FEATURE_CHOICE_FIELDS)
    model = copy.deepcopy(target)
  rows = model.llm.vocab_size - add_tokens
  table = llm_params["embed.embedding"]
  if rows > table.shape[0]:
    raise ConfigError(f"model.llm.vocab_size={model.llm.vocab_size} with --add-tokens "
                      f"{add_tokens} keeps {rows} rows, but {llm_src} has only {table.shape[0]}")
  rng = np.random.default_rng(seed)
  new_rows = lambda n: rng.normal(0.0, 0.02, (add_tokens, n)).astype(np.float32)
  llm_params["embed.embedding"] = np.concatenate([table[:rows], new_rows(table.shape[1])])
  if "lm_head.kernel" in llm_params:
    head = llm_params["lm_head.kernel"]
    llm_params["lm_head.kernel"] = np.concatenate([head[:, :rows], new_rows(head.shape[0]).T], 1)
  if model.llm.head_bias:
    bound = 1.0 / np.sqrt(model.llm.hidden_size)
    llm_params["head_bias"] = rng.uniform(-bound, bound, model.llm.vocab_size).astype(np.float32)
  fresh = build_connector(model.connector, vision.hidden_size, llm.hidden_size,
                          rngs=nnx.Rngs(int(rng.integers(2**31))))
  config = Config(model=model)
  config.attention.mask = "causal"  # pre-training is causal (DESIGN.md §1)
  validate(config)
  params = {**{f"llm.{k}": v for k, v in llm_params.items()},
            **{f"vision.{k}": v for k, v in tower_params.items()},
            **{f"connector.{k}": v for k, v in module_params(fresh).items()}}
  expected = param_shapes(abstract_model(config))
  wrong = sorted(k for k in expected.keys() | params.keys()
                 if k not in params or k not in expected or params[k].shape != expected[k][0])
  if wrong:
    raise CheckpointError(f"the assembled weights do not fit the model config: {', '.join(wrong)}")
  params = {k: v.astype(DTYPES[dtype]) for k, v in params.items()}
  config.model.param_dtype = "bfloat16" if dtype == "bf16" else "float32"
  return save_model(dst, params, config)


# Fields an MLLM config sets for itself rather than reads from the HF parts: the LLM's token ids,
# table size and head bias; the tower's feature selection.
_NAMING_FIELDS = ("vocab_size", "head_bias", "bos_token_id", "eos_token_ids", "pad_token_id")
_FEATURE_CHOICE_FIELDS = ("feature_layer", "post_norm", "drop_cls")


def _check_matches(wanted, found, src, *, ignore: tuple[str, ...]) -> None:
  differ = [f"{f.name}: config {getattr(wanted, f.name)!r}, checkpoint {getattr(found, f.name)!r}"
            for f in dataclasses.fields(wanted)
            if f.name not in ignore and getattr(wanted, f.name) != getattr(found, f.name)]
  if differ:
    raise ConfigError(f"{src} does not have the architecture of the model config: "
                      + "; ".join(differ))
