"""Effective receptive fields against independent float64 references: n-fold kernel
convolutions, the theoretical field's support, the sqrt(n) growth of Luo et al. 2016."""

import math
import os
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.analysis import effective_receptive_field as erf_module
from cnnjax.analysis.effective_receptive_field import (
    describe,
    effective_receptive_field,
    feature_receptive_field,
    map_statistics,
    plot_effective_receptive_field,
    theoretical_bounds,
)
from cnnjax.analysis.receptive_field import (
    ReceptiveField,
    receptive_field,
    stack_receptive_field,
)
from cnnjax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: A positive, asymmetric, non-separable kernel: a flipped or transposed result would differ.
KERNEL = np.array([[1.0, 2.0, 3.0], [4.0, 6.0, 5.0], [9.0, 7.0, 8.0]])


class LinearStack(nn.Module):
    """n linear 3x3 convolutions, stride 1, zero padding 1, no bias, no nonlinearity."""

    n: int
    features: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.n):
            x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
        return x


def _set_kernels(variables, kernel):
    """Every conv kernel [3, 3, in, out] set to `kernel` for every channel pair."""
    return jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.asarray(kernel, jnp.float32)[:, :, None, None], p.shape),
        variables)


def _full_conv2d(a, k):
    """Full 2-D convolution in float64 NumPy (out[i + u, j + v] += a[i, j] k[u, v])."""
    out = np.zeros((a.shape[0] + k.shape[0] - 1, a.shape[1] + k.shape[1] - 1))
    for u in range(k.shape[0]):
        for v in range(k.shape[1]):
            out[u:u + a.shape[0], v:v + a.shape[1]] += k[u, v] * a
    return out


