"""Typed configs: YAML + overrides, and every way a user can get them wrong."""
import pathlib
import subprocess
import sys

import pytest

from mma_jax.config import Config, ConfigError, load_config, main, to_yaml

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
  assert isinstance(load_config(path), Config)


def test_yaml_and_overrides(tmp_path):
  config = load_config(CONFIGS / "tiny_llm.yaml",
                       ["model.llm.num_layers=3", "train.learning_rate=3e-4",
                        "attention.mask=mma", "model.llm.rope.theta=5000",
                        "model.llm.eos_token_ids=[1, 2]"])
  assert config.model.llm.num_layers == 3 and config.model.llm.hidden_size == 64
  assert config.train.learning_rate == 3e-4 and config.attention.mask == "mma"
  assert config.model.llm.rope.theta == 5000.0 and isinstance(config.model.llm.rope.theta, float)
  assert config.model.llm.eos_token_ids == [1, 2]
  # The resolved config round-trips through YAML.
  (tmp_path / "resolved.yaml").write_text(to_yaml(config))
  assert load_config(tmp_path / "resolved.yaml") == config


def test_base_file_is_merged_underneath(tmp_path):
  (tmp_path / "run.yaml").write_text(f"base: {CONFIGS / 'tiny_llm.yaml'}\n"
                                     "model: {llm: {num_layers: 5}}\n")
  config = load_config(tmp_path / "run.yaml")
  assert config.model.llm.num_layers == 5 and config.model.llm.vocab_size == 512


@pytest.mark.parametrize("override,fragments", [
    ("model.llm.num_hedas=4", ["'model.llm.num_hedas' is unknown", "num_heads"]),
    ("trian.steps=4", ["'trian' is unknown", "train"]),
    ("model.llm.num_layers=two", ["'model.llm.num_layers' expects int", "'two'"]),
    ("train.steps=1.5", ["'train.steps' expects int"]),
    ("attention.impl=fast", ["'attention.impl' = 'fast' is not allowed", "auto, dense, flash, splash"]),
    ("model.llm.num_kv_heads=3", ["'model.llm.num_kv_heads'", "must divide num_heads=4"]),
    ("attention.block_q=100", ["'attention.block_q'", "multiple of 8"]),
    ("train.grad_accum=3", ["'train.grad_accum'", "must divide train.batch_size=8"]),
    ("model.llm.rope.type=longrope", ["original_max_position_embeddings", "must be positive"]),
    ("model.llm.vocab_size", ["must look like section.key=value"]),
])
def test_bad_overrides_name_the_key(override, fragments):
  with pytest.raises(ConfigError) as info:
    load_config(CONFIGS / "tiny_llm.yaml", [override])
  for fragment in fragments:
    assert fragment in str(info.value)


def test_longrope_needs_one_factor_per_frequency():
  with pytest.raises(ConfigError, match="short_factor.*needs head_dim/2 = 8 values.*got 2"):
    load_config(CONFIGS / "tiny_llm.yaml", [
        "model.llm.rope.type=longrope", "model.llm.rope.original_max_position_embeddings=64",
        "model.llm.rope.short_factor=[1, 1]", "model.llm.rope.long_factor=[1, 1]"])


def test_mesh_allows_one_remainder_axis():
  with pytest.raises(ConfigError, match="at most one of data, fsdp, tensor may be -1"):
    load_config(CONFIGS / "tiny_llm.yaml", ["mesh.data=-1"])


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "nope.yaml")
  (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(tmp_path / "bad.yaml")


def test_cli_prints_one_line_error_and_exits_nonzero(capsys):
  assert main([str(CONFIGS / "tiny_llm.yaml"), "model.llm.num_layers=two"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: config key 'model.llm.num_layers'")
  assert main([str(CONFIGS / "tiny_llm.yaml"), "model.llm.num_layers=3"]) == 0
  assert "num_layers: 3" in capsys.readouterr().out


def test_cli_as_a_module():
  result = subprocess.run([sys.executable, "-m", "mma_jax.config", str(CONFIGS / "tiny_llm.yaml"),
                           "bogus.key=1"], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: config key 'bogus' is unknown; allowed keys: model, "
                                   "attention, mesh, data, train, checkpoint, eval")
