"""Receptive fields of convolutional networks (Araujo, Norris & Sim, Distill 2019).

Along each spatial axis a feature map is described by three numbers relative to the network
input: the field `size` r (input pixels one output feature sees), the `jump` j (input pixels
between neighbouring features, the effective stride) and the `start` (input coordinate of the
centre of the first feature's field; input pixel i is centred at i). A window op with kernel k,
stride s, left padding p and dilation d maps (r, j, start) to

    r' = r + (k - 1) * d * j,   j' = j * s,   start' = start + ((k - 1) / 2 * d - p) * j.

`propagate` applies these rules to every primitive of a traced jaxpr (see `summary`), so layers
written as plain functions count as much as Flax modules. Where paths merge (residual add,
concatenation) the field is the union of the paths' fields, i.e. the maximum when their centres
align; misaligned merges are reported.

Upsampling (input dilation l, as in transposed convolutions) puts l - 1 zeros between inputs, so
different outputs see different numbers of real inputs. The size is then the exact maximum over
output phases, the jump the fractional j * s / l and the start the phase-averaged centre; the grid
is no longer uniform: neighbouring outputs' fields move in whole steps of the real inputs' grid,
not by the fractional jump, so a later window of span t adds the most its ends can move over t
positions (`AxisField.lattice`), and the sizes of later layers are upper bounds (a note says so).
Zero insertion written as `lax.pad` with interior padding gets the plain recurrence on the
fractional jump and no note (an upper bound too, the inserted zeros having no field; it is also
how `TiledConv2D` interleaves its phases, exactly). A path reduced over the map (global
pooling) merged into a positioned one gives every unit the whole union, with jump 0 (a note says
so). Jump 0 on an axis the output still has means that every position there sees the same
field: it is also how a positioned axis is reported once positions no longer map to input pixels
linearly (a resize, a gather, a window over an axis a flatten or `jnp.repeat` merged with
another), an upper bound. A field reduced away (global pooling, a Dense layer) keeps the last
jump on an output without the axis (`[N, classes]`); a reshape splitting an axis into several (a
Dense layer's output made a grid, YOLO v1's head) gives it jump 0: every cell sees it whole.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from cnnjax.utils.validation import (
    check_non_negative_int,
    check_positive_int,
    invalid,
)


class ReceptiveField(NamedTuple):
    """Receptive field of a feature map: per spatial axis (e.g. `(h, w)`) size, jump and start."""

    size: tuple[float, ...]
    jump: tuple[float, ...]
    start: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class AxisField:
    """Field along one input spatial axis, plus where that axis lives in the current array.

    `axis` is the array axis holding the input axis (None once it has been reduced away, e.g. by a
    global pool or a dense layer), `count` the number of positions along it and `exclusive`
    whether that array axis holds this input axis alone (False after a flatten merged it with
    others, when window ops over it no longer act spatially).

    `lattice` is 0 where the fields of neighbouring positions are shifted by exactly `|jump|`.
    After a transposed convolution they are not: their ends lie on the grid of the real inputs
    and move, over u >= 1 positions, by at most `lattice * ceil(u * |jump| / lattice + slack)`
    input pixels (`reach`), more than `u * |jump|` for some u.
    """

    size: float
    jump: float
    start: float
    axis: int | None
    count: int
    exclusive: bool = True
    lattice: float = 0.0
    slack: float = 0.0

    def reach(self, positions: int) -> float:
        """The most (input pixels) the ends of two fields `positions` apart are apart."""
        if positions == 0 or not self.lattice:
            return positions * abs(self.jump)
        steps = positions * abs(self.jump) / self.lattice + self.slack
        return self.lattice * math.ceil(steps - 1e-9 * max(1.0, steps))  # 1e-9: float ratios

    def interval(self) -> tuple[float, float]:
        """Input coordinates of the first and last pixel centre of the first feature's field."""
        half = (self.size - 1) / 2
        return self.start - half, self.start + half


Info = tuple[AxisField, ...]  # one AxisField per input spatial axis; None for non-activations


def input_info(ndim_spatial: int) -> Info:
    """Fields of the network input itself: size 1, jump 1, start 0 on array axes 1..n."""
    return tuple(AxisField(1.0, 1.0, 0.0, axis=i + 1, count=0) for i in range(ndim_spatial))


def with_counts(info: Info, shape: Sequence[int]) -> Info:
    """Fills in position counts from an array shape (a merged axis keeps its own count)."""
    return tuple(
        dataclasses.replace(f, count=shape[f.axis]) if f.axis is not None and f.exclusive else f
        for f in info
    )


def windowed(
    f: AxisField,
    kernel: int,
    stride: int,
    pad_before: int,
    dilation: int = 1,
    input_dilation: int = 1,
    *,
    out_axis: int,
    out_count: int,
) -> AxisField:
    """The Araujo et al. recurrence for one window op (convolution, pooling, pad, slice)."""
    jump = f.jump / input_dilation
    span = dilation * (kernel - 1)
    lattice, slack = f.lattice, f.slack
    if input_dilation > 1:
        size = f.size + f.reach(_dilated_span(kernel, stride, pad_before, dilation,
                                              input_dilation))
        if kernel > 1:  # the outputs' fields now move in whole steps of the real inputs' grid
            lattice, slack = _upsampled_lattice(f, stride, input_dilation)
            slack += _backward_excess(kernel, stride, pad_before, dilation,
                                      input_dilation) * abs(f.jump) / lattice
    else:
        size = f.size + f.reach(span)
    jump *= stride
    if lattice and slack == 0 and _is_whole(abs(jump) / lattice):
        lattice = 0.0  # every position moves by whole lattice steps: uniform again
    return AxisField(
        size=size,
        jump=jump,
        start=f.start + (span / 2 - pad_before) * f.jump / input_dilation,
        axis=out_axis,
        count=out_count,
        exclusive=True,
        lattice=lattice,
        slack=slack,
    )


def _is_whole(x: float) -> bool:
    return abs(x - round(x)) <= 1e-9 * max(1.0, abs(x))


