"""The training loop: model, data, jitted step, checkpoints, metrics, preemption.

    run = Run(config, run_dir); run.train()

Resumes from the newest readable checkpoint in run_dir (state, data position, step); SIGTERM
saves at the next step boundary and returns; a NaN/Inf loss stops with TrainingError and leaves
the last good checkpoint in place.

The host never waits for the device between log steps: a step's host work (`Run._advance`: the
next batch, its global arrays, the step dispatched) reads nothing back, so the next batch is loaded
while the device computes. The steps' outputs stay pending on the device and are checked (NaN/Inf
loss, loss_overflow) at the next boundary: a log, eval or checkpoint step, the last step, a
preemption or the end of train.profile_steps. Every pending step is checked before a checkpoint is
saved, so a checkpoint never holds a state that came after a non-finite step, and the error names
the first such step.
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

from mma_jax.config import Config, LLMConfig, to_yaml
from mma_jax.convert.safetensors_io import CheckpointError
from mma_jax.convert.transfer import build_with_params, param_shapes
from mma_jax.models import build_model, model_mesh
from mma_jax.models.connector import tokens_per_image
from mma_jax.models.lora import fresh_adapters
from mma_jax.sharding import create_sharded, global_batch, is_main_process, tree_shardings
from mma_jax.train import base
from mma_jax.train.checkpoint import RunCheckpoints
from mma_jax.train.loss import token_loss_sums
from mma_jax.train.metrics import RunMetrics, train_flops_per_token
from mma_jax.train.state import init_train_state
from mma_jax.train.step import check_batch_split, jit_train_step, make_train_step

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
  """A fresh model (seeded), or model.init_from's checkpoint (train/base.py), born sharded."""
  return initial_model_and_base(config, mesh)[0]


def initial_model_and_base(config: Config, mesh):
  """(model, base reference): the reference is what a LoRA checkpoint records of its base
  (train/base.py); a LoRA model's adapters are fresh (B = 0), the rest is model.init_from's."""
  build = lambda: build_model(config, nnx.Rngs(config.train.seed))
  lora = config.model.lora.enabled
  if not config.model.init_from:
    return create_sharded(build, mesh), base.reference(config, None)
  try:
    source_config, params = base.read_base(config.model.init_from)
  except CheckpointError as e:
    raise (base.missing_base(config, e) if lora else e) from None
  for name in ("llm", "vision", "connector"):
    ours, theirs = (_architecture(getattr(m.model, name)) for m in (config, source_config))
    if ours != theirs:
      raise TrainingError(f"model.init_from={config.model.init_from}: its model.{name} differs "
                          f"from this config's ({theirs} vs {ours})")
  reference = base.reference(config, params) if lora else None
  if lora:
    params = {**params, **fresh_adapters(param_shapes(nnx.eval_shape(build)), config.train.seed)}
  model = build_with_params(build, params)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, tree_shardings(state, mesh))), reference


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def image_tokens(config: Config) -> int:
  m = config.model
  return tokens_per_image(m.connector, m.vision) if m.kind == "mllm" else 1


class _Profile:
  """train.profile_steps = [a, b]: a jax.profiler trace (TensorBoard / XProf) of steps a..b in
  `directory`, started before step a's host work and stopped once step b's outputs are ready.
  A resumed run past a traces nothing before its first step; one past b traces nothing."""

  def __init__(self, directory: pathlib.Path, steps):
    self.directory = directory
    self.first, self.last = steps if steps else (0, -1)
    self.active = False

  def before(self, step: int, pending) -> None:
    if self.active or not self.first <= step <= self.last:
      return
    if pending:   # the trace holds steps a..b only: let the step in flight finish first
      jax.block_until_ready(pending[-1][1])
    log.info("profiling steps %d..%d into %s", step, self.last, self.directory)
    jax.profiler.start_trace(str(self.directory))
    self.active = True

  def ends(self, step: int) -> bool:
    return self.active and step >= self.last

  def after(self, step: int, out) -> None:
    if self.ends(step):
      jax.block_until_ready(out)
      self.stop()

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


