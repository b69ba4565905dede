"""mma_jax: modality-mutual attention (AKI) multimodal decoders in JAX/Flax for TPU."""
