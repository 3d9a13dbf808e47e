"""ResNet-20 (option-A shortcuts) on CIFAR-10 with the recipe of He et al. 2016, section 4.2.

Command (CIFAR-10 must already be prepared in the tfds data dir; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/resnet20_cifar10.py \\
        --workdir=workdirs/resnet20_cifar10 --config.data.data_dir=$TFDS_DATA_DIR
Model hyperparameters: e.g. `--config.model_kwargs.shortcut=B` or `zero_init_last_bn=True`
(unset = the model's default; the depth is the model name, e.g. `--config.model=resnet56_cifar`).

Recipe: SGD momentum 0.9, weight decay 1e-4 (not on biases/BN), batch 128, lr 0.1 divided by 10
at 32k and 48k steps, 64k steps, pad-4 random crop + flip.
Expected: ~91.3% test top-1 (the paper's Table 6 reports 91.25% error 8.75%). Runtime not measured
here (no CIFAR-10 offline); estimate ~1 h on one NVIDIA A100, many hours on CPU.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.model = "resnet20_cifar"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("cifar10")
    config.global_batch_size = 128
    config.num_train_steps = 64_000
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "piecewise"
    config.schedule.boundaries = (32_000, 48_000)
    config.schedule.decay_factor = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    return config
