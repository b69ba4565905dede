"""Data: tokenizers, dataset builders, image preprocessing and the grain pipeline (DESIGN.md §2)."""
