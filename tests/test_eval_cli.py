"""eval.py end to end on a tiny demo run: the easy_vqa lines equal the ones training printed;
VLMEvalKit TSV files made from easy_vqa images give the report files with their skip counts;
user errors exit 2 with one line. Plus the runner's batching, skipping and log-likelihood mode
with a stand-in generator (no model)."""
import base64
import csv
import dataclasses
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from test_train import ROOT, demo_command

sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402  (the top-level CLI module)

SHAPES = {"circle": "A", "rectangle": "B", "triangle": "C"}


@pytest.fixture(scope="module")
def demo_run(easy_vqa_dir, tmp_path_factory):
  """A tiny demo run trained for 40 steps (enough to answer some yes/no questions right, so the
  accuracies compared are not all zero), and the lines train.py printed at its end."""
  run_dir = tmp_path_factory.mktemp("eval") / "demo"
  result = subprocess.run(demo_command(easy_vqa_dir, run_dir, "train.steps=40",
                                       "train.learning_rate=3e-3", "train.min_learning_rate=3e-4",
                                       "train.log_every=20", "eval.limit=64",
                                       "eval.batch_size=32"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return run_dir, result.stdout.strip().splitlines()


def run_eval(*args):
  return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_easy_vqa_prints_what_training_printed(demo_run, tmp_path):
  run_dir, trained = demo_run
  assert trained[-1].startswith("accuracy=") and float(trained[-1].split()[0][9:]) > 0
  result = run_eval("--checkpoint", run_dir, "--benchmark", "easy_vqa", "--limit", 64,
                    "--output", tmp_path / "out")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines() == trained
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["n_scored"] == 64 and report["checkpoint"]["step"] == 40
  predictions = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
  accuracy = np.mean([json.loads(p)["correct"] for p in predictions])
  assert f"accuracy={accuracy:.4f}" == trained[-1].split()[0]


def test_a_converted_checkpoint_loads_the_run_weights(demo_run, tmp_path):
  from flax import nnx

  from mma_jax.convert.store import save_model
  from mma_jax.convert.transfer import flatten
  from mma_jax.evaluate.loading import load_for_eval
  from mma_jax.models import build_model

  def weights(loaded):
    _, state = nnx.split(loaded.model, nnx.Param)
    return {k: np.asarray(v) for k, v in flatten(state.to_pure_dict()).items()}

  run = load_for_eval(demo_run[0])
  assert (run.kind, run.step) == ("run", 40)
  fresh = build_model(run.config, nnx.Rngs(run.config.train.seed))   # what step 0 held
  _, fresh = nnx.split(fresh, nnx.Param)
  fresh = flatten(fresh.to_pure_dict())
  assert any(not np.array_equal(np.asarray(fresh[k]), v) for k, v in weights(run).items())
  save_model(tmp_path / "ckpt", weights(run), run.config)
  converted = load_for_eval(tmp_path / "ckpt", ["eval.batch_size=8"])
  assert converted.kind == "converted" and converted.step is None
  assert converted.config.eval.batch_size == 8
  expected, got = weights(run), weights(converted)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# --------------------------------------------------------------------------------- TSV fixtures
def png_b64(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def records(easy_vqa_dir, kind: str, count: int) -> list[dict]:
  import tensorflow_datasets as tfds

  import mma_jax.data  # noqa: F401
  source = tfds.data_source("easy_vqa", split="test", data_dir=str(easy_vqa_dir))
  out = []
  for i in range(len(source)):
    record = source[i]
    if record["question_type"].decode() == kind:
      out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in record.items()})
      if len(out) == count:
        return out


def write_tsv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerows([header, *rows])
  return path


def multiple_choice_tsv(easy_vqa_dir, path):
  """3 good shape questions (the third reuses the first image by index), an undecodable image
  and an answer that is not an option."""
  header = ["index", "question", "A", "B", "C", "answer", "category", "image"]
  options = list(SHAPES)
  rows = []
  for i, r in enumerate(records(easy_vqa_dir, "shape", 3)):
    rows.append([100 + i, r["question"], *options, SHAPES[r["answer"]], "shape",
                 png_b64(r["image"]) if i < 2 else "100"])
  rows[2][5] = rows[0][5]                        # the reused image has the first row's answer
  rows.append([103, "what shape?", *options, "A", "shape", base64.b64encode(b"x" * 90).decode()])
  rows.append([104, "what shape?", *options, "D", "shape", "100"])
  return write_tsv(path, header, rows)


def yes_no_tsv(easy_vqa_dir, path):
  """3 yes/no questions (POPE-style) and a row cut short."""
  header = ["index", "question", "answer", "category", "image"]
  rows = [[i + 1, r["question"], r["answer"], "random", png_b64(r["image"])]
          for i, r in enumerate(records(easy_vqa_dir, "yes_no", 3))]
  rows.append([4, "is there a shape?"])
  return write_tsv(path, header, rows)


PREDICTION_KEYS = {"index", "question", "generation", "extracted", "answer", "correct"}


def test_tsv_benchmarks_write_reports_with_skip_counts(demo_run, easy_vqa_dir, tmp_path):
  run_dir, _ = demo_run
  mc = multiple_choice_tsv(easy_vqa_dir, tmp_path / "shapes_mc.tsv")
  result = run_eval("--checkpoint", run_dir, "--benchmark", mc, "--output", tmp_path / "mc",
                    "--batch-size", 8, "--max-new-tokens", 4)
  assert result.returncode == 0, result.stderr[-3000:]
  for index in (103, 104):
    assert f"shapes_mc.tsv: skipping row index {index}" in result.stderr
  report = json.loads((tmp_path / "mc" / "report.json").read_text())
  assert report["benchmark"] == "shapes_mc" and report["task"] == "multiple_choice"
  assert (report["n_scored"], report["n_skipped"]) == (3, 2)
  assert [(s["index"], s["reason"]) for s in report["skipped"]] == [
      ("103", "undecodable_image"), ("104", "answer_not_in_options")]
  assert report["checkpoint"] == {"path": str(run_dir), "kind": "run", "step": 40}
  assert report["settings"]["batch_size"] == 8 and report["settings"]["max_new_tokens"] == 4
  assert report["settings"]["limit"] == 0       # the run's eval.limit=64 is for easy_vqa only
  overall = report["metrics"]["overall"]
  assert set(overall) == {"accuracy", "n", "judge_needed"} and overall["n"] == 3
  assert set(report["metrics"]["extras"]) == {"unparsed", "refused"}
  assert report["metrics"]["category"]["shape"]["n"] == 3
  predictions = [json.loads(line) for line in
                 (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
  assert [p["index"] for p in predictions] == ["100", "101", "102"]
  for p in predictions:
    assert PREDICTION_KEYS <= set(p) and isinstance(p["generation"], str)
    assert p["correct"] == (p["extracted"] == p["answer"])
  assert overall["accuracy"] == pytest.approx(np.mean([p["correct"] for p in predictions]))
  markdown = (tmp_path / "mc" / "report.md").read_text()
  assert "## Overall" in markdown and "## Skipped rows" in markdown
  assert "| 104 | 5 | answer_not_in_options |" in markdown
  last = result.stdout.strip().splitlines()[-1]
  assert last == (f"accuracy={overall['accuracy']:.4f} judge_needed={overall['judge_needed']} "
                  "n_scored=3 n_skipped=2")

  yes_no = yes_no_tsv(easy_vqa_dir, tmp_path / "POPE_tiny.tsv")
  result = run_eval("--checkpoint", run_dir, "--benchmark", yes_no, "--output",
                    tmp_path / "yn", "--max-new-tokens", 4)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "yn" / "report.json").read_text())
  assert report["task"] == "yes_no" and report["scoring"] == "pope"
  assert (report["n_scored"], report["n_skipped"]) == (3, 1)
  assert report["skipped"][0]["index"] == "4" and report["skipped"][0]["reason"] == (
      "missing_column")
  assert set(report["metrics"]["overall"]) == {"accuracy", "precision", "recall", "f1", "n",
                                               "judge_needed"}
  assert set(report["metrics"]["extras"]) == {"unparsed", "yes_ratio"}
  assert set(report["metrics"]["category"]) == {"random"}
  lines = (tmp_path / "yn" / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 3 and all(json.loads(l)["answer"] in ("yes", "no") for l in lines)
  assert result.stdout.strip().splitlines()[-1].startswith("f1=")


# ----------------------------------------------------------------------------------- user errors
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, easy_vqa_dir):
  bad = tmp_path / "binary.tsv"
  bad.write_bytes(b"\xff\xfe\x00 not text")
  ckpt = tmp_path / "nowhere"
  cases = [
      (["--checkpoint", ckpt, "--benchmark", "easy_vqa"], f"checkpoint '{ckpt}' does not exist"),
      (["--checkpoint", tmp_path, "--benchmark", "easy_vqa"], "is neither a training run"),
      (["--checkpoint", ckpt, "--benchmark", "NoSuchBench", "--data-dir", tmp_path],
       "unknown benchmark 'NoSuchBench'"),
      (["--checkpoint", ckpt, "--benchmark", bad], "cannot be read"),
      (["--checkpoint", ckpt, "--benchmark", tmp_path / "missing.tsv"], "does not exist"),
  ]
  for args, message in cases:
    assert eval_cli.main(list(map(str, args))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ----------------------------------------------------------------- the runner, generator stubbed
@dataclasses.dataclass
class FakeGeneration:
  text: str
  token_ids: list
  prompt_length: int
  finish_reason: str


class FakeGenerator:
  """Answers "(B)" / "yes"; option log-probabilities prefer the last option, but the first is 6
  tokens long (so per token it is the best). Records the batch sizes and the options scored."""

  def __init__(self):
    self.sizes, self.options = [], []

  def generate(self, conversations, images, sampling):
    self.sizes.append(len(conversations))
    assert all(im.dtype == np.uint8 and im.shape == (16, 16, 3) for ims in images for im in ims)
    text = "The answer is (B) red" if "Options:" in conversations[0].turns[0][1] else "Yes."
    return [FakeGeneration(text, [1], 10, "stop") for _ in conversations]

  def option_logprobs(self, conversations, images, options):
    self.sizes.append(len(conversations))
    self.options.append(options[0])
    return [[(-float(len(opts) - k), 6 if k == 0 else 1) for k in range(len(opts))]
            for opts in options]


def tiny_loaded(easy_vqa_dir, *overrides):
  from mma_jax.config import load_config
  from mma_jax.evaluate.loading import LoadedModel
  from mma_jax.sharding import make_mesh
  from test_train import TINY

  config = load_config(ROOT / "configs/demo.yaml", TINY + [f"data.data_dir={easy_vqa_dir}",
                                                           *overrides])
  return LoadedModel(config, make_mesh(config.mesh), None, None, None, "run", ROOT, 1)


def test_runner_batches_skips_and_ranks_options(easy_vqa_dir, tmp_path):
  from mma_jax.evaluate.runner import EvalError, TsvRun
  from mma_jax.evaluate.tsv import read_tsv

  bench = read_tsv(multiple_choice_tsv(easy_vqa_dir, tmp_path / "mc.tsv"))
  # 8 devices on the batch axes: 3 rows per batch round up to 8, padded with copies.
  loaded = tiny_loaded(easy_vqa_dir, "eval.batch_size=3", "eval.max_new_tokens=4")
  fake = FakeGenerator()
  report, predictions = TsvRun(loaded, bench, "generate", generator=fake).run(progress=False)
  assert fake.sizes == [8]
  assert [p["extracted"] for p in predictions] == ["B", "B", "B"]
  expected = np.mean([p["answer"] == "B" for p in predictions])
  assert report["metrics"]["overall"]["accuracy"] == pytest.approx(expected)
  assert (report["n_scored"], report["n_skipped"]) == (3, 2)

  report, predictions = TsvRun(loaded, bench, "loglik", generator=fake).run(progress=False)
  assert [p["extracted"] for p in predictions] == ["C", "C", "C"]
  assert predictions[0]["option_logprobs"] == {"A": -3.0, "B": -2.0, "C": -1.0}
  assert fake.options[-1] == list(SHAPES)           # the options' texts are scored by default
  report, predictions = TsvRun(loaded, bench, "loglik", generator=fake,
                               length_normalized=True).run(progress=False)
  assert [p["extracted"] for p in predictions] == ["A", "A", "A"]       # -3/6 > -1/1
  assert report["settings"]["length_normalized"] is True
  TsvRun(loaded, bench, "loglik", generator=fake, loglik_choices="letter").run(progress=False)
  assert fake.options[-1] == ["A", "B", "C"]

  # --limit counts file rows (skipped ones too); a prompt longer than the model's positions is
  # skipped as too_long.
  limited = tiny_loaded(easy_vqa_dir, "eval.limit=4", "eval.max_new_tokens=250")
  report, predictions = TsvRun(limited, bench, "generate", generator=fake).run(progress=False)
  assert report["n_scored"] == 0 and [s["reason"] for s in report["skipped"]] == [
      "too_long", "too_long", "too_long", "undecodable_image"]

  yes_no = read_tsv(yes_no_tsv(easy_vqa_dir, tmp_path / "MME_tiny.tsv"))
  with pytest.raises(EvalError, match="not multiple choice"):
    TsvRun(loaded, yes_no, "loglik", generator=fake)
  report, predictions = TsvRun(loaded, yes_no, "generate", generator=fake).run(progress=False)
  assert report["scoring"] == "mme" and {p["extracted"] for p in predictions} == {"yes"}


# ------------------------------------------------------------------ resume, easy_vqa as MCQ
def easy_vqa_mcq(easy_vqa_dir, path, limit):
  import tensorflow_datasets as tfds

  from mma_jax.evaluate.easy_vqa_mcq import answer_vocabulary, write_mcq_tsv
  source = lambda split: tfds.data_source("easy_vqa", split=split, data_dir=str(easy_vqa_dir))
  return write_mcq_tsv(source("test"), path, answers=answer_vocabulary(source("train")),
                       limit=limit, progress=False)


def line_count(path) -> int:
  try:
    return len(path.read_text().splitlines())
  except FileNotFoundError:
    return 0


def test_a_killed_eval_resumes_to_the_same_report(demo_run, easy_vqa_dir, tmp_path):
  from mma_jax.evaluate.tsv import read_tsv

  run_dir, _ = demo_run
  tsv = easy_vqa_mcq(easy_vqa_dir, tmp_path / "easy_vqa_mcq.tsv", limit=24)
  bench = read_tsv(tsv)
  assert bench.task == "multiple_choice" and len(bench.questions) == 24
  sizes = {"yes_no": 2, "shape": 3, "color": 4}        # options from the question's own type
  assert all(len(q.options) == sizes[q.category] for q in bench.questions)
  args = ["--checkpoint", run_dir, "--benchmark", tsv, "--batch-size", 1, "--max-new-tokens", 6,
          "--no-progress"]
  whole = run_eval(*args, "--output", tmp_path / "whole")
  assert whole.returncode == 0, whole.stderr[-3000:]

  out = tmp_path / "killed"
  process = subprocess.Popen([sys.executable, "eval.py", *map(str, args), "--output", str(out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while line_count(out / "predictions.jsonl") < 2 and process.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.005)
  process.kill()
  process.wait()
  done = line_count(out / "predictions.jsonl")
  assert 2 <= done < 24, done                  # killed part way through
  resumed = run_eval(*args, "--output", out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"{done} predictions already in" in resumed.stderr
  for name in ("report.json", "predictions.jsonl", "report.md"):
    assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
  assert resumed.stdout == whole.stdout

  # Another evaluation into the same directory is refused, not mixed in.
  refused = run_eval(*args, "--output", out, "--mode", "loglik")
  assert refused.returncode == 2 and "holds predictions of another evaluation" in refused.stderr
  loglik = run_eval(*args, "--output", tmp_path / "loglik", "--mode", "loglik")
  assert loglik.returncode == 0, loglik.stderr[-3000:]
  report = json.loads((tmp_path / "loglik" / "report.json").read_text())
  assert report["settings"]["loglik_choices"] == "text" and report["metrics"]["extras"] == {
      "unparsed": 0, "refused": 0}
  assert loglik.stdout.strip().splitlines()[-1].startswith("accuracy=")