def _upsampled_lattice(f: AxisField, stride: int, lhs: int) -> tuple[float, float]:
    """`(lattice, slack)` of the outputs of a window of `stride` over `f`'s positions dilated by
    `lhs`. Output o's first real input is ceil((o * stride - pad) / lhs), which moves by at most
    ceil(u * stride / lhs) <= u * stride / lhs + (lhs - 1) / lhs inputs over u outputs. From a
    uniform field (each input a whole step of |jump|) that is exactly `lattice = |jump|`, slack 0;
    from a non-uniform one, `f.reach` of that many inputs, whose excess over u outputs' average
    is kept as slack."""
    if not f.lattice:
        return abs(f.jump), 0.0
    ratio = abs(f.jump) / f.lattice
    if f.slack == 0 and _is_whole(ratio):
        return abs(f.jump), 0.0
    if _is_whole(1 / ratio) and _is_whole(f.slack / ratio):
        # ceil(ceil(x) / m + c) = ceil(x / m + c) for whole m and m * c: no ceiling to keep
        # (FCN's decoder: each 2x up-conv halves the jump on the coarsest path's lattice)
        return f.lattice, f.slack
    return f.lattice, f.slack + ratio * (lhs - 1) / lhs


def _merged_lattice(fields: Sequence[AxisField]) -> tuple[float, float]:
    """`(lattice, slack)` bounding the moves of every one of `fields` (of one jump): the
    coarsest lattice, each finer one's slack rescaled to it (+1 where it does not divide it)."""
    lattice = max(f.lattice for f in fields)
    if not lattice:
        return 0.0, 0.0
    slack = 0.0
    for f in fields:
        if f.lattice:
            fine = f.lattice / lattice
            slack = max(slack, f.slack * fine if _is_whole(lattice / f.lattice)
                        else (f.slack + 1) * fine)
    return lattice, slack


