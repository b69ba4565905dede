"""Above models and train: the memory planner (`python -m mma_jax.sharding describe`) and the
deviceless TPU compile (`python -m mma_jax.compile`) of the programs train.py and eval.py run.

  topology.py   Cloud TPU slice names -> described devices (libtpu, no chip) and HBM per chip
  programs.py   the train step, prefill and decode traced on a mesh from shapes alone
  planner.py    per-parameter sharding plan and per-device bytes, analytic
  report.py     one compile: per-chip bytes from memory_analysis() beside the planner's figure
"""
