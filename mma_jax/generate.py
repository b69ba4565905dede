"""Batched generation: one jitted prefill of the prompt under the layout's mask, then jitted decode
steps over a static-shape KV cache (DESIGN.md §1, Inference: under `mma` the image rows' keys and
values are computed having seen the question; decoding is causal over the cache).

Prompts are left-padded to a bucketed length P (a multiple of `length_multiple`, so batches of
similar lengths share one compiled program): every row's last prompt token sits in slot P - 1 and
all rows write the same cache slot at each step. Padding is segment 0, so a prompt's own tokens
never see it, and the cache marks it invalid for generated tokens; positions start at 0 on each
row's first real token. A prompt therefore yields the same tokens in any batch as alone.

The decode loop is a `lax.while_loop` on the device that stops when every row has produced a stop
token id; stop strings need text, so with stop strings the loop returns every
`STRING_CHECK_EVERY` tokens for the host to look.

Under a mesh the batch is split over (data, fsdp), the parameters follow the rules table of
sharding.py, and the cache is sharded like the activations (batch; kv heads over tensor).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mma_jax.attention import target_platform
from mma_jax.data.images import preprocess
from mma_jax.data.packing import example_fields, merge_row
from mma_jax.layout import ChatLayout, Conversation, Example
from mma_jax.models.layers import unstack
from mma_jax.models.mllm import MultimodalDecoder
from mma_jax.sharding import batch_sharding, batch_shards, logical_to_spec, tree_shardings
from mma_jax.templates import ChatTemplate
from mma_jax.train.loss import answer_positions

# What the prefill reads of a laid-out prompt (the batch contract minus the training fields).
PROMPT_FIELDS = ("tokens", "positions", "segment_ids", "window_lo", "window_hi",
                 "image_token_index")
STRING_CHECK_EVERY = 16     # decode steps between host checks for stop strings


@dataclasses.dataclass
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0               # 0 = greedy
  top_k: int = 0                         # 0 = no top-k cut
  top_p: float = 1.0                     # 1 = no nucleus cut
  stop_token_ids: tuple[int, ...] = ()   # besides the template's end tokens
  stop_strings: tuple[str, ...] = ()
  seed: int = 0


@dataclasses.dataclass
class Generation:
  text: str                # decoded without the stop token, cut before the first stop string
  token_ids: list[int]     # without the stop token id (a stop string's tokens are kept)
  prompt_length: int       # prompt tokens, image tokens included
  finish_reason: str       # "stop" | "length"


# ------------------------------------------------------------------------------------- stop tokens
def template_stop_tokens(template: ChatTemplate) -> tuple[str, ...]:
  """The template's end-of-turn and end-of-sequence tokens: its special tokens that close an
  answer or a user turn, the one that ends a sequence (eos' last: the official flavour's caption
  end `<|endofchunk|><|endoftext|>` gives <|endoftext|>), and the assistant header when it is one
  special token (a model that writes it starts another answer). phi3, either flavour:
  <|assistant|>, <|end|>, <|endoftext|>, the ids Phi-3.5's generation_config.json stops on (the
  official AKI generate passes no others); vicuna_v1: </s>."""
  eos = [t for t in template.special_tokens if template.eos.endswith(t)] or [template.eos]
  tails = (template.answer.split("{answer}")[1], template.user.split("{content}")[1], eos[0])
  return tuple(t for t in template.special_tokens
               if any(t in tail for tail in tails) or t == template.assistant_header)


def default_stop_token_ids(layout: ChatLayout, eos_token_ids: Sequence[int] = ()
                           ) -> tuple[int, ...]:
  """Ids of the template's stop tokens plus the checkpoint's own eos ids (what HF stops on)."""
  ids = layout.tokenizer.convert_tokens_to_ids(list(template_stop_tokens(layout.template)))
  return tuple(dict.fromkeys([int(i) for i in ids] + [int(i) for i in eos_token_ids]))


# ---------------------------------------------------------------------------------------- sampling
def sample_tokens(logits, rng, temperature, top_k, top_p):
  """f32 logits [B, V] -> sampled token ids [B]: the logits divided by `temperature` (> 0), cut
  to the top_k best (0: no cut) and to the smallest set whose probability reaches top_p (1: no
  cut). The settings may be traced: one compiled program serves all of them (one sort of the
  vocabulary per step pays for that)."""
  logits = logits / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  vocab = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=1)                  # [B, 1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs      # mass of the better tokens; 0 for the best
  keep = (before < top_p) | (top_p >= 1.0)         # (rounding must not cut anything at 1)
  nucleus = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < jnp.maximum(kth, nucleus), -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _next_tokens(logits, rng, controls, greedy: bool):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_tokens(logits, rng, controls["temperature"], controls["top_k"], controls["top_p"])


def controls_for(s: SamplingConfig, stop_ids: Sequence[int]) -> tuple[dict, bool]:
  """(traced sampling settings and stop ids, greedy): only greedy-or-not is compiled in. The stop
  ids are padded with -1 (never a token) to a multiple of 8, so their number rarely recompiles."""
  if s.max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
  if s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1:
    raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                     f"temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}")
  stops = np.full(round_up(len(stop_ids), 8), -1, np.int32)
  stops[:len(stop_ids)] = stop_ids
  controls = {"stops": stops, "temperature": np.float32(max(s.temperature, 1e-6)),
              "top_k": np.int32(s.top_k), "top_p": np.float32(s.top_p)}
  return controls, s.temperature == 0


# ----------------------------------------------------------------------------------------- batches
def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def left_pad(fields: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """One prompt laid out alone -> a row of `length` with the prompt at the end. Padding is segment
  0 at position 0; windows shift with the prompt (as packing does), "none" (lo = hi = 0) stays."""
  n = len(fields["tokens"])
  offset = length - n
  if offset < 0:
    raise ValueError(f"a prompt of {n} tokens does not fit {length}")
  row = {name: np.zeros(length, np.int32) for name in PROMPT_FIELDS}
  row["image_token_index"][:] = -1
  at = slice(offset, length)
  for name in ("tokens", "positions", "image_token_index"):
    row[name][at] = fields[name]
  row["segment_ids"][at] = 1
  has_window = fields["window_lo"] < fields["window_hi"]
  row["window_lo"][at] = np.where(has_window, fields["window_lo"] + offset, 0)
  row["window_hi"][at] = np.where(has_window, fields["window_hi"] + offset, 0)
  return row


def stack_images(images: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-row preprocessed images [n_i, H, W, 3] -> ([B, N, H, W, 3] zero-padded, valid [B, N])."""
  n = max((len(x) for x in images), default=0)
  out = np.zeros((len(images), n, size, size, 3), np.float32)
  valid = np.zeros((len(images), n), bool)
  for b, x in enumerate(images):
    if len(x):
      out[b, :len(x)] = x
      valid[b, :len(x)] = True
  return out, valid


