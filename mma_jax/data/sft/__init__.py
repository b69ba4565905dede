"""tfds builders for the official AKI SFT sources, read from their original release files.

    vqav2, gqa, ocr_vqa           vqa.py              short answers
    vsr (vsr/fixed, vsr/official_split)  vsr.py      yes/no from captions
    aokvqa, scienceqa             multiple_choice.py  option letters (seeded shuffle: options.py)
    refcoco, refcoco_plus, refcocog, visual_genome    regions.py   region captions with boxes
    (LLaVA-Instruct-150k: the `llava_instruct` builder; data.flavour=official splits its turns)

Each reads from manual_dir = the SFT data root of the official configs (configs/sft_datasets/
*.yaml `root`), at the paths those configs name, and emits the `llava_instruct` schema with the
official INPUT and TARGET (common.py), so the pipeline reads them all with `llava_instruct_input`:

    builder_utils.prepare("gqa", data_dir, manual_dir=SFT_ROOT)
"""
from mma_jax.data.sft import multiple_choice, regions, vqa, vsr  # noqa: F401  (registration)

# The tfds names (with the VSR config that reproduces the official question split).
DATASETS = ("vqav2", "gqa", "vsr", "vsr/official_split", "ocr_vqa", "aokvqa", "scienceqa",
            "refcoco", "refcoco_plus", "refcocog", "visual_genome")
