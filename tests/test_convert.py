"""hf-llm conversion: round trips through transformers, the CLI contract, and bad inputs."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_models import save_tiny_llm
from mma_jax.convert import operations
from mma_jax.convert.llm import HF_LLM
from mma_jax.convert.__main__ import main as convert_main
from mma_jax.convert.safetensors_io import HFCheckpoint, write_safetensors
from mma_jax.convert import store
from mma_jax.convert.store import load_model


def _logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_import_export_round_trip_through_transformers(tmp_path, family):
  original = save_tiny_llm(family, tmp_path / "hf")
  assert convert_main(["import", "--format", "hf-llm", "--src", str(tmp_path / "hf"),
                       "--dst", str(tmp_path / "ckpt")]) == 0
  assert convert_main(["export", "--format", "hf-llm", "--src", str(tmp_path / "ckpt"),
                       "--dst", str(tmp_path / "out")]) == 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", dtype=torch.float32).eval()
  assert type(exported) is type(original)
  tokens = np.random.default_rng(0).integers(0, 96, (2, 40))
  np.testing.assert_allclose(_logits(exported, tokens), _logits(original, tokens), atol=1e-6, rtol=0)
  # Tensor for tensor: the exported file holds exactly the original weights.
  before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(
      tmp_path / "out" / "model.safetensors")
  assert set(after) == set(before) - {"lm_head.weight"} if family == "qwen2" else set(before)
  for key in after:
    np.testing.assert_array_equal(after[key], before[key])


def test_bf16_import_stores_bf16_and_export_reloads(tmp_path):
  save_tiny_llm("llama", tmp_path / "hf")
  operations.import_checkpoint(HF_LLM, tmp_path / "hf", tmp_path / "ckpt", dtype="bf16")
  config, params = load_model(tmp_path / "ckpt")
  assert config.model.param_dtype == "bfloat16"
  assert all(str(a.dtype) == "bfloat16" for a in params.values())
  operations.export_checkpoint(HF_LLM, tmp_path / "ckpt", tmp_path / "out", dtype="bf16")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_saved_params_restore_exactly_from_many_chunks(tmp_path, monkeypatch):
  """The low-memory save (no copies, no OCDBT, arrays cut into chunks) restores every array
  bit for bit, also one split over many chunks, and leaves the caller's arrays untouched."""
  monkeypatch.setattr(store, "CHUNK_BYTES", 4096)
  rng = np.random.default_rng(0)
  params = {"layers.mlp.up.kernel": rng.standard_normal((3, 64, 40)).astype(np.float32),
            "embed.embedding": rng.standard_normal((50, 8)).astype(np.float32)}
  before = {k: v.copy() for k, v in params.items()}
  save_tiny_llm("llama", tmp_path / "hf")
  config = operations.read_hf(HF_LLM, tmp_path / "hf")[0]
  store.save_model(tmp_path / "ckpt", params, config)
  chunks = [p for p in (tmp_path / "ckpt" / "params" / "layers.mlp.up.kernel").rglob("*")
            if p.is_file() and not p.name.startswith(".")]
  assert len(chunks) > 4                                   # 30 KiB in chunks of at most 4 KiB
  _, restored = load_model(tmp_path / "ckpt")
  assert restored.keys() == params.keys()
  for key, array in params.items():
    np.testing.assert_array_equal(restored[key], array)
    np.testing.assert_array_equal(array, before[key])


def test_sharded_checkpoint_is_streamed_through_its_index(tmp_path):
  save_tiny_llm("phi3", tmp_path / "hf")
  tensors = load_file(tmp_path / "hf" / "model.safetensors")
  (tmp_path / "hf" / "model.safetensors").unlink()
  files = write_safetensors(tmp_path / "hf", sorted(tensors.items()), max_shard_bytes=40_000)
  assert len(files) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  ckpt = HFCheckpoint(tmp_path / "hf")
  assert ckpt.keys() == sorted(ckpt.keys(), key=lambda k: (str(ckpt._key_to_file[k]), k))
  assert operations.verify(HF_LLM, tmp_path / "hf", seq_len=16, batch=2) <= 1e-4


