"""mma_jax: modality-mutual attention (AKI) multimodal decoders in JAX/Flax for TPU."""
import warnings

from mma_jax import platform as _platform

# google-auth and google-api-core (installed for gcsfs and Apache Beam, whose releases for Python
# <= 3.12 require grpcio < 1.66) warn when imported that grpcio < 1.83 lacks post-quantum TLS.
# tensorboardX imports them in every run; the warning is not something a user of ours can act on.
warnings.filterwarnings("ignore", message=r".*grpcio < 1\.83", category=FutureWarning)

# Before any backend starts: off TPU hosts, keep JAX from loading libtpu (and its warnings).
_platform.select_platforms()
