"""R-CNN on `shapes_multi` (64x64 scenes of 1-4 shapes): each of 149 external window proposals
warped to 24x24 and classified by its own CNN pass, mAP.

Command:
    python -m experiments.train --config=experiments/configs/rcnn_shapes.py \\
        --workdir=workdirs/rcnn_shapes

Expected (measured with that command, 2 CPU cores shared with other jobs, JAX 0.10.2): on the
500 test scenes mAP@0.5 (VOC all-point) 0.847 and COCO mAP@[.5:.95] 0.603 (AP75 0.706) after
800 steps of 8 images (0.799 / 0.504 at step 400). 184 s wall for the whole command (177 s in
the loop, ~51 train images/s). Its 149 windows every 8 px are coarser than Fast R-CNN's 486
every 4 px (`fast_rcnn_shapes.py`: 0.994 / 0.840), because every region costs a CNN pass.
The first ever run also builds `shapes_multi` (~12 s). Rerunning the command resumes.
"""

from cnnjax.data.detection import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.task = "detection"
    config.model = "rcnn_small"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")  # the shapes preset's normalization
    config.data.tfds_name = "shapes_multi"  # 4,000 train / 500 test scenes
    config.data.max_boxes = 4
    config.global_batch_size = 8  # one CNN pass per region: 8 x 32 RoIs = 256 warps per step
    config.num_train_steps = 800
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.grad_clip_norm = 10.0
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.best_metric = "map50"
    return config
