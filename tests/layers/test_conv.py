"""Convolution layers checked against TensorFlow ops and float64 NumPy loop references.

Tolerance (float32): |got − want| <= 1e-4·|want| + 1e-5·max|want| (see `assert_close`).
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.test_util import check_grads

from cnnjax.layers.conv import (
    Conv2D,
    ConvTranspose2D,
    LocallyConnected2D,
    TiledConv2D,
    _geometry,
    _use_phases,
    bilinear_kernel_1d,
    bilinear_upsample_init,
)
from cnnjax.layers.conv_impl import xla_convolutions

NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _random(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def assert_close(got, want):
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))


def _init_params(module, x, seed=0):
    """Random normal params of the shapes `module.init` would make (random biases too, so bias
    layouts are tested); shapes come from `jax.eval_shape`, so nothing is compiled here."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed + 100)
    leaves = [jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(tree, leaves)


def _apply(module, x, seed=0):
    x = jnp.asarray(x)
    params = _init_params(module, x, seed)
    return params, np.asarray(jax.jit(module.apply)({"params": params}, x))


def _tf_conv(x, kernel, strides, padding, dilations=1):
    """tf.nn.conv2d with `padding` "SAME"/"VALID" or explicit ((t, b), (l, r))."""
    if not isinstance(padding, str):
        padding = [[0, 0], list(padding[0]), list(padding[1]), [0, 0]]
    return tf.nn.conv2d(x, np.asarray(kernel), strides=strides, padding=padding,
                        dilations=dilations).numpy()


# ---------------------------------------------------------------- float64 NumPy references


def _np_windows(x, kernel_hw, strides, dilation, pads, mode):
    """Float64 input windows: yields (i, j, window[N, k_h, k_w, C]) for every output position."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)),
                mode=NP_MODES[mode])
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
    out_h = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    for i in range(out_h):
        for j in range(out_w):
            yield i, j, xp[:, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                           j * sw: j * sw + dw * (kw - 1) + 1: dw, :]


def _np_local(x, kernel, bias, strides, dilation, pads, mode, kernel_hw=None):
    """Locally connected: kernel (OH, OW, C·kh·kw, F) ordered (C, kh, kw), bias (OH, OW, F);
    `kernel_hw` (kh, kw), square if not given."""
    out_h, out_w, _, f = kernel.shape
    c = x.shape[-1]
    kh, kw = kernel_hw or (round(math.sqrt(kernel.shape[2] // c)),) * 2
    k = np.asarray(kernel, np.float64).reshape(out_h, out_w, c, kh, kw, f)
    y = np.zeros((x.shape[0], out_h, out_w, f))
    for i, j, win in _np_windows(x, (kh, kw), strides, dilation, pads, mode):
        y[:, i, j] = np.einsum("nabc,cabf->nf", win, k[i, j]) + bias[i, j]
    return y


def _np_tiled(x, kernel, bias, strides, dilation, pads, mode):
    """Tiled: kernel (th, tw, kh, kw, C, F); output (i, j) uses set (i mod th, j mod tw)."""
    th, tw, kh, kw = kernel.shape[:4]
    k = np.asarray(kernel, np.float64)
    ys = {}
    for i, j, win in _np_windows(x, (kh, kw), strides, dilation, pads, mode):
        ys[i, j] = np.einsum("nabc,abcf->nf", win, k[i % th, j % tw]) + bias[i % th, j % tw]
    out_h, out_w = max(i for i, _ in ys) + 1, max(j for _, j in ys) + 1
    return np.stack([np.stack([ys[i, j] for j in range(out_w)], 1) for i in range(out_h)], 1)


def _pair(v):
    """An int hyperparameter as the (height, width) pair the layers read it as."""
    return (v, v) if isinstance(v, int) else v


def _full_pads(p):
    """An int padding as ((top, bottom), (left, right)); explicit pads unchanged."""
    return (_pair(p), _pair(p)) if isinstance(p, int) else p


def _np_conv_transpose(x, kernel, bias, strides, dilation, pads, output_padding, groups):
    """Scatter definition: x[i, j] adds x·kernel[a, b] at (i·s + a·d, j·s + b·d), then crop."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, c_in = x.shape
    kh, kw, c_in_g, f = kernel.shape
    f_g = f // groups
    (sh, sw), (dh, dw), (oph, opw) = strides, dilation, output_padding
    full = np.zeros((n, (h - 1) * sh + dh * (kh - 1) + 1 + oph,
                     (w - 1) * sw + dw * (kw - 1) + 1 + opw, f))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    for g in range(groups):
                        xin = x[:, i, j, g * c_in_g:(g + 1) * c_in_g]
                        full[:, i * sh + a * dh, j * sw + b * dw, g * f_g:(g + 1) * f_g] += (
                            xin @ kernel[a, b, :, g * f_g:(g + 1) * f_g])
    (top, bottom), (left, right) = pads
    out = full[:, top: full.shape[1] - bottom, left: full.shape[2] - right]
    return out + bias


# ---------------------------------------------------------------- Conv2D


@pytest.mark.parametrize("x_shape,kwargs,tf_args", [
    ((2, 9, 11, 3), dict(kernel_size=3), dict(strides=1, padding="VALID")),
    ((2, 9, 11, 3), dict(kernel_size=3, padding="SAME"), dict(strides=1, padding="SAME")),
    ((1, 13, 10, 4), dict(kernel_size=5, strides=2, padding="SAME"),
     dict(strides=2, padding="SAME")),
    ((1, 13, 10, 4), dict(kernel_size=(3, 5), strides=(3, 2), padding="VALID"),
     dict(strides=(3, 2), padding="VALID")),
    ((2, 11, 9, 2), dict(kernel_size=3, dilation=2, padding="SAME"),
     dict(strides=1, padding="SAME", dilations=2)),
    ((2, 11, 9, 2), dict(kernel_size=(3, 2), dilation=(2, 3)),
     dict(strides=1, padding="VALID", dilations=(2, 3))),
    ((1, 7, 9, 3), dict(kernel_size=3, strides=2, padding=1),
     dict(strides=2, padding=((1, 1), (1, 1)))),
    ((1, 7, 9, 3), dict(kernel_size=(4, 3), padding=(2, 0)),
     dict(strides=1, padding=((2, 2), (0, 0)))),
    ((1, 7, 9, 3), dict(kernel_size=3, strides=2, padding=((0, 2), (3, 1))),
     dict(strides=2, padding=((0, 2), (3, 1)))),
])
def test_conv2d_matches_tf(x_shape, kwargs, tf_args):
    x = _random(x_shape)
    layer = Conv2D(features=5, **kwargs)
    params, got = _apply(layer, x)
    want = _tf_conv(x, params["kernel"], **tf_args) + np.asarray(params["bias"])
    assert_close(got, want)


def test_conv2d_grouped_matches_per_group_tf_convs():
    groups, c_in, f = 3, 6, 9
    x = _random((2, 7, 9, c_in), 1)
    params, got = _apply(Conv2D(f, 3, strides=2, padding=1, groups=groups), x)
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (3, 3, c_in // groups, f)
    cg, fg = c_in // groups, f // groups
    parts = [_tf_conv(x[..., g * cg:(g + 1) * cg], kernel[..., g * fg:(g + 1) * fg], 2,
                      ((1, 1), (1, 1))) for g in range(groups)]
    assert_close(got, np.concatenate(parts, -1) + np.asarray(params["bias"]))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv2d_padding_modes_match_pad_then_tf_conv(mode):
    x = _random((2, 7, 9, 3), 2)
    pads = ((2, 1), (1, 2))
    params, got = _apply(Conv2D(4, (3, 4), strides=(2, 1), padding=pads, padding_mode=mode), x)
    if mode == "reflect":
        padded = tf.pad(x, [[0, 0], [2, 1], [1, 2], [0, 0]], mode="REFLECT").numpy()
    else:
        padded = np.pad(x, ((0, 0), (2, 1), (1, 2), (0, 0)), mode=NP_MODES[mode])
    want = _tf_conv(padded, params["kernel"], (2, 1), "VALID") + np.asarray(params["bias"])
    assert_close(got, want)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv2d_same_with_padding_mode(mode):
    """SAME with a non-zero mode pads by TF's SAME split, with the mode's values."""
    x = _random((1, 8, 7, 2), 3)
    params, got = _apply(Conv2D(3, 4, strides=2, padding="SAME", padding_mode=mode), x)
    # H: out 4, total (4-1)*2+4-8 = 2 -> (1, 1); W: out 4, total 6+4-7 = 3 -> (1, 2).
    padded = np.pad(x, ((0, 0), (1, 1), (1, 2), (0, 0)), mode=NP_MODES[mode])
    want = _tf_conv(padded, params["kernel"], 2, "VALID") + np.asarray(params["bias"])
    assert got.shape == (1, 4, 4, 3)
    assert_close(got, want)
    zeros = _tf_conv(x, params["kernel"], 2, "SAME") + np.asarray(params["bias"])
    assert not np.allclose(got, zeros)  # the mode really changed the border


def test_conv2d_circular_is_exactly_shift_equivariant():
    x = _random((1, 9, 8, 2), 4)
    layer = Conv2D(3, 3, padding=1, padding_mode="circular")
    params = _init_params(layer, jnp.asarray(x))
    apply = jax.jit(layer.apply)
    y = apply({"params": params}, x)
    y_shifted = apply({"params": params}, np.roll(x, (2, -3), axis=(1, 2)))
    np.testing.assert_allclose(np.roll(y, (2, -3), axis=(1, 2)), y_shifted, atol=1e-5)


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
def test_no_bias_and_computation_dtype(cls):
    x = jnp.asarray(_random((1, 5, 5, 2)))
    layer = cls(4, 3, use_bias=False, dtype=jnp.bfloat16)
    params = _init_params(layer, x)
    assert set(params) == {"kernel"} and params["kernel"].dtype == jnp.float32
    assert jax.jit(layer.apply)({"params": params}, x).dtype == jnp.bfloat16


# (layer, input shape, bias axes summed): every layer's bias gradient sums the output cotangent
# over thousands of positions (LocallyConnected2D: one bias per position, summed over a batch).
BIAS_SUMS = [
    (lambda: Conv2D(4, 3, padding=1), (8, 17, 17, 2), (0, 1, 2)),
    (lambda: Conv2D(4, 3, padding=1, padding_mode="reflect"), (8, 17, 17, 2), (0, 1, 2)),
    (lambda: LocallyConnected2D(4, 3, padding=1), (2048, 2, 2, 2), (0,)),
    (lambda: TiledConv2D(4, 3, tile_size=2, padding=1), (32, 17, 17, 2), None),  # per phase
    (lambda: ConvTranspose2D(4, 3, strides=2), (8, 8, 8, 2), (0, 1, 2)),
]


@pytest.mark.parametrize("make, shape, axes", BIAS_SUMS,
                         ids=["conv", "conv-reflect", "local", "tiled", "transposed"])
def test_bfloat16_bias_gradient_is_summed_in_float32(make, shape, axes):
    """With dtype=bfloat16 the bias gradient (a sum of the bfloat16 output cotangent over every
    output position) was summed in bfloat16: the running sum stalls once its ulp exceeds twice a
    term (at 256 for terms below 1), so over 2,312 positions it was 78% low, over 32,768 98%.
    Summed in float32 the only error left is rounding the sum to bfloat16 (2**-9; 2**-8 allowed).
    Reference: the float64 sum of the same bfloat16-rounded cotangent."""
    layer = make().clone(dtype=jnp.bfloat16)
    x = jnp.asarray(_random(shape, 5))
    params = _init_params(layer, x)
    y_shape = jax.eval_shape(lambda p: layer.apply({"params": p}, x), params).shape
    cotangent = np.random.default_rng(6).uniform(0.5, 1.0, y_shape).astype(np.float32)

    def loss(p):
        return jnp.sum(layer.apply({"params": p}, x).astype(jnp.float32) * cotangent)

    grads = jax.jit(jax.grad(loss))(params)
    rounded = np.asarray(jnp.asarray(cotangent, jnp.bfloat16), np.float64)
    if axes is None:  # TiledConv2D's bias (t_h, t_w, features): phase (a, b) of the map
        want = np.stack([np.stack([rounded[:, a::2, b::2].sum((0, 1, 2)) for b in range(2)])
                         for a in range(2)])
    else:
        want = rounded.sum(axis=axes)
    assert grads["bias"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grads["bias"], np.float64), want, rtol=2.0**-8)


def test_parameter_counts_worked_examples():
    """3 -> 12 channels, 5x5: 36 kernels (12 filters of depth 3), 900 weights + 12 biases."""
    params = jax.eval_shape(Conv2D(12, 5).init, jax.random.key(0), jnp.zeros((1, 9, 9, 3)))
    params = params["params"]
    assert params["kernel"].shape == (5, 5, 3, 12)  # 3·12 = 36 5x5 kernels
    assert params["kernel"].size == 900 and params["bias"].size == 12
    # AlexNet conv2, 96 -> 256 with 5x5 kernels: two towers halve the weights.
    x = jnp.zeros((1, 9, 9, 96))
    dense = jax.eval_shape(Conv2D(256, 5, padding=2).init, jax.random.key(0), x)["params"]
    grouped = jax.eval_shape(Conv2D(256, 5, padding=2, groups=2).init, jax.random.key(0), x)
    assert dense["kernel"].size == 614_400
    assert grouped["params"]["kernel"].size == 307_200 == dense["kernel"].size // 2
    assert grouped["params"]["bias"].size == 256


# ---------------------------------------------------------------- LocallyConnected2D


@pytest.mark.parametrize("kwargs,pads", [
    (dict(kernel_size=3), ((0, 0), (0, 0))),
    (dict(kernel_size=3, strides=2, padding=1), ((1, 1), (1, 1))),
    (dict(kernel_size=3, dilation=2, padding=((1, 2), (0, 1)), padding_mode="reflect"),
     ((1, 2), (0, 1))),
    (dict(kernel_size=3, strides=(1, 2), padding="SAME", padding_mode="replicate"),
     ((1, 1), (0, 1))),  # W: out ceil(6/2) = 3, total (3−1)·2 + 3 − 6 = 1 -> (0, 1)
    (dict(kernel_size=2, padding=(1, 0), padding_mode="circular"), ((1, 1), (0, 0))),
])
def test_locally_connected_matches_numpy(kwargs, pads):
    x = _random((2, 7, 6, 3), 5)
    layer = LocallyConnected2D(4, **kwargs)
    params, got = _apply(layer, x)
    k = layer.kernel_size
    strides = (1, 1) if "strides" not in kwargs else (
        (kwargs["strides"],) * 2 if isinstance(kwargs["strides"], int) else kwargs["strides"])
    dilation = (kwargs.get("dilation", 1),) * 2
    mode = kwargs.get("padding_mode", "zeros")
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert kernel.shape[2:] == (3 * k * k, 4) and bias.shape == got.shape[1:]
    assert_close(got, _np_local(x, kernel, bias, strides, dilation, pads, mode))


def test_locally_connected_takes_a_numpy_float64_input_as_the_other_convolutions_do():
    """flax's ConvLocal probed its output in float64 and raised lax's dtype-mix TypeError."""
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3))  # float64
    layer = LocallyConnected2D(4, 3)  # stride 1: flax's layer (stride 2 goes over patches)
    variables = layer.init(jax.random.key(0), x)
    got = layer.apply(variables, x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, layer.apply(variables, x.astype(np.float32)))


