"""Effective receptive fields (Luo, Li, Urtasun & Zemel 2016, "Understanding the Effective
Receptive Field in Deep Convolutional Neural Networks", NeurIPS).

The theoretical receptive field (`receptive_field.py`) says which input pixels *can* influence a
unit; the effective one measures how much each does: the magnitude of the gradient of one output
unit (by default the centre of a feature map, its channels summed) with respect to the input,
averaged over random inputs. Luo et al. show it is roughly Gaussian and occupies a fraction of the
theoretical field: for n stacked linear convolutions it is the n-fold convolution of the kernel
(a Gaussian by the central limit theorem, standard deviation growing as sqrt(n)), while the
theoretical size grows as n.

`effective_receptive_field(model, input_shape, feature="stage2")` returns the map (float64,
normalised to sum 1) with its centre of mass, per-axis standard deviation and the effective size
(the extent holding `fraction` of the mass, in input pixels, comparable with the theoretical
`size`); `plot_effective_receptive_field` draws it with the theoretical field outlined.

CLI (random weights, the paper's "random init" case, or a training run's, "after training"):

    python -m cnnjax.analysis.effective_receptive_field --model=resnet18 --input_shape=224,224,3 \
        --feature=stage2 --output=erf.png
    python -m cnnjax.analysis.effective_receptive_field --workdir=workdirs/lenet5_digits
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import FlaxError

from cnnjax.analysis.receptive_field import ReceptiveField
from cnnjax.analysis.trace import (
    NONDETERMINISTIC_CALL_ERRORS,
    declares_keyword,
    eval_call_kwargs,
    nondeterministic_call,
)
from cnnjax.utils.files import check_figure_path, make_parent_dir, save_figure
from cnnjax.utils.validation import (
    check_number,
    check_positive_int,
    checked_input_shape,
    invalid,
)

_OWNER = "effective_receptive_field"
#: Slack on the mass fraction, so float rounding of a map that sums to 1 never pushes the
#: threshold past the last pixel that carries mass.
_MASS_TOLERANCE = 1e-9


class MapStatistics(NamedTuple):
    """Summary of a normalised map (see `EffectiveReceptiveField`)."""

    centre: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, ...]
    square: int
    square_start: tuple[int, ...]


class EffectiveReceptiveField(NamedTuple):
    """The effective receptive field of one unit, in input pixel coordinates (pixel i at i).

    `map`: mean |d unit / d input| over the samples, summed over input channels, normalised to
    sum 1 (float64, the input's spatial shape). `centre` and `std`: centre of mass and standard
    deviation of each axis's marginal. `size`: per axis, the width in pixels of the shortest
    window holding `fraction` of that marginal's mass: the effective size, to compare with the
    theoretical `ReceptiveField.size`. `square`: the side of the smallest square (cube in 3-D)
    holding `fraction` of the mass, the heaviest such starting at pixel `square_start`. (Windows
    are not forced onto `centre`: for the symmetric fields of Luo et al. they are centred, and a
    fractional centre of mass cannot inflate them.) `mass`: the mean total |gradient| before
    normalisation. `feature`, `position`, `channel`: which unit (None: the model's output /
    channels summed).
    """

    map: np.ndarray
    centre: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, ...]
    square: int
    square_start: tuple[int, ...]
    fraction: float
    mass: float
    feature: str | None
    position: tuple[int, ...]
    channel: int | None
    num_samples: int


# ----------------------------------------------------------------------------------------------
# Statistics of a map (plain NumPy, used on the gradient map and testable on their own).


def _box_sums(p: np.ndarray, sides: Sequence[int]) -> np.ndarray:
    """Sums of `p` over every box of `sides` lying inside it (separable running sums)."""
    for axis, side in enumerate(sides):
        c = np.cumsum(p, axis=axis)
        zero = np.zeros_like(np.take(c, [0], axis=axis))
        c = np.concatenate([zero, c], axis=axis)
        n = c.shape[axis]
        p = np.take(c, range(side, n), axis=axis) - np.take(c, range(0, n - side), axis=axis)
    return p


def _smallest_box(p: np.ndarray, fraction: float) -> tuple[int, tuple[int, ...]]:
    """Smallest side s such that an s-sided box (clipped to the map's shape) holds `fraction` of
    `p`, and the first corner of the heaviest such box. The heaviest box's mass grows with s,
    so s is found by bisection."""
    target = fraction - _MASS_TOLERANCE

    def best(side: int) -> tuple[float, tuple[int, ...]]:
        sums = _box_sums(p, [min(side, n) for n in p.shape])
        k = int(np.argmax(sums))
        return float(sums.flat[k]), tuple(int(i) for i in np.unravel_index(k, sums.shape))

    lo, hi = 1, max(p.shape)  # the answer lies in [lo, hi]; the whole map always qualifies
    while lo < hi:
        mid = (lo + hi) // 2
        if best(mid)[0] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo, best(lo)[1]


def map_statistics(erf_map: np.ndarray, fraction: float = 0.95) -> MapStatistics:
    """Centre of mass, per-axis std, effective size per axis and smallest square holding
    `fraction` of a non-negative map normalised to sum 1 (see `EffectiveReceptiveField`)."""
    fraction = check_number("map_statistics", "fraction", fraction, "expected a number in (0, 1]",
                            low=0.0, high=1.0, low_open=True)
    p = np.asarray(erf_map, np.float64)
    if p.ndim < 1 or p.size == 0 or np.any(p < 0) or not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise invalid("map_statistics", "erf_map", f"array of shape {p.shape}",
                      "expected a non-empty non-negative map summing to 1")
    centre, std, size = [], [], []
    for axis in range(p.ndim):
        marginal = p.sum(axis=tuple(a for a in range(p.ndim) if a != axis))
        coords = np.arange(p.shape[axis], dtype=np.float64)
        mu = float(np.dot(marginal, coords))
        centre.append(mu)
        std.append(math.sqrt(max(float(np.dot(marginal, (coords - mu) ** 2)), 0.0)))
        size.append(_smallest_box(marginal, fraction)[0])
    square, square_start = _smallest_box(p, fraction)
    return MapStatistics(tuple(centre), tuple(std), tuple(size), square, square_start)


def theoretical_bounds(
    field: ReceptiveField, position: Sequence[int]
) -> tuple[tuple[float, float], ...]:
    """Input coordinates `(first, last)` of the pixel centres in the theoretical field of the
    unit at feature-map `position`, per axis (they may lie outside the input). After a
    transposed convolution or upsampling by s (input dilation) the units' fields are not evenly
    spaced: `start + position * jump` is their average placement, and one unit's true field can
    sit up to (s - 1) / 2 pixels off these bounds, the largest s counting (`receptive_field`'s
    notes say where)."""
    owner = "theoretical_bounds"
    if not isinstance(field, ReceptiveField):
        raise invalid(owner, "field", type(field).__name__,
                      "expected a ReceptiveField (e.g. receptive_field(model, input_shape))")
    try:
        pos = tuple(position)
    except TypeError:
        pos = None
    if pos is None or len(pos) != len(field.size) or not all(
        isinstance(p, int | np.integer) and not isinstance(p, bool) and p >= 0 for p in pos
    ):
        raise invalid(owner, "position", position,
                      f"expected {len(field.size)} ints >= 0, one per spatial axis of the field")
    out = []
    for size, jump, start, p in zip(field.size, field.jump, field.start, pos, strict=True):
        centre = start + p * jump
        out.append((centre - (size - 1) / 2, centre + (size - 1) / 2))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The gradient map.


def _split_output(out: Any, with_features: bool) -> tuple[Any, Mapping[str, Any]]:
    """`(output, features)` of a model call: `(logits, dict)` with `return_features=True`, or a
    backbone's plain dict (`features_only=True`)."""
    if isinstance(out, Mapping):
        return None, out
    if with_features and isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out
    return out, {}


def _is_spatial(x: Any, rank: int) -> bool:
    return hasattr(x, "shape") and len(x.shape) == rank


class _Target:
    """Which map of the model the unit is taken from, and how to call the model for it."""

    def __init__(self, model: nn.Module, feature: str | None, with_features: bool):
        self.model, self.feature, self.with_features = model, feature, with_features
        self.kwargs: dict[str, Any] = eval_call_kwargs(model)
        if with_features:
            self.kwargs["return_features"] = True

    def select(self, out: Any) -> Any:
        output, features = _split_output(out, self.with_features)
        return output if self.feature is None else features[self.feature]

    def apply(self, variables: Any, x: Any) -> Any:
        return self.select(self.model.apply(variables, x, **self.kwargs))


def _choose_target(model: nn.Module, feature: str | None, variables: Any,
                   shape: tuple[int, ...], owner: str = _OWNER
                   ) -> tuple[_Target, tuple[int, ...]]:
    """Resolves `feature` on an abstract evaluation of the model (nothing is compiled); returns
    the target and the chosen map's shape. Unknown or non-spatial names raise, naming `owner`
    and listing the spatial maps the model exposes."""
    rank = len(shape) + 1
    with_features = declares_keyword(model, "return_features")
    probe = _Target(model, None, with_features)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    order: list[str] = []  # the features' order: eval_shape returns their dict sorted by name

    def forward(v: Any, x: Any) -> Any:
        if v is None:  # init may update state and draw from any stream; the eval call may not
            v = model.init(jax.random.key(0), x, **probe.kwargs)
        out = model.apply(v, x, **probe.kwargs)
        order.extend(_split_output(out, with_features)[1])
        return out

    try:
        out = jax.eval_shape(forward, variables, x)
    except NONDETERMINISTIC_CALL_ERRORS as err:
        raise nondeterministic_call(owner, model, err) from None
    except (TypeError, ValueError, FlaxError) as err:  # e.g. variables of another input shape
        given = " with the given variables" if variables is not None else ""
        raise invalid(owner, "input_shape", shape,
                      f"the model{given} does not run on a {shape} input "
                      f"({type(err).__name__}: {str(err)[:300].rstrip('.')})") from None
    output, features = _split_output(out, with_features)
    spatial = [k for k in order if _is_spatial(features[k], rank)]
    if feature is None:
        if _is_spatial(output, rank):
            chosen = output
        elif spatial:
            feature, chosen = spatial[-1], features[spatial[-1]]
        elif output is None:  # a dict of outputs (a detector's), none of them a spatial map
            raise invalid(owner, "feature", None,
                          f"the model returns a dict of {sorted(features)}, none a spatial map; "
                          "expected a model with a spatial output or spatial feature maps")
        else:
            raise invalid(owner, "feature", None,
                          f"the model's output {getattr(output, 'shape', None)} has no spatial "
                          "axes and it exposes no spatial feature maps (return_features=True)")
    elif feature not in spatial:
        why = "is not a spatial map" if feature in features else "is not a feature of the model"
        raise invalid(owner, "feature", feature,
                      f"it {why}; expected one of {spatial}" if spatial else
                      f"it {why}; the model exposes no spatial feature maps "
                      "(return_features=True); pass feature=None for its output")
    else:
        chosen = features[feature]
    map_shape = tuple(int(s) for s in chosen.shape)
    if any(s == 0 for s in map_shape[1:-1]):
        raise invalid(owner, "input_shape", shape,
                      f"too small: the {'output' if feature is None else repr(feature)} map "
                      f"has shape {map_shape}, no spatial positions")
    return _Target(model, feature, with_features and feature is not None), map_shape


def _check_rng(rng: Any) -> jax.Array:
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        if not 0 <= int(rng) < 2**63:  # jax.random.key's OverflowError was a traceback
            raise invalid(_OWNER, "rng", rng, "expected an int seed in [0, 2**63) or a JAX "
                          "PRNG key")
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array) and (
        jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        or (rng.dtype == jnp.uint32 and rng.shape == (2,))
    ):
        return rng
    raise invalid(_OWNER, "rng", rng, "expected an int seed or a JAX PRNG key")


def _check_position(position: Any, map_shape: tuple[int, ...]) -> tuple[int, ...]:
    spatial = map_shape[1:-1]
    if position is None:
        return tuple(s // 2 for s in spatial)
    try:
        pos = tuple(position)
    except TypeError:
        pos = ()
    if len(pos) != len(spatial) or not all(
        isinstance(p, int | np.integer) and not isinstance(p, bool) and 0 <= p < s
        for p, s in zip(pos, spatial, strict=False)
    ):
        raise invalid(_OWNER, "position", position,
                      f"expected {len(spatial)} indices into the map's spatial shape {spatial}")
    return tuple(int(p) for p in pos)


def _build_gradient_fn(target: _Target, batch_size: int, position: tuple[int, ...],
                       channel: int | None) -> Any:
    """The jitted `(variables, inputs [batch_size, H, W, C], valid) -> sum over the first
    `valid` inputs of |d unit / d input| summed over input channels` (float32, spatial shape).

    Each input's gradient is taken on its own (vmap over batches of one), so a model that still
    mixes samples in eval mode cannot leak other samples' terms into it."""
    index = (0, *position)

    def unit(variables: Any, x: jax.Array) -> jax.Array:
        values = target.apply(variables, x)[index].astype(jnp.float32)  # [C]
        return values.sum() if channel is None else values[channel]

    def one_sample(variables: Any, x: jax.Array) -> jax.Array:
        grad = jax.grad(lambda x: unit(variables, x))(x[None].astype(jnp.float32))
        return jnp.abs(grad[0]).sum(axis=-1)

    def gradient_sum(variables: Any, inputs: jax.Array, valid: jax.Array) -> jax.Array:
        g = jax.vmap(one_sample, in_axes=(None, 0))(variables, inputs)
        keep = (jnp.arange(batch_size) < valid).reshape((batch_size,) + (1,) * (g.ndim - 1))
        return jnp.where(keep, g, 0.0).sum(axis=0)

    return jax.jit(gradient_sum)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_inputs(key: jax.Array, start: jax.Array, batch_size: int,
                   shape: tuple[int, ...]) -> jax.Array:
    """Standard normal inputs `start .. start + batch_size - 1`; input i is drawn from
    `fold_in(key, i)`, so the map does not depend on `batch_size`."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(batch_size))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _check_inputs(inputs: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """`inputs` as float32 `[N, *shape]` (N >= 1, finite), or None when not given."""
    if inputs is None:
        return None
    array = np.asarray(inputs, np.float32)
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape or not len(array):
        raise invalid(_OWNER, "inputs", f"array of shape {array.shape}",
                      f"expected [N, {', '.join(map(str, shape))}] images (input_shape), N >= 1")
    if not np.isfinite(array).all():
        raise invalid(_OWNER, "inputs", "an array with NaN or inf", "expected finite images")
    return array


def effective_receptive_field(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    variables: Any = None,
    feature: str | None = None,
    position: Sequence[int] | None = None,
    channel: int | None = None,
    num_samples: int = 32,
    batch_size: int = 8,
    fraction: float = 0.95,
    rng: int | jax.Array = 0,
    inputs: Any = None,
) -> EffectiveReceptiveField:
    """Effective receptive field of one unit of `model` on `[H, W, C]` inputs (`input_shape`).

    The unit is at `position` (default: the centre, `size // 2` per axis: on an even map the unit
    centred nearest the image centre for the usual same-padded strides) of the feature
    map `feature` (a name of the model's `return_features=True` dict; default: the model's
    output if it is a spatial map, else its last spatial feature), summed over channels or
    `channel` only. Its input gradient is averaged in magnitude over `num_samples` standard
    normal inputs (the paper's analysis), or over `inputs` `[N, H, W, C]` when given (e.g. a
    trained model's own test images, preprocessed as in training; `num_samples` is then N),
    evaluated `batch_size` at a time in eval mode (`train=False`) with `variables`, or with a
    random initialisation from `rng` (the paper's "random weights"). Arguments are checked, and
    `feature` resolved on an abstract trace, before anything compiles.
    """
    shape = checked_input_shape(_OWNER, input_shape)
    images = _check_inputs(inputs, shape)
    num_samples = (len(images) if images is not None
                   else check_positive_int(_OWNER, "num_samples", num_samples))
    batch_size = check_positive_int(_OWNER, "batch_size", batch_size)
    fraction = check_number(_OWNER, "fraction", fraction, "expected a number in (0, 1]",
                            low=0.0, high=1.0, low_open=True)
    key = _check_rng(rng)
    if not isinstance(model, nn.Module):
        raise invalid(_OWNER, "model", type(model).__name__, "expected a flax.linen Module")
    if feature is not None and not isinstance(feature, str):
        raise invalid(_OWNER, "feature", feature, "expected a feature name or None")
    target, map_shape = _choose_target(model, feature, variables, shape)
    pos = _check_position(position, map_shape)
    if channel is not None and (
        isinstance(channel, bool) or not isinstance(channel, int | np.integer)
        or not 0 <= channel < map_shape[-1]
    ):
        raise invalid(_OWNER, "channel", channel,
                      f"expected None (all channels summed) or an index below {map_shape[-1]}")
    batch_size = min(batch_size, num_samples)

    init_key, key = jax.random.split(key)
    if variables is None:
        kwargs = {k: v for k, v in target.kwargs.items() if k != "return_features"}
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), **kwargs))(init_key)
    gradient_sum = _build_gradient_fn(target, batch_size, pos, channel)
    total = np.zeros(shape[:-1], np.float64)
    for start in range(0, num_samples, batch_size):
        valid = min(batch_size, num_samples - start)
        if images is None:
            batch = _random_inputs(key, jnp.asarray(start, jnp.int32), batch_size, shape)
        else:  # the last batch is padded with copies of the first image, then masked out
            batch = images[start:start + batch_size]
            batch = np.concatenate([batch, np.repeat(images[:1], batch_size - valid, 0)])
        total += np.asarray(gradient_sum(variables, batch, jnp.asarray(valid, jnp.int32)),
                            np.float64)
    mass = float(total.sum())
    if not mass > 0 or not math.isfinite(mass):
        raise invalid(_OWNER, "model", type(model).__name__,
                      f"the unit's input gradient is {mass} over all samples (dead or diverged "
                      "units); try another feature, channel or variables")
    erf_map = total / mass
    stats = map_statistics(erf_map, fraction)
    return EffectiveReceptiveField(
        map=erf_map, **stats._asdict(), fraction=fraction,
        mass=mass / num_samples, feature=target.feature, position=pos,
        channel=None if channel is None else int(channel), num_samples=num_samples,
    )


class _FeatureOf(nn.Module):
    """`model`'s feature map `feature` (None: its output) as a module's output, for `summary`."""

    model: nn.Module
    feature: str | None
    with_features: bool

    def __call__(self, x: Any) -> Any:
        target = _Target(self.model, self.feature, self.with_features)
        return target.select(self.model(x, **target.kwargs))


def feature_receptive_field(model: nn.Module, input_shape: Sequence[int],
                            feature: str | None = None) -> ReceptiveField:
    """Theoretical receptive field (`receptive_field`) of `model`'s feature map `feature` (a
    `return_features=True` name; None: as in `effective_receptive_field`, the output if it is
    spatial, else the last spatial feature), traced with `train=False`."""
    from cnnjax.analysis.summary import check_model, summarize

    owner = "feature_receptive_field"
    check_model(owner, model)
    shape = checked_input_shape(owner, input_shape)
    if feature is not None and not isinstance(feature, str):
        raise invalid(owner, "feature", feature, "expected a feature name or None")
    target, _ = _choose_target(model, feature, None, shape, owner)  # names a bad `feature`
    wrapped = _FeatureOf(model, target.feature, target.with_features)
    field = summarize(owner, wrapped, shape).receptive_field
    if field is None:
        raise invalid(owner, "feature", feature, "its receptive field could not be traced")
    return field


# ----------------------------------------------------------------------------------------------
# Plot.


def plot_effective_receptive_field(result: EffectiveReceptiveField, path: str,
                                   theoretical: ReceptiveField | None = None,
                                   title: str = "") -> str:
    """Heat map of `result.map` saved to `path` (PNG, written atomically; a missing folder is
    created, as the CLI's `--output` check expects), with the centre of mass, the effective
    `square` (dashed) and, given `theoretical` (the unit's map's `ReceptiveField`), the
    theoretical field's box. Uses the Agg backend; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if result.map.ndim != 2:
        raise invalid("plot_effective_receptive_field", "result.map.shape", result.map.shape,
                      "expected a 2-D map (image inputs)")
    make_parent_dir(path)
    fig, ax = plt.subplots(figsize=(6, 5))
    h, w = result.map.shape
    image = ax.imshow(result.map, cmap="viridis", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="share of |gradient|")
    cy, cx = result.centre
    ax.plot([cx], [cy], "w+", markersize=10)
    y0, x0 = result.square_start
    sides = [min(result.square, n) for n in result.map.shape]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), sides[1], sides[0], fill=False,
                           edgecolor="white", linestyle="--",
                           label=f"effective {result.square} ({result.fraction:.0%} mass)"))
    if theoretical is not None:  # clipped to the image, so a field larger than it still shows
        (y0, y1), (x0, x1) = theoretical_bounds(theoretical, result.position)
        top, left = max(y0 - 0.5, -0.5), max(x0 - 0.5, -0.5)
        bottom, right = min(y1 + 0.5, h - 0.5), min(x1 + 0.5, w - 0.5)
        clipped = (top, left, bottom, right) != (y0 - 0.5, x0 - 0.5, y1 + 0.5, x1 + 0.5)
        size = "x".join(f"{s:g}" for s in theoretical.size)
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False,
                               edgecolor="red", linewidth=1.5,
                               label=f"theoretical {size}" + (" (clipped)" if clipped else "")))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.6)
    unit = result.feature or "output"
    ax.set_title(title or f"effective receptive field of {unit} at {result.position}", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Command line: python -m cnnjax.analysis.effective_receptive_field --model=resnet18 ...


def _fmt(values: Sequence[float], digits: int | None = None) -> str:
    """`a` if every axis has the same value, else `axb`; `digits` decimals (None: as is)."""
    values = values[:1] if len(set(values)) == 1 else values
    return "x".join(f"{v:g}" if digits is None else f"{v:.{digits}f}" for v in values)


def describe(result: EffectiveReceptiveField, theoretical: ReceptiveField | None) -> str:
    """One line comparing the effective size with the theoretical one."""
    unit = result.feature or "output"
    pct = f"{result.fraction:.0%}"
    line = f"{unit}: "
    if theoretical is not None:
        line += f"theoretical receptive field {_fmt(theoretical.size)}, "
    line += (f"effective {_fmt(result.size)} per axis, {result.square} square "
             f"({pct} of |gradient| mass, {result.num_samples} samples); "
             f"std {_fmt(result.std, 1)} px, centre "
             f"({', '.join(f'{c:.1f}' for c in result.centre)})")
    return line


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", None, "Zoo model name (random init) or examples.<name>; "
                        "exclusive with --workdir.")
    flags.DEFINE_string("workdir", None, "A training run's workdir: its best checkpoint's "
                        "weights (load_trained); exclusive with --model.")
    flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step instead of the best.")
    flags.DEFINE_string("input_shape", None, "H,W,C (default: the model's native shape, or the "
                        "run's image shape).")
    flags.DEFINE_string("feature", None, "Feature map (a return_features name, e.g. stage2; "
                        "default: the output if spatial, else the last spatial feature).")
    flags.DEFINE_integer("channel", None, "Only this channel of the unit (default: all summed).")
    flags.DEFINE_integer("num_samples", 32, "Inputs to average over.")
    flags.DEFINE_enum("inputs", "random", ["random", "data"], "random: standard normal inputs "
                      "(the paper's analysis); data: with --workdir, the first --num_samples "
                      "images of the run's eval split, preprocessed as in its evaluation.")
    flags.DEFINE_integer("batch_size", 8, "Inputs per gradient evaluation.")
    flags.DEFINE_float("fraction", 0.95, "Share of the gradient mass the effective size holds.")
    flags.DEFINE_integer("seed", 0, "Seed of the inputs (and of the random init).")
    flags.DEFINE_string("output", None, "Write the heat map PNG here.")
    flags.DEFINE_alias("out", "output")  # its first name; --output as every cnnjax CLI's file


