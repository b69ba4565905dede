"""`python -m mma_jax.sharding describe`: the AKI-4B plan on v5e-256-like meshes against bytes
counted by hand, mesh presets composed through `base:` lists, and one-line errors."""
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from mma_jax.config import ConfigError, load_config
from mma_jax.models import build_model
from mma_jax.compile.planner import main, mesh_sizes, plan
from mma_jax.train.optimizer import make_optimizer
from mma_jax.sharding import MESH_AXES, tree_shardings
from mma_jax.train.state import trainable_filter

REPO = pathlib.Path(__file__).resolve().parents[1]
AKI = REPO / "configs" / "model" / "aki_phi35.yaml"
F32 = 4

# AKI-4B's shapes (configs/model/aki_phi35.yaml), written out here rather than read from the code.
V, E, F, LL = 32014, 3072, 8192, 32   # Phi-3.5-mini: vocabulary (AKI's), hidden, MLP, layers
VE, VF, VL, PATCHES = 1152, 4304, 27, 729   # SigLIP so400m: width, MLP, layers, (384 // 14) ** 2
LAT, DEPTH, CI, CF = 144, 6, 512, 4608      # Perceiver: latents, layers, 8 heads x 64, 4 x 1152


def elements_per_device(params) -> int:
  """params: (shape, how many ways each dim splits); a split dim keeps ceil(dim / ways)."""
  return sum(math.prod(math.ceil(d / w) for d, w in zip(shape, ways)) for shape, ways in params)


def aki_params(embed, heads, mlp, vocab, v_embed, v_heads, v_mlp, c_heads, c_mlp, proj,
               head_bias):
  """(llm, connector, vision) parameter lists; each argument says how many ways the dims of that
  kind split on the mesh (1 = replicated). proj: the connector projection's (in, out) ways;
  head_bias: the LM-head bias's (its vocab dim alone, free to take what the kernel's embed took)."""
  llm = [((V, E), (vocab, embed)),                        # embed.embedding
         ((E, V), (embed, vocab)),                        # lm_head.kernel
         *[((LL, E, E), (1, embed, heads))] * 3,          # q, k, v (32 kv heads: k, v as q)
         ((LL, E, E), (1, heads, embed)),                 # o
         *[((LL, E, F), (1, embed, mlp))] * 2,            # gate, up
         ((LL, F, E), (1, mlp, embed)),                   # down
         *[((LL, E), (1, embed))] * 2,                    # attn_norm, mlp_norm scales
         ((E,), (embed,)),                                # final norm
         ((V,), (head_bias,))]                            # head_bias
  connector = [((LAT, VE), (1, v_embed)),                 # latents
               *[((DEPTH, VE), (1, v_embed))] * 4,        # norm_media, norm_latents (scale, bias)
               *[((DEPTH, VE, CI), (1, v_embed, c_heads))] * 3,   # q, k, v
               ((DEPTH, CI, VE), (1, c_heads, v_embed)),  # o
               *[((DEPTH, VE), (1, v_embed))] * 2,        # ff.norm
               ((DEPTH, VE, CF), (1, v_embed, c_mlp)),    # ff.up
               ((DEPTH, CF, VE), (1, c_mlp, v_embed)),    # ff.down
               *[((VE,), (v_embed,))] * 2,                # final norm
               ((VE, E), proj), ((E,), (embed,))]         # projection kernel, bias
  vision = [((14, 14, 3, VE), (1, 1, 1, v_embed)), ((VE,), (v_embed,)),   # patch conv, bias
            ((PATCHES, VE), (1, v_embed)),                # position_embedding
            *[((VL, VE, VE), (1, v_embed, v_heads))] * 3,  # q, k, v
            ((VL, VE, VE), (1, v_heads, v_embed)),        # o
            *[((VL, VE), (1, v_heads))] * 3,              # q, k, v biases
            ((VL, VE), (1, v_embed)),                     # o bias
            *[((VL, VE), (1, v_embed))] * 4,              # attn_norm, mlp_norm (scale, bias)
            ((VL, VE, VF), (1, v_embed, v_mlp)), ((VL, VF), (1, v_mlp)),   # fc1, bias
            ((VL, VF, VE), (1, v_mlp, v_embed)), ((VL, VE), (1, v_embed)),  # fc2, bias
            *[((VE,), (v_embed,))] * 2]                   # post_norm
  return llm, connector, vision


# One device's rows of the train batch: the preset's default batch (8 rows) gives each of 256
# devices one row of 256 tokens (7 int32 fields + the f32 loss mask) and 4 image slots of
# 384 x 384 x 3 f32 with their bool valid flags.
BATCH_ROW = 256 * 8 * 4 + 4 * (384 * 384 * 3 * F32 + 1)


def hand_bytes(llm, connector, vision) -> int:
  """f32 parameters everywhere + Adam's mu and nu (f32) for the trainable connector and LLM (the
  frozen tower has no optimizer state) + one row of the train batch."""
  trainable = elements_per_device(llm) + elements_per_device(connector)
  return F32 * (trainable + elements_per_device(vision)) + 2 * F32 * trainable + BATCH_ROW


# fsdp=256, tensor=1: every embed dim (3072 = 256 x 12) splits 256 ways; the vision width
# 1152 = 256 x 4.5 does not, so the 256 FSDP devices form fsdp=128 x fsdp_transpose=2: the
# vision width splits 128 ways (1152 = 128 x 9) and the other dim of each vision and connector
# weight the remaining 2 ways (1152, 4304, 512, 4608 and, for the projection, 3072 are even).
# The head bias's vocab dim takes fsdp_transpose (32014 = 2 x 16007), which the kernel's embed took.
FSDP256_PARAMS = aki_params(embed=256, heads=1, mlp=1, vocab=1, v_embed=128, v_heads=2, v_mlp=2,
                            c_heads=2, c_mlp=2, proj=(128, 2), head_bias=2)
