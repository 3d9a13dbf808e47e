"""`create_train_state`'s initial variables: the init program is compiled at LLVM level 1 on CPU
(it runs once; XLA's default level spent seconds to minutes optimizing it) and its variables are
bitwise those of the init compiled at XLA's levels 2 and 3."""

import jax
import numpy as np
import optax
import pytest

from cnnjax.models import create_model
from cnnjax.train import state as state_lib
from cnnjax.train.state import create_train_state, init_variables, seed_key


def _reference_variables(model, rng, input_shape, level):
    init_rng, _ = jax.random.split(rng)
    lowered = jax.jit(lambda r: init_variables(model, r, input_shape)).lower(init_rng)
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": level})
    return jax.device_get(compiled(init_rng))


def _check_init(name, input_shape, seed):
    model = create_model(name, num_classes=10)
    state = jax.device_get(create_train_state(model, optax.sgd(0.1), seed_key(seed), input_shape))
    got = {"params": state.params, "batch_stats": state.batch_stats}
    for level in (2, 3):
        want = _reference_variables(model, seed_key(seed), input_shape, level)
        want.setdefault("batch_stats", {})
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_the_init_program_is_compiled_at_level_1_on_cpu(monkeypatch):
    options = []
    original = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kwargs):
        options.append(compiler_options)
        return original(self, compiler_options=compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    model = create_model("lenet5", num_classes=10)
    create_train_state(model, optax.sgd(0.1), seed_key(0), (1, 32, 32, 1))
    assert options == [state_lib.INIT_COMPILER_OPTIONS]
    assert state_lib.INIT_COMPILER_OPTIONS == {"xla_backend_optimization_level": 1}


@pytest.mark.parametrize("seed", [0, 7])
def test_lenet5_init_is_bitwise_that_of_xla_default_levels(seed):
    _check_init("lenet5", (1, 32, 32, 1), seed)


@pytest.mark.slow
def test_batchnorm_resnet_init_is_bitwise_that_of_xla_default_levels():
    _check_init("resnet20_cifar", (1, 32, 32, 3), 0)