def _reference_map(kernel, n, input_size, centre):
    """n-fold convolution of `kernel`, normalised, placed around `centre` of a square input."""
    power = np.ones((1, 1))
    for _ in range(n):
        power = _full_conv2d(power, kernel)
    ref = np.zeros((input_size, input_size))
    r = n * (kernel.shape[0] // 2)
    ref[centre - r:centre + r + 1, centre - r:centre + r + 1] = power
    return ref / ref.sum()


def _linear_erf(n, kernel, size, **kwargs):
    model = LinearStack(n)
    variables = model.init(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    return effective_receptive_field(model, (size, size, 3),
                                     variables=_set_kernels(variables, kernel), **kwargs)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_linear_stack_is_the_n_fold_kernel_convolution(n):
    size = 2 * n + 5  # the field (2n + 1) fits with a margin: zero padding never cuts it
    result = _linear_erf(n, KERNEL, size, num_samples=3, batch_size=2)
    centre = size // 2  # size is odd: the middle unit
    assert result.position == (centre, centre) and result.feature is None
    assert result.map.dtype == np.float64 and result.map.shape == (size, size)
    assert result.map.sum() == pytest.approx(1.0, abs=1e-12)
    # float32 gradients of integer-valued products, normalised: ~1e-7 at worst.
    np.testing.assert_allclose(result.map, _reference_map(KERNEL, n, size, centre),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, position", [(1, (1, 5)), (2, (2, 5)), (1, (6, 2))])
def test_an_off_diagonal_position_is_row_then_column(n, position):
    """`position=(row, col)` with row != col: the map is the n-fold kernel convolution around
    (row, col) of the 8 x 8 input (its gradient support: rows row-n .. row+n, columns col-n ..
    col+n), not around the transposed unit (col, row)."""
    result = _linear_erf(n, KERNEL, 8, position=position, num_samples=2, batch_size=2)
    assert result.position == position
    power = np.ones((1, 1))
    for _ in range(n):
        power = _full_conv2d(power, KERNEL)
    (row, col), expected = position, np.zeros((8, 8))
    expected[row - n:row + n + 1, col - n:col + n + 1] = power / power.sum()
    np.testing.assert_allclose(result.map, expected, rtol=1e-6, atol=1e-6)
    ys, xs = np.mgrid[:8, :8]
    want = ((expected * ys).sum(), (expected * xs).sum())
    assert result.centre == pytest.approx(want, abs=1e-6)
    assert abs(result.centre[0] - row) < 0.5 * n and abs(result.centre[1] - col) < 0.5 * n


def test_channel_selects_one_output_channel():
    class TwoChannels(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (3, 3), padding=1, use_bias=False)(x)

    model = TwoChannels()
    kernel = np.zeros((3, 3, 1, 2), np.float32)
    kernel[..., 0] = KERNEL[:, :, None]  # channel 0: the kernel
    kernel[0, 2, 0, 1] = 10.0  # channel 1: one tap, up-right of the centre
    variables = {"params": {"Conv_0": {"kernel": jnp.asarray(kernel)}}}
    one = effective_receptive_field(model, (7, 7, 1), variables=variables, channel=1,
                                    num_samples=1)
    expected = np.zeros((7, 7))
    expected[2, 4] = 1.0
    np.testing.assert_allclose(one.map, expected, atol=1e-12)
    summed = effective_receptive_field(model, (7, 7, 1), variables=variables, num_samples=1)
    expected = np.zeros((7, 7))
    expected[2:5, 2:5] = KERNEL
    expected[2, 4] += 10.0
    np.testing.assert_allclose(summed.map, expected / expected.sum(), atol=1e-7)
    assert summed.channel is None and one.channel == 1


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_std_grows_like_sqrt_n(n):
    # All-ones 3x3 kernels: each layer adds an independent offset uniform on {-1, 0, 1} per axis
    # (variance 2/3), so the n-fold convolution has variance exactly 2n/3 per axis (CLT: the
    # field tends to a Gaussian of std sqrt(2n/3) while the theoretical size is 2n + 1).
    size = 2 * n + 5
    result = _linear_erf(n, np.ones((3, 3)), size, num_samples=2)
    centre = (size - 1) / 2
    assert result.centre == pytest.approx((centre, centre), abs=1e-9)
    assert result.std == pytest.approx((math.sqrt(2 * n / 3),) * 2, rel=1e-6)
    # The effective size against the float64 reference's own marginal (brute force).
    reference = _reference_map(np.ones((3, 3)), n, size, int(centre))
    assert result.size == (_shortest_window(reference.sum(axis=1), 0.95),) * 2
    assert result.square == min(s for s in range(1, size + 1) if max(
        reference[i:i + s, j:j + s].sum() for i in range(size) for j in range(size)) >= 0.95)
    assert result.size[0] <= 2 * n + 1  # never beyond the theoretical field


def test_map_statistics_by_hand():
    delta = np.zeros((5, 7))
    delta[1, 4] = 1.0
    assert map_statistics(delta) == ((1.0, 4.0), (0.0, 0.0), (1, 1), 1, (1, 4))
    uniform = np.full((10, 10), 0.01)
    stats = map_statistics(uniform, fraction=0.5)
    assert stats.centre == (4.5, 4.5)
    assert stats.std[0] == pytest.approx(math.sqrt((10**2 - 1) / 12))  # discrete uniform
    assert stats.size == (5, 5)  # 5 of 10 columns hold exactly one half
    assert stats.square == 8  # 7x7 holds 0.49, 8x8 0.64
    assert map_statistics(uniform, fraction=1.0)[2:4] == ((10, 10), 10)
    lopsided = np.array([0.1, 0.6, 0.3])
    assert map_statistics(lopsided, fraction=0.9)[2:] == ((2,), 2, (1,))
    wide = np.zeros((2, 6))  # a side longer than the map's height is clipped to it
    wide[:, [0, 5]] = 0.25
    assert map_statistics(wide, fraction=1.0)[2:] == ((2, 6), 6, (0, 0))


def _shortest_window(weights, fraction):
    """Brute force: fewest consecutive entries summing to `fraction` or more."""
    n = len(weights)
    return min(j - i for i in range(n) for j in range(i + 1, n + 1)
               if weights[i:j].sum() >= fraction - 1e-12)


class StridedDilated(nn.Module):
    """Strides, dilation and pooling, linear (`relu=False`) or not."""

    relu: bool = True
    pool: str = "max"

    @nn.compact
    def __call__(self, x):
        act = nn.relu if self.relu else (lambda y: y)
        x = act(nn.Conv(3, (3, 3), strides=2, padding=1, use_bias=False)(x))
        x = act(nn.Conv(3, (3, 3), kernel_dilation=2, padding=2, use_bias=False)(x))
        pool = nn.max_pool if self.pool == "max" else nn.avg_pool
        x = pool(x, (2, 2), strides=(2, 2))
        return nn.Conv(2, (3, 3), padding="VALID", use_bias=False)(x)


def _theoretical_box(field, position, shape):
    """Boolean mask of the input pixels inside the theoretical field of the unit at `position`."""
    mask = np.ones(shape, bool)
    for axis, (size, jump, start, p) in enumerate(
            zip(field.size, field.jump, field.start, position, strict=True)):
        centre = start + p * jump
        coords = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(2)])
        mask &= np.abs(coords - centre) <= (size - 1) / 2
    return mask


def test_linear_support_fills_the_theoretical_field():
    shape = (33, 33, 2)
    linear = StridedDilated(relu=False, pool="avg")
    field = receptive_field(linear, shape)
    # Independently: conv 3/2 pad 1, conv 3 dilation 2 pad 2, pool 2/2, conv 3 VALID.
    assert field.size[0] == stack_receptive_field([(3, 2, 1), (3, 1, 2, 2), (2, 2), (3,)])[0]
    variables = _set_kernels(linear.init(jax.random.key(0), jnp.zeros((1, *shape))),
                             np.ones((3, 3)))
    result = effective_receptive_field(linear, shape, variables=variables, num_samples=1,
                                       fraction=1.0)  # linear: the same gradient for any input
    box = _theoretical_box(field, result.position, shape[:2])
    assert result.map[~box].sum() == 0.0
    # Positive linear paths reach the field's extreme pixels: the support's bounding box is the
    # theoretical box itself (with the holes dilation leaves inside).
    rows, cols = np.nonzero(result.map)
    box_rows, box_cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (
        box_rows.min(), box_rows.max(), box_cols.min(), box_cols.max())
    assert result.size[0] <= field.size[0] and result.square <= field.size[0]


def test_nonlinear_support_lies_inside_the_theoretical_field():
    shape = (33, 33, 2)
    nonlinear = StridedDilated()  # random weights, ReLU and max pooling
    result = effective_receptive_field(nonlinear, shape, num_samples=8, rng=3)
    field = receptive_field(nonlinear, shape)
    box = _theoretical_box(field, result.position, shape[:2])
    assert result.map[~box].sum() == 0.0 and result.map[box].sum() == pytest.approx(1.0)


def test_named_feature_and_its_theoretical_field():
    model = create_model("lenet5")
    # c1 5x5, s2 2x2/2, c3 5x5 (Araujo's recurrence, by hand): 5, 6, 6 + 4 * 2 = 14, jump 2.
    field = feature_receptive_field(model, (32, 32, 1), "c3")
    assert field.size == (14, 14) and field.jump == (2, 2)
    assert field.size[0] == stack_receptive_field([(5,), (2, 2), (5,)])[0]
    result = effective_receptive_field(model, (32, 32, 1), feature="c3", num_samples=4)
    assert result.feature == "c3" and result.position == (5, 5)  # c3 is 10x10
    box = _theoretical_box(field, result.position, (32, 32))
    assert result.map[~box].sum() == 0.0
    line = describe(result, field)
    assert line.startswith("c3: theoretical receptive field 14, effective ")


def test_default_feature_is_the_last_spatial_map():
    target, shape = erf_module._choose_target(create_model("lenet5"), None, None, (32, 32, 1))
    assert target.feature == "c5" and shape == (1, 1, 1, 120)  # not 'pre_logits' (not spatial)


def test_plot_writes_png(tmp_path):
    result = _linear_erf(2, KERNEL, 9, num_samples=1)
    path = plot_effective_receptive_field(result, str(tmp_path / "erf.png"),
                                          receptive_field(LinearStack(2), (9, 9, 3)))
    assert path == str(tmp_path / "erf.png")
    assert (tmp_path / "erf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_plot_into_a_folder_not_yet_made_creates_it(tmp_path):
    """The CLI's up-front check (`check_figure_path`) accepts an --output whose folder is still
    to be created; nothing created it, so the CLI ended in a FileNotFoundError traceback after
    computing the map."""
    path = tmp_path / "figures" / "new" / "erf.png"
    plot_effective_receptive_field(_linear_erf(1, KERNEL, 5, num_samples=1), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature": "nope"}, r"feature='nope' is invalid; it is not a feature of the model; "
                              r"expected one of \['c1', 's2', 'c3', 's4', 'c5'\]"),
        ({"feature": "pre_logits"}, r"feature='pre_logits' is invalid; it is not a spatial map"),
        ({"num_samples": 0}, r"num_samples=0 is invalid; expected a positive integer"),
        ({"num_samples": -3}, r"num_samples=-3 is invalid"),
        ({"batch_size": 0}, r"batch_size=0 is invalid"),
        ({"fraction": 0.0}, r"fraction=0.0 is invalid; expected a number in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1.5 is invalid"),
        ({"input_shape": (8, 8, 1)}, r"input_shape=\(8, 8, 1\) is invalid; the model does not "
                                     r"run on a \(8, 8, 1\) input \(ValueError: Conv2D"),
        ({"input_shape": (32,)}, r"input_shape=\(32,\) is invalid; expected positive ints"),
        ({"input_shape": (0, 32, 1)}, r"input_shape=\(0, 32, 1\) is invalid"),
        ({"channel": 120}, r"channel=120 is invalid; expected None \(all channels summed\) or an "
                           r"index below 120"),
        ({"position": (1, 0)}, r"position=\(1, 0\) is invalid; expected 2 indices into the "
                               r"map's spatial shape \(1, 1\)"),
        ({"rng": "seed"}, r"rng='seed' is invalid; expected an int seed or a JAX PRNG key"),
        # jax.random.key's OverflowError, a traceback from the CLI's --seed
        ({"rng": 10**20}, r"rng=100000000000000000000 is invalid; expected an int seed in "
                          r"\[0, 2\*\*63\)"),
        ({"rng": -1}, r"rng=-1 is invalid; expected an int seed in \[0, 2\*\*63\)"),
    ],
)
def test_errors_before_compilation(monkeypatch, kwargs, message):
    def no_compilation(*args, **kw):
        raise AssertionError("compiled before the arguments were checked")

    monkeypatch.setattr(erf_module, "_build_gradient_fn", no_compilation)
    monkeypatch.setattr(erf_module.jax, "jit", no_compilation)
    kwargs = {"input_shape": (32, 32, 1), **kwargs}
    with pytest.raises(ValueError, match=r"^effective_receptive_field: " + message):
        effective_receptive_field(create_model("lenet5"), **kwargs)