def test_locally_connected_default_init_scale():
    """Fan-in is one position's kernel (k·k·C), so the init std is ~1/sqrt(k·k·C)."""
    x = jnp.zeros((1, 6, 6, 8))
    kernel = jax.jit(LocallyConnected2D(8, 3).init)(jax.random.key(0), x)["params"]["kernel"]
    assert kernel.shape == (4, 4, 72, 8)
    np.testing.assert_allclose(float(jnp.std(kernel)), 1 / math.sqrt(72), rtol=0.05)


# ---------------------------------------------------------------- TiledConv2D


@pytest.mark.parametrize("kwargs,pads", [
    (dict(kernel_size=3, tile_size=2), ((0, 0), (0, 0))),
    (dict(kernel_size=(3, 2), tile_size=(3, 2), strides=2, padding=1), ((1, 1), (1, 1))),
    (dict(kernel_size=3, tile_size=(2, 3), dilation=2, padding=2, padding_mode="reflect"),
     ((2, 2), (2, 2))),
])
def test_tiled_matches_numpy(kwargs, pads):
    x = _random((2, 9, 8, 3), 6)
    layer = TiledConv2D(5, **kwargs)
    params, got = _apply(layer, x)
    s = kwargs.get("strides", 1)
    d = kwargs.get("dilation", 1)
    want = _np_tiled(x, np.asarray(params["kernel"]), np.asarray(params["bias"]), (s, s), (d, d),
                     pads, kwargs.get("padding_mode", "zeros"))
    assert_close(got, want)


