"""Tuning recipe for LeNet-5 on `digits`: an lr search at 100 steps, then up to 2 diagnosed rounds.

Command:
    python -m experiments.tune --config=experiments/configs/lenet5_digits.py \\
        --recipe=experiments/recipes/lenet5_digits.py --tune_dir=workdirs/tune/lenet5_digits \\
        --config.progress_bar=False

Expected: MEASURED_PLACEHOLDER
"""

from cnnjax.tune.recipe import default_recipe


def get_config():
    config = default_recipe()
    config.metric = "top1"  # an eval metric: loss, top1, top5
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