def _real_inputs(o: int, kernel: int, stride: int, pad_before: int, dilation: int,
                 lhs: int) -> list[int]:
    """The real (undilated) input positions output `o` of the window reads."""
    taps = (o * stride + t * dilation - pad_before for t in range(kernel))
    return [q // lhs for q in taps if q % lhs == 0]


def _backward_excess(kernel: int, stride: int, pad_before: int, dilation: int,
                     lhs: int) -> float:
    """Real-input steps by which the inputs u + 1 consecutive outputs read can spread beyond
    one output's widest span plus ceil(u * stride / lhs) (what `_upsampled_lattice` allows). With a
    dilated kernel an output's first real input can step back: k=3, stride 3, dilation 2 over
    inputs dilated by 3 has outputs 0..8 read 0, -, 0, 1, 0, 1, 2, 1, 2, and the field after a
    3-wide window was reported 2 inputs wide where it is 3."""
    if dilation == 1:
        return 0.0
    span = _dilated_span(kernel, stride, pad_before, dilation, lhs)
    excess = 0.0
    for first in range(lhs):  # the reads repeat every lhs outputs, stride inputs on
        low, high = math.inf, -math.inf
        for u in range(3 * lhs):
            real = _real_inputs(first + u, kernel, stride, pad_before, dilation, lhs)
            if real:
                low, high = min(low, *real), max(high, *real)
            if real or low < math.inf:
                excess = max(excess, high - low - span - math.ceil(u * stride / lhs - 1e-9))
    return excess


def _dilated_span(kernel: int, stride: int, pad_before: int, dilation: int, lhs: int) -> int:
    """Largest distance, in input positions, between real inputs one output sees when the input
    is dilated by `lhs` (maximum over the `lhs` output phases; image borders ignored)."""
    best = 0
    for o in range(lhs):
        real = _real_inputs(o, kernel, stride, pad_before, dilation, lhs)
        if real:
            best = max(best, max(real) - min(real))
    return best


def collapse(f: AxisField) -> AxisField:
    """Union over all positions of an axis that is reduced away (global pool, dense layer)."""
    if f.axis is None or f.count <= 1:
        return dataclasses.replace(f, axis=None, count=1)
    last = f.start + (f.count - 1) * f.jump
    lo = min(f.start, last) - (f.size - 1) / 2
    hi = max(f.start, last) + (f.size - 1) / 2
    return AxisField(hi - lo + 1, f.jump, (lo + hi) / 2, axis=None, count=1, exclusive=True)


def collapse_in_place(f: AxisField, axis: int, count: int) -> AxisField:
    """Union over all positions of `f`, given to every position of output array axis `axis`.

    For an axis mixed over all its positions that the output still has (a resize, a gather, a
    path merged with a global one): the field no longer moves with the unit, so its jump is 0.
    """
    whole = collapse(f)
    return AxisField(whole.size, 0.0, whole.start, axis=axis, count=count, exclusive=True)


def is_positioned(f: AxisField) -> bool:
    """Whether `f` moves with the unit: located on an array axis, with a non-zero jump."""
    return f.axis is not None and f.jump != 0


def union(fields: Sequence[AxisField]) -> tuple[AxisField, bool]:
    """Merges the fields of paths meeting at one position; returns `(field, misaligned)`.

    Fields located on the same array axis must share jump and start to be aligned; fields already
    reduced away (`axis=None`) see the whole input range they cover and are merged as intervals.
    A positioned field meeting a position-independent one (reduced, or located with jump 0: a
    squeeze-excitation gate, an image-pooling branch, an SE branch plus its shortcut), or fields
    on the same axis whose positions differ in number (one of them merged or resampled) or that
    move by different jumps (unit i's field then spans both paths' i-th fields, which grows with
    i), are collapsed first: every output position then sees the union over all positions, which
    does not move with the unit (jump 0 on the output's grid; an upper bound), and the merge is
    reported as misaligned.
    """
    if len(fields) == 1:
        return fields[0], False
    located = [f for f in fields if f.axis is not None]
    misaligned = False
    if located:
        first = located[0]
        same_axis = all(f.axis == first.axis for f in located)
        same_count = all(f.count == first.count for f in located)
        positioned = [f for f in fields if is_positioned(f)]
        same_jump = all(f.jump == first.jump for f in located)
        if len(positioned) < len(fields) or (same_axis and not (same_count and same_jump)):
            whole = union([collapse(f) for f in fields])[0]
            lost = bool(positioned)  # positioned fields were spread over all positions
            if not same_axis:
                return dataclasses.replace(whole, jump=0.0), lost
            return collapse_in_place(whole, first.axis, first.count), lost
        if not same_axis:  # no position is on both axes: every unit may see the union
            return dataclasses.replace(union([collapse(f) for f in fields])[0], jump=0.0), True
        misaligned = any(f.jump != first.jump or f.start != first.start for f in located)
    lo = min(f.interval()[0] for f in fields)
    hi = max(f.interval()[1] for f in fields)
    if not located:
        return AxisField(hi - lo + 1, fields[0].jump, (lo + hi) / 2, None, 1), False
    first = located[0]
    lattice, slack = _merged_lattice(located)
    return (
        AxisField(
            size=hi - lo + 1,
            jump=max((f.jump for f in located), key=abs),
            start=(lo + hi) / 2,
            axis=first.axis,
            count=first.count,
            exclusive=all(f.exclusive for f in located),
            lattice=lattice,
            slack=slack,
        ),
        misaligned,
    )


def to_receptive_field(info: Info) -> ReceptiveField:
    """Public (size, jump, start) triple of an internal per-axis description."""

    def clean(v: float) -> float:
        return int(v) if float(v).is_integer() else float(v)

    return ReceptiveField(
        tuple(clean(f.size) for f in info),
        tuple(clean(f.jump) for f in info),
        tuple(clean(f.start) for f in info),
    )


def stack_receptive_field(layers: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """Closed-form (size, jump, start) after a chain of window layers along one axis.

    Each layer is a tuple `(kernel, stride=1, padding=0, dilation=1)`, so `[(3,), (3,)]` (not
    `[3, 3]`) is two stacked 3-wide convolutions. A bare number is refused rather than read as
    `(kernel,)`: `[3, 3]` is as likely a single `(3, 3)` layer missing its brackets, and a
    silently different answer would be worse than an error. Two stacked 3x3 convolutions see a
    5x5 field, three a 7x7 one (Simonyan & Zisserman, 2015).
    """
    owner = "stack_receptive_field"
    form = "(kernel, stride, padding, dilation)"
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise invalid(owner, "layers", layers, f"expected a list of layers, each {form}")
    field = AxisField(1.0, 1.0, 0.0, axis=0, count=0)
    for i, item in enumerate(layers):
        try:
            layer = tuple(item) if not isinstance(item, str) else None
        except TypeError:  # a bare number, not a one-element tuple
            layer = None
        if layer is None:
            hint = (f", e.g. ({item},) for a kernel of {item} alone"
                    if isinstance(item, numbers.Integral) else "")
            raise invalid(owner, f"layers[{i}]", item, f"expected {form} as a tuple{hint}")
        if not 1 <= len(layer) <= 4:
            raise invalid(owner, f"layers[{i}]", layer, f"expected {form}")
        kernel, stride, padding, dilation = layer + (1, 0, 1)[len(layer) - 1 :]
        check_positive_int(owner, f"layers[{i}].kernel", kernel)
        check_positive_int(owner, f"layers[{i}].stride", stride)
        check_non_negative_int(owner, f"layers[{i}].padding", padding)
        check_positive_int(owner, f"layers[{i}].dilation", dilation)
        field = windowed(field, kernel, stride, padding, dilation, out_axis=0, out_count=0)
    result = to_receptive_field((field,))
    return result.size[0], result.jump[0], result.start[0]


def receptive_field(model: Any, input_shape: Sequence[int], **kwargs: Any) -> ReceptiveField:
    """Final (size, jump, start) of `model`'s (first) output on its input, per spatial axis.

    Equivalent to `summary(model, input_shape, **kwargs).receptive_field`; errors name
    receptive_field.
    """
    # summary depends on this module
    from cnnjax.analysis.summary import summarize

    return summarize("receptive_field", model, input_shape, **kwargs).receptive_field


# ----------------------------------------------------------------------------------------------
# Propagation through jaxpr primitives.

ELEMENTWISE = frozenset(
    [
        "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
        "cbrt", "ceil", "clamp", "complex", "conj", "convert_element_type", "copy", "copy_p", "cos",
        "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor",
        "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic",
        "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "population_count", "pow",
        "real", "reduce_precision", "rem", "round", "rsqrt", "select_n", "shift_left",
        "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square",
        "sub", "tan", "tanh", "xor", "stop_gradient"
    ]
)
REDUCTIONS = frozenset(
    [
        "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
        "reduce_xor", "argmax", "argmin"
    ]
)
WINDOW_REDUCTIONS = frozenset(
    ["reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"]
)
CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])


def _merge(infos: Sequence[Info | None], notes: list[str], where: str) -> Info:
    """Union of the activation inputs' fields, dim by dim."""
    present = [i for i in infos if i is not None]
    return tuple(_union_of_paths([i[d] for i in present], notes, where, d, "merged")
                 for d in range(len(present[0])))


