"""A PyTorch reference of AKI's vision tokenizer, written from the official structure
(sony/aki, codes/open_flamingo/src/helpers.py: PerceiverResampler, PerceiverAttention,
FeedForward) for parity tests. Module names match the official ones, so `state_dict()` keys are
the checkpoint's keys under `vision_tokenizer.`. Single frame, no media/frame position embeddings
(as AKI builds it); images are the batch axis.
"""
from __future__ import annotations

import torch
from torch import nn


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
  """features [B, N, dim] -> [B, num_latents, dim_inner]."""

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


def randomize_(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
  """Every parameter random, LayerNorm scales around 1 (a swapped or skipped norm shows)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      owner = module.get_submodule(name.rpartition(".")[0])
      around = 1.0 if isinstance(owner, nn.LayerNorm) and name.endswith("weight") else 0.0
      p.copy_(around + std * torch.randn(p.shape, generator=gen))
  return module
