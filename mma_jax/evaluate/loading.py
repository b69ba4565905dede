"""The model to evaluate, from a training run or a converted checkpoint, sharded over the mesh.

    runs/<name>/      config.yaml + checkpoints/<step>/ (train.py): the newest readable step's
                      params and frozen tower (the optimizer state is not read)
    CKPT_DIR/         config.yaml + params/ (python -m mma_jax.convert import)

Either way the directory's config.yaml, with the caller's `section.key=value` overrides on top,
is the config the model is built and evaluated with.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx
from jax.sharding import Mesh

from mma_jax.config import Config, load_config
from mma_jax.models import build_model, model_mesh
from mma_jax.sharding import tree_shardings
from mma_jax.train.checkpoint import RunCheckpoints
from mma_jax.train import base
from mma_jax.train.loop import initial_model, initial_model_and_base
from mma_jax.train.state import split_model

CONFIG_FILE = "config.yaml"


class CheckpointNotFound(ValueError):
  """The path is not a run or checkpoint directory, or holds no readable checkpoint."""


@dataclasses.dataclass
class LoadedModel:
  config: Config
  mesh: Mesh
  graphdef: object
  params: nnx.State       # trainable part (as in the train state)
  frozen: nnx.State       # the rest (a frozen tower)
  kind: str               # "run" or "converted"
  path: pathlib.Path
  step: int | None        # the run's step; None for a converted checkpoint

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params, self.frozen)

  def describe(self) -> dict:
    return {"path": str(self.path), "kind": self.kind, "step": self.step}


def checkpoint_kind(path: pathlib.Path) -> str:
  if not path.exists():
    raise CheckpointNotFound(f"checkpoint '{path}' does not exist")
  if (path / CONFIG_FILE).is_file() and (path / "checkpoints").is_dir():
    return "run"
  if (path / CONFIG_FILE).is_file() and (path / "params").is_dir():
    return "converted"
  raise CheckpointNotFound(f"'{path}' is neither a training run directory ({CONFIG_FILE} + "
                           f"checkpoints/) nor a converted checkpoint ({CONFIG_FILE} + params/)")


def load_for_eval(path: str | pathlib.Path, overrides=()) -> LoadedModel:
  path = pathlib.Path(path).absolute()
  kind = checkpoint_kind(path)
  config = load_config(path / CONFIG_FILE, overrides)
  mesh = model_mesh(config)
  if kind == "converted":
    config.model.init_from = str(path)
    graphdef, params, frozen = split_model(initial_model(config, mesh), config)
    return LoadedModel(config, mesh, graphdef, params, frozen, kind, path, None)

  # Abstract model -> shapes and shardings; the checkpoint's arrays land there directly.
  # A LoRA run's checkpoints hold no frozen base: it is model.init_from's, checked against the
  # base the run recorded.
  lora = config.model.lora.enabled
  if lora:
    model, base_ref = initial_model_and_base(config, mesh)
    graphdef, params, frozen = split_model(model, config)
    del model
  else:
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.train.seed)))
    graphdef, params, frozen = split_model(abstract, config)
  template = {"params": params, "frozen": frozen}
  shardings = tree_shardings(template, mesh)
  template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          template, shardings)
  if lora:
    template["frozen"] = frozen
  checkpoints = RunCheckpoints(path, every=0, keep=config.checkpoint.keep, async_save=False)
  try:
    restored = checkpoints.restore_model(template, lora=lora)
  finally:
    checkpoints.close()
  if restored is None:
    raise CheckpointNotFound(f"run '{path}' holds no checkpoint in checkpoints/ that reads "
                             "into this config's model (see the errors logged above)")
  step, state = restored[:2]
  if lora:
    base.check(restored[2], base_ref, f"step {step} in {path}")
  return LoadedModel(config, mesh, graphdef, state["params"], state["frozen"], kind, path, step)