class Run:
  def __init__(self, config: Config, run_dir: str | pathlib.Path, *, pipeline=None,
               eval_pipeline=None):
    """pipeline / eval_pipeline: iterables of batch-contract dicts (default: the grain
    pipeline of config.data on the train and eval splits)."""
    from mma_jax.data.pipeline import DataPipeline

    self.config, self.run_dir = config, pathlib.Path(run_dir)
    self.mesh = model_mesh(config)
    check_batch_split(config.train, self.mesh)
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
    model, base_ref = initial_model_and_base(config, self.mesh)
    graphdef, state, optimizer = init_train_state(config, self.mesh, model)
    del model
    self.graphdef = graphdef
    lora = config.model.lora.enabled
    self._base = base_ref if lora else None   # LoRA checkpoints name their base
    iterator = iter(self.pipeline)
    start = 0
    restored = self.checkpoints.restore(state, lora=lora)
    if restored is not None:
      start, state, data_state = restored[:3]
      if lora:
        base.check(restored[3], base_ref, f"step {start} in {self.checkpoints.directory}")
      iterator.set_state(data_state)
      log.info("resumed from step %d in %s", start, self.run_dir)
    llm = config.model.llm
    metrics = RunMetrics(self.run_dir, total_steps=t.steps, start_step=start,
                         flops_per_token=train_flops_per_token(
                             count_params(state["params"]), llm.num_layers, llm.hidden_size,
                             config.data.max_length))
    self._optimizer, self._step_fn = optimizer, None
    profile = _Profile(self.run_dir / "profile", t.profile_steps)
    preemption = Preemption()
    last, pending = {}, []   # pending: (step, outputs on the device) not yet checked
    try:
      for step in range(start + 1, t.steps + 1):
        profile.before(step, pending)
        state, out, tokens = self._advance(step, state, iterator)
        pending.append((step, out))
        metrics.step(step, tokens)
        preempted = preemption.requested
        log_now = step % t.log_every == 0 or step == t.steps
        eval_now = bool(t.eval_every) and step % t.eval_every == 0
        save_now = self.checkpoints.due(step) or step == t.steps or preempted
        if not (log_now or eval_now or save_now or profile.ends(step)):
          continue
        self._check(pending)   # waits for this step; the earlier ones are finished by then
        pending = []
        metrics.completed(step)
        profile.after(step, out)
        if log_now:
          last = metrics.log(step, {k: float(v) for k, v in jax.device_get(out).items()}
                             | self._data_counts(iterator))
        if eval_now:
          metrics.log(step, {"eval_loss": self.eval_loss(state)})
        if save_now:
          self.checkpoints.save(step, state, iterator.get_state(), config, base=self._base)
        if preempted:
          log.warning("preempted: saved step %d, exiting", step)
          break
    finally:
      profile.stop()
      preemption.restore()
      self.checkpoints.wait()
      metrics.close()
    self.state = state
    return graphdef, state, last

  def _advance(self, step: int, state, iterator):
    """One step's host work, which reads nothing back from the device (so never waits for it):
    the next batch, its global arrays, the step dispatched (compiled on the first call).
    Returns (state, the step's outputs as device arrays, the batch's tokens)."""
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      local = next(iterator)
      batch = global_batch(local, self.mesh)
      if self._step_fn is None:
        self._step_fn = jit_train_step(
            make_train_step(self.graphdef, self._optimizer, self.config.train), state,
            self.mesh, batch)
      state, out = self._step_fn(state, batch)
    return state, out, float(np.sum(local["segment_ids"] > 0))

  def _check(self, pending) -> None:
    """Reads the pending steps' loss and loss_overflow (one transfer) and stops at the first step
    with a non-finite loss or an overflow, in step order."""
    t = self.config.train
    values = jax.device_get([(out["loss"], out["loss_overflow"]) for _, out in pending])
    for (step, _), (loss, overflow) in zip(pending, values):
      loss = float(loss)
      if not math.isfinite(loss):
        self.checkpoints.wait()
        raise TrainingError(
            f"loss is {loss} at step {step}; stopping. The last good checkpoint (step "
            f"{self.checkpoints.latest_step()}) is kept in {self.checkpoints.directory}")
      if int(overflow):
        raise TrainingError(f"train.loss_positions={t.loss_positions} is smaller than the "
                            f"answer tokens of a row at step {step}; raise it")

  @staticmethod
  def _data_counts(iterator) -> dict:
    """The pipeline's counts as metrics: data/examples, truncated, rows, tokens, skipped, and
    per component data/<name>/examples, truncated, tokens, skipped, skipped/<reason>."""
    counts = getattr(iterator, "counts", None)
    return {} if counts is None else counts.metrics("data/")

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