def test_tiled_with_a_high_pad_past_the_input_matches_numpy():
    """Kernel sets whose windows start past the input's end (a bottom pad wider than the input)
    were a raw TypeError from lax.slice; Conv2D takes the same padding."""
    x = _random((2, 1, 3, 2), 12)
    layer = TiledConv2D(3, (1, 2), tile_size=(3, 2), padding=((0, 2), (1, 1)))
    params, got = _apply(layer, x)
    assert got.shape == (2, 3, 4, 3)
    want = _np_tiled(x, np.asarray(params["kernel"]), np.asarray(params["bias"]), (1, 1), (1, 1),
                     ((0, 2), (1, 1)), "zeros")
    assert_close(got, want)


def test_tiled_with_tile_1_is_ordinary_convolution():
    x = _random((2, 9, 7, 3), 7)
    tiled = TiledConv2D(4, 3, tile_size=1, strides=2, padding=1, padding_mode="replicate")
    params, got = _apply(tiled, x)
    conv = Conv2D(4, 3, strides=2, padding=1, padding_mode="replicate")
    conv_params = {"kernel": params["kernel"][0, 0], "bias": params["bias"][0, 0]}
    assert_close(got, jax.jit(conv.apply)({"params": conv_params}, x))


def test_tiled_with_tile_equal_output_is_locally_connected():
    x = _random((2, 7, 8, 3), 8)
    local = LocallyConnected2D(4, 3, strides=(2, 1), padding=1)
    params, got = _apply(local, x)
    out_h, out_w = got.shape[1:3]
    assert (out_h, out_w) == (4, 8)
    tiled = TiledConv2D(4, 3, tile_size=(out_h, out_w), strides=(2, 1), padding=1)
    # Local kernel axis 2 is ordered (C, kh, kw); the tiled kernel is (th, tw, kh, kw, C, F).
    kernel = np.asarray(params["kernel"]).reshape(out_h, out_w, 3, 3, 3, 4)
    tiled_params = {"kernel": kernel.transpose(0, 1, 3, 4, 2, 5), "bias": params["bias"]}
    assert_close(jax.jit(tiled.apply)({"params": tiled_params}, x), got)


# ---------------------------------------------------------------- ConvTranspose2D


@pytest.mark.parametrize("in_hw,k,s,p,op", [
    ((5, 7), 3, 1, 0, 0),
    ((5, 7), 3, 2, 1, 1),
    ((5, 7), 4, 2, 1, 0),
    ((4, 5), 3, 3, 0, 2),
    ((3, 5), 5, 3, 2, 1),
    ((5, 5), (3, 4), (2, 3), (1, 2), (1, 0)),
])
def test_conv_transpose_matches_tf(in_hw, k, s, p, op):
    x = _random((2, *in_hw, 3), 9)
    layer = ConvTranspose2D(4, k, strides=s, padding=p, output_padding=op)
    params, got = _apply(layer, x)
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = _pair(k), _pair(s), _pair(p), _pair(op)
    out = ((in_hw[0] - 1) * sh - 2 * ph + (kh - 1) + oh + 1,
           (in_hw[1] - 1) * sw - 2 * pw + (kw - 1) + ow + 1)
    assert got.shape == (2, *out, 4)  # (in−1)·s − 2p + d·(k−1) + output_padding + 1
    tf_filter = np.asarray(params["kernel"]).transpose(0, 1, 3, 2)  # (kh, kw, out, in)
    want = tf.nn.conv2d_transpose(x, tf_filter, output_shape=[2, *out, 4], strides=[sh, sw],
                                  padding=[[0, 0], [ph, ph], [pw, pw], [0, 0]]).numpy()
    assert_close(got, want + np.asarray(params["bias"]))


def test_conv_transpose_matches_tf_same_upsampling():
    """k=4, s=2, p=1 is TF's SAME transposed conv: output exactly 2x."""
    x = _random((1, 5, 7, 2), 10)
    params, got = _apply(ConvTranspose2D(3, 4, strides=2, padding=1), x)
    tf_filter = np.asarray(params["kernel"]).transpose(0, 1, 3, 2)
    want = tf.nn.conv2d_transpose(x, tf_filter, [1, 10, 14, 3], 2, "SAME").numpy()
    assert_close(got, want + np.asarray(params["bias"]))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, strides=2, dilation=2, padding=1, output_padding=1),
    dict(kernel_size=3, strides=2, padding=((0, 2), (1, 0)), groups=2),
    dict(kernel_size=(2, 3), strides=(1, 3), dilation=(3, 1), output_padding=(2, 1), groups=2),
    dict(kernel_size=5, strides=1, padding=((1, 2), (0, 5))),  # hi > d·(k−1): conv pad < 0
])
def test_conv_transpose_dilation_groups_match_numpy_scatter(kwargs):
    x = _random((2, 4, 5, 4), 11)
    layer = ConvTranspose2D(6, **kwargs)
    params, got = _apply(layer, x)
    want = _np_conv_transpose(x, params["kernel"], np.asarray(params["bias"]),
                              _pair(kwargs["strides"]), _pair(kwargs.get("dilation", 1)),
                              _full_pads(kwargs.get("padding", 0)),
                              _pair(kwargs.get("output_padding", 0)), kwargs.get("groups", 1))
    assert_close(got, want)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2, padding=((2, 0), (2, 0))),  # one convolution, input-dilated form
    dict(kernel_size=3, padding=((3, 1), (0, 4))),
    dict(kernel_size=(1, 3), strides=(5, 1), padding=((3, 2), (3, 1))),  # per output phase
    dict(kernel_size=2, strides=2, padding=((3, 0), (0, 3)), output_padding=1),
])
def test_conv_transpose_crops_past_the_kernel_float32(kwargs):
    """A crop wider than d·(k−1) on one side only is a negative pad on one side of the
    convolution beside a positive one: XLA:CPU's float32 convolution read outside its input
    there (errors up to 0.8, or uninitialised memory: openxla/xla#48713). Now a padded
    convolution cropped afterwards; float32, 3 channels (the float64 tests never hit it)."""
    x = _random((1, 7, 7, 3), 13)
    layer = ConvTranspose2D(2, **kwargs)
    params, got = _apply(layer, x)
    want = _np_conv_transpose(x, params["kernel"], np.asarray(params["bias"]),
                              _pair(kwargs.get("strides", 1)), (1, 1), kwargs["padding"],
                              _pair(kwargs.get("output_padding", 0)), 1)
    assert_close(got, want)
    jaxpr = jax.make_jaxpr(lambda v, xs: layer.apply(v, xs))({"params": params}, x)
    pads = [p for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"
            for side in e.params["padding"] for p in side]
    assert pads and min(pads) >= 0
    # The gradients' convolutions too (old code: input gradients off by up to 1.4e7).
    loss = lambda v, xs: jnp.sum(jnp.sin(layer.apply(v, xs)))  # noqa: E731
    got_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))({"params": params}, x)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        want_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))({"params": params64},
                                                             jnp.asarray(x, jnp.float64))
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads),
                                   strict=True):
        assert_close(got_leaf, want_leaf)


