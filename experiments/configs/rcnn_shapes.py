"""R-CNN on `shapes_multi` (64x64 scenes of 1-4 shapes): each of 149 external window proposals
(or each scene's ~40 selective-search boxes) warped with the paper's context padding to 24x24 and
classified by its own CNN pass, mAP.

Command:
    python -m experiments.train --config=experiments/configs/rcnn_shapes.py \\
        --workdir=workdirs/rcnn_shapes

With the paper's selective-search proposals (`data.proposals`; computed once and cached, ~2 min
for the train split the first time):
    python -m experiments.train --config=experiments/configs/rcnn_shapes.py:selective_search \\
        --workdir=workdirs/rcnn_shapes_ss

Expected (measured with the first command, 2 CPU cores, JAX 0.10.2): on the 500 test scenes
mAP@0.5 (VOC all-point) 0.897 and COCO mAP@[.5:.95] 0.692 (AP75 0.816) after 800 steps of 8
images (0.856 / 0.604 at step 400), 98 s wall (97 train images/s). Without context padding
(`--config.model_kwargs.context_padding=0`, a tight warp) 0.847 / 0.603. The 149 windows every 8
px are coarser than Fast R-CNN's 486 every 4 px because every region costs a CNN pass; they cover
only 28% of the objects at IoU 0.7. With selective search: 0.998 / 0.907 (AP75 0.996) after 800
steps (0.995 / 0.848 at step 400), 92 s wall (102 train images/s), ahead of Faster R-CNN's
0.997 / 0.860 on these flat-coloured shapes, which selective search segments almost perfectly.
(mAPs measured again once the CNN's BatchNorm statistics left out `sample_rois`' padding rows,
~18 of the 32 per scene here: before, 0.998 / 0.912; the wall time is the earlier run's.)
The SVM stage on either run: `python -m experiments.rcnn_svm --workdir=<that workdir>`.
The first ever run also builds `shapes_multi` (~12 s). Rerunning the command resumes.
"""

from experiments.configs._detection import shapes_detection_config


def get_config(proposals: str | None = None):
    # One CNN pass per region: 8 x 32 RoIs = 256 warps per step.
    config = shapes_detection_config("rcnn_small", global_batch_size=8, proposals=proposals)
    config.model_kwargs.context_padding = 2  # the paper's 16 of 227 warped pixels, at 24
    return config
