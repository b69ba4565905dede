"""The official AKI code's own checkpoint and outputs (tests/fixtures/aki_official: the code of
github.com/sony/aki run on a tiny random model; its README says how). Our `aki` import takes the
file exactly as the official `save_pretrained` wrote it (head biases, SigLIP's pooling head, the
full config.json); our logits for the fixture's inference prompt equal the official ones in MMA
and in causal mode, our dense mask equals the official 4-D mask, greedy generation gives the
official tokens, export -> re-import is exact (what we do not keep written as zeros), and `verify`
passes on the file (and fails when our head bias is dropped).

The official check of an export (the official class, strict load_state_dict) needs the official
clone and its venv, so it is run by hand: tests/fixtures/aki_official/check_export.py (README)."""
import json
import pathlib

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mma_jax.attention.mask import materialize
from mma_jax.convert import operations
from mma_jax.convert.__main__ import main as convert_main
from mma_jax.convert.aki import AKI
from mma_jax.convert.store import load_model
from mma_jax.convert.transfer import build_with_params
from mma_jax.generate import Generator, SamplingConfig
from mma_jax.data.images import resizes_first
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation, attention_windows
from mma_jax.models import build_model
from test_aki import as_exported

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "aki_official"
BASE_CONFIGS = ["--llm-config", str(FIXTURE / "phi3" / "config.json"),
                "--vision-config", str(FIXTURE / "siglip" / "config.json")]
IMAGE_ID, ASSISTANT_ID, INITIAL, BASE_VOCAB = 32012, 32001, 32012, 32064


@pytest.fixture(scope="module")
def official():
  """(official.npz, official.json's `inference` record)."""
  meta = json.loads((FIXTURE / "official.json").read_text())["inference"]
  return np.load(FIXTURE / "official.npz"), meta


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The fixture's aki/ imported through the CLI, unmodified: (checkpoint dir, config, params)."""
  dst = tmp_path_factory.mktemp("aki_official") / "ckpt"
  assert convert_main(["import", "--format", "aki", "--src", str(FIXTURE / "aki"),
                       "--dst", str(dst), *BASE_CONFIGS]) == 0
  config, params = load_model(dst)
  return dst, config, params


@pytest.fixture(scope="module")
def model(imported):
  _, config, params = imported
  config.attention.impl = "dense"
  return build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)


def prompt_fields(official, mode: str) -> dict[str, np.ndarray]:
  """The inference prompt in our batch contract (one row, no padding): `<image>` expanded to the
  Perceiver's rows, the windows of `mode` from the layout's one function."""
  ref, meta = official
  assert ref["inference_attention_mask"].all()
  ids = ref["inference_input_ids"][0]
  rows = meta["num_vision_tokens"]
  at = int(np.flatnonzero(ids == IMAGE_ID)[0])
  tokens = np.concatenate([ids[:at], np.full(rows, IMAGE_ID), ids[at + 1:]]).astype(np.int32)
  length = len(tokens)
  index = np.full(length, -1, np.int32)
  index[at:at + rows] = np.arange(rows)
  header_end = int(np.flatnonzero(tokens == ASSISTANT_ID)[0]) + 1
  assert (at, at + rows) == tuple(meta["image_span_expanded"])
  assert (header_end - 1, length) == (meta["assistant_index_expanded"], meta["expanded_length"])
  lo, hi = attention_windows(length, mode, [(at, at + rows)], [(0, header_end)])
  return dict(tokens=tokens, positions=np.arange(length, dtype=np.int32),
              segment_ids=np.ones(length, np.int32), window_lo=lo, window_hi=hi,
              image_token_index=index)


def image(official) -> np.ndarray:
  """The official pixel tensor [C, H, W] in our layout [H, W, C]."""
  return official[0]["pixel_values_rgb_56"].transpose(1, 2, 0)


