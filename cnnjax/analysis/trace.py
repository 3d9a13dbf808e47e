"""Traces a Flax model to a flat list of primitive equations attributed to module calls.

`summary` builds its per-layer table from this: every primitive of `model.apply` (including the
ones written as plain functions, e.g. `nn.max_pool`, `jnp.pad`, a reshape) with the chain of Flax
module calls and jitted functions it ran under, and its cost. Module calls are marked with
`nn.intercept_methods`, which wraps each method call in a `jax.named_scope` carrying a unique
token; the token ends up in every equation's `source_info.name_stack`, so shared modules called
twice stay distinguishable. Sub-jaxprs (`jit`, `custom_jvp_call`, `custom_vjp_call`, `checkpoint`,
`closed_call`) are inlined.

Cost conventions (those of XLA's HloCostAnalysis, so totals agree with its count of the module
before optimisation, `jax.jit(f).lower(...).cost_analysis()["flops"]`, to a few 1e-6 on the
registered models in float32 at their native sizes, the rounding of XLA's float32 sum of its per-op
counts (densenet121: +3.1e-6 at 224x224, exact at 32x32); the compiled module's count,
`.compile().cost_analysis()`, can differ by about 1% where XLA's fusion duplicates or folds
elementwise work, e.g. -1.3% on resnet20_cifar on XLA:CPU). Two departures from XLA's count: dtype
casts (`convert_element_type`) cost 0 where XLA charges 1 per element, so a bfloat16 model's total
equals its float32 one and is 2-60% below XLA's; and adaptive pooling whose bins do not tile the
map (`jnp.take` gathers, e.g. AlexNet's 6x6 pool of a 13x13 map at 63x63 inputs) matches neither
XLA figure (XLA's lowering of the gather adds bounds arithmetic), a few 1e-5 of a model's total.
A strided `ConvTranspose2D` is traced in its canonical input-dilated form; on the CPU it runs as
one convolution per output phase plus the adds interleaving them, so compare its figures with
XLA's count of a program traced under `cnnjax.layers.conv_impl.xla_convolutions()`:
- `macs`: dense multiply-accumulates of convolutions and dot products, the figure papers quote:
  `N * prod(out_spatial) * C_out * C_in/groups * prod(kernel)`, taps over padding included.
  Along an axis with input dilation > 1 (a transposed convolution) only the taps on real input
  elements count, not those on the inserted zeros: each input element meets every kernel tap
  once, `N * prod(in_spatial) * prod(kernel) * C_in/groups * C_out` for a stride-1 window, the
  standard count (fvcore's, `torch.utils.flop_counter`'s) and exactly the MACs of the forward
  convolution it transposes. (Counting the dilated input densely would charge a 32x bilinear
  upsampling 32*32 times too much.) A transposed convolution with stride 1 inserts no zeros and
  is lowered as an ordinary convolution with full padding; inside a transposed-convolution
  module (`Call.transposed`) it is counted the same way, per input element, so its MACs do not
  depend on the stride (DCGAN's 1x1x100 -> 4x4x512 layer: 0.82 M, not 13.1 M over the padding).
  Patch extraction (`lax.conv_general_dilated_patches`, as in `LocallyConnected2D`) is an
  exact gather written as a convolution with a constant one-hot kernel: it has 0 MACs (see
  `is_patch_extraction`); its FLOPs stay, as XLA counts them.
- `flops`: 2 per multiply-add that touches real data (taps that fall on zero padding or on the
  zeros inserted by input dilation are not counted), plus 1 per element for elementwise
  arithmetic (bias add, ReLU, BatchNorm arithmetic), `window - 1` per pooled output and
  `in - out` per reduction. Transcendental functions (exp, rsqrt, tanh, pow...) are excluded, as
  XLA reports them separately; data movement (pad, reshape, concatenate, slice) costs 0.
  So `flops` and `2 * macs` differ by the taps on padding (and, for transposed convolutions,
  the taps scattered outside the cropped output), beside the non-MAC arithmetic.
- `static`: every input of the equation is a constant (index arithmetic, a fixed kernel built
  in the model); XLA computes these at compile time, so `summary` does not count their FLOPs.
  The PRNG keys are traced arguments, as in a train step, so work on random bits (Dropout's
  conversion to uniform floats and its mask) counts; generating the bits (`random_bits`:
  threefry's integer hash rounds, or XLA's RngBitGenerator) counts 0, where XLA's figure
  depends on the PRNG implementation.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import InvalidRngError, ModifyScopeVariableError

from cnnjax.analysis.receptive_field import CUMULATIVE, ELEMENTWISE, REDUCTIONS, WINDOW_REDUCTIONS
from cnnjax.layers.conv import ConvTranspose2D
from cnnjax.layers.conv_impl import xla_convolutions
from cnnjax.utils.validation import invalid

_TOKEN = "cnnjax_call"
_TOKEN_RE = re.compile(_TOKEN + r"(\d+)")
INLINED = frozenset(
    [
        "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
        "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "named_call",
    ]
)
FUNCTION_CALLS = frozenset({"jit", "pjit"})  # inlined calls that may form a row of their own
TRANSCENDENTAL = frozenset(
    [
        "exp", "exp2", "expm1", "log", "log1p", "tanh", "sin", "cos", "tan", "asin", "acos", "atan",
        "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "pow", "erf",
        "erfc", "erf_inv", "lgamma", "digamma"
    ]
)
# Modules whose convolution is a transposed one even at stride 1, where nothing in the lowered
# convolution (no input dilation) tells it from an ordinary one with full padding.
_TRANSPOSED_MODULES = (nn.ConvTranspose, ConvTranspose2D)
CONTROL_FLOW = frozenset({"scan", "cond", "while"})
FREE = frozenset(
    ["convert_element_type", "copy", "copy_p", "reduce_precision", "real", "imag", "stop_gradient"]
)


@dataclasses.dataclass(frozen=True)
class Call:
    """One Flax module method call (or a jitted function) seen during the trace."""

    index: int
    path: tuple[str, ...] | None  # module path; None for a jitted function
    type_name: str  # module class name or function name
    method: str
    transposed: bool = False  # a transposed-convolution module (see _TRANSPOSED_MODULES)


@dataclasses.dataclass
class FlatEqn:
    """A primitive equation with inlined operands, its call chain and its cost."""

    index: int
    prim: str
    params: dict[str, Any]
    inputs: list[int]
    outputs: list[int]
    calls: tuple[int, ...]  # outermost first
    flops: int
    macs: int
    patches: bool = False  # a patch-extraction convolution (a gather; see is_patch_extraction)
    static: bool = False  # every input is a constant: XLA folds it at compile time


@dataclasses.dataclass
class Trace:
    """Everything `summary` needs to know about one forward pass."""

    eqns: list[FlatEqn]
    avals: dict[int, Any]  # value id -> ShapedArray
    input_id: int
    output_ids: list[int]
    param_leaves: dict[int, tuple[str, int]]  # value id -> (param path, size)
    calls: list[Call]
    total_params: int


def _size(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _valid_taps(n: int, k: int, s: int, lo: int, d: int, lhs_d: int, m: int) -> int:
    """Pairs (output, tap) along one axis whose tap lands on a real input element: input size n,
    kernel k, stride s, left padding lo, kernel dilation d, input dilation lhs_d, output size m."""
    o = np.arange(m)[:, None]
    t = np.arange(k)[None, :]
    p = o * s + t * d - lo
    return int(np.count_nonzero((p >= 0) & (p <= (n - 1) * lhs_d) & (p % lhs_d == 0)))


def _macs_taps(n: int, k: int, s: int, lo: int, d: int, lhs_d: int, m: int,
               transposed: bool = False) -> int:
    """MAC-counted (output, tap) pairs along one axis (arguments as `_valid_taps`): all `m * k`
    for an ordinary convolution; with input dilation, or in a `transposed` convolution module,
    each real input element `i` times the taps `t` that reach it from some output position,
    `(i * lhs_d + lo - t * d) % s == 0` (all `k` for stride 1), so neither the inserted zeros nor
    the transposed convolution's implicit full padding count."""
    if lhs_d == 1 and not transposed:
        return m * k
    q = np.arange(n)[:, None] * lhs_d + lo - np.arange(k)[None, :] * d
    return int(np.count_nonzero(q % s == 0))


