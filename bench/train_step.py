"""Training-step throughput: our jitted step vs a PyTorch implementation of the same AKI model.

Both sides train the same model (SigLIP tower, frozen -> Perceiver resampler -> Phi-3 decoder with
AKI's decoupled embedding and head) on the same batch:
  ours   mma_jax.train: init_train_state + make_train_step + jit_train_step (AdamW with global-norm
         clipping, weight decay on Linear kernels only), loss over the answer tokens
  torch  convert/torch_reference.AKIReference: transformers SiglipVisionModel + Perceiver + the
         official merge (the <image> token replaced by the resampled rows) + Phi3ForCausalLM under
         the official 4-D MMA keep mask (eager attention); the same loss over the same answer
         tokens, loss.backward(), clip_grad_norm_, torch.optim.AdamW with the same
         hyper-parameters and parameter groups (decay on Linear weights only), optimizer.step()
Weights: ours are initialised from the config's seed, exported with the AKI converter
(convert.operations.write_hf, format aki) and loaded strictly into the reference
(convert.aki.load_reference). The first-step losses must agree to --tol (printed as the check; the
script exits 1 otherwise); the second-step losses (after one AdamW update on each side) and the
gradient norms are printed too, which checks that the optimizers do the same thing.

Every row is full (no padding): [text][image: T rows][question][<|assistant|>][answer]; the loss
covers the predictions of the answer tokens. `ours causal` is the same model and batch with
causal windows (pre-training mask), to compare MMA's step time with causal attention's.
The steps are timed alternating (ours MMA, ours causal, torch; the order rotates per repeat), after
--warmup steps each (the first compiles ours); medians of --repeats. float32 on CPU for both;
torch.set_num_threads(cores) (--torch-threads to change it), XLA uses all cores by default.

  python bench/train_step.py [--size tiny|100m] [--repeats R] [--warmup W] [--batch B] [--length L]
                             [--torch-threads N]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from mma_jax.config import (AttentionConfig, Config, ConnectorConfig, LLMConfig,  # noqa: E402
                            ModelConfig, OriginConfig, TrainConfig, VisionConfig, validate)
from mma_jax.convert.aki import AKI, load_reference  # noqa: E402
from mma_jax.convert.operations import write_hf  # noqa: E402
from mma_jax.convert.transfer import module_params  # noqa: E402
from mma_jax.layout import attention_windows  # noqa: E402
from mma_jax.train.optimizer import learning_rate  # noqa: E402
from mma_jax.train.state import init_train_state  # noqa: E402
from mma_jax.train.step import jit_train_step, make_train_step  # noqa: E402
from run_header import run_header  # noqa: E402  (bench/, the script's folder)

PREFIX = 4   # text tokens before the image
SIZES = {
    # (llm, vision, connector, batch, length); vocab = initial tokenizer length + 2 added tokens
    "tiny": (dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                  num_kv_heads=4, vocab_size=2048),
             dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=32,
                  patch_size=8),
             dict(num_latents=16, depth=1, num_heads=4, head_dim=16, ff_mult=2), 4, 128),
    "100m": (dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                  num_kv_heads=12, vocab_size=8192),
             dict(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6,
                  image_size=224, patch_size=16),
             dict(num_latents=64, depth=2, num_heads=8, head_dim=64, ff_mult=4), 2, 256),
}
ADDED = 2    # <image>, <|endofchunk|>


def bench_config(size: str, batch: int) -> Config:
  llm, vision, connector, _, _ = SIZES[size]
  initial = llm["vocab_size"] - ADDED
  config = Config(
      model=ModelConfig(
          llm=LLMConfig(family="phi3", max_position_embeddings=4096, head_bias=True, **llm),
          vision=VisionConfig(family="siglip", **vision),
          connector=ConnectorConfig(type="perceiver", **connector),
          freeze_vision=True,
          origin=OriginConfig(format="aki", image_token_id=initial, llm_path="bench/llm",
                              vision_path="bench/vision", base_vocab_size=initial)),
      attention=AttentionConfig(impl="auto", mask="mma"),
      train=TrainConfig(batch_size=batch, steps=1000, warmup_steps=0, learning_rate=1e-4,
                        min_learning_rate=1e-5, weight_decay=0.01, clip_norm=1.0, seed=0))
  validate(config)
  return config


# ------------------------------------------------------------------------------------------ batch
@dataclasses.dataclass
class Rows:
  tokens: np.ndarray          # [B, L] expanded (image positions hold the <image> id)
  image_spans: list           # per row (start, end)
  header_ends: list           # per row, one past <|assistant|>
  targets: np.ndarray         # [B, L]
  loss_mask: np.ndarray       # [B, L] float32
  images: np.ndarray          # [B, 1, H, W, 3]
  assistant_id: int


def make_rows(config: Config, batch: int, length: int, seed: int = 0) -> Rows:
  m = config.model
  rows, image_id = m.connector.num_latents, m.origin.image_token_id
  assistant_id = image_id - 1                # text ids stay below it (as convert.aki does)
  room = length - PREFIX - rows - 1          # question + answer
  if room < 4:
    raise SystemExit(f"--length {length} cannot hold {PREFIX} + {rows} image + 4 tokens")
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, assistant_id, size=(batch, length)).astype(np.int32)
  targets = np.zeros((batch, length), np.int32)
  loss_mask = np.zeros((batch, length), np.float32)
  spans, header_ends = [], []
  for b in range(batch):
    question = int(rng.integers(1, room - 1))  # at least one answer token
    start, end = PREFIX, PREFIX + rows
    assistant = end + question
    tokens[b, start:end] = image_id
    tokens[b, assistant] = assistant_id
    tokens[b, -1] = image_id + 1               # <|endofchunk|> ends the answer
    targets[b, :-1] = tokens[b, 1:]
    loss_mask[b, assistant:length - 1] = 1.0   # predictions of the answer tokens
    spans.append((start, end))
    header_ends.append(assistant + 1)
  size = m.vision.image_size
  images = rng.standard_normal((batch, 1, size, size, m.vision.num_channels)).astype(np.float32)
  return Rows(tokens, spans, header_ends, targets, loss_mask, images, assistant_id)


def our_batch(r: Rows, mode: str) -> dict:
  """The batch contract (DESIGN.md §2) for our step, windows from layout.attention_windows."""
  batch, length = r.tokens.shape
  windows = [attention_windows(length, mode, [span], [(0, header_end)])
             for span, header_end in zip(r.image_spans, r.header_ends)]
  index = np.full((batch, length), -1, np.int32)
  for b, (start, end) in enumerate(r.image_spans):
    index[b, start:end] = np.arange(end - start)
  return {"tokens": r.tokens, "positions": np.broadcast_to(
              np.arange(length, dtype=np.int32), (batch, length)).copy(),
          "segment_ids": np.ones((batch, length), np.int32),
          "window_lo": np.stack([lo for lo, _ in windows]),
          "window_hi": np.stack([hi for _, hi in windows]),
          "targets": r.targets, "loss_mask": r.loss_mask, "image_token_index": index,
          "images": r.images, "image_valid": np.ones((batch, 1), bool)}


def torch_batch(r: Rows) -> dict:
  """The reference's inputs: each image span collapsed back to one <image> token."""
  ids = [np.r_[row[:start + 1], row[end:]] for row, (start, end) in zip(r.tokens, r.image_spans)]
  ids = torch.from_numpy(np.stack(ids)).long()
  return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "pixel_values": torch.from_numpy(r.images[:, 0]).permute(0, 3, 1, 2).contiguous(),
          "assistant_token_id": r.assistant_id, "targets": torch.from_numpy(r.targets).long(),
          "loss_mask": torch.from_numpy(r.loss_mask)}


