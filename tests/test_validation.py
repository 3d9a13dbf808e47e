"""cnnjax.utils.validation: the shared number and array-value checks."""

import math
import re

import jax
import numpy as np
import pytest

from cnnjax.layers.pooling import max_pool2d
from cnnjax.utils.validation import (
    check_bool,
    check_bool_array,
    check_depth,
    check_known_fields,
    check_nhwc_nonempty,
    check_non_negative_int,
    check_number,
    check_optional_bool,
    check_positive_float,
    check_positive_int,
    check_positive_ints,
    concrete_value,
    given_dtype,
    invalid,
    listed,
    to_pair,
)


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
    with pytest.raises(ValueError, match=r"^f: x=b'0\.25' is invalid; expected ok\.$"):
        check_number("f", "x", b"0.25", "expected ok", strings=False)  # float() takes bytes too
    assert check_number("f", "x", 0.25, "expected ok", strings=False) == 0.25


@pytest.mark.parametrize("value, kwargs", [
    (True, {}),                                               # bools are not numbers here
    (np.True_, {}),                                           # NumPy's bool neither
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


@pytest.mark.parametrize("mask", [[True, False], np.array([1, 0], bool), jax.numpy.ones(2, bool)])
def test_check_bool_array_accepts_bool_masks(mask):
    check_bool_array("owner", "mask", mask)


@pytest.mark.parametrize("mask, dtype", [
    (np.array([1.0, 0.5]), "float64"),  # given dtype, before jnp.asarray narrows it to float32
    ([1, 0], "int64"),
    (jax.numpy.ones(2, jax.numpy.bfloat16), "bfloat16"),
    (np.array([1, 0], np.uint8), "uint8"),  # an image-style 0/1 mask is not a bool one
])
def test_check_bool_array_refuses_other_dtypes_naming_the_given_one(mask, dtype):
    with pytest.raises(ValueError, match=re.escape(
            f"owner: gt_valid.dtype='{dtype}' is invalid; expected a bool array.")):
        check_bool_array("owner", "gt_valid", mask)


@pytest.mark.parametrize("value, expected", [
    (3, (3, 3)),
    ((3, 2), (3, 2)),
    (np.int64(3), (3, 3)),
    ((np.int64(3), np.int32(2)), (3, 2)),
    (np.array([3, 2]), (3, 2)),
    ((np.uint8(1), 4), (1, 4)),
])
def test_to_pair_accepts_python_and_numpy_integers_as_python_ints(value, expected):
    pair = to_pair("f", "k", value)
    assert pair == expected and all(type(v) is int for v in pair)


@pytest.mark.parametrize("value", [True, np.bool_(True), (True, 2), (np.bool_(True), 2), 2.5,
                                   np.float64(2.0), (2.0, 2), None, "ab", (1, 2, 3), (1,)])
def test_to_pair_rejects_bools_floats_and_non_pairs(value):
    with pytest.raises(ValueError, match=r"^f: k=.* is invalid; expected an int or a pair of "
                                         r"ints\.$"):
        to_pair("f", "k", value)


@pytest.mark.parametrize("value", [0, np.int64(0), (np.int64(2), 0)])
def test_to_pair_enforces_the_minimum_on_numpy_integers_too(value):
    with pytest.raises(ValueError, match=r"^f: k=.* is invalid; expected every entry >= 1\.$"):
        to_pair("f", "k", value)


def test_max_pool2d_takes_numpy_integer_kernels():
    """The NumPy reference: the max over each non-overlapping 3 x 2 window."""
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    expected = x.reshape(2, 2, 3, 2, 2, 3).max(axis=(2, 4))
    got = max_pool2d(x, (np.int64(3), np.int64(2)))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(max_pool2d(x, np.array([3, 2])), expected)


@pytest.mark.parametrize("value", [True, np.bool_(True), 0, -1.0, math.inf, math.nan, "x", None])
def test_check_positive_float_refuses_bools_and_non_positive_values(value):
    """A bool is a flag typed into the wrong field (lr_min=True would be 1.0), never a rate."""
    with pytest.raises(ValueError, match=r"^optimizer: learning_rate=.* is invalid; expected a "
                                         r"positive"):
        check_positive_float("optimizer", "learning_rate", value)


@pytest.mark.parametrize("value, expected", [(0.1, 0.1), (3, 3.0), (np.float32(0.5), 0.5)])
def test_check_positive_float_accepts_positive_numbers(value, expected):
    assert check_positive_float("optimizer", "learning_rate", value) == expected


@pytest.mark.parametrize("value", [True, False, None, np.bool_(True), np.bool_(False)])
def test_check_optional_bool_accepts_bools_and_none(value):
    """NumPy's bools too (a flag read from an array or a NumPy config), returned as Python's."""
    got = check_optional_bool("f", "flag", value)
    assert got is (None if value is None else bool(value))


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_check_bool_accepts_python_and_numpy_bools(value):
    assert check_bool("f", "flag", value) is bool(value)


@pytest.mark.parametrize("value", ["False", 0, 1, 1.0, None, np.array([True]), np.int8(1)])
def test_check_bool_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"^f: flag=.* is invalid; expected True or False\.$"):
        check_bool("f", "flag", value)


def test_to_pair_refuses_entries_xla_cannot_hold():
    """strides=2**63 was an OverflowError from inside the lowering ("Python int too large to
    convert to C long"); 2**63 - 1 is the largest int64."""
    assert to_pair("f", "strides", 2**63 - 1) == (2**63 - 1, 2**63 - 1)
    with pytest.raises(ValueError, match=r"^f: strides=\(1, 9223372036854775808\) is invalid; "
                                         r"expected every entry below 2\*\*63"):
        to_pair("f", "strides", (1, 2**63))


@pytest.mark.parametrize("value", ["no", 0, 1.0, np.int8(0)])
def test_check_optional_bool_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"^f: flag=.* is invalid; expected True, False or "
                                         r"None\.$"):
        check_optional_bool("f", "flag", value)


