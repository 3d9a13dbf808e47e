"""AlexNet (single tower) on Imagenette (10 easy ImageNet classes, 320px version).

Command (imagenette/320px-v2 must be prepared in the tfds data dir; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/alexnet_imagenette.py \\
        --workdir=workdirs/alexnet_imagenette --config.data.data_dir=$TFDS_DATA_DIR
Model hyperparameters: e.g. `--config.model_kwargs.dropout_rate=0.3` or `hidden_features=2048`
(unset = the model's default).

Recipe: SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.01 with one-cycle (cosine) over
~60 epochs, random-resized-crop 224 + flip, dropout 0.5 in fc6/fc7 (the model's default).
Expected: roughly 80-85% validation top-1 (AlexNet from scratch on Imagenette; not measured here,
no data offline). Runtime estimate ~30 min on one NVIDIA A100; many hours on 2 CPU cores.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

TRAIN_IMAGES = 9_469


def get_config():
    config = default_config()
    config.model = "alexnet"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("imagenette")
    config.data.image_size = 224
    config.global_batch_size = 128
    config.num_train_steps = 60 * (TRAIN_IMAGES // config.global_batch_size)
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "one_cycle"
    config.schedule.pct_start = 0.2
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    return config