def _integer_pow_muls(y: int) -> int:
    y = abs(y)
    if y <= 1:
        return 0
    return y.bit_length() - 1 + bin(y).count("1") - 1


def is_patch_extraction(
    prim: str, params: dict[str, Any], in_avals: list[Any], static_kernel: bool,
    kernel_value: np.ndarray | None = None,
) -> bool:
    """Whether a convolution is `lax.conv_general_dilated_patches`' gather: its kernel is a
    constant (computed from no parameter or activation) and it maps each of the C_in input
    channels, as its own group, to prod(kernel) outputs, one per window tap. When the constant's
    `kernel_value` is known it must also select one input per output (a 0/1 kernel with one 1
    per output channel), so a fixed filter bank of that shape (a Haar transform) is not one."""
    if prim != "conv_general_dilated" or not static_kernel:
        return False
    lhs, rhs = (tuple(a.shape) for a in in_avals[:2])
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    channels = lhs[lhs_spec[1]]
    taps = _size([rhs[a] for a in rhs_spec[2:]])
    if not (params["batch_group_count"] == 1 and params["feature_group_count"] == channels
            and rhs[rhs_spec[1]] == 1 and rhs[rhs_spec[0]] == channels * taps):
        return False
    if kernel_value is None:
        return True
    per_output = np.moveaxis(np.asarray(kernel_value), rhs_spec[0], 0).reshape(rhs[rhs_spec[0]], -1)
    return bool(np.all((per_output == 0) | (per_output == 1))
                and np.all(per_output.sum(axis=1) == 1))