# A process of its own: the old input-dilated convolution aborted it inside XLA:CPU.
_ABORTING_TRANSPOSE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from cnnjax.layers import ConvTranspose2D
layer = ConvTranspose2D(2, (2, 4), strides=2, padding=((3, 2), (2, 1)), output_padding=(0, 1))
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 2, 1)), jnp.float32)
params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
params = {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=params["kernel"].shape),
                                jnp.float32), "bias": jnp.asarray([0.5, -0.25], jnp.float32)}
loss = lambda p, xs: jnp.sum(jnp.sin(layer.apply({"params": p}, xs)))
y = jax.jit(layer.apply)({"params": params}, x)
grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
np.savez(sys.argv[1], x=x, kernel=params["kernel"], bias=params["bias"], y=y,
         grad_kernel=grads[0]["kernel"], grad_x=grads[1])
"""


def test_conv_transpose_with_an_output_below_its_stride_runs_where_xla_cpu_aborted(tmp_path):
    """Kernel (2, 4), stride 2, padding ((3, 2), (2, 1)), output_padding (0, 1) on a 3x2 input
    (a 1x4 output): its input-dilated convolution aborted the process in XLA:CPU's algebraic
    simplifier (jax 0.10-0.11), init included. Output against the float64 scatter definition,
    gradients against its central differences."""
    import subprocess
    import sys

    out = tmp_path / "convT.npz"
    result = subprocess.run([sys.executable, "-c", _ABORTING_TRANSPOSE, str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.load(out)
    geometry = ((2, 2), (1, 1), ((3, 2), (2, 1)), (0, 1), 1)

    def reference_loss(x, kernel):
        return np.sin(_np_conv_transpose(x, kernel, got["bias"], *geometry)).sum()

    x, kernel = got["x"].astype(np.float64), got["kernel"].astype(np.float64)
    assert_close(got["y"], _np_conv_transpose(x, kernel, got["bias"], *geometry))
    want = _central_differences(reference_loss, {"x": x, "kernel": kernel})
    assert_close(got["grad_x"], want["x"])
    assert_close(got["grad_kernel"], want["kernel"])


def _central_differences(loss, args, step=1e-6):
    """d loss / d each float64 array of the dict `args`, by central differences."""
    grads = {}
    for name, value in args.items():
        grads[name] = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            delta = np.zeros_like(value)
            delta[i] = step
            up, down = (loss(**{**args, name: value + sign * delta}) for sign in (1, -1))
            grads[name][i] = (up - down) / (2 * step)
    return grads


# A process of its own: lax's input gradient of these convolutions aborts it inside XLA:CPU.
_ABORTING_INPUT_GRADIENT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from cnnjax.layers import Conv2D, LocallyConnected2D
from cnnjax.layers.conv_impl import conv_impl
kernel_size, strides, padding, dilation, impl, shape = eval(sys.argv[2])
layer = (LocallyConnected2D if impl == "local" else Conv2D)(
    2, kernel_size, strides=strides, padding=padding, dilation=dilation)
impl = "xla" if impl == "local" else impl
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32)
shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
params = {name: jnp.asarray(np.random.default_rng(i).normal(size=shapes[name].shape),
                            jnp.float32) for i, name in enumerate(("kernel", "bias"), 1)}
loss = lambda p, xs: jnp.sum(jnp.sin(layer.apply({"params": p}, xs)))
with conv_impl(impl):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    hessian_x = jax.jit(jax.hessian(loss, argnums=1))(params, x)
    # Reverse over reverse, d/dx of the kernel gradient: lax's strided primal aborted here.
    mixed = jax.jit(jax.jacrev(lambda xs: jax.grad(loss)(params, xs)["kernel"]))(x)
np.savez(sys.argv[1], x=x, kernel=params["kernel"], bias=params["bias"],
         grad_kernel=grads[0]["kernel"], grad_x=grads[1], hessian_x=hessian_x, mixed=mixed)
"""


