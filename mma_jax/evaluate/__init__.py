"""Evaluation behind eval.py (and train.py's final easy_vqa report).

    easy_vqa.py  the demo's teacher-forced accuracy per question type, with its baselines
    loading.py   the model of a training run or a converted checkpoint, sharded on the mesh
    tsv.py       VLMEvalKit benchmark files: questions, images, task detection, skipped rows
    prompts.py   question -> the user turn (the SFT task prompts of DESIGN.md §7)
    scoring.py   answers out of generated text; accuracy, MME, POPE and VQA metrics
    runner.py    a benchmark on a model: batches, generation (mma_jax.generate), scoring
    report.py    report.json, report.md, predictions.jsonl and the printed lines
"""
