"""Receptive fields: closed-form recurrences, published values, and the gradient support of real
networks (the set of input pixels a feature depends on) as an independent reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.analysis.receptive_field import (
    AxisField,
    collapse,
    receptive_field,
    stack_receptive_field,
    union,
)
from cnnjax.analysis.summary import summary
from cnnjax.layers import ConvTranspose2D, LocallyConnected2D, TiledConv2D
from cnnjax.layers.conv_impl import conv_impl
from tests.examples import AlexNetLike, VGGLike

ONES = nn.initializers.ones


def test_two_stacked_3x3_see_5x5_and_three_see_7x7():
    assert stack_receptive_field([(3, 1, 1), (3, 1, 1)]) == (5, 1, 0)
    assert stack_receptive_field([(3, 1, 1)] * 3) == (7, 1, 0)
    assert stack_receptive_field([(5, 1, 2)]) == (5, 1, 0)


def test_published_values():
    """Araujo et al. (2019), Table 1: AlexNet r = 195, VGG-16 r = 212 (up to the last pool)."""
    alexnet = [(11, 4, 0), (3, 2), (5, 1, 2), (3, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 2)]
    size, jump, _ = stack_receptive_field(alexnet)
    assert (size, jump) == (195, 32)
    conv, pool = (3, 1, 1), (2, 2)
    vgg16 = [conv] * 2 + [pool] + [conv] * 2 + [pool] + ([conv] * 3 + [pool]) * 3
    size, jump, start = stack_receptive_field(vgg16)
    assert (size, jump) == (212, 32)
    # Each 2x2/2 pool moves the first centre by half the current jump: 0.5 + 1 + 2 + 4 + 8.
    assert start == 15.5


def test_dilation_and_start():
    # k=3, d=2: effective kernel 5; padding 1 moves the first centre to (5-1)/2 - 1 = 1.
    assert stack_receptive_field([(3, 1, 1, 2)]) == (5, 1, 1)
    # 2x2 stride-2 VALID: r=2, j=2, centre at 0.5.
    assert stack_receptive_field([(2, 2)]) == (2, 2, 0.5)


def test_union_and_collapse():
    a = AxisField(3.0, 1.0, 1.0, axis=1, count=9)
    b = AxisField(3.0, 1.0, -1.0, axis=1, count=9)
    merged, misaligned = union([a, b])
    assert misaligned and (merged.size, merged.start) == (5.0, 0.0)  # [0,2] U [-2,0] = [-2,2]
    merged, misaligned = union([a, AxisField(1.0, 1.0, 1.0, axis=1, count=9)])
    assert not misaligned and (merged.size, merged.start) == (3.0, 1.0)  # max when centred
    # A global pool over 9 positions with jump 1: [0, 2] ... [8, 10] -> 11 pixels centred at 5.
    full = collapse(a)
    assert (full.size, full.start, full.axis) == (11.0, 5.0, None)
    # A field already spread over all positions (jump 0, still on axis 1) meeting a positioned
    # one spreads it too: the union over all positions, for every unit.
    spread = AxisField(11.0, 0.0, 5.0, axis=1, count=9)
    merged, misaligned = union([spread, AxisField(1.0, 1.0, 0.0, axis=1, count=9)])
    assert misaligned and (merged.size, merged.jump, merged.start, merged.axis) == (11, 0, 5, 1)
    # Same axis, different numbers of positions (one path merged by a repeat): spread as well.
    merged, misaligned = union([a, AxisField(3.0, 2.0, 0.0, axis=1, count=4, exclusive=False)])
    assert misaligned and (merged.jump, merged.axis) == (0.0, 1)


def _support(fn, x, index):
    """Rows and columns of input pixels with a non-zero gradient for output `index`."""
    grad = jax.grad(lambda x: fn(x)[index].sum())(x)
    nz = np.nonzero(np.abs(np.asarray(grad[0])).sum(-1))
    return (nz[0].min(), nz[0].max()), (nz[1].min(), nz[1].max())


class _GradNet(nn.Module):
    """Convs with all-ones kernels on positive inputs: no cancellation, so the gradient support
    is exactly the receptive field (clipped to the image). Average (not max) pooling."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(1, (3, 3), padding=1, use_bias=False, kernel_init=ONES)(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.Conv(1, (3, 3), padding=2, kernel_dilation=2, use_bias=False, kernel_init=ONES)(x)
        return nn.Conv(1, (5, 3), strides=(2, 1), padding=((2, 2), (0, 0)), use_bias=False,
                       kernel_init=ONES)(x)


def test_field_equals_gradient_support():
    model, shape = _GradNet(), (40, 40, 1)
    # By hand, rows:  conv3 p1: r=3 j=1 s=0; pool2/2: r=4 j=2 s=0.5; conv3 d2 p2: r=4+4*2=12,
    # s=0.5+(2-2)*2=0.5; conv5 s2 p2: r=12+4*2=20, j=4, s=0.5.
    # Columns: ... conv3 d2 p2 as rows (r=12, j=2, s=0.5); conv3 s1 VALID: r=16, j=2, s=2.5.
    field = receptive_field(model, shape)
    assert field.size == (20, 16) and field.jump == (4, 2) and field.start == (0.5, 2.5)
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    fn = lambda x: model.apply(variables, x)
    for i, j in [(4, 5), (6, 8), (0, 0)]:
        rows, cols = _support(fn, x, (0, i, j, 0))
        for (lo, hi), pos, size, jump, start, n in zip(
            (rows, cols), (i, j), field.size, field.jump, field.start, shape[:2], strict=True
        ):
            centre = start + pos * jump
            expected = (max(0, centre - (size - 1) / 2), min(n - 1, centre + (size - 1) / 2))
            assert (lo, hi) == expected, (i, j, size)