@pytest.mark.parametrize("geometry", [
    ((2, 3), 2, ((1, 1), (0, 0)), 1, "xla", (6, 6, 1)),  # a 4x2 output beside a 3-wide kernel
    ((3, 2), 2, 1, (2, 1), "xla", (6, 6, 1)),  # dilated: a 2x4 output beside a 5-tall window
    ((3, 2), 2, 1, (2, 1), "auto", (6, 6, 1)),  # 8 positions: "auto" delegates to lax too
    # XLA folded the zeros of this one's sliced input gradient back into an input dilation.
    ((5, 2), (1, 2), ((0, 0), (1, 1)), 1, "xla", (8, 4, 3)),
    # LocallyConnected2D: lax's gradient of its patch extraction aborted the same way.
    ((2, 3), 2, ((1, 1), (0, 0)), 1, "local", (6, 6, 1)),
    ((3, 2), 2, 1, (2, 1), "local", (6, 6, 2)),
])
def test_conv_input_gradient_runs_where_xla_cpu_aborted(tmp_path, geometry):
    """Strided convolutions (and locally connected layers) whose output is shorter than the
    (dilated) kernel along an axis: lax's input gradient aborted the process in XLA:CPU's
    algebraic simplifier (jax 0.10-0.11). Both gradients, the input Hessian and the mixed
    second derivative d/dx of the kernel gradient against the float64 NumPy layer (central
    differences; the Hessian: d2/dx2 of sum(sin(y)))."""
    import subprocess
    import sys

    out = tmp_path / "conv.npz"
    result = subprocess.run([sys.executable, "-c", _ABORTING_INPUT_GRADIENT, str(out),
                             repr(geometry)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.load(out)
    kernel_size, strides, padding, dilation, kind, _ = geometry
    geo = _geometry("Conv2D", kernel_size, strides, padding, "zeros", dilation)

    def reference_y(x, kernel):
        if kind == "local":
            return _np_local(x, kernel, got["bias"], geo.strides, geo.dilation, geo.padding,
                             "zeros", geo.kernel)
        y = np.zeros((x.shape[0], *_np_out(x, geo), kernel.shape[-1]))
        for i, j, win in _np_windows(x, geo.kernel, geo.strides, geo.dilation, geo.padding,
                                     "zeros"):
            y[:, i, j] = np.einsum("nabc,abcf->nf", win, kernel) + got["bias"]
        return y

    x, kernel = got["x"].astype(np.float64), got["kernel"].astype(np.float64)
    want = _central_differences(lambda x, kernel: np.sin(reference_y(x, kernel)).sum(),
                                {"x": x, "kernel": kernel})
    assert_close(got["grad_x"], want["x"])
    assert_close(got["grad_kernel"], want["kernel"])
    # d2/dx_a dx_b sum(sin(y)) = -sum(sin(y) * dy/dx_a * dy/dx_b); y is affine in x.
    y = reference_y(x, kernel)
    columns = []
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = 1.0
        columns.append((reference_y(x + step, kernel) - y).ravel())
    jacobian = np.stack(columns, axis=1)
    want_hessian = -(jacobian.T * np.sin(y).ravel()) @ jacobian
    assert_close(got["hessian_x"].reshape(want_hessian.shape), want_hessian)
    if kind != "local":
        def grad_kernel(x):  # d sum(sin(y)) / d kernel = sum over windows of win x cos(y)
            cos_y = np.cos(reference_y(x, kernel))
            return sum(np.einsum("nabc,nf->abcf", win, cos_y[:, i, j])
                       for i, j, win in _np_windows(x, geo.kernel, geo.strides, geo.dilation,
                                                    geo.padding, "zeros"))

        step, want_mixed = 1e-6, np.zeros((*kernel.shape, *x.shape))
        for i in np.ndindex(x.shape):
            delta = np.zeros_like(x)
            delta[i] = step
            want_mixed[(...,) + i] = (grad_kernel(x + delta) - grad_kernel(x - delta)) / (2 * step)
        assert_close(got["mixed"], want_mixed)


def test_locally_connected_over_patches_has_the_same_parameters_and_values():
    """A geometry `LocallyConnected2D` computes as a 1x1 layer over `input_patches` on the CPU:
    the same parameter tree and initial values as flax's `ConvLocal` path (taken under
    `xla_convolutions()`, which suspends the routing), and the same outputs."""
    layer = LocallyConnected2D(3, (2, 3), strides=2, padding=((1, 1), (0, 0)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 2)), jnp.float32)
    routed = layer.init(jax.random.key(0), x)
    with xla_convolutions():
        plain = layer.init(jax.random.key(0), x)
        want = layer.apply(plain, x)
    assert jax.tree.structure(routed) == jax.tree.structure(plain)
    for got_leaf, want_leaf in zip(jax.tree.leaves(routed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(got_leaf, want_leaf)
    np.testing.assert_allclose(layer.apply(routed, x), want, rtol=1e-6, atol=1e-6)
    # The first init and apply took the patches path (its tangent rule), the second flax's.
    assert "custom_jvp_call" in str(jax.make_jaxpr(layer.apply)(routed, x))
    with xla_convolutions():
        assert "custom_jvp_call" not in str(jax.make_jaxpr(layer.apply)(routed, x))


def _np_out(x, geo):
    """Output (H, W) of a zero-padded convolution of `x` with `geo` (the formula of Conv2D)."""
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, (lo, hi), k, s, d in
                 zip(x.shape[1:3], geo.padding, geo.kernel, geo.strides, geo.dilation,
                     strict=True))


# (kernel, strides, dilation, padding, output_padding, groups) run as one conv per output phase.
PHASE_CASES = [
    (4, 2, 1, 1, 0, 1),  # 2x upsampling (FCN's upscore2, DCGAN)
    (3, 2, 1, 1, 1, 4),  # depthwise, the same-size adjoint of a stride-2 conv
    ((5, 2), (3, 4), (1, 2), ((2, 0), (1, 3)), (2, 1), 2),  # anisotropic, cropped, dilated
    (3, 4, 1, 0, 0, 2),  # kernel < stride: phases no tap reaches (zeros, then the bias)
    (16, 8, 1, 4, 0, 4),  # grouped 8x: 64 phases
    (2, 3, 3, 0, 2, 1),  # dilation a multiple of the stride: every tap in phase 0
]


def _input_dilated_convs(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"
            and max(e.params["lhs_dilation"]) > 1]


@pytest.mark.parametrize("k,s,d,p,op,g", PHASE_CASES)
def test_conv_transpose_phases_match_numpy_scatter_and_input_dilated_form(k, s, d, p, op, g):
    """A strided ConvTranspose2D runs as ordinary convolutions of the undilated input, one per
    output phase (XLA:CPU's input-dilated form: kernel gradient 7-18x slower, grouped forward
    2-30x); float64, against the scatter definition and the input-dilated form."""
    with jax.enable_x64(True):
        x = jnp.asarray(_random((2, 5, 6, 4), 21, np.float64))
        layer = ConvTranspose2D(8, k, strides=s, dilation=d, padding=p, output_padding=op,
                                groups=g, dtype=jnp.float64, param_dtype=jnp.float64,
                                bias_init=nn.initializers.normal(1.0))
        variables = jax.jit(layer.init)(jax.random.key(0), x)  # one compile, not one per op
        # A fresh function per form: jit replays a function's cached trace whatever the context.
        got = jax.jit(lambda v, xs: layer.apply(v, xs))(variables, x)
        assert _use_phases(_pair(s), got.shape[1:3], g)
        assert _input_dilated_convs(lambda v, xs: layer.apply(v, xs), variables, x) == []
        with xla_convolutions():
            assert len(_input_dilated_convs(lambda v, xs: layer.apply(v, xs), variables, x)) == 1
            canonical = jax.jit(lambda v, xs: layer.apply(v, xs))(variables, x)
        params = variables["params"]
        want = _np_conv_transpose(x, params["kernel"], np.asarray(params["bias"]), _pair(s),
                                  _pair(d), _full_pads(p), _pair(op), g)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got, canonical, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("count", [
    10, pytest.param(60, marks=pytest.mark.slow)])  # 60: 28 s idle, 84 s in a loaded CI run
def test_conv_transpose_phases_match_input_dilated_form_on_random_geometries(count):
    """Seeded random geometries (strides 1-5, kernels 1-6, dilations 1-3, crops, output padding,
    1-3 groups): forward and both gradients equal the input-dilated form's (float64)."""
    rng = np.random.default_rng(41)
    checked = phased = 0
    with jax.enable_x64(True):
        while checked < count:
            k, s, d = (tuple(int(v) for v in rng.integers(1, hi, 2)) for hi in (7, 6, 4))
            pads = tuple(tuple(int(v) for v in rng.integers(0, d[i] * (k[i] - 1) + 3, 2))
                         for i in range(2))
            op = tuple(int(rng.integers(0, max(s[i], d[i]))) for i in range(2))
            g = int(rng.integers(1, 4))
            shape = (2, *(int(v) for v in rng.integers(1, 7, 2)), 2 * g)
            layer = ConvTranspose2D(g * int(rng.integers(1, 3)), k, strides=s, dilation=d,
                                    padding=pads, output_padding=op, groups=g,
                                    dtype=jnp.float64, param_dtype=jnp.float64)
            x = jnp.asarray(_random(shape, checked, np.float64))
            key = jax.random.key(checked)
            try:  # shapes only: init runs in the compiled program below
                y_shape, variables = jax.eval_shape(layer.init_with_output, key, x)
            except ValueError:  # cropped to nothing
                continue
            checked += 1
            out = y_shape.shape[1:3]
            phased += _use_phases(s, out, g)
            cotangent = _random((shape[0], *out, layer.features), 7, np.float64)

            def both_forms(k, xs, c=cotangent, m=layer):
                v = m.init(k, xs)  # init in the program: one compile, not one per op

                def value_and_grads():
                    y, vjp = jax.vjp(m.apply, v, xs)
                    return y, vjp(c)

                per_phase = value_and_grads()
                with xla_convolutions():  # the form is chosen while tracing: one program
                    return per_phase, value_and_grads()

            got, want = jax.jit(both_forms)(key, x)
            with xla_convolutions():
                dilated = _input_dilated_convs(lambda v, xs, m=layer: m.apply(v, xs), variables, x)
            assert bool(dilated) == (max(s) > 1)  # the reference is the input-dilated form
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11),
                         got, want)
    assert phased >= count // 2  # most of them exercised the per-phase form


