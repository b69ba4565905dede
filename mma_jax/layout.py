"""Conversation -> one example of the batch contract (DESIGN.md §1, §2); numpy only (data workers).

A conversation is rendered with a chat template (templates.py) into one string, tokenized once,
and every boundary (each `<image>`, each assistant header end, each answer) is found from the
tokenizer's character offsets. Each `<image>` token then becomes `num_image_tokens` copies, and
`attention_windows` -- the only place that decides who sees whom beyond causal -- turns the image
spans and turn headers into the per-token key windows of the chosen mask mode.

The example is laid out alone (segment 1, positions from 0, windows from 0); packing into rows
shifts them later in the data pipeline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mma_jax.config import MASK_MODES
from mma_jax.templates import FLAVOURS, IMAGE_TOKEN, ChatTemplate, get_template, official_aki

ROLES = ("user", "assistant")


class ConversationError(ValueError):
  """A malformed conversation or caption; `reason` is a short key to count skipped examples by."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"malformed conversation ({reason}): {message}")
    self.reason = reason


@dataclass(frozen=True)
class Conversation:
  """Turns of (role, text) with role "user" or "assistant"; `<image>` placeholders in user turns.

  The k-th placeholder (in reading order) takes image k; there must be exactly `num_images`.
  `system`: None uses the template's default system prompt, "" leaves the system block out.
  """
  turns: Sequence[tuple[str, str]]
  num_images: int = 0
  system: str | None = None


