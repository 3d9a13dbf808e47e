"""A '+'-joined train split whose smallest process shard holds no process batch is refused by
`check_config`, before the model is built, initialized or compiled (it was refused only by
`train_batches`, which the loop calls after initializing the model)."""

from __future__ import annotations

import re

import jax
import pytest

from cnnjax.train import config as config_lib
from cnnjax.train import loop

PROCESSES = 3
# 'train[:7]+test[:5]' (12 examples) shards over 3 processes as 5, 4 and 3 examples (tfds
# shards a '+'-joined split part by part): a process batch of 4 fits the largest only.
MESSAGE = (
    "data: global_batch_size={batch} is invalid; expected at most 9 (3 processes * 3): split "
    "'train[:7]+test[:5]' of 'digits' shards over 3 processes as [5, 4, 3] examples (tfds "
    "shards a '+'-joined split part by part), so a process batch of 4 leaves an epoch "
    "without a step.")


def _message(batch: int) -> str:
    return re.escape(MESSAGE.format(batch=batch))


@pytest.fixture
def three_processes(monkeypatch):
    """This process as process 0 of 3, each with this machine's local devices."""
    monkeypatch.setattr(jax, "process_count", lambda: PROCESSES)
    return PROCESSES * len(jax.local_devices())


def _config(digits_config, global_batch_size):
    config = config_lib.default_config()
    config.model = "lenet5"
    config.data = digits_config(train_split="train[:7]+test[:5]", image_size=32)
    config.global_batch_size = global_batch_size
    config.num_train_steps = 2
    config.progress_bar = config.tensorboard = False
    return config


def test_check_config_refuses_a_shard_without_a_process_batch(digits_config, three_processes):
    batch = 4 * three_processes  # a process batch of 4 * local devices
    if three_processes != PROCESSES:
        pytest.skip("the message's figures are for one local device")
    with pytest.raises(ValueError, match=_message(batch)):
        config_lib.check_config(_config(digits_config, batch))
    # 3 per process fits every shard (one step per epoch).
    config_lib.check_config(_config(digits_config, 3 * three_processes))
    # One process reads the whole split: one batch of 12 fits.
    jax.process_count = lambda: 1
    config_lib.check_config(_config(digits_config, 12))


def test_the_loop_refuses_it_before_initializing_the_model(digits_config, three_processes,
                                                           tmp_path, monkeypatch):
    if three_processes != PROCESSES:
        pytest.skip("the message's figures are for one local device")
    initialized = []

    def fresh_state(*args, **kwargs):
        initialized.append(True)
        raise AssertionError("the model was initialized before the batch size was checked")

    monkeypatch.setattr(loop, "fresh_state", fresh_state)
    with pytest.raises(ValueError, match=_message(12)):
        loop.train_and_evaluate(_config(digits_config, 12), str(tmp_path / "run"))
    assert not initialized
    assert not (tmp_path / "run" / "checkpoints").exists()