FSDP256 = hand_bytes(*FSDP256_PARAMS)
# fsdp=64, tensor=4: embed 3072 / 64, vision width 1152 / 64 = 18; heads, MLPs split 4 ways
# (3072, 8192, 1152, 4304 = 4 x 1076, 512, 4608); the vocabulary 32014 is not a multiple of 4.
# The projection's input (vision_embed) claims fsdp first, so its output dim stays whole.
FSDP64_TP4 = hand_bytes(*aki_params(embed=64, heads=4, mlp=4, vocab=1, v_embed=64, v_heads=4,
                                    v_mlp=4, c_heads=4, c_mlp=4, proj=(64, 1), head_bias=1))


def run(capsys, *args):
  code = main(["describe", *map(str, args)])
  out, err = capsys.readouterr()
  return code, out.splitlines(), err.splitlines()


def test_aki_on_fsdp256_matches_the_hand_count(capsys):
  code, out, err = run(capsys, AKI, "mesh.data=1", "mesh.fsdp=256", "mesh.tensor=1")
  assert code == 0 and not err
  assert "mesh: data=1 fsdp=128 fsdp_transpose=2 tensor=1 (256 devices)" in out
  assert out[-1] == f"per_device_bytes={FSDP256}"
  # 0.19 GB, about state / 256 (2.77 GB when the 1152-wide weights stayed whole on every device)
  assert FSDP256 == 190_021_380 + BATCH_ROW == 197_107_464
  rows = {line.split()[0]: line.split()[1:] for line in out if line.startswith(("llm.", "vis"))}
  assert rows["llm.embed.embedding"][:5] == ["32014x3072", "(vocab,", "embed)", "(fsdp_transpose,",
                                             "fsdp)"]
  assert rows["llm.layers.mlp.down.kernel"][-2:] == ["12.00", "MiB"]  # 32 x 8192 x 12 x 4 B
  assert rows["vision.layers.mlp.fc1.kernel"][-1] == "frozen"
  assert any(line.startswith("not included: gradients") for line in out)


def test_aki_with_mesh_preset_through_a_base_list(tmp_path):
  """A run config composes the model preset and configs/mesh/fsdp_tp.yaml (fsdp -1, tensor 4);
  --devices 256 resolves fsdp to 64. Run as the documented command."""
  run_config = tmp_path / "aki_v5e256.yaml"
  run_config.write_text(f"base: [{AKI}, {REPO / 'configs' / 'mesh' / 'fsdp_tp.yaml'}]\n")
  result = subprocess.run(
      [sys.executable, "-m", "mma_jax.sharding", "describe", str(run_config), "--devices", "256"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "mesh: data=1 fsdp=64 tensor=4 (256 devices)" in lines
  assert lines[-1] == f"per_device_bytes={FSDP64_TP4}"
  assert FSDP64_TP4 == 218_263_224 + BATCH_ROW  # 215 MiB (fsdp=256 alone: 188 MiB, 128 x 2)


def test_optimizer_estimate_matches_the_real_adam_state():
  """describe counts mu and nu per trainable parameter; the real optax state (abstract, sharded
  by train/state.py's rules) holds exactly those plus a few int32 step counters."""
  config = load_config(AKI, ["mesh.fsdp=256"])
  sizes = mesh_sizes(config, None)
  plans = plan(config, sizes)
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  params = nnx.state(model, trainable_filter(config))
  opt_state = jax.eval_shape(make_optimizer(config.train).init, params)
  mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))
  shardings = jax.tree.leaves(tree_shardings(opt_state, mesh))
  leaves = jax.tree.leaves(opt_state)
  assert len(shardings) == len(leaves)
  real = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for s, x in zip(shardings, leaves))
  counters = sum(np.dtype(x.dtype).itemsize for x in leaves if x.shape == ())
  assert 0 < counters <= 64
  assert real == sum(p.optimizer_bytes for p in plans) + counters
  llm, connector, _ = FSDP256_PARAMS
  assert sum(p.optimizer_bytes for p in plans) == 2 * F32 * (
      elements_per_device(llm) + elements_per_device(connector))


@pytest.mark.parametrize("args,fragments", [
    (["mesh.fsd=8"], ["config key 'mesh.fsd' is unknown"]),
    ([], ["'mesh.fsdp' is -1", "--devices"]),
    (["mesh.fsdp=8", "--devices", "16"], ["= 8 but 16 devices"]),
    (["--devices", "zero"], ["--devices expects a positive integer"]),
])
def test_bad_input_is_one_line_error(capsys, args, fragments):
  code, out, err = run(capsys, AKI, *args)
  assert code == 2 and not out and len(err) == 1 and err[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in err[0]


def test_missing_command_and_config_file(capsys):
  assert main([str(AKI)]) == 2
  assert main(["describe", "configs/nope.yaml"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and "'describe'" in err[0] and "nope.yaml' does not exist" in err[1]


def test_base_list_merges_in_order_with_own_keys_on_top(tmp_path):
  (tmp_path / "a.yaml").write_text("mesh: {data: 2, fsdp: 4}\ntrain: {steps: 5}\n")
  (tmp_path / "b.yaml").write_text("mesh: {fsdp: -1, tensor: 2}\n")
  (tmp_path / "run.yaml").write_text("base: [a.yaml, b.yaml]\ntrain: {steps: 7}\n")
  config = load_config(tmp_path / "run.yaml")
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, -1, 2)
  assert config.train.steps == 7
  (tmp_path / "bad.yaml").write_text("base: {a: 1}\n")
  with pytest.raises(ConfigError, match="'base' must be a file name or a list"):
    load_config(tmp_path / "bad.yaml")
