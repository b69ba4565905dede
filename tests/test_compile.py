"""`python -m mma_jax.compile` and what a sharded program must hold: Cloud TPU names, the demo
step compiled for a described v5e slice (Mosaic kernels in its HLO), eval's prefill and decode,
per-chip bytes as memory_analysis() gives them, local rows only in a sharded step's HLO (8 fake
CPU devices), and one-line errors."""
import pathlib
import re

import jax
import pytest

from mma_jax.compile.__main__ import main
from mma_jax.compile.programs import trace_program
from mma_jax.compile.report import compile_report, kernel_calls
from mma_jax.compile.topology import TopologyError, describe
from mma_jax.config import load_config
from mma_jax.models import model_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
AKI_SFT = str(REPO / "configs" / "aki_phi35_sft.yaml")


@pytest.mark.parametrize("name,chips,topology,hbm_gib", [
    ("v4-128", 64, "4x4x4", 32), ("v4-8", 4, "2x2x1", 32),         # v4, v5p: TensorCores
    ("v5p-256", 128, "4x4x8", 95), ("v5p-1024", 512, "8x8x8", 95),
    ("v5litepod-16", 16, "4x4", 16), ("v5e-16", 16, "4x4", 16), ("v5e-8", 8, "2x4", 16),
    ("v6e-256", 256, "16x16", 32), ("v6e-1", 1, "1x1", 32), ("v5p:4x4x8", 128, "4x4x8", 95),
])
def test_cloud_tpu_names(name, chips, topology, hbm_gib):
  tpu = describe(name)
  assert (tpu.chips, tpu.topology, tpu.hbm_bytes) == (chips, topology, hbm_gib * 2 ** 30)


@pytest.mark.parametrize("name", ["v5p-3", "v5e-12", "v7-8", "tpu", "v5e:4x4x4"])
def test_unknown_topology_names_the_known_ones(name):
  with pytest.raises(TopologyError, match="known: v4-8"):
    describe(name)


def test_described_devices_one_per_chip():
  for name, kind in (("v5p-16", "TPU v5"), ("v4-16", "TPU v4"), ("v5e-8", "TPU v5 lite")):
    devices = describe(name).devices()
    assert len(devices) == describe(name).chips and devices[0].device_kind == kind
    assert devices[0].platform == "tpu"


