"""Run checkpoints with orbax: items `state` (train state), `data` (the input iterator's state)
and `config` (the resolved run config), saved asynchronously every N steps, K kept.

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

  def save(self, step: int, state, data_state: dict, config: Config) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(to_dict(config))), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state_template) -> tuple[int, object, dict] | None:
    """(step, state, data state) of the newest readable checkpoint, or None for a fresh run.
    `state_template` gives the tree, dtypes and target shardings."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state_template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        log.error("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                  step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        continue
      return step, restored.state, restored.data
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
