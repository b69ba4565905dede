"""`python -m mma_jax.evaluate.score` on VLMEvalKit-written prediction files gives the tables
VLMEvalKit's own evaluate() computed for them (tests/fixtures/vlmevalkit/benchmarks/, made by
make_benchmarks.py there with VLMEvalKit e8e78f05): every cell within 1e-6, plus the count of
rows VLMEvalKit found no answer in without its judge (judge_needed).

VLMEvalKit prints yes/no and VQA figures in percent, MMBench's as fractions; MME's "reasoning"
is our cognition; POPE's "Overall" column is F1; HallusionBench's aAcc/fAcc/qAcc are our
accuracy / figure_accuracy / question_accuracy.
"""
import json
import pathlib
import subprocess
import sys

import pytest

from mma_jax.evaluate import score

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = ROOT / "tests/fixtures/vlmevalkit/benchmarks"
BENCHMARKS = ("MME", "POPE", "HallusionBench", "MMBench_DEV_EN", "TextVQA_VAL",
              "GQA_TestDev_Balanced", "ChartQA_TEST", "DocVQA_VAL")


def vlmeval(name: str) -> dict:
  return json.loads((FIXTURES / f"{name}_vlmeval.json").read_text())


def cells(table: dict) -> dict:
  """{(row label, column): value} of a table VLMEvalKit returned; one-row tables without a
  label column are labelled "-"."""
  columns, out = table["columns"], {}
  for row in table["data"]:
    if columns[0] == "split":
      out |= {(row[0], c): v for c, v in zip(columns[1:], row[1:])}
    else:
      out |= {("-", c): v for c, v in zip(columns, row)}
  return out


PERCENT = 100.0


def our_cells(name: str, metrics: dict) -> dict:
  """Our report's metrics laid out as VLMEvalKit's table for that benchmark."""
  overall = metrics["overall"]
  if name == "MME":
    out = {("-", "perception"): overall["perception"], ("-", "reasoning"): overall["cognition"]}
    return out | {("-", c): v["score"] for c, v in metrics["category"].items()}
  if name == "POPE":
    names = {"Overall": "f1", "acc": "accuracy", "precision": "precision", "recall": "recall"}
    groups = {"Overall": overall} | metrics["category"]
    return {(g, column): PERCENT * values[ours] for g, values in groups.items()
            for column, ours in names.items()}
  if name == "HallusionBench":
    names = {"aAcc": "accuracy", "fAcc": "figure_accuracy", "qAcc": "question_accuracy"}
    groups = {"Overall": overall} | metrics["category"] | metrics["l2_category"]
    return {(g, column): PERCENT * values[ours] for g, values in groups.items()
            for column, ours in names.items()}
  if name == "MMBench_DEV_EN":
    return {(split, c): v for split, row in metrics["table"].items() for c, v in row.items()}
  groups = metrics.get("split", metrics.get("category", {}))
  return {("-", "Overall"): PERCENT * overall["accuracy"]} | {
      ("-", g): PERCENT * values["accuracy"] for g, values in groups.items()}


def assert_same_cells(ours: dict, theirs: dict):
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key] == pytest.approx(value, abs=1e-6, rel=0), key


def their_judge_needed(name: str, reference: dict) -> int:
  if name == "MMBench_DEV_EN":
    return sum("no GPT-based answer matching" in r["log"] for r in reference["rows"])
  return sum(r.get("extracted") == "Unknown" for r in reference["rows"])


@pytest.mark.parametrize("name", BENCHMARKS)
def test_score_equals_vlmevalkit_evaluate(name, tmp_path, capsys):
  assert score.main(["--benchmark", str(FIXTURES / f"{name}.tsv"), "--predictions",
                     str(FIXTURES / f"{name}_pred.xlsx"), "--output", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "report.json").read_text())
  reference = vlmeval(name)
  assert report["n_skipped"] == 0 and report["n_scored"] == len(
      [r for r in reference["rows"]] if name != "MMBench_DEV_EN" else reference["vanilla"]["rows"])
  assert_same_cells(our_cells(name, report["metrics"]), cells(reference["result"]))
  if report["task"] != "vqa":
    assert report["metrics"]["overall"]["judge_needed"] == their_judge_needed(name, reference)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.endswith(f"n_scored={report['n_scored']} n_skipped=0")


def test_mmbench_vanilla_figures_beside_the_circular_one(tmp_path):
  report, _ = score.score_file(FIXTURES / "MMBench_DEV_EN.tsv",
                               FIXTURES / "MMBench_DEV_EN_pred.xlsx")
  metrics, theirs = report["metrics"], cells(vlmeval("MMBench_DEV_EN")["vanilla"]["acc_all"])
  ours = {(f"circular_{s}", c): v for s, row in metrics["table"].items() for c, v in row.items()}
  for kind in ("vanilla_0", "vanilla_all"):
    table = metrics["vanilla" if kind == "vanilla_all" else kind]["table"]
    ours |= {(f"{kind}_{s}", c): v for s, row in table.items() for c, v in row.items()}
  assert_same_cells(ours, theirs)
  assert report["headline"] == {"accuracy": metrics["overall"]["accuracy"],
                                "vanilla_accuracy": theirs[("vanilla_all_dev", "Overall")]}


def test_the_module_runs_from_the_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mma_jax.evaluate.score", "--benchmark", FIXTURES / "POPE.tsv",
       "--predictions", FIXTURES / "POPE_pred.xlsx"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  overall = cells(vlmeval("POPE")["result"])
  assert result.stdout.strip().splitlines()[-1] == (
      f"f1={overall[('Overall', 'Overall')] / 100:.4f} "
      f"accuracy={overall[('Overall', 'acc')] / 100:.4f} "
      f"precision={overall[('Overall', 'precision')] / 100:.4f} "
      f"recall={overall[('Overall', 'recall')] / 100:.4f} "
      f"judge_needed={their_judge_needed('POPE', vlmeval('POPE'))} n_scored=40 n_skipped=0")
