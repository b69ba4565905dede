"""Typed configs: dataclasses per section, YAML files, dotted `section.key=value` overrides.

A run config is one YAML file (it may name `base:` files, merged underneath it) plus command-line
overrides. Every key is checked against the dataclass fields at load time: an unknown key, a value
of the wrong type, a value outside a fixed set of choices or an invalid combination raises
`ConfigError` with a message naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
  """A user-facing configuration problem; the message names the key."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class RopeConfig:
  """Rotary embedding frequencies. `type` follows the HF `rope_type` names."""
  type: Literal["default", "linear", "llama3", "longrope"] = "default"
  theta: float = 10000.0
  factor: float = 1.0                    # linear, llama3; longrope derives it from the lengths
  low_freq_factor: float = 1.0           # llama3
  high_freq_factor: float = 4.0          # llama3
  original_max_position_embeddings: int = 0   # llama3, longrope
  short_factor: list[float] = field(default_factory=list)   # longrope, head_dim // 2 values
  long_factor: list[float] = field(default_factory=list)    # longrope, used past the original length
  attention_factor: float | None = None  # longrope; None = sqrt(1 + ln(factor) / ln(original))


@dataclass
class LLMConfig:
  """A decoder-only LLM. Families: llama (Llama 1/2/3/3.x), qwen2, phi3 (Phi-3/3.5)."""
  family: Literal["llama", "qwen2", "phi3"] = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0                      # 0 = hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 4096
  rope: RopeConfig = field(default_factory=RopeConfig)
  qkv_bias: bool = False                 # qwen2: True
  tie_word_embeddings: bool = False
  head_bias: bool = False                # a bias on the LM head (AKI trains one; HF LLMs have none)
  sliding_window: int = 0                # 0 = none; longer sequences are refused, not windowed
  bos_token_id: int | None = None        # the special ids HF configs carry, kept for export
  eos_token_ids: list[int] = field(default_factory=list)
  pad_token_id: int | None = None

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
  """A ViT image tower. Families: siglip (no CLS, patch bias, no pre-norm) and clip (CLS token,
  pre-norm, patch conv without bias). Defaults: SigLIP so400m-patch14-384, AKI's tower.

  Which features leave the tower is config: the hidden state after `feature_layer` layers in HF's
  `hidden_states` indexing (0 = embeddings, k = after k layers, -1 = last, -2 = second to last),
  optionally through post_layernorm, optionally without the first token (CLS for clip; LLaVA's
  "default" strategy drops it). AKI: -1 with post_norm; LLaVA-1.5: -2, drop_cls, no post_norm.
  """
  family: Literal["siglip", "clip"] = "siglip"
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27
  num_heads: int = 16
  image_size: int = 384
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: Literal["gelu_pytorch_tanh", "quick_gelu", "gelu"] = "gelu_pytorch_tanh"
  feature_layer: int = -1
  post_norm: bool = True
  drop_cls: bool = False

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + (self.family == "clip")

  @property
  def layers_to_run(self) -> int:
    """How many encoder layers produce the selected features (`feature_layer` made absolute)."""
    layer = self.feature_layer
    return layer if layer >= 0 else self.num_layers + 1 + layer

  @property
  def num_features(self) -> int:
    """Feature rows per image leaving the tower."""
    return self.num_positions - self.drop_cls


@dataclass
class ConnectorConfig:
  """Vision features -> LLM embeddings. `perceiver`: AKI's resampler (num_latents rows per image,
  official sizes: depth 6, 8 heads x 64, ff_mult 4, torch LayerNorm eps 1e-5). `mlp`: LLaVA's
  linear -> act -> linear projector (one row per vision feature)."""
  type: Literal["perceiver", "mlp"] = "perceiver"
  num_latents: int = 144
  depth: int = 6
  num_heads: int = 8
  head_dim: int = 64
  ff_mult: int = 4
  layer_norm_eps: float = 1e-5
  mlp_act: Literal["gelu", "gelu_pytorch_tanh", "quick_gelu"] = "gelu"
  mlp_bias: bool = True


