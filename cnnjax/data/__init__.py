"""cnnjax.data: tfds datasets (catalogue and offline builders), presets and tf.data pipelines.

Importing it registers cnnjax's offline tfds builders (`digits`, `shapes`, `shapes_multi`,
`shapes_segmentation`) but does not import TensorFlow: the pipeline names below load
`cnnjax.data.pipeline` (and TensorFlow, ~6 s) on first access. So an experiment script parses its
flags and config (`cnnjax.data.spec.default_data_config`) and reports a bad value in seconds.
The pipeline functions hide GPUs from TensorFlow when they first build one.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnnjax.data.builders import Digits, Shapes
from cnnjax.data.presets import DatasetPreset, get_preset, list_datasets
from cnnjax.data.spec import default_data_config

_PIPELINE_NAMES = frozenset({
    "DatasetInfo",
    "DatasetNotPreparedError",
    "eval_batches",
    "get_dataset_info",
    "hide_gpus_from_tensorflow",
    "steps_per_epoch",
    "train_batches",
})

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


def __getattr__(name: str) -> Any:
    """Loads `cnnjax.data.pipeline` (TensorFlow) only when one of its names is first used."""
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module("cnnjax.data.pipeline"), name)
    raise AttributeError(f"module 'cnnjax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _PIPELINE_NAMES)
