"""Run checkpoints with orbax: items `state` (train state), `data` (the input iterator's state)
and `config` (the resolved run config), saved asynchronously every N steps, K kept. A LoRA run
(`base` given) leaves the frozen base out of `state` and writes an item `base` naming it
(train/base.py); its restores take the frozen part from the live state and return the saved
`base` for the caller to check.

Restore reads the newest step whose files are complete and readable; a corrupt or incomplete one
is reported and the one before it used. The target shardings decide where arrays land, so a run
restores onto any mesh.
"""
from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from mma_jax.config import Config, to_dict

log = logging.getLogger(__name__)


class RunCheckpoints:
  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save))

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config: Config,
           base: dict | None = None) -> None:
    extra = {} if base is None else {"base": ocp.args.JsonSave(base)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_stored(state, base)), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(to_dict(config)), **extra), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state_template, *, lora: bool = False
              ) -> tuple[int, object, dict] | tuple[int, object, dict, dict] | None:
    """(step, state, data state) of the newest readable checkpoint, or None for a fresh run.
    `state_template` gives the tree, dtypes and target shardings. lora: the checkpoint holds no
    frozen part (it is the template's) and the result has a 4th item, the saved base (or None)."""
    abstract = _abstract(_stored(state_template, lora or None))
    extra = {"base": ocp.args.JsonRestore()} if lora else {}
    restored = self._newest(lambda step: self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        **self._present(step, extra))))
    if restored is None:
      return None
    step, items = restored
    if not lora:
      return step, items.state, items.data
    state = {**items.state, "frozen": state_template["frozen"]}
    return step, state, items.data, items.get("base")

  def restore_model(self, template, *, lora: bool = False) -> tuple[int, dict] | None:
    """(step, {"params", "frozen"}) of the newest readable checkpoint, reading only those parts
    of the train state (evaluation needs no optimizer state). `template`: {"params": ...,
    "frozen": ...} giving the tree, dtypes and target shardings (abstract arrays will do).
    lora: "frozen" is the template's own and the result has a 3rd item, the saved base."""
    abstract = _abstract(_stored(template, lora or None))
    extra = {"base": ocp.args.JsonRestore()} if lora else {}
    restored = self._newest(lambda step: self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True), **self._present(step, extra))))
    if restored is None:
      return None
    step, items = restored
    if not lora:
      return step, items.state
    return step, {**items.state, "frozen": template["frozen"]}, items.get("base")

  def _present(self, step: int, items: dict) -> dict:
    """The optional items that step `step` holds (a full fine-tune's checkpoint has no base)."""
    return {k: v for k, v in items.items() if (self.manager.directory / str(step) / k).exists()}

  def _newest(self, read):
    """(step, read(step)) for the newest step that reads; an unreadable one is logged and the
    one before it tried."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, read(step)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        log.error("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                  step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _stored(state, base):
  """What a checkpoint holds of `state`: all of it, or under LoRA (base given) all but the frozen
  base, which model.init_from provides again."""
  return state if base is None else {k: v for k, v in state.items() if k != "frozen"}


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
