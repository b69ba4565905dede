"""Two processes on 127.0.0.1 (two fake CPU devices each, jax.distributed over gloo) run the same
training step as one process with four devices, each loading only its half of the batch."""
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240
# Every run compiles the same way; XLA's CPU backend at optimisation level 0 compiles ~2.5x
# faster, which keeps three concurrent compilations of the train step inside the test's budget.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], devices: int) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _metrics(output: str) -> dict[str, float]:
  lines = [line for line in output.splitlines() if line.startswith("metrics ")]
  assert len(lines) == 1, output[-3000:]
  return {k: float(v) for k, v in (item.split("=") for item in lines[0].split()[1:])}


def test_two_processes_match_one_process_with_four_devices():
  port = _free_port()
  procs = [_start([str(port), "0"], 2), _start([str(port), "1"], 2), _start(["single"], 4)]
  deadline = time.monotonic() + TIMEOUT_S
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
      outputs.append(out)
      assert proc.returncode == 0, out[-3000:]
  finally:
    for proc in procs:  # on a timeout or a failure, never leave a worker waiting for its peer
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  first, second, single = map(_metrics, outputs)
  assert first == second  # both processes read the same replicated loss and gradient norm
  assert set(single) == {"loss", "grad_norm"} and single["grad_norm"] > 0
  for name, want in single.items():
    assert abs(first[name] - want) <= 1e-5 * max(1.0, abs(want)), (first, single)