class _FlattenedPaths(nn.Module):
    """A wide path over the top-left crop and a narrow one over the whole image, each flattened,
    concatenated and read by one Dense unit (all-ones weights: no cancellation)."""

    crop: int = 8
    stride_b: int = 1

    @nn.compact
    def __call__(self, x):
        a = nn.Conv(16, (3, 3), padding="VALID", use_bias=False, kernel_init=ONES)(
            x[:, : self.crop, : self.crop])
        b = nn.Conv(1, (3, 3), self.stride_b, padding="VALID", use_bias=False,
                    kernel_init=ONES)(x)
        flat = jnp.concatenate([a.reshape(len(x), -1), b.reshape(len(x), -1)], axis=1)
        return nn.Dense(1, use_bias=False, kernel_init=ONES)(flat)


@pytest.mark.parametrize("stride_b, jump, noted", [(1, 1, False), (2, 0, True)])
def test_concatenated_flattened_paths_see_every_paths_field(stride_b, jump, noted):
    """The largest piece (the wide crop path) used to stand for the whole concatenation, as if
    the others were padding: the field came out 8x8 while the unit reads all 16x16 pixels."""
    model, shape = _FlattenedPaths(stride_b=stride_b), (16, 16, 1)
    result = summary(model, shape)
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    support = _support(lambda x: model.apply(variables, x), x, (0, 0))
    field = result.receptive_field
    for (lo, hi), size, start in zip(support, field.size, field.start, strict=True):
        assert (lo, hi) == (start - (size - 1) / 2, start + (size - 1) / 2)
    assert support[0][1] == 15 - (stride_b - 1)  # the whole image (a stride-2 VALID conv: 0..14)
    assert field.jump == (jump, jump)
    assert any("different jumps" in n for n in result.notes) == noted


class _TwoPaths(nn.Module):
    """Adds a 3x3 VALID conv and a 3x3 average pool of the input shifted by 2 pixels."""

    @nn.compact
    def __call__(self, x):
        a = nn.Conv(1, (3, 3), padding="VALID", use_bias=False, kernel_init=ONES)(x)
        shifted = jnp.pad(x, ((0, 0), (2, 0), (2, 0), (0, 0)))[:, : x.shape[1], : x.shape[2]]
        return a + nn.avg_pool(shifted, (3, 3), (1, 1))


def test_misaligned_paths_union_matches_gradient():
    model, shape = _TwoPaths(), (15, 15, 1)
    result = summary(model, shape)
    # Path a covers [i, i+2], path b [i-2, i]: the union [i-2, i+2] is 5 wide, centred on i.
    assert result.receptive_field.size == (5, 5) and result.receptive_field.start == (0, 0)
    assert any("misaligned" in n for n in result.notes)
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    rows, cols = _support(lambda x: model.apply(variables, x), x, (0, 6, 6, 0))
    assert rows == cols == (4, 8)


class _PooledPlusCropped(nn.Module):
    """Adds a 2-row average pool (jump 2) and the first half of the rows (jump 1, offset
    `offset`): output row i reads rows {2i, 2i + 1} and {i + offset}."""

    offset: int = 0

    @nn.compact
    def __call__(self, x):
        half = x.shape[1] // 2
        return nn.avg_pool(x, (2, 1), (2, 1)) + x[:, self.offset:self.offset + half]


@pytest.mark.parametrize("offset", [0, 1])
def test_paths_moving_by_different_jumps_get_an_upper_bound(offset):
    """Unit 0's union (2 rows, jump 2) stood for every unit, while unit 31 reads rows 31..63
    (33 rows); the note listed starts and jumps apart, pairing one path's start with the other's
    jump. Now: the union over all positions (jump 0), which holds every unit's support, and a
    note pairing each path's (start, jump) (review BD)."""
    model, shape = _PooledPlusCropped(offset=offset), (64, 1, 1)
    result = summary(model, shape)
    field = result.receptive_field
    assert (field.size[0], field.jump[0], field.start[0]) == (64, 0, 31.5)
    x = jnp.ones((1, *shape))
    for i in (0, 15, 31):
        rows, _ = _support(lambda x: model.apply({}, x), x, (0, i, 0, 0))
        assert rows == (min(2 * i, i + offset), max(2 * i + 1, i + offset))
        assert field.start[0] - (field.size[0] - 1) / 2 <= rows[0]
        assert rows[1] <= field.start[0] + (field.size[0] - 1) / 2
    pairs = ", ".join(map(str, sorted([(float(offset), 1.0), (0.5, 2.0)])))
    assert [n.split(": ", 1)[1] for n in result.notes] == [
        f"paths merged on spatial axis 0 move by different jumps ((start, jump) = {pairs}), so a "
        "unit's field grows with its position; every output position is given the union of "
        "their fields over all positions (jump 0), an upper bound"]


class _TwoPathsConcatenated(nn.Module):
    """`_TwoPaths`' misaligned paths concatenated along channels, then mixed by a 1x1 conv."""

    @nn.compact
    def __call__(self, x, train=False):
        a = nn.Conv(1, (3, 3), padding="VALID", use_bias=False, kernel_init=ONES)(x)
        shifted = jnp.pad(x, ((0, 0), (2, 0), (2, 0), (0, 0)))[:, : x.shape[1], : x.shape[2]]
        both = jnp.concatenate([a, nn.avg_pool(shifted, (3, 3), (1, 1))], axis=-1)
        return nn.Conv(1, (1, 1), use_bias=False, kernel_init=ONES)(both)


def test_misaligned_concatenated_paths_are_noted_with_their_offsets():
    """As a sum of misaligned paths: the union, and a note giving each axis' starts and jumps."""
    model, shape = _TwoPathsConcatenated(), (15, 15, 1)
    result = summary(model, shape)
    assert result.receptive_field.size == (5, 5) and result.receptive_field.start == (0, 0)
    concatenate = [n for n in result.notes if "concatenate" in n.split(":")[0]]
    assert [n.split(": ", 1)[1] for n in concatenate] == [
        f"paths concatenated on spatial axis {d} are misaligned ((start, jump) = (-1.0, 1.0), "
        "(1.0, 1.0)); the union of their fields is reported" for d in (0, 1)]
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    rows, cols = _support(lambda x: model.apply(variables, x), x, (0, 6, 6, 0))
    assert rows == cols == (4, 8)


