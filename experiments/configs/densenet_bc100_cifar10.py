"""DenseNet-BC (L=100, k=12) on CIFAR-10 with the recipe of Huang et al. 2017, section 4.2.

Command (CIFAR-10 must already be prepared in the tfds data dir; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/densenet_bc100_cifar10.py \\
        --workdir=workdirs/densenet_bc100_cifar10 --config.data.data_dir=$TFDS_DATA_DIR
Other Table 2 networks: `--config.model=densenet40_cifar` (or `densenet_bc250_cifar`, ...); the
paper's dropout 0.2 (used only without augmentation): `--config.model_kwargs.drop_rate=0.2`.

Recipe: SGD with Nesterov momentum 0.9, weight decay 1e-4 (not on biases/BN), batch 64, 300
epochs (234,375 steps of 64 of the 50,000 training images), lr 0.1 divided by 10 at 50% and 75%
of training, pad-4 random crop + flip ("C10+").
Expected: ~95.5% test top-1 (Table 2: 4.51% error on C10+, 769,162 parameters here). Not run here
(no CIFAR-10 offline); 0.29 GMACs per image, 2.3x ResNet-56's (docs/models.md). The train step
runs at 25 img/s on 2 CPU cores (`python -m benchmarks.train_step --model=densenet_bc100_cifar
--batch_size=64 --image_size=32 --num_classes=10`, jax 0.10.2), so the recipe's 15M images
would take ~7 days there: run it on an accelerator.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

STEPS_PER_EPOCH = 50_000 / 64


def get_config():
    config = default_config()
    config.model = "densenet_bc100_cifar"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("cifar10")
    config.global_batch_size = 64
    config.num_train_steps = round(300 * STEPS_PER_EPOCH)
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "piecewise"
    config.schedule.boundaries = (round(150 * STEPS_PER_EPOCH), round(225 * STEPS_PER_EPOCH))
    config.schedule.decay_factor = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 5_000
    return config
