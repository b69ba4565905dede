"""Our converted checkpoints: an orbax tree of parameters plus the resolved config.

    CKPT_DIR/config.yaml   the full mma_jax config (model section from the import)
    CKPT_DIR/params/       orbax StandardCheckpointer tree, nested by parameter path
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np
import orbax.checkpoint as ocp

from mma_jax.config import Config, load_config, to_yaml
from mma_jax.convert.safetensors_io import CheckpointError
from mma_jax.convert.transfer import flatten, nest

CONFIG_FILE, PARAMS_DIR = "config.yaml", "params"


def save_model(directory: str | pathlib.Path, params: Mapping[str, np.ndarray],
               config: Config) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if (directory / PARAMS_DIR).exists():
    raise CheckpointError(f"'{directory}' already holds a checkpoint; choose another --dst")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, nest(params))
  checkpointer.wait_until_finished()
  (directory / CONFIG_FILE).write_text(to_yaml(config))
  return directory


def load_model(directory: str | pathlib.Path) -> tuple[Config, dict[str, np.ndarray]]:
  """(config, {path: array}) of a checkpoint written by `save_model`."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / CONFIG_FILE).is_file() or not (directory / PARAMS_DIR).is_dir():
    raise CheckpointError(f"'{directory}' is not an mma_jax checkpoint "
                          f"(expected {CONFIG_FILE} and {PARAMS_DIR}/)")
  config = load_config(directory / CONFIG_FILE)
  params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR)
  return config, {k: np.asarray(v) for k, v in flatten(params).items()}