def eqn_cost(
    prim: str, params: dict[str, Any], in_avals: list[Any], out_avals: list[Any],
    *, static_kernel: bool = False, patches: bool | None = None, transposed: bool = False,
) -> tuple[int, int]:
    """(flops, macs) of one primitive under the conventions in the module docstring;
    `static_kernel`: the second operand is a constant (for `is_patch_extraction`); `patches`:
    that function's answer, when already known (with the constant's value);
    `transposed`: a convolution inside a transposed-convolution module (MACs per input element)."""
    out_size = _size(out_avals[0].shape) if out_avals else 0
    if prim == "conv_general_dilated":
        lhs, rhs, out = (tuple(a.shape) for a in (in_avals[0], in_avals[1], out_avals[0]))
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        per_tap = out[out_spec[1]] * lhs[lhs_spec[1]] // params["feature_group_count"]
        batch = out[out_spec[0]]
        kernel = [rhs[a] for a in rhs_spec[2:]]
        taps = mac_taps = 1
        for i, k in enumerate(kernel):
            axis = (
                lhs[lhs_spec[2 + i]], k, params["window_strides"][i], params["padding"][i][0],
                params["rhs_dilation"][i], params["lhs_dilation"][i], out[out_spec[2 + i]],
            )
            taps *= _valid_taps(*axis)
            mac_taps *= _macs_taps(*axis, transposed=transposed)
        if patches is None:
            patches = is_patch_extraction(prim, params, in_avals, static_kernel)
        return 2 * batch * per_tap * taps, 0 if patches else batch * per_tap * mac_taps
    if prim == "dot_general":
        (lc, _), _ = params["dimension_numbers"]
        contract = _size([in_avals[0].shape[a] for a in lc])
        return 2 * out_size * contract, out_size * contract
    if prim in FREE:
        return 0, 0
    if prim == "integer_pow":
        return out_size * (_integer_pow_muls(params["y"]) + (params["y"] < 0)), 0
    if prim == "logistic":
        return 3 * out_size, 0
    if prim in TRANSCENDENTAL:
        return 0, 0
    if prim in ELEMENTWISE:
        return out_size, 0
    if prim in WINDOW_REDUCTIONS:
        return out_size * (_size(params["window_dimensions"]) - 1), 0
    if prim in REDUCTIONS:
        return _size(in_avals[0].shape) - out_size, 0
    if prim in CUMULATIVE:
        return out_size, 0
    if prim in CONTROL_FLOW:
        return _control_flow_cost(prim, params)
    return 0, 0


