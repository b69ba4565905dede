"""Training: exact resume (SIGTERM and SIGKILL), accumulation, frozen tower, mesh change on
restore, NaN stop, corrupt-checkpoint fallback, a loop that does not wait for the device between
log steps, profiling, and a short demo run."""
import contextlib
import dataclasses
import json
import shutil
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mma_jax.config import ConfigError, load_config, to_yaml
from mma_jax.sharding import make_mesh
from mma_jax.train import loop
from mma_jax.train.checkpoint import RunCheckpoints
from mma_jax.train.loop import Run, TrainingError
from mma_jax.train.state import init_train_state
from mma_jax.train.step import make_train_step
from test_sharding import make_batch, tiny_config

ROOT = pathlib.Path(__file__).parent.parent
TINY = [  # the demo's shape, shrunk: a 16x16 tower, 2 latents, a 2-layer decoder
    "model.vision.image_size=16", "model.vision.hidden_size=16", "model.vision.intermediate_size=32",
    "model.vision.num_layers=1", "model.vision.num_heads=2", "model.connector.num_latents=2",
    "model.connector.num_heads=2", "model.connector.head_dim=8", "model.llm.hidden_size=32",
    "model.llm.intermediate_size=64", "model.llm.num_layers=2", "data.max_length=80",
    "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2", "data.read_threads=1",
    "data.pack_window=16", "checkpoint.async_save=false",
]


def run_config(data_dir, run_dir, *extra):
  return load_config(ROOT / "configs/demo.yaml",
                     TINY + [f"data.data_dir={data_dir}", f"checkpoint.dir={run_dir}", *extra])


def demo_command(data_dir, run_dir, *extra):
  """train.py on the demo config shrunk by TINY (eval.py's tests train their run this way)."""
  return [sys.executable, "train.py", "configs/demo.yaml", *TINY, f"data.data_dir={data_dir}",
          f"checkpoint.dir={run_dir}", *extra]


