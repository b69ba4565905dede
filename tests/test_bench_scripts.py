"""The bench scripts run end to end at their smallest settings and print their tables (no timing
assertions: performance lives in bench/, never in timed tests)."""
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def run_script(*args, timeout=180) -> list[str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # conftest's 8 fake devices are not what the scripts measure
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout.splitlines()


def numbers(line: str, skip: int) -> list[float]:
  values = [float(x.replace(",", "")) for x in line.split()[skip:] if x[0].isdigit()]
  assert values and all(math.isfinite(v) for v in values), line
  return values


def line_starting(lines: list[str], prefix: str) -> str:
  found = [line for line in lines if line.startswith(prefix)]
  assert len(found) == 1, (prefix, lines)
  return found[0]


def test_train_step_tiny():
  lines = run_script("bench/train_step.py", "--size", "tiny", "--repeats", "1", "--batch", "2",
                     "--length", "64", "--torch-threads", "1")
  assert lines[0].startswith("# ") and "UTC" in lines[0] and "bench/train_step.py" in lines[0]
  assert "parameters:" in line_starting(lines, "# parameters")
  check = line_starting(lines, "# check:")
  assert " ok;" in check
  diff = float(check.split("|diff| ")[1].split()[0])
  assert diff <= 1e-4
  header = line_starting(lines, "impl")
  assert header.split() == ["impl", "mask", "median_ms", "min_ms", "tokens/s", "x", "torch"]
  for row in ("ours    mma", "ours    causal", "torch   mma"):
    values = numbers(line_starting(lines, row), 2)
    assert len(values) == 4 and all(v > 0 for v in values)
  assert numbers(line_starting(lines, "torch   mma"), 2)[3] == 1.0
  ratios = line_starting(lines, "ratios:")
  assert "ours/torch tokens/s" in ratios and "ours mma/causal step time" in ratios
  values = [float(part.split()[0]) for part in ratios.split("= ")[1:]]
  assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_convert_small(tmp_path):
  lines = run_script("bench/convert.py", "--params", "2e6", "--workdir", str(tmp_path / "w"))
  assert lines[0].startswith("# ") and "UTC" in lines[0] and "bench/convert.py" in lines[0]
  assert "shards + index" in line_starting(lines, "# checkpoint:")
  header = lines.index(next(line for line in lines if line.split()[:2] == ["params", "ckpt_GiB"]))
  row = lines[header + 1].split()
  params, ckpt, shards, wall, peak, over = (float(x.replace(",", "")) for x in row[:6])
  assert 1.5e6 <= params <= 2.5e6 and shards >= 2
  assert all(math.isfinite(v) and v > 0 for v in (ckpt, wall, peak))
  assert math.isclose(over, peak - ckpt, abs_tol=2e-3)
  assert row[6] in ("ok", "OVER")
  # nothing left behind without --keep
  assert not any((tmp_path / "w").iterdir())


def test_generate_tiny():
  lines = run_script("bench/generate.py", "--size", "tiny", "--repeats", "1", "--new-tokens", "4",
                     "--batch-sizes", "1", "2", "--torch-threads", "1")
  assert lines[0].startswith("# ") and "UTC" in lines[0] and "bench/generate.py" in lines[0]
  assert "cores" in line_starting(lines, "# machine:")
  assert "parameters: ours" in line_starting(lines, "# model (tiny)")
  check = line_starting(lines, "# check:")
  assert "batch 1 ok" in check and "batch 2 ok" in check and check.endswith("-> ok")
  header = line_starting(lines, "impl")
  assert header.split() == ["impl", "batch", "ttft_ms", "total_ms", "decode_tok/s",
                            "x_tf_decode", "x_tf_ttft", "compile_s"]
  for impl in ("ours", "transformers"):
    found = [line.split() for line in lines if line.split()[:1] == [impl]]
    assert [row[1] for row in found] == ["1", "2"], found
    for row in found:
      # timings at this size are noise (total - ttft may even be negative): finite, no more
      values = [float(x) for x in row[2:7]]
      assert all(math.isfinite(v) for v in values) and values[0] > 0 and values[1] > 0, row
      if impl == "transformers":
        assert values[3:] == [1.0, 1.0] and row[7] == "-"
      else:
        assert math.isfinite(float(row[7]))
  for batch in (1, 2):
    ratios = line_starting(lines, f"ratios batch {batch}:")
    assert "ours/transformers decode tok/s" in ratios and "ttft ours/transformers" in ratios
    values = [float(part.split()[0]) for part in ratios.split(" = ")[1:]]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert ratios.endswith(("target decode >= 2x: met", "target decode >= 2x: not met"))
