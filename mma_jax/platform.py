"""Which JAX platforms this host starts, decided from local facts only (files and environment).

libtpu (requirements.txt pins it, so a TPU VM gets a TPU-capable JAX) is installed on every machine,
and JAX's TPU backend factory loads it whenever the platforms are left to JAX. Without a TPU chip
libtpu then prints "could not determine TPU accelerator type ... TPU_ACCELERATOR_TYPE", "Logging
before InitGoogle()" and "unexpected worker hostname ... TPU_WORKER_HOSTNAMES" to stderr. So
`import mma_jax` calls `select_platforms()`: on a host without TPU device files, and unless the
user chose (JAX_PLATFORMS, JAX_FORCE_TPU_INIT, jax.config), it names the platforms JAX may start:
"cuda,cpu" / "rocm,cpu" where a GPU plugin and a GPU are present, else "cpu". Nothing here asks
the network (no metadata server); a TPU host is one with TPU device files.

`quiet_deviceless_tpu(topology_name)` is for compiling for a described TPU topology on a host
without TPUs (jax.experimental.topologies.get_topology_desc(platform="tpu", ...)), which loads
libtpu on purpose: it sets the variables that libtpu would otherwise look up and warn about.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import pkgutil
import re
import sys

_ROOT = "/"  # where /dev and /sys are looked up (tests point it at a temporary directory)
_GOOGLE_PCI_VENDOR = "0x1ae0"

# (platform, module-name prefix of JAX's plugin package, device files of that kind of GPU)
_GPU_PLUGINS = (("cuda", "jax_cuda", ("dev/nvidia0", "dev/nvidiactl", "dev/dxg")),
                ("rocm", "jax_rocm", ("dev/kfd",)))


def _path(*parts: str) -> str:
  return os.path.join(_ROOT, *parts)


def _vfio_group_is_tpu(group: str) -> bool:
  """A VFIO group is a TPU chip when sysfs shows a Google device in its IOMMU group (or when
  sysfs does not say: then the device file alone decides)."""
  vendors = []
  for vendor_file in glob.glob(_path("sys/kernel/iommu_groups", group, "devices", "*", "vendor")):
    try:
      with open(vendor_file) as f:
        vendors.append(f.read().strip())
    except OSError:
      continue
  return not vendors or _GOOGLE_PCI_VENDOR in vendors


def tpu_device_files() -> list[str]:
  """The TPU chips' device files on this host: /dev/accel<N> (older TPU VMs, e.g. v4) and
  /dev/vfio/<N> (newer ones, e.g. v5e and v6e, whose chips are bound to vfio-pci; a group counts
  when its IOMMU group holds a Google device or sysfs cannot tell)."""
  accel = [p for p in glob.glob(_path("dev", "accel*"))
           if re.fullmatch(r"accel\d+", os.path.basename(p))]
  vfio = [p for p in glob.glob(_path("dev", "vfio", "*"))
          if os.path.basename(p).isdigit() and _vfio_group_is_tpu(os.path.basename(p))]
  return sorted(accel) + sorted(vfio, key=lambda p: int(os.path.basename(p)))


def on_tpu_host() -> bool:
  """True when this host has TPU chips (device files); nothing is asked of the network."""
  return bool(tpu_device_files())


def _installed_modules() -> set[str]:
  return {m.name for m in pkgutil.iter_modules()}  # top-level names only: nothing is imported


def _gpu_platforms() -> list[str]:
  """GPU platforms whose JAX plugin is installed and whose devices are present."""
  modules = _installed_modules()
  return [platform for platform, prefix, files in _GPU_PLUGINS
          if any(m.startswith(prefix) and m.endswith("_plugin") for m in modules)
          and any(os.path.exists(_path(f)) for f in files)]


def _jax_platforms_configured() -> bool:
  """The user named the platforms: JAX_PLATFORMS in the environment (even empty: JAX's own
  choice), JAX_FORCE_TPU_INIT, or jax.config's jax_platforms set before mma_jax was imported."""
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
    return True
  jax = _jax_module()
  return jax is not None and getattr(jax.config, "jax_platforms", None) is not None


