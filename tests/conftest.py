"""Test setup: 8 fake CPU devices (set before jax is imported) and exact f32 matmuls."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mma_jax.platform  # noqa: E402  first: off TPU hosts JAX starts no TPU runtime

mma_jax.platform.quiet_deviceless_tpu()  # described-topology compiles (libtpu) print nothing

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory):
  """The whole easy_vqa dataset built once per session (array_record; a few seconds)."""
  import tensorflow_datasets as tfds
  import mma_jax.data  # noqa: F401  registers the builders
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.builder("easy_vqa", data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return data_dir
