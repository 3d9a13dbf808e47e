"""Bad batch layouts and the check that a pipeline refuses them before opening its dataset."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from cnnjax.data import pipeline

#: (layout keyword arguments, the message refusing them)
LAYOUTS = [
    ({"global_batch_size": 7, "num_devices": 2},
     r"data: global_batch_size=7 is invalid; expected a multiple of num_devices \* "
     r"process_count = 2 \* 1 = 2\."),
    ({"global_batch_size": 4, "num_devices": 0}, r"data: num_devices=0 is invalid"),
    ({"global_batch_size": 4, "num_devices": 1, "process_index": 2, "process_count": 2},
     r"data: process_index=2 is invalid; expected 0 <= process_index < process_count=2"),
]


def assert_refused_before_opening(module: ModuleType, config: Any, monkeypatch: Any,
                                  layout: dict, message: str) -> None:
    """`module.eval_batches` (not a generator checking at the first `next`) and
    `module.train_batches` refuse `layout` without opening (or generating) the dataset."""

    def must_not_open(*args, **kwargs):
        raise AssertionError("the dataset was opened before the layout was checked")

    monkeypatch.setattr(pipeline, "open_whole_image_source", must_not_open)
    with pytest.raises(ValueError, match=message):
        module.eval_batches(config, **layout)
    with pytest.raises(ValueError, match=message):
        module.train_batches(config, seed=0, **layout)
    with pytest.raises(AssertionError, match="opened before"):  # a valid layout gets that far
        module.eval_batches(config, global_batch_size=4, num_devices=2)