def test_check_nhwc_nonempty_refuses_empty_maps_but_not_empty_batches():
    check_nhwc_nonempty("f", np.zeros((0, 2, 3, 1)))
    for shape in ((1, 0, 3, 1), (1, 2, 0, 1)):
        with pytest.raises(ValueError, match=rf"^f: input.shape={re.escape(repr(shape))} is "
                                             r"invalid; expected height and width >= 1"):
            check_nhwc_nonempty("f", np.zeros(shape))
    with pytest.raises(ValueError, match=r"^f: input.shape=\(2, 3\) is invalid; expected a "
                                         r"rank-4 NHWC array"):
        check_nhwc_nonempty("f", np.zeros((2, 3)))


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_integer_checks_accept_numpy_integers_as_python_ints(value):
    """`nms(max_output_size=np.int64(39))`, `roi_align(sampling_ratio=np.int64(2))`: a NumPy
    integer is an integer (the message said "expected a positive integer" of one)."""
    for check in (check_positive_int, check_non_negative_int):
        got = check("nms", "max_output_size", value)
        assert got == 3 and type(got) is int
    assert check_positive_ints("SPPNet", "pyramid_levels", (value, 1), "v") == (3, 1)
    assert type(check_positive_ints("SPPNet", "pyramid_levels", (value,), "v")[0]) is int
    depth = check_depth("CifarResNet", value * 6 + 2, 6, 2, "basic blocks")  # 20
    assert depth == 3 and type(depth) is int



def test_layer_arguments_take_numpy_integers():
    """The docstring above names `roi_align(sampling_ratio=np.int64(2))`: it and the pyramid
    levels of both SPP layers once refused NumPy integers (checked with `isinstance(v, int)`)."""
    from cnnjax.layers import roi_align, roi_spatial_pyramid_pool, spatial_pyramid_pool

    feats = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    boxes, index = np.array([[0.0, 0.0, 6.0, 5.0]], np.float32), np.zeros(1, np.int32)
    np.testing.assert_array_equal(roi_align(feats, boxes, index, 2, sampling_ratio=np.int64(2)),
                                  roi_align(feats, boxes, index, 2, sampling_ratio=2))
    np.testing.assert_array_equal(spatial_pyramid_pool(feats, np.array([1, 2, 4])),
                                  spatial_pyramid_pool(feats, (1, 2, 4)))
    np.testing.assert_array_equal(roi_spatial_pyramid_pool(feats, boxes, index, (np.int64(2),)),
                                  roi_spatial_pyramid_pool(feats, boxes, index, (2,)))