def _load(model_name: str | None, workdir: str | None, step: int | None,
          input_shape: str | None) -> tuple[nn.Module, Any, tuple[int, ...], str, Any]:
    """`(model, variables or None, input shape, description, trained run or None)` for the
    CLI's flags."""
    from cnnjax.analysis.summary import check_input_shape, load_model, parse_shape

    owner = f"{_OWNER} CLI"
    if (model_name is None) == (workdir is None):
        raise invalid(owner, "--model", model_name,
                      "expected exactly one of --model=<zoo name> (random init) and "
                      "--workdir=<training run>")
    shape = parse_shape(input_shape, owner) if input_shape else None
    if model_name is not None and step is not None:
        raise invalid(owner, "--step", step, "expected it only with --workdir (a --model has "
                      "random weights, no checkpoints)")
    if model_name is not None:
        model, native = load_model(model_name, owner=owner)
        if shape is not None:
            check_input_shape(model, model_name, shape, input_shape, owner)
        return model, None, shape or tuple(native), f"{model_name} (random init)", None
    from cnnjax.train.trained import load_trained

    run = load_trained(workdir, step)
    if shape is not None:
        check_input_shape(run.model, run.config.model, shape, input_shape, owner)
    if shape is None:
        from cnnjax.train import config as config_lib

        try:
            info = config_lib.data_pipeline(run.config).get_dataset_info(run.config.data)
        except Exception as err:  # the dataset may be missing on this machine
            raise invalid(owner, "--input_shape", None,
                          f"the run's image shape is unknown ({type(err).__name__}); pass "
                          "--input_shape=H,W,C") from None
        shape = tuple(int(s) for s in info.image_shape)
    description = f"{run.config.model} ({run.how} step {run.step})"
    return run.model, run.variables, shape, description, run


