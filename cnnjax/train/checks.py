"""Pre-compilation checks that need the model: is the input resolution large enough, and are its
outputs the task's logits over the dataset's classes (`logits_problem`, from the same trace)?

`check_input_size` traces `model.init` abstractly (`jax.eval_shape`: shapes only, no compilation,
no FLOPs) while watching every submodule call; the first layer whose output has an empty spatial
dimension, or that fails on the shape it receives, is named in the error. The layers' own checks
(window arithmetic as in `cnnjax.analysis.conv_output_size`) supply the detail; when the failing
op is a function inside a module (e.g. `max_pool2d` in a model's `__call__`), the layer whose
output it received is named too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.utils.validation import invalid


class LayerCallError(Exception):
    """Raised by `LayerWatcher`: the innermost layer whose call failed (or whose output has an
    empty spatial axis) and what went wrong there; the message reads "layer L fails (detail)"."""

    def __init__(self, layer: str, detail: str):
        super().__init__(f"layer {layer} fails ({detail})")
        self.layer = layer
        self.detail = detail


def _layer_name(module: nn.Module) -> str:
    path = getattr(module, "path", None) or getattr(getattr(module, "scope", None), "path", ())
    return "/".join(str(p) for p in path) or type(module).__name__


def _empty_spatial(tree: Any) -> tuple | None:
    for leaf in jax.tree.leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) >= 3 and any(d <= 0 for d in shape[1:-1]):
            return tuple(shape)
    return None


def _is_flax_layer(module: nn.Module) -> bool:
    """A flax layer (Dense, Conv, BatchNorm, ...) or a subclass of one (cnnjax's BatchNorm),
    not a model or block built on `nn.Module` alone."""
    return any(cls.__module__.startswith("flax.linen") and cls.__module__ != nn.Module.__module__
               for cls in type(module).__mro__)


def _empty_input(module: nn.Module, args: tuple) -> tuple | None:
    """The shape of a flax layer's (Dense, Conv, ...) input that holds examples but no
    features (a 0 in a non-batch axis: pooling or flattening an already 1x1 map), else None."""
    if not _is_flax_layer(module) or not args:
        return None
    shape = getattr(args[0], "shape", None)
    if shape is not None and len(shape) >= 2 and shape[0] > 0 and 0 in shape[1:]:
        return tuple(shape)
    return None


class LayerWatcher:
    """Flax method interceptor (`nn.intercept_methods`): names the layer where the input gets too
    small or a call fails, as `LayerCallError`; the input-size check and `analysis.summary` use it.

    Errors raised inside a submodule are attributed to the innermost module, with the shape of
    the input it was called on. When the failing code runs after a submodule of the failing
    module completed (a pooling function such as `max_pool2d` called inside a model's own
    `__call__`), the message names that last layer and its output shape instead, i.e. what the
    failing operation received.
    """

    def __init__(self):
        self.last: tuple[str, tuple] | None = None  # (layer, output shape) of the newest call

    def __call__(self, next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                 context: Any) -> Any:
        """Runs one intercepted module method (`context`: flax's `InterceptorContext`), raising
        `LayerCallError` for an input with no features, a failing call or an empty output."""
        kind = type(context.module).__name__
        if context.method_name != "__call__":  # a helper method, e.g. a model's pooling stage
            kind += f".{context.method_name}"
        name = f"{_layer_name(context.module)} ({kind})"
        empty = _empty_input(context.module, args)
        if empty is not None:  # jax 0.10 fails inside such a layer, jax 0.11 runs it on nothing
            detail = f"its input has shape {empty}, no features"
            if self.last is not None and self.last[0] != name:
                detail += f"; the input came from layer {self.last[0]}, shape {self.last[1]}"
            raise LayerCallError(name, detail)
        before = self.last
        try:
            out = next_fun(*args, **kwargs)
        except LayerCallError:
            raise
        except Exception as err:  # noqa: BLE001 — a shape error inside this layer
            lines = str(err).splitlines()
            detail = f"{type(err).__name__}: {lines[0] if lines else ''}"
            shape = getattr(args[0], "shape", None) if args else None
            if self.last is not before and self.last is not None:  # a submodule of it ran
                detail = (f"{detail.removesuffix('.')}; the input it got came from layer "
                          f"{self.last[0]}, shape {self.last[1]}")
            elif shape is not None:  # its own code failed on what it was called with
                detail = f"{detail.removesuffix('.')}; its input has shape {tuple(shape)}"
            raise LayerCallError(name, detail) from err
        shape = _empty_spatial(out)
        if shape is not None:
            raise LayerCallError(name, f"its output shape would be {shape}")
        leaves = [x for x in jax.tree.leaves(out) if getattr(x, "ndim", 0) >= 3]
        if leaves:
            self.last = (name, tuple(leaves[0].shape))
        return out


def check_input_size(
    model: nn.Module,
    model_name: str,
    input_shape: tuple[int, int, int],
    min_input_size: int | None = None,
) -> Any:
    """Raises a ValueError naming the layer if `model` cannot run on `input_shape` (H, W, C);
    returns the abstract outputs (`jax.ShapeDtypeStruct` leaves) of its eval-mode call on one
    such image, for `logits_problem` to check without a second trace.

    `min_input_size` (from the model registry) is checked first; then the abstract trace finds the
    layer where the spatial size collapses. A layer that fails on a much larger input too is
    reported as a settings problem (e.g. `groups` that do not divide its channels), not a size one;
    a model whose `__call__` does not take the engine's `train` keyword, as such.
    """
    height, width = input_shape[0], input_shape[1]
    if min_input_size is not None and min(height, width) < min_input_size:
        raise invalid(
            model_name,
            "input resolution",
            f"{height}x{width}",
            f"the model needs inputs of at least {min_input_size}x{min_input_size}",
        )
    err, outputs = _trace(model, input_shape)
    if err is None:
        return outputs
    _check_call_signature(model, model_name, err)
    if isinstance(err.__cause__, MemoryError):  # the size, but the other way: far too large
        raise invalid(
            model_name, "input resolution", f"{height}x{width}",
            f"too large: layer {err.layer} runs out of memory building it ({err.detail}); use a "
            "smaller data.image_size") from None
    larger = larger_input(input_shape, 2)
    if _trace_failure(model, larger) is not None:  # not the size: the model's own settings
        cause = err.__cause__
        raise ValueError(
            f"{model_name}: layer {err.layer} fails on a {height}x{width} input and on a "
            f"{larger[0]}x{larger[1]} one alike, so not for the input size; check the model's "
            f"settings (config.model_kwargs): {type(cause).__name__}: {cause}"
        ) from None
    field = _own_setting(model, err.__cause__)
    remedy = (f"change config.model_kwargs.{field}" if field is not None
              else "a model meant for small images")
    raise invalid(
        model_name,
        "input resolution",
        f"{height}x{width}",
        f"too small: layer {err.layer} fails ({err.detail}); use a larger "
        f"data.image_size or {remedy}",
    ) from None


def _own_setting(model: nn.Module, cause: BaseException | None) -> str | None:
    """The field of `model` that `cause` (the failing layer's error) names as invalid, if it is
    one of the model's own settings: a limit that depends on the image (Faster R-CNN's
    `rpn_min_size` above its side), so changing it fixes the run as well as a larger image."""
    if not isinstance(cause, ValueError):
        return None
    match = re.match(r"(\w+): (\w+)=", str(cause))
    if match is None or match.group(1) != type(model).__name__:
        return None
    fields = {f.name for f in dataclasses.fields(model)}
    return match.group(2) if match.group(2) in fields else None


#: The side of the input a failure is re-traced at to tell a size problem from another one.
_LARGE_INPUT = 512


def larger_input(input_shape: tuple[int, ...], spatial: int) -> tuple[int, ...]:
    """`input_shape` with its first `spatial` axes at least 4x and `_LARGE_INPUT` long: the input
    a failure is re-traced at, where a size problem goes away and any other one stays."""
    return (*(max(4 * d, _LARGE_INPUT) for d in input_shape[:spatial]), *input_shape[spatial:])


def _trace_failure(model: nn.Module, input_shape: tuple[int, ...]) -> LayerCallError | None:
    """The first layer failure of an abstract `model.init` on one `input_shape` image, if any."""
    return _trace(model, input_shape)[0]


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[LayerCallError | None, Any]:
    """`(failure, outputs)` of an abstract `model.init` on one `input_shape` image: the first
    layer failure and None, or None and the eval-mode call's outputs (abstract arrays)."""
    dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    try:
        with nn.intercept_methods(LayerWatcher()):
            outputs, _ = jax.eval_shape(
                lambda x: model.init_with_output(rngs, x, train=False), dummy)
    except LayerCallError as err:
        return err, None
    return None, outputs


#: The call signature docs/conventions.md ("Models") asks of every model; the engine calls it.
CALL_SIGNATURE = "__call__(self, x, train: bool = False, return_features: bool = False)"


def _check_call_signature(model: nn.Module, model_name: str, err: LayerCallError) -> None:
    """A ValueError if the model itself (not one of its layers) refused a keyword the engine
    passes to every model (`train`, `return_features`): the remedy is its `__call__`'s
    signature, not its settings."""
    cause = err.__cause__
    match = re.search(r"unexpected keyword argument '(train|return_features)'", str(cause))
    if (isinstance(cause, TypeError) and match is not None
            and f"{type(model).__name__}.__call__()" in str(cause)):
        raise ValueError(
            f"{model_name}: {type(model).__name__}.__call__ does not take the keyword "
            f"{match.group(1)!r}, which the engine passes to every model; give it the signature "
            f"{CALL_SIGNATURE} (docs/conventions.md, \"Models\"). {type(cause).__name__}: "
            f"{cause}") from None


def logits_problem(outputs: Any, task: str, input_shape: tuple[int, ...],
                   num_classes: int) -> str | None:
    """What is wrong with a model's eval-mode `outputs` on one `input_shape` image (as
    `check_input_size` returns them) for `task`'s loss, or None: a classifier must return logits
    `[N, num_classes]`, a dense predictor `[N, H, W, num_classes]` at the input's H, W (the
    per-pixel cross-entropy compares them with `[N, H, W]` label maps). Detectors train through
    their own `loss`/`detect` methods: not checked. Else the first train step failed naming the
    labels, or a model that ignored its `num_classes` trained silently on the wrong class count."""
    from cnnjax.train.losses import split_auxiliary

    expected = {"classification": (1, num_classes),
                "segmentation": (1, *input_shape[:2], num_classes)}.get(task)
    if expected is None:
        return None
    logits, _ = split_auxiliary(outputs)
    shape = getattr(logits, "shape", None)
    if shape is not None and tuple(shape) == expected:
        return None
    what = "logits [N, num_classes]" if task == "classification" else (
        "per-pixel logits [N, H, W, num_classes] at the input's H, W")
    got = (f"has shape {tuple(shape)}" if shape is not None else
           f"is not an array but {jax.tree.map(lambda leaf: tuple(leaf.shape), outputs)}")
    hint = ""
    if shape is not None and tuple(shape[:-1]) == expected[:-1]:  # only the class axis differs
        hint = ("; the model must size its final layer (the submodule `head`) by its "
                "`num_classes` field, which the engine sets, not by a fixed number")
    elif task == "classification" and shape is not None and len(shape) == 4:
        hint = "; a classifier must pool or flatten its spatial axes before the head"
    return (f"its output (eval mode, one {'x'.join(map(str, input_shape))} image) {got}, "
            f"where a {task} run needs {what} = {expected}{hint}")


def one_value_batch_norm(model: nn.Module, micro_batch: int, devices: int,
                         input_shape: tuple[int, ...]) -> str | None:
    """The BatchNorm layer (as its error names it) that a train step of `micro_batch` images
    per device and accumulation micro-batch on `devices` devices would give one value per
    channel, which `cnnjax.layers.BatchNorm` refuses in the first step (after the workdir is
    written); None if none would. Only one image on one device can: otherwise every synced
    statistic has at least two values. Traced abstractly, in train mode."""
    if micro_batch * devices > 1:
        return None
    from cnnjax.layers.batch_norm import OneValuePerChannelError

    dummy = jax.ShapeDtypeStruct((1, micro_batch, *input_shape), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}

    def train_forward(x: jax.Array) -> Any:
        variables = model.init(rngs, x, train=False)
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)

    try:  # the axis the engine binds (pmap/shard_map), as a one-device vmap
        jax.eval_shape(jax.vmap(train_forward, axis_name=getattr(model, "axis_name", None)),
                       dummy)
    except OneValuePerChannelError as err:
        return err.layer
    return None


def check_external_proposals(model: nn.Module, model_name: str, proposals: Any) -> None:
    """A ValueError if the data config asks for external proposals (`data.proposals`, a
    `cnnjax.data.proposals.ProposalSpec`) and the detector makes its own (an RPN, YOLO's grid),
    so they would be computed and silently ignored."""
    if proposals is not None and not getattr(model, "accepts_proposals", False):
        raise invalid("config", "data.proposals.method", proposals.method,
                      f"expected None for model {model_name!r}, which takes no external proposals "
                      "(an RPN makes its own; YOLO predicts boxes from its grid; external "
                      "proposals feed the R-CNN, SPP-net and Fast R-CNN models)")


def check_training_size(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """A detector's own static checks of its training images (`input_shape`, H, W, C), which
    its `loss` makes when traced, i.e. in the first train step: e.g. Faster R-CNN's anchors,
    none of which may fit inside the image (`FasterRCNN.check_training_size`). A detector
    without such checks has no `check_training_size` method."""
    check = getattr(model, "check_training_size", None)
    if check is not None:
        check(tuple(input_shape[:2]))