def _union_of_paths(fields: Sequence[AxisField], notes: list[str], where: str, d: int,
                    how: str) -> AxisField:
    """The union of several paths' fields on spatial axis `d` (`how` they meet: "merged" by
    an elementwise op, "concatenated" along channels), with a note saying why when they are
    misaligned."""
    field, misaligned = union(fields)
    if misaligned and _mixes_global(fields):
        notes.append(_global_mix_note(where, how, d))
    elif misaligned and _counts_differ(fields):
        notes.append(_count_mix_note(where, how, d))
    elif misaligned and _jumps_differ(fields):
        notes.append(f"{where}: paths {how} on spatial axis {d} move by different jumps "
                     f"({_start_jump_pairs(fields)}), so a unit's field grows with its "
                     "position; every output position is given the union of their fields over "
                     "all positions (jump 0), an upper bound")
    elif misaligned and len({f.axis for f in fields if f.axis is not None}) > 1:
        notes.append(f"{where}: paths {how} on spatial axis {d} lie on different array axes "
                     f"{sorted({f.axis for f in fields if f.axis is not None})} (e.g. attention "
                     "scores of every position against every other); every unit is given the "
                     "union of their fields over all positions (jump 0)")
    elif misaligned:
        notes.append(f"{where}: paths {how} on spatial axis {d} are misaligned "
                     f"({_start_jump_pairs(fields)}); the union of their fields is reported")
    return field


def _start_jump_pairs(fields: Sequence[AxisField]) -> str:
    """`(start, jump)` of each distinct path, e.g. `(start, jump) = (0.5, 2.0), (1.0, 1.0)`."""
    pairs = sorted({(float(f.start), float(f.jump)) for f in fields})
    return "(start, jump) = " + ", ".join(f"({s}, {j})" for s, j in pairs)


def _jumps_differ(fields: Sequence[AxisField]) -> bool:
    """Whether positioned fields on one array axis move by different jumps (as `union` sees)."""
    located = [f for f in fields if f.axis is not None]
    return len({f.axis for f in located}) == 1 and len({f.jump for f in located}) > 1


def _mixes_global(fields: Sequence[AxisField]) -> bool:
    """Whether positioned fields meet position-independent ones (reduced, or jump 0)."""
    return len({is_positioned(f) for f in fields}) == 2


def _counts_differ(fields: Sequence[AxisField]) -> bool:
    """Whether fields on one array axis hold different numbers of positions (as `union` sees)."""
    located = [f for f in fields if f.axis is not None]
    return len({f.axis for f in located}) == 1 and len({f.count for f in located}) > 1


def _count_mix_note(where: str, how: str, d: int) -> str:
    return (f"{where}: paths {how} on spatial axis {d} hold different numbers of positions "
            "(one was merged with another axis or resampled); every output position is given "
            "the union of the fields over all positions")


def _global_mix_note(where: str, how: str, d: int) -> str:
    return (f"{where}: a path reduced over spatial axis {d} (e.g. global pooling) is {how} "
            "with a positioned one; every output position is given the union of the fields "
            "over all positions")


def _globalize(infos: Sequence[Info | None], located: Info | None = None) -> Info:
    """Every input position may influence every output: union of all fields, all collapsed.

    `located` holds, per spatial axis, a field whose `axis` is where that axis still lies in the
    output (None where unknown or gone): every position there gets the whole union. The jump is
    0 either way, so no unit is reported with a field that moves with it (also where a later op
    brings the axis back, e.g. a mean over the axis `jnp.stack` added).
    """
    present = [i for i in infos if i is not None]
    out = []
    for d in range(len(present[0])):
        whole = dataclasses.replace(union([collapse(i[d]) for i in present])[0], jump=0.0)
        if located is not None and located[d].axis is not None:
            whole = collapse_in_place(whole, located[d].axis, located[d].count)
        out.append(whole)
    return tuple(out)


def _same_layout(
    infos: Sequence[Info | None], in_shapes: Sequence[Sequence[int]], out_shape: Sequence[int]
) -> Info | None:
    """The first activation input's fields when the output has its rank (an op that keeps the
    layout, e.g. a gather resizing a map): spatial axes stay on the same array axes, where the
    output has more than one position or the input had one too (a single position a later op
    may still spread over several: adaptive pooling of a 1x1 map gathers one axis at a time)."""
    k = next(k for k, info in enumerate(infos) if info is not None)
    if len(in_shapes[k]) != len(out_shape):
        return None
    return tuple(
        f if f.axis is not None and (out_shape[f.axis] > 1 or in_shapes[k][f.axis] == 1)
        else dataclasses.replace(f, axis=None)
        for f in infos[k]
    )


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Groups of input and output axes whose sizes multiply to the same number."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ia, jb, pa, pb = [], [], 1, 1
        if i < len(a):
            ia.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            jb.append(j)
            pb *= b[j]
            j += 1
        while pa != pb and (i < len(a) or j < len(b)):
            if (pa < pb and i < len(a)) or j >= len(b):
                ia.append(i)
                pa *= a[i]
                i += 1
            else:
                jb.append(j)
                pb *= b[j]
                j += 1
        groups.append((ia, jb))
    return groups


def _reshape(info: Info, in_shape: Sequence[int], out_shape: Sequence[int], notes: list[str],
             where: str) -> Info:
    """Follows spatial axes through a reshape: kept, merged (flatten) or split (then collapsed,
    an upper bound that a note reports: positions no longer lie on one axis). A field already
    reduced away keeps its last jump, unless the reshape splits an axis into several of an output
    shaped like a map: the new positions (a Dense layer's output made a grid, as in YOLO v1) all
    see it whole, so jump 0."""
    out = []
    groups = _reshape_groups(in_shape, out_shape)
    # Only an output shaped like a map ([N, *spatial, C]) gets new positions: a GroupNorm's
    # [N, C] -> [N, G, C/G] on pooled features splits an axis too, and keeps the last jump.
    splits = len(out_shape) == len(info) + 2 and any(
        sum(out_shape[k] > 1 for k in jb) > 1 for _, jb in groups)
    for d, f in enumerate(info):
        if f.axis is None:
            out.append(dataclasses.replace(f, jump=0.0) if splits else f)
            continue
        ia, jb = next(g for g in groups if f.axis in g[0])
        big_in = [k for k in ia if in_shape[k] > 1]
        big_out = [k for k in jb if out_shape[k] > 1]
        if in_shape[f.axis] <= 1:
            out.append(collapse(f))
        elif big_in == [f.axis] and len(big_out) == 1:
            out.append(dataclasses.replace(f, axis=big_out[0]))
        elif len(big_out) == 1:  # several axes merged into one: a flatten (or jnp.repeat)
            # Jump and count stay those of the unmerged axis: a Dense layer contracting the axis
            # reports the last spatial jump. Any other use of the axis as positions gets the whole
            # field with jump 0 (`_apply`, `union`, `output_info`).
            out.append(dataclasses.replace(f, axis=big_out[0], exclusive=False))
        else:  # an axis split into several: no longer a plain spatial layout
            if 0 not in in_shape and f.jump != 0:  # empty, or the same field everywhere: no loss
                notes.append(f"{where}: spatial axis {d} is split across array axes {big_out}; "
                             "its field is taken as the whole axis (an upper bound)")
            # Jump 0: the whole field no longer moves with a unit of a later spatial axis.
            out.append(dataclasses.replace(collapse(f), jump=0.0))
    return tuple(out)


