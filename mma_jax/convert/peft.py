"""A LoRA run as a PEFT adapter directory (`adapter_model.safetensors` + `adapter_config.json`),
loadable with `peft.PeftModel.from_pretrained` onto the HF model class of the export format.

Keys are what peft's get_peft_model_state_dict writes for that class: `base_model.model.` + the
module's name in the loaded model (transformers 5 names, e.g. LLaVA's
`model.language_model.layers.N.self_attn.q_proj`) + `.lora_A.weight` [r, in] / `.lora_B.weight`
[out, r]. The module names come from the format's own key map (the export entries), so every
format that exports merged weights exports adapters too:
- a module the key map fills from several of our kernels (Phi-3's qkv_proj and gate_up_proj, the
  Perceiver's to_kv) gets one adapter of rank k*r for its k adapted parts: lora_A stacks their A's,
  lora_B is block-diagonal in their B's (zero blocks for parts without an adapter), and its
  alpha is k*alpha (adapter_config's rank_pattern / alpha_pattern), so alpha/r -- and the output --
  are exactly ours;
- modules trained in full (model.lora.trainable: the connector, ...) go into `modules_to_save`,
  their weights under the same prefix, as peft saves them.
target_modules is a regex over full module names, so a tower's own q_proj is never adapted.
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from safetensors.numpy import save_file

from mma_jax.config import Config
from mma_jax.convert.formats import Format
from mma_jax.convert.safetensors_io import CheckpointError
from mma_jax.models.lora import ADAPTER_NAMES, trainable_prefix

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
# export key prefix -> the module name prefix in the loaded transformers model, per format
MODULE_NAMES = {
    "llava": (("language_model.model.", "model.language_model."),
              ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector.")),
}
# The HF classes whose module tree the adapter addresses (AKI: the official model, whose module
# names are its checkpoint keys; convert/torch_reference.AKIReference reproduces it).
BASE_CLASSES = {"llava": "LlavaForConditionalGeneration", "hf-llm": None, "aki": None}


def module_name(fmt: Format, key: str) -> str:
  """An export key 'a.b.weight' -> the module 'a.b' as the loaded HF model names it."""
  for exported, loaded in MODULE_NAMES.get(fmt.name, ()):
    if key.startswith(exported):
      key = loaded + key[len(exported):]
      break
  return key.rsplit(".", 1)[0]


def _template(name: str) -> str:
  """A regex for module `name` with its layer numbers generalised to \\d+ (all layers alike)."""
  return r"\.\d+\.".join(re.escape(part) for part in re.split(r"\.\d+\.", name))


def _pattern(names) -> str:
  """A regex matching exactly these module names (and their other layers)."""
  return "|".join(f"(?:{t})" for t in sorted({_template(n) for n in names}))


def _outermost(names) -> list[str]:
  """The names no other name contains (peft wraps a module to save whole, children included)."""
  return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))


def _adapter(entry, params) -> tuple[np.ndarray, np.ndarray, int] | None:
  """(lora_A [k*r, in], lora_B [out, k*r], k) of one export entry, or None when none of its
  kernels carries an adapter."""
  if not (entry.hook.name == "linear" or entry.hook.name.startswith("split_rows")):
    return None
  kernels = [(path, index) for path, index in entry.slots if path.endswith(".kernel")]
  stems = [path[:-len("kernel")] for path, _ in kernels]
  adapted = [i for i, stem in enumerate(stems) if stem + "lora_a" in params]
  if not adapted:
    return None
  outs = [np.asarray(params[path])[index].shape[-1] for path, index in kernels]
  a = [np.asarray(params[stems[i] + "lora_a"])[kernels[i][1]] for i in adapted]   # [in, r]
  b = [np.asarray(params[stems[i] + "lora_b"])[kernels[i][1]] for i in adapted]   # [r, out_i]
  rank = a[0].shape[1]
  lora_a = np.concatenate([x.T for x in a], axis=0)
  lora_b = np.zeros((sum(outs), rank * len(adapted)), lora_a.dtype)
  offsets = np.concatenate([[0], np.cumsum(outs)])
  for j, i in enumerate(adapted):
    lora_b[offsets[i]:offsets[i + 1], j * rank:(j + 1) * rank] = b[j].T
  return lora_a, lora_b, len(adapted)


def write_adapter(fmt: Format, config: Config, params, dst, *, dtype=None,
                  base_name: str | None = None) -> pathlib.Path:
  """params: {path: array} of the LoRA model (base + adapters + trained modules)."""
  from mma_jax.convert.operations import plain_config

  lora = config.model.lora
  dst = pathlib.Path(dst)
  if (dst / CONFIG_FILE).exists():
    raise CheckpointError(f"'{dst}' already holds a PEFT adapter; choose another --dst")
  trained = set(trained_paths(config, params))
  tensors, targets, saved_modules, covered, adapted = {}, {}, set(), set(), set()
  for entry in fmt.entries(plain_config(config)):
    name = module_name(fmt, entry.hf)
    adapter = _adapter(entry, params)
    if adapter is not None:
      lora_a, lora_b, parts = adapter
      tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_a
      tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_b
      targets[name] = parts
      adapted |= {p for p, _ in entry.slots if p.endswith(".kernel")
                  and p[:-len("kernel")] + "lora_a" in params}
    slots = {path for path, _ in entry.slots}
    if slots and slots <= trained:
      parts = tuple(np.asarray(params[p])[i] for p, i in entry.slots)
      tensors[PREFIX + module_name(fmt, entry.hf) + "." + entry.hf.rsplit(".", 1)[1]] = (
          entry.hook.to_hf(parts))
      saved_modules.add(name)
      covered |= slots
  if not targets:
    raise CheckpointError("the run has no adapters on any module this format exports")
  # Adapters and trained modules must all reach the file (a trained module's parameter with no
  # key of its own in this format would be lost).
  lost = sorted((trained - covered) | {p for p in params if p.endswith(".lora_a")
                                       and p[:-len("lora_a")] + "kernel" not in adapted})
  if lost:
    raise CheckpointError(f"our parameter '{lost[0]}' has no place in a '{fmt.name}' PEFT "
                          "adapter; export merged weights instead (without --peft)")
  fused = {name: parts for name, parts in targets.items() if parts > 1}
  adapter_config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      "target_modules": _pattern(targets), "modules_to_save": _outermost(saved_modules) or None,
      "rank_pattern": {_template(n): lora.rank * k for n, k in fused.items()},
      "alpha_pattern": {_template(n): lora.alpha * k for n, k in fused.items()},
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
      "use_dora": False, "inference_mode": True, "layers_to_transform": None,
      "layers_pattern": None,
  }
  if BASE_CLASSES.get(fmt.name):
    adapter_config["auto_mapping"] = {"base_model_class": BASE_CLASSES[fmt.name],
                                      "parent_library": "transformers"}
  dst.mkdir(parents=True, exist_ok=True)
  # Adapters are small: one file, as peft writes it.
  save_file({k: np.ascontiguousarray(v if dtype is None else v.astype(dtype))
             for k, v in sorted(tensors.items())}, str(dst / ADAPTER_FILE),
            metadata={"format": "pt"})
  (dst / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
  return dst


def trained_paths(config: Config, params) -> list[str]:
  """Our parameters a LoRA run trains in full (model.lora.trainable), as flat paths."""
  m = config.model
  prefixes = [trainable_prefix(m.kind, name) for name in m.lora.trainable]
  return [p for p in params if not p.rsplit(".", 1)[-1] in ADAPTER_NAMES
          and any(tuple(p.split(".")[:len(x)]) == x for x in prefixes)]