@dataclass
class OriginConfig:
  """What a converted model's HF format needs back on export, beyond the architecture."""
  format: str = ""                       # the format it was imported from (hf-llm, llava, aki, ...)
  image_token_id: int = -1               # the id marking image rows (LLaVA image_token_index,
                                         # AKI <image>); -1 = none
  llm_path: str = ""                     # AKI config.json: lang_model_path (a hub id)
  vision_path: str = ""                  # AKI config.json: vision_encoder_path
  base_vocab_size: int = 0               # AKI: rows of the base LLM's table (ids past the
                                         # original tokenizer are unused there)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_TRAINABLE = ("connector", "embed", "lm_head", "head_bias")


@dataclass
class LoraConfig:
  """Low-rank adapters (models/lora.py): y = x W + (alpha / rank) * dropout(x) A B on the chosen
  decoder projections (Phi-3's fused qkv/gate_up are split in our model, so any subset works),
  optionally on every connector projection; A [in, rank] starts as torch's Linear init, B [rank,
  out] at zero (PEFT's defaults), so training starts exactly at the base model. With rank > 0 the
  base weights are frozen (outside the optimizer, stored in `base_dtype`) and only the adapters
  and the modules listed in `trainable` are trained."""
  rank: int = 0                          # 0 = no LoRA
  alpha: float = 16.0                    # scale = alpha / rank (PEFT's default, not rsLoRA)
  dropout: float = 0.0                   # on the adapter input, training steps only
  targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
  connector: bool = False                # adapters on the connector's projections too
  trainable: list[str] = field(default_factory=lambda: ["connector"])   # trained in full
  # storage of the frozen base; "" = model.param_dtype
  base_dtype: Literal["", "float32", "bfloat16"] = ""

  @property
  def enabled(self) -> bool:
    return self.rank > 0


@dataclass
class ModelConfig:
  llm: LLMConfig = field(default_factory=LLMConfig)
  vision: VisionConfig | None = None    # with a connector: an MLLM; alone: a vision tower
  connector: ConnectorConfig | None = None
  freeze_vision: bool = True             # AKI and LLaVA train everything but the tower
  origin: OriginConfig = field(default_factory=OriginConfig)

  @property
  def kind(self) -> str:
    """'mllm' (vision + connector + llm), 'vision' (a tower alone) or 'llm' (text only)."""
    return "mllm" if self.connector else "vision" if self.vision else "llm"
  dtype: Literal["float32", "bfloat16"] = "float32"        # compute dtype
  param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
  scan_layers: bool = False              # lax.scan over the stacked decoder layers
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"   # per-layer rematerialisation
  init_from: str = ""                    # a converted checkpoint directory (or, for LoRA, a
                                         # training run directory: its newest checkpoint)
  lora: LoraConfig = field(default_factory=LoraConfig)


# ----------------------------------------------------------------------------------------- attention
MASK_MODES = ("causal", "mma", "mma_bidir_image", "prefix_lm")


@dataclass
class AttentionConfig:
  impl: Literal["auto", "dense", "flash", "splash"] = "auto"
  mask: Literal["causal", "mma", "mma_bidir_image", "prefix_lm"] = "mma"
  block_q: int = 128
  block_kv: int = 128


