"""Training-mode BatchNorm with its channel sums as matrix-vector products, and a context manager
routing `flax.linen.BatchNorm` through it.

XLA:CPU lowers a sum over (N, H, W) of an NHWC activation to a `reduce-window` loop that streams
memory at ~1 GB/s; the same sums as two matrix-vector products (`channel_sum`) run 10-35x faster
and are more accurate (two levels of partial sums). A BatchNorm's training forward needs two such
sums (mean and mean square) and its backward, through autodiff, several more: on a CIFAR-stem
ResNet-18 they took a quarter of XLA:CPU's train step (docs/performance.md).
`batch_norm_train` is BatchNorm's training forward with a hand-written backward (`custom_vjp`)
that needs exactly two channel sums; `batch_norm_impl("matmul")` applies it to every
`nn.BatchNorm` called in training mode inside the block, so existing models run unchanged (same
variables, same running-statistics update, cross-device sync by `axis_name`). Mathematically
the same function as flax's; op by op (or one layer jitted) float32 results differ by summation
order, which matters at large offsets: there flax's one-pass (fast) variance E[x^2] - E[x]^2
loses accuracy (e.g. 2.19 instead of 0 for a constant 999.9 channel) and this path, with its
two-level sums, is the more accurate one.

Accuracy in a whole model (docs/performance.md, "BatchNorm as matmuls: accuracy settled"): a
whole-model float32 gradient is occasionally 1-8% off float64 in its worst leaf, with either
lowering, when one ReLU input within ~1e-6 of zero takes the other sign in float32 (a kink
flip). Over 20 ResNet-20 states under cnnjax's CPU flags, this path's forward is 4.6x closer
to float64 than flax's and flips in 3 states against flax's 13; under XLA's default flags the
two are equal. Session 20 had made flax's the default after one such flip; "auto" is this path
on CPU again since session 21.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.layers.batch_norm import BatchNorm, MaskedBatchNorm, check_values_per_channel
from cnnjax.utils.validation import invalid

Array = Any

#: `batch_norm_impl` modes: "flax" (flax's own BatchNorm, i.e. no change), "matmul" (channel sums
#: as matrix-vector products with a hand-written backward) and "auto" (the engine's default:
#: "matmul" on CPU, "flax" on accelerators, whose reductions are fast).
BATCH_NORM_IMPLS = ("flax", "matmul", "auto")

AxisGroups = tuple[tuple[int, ...], ...] | None


def _sum_rows(matrix: Array) -> Array:
    """Column sums of a 2-D array as a float32-exact (HIGHEST precision) vector-matrix product."""
    ones = jnp.ones((matrix.shape[0],), matrix.dtype)
    return lax.dot_general(ones, matrix, (((0,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST)


def channel_sum(x: Array) -> Array:
    """Sum of `x` over every axis but the last, as two matrix-vector products.

    The M = size / C rows are summed in P blocks of Q (P the largest divisor of M up to sqrt(M);
    rows are zero-padded when M has no divisor near sqrt(M)), then the P partial sums are summed:
    each output is a sum of about sqrt(M) + sqrt(M) terms rather than M, so its rounding error is
    below XLA's own reduction's, and both products stream memory at matmul speed.
    """
    channels = x.shape[-1]
    rows = x.reshape(-1, channels)
    m = rows.shape[0]
    target = max(1, math.isqrt(m))
    blocks = next(p for p in range(target, 0, -1) if m % p == 0)
    if blocks < target // 2:  # e.g. a prime M: pad to `target` blocks instead of one long sum
        blocks = target
        rows = jnp.pad(rows, ((0, -m % blocks), (0, 0)))
    per_block = rows.shape[0] // blocks
    partial_sums = _sum_rows(rows.reshape(blocks, per_block * channels))
    return _sum_rows(partial_sums.reshape(per_block, channels))


def _mean(x: Array, axis_name: str | None, axis_index_groups: AxisGroups) -> Array:
    """Per-channel mean of `x` over every other axis and, with `axis_name`, every device."""
    mean = channel_sum(x) / (x.size // x.shape[-1])
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name, axis_index_groups=axis_index_groups)
    return mean


def _statistics(x: Array, axis_name: str | None, axis_index_groups: AxisGroups,
                fast_variance: bool) -> tuple[Array, Array]:
    """`(mean, variance)` per channel as flax computes them: E[x^2] - E[x]^2 clipped at 0 when
    `fast_variance` (one pass), else E[(x - E[x])^2] (two passes)."""
    mean = _mean(x, axis_name, axis_index_groups)
    if fast_variance:
        var = jnp.maximum(_mean(x * x, axis_name, axis_index_groups) - mean * mean, 0.0)
    else:
        var = _mean(jnp.square(x - mean), axis_name, axis_index_groups)
    return mean, var


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None = None, axis_index_groups: AxisGroups = None,
                     fast_variance: bool = True) -> tuple[Array, Array, Array]:
    """BatchNorm in training mode over the last axis of `x`: `(y, mean, var)` where
    `y = (x - mean) / sqrt(var + epsilon) * scale + bias` with the batch's statistics (synced
    over `axis_name`'s devices, or their `axis_index_groups`). `mean` and `var` are returned for
    the running averages and carry no gradient."""
    return _forward(x, scale, bias, epsilon, axis_name, axis_index_groups, fast_variance)[0]


def _forward(x: Array, scale: Array, bias: Array, epsilon: float, axis_name: str | None,
             axis_index_groups: AxisGroups, fast_variance: bool) -> tuple[tuple, tuple]:
    mean, var = _statistics(x, axis_name, axis_index_groups, fast_variance)
    inv_std = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv_std * scale) + bias
    return (y, mean, var), (x, mean, inv_std, scale)


def _backward(epsilon: float, axis_name: str | None, axis_index_groups: AxisGroups,
              fast_variance: bool, residuals: tuple, cotangents: tuple) -> tuple:
    """The standard (synced) BatchNorm backward with two channel sums:
    dx = scale / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over every device's
    batch, as the transpose of flax's `pmean`s gives; dscale and dbias are this device's sums
    (the train step averages parameter gradients over devices)."""
    del epsilon, fast_variance
    dy = cotangents[0]  # the statistics' cotangents are unused: running averages only
    x, mean, inv_std, scale = residuals
    x_hat = (x - mean) * inv_std
    dbias = channel_sum(dy)
    dscale = channel_sum(dy * x_hat)
    count = x.size // x.shape[-1]
    mean_dy, mean_dy_xhat = dbias / count, dscale / count
    if axis_name is not None:
        mean_dy, mean_dy_xhat = lax.pmean((mean_dy, mean_dy_xhat), axis_name,
                                          axis_index_groups=axis_index_groups)
    dx = (scale * inv_std) * (dy - mean_dy - x_hat * mean_dy_xhat)
    return dx, dscale, dbias


batch_norm_train.defvjp(_forward, _backward)


def batch_norm_function(impl: str) -> Callable[..., Array] | None:
    """The interceptor `impl` installs on `nn.BatchNorm` (None for "flax": no change)."""
    if impl not in BATCH_NORM_IMPLS:
        raise invalid("batch_norm_impl", "impl", impl,
                      f"expected one of {list(BATCH_NORM_IMPLS)}")
    return None if impl == "flax" else _matmul_batch_norm


def resolve_batch_norm_impl(impl: str, backend: str) -> str:
    """The implementation `impl` means on `backend`: "auto" is "matmul" on CPU, else "flax"."""
    batch_norm_function(impl)  # validates the name
    if impl != "auto":
        return impl
    return "matmul" if backend == "cpu" else "flax"


def _float32(*dtypes: Any) -> bool:
    return all(d is None or jnp.dtype(d) == jnp.float32 for d in dtypes)


def _varying_manual_axes(x: Array) -> frozenset:
    """The mesh axes `x` varies over inside a `jax.shard_map` that checks them (`check_vma`,
    its default); empty elsewhere (pmap, shard_map(check_vma=False), plain jit)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier: `aval.vma`
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma",
                                                                                  None)
    return frozenset(varying or ())