# ------------------------------------------------------------------------------------------ torch
class TorchTrainer:
  """AdamW over the reference's trainable parameters, the groups and schedule of ours."""

  def __init__(self, reference, t: TrainConfig, total_steps: int):
    self.model = reference.train()
    self.model.vision_encoder.requires_grad_(False)   # freeze_vision
    self.clip = t.clip_norm
    groups = {}
    for module_name, module in self.model.named_modules():
      for name, p in module.named_parameters(recurse=False):
        if not p.requires_grad:
          continue
        decay = isinstance(module, torch.nn.Linear) and name == "weight"   # our `kernel`s
        connector = module_name.startswith("vision_tokenizer")
        groups.setdefault((connector, decay), []).append(p)
    self.scales = []
    param_groups = []
    for (connector, decay), params in groups.items():
      param_groups.append({"params": params, "weight_decay": t.weight_decay if decay else 0.0})
      self.scales.append(t.connector_lr_scale if connector else 1.0)
    self.optimizer = torch.optim.AdamW(param_groups, lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2),
                                       eps=1e-8)
    schedule = learning_rate(t)
    self.lrs = [float(schedule(s)) for s in range(total_steps)]
    self.step_count = 0

  def step(self, b: dict) -> tuple[float, float]:
    """One training step; (loss, grad norm) before the update."""
    for group, scale in zip(self.optimizer.param_groups, self.scales):
      group["lr"] = self.lrs[self.step_count] * scale
    self.optimizer.zero_grad(set_to_none=True)
    logits = self.model(b["input_ids"], b["pixel_values"], b["attention_mask"],
                        b["assistant_token_id"])
    losses = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
    weights = b["loss_mask"].flatten()
    loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.step_count += 1
    return float(loss.detach()), float(norm)