# ---------------------------------------------------------------------------------------------- mesh
@dataclass
class MeshConfig:
  """Device mesh axis sizes; -1 = all remaining devices (at most one axis)."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  # The second factor of fsdp (sharding.py): 0 = chosen for the model's weights, else a divisor.
  fsdp_transpose: int = 0


# ---------------------------------------------------------------------------------------------- data
@dataclass
class MixtureEntry:
  """One component of `data.mixture` (data/mixture.py reads it). `dataset`: a registered tfds
  builder (with `name/config` for a builder config) or `webdataset` (caption tar shards);
  `weight`: its share of the drawn examples (the weights are normalised); `name`: its label in
  the counts and metrics (default: the dataset, `/` and `:` as `_`); `split` / `eval_split`:
  default data.train_split / data.eval_split; `data_dir`: where the built tfds dataset lives
  (default data.data_dir, else the tfds default); `manual_dir`: the original files it is built
  from when not built yet; `shards`: webdataset tar files, directories, glob patterns or
  brace ranges (`shard-{000..099}.tar`). Relative paths resolve under data.root."""
  dataset: str = ""
  weight: float = 0.0
  name: str = ""
  split: str = ""
  eval_split: str = ""
  data_dir: str = ""
  manual_dir: str = ""
  shards: list[str] = field(default_factory=list)
  caption_key: str = ""                  # webdataset: the .json field of the caption ("caption")

  @property
  def component_name(self) -> str:
    return self.name or self.dataset.replace("/", "_").replace(":", "_")


@dataclass
class DataConfig:
  dataset: str = "easy_vqa"              # one dataset; with data.mixture it reads "mixture"
  # Several datasets drawn with weights (grain's mixing), packed together, counted per component.
  mixture: list[MixtureEntry] = field(default_factory=list)
  root: str = ""                         # relative data_dir (here and in entries), manual_dir,
                                         # shards resolve under it
  data_dir: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  template: Literal["phi3", "llama3", "qwen2", "vicuna_v1"] = "phi3"
  tokenizer: str = "gpt2"                # a local HF tokenizer directory, or "gpt2" (bundled BPE)
  max_length: int = 256
  packing: bool = True
  too_long: Literal["truncate", "drop"] = "truncate"
  seed: int = 0
  num_workers: int = 0                   # grain worker processes (0: reader threads only)
  read_threads: int = 8                  # reader threads per process
  images_per_row: int = 4                # image slots N of a row; examples with more are skipped
  image_size: int = 0                    # 0 = model.vision.image_size
  image_norm: Literal["auto", "siglip", "clip"] = "auto"   # auto = model.vision.family
  pack_window: int = 128                 # examples first-fit packed together
  system_prompt: str | None = None       # None: the template's default; "": no system block
  # "official": the aki (phi3) template exactly as the official AKI code lays it out (BOS/EOS from
  # the tokenizer, `<image>{caption}<|endofchunk|>` captions, labels = all after the first
  # assistant token, multi-turn conversations split into single turns, prompt images for
  # generation/eval resized in their own mode before RGB as official inference does; training
  # images are converted to RGB first, as the official loaders do: images.resizes_first);
  # "default": whole multi-turn conversations, answers-only loss.
  flavour: Literal["default", "official"] = "default"
  # The official SFT image augmentation, on training data only (never eval), with any flavour:
  # RandomResizedCrop(image size, scale 0.5-1, ratio 3/4-4/3, bicubic) of the resized image +
  # horizontal flip (p 0.5), drawn from (data.seed, record index, epoch): resumes see the same.
  augment: bool = False


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8                    # global, in rows
  grad_accum: int = 1
  learning_rate: float = 1e-4
  min_learning_rate: float = 1e-5
  warmup_steps: int = 100
  weight_decay: float = 0.01            # on Linear kernels; never norms, biases, latents
  decay_embeddings: bool = False         # AKI: no decay on the input embeddings
  connector_lr_scale: float = 1.0        # connector learning rate = this x learning_rate
  vision_lr_scale: float = 1.0           # vision tower learning rate = this x learning_rate
  clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  loss_positions: int = 0                # >0: logits only at this many answer tokens per row
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0                    # held-out loss every N steps; 0 = only at the end
  eval_batches: int = 8                  # batches of the held-out loss
  # [a, b]: a jax.profiler trace of steps a..b in <run dir>/profile (TensorBoard/XProf); [] = off
  profile_steps: list[int] = field(default_factory=list)


@dataclass
class CheckpointConfig:
  dir: str = ""                          # the run directory; "" = runs/<config file name>
  every: int = 500
  keep: int = 3
  async_save: bool = True


@dataclass
class EvalConfig:
  batch_size: int = 8
  max_new_tokens: int = 32
  limit: int = 0                         # 0 = the whole split
  # Benchmark prompts (evaluate/prompts.py): as VLMEvalKit builds them, as the official AKI eval
  # asks (CV-Bench), or in the words of our SFT tasks.
  prompts: Literal["vlmevalkit", "official", "training"] = "vlmevalkit"


@dataclass
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  attention: AttentionConfig = field(default_factory=AttentionConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------- construction
def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp` (int -> float is the only widening)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if dataclasses.is_dataclass(tp):
    return _build(tp, value, key)
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"config key '{key}' = {value!r} is not allowed; "
                        f"choose one of: {', '.join(map(str, args))}")
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    (inner,) = [a for a in args if a is not type(None)]
    return _coerce(value, inner, key)
  if origin is list:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
    return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:  # YAML 1.1 reads "3e-4" (no dot) as a string
      return float(value)
    except ValueError:
      pass
  if tp in (int, float, str, bool) and type(value) is tp:
    return value
  raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, "
                    f"got {value!r} ({type(value).__name__})")


def _build(cls: type, values: Any, prefix: str) -> Any:
  if not isinstance(values, dict):
    raise ConfigError(f"config key '{prefix}' must be a mapping of "
                      f"{', '.join(f.name for f in dataclasses.fields(cls))}; got {values!r}")
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else name
    if name not in names:
      raise ConfigError(f"config key '{key}' is unknown; allowed keys"
                        f"{f' in {prefix!r}' if prefix else ''}: {', '.join(names)}")
    kwargs[name] = _coerce(value, hints[name], key)
  return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
  out = dict(base)
  for k, v in top.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _read_yaml(path: pathlib.Path) -> dict:
  """Reads a YAML file and, recursively, the `base:` file it names (relative to it) or a list of
  them, merged in order (a model preset, then a mesh preset), the file's own keys on top."""
  if not path.is_file():
    raise ConfigError(f"config file '{path}' does not exist")
  try:
    raw = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"config file '{path}' must hold a mapping at top level")
  bases = raw.pop("base", None) or []
  bases = [bases] if isinstance(bases, str) else bases
  if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
    raise ConfigError(f"config file '{path}': 'base' must be a file name or a list of file names, "
                      f"got {bases!r}")
  merged: dict = {}
  for base in bases:
    merged = _merge(merged, _read_yaml(path.parent / base))
  return _merge(merged, raw)


