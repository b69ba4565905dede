"""Evaluation: benchmark readers, scoring and reports (easy_vqa.py: the demo's accuracy)."""
