"""The first line every bench table starts with: `# <UTC date>   python bench/<script> <args>`, so
a figure copied into RESULTS.md keeps its date and the command that reproduces it."""
from __future__ import annotations

import datetime
import shlex
import sys


def run_header(script: str, argv: list[str] | None = None) -> str:
  """The header line for `python bench/<script>` run with `argv` (default: sys.argv[1:])."""
  args = sys.argv[1:] if argv is None else argv
  command = "python " + " ".join(shlex.quote(a) for a in [f"bench/{script}", *args])
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
  return f"# {date}   {command}"
