"""LoRA (issue 18): fresh adapters change nothing, only adapters and the configured modules train,
the frozen base stays bitwise, merged and PEFT exports match (PEFT loaded onto the transformers
model, Llama inside LLaVA and Phi-3 inside AKI), and the demo recipe trains, resumes and evaluates
under LoRA on a base trained by the demo itself."""
import dataclasses
import json
import logging
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


def plain(config):
  return dataclasses.replace(config, model=dataclasses.replace(
      config.model, lora=dataclasses.replace(config.model.lora, rank=0)))


def random_model(config, seed=3):
  """config's model with random weights (norm scales 1, biases 0, adapters as fresh: B = 0),
  built from numpy: an eager build of even a tiny model costs seconds per test."""
  from mma_jax.convert.transfer import param_shapes
  from mma_jax.models.lora import fresh_adapters

  build = lambda: build_model(config, nnx.Rngs(0))
  shapes = param_shapes(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  params = {k: (np.ones(shape, dtype) if k.endswith("scale") else np.zeros(shape, dtype)
                if k.endswith("bias") else rng.normal(0, 0.2, shape).astype(dtype))
            for k, (shape, dtype) in shapes.items() if "lora_" not in k}
  params.update(fresh_adapters(shapes, seed))
  return build_with_params(build, params)


def base_and_lora(config, seed=3):
  """(base model, LoRA model on the same base weights with fresh adapters)."""
  adapted = random_model(config, seed)
  base = {k: v for k, v in module_params(adapted).items() if "lora_" not in k}
  return build_with_params(lambda: build_model(plain(config), nnx.Rngs(0)), base), adapted


@jax.jit
def _forward(model, batch):
  return model(**batch)


def logits(model, batch):
  return np.asarray(_forward(model, {k: v for k, v in batch.items()
                                     if k not in ("targets", "loss_mask")}))


def test_fresh_adapters_leave_the_logits_bitwise_unchanged():
  """Under scan and remat, as the 7B config runs; B != 0 then matches the merged weights."""
  config = lora_config(scan=True, remat="full", connector=True, trainable=[])
  base, adapted = base_and_lora(config)
  batch = make_batch()
  np.testing.assert_array_equal(logits(adapted, batch), logits(base, batch))
  params = module_params(adapted)
  params = {k: (np.random.default_rng(1).normal(0, 0.05, v.shape).astype(v.dtype)
                if k.endswith("lora_b") else v) for k, v in params.items()}
  live = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  folded = build_with_params(lambda: build_model(plain(config), nnx.Rngs(0)),
                             merged(params, config.model.lora))
  ours, merged_logits = logits(live, batch), logits(folded, batch)
  assert np.abs(ours - logits(base, batch)).max() > 1e-3
  assert np.abs(ours - merged_logits).max() <= 1e-5


def test_only_adapters_and_the_trainable_modules_get_state_and_updates():
  """With dropout on (the train step's scope), a bf16 frozen base, q/v/down adapters and the
  connector trained in full."""
  config = lora_config(targets=["q", "v", "down"], trainable=["connector"],
                       base_dtype="bfloat16", dropout=0.1)
  graphdef, state, optimizer = init_train_state(config, model=random_model(config))
  paths = lambda tree: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(tree)}
  trainable = paths(state["params"])
  assert {p for p in trainable if not p.startswith("connector.")} == {
      f"llm.layers.{m}.{n}" for m in ("attn.q", "attn.v", "mlp.down") for n in ("lora_a", "lora_b")}
  assert any(p.startswith("connector.") for p in trainable)
  assert not any("lora" in p for p in paths(state["frozen"]))
  assert ({v.get_value().dtype for _, v in nnx.to_flat_state(state["frozen"])}
          == {jnp.dtype(jnp.bfloat16)})
  opt_paths = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
  assert opt_paths and all("lora_" in p or "'connector'" in p for p in opt_paths
                           if p.endswith("]") and "'" in p)
  frozen_before = [np.asarray(x) for x in jax.tree.leaves(state["frozen"])]
  step = jax.jit(make_train_step(graphdef, optimizer, config.train))
  before = {k: np.asarray(v) for k, v in flatten(state["params"].to_pure_dict()).items()}
  losses = []
  for _ in range(3):
    state, metrics = step(state, make_batch())
    losses.append(float(metrics["loss"]))
  after = {k: np.asarray(v) for k, v in flatten(state["params"].to_pure_dict()).items()}
  assert all(not np.array_equal(before[k], after[k]) for k in before), [
      k for k in before if np.array_equal(before[k], after[k])]
  assert losses[-1] < losses[0]
  for a, b in zip(frozen_before, jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_dropout_only_inside_the_training_scope_and_other_masks_per_layer():
  from mma_jax.models import lora
  from mma_jax.models.layers import Linear

  spec = lora.LoraSpec(rank=4, scale=2.0, dropout=0.5, name="llm.attn.q")
  layer = Linear(16, 8, ("embed", "heads"), lora=spec, rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.ones((4, 8))
  x = jnp.ones((2, 16))
  plain = layer(x)
  key = jax.random.PRNGKey(0)
  with lora.dropout_scope(key):
    first, again = layer(x), layer(x)
    with lora.layer_scope(1):
      other_layer = layer(x)
  with lora.dropout_scope(jax.random.PRNGKey(1)):
    other_step = layer(x)
  np.testing.assert_array_equal(layer(x), plain)          # outside the scope: no dropout
  np.testing.assert_array_equal(first, again)
  for y in (plain, other_layer, other_step):
    assert not np.array_equal(first, y)


def test_adapters_follow_the_rules_table_on_a_mesh():
  from mma_jax.train.state import abstract_train_state

  config = lora_config(trainable=[])
  mesh = make_mesh(dataclasses.replace(config.mesh, data=1, fsdp=4, tensor=2))
  _, state, _ = abstract_train_state(config, mesh)   # the shardings a run's arrays are born with
  for module, name in (("attn", "q"), ("mlp", "down")):
    spec = lambda group, leaf: state[group]["llm"]["layers"][module][name][leaf].sharding.spec
    kernel = spec("frozen", "kernel")
    assert spec("params", "lora_a")[1] == kernel[1] and spec("params", "lora_a")[2] is None
    assert spec("params", "lora_b")[2] == kernel[2] and spec("params", "lora_b")[1] is None
    assert kernel[1] or kernel[2]      # the rules shard this kernel: the check is not vacuous


def test_config_errors_name_the_key():
  demo = ROOT / "configs/demo.yaml"
  for override, key in (("model.lora.targets=[q,x]", "model.lora.targets"),
                        ("model.lora.trainable=[vision]", "model.lora.trainable"),
                        ("model.lora.dropout=1.5", "model.lora.dropout")):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
      load_config(demo, ["model.lora.rank=4", override])
  with pytest.raises(ConfigError, match=r"'model.lora.rank'"):
    load_config(demo, ["model.lora.rank=-1"])
  with pytest.raises(ConfigError, match=r"'model.lora.trainable'.*choose one"):
    load_config(demo, ["model.lora.rank=4", "model.lora.connector=true"])


# ------------------------------------------------------------------------------ the demo recipe
def losses_of(run_dir):
  return {int(r["step"]): r["loss"] for r in map(json.loads, (
      run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
  """The LoRA base: the demo model (shrunk as test_train's TINY) as a converted checkpoint."""
  from mma_jax.convert.store import save_model
  from test_train import run_config

  root = tmp_path_factory.mktemp("lora")
  config = run_config(root, root)
  params = module_params(build_model(config, nnx.Rngs(7)))
  return save_model(root / "base", params, config), params


def lora_run_config(easy_vqa_dir, run_dir, base, *extra):
  from test_train import run_config

  return run_config(easy_vqa_dir, run_dir, f"model.init_from={base}", "model.lora.rank=8",
                    "model.lora.alpha=16", "model.lora.targets=[q,k,v,o,gate,up,down]",
                    "train.learning_rate=1e-2", "train.min_learning_rate=1e-2",
                    "train.warmup_steps=0", *extra)


def test_demo_lora_run_trains_resumes_bitwise_and_evaluates(easy_vqa_dir, demo_base, tmp_path,
                                                            capsys, caplog):
  import shutil

  from mma_jax.evaluate.loading import load_for_eval
  from mma_jax.train.base import BaseMismatch, read_base
  from test_train import params_of, train

  base_dir, base_params = demo_base
  run_dir = tmp_path / "run"
  config = lora_run_config(easy_vqa_dir, run_dir, base_dir, "train.steps=8", "checkpoint.every=4")
  reference, _ = train(config)
  losses = losses_of(run_dir)
  assert np.mean([losses[s] for s in (7, 8)]) < np.mean([losses[s] for s in (1, 2)]) - 0.05, losses
  # The frozen base is the base checkpoint's weights, bitwise, after training.
  frozen = flatten(reference["frozen"].to_pure_dict())
  assert frozen and all(np.array_equal(np.asarray(v), base_params[k]) for k, v in frozen.items())
  # Checkpoints hold what LoRA trains and name the base; read back, the run is base + adapters.
  stored = run_dir / "checkpoints" / "8"
  assert json.loads((stored / "base" / "metadata").read_text())["path"] == str(base_dir)
  _, read = read_base(run_dir)
  trained = flatten(reference["params"].to_pure_dict())
  assert read.keys() == trained.keys() | frozen.keys()
  assert all(np.array_equal(read[k], np.asarray(v)) for k, v in trained.items())

  # Resumed from step 4: bitwise the straight run.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(run_dir, resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / "8")
  resumed, _ = train(dataclasses.replace(config, checkpoint=dataclasses.replace(
      config.checkpoint, dir=str(resumed_dir))))
  for a, b in zip(params_of(resumed), params_of(reference)):
    np.testing.assert_array_equal(a, b)
  # Resumed from step 4 onto another mesh (data=2 x fsdp=4): the same run, up to the order of
  # the sums that the new sharding splits differently.
  shutil.rmtree(resumed_dir / "checkpoints" / "8")
  with caplog.at_level(logging.INFO, logger="mma_jax.train.loop"):
    remeshed, _ = train(dataclasses.replace(
        config, checkpoint=dataclasses.replace(config.checkpoint, dir=str(resumed_dir)),
        mesh=dataclasses.replace(config.mesh, data=2, fsdp=4)))
  assert "resumed from step 4" in caplog.text
  for a, b in zip(params_of(remeshed), params_of(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  # eval.py on the LoRA run: the base from init_from, the adapters from the run, restored onto
  # another mesh than the run's (fsdp=8).
  sys.path.insert(0, str(ROOT))
  import eval as eval_cli
  assert eval_cli.main(["--checkpoint", str(run_dir), "--benchmark", "easy_vqa", "--limit", "16",
                        "--batch-size", "16", "--no-progress", "mesh.data=2", "mesh.fsdp=4"]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy=")
  # A missing base, or another one (here a seeded model), is one message naming it.
  with pytest.raises(BaseMismatch, match=r"model.init_from='.*nowhere' cannot be read"):
    load_for_eval(run_dir, [f"model.init_from={tmp_path / 'nowhere'}"])
  with pytest.raises(BaseMismatch, match=rf"trained on the base '{base_dir}'.*this run's base is "
                                         r"a model seeded with train.seed=0"):
    load_for_eval(run_dir, ["model.init_from="])


# ---------------------------------------------------------------------------------- export
def with_trained_adapters(config, params, seed=0, **lora):
  """A LoRA model on converted base weights, its adapters (and connector) as if trained."""
  config.model.lora = dataclasses.replace(config.model.lora, rank=2, alpha=6.0, **lora)
  config.attention.impl = "dense"
  from mma_jax.convert.operations import abstract_model
  from mma_jax.convert.transfer import param_shapes
  from mma_jax.models.lora import fresh_adapters

  rng = np.random.default_rng(seed)
  adapters = {k: (v if k.endswith("lora_a") else rng.normal(0, 0.1, v.shape).astype(v.dtype))
              for k, v in fresh_adapters(param_shapes(abstract_model(config)), 1).items()}
  params = {**params, **adapters}
  if "connector" in config.model.lora.trainable:   # a trained connector differs from the base's
    params = {k: v + 0.01 * (k.startswith("connector.") and "kernel" in k) for k, v in
              params.items()}
  return config, params, build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)


def peft_logits(base_torch, adapter_dir, call):
  import peft
  import torch

  with torch.no_grad():
    model = peft.PeftModel.from_pretrained(base_torch, str(adapter_dir)).eval()
    return call(model)


def test_llava_llama_merged_and_peft_exports_match_our_forward(tmp_path):
  import torch
  import transformers

  from hf_models import save_tiny_llava
  from mma_jax.convert import operations
  from mma_jax.convert.llava import LLAVA, image_batch

  save_tiny_llava(tmp_path / "hf")
  config, params = operations.read_hf(LLAVA, tmp_path / "hf", progress=False)
  config, params, ours_model = with_trained_adapters(config, params, targets=["q", "k", "v", "o",
                                                                              "gate", "up",
                                                                              "down"])
  tokens, valid, index, images = image_batch(config, 24, 2, seed=3)
  zeros = np.zeros_like(tokens)
  ours = np.asarray(ours_model(tokens=tokens, positions=np.broadcast_to(
      np.arange(24, dtype=np.int32), tokens.shape), segment_ids=valid.astype(np.int32),
      window_lo=zeros, window_hi=zeros, image_token_index=index, images=images))
  inputs = dict(input_ids=torch.from_numpy(tokens).long(),
                pixel_values=torch.from_numpy(images[:, 0]).permute(0, 3, 1, 2),
                attention_mask=torch.from_numpy(valid.astype(np.int64)))

  operations.export_checkpoint(LLAVA, None, tmp_path / "merged", loaded=(config, params))
  merged_model = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / "merged", dtype=torch.float32).eval()
  with torch.no_grad():
    merged_logits = merged_model(**inputs).logits.numpy()
  assert np.abs(merged_logits - ours)[valid].max() <= 1e-5

  operations.export_checkpoint(LLAVA, None, tmp_path / "adapter", peft=True,
                               loaded=(config, params))
  from safetensors.numpy import load_file
  keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
  assert "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight" in keys
  assert "base_model.model.model.multi_modal_projector.linear_1.weight" in keys
  base = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / "hf", dtype=torch.float32).eval()
  with torch.no_grad():
    plain = base(**inputs).logits.numpy()
  adapted = peft_logits(base, tmp_path / "adapter", lambda m: m(**inputs).logits.numpy())
  assert np.abs(plain - ours)[valid].max() > 1e-3          # the adapters matter
  assert np.abs(adapted - ours)[valid].max() <= 1e-4


def test_aki_phi3_fused_adapters_match_peft_on_the_official_model(aki_checkpoint):
  """Partial targets on Phi-3's fused qkv_proj / gate_up_proj (zero blocks) and adapters on the
  Perceiver (its fused to_kv): one PEFT adapter on the official AKI module tree."""
  from mma_jax.convert import aki as aki_format
  from mma_jax.convert import operations

  root, options = aki_checkpoint
  config, params = operations.read_hf(aki_format.AKI, root / "aki", progress=False, **options)
  config, params, ours_model = with_trained_adapters(
      config, params, targets=["q", "v", "gate", "down"], connector=True, trainable=[])
  p = aki_format.prompt_batch(config, 40, 2, seed=0)
  ours = aki_format.our_logits(ours_model, config, p)
  operations.export_checkpoint(aki_format.AKI, None, root / "adapter", peft=True,
                               loaded=(config, params))
  adapter_config = json.loads((root / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["rank_pattern"] and all(
      v == 2 * 2 for v in adapter_config["rank_pattern"].values())   # q+v of qkv, gate of up..
  reference = aki_format.load_reference(root / "aki", config)
  plain = aki_format.reference_logits(reference, p)
  adapted = peft_logits(reference, root / "adapter",
                        lambda m: aki_format.reference_logits(m, p))
  assert np.abs(plain - ours)[p.valid].max() > 1e-3
  assert np.abs(adapted - ours)[p.valid].max() <= 1e-4


@pytest.fixture(scope="module")
def aki_checkpoint(tmp_path_factory):
  from test_aki import _build

  root = tmp_path_factory.mktemp("aki_lora")
  _build(root)
  return root, dict(llm_config=root / "llm", vision_config=root / "vision" / "config.json")


def test_a_full_fine_tuning_run_serves_as_a_base(tmp_path):
  """model.init_from may name a training run: its newest checkpoint's params and frozen tower."""
  from mma_jax.config import to_yaml
  from mma_jax.train.base import BaseMismatch, check, read_base
  from mma_jax.train.checkpoint import RunCheckpoints

  config = tiny_config()
  _, params, frozen = split_model(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))),
                                  config)
  rng = np.random.default_rng(0)
  values = lambda tree: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), tree)
  state = {"step": np.int32(1), "params": values(params), "frozen": values(frozen)}
  checkpoints = RunCheckpoints(tmp_path / "run", every=1, keep=1, async_save=False)
  checkpoints.save(1, state, {}, config)
  checkpoints.close()
  (tmp_path / "run" / "config.yaml").write_text(to_yaml(config))
  _, params = read_base(tmp_path / "run")
  expected = {**flatten(state["params"].to_pure_dict()), **flatten(state["frozen"].to_pure_dict())}
  assert params.keys() == expected.keys() and any(k.startswith("vision.") for k in params)
  assert all(np.array_equal(params[k], np.asarray(v)) for k, v in expected.items())
  with pytest.raises(BaseMismatch, match="records no base model"):   # a LoRA config on it
    check(None, {"path": "", "seed": 0, "fingerprint": ""}, "step 1")