@dataclass
class Example:
  """One laid-out example; arrays are [L] int32 unless noted (DESIGN.md §2, the batch contract)."""
  tokens: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray          # all 1 (one example); packing renumbers
  window_lo: np.ndarray            # extra key window [lo, hi) beyond causal; lo == hi means none
  window_hi: np.ndarray
  targets: np.ndarray              # tokens shifted left by one; the last is 0 (never trained)
  loss_mask: np.ndarray            # float32; 1 where the target is an answer (or its end) token
  image_token_index: np.ndarray    # image_k * num_image_tokens + r on image tokens, -1 on text
  image_spans: np.ndarray          # [num_images, 2] token [start, end) of each image
  header_ends: np.ndarray          # [num_turns] one past each assistant role token

  @property
  def length(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_images(self) -> int:
    return int(self.image_spans.shape[0])


# ------------------------------------------------------------------------------------ who sees whom
def attention_windows(length: int, mode: str, image_spans: Sequence[tuple[int, int]],
                      prompt_spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Per-token key windows [lo, hi) beyond causal for `mode` (DESIGN.md §1 table).

  image_spans: token [start, end) of each image. prompt_spans: per turn, [start, header_end) from
  the turn's first prompt token to one past its assistant role token. An image sees up to the header
  end of the turn that holds it, so it never sees an answer that follows it.
  """
  if mode not in MASK_MODES:
    raise ValueError(f"unknown mask mode {mode!r}; choose one of: {', '.join(MASK_MODES)}")
  lo = np.zeros(length, np.int32)
  hi = np.zeros(length, np.int32)
  if mode == "prefix_lm":
    # Every prompt token sees its whole prefix: [segment start, its turn's header end).
    for start, header_end in prompt_spans:
      hi[start:header_end] = header_end
  elif mode in ("mma", "mma_bidir_image"):
    header_ends = np.array([h for _, h in prompt_spans], np.int64)
    for start, end in image_spans:
      turn = np.searchsorted(header_ends, end)   # the first assistant header after the image
      if turn == len(header_ends):
        raise ValueError(f"the image at tokens [{start}, {end}) has no assistant header after it")
      header_end = header_ends[turn]
      lo[start:end] = end if mode == "mma" else start
      hi[start:end] = header_end
  return lo, hi


# ------------------------------------------------------------------------------------------ layout
class ChatLayout:
  """Lays out conversations and captions for one template, tokenizer, image size and mask mode.

  Build it once per data worker; the tokenizer's special tokens are checked here, once.
  """

  def __init__(self, template: str | ChatTemplate, tokenizer, num_image_tokens: int,
               mode: str = "mma", flavour: str = "default"):
    if mode not in MASK_MODES:
      raise ValueError(f"unknown mask mode {mode!r}; choose one of: {', '.join(MASK_MODES)}")
    if num_image_tokens < 1:
      raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    if flavour not in FLAVOURS:
      raise ValueError(f"unknown data flavour {flavour!r}; choose one of: {', '.join(FLAVOURS)}")
    self.flavour = flavour
    self.prompt_template = get_template(template)   # generation prompts
    self.template = self.prompt_template             # training examples and captions
    if flavour == "official":
      if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise ValueError("data.flavour=official needs a tokenizer with BOS and EOS tokens")
      self.template = official_aki(template, tokenizer.bos_token, tokenizer.eos_token)
    self.tokenizer = tokenizer
    self.num_image_tokens = num_image_tokens
    self.mode = mode
    self.image_token_id = _single_token_id(tokenizer, IMAGE_TOKEN, self.template)
    for token in self.template.special_tokens:
      _single_token_id(tokenizer, token, self.template)
    self._stripping_tokens = stripping_tokens(tokenizer)

  def conversation(self, conversation: Conversation, generation_prompt: bool = False) -> Example:
    """An SFT example (loss on the answers), or with `generation_prompt` the prompt to prefill:
    the conversation then ends with a user turn and the layout with its assistant header."""
    return self._assemble(*self.render(conversation, generation_prompt), self.mode)

  def render(self, conversation: Conversation, generation_prompt: bool = False):
    """The conversation's text and the character positions the layout needs: (text, each
    `<image>`, per turn (turn start, assistant header end), per answer (start, end))."""
    _check_conversation(conversation, generation_prompt)
    t = self.prompt_template if generation_prompt else self.template
    user_before, user_after = t.user.split("{content}")
    answer_before, answer_after = t.answer.split("{answer}")
    text = _TextBuilder()
    text.add(t.prefix)
    system = t.default_system if conversation.system is None else conversation.system
    if system:
      text.add(t.system.format(system=system))
    images, prompts, answers = [], [], []
    turn_start = 0
    for i, (role, content) in enumerate(conversation.turns):
      if role == "user":
        if i > 0:
          text.add(t.turn_separator)
        content_start = text.add(user_before + content + user_after) + len(user_before)
        images += [content_start + offset for offset in _find_all(content, IMAGE_TOKEN)]
        text.add(t.assistant_header)
        prompts.append((turn_start, text.length))
        text.add(t.after_header)
      else:
        answer_start = text.add(answer_before + content + answer_after)
        answers.append((answer_start, text.length))
        turn_start = text.length
    return text.value(), images, prompts, answers

  def training_examples(self, conversation: Conversation) -> list[Example]:
    """The SFT examples of a conversation: itself whole, or (official flavour) one per turn."""
    if self.flavour == "official":
      return [self.conversation(turn) for turn in single_turns(conversation)]
    return [self.conversation(conversation)]

  def caption(self, caption: str, num_images: int = 1) -> Example:
    """A pre-training example: images, then the caption and EOS; causal, loss on caption + EOS.
    (MMA here would leak later caption tokens through the images, DESIGN.md §1.)"""
    if not caption.strip():
      raise ConversationError("empty_caption", "the caption is empty")
    if IMAGE_TOKEN in caption:
      raise ConversationError("image_outside_user_turn",
                              f"the caption holds an {IMAGE_TOKEN} placeholder")
    if num_images < 1:
      raise ConversationError("image_count_mismatch",
                              f"a caption example needs >= 1 image, got {num_images}")
    t = self.template
    text = _TextBuilder()
    text.add(t.bos)
    images = [text.add(IMAGE_TOKEN) for _ in range(num_images)]
    caption_start = text.add(caption + t.eos)
    return self._assemble(text.value(), images, [], [(caption_start, text.length)], "causal")

  def _assemble(self, text: str, image_chars: list[int], prompt_chars: list[tuple[int, int]],
                answer_chars: list[tuple[int, int]], mode: str) -> Example:
    """Tokenizes `text`, maps character boundaries to tokens and expands each image token."""
    ids, to_token = self._tokenize(text)
    image_at = np.array([to_token(c, "an <image> placeholder") for c in image_chars], np.int64)
    if len(image_at) and not np.all(ids[image_at] == self.image_token_id):
      raise ConversationError("token_boundary", f"an {IMAGE_TOKEN} placeholder did not become the "
                              f"image token id {self.image_token_id}")
    if np.count_nonzero(ids == self.image_token_id) != len(image_at):
      raise ConversationError("image_outside_user_turn",
                              "the text holds image tokens that are not user-turn placeholders")

    # Expansion: old token k starts at new index new_start[k]; new_start[n] is the new length.
    n = self.num_image_tokens
    counts = np.ones(len(ids), np.int64)
    counts[image_at] = n
    new_start = np.concatenate([[0], np.cumsum(counts)])
    length = int(new_start[-1])
    tokens = np.repeat(ids, counts).astype(np.int32)

    image_spans = [(int(new_start[k]), int(new_start[k]) + n) for k in image_at]
    image_token_index = np.full(length, -1, np.int32)
    for image, (start, end) in enumerate(image_spans):
      image_token_index[start:end] = image * n + np.arange(n)

    def span(chars, what):
      return tuple(int(new_start[to_token(c, what)]) for c in chars)

    prompt_spans = [span(s, "an assistant header") for s in prompt_chars]
    in_answer = np.zeros(length, bool)
    for a, b in (span(s, "an answer") for s in answer_chars):
      in_answer[a:b] = True

    window_lo, window_hi = attention_windows(length, mode, image_spans, prompt_spans)
    targets = np.zeros(length, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(length, np.float32)
    loss_mask[:-1] = in_answer[1:]
    return Example(
        tokens=tokens,
        positions=np.arange(length, dtype=np.int32),
        segment_ids=np.ones(length, np.int32),
        window_lo=window_lo,
        window_hi=window_hi,
        targets=targets,
        loss_mask=loss_mask,
        image_token_index=image_token_index,
        image_spans=np.array(image_spans, np.int32).reshape(-1, 2),
        header_ends=np.array([h for _, h in prompt_spans], np.int32),
    )

  def _tokenize(self, text: str):
    """Token ids of `text` and a map from a character boundary to the index of the token there.

    Added tokens with `rstrip` / `lstrip` (Phi-3's role tokens swallow the newline after them)
    span whitespace beyond their own text. A boundary inside such whitespace belongs to the side
    of the token's text: after an rstrip token's text it maps past the token, before an lstrip
    token's text onto it. Any other boundary inside a token is an error."""
    encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    offsets = np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]

    def to_token(char: int, what: str) -> int:
      k = int(np.searchsorted(starts, char))       # tokens starting before `char`
      if k == 0 or ends[k - 1] <= char:
        return k
      content = self._stripping_tokens.get(int(ids[k - 1]))
      if content is not None:
        at = text.find(content, starts[k - 1], ends[k - 1])
        if at >= 0 and char >= at + len(content) and not text[char:ends[k - 1]].strip():
          return k               # in the whitespace an rstrip token swallowed
        if at >= 0 and char <= at and not text[starts[k - 1]:char].strip():
          return k - 1           # in the whitespace an lstrip token swallowed
      raise ConversationError(
          "token_boundary", f"the boundary of {what} at character {char} falls inside a token "
          f"of template {self.template.name!r} with this tokenizer: "
          f"{text[max(0, char - 20):char]!r} | {text[char:char + 20]!r}")

    return ids, to_token


_OWN_IMAGE_LINE = re.compile(f"{re.escape(IMAGE_TOKEN)}\n|\n{re.escape(IMAGE_TOKEN)}")


def single_turns(conversation: Conversation) -> list[Conversation]:
  """A conversation split as the official AKI code splits LLaVA conversations
  (llava_dataset.py load_data): one conversation per (user, assistant) pair, each with the system
  prompt and, when the conversation has its image, `<image>\n` in front of the question (the
  question's own `<image>\n` / `\n<image>` removed). The official code knows one image per
  sample; a conversation with more is refused."""
  _check_conversation(conversation, generation_prompt=False)
  if conversation.num_images > 1:
    raise ConversationError("image_count_mismatch", f"{conversation.num_images} images: the "
                            "official flavour lays out one image per sample")
  turns = list(conversation.turns)
  singles = []
  for (_, question), (_, answer) in zip(turns[::2], turns[1::2]):
    if conversation.num_images:
      question = IMAGE_TOKEN + "\n" + _OWN_IMAGE_LINE.sub("", question)
    singles.append(Conversation([("user", question), ("assistant", answer)],
                                num_images=conversation.num_images, system=conversation.system))
  return singles


def layout_conversation(conversation: Conversation, template: str | ChatTemplate, tokenizer,
                        num_image_tokens: int, mode: str = "mma",
                        generation_prompt: bool = False) -> Example:
  return ChatLayout(template, tokenizer, num_image_tokens, mode).conversation(
      conversation, generation_prompt)


def layout_caption(caption: str, template: str | ChatTemplate, tokenizer, num_image_tokens: int,
                   num_images: int = 1) -> Example:
  return ChatLayout(template, tokenizer, num_image_tokens, "causal").caption(caption, num_images)


# ----------------------------------------------------------------------------------------- helpers
class _TextBuilder:
  """Concatenates strings and tells where each one starts."""

  def __init__(self):
    self._parts: list[str] = []
    self.length = 0

  def add(self, s: str) -> int:
    start = self.length
    self._parts.append(s)
    self.length += len(s)
    return start

  def value(self) -> str:
    return "".join(self._parts)


def _find_all(text: str, sub: str) -> list[int]:
  found, i = [], text.find(sub)
  while i >= 0:
    found.append(i)
    i = text.find(sub, i + len(sub))
  return found


def stripping_tokens(tokenizer) -> dict[int, str]:
  """id -> text of the tokenizer's added tokens that swallow whitespace (rstrip or lstrip)."""
  added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
  return {int(i): t.content for i, t in added.items()
          if getattr(t, "rstrip", False) or getattr(t, "lstrip", False)}


def _single_token_id(tokenizer, token: str, template: ChatTemplate) -> int:
  ids = tokenizer(token, add_special_tokens=False)["input_ids"]
  if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
    raise ValueError(
        f"the tokenizer has no single-id token {token!r} needed by chat template "
        f"{template.name!r}; add the template's special tokens "
        f"(mma_jax.data.tokenizer.load_tokenizer adds and reports them)")
  return int(ids[0])


def _check_conversation(conversation: Conversation, generation_prompt: bool) -> None:
  """Rejects what cannot be laid out, naming the problem."""
  turns = list(conversation.turns)
  roles = [role for role, _ in turns]
  for i, role in enumerate(roles):
    if role not in ROLES:
      raise ConversationError("unknown_role",
                              f"turn {i} has role {role!r}; roles are {', '.join(ROLES)}")
  if "user" not in roles:
    raise ConversationError("no_user_turn", "the conversation has no user turn")
  if roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
    raise ConversationError("bad_turn_order", "turns must alternate user, assistant, ... starting "
                            f"with user; got {', '.join(roles)}")
  if generation_prompt and roles[-1] != "user":
    raise ConversationError("bad_turn_order", "a generation prompt must end with a user turn")
  if not generation_prompt and roles[-1] != "assistant":
    raise ConversationError("missing_answer", f"the last user turn (turn {len(roles) - 1}) has no "
                            "answer (use generation_prompt=True to lay out a prompt)")
  for i, (role, text) in enumerate(turns):
    if role == "assistant" and not text.strip():
      raise ConversationError("empty_answer", f"the answer in turn {i} is empty")
    if role == "assistant" and IMAGE_TOKEN in text:
      raise ConversationError("image_outside_user_turn",
                              f"the answer in turn {i} holds an {IMAGE_TOKEN} placeholder")
    if role == "user" and not text.strip():
      raise ConversationError("empty_user_turn", f"the user turn {i} is empty")
  if conversation.system and IMAGE_TOKEN in conversation.system:
    raise ConversationError("image_outside_user_turn",
                            f"the system prompt holds an {IMAGE_TOKEN} placeholder")
  placeholders = sum(text.count(IMAGE_TOKEN) for role, text in turns if role == "user")
  if placeholders != conversation.num_images:
    raise ConversationError("image_count_mismatch", f"{placeholders} {IMAGE_TOKEN} placeholder(s) "
                            f"but {conversation.num_images} image(s)")
