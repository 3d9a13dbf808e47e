"""ResNet-50 fine-tuned on Imagenette from torchvision's ImageNet weights (transfer learning).

Commands (the torchvision file and imagenette/320px-v2 must already be on disk; cnnjax never
downloads). First convert the weights into a warm-start workdir, then fine-tune from it:
    python -m cnnjax.models.torchvision_weights --model=resnet50 \\
        --weights=/path/resnet50-0676ba61.pth --workdir=workdirs/pretrained/resnet50
    python -m experiments.train --config=experiments/configs/resnet50_imagenette_pretrained.py \\
        --workdir=workdirs/resnet50_imagenette_pretrained --config.data.data_dir=$TFDS_DATA_DIR \\
        --config.init_from.workdir=workdirs/pretrained/resnet50
Adding `--config.freeze=backbone` makes it a linear probe (backbone weights frozen, BatchNorm
statistics still adapt: docs/training.md); leaving out `init_from` trains the same recipe from
scratch (the from-scratch arm of a comparison; the config itself sets no
init_from). The head (1000 ImageNet classes) is re-initialized for Imagenette's 10
(`init_from.exclude=('head',)`, the default).

Preprocessing matches torchvision's training of these weights: RGB in [0, 1] normalized with
the ImageNet mean/std (the imagenette preset), random-resized-crop 224 + flip, eval resize 256 /
center-crop 224. Recipe: batch 64, SGD momentum 0.9, lr 0.005 (a tenth of a from-scratch rate)
with cosine decay over 5 epochs, weight decay 1e-4.
Expected: ~98% validation top-1 or more (Imagenette's 10 classes are ImageNet classes and its
images are ImageNet images, so this mostly checks that the weights and preprocessing are right;
not measured here: no weights or data offline). Runtime estimate ~5 min on one NVIDIA A100.
"""

from cnnjax.data.spec import default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

TRAIN_IMAGES = 9_469


def get_config():
    config = default_config()
    config.model = "resnet50"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("imagenette")
    config.data.image_size = 224
    config.global_batch_size = 64
    steps_per_epoch = TRAIN_IMAGES // config.global_batch_size
    config.num_train_steps = 5 * steps_per_epoch
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.005
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "cosine"
    config.log_every_steps = 20
    config.eval_every_steps = steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
    return config
