"""YOLO v1 (Redmon et al. 2016, the paper's 24-convolution network) on PASCAL VOC 2007 at
448x448, mAP on the 4,952 test images.

Command (voc/2007 must be prepared in the tfds data dir by hand; cnnjax never downloads):
    python -m experiments.train --config=experiments/configs/yolo_voc2007.py \\
        --workdir=workdirs/yolo_voc2007 --config.data.data_dir=$TFDS_DATA_DIR
On a cluster (launch/README.md; the overrides go after `--`):
    python -m launch.submit --entry=train --config=experiments/configs/yolo_voc2007.py \\
        --workdir=workdirs/yolo_voc2007 --gpus_per_node=1 -- --config.data.data_dir=$TFDS_DATA_DIR

Recipe, the paper's section 2.2 where cnnjax has it: trainval (5,011 images), 135 epochs of
batch 64, SGD momentum 0.9, weight decay 5e-4, a warmup to 1e-2 then decay (cosine here instead
of the paper's steps), dropout 0.5 after the first fc layer (the model's default), horizontal
flips (the paper's random scaling, translation and HSV jitter are not implemented). Difficult
objects are left out of the training targets and ignored by the eval, as in the VOC devkit;
boxes without area (x2 <= x1 or y2 <= y1) are left out of the training targets too, as in
torchvision's references, and kept by the eval, as in pycocotools.
Metrics: every eval reports `map50` (all-point AP, the VOC2010+ devkit) and `map50_voc07`
(VOC2007's 11-point interpolated AP, the metric of the paper's VOC 2007 figures: compare that
one), per class too (`ap50/<c>`, `ap50_voc07/<c>`); `--config.best_metric=map50_voc07` picks the
best checkpoint by the paper's metric.
Expected: not measured here (VOC cannot be downloaded offline). The paper's 63.4% mAP used
ImageNet-pretrained convolutions and VOC 2007+2012 training; from scratch on 2007 alone expect
clearly less. Budget: 10,570 steps of 64 448x448 images (~20 GFLOPs each forward), hours on one
modern GPU.
"""

from cnnjax.data.spec import detection_data_config as default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

TRAINVAL_IMAGES = 5_011
EPOCHS = 135


def get_config():
    config = default_config()
    config.task = "detection"
    config.model = "yolo_v1"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("voc2007")  # trainval / test, 448x448, ImageNet mean/std
    config.data.max_boxes = 42  # the most objects in one VOC 2007 image
    config.data.augment = True  # horizontal flips of image and boxes
    config.global_batch_size = 64
    config.num_train_steps = EPOCHS * TRAINVAL_IMAGES // config.global_batch_size
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-2
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 2 * TRAINVAL_IMAGES // config.global_batch_size
    config.max_loss = 1e4  # eq. 3 is a sum over the grid, not a mean: early values are large
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    config.best_metric = "map50"
    return config
