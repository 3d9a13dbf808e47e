"""FCN-8s (ResNet-18 backbone) semantic segmentation of `shapes_segmentation` (64x64 scenes of
1-4 shapes; 5 classes with background), mean IoU.

Command:
    python -m experiments.train --config=experiments/configs/fcn_shapes.py \\
        --workdir=workdirs/fcn_shapes

Expected: see the measured figures below (filled in from the command above).
The first ever run also builds `shapes_segmentation` (~5 s). Rerunning the command resumes.
"""

from cnnjax.data.segmentation import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.task = "segmentation"
    config.model = "fcn8s_resnet18"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")  # the shapes preset's normalization
    config.data.tfds_name = "shapes_segmentation"  # 2,000 train / 500 test scenes
    config.global_batch_size = 16
    config.num_train_steps = 1000
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.best_metric = "miou"
    return config
