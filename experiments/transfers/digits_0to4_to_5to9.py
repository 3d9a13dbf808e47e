"""LeNet-5 pretrained on digits 0-4, transferred to digits 5-9 with 1, 5 and 50 labels per class.

Command:
    python -m experiments.transfer --transfer=experiments/transfers/digits_0to4_to_5to9.py \\
        --transfer_dir=workdirs/transfers/digits_0to4_to_5to9

Does pretraining on the other five digits help with few labels? Here, no. Measured with this
command (2 shared CPU cores, load ~3, JAX 0.10.2): 4 min 47 s wall (source 600 steps 22 s, then
18 target runs of 300 steps, 9-20 s each); a rerun skips everything (17 s, just the tables).
Source: 99.4% top-1 on the 180 test scans of 0-4 (721 training scans). Target: final top-1 on
the 179 test scans of 5-9, mean ± std over seeds 0 and 1 (one budget subset: the first n scans
of each class in stored order):
    labels/class (images)   scratch        fine-tune      linear probe
    1  (5)                  63.1 ± 1.6%    55.6 ± 8.3%    55.9 ± 3.2%
    5  (25)                 89.7 ± 0.4%    90.2 ± 0.4%    78.5 ± 2.0%
    50 (250)                97.2 ± 0.0%    96.4 ± 2.0%    94.1 ± 0.4%
LeNet-5 learns 8x8 digits so quickly from scratch that 0-4 features add nothing measurable
(differences within ~2 seed stds; one test scan = 0.56%), and frozen 0-4 features are clearly
worse than learning 5-9 features (-5 to -11 points below 50 labels/class). A 10x lower fine-tune
learning rate does not change that (digits_0to4_to_5to9_finetune_lr.py). results.csv,
results.json, report.md and transfer.png (top-1 against images, one line per arm) are in
--transfer_dir.
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
    # Per-arm changes to the target config, e.g. `config.arm_overrides.finetune =
    # ConfigDict({"optimizer": {"learning_rate": 0.005}})` (see digits_0to4_to_5to9_finetune_lr.py);
    # none here: every arm uses the same recipe, only the initialization / frozen layers differ.
    config.arm_overrides = ml_collections.ConfigDict()
    config.metric = "top1"
    return config
