"""cnnjax.data: tfds datasets (catalogue and offline builders), presets and tf.data pipelines.

Importing it registers cnnjax's offline tfds builders (`digits`, `shapes`,
`shapes_multi`, `shapes_segmentation`). It imports
TensorFlow but does not configure it; the pipeline functions hide GPUs from TensorFlow when they
first build one.
"""

from cnnjax.data.builders import Digits, Shapes
from cnnjax.data.pipeline import (
    DatasetInfo,
    DatasetNotPreparedError,
    default_data_config,
    eval_batches,
    get_dataset_info,
    hide_gpus_from_tensorflow,
    steps_per_epoch,
    train_batches,
)
from cnnjax.data.presets import DatasetPreset, get_preset, list_datasets

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DatasetPreset",
    "Digits",
    "Shapes",
    "default_data_config",
    "eval_batches",
    "get_dataset_info",
    "get_preset",
    "hide_gpus_from_tensorflow",
    "list_datasets",
    "steps_per_epoch",
    "train_batches",
]
