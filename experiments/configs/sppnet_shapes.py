"""SPP-net on `shapes_multi` (64x64 scenes of 1-4 shapes): Fast R-CNN's shared stride-8 map and
486 window proposals (or each scene's selective-search boxes), each pooled by a 1+4+16-bin
spatial pyramid, mAP.

Command:
    python -m experiments.train --config=experiments/configs/sppnet_shapes.py \\
        --workdir=workdirs/sppnet_shapes

With the paper's selective-search proposals (`data.proposals`; ~40 per scene, computed once and
cached, ~2 min for the train split the first time):
    python -m experiments.train --config=experiments/configs/sppnet_shapes.py:selective_search \\
        --workdir=workdirs/sppnet_shapes_ss

Expected (measured with the first command, 2 CPU cores, JAX 0.10.2): on the 500 test scenes
mAP@0.5 0.693 and COCO mAP@[.5:.95] 0.344 after 800 steps (0.527 / 0.233 at step 400); 203 s wall
(83 train images/s). `--config.model_kwargs.pyramid_levels="(4,)"`, i.e. the original Fast
R-CNN's single 4x4 RoI max pool, reaches 0.703 / 0.365 (145 s); `fast_rcnn_shapes.py`, the same
network with 4x4 RoIAlign, 0.994 / 0.840. The quantization, not the pyramid, is what costs:
these 12-26 px windows span 1.5-3 cells of the stride-8 map, and RoI max pooling snaps them to
whole cells (the loss of localization RoIAlign, He et al. 2017, was made to remove).
With selective search (measured the same way, the proposals already cached): 0.946 / 0.609
after 800 steps (0.934 / 0.573 at step 400), 137 s wall (112 train images/s); its boxes fit the
shapes, so far less is lost to the snapping.
The first ever run also builds `shapes_multi` (~12 s). Rerunning the command resumes.
"""

from experiments.configs._detection import shapes_detection_config


def get_config(proposals: str | None = None):
    # The same recipe as fast_rcnn_shapes.py: only the RoI pooling differs.
    return shapes_detection_config("sppnet_small", global_batch_size=16, proposals=proposals)