def _jaxpr_cost(jaxpr: Any) -> tuple[int, int]:
    """Total (flops, macs) of a (closed) jaxpr, recursing into calls."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    flops = macs = 0
    static = set(jaxpr.constvars)
    for eqn in jaxpr.eqns:
        sub = _Flattener._sub_jaxpr(eqn)
        if sub is not None:
            f, m = _jaxpr_cost(sub[0])
        else:
            kernel = eqn.invars[1] if len(eqn.invars) > 1 else None
            f, m = eqn_cost(eqn.primitive.name, eqn.params, [v.aval for v in eqn.invars],
                            [v.aval for v in eqn.outvars],
                            static_kernel=kernel is not None and _is_static(kernel, static))
        if all(_is_static(v, static) for v in eqn.invars):
            static.update(eqn.outvars)
        flops, macs = flops + f, macs + m
    return flops, macs


def _control_flow_cost(prim: str, params: dict[str, Any]) -> tuple[int, int]:
    """`scan`: body x length; `cond`: the costliest branch; `while`: one body iteration and one
    test of its condition (the trip count is not static), as XLA's cost analysis counts it."""
    if prim == "scan":
        f, m = _jaxpr_cost(params["jaxpr"])
        return f * params["length"], m * params["length"]
    if prim == "cond":
        return max((_jaxpr_cost(b) for b in params["branches"]), default=(0, 0))
    f, m = _jaxpr_cost(params["body_jaxpr"])
    c, _ = _jaxpr_cost(params["cond_jaxpr"])
    return f + c, m


def _call_ids(eqn: Any) -> tuple[int, ...]:
    return tuple(int(m) for m in _TOKEN_RE.findall(str(eqn.source_info.name_stack)))


# Constants up to this many elements are evaluated while flattening (patch kernels are tiny).
_MAX_STATIC_SIZE = 1 << 16


