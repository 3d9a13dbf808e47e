"""ResNet-50 on ImageNet (ILSVRC-2012) with the Goyal et al. 2017 large-batch recipe.

Command (imagenet2012 must be prepared in the tfds data dir by hand; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/resnet50_imagenet.py \\
        --workdir=workdirs/resnet50_imagenet --config.data.data_dir=$TFDS_DATA_DIR
Model hyperparameters: e.g. `--config.model_kwargs.zero_init_last_bn=True` (Goyal et al.'s
zero-gamma trick) or `stride_in_1x1=True` (unset = the model's default).
Multi-host (SLURM): `python -m launch.submit --entry=train --config=<this file> --nodes=N ...`
(launch/README.md; it requeues on preemption and resumes).

Recipe: batch 1024 (lr = 0.1 x batch/256 = 0.4), SGD nesterov momentum 0.9, weight decay 1e-4
(not on biases/BN), label smoothing 0.1, 5-epoch linear warmup + cosine to 90 epochs, bfloat16
compute, random-resized-crop 224 + flip, eval resize 256 / center-crop 224.
Expected: ~76-77% top-1 (Goyal et al. report 76.3% with step decay). Runtime not measured here
(no ImageNet offline); estimate ~8 h on 8x NVIDIA A100, i.e. ~10k img/s.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

TRAIN_IMAGES = 1_281_167


def get_config():
    config = default_config()
    config.model = "resnet50"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("imagenet2012")
    config.data.image_size = 224
    config.global_batch_size = 1024
    steps_per_epoch = TRAIN_IMAGES // config.global_batch_size
    config.num_train_steps = 90 * steps_per_epoch
    config.label_smoothing = 0.1
    config.compute_dtype = "bfloat16"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1 * config.global_batch_size / 256
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 5 * steps_per_epoch
    config.log_every_steps = 100
    config.eval_every_steps = steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
    return config
