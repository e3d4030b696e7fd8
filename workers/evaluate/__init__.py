"""Evaluation: linear probe, kNN, fine-tune and few-label protocols against baselines, and the report.

    config.py       EvalConfig: what to run, validated before any work
    evaluation.py   one run being evaluated (Evaluation) and evaluate(), everything in order
    protocols.py    one protocol on one feature source each, returning the table's cells
    checkpoint.py   the checkpoint to evaluate, refused when it does not belong to the run
    features.py     frozen features, extracted once per source and split, cached in the run
    probe.py        the linear probe (logistic regression in torch, weight decay picked on val)
    finetune.py     fine-tuning (and the supervised baseline's training)
    metrics.py      top-k, confusion matrix, per-class accuracy, average precision
    budget.py       budget_minutes: what the protocols cost here and what fits
    report.py       report.json, report.md, plots/*.png, and the results table
"""