def _assert_field_holds_support(model, shape, positions):
    """Each output unit in `positions` depends only on input pixels inside its reported field
    (centre start + p * jump, `size` wide): the field may be an upper bound, never too small.
    Positive inputs and weights: no cancellation hides a dependence."""
    result = summary(model, shape)
    field = result.receptive_field
    x = jax.random.uniform(jax.random.key(1), (1, *shape)) + 0.5
    variables = jax.jit(lambda x: jax.tree_util.tree_map(  # one compilation, not one per op
        lambda a: jnp.abs(a) + 0.1, model.init(jax.random.key(0), x)))(x)
    fn = lambda x: model.apply(variables, x)
    for pos in positions:
        spans = _support(fn, x, (0, *pos, 0))
        for (lo, hi), p, size, jump, start in zip(  # pos (): a unit of a non-spatial output
            spans, pos or (0,) * len(spans), field.size, field.jump, field.start, strict=True
        ):
            centre = start + p * jump
            assert centre - (size - 1) / 2 <= lo and hi <= centre + (size - 1) / 2, (pos, field)
    return result


class _GlobalGate(nn.Module):
    """A 3x3 conv gated by its own global average (squeeze-excitation), or concatenated with it
    broadcast back over the map (DeepLab's image-pooling branch); `residual` adds the identity
    shortcut of an SE-ResNet block to the gated map."""

    concatenate: bool = False
    residual: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(2, (3, 3), padding=1, use_bias=False, kernel_init=ONES)(x)
        pooled = jnp.mean(y, axis=(1, 2), keepdims=True)
        if self.concatenate:
            return jnp.concatenate([y, jnp.broadcast_to(pooled, y.shape)], axis=-1)
        gated = y * nn.sigmoid(pooled)
        return x + gated if self.residual else gated


class _DynamicKernel(nn.Module):
    """A convolution whose kernel is a crop of the feature map (SiamFC-style correlation)."""

    @nn.compact
    def __call__(self, x):
        f = nn.Conv(2, (3, 3), padding=1, kernel_init=ONES)(x)
        kernel = f[:, 4:7, 4:7, :].reshape(3, 3, 2, 1)
        return jax.lax.conv_general_dilated(f, kernel, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    "model",
    [_GlobalGate(), _GlobalGate(concatenate=True), _GlobalGate(residual=True), _DynamicKernel()],
    ids=["gate", "concatenated", "gate_plus_shortcut", "dynamic_kernel"],
)
def test_a_global_path_gives_every_unit_the_same_field(model):
    """Every output unit depends on pixels all over the map: the reported field must hold each
    unit's gradient support wherever the unit is (jump 0), and a note says why. The shortcut of
    an SE block (jump 1) meeting the gated map (jump 0) must not make the field slide again."""
    shape = (20, 20, 1)
    x = jnp.ones((1, *shape))
    out_size = jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0].shape[1]
    p = (0, out_size // 2, out_size - 1)
    result = _assert_field_holds_support(model, shape, list(zip(p, p, strict=True)))
    assert result.receptive_field.jump == (0, 0)
    assert any("reaches every output" in n or "(e.g. global pooling)" in n for n in result.notes)


class _Upsample(nn.Module):
    """A stride-2 conv whose map is brought back to full size: nearest upsampling written as
    `jnp.repeat` (a reshape merging each axis with the copies), `jax.image.resize` ("nearest": a
    gather; "bilinear": a dot_general with a constant matrix) or a dense layer over each spatial
    axis. `after` adds a 3x3 conv or a full-resolution shortcut."""

    method: str = "repeat"
    after: str = ""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(1, (3, 3), strides=2, padding=1, use_bias=False, kernel_init=ONES)(x)
        n, h, w, c = y.shape
        if self.method == "repeat":
            y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)
        elif self.method == "dense":
            for axis in (1, 2):
                moved = jnp.moveaxis(y, axis, -1)
                mixed = nn.Dense(2 * y.shape[axis], use_bias=False, kernel_init=ONES)(moved)
                y = jnp.moveaxis(mixed, -1, axis)
        else:
            y = jax.image.resize(y, (n, 2 * h, 2 * w, c), self.method)
        if self.after == "conv":
            y = nn.Conv(1, (3, 3), padding=1, use_bias=False, kernel_init=ONES)(y)
        elif self.after == "shortcut":
            y = y + x
        return y


@pytest.mark.parametrize(
    ("method", "after", "note"),
    [
        ("repeat", "", "merged with others"),
        ("repeat", "conv", "merged with others"),
        ("repeat", "shortcut", "different numbers of positions"),
        ("nearest", "", "mixing all positions"),
        ("nearest", "conv", "mixing all positions"),
        ("bilinear", "", "contracted against a constant"),
        ("bilinear", "conv", "contracted against a constant"),
        ("dense", "", "contracted against a constant"),
    ],
)
def test_upsampled_maps_give_every_unit_the_whole_field(method, after, note):
    """Upsampling that is no window op (repeat, resize, dense over space) leaves positions that
    no longer lie on a uniform grid of the input: each unit is given the whole field (jump 0, an
    upper bound, with a note), never the source map's jump over twice the positions."""
    shape = (16, 16, 1)
    result = _assert_field_holds_support(_Upsample(method, after), shape,
                                         [(0, 0), (7, 7), (15, 15), (3, 12)])
    assert result.receptive_field.jump == (0, 0)
    assert any(note in n for n in result.notes), result.notes


def test_an_optimization_barrier_passes_each_operand_through():
    """The kernel through `lax.optimization_barrier` stays a parameter of its convolution."""

    class Barrier(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.ones, (3, 3, 1, 1))
            x, kernel = jax.lax.optimization_barrier((x, kernel))
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

    result = summary(Barrier(), (16, 16, 1))
    assert result.receptive_field.size == (3, 3)
    assert [(r.name, r.params) for r in result.rows] == [("conv_0", 9)]
    assert result.notes == []


