"""Throughput benchmark: ResNet-18 on random in-memory 32x32 images (the `fake` dataset).

Command:
    rm -rf /tmp/cnnjax_bench && python -m experiments.train \\
        --config=experiments/configs/fake_data_benchmark.py --workdir=/tmp/cnnjax_bench
(a fresh workdir each time: rerunning a finished run only returns its summary)
Useful overrides: --config.model=resnet50 --config.data.fake_image_shape='(224, 224, 3)'
--config.global_batch_size=256 --config.compute_dtype=bfloat16 --config.parallel=shard_map.

Reads nothing from disk and never evaluates until the end, so summary.json's `images_per_sec`
(first, compiling step excluded) is the engine's train-step throughput. Accuracy is meaningless
(random labels).
Measured (12-step run, `--config.num_train_steps=12 --config.progress_bar=False`, 2 CPU cores,
load average ~2, JAX 0.10.2 with YNN fusions off): 430 train images/s with the default
`conv_impl='auto'` (23 s wall including startup and compilation); 102 images/s with
`--config.conv_impl=xla`. Full CPU comparisons with PyTorch: docs/performance.md.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.model = "resnet18"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("fake")
    config.data.fake_image_shape = (32, 32, 3)
    config.data.fake_num_classes = 10
    config.global_batch_size = 128
    config.num_train_steps = 50
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "constant"
    config.log_every_steps = 10
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 50
    config.keep_checkpoints = 1
    config.best_metric = "loss"
    config.best_mode = "min"
    return config
