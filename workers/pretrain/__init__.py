"""Pretraining: one loop, two launchers, one run directory.

    loop.py          the loop on one rank (run_loop) as named steps; Ray Train's entry per worker
    launch.py        the Ray driver: starts or joins Ray, runs the workers, names a damaged shard
    torchrun.py      the same loop under torchrun (``python -m workers.torchrun``)
    sessions.py      what the loop asks of its launcher (rank, device, checkpoints), for each launcher
    run_dir.py       the run checked before any Ray or torch work (torch-free)
    run_log.py       metrics.jsonl: written by rank 0, followed by the driver's progress bar
    optim.py         optimizers (SGD, AdamW, LARS), the run's length, warm-up + cosine
    budget.py        budget_minutes: the steps that fit, from the first steps measured
    export.py        checkpoints/final/backbone.pt, plots/pretrain.png, summary.json
    ray_internals/   a private Ray instance tuned for a fast start (reaches into Ray Train's private modules)
"""