def _as_fields(example) -> dict[str, np.ndarray]:
  return example_fields(example) if isinstance(example, Example) else example


# ---------------------------------------------------------------------------------------- sharding
# Logical axes of the decode loop's state (sharding.py maps them to mesh axes).
_CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "length", None),
               "v": ("layers", "batch", "kv_heads", "length", None),
               "valid": ("batch", "length"), "index": ()}
_CARRY_AXES = {"tokens": ("batch", None), "done": ("batch",), "prompt_length": ("batch",),
               "step": (), "rng": (None,)}


def _shardings(tree: dict, axes: dict, mesh: Mesh) -> dict:
  sizes = dict(mesh.shape)
  return {k: NamedSharding(mesh, logical_to_spec(axes[k], v.shape, sizes)) for k, v in tree.items()}


def _constrain(tree: dict, axes: dict, mesh: Mesh | None) -> dict:
  """Pins each array to the sharding its logical axes give, so every call returns the state laid
  out the same way (and the next call does not recompile for another layout)."""
  if mesh is None:
    return tree
  return {k: jax.lax.with_sharding_constraint(v, sharding)
          for (k, v), sharding in zip(tree.items(), _shardings(tree, axes, mesh).values())}


def carry_shardings(carry: dict, mesh: Mesh) -> dict:
  """The shardings the prefill pins the decode loop's state to (carry: arrays or shapes)."""
  rest = {k: v for k, v in carry.items() if k != "cache"}
  return {**_shardings(rest, _CARRY_AXES, mesh),
          "cache": _shardings(carry["cache"], _CACHE_AXES, mesh)}