def logits_record(logits: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
  """What official.npz keeps of [L, V] logits: full rows, some columns, logsumexp, argmax."""
  top = logits.max(axis=-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
  return {"rows": logits[meta["logit_rows_positions"]], "cols": logits[:, meta["logit_columns"]],
          "lse": lse, "argmax": logits.argmax(axis=-1)}


@pytest.fixture(scope="module")
def our_logits(model, official):
  """mode -> our logits [L, V] for the inference prompt (both modes as rows of one batch)."""
  modes = ("mma", "causal")
  rows = [prompt_fields(official, mode) for mode in modes]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  images = np.stack([image(official)[None]] * len(modes))
  return dict(zip(modes, np.asarray(model(**batch, images=images))))


def export(imported, tmp_path) -> pathlib.Path:
  out = tmp_path / "export"
  assert convert_main(["export", "--format", "aki", "--src", str(imported[0]),
                       "--dst", str(out)]) == 0
  return out


def test_import_accepts_the_official_file(imported):
  _, config, params = imported
  m = config.model
  assert m.llm.head_bias and m.llm.vocab_size == INITIAL + 2 and config.attention.mask == "mma"
  assert (m.origin.image_token_id, m.origin.base_vocab_size) == (INITIAL, BASE_VOCAB)
  assert (m.origin.llm_path, m.origin.vision_path) == ("phi3", "siglip")
  official = load_file(str(FIXTURE / "aki" / "model.safetensors"))
  want = np.concatenate([official["lang_model.lm_head.bias"][:INITIAL],
                         official["lang_model.lm_head.additional_fc.bias"]])
  np.testing.assert_array_equal(params["llm.head_bias"], want)
  assert not any(k.startswith("vision.head") for k in params)   # the pooling head is not kept


@pytest.mark.parametrize("mode", ["mma", "causal"])
def test_logits_equal_the_official_ones(our_logits, official, mode):
  ref, meta = official
  ours = logits_record(our_logits[mode], meta)
  for part in ("rows", "cols", "lse"):
    np.testing.assert_allclose(ours[part], ref[f"logits_{mode}_{part}"], atol=1e-4, rtol=0,
                               err_msg=f"{mode} {part}")
  np.testing.assert_array_equal(ours["argmax"], ref[f"logits_{mode}_argmax"])


def test_modes_differ_where_the_official_ones_do(our_logits, official):
  _, meta = official
  diff = np.abs(our_logits["mma"] - our_logits["causal"]).max(axis=-1)
  first = meta["first_position_where_modes_differ"]
  assert diff[:first].max() < 1e-6 and diff[first] > 1e-2 and diff.max() > 1e-2


@pytest.mark.parametrize("mode", ["mma", "causal"])
def test_dense_mask_equals_the_official_mask(official, mode):
  fields = prompt_fields(official, mode)
  ours = np.asarray(materialize(*(fields[k][None] for k in
                                  ("segment_ids", "window_lo", "window_hi"))))[0]
  np.testing.assert_array_equal(ours, official[0][f"mask_{mode}"].astype(bool))


def test_greedy_generation_gives_the_official_tokens(model, official):
  """The user's path: the fixture's Phi-3.5 tokenizer with the official factory's added tokens,
  the AKI prompt laid out by ChatLayout from the question, the image file decoded and resized as
  official inference does (data.flavour=official), then MMA prefill and cached greedy decode."""
  ref, meta = official
  tokenizer, added = load_tokenizer(str(FIXTURE / "tokenizer"), "phi3", flavour="official")
  assert added == ["<pad>", "<image>", "<|endofchunk|>"]
  layout = ChatLayout("phi3", tokenizer, meta["num_vision_tokens"], "mma", "official")
  generator = Generator(model, layout, tokenizer, image_size=56, image_norm="siglip",
                        resize_first=resizes_first("official", inference=True))
  question = meta["question"]
  conversation = Conversation([("user", f"<image>\n{question}")], num_images=1)
  steps = len(ref["generate_ids"])
  out, = generator.generate([conversation], [[str(FIXTURE / meta["image"])]],
                            SamplingConfig(max_new_tokens=steps))
  assert out.token_ids == ref["generate_ids"].tolist() and out.finish_reason == "length"


def test_export_round_trip(imported, tmp_path):
  _, config, params = imported
  out = export(imported, tmp_path)
  # The official config.json and key set; equal tensors, except what we do not keep, written
  # as zeros: the dead base rows (initial_tokenizer_len ..) and SigLIP's pooling head.
  assert json.loads((out / "config.json").read_text()) == json.loads(
      (FIXTURE / "aki" / "config.json").read_text())
  official, exported = (load_file(str(d / "model.safetensors")) for d in (FIXTURE / "aki", out))
  assert set(exported) == set(official)
  for key, want in official.items():
    np.testing.assert_array_equal(exported[key], as_exported(key, want, INITIAL), err_msg=key)
  again_config, again = operations.read_hf(AKI, out, progress=False, llm_config=BASE_CONFIGS[1],
                                           vision_config=BASE_CONFIGS[3])
  assert again_config.model == config.model and set(again) == set(params)
  for path in params:
    np.testing.assert_array_equal(again[path], params[path], err_msg=path)


def test_verify_passes_and_needs_our_head_bias(capsys, monkeypatch):
  verify = ["verify", "--format", "aki", "--src", str(FIXTURE / "aki"), *BASE_CONFIGS,
            "--seq-len", "16", "--batch", "2"]
  assert convert_main(verify) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) <= 1e-4

  # The reference applies the file's head bias: ours without it is caught.
  read_hf = operations.read_hf

  def without_head_bias(*args, **kwargs):
    config, params = read_hf(*args, **kwargs)
    return config, {**params, "llm.head_bias": np.zeros_like(params["llm.head_bias"])}

  monkeypatch.setattr(operations, "read_hf", without_head_bias)
  assert convert_main(verify) == 1
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert float(last.split("=")[1]) > 1e-2
