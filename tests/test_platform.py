"""mma_jax/platform.py and initialize_distributed: which platforms JAX starts and whether
jax.distributed auto-detects, decided from device files and the environment (never the network).
Device files are looked up under a temporary directory standing in for /."""
import importlib.machinery
import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import pytest

from mma_jax import platform
from mma_jax.sharding import initialize_distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_VARS = ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS",
                *platform._SLURM_VARS)
TPU_WARNINGS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "InitGoogle", "libtpu")


@pytest.fixture
def host(tmp_path, monkeypatch):
  """A host without TPUs, GPUs or cluster variables; returns its root (add device files there)."""
  monkeypatch.setattr(platform, "_ROOT", str(tmp_path))
  for name in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", *CLUSTER_VARS):
    monkeypatch.delenv(name, raising=False)
  return tmp_path


def touch(root, path, text=""):
  file = root / path
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_text(text)


@pytest.fixture
def calls(monkeypatch):
  """jax.distributed.initialize recorded instead of run."""
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: made.append((a, k)))
  return made


@pytest.fixture
def fake_jax(monkeypatch):
  """select_platforms sees a jax imported before it, with no platforms configured and no backend
  started; returns the jax.config.update calls."""
  updates = []
  config = types.SimpleNamespace(jax_platforms=None,
                                 update=lambda name, value: updates.append((name, value)))
  monkeypatch.setattr(platform, "_jax_module", lambda: types.SimpleNamespace(config=config))
  monkeypatch.setattr(platform, "_backends_started", lambda: False)
  monkeypatch.setattr(platform, "_installed_modules", lambda: set())
  return updates


# ------------------------------------------------------------------------------ device files
def test_tpu_device_files(host):
  assert platform.tpu_device_files() == [] and not platform.on_tpu_host()
  touch(host, "dev/accel/accel0")  # the Linux accel subsystem (e.g. an NPU), not a TPU VM's
  touch(host, "dev/vfio/vfio")     # the VFIO container, not a device
  assert not platform.on_tpu_host()
  touch(host, "dev/accel0")
  touch(host, "dev/accel1")
  assert platform.tpu_device_files() == [str(host / "dev/accel0"), str(host / "dev/accel1")]


def test_vfio_groups_count_when_they_hold_a_google_device(host):
  touch(host, "dev/vfio/12")
  touch(host, "sys/kernel/iommu_groups/12/devices/0000:00:05.0/vendor", "0x10de\n")  # NVIDIA
  assert not platform.on_tpu_host()
  touch(host, "dev/vfio/3")
  touch(host, "sys/kernel/iommu_groups/3/devices/0000:00:04.0/vendor", "0x1ae0\n")  # Google
  assert platform.tpu_device_files() == [str(host / "dev/vfio/3")]
  touch(host, "dev/vfio/0")  # sysfs does not say: the device file decides
  assert platform.tpu_device_files() == [str(host / "dev/vfio/0"), str(host / "dev/vfio/3")]


# -------------------------------------------------------------------------- select_platforms
def test_select_platforms_picks_cpu_without_tpus(host, fake_jax, monkeypatch):
  assert platform.select_platforms() == "cpu"
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  assert fake_jax == [("jax_platforms", "cpu")]


def test_select_platforms_keeps_a_gpu(host, fake_jax, monkeypatch):
  monkeypatch.setattr(platform, "_installed_modules", lambda: {"jax_cuda12_plugin", "numpy"})
  assert platform.select_platforms() == "cpu"  # the plugin but no GPU
  monkeypatch.delenv("JAX_PLATFORMS")
  touch(host, "dev/nvidia0")
  assert platform.select_platforms() == "cuda,cpu"


@pytest.mark.parametrize("name,value", [("JAX_PLATFORMS", "tpu"), ("JAX_PLATFORMS", ""),
                                        ("JAX_FORCE_TPU_INIT", "1")])
def test_select_platforms_leaves_the_users_choice(host, fake_jax, monkeypatch, name, value):
  monkeypatch.setenv(name, value)
  assert platform.select_platforms() is None
  assert os.environ[name] == value and fake_jax == []
  if name != "JAX_PLATFORMS":
    assert "JAX_PLATFORMS" not in os.environ


def test_select_platforms_leaves_jax_config_and_started_backends(host, fake_jax, monkeypatch):
  monkeypatch.setattr(platform, "_jax_module", lambda: types.SimpleNamespace(
      config=types.SimpleNamespace(jax_platforms="cpu")))  # jax.config.update'd by the user
  assert platform.select_platforms() is None
  monkeypatch.setattr(platform, "_jax_module", lambda: None)
  monkeypatch.setattr(platform, "_backends_started", lambda: True)
  assert platform.select_platforms() is None and "JAX_PLATFORMS" not in os.environ


