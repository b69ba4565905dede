"""The MMA ablation CLI, shortened (two modes, two seeds, two steps): every mode x seed trains and
is evaluated, the table is the mean ± std of the per-run results, and the PNG is written."""
import json
import statistics
import subprocess
import sys

from PIL import Image

from test_train import ROOT, TINY


def test_ablation_writes_table_and_chart(easy_vqa_dir, tmp_path):
  out = tmp_path / "ablation"
  command = [sys.executable, "-m", "mma_jax.ablation", "configs/demo.yaml", "--seeds", "2",
             "--modes", "causal", "mma", "--output", str(out), *TINY, "train.steps=2", f"data.data_dir={easy_vqa_dir}",
             "eval.limit=32", "eval.batch_size=32"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert list(results) == ["causal", "mma"]
  assert all([r["seed"] for r in runs] == [0, 1] for runs in results.values())
  table = (out / "ablation.md").read_text()
  for mode, runs in results.items():
    overall = [r["overall"] for r in runs]
    row = next(line for line in table.splitlines() if line.startswith(f"| {mode} |"))
    assert f"{statistics.fmean(overall):.4f} ± {statistics.stdev(overall):.4f}" in row
  with Image.open(out / "ablation.png") as png:
    assert png.format == "PNG" and png.size[0] > 100
  # Same seed, same data order: both modes trained on the same number of examples.
  counts = [[json.loads(line).get("data/examples") for line in
             (out / mode / "seed0" / "metrics.jsonl").read_text().splitlines()] for mode in results]
  assert counts[0] == counts[1] and counts[0][-1] > 0


def test_ablation_rejects_an_unknown_mode(tmp_path):
  result = subprocess.run([sys.executable, "-m", "mma_jax.ablation", "configs/demo.yaml",
                           "--modes", "bidirectional", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "--modes must be among" in result.stderr