@pytest.mark.parametrize(("kernel", "stride", "expected"),
                         [(2, 2, 1), (3, 2, 2), (4, 2, 2), (5, 2, 3), (3, 3, 1), (4, 1, 4)])
def test_transposed_conv_field_is_max_over_output_phases(kernel, stride, expected):
    """A k-tap transposed conv with stride s spreads each input over k outputs, so an output sees
    ceil(k/s) or floor(k/s) inputs depending on its phase: the field is the larger count."""
    model = nn.ConvTranspose(1, (kernel, kernel), strides=(stride, stride), padding="VALID",
                             use_bias=False, kernel_init=ONES)
    shape = (9, 9, 1)
    result = summary(model, shape)
    assert result.receptive_field.size == (expected, expected)
    assert result.receptive_field.jump == (1 / stride,) * 2
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    fn = lambda x: model.apply(variables, x)
    jac = np.asarray(jax.jacrev(fn)(x))[0, :, :, 0, 0, :, :, 0]  # (out_h, out_w, in_h, in_w)
    widths = []
    for o in range(kernel, jac.shape[0] - kernel):  # interior outputs, all phases
        rows = np.nonzero(jac[o, o].sum(axis=1))[0]
        widths.append(rows.max() - rows.min() + 1)
    assert max(widths) == expected


def test_alexnet_like_final_field():
    # pool5 (r=195, j=32, start=33) then a dense layer over the 2x2 map: 195 + 32 = 227,
    # centred between the two positions: 33 + 16 = 49.
    assert receptive_field(AlexNetLike(), (99, 99, 3)) == ((227, 227), (32, 32), (49, 49))
    size, jump, start = receptive_field(VGGLike(), (32, 32, 3))
    assert (size, jump, start) == ((68, 68), (8, 8), (15.5, 15.5))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([()], r"stack_receptive_field: layers\[0\]=\(\) is invalid; expected \(kernel, stride"),
        ([(3, 1, 1, 1, 1)], r"layers\[0\]=\(3, 1, 1, 1, 1\) is invalid"),
        ([(3, 0)], r"stack_receptive_field: layers\[0\].stride=0 is invalid"),
        ([(3, 1), (0,)], r"stack_receptive_field: layers\[1\].kernel=0 is invalid"),
        ([(3, 1, -1)], r"stack_receptive_field: layers\[0\].padding=-1 is invalid"),
        ([(3, 1, 0, 0)], r"stack_receptive_field: layers\[0\].dilation=0 is invalid"),
        # a bare number is refused, not read as (kernel,): [3, 3] may be one (3, 3) layer
        ([3, 3], r"^stack_receptive_field: layers\[0\]=3 is invalid; expected \(kernel, stride, "
                 r"padding, dilation\) as a tuple, e.g. \(3,\) for a kernel of 3 alone\.$"),
        ([(3,), None], r"^stack_receptive_field: layers\[1\]=None is invalid; expected \(kernel"),
        ([(3,), "33"], r"^stack_receptive_field: layers\[1\]='33' is invalid; expected \(kernel"),
        (3, r"^stack_receptive_field: layers=3 is invalid; expected a list of layers"),
    ],
)
def test_errors(layers, message):
    with pytest.raises(ValueError, match=message):
        stack_receptive_field(layers)


def test_receptive_field_names_itself_for_a_bad_model_or_shape():
    """Its own arguments' errors name receptive_field (they named summary, which it calls; a
    zoo name raised AttributeError)."""
    with pytest.raises(ValueError, match=r"^receptive_field: model='vgg16' is invalid; expected "
                                         r"a flax.linen Module, e.g. cnnjax.models.create_model"):
        receptive_field("vgg16", (32, 32, 3))
    with pytest.raises(ValueError, match=r"^receptive_field: input_shape=\(0, 32, 3\) is "
                                         r"invalid; expected positive ints"):
        receptive_field(VGGLike(), (0, 32, 3))
    with pytest.raises(ValueError, match=r"^receptive_field: input_shape=None is invalid; "
                                         r"expected a sequence like \(H, W, C\)"):
        receptive_field(VGGLike(), None)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((4, 4, 3), {}, r"input_shape=\(4, 4, 3\) is invalid; in VGGLike, layer fc \(Dense\) fails"),
    ((32, 32, 3), {"trian": True},
     r"keyword arguments=\{'trian': True\} is invalid; VGGLike.__call__\(self, x"),
    ((32, 32, 3), {"batch_size": 0}, r"batch_size=0 is invalid"),
    ((32, 32, 3), {"dtype": "foo"}, r"dtype='foo' is invalid; expected a floating-point dtype"),
])
def test_receptive_field_names_itself_for_what_summary_refuses(args, kwargs, message):
    """The keywords it passes on to summary, and an input too small for the model, are the
    caller's arguments of receptive_field: their errors name it (they named summary)."""
    with pytest.raises(ValueError, match=r"^receptive_field: " + message):
        receptive_field(VGGLike(), args, **kwargs)


