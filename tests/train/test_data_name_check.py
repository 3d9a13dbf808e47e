"""`check_config` refuses an unknown `data.name`, and any data field a task's input module
refuses, before it imports the data pipeline (TensorFlow, ~6-9 s), with the message and accepted
names of the pipeline's own check (`spec.resolve`, `get_dataset_info`)."""

from __future__ import annotations

import os

import pytest

from cnnjax.data import presets
from cnnjax.data.spec import default_data_config, resolve
from cnnjax.train import config as config_lib
from cnnjax.train.config import check_config, default_config, model_kwargs_config
from tests.commands import ROOT

# Not presets: tfds catalogue names (read through a preset's `data.tfds_name`, never as
# `data.name`), a versioned name, a preset's tfds name, and malformed ones.
NOT_PRESETS = ["imagenet_v2", "cifar10_corrupted", "mnist:3.0.1", "imagenette/320px-v2",
               "shapes_multi", "", " mnist", "MNIST", None]


def _config(name):
    config = default_config()
    config.model = "lenet5"
    config.model_kwargs = model_kwargs_config(config.model)
    config.data = default_data_config("digits")
    config.data.name = name
    return config


def _resolve_error(name) -> str | None:
    """The pipeline's own verdict on `name`: its ValueError's message, None if accepted."""
    data = default_data_config("digits")
    data.name = name
    try:
        resolve(data)
    except ValueError as err:
        return str(err)
    return None


class _PipelineImportedError(Exception):
    pass


@pytest.fixture
def no_pipeline(monkeypatch):
    """`data_pipeline` (the TensorFlow import) raises `_PipelineImportedError` when reached."""
    def refuse(config):
        raise _PipelineImportedError

    monkeypatch.setattr(config_lib, "data_pipeline", refuse)


@pytest.mark.parametrize("name", NOT_PRESETS)
def test_a_name_the_pipeline_refuses_is_refused_before_it_loads(no_pipeline, name):
    expected = _resolve_error(name)
    assert expected == f"data: name={name!r} is invalid; expected one of " \
                       f"{presets.list_datasets()}."
    with pytest.raises(ValueError) as err:
        check_config(_config(name))
    assert str(err.value) == expected


@pytest.mark.parametrize("name", presets.list_datasets())
def test_every_name_the_pipeline_accepts_reaches_it(no_pipeline, name):
    assert _resolve_error(name) is None
    with pytest.raises(_PipelineImportedError):
        check_config(_config(name))


def _experiment(config_file: str, **data_fields):
    """An experiment config (`experiments/configs/<config_file>`) with `data_fields` set."""
    from tests.experiments.test_configs import _load

    config = _load(os.path.join(ROOT, "experiments", "configs", config_file)).get_config()
    with config.data.unlocked():
        for name, value in data_fields.items():
            setattr(config.data, name, value)
    return config


@pytest.mark.parametrize(("config_file", "fields"), [
    ("lenet5_digits.py", {"image_size": -1}),
    ("lenet5_digits.py", {"rand_augment": (2, 9), "augment": False}),
    ("yolo_shapes.py", {"max_boxes": 0}),
    ("yolo_shapes.py", {"classes": (1, 2)}),
    ("rcnn_shapes.py", {"proposals": {"method": "edge_boxes"}}),
    ("fcn_shapes.py", {"scale_range": (2.0, 1.0)}),
    ("fcn_shapes.py", {"train_examples_per_class": 5}),
])
def test_a_data_field_the_input_module_refuses_is_refused_before_it_loads(
        monkeypatch, config_file, fields):
    """Each task's input module's own refusal (`get_dataset_info`, TensorFlow loaded), raised
    by `check_config` before `data_pipeline` is reached, with the same message."""
    config = _experiment(config_file, **fields)
    with pytest.raises(ValueError) as expected:
        config_lib.data_pipeline(config).get_dataset_info(config.data)

    def refuse(config):
        raise _PipelineImportedError

    monkeypatch.setattr(config_lib, "data_pipeline", refuse)
    with pytest.raises(ValueError) as err:
        check_config(config)
    assert str(err.value) == str(expected.value)
    assert str(err.value).startswith(("data: ", "data.proposals: "))


@pytest.mark.parametrize("config_file", ["lenet5_digits.py", "yolo_shapes.py", "rcnn_shapes.py",
                                         "fcn_shapes.py", "resnet50_imagenet.py"])
def test_each_tasks_shipped_config_reaches_the_pipeline(no_pipeline, config_file):
    with pytest.raises(_PipelineImportedError):
        check_config(_experiment(config_file))
