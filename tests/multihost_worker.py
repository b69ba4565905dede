"""The processes of the multi-host test (test_multihost.py); not collected by pytest.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py PORT ID
joins the coordinator at 127.0.0.1:PORT as process ID of 2, loads only its half of the global
batch and runs one training step on a (data 1, fsdp 2, tensor 2) mesh spanning both processes;

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py single
runs the same step in one process on 4 devices (the reference). Both print
`metrics loss=<repr> grad_norm=<repr>`.
"""
from __future__ import annotations

import sys

import numpy as np

NUM_PROCESSES = 2
B, L, VOCAB = 8, 16, 64


def tiny_config():
  """A tiny MLLM (the train step's loss reads the MLLM batch contract) on a 4-device mesh."""
  from mma_jax.config import (AttentionConfig, Config, ConnectorConfig, LLMConfig, MeshConfig,
                              ModelConfig, TrainConfig, VisionConfig)
  model = ModelConfig(
      llm=LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=64),
      vision=VisionConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                          image_size=16, patch_size=8),
      connector=ConnectorConfig(num_latents=3, depth=1, num_heads=2, head_dim=8))
  return Config(model=model, attention=AttentionConfig(impl="dense", mask="mma"),
                mesh=MeshConfig(data=1, fsdp=2, tensor=2),
                train=TrainConfig(batch_size=B, steps=10, warmup_steps=2))


def full_batch() -> dict[str, np.ndarray]:
  """The global batch every run agrees on: one image (3 rows at positions 1-3, seeing the
  question at 4-8 under MMA) and answers at 9-12 in every row."""
  rng = np.random.default_rng(0)
  index = np.full((B, L), -1, np.int32)
  index[:, 1:4] = np.arange(3)
  lo, hi = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
  lo[:, 1:4], hi[:, 1:4] = 4, 9
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[:, 9:13] = 1
  return {"tokens": rng.integers(1, VOCAB, (B, L)).astype(np.int32),
          "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
          "segment_ids": np.ones((B, L), np.int32), "window_lo": lo, "window_hi": hi,
          "targets": rng.integers(0, VOCAB, (B, L)).astype(np.int32), "loss_mask": loss_mask,
          "image_token_index": index,
          "images": rng.standard_normal((B, 1, 16, 16, 3)).astype(np.float32),
          "image_valid": np.ones((B, 1), bool)}


def run_step(config, mesh, local_batch) -> dict[str, float]:
  """init_train_state + make_train_step + jit_train_step: one step's loss and the global norm
  of its gradients (reduced over every row of the batch, so over both processes)."""
  from mma_jax.sharding import global_batch
  from mma_jax.train.state import init_train_state
  from mma_jax.train.step import jit_train_step, make_train_step

  graphdef, state, optimizer = init_train_state(config, mesh)
  batch = global_batch(local_batch, mesh)
  step = jit_train_step(make_train_step(graphdef, optimizer, config.train), state, mesh, batch)
  _, metrics = step(state, batch)
  # replicated scalars: every process reads them
  return {name: float(metrics[name]) for name in ("loss", "grad_norm")}


def main(argv: list[str]) -> None:
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from mma_jax.sharding import initialize_distributed, make_mesh

  if argv == ["single"]:
    process_id, num_processes = 0, 1
  else:
    process_id, num_processes = int(argv[1]), NUM_PROCESSES
    initialize_distributed(f"127.0.0.1:{int(argv[0])}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 4, jax.devices()
  config = tiny_config()
  mesh = make_mesh(config.mesh)
  rows = B // num_processes  # this process's devices hold rows [id * rows, (id + 1) * rows)
  local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in full_batch().items()}
  metrics = run_step(config, mesh, local)
  print("metrics " + " ".join(f"{k}={v!r}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