def _assert_support_is_field(model, shape, positions, support=_support):
    """Every output in `positions` depends on exactly the input rows/columns of its field
    (all-ones kernels on positive inputs: no cancellation), and the trace adds no note.
    `support(fn, x, index)` gives those rows/columns (`_one_hot_support` through a max pool)."""
    result = summary(model, shape)
    field = result.receptive_field
    assert result.notes == []
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    fn = lambda x: model.apply(variables, x)
    for i, j in positions:
        spans = support(fn, x, (0, i, j, 0))
        for (lo, hi), pos, size, jump, start, n in zip(
            spans, (i, j), field.size, field.jump, field.start, shape[:2], strict=True
        ):
            centre = start + pos * jump
            expected = (max(0, centre - (size - 1) / 2), min(n - 1, centre + (size - 1) / 2))
            assert (lo, hi) == expected, (i, j, field)
    return field


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        # One 3x3 kernel set per output position: the field is the 3x3 window (the reshape to
        # (blocks, tile) used to make it the whole 12x12 input).
        (TiledConv2D(1, 3, tile_size=2, kernel_init=ONES), (12, 12, 1), ((3, 3), (1, 1), (1, 1))),
        (TiledConv2D(1, (3, 2), tile_size=(3, 2), strides=2, padding=1, kernel_init=ONES),
         (13, 12, 1), ((3, 2), (2, 2), (0, -0.5))),
        (TiledConv2D(1, 3, tile_size=(2, 3), dilation=2, padding=2, padding_mode="reflect",
                     kernel_init=ONES), (11, 11, 1), ((5, 5), (1, 1), (0, 0))),
        (LocallyConnected2D(1, 3, kernel_init=ONES), (10, 10, 1), ((3, 3), (1, 1), (1, 1))),
        (LocallyConnected2D(1, (5, 3), strides=(2, 1), padding=1, padding_mode="replicate",
                            kernel_init=ONES), (12, 9, 1), ((5, 3), (2, 1), (1, 0))),
    ],
)
def test_tiled_and_locally_connected_fields_equal_gradient_support(layer, shape, expected):
    border = [(0, 0), (1, 3)] if layer.padding_mode == "zeros" else []  # else padding repeats
    field = _assert_support_is_field(layer, shape, [(2, 3), (3, 2), (4, 4), *border])
    assert tuple(field) == expected


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (ConvTranspose2D(1, 3, strides=2, kernel_init=ONES), 2),
        (ConvTranspose2D(1, 4, strides=2, padding=1, kernel_init=ONES), 2),
        (ConvTranspose2D(1, 3, strides=2, padding=1, output_padding=1, kernel_init=ONES), 2),
        (ConvTranspose2D(1, 5, strides=3, padding=2, kernel_init=ONES), 2),
        # Taps 0, 2, 4 at stride 2: even outputs see 3 inputs, odd ones none.
        (ConvTranspose2D(1, 3, strides=2, dilation=2, kernel_init=ONES), 3),
        (ConvTranspose2D(1, 3, kernel_init=ONES), 3),
    ],
)
def test_cnnjax_transposed_conv_field_is_max_gradient_support(layer, expected):
    """`ConvTranspose2D` (cnnjax's, over an input-dilated conv): the size is the widest gradient
    support over interior outputs of every phase, the jump 1/stride."""
    shape = (9, 9, 1)
    field = receptive_field(layer, shape)
    stride = layer.strides
    assert field.size == (expected, expected) and field.jump == (1 / stride,) * 2
    x = jnp.ones((1, *shape))
    variables = layer.init(jax.random.key(0), x)
    jac = np.asarray(jax.jacrev(lambda x: layer.apply(variables, x))(x))[0, :, :, 0, 0, :, :, 0]
    widths = [0]
    for o in range(5, jac.shape[0] - 5):  # interior outputs, every phase
        rows = np.nonzero(jac[o, o].sum(axis=1))[0]
        widths.append(rows.max() - rows.min() + 1 if rows.size else 0)
    assert max(widths) == expected


def _one_hot_support(fn, x, index):
    """Rows and columns of the input pixels that, made the image's one non-zero pixel, get a
    gradient for output `index`: what a max pool reads (at one input its gradient reaches one
    element per window, so `_support` would miss the rest of the window)."""
    _, h, w, c = x.shape
    hot = jnp.eye(h * w, dtype=x.dtype).reshape(h * w, 1, h, w, 1) * jnp.ones(c, x.dtype)
    grads = jax.jit(jax.vmap(jax.grad(lambda x: fn(x)[index].sum())))(hot)
    nz = np.nonzero((np.abs(np.asarray(grads)) * np.asarray(hot)).sum(axis=(0, 1, 4)))
    return (nz[0].min(), nz[0].max()), (nz[1].min(), nz[1].max())


class _PaddedPool(nn.Module):
    """A padded max or average pool (PyTorch's arguments), then a 3x3 all-ones conv."""

    kind: str
    kernel: int
    stride: int
    padding: int
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x):
        from cnnjax.layers.pooling import avg_pool2d, max_pool2d

        pool = max_pool2d if self.kind == "max" else avg_pool2d
        x = pool(x, self.kernel, self.stride, padding=self.padding, ceil_mode=self.ceil_mode)
        return nn.Conv(1, (3, 3), padding=1, use_bias=False, kernel_init=ONES)(x)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "ceil_mode", "expected"), [
    (3, 2, 1, False, ((7, 7), (2, 2), (0, 0))),
    (2, 2, 1, True, ((6, 6), (2, 2), (-0.5, -0.5))),
])
def test_padded_pooling_fields_equal_gradient_support(kind, kernel, stride, padding, ceil_mode,
                                                      expected):
    """A pool's padding moves its first window up and left by `padding` pixels: 3x3/2 with
    padding 1 centres output 0 on pixel 0 (not 1), 2x2/2 on pixels -1 and 0 (-0.5, not 0.5).
    Reference: the gradient support of outputs at the border and inside (review GC, F10)."""
    model = _PaddedPool(kind, kernel, stride, padding, ceil_mode)
    support = _one_hot_support if kind == "max" else _support
    field = _assert_support_is_field(model, (9, 9, 1), [(0, 0), (1, 1), (2, 3)], support)
    assert tuple(field) == expected


class _StridedSliceConv(nn.Module):
    """`x[:, ::2, 1::3]` (a strided `lax.slice`), then a 3x3 VALID all-ones conv."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (3, 3), padding="VALID", use_bias=False,
                       kernel_init=ONES)(x[:, ::2, 1::3])


def test_a_strided_slice_scales_the_jump_and_moves_the_start():
    """Slice strides 2 and 3 multiply the jump: output (0, 0) reads rows 0, 2, 4 and columns
    1, 4, 7 (the start index 1 shifts the columns), a 5 x 7 field centred on (2, 4). With the
    jump left at 1 it was 3 x 3 (review GC, F4)."""
    field = _assert_support_is_field(_StridedSliceConv(), (13, 13, 1),
                                     [(0, 0), (1, 1), (4, 1), (2, 0)])
    assert tuple(field) == ((5, 7), (2, 3), (2, 4))


class _FlipConv(nn.Module):
    """Columns reversed (`lax.rev`), then a 3x3 VALID all-ones conv."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (3, 3), padding="VALID", use_bias=False,
                       kernel_init=ONES)(jnp.flip(x, axis=2))


