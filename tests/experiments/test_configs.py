"""Every experiment config loads, passes the engine's validation and names real models/datasets."""

import glob
import importlib.util
import os
import re

import pytest

from cnnjax.data.pipeline import get_dataset_info
from cnnjax.models import model_info
from cnnjax.train.config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))
# `_*.py` (e.g. `_detection.py`) hold defaults that configs share; they are not configs.
CONFIGS = [c for c in CONFIGS if not os.path.basename(c).startswith("_")]


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


@pytest.mark.parametrize("name", ["rcnn_shapes.py", "sppnet_shapes.py", "fast_rcnn_shapes.py"])
def test_proposal_argument_of_the_rcnn_family_configs(name):
    """`--config=<file>.py:selective_search` sets data.proposals and nothing else;
    `:windows` is the plain config."""
    from cnnjax.train.config import flatten

    module = _load(os.path.join(ROOT, "experiments", "configs", name))
    plain, windows = flatten(module.get_config()), flatten(module.get_config("windows"))
    searched = flatten(module.get_config("selective_search"))
    assert windows == plain
    assert {k: v for k, v in searched.items() if v != plain[k]} == {
        "data.proposals.method": "selective_search", "data.proposals.scale": 2.0,
        "data.proposals.max_proposals": 160}
    validate_config(module.get_config("selective_search"))
    with pytest.raises(ValueError, match=re.escape(
            "config: argument='edge_boxes' is invalid; expected one of ['windows', "
            "'selective_search'].")):
        module.get_config("edge_boxes")


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


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_declares_its_model_fields(path):
    """So that `--config.model_kwargs.<field>=<value>` works on the locked command-line config."""
    from cnnjax.train.config import model_kwargs_config

    config = _load(path).get_config()
    declared = config.model_kwargs
    assert set(declared) == set(model_kwargs_config(config.model)) and len(declared) > 0
    recorded = {**DETECTION_CONFIGS, **MODEL_FIELDS_SET}.get(os.path.basename(path), {})
    assert all(value is None for name, value in declared.items()  # unset: the model's defaults
               if f"model_kwargs.{name}" not in recorded)
    for name, value in recorded.items():
        if name.startswith("model_kwargs."):
            assert declared[name.split(".", 1)[1]] == value, name


#: Model fields a classification config sets (the others leave every field to the model).
MODEL_FIELDS_SET = {"wrn28_10_cifar10.py": {"model_kwargs.drop_rate": 0.3}}


def _parse(*overrides):
    """Parses `--config=<benchmark config> <overrides>` as experiments.train does (locked)."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    path = os.path.join(ROOT, "experiments", "configs", "fake_data_benchmark.py")
    argv = ["train", f"--config={path}", *overrides]
    holder = config_flags.DEFINE_config_file("config", path, flag_values=flag_values,
                                             lock_config=True, sys_argv=argv)
    flag_values(argv)
    return holder.value


def test_model_kwargs_from_the_command_line_reach_the_model(tmp_path):
    from cnnjax.train import loop

    config = _parse("--config.model_kwargs.zero_init_last_bn=True",
                    "--config.model_kwargs.num_filters=16")
    run = loop._Run(config, str(tmp_path), 0.0)
    run.setup()  # builds data info, model and optimizer; compiles nothing
    assert run.model.zero_init_last_bn is True and run.model.num_filters == 16
    assert run.model.shortcut == "B"  # unset: resnet18's default
    with pytest.raises(AttributeError):  # locked: a field the model does not have is refused
        _parse("--config.model_kwargs.widht=8")


# What each shapes_multi detection config sets beyond `default_config()` with
# `detection.default_data_config("shapes")` and its model's declared kwargs, recorded before the
# shared part moved to `experiments/configs/_detection.py`.
_DETECTION_SHARED = {
    "task": "detection", "data.tfds_name": "shapes_multi", "data.max_boxes": 4,
    "optimizer.name": "adamw", "optimizer.grad_clip_norm": 10.0, "schedule.name": "warmup_cosine",
    "log_every_steps": 50, "eval_every_steps": 400, "checkpoint_every_steps": 400,
    "best_metric": "map50", "num_train_steps": 800, "optimizer.learning_rate": 1e-3,
    "optimizer.weight_decay": 1e-4, "schedule.warmup_steps": 50,
}
DETECTION_CONFIGS = {
    "rcnn_shapes.py": {**_DETECTION_SHARED, "model": "rcnn_small", "global_batch_size": 8,
                       "model_kwargs.context_padding": 2},
    "fast_rcnn_shapes.py": {**_DETECTION_SHARED, "model": "fast_rcnn_small",
                            "global_batch_size": 16},
    "sppnet_shapes.py": {**_DETECTION_SHARED, "model": "sppnet_small", "global_batch_size": 16},
    "faster_rcnn_shapes.py": {**_DETECTION_SHARED, "model": "faster_rcnn_small",
                              "global_batch_size": 16},
    # Since re-tuned (was 32 x 1,200 steps, evals every 400): 16 x 2,400, evals every 800.
    "yolo_shapes.py": {**_DETECTION_SHARED, "model": "yolo_v1_small", "global_batch_size": 16,
                       "num_train_steps": 2400, "optimizer.learning_rate": 2e-3,
                       "optimizer.weight_decay": 5e-4, "schedule.warmup_steps": 100,
                       "max_loss": 1e4, "eval_every_steps": 800,
                       "checkpoint_every_steps": 800},
}


@pytest.mark.parametrize("name", sorted(DETECTION_CONFIGS))
def test_detection_configs_resolve_to_their_recorded_values(name):
    """Every field equals the default except the recorded ones, which equal their values."""
    from cnnjax.data import detection
    from cnnjax.train.config import default_config, flatten, model_kwargs_config

    config = _load(os.path.join(ROOT, "experiments", "configs", name)).get_config()
    reference = default_config()
    reference.data = detection.default_data_config("shapes")
    reference.model_kwargs = model_kwargs_config(config.model)
    flat, defaults = flatten(config), flatten(reference)
    assert set(flat) == set(defaults)
    assert {k: v for k, v in flat.items() if v != defaults[k]} == DETECTION_CONFIGS[name]


def test_configs_load_and_validate_without_tensorflow():
    """A flag or config error is reported in ~2 s, not after TensorFlow's ~6 s import: the
    configs, `cnnjax.data` and the engine's config check import no TensorFlow."""
    import subprocess
    import sys

    paths = CONFIGS
    script = (
        "import runpy, sys\n"
        "import cnnjax.data\n"
        "from cnnjax.train.config import validate_config\n"
        f"for path in {paths!r}:\n"
        "    validate_config(runpy.run_path(path)['get_config']())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
        "print(loaded[:3])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
