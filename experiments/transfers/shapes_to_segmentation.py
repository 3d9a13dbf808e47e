"""A ResNet-18 shape classifier's trunk as the backbone of FCN-8s, at three segmentation budgets.

Command:
    python -m experiments.transfer --transfer=experiments/transfers/shapes_to_segmentation.py \\
        --transfer_dir=workdirs/transfers/shapes_to_segmentation

Across architectures: the source is the registry `resnet18` classifying single shapes (`shapes`,
32x32, 4 classes, 2,000 images); the target is `fcn8s_resnet18` segmenting `shapes_segmentation`
scenes (64x64, 1-4 shapes, background + 4 classes) trained on the first 50, 200 or 1,000 of its
2,000 training scenes; `init_from.submodule = 'backbone'` loads the classifier (its `head`
excluded) into the FCN's ResNet trunk. The linear probe trains only FCN's score and upsampling
layers on the trunk's frozen weights (its BatchNorm statistics are still re-estimated on the
target scenes: docs/training.md, `freeze`). The shapes in both datasets have the same pixel
sizes, so what the classifier learnt (edges, corners, colour contrast at those scales) is what
the FCN's trunk needs.

Measured with this command on 2026-12-01, before FCN's upsamplings clamped at the borders
(commit 840eaf7; not rerun since), 2 CPU cores shared with test runs, JAX 0.10.2: 34 min wall
(source 600 steps in 140 s, then 9 target runs of 400 steps, 1.5-5.5 min each); a rerun skips
everything (8 s). Source: 98.25% top-1 on the 400 test shapes. Target: final mean IoU on the 500
test scenes, seed 0:
    scenes   scratch   fine-tune   linear probe
    50       0.272     0.545       0.401
    200      0.447     0.736       0.405
    1000     0.479     0.738       0.414
Fine-tuning the pretrained trunk gains +0.26 to +0.29 mIoU at every budget; at 200 scenes it
beats scratch on five times the data. The linear probe (trunk weights frozen, BatchNorm
statistics re-estimated) stays near 0.41 whatever the budget: 1x1 score layers on the
classifier's fixed convolutions (strides 8, 16 and 32) do not delineate the shapes. All arms
train 400 steps; from scratch on all 2,000 scenes for 1,000 steps the same FCN reached 0.797
then (0.804 with the clamped upsampling, experiments/configs/fcn_shapes.py), so at this length
the gain is likely more a faster start than a better end point (not measured with longer target
runs).
"""

import ml_collections

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config
from experiments.configs import fcn_shapes


def _source() -> ml_collections.ConfigDict:
    """ResNet-18 (ImageNet layout) on `shapes` with its pad-crop-flip augmentation."""
    config = default_config()
    config.model = "resnet18"
    config.data = default_data_config("shapes")
    config.global_batch_size = 64
    config.num_train_steps = 600  # ~19 epochs of 2,000 images
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 30
    config.log_every_steps = 50
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 300
    config.progress_bar = False
    return config


def _target() -> ml_collections.ConfigDict:
    """experiments/configs/fcn_shapes.py, 400 steps whatever the budget."""
    config = fcn_shapes.get_config()
    config.init_from.submodule = "backbone"  # the source fills the FCN's ResNet trunk
    config.num_train_steps = 400
    config.schedule.warmup_steps = 20
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.progress_bar = False
    return config


def get_config():
    config = ml_collections.ConfigDict()
    config.source = _source()
    config.target = _target()
    config.budget_field = "data.train_split"
    config.budgets = ("train[:50]", "train[:200]", "train[:1000]")
    config.arms = ("scratch", "finetune", "linear_probe")
    config.seeds = (0,)
    config.arm_overrides = ml_collections.ConfigDict()
    config.metric = "miou"
    return config