def _jax_module():
  return sys.modules.get("jax")  # imported by now or not; never imported here


def _backends_started() -> bool:
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def select_platforms() -> str | None:
  """Keeps JAX's TPU backend (and so libtpu) from starting on a host without TPUs: sets
  JAX_PLATFORMS (and jax.config when jax is already imported) to the GPU platforms present plus
  "cpu". Leaves everything alone on a TPU host, when the user named the platforms, or once a
  backend has started. Returns what it set, or None."""
  if _jax_platforms_configured() or on_tpu_host() or _backends_started():
    return None
  platforms = ",".join(_gpu_platforms() + ["cpu"])
  os.environ["JAX_PLATFORMS"] = platforms  # read when jax is imported; child processes inherit it
  jax = _jax_module()
  if jax is not None:  # imported before mma_jax: the environment variable was already read
    jax.config.update("jax_platforms", platforms)
  return platforms


# What jax.distributed.initialize() detects from the environment alone (jax 0.10.2,
# jax/_src/clusters/): Open MPI's and SLURM's variables, and Kubernetes where the `kubernetes`
# package is installed (jax skips it otherwise). Its GCE and GKE TPU detectors apply only on a TPU
# host (the GCE one asks the metadata server); mpi4py is opt-in only.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def distributed_cluster() -> str | None:
  """The multi-process cluster the environment names and jax finds on its own ("ompi", "slurm",
  "k8s"), or None. Reads environment variables only."""
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return "ompi"
  if all(name in os.environ for name in _SLURM_VARS):
    return "slurm"
  if "KUBERNETES_SERVICE_HOST" in os.environ and importlib.util.find_spec("kubernetes"):
    return "k8s"
  return None


# TPU generation in a topology name -> (its accelerator-type prefix, TensorCores per chip)
_ACCELERATOR_TYPES = {"v2": ("v2", 2), "v3": ("v3", 2), "v4": ("v4", 2), "v5p": ("v5p", 2),
                      "v5e": ("v5litepod", 1), "v6e": ("v6e", 1), "tpu7x": ("tpu7x", 2)}


def accelerator_type(topology_name: str | None) -> str:
  """The accelerator type of a slice like `topology_name` ("v5e:2x2" -> "v5litepod-4",
  "v4:2x2x1" -> "v4-8"); "v4-8" when the name does not parse. libtpu only checks that it names
  a known slice: the described topology comes from topology_name either way."""
  match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", topology_name or "")
  if match and match.group(1) in _ACCELERATOR_TYPES:
    prefix, cores = _ACCELERATOR_TYPES[match.group(1)]
    chips = math.prod(int(n) for n in match.group(2).split("x"))
    return f"{prefix}-{chips * cores}"
  return "v4-8"


def quiet_deviceless_tpu(topology_name: str | None = None) -> dict[str, str]:
  """Before compiling for a described TPU topology on a host without TPUs: sets, where unset,
  what libtpu would otherwise look for and warn about when it initialises (TPU_ACCELERATOR_TYPE,
  TPU_WORKER_HOSTNAMES=localhost; TPU_SKIP_MDS_QUERY=1: no metadata-server queries), and
  ALLOW_MULTIPLE_LIBTPU_LOAD=1, since without chips there is nothing for libtpu's lock
  (/tmp/libtpu_lockfile) to guard and a second process compiling at the same time would fail on
  it. Call it before libtpu loads; does nothing on a TPU host. Returns the variables it set."""
  if on_tpu_host():
    return {}
  wanted = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": accelerator_type(topology_name),
            "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  set_now = {k: v for k, v in wanted.items() if k not in os.environ}
  os.environ.update(set_now)
  return set_now
