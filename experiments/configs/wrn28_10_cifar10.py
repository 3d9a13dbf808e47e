"""WRN-28-10 with dropout 0.3 on CIFAR-10 with the training recipe of Zagoruyko & Komodakis 2016.

Command (CIFAR-10 must already be prepared in the tfds data dir; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/wrn28_10_cifar10.py \\
        --workdir=workdirs/wrn28_10_cifar10 --config.data.data_dir=$TFDS_DATA_DIR
The paper's dropout 0.3 between the two convolutions of each block is set here
(`model_kwargs.drop_rate`; the registered model defaults to no dropout). The plain WRN-28-10
(4.00% error in the paper): add `--config.model_kwargs.drop_rate=0.0`. Other Wide ResNets:
`--config.model=wrn16_8_cifar` (or `wrn40_4_cifar`, `wrn16_4_cifar`), also with dropout 0.3.

Recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, 200 epochs (78,125 steps
of 128 of the 50,000 training images), lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160, pad-4
random crop + flip.
Not as in the paper's reference code (Lua Torch, and the PyTorch version that reproduces it):
cnnjax's `pad_crop_flip` (cnnjax/data/presets.py) zero-pads the 4-pixel border before cropping,
the reference code pads by reflection; and weight decay here applies to the conv and linear
kernels only, not to BatchNorm scales/shifts or biases (cnnjax.train.optim.weight_decay_mask),
while both reference codes decay every parameter. Unmeasured: either can shift the result.
Expected: ~96.1% test top-1 (the paper, mean/std preprocessing, median of 5 runs: 3.89% error
with dropout 0.3, 4.00% without; 36,479,194 parameters here). Not run here (no CIFAR-10
offline); 5.24 GMACs per image, 42x ResNet-56's (docs/models.md). The train step runs at 11
img/s on 2 CPU cores (`python -m benchmarks.train_step --model=wrn28_10_cifar --batch_size=128
--image_size=32 --num_classes=10`, jax 0.10.2), so the recipe's 10M images would take ~11 days
there: run it on an accelerator.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

STEPS_PER_EPOCH = 50_000 / 128


def get_config():
    config = default_config()
    config.model = "wrn28_10_cifar"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.model_kwargs.drop_rate = 0.3  # the paper's WRN-28-10-dropout (0.0: no dropout)
    config.data = default_data_config("cifar10")
    config.global_batch_size = 128
    config.num_train_steps = round(200 * STEPS_PER_EPOCH)
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "piecewise"
    config.schedule.boundaries = tuple(round(e * STEPS_PER_EPOCH) for e in (60, 120, 160))
    config.schedule.decay_factor = 0.2
    config.log_every_steps = 100
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 5_000
    return config
