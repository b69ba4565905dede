"""PyTorch references of AKI for `verify --format aki` and the parity tests, written from the
official structure (sony/aki, codes/open_flamingo/src: helpers.py for the Perceiver and the
decoupled embedding/head, vlm.py for the merge and `_make_modality_mutual_mask`).

Module names follow the official ones, so `AKIReference.state_dict()` keys are exactly an AKI
checkpoint's keys. This module imports torch and transformers at the top: import it lazily, inside
the functions that need it, so that converting without torch keeps working.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn


# ---------------------------------------------------------------------------- Perceiver resampler
def feed_forward(dim: int, mult: int) -> nn.Sequential:
  # Indices 0, 1, 3 carry weights: LayerNorm, Linear up, (GELU), Linear down.
  return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                       nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
  def __init__(self, dim: int, dim_head: int, heads: int):
    super().__init__()
    self.heads, self.scale = heads, dim_head ** -0.5
    inner = dim_head * heads
    self.norm_media = nn.LayerNorm(dim)
    self.norm_latents = nn.LayerNorm(dim)
    self.to_q = nn.Linear(dim, inner, bias=False)
    self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
    self.to_out = nn.Linear(inner, dim, bias=False)

  def forward(self, x, latents):
    """x [B, N, dim] image features, latents [B, n, dim] -> [B, n, dim]."""
    x, latents = self.norm_media(x), self.norm_latents(latents)
    q = self.to_q(latents)
    k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
    heads = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # [B, H, L, D]
    q, k, v = heads(q) * self.scale, heads(k), heads(v)
    scores = q @ k.transpose(-1, -2)
    scores = scores - scores.amax(dim=-1, keepdim=True).detach()
    out = scores.softmax(dim=-1) @ v
    return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
  """features [B, N, dim] -> [B, num_latents, dim_inner]. Single frame, no media/frame position
  embeddings (as AKI builds it); images are the batch axis."""

  def __init__(self, *, dim: int, dim_inner: int, depth: int = 6, dim_head: int = 64,
               heads: int = 8, num_latents: int = 144, ff_mult: int = 4):
    super().__init__()
    self.latents = nn.Parameter(torch.randn(num_latents, dim))
    self.layers = nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
        for _ in range(depth))
    self.norm = nn.LayerNorm(dim)
    self.projection = nn.Linear(dim, dim_inner)

  def forward(self, x):
    latents = self.latents.expand(x.shape[0], -1, -1)
    for attn, ff in self.layers:
      latents = attn(x, latents) + latents
      latents = ff(latents) + latents
    return self.projection(self.norm(latents))


# ------------------------------------------------------------------ decoupled embedding and head
class DecoupledEmbedding(nn.Embedding):
  """The base table `weight` [base_vocab, E] serves ids below `num_original` (its later rows are
  never read); ids from `num_original` on read `additional_embedding` (AKI's added tokens)."""

  def __init__(self, base_vocab: int, dim: int, num_original: int, num_additional: int):
    super().__init__(base_vocab, dim)
    self.num_original = num_original
    self.additional_embedding = nn.Embedding(num_additional, dim)

  def forward(self, ids):
    added = ids >= self.num_original
    base = F.embedding(torch.where(added, 0, ids), self.weight)
    extra = self.additional_embedding((ids - self.num_original).clamp(min=0))
    return torch.where(added[..., None], extra, base)


class DecoupledLinear(nn.Linear):
  """Logits of the base head `weight` [base_vocab, E] + `bias` cut to the original vocabulary,
  followed by those of `additional_fc` (the added tokens). Both carry a bias, as the official
  class's default bias=True gives them."""

  def __init__(self, dim: int, base_vocab: int, num_original: int, num_additional: int):
    super().__init__(dim, base_vocab, bias=True)
    self.num_original = num_original
    self.additional_fc = nn.Linear(dim, num_additional, bias=True)

  def forward(self, x):
    base = F.linear(x, self.weight, self.bias)[..., :self.num_original]
    return torch.cat([base, self.additional_fc(x)], dim=-1)


# ------------------------------------------------------------------------------------ the model
def mma_keep_mask(valid: torch.Tensor, image_start: int, image_end: int,
                  assistant: int) -> torch.Tensor:
  """The official rule, literally: keep[i, j] = j <= i, or i is an image token and
  image_end <= j <= assistant; then padding keys are removed. valid [L] bool -> keep [L, L]."""
  i = torch.arange(valid.shape[0])[:, None]
  j = torch.arange(valid.shape[0])[None, :]
  image_query = (image_start <= i) & (i < image_end)
  keep = (j <= i) | (image_query & (image_end <= j) & (j <= assistant))
  return keep & valid[None, :]


class AKIReference(nn.Module):
  """The AKI forward: SigLIP tower (last_hidden_state) -> Perceiver -> image rows spliced into the
  decoupled token embeddings in place of each row's <image> token -> the LLM under the official MMA
  keep mask (a 4-D additive mask, eager attention) -> decoupled head (with its biases)."""

  def __init__(self, vision_config, llm_config, *, perceiver: dict, initial_tokenizer_len: int,
               num_additional: int = 2):
    super().__init__()
    base_vocab, dim = llm_config.vocab_size, llm_config.hidden_size
    self.image_token_id = initial_tokenizer_len   # <image> is the first added token
    self.vision_encoder = transformers.SiglipVisionModel(vision_config)
    self.vision_tokenizer = PerceiverResampler(dim=vision_config.hidden_size, dim_inner=dim,
                                               **perceiver)
    # Eager attention adds a float mask to the scores; it is also the most literal reference.
    self.lang_model = transformers.AutoModelForCausalLM.from_config(
        llm_config, attn_implementation="eager")
    self.lang_model.set_input_embeddings(
        DecoupledEmbedding(base_vocab, dim, initial_tokenizer_len, num_additional))
    self.lang_model.set_output_embeddings(
        DecoupledLinear(dim, base_vocab, initial_tokenizer_len, num_additional))

  def image_rows(self, pixel_values):
    """pixel_values [B, C, H, W] -> [B, num_latents, E]."""
    return self.vision_tokenizer(self.vision_encoder(pixel_values).last_hidden_state)

  def forward(self, input_ids, pixel_values, attention_mask, assistant_token_id: int):
    """input_ids [B, S] with one <image> token per row before its first assistant token,
    pixel_values [B, C, H, W] (one image per row), attention_mask [B, S] (1 = real token)
    -> logits [B, S - 1 + num_latents, V] over the expanded sequence."""
    rows = self.image_rows(pixel_values)
    embeds = self.lang_model.get_input_embeddings()(input_ids)
    num_rows = rows.shape[1]
    merged, keep = [], []
    for b in range(input_ids.shape[0]):
      at = _first(input_ids[b], self.image_token_id, "<image>")
      assistant = _first(input_ids[b], assistant_token_id, "assistant") + num_rows - 1
      merged.append(torch.cat([embeds[b, :at], rows[b], embeds[b, at + 1:]]))
      valid = torch.cat([attention_mask[b, :at].bool(), torch.ones(num_rows, dtype=torch.bool),
                         attention_mask[b, at + 1:].bool()])
      keep.append(mma_keep_mask(valid, at, at + num_rows, assistant))
    keep = torch.stack(keep)[:, None]                     # [B, 1, L, L]
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return self.lang_model(inputs_embeds=torch.stack(merged), attention_mask=additive).logits


def _first(ids, token: int, what: str) -> int:
  where = torch.nonzero(ids == token)
  if where.numel() == 0:
    raise ValueError(f"a row of input_ids has no {what} token (id {token})")
  return int(where[0, 0])


# ------------------------------------------------------------------------------------ test help
def randomize_(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
  """Every parameter random; norm scales (LayerNorm, RMSNorm) around 1, so that a swapped or
  skipped norm shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      owner = module.get_submodule(name.rpartition(".")[0])
      is_scale = "Norm" in type(owner).__name__ and name.endswith("weight")
      p.copy_(float(is_scale) + std * torch.randn(p.shape, generator=gen))
  return module