Window = tuple[int, int, int, int, int]  # kernel, stride, pad_before, dilation, input_dilation
Rules = dict[int, tuple[int, Window | None]]  # input array axis -> (output axis, window)


def _apply(info: Info, rules: Rules, notes: list[str] | None = None, where: str = "") -> Info:
    """Moves each located field to its output axis through an optional window; axes without a
    rule are reduced away (collapsed). A window over an axis that a flatten merged with others
    is not a spatial window: every position of the output axis is given the whole field (jump 0,
    an upper bound), noted in `notes`."""
    out = []
    for d, f in enumerate(info):
        if f.axis is None:
            out.append(f)
            continue
        rule = rules.get(f.axis)
        if rule is None:
            out.append(collapse(f))
            continue
        out_axis, window = rule
        if window is None or window == (1, 1, 0, 1, 1):
            out.append(dataclasses.replace(f, axis=out_axis))
        elif f.exclusive:
            out.append(windowed(f, *window, out_axis=out_axis, out_count=0))
        else:
            if notes is not None and f.jump != 0:
                notes.append(f"{where}: window over array axis {f.axis}, which holds spatial "
                             f"axis {d} merged with others; its field is taken as the whole axis")
            out.append(collapse_in_place(f, out_axis, 0))
    return tuple(out)


def output_info(info: Info, notes: list[str], where: str = "output") -> Info:
    """Fields as reported for a model output: an array axis holding a spatial axis merged with
    others (a flatten, `jnp.repeat`) has no uniform grid of input positions, so every position on
    it is given the whole field (jump 0, an upper bound), with a note."""
    out = []
    for d, f in enumerate(info):
        if f.axis is None or f.exclusive:
            out.append(f)
            continue
        if f.jump != 0:
            notes.append(f"{where}: array axis {f.axis} holds spatial axis {d} merged with others "
                         "(a flatten or jnp.repeat); every position on it is given the whole "
                         "field (jump 0)")
        out.append(collapse_in_place(f, f.axis, f.count))
    return tuple(out)


def _identity_rules(ndim: int) -> Rules:
    return {a: (a, None) for a in range(ndim)}


def _concatenate(
    in_infos: Sequence[Info | None], in_shapes: Sequence[Sequence[int]], dim: int,
    notes: list[str], where: str,
) -> Info:
    """Concatenation. Along channels the paths' fields are merged; along a spatial axis (how
    jnp.pad's wrap/reflect/edge modes are built) the largest piece is the data and the others are
    treated as padding around it; along a flattened axis every piece's field is merged. Empty
    pieces are ignored."""
    offsets, total = _offsets_along(in_shapes, dim)
    present = _pieces_with_data(in_infos, in_shapes)
    out = []
    for d in range(len(in_infos[present[0]])):
        located_on_dim = [k for k in present if in_infos[k][d].axis == dim]
        if any(not in_infos[k][d].exclusive for k in located_on_dim):
            out.append(_concatenate_flattened([in_infos[k][d] for k in present],
                                              [in_infos[k][d] for k in located_on_dim],
                                              notes, where, d))
        elif located_on_dim:
            out.append(_concatenate_along_spatial(
                [in_infos[k][d] for k in located_on_dim],
                [in_shapes[k][dim] for k in located_on_dim],
                [offsets[k] for k in located_on_dim], dim, total, notes, where, d))
        else:
            out.append(_union_of_paths([in_infos[k][d] for k in present], notes, where, d,
                                       "concatenated"))
    return tuple(out)


def _offsets_along(in_shapes: Sequence[Sequence[int]], dim: int) -> tuple[list[int], int]:
    """Where each concatenated piece starts along `dim`, and the concatenation's length."""
    offsets, total = [], 0
    for shape in in_shapes:
        offsets.append(total)
        total += shape[dim]
    return offsets, total


def _pieces_with_data(in_infos: Sequence[Info | None],
                      in_shapes: Sequence[Sequence[int]]) -> list[int]:
    """The indices of the concatenated pieces that carry fields (activations, not constants),
    leaving out empty ones (jnp.pad's edge mode makes some) unless every such piece is empty."""
    present = [k for k, info in enumerate(in_infos) if info is not None]
    filled = [k for k in present if 0 not in in_shapes[k]]
    return filled or present


def _concatenate_along_spatial(
    pieces: Sequence[AxisField], lengths: Sequence[int], offsets: Sequence[int], dim: int,
    total: int, notes: list[str], where: str, d: int,
) -> AxisField:
    """Concatenation along the array axis `dim` holding spatial axis `d` (jnp.pad's wrap, reflect
    and edge modes): the first longest piece is the data, placed at its offset in the `total`
    positions, and the others are padding around it."""
    main = max(range(len(pieces)), key=lambda i: lengths[i])
    if lengths.count(lengths[main]) > 1:
        # jnp.pad's wrap mode with padding >= the input: whole copies tie, and which one
        # is the data is not recorded (the field's size holds; its start may not).
        notes.append(f"{where}: padding at least as large as the input wraps whole "
                     f"copies of it along spatial axis {d}; the field start there is "
                     "ambiguous")
    f = pieces[main]
    if f.exclusive:
        return windowed(f, 1, 1, offsets[main], out_axis=dim, out_count=total)
    return collapse(f)


