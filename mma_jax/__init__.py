"""mma_jax: modality-mutual attention (AKI) multimodal decoders in JAX/Flax for TPU."""
from mma_jax import platform as _platform

# Before any backend starts: off TPU hosts, keep JAX from loading libtpu (and its warnings).
_platform.select_platforms()
