"""ResNet-20 on 100 training images per class of `shapes`: a small-data setting for regularizers.

Command (the `shapes` dataset is generated offline on first use):
    python -m experiments.train --config=experiments/configs/resnet20_shapes_lowdata.py \\
        --workdir=workdirs/resnet20_shapes_lowdata
With mixup/CutMix, RandAugment, stochastic depth or a weight average, e.g.
`--config.mixing.cutmix_alpha=1.0 --config.data.randaugment_layers=2
--config.model_kwargs.drop_path_rate=0.1 --config.ema.decay=0.99`; the sweep
`experiments/sweeps/shapes_lowdata_regularization.py` compares CutMix and RandAugment.

400 training images (of 2,000) and the 400 test images of the 4 shape classes; 400 steps of batch
64 (64 epochs), SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4, the preset's pad-crop-flip.
Shapes have random foreground and background colours, so with few images a network can fit the
colours: at 25 images per class the same run reaches 100% train but 26.5% (chance) test top-1.
Expected and runtime: see the sweep's docstring (measured there, 2 CPU cores, with
`--config.batch_norm_impl=flax`; with the default the test top-1 differs by up to 0.34: this
small-data run amplifies float summation order as much as a change of seed).
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.model = "resnet20_cifar"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")
    config.data.train_examples_per_class = 100
    config.global_batch_size = 64
    config.num_train_steps = 400
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "cosine"
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.progress_bar = False
    return config
