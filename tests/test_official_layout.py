"""The aki (phi3) layout against the official AKI code's own outputs (tests/fixtures/aki_official,
made by running github.com/sony/aki; see its README): a tokenizer with Phi-3.5's real added-token
flags (`rstrip` on the role tokens), the inference prompt's tokens, image span and 4-D MMA mask,
and in the official flavour the SFT samples (single-turn split, labels after the first
`<|assistant|>`) and the pre-training captions, token for token and label for label."""
import json
import pathlib

import numpy as np
import pytest

from mma_jax.attention.mask import materialize
from mma_jax.data.pipeline import MakeExample
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.layout import ChatLayout, Conversation, ConversationError, single_turns

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "aki_official"
OFFICIAL = json.loads((FIXTURE / "official.json").read_text())
ARRAYS = np.load(FIXTURE / "official.npz")
VISION_TOKENS = OFFICIAL["inference"]["num_vision_tokens"]        # 8
IMAGE_ID = OFFICIAL["special_token_ids"]["<image>"]              # 32012


@pytest.fixture(scope="module")
def tokenizer():
  tokenizer, added = load_tokenizer(str(FIXTURE / "tokenizer"), "phi3", flavour="official")
  assert added == ["<pad>", "<image>", "<|endofchunk|>"]   # in the official factory's order
  return tokenizer


def layout(tokenizer, flavour="official", mode="mma"):
  return ChatLayout("phi3", tokenizer, VISION_TOKENS, mode, flavour)


def expanded(ids) -> np.ndarray:
  """Official ids with each <image> replaced by its vision tokens (the official forward's order)."""
  ids = np.asarray(ids)
  return np.repeat(ids, np.where(ids == IMAGE_ID, VISION_TOKENS, 1))


def dense_mask(example) -> np.ndarray:
  return np.asarray(materialize(example.segment_ids[None], example.window_lo[None],
                                example.window_hi[None])[0])


def trained(example) -> tuple[np.ndarray, np.ndarray]:
  """(positions whose next token is trained, those targets) of one of our examples."""
  at = np.flatnonzero(example.loss_mask)
  return at, example.targets[at]


def official_trained(labels) -> tuple[np.ndarray, np.ndarray]:
  """The same from official expanded labels (HF convention: position t predicts labels[t + 1])."""
  labels = np.asarray(labels)
  at = np.flatnonzero(labels[1:] != -100)
  return at, labels[at + 1]


def test_fixture_tokenizer_carries_phi35_flags(tokenizer):
  flags = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
  assert flags["<|assistant|>"].rstrip and flags["<|user|>"].rstrip and flags["<|end|>"].rstrip
  assert not flags["<|endoftext|>"].rstrip and not flags["<image>"].rstrip
  # the role token swallows its newline: "<|assistant|>\n" is one token
  assert tokenizer("<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"] == [
      32007, 32001]


@pytest.mark.parametrize("flavour", ["default", "official"])
def test_inference_prompt_tokens_span_and_mask_equal_the_official(tokenizer, flavour):
  """local_demo.py's prompt (`<s> <|system|>...<|assistant|>\\n`) in both flavours."""
  inference = OFFICIAL["inference"]
  conversation = Conversation([("user", "<image>\n" + inference["question"])], num_images=1)
  example = layout(tokenizer, flavour).conversation(conversation, generation_prompt=True)
  np.testing.assert_array_equal(example.tokens, expanded(inference["input_ids"]))
  assert example.image_spans.tolist() == [inference["image_span_expanded"]]
  assert example.header_ends.tolist() == [inference["assistant_index_expanded"] + 1]
  np.testing.assert_array_equal(dense_mask(example), ARRAYS["mask_mma"].astype(bool))
  causal = layout(tokenizer, flavour, "causal").conversation(conversation, generation_prompt=True)
  np.testing.assert_array_equal(dense_mask(causal), ARRAYS["mask_causal"].astype(bool))


def official_conversations():
  records = OFFICIAL["sft"]["records"]
  vqa = records["vqa"]
  vqa_prompt = "Answer the question using a single word or phrase. " + vqa["question"]
  llava = [("user" if t["from"] == "human" else "assistant", t["value"])
           for t in records["llava"]["conversations"]]
  return [Conversation([("user", "<image>\n" + vqa_prompt), ("assistant", vqa["answer"])], 1),
          Conversation(llava, 1)]


