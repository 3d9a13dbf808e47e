"""YOLO v1 (small variant) on `shapes_multi`: 64x64 scenes of 1-4 shapes, 4 classes, mAP.

Command:
    python -m experiments.train --config=experiments/configs/yolo_shapes.py \\
        --workdir=workdirs/yolo_shapes

Expected (measured with that command, 2 CPU cores shared with other jobs, JAX 0.10.2): on the
500 test scenes mAP@0.5 (VOC all-point) 0.643 and COCO mAP@[.5:.95] 0.259 (AP75 0.144) after
2,400 steps of 16 images (9.6 epochs); mAP@0.5 was 0.114 at step 800 and 0.541 at 1,600.
Measured with `detect` scoring every class of every box (the paper's decode); the same
checkpoint decoded with each box's best class only, as before, gives 0.640 / 0.258. Seed 0 is
the lowest of four: `--config.seed=1`, 2, 3 reach 0.681 / 0.278, 0.713 / 0.287, 0.727 / 0.292
(mean 0.691, sd 0.037 over the four), so a difference of ~0.04 is not a regression. The earlier
0.694 / 0.286 (commit 7a26c8c, still reproduced exactly by that commit) moved when BatchNorm's
CPU sums were reordered (8c829c6, `batch_norm_impl='auto'`): rounding-level changes send this
run down another trajectory, as another seed would. 261 s wall for the whole command at load
average ~4 (256 s in the loop, ~158 train images/s; 425 s, ~96 images/s, at load ~5 under
`nice`).
Measured earlier, with the best-class decode: 1,200 steps of 32 (the same images, half the
updates) reached only 0.433 / 0.145 in 391 s (a busier machine); at 2,400 x 16 a peak rate of
1e-3 reached 0.607.
The first ever run also builds `shapes_multi` into the tfds data dir (~12 s). Rerunning the
command resumes.
"""

from experiments.configs._detection import shapes_detection_config


def get_config():
    # Batches of 16 for 2,400 steps: the same 38,400 images (9.6 epochs) as 32 x 1,200, but twice
    # the updates, which the slowly learning fc head needs (mAP@0.5 0.433 -> 0.694 when tuned).
    config = shapes_detection_config("yolo_v1_small", global_batch_size=16, num_train_steps=2400,
                                     learning_rate=2e-3, weight_decay=5e-4, warmup_steps=100)
    config.max_loss = 1e4  # eq. 3 is a sum over the grid, not a mean: early values are large
    config.eval_every_steps = 800
    config.checkpoint_every_steps = 800
    return config
