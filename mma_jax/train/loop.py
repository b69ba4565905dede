"""The training loop: model, data, jitted step, checkpoints, metrics, preemption.

    run = Run(config, run_dir); run.train()

Resumes from the newest readable checkpoint in run_dir (state, data position, step); SIGTERM
saves at the next step boundary and returns; a NaN/Inf loss stops with TrainingError and leaves
the last good checkpoint in place.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import signal

import jax
import numpy as np
from flax import nnx

from mma_jax.config import Config, ConfigError, LLMConfig, to_yaml
from mma_jax.convert.store import load_model
from mma_jax.convert.transfer import build_with_params
from mma_jax.models import build_model
from mma_jax.models.connector import tokens_per_image
from mma_jax.sharding import (create_sharded, global_batch, is_main_process, make_mesh,
                              tree_shardings)
from mma_jax.train.checkpoint import RunCheckpoints
from mma_jax.train.loss import token_loss_sums
from mma_jax.train.metrics import RunMetrics, train_flops_per_token
from mma_jax.train.state import init_train_state
from mma_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, a checkpoint that does not fit the model)."""


class Preemption:
  """SIGTERM (a TPU preemption notice) asks the loop to save and stop at the step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving at the end of this step, then exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _architecture(part):
  """A model part's config without the special token ids, which name tokens, not weights (a
  converted checkpoint keeps its HF config's ids; a run config may state the template's own)."""
  if isinstance(part, LLMConfig):
    return dataclasses.replace(part, bos_token_id=None, eos_token_ids=[], pad_token_id=None)
  return part


def initial_model(config: Config, mesh):
  """A fresh model (seeded), or model.init_from's converted checkpoint, born sharded."""
  build = lambda: build_model(config, nnx.Rngs(config.train.seed))
  if not config.model.init_from:
    return create_sharded(build, mesh)
  source_config, params = load_model(config.model.init_from)
  for name in ("llm", "vision", "connector"):
    ours, theirs = (_architecture(getattr(m.model, name)) for m in (config, source_config))
    if ours != theirs:
      raise TrainingError(f"model.init_from={config.model.init_from}: its model.{name} differs "
                          f"from this config's ({theirs} vs {ours})")
  model = build_with_params(build, params)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, tree_shardings(state, mesh)))


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def image_tokens(config: Config) -> int:
  m = config.model
  return tokens_per_image(m.connector, m.vision) if m.kind == "mllm" else 1


class Run:
  def __init__(self, config: Config, run_dir: str | pathlib.Path, *, pipeline=None,
               eval_pipeline=None):
    """pipeline / eval_pipeline: iterables of batch-contract dicts (default: the grain
    pipeline of config.data on the train and eval splits)."""
    from mma_jax.data.pipeline import DataPipeline

    self.config, self.run_dir = config, pathlib.Path(run_dir)
    self.mesh = make_mesh(config.mesh)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if (config.train.batch_size // config.train.grad_accum) % shards:
      raise ConfigError(f"config key 'train.batch_size': {config.train.batch_size} rows "
                        f"(/ grad_accum {config.train.grad_accum}) do not split over "
                        f"data x fsdp = {shards} devices")
    self.pipeline = pipeline or DataPipeline.from_config(
        config, split=config.data.train_split, num_image_tokens=image_tokens(config))
    self._eval_pipeline = eval_pipeline
    self.checkpoints = RunCheckpoints(self.run_dir, every=config.checkpoint.every,
                                      keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)

  def eval_pipeline(self):
    if self._eval_pipeline is None:
      from mma_jax.data.pipeline import DataPipeline
      self._eval_pipeline = DataPipeline.from_config(
          self.config, split=self.config.data.eval_split,
          num_image_tokens=image_tokens(self.config), training=False)
    return self._eval_pipeline

  def train(self):
    """Runs to config.train.steps (or a preemption). Returns (graphdef, state, last metrics)."""
    config, t = self.config, self.config.train
    if is_main_process():
      self.run_dir.mkdir(parents=True, exist_ok=True)
      (self.run_dir / "config.yaml").write_text(to_yaml(config))
    model = initial_model(config, self.mesh)
    graphdef, state, optimizer = init_train_state(config, self.mesh, model)
    del model
    self.graphdef = graphdef
    iterator = iter(self.pipeline)
    start = 0
    restored = self.checkpoints.restore(state)
    if restored is not None:
      start, state, data_state = restored
      iterator.set_state(data_state)
      log.info("resumed from step %d in %s", start, self.run_dir)
    llm = config.model.llm
    metrics = RunMetrics(self.run_dir, total_steps=t.steps, start_step=start,
                         flops_per_token=train_flops_per_token(
                             count_params(state["params"]), llm.num_layers, llm.hidden_size,
                             config.data.max_length))
    step_fn = None
    preemption = Preemption()
    last = {}
    try:
      for step in range(start + 1, t.steps + 1):
        local = next(iterator)
        batch = global_batch(local, self.mesh)
        if step_fn is None:
          step_fn = jit_train_step(make_train_step(graphdef, optimizer, t), state, self.mesh,
                                   batch)
        state, out = step_fn(state, batch)
        loss = float(out["loss"])
        if not math.isfinite(loss):
          self.checkpoints.wait()
          raise TrainingError(
              f"loss is {loss} at step {step}; stopping. The last good checkpoint (step "
              f"{self.checkpoints.latest_step()}) is kept in {self.checkpoints.directory}")
        if int(out["loss_overflow"]):
          raise TrainingError(f"train.loss_positions={t.loss_positions} is smaller than the "
                              f"answer tokens of a row at step {step}; raise it")
        metrics.step(step, float(np.sum(local["segment_ids"] > 0)))
        if step % t.log_every == 0 or step == t.steps:
          last = metrics.log(step, {k: float(v) for k, v in out.items()}
                             | self._data_counts(iterator))
        if t.eval_every and step % t.eval_every == 0:
          metrics.log(step, {"eval_loss": self.eval_loss(state)})
        if self.checkpoints.due(step) or step == t.steps or preemption.requested:
          self.checkpoints.save(step, state, iterator.get_state(), config)
        if preemption.requested:
          log.warning("preempted: saved step %d, exiting", step)
          break
    finally:
      preemption.restore()
      self.checkpoints.wait()
      metrics.close()
    self.state = state
    return graphdef, state, last

  @staticmethod
  def _data_counts(iterator) -> dict:
    counts = getattr(iterator, "counts", None)
    if counts is None:
      return {}
    return {f"data/{k}": float(v) for k, v in counts.to_json().items()
            if isinstance(v, (int, float))}

  def eval_loss(self, state) -> float:
    """Mean answer-token loss over config.train.eval_batches held-out batches."""
    graphdef, t = self.graphdef, self.config.train

    @jax.jit
    def sums(params, frozen, batch):
      model = nnx.merge(graphdef, params, frozen)
      return token_loss_sums(model, batch, loss_positions=t.loss_positions)[:2]

    total = count = 0.0
    for i, local in enumerate(self.eval_pipeline()):
      if i >= t.eval_batches:
        break
      with jax.set_mesh(self.mesh):
        s, n = sums(state["params"], state["frozen"], global_batch(local, self.mesh))
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