def _concatenate_flattened(pieces: Sequence[AxisField], on_dim: Sequence[AxisField],
                           notes: list[str], where: str, d: int) -> AxisField:
    """Concatenation along an axis a flatten merged spatial axis `d` into (flattened features of
    several paths, an SPP's pyramid levels): a unit contracting that axis sees every position of
    every piece, so the field is the union of the pieces' whole fields. Its jump stays the pieces'
    common spatial jump, as for a flatten alone (0 with a note when they differ). A piece already
    reduced (an SPP's 1x1 level) counts too: its jump is that of its last window."""
    whole = union([collapse(f) for f in pieces])[0]
    jumps = {f.jump for f in on_dim} | {f.jump for f in pieces if f.axis is None}
    if len(jumps) > 1:
        notes.append(f"{where}: flattened paths with different jumps on spatial axis {d} are "
                     "concatenated; the jump there is taken as 0")
    return dataclasses.replace(whole, jump=jumps.pop() if len(jumps) == 1 else 0.0)


@dataclasses.dataclass(frozen=True)
class _Equation:
    """One primitive application as `propagate` sees it, with the helpers its rules share."""

    prim: str
    params: dict[str, Any]
    in_infos: Sequence[Info | None]
    in_shapes: Sequence[Sequence[int]]
    out_shapes: Sequence[Sequence[int]]
    notes: list[str]
    where: str
    first_k: int = dataclasses.field(init=False)  # index of the first activation input

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "first_k", next(k for k, info in enumerate(self.in_infos) if info is not None))

    @property
    def first(self) -> Info:
        """Fields of the first activation input."""
        return self.in_infos[self.first_k]

    @property
    def ndim(self) -> int:
        """Rank of the first activation input."""
        return len(self.in_shapes[self.first_k])

    @property
    def n_out(self) -> int:
        """Number of outputs."""
        return len(self.out_shapes)

    def finish(self, infos: Sequence[Info]) -> list[Info]:
        """Output fields with their position counts filled in from the output shapes."""
        return [with_counts(info, shape) for info, shape in zip(infos, self.out_shapes,
                                                                strict=True)]

    def also_global(self, info: Info, extra: Sequence[Info | None]) -> Info:
        """Merges inputs whose every element reaches every output (dynamic kernels, indices)."""
        extra = [e for e in extra if e is not None]
        if not extra:
            return info
        self.notes.append(f"{self.where}: an operand computed from the input (a data-dependent "
                          "kernel, padding value or index) reaches every output; field treated "
                          "as global")
        glob = _globalize(extra)
        info = with_counts(info, self.out_shapes[0])  # the positions the union runs over
        return tuple(union([f, g])[0] for f, g in zip(info, glob, strict=True))


def _elementwise_rule(eq: _Equation) -> list[Info]:
    """Elementwise ops: every output gets the union of the activation inputs' fields."""
    return eq.finish([_merge(eq.in_infos, eq.notes, eq.where)] * eq.n_out)


def _optimization_barrier_rule(eq: _Equation) -> list[Info]:
    """`optimization_barrier`: each operand's fields pass through to its own output."""
    return [None if info is None else with_counts(info, shape)
            for info, shape in zip(eq.in_infos, eq.out_shapes, strict=True)]


def _conv_rule(eq: _Equation) -> list[Info]:
    """`conv_general_dilated`: the window recurrence on each spatial axis (global if the kernel
    is data-dependent or batch groups are used)."""
    params, in_infos, notes, where = eq.params, eq.in_infos, eq.notes, eq.where
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    if in_infos[0] is None or params.get("batch_group_count", 1) != 1:
        notes.append(f"{where}: convolution with a data-dependent kernel or batch groups; "
                     "field treated as global")
        kept = None  # where the input's spatial axes lie in the output
        if in_infos[0] is not None:
            kept = _apply(in_infos[0], {a: (o, None) for a, o in
                                        zip(lhs_spec[2:], out_spec[2:], strict=True)})
        return eq.finish([_globalize(in_infos, kept)])
    rules: Rules = {lhs_spec[0]: (out_spec[0], None)}
    for i, (a, o) in enumerate(zip(lhs_spec[2:], out_spec[2:], strict=True)):
        lhs_dilation = params["lhs_dilation"][i]
        if lhs_dilation > 1:
            notes.append(f"{where}: input dilation {lhs_dilation} (transposed convolution) "
                         "makes the grid non-uniform; later field sizes are upper bounds")
        rules[a] = (o, (eq.in_shapes[1][rhs_spec[2 + i]], params["window_strides"][i],
                        params["padding"][i][0], params["rhs_dilation"][i], lhs_dilation))
    return eq.finish([eq.also_global(_apply(in_infos[0], rules, notes, where), in_infos[1:])])


def _window_reduction_rule(eq: _Equation) -> list[Info]:
    """`reduce_window*` (pooling): the window recurrence on every axis of each operand."""
    params, first = eq.params, eq.first
    if any(f.axis is not None and params["base_dilation"][f.axis] > 1 for f in first):
        eq.notes.append(f"{eq.where}: base dilation (zero insertion) makes the grid non-uniform; "
                        "later field sizes are upper bounds")
    rules = {
        a: (a, (params["window_dimensions"][a], params["window_strides"][a],
                params["padding"][a][0], params["window_dilation"][a],
                params["base_dilation"][a]))
        for a in range(eq.ndim)
    }
    return eq.finish([_apply(eq.in_infos[k] or first, rules, eq.notes, eq.where)
                      for k in range(eq.n_out)])


def _pad_rule(eq: _Equation) -> list[Info]:
    """`pad`: a 1-wide window shifted by the low padding, interior padding as input dilation."""
    rules = {a: (a, (1, 1, lo, 1, interior + 1))
             for a, (lo, _, interior) in enumerate(eq.params["padding_config"])}
    return eq.finish([eq.also_global(_apply(eq.first, rules, eq.notes, eq.where),
                                     eq.in_infos[1:])])