def test_a_flipped_axis_starts_at_its_last_pixel():
    """After a flip, output column 0 reads the last 3 columns (7..9 of 10): centre 8, moving
    by -1. The flip's own start was one pixel past the image (10, not 9), so the field was
    centred on 9 (review GC, F5)."""
    shape = (10, 10, 1)
    field = _assert_support_is_field(_FlipConv(), shape, [(0, 0), (1, 1), (7, 7), (2, 5)])
    assert tuple(field) == ((3, 3), (1, -1), (1, 8))
    assert all(0 <= start < n for start, n in zip(field.start, shape[:2], strict=True))


def test_splitting_a_spatial_axis_is_noted_not_silent():
    """A space-to-depth reshape is no window op: the field becomes the whole axis, with a note."""

    def space_to_depth(x):
        n, h, w, c = x.shape
        y = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(n, h // 2, w // 2, 4 * c)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (1, 1))(space_to_depth(x))

    result = summary(Net(), (8, 8, 1))
    assert result.receptive_field.size == (8, 8)
    assert any("split across array axes" in n for n in result.notes)


@pytest.mark.parametrize("kind", ["reshape_pool", "self_attention"])
def test_a_split_axis_s_whole_field_does_not_move_with_the_unit(kind):
    """After a split (2x2 mean pooling written as reshape + mean, a non-local block's attention
    over the flattened map reshaped back), every unit may see the whole axis: the field kept the
    axis's old jump, so `theoretical_bounds` moved it with the unit and missed the true support
    (the gradient's, on positive all-ones weights) of units away from the centre."""
    from cnnjax.analysis.effective_receptive_field import theoretical_bounds

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            n, h, w, _ = x.shape
            if kind == "reshape_pool":
                y = nn.Conv(2, (3, 3), strides=2, kernel_init=ONES)(x)
                y = y.reshape(n, h // 4, 2, w // 4, 2, 2).mean(axis=(2, 4))
                return nn.Conv(1, (3, 3), kernel_init=ONES)(y)
            flat = x.reshape(n, h * w, -1)
            attention = jax.nn.softmax(jnp.einsum("nic,njc->nij", flat, flat), -1)
            return jnp.einsum("nij,njc->nic", attention, flat).reshape(n, h, w, -1)

    shape = (16, 16, 1) if kind == "reshape_pool" else (6, 6, 1)
    model = Net()
    x = jnp.ones((1, *shape)) * 0.1
    variables = model.init(jax.random.key(0), x)
    field = receptive_field(model, shape)
    out_hw = model.apply(variables, x).shape[1:3]
    for position in [(0, 0), (out_hw[0] - 1, out_hw[1] - 1), (1, out_hw[1] // 2)]:
        support = _support(lambda x: model.apply(variables, x), x, (0, *position))
        bounds = theoretical_bounds(field, position)
        for (lo, hi), (first, last) in zip(support, bounds, strict=True):
            assert first <= lo and hi <= last, (position, support, bounds)
    if kind == "self_attention":
        notes = summary(model, shape).notes
        assert any("lie on different array axes [1, 2]" in n for n in notes), notes


class _ConvStride2(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="VALID")(x)
        return nn.Conv(4, (3, 3), strides=2, padding="VALID")(x)


@pytest.mark.parametrize("impl", ["matmul", "auto"])
def test_analysis_traces_xla_convolutions_inside_conv_impl(impl):
    """`conv_impl` changes the CPU lowering, not the network: the same field (3x3 then 3x3/2:
    size 5, jump 2, start 2), MACs and rows, without notes."""
    plain = summary(_ConvStride2(), (8, 8, 3))
    with conv_impl(impl):
        rerouted = summary(_ConvStride2(), (8, 8, 3))
        assert receptive_field(_ConvStride2(), (8, 8, 3)) == ((5, 5), (2, 2), (2, 2))
    assert rerouted.receptive_field == plain.receptive_field == ((5, 5), (2, 2), (2, 2))
    assert rerouted.rows == plain.rows and rerouted.notes == []


@pytest.mark.parametrize(("pad", "ambiguous"), [((1, 1), False), ((4, 0), True), ((3, 3), True)])
def test_circular_padding_as_large_as_the_input_is_flagged(pad, ambiguous):
    """jnp.pad's wrap mode concatenates whole copies of a 3-pixel input once the padding reaches
    3: which copy is the data is then unknown, so the field start there is flagged (sizes hold)."""
    from cnnjax.layers import Conv2D

    layer = Conv2D(1, 3, padding=(pad, pad), padding_mode="circular")
    result = summary(layer, (3, 3, 1))
    assert result.receptive_field.size == (3, 3)
    assert any("ambiguous" in n for n in result.notes) is ambiguous
    if not ambiguous:  # agrees with zero padding, which has no copies
        zeros = summary(Conv2D(1, 3, padding=(pad, pad)), (3, 3, 1))
        assert result.receptive_field.start == zeros.receptive_field.start


class _SinglePositionSpread(nn.Module):
    """A 3x3/2 VALID conv whose one-row map (a 3 x w input) is spread over 3 rows: adaptive
    pooling (a gather, as torchvision AlexNet's 6x6 pool of a 1x1 pool5 at 64x64) or a
    broadcast of its first row."""

    how: str = "adaptive"

    @nn.compact
    def __call__(self, x):
        from cnnjax.layers.pooling import adaptive_avg_pool2d

        y = nn.Conv(1, (3, 3), strides=2, padding="VALID", use_bias=False, kernel_init=ONES)(x)
        if self.how == "adaptive":
            return adaptive_avg_pool2d(y, 3)
        return jnp.broadcast_to(y[:, :1], (len(y), 3, *y.shape[2:]))


@pytest.mark.parametrize("shape", [(3, 3, 1), (3, 5, 1), (5, 3, 1)])
@pytest.mark.parametrize("how", ["adaptive", "broadcast"])
def test_a_single_position_spread_over_several_gives_them_one_field(how, shape):
    """Copies of one position all see its field: jump 0 there, never the conv's jump 2 (which
    put copy 2's field 4 pixels off its real support). AlexNet at 64x64 reported (0, 32)."""
    out = jax.eval_shape(_SinglePositionSpread(how).init_with_output, jax.random.key(0),
                         jnp.ones((1, *shape)))[0].shape
    corners = [(0, 0), (out[1] - 1, out[2] - 1), (0, out[2] - 1), (out[1] - 1, 0)]
    result = _assert_field_holds_support(_SinglePositionSpread(how), shape, corners)
    spread = (0, 1) if how == "adaptive" else (0,)  # adaptive pooling resizes both axes
    assert all(result.receptive_field.jump[d] == 0 for d in spread), result.receptive_field


class _PyramidHead(nn.Module):
    """A 3x3/2 VALID conv (17x17 -> 8x8, jump 2), spatial pyramid pooling, one Dense unit."""

    levels: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        from cnnjax.layers.pooling import spatial_pyramid_pool

        y = nn.Conv(1, (3, 3), strides=2, padding="VALID", use_bias=False, kernel_init=ONES)(x)
        return nn.Dense(1, use_bias=False, kernel_init=ONES)(spatial_pyramid_pool(y, self.levels))


@pytest.mark.parametrize(("levels", "jump"), [((1,), 16), ((2,), 8), ((4,), 4), ((1, 2), 0),
                                              ((2, 1), 0), ((1, 2, 4), 0), ((2, 4), 0)])
def test_spatial_pyramid_jump_is_common_to_every_level(levels, jump):
    """Each level's bins step by 16 / level pixels; levels that differ have no common jump: 0
    with a note. The 1x1 level (its map a single position) used to be left out, so (1, 2)
    reported level 2's jump 8 without a note where (1, 2, 4) reported 0."""
    result = _assert_field_holds_support(_PyramidHead(levels), (17, 17, 1), [()])
    assert result.receptive_field.size == (17, 17)
    assert result.receptive_field.jump == (jump, jump)
    assert any("different jumps" in n for n in result.notes) == (jump == 0)


class _Chain1D(nn.Module):
    """Transposed ('T') and plain ('C') convs along the rows, all-ones kernels (no
    cancellation: the Jacobian's support is exactly each output's field)."""

    layers: tuple[tuple[str, int, int, str], ...]  # (kind, kernel, stride, padding)

    @nn.compact
    def __call__(self, x):
        for kind, kernel, stride, padding in self.layers:
            layer = nn.ConvTranspose if kind == "T" else nn.Conv
            x = layer(1, (kernel, 1), (stride, 1), padding=padding, use_bias=False,
                      kernel_init=ONES)(x)
        return x


def _widest_interior_support(model: nn.Module, rows: int) -> int:
    """The most input rows any output row away from the borders depends on."""
    x = jnp.ones((1, rows, 1, 1))
    variables = model.init(jax.random.key(0), x)
    jac = np.asarray(jax.jacfwd(lambda x: model.apply(variables, x)[0, :, 0, 0])(x))
    widths = [idx[-1] - idx[0] + 1 for idx in (np.nonzero(row)[0] for row in jac[:, 0, :, 0, 0])
              if len(idx) and idx[0] > 0 and idx[-1] < rows - 1]
    return max(widths)


@pytest.mark.parametrize(("layers", "expected"), [
    # U-Net's up-conv (k2 s2: each output sees one input) and a conv over two of its outputs,
    # which may come from two inputs: 2, where the fractional jump alone gave 1.5.
    ((("T", 2, 2, "VALID"), ("C", 2, 1, "VALID")), 2),
    ((("T", 2, 2, "VALID"), ("C", 4, 1, "VALID")), 3),   # 2.5 before
    ((("T", 2, 3, "VALID"), ("C", 3, 1, "VALID")), 2),   # 1.667 before
    ((("T", 3, 3, "SAME"), ("C", 2, 1, "VALID")), 2),    # 1.333 before
    ((("C", 1, 4, "VALID"), ("T", 2, 2, "VALID"), ("C", 2, 1, "SAME")), 5),  # 3 before
    ((("T", 2, 2, "VALID"), ("C", 3, 1, "SAME"), ("C", 2, 1, "SAME")), 3),   # 2.5 before
    ((("T", 2, 2, "VALID"), ("C", 2, 1, "SAME"), ("T", 2, 2, "VALID")), 2),  # 1.5 before
    # A strided conv over the upsampled map lands back on the inputs' grid: exact again.
    ((("T", 4, 2, "SAME"), ("C", 3, 2, "SAME")), 3),
    # FCN-8s' decoder pattern: up x2, add a skip, up x2 again, then a window.
    ((("T", 4, 2, "SAME"), ("C", 3, 1, "SAME"), ("T", 4, 2, "SAME"), ("C", 3, 1, "SAME")), 4),
])
def test_fields_after_a_transposed_conv_are_upper_bounds(layers, expected):
    """After a transposed conv, neighbouring outputs' fields move in whole input steps, not by
    the fractional jump: a later window's field was under the true one (1.5 for 2 inputs). The
    field holds the widest support measured by the Jacobian, equals it where the grid is
    uniform, and is never more than one input step over it in these chains."""
    model = _Chain1D(layers)
    size = receptive_field(model, (48, 1, 1)).size[0]
    true = _widest_interior_support(model, 48)
    assert true == expected
    assert expected <= size <= expected + 1, size


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [2, 3, 4])
def test_every_transposed_conv_then_conv_field_holds_the_support(kernel, stride):
    for after in (2, 3, 4, 5):
        for padding in ("SAME", "VALID"):
            model = _Chain1D((("T", kernel, stride, padding), ("C", after, 1, "SAME")))
            size = receptive_field(model, (24, 1, 1)).size[0]
            true = _widest_interior_support(model, 24)
            assert true <= size <= true + 1, (kernel, stride, after, padding, size, true)


def test_stacked_paths_merge_like_channel_paths():
    """`jnp.stack` is its own primitive (`stack`) in jax >= 0.10: it had no rule and was taken
    as mixing all positions (size 18 on 16x16 for a 3x3 and a 1x1 path, which see 3 pixels)."""

    class StackMean(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Conv(4, (3, 3), padding="SAME", kernel_init=ONES)(x)
            b = nn.Conv(4, (1, 1), kernel_init=ONES)(x)
            return jnp.stack([a, b], axis=-1).mean(-1)

    model, shape = StackMean(), (16, 16, 3)
    result = summary(model, shape)
    assert result.receptive_field.size == (3, 3) and result.receptive_field.jump == (1, 1)
    assert not any("mixing all positions" in n for n in result.notes), result.notes
    x = jnp.ones((1, *shape))
    variables = model.init(jax.random.key(0), x)
    assert _support(lambda x: model.apply(variables, x), x, (0, 7, 7)) == ((6, 8), (6, 8))


def test_a_globally_mixed_field_does_not_move_when_its_axis_comes_back():
    """An unknown primitive mixing all positions into an output of another rank collapsed the
    fields but kept their jump; when a later op brought the spatial axes back (a mean over an
    added axis), `theoretical_bounds` slid the whole field with the unit."""
    from cnnjax.analysis.effective_receptive_field import theoretical_bounds
    from cnnjax.analysis.receptive_field import propagate, to_receptive_field

    info = (AxisField(3.0, 1.0, 0.0, axis=1, count=16), AxisField(3.0, 1.0, 0.0, axis=2, count=16))
    notes = []
    (mixed,) = propagate("some_new_primitive", {}, [info], [(1, 16, 16, 4)], [(1, 16, 16, 4, 2)],
                         notes, "here")
    assert all(f.jump == 0 for f in mixed) and "mixing all positions" in notes[0]
    bounds = theoretical_bounds(to_receptive_field(mixed), (15, 0))
    assert bounds[0][0] <= 0 and bounds[0][1] >= 15


@pytest.mark.parametrize("stride,dilation,kernel,then", [
    (3, 2, 3, 3), (2, 3, 2, 2), (3, 2, 3, 4), (4, 3, 3, 3), (2, 1, 3, 3), (3, 3, 2, 2),
])
def test_a_dilated_strided_transposed_conv_bounds_the_fields_that_follow_it(
        stride, dilation, kernel, then):
    """With a dilated kernel the first input an upsampled output reads can step back (k=3,
    stride 3, dilation 2: outputs 0..8 read inputs 0, -, 0, 1, 0, 1, 2, 1, 2), so a window over
    3 outputs was reported to see 2 inputs where it sees 3. Reference: the widest gradient
    support of any unit (all-positive weights, average pooling: no cancellation)."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = ConvTranspose2D(1, (kernel, 1), strides=(stride, 1), dilation=(dilation, 1))(x)
            return nn.avg_pool(x, (then, 1), (1, 1))

    n = 12
    x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1.0, (1, n, 1, 1)), jnp.float32)
    # Init and Jacobian each under jit: one compilation each (eagerly, every op of each case's
    # new convolution shapes compiled on its own, 2-3x slower).
    variables = jax.jit(lambda x: jax.tree.map(lambda p: jnp.abs(p) + 0.1,
                                               Net().init(jax.random.key(0), x)))(x)
    jacobian = np.asarray(jax.jit(jax.jacrev(lambda x: Net().apply(variables, x)[0, :, 0, 0]))(x))
    widest = max(np.ptp(np.flatnonzero(row)) + 1 for row in jacobian.reshape(-1, n) if row.any())
    assert summary(Net(), (n, 1, 1)).receptive_field.size[0] >= widest


class _DenseGrid(nn.Module):
    """YOLO v1's head in small: a 3x3/2 conv (8x8 -> 4x4, jump 2), flatten, a Dense layer whose
    output is reshaped into a 4x4 grid; `then_conv` reads the grid with a 3x3 conv (a decoder)."""

    then_conv: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(2, (3, 3), strides=2, padding=1)(x)
        x = nn.Dense(4 * 4 * 2)(x.reshape(len(x), -1)).reshape(len(x), 4, 4, 2)
        return nn.Conv(2, (3, 3), padding=1)(x) if self.then_conv else x


@pytest.mark.parametrize("then_conv", [False, True], ids=["grid", "grid_then_conv"])
def test_a_dense_output_reshaped_into_a_grid_gives_every_cell_the_whole_field(then_conv):
    """Every cell of a grid made from a Dense layer's output sees the whole image: jump 0. The
    field kept the conv's jump 2, so cell (3, 3)'s field was placed on rows 5-13 while its
    gradient reaches rows 0-7."""
    corners = [(0, 0), (3, 3), (0, 3), (2, 1)]
    result = _assert_field_holds_support(_DenseGrid(then_conv), (8, 8, 1), corners)
    assert result.receptive_field == ((9, 9), (0, 0), (3, 3))


def test_yolo_v1_grid_cells_see_the_whole_image():
    """yolo_v1_small's S x S grid is its Dense head reshaped: every cell's theoretical field is
    the one union of the trunk's fields (it was jump 8: cell (7, 7) at rows 33-142 of 64)."""
    from cnnjax.analysis.effective_receptive_field import theoretical_bounds
    from cnnjax.models import create_model

    field = receptive_field(create_model("yolo_v1_small"), (64, 64, 3))
    assert field.jump == (0, 0)
    for cell in [(0, 0), (7, 7)]:
        assert all(lo <= 0 and hi >= 63 for lo, hi in theoretical_bounds(field, cell))
