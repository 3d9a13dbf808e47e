"""Shared fixtures for the data tests: one offline `digits` build per test session."""

from __future__ import annotations

import pytest

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
