"""Every experiment config loads, passes the engine's validation and names real models/datasets."""

import glob
import importlib.util
import os

import pytest

from cnnjax.data.pipeline import get_dataset_info
from cnnjax.models import model_info
from cnnjax.train.config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expected_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {
        "lenet5_digits.py",
        "resnet20_cifar10.py",
        "resnet50_imagenet.py",
        "alexnet_imagenette.py",
        "fake_data_benchmark.py",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid_and_documents_its_command(path):
    module = _load(path)
    assert "python -m experiments.train" in module.__doc__
    assert "Expected" in module.__doc__ or "Measured" in module.__doc__
    config = module.get_config()
    validate_config(config)
    model_info(config.model)  # registered


def test_default_and_benchmark_datasets_resolve_offline():
    for name in ("lenet5_digits.py", "fake_data_benchmark.py"):
        config = _load(os.path.join(ROOT, "experiments", "configs", name)).get_config()
        info = get_dataset_info(config.data)
        assert info.num_classes == 10
