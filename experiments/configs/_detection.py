"""Shared defaults of the `shapes_multi` detection configs (not a config itself).

`rcnn_shapes.py`, `fast_rcnn_shapes.py`, `faster_rcnn_shapes.py` and `yolo_shapes.py` differ only
in the model and the few hyperparameters passed here; everything else (data, optimizer family,
schedule, logging/eval/checkpoint cadence, the mAP that picks the best checkpoint) is this one
recipe, so their measured results compare detectors rather than set-ups.
"""

import ml_collections

from cnnjax.data.spec import detection_data_config as default_data_config
from cnnjax.train.config import default_config, model_kwargs_config
from cnnjax.utils.validation import check_choice

# The config argument of the R-CNN-family configs (`--config=<file>.py:<argument>`).
PROPOSAL_ARGUMENTS = ("windows", "selective_search")


def shapes_detection_config(model: str, *, global_batch_size: int, num_train_steps: int = 800,
                            learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                            warmup_steps: int = 50, proposals: str | None = None,
                            ) -> ml_collections.ConfigDict:
    """A detection run of `model` on `shapes_multi` (AdamW, clipped, warmup + cosine, mAP@0.5).

    `proposals` (R-CNN, SPP-net, Fast R-CNN): None or "windows" for the model's dense windows,
    "selective_search" for each scene's selective-search boxes (upsampled 2x before segmenting:
    ~40 boxes per 64x64 scene covering 99.9% of the objects at IoU 0.7,
    `python -m benchmarks.proposals`)."""
    config = default_config()
    config.task = "detection"
    config.model = model
    config.model_kwargs = model_kwargs_config(model)  # --config.model_kwargs.<field>=...
    config.data = default_data_config("shapes")  # the shapes preset's normalization
    config.data.tfds_name = "shapes_multi"  # 4,000 train / 500 test scenes
    config.data.max_boxes = 4
    config.global_batch_size = global_batch_size
    config.num_train_steps = num_train_steps
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = learning_rate
    config.optimizer.weight_decay = weight_decay
    config.optimizer.grad_clip_norm = 10.0
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = warmup_steps
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.best_metric = "map50"
    if check_choice("config", "argument", proposals or "windows",
                    PROPOSAL_ARGUMENTS) == "selective_search":
        config.data.proposals.method = "selective_search"
        config.data.proposals.scale = 2.0
        config.data.proposals.max_proposals = 160
    return config
