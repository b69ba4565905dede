"""Where a run's starting weights come from (model.init_from), and how a LoRA run names them.

model.init_from is a converted checkpoint (config.yaml + params/) or a training run directory
(its newest readable checkpoint; e.g. the demo trained in full, then LoRA on it). A LoRA run's
checkpoints hold only what it trains, so they record the base they were trained on:

    {"path": <absolute init_from, or "" for a seeded model>, "seed": train.seed,
     "fingerprint": <blake2b of every base parameter's path, dtype, shape and bytes>}

and a restore (resume, eval, export) checks the base it loads against it: a missing base or a
different one stops with one message naming both.
"""
from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mma_jax.config import Config, ConfigError, load_config
from mma_jax.convert.safetensors_io import CheckpointError
from mma_jax.convert.store import CONFIG_FILE, PARAMS_DIR, load_model
from mma_jax.convert.transfer import module_params
from mma_jax.train.checkpoint import RunCheckpoints


class BaseMismatch(ConfigError):
  """A LoRA checkpoint's base is missing or is not the one it was trained on."""


def read_base(path: str | pathlib.Path) -> tuple[Config, dict[str, np.ndarray]]:
  """(config, {path: numpy array}) of a converted checkpoint or of a run's newest checkpoint; a
  LoRA run's parameters are its base's with the run's adapters and trained modules on top (the
  base checked against the one the run recorded)."""
  from mma_jax.models import build_model
  from mma_jax.train.state import split_model

  path = pathlib.Path(path).absolute()
  if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
    return load_model(path)
  if not ((path / CONFIG_FILE).is_file() and (path / "checkpoints").is_dir()):
    raise CheckpointError(f"'{path}' is neither a converted checkpoint ({CONFIG_FILE} + "
                          f"{PARAMS_DIR}/) nor a training run ({CONFIG_FILE} + checkpoints/)")
  config = load_config(path / CONFIG_FILE)
  lora = config.model.lora.enabled
  build = lambda: build_model(config, nnx.Rngs(config.train.seed))
  abstract = nnx.eval_shape(build)
  _, params, frozen = split_model(abstract, config)
  checkpoints = RunCheckpoints(path, every=0, keep=1, async_save=False)
  try:
    restored = checkpoints.restore_model({"params": params, "frozen": frozen}, lora=lora)
  finally:
    checkpoints.close()
  if restored is None:
    raise CheckpointError(f"run '{path}' holds no readable checkpoint")
  step, state = restored[:2]
  flat = lambda tree: {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
                       for k, v in nnx.to_flat_state(tree)}
  if not lora:
    return config, {**flat(state["params"]), **flat(state["frozen"])}
  if config.model.init_from:
    try:
      _, base = read_base(config.model.init_from)
    except CheckpointError as e:
      raise missing_base(config, e) from None
  else:
    base = {k: np.asarray(v) for k, v in module_params(build()).items() if "lora_" not in k}
  check(restored[2], reference(config, base if config.model.init_from else None),
        f"step {step} in {path}")
  if config.model.lora.base_dtype:   # the base as the run saw it (e.g. rounded to bf16)
    dtype = jnp.dtype(config.model.lora.base_dtype)
    base = {k: v.astype(dtype) for k, v in base.items()}
  return config, {**base, **flat(state["params"])}


def fingerprint(params: dict[str, np.ndarray]) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for path in sorted(params):
    array = np.ascontiguousarray(params[path])
    digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
    digest.update(array.view(np.uint8).reshape(-1).data)
  return digest.hexdigest()


def reference(config: Config, params: dict[str, np.ndarray] | None) -> dict:
  """What a LoRA checkpoint records of its base (params: the base as read; None when seeded)."""
  init_from = config.model.init_from
  return {"path": str(pathlib.Path(init_from).absolute()) if init_from else "",
          "seed": config.train.seed,
          "fingerprint": fingerprint(params) if params is not None else ""}


def check(saved: dict | None, current: dict, where) -> None:
  if saved is None:
    raise BaseMismatch(f"checkpoint {where} records no base model: it was not written by a LoRA "
                       "run of this config (model.lora.rank > 0)")
  if saved.get("fingerprint") != current["fingerprint"] or (
      not current["path"] and saved.get("seed") != current["seed"]):
    name = lambda r: (f"'{r.get('path')}'" if r.get("path")
                      else f"a model seeded with train.seed={r.get('seed')}")
    raise BaseMismatch(
        f"checkpoint {where} was trained on the base {name(saved)} (fingerprint "
        f"{saved.get('fingerprint') or '-'}), but this run's base is {name(current)} "
        f"(fingerprint {current['fingerprint'] or '-'}); set model.init_from to the base it was "
        "trained on")


def missing_base(config: Config, error: Exception) -> BaseMismatch:
  return BaseMismatch(f"the LoRA base model.init_from='{config.model.init_from}' cannot be "
                      f"read: {error}")