def params_of(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def train(config):
  run = Run(config, config.checkpoint.dir)
  _, state, _ = run.train()
  return state, run


def test_resume_after_sigterm_and_sigkill_is_bitwise_exact(easy_vqa_dir, tmp_path):
  steps = 6
  reference, _ = train(run_config(easy_vqa_dir, tmp_path / "straight", f"train.steps={steps}",
                                  "checkpoint.every=3"))
  for how in ("sigterm", "sigkill"):
    run_dir = tmp_path / how
    config = run_config(easy_vqa_dir, run_dir, f"train.steps={steps}", "checkpoint.every=3")
    (tmp_path / f"{how}.yaml").write_text(to_yaml(config))
    child = subprocess.Popen([sys.executable, "train.py", str(tmp_path / f"{how}.yaml"),
                              "--no-eval"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    checkpoint = run_dir / "checkpoints" / "3"
    deadline = time.time() + 240
    while not checkpoint.is_dir() and child.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert checkpoint.is_dir(), child.communicate()[0][-3000:]
    child.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    output = child.communicate(timeout=240)[0]
    if how == "sigterm":  # saved at the step boundary and exited cleanly
      assert child.returncode == 0, output[-3000:]
      assert "preempted" in output
    else:
      assert child.returncode == -signal.SIGKILL
    stopped_at = RunCheckpoints(run_dir, every=3, keep=3).latest_step()
    assert 3 <= stopped_at < steps
    resumed, run = train(config)  # picks up the newest checkpoint and its data position
    for a, b in zip(params_of(resumed), params_of(reference)):
      np.testing.assert_array_equal(a, b)
    assert int(resumed["step"]) == steps


def test_gradient_accumulation_equals_one_big_batch():
  results = []
  for accum in (1, 4):
    config = tiny_config(grad_accum=accum)
    graphdef, state, optimizer = init_train_state(config)
    step = jax.jit(make_train_step(graphdef, optimizer, config.train))
    new_state, metrics = step(state, make_batch())
    results.append((float(metrics["loss"]), jax.tree.leaves(new_state["params"])))
  assert abs(results[0][0] - results[1][0]) <= 1e-6
  for a, b in zip(results[0][1], results[1][1]):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_connector_and_vision_learning_rate_scales():
  """Adam's first step moves every parameter by its learning rate (m / sqrt(v) = sign of the
  gradient), so each module's largest step shows its own rate; unscaled modules share one group."""
  config = tiny_config(learning_rate=0.1, min_learning_rate=0.1, weight_decay=0.0,
                       connector_lr_scale=0.5, vision_lr_scale=3.0)
  config.train.warmup_steps = 0
  config.model.freeze_vision = False
  graphdef, state, optimizer = init_train_state(config)
  params = state["params"]
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  step = {name: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(updates[name]))
          for name in ("vision", "connector", "llm")}
  np.testing.assert_allclose([step["vision"], step["connector"], step["llm"]], [0.3, 0.05, 0.1],
                             rtol=1e-4)
  plain = tiny_config()
  plain.model.freeze_vision = False
  groups = init_train_state(plain)[2].init(params)[1].inner_states
  assert set(groups) == {"main"}


def test_frozen_tower_is_untouched_and_has_no_optimizer_state():
  config = tiny_config()
  graphdef, state, optimizer = init_train_state(config)
  before = [np.asarray(x) for x in jax.tree.leaves(state["frozen"])]
  assert before and jax.tree.leaves(state["frozen"])
  opt_paths = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
  assert opt_paths and not any("vision" in p for p in opt_paths)
  assert any("connector" in p for p in opt_paths)
  step = jax.jit(make_train_step(graphdef, optimizer, config.train))
  for seed in range(3):
    state, _ = step(state, make_batch(seed))
  for a, b in zip(before, jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_restore_onto_another_mesh_continues_with_the_same_loss(easy_vqa_dir, tmp_path):
  def config(run_dir, mesh):
    return run_config(easy_vqa_dir, run_dir, "train.steps=3", "checkpoint.every=2",
                      "train.batch_size=8", *(f"mesh.{a}={n}" for a, n in zip(
                          ("data", "fsdp", "tensor"), mesh)))

  def losses(run_dir):
    return {int(r["step"]): r["loss"] for r in map(json.loads, (
        run_dir / "metrics.jsonl").read_text().splitlines())}

  train(config(tmp_path / "fsdp", (1, 8, 1)))
  shutil.copytree(tmp_path / "fsdp", tmp_path / "mixed")
  shutil.rmtree(tmp_path / "mixed" / "checkpoints" / "3")   # resume from step 2 ...
  train(config(tmp_path / "mixed", (2, 2, 2)))               # ... on another mesh
  assert abs(losses(tmp_path / "mixed")[3] - losses(tmp_path / "fsdp")[3]) <= 1e-5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(easy_vqa_dir, tmp_path):
  config = run_config(easy_vqa_dir, tmp_path / "run", "train.steps=2", "checkpoint.every=2")
  train(config)
  poisoned = dataclasses.replace(config, train=dataclasses.replace(
      config.train, steps=6, learning_rate=1e30, min_learning_rate=1e29, clip_norm=1e30,
      warmup_steps=0))
  with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d; stopping\. The last "
                                          r"good checkpoint \(step 2\) is kept"):
    train(poisoned)
  assert RunCheckpoints(tmp_path / "run", every=2, keep=3).latest_step() == 2


@contextlib.contextmanager
def no_device_reads():
  """jax.transfer_guard_device_to_host("disallow"), which raises on a read of a device array on
  GPU/TPU. On CPU it never fires (arrays are read in place, no transfer happens: float(x),
  np.asarray(x) pass under it), so there the ways a jax.Array reaches the host are refused too:
  ArrayImpl._value (float, int, bool, str, tolist, jax.device_get) and np.asarray / np.array
  (numpy reads CPU arrays through the buffer protocol). Waiting (block_until_ready) is refused on
  every platform: the guard does not cover it."""

  def refuse(what):
    def raise_(*args, **kwargs):
      raise RuntimeError(f"Disallowed device-to-host {what} (no_device_reads)")
    return raise_

  def numpy_without_jax(fn):
    def read(a, *args, **kwargs):
      if isinstance(a, jax.Array):
        refuse(f"read np.{fn.__name__}(jax.Array)")()
      return fn(a, *args, **kwargs)
    return read

  array_type = type(jnp.zeros(()))
  with pytest.MonkeyPatch.context() as patch, jax.transfer_guard_device_to_host("disallow"):
    patch.setattr(array_type, "block_until_ready", refuse("wait (block_until_ready)"))
    patch.setattr(jax, "block_until_ready", refuse("wait (jax.block_until_ready)"))
    if jax.default_backend() == "cpu":
      patch.setattr(array_type, "_value", property(refuse("read (jax.Array._value)")))
      patch.setattr(np, "asarray", numpy_without_jax(np.asarray))
      patch.setattr(np, "array", numpy_without_jax(np.array))
    yield


@pytest.fixture(scope="module")
def async_run(easy_vqa_dir, tmp_path_factory):
  """One 8-step run (log and checkpoint every 4 steps, a trace of steps 2..3) whose step 6 has a
  NaN loss (the loss output only: steps 7 and 8 are finite), with every step's host work
  (Run._advance) under no_device_reads. Shared by the tests below: a run costs its compiles."""
  run_dir = tmp_path_factory.mktemp("async") / "run"
  config = run_config(easy_vqa_dir, run_dir, "train.steps=8", "train.log_every=4",
                      "checkpoint.every=4", "train.profile_steps=[2,3]")
  seen = types.SimpleNamespace(run_dir=run_dir, advanced=[], checked=[], refused=[], error=None)
  advance, check, make_step = Run._advance, Run._check, loop.make_train_step

  def guarded_advance(self, step, state, iterator):
    with no_device_reads():
      state, out, tokens = advance(self, step, state, iterator)
      if not seen.refused:  # the guard is live where the step's host work runs
        for read in (lambda: float(out["loss"]), lambda: np.asarray(out["loss"]),
                     lambda: jax.block_until_ready(out)):
          with pytest.raises(Exception, match=r"(?i)disallowed device-to-host") as e:
            read()
          seen.refused.append(str(e.value).splitlines()[0])
    seen.advanced.append(step)
    return state, out, tokens

  def recording_check(self, pending):
    seen.checked.append([step for step, _ in pending])
    return check(self, pending)

  def poisoned_step(graphdef, optimizer, t):
    step = make_step(graphdef, optimizer, t)

    def run(state, batch):
      new_state, out = step(state, batch)
      return new_state, dict(out, loss=jnp.where(state["step"] == 5, jnp.nan, out["loss"]))

    return run

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(Run, "_advance", guarded_advance)
    patch.setattr(Run, "_check", recording_check)
    patch.setattr(loop, "make_train_step", poisoned_step)
    try:
      train(config)
    except TrainingError as e:
      seen.error = e
  return seen


def test_steps_between_log_steps_neither_read_nor_wait_for_the_device(async_run):
  assert len(async_run.refused) == 3, async_run.refused  # float, np.asarray, block_until_ready
  assert async_run.advanced == list(range(1, 9))          # every step's host work ran guarded
  # outputs are read only at boundaries: the end of the trace (3), log + checkpoint steps (4, 8)
  assert async_run.checked == [[1, 2, 3], [4], [5, 6, 7, 8]]


def test_nan_between_log_steps_names_its_step_and_keeps_the_last_good_checkpoint(async_run):
  assert async_run.error is not None
  assert re.search(r"loss is nan at step 6; stopping\. The last good checkpoint \(step 4\) is "
                   r"kept", str(async_run.error)), str(async_run.error)
  # steps 7 and 8 were finite, but the state at 8 came after step 6: not saved
  assert RunCheckpoints(async_run.run_dir, every=4, keep=3).manager.all_steps() == [4]


def test_profile_steps_write_a_trace(async_run):
  traces = list((async_run.run_dir / "profile").rglob("*.xplane.pb"))
  assert traces and all(t.stat().st_size > 0 for t in traces)


def test_profile_steps_must_be_first_and_last(tmp_path):
  for steps in ("[3,2]", "[0,2]", "[2]", "[1,2,3]"):
    with pytest.raises(ConfigError, match=r"'train\.profile_steps'"):
      run_config(tmp_path, tmp_path, f"train.profile_steps={steps}")
  assert run_config(tmp_path, tmp_path, "train.profile_steps=[2,2]").train.profile_steps == [2, 2]
  assert run_config(tmp_path, tmp_path).train.profile_steps == []


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(easy_vqa_dir, tmp_path, caplog):
  config = run_config(easy_vqa_dir, tmp_path / "run", "train.steps=4", "checkpoint.every=2")
  train(config)
  state_dir = tmp_path / "run" / "checkpoints" / "4" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "manifest" in path.name:
      path.write_bytes(b"garbage")
  graphdef, template, _ = init_train_state(config, make_mesh(config.mesh))
  step, _, _ = RunCheckpoints(tmp_path / "run", every=2, keep=3).restore(template)
  assert step == 2
  assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text


def test_short_demo_prints_the_contract_line(easy_vqa_dir, tmp_path):
  result = subprocess.run(
      demo_command(easy_vqa_dir, tmp_path / "demo", "train.steps=4", "eval.limit=64",
                   "eval.batch_size=32"), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert [l.split(":")[0] for l in lines[:-1]] == ["yes_no", "shape", "color"]
  name_values = dict(part.split("=") for part in lines[-1].split())
  assert list(name_values) == ["accuracy", "majority", "text_only"]
  assert float(name_values["majority"]) == pytest.approx(0.3733, abs=1e-4)
  assert float(name_values["text_only"]) == pytest.approx(0.6700, abs=1e-4)
  assert (tmp_path / "demo" / "metrics.jsonl").is_file()
  assert any((tmp_path / "demo" / "tensorboard").iterdir())


def test_text_only_model_trains_on_batch_contract_fields():
  config = dataclasses.replace(tiny_config(), model=dataclasses.replace(
      tiny_config().model, vision=None, connector=None))
  graphdef, state, optimizer = init_train_state(config)
  batch = {k: v for k, v in make_batch().items() if k not in ("images", "image_valid")}
  batch["image_token_index"] = np.full_like(batch["image_token_index"], -1)
  step = jax.jit(make_train_step(graphdef, optimizer, config.train))
  before = jax.tree.map(np.asarray, state["params"])
  for _ in range(2):  # the warmup's first learning rate is 0
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["answer_tokens"]) == 32.0
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(state["params"])))