def test_bad_input_exits_2_with_one_line(capsys):
  assert main([DEMO, "--topology", "v9-8"]) == 2
  assert main([DEMO, "--topology", "v5e:2x2", "mesh.fsdp=8"]) == 2
  assert main([DEMO, "--topology", "v5e:2x2", "mesh.fsd=4"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
  assert "unknown topology 'v9-8'" in err[0] and "v5p-8" in err[0]
  assert "does not use the 4 chips of v5e:2x2" in err[1] and "= 8 but 4 devices" in err[1]
  assert "'mesh.fsd' is unknown" in err[2]


def test_demo_step_compiles_for_v5e_with_the_kernel(capsys):
  """The demo's train step (2 decoder layers to keep it short) on a described v5e 2x2 with
  attention.impl=auto: the flash kernel's fwd, dq and dkv per layer run by Mosaic, and the
  contract lines computed from memory_analysis()."""
  code = main([DEMO, "--topology", "v5e:2x2", "mesh.fsdp=4", "model.llm.num_layers=2"])
  out = capsys.readouterr().out.splitlines()
  assert code == 0
  assert "mesh: data=1 fsdp=4 tensor=1 (4 chips)" in out
  assert "Mosaic kernels: mma_flash_dkv x2, mma_flash_dq x2, mma_flash_fwd x2" in out
  values = {k: int(v) for k, v in (line.split("=") for line in out[-3:-1])}
  sizes = {k: int(re.search(r"([\d,]+) B", next(line for line in out if line.strip()
                                                     .startswith(k))).group(1).replace(",", ""))
           for k in ("arguments", "temporaries", "outputs", "aliased")}
  assert values["per_chip_bytes"] == (sizes["arguments"] + sizes["temporaries"] +
                                      sizes["outputs"] - sizes["aliased"])
  assert sizes["aliased"] > 0.9 * sizes["outputs"]     # the donated state is aliased
  assert values["hbm_bytes"] == 16 * 2 ** 30 and out[-1] == "fits=yes"


@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_eval_programs_compile(program):
  report = compile_report(DEMO, ["mesh.fsdp=4", "model.llm.num_layers=1", "eval.batch_size=3",
                                 "eval.max_new_tokens=8"], topology="v5e:2x2", program=program,
                          prompt_length=100)
  assert report.fits and report.per_chip_bytes > 0
  calls = kernel_calls(report.compiled.as_text())
  # the MMA prefill runs the kernel (forward only); decode attends over the cache in XLA
  assert calls == ({"mma_flash_fwd": 1} if program == "prefill" else {})
  # batch 3 rounded up to the 4 batch shards (one row per chip), prompt 100 bucketed to 128
  # and 8 new tokens: a cache of 136 slots
  assert "pred[1,136]" in report.compiled.as_text()


def _global_row_tensors(hlo: str, rows: int, length: int, images: int, image_lengths):
  """Shapes in an HLO text that hold every row of the global batch ([rows, length, ...]) or
  every image ([images, n, ...] with n an image-token length)."""
  found = set()
  for text in re.findall(r"[a-z]+\d*\[([\d,]+)\]", hlo):
    dims = tuple(int(d) for d in text.split(","))
    if len(dims) >= 2 and dims[:2] == (rows, length):
      found.add(dims)
    if len(dims) >= 2 and dims[0] == images and dims[1] in image_lengths:
      found.add(dims)
  return sorted(found)


def test_sharded_step_holds_local_rows_only():
  """AKI's structure (SigLIP so400m width, the Perceiver, Phi-3.5 width; one layer each) on 8
  fake CPU devices, fsdp=8, 8 rows x 3 images: left to itself the partitioner encoded all 24
  images and ran the decoder on all 8 rows on every device ([24, 729, 1152], [8, 256, 3072]).
  With the activation constraints each device holds its own row and its 3 images (and the
  embedding lookup no longer gathers the global batch's token ids)."""
  config = load_config(AKI_SFT, [
      "mesh.fsdp=8", "train.batch_size=8", "model.llm.num_layers=1", "model.vision.num_layers=1",
      "model.connector.depth=1", "attention.impl=dense", "data.images_per_row=3",
      "data.max_length=256"])
  mesh = model_mesh(config, jax.devices()[:8])
  traced, batch = trace_program(config, mesh, "train")
  assert batch["images"].shape == (8, 3, 384, 384, 3)
  hlo = traced.lower().compile().as_text()
  assert _global_row_tensors(hlo, 8, 256, 24, (729, 144, 729 + 144)) == []
  assert _global_row_tensors(hlo, 1, 256, 3, (729, 144, 729 + 144))   # the local rows are there


def test_xla_refusing_for_hbm_reads_as_the_temporaries_lower_bound():
  """XLA's TPU compiler refuses a program whose temporaries exceed HBM: the report turns its
  message into per_chip_bytes (a lower bound) and fits=no; other errors are not read."""
  from mma_jax.compile.report import _temporaries_over_hbm
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 23.22G of 15.75G hbm. Exceeded hbm capacity by 7.47G.\n"
             "Total hbm usage >= 23.47G: ... total memory required for HLO temporaries (23.22G) "
             "exceeds available HBM")
  assert _temporaries_over_hbm(message) == int(23.22 * 1024 ** 3)
  assert _temporaries_over_hbm(message.replace("(23.22G)", "(512M)")) == 512 * 1024 ** 2
  assert _temporaries_over_hbm("INVALID_ARGUMENT: something else") is None
