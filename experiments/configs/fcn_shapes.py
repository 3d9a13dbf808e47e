"""FCN-8s (ResNet-18 backbone) semantic segmentation of `shapes_segmentation` (64x64 scenes of
1-4 shapes; 5 classes with background), mean IoU.

Command:
    python -m experiments.train --config=experiments/configs/fcn_shapes.py \\
        --workdir=workdirs/fcn_shapes

Expected (measured with that command, 2 CPU cores, JAX 0.10.2, 2026-12-02, after the
upsamplings began clamping at the borders): on the 500 test scenes mean IoU 0.804 (background
0.963, circle 0.850, square 0.845, triangle 0.704, cross 0.658) and pixel accuracy 0.967 after
1,000 steps of 16 (8 epochs); mIoU 0.505 at step 250, 0.784 at 500, 0.803 at 750. Upsampled
against zeros (before), the same command gave 0.797 (0.402, 0.765, 0.793 on the way) in 393 s
wall (47 train images/s) on cores shared only with test runs; this run took 1,847 s beside busy
review jobs. After 5c6d95c (the fixed upsampling as 1-D passes; same outputs to 5e-7), at
idle on a Zen 2 machine (2026-12-04): mean IoU 0.803 (0.482, 0.784, 0.802 on the way), pixel
accuracy 0.967, in 235 s of training (78 train images/s; 3m57s for the whole command).
ImageNet weights for the backbone (`config.init_from`, torchvision ResNet-18) are the paper's
setting; here it trains from scratch.
The first ever run also builds `shapes_segmentation` (~5 s). Rerunning the command resumes.
"""

from cnnjax.data.spec import segmentation_data_config as default_data_config
from cnnjax.train.config import default_config, model_kwargs_config


def get_config():
    config = default_config()
    config.task = "segmentation"
    config.model = "fcn8s_resnet18"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")  # the shapes preset's normalization
    config.data.tfds_name = "shapes_segmentation"  # 2,000 train / 500 test scenes
    config.global_batch_size = 16
    config.num_train_steps = 1000
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.best_metric = "miou"
    return config