def test_empty_feature_map_is_too_small():
    class Valid(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.max_pool(x, (4, 4), strides=(4, 4))

    with pytest.raises(ValueError, match=r"input_shape=\(3, 8, 1\) is invalid; too small: "
                                         r"the output map has shape \(1, 0, 2, 1\), no spatial "
                                         r"positions"):
        effective_receptive_field(Valid(), (3, 8, 1))


def test_output_without_spatial_axes_needs_a_feature():
    class Pooled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    with pytest.raises(ValueError, match=r"feature=None is invalid; the model's output \(1, 3\) "
                                         r"has no spatial axes"):
        effective_receptive_field(Pooled(), (8, 8, 1))
    with pytest.raises(ValueError, match=r"feature='x' is invalid; it is not a feature of the "
                                         r"model; the model exposes no spatial feature maps"):
        effective_receptive_field(Pooled(), (8, 8, 1), feature="x")


@pytest.mark.parametrize(("text", "why"), [
    ("8,8,1", "lenet5: the model needs inputs of at least 32x32."),
    ("32,32", "expected positive ints H,W,C, e.g. 224,224,3."),
])
def test_the_cli_names_an_input_shape_the_model_cannot_take(text, why):
    """As the summary CLI (shared `parse_shape`, `check_input_shape`): the flag, the value and
    what is valid, not a Conv2D or rank error from inside the model."""
    with pytest.raises(ValueError) as caught:
        erf_module._load("lenet5", None, None, text)
    assert str(caught.value) == (
        f"effective_receptive_field CLI: --input_shape={text!r} is invalid; {why}")


def test_the_cli_names_an_unknown_model_as_its_own_flag():
    """The shared `load_model` named the summary CLI's flag (or create_model's argument)."""
    with pytest.raises(ValueError, match=r"^effective_receptive_field CLI: --model='resnt18' is "
                                         r"invalid; did you mean \['resnet18'\]\?"):
        erf_module._load("resnt18", None, None, None)


def _cli(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cnnjax.analysis.effective_receptive_field",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_prints_sizes_and_writes_png(tmp_path):
    out = tmp_path / "erf.png"
    proc = _cli("--model=lenet5", "--input_shape=32,32,1", "--feature=c3", "--num_samples=4",
                f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "lenet5 (random init) on input 32x32x1, unit (5, 5) of c3"
    assert lines[1].startswith("c3: theoretical receptive field 14, effective ")
    assert "(95% of |gradient| mass, 4 samples)" in lines[1]
    assert lines[2] == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = _cli("--model=lenet5", "--feature=zz", f"--out={out}")  # --out: --output's alias
    assert bad.returncode != 0
    assert ("error: effective_receptive_field: feature='zz' is invalid; it is not a feature of "
            "the model; expected one of ['c1', 's2', 'c3', 's4', 'c5'].") in bad.stderr.splitlines()
    neither = _cli("--input_shape=32,32,1")
    assert neither.returncode != 0
    assert "error: effective_receptive_field CLI: --model=None is invalid; expected exactly one " \
           "of --model" in neither.stderr
    not_an_image = _cli("--model=lenet5", "--output=erf.txt")  # refused before computing
    assert not_an_image.returncode == 1 and "Traceback" not in not_an_image.stderr
    assert not_an_image.stderr.strip().splitlines()[-1].startswith(
        "error: --output='erf.txt' is invalid; expected a file name ending in an image format")
    no_data = _cli("--model=lenet5", "--inputs=data")
    assert no_data.returncode != 0
    assert "error: effective_receptive_field CLI: --inputs='data' is invalid; expected it with " \
           "--workdir (a --model has no dataset)" in no_data.stderr


@pytest.mark.slow
def test_cli_loads_a_training_runs_weights_and_image_shape(monkeypatch, tmp_path):
    from cnnjax.train import loop
    from cnnjax.train.trained import load_trained
    from tests.train import helpers

    helpers.install_fake_pipeline(monkeypatch)
    loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    model, variables, shape, name, loaded = erf_module._load(None, str(tmp_path), None, None)
    run = load_trained(str(tmp_path))
    assert loaded.step == run.step
    assert shape == helpers.IMAGE_SHAPE and name == f"{helpers.TINY_MODEL} (best step {run.step})"
    assert type(model) is type(run.model)
    jax.tree.map(np.testing.assert_array_equal, variables, run.variables)
    assert erf_module._load(None, str(tmp_path), 8, "16,16,1")[2:4] == (
        (16, 16, 1), f"{helpers.TINY_MODEL} (requested step 8)")
    with pytest.raises(ValueError, match=r"CLI: --model='lenet5' is invalid; expected exactly "
                                         r"one of --model"):
        erf_module._load("lenet5", str(tmp_path), None, None)


def test_theoretical_bounds_are_the_gradient_support_of_an_interior_unit():
    """Two VALID 3x3 convs with dilation 2 then stride 2 (all-ones kernels, positive inputs: no
    cancellation): the unit's nonzero input gradient spans exactly the returned bounds."""
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(1, (3, 3), kernel_dilation=2, padding="VALID", use_bias=False,
                        kernel_init=nn.initializers.ones)(x)
            return nn.Conv(1, (3, 3), strides=2, padding="VALID", use_bias=False,
                           kernel_init=nn.initializers.ones)(x)

    model, shape = Stack(), (21, 23, 1)
    field = receptive_field(model, shape)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
    for position in [(0, 0), (3, 5), (6, 7)]:
        grad = jax.grad(lambda x, p=position: model.apply(variables, x)[(0, *p, 0)])(
            jnp.ones((1, *shape)))
        rows, cols = (np.nonzero(np.abs(grad[0, ..., 0]).sum(axis=a))[0] for a in (1, 0))
        support = ((rows.min(), rows.max()), (cols.min(), cols.max()))
        assert theoretical_bounds(field, position) == support


@pytest.mark.parametrize(
    ("field", "position", "message"),
    [
        # a short position was zip's bare "argument 4 is shorter than arguments 1-3", a string
        # a TypeError, a tuple for the field an AttributeError, NaN or 1.5 a NaN/fractional bound
        (ReceptiveField((3, 3), (1, 1), (0, 0)), (1,),
         r"^theoretical_bounds: position=\(1,\) is invalid; expected 2 ints >= 0, one per "
         r"spatial axis of the field\.$"),
        (ReceptiveField((3, 3), (1, 1), (0, 0)), "ab", r"^theoretical_bounds: position='ab'"),
        (ReceptiveField((3, 3), (1, 1), (0, 0)), (1.5, float("nan")),
         r"^theoretical_bounds: position=\(1.5, nan\) is invalid"),
        (ReceptiveField((3,), (1,), (0,)), (-1,), r"^theoretical_bounds: position=\(-1,\)"),
        (ReceptiveField((3,), (1,), (0,)), 2, r"^theoretical_bounds: position=2 is invalid"),
        ((3, 1, 0), (1,), r"^theoretical_bounds: field='tuple' is invalid; expected a "
                          r"ReceptiveField"),
    ],
)
def test_theoretical_bounds_errors(field, position, message):
    with pytest.raises(ValueError, match=message):
        theoretical_bounds(field, position)


def test_feature_receptive_field_names_itself():
    """Its errors named effective_receptive_field; a zoo name raised AttributeError."""
    model = create_model("lenet5")
    with pytest.raises(ValueError, match=r"^feature_receptive_field: model='lenet5' is invalid; "
                                         r"expected a flax.linen Module"):
        feature_receptive_field("lenet5", (32, 32, 1))
    with pytest.raises(ValueError, match=r"^feature_receptive_field: input_shape=\(0, 32, 1\)"):
        feature_receptive_field(model, (0, 32, 1))
    with pytest.raises(ValueError, match=r"^feature_receptive_field: feature=3 is invalid; "
                                         r"expected a feature name or None"):
        feature_receptive_field(model, (32, 32, 1), 3)
    with pytest.raises(ValueError, match=r"^feature_receptive_field: feature='c9' is invalid; it "
                                         r"is not a feature of the model; expected one of"):
        feature_receptive_field(model, (32, 32, 1), "c9")


def test_backbone_dict_without_return_features():
    class Backbone(nn.Module):  # returns its maps as a dict and takes no `train` flag
        @nn.compact
        def __call__(self, x):
            a = nn.Conv(2, (3, 3), padding=1, use_bias=False)(x)
            return {"a": a, "b": nn.Conv(2, (5, 5), padding=2, use_bias=False)(a)}

    model = Backbone()
    assert feature_receptive_field(model, (12, 12, 1)).size == (7, 7)  # default: 'b'
    assert feature_receptive_field(model, (12, 12, 1), "a").size == (3, 3)
    result = effective_receptive_field(model, (12, 12, 1), feature="a", num_samples=2)
    assert result.feature == "a" and np.count_nonzero(result.map) <= 9


class _MixesSamples(nn.Module):
    """A 3x3 conv scaled by the batch mean of the top-left input pixel: samples interact even
    in eval mode, as a BatchNorm left in batch-statistics mode would make them."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (3, 3), padding="SAME")(x) * jnp.mean(x[:, 0, 0, 0])


def test_map_depends_on_each_sample_alone_not_on_the_batch_size():
    """Sample i's input comes from (rng, i) and its gradient is its own: the same map for any
    batch_size, and for a model that mixes samples the per-sample field (the 3x3 window plus
    the top-left pixel), never other samples' terms."""
    model = _MixesSamples()
    maps = [effective_receptive_field(model, (9, 9, 1), num_samples=6, batch_size=b, rng=3).map
            for b in (1, 4, 6)]
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], rtol=1e-6, atol=1e-9)
    support = np.argwhere(maps[0] > 0)
    assert {tuple(p) for p in support} == {(0, 0)} | {(r, c) for r in (3, 4, 5)
                                                      for c in (3, 4, 5)}


def test_default_unit_of_an_even_map_is_centred_nearest_the_image_centre():
    class Strided(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(1, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x)

    result = effective_receptive_field(Strided(), (8, 8, 1), num_samples=2)
    assert result.position == (2, 2)  # centred at pixel 4; (1, 1) would be at 2 (centre 3.5)
    assert result.centre == pytest.approx((4.0, 4.0), abs=0.5)


def test_variables_that_do_not_fit_the_input_are_a_named_error():
    model = create_model("lenet5")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
    with pytest.raises(ValueError, match=r"^effective_receptive_field: input_shape=\(32, 32, 3\) "
                                         r"is invalid; the model with the given variables does "
                                         r"not run on a \(32, 32, 3\) input \(ValueError: "
                                         r"Conv2D: input.shape=\(1, 32, 32, 3\) is invalid; "
                                         r"its kernel was created for 1 input channels"):
        effective_receptive_field(model, (32, 32, 3), variables=variables)


def test_a_model_returning_a_dict_without_spatial_maps_is_named():
    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            pooled = x.mean(axis=(1, 2))
            return {"scores": nn.Dense(2)(pooled), "boxes": nn.Dense(4)(pooled)}

    with pytest.raises(ValueError, match=r"feature=None is invalid; the model returns a dict of "
                                         r"\['boxes', 'scores'\], none a spatial map"):
        effective_receptive_field(Heads(), (8, 8, 1))


def test_cli_refuses_step_without_workdir():
    with pytest.raises(ValueError, match=r"effective_receptive_field CLI: --step=3 is invalid; "
                                         r"expected it only with --workdir"):
        erf_module._load("lenet5", None, 3, None)


def test_plot_clips_a_theoretical_field_larger_than_the_image(tmp_path, monkeypatch):
    figures = []
    save = erf_module.save_figure
    monkeypatch.setattr(erf_module, "save_figure",
                        lambda fig, path: figures.append(fig) or save(fig, path))
    result = _linear_erf(2, KERNEL, 9, num_samples=1)
    field = ReceptiveField(size=(21, 21), jump=(1, 1), start=(0, 0))
    plot_effective_receptive_field(result, str(tmp_path / "erf.png"), field)
    (rect,) = [p for p in figures[0].axes[0].patches
               if p.get_label().startswith("theoretical")]
    assert rect.get_label() == "theoretical 21x21 (clipped)"
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (
        -0.5, -0.5, 9.0, 9.0)


class _ReluNet(nn.Module):
    """conv -> ReLU -> conv: the input gradient depends on the input."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding=1, name="conv0")(x))
        return nn.Conv(2, (3, 3), padding=1, name="conv1")(x)


def test_given_inputs_average_their_own_gradients():
    """inputs=[N, H, W, C]: the map is the normalized mean over those images of |d unit / d x|
    summed over channels, each gradient taken alone (reference: one jax.grad per image, float64
    sums); the padded last batch does not count, so any batch_size gives the same map."""
    model = _ReluNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 2)))
    images = np.random.default_rng(0).normal(size=(5, 9, 9, 2)).astype(np.float32)
    reference = np.zeros((9, 9))
    for image in images:
        grad = jax.grad(lambda x: model.apply(variables, x)[0, 4, 4].sum())(image[None])
        reference += np.abs(np.asarray(grad[0], np.float64)).sum(-1)
    reference /= reference.sum()
    for batch_size in (1, 2, 5):
        result = effective_receptive_field(model, (9, 9, 2), variables=variables, inputs=images,
                                           batch_size=batch_size, num_samples=99)
        assert result.num_samples == 5
        np.testing.assert_allclose(result.map, reference, rtol=1e-5, atol=1e-9)
    random = effective_receptive_field(model, (9, 9, 2), variables=variables, num_samples=5)
    assert not np.allclose(random.map, reference)  # the inputs really are used


@pytest.mark.parametrize(("inputs", "message"), [
    (np.zeros((2, 8, 9, 2)), r"inputs='array of shape \(2, 8, 9, 2\)' is invalid; expected "
                             r"\[N, 9, 9, 2\] images"),
    (np.zeros((0, 9, 9, 2)), r"inputs='array of shape \(0, 9, 9, 2\)' is invalid"),
    (np.full((1, 9, 9, 2), np.nan), r"inputs='an array with NaN or inf' is invalid"),
])
def test_bad_inputs_are_named(inputs, message):
    with pytest.raises(ValueError, match=message):
        effective_receptive_field(_ReluNet(), (9, 9, 2), inputs=inputs)


def test_cli_data_inputs_are_the_runs_eval_images(monkeypatch, tmp_path):
    """--inputs=data takes the first images of the run's eval split, as its eval sees them; it
    needs --workdir."""
    from cnnjax.train import loop
    from tests.train import helpers

    helpers.install_fake_pipeline(monkeypatch)
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    run = erf_module._load(None, str(tmp_path), None, None)[4]
    images = erf_module.eval_images(run, 30)  # the split has 27
    expected = np.concatenate([b["image"][0] for b in helpers.eval_batches(
        None, global_batch_size=27, num_devices=1)])[:27]
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(erf_module.eval_images(run, 3), expected[:3])


def test_sequential_models_are_called_without_train():
    """nn.Sequential's `**kwargs` was read as taking `train`, which it handed to its first
    nn.Conv: both functions refused the model as not running on `input_shape`. Reference: two
    3x3 convs give a 5x5 field."""
    model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Conv(4, (3, 3))])
    result = effective_receptive_field(model, (16, 16, 3), num_samples=2)
    assert result.size == (5, 5) and result.position == (8, 8)
    assert feature_receptive_field(model, (16, 16, 3)) == receptive_field(model, (16, 16, 3))


class _AlwaysBatchStats(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x))


class _DropoutByAttribute(nn.Module):
    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=self.deterministic)(nn.Conv(4, (3, 3))(x))


@pytest.mark.parametrize("model, need", [(_AlwaysBatchStats(), "ModifyScopeVariableError"),
                                         (_DropoutByAttribute(), "InvalidRngError")])
@pytest.mark.parametrize("with_variables", [False, True])
def test_a_model_whose_eval_call_is_not_deterministic_is_named(model, need, with_variables):
    """Without variables flax's error escaped from the jitted gradient as a traceback (the
    abstract init may update state and draw numbers); with them the model was refused as not
    running on `input_shape`."""
    variables = (model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                            jnp.zeros((1, 12, 12, 3))) if with_variables else None)
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"^effective_receptive_field: model='{name}' is "
                                         rf"invalid; called with no `train` argument it still "
                                         rf"updates state or draws random numbers \({need}"):
        effective_receptive_field(model, (12, 12, 3), variables=variables, num_samples=2)


@pytest.mark.parametrize("flag, value, why", [
    ("num_samples", 0, "expected a positive integer"),
    ("batch_size", -2, "expected a positive integer"),
    ("fraction", 2.0, r"expected a number in \(0, 1\]"),
    ("channel", -1, "expected a channel index >= 0"),
])
def test_cli_number_flags_are_named_as_flags(flag, value, why):
    """The CLI passed --num_samples=0 on and the error named the function's argument
    (`effective_receptive_field: num_samples=0`), not the flag the user typed."""
    flags = types.SimpleNamespace(num_samples=4, batch_size=2, fraction=0.9, channel=None)
    erf_module._check_number_flags(flags)
    setattr(flags, flag, value)
    with pytest.raises(ValueError, match=rf"^effective_receptive_field CLI: --{flag}={value} is "
                                         rf"invalid; {why}"):
        erf_module._check_number_flags(flags)
