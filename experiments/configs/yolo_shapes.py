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

from experiments.configs._detection import shapes_detection_config


def get_config():
    config = shapes_detection_config("yolo_v1_small", global_batch_size=32, num_train_steps=1200,
                                     learning_rate=2e-3, weight_decay=5e-4, warmup_steps=100)
    config.max_loss = 1e4  # eq. 3 is a sum over the grid, not a mean: early values are large
    return config
