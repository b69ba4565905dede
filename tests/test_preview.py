"""python -m mma_jax.data.preview: the prompt and target of the pipeline's own examples (the
contract: prompt = the untrained tokens decoded with one `<image>` per image, target = the trained
tokens decoded), labelled by component as training draws them; exit 2 on a bad config."""
import io
import json
import pathlib

import numpy as np
import yaml
from PIL import Image

import sft_fixtures
from mma_jax.data.pipeline import DataPipeline
from mma_jax.data.preview import main, previews
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation

REPO = pathlib.Path(__file__).parent.parent
SFT_CONFIG = str(REPO / "configs" / "aki_phi35_sft.yaml")
TOKENIZER = str(REPO / "tests" / "fixtures" / "aki_official" / "tokenizer")
T = 3


def chat(id, turns, images):
  return {"id": id, "images": images, "conversations": {"role": [r for r, _ in turns],
                                                        "content": [c for _, c in turns]}}


def png_bytes() -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def test_prompt_and_target_are_the_untrained_and_trained_text():
  tokenizer = load_tokenizer("gpt2", "phi3")[0]   # byte-level BPE: decode(encode(text)) == text
  image = png_bytes()
  one = [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")]
  two = [("user", "<image> and <image>\nSame?"), ("assistant", "No."), ("user", "Sure?"),
         ("assistant", "Yes, sure.")]
  records = [chat("one", one, [image]), chat("two", two, [image, image])]
  pipeline = DataPipeline(records, dataset="llava_instruct", tokenizer=tokenizer,
                          num_image_tokens=T, batch_size=1, max_length=256, image_size=8,
                          shuffle=False, num_epochs=1, process_index=0, process_count=1)
  first, second = previews(pipeline, 5, "mma")
  layout = ChatLayout("phi3", tokenizer, T, "mma")
  text = layout.render(Conversation(one, num_images=1))[0]
  assert first["prompt"] + first["target"] == text
  assert first["target"] == "A cat.<|endoftext|>" and first["prompt"].count("<image>") == 1
  assert (first["dataset"], first["id"], first["mask"], first["images"]) == (
      "llava_instruct", "one", "mma", 1)
  assert first["image_tokens"] == T and first["target_tokens"] == len(
      tokenizer.encode("A cat.<|endoftext|>"))
  text = layout.render(Conversation(two, num_images=2))[0]
  # Two answers decode as one run; the prompt is the text without them (images one mark each).
  assert second["target"] == "No.<|endoftext|>Yes, sure.<|endoftext|>"
  assert second["prompt"] == text.replace("No.<|endoftext|>", "").replace(
      "Yes, sure.<|endoftext|>", "")
  assert second["prompt"].count("<image>") == 2 and second["image_tokens"] == 2 * T


def test_the_sft_mixture_config_previews_on_a_fixture_root(tmp_path, capsys, caplog):
  """configs/aki_phi35_sft.yaml with data.root at a fixture root in the original formats: every
  source is built on first use, and the examples come labelled by component."""
  root = sft_fixtures.write_root(tmp_path / "root", broken=True)
  sft_fixtures.write_llava_manual(root, root / "llava_instruct")
  args = [SFT_CONFIG, f"data.root={root}", f"data.tokenizer={TOKENIZER}", "data.flavour=official",
          "model.vision.image_size=28", "model.vision.patch_size=14", "--n", "24", "--jsonl"]
  assert main(args) == 0
  out, err = capsys.readouterr()
  rows = [json.loads(line) for line in out.splitlines()]
  assert len(rows) == 24
  names = {"vqav2", "gqa", "vsr", "ocr_vqa", "aokvqa", "scienceqa", "refcoco", "refcoco_plus",
           "refcocog", "visual_genome", "llava_instruct"}
  assert {r["dataset"] for r in rows} <= names and len({r["dataset"] for r in rows}) >= 9
  for r in rows:
    assert {"dataset", "id", "prompt", "target"} <= r.keys()
    assert r["target"].endswith("<|endoftext|>")
    # MMA windows come with images (ScienceQA rows without one lay out causal)
    assert r["mask"] == ("mma" if r["images"] else "causal")
    assert r["prompt"].count("<image>") == r["images"] == r["image_tokens"] // 144
    assert r["prompt"].startswith("<s><|system|>") and r["prompt"].endswith("<|assistant|>")
  vqa = next(r for r in rows if r["dataset"] == "vqav2")
  assert "Answer the question using a single word or phrase." in vqa["prompt"]
  assert "Downloading" in err and "Downloading" not in out   # tfds's narration kept off stdout
  assert any("data.mixture[0] (vqav2): building vqav2 from" in r.getMessage()
             for r in caplog.records)
  # The human-readable form: a block per example.
  assert main(args[:-1] + ["--n", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count("\n--- ") == 1 and out.startswith("--- 1. ") and "[target]" in out


def test_bad_configs_exit_2_with_the_message(tmp_path, capsys):
  assert main([str(tmp_path / "missing.yaml")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main([SFT_CONFIG, "data.mixture=[{dataset: gqa, weight: 0}]"]) == 2
  assert "data.mixture[0] (gqa).weight" in capsys.readouterr().err
  assert main([SFT_CONFIG, f"data.root={tmp_path}"]) == 2
  assert "data.mixture[0] (vqav2): building from manual_dir" in capsys.readouterr().err



def test_preview_gives_the_official_prompt_and_target_of_every_sft_source(tmp_path, capsys):
  """Issue 17's acceptance: for the fixture records of every SFT source, `preview --jsonl` in the
  official flavour prints the prompt and target that the official dataset classes and templatizer
  made of the same records (tests/fixtures/official_sft/expected.json, made by make_expected.py
  with the official code; VSR in its official_split config, which reproduces the official
  question). The SFT config with every source as an equal-weight component: a few hundred draws
  visit every record."""
  expected = json.loads((REPO / "tests" / "fixtures" / "official_sft" / "expected.json")
                        .read_text())["records"]
  root = sft_fixtures.write_root(tmp_path / "root")
  sft_fixtures.write_llava_manual(root, root / "llava_instruct")
  config = yaml.safe_load(pathlib.Path(SFT_CONFIG).read_text())
  config["data"]["mixture"] = [
      {"dataset": name, "weight": 1,
       "manual_dir": "llava_instruct" if name == "llava_instruct" else "."}
      for name in sorted({r["dataset"] for r in expected})]
  config["base"] = [str(REPO / "configs" / base) for base in config["base"]]
  path = tmp_path / "sft.yaml"
  path.write_text(yaml.safe_dump(config))
  assert main([str(path), f"data.root={root}", f"data.tokenizer={TOKENIZER}",
               "data.flavour=official", "model.vision.image_size=28", "model.vision.patch_size=14",
               "--n", "300", "--jsonl"]) == 0
  seen = {}
  for line in capsys.readouterr().out.splitlines():
    row = json.loads(line)
    seen.setdefault((row["dataset"], row["id"]), set()).add((row["prompt"], row["target"]))
  for record in expected:
    key = (record["dataset"].replace("/", "_"), record["id"])   # the component's name
    assert key in seen, f"{key} never drawn"
    assert (record["prompt"], record["target"]) in seen[key], (key, seen[key])
  assert len(seen) == len({(r["dataset"], r["id"]) for r in expected})   # nothing else drawn
