"""summary(): per-layer rows checked against values derived by hand, totals against XLA's cost
analysis and Flax's parameter tree, multi-path fields, plain-function layers, formats, CLI."""

import csv
import io
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.analysis.receptive_field import receptive_field
from cnnjax.analysis.summary import summary
from cnnjax.layers.conv import Conv2D, ConvTranspose2D, LocallyConnected2D, TiledConv2D
from cnnjax.layers.pooling import avg_pool2d, global_avg_pool, max_pool2d, spatial_pyramid_pool
from cnnjax.models import create_model
from cnnjax.models.fcn import bilinear_transposed_conv
from cnnjax.utils.validation import INPUT_TOO_SMALL_HINT
from tests.commands import run_commands
from tests.examples import (
    EXAMPLES,
    AlexNetLike,
    FunctionalNet,
    InceptionNet,
    ResidualNet,
    VGGLike,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
F32 = 4


def valid_pairs(n: int, k: int, s: int, p: int) -> int:
    """(output, tap) pairs along one axis whose tap falls inside the image, not on padding."""
    m = (n + 2 * p - k) // s + 1
    return sum(1 for o in range(m) for t in range(k) if 0 <= o * s - p + t < n)


def conv_relu(n, cin, cout, k, s=1, p=0, g=1):
    """Hand figures of a square conv + bias + ReLU on an n x n input, batch 1.

    params = out*(in/g*k*k + 1); MACs = m*m*out*(in/g)*k*k (dense, padding taps included);
    FLOPs = 2*out*(in/g)*taps_h*taps_w (real-data multiply-adds) + m*m*out (bias) + m*m*out (ReLU).
    """
    m = (n + 2 * p - k) // s + 1
    taps = valid_pairs(n, k, s, p) ** 2
    return {
        "out": (1, m, m, cout),
        "params": cout * (cin // g * k * k + 1),
        "macs": m * m * cout * (cin // g) * k * k,
        "flops": 2 * cout * (cin // g) * taps + 2 * m * m * cout,
    }


def dense(cin, cout, relu=True):
    return {"out": (1, cout), "params": cout * (cin + 1), "macs": cin * cout,
            "flops": 2 * cin * cout + cout * (2 if relu else 1)}


def pool(n, c, k, s):
    m = (n - k) // s + 1
    return {"out": (1, m, m, c), "params": 0, "macs": 0, "flops": m * m * c * (k * k - 1)}


def check_rows(result, expected):
    assert [r.name for r in result.rows] == [e[0] for e in expected]
    for row, (name, type_, figures, field) in zip(result.rows, expected, strict=True):
        assert row.type == type_, name
        assert row.output_shape == figures["out"], name
        assert row.activation_bytes == int(np.prod(figures["out"])) * F32, name
        for key in ("params", "macs", "flops"):
            if key in figures:
                assert getattr(row, key) == figures[key], (name, key)
        size, jump, start = field
        assert row.field == ((size, size), (jump, jump), (start, start)), name


def test_alexnet_like_rows():
    result = summary(AlexNetLike(), (99, 99, 3))
    # Sizes: 99 -11/4-> 23 -3/2-> 11 -5p2-> 11 -3/2-> 5 -3p1-> 5 -> 5 -> 5 -3/2-> 2 -> 2*2*32=128.
    # Fields (Araujo): r' = r + (k-1) j, j' = j s, start' = start + ((k-1)/2 - p) j.
    lrn = lambda n, c: {"out": (1, n, n, c), "params": 0, "macs": 0,
                        # x*x, 4 adds per 5-channel window, alpha*, k+, x*scale; pow is
                        # transcendental (not a FLOP)
                        "flops": n * n * c * 8}
    expected = [
        ("conv1", "Conv", conv_relu(99, 3, 16, 11, s=4), (11, 4, 5)),  # start 0 + 5*1
        ("lrn1", "LocalResponseNorm", lrn(23, 16), (11, 4, 5)),
        ("max_pool_0", "max_pool", pool(23, 16, 3, 2), (19, 8, 9)),  # 11+2*4, 5+1*4
        ("conv2", "Conv", conv_relu(11, 16, 32, 5, p=2, g=2), (51, 8, 9)),  # 19+4*8
        ("lrn2", "LocalResponseNorm", lrn(11, 32), (51, 8, 9)),
        ("max_pool_1", "max_pool", pool(11, 32, 3, 2), (67, 16, 17)),
        ("conv3", "Conv", conv_relu(5, 32, 48, 3, p=1), (99, 16, 17)),
        ("conv4", "Conv", conv_relu(5, 48, 48, 3, p=1, g=2), (131, 16, 17)),
        ("conv5", "Conv", conv_relu(5, 48, 32, 3, p=1, g=2), (163, 16, 17)),
        ("max_pool_2", "max_pool", pool(5, 32, 3, 2), (195, 32, 33)),
        ("flatten_0", "flatten", {"out": (1, 128), "params": 0, "flops": 0}, (195, 32, 33)),
        ("fc6", "Dense", dense(128, 64), (227, 32, 49)),  # 195 + (2-1)*32, 33 + 32/2
        ("fc7", "Dense", dense(64, 64), (227, 32, 49)),
        ("head", "Dense", dense(64, 10, relu=False), (227, 32, 49)),
    ]
    check_rows(result, expected)
    assert result.rows[0].input_shape == (1, 99, 99, 3)
    assert result.rows[3].params == 32 * (8 * 25 + 1)  # two towers: 8 of the 16 inputs each


def test_vgg_like_rows():
    result = summary(VGGLike(), (32, 32, 3))
    expected, n, cin, r, j, start = [], 32, 3, 1, 1, 0.0
    for s, widths in enumerate(((16, 16), (32, 32), (64, 64, 64)), start=1):
        for i, c in enumerate(widths, start=1):
            r += 2 * j  # 3x3, padding 1: start unchanged
            expected.append((f"conv{s}_{i}", "Conv", conv_relu(n, cin, c, 3, p=1), (r, j, start)))
            cin = c
        r, start, j = r + j, start + 0.5 * j, 2 * j
        expected.append((f"max_pool_{s - 1}", "max_pool", pool(n, cin, 2, 2), (r, j, start)))
        n //= 2
    expected.append(("flatten_0", "flatten", {"out": (1, 4 * 4 * 64)}, (44, 8, 3.5)))
    # Dense over 4 positions per axis: 44 + 3*8 = 68, centred at 3.5 + 1.5*8 = 15.5.
    expected.append(("fc", "Dense", dense(1024, 64), (68, 8, 15.5)))
    expected.append(("head", "Dense", dense(64, 10, relu=False), (68, 8, 15.5)))
    check_rows(result, expected)
    assert [e[3][0] for e in expected[:3]] == [3, 5, 6]  # two 3x3 = 5x5, then the pool


def _xla_flops(model, shape):
    """XLA's FLOPs of the forward pass, compiled and before optimisation, and the variables."""
    x = jnp.zeros((1, *shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x)
    counts = []
    for cost in (lowered.compile().cost_analysis(), lowered.cost_analysis()):
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        counts.append(cost.get("flops", 0.0))  # no "flops" at all: nothing to compute
    return *counts, variables


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_totals_against_xla_and_flax(name):
    """FLOPs total equal to XLA's count of the forward pass before optimisation (to 1 FLOP),
    and within 1% of its count of the compiled forward pass (the residue is
    XLA's algebraic rewrites, e.g. of LRN's power); params equal Flax's parameter tree.

    functional_net gets 2%: XLA folds its explicit `jnp.pad` into the next convolution's padding
    and then skips those taps (3,712 FLOPs of 221k), while the jaxpr count treats the padded
    zeros as data."""
    factory, shape = EXAMPLES[name]
    model = factory()
    result = summary(model, shape)
    compiled, unoptimised, variables = _xla_flops(model, shape)
    tolerance = 0.02 if name == "functional_net" else 0.01
    assert result.totals["flops"] == pytest.approx(compiled, rel=tolerance)
    # Before optimisation the counts agree to the FLOP, but for the one XLA charges for
    # converting a `jnp.pad` constant (0 -> float32), an equation `summary` marks static.
    assert abs(result.totals["flops"] - unoptimised) <= 1
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert result.totals["params"] == n_params == sum(r.params for r in result.rows)
    assert result.totals["macs"] == sum(r.macs for r in result.rows)


def test_residual_field_is_max_over_aligned_paths():
    result = summary(ResidualNet(), (16, 16, 3))
    rows = {r.name: r for r in result.rows}
    sizes = {name: r.field.size[0] for name, r in rows.items()}
    # stem 3; block1: conv_a 5, conv_b 7, identity shortcut 3 -> add = max = 7.
    assert (sizes["stem"], sizes["block1/conv_a"], sizes["block1/conv_b"]) == (3, 5, 7)
    assert sizes["block1/add_0"] == 7
    # block2: conv_a 3x3/2: 7 + 2 = 9 (j=2); conv_b 9 + 2*2 = 13; shortcut 1x1/2: 7 -> add 13.
    assert (sizes["block2/conv_a"], sizes["block2/conv_b"], sizes["block2/shortcut"]) == (9, 13, 7)
    assert rows["block2/add_0"].field == ((13, 13), (2, 2), (0, 0))
    assert len(rows["block2/add_0"].input_shapes) == 2
    # Global average pool over 8 positions, jump 2: 13 + 7*2 = 27 centred at 7.
    assert rows["global_avg_pool_0"].field == ((27, 27), (2, 2), (7, 7))
    assert not result.notes  # all merges aligned
    assert result.row("block2/shortcut").params == 16 * (8 + 1)
    with pytest.raises(ValueError, match=r"Summary.row: name='nope' is invalid; expected one of"):
        result.row("nope")


def test_inception_concat_takes_largest_branch():
    result = summary(InceptionNet(), (12, 12, 3))
    sizes = {r.name: r.field.size[0] for r in result.rows}
    # After the 3x3 stem (3): 1x1 -> 3, 1x1+3x3 -> 5, 1x1+5x5 -> 7, pool 3x3 -> 5 (+1x1 -> 5).
    branch = {k: sizes[f"inception/{k}"] for k in ("b1", "b3", "b5", "max_pool_0", "pool_proj")}
    assert branch == {"b1": 3, "b3": 5, "b5": 7, "max_pool_0": 5, "pool_proj": 5}
    concat = next(r for r in result.rows if r.type == "concatenate")
    assert concat.field.size == (7, 7) and concat.output_shape == (1, 12, 12, 24)
    assert len(concat.input_shapes) == 4
    assert result.receptive_field == ((18, 18), (1, 1), (5.5, 5.5))  # 7 + 11, centre 5.5


def test_plain_function_layers_are_rows():
    result = summary(FunctionalNet(), (20, 20, 3))
    assert [r.type for r in result.rows] == [
        "pad", "conv", "max_pool", "pad", "conv", "conv_transpose", "avg_pool", "flatten", "Dense"]
    rows = result.rows
    assert [r.params for r in rows] == [0, 3 * 3 * 3 * 8, 0, 0, 3 * 3 * 8 * 8, 2 * 2 * 8 * 8,
                                        0, 0, 200 * 10 + 10]
    assert rows[0].output_shape == (1, 22, 22, 3) and rows[0].field.start == (-1, -1)
    # reflect pad 1 then 3x3 VALID: size 3 centred back on pixel 0; pool 2/2: 4, j 2, start .5;
    # zero pad 1: start .5 - 2 = -1.5; 3x3/2 VALID: 4 + 2*2 = 8, j 4, start -1.5 + 1*2 = .5.
    assert [r.field.size[0] for r in rows[1:5]] == [3, 4, 4, 8]
    assert rows[4].field == ((8, 8), (4, 4), (0.5, 0.5))
    # 2x2 stride-2 transposed conv: every output sees exactly one input -> size stays 8; the
    # jump halves to 2 and the phase-averaged centre moves by (0.5 - 1) * 2 = -1.
    assert rows[5].field == ((8, 8), (2, 2), (-0.5, -0.5))
    assert any("transposed" in n for n in result.notes)


class _Upsample(nn.Module):
    """Parameter-free depthwise bilinear transposed convolution (FCN's fixed final layer,
    without the edge rows it repeats beyond the map)."""

    factor: int
    corner_aligned: bool

    def __call__(self, x):
        return bilinear_transposed_conv(x, self.factor, self.corner_aligned)


def test_transposed_conv_macs_count_real_input_elements_only():
    # Hand count: each of the 5*6 input elements meets every one of the 3*3 taps once, for
    # C_in/groups * C_out = 3 * 4 channel pairs -> 5*6*9*3*4 = 3240, the MACs of the forward
    # 3x3 stride-2 conv it transposes (10x12x4 -> 5x6x3: 5*6 outputs * 9 * 4 * 3). Counting the
    # 2x-dilated input densely would give 10*12*9*3*4 = 12960.
    up = summary(ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=1), (5, 6, 3))
    assert up.rows[0].output_shape == (1, 10, 12, 4)
    forward = summary(Conv2D(3, 3, 2, 1), (10, 12, 4))
    assert up.totals["macs"] == 5 * 6 * 9 * 3 * 4 == forward.totals["macs"]
    # A 32x depthwise bilinear upsampling of a 2x3x5 map runs as two 1-D passes (the kernel is
    # separable): rows, 2*3 inputs * k taps * 5 channels; then columns, the 64*3 outputs of the
    # rows pass * k taps * 5 (corner-aligned kernel k = 63, half-pixel 64); not the dilated
    # input counted densely (64*3*k*5 + 64*96*k*5).
    for corner, k in ((True, 63), (False, 64)):
        result = summary(_Upsample(32, corner), (2, 3, 5))
        assert result.rows[-1].output_shape == (1, 64, 96, 5)
        assert result.totals["macs"] == 2 * 3 * k * 5 + 64 * 3 * k * 5
        if corner:
            corner_flops = result.totals["flops"]
    # FLOPs stay XLA's (2 per multiply-add on real data inside the cropped output): with the
    # corner-aligned kernel input 0 reaches outputs -31..31, 32 of them kept, and inputs 1, 2
    # all 63 (outputs 1..63, 33..95). Rows pass: (32 + 63) outputs per column, 3 columns;
    # columns pass: (32 + 63 + 63) per row, 64 rows; 5 channels each.
    assert corner_flops == 2 * ((32 + 63) * 3 + (32 + 63 + 63) * 64) * 5


class _LocalAndTiled(nn.Module):
    """LocallyConnected2D then TiledConv2D: layers that gather patches, then contract them."""

    @nn.compact
    def __call__(self, x):
        x = LocallyConnected2D(5, 3, name="local")(x)
        return TiledConv2D(6, 3, tile_size=(2, 3), strides=2, padding=1, name="tiled")(x)


def test_patch_gather_layers_count_only_their_dense_macs():
    """MACs are the dense multiply-accumulates: the patch extraction (a one-hot convolution, an
    exact gather) adds none, and a tiled conv is not charged for padding to a tile multiple."""
    # 10x10x4, k=3, F=5: 8*8 positions * 36 taps * 5 = 11,520 (the gather conv is 20,736 more).
    assert summary(LocallyConnected2D(5, 3), (10, 10, 4)).totals["macs"] == 8 * 8 * 36 * 5
    # tile 3 on an 8x8 output (not a multiple of 3): still 8*8*36*5, as one ordinary conv.
    tiled = summary(TiledConv2D(5, 3, tile_size=3), (10, 10, 4)).totals["macs"]
    assert tiled == 8 * 8 * 36 * 5 == summary(Conv2D(5, 3), (10, 10, 4)).totals["macs"]
    # Each layer is one row: 8x8x5 -> 3x3 stride-2 pad-1 conv -> 4x4 positions * 45 taps * 6.
    result = summary(_LocalAndTiled(), (10, 10, 4))
    assert [(r.name, r.macs) for r in result.rows] == [("local", 11_520),
                                                       ("tiled", 4 * 4 * 45 * 6)]
    assert [r.params for r in result.rows] == [8 * 8 * (36 * 5 + 5), 2 * 3 * (45 * 6 + 6)]
    assert result.notes == []
    # FLOPs stay XLA's count of the module before optimisation, which includes the gather's
    # one-hot products. (The compiled count is 2.4% higher here: XLA:CPU duplicates the local
    # layer's bias add, 8*8*5 FLOPs, into each of the 2*3 tile phases' convolution fusions.)
    _, unoptimised, _ = _xla_flops(_LocalAndTiled(), (10, 10, 4))
    assert result.totals["flops"] == pytest.approx(unoptimised, rel=0.01)
    tiled_alone = TiledConv2D(6, 3, tile_size=(2, 3), strides=2, padding=1)
    assert summary(tiled_alone, (8, 8, 5)).totals["flops"] == _xla_flops(tiled_alone,
                                                                         (8, 8, 5))[1]


class _DilatedStridedConv(nn.Module):
    """A raw 2x2 convolution of a 2x-dilated input, padding 1, stride 3 (larger than the
    dilation, so not every input element meets every tap)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.ones, (2, 2, 1, 1))
        return jax.lax.conv_general_dilated(x, kernel, (3, 3), ((1, 1), (1, 1)),
                                            lhs_dilation=(2, 2),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_input_dilated_conv_macs_count_the_taps_that_reach_real_inputs():
    """Reference by brute force, per axis: the (input i, tap t) pairs that some output o of
    the layer meets, o * stride + t - pad == i * dilation (4 inputs at 0, 2, 4, 6 of the
    dilated axis: 3 pairs), squared for the 2 axes: 9 (counting from -pad instead of +pad
    finds 2 pairs per axis, 4)."""
    result = summary(_DilatedStridedConv(), (4, 4, 1))
    (row,) = result.rows
    m = row.output_shape[1]  # (7 + 2 - 2) // 3 + 1 = 3
    assert row.output_shape == (1, m, m, 1) == (1, 3, 3, 1)
    per_axis = sum(1 for i in range(4) for t in range(2)
                   if any(3 * o + t - 1 == 2 * i for o in range(m)))
    assert per_axis == 3
    assert row.macs == result.totals["macs"] == per_axis**2


def test_grouped_padded_transposed_conv_macs_by_hand():
    # Each of the 5x5 input elements meets all 3x3 taps, C_in/groups * C_out = 1 * 4 pairs.
    result = summary(ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=1, groups=2),
                     (5, 5, 2))
    assert result.rows[0].output_shape == (1, 10, 10, 4)
    assert result.totals["macs"] == 5 * 5 * 9 * 1 * 4


def test_shared_module_counted_once():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), padding=1, name="conv")
            return conv(nn.relu(conv(x)))

    result = summary(Shared(), (8, 8, 3))
    assert [r.name for r in result.rows] == ["conv", "conv (call 2)"]
    assert [r.params for r in result.rows] == [3 * (27 + 1), 0]
    assert [r.field.size[0] for r in result.rows] == [3, 5]


def test_batchnorm_in_training_mode_and_anisotropic_kernel():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(4, (3, 5), padding="VALID", use_bias=False)(x)
            return nn.BatchNorm(use_running_average=not train)(x)

    result = summary(Net(), (9, 11, 2), batch_size=2)
    assert [r.type for r in result.rows] == ["Conv", "BatchNorm"]
    assert result.rows[0].output_shape == (2, 7, 7, 4)
    assert result.rows[1].params == 8  # scale + bias; running statistics are not parameters
    assert result.receptive_field == ((3, 5), (1, 1), (1, 2))
    assert "3x5" in str(result).splitlines()[2]
    # In training mode the batch statistics mix every position: each output depends on the
    # whole 9x11 image (7 positions of the 3x5 field, jump 1: 3 + 6 = 9 and 5 + 6 = 11).
    trained = summary(Net(), (9, 11, 2), train=True, batch_size=2)
    assert trained.rows[1].params == 8
    assert trained.receptive_field.size == (9, 11)


def test_table_prints_field_numbers_in_full():
    """A 2x2/2 conv, then a global mean over a 40,000 x 6 map: the field's start is exactly
    (19,999.5, 2.5), printed as such (to 4 significant digits it was 2e+04). A 3x zero insertion
    after it gives jump 2/3 on rows, which has no end: rounded to 4 decimals."""

    class Net(nn.Module):
        upsample: bool = False

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(1, (2, 2), strides=2, padding="VALID")(x)
            if self.upsample:
                return jax.lax.pad(x, 0.0, [(0, 0, 0), (0, 0, 2), (0, 0, 0), (0, 0, 0)])
            return x.mean(axis=(1, 2))

    result = summary(Net(), (40_000, 6, 1))
    assert result.receptive_field == ((40_000, 6), (2, 2), (19_999.5, 2.5))
    assert str(result).splitlines()[3].split()[-3:] == ["40,000x6", "2", "19,999.5x2.5"]
    upsampled = summary(Net(upsample=True), (6, 6, 1))
    assert upsampled.rows[-1].field.jump == (2 / 3, 2)
    assert str(upsampled).splitlines()[3].split()[-3:] == ["2", "0.6667x2", "0.5"]


def test_text_dict_and_csv(tmp_path):
    result = summary(ResidualNet(), (16, 16, 3))
    text = str(result).splitlines()
    header, body = text[0], text[2 : 2 + len(result.rows)]
    assert header.split()[:4] == ["Layer", "Type", "Input", "Output"]
    # Numeric columns are right-aligned: every row ends the Params column where the header does.
    end = header.index("Params") + len("Params")
    assert all(line[end - 1] != " " and line[end] == " " for line in body)
    assert text[3 + len(result.rows)].startswith("Total") and "5,194" in text[3 + len(result.rows)]

    as_dict = result.to_dict()
    json.dumps(as_dict)
    assert as_dict["totals"]["params"] == 5194
    assert as_dict["rows"][0]["rf_size"] == [3, 3]

    path = tmp_path / "rows.csv"
    result.to_csv(path)
    buffer = io.StringIO()
    result.to_csv(buffer)
    assert path.read_text().splitlines() == buffer.getvalue().splitlines()
    records = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert len(records) == len(result.rows)
    assert records[1]["name"] == "block1/conv_a" and records[1]["rf_size_h"] == "5"
    assert int(records[1]["params"]) == 8 * (8 * 9 + 1)


def test_csv_into_a_folder_not_yet_made_creates_it(tmp_path):
    """The CLI's up-front check accepts a --csv whose folder is still to be created; nothing
    created it, so the write failed after the table with a bare "[Errno 2] No such file"."""
    path = tmp_path / "tables" / "new" / "rows.csv"
    summary(ResidualNet(), (16, 16, 3)).to_csv(str(path))
    assert next(csv.DictReader(path.open()))["name"] == "stem"


def test_cli_prints_table_and_writes_csv(cli_runs):
    out = cli_runs["tmp"] / "tables" / "vgg.csv"  # a folder still to be made, as --csv accepts
    proc = cli_runs["table"]
    assert proc.returncode == 0, proc.stderr
    assert "conv3_3" in proc.stdout and "1x64x64x3" in proc.stdout
    assert "receptive field of the output" in proc.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["name"] == "head" and rows[-1]["output_shape"] == "1x7"

    bad = cli_runs["not_ints"]
    assert bad.returncode != 0
    assert "summary CLI: --input_shape='64,x,3' is invalid; expected comma-separated" in bad.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": 32}, r"summary: input_shape=32 is invalid; expected a sequence"),
        ({"input_shape": (32,)}, r"summary: input_shape=\(32,\) is invalid; expected positive"),
        ({"input_shape": (0, 32, 3)}, r"summary: input_shape=\(0, 32, 3\) is invalid"),
        # a bool is an int to isinstance, but (8, 8, True) is no shape
        ({"input_shape": (8, 8, True)},
         r"^summary: input_shape=\(8, 8, True\) is invalid; expected positive ints"),
        ({"input_shape": (32, 32, 3), "batch_size": 0}, r"summary: batch_size=0 is invalid"),
        ({"input_shape": (32.0, 32, 3)}, r"summary: input_shape=\(32.0, 32, 3\) is invalid"),
        # A failure inside the model names the layer (it was a bare ZeroDivisionError from
        # Dense's initializer on 0 features, or from a Conv given a rank-3 input).
        ({"input_shape": (4, 4, 3)}, r"^summary: input_shape=\(4, 4, 3\) is invalid; in VGGLike, "
         r"layer fc \(Dense\) fails \(its input has shape \(1, 0\), no features; the input came "
         r"from layer conv3_3 \(Conv\), shape \(1, 1, 1, 64\)"),
        ({"input_shape": (32, 3)}, r"^summary: input_shape=\(32, 3\) is invalid; in VGGLike, "
         r"layer conv2_1 \(Conv\) fails"),
        # A keyword the model does not take (was flax's TypeError) or a dtype that is no float.
        ({"input_shape": (32, 32, 3), "trian": True},
         r"^summary: keyword arguments=\{'trian': True\} is invalid; VGGLike.__call__\(self, x"),
        # summary sets `mutable` itself: the model was blamed for refusing it
        ({"input_shape": (32, 32, 3), "mutable": ["batch_stats"]},
         r"^summary: mutable=\['batch_stats'\] is invalid; summary makes every collection but "
         r"'params' mutable itself"),
        ({"input_shape": (32, 32, 3), "dtype": "foo"},
         r"^summary: dtype='foo' is invalid; expected a floating-point dtype"),
        # traced as float32 without x64, so every byte count was half what it said
        ({"input_shape": (32, 32, 3), "dtype": "float64"},
         r"^summary: dtype='float64' is invalid; expected a dtype JAX computes in: float64 "
         r"needs jax.config.update\('jax_enable_x64', True\) first"),
    ],
)
def test_errors(kwargs, message):
    with jax.enable_x64(False), pytest.raises(ValueError, match=message):
        summary(VGGLike(), **kwargs)


@pytest.mark.parametrize("pool", [max_pool2d, avg_pool2d, global_avg_pool])
def test_a_bfloat16_row_before_an_average_pool_counts_bfloat16_bytes(pool):
    """avg_pool2d widens its input to float32 inside itself; that cast was folded into the conv's
    row, which then reported its output at 4 bytes per element instead of bfloat16's 2. The
    model's own float32 output (the logits) keeps its 4 bytes."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(Conv2D(8, 3, padding=1, dtype=jnp.bfloat16)(x))
            return pool(x) if pool is global_avg_pool else pool(x, 2)

    rows = summary(Net(), (16, 16, 3), dtype=jnp.bfloat16).rows
    assert rows[0].name == "Conv2D_0" and rows[0].activation_bytes == 16 * 16 * 8 * 2
    output = jax.eval_shape(Net().apply, Net().init(jax.random.key(0), jnp.zeros(
        (1, 16, 16, 3), jnp.bfloat16)), jnp.zeros((1, 16, 16, 3), jnp.bfloat16))
    assert rows[-1].activation_bytes == output.size * output.dtype.itemsize


def test_a_bfloat16_value_handed_on_widened_and_as_it_is_counts_once():
    """An Inception-like block: the conv's bfloat16 output feeds a pool branch (widened inside
    it) and a 1x1 conv; mapped back through the cast, it was listed twice (1,024 bytes where the
    tensor holds 512). A pool on the bfloat16 input itself made its cast a float32 row of its
    own (420 of a 426-byte total where the pooled output holds 6)."""

    class Branches(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = Conv2D(4, 3, padding=1, dtype=jnp.bfloat16)(x)
            a, b = avg_pool2d(y, 3, 1, padding=1), Conv2D(4, 1, dtype=jnp.bfloat16)(y)
            return jnp.concatenate([a.astype(b.dtype), b], -1)

    row = summary(Branches(), (8, 8, 3), dtype=jnp.bfloat16).rows[0]
    assert row.output_shapes == ((1, 8, 8, 4),) and row.activation_bytes == 8 * 8 * 4 * 2

    class Pooled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return global_avg_pool(x)

    for dtype in (jnp.float32, jnp.bfloat16):
        table = summary(Pooled(), (5, 7, 3), dtype=dtype)
        assert [(r.name, r.activation_bytes) for r in table.rows] == [
            ("global_avg_pool_0", 3 * jnp.dtype(dtype).itemsize)]


def test_float64_is_traced_as_float64_with_x64():
    with jax.enable_x64(True):
        rows = summary(VGGLike(), (32, 32, 3), dtype="float64").rows
    assert rows[0].activation_bytes == 32 * 32 * 16 * 8  # conv1_1: 16 channels, 8 bytes


@pytest.mark.parametrize(
    ("model", "message"),
    [
        # a zoo name raised AttributeError ('str' object has no attribute 'init') in the trace
        ("resnet18", r"^summary: model='resnet18' is invalid; expected a flax.linen Module, e.g. "
                     r"cnnjax.models.create_model\('resnet18'\) for a registered model\.$"),
        (VGGLike, r"^summary: model='VGGLike' is invalid; it is a Module class; expected an "
                  r"instance, e.g. VGGLike\(\)\.$"),
        (None, r"^summary: model='NoneType' is invalid; expected a flax.linen Module\.$"),
    ],
)
def test_a_model_that_is_no_module_is_named(model, message):
    with pytest.raises(ValueError, match=message):
        summary(model, (32, 32, 3))


def test_cli_model_loading_errors():
    from cnnjax.analysis.summary import load_model, parse_shape

    with pytest.raises(ValueError, match=r"create_example: name='nope' is invalid; expected one"):
        load_model("examples.nope")
    with pytest.raises(ValueError, match=r"summary CLI: --input_shape='0,4,3' is invalid; "
                                         r"expected positive ints"):
        parse_shape("0,4,3")
    model, shape = load_model("examples.residual_net", num_classes=3)
    assert shape == (16, 16, 3) and model.num_classes == 3
    # named as the flag, as every other summary CLI error (it read "create_model: unknown ...")
    with pytest.raises(ValueError, match=r"^summary CLI: --model='resnt18' is invalid; did you "
                                         r"mean \['resnet18'\]\? valid names: \['alexnet'"):
        load_model("resnt18")


def test_an_input_shape_the_model_cannot_take_names_the_flag():
    """`check_input_shape` is the engine's `check_input_size` worded for --input_shape: the
    registry minimum first, then the layer where the input collapses (for a network with no
    registered minimum), with the flag, not data.image_size, as the fix."""
    from cnnjax.analysis.summary import check_input_shape, load_model, parse_shape

    with pytest.raises(ValueError, match=r"^summary CLI: --input_shape='32,32' is invalid; "
                                         r"expected positive ints H,W,C"):
        parse_shape("32,32")
    with pytest.raises(ValueError, match=r"^summary CLI: --input_shape='1,2,3,4' is invalid"):
        parse_shape("1,2,3,4")
    model, _ = load_model("lenet5")
    with pytest.raises(ValueError, match=r"^x CLI: --input_shape='28,40,1' is invalid; lenet5: "
                                         r"the model needs inputs of at least 32x32\.$"):
        check_input_shape(model, "lenet5", (28, 40, 1), "28,40,1", "x CLI")
    check_input_shape(model, "lenet5", (32, 32, 1), "32,32,1")  # its native shape runs
    model, _ = load_model("examples.vgg_like")
    with pytest.raises(ValueError, match=r"^summary CLI: --input_shape='2,2,3' is invalid; "
                                         r"examples.vgg_like: too small: layer \S+ \(Conv\) "
                                         r"fails .*; use a larger --input_shape or a model"):
        check_input_shape(model, "examples.vgg_like", (2, 2, 3), "2,2,3")


@jax.custom_vjp
def _relu_straight_through(x):
    return jnp.maximum(x, 0.0)


_relu_straight_through.defvjp(lambda x: (jnp.maximum(x, 0.0), None), lambda _, g: (g,))


def test_sees_through_remat_custom_vjp_checkpoint_and_scan():
    class Tricky(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.remat(nn.Conv)(4, (3, 3), padding=1, name="conv")(x)
            x = _relu_straight_through(x)  # custom_vjp: folded into the conv row
            x, _ = jax.lax.scan(lambda c, _: (c * 0.5 + 1.0, None), x, None, length=3)
            return jax.checkpoint(lambda y: nn.max_pool(y, (2, 2), (2, 2)))(x)

    result = summary(Tricky(), (8, 8, 2))
    assert [r.type for r in result.rows][1:] == ["scan", "max_pool"]
    conv, scan, pool = result.rows
    assert conv.name == "conv" and conv.params == 4 * (2 * 9 + 1)
    # conv: 2*4*2*taps (taps = 22*22 real-data pairs for 8 px, k3, p1) + bias + ReLU.
    assert conv.flops == 2 * 4 * 2 * 22 * 22 + 2 * 8 * 8 * 4
    assert conv.field.size == (3, 3)
    assert scan.flops == 3 * 2 * 8 * 8 * 4  # 3 iterations of a multiply and an add
    assert pool.output_shape == (1, 4, 4, 4) and pool.flops == 4 * 4 * 4 * 3
    # A scan is opaque to the field analysis: treated (conservatively) as mixing all 8 positions
    # of the conv's 3-wide fields: 3 + (8 - 1) * 1 = 10, with a note.
    assert scan.field.size == (10, 10) and any("'scan'" in n for n in result.notes)


class _Loop(nn.Module):
    """A while loop whose trip count (3) is not static to the cost count."""

    def __call__(self, x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5 + 1.0),
                                  (0, x))[1]


class _Branches(nn.Module):
    """A cond between 4 elementwise operations and none."""

    def __call__(self, x):
        return jax.lax.cond(x.sum() > 0, lambda y: ((y * 2 + 1) * 3) - 1, lambda y: y, x)


def test_control_flow_costs_one_while_iteration_and_the_costliest_branch():
    """Neither the trip count nor the branch taken is static: a while loop counts its body once
    plus its condition, by hand 1 (counter) + 2 * 32 (multiply, add on 4x4x2) + 1 (compare) =
    66, also XLA's count before optimisation; a cond its costliest branch, 4 operations * 32 =
    128, not the identity's 0."""
    (loop,) = summary(_Loop(), (4, 4, 2)).rows
    assert loop.type == "while" and loop.flops == 1 + 2 * 32 + 1
    assert loop.flops == _xla_flops(_Loop(), (4, 4, 2))[1]
    branches = summary(_Branches(), (4, 4, 2)).rows
    assert [r.type for r in branches] == ["global_sum_pool", "cond"]
    assert branches[1].flops == 4 * (4 * 4 * 2)


class _FixedFilterBank(nn.Module):
    """A depthwise 2x2 Haar transform (4 constant +-0.5 filters per channel, stride 2): the
    shape of `conv_general_dilated_patches`' gather, but real multiply-adds; or, with
    `patches=True`, the gather itself."""

    patches: bool = False

    @nn.compact
    def __call__(self, x):
        dn = ("NHWC", "HWIO", "NHWC")
        if self.patches:
            return jax.lax.conv_general_dilated_patches(x, (2, 2), (2, 2), "VALID",
                                                        dimension_numbers=dn)
        haar = np.array([[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]],
                         [[1, -1], [-1, 1]]]) / 2  # [filter, h, w]
        kernel = np.tile(haar.transpose(1, 2, 0)[:, :, None, :], (1, 1, 1, x.shape[-1]))
        return jax.lax.conv_general_dilated(x, jnp.asarray(kernel, x.dtype), (2, 2), "VALID",
                                            dimension_numbers=dn,
                                            feature_group_count=x.shape[-1])


def test_a_fixed_filter_bank_is_counted_and_only_the_patch_gather_is_free():
    haar = summary(_FixedFilterBank(), (16, 16, 3)).rows
    gather = summary(_FixedFilterBank(patches=True), (16, 16, 3)).rows
    # 8x8 outputs x 12 channels x 4 taps; the one-hot gather moves the same numbers, 0 MACs.
    assert [(r.name, r.macs) for r in haar] == [("conv_0", 8 * 8 * 12 * 4)]
    assert [(r.name, r.macs) for r in gather] == [("patches_0", 0)]


class _Pyramid(nn.Module):
    """Spatial pyramid pooling as a model: `jnp.take` with constant index arithmetic."""

    levels: tuple[int, ...]

    def __call__(self, x):
        return spatial_pyramid_pool(x, self.levels)


@pytest.mark.parametrize("levels,shape", [((2,), (7, 7, 3)), ((3,), (7, 7, 3)),
                                          ((1, 2, 4), (9, 11, 5))])
def test_arithmetic_on_constants_is_not_counted_as_xla_folds_it(levels, shape):
    """Adaptive bins that do not divide the map gather with `jnp.take`, whose index clamping
    (lt/add/select_n on a constant index array) XLA computes at compile time: the FLOPs total
    equals XLA's exactly (it counted 210 for 162 at levels=(2,) on 7x7x3)."""
    result = summary(_Pyramid(levels), shape)
    xla, _, _ = _xla_flops(_Pyramid(levels), shape)
    assert result.totals["flops"] == xla
    assert all(r.flops == 0 for r in result.rows if r.type == "take")


class _SplitNet(nn.Module):
    """Splits the channels into two paths (one op with two outputs) and concatenates them."""

    @nn.compact
    def __call__(self, x):
        a, b = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([nn.Conv(4, (3, 3))(a), nn.Conv(4, (1, 1))(b)], -1)


def test_a_row_with_several_outputs_counts_them_all():
    """`jnp.split` of 1x8x8x6 passes on two 1x8x8x3 halves: 2 * 192 floats = 1,536 B (the first
    half alone, 768 B, was reported)."""
    result = summary(_SplitNet(), (8, 8, 6))
    split = result.rows[0]
    assert (split.type, split.output_shape) == ("split", (1, 8, 8, 3))
    assert split.output_shapes == ((1, 8, 8, 3), (1, 8, 8, 3))
    assert split.activation_bytes == 2 * 8 * 8 * 3 * F32
    assert [r.output_shapes for r in result.rows[1:]] == [((1, 8, 8, 4),)] * 2 + [((1, 8, 8, 8),)]
    assert result.totals["activation_bytes"] == (2 * 8 * 8 * 3 + 2 * 8 * 8 * 4 + 8 * 8 * 8) * F32
    assert "1x8x8x3 (+1)" in str(result).splitlines()[2]
    assert result.to_dict()["rows"][0]["output_shapes"] == [[1, 8, 8, 3], [1, 8, 8, 3]]


_BAD_INPUTS = [
    ("--model=bogus",),
    ("--model=examples.vgg_like", "--input_shape=a,b"),
    ("--model=examples.vgg_like", "--csv={file}/x.csv"),
    ("--model=lenet5", "--input_shape=8,8,1"),
    ("--model=lenet5", "--input_shape=32,32"),
    # an empty value summarized the native shape; a directory failed after the table printed
    ("--model=lenet5", "--input_shape="),
    ("--model=lenet5", "--csv={tmp}"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """The CLI commands of this module, run by one interpreter forking a child per command
    (tests/commands.py): a table with its CSV ("table"), a shape that is no ints ("not_ints")
    and `_BAD_INPUTS` in order ("bad_inputs"), with "tmp" the folder they write to. What the
    command imports only once running (the engine's logging, which brings orbax and optax in,
    the model registry) is imported once first: ~18 s of process starts and imports (2 cores
    under load) became ~2.5 s."""
    tmp = tmp_path_factory.mktemp("summary_cli")
    (tmp / "file").write_text("")
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
           "PYTHONPATH": str(ROOT)}
    commands = [
        ("--model=examples.vgg_like", "--input_shape=64,64,3", "--num_classes=7",
         f"--csv={tmp / 'tables' / 'vgg.csv'}"),
        ("--model=examples.vgg_like", "--input_shape=64,x,3"),
        *(tuple(a.format(file=tmp / "file", tmp=tmp) for a in args) for args in _BAD_INPUTS)]
    table, not_ints, *bad_inputs = run_commands(
        [("cnnjax.analysis.summary", *args) for args in commands], env=env,
        preimport=["cnnjax.train.logging", "cnnjax.models", "tests.examples"])
    return {"tmp": tmp, "table": table, "not_ints": not_ints, "bad_inputs": bad_inputs}


def test_cli_bad_input_is_one_line(cli_runs):
    """Each of `_BAD_INPUTS` ends the command with one `error: ` line naming the flag, before
    the table prints."""
    tmp_path, procs = cli_runs["tmp"], cli_runs["bad_inputs"]
    expected = {
        "--model=bogus": "summary CLI: --model='bogus' is invalid; valid names: ['alexnet'",
        "--input_shape=a,b": "'a,b' is invalid",
        "--csv={file}/x.csv": f"--csv's folder={str(tmp_path / 'file')!r} is invalid; "
                              "expected a directory",
        # the engine's check (training says it of data.image_size), not a Conv2D error
        "--input_shape=8,8,1": "summary CLI: --input_shape='8,8,1' is invalid; lenet5: the "
                               "model needs inputs of at least 32x32.",
        # H,W without C parsed, then failed inside the model with a rank error
        "--input_shape=32,32": "summary CLI: --input_shape='32,32' is invalid; expected "
                               "positive ints H,W,C, e.g. 224,224,3.",
        "--input_shape=": "--input_shape='' is invalid; expected a value, or leave the flag "
                          "out",
        "--csv={tmp}": f"--csv={str(tmp_path)!r} is invalid; it is a directory, expected a "
                       "file name"}
    for args, proc in zip(_BAD_INPUTS, procs, strict=True):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args,
                                                                          proc.stderr[-2000:])
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: "), (args, line)
        assert expected[args[-1]] in line, (args, line)
        assert not proc.stdout, args  # refused before the table


def _torch_macs(layer, shape):
    """MACs of one PyTorch layer on an NCHW zero input, by `torch.utils.flop_counter` (fvcore's
    conventions: a conv counts every output, a transposed conv every input element, times the
    whole kernel; bias not counted): its FLOPs are 2 per multiply-add."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        layer(torch.zeros(shape))
    return counter.get_total_flops() // 2


# (H, W, C_in, features, kernel, stride, padding, output_padding, dilation, groups)
TRANSPOSED_CASES = [
    (1, 1, 100, 64, 4, 1, 0, 0, 1, 1),  # DCGAN's first layer (1x1 -> 4x4), narrowed
    (5, 6, 4, 6, 3, 1, 0, 0, 1, 1),  # stride 1, full output 7x8
    (5, 6, 4, 6, 3, 1, 1, 0, 1, 2),  # stride 1, same size, grouped
    (5, 6, 4, 6, 3, 1, 0, 0, 2, 1),  # stride 1, dilated kernel
    (5, 6, 4, 6, 3, 2, 1, 1, 1, 1),
    (4, 5, 6, 6, 4, 3, 2, 2, 1, 6),  # depthwise, stride 3
    (4, 5, 4, 2, 3, 2, 0, 1, 2, 2),
]


@pytest.mark.parametrize(("h", "w", "cin", "cout", "k", "s", "p", "op", "d", "g"),
                         TRANSPOSED_CASES)
def test_transposed_conv_macs_match_torch_flop_counter_at_every_stride(h, w, cin, cout, k, s, p,
                                                                       op, d, g):
    """Each input element times the whole kernel, whatever the stride (fvcore's count): a
    stride-1 transposed conv, lowered as an ordinary convolution with full padding, was counted
    densely over that padding (DCGAN's 1x1 -> 4x4 layer: 16x too much, 16x the stride-2 figure)."""
    torch = pytest.importorskip("torch")
    ours = summary(ConvTranspose2D(cout, k, strides=s, padding=p, output_padding=op, dilation=d,
                                   groups=g), (h, w, cin))
    layer = torch.nn.ConvTranspose2d(cin, cout, k, s, p, op, groups=g, dilation=d)
    hand = h * w * k * k * cin // g * cout
    assert ours.totals["macs"] == _torch_macs(layer, (1, cin, h, w)) == hand
    # Flax's own module (no kernel flip, padding "VALID" = PyTorch's padding 0) counts the same.
    if p == op == 0 and g == 1:
        flax_layer = nn.ConvTranspose(cout, (k, k), strides=(s, s), padding="VALID",
                                      kernel_dilation=(d, d))
        assert summary(flax_layer, (h, w, cin)).totals["macs"] == ours.totals["macs"]


class _AuxHead(nn.Module):
    """A main and an auxiliary dense head; the auxiliary one is returned only in training (as
    GoogLeNet's), so in eval mode its work is dead code."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        aux = nn.Dense(7, name="aux")(x)
        main = nn.Dense(5, name="main")(x)
        return (main, aux) if train else main


def test_discarded_work_is_dead_code_and_not_counted():
    """An auxiliary head computed but not returned (eval mode) costs nothing, as XLA removes it;
    its 12*7+7 parameters stay in the total, with a note (it was charged 84 MACs, 175 FLOPs)."""
    model = _AuxHead()
    train = summary(model, (2, 2, 3), train=True)
    assert [r.name for r in train.rows] == ["flatten_0", "aux", "main"]
    assert train.totals["macs"] == 12 * 7 + 12 * 5
    assert len(train.output_shapes) == 2 and train.notes == []
    result = summary(model, (2, 2, 3))
    assert [r.name for r in result.rows] == ["flatten_0", "main"]
    assert result.totals["macs"] == 12 * 5
    assert result.totals["params"] == 12 * 7 + 7 + 12 * 5 + 5
    assert result.notes == ["91 parameters take no part in this call's outputs (e.g. auxiliary "
                            "heads in eval mode): in the total, in no row"]
    xla, _, _ = _xla_flops(model, (2, 2, 3))
    assert result.totals["flops"] == xla == 2 * 12 * 5 + 5


class _TwoMethods(nn.Module):
    def setup(self):
        self.conv = nn.Conv(4, (3, 3))
        self.fc = nn.Dense(3)

    def __call__(self, x, train: bool = False):
        return self.fc(self.features(x).reshape(x.shape[0], -1))

    def features(self, x, scale: int = 1):
        return self.conv(x) * scale


def test_apply_keywords_reach_apply_and_the_rest_the_called_method():
    """`method=` (apply's own keyword) selects the traced method, whose signature then decides
    which other keywords are valid (the keyword check took `method` for a `__call__` argument)."""
    assert [r.name for r in summary(_TwoMethods(), (6, 6, 2)).rows] == ["conv", "flatten_0", "fc"]
    for method in ("features", _TwoMethods.features):
        result = summary(_TwoMethods(), (6, 6, 2), method=method, scale=2)
        assert [r.name for r in result.rows] == ["conv"]
    with pytest.raises(ValueError, match=r"^summary: keyword arguments=\{'train': True\} is "
                       r"invalid; _TwoMethods.features\(self, x, scale: int = 1\) refuses them"):
        summary(_TwoMethods(), (6, 6, 2), method="features", train=True)


def test_apply_rngs_and_method_are_checked_as_apply_takes_them():
    """`rngs=` as one PRNG key (flax's apply takes it for {'params': key}) failed with "TypeError:
    key array cannot be converted to boolean"; an int, with "'int' object is not iterable"; a
    `method=` that is no name or function, with flax's ApplyModuleInvalidMethodError."""
    plain = summary(_TwoMethods(), (6, 6, 2)).totals
    assert summary(_TwoMethods(), (6, 6, 2), rngs=jax.random.key(3)).totals == plain
    assert summary(_TwoMethods(), (6, 6, 2), rngs={"dropout": jax.random.key(3)}).totals == plain
    with pytest.raises(ValueError, match=r"^summary: rngs=5 is invalid; expected a dict of PRNG "
                                         r"keys by stream name .* or one PRNG key"):
        summary(_TwoMethods(), (6, 6, 2), rngs=5)
    with pytest.raises(ValueError, match=r"^summary: method=3 is invalid; expected the name of "
                                         r"a method of _TwoMethods or a function"):
        summary(_TwoMethods(), (6, 6, 2), method=3)
    # A name the module lacks failed in flax's words (AttributeError), naming no argument.
    with pytest.raises(ValueError, match=r"^summary: method='nope' is invalid; _TwoMethods has "
                                         r"no such method"):
        summary(_TwoMethods(), (6, 6, 2), method="nope")


def test_a_numpy_batch_size_gives_a_json_ready_summary():
    """`batch_size=np.int64(2)` was accepted and kept as NumPy's int in `input_shape`, so
    `to_dict()` (documented JSON-serializable) failed in json.dumps."""

    result = summary(_TwoMethods(), (6, 6, 2), batch_size=np.int64(2))
    assert result.input_shape == (2, 6, 6, 2) and type(result.input_shape[0]) is int
    json.dumps(result.to_dict())


class _Pool(nn.Module):
    """One pooling function of the map, as a model."""

    fn: object

    def __call__(self, x):
        return self.fn(x)


@pytest.mark.parametrize("shape,out", [((8, 8, 4), 4), ((8, 8, 4), (4, 2)), ((12, 12, 3), 4),
                                       ((8, 8, 4), 1), ((7, 7, 8), 7), ((6, 9, 2), (3, 9))])
def test_equal_bin_adaptive_avg_pool_counts_as_the_avg_pool_of_its_windows(shape, out):
    """Adaptive average pooling whose bins tile the map (kernel = stride = size // out) is the
    ordinary average pool of those windows, and its FLOPs are that pool's: window - 1 adds per
    output and one division (for 8x8x4 -> 4x4: 16 * 4 * (3 + 1) = 256); out = 1 is global
    pooling, a bin of 1x1 the identity (0, as XLA folds it). It counted a division after each
    of its two separable sums: 384 for 256, 288 for global pooling's 256, and 2 per element for
    the 7x7 -> 7x7 identity, which XLA computes as nothing."""
    from cnnjax.layers.pooling import adaptive_avg_pool2d

    result = summary(_Pool(lambda x: adaptive_avg_pool2d(x, out)), shape)
    xla, _, _ = _xla_flops(_Pool(lambda x: adaptive_avg_pool2d(x, out)), shape)
    oh, ow = (out, out) if isinstance(out, int) else out
    bh, bw = shape[0] // oh, shape[1] // ow
    windows = oh * ow * shape[2]
    by_hand = 0 if bh * bw == 1 else windows * (bh * bw - 1 + 1)
    assert result.totals["flops"] == xla == by_hand
    if bh * bw > 1:
        pooled = summary(_Pool(lambda x: avg_pool2d(x, (bh, bw))), shape)
        assert result.totals["flops"] == pooled.totals["flops"]
    if (oh, ow) == (1, 1):
        assert result.totals["flops"] == summary(_Pool(global_avg_pool), shape).totals["flops"]


class _LearnedPositionMap(nn.Module):
    """A learned 16x16x8 map run through its own 3x3 conv (no input in that branch), added to
    the image's 3x3 conv."""

    constant_output: bool = False

    @nn.compact
    def __call__(self, x):
        position = self.param("position", nn.initializers.normal(1.0), (1, 16, 16, 8))
        position = nn.Conv(16, (3, 3), name="position_conv")(position)
        if self.constant_output:
            return position * 2.0
        return nn.Conv(16, (3, 3), name="image_conv")(x) + position


def test_a_branch_without_the_input_counts_its_macs():
    """A branch that never meets the input is charged to the row it feeds: its params and FLOPs
    were, its convolution's MACs were lost (110,592 reported for 405,504)."""
    result = summary(_LearnedPositionMap(), (16, 16, 3))
    assert result.totals["macs"] == 16 * 16 * 16 * 9 * (3 + 8)
    assert result.totals["flops"] == _xla_flops(_LearnedPositionMap(), (16, 16, 3))[0]
    assert sum(r.params for r in result.rows) == result.total_params
    assert not any("take no part" in n for n in result.notes)


def test_parameters_reaching_an_input_independent_output_are_not_called_unused():
    """An output computed from parameters alone: its parameters reach it, so the note called
    them unused ("take no part in this call's outputs") wrongly."""
    result = summary(_LearnedPositionMap(constant_output=True), (16, 16, 3))
    assert not any("take no part" in n for n in result.notes), result.notes
    assert any(f"{16 * 16 * 8 + 16 * 8 * 9 + 16:,} parameters reach the outputs without the "
               "input" in n for n in result.notes), result.notes


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(0.5, deterministic=not train)(x)


def test_dropout_work_on_random_bits_counts_in_training():
    """The PRNG keys were constants in summary's trace, so everything computed from them (the
    bits' conversion to uniform floats and the mask) was 'static', counted 0, though a train
    step takes its keys as arguments and computes it. Hand count per element of flax's Dropout
    (jax.random.bernoulli): shift, or, sub, mul, add, max (the uniform draw), lt (the mask),
    div (1 / keep) and select: 9; the random bits themselves count 0 (module docstring)."""
    def flops(train):
        return summary(_Dropout(), (10, 10, 4), batch_size=2, train=train).totals["flops"]

    assert flops(True) == 9 * 2 * 10 * 10 * 4 and flops(False) == 0


def test_an_input_shape_with_the_batch_axis_is_told_to_drop_it():
    """(1, 32, 32, 1) reached the model as a rank-5 array, and the message never said that
    input_shape excludes the batch axis; a shape the model refuses for another reason does
    not get the hint."""
    with pytest.raises(ValueError, match=r"^summary: input_shape=\(1, 32, 32, 1\) is invalid; "
                                         r"in LeNet5, .*rank-4 NHWC.*; input_shape excludes the "
                                         r"batch axis \(batch_size sets it\): did you mean "
                                         r"\(32, 32, 1\)\?$"):
        summary(create_model("lenet5"), (1, 32, 32, 1))
    with pytest.raises(ValueError) as err:
        summary(create_model("lenet5"), (2, 32, 32, 1))
    assert "batch axis" not in str(err.value)


class _Typo(nn.Module):
    """A bug in the model's own code (jnp has no relu), whatever the input."""

    @nn.compact
    def __call__(self, x):
        return jnp.relu(Conv2D(4, 3, padding=1)(x))  # the line the traceback must show


class _BadGroups(nn.Module):
    """A setting no input satisfies: 4 filters in 3 groups."""

    @nn.compact
    def __call__(self, x):
        return Conv2D(4, 3, padding=1, groups=3)(x)


def test_a_bug_in_the_model_is_its_own_error_not_the_input_shapes():
    """An AttributeError in the model's code read "summary: input_shape=(8, 8, 3) is invalid;
    ... a larger input ... may be needed", with no cause and no line. A failure that a larger
    input does not cure is re-raised as itself, with the traceback to the model's line;
    receptive_field, on the same path, too."""
    import traceback

    for fn in (summary, receptive_field):
        with pytest.raises(AttributeError, match="has no attribute 'relu'") as err:
            fn(_Typo(), (8, 8, 3))
        frames = traceback.extract_tb(err.value.__traceback__)
        assert any(f.filename == __file__ and f.line.startswith("return jnp.relu(")
                   for f in frames)
    with pytest.raises(ValueError, match=r"^Conv2D: groups=3 is invalid"):
        summary(_BadGroups(), (8, 8, 3))


class _ConvPoolConv(nn.Module):
    """A pooling function (no submodule) between two convolutions: 5x5 -> pool 3/2 -> 2x2."""

    @nn.compact
    def __call__(self, x):
        x = max_pool2d(Conv2D(8, 3, padding=1, name="c1")(x), 3, 2)
        return Conv2D(16, 3, name="c2")(x)


def test_a_too_small_input_names_the_failing_layers_own_input_in_full():
    """c2 failed "...; inside a network [cut at 200 characters]; the input it got came from
    layer c1 (Conv2D), shape (1, 5, 5, 8)": a shape c2 never got (the pool between made it
    2x2, (5 - 3) // 2 + 1). Its own input's shape is named and the layer's hint kept whole."""
    with pytest.raises(ValueError) as err:
        summary(_ConvPoolConv(), (5, 5, 3))
    message = str(err.value)
    assert message.startswith("summary: input_shape=(5, 5, 3) is invalid; in _ConvPoolConv, "
                              "layer c2 (Conv2D) fails (ValueError: Conv2D: kernel_size=(3, 3) "
                              "is invalid; ")
    assert message.endswith(f"{INPUT_TOO_SMALL_HINT}; its input has shape (1, 2, 2, 8)); a "
                            "larger input, another rank or other model settings may be needed.")
    assert "came from" not in message