# ------------------------------------------------------------------------------------------- main
def parameter_counts(state) -> tuple[int, int]:
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  return count(state["params"]), count(state["frozen"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed steps per implementation (default: tiny 10, 100m 3)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per implementation first (>= 2: the loss checks)")
  parser.add_argument("--batch", type=int, default=None, help="rows per step (size default)")
  parser.add_argument("--length", type=int, default=None, help="tokens per row (size default)")
  parser.add_argument("--tol", type=float, default=1e-4, help="first-step loss agreement")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch.set_num_threads (default: the core count)")
  args = parser.parse_args(argv)
  repeats = args.repeats or (10 if args.size == "tiny" else 3)
  warmup = max(args.warmup, 2)
  batch = args.batch or SIZES[args.size][3]
  length = args.length or SIZES[args.size][4]
  cores = len(os.sched_getaffinity(0))
  torch_threads = args.torch_threads or cores
  torch.set_num_threads(torch_threads)
  header = run_header("train_step.py", argv)

  config = bench_config(args.size, batch)
  r = make_rows(config, batch, length)
  graphdef, state, optimizer = init_train_state(config)
  trainable, frozen = parameter_counts(state)
  flat = module_params(nnx.merge(graphdef, state["params"], state["frozen"]))
  with tempfile.TemporaryDirectory() as tmp:      # the AKI export path, then a strict load
    write_hf(AKI, config, flat, pathlib.Path(tmp) / "aki")
    reference = load_reference(pathlib.Path(tmp) / "aki", config)
  del flat
  torch_total = sum(p.numel() for p in reference.parameters())
  trainer = TorchTrainer(reference, config.train, warmup + repeats)
  step = jit_train_step(make_train_step(graphdef, optimizer, config.train), state, None)
  batches = {mode: jax.device_put(our_batch(r, mode)) for mode in ("mma", "causal")}
  tb = torch_batch(r)

  ours_state = [state]

  def ours(mode):
    new_state, metrics = step(ours_state[0], batches[mode])
    jax.block_until_ready((new_state, metrics))
    ours_state[0] = new_state
    return float(metrics["loss"]), float(metrics["grad_norm"])

  # Warm-up and checks: steps 1 and 2 of ours (MMA) and torch from the same weights.
  checks = []
  for _ in range(2):
    checks.append((ours("mma"), trainer.step(tb)))
  for _ in range(warmup - 2):
    ours("mma")
    trainer.step(tb)
  ours("causal")   # same shapes as MMA: no compile, one warm-up step

  runs = {"ours mma": lambda: ours("mma"), "ours causal": lambda: ours("causal"),
          "torch mma": lambda: trainer.step(tb)}
  times = {name: [] for name in runs}
  names = list(runs)
  for rep in range(repeats):
    for name in names[rep % 3:] + names[:rep % 3]:
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)

  tokens = batch * length
  answer = int(r.loss_mask.sum())
  (loss1, norm1), (tloss1, tnorm1) = checks[0]
  (loss2, _), (tloss2, _) = checks[1]
  ok = abs(loss1 - tloss1) <= args.tol
  print(header)
  print(f"# model ({args.size}): phi3 decoder E={config.model.llm.hidden_size} "
        f"layers={config.model.llm.num_layers} heads={config.model.llm.num_heads} "
        f"mlp={config.model.llm.intermediate_size} vocab={config.model.llm.vocab_size}; siglip "
        f"E={config.model.vision.hidden_size} layers={config.model.vision.num_layers} "
        f"{config.model.vision.image_size}px/{config.model.vision.patch_size}; perceiver "
        f"latents={config.model.connector.num_latents} depth={config.model.connector.depth}")
  print(f"# parameters: {trainable + frozen:,} (trainable {trainable:,}, frozen tower "
        f"{frozen:,}); torch reference {torch_total:,}")
  print(f"# batch {batch} x {length} = {tokens} tokens/step (tokens/s counts them all, text and "
        f"image rows; {answer} answer tokens in the loss), "
        f"1 image/row; float32; CPU {cores} cores, torch.set_num_threads({torch_threads}), XLA default "
        f"threads; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; "
        f"AdamW lr {config.train.learning_rate:g} wd {config.train.weight_decay:g} "
        f"clip {config.train.clip_norm:g}")
  print(f"# check: step-1 loss ours {loss1:.7f} torch {tloss1:.7f} |diff| "
        f"{abs(loss1 - tloss1):.2e} (tol {args.tol:g}) {'ok' if ok else 'MISMATCH'}; "
        f"grad norm ours {norm1:.5f} torch {tnorm1:.5f}; step-2 loss (after one AdamW update) "
        f"ours {loss2:.7f} torch {tloss2:.7f} |diff| {abs(loss2 - tloss2):.2e}")
  print(f"# {warmup} warm-up steps for ours mma and torch (the first compiles ours), 1 for ours "
        f"causal (same shapes), then median/min of {repeats} "
        f"alternating steps")
  print(f"{'impl':<8}{'mask':<8}{'median_ms':>11}{'min_ms':>10}{'tokens/s':>11}{'x torch':>9}")
  torch_rate = tokens / np.median(times["torch mma"])
  for name in names:
    impl, mask = name.split()
    median = float(np.median(times[name]))
    print(f"{impl:<8}{mask:<8}{1e3 * median:>11.1f}{1e3 * min(times[name]):>10.1f}"
          f"{tokens / median:>11.0f}{tokens / median / torch_rate:>9.3f}")
  mma_over_causal = np.median(times["ours mma"]) / np.median(times["ours causal"])
  print(f"ratios: ours/torch tokens/s = {tokens / np.median(times['ours mma']) / torch_rate:.3f}"
        f"   ours mma/causal step time = {mma_over_causal:.3f}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