def test_conv_transpose_is_adjoint_of_conv2d():
    """<conv(x), y> == <x, conv_transpose(y)> with the same kernel (and no bias)."""
    x = _random((1, 9, 8, 4), 12)
    conv = Conv2D(6, 3, strides=2, padding=1, use_bias=False)
    params = _init_params(conv, jnp.asarray(x))
    y = _random((1, 5, 4, 6), 13)
    # Conv kernel (kh, kw, C_in, F) is the transpose's (kh, kw, F -> C_in) scatter kernel.
    # W: (4−1)·2 − 2 + 2 + 1 = 7, so output_padding=1 recovers the 8 columns the conv read.
    tconv = ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=(0, 1), use_bias=False)
    t_params = {"kernel": jnp.transpose(params["kernel"], (0, 1, 3, 2))}
    lhs = float(jnp.vdot(jax.jit(conv.apply)({"params": params}, x), y))
    ty = jax.jit(tconv.apply)({"params": t_params}, y)
    assert ty.shape == x.shape
    rhs = float(jnp.vdot(x, ty))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


@pytest.mark.parametrize("layer", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
def test_precision_checked_at_construction(layer):
    # A misspelt precision raised only at init, in lax's words ("Precision argument must be one
    # of ...") without the layer's name.
    with pytest.raises(ValueError, match=rf"{layer.__name__}: precision='hihgest' is invalid; "
                                         r"expected None, a lax.Precision"):
        layer(2, 3, precision="hihgest")
    with pytest.raises(ValueError, match=rf"{layer.__name__}: precision=3 is invalid"):
        layer(2, 3, precision=3)
    for ok in (None, "highest", "tensorfloat32", jax.lax.Precision.HIGH, ("high", "default"),
               "F32_F32_F32", jax.lax.DotAlgorithmPreset.DEFAULT):
        layer(2, 3, precision=ok)


@pytest.mark.parametrize("size", [0, -2, 2.5, True])
def test_bilinear_kernel_refuses_a_non_positive_int_size(size):
    # bilinear_kernel_1d(2.5) returned [0.5, 0.5, -0.5] and (0) an empty filter, silently.
    with pytest.raises(ValueError, match=rf"bilinear_kernel_1d: size={size!r} is invalid; "
                                         r"expected a positive integer"):
        bilinear_kernel_1d(size)


def test_bilinear_kernel_values():
    np.testing.assert_allclose(bilinear_kernel_1d(4), [0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(bilinear_kernel_1d(5), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(bilinear_kernel_1d(3), [0.5, 1, 0.5])
    kernel = np.asarray(bilinear_upsample_init(None, (4, 4, 3, 3)))
    quarter = [0.25, 0.75, 0.75, 0.25]
    np.testing.assert_allclose(kernel[:, :, 1, 1], np.outer(quarter, quarter))
    assert np.count_nonzero(kernel[:, :, 0, 1:]) == 0  # diagonal: channel o from channel o
    depthwise = np.asarray(bilinear_upsample_init(None, (4, 4, 1, 5)))
    np.testing.assert_array_equal(depthwise[:, :, 0, 4], kernel[:, :, 1, 1])


@pytest.mark.parametrize("s,k,p", [(2, 4, 1), (3, 5, 1), (4, 8, 2)])
def test_bilinear_init_upsamples_like_tf_resize(s, k, p):
    x = _random((1, 5, 6, 2), 14)
    for groups in (1, 2):
        layer = ConvTranspose2D(2, k, strides=s, padding=p, groups=groups, use_bias=False,
                                kernel_init=bilinear_upsample_init)
        variables = jax.jit(layer.init)(jax.random.key(0), x)
        got = np.asarray(jax.jit(layer.apply)(variables, x))
        assert got.shape == (1, 5 * s, 6 * s, 2)
        want = tf.image.resize(x, (5 * s, 6 * s), method="bilinear").numpy()  # half-pixel
        b = s  # the first/last s output rows interpolate against the zero outside
        assert_close(got[:, b:-b, b:-b], want[:, b:-b, b:-b])


@pytest.mark.parametrize("s", [2, 3, 8])
def test_bilinear_init_odd_kernel_is_corner_aligned_resize(s):
    # Odd kernel 2s - 1, padding s - 1, output_padding s - 1: input pixel i lands on output s*i,
    # so the first s*(n - 1) + 1 outputs are TF's align_corners=True resize to that size, exactly
    # (no border band); the last s - 1 rows/columns interpolate towards the zero outside.
    x = _random((1, 5, 6, 2), 15)
    layer = ConvTranspose2D(2, 2 * s - 1, strides=s, padding=s - 1, output_padding=s - 1,
                            use_bias=False, kernel_init=bilinear_upsample_init)
    # init and apply in one program: one compile, not one per op
    got = np.asarray(jax.jit(lambda xs: layer.apply(layer.init(jax.random.key(0), xs), xs))(x))
    assert got.shape == (1, 5 * s, 6 * s, 2)
    size = (4 * s + 1, 5 * s + 1)
    want = tf.compat.v1.image.resize_bilinear(x, size, align_corners=True).numpy()
    assert_close(got[:, : size[0], : size[1]], want)
    assert_close(got[:, ::s, ::s], x)  # input pixel i is output s*i
    weights = 1 - np.arange(1, s) / s  # below the last input row: (1 - t/s) * that row
    assert_close(got[:, 4 * s + 1:, ::s], weights[None, :, None, None] * x[:, -1:])


# ---------------------------------------------------------------- gradients (float64)


def _check_module_grads(layer, x_shape, seed=0):
    with jax.enable_x64(True):
        x = jnp.asarray(_random(x_shape, seed, np.float64))
        params = _init_params(layer, x, seed)
        f = jax.jit(lambda p, v: layer.apply({"params": p}, v))
        check_grads(f, (params, x), order=1, modes=("rev",))


def test_gradients_locally_connected():
    _check_module_grads(LocallyConnected2D(2, 3, strides=2, padding=1, padding_mode="reflect",
                                           dtype=jnp.float64, param_dtype=jnp.float64),
                        (1, 5, 6, 2))


def test_gradients_tiled():
    _check_module_grads(TiledConv2D(2, 3, tile_size=(2, 3), padding=1, padding_mode="circular",
                                    dtype=jnp.float64, param_dtype=jnp.float64), (1, 5, 6, 2))


def test_gradients_conv_transpose():
    _check_module_grads(ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=1, groups=2,
                                        dtype=jnp.float64, param_dtype=jnp.float64),
                        (1, 3, 4, 2))
    with xla_convolutions():  # the input-dilated form the per-phase one replaces on CPU
        _check_module_grads(ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=1,
                                            groups=2, dtype=jnp.float64,
                                            param_dtype=jnp.float64), (1, 3, 4, 2))


# ---------------------------------------------------------------- errors (before tracing)

X = jnp.zeros((1, 7, 7, 4))


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D])
@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=0), r"kernel_size=0 is invalid; expected every entry >= 1"),
    (dict(kernel_size=(3, -1)), r"kernel_size=\(3, -1\) is invalid; expected every entry >= 1"),
    (dict(kernel_size=2.5), r"kernel_size=2.5 is invalid; expected an int or a pair of ints"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size=\(3, 3, 3\) is invalid; expected an int or a "
                                  r"pair of ints"),
    (dict(kernel_size=3, strides=0), r"strides=0 is invalid; expected every entry >= 1"),
    (dict(kernel_size=3, strides=(1, -2)), r"strides=\(1, -2\) is invalid"),
    (dict(kernel_size=3, dilation=0), r"dilation=0 is invalid; expected every entry >= 1"),
    (dict(kernel_size=3, padding_mode="symmetric"),
     r"padding_mode='symmetric' is invalid; expected one of \['zeros', 'reflect', "
     r"'replicate', 'circular'\]"),
    (dict(kernel_size=3, padding="FULL"),
     r"padding='FULL' is invalid; expected 'SAME', 'VALID', an int"),
    (dict(kernel_size=3, padding=-1), r"padding=-1 is invalid; expected every padding entry >= 0"),
    (dict(kernel_size=3, padding=(1, 2, 3)), r"padding=\(1, 2, 3\) is invalid; expected a "
                                             r"non-negative int"),
])
def test_construction_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {message}"):
        cls(features=4, **kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (Conv2D, {}), (Conv2D, {"padding_mode": "reflect"}), (LocallyConnected2D, {}),
    (LocallyConnected2D, {"padding_mode": "reflect"}), (TiledConv2D, {}),
    (TiledConv2D, {"padding_mode": "reflect"}), (ConvTranspose2D, {}),
])
def test_numpy_integer_padding_equals_python_int_padding(cls, kwargs):
    # padding=np.int64(1) was refused while kernel_size=np.int64(3) was accepted.
    x = _random((1, 7, 7, 4), seed=21)
    expected = _apply(cls(4, 3, padding=1, **kwargs), x)[1]
    for padding in (np.int64(1), (np.int32(1), np.int64(1)),
                    ((np.int64(1), np.int64(1)), (np.int64(1), 1))):
        np.testing.assert_array_equal(_apply(cls(4, 3, padding=padding, **kwargs), x)[1],
                                      expected)


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
@pytest.mark.parametrize("use_bias", ["no", 0, None])
def test_use_bias_must_be_a_bool(cls, use_bias):
    # use_bias="no" is truthy and used to create a bias silently.
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: use_bias={use_bias!r} is invalid; "
                                         r"expected True or False\.$"):
        cls(4, 3, use_bias=use_bias)


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
def test_features_must_be_positive(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: features=0 is invalid; expected a "
                                         r"positive integer"):
        cls(features=0, kernel_size=3)