def declares_keyword(model: nn.Module, name: str) -> bool:
    """Whether `model.__call__` declares a parameter `name` that a keyword can set. A bare
    `**kwargs` does not count: `nn.Sequential` hands it on to its first layer."""
    try:
        param = inspect.signature(model.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def eval_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """`{'train': False}` for a model whose `__call__` declares `train` (eval mode), else `{}`."""
    return {"train": False} if declares_keyword(model, "train") else {}


#: Flax's errors for an eval-mode call that still updates state or draws random numbers.
NONDETERMINISTIC_CALL_ERRORS = (ModifyScopeVariableError, InvalidRngError)


def nondeterministic_call(owner: str, model: nn.Module, err: Exception) -> ValueError:
    """The ValueError for a `model` whose eval call (`eval_call_kwargs`) raised one of
    `NONDETERMINISTIC_CALL_ERRORS`: the analysis needs a deterministic forward pass."""
    call = "train=False" if eval_call_kwargs(model) else "no `train` argument"
    return invalid(owner, "model", type(model).__name__,
                   f"called with {call} it still updates state or draws random numbers "
                   f"({type(err).__name__}: {str(err).split(' (https://')[0]}); expected a "
                   "deterministic call: a `train` parameter of __call__ that turns BatchNorm's "
                   "running averages and Dropout's determinism on, or a model built in eval mode")


def is_literal(v: Any) -> bool:
    """Whether a jaxpr operand is a literal (its value is `v.val`), not a variable."""
    return type(v).__name__ == "Literal"


def _is_static(v: Any, static: set[Any]) -> bool:
    """A literal or a value computed from constants only (never an activation or parameter)."""
    return is_literal(v) or v in static


class _Flattener:
    """Inlines sub-jaxprs into one list of equations over integer value ids."""

    def __init__(self, calls: list[Call]):
        self.eqns: list[FlatEqn] = []
        self.avals: dict[int, Any] = {}
        self.calls = calls
        self.static: set[int] = set()  # ids computed from constants only (see _is_static)
        self.values: dict[int, np.ndarray] = {}  # the small static ones' values, where known

    def new(self, aval: Any) -> int:
        i = len(self.avals)
        self.avals[i] = aval
        return i

    def walk(
        self, jaxpr: Any, consts: Sequence[Any], in_ids: Sequence[int], path: tuple[int, ...]
    ) -> list[int]:
        env: dict[Any, int] = {}
        for k, v in enumerate(jaxpr.constvars):  # constants are never activations
            env[v] = self.new(v.aval)
            self.static.add(env[v])
            if k < len(consts):  # an open sub-jaxpr carries no values: only shapes then
                self._remember(env[v], consts[k])
        for v, i in zip(jaxpr.invars, in_ids, strict=True):
            env[v] = i

        def read(v: Any) -> int:
            if not is_literal(v):
                return env[v]
            i = self.new(v.aval)
            self.static.add(i)
            self._remember(i, v.val)
            return i

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            epath = path + _call_ids(eqn)
            sub = self._sub_jaxpr(eqn)
            if sub is not None:
                inner, inner_consts = sub
                if eqn.primitive.name in FUNCTION_CALLS:
                    idx = len(self.calls)
                    self.calls.append(Call(idx, None, str(eqn.params.get("name", "jit")), "jit"))
                    epath = epath + (idx,)
                outs = self.walk(inner, inner_consts, ins, epath)
            else:
                outs = [self.new(v.aval) for v in eqn.outvars]
                static = all(i in self.static for i in ins)
                if static:
                    self.static.update(outs)
                    self._evaluate(eqn, ins, outs)
                self.eqns.append(self._flat_eqn(eqn, ins, outs, epath, static))
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _remember(self, i: int, value: Any) -> None:
        try:
            if math.prod(np.shape(value)) <= _MAX_STATIC_SIZE:
                self.values[i] = np.asarray(value)
        except TypeError:  # e.g. a PRNG key array: not a plain number array, not a kernel
            pass

    def _evaluate(self, eqn: Any, ins: list[int], outs: list[int]) -> None:
        """Computes a small constant-only equation (e.g. the one-hot kernel of
        `conv_general_dilated_patches`) so `is_patch_extraction` can look at its value."""
        if not all(i in self.values for i in ins) or any(
                math.prod(getattr(v.aval, "shape", ())) > _MAX_STATIC_SIZE for v in eqn.outvars):
            return
        try:
            result = eqn.primitive.bind(*(self.values[i] for i in ins), **eqn.params)
        except Exception:  # noqa: BLE001 — not evaluable eagerly: shapes alone decide
            return
        results = result if eqn.primitive.multiple_results else [result]
        for o, r in zip(outs, results, strict=True):
            self._remember(o, r)

    def _flat_eqn(self, eqn: Any, ins: list[int], outs: list[int],
                  path: tuple[int, ...], static: bool) -> FlatEqn:
        """The flat record of one primitive equation, with its cost (`static`: all inputs are
        constants)."""
        prim, in_avals = eqn.primitive.name, [self.avals[i] for i in ins]
        static_kernel = len(ins) > 1 and ins[1] in self.static
        kernel_value = self.values.get(ins[1]) if static_kernel else None
        patches = is_patch_extraction(prim, eqn.params, in_avals, static_kernel, kernel_value)
        module = next((self.calls[c] for c in reversed(path) if self.calls[c].path is not None),
                      None)
        flops, macs = eqn_cost(prim, eqn.params, in_avals, [v.aval for v in eqn.outvars],
                               patches=patches, transposed=module is not None and module.transposed)
        return FlatEqn(len(self.eqns), prim, dict(eqn.params), ins, outs, path, int(flops),
                       int(macs), patches, static)

    @staticmethod
    def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
        if eqn.primitive.name not in INLINED:
            return None
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            j = eqn.params.get(key)
            if j is None:
                continue
            inner = getattr(j, "jaxpr", j)
            if (
                hasattr(inner, "eqns")
                and len(inner.invars) == len(eqn.invars)
                and len(inner.outvars) == len(eqn.outvars)
            ):
                return inner, getattr(j, "consts", ())
        return None


def is_prng_key(value: Any) -> bool:
    """Whether `value` is one PRNG key as flax's `apply(rngs=...)` takes it: a typed key or a
    raw uint32 key of shape (2,)."""
    return isinstance(value, jax.Array | np.ndarray) and (
        jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        or (value.dtype == np.uint32 and value.shape == (2,)))


def _init_shapes(model: nn.Module, x: Any, rngs: dict[str, Any],
                 call_kwargs: dict[str, Any]) -> Any:
    """The variables' shapes, from an abstract `model.init` watched by the input-size check's
    interceptor, so a failure names its layer rather than surfacing from deep inside Flax/lax."""
    from cnnjax.train.checks import LayerWatcher

    with nn.intercept_methods(LayerWatcher()):
        return jax.eval_shape(lambda x: model.init(rngs, x, **call_kwargs), x)


def _streams(user_rngs: Any) -> set[str]:
    """The PRNG streams a trace feeds: 'params', 'dropout' and those of the caller's `rngs` (a
    dict by stream, or one key, which flax's apply reads as {'params': key})."""
    return {"params", "dropout", *(user_rngs if isinstance(user_rngs, dict) else ())}


def init_shapes(model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1,
                dtype: Any = jnp.float32, **call_kwargs: Any) -> Any:
    """The variables' shapes of an abstract `model.init` on `[batch_size, *input_shape]`, as
    `trace_model` makes them (raising its `LayerCallError`): a re-trace at another input tells
    a size problem from another one."""
    streams = _streams(call_kwargs.pop("rngs", None))
    x = jax.ShapeDtypeStruct((batch_size, *input_shape), dtype)
    return _init_shapes(model, x, dict.fromkeys(streams, jax.random.key(0)), call_kwargs)


def trace_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    dtype: Any = jnp.float32,
    **call_kwargs: Any,
) -> Trace:
    """Traces `model.apply` on an abstract `[batch_size, *input_shape]` input (nothing is computed;
    parameters are only shape-evaluated). An enclosing `conv_impl` block is suspended
    (`xla_convolutions`): the trace describes the network's convolutions, not their lowering.
    Raises `cnnjax.train.checks.LayerCallError` naming the layer where `model.init` fails on
    this input."""
    x = jax.ShapeDtypeStruct((batch_size, *input_shape), dtype)
    streams = _streams(call_kwargs.pop("rngs", None))

    def rngs() -> dict[str, Any]:
        key = jax.random.key(0)
        return {name: key for name in streams}

    variables = _init_shapes(model, x, rngs(), call_kwargs)
    mutable = [c for c in variables if c != "params"]
    calls: list[Call] = []

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        module = context.module
        path = tuple(module.scope.path) if module.scope is not None else ()
        idx = len(calls)
        calls.append(Call(idx, path, type(module).__name__, context.method_name,
                          isinstance(module, _TRANSPOSED_MODULES)))
        with jax.named_scope(f"{_TOKEN}{idx}"):
            return next_fun(*args, **kwargs)

    # The keys are arguments, as in a train step: made inside, Dropout's random bits would be
    # constant work that XLA folds, and summary would charge them nothing.
    keys = {k: v for k, v in rngs().items() if k != "params"}

    def forward(variables: Any, keys: dict[str, Any], x: Any) -> Any:
        with nn.intercept_methods(interceptor):
            out = model.apply(variables, x, rngs=keys, mutable=mutable or False, **call_kwargs)
        return out  # with the updated state, when mutable: its updates are live work too

    with xla_convolutions():
        closed, out_shapes = jax.make_jaxpr(forward, return_shape=True)(variables, keys, x)
    n_outputs = len(jax.tree_util.tree_leaves(out_shapes[0] if mutable else out_shapes))
    flat = _Flattener(calls)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    in_ids = [flat.new(v.aval) for v in closed.jaxpr.invars]
    param_leaves, total = {}, 0
    for vid, (keypath, leaf) in zip(in_ids, leaves, strict=False):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath]
        if keys and keys[0] == "params":
            param_leaves[vid] = ("/".join(keys[1:]), _size(leaf.shape))
            total += _size(leaf.shape)
    outputs = flat.walk(closed.jaxpr, closed.consts, in_ids, ())
    eqns = _live_eqns(flat.eqns, outputs)
    return Trace(eqns, flat.avals, in_ids[-1], outputs[:n_outputs], param_leaves, calls, total)


def _live_eqns(eqns: list[FlatEqn], live_ids: Sequence[int]) -> list[FlatEqn]:
    """The equations that `live_ids` (the outputs and state updates) depend on, renumbered: work
    whose result is discarded (GoogLeNet's auxiliary heads in eval mode) is dead code that XLA
    removes and that `summary` must not charge."""
    live, kept = set(live_ids), []
    for e in reversed(eqns):
        if any(o in live for o in e.outputs):
            kept.append(e)
            live.update(e.inputs)
    return [dataclasses.replace(e, index=i) for i, e in enumerate(reversed(kept))]
