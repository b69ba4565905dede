"""Data: tokenizers, dataset builders, image preprocessing and the grain pipeline (DESIGN.md §2).

Importing this package registers the tfds builders `easy_vqa`, `llava_instruct` and
`image_captions`. They build and read without TensorFlow in the array_record format:

    import mma_jax.data
    tfds.builder("easy_vqa", data_dir=D).download_and_prepare(file_format="array_record")
    source = tfds.data_source("easy_vqa", split="test", data_dir=D)

(`mma_jax.data.builder_utils.prepare(name, data_dir, manual_dir)` does the same in one call.)
Modules: tokenizer.py (tokenizers), images.py (decode, resize, normalise), packing.py (examples ->
rows), pipeline.py (grain: source -> examples -> rows -> batches of the batch contract),
mixture.py (data.mixture entries -> sources under data.root), sft/ (builders of the official AKI
SFT sources), webdataset.py (streamed caption shards), builder_utils.py (shared build code, Beam),
beam.py (`python -m mma_jax.data.beam`), preview.py (`python -m mma_jax.data.preview`).
"""
from mma_jax.data import easy_vqa, image_captions, llava_instruct  # noqa: F401  (registration)
from mma_jax.data import sft  # noqa: F401  (registration: the official SFT sources, sft/)
