"""What an evaluation leaves in --output DIR, and the lines it prints.

    report.json        benchmark, task, checkpoint, settings, n_scored, n_skipped, skipped rows
                       (index, row, reason, message) and their counts by reason, metrics
                       {"overall": {...}, <grouping>: {group: {...}}, "extras": {...}},
                       headline (VLMEvalKit's figures; "extras" are ours)
    report.md          the same as markdown tables
    predictions.jsonl  one object per scored question (index, question, generation, extracted,
                       answer, correct, ...)
"""
from __future__ import annotations

import collections
import json
import pathlib
from typing import Iterable, Mapping, Sequence

# The metrics a scoring kind's headline shows, in order: VLMEvalKit's own figures for that kind
# (evaluate/scoring.py), fractions where it prints percent. The rest stay in the report.
HEADLINE = {
    "multiple_choice": ("accuracy",),
    "circular": ("accuracy", "vanilla_accuracy"),
    "yes_no": ("accuracy",),
    "pope": ("f1", "accuracy", "precision", "recall"),
    "mme": ("perception", "cognition"),
    "hallusionbench": ("accuracy", "figure_accuracy", "question_accuracy"),
    "vqa_score": ("accuracy",),
    "exact_match": ("accuracy",),
    "relaxed_accuracy": ("accuracy",),
    "anls": ("accuracy",),
    "easy_vqa": ("accuracy", "majority", "text_only"),
}


def build_report(*, benchmark: str, source: str, task: str, scoring: str, metrics: dict,
                 n_scored: int, skipped: Sequence[Mapping], checkpoint: dict,
                 settings: dict) -> dict:
  overall = metrics.get("overall", {})
  headline = {k: overall[k] for k in HEADLINE.get(scoring, ("accuracy",)) if k in overall}
  return {
      "benchmark": benchmark,
      "source": source,
      "task": task,
      "scoring": scoring,
      "checkpoint": checkpoint,
      "settings": settings,
      "n_scored": n_scored,
      "n_skipped": len(skipped),
      "skipped_by_reason": dict(sorted(collections.Counter(s["reason"] for s in skipped).items())),
      "skipped": list(skipped),
      "headline": headline,
      "metrics": metrics,
  }


def write_outputs(directory: str | pathlib.Path, report: dict,
                  predictions: Iterable[Mapping]) -> pathlib.Path:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  (directory / "report.md").write_text(markdown(report))
  with open(directory / "predictions.jsonl", "w") as f:
    for row in predictions:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return directory


def _value(v) -> str:
  if isinstance(v, float):
    return f"{v:.4f}"
  if v is None:
    return ""
  if isinstance(v, dict):
    return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
  return str(v)


def _cell(v) -> str:
  return _value(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return lines + [""]


def markdown(report: dict) -> str:
  ckpt = report["checkpoint"]
  step = f", step {ckpt['step']}" if ckpt.get("step") is not None else ""
  source = (f"Predictions `{ckpt['predictions']}`" if "predictions" in ckpt else
            f"Checkpoint `{ckpt.get('path')}` ({ckpt.get('kind')}{step})")
  lines = [f"# {report['benchmark']}", "",
           f"{source}; task {report['task']}, scoring {report['scoring']}; "
           f"{report['n_scored']} scored, {report['n_skipped']} skipped.", "", "## Overall", ""]
  metrics = report["metrics"]
  lines += _table(("metric", "value"), metrics.get("overall", {}).items())
  if metrics.get("extras"):
    lines += ["## Extras (ours, not VLMEvalKit's)", ""]
    lines += _table(("metric", "value"), metrics["extras"].items())
  for grouping, groups in metrics.items():
    if grouping in ("overall", "extras") or not groups or not _flat_groups(groups):
      continue        # nested evaluations (MMBench's vanilla ones) stay in report.json
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    lines += [f"## By {grouping}", ""]
    lines += _table((grouping, *names), ([group, *(values.get(n) for n in names)]
                                         for group, values in groups.items()))
  if report["skipped"]:
    lines += ["## Skipped rows", ""]
    lines += _table(("index", "row", "reason", "message"),
                    ([s.get("index"), s.get("row"), s["reason"], s.get("message")]
                     for s in report["skipped"]))
  lines += ["## Settings", ""]
  lines += _table(("setting", "value"), report["settings"].items())
  return "\n".join(lines).rstrip("\n") + "\n"


def _flat_groups(groups: dict) -> bool:
  return all(isinstance(values, dict) and not any(isinstance(v, dict) for v in values.values())
             for values in groups.values())


def summary_lines(report: dict, grouping: str = "category") -> list[str]:
  """Per group `name: metric=value ...`, then the headline line with the row counts."""
  keys = HEADLINE.get(report["scoring"], ("accuracy",))
  lines = []
  for name, values in report["metrics"].get(grouping, {}).items():
    shown = [k for k in (*keys, "accuracy_plus", "score") if k in values]
    shown = list(dict.fromkeys(shown))
    lines.append(f"{name}: " + " ".join(f"{k}={_value(values[k])}" for k in shown))
  head = " ".join(f"{k}={_value(v)}" for k, v in report["headline"].items())
  judge = report["metrics"].get("overall", {}).get("judge_needed")
  judge = f" judge_needed={judge}" if judge is not None else ""
  lines.append(f"{head}{judge} n_scored={report['n_scored']} "
               f"n_skipped={report['n_skipped']}".strip())
  return lines
