"""Tuning recipe for LeNet-5 on `digits`: an lr search at 100 steps, then up to 2 diagnosed rounds.

Command:
    python -m experiments.tune --config=experiments/configs/lenet5_digits.py \\
        --recipe=experiments/recipes/lenet5_digits.py --tune_dir=workdirs/tune/lenet5_digits \\
        --config.progress_bar=False

Expected (measured with this command, 2 CPU cores shared with other jobs, JAX 0.10.2): 77 s wall
(5 trials of 100 steps, 11-19 s each, compilation included; 45 s on an idle Zen 2 in session
45). Round 1 ranks test top-1:
    lr=0.178: 0.9805   lr=0.0316: 0.9582   lr=1.0: 0.9359   lr=0.00562: 0.9109   lr=0.001: 0.7772
(lr=1.0, near the edge of stability, moves with float rounding: 0.9248 when first measured.)
The best (0.178) is inside the grid and diagnosed `converged` (eval top-1 +0.3 points over the
last 25 steps, below the 1.6-point noise of 359 test images; eval loss -17%), so the tune stops
after one round: 98.05% in 100 steps, what the hand-set config reaches in 600 (`make train`).
Rerunning the command trains nothing (~6 s). Outputs in --tune_dir: recipe.json, report.md,
tune.png, round_1/ (an ordinary sweep directory).

A range that misses the optimum, `--recipe.lr_min=1e-4 --recipe.lr_max=0.03 --recipe.num_lrs=4`:
round 1's best, 0.03 (0.9526), is its highest rate, so round 2 tries 0.0776 and 0.201 (half and
one grid step past it): 0.9805 and 0.9777; 0.0776 is inside the grid and converged, stop after 6
trials (161 s wall).
"""

from cnnjax.tune.recipe import default_recipe


def get_config():
    config = default_recipe()
    config.metric = "top1"  # an eval metric: loss, top1, top5 (unset: the best_metric, top1)
    config.lr_min = 1e-3  # round 1: 5 log-spaced rates 0.001, 0.00562, 0.0316, 0.178, 1.0
    config.lr_max = 1.0
    config.num_lrs = 5
    config.round1_steps = 100
    config.max_steps = 400
    config.max_rounds = 3
    config.max_trials = 11
    config.trials_per_round = 3
    config.evals_per_trial = 8
    config.logs_per_trial = 20
    return config