def test_verify_cli_prints_the_contract_line(tmp_path):
  save_tiny_llm("qwen2", tmp_path)
  result = subprocess.run([sys.executable, "-m", "mma_jax.convert", "verify", "--format", "hf-llm",
                           "--src", str(tmp_path), "--seq-len", "12", "--batch", "2"],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) <= 1e-4


def test_verify_exits_1_when_the_difference_exceeds_tol(tmp_path, capsys):
  save_tiny_llm("llama", tmp_path)
  code = convert_main(["verify", "--format", "hf-llm", "--src", str(tmp_path), "--tol", "0"])
  diff = float(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1])
  assert (code, diff > 0) == (1, True)


# ------------------------------------------------------------------------------------ bad inputs
def _error_of(capsys, argv) -> str:
  capsys.readouterr()  # drop what building the fixture printed
  assert convert_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_missing_shard_is_named(tmp_path, capsys):
  save_tiny_llm("llama", tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  (tmp_path / "model.safetensors").unlink()
  files = write_safetensors(tmp_path, sorted(tensors.items()), max_shard_bytes=40_000)
  files[1].unlink()
  err = _error_of(capsys, ["import", "--format", "hf-llm", "--src", str(tmp_path),
                           "--dst", str(tmp_path / "ckpt")])
  assert files[1].name in err and "missing" in err
  assert not (tmp_path / "ckpt").exists()


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, capsys):
  save_tiny_llm("llama", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 72  # the weights say 80
  (tmp_path / "config.json").write_text(json.dumps(config))
  err = _error_of(capsys, ["import", "--format", "hf-llm", "--src", str(tmp_path),
                           "--dst", str(tmp_path / "ckpt")])
  assert re.search(r"shape mismatch for 'model\.layers\.0\.mlp\.\w+_proj\.weight': "
                   r"checkpoint has \((64, 80|80, 64)\), our model expects \((64, 72|72, 64)\)", err)


def test_missing_and_unexpected_keys_are_named(tmp_path, capsys):
  save_tiny_llm("llama", tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  removed = tensors.pop("model.layers.1.mlp.up_proj.weight")
  save_file(tensors, tmp_path / "model.safetensors")
  err = _error_of(capsys, ["verify", "--format", "hf-llm", "--src", str(tmp_path)])
  assert "missing key 'model.layers.1.mlp.up_proj.weight'" in err
  tensors["model.layers.1.mlp.up_proj.weight"] = removed
  tensors["model.layers.1.mlp.extra.weight"] = removed
  save_file(tensors, tmp_path / "model.safetensors")
  err = _error_of(capsys, ["verify", "--format", "hf-llm", "--src", str(tmp_path)])
  assert "unexpected key 'model.layers.1.mlp.extra.weight'" in err


def test_pickle_needs_the_flag(tmp_path, capsys):
  model = save_tiny_llm("llama", tmp_path)
  (tmp_path / "model.safetensors").unlink()
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  err = _error_of(capsys, ["import", "--format", "hf-llm", "--src", str(tmp_path),
                           "--dst", str(tmp_path / "ckpt")])
  assert "pytorch_model.bin" in err and "--allow-pickle" in err
  assert convert_main(["import", "--format", "hf-llm", "--src", str(tmp_path),
                       "--dst", str(tmp_path / "ckpt"), "--allow-pickle"]) == 0


def test_missing_directory_and_unsupported_model_type(tmp_path, capsys):
  err = _error_of(capsys, ["verify", "--format", "hf-llm", "--src", str(tmp_path / "nope")])
  assert "nope" in err
  save_tiny_llm("llama", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(config))
  err = _error_of(capsys, ["verify", "--format", "hf-llm", "--src", str(tmp_path)])
  assert "model_type 'gpt2'" in err


def test_existing_destination_is_not_overwritten(tmp_path, capsys):
  save_tiny_llm("llama", tmp_path / "hf")
  args = ["import", "--format", "hf-llm", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "c")]
  assert convert_main(args) == 0
  assert "already holds a checkpoint" in _error_of(capsys, args)