@pytest.mark.parametrize(("owner", "depth", "per_unit", "offset", "n"), [
    ("CifarResNet", 8, 6, 2, 1),       # ResNet-8, the smallest: n = 1 is valid
    ("CifarResNet", 110, 6, 2, 18),    # (110 - 2) / 6
    ("cifar_densenet", 40, 3, 4, 12),  # DenseNet-40: (40 - 4) / 3
    ("cifar_densenet", 100, 6, 4, 16),  # DenseNet-BC-100: (100 - 4) / 6
])
def test_check_depth_returns_the_units_per_stage(owner, depth, per_unit, offset, n):
    assert check_depth(owner, depth, per_unit, offset, "blocks") == n


def test_check_depth_refuses_a_depth_below_one_unit():
    with pytest.raises(ValueError, match=r"^CifarResNet: depth=2 is invalid; expected 6n \+ 2 "
                                         r"with n >= 1 for basic blocks \(8, 14, 20, \.\.\.\)\.$"):
        check_depth("CifarResNet", 2, 6, 2, "basic blocks")


def test_positive_int_takes_its_upper_bound_itself():
    """`high` is inclusive ("at most `high`")."""
    assert check_positive_int("f", "n", 5, high=5) == 5
    with pytest.raises(ValueError, match=r"^f: n=6 is invalid; expected a positive integer\.$"):
        check_positive_int("f", "n", 6, high=5)


@pytest.mark.parametrize(("names", "limit", "text"), [
    (["a", "b"], 2, "'a', 'b'"),                   # exactly the limit: no "and 0 more"
    (["a", "b", "c"], 2, "'a', 'b' and 1 more"),
    ([1, 2, 3, 4, 5], 3, "1, 2, 3 and 2 more"),
    ([], 2, ""),
])
def test_listed_names_the_first_and_counts_the_rest(names, limit, text):
    assert listed(names, limit) == text


@pytest.mark.parametrize("value", [True, np.True_, 3.0, np.float64(3), "3", None, 0, -1])
def test_positive_int_refuses_bools_floats_strings_and_non_positive(value):
    with pytest.raises(ValueError, match=r"^nms: max_output_size=.* is invalid; expected a "
                                         r"positive integer\.$"):
        check_positive_int("nms", "max_output_size", value)


def test_known_fields_name_the_first_unknown_key_and_list_the_valid_ones():
    """One refusal for the config blocks a Python config file can add keys to (ema, init_from,
    mixing, distill): the first unknown key in sorted order, the valid fields in their order."""
    import ml_collections

    check_known_fields("ema", {"decay": 0.9}, ("decay", "warmup"))  # a subset is fine
    check_known_fields("ema", {}, {"decay": None, "warmup": True})  # a mapping's keys
    block = ml_collections.ConfigDict({"decay": 0.9, "warmup": True, "zz": 1, "decy": 0.99})
    with pytest.raises(ValueError) as err:
        check_known_fields("ema", block, ("decay", "warmup"))
    assert str(err.value) == ("ema: field='decy' is invalid; expected one of ['decay', "
                              "'warmup'].")


@pytest.mark.parametrize("valid,ending", [
    ("expected a positive int", "expected a positive int."),
    ('the config has no field \'nam\'; Did you mean "name"?', 'Did you mean "name"?'),
    ("expected 1, 2 or 3.", "expected 1, 2 or 3."),
    ("it must stop!", "it must stop!"),
])
def test_invalid_ends_with_one_stop(valid, ending):
    """A `valid` text that already ends a sentence (a quoted suggestion's `?`) gets no `.` after
    it: the launcher printed `Did you mean "learning_rate" ...?.`."""
    message = str(invalid("launch", "overrides", "--config.x=1", valid))
    assert message == f"launch: overrides='--config.x=1' is invalid; {valid}" + (
        "" if valid.endswith(("?", ".", "!")) else ".")
    assert message.endswith(ending)
