"""Fast R-CNN on `shapes_multi` (64x64 scenes of 1-4 shapes): a shared stride-8 map, RoIAlign
of 486 external window proposals per image (or each scene's selective-search boxes), mAP.

Command:
    python -m experiments.train --config=experiments/configs/fast_rcnn_shapes.py \\
        --workdir=workdirs/fast_rcnn_shapes

With the paper's selective-search proposals (`data.proposals`; ~40 per scene, computed once and
cached, ~2 min for the train split the first time):
    python -m experiments.train --config=experiments/configs/fast_rcnn_shapes.py:selective_search \\
        --workdir=workdirs/fast_rcnn_shapes_ss

Expected (measured with the first command, 2 CPU cores shared with other jobs, JAX 0.10.2): on
the 500 test scenes mAP@0.5 (VOC all-point) 0.994 and COCO mAP@[.5:.95] 0.840 (AP75 0.966) after
800 steps (0.989 / 0.767 at step 400). 229 s wall for the whole command (221 s in the loop,
~74 train images/s). With selective search: 0.996 / 0.862 (AP75 0.982) after 800 steps (0.994 /
0.787 at step 400), 123 s wall (126 train images/s: 40 regions per scene instead of 486).
Faster R-CNN's learned proposals (`faster_rcnn_shapes.py`) reach 0.997 / 0.860.
The first ever run also builds `shapes_multi` (~12 s). Rerunning the command resumes.
"""

from experiments.configs._detection import shapes_detection_config


def get_config(proposals: str | None = None):
    return shapes_detection_config("fast_rcnn_small", global_batch_size=16, proposals=proposals)
