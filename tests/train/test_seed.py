"""`seed_key`: every seed `validate_config` accepts (0 <= seed < 2**63) gets its own key."""

import jax
import numpy as np
import pytest

from cnnjax.train.state import seed_key


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1])
def test_seeds_below_2_to_the_32_keep_their_earlier_key(seed):
    np.testing.assert_array_equal(seed_key(seed), jax.random.PRNGKey(seed))


def test_seeds_2_to_the_32_apart_draw_differently():
    """PRNGKey alone keeps the low 32 bits: 5 and 5 + 2**32 would share weights and dropout."""
    np.testing.assert_array_equal(jax.random.PRNGKey(5), jax.random.PRNGKey(5 + 2**32))
    seeds = [5, 5 + 2**32, 5 + 2**33, 2**63 - 1]
    draws = [np.asarray(jax.random.normal(seed_key(s), (8,))) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not np.array_equal(draws[i], draws[j]), (seeds[i], seeds[j])
