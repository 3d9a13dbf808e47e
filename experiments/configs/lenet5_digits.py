"""LeNet-5 on `digits` (1,797 real 8x8 handwritten digit scans, upsampled to 32x32): the default.

Command (what `make train` runs):
    python -m experiments.train --config=experiments/configs/lenet5_digits.py \\
        --workdir=workdirs/lenet5_digits
Model hyperparameters: `--config.model_kwargs.activation=relu` (also `subsampling`, `c3_table`;
unset = the model's default).

Expected (measured with `make train`, 2 CPU cores, load average ~1, JAX 0.10.2): 98.05% test
top-1 (359 held-out scans; 97.8% already at step 100), final test loss 0.086; 18-19 s wall for
the whole command (16-17 s inside the training loop, compilation included; ~5,400 train
images/s; the rest is start-up and the interpreter's exit; 2026-12-05, Zen 2). Before tf.data
autotuning was turned off the end of the loop waited ~8.6 s more for its thread.
The first ever run also builds `digits` into the tfds data dir (~5 s).
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.model = "lenet5"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("digits")
    config.data.image_size = 32
    config.global_batch_size = 64
    config.num_train_steps = 600
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 30
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    return config
