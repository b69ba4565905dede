"""The llava format: verify with images, export back to transformers, both key layouts."""
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from hf_models import save_tiny_llava
from mma_jax.convert import operations
from mma_jax.convert.__main__ import main as convert_main
from mma_jax.convert.llava import LLAVA, image_batch
from mma_jax.convert.store import load_model


def test_verify_with_images(tmp_path, capsys):
  save_tiny_llava(tmp_path)
  assert convert_main(["verify", "--format", "llava", "--src", str(tmp_path), "--seq-len", "24",
                       "--batch", "3"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) <= 1e-4


def test_images_change_the_logits(tmp_path):
  """The comparison above must depend on the image path: other pixels, other logits."""
  original = save_tiny_llava(tmp_path)
  config, _ = operations.read_hf(LLAVA, tmp_path)
  tokens, valid, _, images = image_batch(config, 24, 1, seed=0)
  with torch.no_grad():
    logits = [original(input_ids=torch.from_numpy(tokens).long(),
                       pixel_values=torch.from_numpy(x[:, 0]).permute(0, 3, 1, 2)).logits
              for x in (images, images + 1.0)]
  assert float((logits[0] - logits[1]).abs().max()) > 1e-3


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
  original = save_tiny_llava(tmp_path / "hf")
  operations.import_checkpoint(LLAVA, tmp_path / "hf", tmp_path / "ckpt")
  config, _ = load_model(tmp_path / "ckpt")
  assert config.model.kind == "mllm" and config.attention.mask == "causal"
  assert config.model.vision.feature_layer == -2 and config.model.vision.drop_cls
  operations.export_checkpoint(LLAVA, tmp_path / "ckpt", tmp_path / "out")
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / "out", dtype=torch.float32).eval()
  tokens, valid, _, images = image_batch(config, 24, 2, seed=3)
  inputs = dict(input_ids=torch.from_numpy(tokens).long(),
                pixel_values=torch.from_numpy(images[:, 0]).permute(0, 3, 1, 2),
                attention_mask=torch.from_numpy(valid.astype(np.int64)))
  with torch.no_grad():
    diff = (exported(**inputs).logits - original(**inputs).logits).abs().max()
  assert float(diff) <= 1e-6


def test_in_memory_key_layout_imports_the_same(tmp_path):
  """transformers-5 in-memory names (model.language_model.*, lm_head.weight, ...)."""
  original = save_tiny_llava(tmp_path / "disk")
  (tmp_path / "memory").mkdir()
  save_file({k: v.contiguous() for k, v in original.state_dict().items()},
            tmp_path / "memory" / "model.safetensors")
  (tmp_path / "memory" / "config.json").write_text((tmp_path / "disk" / "config.json").read_text())
  assert any(k.startswith("model.language_model.") for k in original.state_dict())
  _, on_disk = operations.read_hf(LLAVA, tmp_path / "disk")
  _, in_memory = operations.read_hf(LLAVA, tmp_path / "memory")
  assert on_disk.keys() == in_memory.keys()
  for key in on_disk:
    np.testing.assert_array_equal(on_disk[key], in_memory[key])


def test_unsupported_feature_layers_are_refused(tmp_path, capsys):
  save_tiny_llava(tmp_path, vision_feature_layer=[-2, -1])
  capsys.readouterr()
  assert convert_main(["verify", "--format", "llava", "--src", str(tmp_path)]) == 2
  assert "vision_feature_layer=[-2, -1]" in capsys.readouterr().err


def test_seq_len_too_short_for_the_image(tmp_path, capsys):
  save_tiny_llava(tmp_path)
  capsys.readouterr()
  assert convert_main(["verify", "--format", "llava", "--src", str(tmp_path),
                       "--seq-len", "10"]) == 2
  assert "--seq-len 10 cannot hold an image of 16 tokens" in capsys.readouterr().err
