"""cnnjax.utils.validation: the shared number and array-value checks."""

import math

import jax
import numpy as np
import pytest

from cnnjax.utils.validation import check_number, concrete_value, given_dtype


@pytest.mark.parametrize("value, kwargs, expected", [
    (0.5, {"low": 0.0, "high": 1.0}, 0.5),
    (0, {"low": 0.0, "high": 1.0}, 0.0),                      # closed ends by default
    ("0.25", {"low": 0.0, "high": 1.0}, 0.25),                # anything float() takes
    (math.inf, {"low": 0.0, "low_open": True}, math.inf),     # (0, inf]
    (3, {"low": 0.0, "high_open": True}, 3.0),                # [0, inf)
])
def test_check_number_accepts(value, kwargs, expected):
    assert check_number("f", "x", value, "expected ok", **kwargs) == expected


def test_check_number_can_refuse_numeric_strings():
    """A module field used as-is (`drop_rate > 0`) must be a number, not text float() takes."""
    with pytest.raises(ValueError, match=r"^f: x='0\.25' is invalid; expected ok\.$"):
        check_number("f", "x", "0.25", "expected ok", strings=False)
    assert check_number("f", "x", 0.25, "expected ok", strings=False) == 0.25


@pytest.mark.parametrize("value, kwargs", [
    (True, {}),                                               # bools are not numbers here
    (math.nan, {}),
    ("abc", {}),
    (None, {}),
    (1.5, {"low": 0.0, "high": 1.0}),
    (0.0, {"low": 0.0, "low_open": True}),
    (math.inf, {"low": 0.0, "high_open": True}),
])
def test_check_number_rejects_with_the_standard_message(value, kwargs):
    with pytest.raises(ValueError, match=r"^f: x=.* is invalid; expected ok\.$"):
        check_number("f", "x", value, "expected ok", **kwargs)


def test_concrete_value_is_none_under_tracing():
    assert np.array_equal(concrete_value([1, 2]), [1, 2])
    seen = []
    jax.jit(lambda x: seen.append(concrete_value(x)) or x)(np.ones(2))
    assert seen == [None]


def test_given_dtype_keeps_64_bit_types():
    assert given_dtype(np.zeros(2, np.int64)) == np.int64
    assert given_dtype([True, False]) == np.bool_