def jit_programs(graphdef, mesh: Mesh | None):
  """(prefill, decode) jitted as the Generator runs them (mma_jax.compile traces the same).
  prefill(state, batch, rng, controls, *, cache_length, max_new_tokens, greedy) -> (logits,
  carry); decode(state, carry, until, controls, *, greedy) -> carry."""
  prefill = jax.jit(functools.partial(_prefill, graphdef, mesh),
                    static_argnames=("cache_length", "max_new_tokens", "greedy"))
  # The loop state (the cache above all) is donated: one copy lives at a time. CPU cannot
  # donate and would warn on every call.
  platform = (jax.default_backend() if mesh is None else mesh.devices.flat[0].platform)
  donate = ("carry",) if platform != "cpu" else ()
  decode = jax.jit(functools.partial(_decode, graphdef, mesh), static_argnames=("greedy",),
                   donate_argnames=donate)
  return prefill, decode


# --------------------------------------------------------------------------------------- generator
class Generator:
  """Generation and option scoring for a model, a chat layout (its template, tokenizer, image
  tokens and mask mode) and the tower's image preprocessing. Compiles once per (batch size,
  bucketed prompt length, images per row, max_new_tokens, greedy or sampling); the sampling
  settings, seed and stop ids are runtime values."""

  def __init__(self, model: nnx.Module, layout: ChatLayout, tokenizer, *, image_size: int,
               image_norm: str, mesh: Mesh | None = None, length_multiple: int = 64,
               resize_first: bool = False):
    """resize_first: resize images in their own mode, then RGB (images.resizes_first decides
    it from data.flavour); applies to images given undecoded or at another size."""
    if isinstance(model, MultimodalDecoder) and model.tokens_per_image != layout.num_image_tokens:
      raise ValueError(f"the layout expands <image> to {layout.num_image_tokens} tokens but the "
                       f"model gives {model.tokens_per_image} rows per image")
    self.layout, self.tokenizer, self.mesh = layout, tokenizer, mesh
    self.image_size, self.image_norm = image_size, image_norm
    self.length_multiple, self.resize_first = length_multiple, resize_first
    self.stop_token_ids = default_stop_token_ids(layout, _decoder(model).cfg.eos_token_ids)
    self.batch_shards = batch_shards(mesh)
    # The answer template's tail (the end-of-answer token) is not part of an option's text.
    tail = layout.template.answer.split("{answer}")[1]
    self._answer_tail_tokens = len(tokenizer(tail, add_special_tokens=False)["input_ids"]
                                   ) if tail else 0
    graphdef, state = nnx.split(model)
    if mesh is not None:
      state = jax.device_put(state, tree_shardings(state, mesh))
    self._state = state
    self._prefill, self._decode = jit_programs(graphdef, mesh)
    self._score = jax.jit(functools.partial(_score, graphdef), static_argnames=("slots",))

  # ------------------------------------------------------------------------------------ public
  def generate(self, conversations: list[Conversation], images: list[list],
               sampling: SamplingConfig) -> list[Generation]:
    """Continues each conversation (ending with a user turn) after the template's generation
    prompt. images[i]: the i-th conversation's images (bytes, path or uint8 array)."""
    examples = [self.layout.conversation(c, generation_prompt=True) for c in conversations]
    return self.generate_examples(examples, self._preprocess(conversations, images), sampling)

  def generate_examples(self, examples: list, images: list[np.ndarray],
                        sampling: SamplingConfig) -> list[Generation]:
    """Like `generate` for prompts already laid out (Examples or their field dicts, one example
    each, positions from 0) with preprocessed float32 images [n_i, H, W, 3] per prompt."""
    if not examples:
      return []
    stop_ids = tuple(dict.fromkeys(self.stop_token_ids + tuple(sampling.stop_token_ids)))
    controls, greedy = controls_for(sampling, stop_ids)
    batch, count, lengths = self._prompt_batch(examples, images)
    rng = jax.random.PRNGKey(sampling.seed)
    limit = sampling.max_new_tokens
    cache_length = batch["tokens"].shape[1] + limit
    with self._mesh_context():
      _, carry = self._prefill(self._state, batch, rng, controls, cache_length=cache_length,
                               max_new_tokens=limit, greedy=greedy)
      # Rows that only pad the batch to the mesh never hold the loop up.
      finished = np.arange(carry["done"].shape[0]) >= count
      carry = _mark_done(carry, finished)
      step, chunk = 1, STRING_CHECK_EVERY if sampling.stop_strings else limit
      while step < limit and not bool(jnp.all(carry["done"])):
        carry = self._decode(self._state, carry, np.int32(min(step + chunk, limit)), controls,
                             greedy=greedy)
        step = int(carry["step"])
        if sampling.stop_strings:
          tokens = np.asarray(carry["tokens"])
          for b in np.flatnonzero(~finished):
            ids, _ = _cut_at_stop_ids(tokens[b, :step], stop_ids)
            finished[b] = _find_stop(self._decode_text(ids), sampling.stop_strings) >= 0
          carry = _mark_done(carry, finished)
    tokens, step = np.asarray(carry["tokens"]), int(carry["step"])
    return [self._finish(tokens[b, :step], lengths[b], stop_ids, sampling.stop_strings)
            for b in range(count)]

  def prefill_logits(self, conversations: list[Conversation], images: list[list]) -> np.ndarray:
    """The next-token f32 logits [B, V] after each generation prompt (the prefill's output)."""
    examples = [self.layout.conversation(c, generation_prompt=True) for c in conversations]
    batch, count, _ = self._prompt_batch(examples, self._preprocess(conversations, images))
    controls, _ = controls_for(SamplingConfig(max_new_tokens=1), ())
    with self._mesh_context():
      logits, _ = self._prefill(self._state, batch, jax.random.PRNGKey(0), controls,
                                cache_length=batch["tokens"].shape[1], max_new_tokens=1,
                                greedy=True)
    return np.asarray(logits)[:count]

  def option_logprobs(self, conversations: list[Conversation], images: list[list],
                      options: list[list[str]]) -> list[list[tuple[float, int]]]:
    """For each conversation and each of its options: (the summed log-probability of the option's
    tokens as the assistant's answer, their number), the end-of-answer token excluded,
    teacher-forced under the layout's mask (MMA: the images see the question, never the option).
    One forward per pair, batched `len(conversations)` pairs at a time."""
    pixels = self._preprocess(conversations, images)
    pairs = [(fields, pics) for fields_list, pics in
             zip(self._option_fields(conversations, options), pixels) for fields in fields_list]
    size = round_up(max(len(conversations), 1), self.batch_shards)
    scores = []
    for start in range(0, len(pairs), size):
      scores += self._score_pairs(pairs[start:start + size], size)
    counts = [int(fields["loss_mask"].sum()) for fields, _ in pairs]
    return _regroup(list(zip(scores, counts)), options)

  def _option_fields(self, conversations, options) -> list[list[dict]]:
    """Per conversation, per option: the answered conversation's fields with only the option's
    own tokens in the loss mask."""
    if len(options) != len(conversations):
      raise ValueError(f"{len(options)} option lists for {len(conversations)} conversations")
    out = []
    for conversation, opts in zip(conversations, options):
      prompt = self.layout.conversation(conversation, generation_prompt=True).length
      fields_list = []
      for option in opts:
        answered = Conversation(list(conversation.turns) + [("assistant", option)],
                                conversation.num_images, conversation.system)
        fields = example_fields(self.layout.conversation(answered))
        # Score the last answer only (earlier turns' answers are trained too), without its tail:
        # position t predicts token t + 1, the option starts at token `prompt`.
        fields["loss_mask"][:prompt - 1] = 0
        trained = np.flatnonzero(fields["loss_mask"])
        fields["loss_mask"][trained[len(trained) - self._answer_tail_tokens:]] = 0
        fields_list.append(fields)
      out.append(fields_list)
    return out

  # ----------------------------------------------------------------------------------- helpers
  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _preprocess(self, conversations, images) -> list[np.ndarray]:
    if len(images) != len(conversations):
      raise ValueError(f"{len(images)} image lists for {len(conversations)} conversations")
    out = []
    for i, (conversation, pics) in enumerate(zip(conversations, images)):
      if len(pics) != conversation.num_images:
        raise ValueError(f"conversation {i} has {conversation.num_images} <image> placeholders "
                         f"but {len(pics)} images were given")
      arrays = [preprocess(p, self.image_size, self.image_norm, name=f"conversation {i} image {k}",
                           resize_first=self.resize_first) for k, p in enumerate(pics)]
      out.append(np.stack(arrays) if arrays else
                 np.zeros((0, self.image_size, self.image_size, 3), np.float32))
    return out

  def _put(self, batch: dict[str, np.ndarray]) -> dict:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}

  def _prompt_batch(self, examples, images):
    """(device batch of left-padded prompts, real rows, prompt lengths)."""
    if len(images) != len(examples):
      raise ValueError(f"{len(images)} image arrays for {len(examples)} prompts")
    fields = [_as_fields(e) for e in examples]
    lengths = [len(f["tokens"]) for f in fields]
    length = round_up(max(lengths), self.length_multiple)
    size = round_up(len(fields), self.batch_shards)
    rows = _pad_rows([left_pad(f, length) for f in fields], size)
    batch = {k: np.stack([r[k] for r in rows]) for k in PROMPT_FIELDS}
    batch["images"], batch["image_valid"] = stack_images(
        _pad_rows(list(images), size), self.image_size)
    return self._put(batch), len(fields), lengths

  def _score_pairs(self, pairs, size: int) -> list[float]:
    length = round_up(max(len(f["tokens"]) for f, _ in pairs), self.length_multiple)
    rows = [merge_row([f], length, self.layout.num_image_tokens) for f, _ in pairs]
    rows, pics = _pad_rows(rows, size), _pad_rows([p for _, p in pairs], size)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["images"], batch["image_valid"] = stack_images(pics, self.image_size)
    slots = 1 << int(np.max(np.sum(batch["loss_mask"] > 0, axis=1))).bit_length()
    with self._mesh_context():
      sums = self._score(self._state, self._put(batch), slots=slots)
    return [float(s) for s in np.asarray(sums)[:len(pairs)]]

  def _decode_text(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _finish(self, ids: np.ndarray, prompt_length: int, stop_ids, stop_strings) -> Generation:
    ids, stopped = _cut_at_stop_ids(ids, stop_ids)
    text = self._decode_text(ids)
    at = _find_stop(text, stop_strings)
    if at >= 0:
      # Keep the tokens up to the one that completed the stop string.
      end = next(k for k in range(1, len(ids) + 1)
                 if _find_stop(self._decode_text(ids[:k]), stop_strings) >= 0)
      ids, text, stopped = ids[:end], text[:at], True
    return Generation(text=text, token_ids=[int(i) for i in ids], prompt_length=prompt_length,
                      finish_reason="stop" if stopped else "length")


def _pad_rows(rows: list, size: int) -> list:
  """A batch of `size` rows: the last row repeated (never a fully padded row)."""
  return rows + [rows[-1]] * (size - len(rows))


def _mark_done(carry: dict, rows: np.ndarray) -> dict:
  """Sets `done` on `rows` (host-side decisions: stop strings, padding rows)."""
  if not rows.any():
    return carry
  done = np.asarray(carry["done"]) | rows
  return {**carry, "done": jax.device_put(done, carry["done"].sharding)}


def _cut_at_stop_ids(ids: np.ndarray, stop_ids) -> tuple[np.ndarray, bool]:
  hits = np.flatnonzero(np.isin(ids, np.asarray(stop_ids, np.int64)))
  return (ids[:hits[0]], True) if hits.size else (ids, False)


def _find_stop(text: str, stop_strings) -> int:
  """Where the earliest stop string starts in `text`, or -1."""
  found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
  return min(found, default=-1)


# ------------------------------------------------------------------------------ jitted functions
def _decoder(model: nnx.Module) -> nnx.Module:
  """The decoder LLM of a MultimodalDecoder, or the model itself (a text-only DecoderLLM)."""
  return model.llm if isinstance(model, MultimodalDecoder) else model


def _is_stop(tokens, stops):
  return jnp.any(tokens[:, None] == stops[None, :], axis=-1)


def _prefill(graphdef, mesh, state, batch, rng, controls, *, cache_length: int,
             max_new_tokens: int, greedy: bool):
  """The prompt -> (its next-token logits [B, V], the decode loop's state with the first token
  sampled)."""
  model = nnx.merge(graphdef, state)
  hidden, cache = model.prefill(**batch, cache_length=cache_length)
  logits = model.logits(hidden[:, -1])          # left padding: every prompt ends in the last slot
  first = _next_tokens(logits, jax.random.fold_in(rng, 0), controls, greedy)
  tokens = jnp.zeros((first.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)
  carry = {"cache": cache, "tokens": tokens, "done": _is_stop(first, controls["stops"]),
           "prompt_length": batch["positions"][:, -1] + 1, "step": jnp.int32(1), "rng": rng}
  return logits, _constrain_carry(carry, mesh)


def _decode(graphdef, mesh, state, carry, until, controls, *, greedy: bool):
  """Decode steps while step < until and some row has not stopped. Step n feeds token n - 1 (at
  position prompt_length + n - 1, cache slot P + n - 1) and samples token n."""
  model = nnx.merge(graphdef, state)
  llm = _decoder(model)
  # CPU XLA would copy each layer's weight slices on every step inside the loop: slice them once
  # here. Accelerator compilers fuse the slices into the matmuls, and a hoisted copy of every
  # layer would cost the decoder's weights twice in device memory.
  layers = unstack(llm.layers, llm.cfg.num_layers) if target_platform() == "cpu" else None

  def cond(c):
    return (c["step"] < until) & ~jnp.all(c["done"])

  def body(c):
    step = c["step"]
    last = jax.lax.dynamic_slice_in_dim(c["tokens"], step - 1, 1, axis=1)
    positions = (c["prompt_length"] + step - 1)[:, None]
    hidden, cache = model.decode_step(tokens=last, positions=positions, cache=c["cache"],
                                      layers=layers)
    token = _next_tokens(model.logits(hidden[:, 0]), jax.random.fold_in(c["rng"], step),
                         controls, greedy)
    tokens = jax.lax.dynamic_update_slice(c["tokens"], token[:, None], (0, step))
    done = c["done"] | _is_stop(token, controls["stops"])
    return {**c, "cache": cache, "tokens": tokens, "done": done, "step": step + 1}

  return _constrain_carry(jax.lax.while_loop(cond, body, carry), mesh)


def _constrain_carry(carry, mesh):
  if mesh is None:
    return carry
  rest = _constrain({k: v for k, v in carry.items() if k != "cache"}, _CARRY_AXES, mesh)
  return {**rest, "cache": _constrain(carry["cache"], _CACHE_AXES, mesh)}


def _score(graphdef, state, batch, *, slots: int):
  """Per row: sum over loss_mask positions of log p(target) (logits at those positions only)."""
  model = nnx.merge(graphdef, state)
  index, valid, _ = answer_positions(batch["loss_mask"], slots)
  hidden = jnp.take_along_axis(model.hidden(**batch), index[..., None], axis=1)
  logprobs = jax.nn.log_softmax(model.logits(hidden), axis=-1)
  targets = jnp.take_along_axis(batch["targets"], index, axis=1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  weight = jnp.take_along_axis(batch["loss_mask"], index, axis=1) * valid
  return jnp.sum(picked * weight, axis=1)


def _regroup(flat: list, groups: list[list]) -> list[list]:
  """`flat` cut into consecutive pieces as long as each of `groups`."""
  out, at = [], 0
  for group in groups:
    out.append(flat[at:at + len(group)])
    at += len(group)
  return out