def test_init_from_a_converted_checkpoint_starts_from_its_weights(tmp_path):
  """model.init_from loads the checkpoint's weights (not the seeded init), even when the run
  config names other special token ids; another architecture is refused, naming init_from."""
  from flax import nnx

  from mma_jax.convert.store import save_model
  from mma_jax.convert.transfer import flatten
  from mma_jax.models import build_model
  from mma_jax.train.loop import initial_model

  source = tiny_config()
  source = dataclasses.replace(source, model=dataclasses.replace(
      source.model, llm=dataclasses.replace(source.model.llm, pad_token_id=7, eos_token_ids=[3])))
  _, saved = nnx.split(build_model(source, nnx.Rngs(123)), nnx.Param)
  saved = {k: np.asarray(v) for k, v in flatten(saved.to_pure_dict()).items()}
  save_model(tmp_path / "ckpt", saved, source)

  config = tiny_config()
  config.model.init_from = str(tmp_path / "ckpt")
  _, loaded = nnx.split(initial_model(config, make_mesh(config.mesh)), nnx.Param)
  loaded = flatten(loaded.to_pure_dict())
  assert loaded.keys() == saved.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)
  _, fresh = nnx.split(build_model(tiny_config(), nnx.Rngs(0)), nnx.Param)
  assert any(not np.array_equal(np.asarray(v), saved[k])
             for k, v in flatten(fresh.to_pure_dict()).items())

  config.model.llm.intermediate_size += 8
  with pytest.raises(TrainingError, match=r"model.init_from=.*model.llm differs"):
    initial_model(config, make_mesh(config.mesh))