def test_select_platforms_leaves_tpu_enabled_on_a_tpu_host(host, fake_jax):
  touch(host, "dev/accel0")
  assert platform.select_platforms() is None
  assert "JAX_PLATFORMS" not in os.environ and fake_jax == []


# -------------------------------------------------------------------- initialize_distributed
def test_no_tpu_no_cluster_is_one_process_at_once(host, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize called off a TPU host without a cluster")

  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  start = time.perf_counter()
  initialize_distributed()
  assert time.perf_counter() - start < 1.0


def test_tpu_host_auto_detects(host, calls):
  touch(host, "dev/accel0")
  initialize_distributed()
  assert calls == [((), {})]


def test_tpu_host_without_a_pod_is_one_process(host, monkeypatch):
  touch(host, "dev/vfio/0")

  def no_cluster(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  initialize_distributed()


@pytest.mark.parametrize("env", [
    {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"},
    {name: "0" for name in platform._SLURM_VARS}])
def test_cluster_environment_auto_detects(host, calls, monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  initialize_distributed()
  assert calls == [((), {})]


def test_partial_slurm_or_kubernetes_without_its_package_is_one_process(host, calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")  # an allocation, not a launched step
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
  monkeypatch.setitem(sys.modules, "kubernetes", None)  # not installed: jax skips Kubernetes too
  initialize_distributed()
  assert calls == []
  kubernetes = types.ModuleType("kubernetes")
  kubernetes.__spec__ = importlib.machinery.ModuleSpec("kubernetes", None)
  monkeypatch.setitem(sys.modules, "kubernetes", kubernetes)
  initialize_distributed()
  assert calls == [((), {})]


def test_explicit_coordinator_is_passed_on(host, calls):
  initialize_distributed("127.0.0.1:1234", 2, 1)
  assert calls == [((), {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                         "process_id": 1})]


# ---------------------------------------------------------------------- quiet_deviceless_tpu
@pytest.mark.parametrize("topology,expected", [("v5e:2x2", "v5litepod-4"), ("v4:2x2x1", "v4-8"),
                                               ("v5p:2x2x1", "v5p-8"), ("v6e:16x16", "v6e-256"),
                                               ("odd", "v4-8"), (None, "v4-8")])
def test_accelerator_type(topology, expected):
  assert platform.accelerator_type(topology) == expected


def test_quiet_deviceless_tpu_sets_only_what_is_unset(host, monkeypatch):
  names = ("TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
           "ALLOW_MULTIPLE_LIBTPU_LOAD")
  for name in names:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  assert platform.quiet_deviceless_tpu("v6e:2x2") == {
      "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v6e-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  assert os.environ["TPU_WORKER_HOSTNAMES"] == "a,b"
  for name in names:
    monkeypatch.delenv(name, raising=False)
  touch(host, "dev/accel0")
  assert platform.quiet_deviceless_tpu("v4:2x2x1") == {}
  assert not any(name in os.environ for name in names)


# ------------------------------------------------------------------------------- subprocesses
def _clean_env():
  """The environment of a user who set nothing: no JAX_PLATFORMS, no TPU_* (conftest sets both)."""
  return {k: v for k, v in os.environ.items()
          if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD") and not k.startswith("TPU_")}


PROBE = ("jax.devices(); maps = pathlib.Path('/proc/self/maps'); "
         "print('libtpu mapped' if maps.exists() and 'libtpu' in maps.read_text() else 'ok')")


@pytest.mark.skipif(platform.on_tpu_host(), reason="checks a host without TPUs")
@pytest.mark.parametrize("imports", ["import mma_jax, jax", "import jax, mma_jax"])
def test_no_tpu_runtime_warnings_off_tpu_hosts(imports):
  """Either import order: the TPU backend never starts, so libtpu neither loads nor warns."""
  result = subprocess.run([sys.executable, "-c", f"import pathlib; {imports}; {PROBE}"],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert not [w for w in TPU_WARNINGS if w in result.stderr], result.stderr
  assert result.stdout.strip() == "ok", result.stdout


@pytest.mark.skipif(platform.on_tpu_host(), reason="checks a host without TPUs")
def test_train_help_prints_no_tpu_warnings():
  result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "usage" in result.stdout, result.stderr
  assert not [w for w in TPU_WARNINGS if w in result.stderr], result.stderr


def test_importing_the_training_loop_prints_nothing():
  """train.py's imports (tensorboardX pulls in google-auth, which warns about the grpcio that
  Apache Beam pins) leave stderr empty."""
  result = subprocess.run([sys.executable, "-c", "import mma_jax.train.loop, mma_jax.evaluate"],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stderr == "", result.stderr