@pytest.mark.parametrize("cls", [Conv2D, ConvTranspose2D])
def test_group_errors(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: groups=0 is invalid; expected a positive"):
        cls(4, 3, groups=0)
    with pytest.raises(ValueError, match=rf"{name}: groups=3 is invalid; the output channels "
                                         r"\(features=4\) must be divisible by groups"):
        cls(4, 3, groups=3)
    layer = cls(6, 3, groups=3)
    with pytest.raises(ValueError, match=rf"{name}: groups=3 is invalid; the input channels "
                                         r"\(4\) must be divisible by groups"):
        layer.init(jax.random.key(0), X)


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D])
def test_kernel_larger_than_padded_input(cls):
    kw = dict(tile_size=1) if cls is TiledConv2D else {}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: kernel_size=\(9, 9\) is invalid; the "
                                         r"effective kernel height 9 .* must not exceed the padded "
                                         r"input height 8 \(input 7 \+ padding 1 \+ 0\)"):
        cls(4, 9, padding=((1, 0), (1, 1)), **kw).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3\) is invalid; the effective kernel "
                                         r"width 9 \(dilation·\(kernel−1\)\+1 with "
                                         r"dilation=\(1, 4\)\) must not exceed the padded input "
                                         r"width 7"):
        cls(4, 3, dilation=(1, 4), **kw).init(jax.random.key(0), X)
    # SAME never fails, VALID with an exactly fitting kernel is fine.
    assert jax.eval_shape(cls(4, 9, padding="SAME", **kw).init, jax.random.key(0), X)
    assert jax.eval_shape(cls(4, 7, padding="VALID", **kw).init, jax.random.key(0), X)


def test_errors_raise_in_python_before_tracing():
    """Call-time checks come from static shapes, so they fire under jit as plain ValueErrors."""
    layer = Conv2D(4, 9)
    params = {"params": _init_params(layer, jnp.zeros((1, 9, 9, 4)))}
    with pytest.raises(ValueError, match=r"Conv2D: kernel_size=\(9, 9\) is invalid"):
        jax.jit(layer.apply)(params, X)


def test_conv2d_reflect_padding_too_large_names_the_layer_and_the_padding_as_given():
    """It quoted the resolved pads (((7, 7), (7, 7)) for padding=7; for "SAME" pads the user never
    wrote); now the padding as given, and what it resolves to."""
    with pytest.raises(ValueError, match=r"^Conv2D: padding=7 is invalid; reflect padding must "
                                         r"be smaller than the input height 7 on each side \(got "
                                         r"\(7, 7\); it resolves to \(\(7, 7\), \(7, 7\)\) here\)"):
        Conv2D(4, 3, padding=7, padding_mode="reflect").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"^Conv2D: padding='SAME' is invalid; .* \(got \(7, 8\); "
                                         r"it resolves to \(\(7, 8\), \(7, 8\)\) here\)"):
        Conv2D(4, 16, padding="SAME", padding_mode="reflect").init(jax.random.key(0), X)


def test_conv2d_input_rank():
    with pytest.raises(ValueError, match=r"Conv2D: input.shape=\(7, 7, 4\) is invalid; expected "
                                         r"a rank-4 NHWC array"):
        Conv2D(4, 3).init(jax.random.key(0), X[0])


@pytest.mark.parametrize("layer", [
    Conv2D(4, 1), LocallyConnected2D(4, 1), TiledConv2D(4, 1), ConvTranspose2D(4, 2, strides=2),
], ids=lambda m: type(m).__name__)
def test_an_empty_map_is_refused(layer):
    """A 1x1 kernel or a transposed convolution would otherwise 'fit' a 0-high map (the
    transposed one returned only its bias, where PyTorch raises)."""
    with pytest.raises(ValueError, match=rf"^{type(layer).__name__}: input.shape=\(1, 0, 4, 2\) "
                                         r"is invalid; expected height and width >= 1"):
        layer.init(jax.random.key(0), jnp.zeros((1, 0, 4, 2)))
    assert jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((0, 4, 4, 2)))  # batch 0 is fine


