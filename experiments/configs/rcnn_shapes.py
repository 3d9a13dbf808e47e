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

from experiments.configs._detection import shapes_detection_config


def get_config():
    # One CNN pass per region: 8 x 32 RoIs = 256 warps per step.
    return shapes_detection_config("rcnn_small", global_batch_size=8)
