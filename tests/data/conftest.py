"""Shared fixtures for the data tests: one offline `digits` build per test session."""

from __future__ import annotations

import pytest

from cnnjax.data import pipeline
from cnnjax.data.pipeline import default_data_config, get_dataset_info


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tfds data dir where the pipeline generated `digits` on first use."""
    root = str(tmp_path_factory.mktemp("tfds_digits"))
    config = default_data_config("digits")
    config.data_dir = root
    get_dataset_info(config)
    return root


@pytest.fixture
def digits_config(digits_dir: str):
    """Returns `make(**overrides)`: a `digits` data config reading from the session's data dir."""

    def make(**overrides):
        config = default_data_config("digits")
        config.data_dir = digits_dir
        for key, value in overrides.items():
            config[key] = value
        return config

    return make


class SourceOpenedError(Exception):
    """Raised by `whole_image_source_stub` where a dense-target dataset would be read."""


@pytest.fixture
def whole_image_source_stub(monkeypatch: pytest.MonkeyPatch) -> type[SourceOpenedError]:
    """Stops detection/segmentation data at `pipeline.open_whole_image_source` (asserting the
    resolved spec is 4x4 with augmentation on) by raising the returned exception: the config
    was accepted, and nothing is read or built."""
    def open_whole_image_source(spec, make_source):
        assert spec.size == (4, 4) and spec.augment
        raise SourceOpenedError

    monkeypatch.setattr(pipeline, "open_whole_image_source", open_whole_image_source)
    return SourceOpenedError

