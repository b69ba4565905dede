"""LoRA (issue 18): fresh adapters change nothing, only adapters and the configured modules train,
the frozen base stays bitwise, merged and PEFT exports match (PEFT loaded onto the transformers
model, Llama inside LLaVA and Phi-3 inside AKI), and the demo recipe trains, resumes and evaluates
under LoRA on a base trained by the demo itself."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mma_jax.config import ConfigError, load_config
from mma_jax.convert.transfer import build_with_params, flatten, module_params
from mma_jax.models import build_model
from mma_jax.models.lora import merged
from mma_jax.sharding import global_batch, make_mesh
from mma_jax.train.state import init_train_state, split_model
from mma_jax.train.step import jit_train_step, make_train_step
from test_sharding import make_batch, tiny_config

ROOT = pathlib.Path(__file__).parent.parent


def lora_config(*, scan=False, remat="none", **lora):
  config = tiny_config(learning_rate=1e-2, min_learning_rate=1e-2, weight_decay=0.0)
  config.train.warmup_steps = 0
  config.model = dataclasses.replace(config.model, scan_layers=scan, remat=remat)
  config.model.lora = dataclasses.replace(config.model.lora, rank=4, alpha=8.0, **lora)
  return config


def base_and_lora(config, seed=3):
  """(base model, LoRA model on the same base weights, with random B so adapters matter)."""
  plain = dataclasses.replace(config, model=dataclasses.replace(
      config.model, lora=dataclasses.replace(config.model.lora, rank=0)))
  base = build_model(plain, nnx.Rngs(seed))
  adapted = module_params(build_model(config, nnx.Rngs(0)))
  params = {**module_params(base), **{k: v for k, v in adapted.items() if "lora_" in k}}
  return base, build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)


def logits(model, batch):
  fields = {k: v for k, v in batch.items() if k not in ("targets", "loss_mask")}
  return np.asarray(jax.jit(lambda m, b: m(**b))(model, fields))


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_fresh_adapters_leave_the_logits_bitwise_unchanged(scan, remat):
  config = lora_config(scan=scan, remat=remat, connector=True, trainable=[])
  base, adapted = base_and_lora(config)
  batch = make_batch()
  np.testing.assert_array_equal(logits(adapted, batch), logits(base, batch))
  # ... and an adapter with B != 0 does change them, by the merged weights' amount.
  params = module_params(adapted)
  params = {k: (np.random.default_rng(1).normal(0, 0.05, v.shape).astype(v.dtype)
                if k.endswith("lora_b") else v) for k, v in params.items()}
  live = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  plain = dataclasses.replace(config, model=dataclasses.replace(
      config.model, lora=dataclasses.replace(config.model.lora, rank=0)))
  folded = build_with_params(lambda: build_model(plain, nnx.Rngs(0)),
                             merged(params, config.model.lora))
  ours, merged_logits = logits(live, batch), logits(folded, batch)
  assert np.abs(ours - logits(base, batch)).max() > 1e-3
  assert np.abs(ours - merged_logits).max() <= 1e-5


def test_only_adapters_and_the_trainable_modules_get_state_and_updates():
  config = lora_config(targets=["q", "v", "down"], trainable=["connector"],
                       base_dtype="bfloat16")
  graphdef, state, optimizer = init_train_state(config)
  paths = lambda tree: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(tree)}
  trainable = paths(state["params"])
  assert {p for p in trainable if not p.startswith("connector.")} == {
      f"llm.layers.{m}.{n}" for m in ("attn.q", "attn.v", "mlp.down") for n in ("lora_a", "lora_b")}
  assert any(p.startswith("connector.") for p in trainable)
  assert not any("lora" in p for p in paths(state["frozen"]))
  assert {v.get_value().dtype for _, v in nnx.to_flat_state(state["frozen"])} == {jnp.dtype(jnp.bfloat16)}
  opt_paths = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
  assert opt_paths and not any("'vision'" in p or "kernel'" in p and "connector" not in p
                               for p in opt_paths)
  frozen_before = [np.asarray(x) for x in jax.tree.leaves(state["frozen"])]
  step = jax.jit(make_train_step(graphdef, optimizer, config.train))
  before = {k: np.asarray(v) for k, v in flatten(state["params"].to_pure_dict()).items()}
  losses = []
  for seed in range(3):
    state, metrics = step(state, make_batch(seed % 1))
    losses.append(float(metrics["loss"]))
  after = {k: np.asarray(v) for k, v in flatten(state["params"].to_pure_dict()).items()}
  assert all(not np.array_equal(before[k], after[k]) for k in before), [
      k for k in before if np.array_equal(before[k], after[k])]
  assert losses[-1] < losses[0]
  for a, b in zip(frozen_before, jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_dropout_differs_per_step_and_is_off_outside_training():
  config = lora_config(dropout=0.5, trainable=[])
  graphdef, state, optimizer = init_train_state(config)
  # B = 0 hides dropout; give B values so that masks change the loss.
  state["params"] = jax.tree.map(lambda x: x + 0.05, state["params"])
  step = jax.jit(make_train_step(graphdef, optimizer, dataclasses.replace(
      config.train, learning_rate=0.0, min_learning_rate=0.0)))
  batch = make_batch()
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] != losses[1]            # same weights (lr 0), other masks
  model = nnx.merge(graphdef, state["params"], state["frozen"])
  np.testing.assert_array_equal(logits(model, batch), logits(model, batch))


def test_adapters_follow_the_rules_table_on_a_mesh():
  config = lora_config(trainable=[])
  mesh = make_mesh(dataclasses.replace(config.mesh, data=1, fsdp=4, tensor=2))
  graphdef, state, optimizer = init_train_state(config, mesh)
  a = state["params"]["llm"]["layers"]["attn"]["q"]["lora_a"].get_value()
  b = state["params"]["llm"]["layers"]["attn"]["q"]["lora_b"].get_value()
  kernel = state["frozen"]["llm"]["layers"]["attn"]["q"]["kernel"].get_value()
  assert a.sharding.spec[1] == kernel.sharding.spec[1] and a.sharding.spec[2] is None
  assert b.sharding.spec[2] == kernel.sharding.spec[2] and b.sharding.spec[1] is None
  step = jit_train_step(make_train_step(graphdef, optimizer, config.train), state, mesh,
                        global_batch(make_batch(), mesh))
  state, metrics = step(state, global_batch(make_batch(), mesh))
  assert np.isfinite(float(metrics["loss"]))


def test_config_errors_name_the_key(tmp_path):
  demo = ROOT / "configs/demo.yaml"
  for override, key in (("model.lora.targets=[q,x]", "model.lora.targets"),
                        ("model.lora.trainable=[vision]", "model.lora.trainable"),
                        ("model.lora.dropout=1.5", "model.lora.dropout"),
                        ("model.lora.rank=-1", "model.lora.rank")):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
      load_config(demo, ["model.lora.rank=4", override] if "rank" not in override else [override])
  with pytest.raises(ConfigError, match=r"'model.lora.trainable'.*choose one"):
    load_config(demo, ["model.lora.rank=4", "model.lora.connector=true"])
