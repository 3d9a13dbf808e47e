"""YOLO v1 (small variant) on `shapes_multi`: 64x64 scenes of 1-4 shapes, 4 classes, mAP.

Command:
    python -m experiments.train --config=experiments/configs/yolo_shapes.py \\
        --workdir=workdirs/yolo_shapes

Expected (measured with that command, 2 CPU cores shared with other jobs, load average ~6,
JAX 0.10.2): on the 500 test scenes mAP@0.5 (VOC all-point) 0.433 and COCO mAP@[.5:.95] 0.145
(AP75 0.053) after 1,200 steps (9.6 epochs); mAP@0.5 was 0.009 at step 400 and 0.291 at 800, so
longer training still helps (YOLO v1's fully connected head learns its per-cell layout slowly).
391 s wall for the whole command (383 s in the loop, ~107 train images/s). The first ever run
also builds `shapes_multi` into the tfds data dir (~12 s). Rerunning the command resumes.
"""

from cnnjax.data.detection import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.task = "detection"
    config.model = "yolo_v1_small"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")  # the shapes preset's normalization
    config.data.tfds_name = "shapes_multi"  # 4,000 train / 500 test scenes
    config.data.max_boxes = 4
    config.global_batch_size = 32
    config.num_train_steps = 1200
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 5e-4
    config.optimizer.grad_clip_norm = 10.0
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 100
    config.max_loss = 1e4  # eq. 3 is a sum over the grid, not a mean: early values are large
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.best_metric = "map50"
    return config
