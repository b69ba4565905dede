"""Evaluation behind eval.py (and train.py's final easy_vqa report).

    easy_vqa.py         the demo's teacher-forced accuracy per question type, with its baselines
    easy_vqa_mcq.py     easy_vqa written as a VLMEvalKit multiple-choice TSV
    loading.py          the model of a training run or a converted checkpoint, sharded on the mesh
    tsv.py              VLMEvalKit benchmark files: questions, images, task detection, skipped rows
    prompts.py          question -> the user turn (VLMEvalKit's, AKI's official, or our SFT words)
    runner.py           a benchmark on a model: batches, generation or option log-likelihoods
    predictions.py      prediction files (ours, resumable; VLMEvalKit's) read as VLMEvalKit reads
    scoring.py          VLMEvalKit's scoring, dispatched by benchmark name and task, to:
      multiple_choice.py  letter extraction, circular evaluation (MMBench), report_acc tables
      yes_no.py           yes/no extraction; MME, POPE, HallusionBench and plain ratings
      vqa.py              VQA score, exact match, relaxed accuracy, ANLS
    tables.py           per-group metric tables
    report.py           report.json, report.md, predictions.jsonl and the printed lines
    score.py            python -m mma_jax.evaluate.score: scoring prediction files, no model
"""