def _training_call(module: nn.BatchNorm, args: tuple, kwargs: dict) -> Array | None:
    """`module(*args, **kwargs)` through `batch_norm_train`, or None where that would not be
    the same computation (eval mode, initialization, a mask, other feature axes or dtypes) or
    could not be differentiated: inside a vma-checking shard_map, whose typing refuses the
    hand-written backward's per-device parameter sums (flax's autodiff sums them itself)."""
    if not args or set(kwargs) - {"use_running_average", "mask"} or len(args) > 2:
        return None
    x = args[0]
    use_running_average = nn.merge_param(
        "use_running_average", module.use_running_average,
        args[1] if len(args) > 1 else kwargs.get("use_running_average"))
    axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    if (use_running_average or module.is_initializing() or kwargs.get("mask") is not None
            or not hasattr(x, "ndim") or [a % x.ndim for a in axes] != [x.ndim - 1]
            or not _float32(x.dtype, module.dtype, module.param_dtype)
            or _varying_manual_axes(x)):
        return None
    if isinstance(module, BatchNorm):  # this path bypasses its __call__ and so its check
        check_values_per_channel(module, x, running=False)
    features = (x.shape[-1],)
    ra_mean = module.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = module.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = (module.param("scale", module.scale_init, features, module.param_dtype)
             if module.use_scale else jnp.ones(features, jnp.float32))
    bias = (module.param("bias", module.bias_init, features, module.param_dtype)
            if module.use_bias else jnp.zeros(features, jnp.float32))
    # custom_vjp's non-differentiable arguments must be hashable: lists become tuples.
    axis_name = module.axis_name
    axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    groups = module.axis_index_groups
    groups = None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)
    y, mean, var = batch_norm_train(x, scale, bias, float(module.epsilon), axis_name, groups,
                                    bool(module.use_fast_variance))
    momentum = module.momentum
    ra_mean.value = momentum * ra_mean.value + (1 - momentum) * lax.stop_gradient(mean)
    ra_var.value = momentum * ra_var.value + (1 - momentum) * lax.stop_gradient(var)
    return y