def _slice_rule(eq: _Equation) -> list[Info]:
    """`slice`: a 1-wide window starting at the start index, with the slice's strides."""
    ndim = eq.ndim
    strides = eq.params["strides"] or (1,) * ndim
    rules = {a: (a, (1, strides[a], -eq.params["start_indices"][a], 1, 1)) for a in range(ndim)}
    return eq.finish([_apply(eq.first, rules, eq.notes, eq.where)])


def _split_rule(eq: _Equation) -> list[Info]:
    """`split`: each piece is a slice starting at its offset along the split axis."""
    axis, outs, offset = eq.params["axis"], [], 0
    for shape in eq.out_shapes:
        rules = _identity_rules(eq.ndim)
        rules[axis] = (axis, (1, 1, -offset, 1, 1))
        outs.append(_apply(eq.first, rules, eq.notes, eq.where))
        offset += shape[axis]
    return eq.finish(outs)


def _rev_rule(eq: _Equation) -> list[Info]:
    """`rev`: a reversed axis starts at the old last position and has the opposite jump."""
    out = []
    for f in eq.first:
        if f.axis in eq.params["dimensions"] and f.count > 1:
            out.append(dataclasses.replace(f, start=f.start + (f.count - 1) * f.jump,
                                           jump=-f.jump))
        else:
            out.append(f)
    return eq.finish([tuple(out)])


def _transpose_rule(eq: _Equation) -> list[Info]:
    """`transpose`: fields move to their permuted array axes."""
    perm = eq.params["permutation"]
    return eq.finish([_apply(eq.first, {perm[k]: (k, None) for k in range(len(perm))})])


def _squeeze_rule(eq: _Equation) -> list[Info]:
    """`squeeze`: fields move down past the removed axes (a field on one is collapsed)."""
    ndim = eq.ndim
    dims = {d % ndim for d in eq.params["dimensions"]}
    kept = [a for a in range(ndim) if a not in dims]
    return eq.finish([_apply(eq.first, {a: (k, None) for k, a in enumerate(kept)})])


def _broadcast_in_dim_rule(eq: _Equation) -> list[Info]:
    """`broadcast_in_dim`: fields move to their broadcast axes (see `_broadcast`)."""
    return eq.finish([_broadcast(eq.first, eq.in_shapes[eq.first_k], eq.out_shapes[0],
                                 eq.params["broadcast_dimensions"])])


def _reshape_rule(eq: _Equation) -> list[Info]:
    """`reshape`: fields follow kept, merged or split axes (see `_reshape`)."""
    return eq.finish([_reshape(eq.first, eq.in_shapes[eq.first_k], eq.out_shapes[0], eq.notes,
                               eq.where)])


def _concatenate_rule(eq: _Equation) -> list[Info]:
    """`concatenate`: channel paths merged, spatial pieces as padding (see `_concatenate`)."""
    return eq.finish([_concatenate(eq.in_infos, eq.in_shapes, eq.params["dimension"], eq.notes,
                                   eq.where)])


def _stack_rule(eq: _Equation) -> list[Info]:
    """`stack` (`jnp.stack`): every input gains the new axis, then they are concatenated along
    it, which holds no spatial axis: the paths' fields merge, as channel paths do."""
    axis = eq.params["axis"]
    infos = [None if info is None else
             _apply(info, {a: (a + (a >= axis), None) for a in range(len(shape))})
             for info, shape in zip(eq.in_infos, eq.in_shapes, strict=True)]
    shapes = [(*shape[:axis], 1, *shape[axis:]) for shape in eq.in_shapes]
    return eq.finish([_concatenate(infos, shapes, axis, eq.notes, eq.where)])


def _reduction_rule(eq: _Equation) -> list[Info]:
    """`reduce_*` and `argmax`/`argmin`: fields on reduced axes collapse, the rest move down."""
    axes = set(eq.params["axes"])
    kept = [a for a in range(eq.ndim) if a not in axes]
    rules = {a: (k, None) for k, a in enumerate(kept)}
    return eq.finish([_apply(eq.first, rules)] * eq.n_out)


def _dot_general_rule(eq: _Equation) -> list[Info]:
    """`dot_general`: batch and free axes move to their result axes, contracted ones collapse
    (spread over the other operand's free axis when that operand is a constant); operands
    merged."""
    in_infos, in_shapes = eq.in_infos, eq.in_shapes
    (lc, rc), (lb, rb) = eq.params["dimension_numbers"]
    nb = len(lb)
    lfree = [a for a in range(len(in_shapes[0])) if a not in lc and a not in lb]
    rfree = [a for a in range(len(in_shapes[1])) if a not in rc and a not in rb]
    lrules = {a: (k, None) for k, a in enumerate(lb)}
    lrules |= {a: (nb + k, None) for k, a in enumerate(lfree)}
    rrules = {a: (k, None) for k, a in enumerate(rb)}
    rrules |= {a: (nb + len(lfree) + k, None) for k, a in enumerate(rfree)}
    # Output axes of each operand's free axes, to place a spatial axis contracted against
    # the other operand when that one is a constant or a parameter (resize, dense over space).
    free_out = ([nb + k for k, a in enumerate(lfree) if in_shapes[0][a] > 1],
                [nb + len(lfree) + k for k, a in enumerate(rfree) if in_shapes[1][a] > 1])
    parts = []
    for k, (info, rules, contracted) in enumerate(((in_infos[0], lrules, lc),
                                                   (in_infos[1], rrules, rc))):
        if info is None:
            continue
        moved = list(_apply(info, rules))
        if in_infos[1 - k] is None and free_out[1 - k]:
            for d, f in enumerate(info):
                if f.axis in contracted and f.exclusive and f.count > 1:
                    moved[d] = _contracted_against_constant(f, d, free_out[1 - k], eq.notes,
                                                            eq.where)
        parts.append(tuple(moved))
    return eq.finish([_merge(parts, eq.notes, eq.where)])


