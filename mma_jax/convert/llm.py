"""HF decoder LLMs (Llama, Qwen2, Phi-3) <-> DecoderLLM: config translation, key maps and the
`hf-llm` format."""
from __future__ import annotations

import dataclasses

import numpy as np

from mma_jax.config import Config, ConfigError, LLMConfig, ModelConfig, OriginConfig, RopeConfig
from mma_jax.config import validate_llm
from mma_jax.convert.formats import Format, read_json, right_padded_batch
from mma_jax.convert.keymap import IDENTITY, LINEAR, Rule, expand, split_rows

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "phi3": "Phi3ForCausalLM"}
# Keys HF may store that carry no parameters of ours.
IGNORED = ("*rotary_emb.inv_freq",)


def _rope_from_hf(hf: dict) -> RopeConfig:
  """Reads both the transformers-5 `rope_parameters` and the legacy `rope_theta`/`rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  params = {**legacy, **params}
  kind = params.get("rope_type") or params.get("type") or "default"
  if kind == "su":  # an early name of longrope in Phi-3 configs
    kind = "longrope"
  if kind not in ("default", "linear", "llama3", "longrope"):
    raise ConfigError(f"config.json: rope type '{kind}' is not supported "
                      "(supported: default, linear, llama3, longrope)")
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
  original = params.get("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings") or 0)
  return RopeConfig(
      type=kind, theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
      factor=float(params.get("factor") or 1.0),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(original or 0),
      short_factor=[float(x) for x in params.get("short_factor") or []],
      long_factor=[float(x) for x in params.get("long_factor") or []],
      attention_factor=params.get("attention_factor"))


def _as_list(ids) -> list[int]:
  return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _sliding_window(hf: dict) -> int:
  window = hf.get("sliding_window") or 0
  if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
    window = 0
  return 0 if window >= hf.get("max_position_embeddings", 0) else int(window)


def llm_config_from_hf(hf: dict) -> LLMConfig:
  """An HF config.json (as a dict) -> LLMConfig; unsupported features fail with their key."""
  family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}.get(
      hf.get("model_type", ""))
  if family is None:
    raise ConfigError(f"config.json: model_type '{hf.get('model_type')}' is not an "
                      "LLM we convert (llama, qwen2, phi3)")
  if hf.get("mlp_bias"):
    raise ConfigError("config.json: mlp_bias=true is not supported")
  if family == "llama" and hf.get("attention_bias"):
    raise ConfigError("config.json: attention_bias=true (o_proj bias) is not supported for llama")
  heads = hf["num_attention_heads"]
  cfg = LLMConfig(
      family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or 0, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 4096), rope=_rope_from_hf(hf),
      qkv_bias=family == "qwen2", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=_sliding_window(hf), bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=_as_list(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"))
  if cfg.head_dim == cfg.hidden_size // cfg.num_heads:
    cfg.head_dim = 0
  validate_llm(cfg, prefix="config.json")
  return cfg


def llm_config_to_hf(cfg: LLMConfig) -> dict:
  rope = cfg.rope
  params: dict = {"rope_type": rope.type, "rope_theta": rope.theta}
  if rope.type in ("linear", "llama3"):
    params["factor"] = rope.factor
  if rope.type == "llama3":
    params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                  original_max_position_embeddings=rope.original_max_position_embeddings)
  if rope.type == "longrope":
    params.update(short_factor=rope.short_factor, long_factor=rope.long_factor,
                  original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.attention_factor is not None:
      params["attention_factor"] = rope.attention_factor
  hf = {
      "architectures": [HF_ARCHITECTURES[cfg.family]], "model_type": cfg.family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.dim_per_head, "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
      "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": params,
      "torch_dtype": "float32", "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
      "eos_token_id": (cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1
                       else cfg.eos_token_ids or None),
  }
  if cfg.sliding_window:
    hf["sliding_window"] = cfg.sliding_window
    hf["use_sliding_window"] = True
  if cfg.family == "phi3" and rope.type == "longrope":
    hf["original_max_position_embeddings"] = rope.original_max_position_embeddings
  return hf


def llm_rules(cfg: LLMConfig) -> list[Rule]:
  """Key map of one family, HF names on the left (without any outer prefix)."""
  layer = "model.layers.{i}."
  q, kv = cfg.num_heads * cfg.dim_per_head, cfg.num_kv_heads * cfg.dim_per_head
  rules = [
      Rule("model.embed_tokens.weight", "embed.embedding"),
      Rule(layer + "input_layernorm.weight", "layers.attn_norm.scale"),
      Rule(layer + "self_attn.o_proj.weight", "layers.attn.o.kernel", LINEAR),
      Rule(layer + "post_attention_layernorm.weight", "layers.mlp_norm.scale"),
      Rule(layer + "mlp.down_proj.weight", "layers.mlp.down.kernel", LINEAR),
      Rule("model.norm.weight", "norm.scale"),
  ]
  if cfg.family == "phi3":
    rules += [
        Rule(layer + "self_attn.qkv_proj.weight",
             ("layers.attn.q.kernel", "layers.attn.k.kernel", "layers.attn.v.kernel"),
             split_rows([q, kv, kv])),
        Rule(layer + "mlp.gate_up_proj.weight", ("layers.mlp.gate.kernel", "layers.mlp.up.kernel"),
             split_rows([cfg.intermediate_size] * 2)),
    ]
  else:
    for name in "qkv":
      rules.append(Rule(layer + f"self_attn.{name}_proj.weight", f"layers.attn.{name}.kernel",
                        LINEAR))
      if cfg.qkv_bias:
        rules.append(Rule(layer + f"self_attn.{name}_proj.bias", f"layers.attn.{name}.bias",
                          IDENTITY))
    rules += [Rule(layer + f"mlp.{name}_proj.weight", f"layers.mlp.{name}.kernel", LINEAR)
              for name in ("gate", "up")]
  if not cfg.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", "lm_head.kernel", LINEAR))
  return rules


def llm_ignored(cfg: LLMConfig) -> tuple[str, ...]:
  # Tied checkpoints sometimes store the head anyway; it is the embedding.
  return IGNORED + (("lm_head.weight",) if cfg.tie_word_embeddings else ())


# ------------------------------------------------------------------------------------ the format
def _read_config(src, **_) -> Config:
  return Config(model=ModelConfig(llm=llm_config_from_hf(read_json(src)),
                                  origin=OriginConfig(format="hf-llm")),
                attention=dataclasses.replace(Config().attention, mask="causal"))


def _compare(src, model, config: Config, seq_len: int, batch: int, seed: int):
  import torch
  import transformers

  tokens, valid = right_padded_batch(batch, seq_len, config.model.llm.vocab_size, seed)
  reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = reference(input_ids=torch.from_numpy(tokens).long(),
                    attention_mask=torch.from_numpy(valid.astype(np.int64))).logits.numpy()
  segment_ids = valid.astype(np.int32)
  zeros = np.zeros_like(segment_ids)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  ours = np.asarray(model(tokens=tokens, positions=positions, segment_ids=segment_ids,
                          window_lo=zeros, window_hi=zeros))
  return ours, ref, valid


HF_LLM = Format(
    name="hf-llm",
    read_config=_read_config,
    hf_files=lambda c: {"config.json": llm_config_to_hf(c.model.llm)},
    entries=lambda c: expand(llm_rules(c.model.llm), c.model.llm.num_layers),
    ignored=lambda c: llm_ignored(c.model.llm),
    compare=_compare,
)
