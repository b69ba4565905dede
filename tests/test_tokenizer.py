"""Tokenizers: the bundled GPT-2 BPE loads offline, special tokens are added and reported, local
directories load through AutoTokenizer."""
import logging

import pytest

from mma_jax.data.tokenizer import (add_special_tokens, bundled_gpt2_tokenizer, is_single_token,
                                    load_tokenizer)
from mma_jax.templates import IMAGE_TOKEN, TEMPLATES, required_special_tokens

GPT2_VOCAB = 50257


def test_bundled_gpt2_is_the_real_bpe():
  tok = bundled_gpt2_tokenizer()
  assert len(tok) == GPT2_VOCAB
  # Ids every GPT-2 BPE gives (and the example in transformers' GPT2Tokenizer docstring).
  assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
  assert tok(" Hello world", add_special_tokens=False)["input_ids"] == [18435, 995]
  assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
  assert tok.decode(tok("naïve café 😀")["input_ids"]) == "naïve café 😀"   # byte-level BPE
  assert not is_single_token(tok, IMAGE_TOKEN)


def test_load_gpt2_adds_and_reports_the_phi3_tokens(caplog):
  with caplog.at_level(logging.WARNING, logger="mma_jax.data.tokenizer"):
    tok, added = load_tokenizer("gpt2", "phi3")
  # <|endoftext|> is GPT-2's own EOS (also Phi-3's), so it is not added.
  assert added == [IMAGE_TOKEN, "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
  assert "lacked special tokens" in caplog.text and "<|assistant|>" in caplog.text
  assert len(tok) == GPT2_VOCAB + len(added)
  image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
  assert image >= GPT2_VOCAB
  # The image token is one id wherever it appears, and ordinary text is unchanged.
  assert tok("a<image>b <image>\n", add_special_tokens=False)["input_ids"] == [64, image, 65, 220,
                                                                                image, 198]
  assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
  assert tok.decode([image]) == IMAGE_TOKEN
  # Nothing is missing any more: a second pass adds nothing and logs nothing.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="mma_jax.data.tokenizer"):
    assert add_special_tokens(tok, required_special_tokens("phi3")) == []
  assert caplog.text == ""
  assert len(tok) == GPT2_VOCAB + len(added)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_gets_single_id_tokens(name):
  tok, added = load_tokenizer("gpt2", name)
  for token in required_special_tokens(name):
    assert is_single_token(tok, token), token
  assert set(added) == set(required_special_tokens(name)) - {"<|endoftext|>"}


def test_local_directory_through_autotokenizer(tmp_path):
  phi3, _ = load_tokenizer("gpt2", "phi3")
  phi3.save_pretrained(tmp_path / "phi3")
  bundled_gpt2_tokenizer().save_pretrained(tmp_path / "bare")

  tok, added = load_tokenizer(str(tmp_path / "phi3"), "phi3")
  assert added == []                                    # saved with its special tokens
  text = "<s> <|user|>\n<image>\nWhat?<|end|>\n<|assistant|>\nBlue<|endoftext|>"
  assert tok(text)["input_ids"] == phi3(text)["input_ids"]

  tok, added = load_tokenizer(str(tmp_path / "bare"), "qwen2")
  assert added == [IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
  assert is_single_token(tok, "<|im_start|>")


def test_missing_directory_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer directory .*nowhere' does not exist"):
    load_tokenizer(str(tmp_path / "nowhere"), "phi3")
