"""Shared fixtures for the data tests: one offline `digits` build per test session."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

import cnnjax.data  # noqa: F401  (registers the `digits` builder)
from cnnjax.data.pipeline import default_data_config


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tfds data dir holding a freshly generated `digits` dataset."""
    root = str(tmp_path_factory.mktemp("tfds_digits"))
    tfds.builder("digits", data_dir=root).download_and_prepare()
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
