"""Our converted checkpoints: an orbax tree of parameters plus the resolved config.

    CKPT_DIR/config.yaml   the full mma_jax config (model section from the import)
    CKPT_DIR/params/       orbax pytree checkpoint, nested by parameter path, one tensorstore
                           array per parameter (no OCDBT; StandardCheckpointer restores it)
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from mma_jax.config import Config, load_config, to_yaml
from mma_jax.convert.safetensors_io import CheckpointError
from mma_jax.convert.transfer import flatten, nest

CONFIG_FILE, PARAMS_DIR = "config.yaml", "params"
CHUNK_BYTES = 64 << 20     # tensorstore chunks: what the writer encodes and holds at a time


def save_model(directory: str | pathlib.Path, params: Mapping[str, np.ndarray],
               config: Config) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if (directory / PARAMS_DIR).exists():
    raise CheckpointError(f"'{directory}' already holds a checkpoint; choose another --dst")
  directory.mkdir(parents=True, exist_ok=True)
  tree = nest(params)
  chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
  with ocp.Checkpointer(_low_memory_handler()) as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(tree, save_args=chunked))
  (directory / CONFIG_FILE).write_text(to_yaml(config))
  return directory


def _low_memory_handler() -> ocp.PyTreeCheckpointHandler:
  """The pytree handler, set so that saving costs no memory beyond the params themselves (a 1B
  import: peak RSS 11.3 GiB with StandardCheckpointer's defaults, 4.5 GiB with these and the
  chunks below):
  - numpy arrays are written as they are: orbax deep-copies them by default in case the caller
    changes them during an async save, and this save is synchronous;
  - no OCDBT: its writer holds every array's encoded bytes until the final commit (one more copy
    of the model); without it each parameter is a tensorstore array of its own, written and
    released in turn (a converted model has few, large arrays: the layers are stacked);
  - at most 1 GB of arrays in flight to disk at a time (orbax's default allows 96).
  The arrays are also cut in CHUNK_BYTES chunks (save_model's SaveArgs): a whole 1 GB array was
  encoded in one piece."""
  numpy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, numpy))
  return ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, type_handler_registry=registry,
                                     use_ocdbt=False)


def load_model(directory: str | pathlib.Path) -> tuple[Config, dict[str, np.ndarray]]:
  """(config, {path: array}) of a checkpoint written by `save_model`."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / CONFIG_FILE).is_file() or not (directory / PARAMS_DIR).is_dir():
    raise CheckpointError(f"'{directory}' is not an mma_jax checkpoint "
                          f"(expected {CONFIG_FILE} and {PARAMS_DIR}/)")
  config = load_config(directory / CONFIG_FILE)
  params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR)
  return config, {k: np.asarray(v) for k, v in flatten(params).items()}
