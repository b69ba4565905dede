"""One deviceless compile and what it tells: mesh, timings, per-chip bytes, the planner beside it."""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Sequence

import jax
from mma_jax.compile.planner import batch_bytes, plan
from mma_jax.compile.programs import eval_shapes, trace_program
from mma_jax.compile.topology import describe
from mma_jax.config import ConfigError, load_config
from mma_jax.models import model_mesh
from mma_jax.sharding import mesh_text
from mma_jax.train.state import per_device_bytes

GiB = 2 ** 30


@dataclasses.dataclass
class Report:
  lines: list[str]
  fits: bool
  compiled: object       # jax.stages.Compiled (HLO text, cost and memory analysis)
  per_chip_bytes: int


def _gib(n: int) -> str:
  return f"{n / GiB:.2f} GiB"


def kernel_calls(hlo_text: str) -> dict[str, int]:
  """How many times each flash kernel (fwd, dq, dkv) appears in a compiled HLO text."""
  counts: dict[str, int] = {}
  for line in hlo_text.splitlines():
    if "tpu_custom_call" in line:
      name = re.search(r"mma_flash_\w+", line)
      key = name.group(0) if name else "other"
      counts[key] = counts.get(key, 0) + 1
  return counts


def _temporaries_over_hbm(message: str) -> int | None:
  """The bytes of XLA's 'total memory required for HLO temporaries (23.22G) exceeds available
  HBM' (binary units, as XLA prints them), or None for any other error."""
  found = re.search(r"RESOURCE_EXHAUSTED.*HLO temporaries \(([\d.]+)([KMGT]?)\)", message,
                    re.S)   # the two phrases may sit on different lines
  if not found:
    return None
  return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " "))


def compile_report(config_path: str, overrides: Sequence[str] = (), *, topology: str,
                   program: str = "train", prompt_length: int | None = None, images: int = 1,
                   progress: Callable[[str], None] = lambda line: None) -> Report:
  config = load_config(config_path, overrides)
  tpu = describe(topology)
  devices = tpu.devices()
  try:
    mesh = model_mesh(config, devices)
  except ConfigError as e:
    raise ConfigError(f"the mesh does not use the {tpu.chips} chips of {topology}: {e}") from None
  progress(f"topology: {topology} = {tpu.generation.name}:{tpu.topology}, {tpu.chips} chips "
           f"({devices[0].device_kind}), {_gib(tpu.hbm_bytes)} HBM per chip")
  progress(f"mesh: {mesh_text(dict(mesh.shape))} ({mesh.size} chips)")
  if program == "train":
    t = config.train
    progress(f"program: train step, global batch {t.batch_size} rows x {config.data.max_length} "
             f"tokens, {config.data.images_per_row} image slots per row, grad_accum "
             f"{t.grad_accum}, attention.impl={config.attention.impl}")
  else:
    s = eval_shapes(config, mesh, prompt_length=prompt_length, images=images)
    progress(f"program: {program}, batch {s.batch} prompts x {s.prompt_length} tokens, "
             f"{s.images} image(s) each, {s.max_new_tokens} new tokens, greedy")

  start = time.perf_counter()
  traced, inputs = trace_program(config, mesh, program, prompt_length=prompt_length,
                                 images=images)
  lowered = traced.lower()
  traced_at = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA's TPU compiler itself refuses a program whose temporaries exceed HBM: that is a
    # "does not fit", reported with the lower bound it gives, not a crash.
    needed = _temporaries_over_hbm(str(e))
    if needed is None:
      raise
    lines = [f"XLA refused after {time.perf_counter() - start:.1f} s: "
             f"{str(e).splitlines()[0][:300]}",
             f"HBM per chip: {_gib(tpu.hbm_bytes)}; this program at least {_gib(needed)} "
             "(its temporaries alone)",
             f"per_chip_bytes={needed}", f"hbm_bytes={tpu.hbm_bytes}", "fits=no"]
    return Report(lines, False, None, needed)
  done = time.perf_counter()
  memory = compiled.memory_analysis()
  arguments, temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
  outputs, aliased = memory.output_size_in_bytes, memory.alias_size_in_bytes
  per_chip = arguments + temporaries + outputs - aliased

  sizes = dict(mesh.shape)
  plans = plan(config, sizes)
  planned = sum(p.device_bytes for p in plans)
  if program == "train":   # the planner's whole figure: what `describe` ends with
    planned += sum(p.optimizer_bytes for p in plans) + batch_bytes(config, sizes)
    compared, what = arguments, "parameters + AdamW state + batch rows"
  else:   # the planner knows the parameters only: leave the prompt batch / decode state out
    compared, what = arguments - per_device_bytes(inputs), "parameters"
  calls = kernel_calls(compiled.as_text())
  kernels = (", ".join(f"{k} x{n}" for k, n in sorted(calls.items())) if calls else
             "none (attention runs in XLA)")
  lines = [
      f"compiled in {done - start:.1f} s (trace + lower {traced_at - start:.1f} s, "
      f"XLA {done - traced_at:.1f} s)",
      f"Mosaic kernels: {kernels}",
      "per chip, from the compiled executable:",
      f"  arguments    {arguments:>15,} B  {_gib(arguments)}",
      f"  temporaries  {temporaries:>15,} B  {_gib(temporaries)}",
      f"  outputs      {outputs:>15,} B  {_gib(outputs)}",
      f"  aliased      {aliased:>15,} B  {_gib(aliased)}  (donated, counted once)",
      f"planner (mma_jax.sharding describe): {what} {planned:,} B ({_gib(planned)}); the "
      f"compiled {'arguments' if program == 'train' else 'parameter arguments'} "
      f"{compared / max(planned, 1):.3f}x that (TPU tiles pad small dims)",
      f"HBM per chip: {_gib(tpu.hbm_bytes)}; this program {_gib(per_chip)} "
      f"({per_chip / tpu.hbm_bytes:.0%})",
      f"per_chip_bytes={per_chip}",
      f"hbm_bytes={tpu.hbm_bytes}",
      f"fits={'yes' if per_chip <= tpu.hbm_bytes else 'no'}",
  ]
  return Report(lines, per_chip <= tpu.hbm_bytes, compiled, per_chip)
