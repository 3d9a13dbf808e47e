"""LeNet-5 pretrained on digits 0-4, transferred to digits 5-9 with 1, 5 and 50 labels per class.

Command:
    python -m experiments.transfer --transfer=experiments/transfers/digits_0to4_to_5to9.py \\
        --transfer_dir=workdirs/transfers/digits_0to4_to_5to9

Expected: (filled in below once measured)
"""

import ml_collections

from experiments.configs import lenet5_digits


def _task(classes: tuple[int, ...]) -> ml_collections.ConfigDict:
    """experiments/configs/lenet5_digits.py restricted to `classes` (relabelled 0..k-1)."""
    config = lenet5_digits.get_config()
    config.data.classes = classes
    config.progress_bar = False
    return config


def get_config():
    config = ml_collections.ConfigDict()
    # Source: the usual LeNet-5 recipe on the ~720 training scans of 0-4 (600 steps, batch 64).
    config.source = _task((0, 1, 2, 3, 4))
    # Target: 5-9 (relabelled 0-4), a small balanced label budget per class; batch 5 so that the
    # smallest budget (one image per class) still makes an epoch; 300 steps whatever the budget.
    config.target = _task((5, 6, 7, 8, 9))
    config.target.global_batch_size = 5
    config.target.num_train_steps = 300
    config.target.schedule.warmup_steps = 15
    config.target.eval_every_steps = 150
    config.target.checkpoint_every_steps = 150
    config.budget_field = "data.train_examples_per_class"
    config.budgets = (1, 5, 50)
    config.arms = ("scratch", "finetune", "linear_probe")
    config.seeds = (0, 1)
    # Per-arm changes to the target config, e.g. {"finetune": {"optimizer.learning_rate": 0.01}};
    # none here: every arm uses the same recipe, only the initialization / frozen layers differ.
    config.arm_overrides = ml_collections.ConfigDict()
    config.metric = "top1"
    return config
