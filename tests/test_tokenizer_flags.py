"""Chat templates under tokenizers whose added tokens carry the real models' flags (the values of
their tokenizer_config.json `added_tokens_decoder`): the layout tokenizes the whole text once and
gives exactly `tokenizer(text)`; each image's MMA window ends one past its turn's assistant role
token; the trained positions are the answers and their end tokens; and the text equals what the
model's own chat template (`apply_chat_template`) writes, where the model has one.

Base vocabularies: the real GPT-2 byte-level BPE (bundled) for the byte-level BPE models (Llama 3,
Qwen2) and the fixture's SentencePiece-style tokenizer (tests/fixtures/aki_official) for the
Llama-2 family (Vicuna) and Phi-3.5."""
import pathlib

import numpy as np
import pytest
from transformers import AddedToken, AutoTokenizer

from mma_jax.data.tokenizer import add_special_tokens, bundled_gpt2_tokenizer
from mma_jax.layout import ChatLayout, Conversation
from mma_jax.templates import IMAGE_TOKEN, get_template

SP_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "aki_official" / "tokenizer"


def flagged(content, *, lstrip=False, rstrip=False, normalized=False, special=True):
  return AddedToken(content, lstrip=lstrip, rstrip=rstrip, normalized=normalized, special=special)


# Meta-Llama-3-8B-Instruct: every added token has lstrip, rstrip, normalized = false, special =
# true; its chat template trims each message and opens with the BOS token.
LLAMA3_CHAT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-7B-Instruct: <|endoftext|>, <|im_start|>, <|im_end|> with lstrip, rstrip, normalized =
# false; a default system prompt when the conversation has none; no BOS.
QWEN2_CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llama3_tokenizer():
  tokenizer = bundled_gpt2_tokenizer()
  tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
  tokenizer.add_special_tokens({"additional_special_tokens": [flagged(t) for t in tokens]},
                               replace_extra_special_tokens=False)
  tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
  tokenizer.chat_template = LLAMA3_CHAT
  return tokenizer


def qwen2_tokenizer():
  tokenizer = bundled_gpt2_tokenizer()     # <|endoftext|> is GPT-2's own id 50256
  tokenizer.add_special_tokens({"additional_special_tokens": [flagged("<|im_start|>"),
                                                              flagged("<|im_end|>")]},
                               replace_extra_special_tokens=False)
  tokenizer.eos_token = "<|im_end|>"
  tokenizer.chat_template = QWEN2_CHAT
  return tokenizer


def sentencepiece_tokenizer():
  """Phi-3.5's flags as the fixture carries them (rstrip on role and end tokens); its <s>, </s>
  are Llama-2's (Vicuna v1.5: lstrip, rstrip = false)."""
  return AutoTokenizer.from_pretrained(str(SP_TOKENIZER), local_files_only=True)


TOKENIZERS = {"llama3": llama3_tokenizer, "qwen2": qwen2_tokenizer,
              "vicuna_v1": sentencepiece_tokenizer, "phi3": sentencepiece_tokenizer}
CONVERSATION = Conversation(
    [("user", f"{IMAGE_TOKEN}\nWhat colour is the car?"), ("assistant", "Red."),
     ("user", f"And this one? {IMAGE_TOKEN}"), ("assistant", "Blue, with white stripes.")],
    num_images=2)


def chat_layout(name):
  tokenizer = TOKENIZERS[name]()
  add_special_tokens(tokenizer, [IMAGE_TOKEN, *get_template(name).special_tokens])
  return ChatLayout(name, tokenizer, num_image_tokens=3)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_layout_tokens_are_the_tokenizers_and_windows_end_at_the_role_token(name):
  layout = chat_layout(name)
  tokenizer, template = layout.tokenizer, layout.template
  text, *_ = layout.render(CONVERSATION)
  example = layout.conversation(CONVERSATION)
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
  image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
  np.testing.assert_array_equal(example.tokens, np.repeat(ids, np.where(ids == image_id, 3, 1)))

  role = tokenizer(template.assistant_header, add_special_tokens=False)["input_ids"][-1]
  for (start, end), header_end in zip(example.image_spans, example.header_ends):
    assert example.tokens[header_end - 1] == role            # the role token itself is visible
    assert (example.window_lo[start:end] == end).all()
    assert (example.window_hi[start:end] == header_end).all()

  # trained: exactly the two answers and their end tokens, read back as text
  targets = example.targets[example.loss_mask > 0]
  end = template.answer.split("{answer}")[1]
  assert tokenizer.decode(targets) .replace(" ", "") == f"Red.{end}Blue,withwhitestripes.{end}"


@pytest.mark.parametrize("name,prefix", [("llama3", ""), ("qwen2", ""), ("phi3", "<s> ")])
def test_prompt_text_is_the_models_chat_template(name, prefix):
  """The generation prompt equals apply_chat_template(..., add_generation_prompt=True) (AKI
  prefixes `<s> ` as the official local_demo.py does); a whole conversation's text equals the
  template's up to the model's own end-of-text conventions."""
  layout = chat_layout(name)
  system = "You are a helpful assistant." if name == "qwen2" else "Be brief."
  messages = [{"role": "system", "content": system}] + [
      {"role": role, "content": text} for role, text in CONVERSATION.turns]
  conversation = Conversation(CONVERSATION.turns[:3], num_images=2, system=system)
  text, *_ = layout.render(conversation, generation_prompt=True)
  reference = layout.tokenizer.apply_chat_template(messages[:4], tokenize=False,
                                                   add_generation_prompt=True)
  assert text == prefix + as_ours(name, reference)
  whole, *_ = layout.render(Conversation(CONVERSATION.turns, 2, system=system))
  reference = layout.tokenizer.apply_chat_template(messages, tokenize=False)
  if name == "qwen2":
    reference = reference.removesuffix("\n")       # the template ends every message with "\n"
  if name == "phi3":   # a finished conversation: the template appends EOS after the last turn
    reference = reference.removesuffix("\n<|endoftext|>")
  assert whole == prefix + as_ours(name, reference)


def as_ours(name: str, reference: str) -> str:
  """Phi-3.5 ends answers with <|end|>; AKI trains EOS there instead (DESIGN.md §7)."""
  if name == "phi3":
    for role, text in CONVERSATION.turns:
      if role == "assistant":
        reference = reference.replace(f"{text}<|end|>", f"{text}<|endoftext|>")
  return reference