def _apply_override(tree: dict, override: str) -> None:
  if "=" not in override:
    raise ConfigError(f"override '{override}' must look like section.key=value")
  key, text = override.split("=", 1)
  try:
    value = yaml.safe_load(text) if text else ""
  except yaml.YAMLError:
    value = text
  *parents, leaf = key.strip().split(".")
  node = tree
  for p in parents:
    node = node.setdefault(p, {})
    if not isinstance(node, dict):
      raise ConfigError(f"override '{override}': '{p}' is not a section")
  node[leaf] = value


def from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
  tree = _merge({}, values)
  for o in overrides:
    _apply_override(tree, o)
  config = _build(Config, tree, "")
  validate(config)
  return config


def load_config(path: str | pathlib.Path, overrides: typing.Sequence[str] = ()) -> Config:
  """Loads configs/X.yaml (with its `base:` chain) and applies `a.b=c` overrides."""
  return from_dict(_read_yaml(pathlib.Path(path)), overrides)


def to_dict(config: Any) -> dict:
  return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
  return yaml.safe_dump(to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------------------- validation
def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config key '{key}': {message}")


def validate_llm(llm: LLMConfig, prefix: str = "model.llm") -> None:
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "max_position_embeddings"):
    _check(getattr(llm, name) > 0, f"{prefix}.{name}", "must be positive")
  _check(llm.num_heads % llm.num_kv_heads == 0, f"{prefix}.num_kv_heads",
         f"{llm.num_kv_heads} must divide num_heads={llm.num_heads}")
  _check(llm.head_dim > 0 or llm.hidden_size % llm.num_heads == 0, f"{prefix}.head_dim",
         f"is 0, so hidden_size={llm.hidden_size} must divide by num_heads={llm.num_heads}")
  _check(llm.dim_per_head % 2 == 0, f"{prefix}.head_dim", "rotary embeddings need an even head dim")
  rope, r = llm.rope, f"{prefix}.rope"
  if rope.type in ("llama3", "longrope"):
    _check(rope.original_max_position_embeddings > 0, f"{r}.original_max_position_embeddings",
           f"must be positive for rope.type={rope.type}")
  if rope.type == "longrope":
    half = llm.dim_per_head // 2
    for name in ("short_factor", "long_factor"):
      _check(len(getattr(rope, name)) == half, f"{r}.{name}",
             f"needs head_dim/2 = {half} values for rope.type=longrope, "
             f"got {len(getattr(rope, name))}")