def test_official_sft_samples_equal_the_official_tokens_labels_and_masks(tokenizer):
  """encode_prompt's ids (BOS + text + EOS, no space after BOS), the LLaVA record split into
  single turns, labels = everything after the first <|assistant|>, the MMA 4-D mask."""
  ours = [ex for c in official_conversations() for ex in layout(tokenizer).training_examples(c)]
  samples = OFFICIAL["sft"]["samples"]
  assert len(ours) == len(samples) == 3
  for i, (example, sample) in enumerate(zip(ours, samples)):
    n = example.length
    np.testing.assert_array_equal(example.tokens, expanded(sample["input_ids"]))
    ours_at, ours_targets = trained(example)
    official_at, official_targets = official_trained(ARRAYS["sft_expanded_labels"][i][:n])
    np.testing.assert_array_equal(ours_at, official_at)
    np.testing.assert_array_equal(ours_targets, official_targets)
    assert (ARRAYS["sft_expanded_labels"][i][n:] == -100).all()   # the rest is padding
    np.testing.assert_array_equal(dense_mask(example), ARRAYS["sft_mask_mma"][i][:n, :n] == 1)


def test_default_flavour_differs_where_documented(tokenizer):
  """Ours by default: `<s> ` before the system block (as local_demo prompts) and one example
  for the whole conversation, every answer trained."""
  default = layout(tokenizer, "default")
  vqa, llava = official_conversations()
  assert len(default.training_examples(llava)) == 1
  tokens = default.conversation(vqa).tokens
  official = expanded(OFFICIAL["sft"]["samples"][0]["input_ids"])
  assert tokens[:3].tolist() == [1, 946, 32006] and official[:2].tolist() == [1, 32006]
  np.testing.assert_array_equal(tokens[2:], official[1:])


def test_official_captions_equal_preprocess_paired_text(tokenizer):
  """`<image>{caption}<|endofchunk|>` with BOS and EOS; trained: the caption, <|endofchunk|> and
  EOS (the official labels keep special tokens; <image>'s vision rows are -100)."""
  pt = OFFICIAL["pretraining"]
  for i, caption in enumerate(pt["captions"]):
    example = layout(tokenizer).caption(caption)
    ids = ARRAYS["pt_input_ids"][i][ARRAYS["pt_attention_mask"][i] == 1]
    np.testing.assert_array_equal(example.tokens, expanded(ids))
    labels = np.where(ARRAYS["pt_attention_mask"][i] == 1, ARRAYS["pt_labels"][i], -100)
    labels = np.concatenate([labels[:1], np.full(VISION_TOKENS, -100), labels[2:]])
    ours_at, ours_targets = trained(example)
    official_at, official_targets = official_trained(labels[:example.length])
    np.testing.assert_array_equal(ours_at, official_at)
    np.testing.assert_array_equal(ours_targets, official_targets)
    np.testing.assert_array_equal(dense_mask(example), ARRAYS["pt_mask"][i][:example.length,
                                                                             :example.length] == 1)


def test_single_turns_move_the_image_to_the_front_and_refuse_two_images():
  conversation = Conversation([("user", "What is it?\n<image>"), ("assistant", "A dog."),
                               ("user", "Colour?"), ("assistant", "Brown.")], 1, system="S")
  first, second = single_turns(conversation)
  assert first.turns == [("user", "<image>\nWhat is it?"), ("assistant", "A dog.")]
  assert second.turns == [("user", "<image>\nColour?"), ("assistant", "Brown.")]
  assert first.system == second.system == "S" and first.num_images == 1
  with pytest.raises(ConversationError, match="one image per sample"):
    single_turns(Conversation([("user", "<image><image> Hi"), ("assistant", "Yo")], 2))


def test_the_pipeline_splits_a_llava_record_into_official_samples(tokenizer):
  """MakeExample (data.flavour=official) turns one llava_instruct record into the three official
  samples' token rows (the packing step sees three examples)."""
  image = np.zeros((20, 20, 3), np.uint8)
  records = OFFICIAL["sft"]["records"]
  llava = records["llava"]["conversations"]
  record = {"id": "r0", "images": [image, image],
            "conversations": {"role": ["user" if t["from"] == "human" else "assistant"
                                       for t in llava],
                              "content": [t["value"] for t in llava]}}
  make = MakeExample(dataset="llava_instruct", tokenizer=tokenizer, template="phi3",
                     mask_mode="mma", num_image_tokens=VISION_TOKENS, max_length=512,
                     too_long="truncate", images_per_row=1, image_size=28, flavour="official")
  assert make.map(record)["skip"] == "image_count_mismatch"   # two images: official knows one
  record["images"] = [image]
  examples = make.map(record)["examples"]
  assert len(examples) == 2
  for example, sample in zip(examples, OFFICIAL["sft"]["samples"][1:]):
    np.testing.assert_array_equal(example["tokens"], expanded(sample["input_ids"]))
    assert example["images"].shape == (1, 28, 28, 3)
