"""benchmarks.train_step: the step it times takes the engine's options, checked before building."""

import pytest

from benchmarks.train_step import build_jax_step


def test_accumulation_must_divide_the_per_device_batch():
    with pytest.raises(ValueError, match=r"train_step: grad_accum_steps=3 is invalid; expected a "
                                         r"divisor of the per-device batch 8 \(batch_size 8 / 1 "
                                         r"devices\)"):
        build_jax_step("lenet5", 10, 8, (32, 32, 1), 1, "pmap", "float32", {"accum_steps": 3})


def test_the_options_reach_the_state():
    from cnnjax.train.ema import ExponentialMovingAverage

    bench = build_jax_step("lenet5", 10, 8, (32, 32, 1), 1, "pmap", "float32",
                           {"accum_steps": 2, "ema": ExponentialMovingAverage(0.9)})
    assert set(bench["state"].ema) == {"params", "batch_stats"}