def validate_vision(vision: VisionConfig, prefix: str = "model.vision") -> None:
  for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
               "patch_size", "num_channels"):
    _check(getattr(vision, name) > 0, f"{prefix}.{name}", "must be positive")
  _check(vision.hidden_size % vision.num_heads == 0, f"{prefix}.num_heads",
         f"{vision.num_heads} must divide hidden_size={vision.hidden_size}")
  # No divisibility check: like HF's stride-patch conv, a remainder is cropped (so400m: 384 / 14).
  _check(vision.patch_size <= vision.image_size, f"{prefix}.patch_size",
         f"{vision.patch_size} exceeds image_size={vision.image_size}")
  n = vision.num_layers
  _check(-n - 1 <= vision.feature_layer <= n, f"{prefix}.feature_layer",
         f"{vision.feature_layer} must lie in [{-n - 1}, {n}] for num_layers={n}")


def validate_connector(connector: ConnectorConfig, prefix: str = "model.connector") -> None:
  names = (("num_latents", "depth", "num_heads", "head_dim", "ff_mult")
           if connector.type == "perceiver" else ())
  for name in names:
    _check(getattr(connector, name) > 0, f"{prefix}.{name}", "must be positive")
  _check(connector.layer_norm_eps > 0, f"{prefix}.layer_norm_eps", "must be positive")


def validate_lora(m: ModelConfig, prefix: str = "model.lora") -> None:
  lora = m.lora
  _check(lora.rank >= 0, f"{prefix}.rank", f"{lora.rank} must be >= 0 (0 = no LoRA)")
  if not lora.enabled:
    return
  _check(lora.alpha > 0, f"{prefix}.alpha", f"{lora.alpha} must be positive")
  _check(0.0 <= lora.dropout < 1.0, f"{prefix}.dropout", f"{lora.dropout} must lie in [0, 1)")
  for key, values, allowed in (("targets", lora.targets, LORA_TARGETS),
                               ("trainable", lora.trainable, LORA_TRAINABLE)):
    for v in values:
      _check(v in allowed, f"{prefix}.{key}", f"{v!r} is not one of: {', '.join(allowed)}")
    _check(len(set(values)) == len(values), f"{prefix}.{key}", f"{values} repeats a name")
  _check(bool(lora.targets) or lora.connector, f"{prefix}.targets",
         "is empty and model.lora.connector is false: no adapter would be trained")
  _check(m.connector is not None or not lora.connector, f"{prefix}.connector",
         "is true but the model has no connector")
  _check(not (lora.connector and "connector" in lora.trainable), f"{prefix}.trainable",
         "lists 'connector', which model.lora.connector=true puts under adapters: choose one")
  _check(m.llm.head_bias or "head_bias" not in lora.trainable, f"{prefix}.trainable",
         "lists 'head_bias' but model.llm.head_bias is false")
  _check(not m.llm.tie_word_embeddings or "lm_head" not in lora.trainable, f"{prefix}.trainable",
         "lists 'lm_head' but the head is tied to the embedding (train 'embed')")


