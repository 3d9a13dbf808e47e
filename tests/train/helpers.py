"""Shared test fixtures for the engine: a tiny BatchNorm+dropout CNN and an in-memory data source.

The data source implements the `cnnjax.data.pipeline` API (`get_dataset_info`, `train_batches`,
`eval_batches`) on synthetic images whose class is the bright quadrant, so the engine can be
tested independently of tfds; batch k is a pure function of (seed, k), like the real pipeline.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.models import registry
from cnnjax.train.parallel import DataParallel
from cnnjax.tune.space import apply_overrides

TINY_MODEL = "test_tiny_bn_cnn"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 4
NUM_TRAIN = 64
NUM_EVAL = 27  # not a multiple of any batch size used: exercises padding + mask

DatasetInfo = collections.namedtuple(
    "DatasetInfo", "name num_classes image_shape num_train num_eval"
)


class TinyNet(nn.Module):
    """conv -> BatchNorm -> relu -> dropout -> dense `head`: all the state the engine syncs."""

    num_classes: int = NUM_CLASSES
    dtype: object = jnp.float32
    axis_name: str | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = nn.Conv(4, (3, 3), padding="VALID", dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name="bn",
        )(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def _tiny_factory(**kwargs) -> TinyNet:
    return TinyNet(**kwargs)


#: Registry entry of the test-only model: registered per test (`install_fake_pipeline`,
#: `tiny_model_registered`), never at import, so it cannot leak into `list_models()` (the zoo).
TINY_MODEL_INFO = {"input_shape": IMAGE_SHAPE, "min_input_size": 3, "num_classes": NUM_CLASSES}


def tiny_model_registered():
    """A `with` block in which `TINY_MODEL` is registered (e.g. a subprocess script)."""
    return registry.registered_model(TINY_MODEL, _tiny_factory, **TINY_MODEL_INFO)


def register_tiny_model(monkeypatch) -> None:
    """Registers `TINY_MODEL` until the test ends (undone with the test's `monkeypatch`)."""
    info = registry.ModelInfo(TINY_MODEL, _tiny_factory, IMAGE_SHAPE, 3, NUM_CLASSES, "test-only")
    monkeypatch.setitem(registry._REGISTRY, TINY_MODEL, info)


def _examples(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    images = rng.normal(0, 0.3, (n, *IMAGE_SHAPE)).astype(np.float32)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return images, labels


def get_dataset_info(data_config):
    if data_config.name != "synthetic":
        raise ValueError(
            f"data: name={data_config.name!r} is invalid; expected one of ['synthetic']"
        )
    return DatasetInfo("synthetic", NUM_CLASSES, IMAGE_SHAPE, NUM_TRAIN, NUM_EVAL)


def train_batches(
    data_config,
    *,
    global_batch_size,
    num_devices,
    seed,
    start_step=0,
    process_index=0,
    process_count=1,
):
    images, labels = _examples("train", NUM_TRAIN)
    per_device = global_batch_size // num_devices
    step = start_step
    while True:
        idx = np.random.default_rng([seed, step]).choice(NUM_TRAIN, global_batch_size)
        yield {
            "image": images[idx].reshape(num_devices, per_device, *IMAGE_SHAPE),
            "label": labels[idx].reshape(num_devices, per_device),
        }
        step += 1


def eval_batches(data_config, *, global_batch_size, num_devices, process_index=0, process_count=1):
    images, labels = _examples("eval", NUM_EVAL)
    per_device = global_batch_size // num_devices
    for start in range(0, NUM_EVAL, global_batch_size):
        img, lab = (
            images[start : start + global_batch_size],
            labels[start : start + global_batch_size],
        )
        pad = global_batch_size - len(lab)
        mask = np.concatenate([np.ones(len(lab), np.float32), np.zeros(pad, np.float32)])
        img = np.concatenate([img, np.zeros((pad, *IMAGE_SHAPE), np.float32)])
        lab = np.concatenate([lab, np.zeros(pad, np.int32)])
        yield {
            "image": img.reshape(num_devices, per_device, *IMAGE_SHAPE),
            "label": lab.reshape(num_devices, per_device),
            "mask": mask.reshape(num_devices, per_device),
        }


class SimulatedCrashError(Exception):
    """Raised by `crashing_batches`: a run dying mid-training, in process."""


def crashing_batches(train_batches, at_step: int):
    """`train_batches` (a pipeline's function) that raises `SimulatedCrashError` when asked for the
    batch of step `at_step`, so the run dies after its last checkpoint before that step."""

    def crashing(*args, start_step=0, **kwargs):
        for i, batch in enumerate(train_batches(*args, start_step=start_step, **kwargs)):
            if start_step + i == at_step:
                raise SimulatedCrashError("simulated kill")
            yield batch

    return crashing


def run_until_crash(config, workdir, monkeypatch, at_step: int = 9,
                    module: str = "cnnjax.data.pipeline") -> None:
    """Runs `config` in `workdir` until it dies asking for step `at_step`'s batch (after its last
    checkpoint before that step), with `module`'s `train_batches` patched only meanwhile."""
    import pytest

    from cnnjax.train import loop

    pipeline = sys.modules[module]
    original = pipeline.train_batches
    monkeypatch.setattr(pipeline, "train_batches", crashing_batches(original, at_step))
    with pytest.raises(SimulatedCrashError):
        loop.train_and_evaluate(config, str(workdir))
    monkeypatch.setattr(pipeline, "train_batches", original)


def fake_pipeline_module() -> types.ModuleType:
    module = types.ModuleType("cnnjax.data.pipeline")
    module.get_dataset_info = get_dataset_info
    module.train_batches = train_batches
    module.eval_batches = eval_batches
    module.eval_split_name = lambda data_config: "eval"
    return module


def install_fake_pipeline(monkeypatch) -> None:
    """Routes `from cnnjax.data import pipeline` to the synthetic source (its names accepted
    by `check_config`) and registers `TINY_MODEL`, all for this test only."""
    import cnnjax.data

    register_tiny_model(monkeypatch)
    module = fake_pipeline_module()
    monkeypatch.setitem(sys.modules, "cnnjax.data.pipeline", module)
    monkeypatch.setattr(cnnjax.data, "pipeline", module, raising=False)
    accept_stand_in_data_names(monkeypatch)


def accept_stand_in_data_names(monkeypatch) -> None:
    """Turns off `check_config`'s early check of `config.data` (`check_data_fields`, against the
    presets): a stand-in data module (`synthetic`, `boxes`) checks its own config when called."""
    from cnnjax.train import config as config_lib

    monkeypatch.setattr(config_lib, "check_data_fields", lambda config: None)


def tiny_config(**overrides):
    """A seconds-long engine config on the synthetic data and tiny model."""
    import ml_collections

    from cnnjax.train.config import default_config

    config = default_config()
    config.model = TINY_MODEL
    config.data = ml_collections.ConfigDict({"name": "synthetic"})
    config.global_batch_size = 16
    config.num_train_steps = 12
    config.log_every_steps = 2
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 4
    config.optimizer.learning_rate = 0.05
    config.progress_bar = False
    config.tensorboard = False
    config.async_checkpoints = False
    return apply_overrides(config, overrides)


def at_the_end_only(config):
    """`config` evaluated and checkpointed at its last step only (each eval and save costs more
    than the tiny model's steps): for runs whose checks need no earlier checkpoint or eval."""
    config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
    return config


def record_initial_states(monkeypatch) -> list:
    """Patches `DataParallel.replicate` to record (as NumPy) the host state each run hands to the
    devices, i.e. its state at step 0 or at resume; returns the list it appends to."""
    seen: list = []
    original = DataParallel.replicate

    def spy(self, tree):
        seen.append(jax.tree.map(np.array, tree))
        return original(self, tree)

    monkeypatch.setattr(DataParallel, "replicate", spy)
    return seen


def finished_run_files(workdir: str) -> dict:
    """(mtime_ns, bytes) of a finished run's outputs and its checkpoint steps: unchanged unless
    something reran or touched it."""
    state = {}
    for name in ("summary.json", "metrics.jsonl", "trial.json", "config.json"):
        path = os.path.join(workdir, name)
        with open(path, "rb") as f:
            state[name] = (os.stat(path).st_mtime_ns, f.read())
    state["checkpoints"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    return state


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HOLDER = """import sys
from cnnjax.utils.lock import directory_lock
with directory_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def locked_by_another_process(path: str) -> Iterator[subprocess.Popen]:
    """A second Python process holding `directory_lock(path)` for the block (killed after)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              cwd=_ROOT)  # this checkout's cnnjax, wherever pytest started
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def sigterm_fallback() -> Iterator[list[int]]:
    """Installs a SIGTERM handler of the test's own for the block and yields the signals that
    reach it: a driver under test that handles SIGTERM itself leaves the list empty (without
    it, the default action would kill the test process). The previous handler comes back."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)
