"""Run metrics: a progress bar (step, loss, tokens/s, ETA), JSONL lines and TensorBoard events,
written by process 0 only. MFU from the model's FLOPs per token and the device's peak."""
from __future__ import annotations

import json
import pathlib
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

# bf16 dense peak FLOP/s per chip, where known (public spec sheets).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12}


def device_peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def train_flops_per_token(num_params: int, num_layers: int, hidden: int, length: int) -> float:
  """6N for the weights plus the attention scores (12 L E per token at sequence length L)."""
  return 6.0 * num_params + 12.0 * num_layers * hidden * length


class RunMetrics:
  def __init__(self, run_dir: pathlib.Path, *, total_steps: int, start_step: int,
               flops_per_token: float, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.flops_per_token = flops_per_token
    self.peak = device_peak_flops()
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._bar_step = start_step
    self._tokens = 0.0
    if self.enabled:
      run_dir.mkdir(parents=True, exist_ok=True)
      self.jsonl = open(run_dir / "metrics.jsonl", "a")
      self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
      self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                      dynamic_ncols=True)

  def step(self, step: int, tokens: float) -> None:
    """A step dispatched (the loop does not wait for it): its tokens count in the next log."""
    self._tokens += tokens

  def completed(self, step: int) -> None:
    """Steps up to `step` have finished on the device: the progress bar moves to it. (Dispatch
    runs ahead of the device between log steps, so a bar moved per dispatch would show the
    dispatch rate, not the training rate.)"""
    if self.enabled:
      self.bar.update(step - self._bar_step)
    self._bar_step = step

  def log(self, step: int, values: dict) -> dict:
    """Adds throughput (tokens/s, MFU) since the last log, writes everything, returns it. The
    rates are per log interval: call it once `step` has finished on the device (the loop has
    read its outputs), so the interval runs from one finished step to another."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    values = dict(values, tokens_per_s=self._tokens / elapsed,
                  steps_per_s=(step - self._last_step) / elapsed)
    if self.peak:
      values["mfu"] = values["tokens_per_s"] * self.flops_per_token / (
          self.peak * jax.device_count())
    self._last_time, self._last_step, self._tokens = now, step, 0.0
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self.jsonl.flush()
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self.tensorboard.add_scalar(key, value, step)
      self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                           tok_s=f"{values['tokens_per_s']:.0f}")
    return values

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.jsonl.close()
      self.tensorboard.close()