def _dynamic_slice_rule(eq: _Equation) -> list[Info]:
    """`dynamic_slice`: fields on axes taken whole stay, sliced axes collapse; indices global."""
    sizes = eq.params["slice_sizes"]
    rules = {a: (a, None) for a in range(eq.ndim) if sizes[a] == eq.in_shapes[0][a]}
    return eq.finish([eq.also_global(_apply(eq.first, rules), eq.in_infos[1:])])


def _along_axis_rule(eq: _Equation) -> list[Info]:
    """Cumulative ops and `sort`: the field on the scanned or sorted axis collapses."""
    axis = eq.params.get("axis", eq.params.get("dimension"))
    rules = {a: (a, None) for a in range(eq.ndim) if a != axis}
    return eq.finish([_apply(eq.first, rules)] * eq.n_out)


def _control_flow_rule(eq: _Equation) -> list[Info]:
    """Opaque control flow (`scan`, `while`, `cond`): every position assumed to mix."""
    eq.notes.append(f"{eq.where}: control flow '{eq.prim}' treated as mixing all positions")
    return eq.finish([_globalize(eq.in_infos, _same_layout(eq.in_infos, eq.in_shapes, shape))
                      for shape in eq.out_shapes])


def _unknown_rule(eq: _Equation) -> list[Info]:
    """Unregistered primitives: elementwise when all shapes agree, else mixing all positions."""
    out_shape = tuple(eq.out_shapes[0])
    same_shape = all(
        tuple(eq.in_shapes[k]) == out_shape for k, i in enumerate(eq.in_infos) if i is not None
    ) and all(tuple(s) == out_shape for s in eq.out_shapes)
    if same_shape:
        eq.notes.append(f"{eq.where}: unknown primitive '{eq.prim}' treated as elementwise")
        return eq.finish([_merge(eq.in_infos, eq.notes, eq.where)] * eq.n_out)
    eq.notes.append(f"{eq.where}: primitive '{eq.prim}' treated as mixing all positions "
                    "(global field)")
    return eq.finish([_globalize(eq.in_infos, _same_layout(eq.in_infos, eq.in_shapes, shape))
                      for shape in eq.out_shapes])


_Rule = Callable[[_Equation], list[Info]]
# Primitive name -> rule, as JAX registers its own per-primitive rules; the name sets are
# disjoint, so the order of the entries does not matter.
_RULES: dict[str, _Rule] = {
    **dict.fromkeys(ELEMENTWISE, _elementwise_rule),
    "optimization_barrier": _optimization_barrier_rule,
    "conv_general_dilated": _conv_rule,
    **dict.fromkeys(WINDOW_REDUCTIONS, _window_reduction_rule),
    "pad": _pad_rule,
    "slice": _slice_rule,
    "split": _split_rule,
    "rev": _rev_rule,
    "transpose": _transpose_rule,
    "squeeze": _squeeze_rule,
    "broadcast_in_dim": _broadcast_in_dim_rule,
    "reshape": _reshape_rule,
    "concatenate": _concatenate_rule,
    "stack": _stack_rule,
    **dict.fromkeys(REDUCTIONS, _reduction_rule),
    "dot_general": _dot_general_rule,
    "dynamic_slice": _dynamic_slice_rule,
    **dict.fromkeys(CUMULATIVE | {"sort"}, _along_axis_rule),
    **dict.fromkeys(("scan", "while", "cond"), _control_flow_rule),
}


def propagate(
    prim: str,
    params: dict[str, Any],
    in_infos: Sequence[Info | None],
    in_shapes: Sequence[Sequence[int]],
    out_shapes: Sequence[Sequence[int]],
    notes: list[str],
    where: str,
) -> list[Info]:
    """Fields of the outputs of one primitive given those of its inputs (None = not activation).

    Unknown primitives are treated conservatively: as elementwise when every activation input has
    the output's shape, else as mixing all positions (a note says so).
    """
    eq = _Equation(prim, params, in_infos, in_shapes, out_shapes, notes, where)
    return _RULES.get(prim, _unknown_rule)(eq)


def _broadcast(info: Info, in_shape: Sequence[int], out_shape: Sequence[int],
               dims: Sequence[int]) -> Info:
    """`broadcast_in_dim`: axes keep their fields on their new array axes; a single position
    spread over several (`jnp.broadcast_to`, `jnp.repeat` of a 1-wide map) gives every copy its
    one field, so the jump there is 0 (it used to keep the source's jump, sliding the copies'
    fields off the pixels they see)."""
    kept = _apply(info, {a: (dims[a], None) for a in range(len(in_shape))
                         if in_shape[a] == out_shape[dims[a]]})
    return tuple(
        collapse_in_place(f, dims[f.axis], out_shape[dims[f.axis]])
        if f.axis is not None and f.exclusive and in_shape[f.axis] == 1
        and out_shape[dims[f.axis]] > 1 else g
        for f, g in zip(info, kept, strict=True)
    )


def _contracted_against_constant(
    f: AxisField, d: int, free_out: Sequence[int], notes: list[str], where: str
) -> AxisField:
    """Field of a spatial axis that a dot_general sums over against a constant or a parameter
    (`jax.image.resize`'s interpolation matrix, a dense layer over space): each output along the
    other operand's free axis may depend on every position, so it gets the whole field, jump 0
    (located when that free axis is a single one)."""
    if len(free_out) == 1:
        notes.append(f"{where}: spatial axis {d} is contracted against a constant or parameter "
                     "(e.g. a resize's interpolation matrix); every position along that "
                     f"operand's free axis (result axis {free_out[0]}) is given the union of the "
                     "fields over all positions (jump 0)")
        return collapse_in_place(f, free_out[0], 0)
    notes.append(f"{where}: spatial axis {d} is contracted against a constant or parameter with "
                 "several free axes; every output position is given the union of the fields "
                 "over all positions (jump 0)")
    return dataclasses.replace(collapse(f), jump=0.0)
