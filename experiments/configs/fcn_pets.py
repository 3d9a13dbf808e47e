"""FCN-8s (ResNet-18 backbone, ImageNet-pretrained) semantic segmentation of Oxford-IIIT Pet's
trimaps (Parkhi et al. 2012): background vs pet, the unclassified outline band ignored; mean
IoU on the 3,669 test images, scored on trimaps resized to 224x224 (`data.image_size`) by
nearest neighbour, not at each image's original resolution as the VOC protocol and the FCN
paper score, so not directly comparable with published figures.

Commands (oxford_iiit_pet must be prepared in the tfds data dir and the torchvision file on disk;
cnnjax never downloads). Convert the backbone's weights once, then train from them:
    python -m cnnjax.models.torchvision_weights --model=resnet18 \\
        --weights=/path/resnet18-f37072fd.pth --workdir=workdirs/pretrained/resnet18
    python -m experiments.train --config=experiments/configs/fcn_pets.py \\
        --workdir=workdirs/fcn_pets --config.data.data_dir=$TFDS_DATA_DIR \\
        --config.init_from.workdir=workdirs/pretrained/resnet18
`init_from.submodule='backbone'` (set here) loads the classifier's variables into the FCN's
ResNet trunk and ignores its 1000-class head; the score and upsampling layers start as the paper
initializes them. Without `init_from.workdir` the same recipe trains from scratch (a baseline,
run as its own job: `experiments.transfer` does compare arms across architectures through
`init_from.submodule`, as in experiments/transfers/shapes_to_segmentation.py, but it pretrains
its own source run rather than loading converted torchvision weights).

Recipe: whole images resized to 224x224 (the preset's ImageNet mean/std) with horizontal flips,
batch 32, 30 epochs of the 3,680 training images, AdamW 1e-3 with warmup + cosine, weight decay
1e-4. Expected: not measured here (the dataset cannot be downloaded offline); the pipeline,
checks and a few training steps are tested on mocked records (tests/train/test_pets_mocked.py).
Budget: 3,450 steps of 32 224x224 images (3.4 GFLOPs each forward), tens of minutes on one GPU.
"""

from cnnjax.data.spec import segmentation_data_config as default_data_config
from cnnjax.train.config import default_config, model_kwargs_config

TRAIN_IMAGES = 3_680
EPOCHS = 30


def get_config():
    config = default_config()
    config.task = "segmentation"
    config.model = "fcn8s_resnet18"
    config.model_kwargs = model_kwargs_config(config.model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("oxford_iiit_pet")  # trimaps: background, pet, ignored
    config.data.image_size = 224
    config.global_batch_size = 32
    steps_per_epoch = TRAIN_IMAGES // config.global_batch_size
    config.num_train_steps = EPOCHS * steps_per_epoch
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = steps_per_epoch
    config.init_from.submodule = "backbone"  # with --config.init_from.workdir=<resnet18 run>
    config.log_every_steps = 50
    config.eval_every_steps = 5 * steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
    config.best_metric = "miou"
    return config