def validate_mixture(data: DataConfig) -> None:
  """Each data.mixture entry whole and its names unique; with a mixture, data.dataset reads
  "mixture" (it may be left at its default; another dataset there is a contradiction)."""
  if not data.mixture:
    return
  _check(data.dataset in ("easy_vqa", "", "mixture"), "data.dataset",
         f"{data.dataset!r} and data.mixture are alternatives: remove one of them")
  data.dataset = "mixture"
  names = {}
  for i, entry in enumerate(data.mixture):
    key = f"data.mixture[{i}]" + (f" ({entry.dataset})" if entry.dataset else "")
    _check(bool(entry.dataset), key, "needs a dataset")
    _check(math.isfinite(entry.weight) and entry.weight > 0, f"{key}.weight",
           f"needs a positive weight (its share of the draws), got {entry.weight}")
    name = entry.component_name
    _check("/" not in name, f"{key}.name", f"{name!r} must not hold '/' (it names metrics)")
    _check(name not in names, f"{key}.name", f"{name!r} is also the name of data.mixture"
           f"[{names.get(name)}]: give one of them its own name")
    names[name] = i
    if entry.dataset == "webdataset":
      _check(bool(entry.shards), f"{key}.shards", "a webdataset entry needs its tar shards "
             "(files or glob patterns)")
      _check(not (entry.data_dir or entry.manual_dir), key, "a webdataset entry reads its "
             "shards only: no data_dir or manual_dir")
    else:
      _check(not (entry.shards or entry.caption_key), f"{key}.shards",
             "only webdataset entries read shards (and their caption_key)")


def validate(config: Config) -> None:
  validate_llm(config.model.llm)
  m = config.model
  validate_lora(m)
  if m.vision is not None:
    validate_vision(m.vision)
  if m.connector is not None:
    validate_connector(m.connector)
  _check(m.connector is None or m.vision is not None, "model.vision",
         "model.connector needs a vision tower: add a model.vision section")
  a = config.attention
  for name in ("block_q", "block_kv"):
    size = getattr(a, name)
    _check(size > 0 and size % 8 == 0, f"attention.{name}", f"{size} must be a positive multiple of 8")
  sizes = {n: getattr(config.mesh, n) for n in ("data", "fsdp", "tensor")}
  for n, s in sizes.items():
    _check(s == -1 or s >= 1, f"mesh.{n}", f"{s} must be >= 1 or -1 (the remaining devices)")
  _check(list(sizes.values()).count(-1) <= 1, "mesh",
         "at most one of data, fsdp, tensor may be -1")
  _check(config.mesh.fsdp_transpose >= 0, "mesh.fsdp_transpose",
         f"{config.mesh.fsdp_transpose} must be 0 (chosen for the model) or a divisor of mesh.fsdp")
  _check(config.data.max_length > 0, "data.max_length", "must be positive")
  validate_mixture(config.data)
  _check(config.data.flavour != "official" or config.data.template == "phi3", "data.flavour",
         f"official reproduces the official AKI code, whose template is phi3 (data.template is "
         f"{config.data.template!r})")
  t = config.train
  _check(t.batch_size > 0 and t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
         "train.grad_accum", f"{t.grad_accum} must divide train.batch_size={t.batch_size}")
  _check(t.min_learning_rate <= t.learning_rate, "train.min_learning_rate",
         f"{t.min_learning_rate} exceeds train.learning_rate={t.learning_rate}")
  p = t.profile_steps
  _check(not p or (len(p) == 2 and 1 <= p[0] <= p[1]), "train.profile_steps",
         f"{p} must be [first, last] steps with 1 <= first <= last, or [] (no trace)")


def main(argv: typing.Sequence[str] | None = None) -> int:
  """python -m mma_jax.config CONFIG.yaml [a.b=c ...]: prints the resolved, validated config."""
  import sys

  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help"):
    print(main.__doc__)
    return 0 if args else 2
  try:
    print(to_yaml(load_config(args[0], args[1:])), end="")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
