"""`check_config` refuses an unknown `data.name` before it imports the data pipeline (TensorFlow,
~6-9 s), with the message and accepted names of the pipeline's own check (`spec.resolve`)."""

from __future__ import annotations

import pytest

from cnnjax.data import presets
from cnnjax.data.spec import default_data_config, resolve
from cnnjax.train import config as config_lib
from cnnjax.train.config import check_config, default_config, model_kwargs_config

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
