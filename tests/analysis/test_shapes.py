"""Output-size and parameter formulas: the worked examples, and agreement with XLA and Flax."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from cnnjax.analysis.shapes import (
    conv_macs,
    conv_output_size,
    conv_params,
    conv_transpose_output_size,
    pool_output_size,
    same_padding,
)
from cnnjax.layers import pooling as pooling_module
from cnnjax.layers.pooling import max_pool2d


def test_same_size_3x3():
    assert conv_output_size(32, 3, stride=1, padding=1) == 32


def test_alexnet_conv1_sizes():
    assert conv_output_size(227, 11, stride=4) == 55  # (227 - 11)/4 + 1 = 55 exactly
    assert conv_output_size(227, 11, stride=4, exact=True) == 55
    assert conv_output_size(224, 11, stride=4, padding=2) == 55  # 55.25 floored
    assert conv_output_size(227, 11, stride=4, padding=2) == 56  # (227 - 11 + 4)/4 + 1 = 56


def test_exact_raises_with_the_fraction():
    with pytest.raises(ValueError, match=r"conv_output_size: size=224 is invalid; .*= 55\.25 is "
                                         r"not an integer"):
        conv_output_size(224, 11, stride=4, padding=2, exact=True)


def test_matches_xla_convolution_shapes():
    """Independent reference: the output shape XLA computes for lax.conv_general_dilated."""
    for size, k, s, p, d in itertools.product((7, 10, 13), (1, 2, 3), (1, 2, 3), (0, 1, 2), (1, 2)):
        if d * (k - 1) + 1 > size + 2 * p:
            continue
        out = jax.eval_shape(
            lambda x, w, s=s, p=p, d=d: jax.lax.conv_general_dilated(
                x, w, (s, s), [(p, p), (p, p)], rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC")),
            jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32),
            jax.ShapeDtypeStruct((k, k, 1, 1), jnp.float32),
        ).shape
        assert conv_output_size(size, k, s, p, d) == out[1], (size, k, s, p, d)


def test_dilation_formula():
    # floor((W - d(F-1) - 1 + 2P)/S) + 1 = (32 - 4 - 1 + 0)/1 + 1 = 28
    assert conv_output_size(32, 3, dilation=2) == 28
    assert conv_output_size(32, 3, padding=2, dilation=2) == 32


def test_asymmetric_padding_pair():
    # TF "SAME" on 224 with k=7, s=2 pads (2, 3): (224 + 5 - 7)/2 + 1 = 112
    assert same_padding(224, 7, 2) == (2, 3)
    assert conv_output_size(224, 7, 2, padding=(2, 3)) == 112


def test_same_padding_matches_lax():
    for size, k, s, d in itertools.product((5, 8, 11), (1, 3, 4), (1, 2, 3), (1, 2)):
        expected = jax.lax.padtype_to_pads((size,), ((k - 1) * d + 1,), (s,), "SAME")[0]
        assert same_padding(size, k, s, d) == tuple(expected)


def test_ceil_mode_follows_pytorch():
    # GoogLeNet's 3x3/2 pools with ceil_mode: 112 -> 56 (floor would give 55).
    assert conv_output_size(112, 3, 2) == 55
    assert conv_output_size(112, 3, 2, ceil_mode=True) == 56
    # (5 + 2 - 2)/2 = 2.5 -> ceil 3, +1 = 4, but the 4th window would start at 6 >= 5 + 1, inside
    # the right padding, so PyTorch drops it: 3.
    assert conv_output_size(5, 2, 2, padding=1, ceil_mode=True) == 3
    assert conv_output_size(6, 3, 2, ceil_mode=True) == 3
    assert pool_output_size(6, 2) == 3


def test_pool_padding_is_at_most_half_the_kernel_as_max_pool2d():
    """pool_output_size refuses exactly the paddings max_pool2d refuses, and agrees elsewhere."""
    with pytest.raises(ValueError, match=r"^pool_output_size: padding=3 is invalid; expected at "
                                         r"most half the kernel size 2, as max_pool2d\.$"):
        pool_output_size(5, 2, 2, 3)
    for size, kernel, stride, padding, ceil in itertools.product(
            (5, 8), (1, 2, 3), (1, 2, 3), (0, 1, 2), (False, True)):
        x = jnp.zeros((1, size, size, 1))
        if 2 * padding > kernel:
            with pytest.raises(ValueError, match="padding"):
                max_pool2d(x, kernel, stride, padding)
            with pytest.raises(ValueError, match=r"^pool_output_size: padding="):
                pool_output_size(size, kernel, stride, padding, ceil)
        else:
            out = max_pool2d(x, kernel, stride, padding, ceil).shape[1]
            assert pool_output_size(size, kernel, stride, padding, ceil) == out


def test_ceil_mode_still_refuses_a_kernel_larger_than_the_padded_input():
    """Documented deviation: PyTorch's ceil_mode pooling of 2x2 by 3x3/2 gives one output (a
    window hanging over both edges); cnnjax refuses it everywhere, as max_pool2d does."""
    docs = (conv_output_size.__doc__, pool_output_size.__doc__, pooling_module.__doc__)
    assert all("larger than the padded input" in " ".join(doc.split()) for doc in docs)
    with pytest.raises(ValueError, match=r"^max_pool2d: kernel_size=3 is invalid; expected at "
                                         r"most the padded input size \(2, 2\)"):
        max_pool2d(jnp.zeros((1, 2, 2, 1)), 3, 2, ceil_mode=True)
    with pytest.raises(ValueError, match=r"^conv_output_size: kernel=3 is invalid"):
        conv_output_size(2, 3, 2, ceil_mode=True)
    # named as pool_output_size, the function called (it named conv_output_size, which it uses)
    with pytest.raises(ValueError, match=r"^pool_output_size: kernel=3 is invalid; .* must fit "
                                         r"in the padded input size\+padding=2"):
        pool_output_size(2, 3, 2, ceil_mode=True)
    with pytest.raises(ValueError, match=r"^pool_output_size: kernel=3 is invalid"):
        pool_output_size(1, 3)


def test_transpose_size_formula_and_xla():
    # DCGAN-style upsampling doubles: (5 - 1)*2 - 2 + 3 + 0 + 1 = 10.
    assert conv_transpose_output_size(5, 4, stride=2, padding=1) == 10
    assert conv_transpose_output_size(7, 3, stride=2, padding=1, output_padding=1) == 14
    # Reference: a transposed conv is a conv over the input dilated by s and padded by
    # d(k-1) - p before and d(k-1) - p + output_padding after.
    for size, k, s, p, op, d in itertools.product((3, 6), (2, 3, 4), (1, 2, 3), (0, 1), (0, 1),
                                                  (1, 2)):
        if op >= max(s, d) or d * (k - 1) - p < 0:
            continue
        lo = d * (k - 1) - p
        out = jax.eval_shape(
            lambda x, w, s=s, lo=lo, op=op, d=d: jax.lax.conv_general_dilated(
                x, w, (1,), [(lo, lo + op)], lhs_dilation=(s,), rhs_dilation=(d,),
                dimension_numbers=("NWC", "WIO", "NWC")),
            jax.ShapeDtypeStruct((1, size, 1), jnp.float32),
            jax.ShapeDtypeStruct((k, 1, 1), jnp.float32),
        ).shape
        assert conv_transpose_output_size(size, k, s, p, op, d) == out[1], (size, k, s, p, op, d)


def test_params_worked_example():
    # 3 input and 12 output channels, 5x5 kernels: 36 kernels of 25 weights = 900, + 12 biases.
    assert conv_params(3, 12, 5, bias=False) == 36 * 25 == 900
    assert conv_params(3, 12, 5) == 912


def test_params_match_flax():
    cases = [(3, 12, 5, 1, True), (96, 256, 5, 2, True), (8, 8, (3, 1), 4, False)]
    for cin, cout, k, g, bias in cases:
        conv = nn.Conv(cout, k if isinstance(k, tuple) else (k, k), feature_group_count=g,
                       use_bias=bias)
        variables = jax.eval_shape(conv.init, jax.random.key(0), jnp.zeros((1, 9, 9, cin)))
        n = sum(x.size for x in jax.tree_util.tree_leaves(variables))
        assert conv_params(cin, cout, k, groups=g, bias=bias) == n


def test_alexnet_grouped_conv2_has_half_the_weights():
    ungrouped = conv_params(96, 256, 5, bias=False)
    grouped = conv_params(96, 256, 5, groups=2, bias=False)
    assert ungrouped == 256 * 96 * 25 == 614_400
    assert grouped * 2 == ungrouped


def test_two_3x3_cheaper_than_one_5x5():
    c = 64
    assert 2 * conv_params(c, c, 3, bias=False) == 18 * c * c
    assert conv_params(c, c, 5, bias=False) == 25 * c * c


def test_conv_macs_alexnet_conv1():
    # 55*55 positions * 96 filters * 3*11*11 taps = 105.4M multiply-accumulates.
    assert conv_macs(3, 96, 11, 55) == 105_415_200
    assert conv_macs(96, 256, 5, 27, groups=2, batch_size=2) == 2 * 27 * 27 * 256 * 48 * 25


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: conv_output_size(0, 3),
         r"conv_output_size: size=0 is invalid; expected a positive"),
        (lambda: conv_output_size(8, 0), r"conv_output_size: kernel=0 is invalid"),
        (lambda: conv_output_size(8, 3, stride=0), r"conv_output_size: stride=0 is invalid"),
        (lambda: conv_output_size(8, 3, dilation=-1), r"conv_output_size: dilation=-1 is invalid"),
        (lambda: conv_output_size(8, 3, padding=-1),
         r"conv_output_size: padding=-1 is invalid; expected every entry >= 0"),
        (lambda: conv_output_size(8, 3, padding=(1, 2, 3)),
         r"conv_output_size: padding=\(1, 2, 3\) is invalid; expected an int or a pair"),
        (lambda: conv_output_size(4, 7, padding=1),
         r"conv_output_size: kernel=7 is invalid; the effective kernel .*=7 must fit in the "
         r"padded input size\+padding=6"),
        (lambda: conv_output_size(5, 3, dilation=3),
         r"conv_output_size: kernel=3 is invalid; the effective kernel .*=7"),
        (lambda: conv_transpose_output_size(5, 3, stride=2, output_padding=2),
         r"conv_transpose_output_size: output_padding=2 is invalid; expected 0 <= output_padding "
         r"< max\(stride, dilation\) = 2"),
        (lambda: conv_transpose_output_size(1, 1, padding=1),
         r"conv_transpose_output_size: padding=1 is invalid; it leaves an output size of -1"),
        (lambda: conv_transpose_output_size(5, 3, padding=-1),
         r"conv_transpose_output_size: padding=-1 is invalid; expected an integer >= 0"),
        (lambda: conv_params(96, 256, 5, groups=5),
         r"conv_params: groups=5 is invalid; in_channels=96 must be divisible by it"),
        (lambda: conv_params(96, 250, 5, groups=4),
         r"conv_params: groups=4 is invalid; out_channels=250 must be divisible by it"),
        (lambda: conv_params(0, 8, 3), r"conv_params: in_channels=0 is invalid"),
        (lambda: conv_params(3, 8, (3, 3, 3)), r"conv_params: kernel=\(3, 3, 3\) is invalid"),
        (lambda: conv_macs(3, 8, 3, 0), r"conv_macs: output_size=0 is invalid"),
        (lambda: conv_macs(3, 8, 3, 5, batch_size=0), r"conv_macs: batch_size=0 is invalid"),
        (lambda: same_padding(8, 3, stride=0), r"same_padding: stride=0 is invalid"),
        # Truthy non-bools used to switch the mode on silently.
        (lambda: conv_output_size(5, 2, 2, ceil_mode="yes"),
         r"^conv_output_size: ceil_mode='yes' is invalid; expected True or False\.$"),
        (lambda: conv_output_size(224, 11, 4, padding=2, exact=1),
         r"^conv_output_size: exact=1 is invalid; expected True or False\.$"),
        (lambda: pool_output_size(5, 2, ceil_mode="no"),
         r"^pool_output_size: ceil_mode='no' is invalid; expected True or False\.$"),
        # size and stride are checked by pool_output_size itself, not conv_output_size.
        (lambda: pool_output_size(0, 3),
         r"^pool_output_size: size=0 is invalid; expected a positive integer\.$"),
        (lambda: pool_output_size(5, 3, stride=0),
         r"^pool_output_size: stride=0 is invalid; expected a positive integer\.$"),
        (lambda: conv_params(3, 8, 3, bias="no"),
         r"^conv_params: bias='no' is invalid; expected True or False\.$"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
