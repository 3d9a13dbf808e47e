"""CutMix x RandAugment x 2 seeds for ResNet-20 on 100 `shapes` images per class (8 trials).

Command:
    python -m experiments.sweep --config=experiments/configs/resnet20_shapes_lowdata.py \\
        --sweep=experiments/sweeps/shapes_lowdata_regularization.py \\
        --sweep_dir=workdirs/sweeps/shapes_lowdata_regularization

Expected (measured with this command, 2 CPU cores, JAX 0.10.2, 2026-11-30, before BatchNorm's
CPU default became `batch_norm_impl='auto'`; add `--config.batch_norm_impl=flax` to reproduce
the table exactly): 14 min wall, 80-150 s per trial. Final test top-1 (400 test images) / final
train top-1, seeds 0 and 1:
    arm                      seed 0          seed 1
    neither                  0.585 / 0.93    0.658 / 0.97
    CutMix (alpha 1)         0.533 / 0.66    0.268 / 0.45
    RandAugment (2 ops, M9)  0.285 / 0.33    0.293 / 0.35
    both                     0.310 / 0.32    0.263 / 0.29
At this budget (64 epochs of 400 images) both regularizers hurt: the runs underfit (RandAugment's
train loss stays near ln 4 = 1.39, i.e. chance, and so does a run at magnitude 3: 0.30 test, 0.42
train), and seeds differ by up to 0.27. The run is as sensitive to float summation order: with
the default `batch_norm_impl='auto'` (the same sums in another order) the "neither" arm of seed 0
reaches 0.9275 test / 0.995 train (measured 2026-12-01), so compare arms within one setting.
With 4x the schedule (`--config.num_train_steps=1600`,
256 epochs, seed 0, 4.5 min per run) the picture changes: neither 0.965 (train 1.00, test loss
0.115), RandAugment 0.985 (train 0.92, test loss 0.043), CutMix 0.875 (train 0.83; at step 800
0.900): RandAugment then beats the baseline and CutMix still trails it. The same RandAugment
(2 ops, M9) on LeNet-5 / `digits` (experiments/configs/lenet5_digits.py) reaches 0.9833 test
top-1 against 0.9805 without it.
"""

import ml_collections

from cnnjax.tune.space import choice


def get_config():
    config = ml_collections.ConfigDict()
    config.kind = "grid"
    config.seed = 0
    config.metric = "top1"
    config.mode = ml_collections.FieldReference(None, field_type=str)  # None: by metric
    config.parameters = (
        choice("mixing.cutmix_alpha", (0.0, 1.0)),
        choice("data.randaugment_layers", (0, 2)),
        choice("seed", (0, 1)),
    )
    return config
