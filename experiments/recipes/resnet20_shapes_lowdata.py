"""Tuning recipe for ResNet-20 on 100 `shapes` per class: an lr search, then regularizers.

Command:
    python -m experiments.tune --config=experiments/configs/resnet20_shapes_lowdata.py \\
        --recipe=experiments/recipes/resnet20_shapes_lowdata.py \\
        --tune_dir=workdirs/tune/resnet20_shapes_lowdata

The small-data config overfits, so after the lr search the diagnosis asks for regularization:
this recipe tries RandAugment, then CutMix, then more weight decay (`regularizers`), two values
per round at the incumbent's step budget, and reruns a knob that lost while still learning at
twice its steps (`lengthen_regularizers`).

Measured (2 CPU cores shared with other jobs, JAX 0.10.2, with flax's BatchNorm: add
`--config.batch_norm_impl=flax` to reproduce; the CPU default's matmul sums change this small-data
run as much as a seed does), test top-1 (best eval):
    round 1, lr at 400 steps     0.01: 0.680   0.0447: 0.915 (overfits)   0.2: 0.325
    round 2, RandAugment ops     1: 0.278   2: 0.283 (too_slow: loss still near ln 4)
    round 3, at 800 steps        0 ops: 0.958   2 ops: 0.768 (underfitting, still learning)
    round 4, at 1600 steps       0 ops: 0.978   2 ops: 0.993
and it stops with "still improving at max_steps=1600": best 0.9925 with 2 RandAugment ops,
9 trials, 39 min of training. With `--recipe.lengthen_regularizers=False` rounds 3 and 4 sweep
CutMix 0.5/1.0 (0.413/0.300) and weight decay 1.5e-3/5e-3 (0.613/0.798) at 400 steps instead,
and the tune ends "exhausted" at 0.915 (9 trials, 29 min): at the incumbent's short budget every
regularizer loses.
"""

from cnnjax.tune.recipe import default_recipe


def get_config():
    config = default_recipe()
    config.metric = "top1"
    config.lr_min = 0.01  # round 1: 0.01, 0.0447, 0.2
    config.lr_max = 0.2
    config.num_lrs = 3
    config.round1_steps = 400  # 64 epochs of the 400 training images
    config.max_steps = 1600
    config.max_rounds = 5
    config.max_trials = 11
    config.trials_per_round = 2
    config.evals_per_trial = 8
    config.logs_per_trial = 20
    config.regularizers = ("randaugment", "cutmix", "weight_decay")
    # A knob that lost while still learning is compared again at 2x its steps (up to max_steps).
    config.lengthen_regularizers = True
    return config