def eval_images(run: Any, count: int) -> np.ndarray:
    """The first `count` images `[N, H, W, C]` of a trained run's eval split (fewer if the split
    is smaller), preprocessed as its evaluation sees them: `inputs` for a trained model's field."""
    from cnnjax.train.trained import eval_examples

    count = check_positive_int(_OWNER, "num_samples", count)
    images: list[np.ndarray] = []
    for batch in eval_examples(run, batch_size=min(count, 64)):
        images.extend(batch["image"][:count - len(images)])
        if len(images) >= count:
            break
    return np.stack(images)


def _check_number_flags(f: Any) -> None:
    """The numeric flags' ranges, named as flags (`effective_receptive_field` names its
    arguments: `num_samples=0` is not what the user typed)."""
    owner = f"{_OWNER} CLI"
    check_positive_int(owner, "--num_samples", f.num_samples)
    check_positive_int(owner, "--batch_size", f.batch_size)
    check_number(owner, "--fraction", f.fraction, "expected a number in (0, 1]", low=0.0,
                 high=1.0, low_open=True)
    if f.channel is not None and f.channel < 0:
        raise invalid(owner, "--channel", f.channel, "expected a channel index >= 0 (or no "
                      "--channel: all channels summed)")


def main(argv: Sequence[str]) -> None:
    """Prints the effective and theoretical receptive field sizes (and writes `--output`)."""
    import sys

    from absl import flags

    from cnnjax.utils.cli import start_command

    start_command(list(argv))  # refuses stray arguments; quiets orbax's INFO lines
    f = flags.FLAGS
    try:
        if f.output is not None:  # before the model compiles, not after the maps are computed
            check_figure_path(f.output, "--output")
        _check_number_flags(f)
        model, variables, shape, name, run = _load(f.model, f.workdir, f.step, f.input_shape)
        inputs = None
        if f.inputs == "data":
            if run is None:
                raise invalid(f"{_OWNER} CLI", "--inputs", "data",
                              "expected it with --workdir (a --model has no dataset)")
            inputs = eval_images(run, f.num_samples)
            name += f" on {len(inputs)} eval images"
        result = effective_receptive_field(
            model, shape, variables=variables, feature=f.feature, channel=f.channel,
            num_samples=f.num_samples, batch_size=f.batch_size, fraction=f.fraction, rng=f.seed,
            inputs=inputs)
        theoretical = feature_receptive_field(model, shape, result.feature)
    except ValueError as err:  # messages name the flag or argument, the value and the fix
        sys.exit(f"error: {err}")
    print(f"{name} on input {'x'.join(map(str, shape))}, unit {result.position} of "
          f"{result.feature or 'the output'}")
    print(describe(result, theoretical))
    if f.output:
        title = f"{name}: {result.feature or 'output'} {result.position}"
        plot_effective_receptive_field(result, f.output, theoretical, title=title)
        print(f"wrote {f.output}")


if __name__ == "__main__":
    from absl import app

    from cnnjax.utils.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
