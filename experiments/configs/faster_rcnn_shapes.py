"""Faster R-CNN (small VGG-style backbone) on `shapes_multi`: 64x64 scenes of 1-4 shapes, mAP.

Command:
    python -m experiments.train --config=experiments/configs/faster_rcnn_shapes.py \\
        --workdir=workdirs/faster_rcnn_shapes

Expected (measured with that command, 2 CPU cores shared with other jobs, JAX 0.10.2): on the
500 test scenes mAP@0.5 (VOC all-point) 0.997 and COCO mAP@[.5:.95] 0.860 (AP75 0.973) after
800 steps (3.2 epochs; already 0.994 / 0.786 at step 400). 179 s wall for the whole command
(173 s in the loop, ~81 train images/s; 276 s in a run with a busier machine). Compare
`yolo_shapes.py` (YOLO v1: 0.643 / 0.259 in 2,400 steps): anchors + RoIAlign localize far
better than v1's fully connected grid regression.
The first ever run also builds `shapes_multi` (~12 s). Rerunning the command resumes.
"""

from experiments.configs._detection import shapes_detection_config


def get_config():
    return shapes_detection_config("faster_rcnn_small", global_batch_size=16)