_MATMUL_CLASSES = (nn.BatchNorm, BatchNorm, MaskedBatchNorm)


def _matmul_batch_norm(next_fun: Callable, args: tuple, kwargs: dict,
                       context: nn.module.InterceptorContext) -> Any:
    module = context.module
    # Exactly these classes: a subclass may compute something else (BatchNorm and
    # MaskedBatchNorm's unmasked calls are nn.BatchNorm's; masked ones return None from
    # _training_call).
    if context.method_name != "__call__" or type(module) not in _MATMUL_CLASSES:
        return next_fun(*args, **kwargs)
    y = _training_call(module, args, kwargs)
    return next_fun(*args, **kwargs) if y is None else y


@contextlib.contextmanager
def batch_norm_impl(impl: str = "auto") -> Iterator[None]:
    """Within the block, every `nn.BatchNorm` (that class, cnnjax's `BatchNorm` or
    `MaskedBatchNorm`) called in training mode on float32 input with float32 parameters, feature
    axis last and no mask computes through `batch_norm_train` when `impl` is "matmul" ("auto":
    on CPU); other calls run flax's code (or MaskedBatchNorm's own, for a mask).

    Like `cnnjax.layers.conv_impl`, the choice is made when a function is traced, so wrap the
    tracing. Variables, their names, initialization and the running-average update are flax's.
    Reverse-mode derivatives (of any order) work; forward-mode ones (`jax.jvp`, `jax.jacfwd`)
    do not pass a `custom_vjp`, so trace those under "flax". So does a gradient through an
    `axis_name` bound by `jax.vmap` (a collective in a custom_vjp's backward finds the vmap axis
    unbound: a NameError); pmap's and shard_map's names work, and inside a shard_map that checks
    varying axes (`check_vma=True`, its default) flax's code runs (the engine's has it off).
    """
    impl = resolve_batch_norm_impl(impl, jax.default_backend())
    function = batch_norm_function(impl)
    if function is None:
        yield
        return
    with nn.intercept_methods(function):
        yield