@pytest.mark.parametrize("layer", [
    Conv2D(4, 1), LocallyConnected2D(4, 1), TiledConv2D(4, 1), ConvTranspose2D(4, 2, strides=2),
], ids=lambda m: type(m).__name__)
def test_an_input_without_channels_is_refused(layer):
    """A kernel over 0 input channels has no fan-in: flax's initializer divided by zero."""
    with pytest.raises(ValueError, match=rf"^{type(layer).__name__}: input.shape=\(1, 5, 5, 0\) "
                                         r"is invalid; expected at least 1 input channel"):
        layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 0)))


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype=jnp.int32), "dtype='int32' is invalid; expected None or a floating-point dtype"),
    (dict(dtype="flot32"), "dtype='flot32' is invalid; expected None or a floating-point dtype"),
    (dict(param_dtype=jnp.int8), "param_dtype='int8' is invalid; expected a floating-point"),
    (dict(param_dtype=None), "param_dtype=None is invalid; expected a floating-point dtype"),
    # float8: no promotion path to float32 parameters (a TypePromotionError at init)
    (dict(dtype=jnp.float8_e4m3fn), "dtype='float8_e4m3fn' is invalid; expected None or a "
                                    "floating-point dtype of 16 bits or more"),
    (dict(param_dtype=jnp.float8_e5m2), "param_dtype='float8_e5m2' is invalid"),
])
def test_dtypes_are_checked_at_construction(cls, kwargs, message):
    """flax failed only at init, in its own words ('Dtype must be inexact', 'data type 'flot32'
    not understood'), naming neither the layer nor the argument."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {message}"):
        cls(4, 3, **kwargs)


@pytest.mark.parametrize("cls", [Conv2D, LocallyConnected2D, TiledConv2D, ConvTranspose2D])
def test_floating_dtypes_are_accepted(cls):
    layer = cls(4, 3, dtype="bfloat16", param_dtype=np.float64)
    assert (layer.dtype, layer.param_dtype) == ("bfloat16", np.float64)


def test_locally_connected_refuses_an_input_other_than_its_initialization_one():
    # flax raised a ScopeParamShapeError naming neither the layer nor the input.
    layer = LocallyConnected2D(2, 3)
    params = _init_params(layer, X)
    assert jax.jit(layer.apply)({"params": params}, jnp.zeros((3, 7, 7, 4))).shape == (3, 5, 5, 2)
    for shape, grid, channels in (((1, 9, 9, 4), "7x7", 4), ((1, 7, 7, 5), "5x5", 5)):
        with pytest.raises(ValueError, match=rf"^LocallyConnected2D: input.shape="
                                             rf"{re.escape(repr(shape))} is invalid; its "
                                             r"parameters \(kernel \(5, 5, 36, 2\)\) were "
                                             r"created for a 5x5 output grid from 4 input "
                                             rf"channels, this input gives a {grid} grid from "
                                             rf"{channels}; a locally connected layer"):
            layer.apply({"params": params}, jnp.zeros(shape))


@pytest.mark.parametrize(("cls", "groups"), [(Conv2D, 1), (Conv2D, 2), (TiledConv2D, 1),
                                             (ConvTranspose2D, 1), (ConvTranspose2D, 2)])
def test_a_layer_refuses_other_channels_than_its_kernel_was_built_for(cls, groups):
    """flax raised a ScopeParamShapeError naming neither the layer nor the input."""
    layer = cls(4, 3, groups=groups) if groups > 1 else cls(4, 3)
    params = _init_params(layer, X)  # 4 input channels
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: input.shape=\(1, 7, 7, 6\) is "
                                         r"invalid; its kernel was created for 4 input "
                                         r"channels, this input has 6; a layer takes"):
        layer.apply({"params": params}, jnp.zeros((1, 7, 7, 6)))


def test_tiled_errors():
    with pytest.raises(ValueError, match=r"TiledConv2D: tile_size=0 is invalid; expected every "
                                         r"entry >= 1"):
        TiledConv2D(4, 3, tile_size=0)
    with pytest.raises(ValueError, match=r"TiledConv2D: tile_size=\(2, 6\) is invalid; expected "
                                         r"at most the output size \(5, 5\)"):
        TiledConv2D(4, 3, tile_size=(2, 6)).init(jax.random.key(0), X)


def test_conv_transpose_errors():
    with pytest.raises(ValueError, match=r"ConvTranspose2D: output_padding=2 is invalid; expected "
                                         r"output_padding < max\(stride, dilation\) = \(2, 2\)"):
        ConvTranspose2D(4, 3, strides=2, output_padding=2)
    with pytest.raises(ValueError, match=r"ConvTranspose2D: output_padding=\(0, 1\) is invalid; "
                                         r"expected output_padding < max\(stride, dilation\) = "
                                         r"\(1, 1\)"):
        ConvTranspose2D(4, 3, output_padding=(0, 1))
    assert jax.eval_shape(ConvTranspose2D(4, 3, dilation=2, output_padding=1).init,
                          jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"ConvTranspose2D: output_padding=-1 is invalid; "
                                         r"expected every entry >= 0"):
        ConvTranspose2D(4, 3, output_padding=-1)
    with pytest.raises(ValueError, match=r"ConvTranspose2D: padding='SAME' is invalid; expected "
                                         r"an int, a pair"):
        ConvTranspose2D(4, 3, padding="SAME")
    with pytest.raises(ValueError, match=r"ConvTranspose2D: strides=0 is invalid"):
        ConvTranspose2D(4, 3, strides=0)
    with pytest.raises(ValueError, match=r"ConvTranspose2D: padding=5 is invalid; the output would "
                                         r"be -1x-1 for a 7x7 input"):
        ConvTranspose2D(4, 3, padding=5).init(jax.random.key(0), X)  # 6 − 10 + 2 + 1 = −1
    with pytest.raises(ValueError, match=r"ConvTranspose2D: input.shape=\(7, 7, 4\) is invalid"):
        ConvTranspose2D(4, 3).init(jax.random.key(0), X[0])


def test_bilinear_init_errors():
    with pytest.raises(ValueError, match=r"bilinear_upsample_init: shape=\(4, 4, 3\) is invalid; "
                                         r"expected a 4-D kernel shape"):
        bilinear_upsample_init(None, (4, 4, 3))
    with pytest.raises(ValueError, match=r"bilinear_upsample_init: shape=\(4, 4, 3, 4\) is "
                                         r"invalid; expected C_out divisible by C_in/groups"):
        bilinear_upsample_init(None, (4, 4, 3, 4))
    # C_in 0 was a ZeroDivisionError (C_out % C_in).
    with pytest.raises(ValueError, match=r"bilinear_upsample_init: shape=\(4, 4, 0, 3\) is "
                                         r"invalid; expected positive integers"):
        bilinear_upsample_init(None, (4, 4, 0, 3))


@pytest.mark.parametrize("make", [lambda: Conv2D(4, 3, padding=1, padding_mode="reflect",
                                                 dtype=jnp.bfloat16),
                                  lambda: LocallyConnected2D(4, 3, dtype=jnp.bfloat16)])
def test_capture_intermediates_records_the_layers_output_once(make):
    """The wrapped flax layer shares the layer's scope: its own call was recorded too, first, as
    its float32 result before the cast to a bfloat16 `dtype` (two entries per call). Parameters
    keep their names."""
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 6, 6, 3)), jnp.float32)
    layer = make()
    variables = layer.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"kernel", "bias"}
    y, state = layer.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    (captured,) = state["intermediates"]["__call__"]
    assert captured.dtype == y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(captured, y)
    # a filter selecting only flax's layer still gets its (float32, pre-cast) output
    flax_class = nn.Conv if isinstance(layer, Conv2D) else nn.ConvLocal
    _, state = layer.apply(variables, x, capture_intermediates=lambda m, _: isinstance(
        m, flax_class), mutable=["intermediates"])
    (inner,) = state["intermediates"]["__call__"]
    assert inner.dtype == jnp.float32
    np.testing.assert_allclose(inner.astype(jnp.bfloat16), y)
