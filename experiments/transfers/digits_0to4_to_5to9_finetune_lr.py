"""digits 0-4 -> 5-9 again, fine-tuning only, at a 10x lower learning rate (0.005 instead of 0.05).

Command:
    python -m experiments.transfer \\
        --transfer=experiments/transfers/digits_0to4_to_5to9_finetune_lr.py \\
        --transfer_dir=workdirs/transfers/digits_0to4_to_5to9_finetune_lr

Measured with this command (2 shared CPU cores, JAX 0.10.2): 1 min 14 s wall (the source again,
then 6 runs). Final top-1 on digits 5-9, mean ± std over seeds 0 and 1, against the same arm at
lr 0.05 in digits_0to4_to_5to9.py:
    labels/class   fine-tune lr 0.005   (lr 0.05)
    1              53.1 ± 11.9%         (55.6 ± 8.3%)
    5              89.1 ± 0.4%          (90.2 ± 0.4%)
    50             95.3 ± 2.0%          (96.4 ± 2.0%)
i.e. no better: on this pair the pretrained start, not the step size, is what does not help.
"""

import ml_collections

from experiments.transfers import digits_0to4_to_5to9


def get_config():
    config = digits_0to4_to_5to9.get_config()  # same source, target, budgets and seeds
    config.arms = ("finetune",)
    config.arm_overrides.finetune = ml_collections.ConfigDict(
        {"optimizer": {"learning_rate": 0.005}})
    return config
