"""AKI checkpoints (Sony/AKI-4B-phi-3.5-mini, saved by PyTorchModelHubMixin) <-> MultimodalDecoder:
the `aki` format (DESIGN.md §4).

On disk: one model.safetensors with `vision_encoder.*` (a SigLIP vision transformer, no
`vision_model.` level; its pooling `head.*` is unused), `vision_tokenizer.*` (the Perceiver) and
`lang_model.*` (the base causal LM whose embedding and head are decoupled: base tensors plus
`additional_embedding` / `additional_fc` rows for the added tokens `<image>`, `<|endofchunk|>`;
the head has biases, `lm_head.bias` and `lm_head.additional_fc.bias`), and a config.json holding
the constructor arguments. The base models' configs are not in the checkpoint: they come by path
(--llm-config / --vision-config) or from a local HF cache.

Our model has one table and one head (kernel and bias) of `initial_tokenizer_len + added` rows:
the base rows past the original tokenizer are never read by AKI (dead), so import drops them and
export writes zeros there (the official loader builds the base LLM with all its rows, so they must
exist). Export writes every key the official class has, strictly loadable: SigLIP's pooling head,
which we do not keep, as zeros (its output is never read), and a head bias of zeros for a model
without one (model.llm.head_bias=false).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np

from mma_jax.config import (Config, ConfigError, LLMConfig, ModelConfig, OriginConfig,
                            VisionConfig, validate)
from mma_jax.convert.formats import Format, read_json
from mma_jax.convert.keymap import IDENTITY, LINEAR, Hook, Rule, expand, prefixed, unkept
from mma_jax.convert.llm import llm_config_from_hf, llm_config_to_hf, llm_ignored, llm_rules
from mma_jax.convert.safetensors_io import CheckpointError, HFCheckpoint
from mma_jax.convert.vision import (connector_entries, perceiver_config_from_shapes,
                                    siglip_head_shapes, vision_config_from_hf,
                                    vision_config_to_hf, vision_rules)
from mma_jax.layout import attention_windows

log = logging.getLogger(__name__)

# The constructor arguments config.json must hold (and export writes back).
CONSTRUCTOR_ARGS = ("vision_encoder_path", "lang_model_path", "pad_token_id",
                    "initial_tokenizer_len", "num_vision_tokens")
# Its other arguments, which PyTorchModelHubMixin saves too, with the values export writes: the
# official constructor fails without decoder_layers_attr_name; base_img_size (null: the tower's
# size) is stored but never read; gradient_checkpointing is for training; tokenizer is not JSON.
OTHER_ARGS = {"decoder_layers_attr_name": "model.layers", "gradient_checkpointing": False,
              "base_img_size": None, "tokenizer": None}
EMBED, ADDED_EMBED = "model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"
HEAD, ADDED_HEAD = "lm_head.weight", "lm_head.additional_fc.weight"
HEAD_BIAS, ADDED_HEAD_BIAS = "lm_head.bias", "lm_head.additional_fc.bias"
LLM, VISION, PERCEIVER = "lang_model.", "vision_encoder.", "vision_tokenizer."


# ------------------------------------------------------------------------------ base model configs
def hub_cache() -> pathlib.Path:
  """The local HF hub cache, as huggingface_hub finds it."""
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return pathlib.Path(os.environ["HF_HOME"]) / "hub"
  return pathlib.Path.home() / ".cache" / "huggingface" / "hub"


def find_base_config(model_path: str, flag: str, what: str) -> pathlib.Path:
  """config.json of a base model named in AKI's config.json: a local directory (the official
  constructor accepts one) or a hub id found in the local HF cache. Nothing is downloaded."""
  local = pathlib.Path(model_path) / "config.json"
  if local.is_file():
    return local
  repo = hub_cache() / ("models--" + model_path.replace("/", "--"))
  candidates = []
  main_ref = repo / "refs" / "main"
  if main_ref.is_file():
    candidates.append(repo / "snapshots" / main_ref.read_text().strip() / "config.json")
  candidates += sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime,
                       reverse=True)
  for path in candidates:
    if path.is_file():
      return path
  raise CheckpointError(f"AKI needs the config.json of its {what} '{model_path}', which is not in "
                        f"the local HF cache ({hub_cache()}); pass {flag} PATH (that model's "
                        "config.json or its directory)")


# ------------------------------------------------------------------------------------------ config
def _read_config(src, *, llm_config=None, vision_config=None, **_) -> Config:
  src = pathlib.Path(src)
  aki = read_json(src)
  _check_constructor_args(aki, src / "config.json")
  llm, vision = _base_models(aki, llm_config, vision_config)
  shapes = _tensor_shapes(src)
  if any(k.startswith(VISION + "head.") for k in shapes):
    log.info("aki: %shead.* (SigLIP's pooling head) is never read by AKI: not kept; export "
             "writes zeros there", VISION)
  initial = int(aki["initial_tokenizer_len"])
  base_vocab, added = _shape(shapes, LLM + EMBED)[0], _shape(shapes, LLM + ADDED_EMBED)[0]
  if base_vocab != llm.vocab_size:
    raise CheckpointError(f"'{src}': {LLM + EMBED} has {base_vocab} rows but the base LLM config "
                          f"says vocab_size={llm.vocab_size}; is it the right model?")
  if not 0 < initial <= base_vocab:
    raise ConfigError(f"'{src / 'config.json'}': initial_tokenizer_len={initial} must lie in "
                      f"[1, {base_vocab}] (the base vocabulary)")
  connector = perceiver_config_from_shapes(shapes, PERCEIVER)
  if connector.num_latents != aki["num_vision_tokens"]:
    raise CheckpointError(f"'{src}': the Perceiver has {connector.num_latents} latents but "
                          f"config.json says num_vision_tokens={aki['num_vision_tokens']}")
  # The official head is a DecoupledLinear with its default bias=True, trained with the rest:
  # an AKI file always holds the head biases (a file without them stops as a missing key).
  llm = dataclasses.replace(llm, vocab_size=initial + added, pad_token_id=aki["pad_token_id"],
                            head_bias=True)
  origin = OriginConfig(format="aki", image_token_id=initial, llm_path=aki["lang_model_path"],
                        vision_path=aki["vision_encoder_path"], base_vocab_size=base_vocab)
  config = Config(model=ModelConfig(llm=llm, vision=vision, connector=connector, origin=origin))
  config.attention.mask = "mma"   # AKI's SFT attention (DESIGN.md §1)
  validate(config)
  return config


def _check_constructor_args(aki: dict, path: pathlib.Path) -> None:
  missing = [k for k in CONSTRUCTOR_ARGS if aki.get(k) is None]
  if missing:
    raise ConfigError(f"'{path}' lacks '{missing[0]}': not an AKI checkpoint "
                      f"(expected the constructor arguments {', '.join(CONSTRUCTOR_ARGS)})")
  # torch_dtype: what our export wrote before it wrote the constructor's arguments only.
  unknown = sorted(set(aki) - set(CONSTRUCTOR_ARGS) - set(OTHER_ARGS) - {"torch_dtype"})
  if unknown:
    raise ConfigError(f"'{path}' has '{unknown[0]}', which is not an argument of the official "
                      f"AKI constructor: is it an AKI checkpoint?")
  layers = aki.get("decoder_layers_attr_name")
  if layers not in (None, OTHER_ARGS["decoder_layers_attr_name"]):
    raise ConfigError(f"'{path}': decoder_layers_attr_name={layers!r}, but the LLMs we convert "
                      f"keep their decoder layers in {OTHER_ARGS['decoder_layers_attr_name']!r}")


def _base_models(aki: dict, llm_config, vision_config) -> tuple[LLMConfig, VisionConfig]:
  """The base LLM's and vision encoder's configs, from the given paths or the HF cache."""
  llm_path = llm_config or find_base_config(aki["lang_model_path"], "--llm-config", "base LLM")
  vision_path = vision_config or find_base_config(aki["vision_encoder_path"], "--vision-config",
                                                  "vision encoder")
  log.info("aki: base LLM config %s, vision config %s", llm_path, vision_path)
  llm = llm_config_from_hf(read_json(llm_path))
  vision = vision_config_from_hf(read_json(vision_path))   # SigLIP: last_hidden_state
  if vision.family != "siglip":
    raise ConfigError(f"'{vision_path}': AKI's vision encoder is SigLIP, got {vision.family}")
  if llm.tie_word_embeddings:
    raise ConfigError(f"'{llm_path}': an AKI LLM with tied embeddings is not supported")
  return llm, vision


def _tensor_shapes(src: pathlib.Path) -> dict[str, tuple[int, ...]]:
  ckpt = HFCheckpoint(src)
  try:
    return {k: ckpt.shape(k) for k in ckpt.keys()}
  finally:
    ckpt.close()


def _shape(shapes: dict, key: str) -> tuple[int, ...]:
  if key not in shapes:
    raise CheckpointError(f"AKI checkpoint has no '{key}'")
  return shapes[key]


def _hf_files(config: Config) -> dict[str, dict]:
  m = config.model
  return {"config.json": {
      "vision_encoder_path": m.origin.vision_path, "lang_model_path": m.origin.llm_path,
      "pad_token_id": m.llm.pad_token_id, "initial_tokenizer_len": m.origin.image_token_id,
      "num_vision_tokens": m.connector.num_latents, **OTHER_ARGS}}


# ---------------------------------------------------------------------------------------- key map
def live_rows(num_live: int, num_rows: int, transpose: bool) -> Hook:
  """A base tensor [num_rows, E] of which only the first num_live rows are read: kept on import
  (transposed for a head kernel), padded back with zero rows on export."""
  def to_ours(a):
    live = a[:num_live]
    return (live.T if transpose else live,)

  def to_hf(xs):
    live = xs[0].T if transpose else xs[0]
    dead = np.zeros((num_rows - num_live, *live.shape[1:]), live.dtype)
    return np.concatenate([live, dead])

  return Hook(f"live_rows({num_live}/{num_rows})", to_ours, to_hf)


def decoupled_rules(num_original: int, base_vocab: int, num_added: int,
                    head_bias: bool) -> list[Rule]:
  """Our table rows / head columns and bias entries [0, num_original) come from the base tensors,
  the rest from the additional ones. Without a head bias of ours, export writes zeros."""
  original, added = slice(0, num_original), slice(num_original, None)
  rules = [
      Rule(EMBED, "embed.embedding", live_rows(num_original, base_vocab, False), (original,)),
      Rule(ADDED_EMBED, "embed.embedding", IDENTITY, (added,)),
      Rule(HEAD, "lm_head.kernel", live_rows(num_original, base_vocab, True),
           (slice(None), original)),
      Rule(ADDED_HEAD, "lm_head.kernel", LINEAR, (slice(None), added)),
  ]
  if head_bias:
    return rules + [
        Rule(HEAD_BIAS, "head_bias", live_rows(num_original, base_vocab, False), (original,)),
        Rule(ADDED_HEAD_BIAS, "head_bias", IDENTITY, (added,))]
  return rules + [Rule(HEAD_BIAS, (), unkept((base_vocab,))),
                  Rule(ADDED_HEAD_BIAS, (), unkept((num_added,)))]


def _entries(config: Config):
  m = config.model
  initial = m.origin.image_token_id
  llm = [r for r in llm_rules(m.llm) if r.hf not in (EMBED, HEAD)]
  llm += decoupled_rules(initial, m.origin.base_vocab_size, m.llm.vocab_size - initial,
                         m.llm.head_bias)
  pooling_head = [Rule(key, (), unkept(shape))
                  for key, shape in siglip_head_shapes(m.vision).items()]
  return (prefixed(expand(llm, m.llm.num_layers), LLM, "llm.")
          + prefixed(expand(vision_rules(m.vision) + pooling_head, m.vision.num_layers), VISION,
                     "vision.")
          + connector_entries(m.connector, PERCEIVER, "connector."))


def _ignored(config: Config) -> tuple[str, ...]:
  m = config.model
  return (tuple(LLM + p for p in llm_ignored(m.llm))
          + (VISION + "embeddings.position_ids",))   # a buffer older transformers saved


# ---------------------------------------------------------------------------------------- verify
@dataclasses.dataclass
class PromptBatch:
  """Right-padded rows [text][image: T tokens][question][assistant][answer ... <|endofchunk|>]."""
  tokens: np.ndarray             # [B, L] int32, image tokens hold the <image> id
  valid: np.ndarray              # [B, L] bool
  image_token_index: np.ndarray  # [B, L] int32
  image_spans: list              # per row (start, end)
  header_ends: list              # per row, one past the assistant token
  images: np.ndarray             # [B, 1, H, W, C] float32
  assistant_id: int


def prompt_batch(config: Config, seq_len: int, batch: int, seed: int) -> PromptBatch:
  m = config.model
  rows, image_id = m.connector.num_latents, m.origin.image_token_id
  # Any id serves as the assistant header in a random model, as long as both sides agree; text
  # ids stay below it so that its first occurrence is the header.
  assistant_id = image_id - 1
  if seq_len < rows + 4:
    raise ConfigError(f"--seq-len {seq_len} cannot hold an image of {rows} tokens plus a prompt "
                      f"and an answer; use at least {rows + 4}")
  rng = np.random.default_rng(seed)
  lengths = rng.integers(rows + 4, seq_len + 1, size=batch)
  lengths[0] = seq_len
  tokens = rng.integers(0, assistant_id, size=(batch, seq_len)).astype(np.int32)
  valid = np.arange(seq_len)[None, :] < lengths[:, None]
  index = np.full((batch, seq_len), -1, np.int32)
  spans, header_ends = [], []
  for b, n in enumerate(lengths):
    prefix, question, _ = 1 + rng.multinomial(n - rows - 4, [1 / 3] * 3)
    start, end = prefix, prefix + rows
    assistant = end + question
    tokens[b, start:end], index[b, start:end] = image_id, np.arange(rows)
    tokens[b, assistant] = assistant_id
    if m.llm.vocab_size > image_id + 1:
      tokens[b, n - 1] = image_id + 1   # <|endofchunk|>: reads the second added row
    spans.append((start, end))
    header_ends.append(assistant + 1)
  tokens = np.where(valid, tokens, 0).astype(np.int32)
  size = m.vision.image_size
  images = np.random.default_rng(seed + 1).standard_normal(
      (batch, 1, size, size, m.vision.num_channels)).astype(np.float32)
  return PromptBatch(tokens, valid, index, spans, header_ends, images, assistant_id)


def our_logits(model, config: Config, p: PromptBatch) -> np.ndarray:
  """Our logits with windows from layout.attention_windows in config.attention.mask mode."""
  batch, length = p.tokens.shape
  windows = [attention_windows(length, config.attention.mask, [span], [(0, header_end)])
             for span, header_end in zip(p.image_spans, p.header_ends)]
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  return np.asarray(model(
      tokens=p.tokens, positions=positions, segment_ids=p.valid.astype(np.int32),
      window_lo=np.stack([lo for lo, _ in windows]), window_hi=np.stack([hi for _, hi in windows]),
      image_token_index=p.image_token_index, images=p.images))


def load_reference(src, config: Config):
  """The PyTorch AKI reference with the checkpoint's tensors (strictly: every key must fit).
  Its base configs are ours translated back to HF (those translations have their own parity
  tests), with the base LLM's full vocabulary."""
  import torch
  import transformers

  from mma_jax.convert import torch_reference

  m = config.model
  ckpt = HFCheckpoint(src)
  try:
    state = {k: torch.from_numpy(np.asarray(ckpt.read(k), np.float32)) for k in ckpt.keys()}
  finally:
    ckpt.close()
  state.pop(VISION + "embeddings.position_ids", None)
  llm_hf = llm_config_to_hf(dataclasses.replace(m.llm, vocab_size=m.origin.base_vocab_size))
  vision_hf = vision_config_to_hf(m.vision)
  vision_hf["vision_use_head"] = any(k.startswith(VISION + "head.") for k in state)
  c = m.connector
  reference = torch_reference.AKIReference(
      transformers.SiglipVisionConfig(**vision_hf),
      transformers.CONFIG_MAPPING[llm_hf["model_type"]](**llm_hf),
      perceiver=dict(depth=c.depth, dim_head=c.head_dim, heads=c.num_heads,
                     num_latents=c.num_latents, ff_mult=c.ff_mult),
      initial_tokenizer_len=m.origin.image_token_id,
      num_additional=m.llm.vocab_size - m.origin.image_token_id)
  reference.load_state_dict(state, strict=True)
  return reference.eval()


def reference_logits(reference, p: PromptBatch) -> np.ndarray:
  """The reference's logits for the same rows: each image span collapsed back to one <image>
  token, which the reference expands again itself."""
  import torch

  ids, masks = [], []
  for b, (start, end) in enumerate(p.image_spans):
    keep = np.r_[np.arange(start + 1), np.arange(end, p.tokens.shape[1])]
    ids.append(p.tokens[b, keep])
    masks.append(p.valid[b, keep])
  with torch.no_grad():
    logits = reference(torch.from_numpy(np.stack(ids)).long(),
                       torch.from_numpy(p.images[:, 0]).permute(0, 3, 1, 2),
                       torch.from_numpy(np.stack(masks).astype(np.int64)), p.assistant_id)
  return logits.numpy()


def _compare(src, model, config: Config, seq_len: int, batch: int, seed: int):
  p = prompt_batch(config, seq_len, batch, seed)
  ref = reference_logits(load_reference(src, config), p)
  return our_logits(model, config, p), ref, p.valid


AKI = Format(name="aki", read_config=_read_config, hf_files=_hf_files, entries=_entries,
             ignored=_ignored, compare=_compare, config_dtype=False)
