"""Chat templates: the exact strings around system, user and assistant text.

A template is plain data. `layout.py` renders a conversation with it, tokenizes the whole text once
and finds every boundary (images, assistant headers, answers) from character offsets, so no token id
is ever hard-coded. Each template splits the assistant header in two:

  assistant_header  visible to image tokens under MMA; ends with the assistant role token
                    (phi3: `<|assistant|>`), exactly as in the official AKI code
  after_header      the rest of the prompt before the answer (phi3: the newline), not visible

and renders each answer with `answer`, whose whole text (answer + end-of-turn token) is trained.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"   # the official AKI code's second added token (ends captions)
FLAVOURS = ("default", "official")

# The AKI and LLaVA-1.5 system prompt.
CURIOUS_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's "
                       "questions.")


@dataclass(frozen=True)
class ChatTemplate:
  name: str
  prefix: str              # starts every chat example (BOS and what follows it)
  system: str              # the system block, with `{system}`; skipped when the system text is ""
  default_system: str      # used when a conversation gives no system prompt (None)
  user: str                # the user block, with `{content}` (holding the `<image>` placeholders)
  assistant_header: str    # ends with the assistant role token: the last token images may see
  after_header: str        # between the role token and the answer (prompt, not seen by images)
  answer: str              # with `{answer}`; all of it is trained, including the end token
  turn_separator: str      # after an answer when another turn follows (not trained)
  bos: str                 # starts a caption (pre-training) example
  eos: str                 # ends a caption example
  special_tokens: tuple[str, ...]   # must each be one token id (besides IMAGE_TOKEN)


TEMPLATES = {
    # AKI (Phi-3.5):
    #   `<s> <|system|>\n{system}<|end|>\n<|user|>\n<image>\n{q}<|end|>\n<|assistant|>\n`
    # (codes/open_flamingo/local_demo.py); the SFT target follows `<|assistant|>\n` and ends with
    # EOS, not `<|end|>` (sft_data_utils/base.py with add_eos_token). Phi-3's EOS is <|endoftext|>.
    "phi3": ChatTemplate(
        name="phi3",
        prefix="<s> ",
        system="<|system|>\n{system}<|end|>\n",
        default_system=CURIOUS_USER_SYSTEM,
        user="<|user|>\n{content}<|end|>\n",
        assistant_header="<|assistant|>",
        after_header="\n",
        answer="{answer}<|endoftext|>",
        turn_separator="\n",
        bos="<s>",
        eos="<|endoftext|>",
        special_tokens=("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                        "<|endoftext|>"),
    ),
    # Llama 3 instruct: role headers between <|start_header_id|> and <|end_header_id|>.
    "llama3": ChatTemplate(
        name="llama3",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        default_system="",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>",
        after_header="\n\n",
        answer="{answer}<|eot_id|>",
        turn_separator="",
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|end_of_text|>"),
    ),
    # Qwen2 ChatML; Qwen has no BOS.
    "qwen2": ChatTemplate(
        name="qwen2",
        prefix="",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant",
        after_header="\n",
        answer="{answer}<|im_end|>",
        turn_separator="\n",
        bos="",
        eos="<|endoftext|>",
        special_tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    ),
    # LLaVA-1.5 conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ...". The prompt ends
    # at "ASSISTANT:"; the space before the answer belongs to the answer's first token.
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        prefix="<s>",
        system="{system} ",
        default_system=CURIOUS_USER_SYSTEM,
        user="USER: {content} ",
        assistant_header="ASSISTANT:",
        after_header="",
        answer=" {answer}</s>",
        turn_separator="",
        bos="<s>",
        eos="</s>",
        special_tokens=("<s>", "</s>"),
    ),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
  if isinstance(template, ChatTemplate):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; choose one of: {', '.join(TEMPLATES)}")
  return TEMPLATES[template]


def required_special_tokens(template: str | ChatTemplate) -> tuple[str, ...]:
  """Tokens a tokenizer must hold as single ids to lay out conversations with `template`."""
  return (IMAGE_TOKEN,) + get_template(template).special_tokens


def official_aki(template: str | ChatTemplate, bos: str, eos: str) -> ChatTemplate:
  """The aki (phi3) template as the official AKI code lays out *training* text (DESIGN.md §7):
  the tokenizer's BOS and EOS around the text with nothing between BOS and the system block
  (sft_data_utils/base.py encode_prompt with add_bos/add_eos), and captions
  `<image>{caption}<|endofchunk|>` + EOS (train/data.py preprocess_paired_text). Prompts for
  generation keep the template's own prefix, "<s> " as local_demo.py writes it."""
  t = get_template(template)
  if t.name != "phi3":
    raise ValueError(f"data.flavour=official reproduces the official AKI code, whose template is "
                     f"phi3; got template {t.name!r}")
  return dataclasses.replace(t, prefix=bos, bos=bos, eos=END_OF_CHUNK + eos,
                             answer="{answer}" + eos,
                             special_tokens=t.special_tokens + (END_OF_CHUNK,))
