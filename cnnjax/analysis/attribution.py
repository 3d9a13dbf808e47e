"""What a trained classifier looks at: attribution maps, layer activations and first-layer filters.

Six classic answers to "which pixels does the class score rest on", each an `[N, H, W]` map at
input resolution:

- `saliency`: the largest absolute gradient of the class score over an input pixel's channels
  (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks", §3.1);
- `smoothgrad`: that map averaged over noisy copies of the image (Smilkov et al. 2017);
- `guided_backprop`: the gradient with each ReLU passing back only positive signal where its
  input was positive (Springenberg et al. 2015), or Zeiler & Fergus's deconvnet projection
  (`rule="deconvnet"`); the traced model is re-evaluated with its ReLUs swapped;
- `integrated_gradients`: the input minus a baseline times the gradient averaged along the path
  between them, which sums to the score difference (Sundararajan, Taly & Yan 2017);
- `occlusion`: how much the class probability drops when a grey square covers the pixel,
  averaged over every square position covering it (Zeiler & Fergus 2014, "Visualizing and
  Understanding Convolutional Networks", §4.2; the per-pixel average is Captum's `Occlusion`);
- `grad_cam`: the channels of a convolutional layer's activation weighted by the spatial mean of
  the class score's gradient, rectified and upsampled (Selvaraju et al. 2017, "Grad-CAM", §3).

Layers are named by their flax module path (`stage3_block3`, `features/conv5`); `module_outputs`
lists every module output with its shape (one abstract trace, nothing compiled); `count_relus`
counts the ReLUs guided backpropagation rewrites (0: its map is the plain gradient, saliency's).
`activations` returns those outputs (Zeiler & Fergus's feature maps), `first_layer_filters` and
`filter_grid` the first convolution's kernels as an image (Krizhevsky et al. 2012, Fig. 3),
`pointing_game` scores a map against object boxes (Zhang et al. 2018). Any flax classifier
taking `images` (and `train=False` if it accepts it) and returning `[N, classes]` logits works;
the gradient with respect to an inner layer is taken by adding a zero perturbation to that
module's output through `flax.linen.intercept_methods`, so no model needs changing.

    python -m experiments.visualize --workdir=workdirs/lenet5_digits
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.tracers import current_trace

from cnnjax.analysis.trace import (
    NONDETERMINISTIC_CALL_ERRORS,
    eval_call_kwargs,
    is_literal,
    nondeterministic_call,
)
from cnnjax.utils.files import save_figure
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_number,
    check_positive_int,
    invalid,
    widen_low_precision,
)

_OWNER = "attribution"
#: Largest finite float32: the bound of the values a check lets reach a float32 computation.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Attribution methods by name, in the order `plot_attributions` draws them.
METHODS = (
    "saliency", "smoothgrad", "guided_backprop", "integrated_gradients", "occlusion", "grad_cam",
)


class ModuleOutput(NamedTuple):
    """One module call of a model: its path (`''` for the model itself), class and output."""

    path: str
    kind: str
    shape: tuple[int, ...] | None  # None: the output is not one array (a tuple, a dict)
    calls: int  # how often the module ran in one forward pass (a shared module: more than 1)
    lifted: bool = False  # it runs inside a lifted transform (nn.remat, nn.scan, ...)


class GradCam(NamedTuple):
    """Grad-CAM maps of a batch: at the layer's resolution and upsampled to the input's."""

    layer: str
    maps: np.ndarray  # [N, h, w], ReLU(sum_k alpha_k A^k), float32
    upsampled: np.ndarray  # [N, H, W], bilinear
    targets: np.ndarray  # [N] the class each map explains
    logits: np.ndarray  # [N, classes]
    after_relu: bool = False  # A^k was the output of a ReLU applied to the layer's output


# ----------------------------------------------------------------------------- model calls
def _path(context: Any) -> str:
    return "/".join(str(p) for p in context.module.path)


def _outermost_calls(on_return: Callable[[str, Any, Any], Any]) -> Callable:
    """A method interceptor passing each module call's output through `on_return(path, module,
    output)`, except calls nested in a call of a module with the same path: a wrapper sharing its
    scope with its inner module (`Conv2D` over `nn.Conv`, `nn.share_scope`) counts once."""
    depth: dict[str, int] = {}

    def interceptor(next_fun: Callable, args: tuple, kw: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kw)
        name = _path(context)
        depth[name] = depth.get(name, 0) + 1
        try:
            out = next_fun(*args, **kw)
        finally:
            depth[name] -= 1
        return on_return(name, context.module, out) if depth[name] == 0 else out

    return interceptor


def _forward(model: nn.Module, layers: Sequence[str],
             perturb: str | None = None) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """`f(variables, images, delta=None) -> (logits, {layer: output})`: the model in eval mode,
    capturing the outputs of `layers` and adding `delta` to `perturb`'s output (so the gradient
    with respect to `delta` at zero is the gradient with respect to that activation)."""
    kwargs = eval_call_kwargs(model)
    wanted = set(layers) | ({perturb} if perturb is not None else set())

    def forward(variables: Any, images: Any, delta: Any = None) -> tuple[Any, dict[str, Any]]:
        captured: dict[str, Any] = {}

        def on_return(name: str, module: Any, out: Any) -> Any:
            if name not in wanted:
                return out
            if name == perturb and delta is not None:
                out = out + delta.astype(out.dtype)
            captured[name] = out
            return out

        with nn.intercept_methods(_outermost_calls(on_return)):
            logits = model.apply(variables, images, **kwargs)
        return logits, captured

    return forward


def module_outputs(model: nn.Module, variables: Any, input_shape: Sequence[int], *,
                   arg: str = "input_shape", value: Any = None) -> list[ModuleOutput]:
    """Every module of `model` with its output shape for a batch of one `input_shape` image, in
    the order the calls return (children before their parent; the model itself last), and
    whether it runs inside a lifted transform (its call returns under another trace than the
    model's: its values cannot be read out). Traced abstractly (`jax.eval_shape`): nothing is
    compiled. A model that does not run on such images is refused naming `arg` and `value`
    (default: `input_shape` itself; a method names the `images` it was given)."""
    shape = _check_shape(input_shape)
    seen: dict[str, list] = {}
    kwargs = eval_call_kwargs(model)
    outer: list[Any] = []

    def on_return(name: str, module: Any, out: Any) -> Any:
        # re-inserted: last return
        entry = seen.pop(name, [type(module).__name__, None, 0, False])
        entry[1] = tuple(out.shape) if hasattr(out, "shape") else None
        entry[2] += 1
        entry[3] = entry[3] or current_trace() != outer[0]
        seen[name] = entry
        return out

    def run(variables: Any, images: Any) -> Any:
        outer.append(current_trace())
        with nn.intercept_methods(_outermost_calls(on_return)):
            return model.apply(variables, images, **kwargs)

    try:
        jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    except NONDETERMINISTIC_CALL_ERRORS as err:
        raise nondeterministic_call(_OWNER, model, err) from None
    except Exception as err:  # flax/jax raise many kinds for variables of another shape
        raise invalid(_OWNER, arg, shape if value is None else value,
                      f"the model with these variables does not run on a {shape} input "
                      f"({type(err).__name__}: {str(err)[:300].rstrip('.')})") from None
    return [ModuleOutput(path, kind, out_shape, calls, lifted)
            for path, (kind, out_shape, calls, lifted) in seen.items()]


def _logits_of(outputs: Sequence[ModuleOutput]) -> ModuleOutput:
    """The model's own output, which must be `[1, classes]` logits."""
    top = next(o for o in outputs if o.path == "")
    if top.shape is None or len(top.shape) != 2:
        raise invalid(_OWNER, "model", top.kind,
                      f"expected a classifier returning [N, classes] logits; it returns "
                      f"{'shape ' + str(top.shape) if top.shape else 'no single array'}")
    return top


def spatial_layers(outputs: Sequence[ModuleOutput], rank: int) -> list[str]:
    """Paths of the modules whose output is a feature map (`rank` axes: N, spatial..., C) and
    that run once per forward pass, outside lifted transforms: the layers `grad_cam` and
    `activations` accept."""
    return [o.path for o in outputs if o.path and o.shape is not None and len(o.shape) == rank
            and o.calls == 1 and not o.lifted]


#: Why a layer inside a lifted transform (`ModuleOutput.lifted`) is refused: its value, read
#: out of the transform's own trace, would be jax's UnexpectedTracerError.
_LIFTED = ("is, or runs inside, a module wrapped in a lifted transform (nn.remat, nn.scan, "
           "nn.vmap, ...), whose values cannot be read out of it; choose a layer that runs "
           "outside every such module")


def _check_layers(outputs: Sequence[ModuleOutput], layers: Sequence[str], rank: int,
                  arg: str = "layer") -> None:
    valid = spatial_layers(outputs, rank)
    for layer in layers:
        if layer not in valid:
            known = {o.path: o for o in outputs}
            why = ("is not a module of the model" if layer not in known else
                   f"runs {known[layer].calls} times per forward pass" if known[layer].calls > 1
                   else _LIFTED if known[layer].lifted
                   else f"outputs {known[layer].shape}, not a feature map")
            expected = ("and the model has no layer that could be (a feature-map module run "
                        "once per forward pass, outside lifted transforms)" if not valid else
                        f"expected one of the feature-map layers {valid[-8:]}"
                        + (f" (last 8 of {len(valid)}; module_outputs lists all)"
                           if len(valid) > 8 else ""))
            raise invalid(_OWNER, arg, layer, f"it {why}; {expected}")


def check_layer(model: nn.Module, variables: Any, input_shape: Sequence[int],
                layer: str) -> None:
    """A ValueError naming `layer` unless it is a feature-map module of `model` that runs once
    per forward pass on `input_shape` images: what `grad_cam` and `activations` accept. Traced
    abstractly; a command checks its flag with it before running any method."""
    shape = _check_shape(input_shape)
    _check_layers(module_outputs(model, variables, shape), (layer,), len(shape) + 1)


def _default_layer(outputs: Sequence[ModuleOutput], rank: int) -> str:
    """The last feature-map module with more than one position (else the last one)."""
    layers = spatial_layers(outputs, rank)
    if not layers:
        raise invalid(_OWNER, "layer", None,
                      "the model has no module with a feature-map output that runs once per "
                      "forward pass outside lifted transforms (nn.remat, nn.scan, ...)")
    shapes = {o.path: o.shape for o in outputs}
    wide = [p for p in layers if math.prod(shapes[p][1:-1]) > 1]  # type: ignore[index]
    return (wide or layers)[-1]


def last_conv_layer(model: nn.Module, variables: Any, input_shape: Sequence[int]) -> str:
    """The last module whose output is a feature map of more than one position: Grad-CAM's
    default layer (the paper takes the last convolutional layer, whose maps are the most
    semantic that are still spatial; a 1x1 map, as LeNet-5's C5, has no spatial answer)."""
    outputs = module_outputs(model, variables, input_shape)
    return _default_layer(outputs, len(_check_shape(input_shape)) + 1)


# ------------------------------------------------------------------------------ checking
def _check_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(isinstance(s, int | np.integer) and not isinstance(s, bool)
                                  and s > 0 for s in shape):
        raise invalid(_OWNER, "input_shape", input_shape,
                      "expected (H, W, C) of positive ints, e.g. (32, 32, 3)")
    return tuple(int(s) for s in shape)


def _shape_of(array: np.ndarray) -> str:
    """How an array argument is named in an error: by its shape."""
    return f"array of shape {array.shape}"


def _check_images(images: Any) -> np.ndarray:
    array = widen_low_precision(np.asarray(images))  # bfloat16 images read as floats
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[0] == 0:
        raise invalid(_OWNER, "images", _shape_of(array),
                      "expected preprocessed images [N, H, W, C] (or one [H, W, C])")
    if array.dtype.kind not in "iuf":  # complex would lose its imaginary part unannounced
        raise invalid(_OWNER, "images.dtype", str(array.dtype),
                      "expected real numbers (preprocessed images)")
    return _as_float32(array, "images")


def _as_float32(array: np.ndarray, arg: str) -> np.ndarray:
    """Real-valued `array` as float32, refused naming `arg` if it holds NaN or inf, or a value
    beyond float32's range (finite as given, inf once cast): checked before the cast, which would
    warn and turn it into inf."""
    if not np.all(np.isfinite(array)):
        raise invalid(_OWNER, arg, "an array with NaN or inf", "expected finite values")
    if array.size and np.abs(array).max() > _FLOAT32_MAX:
        raise invalid(_OWNER, arg, f"<values up to {np.abs(array).max():.3g} in magnitude>",
                      f"expected finite float32 values (magnitude <= {_FLOAT32_MAX:.3g})")
    return array.astype(np.float32)


def _check_targets(targets: Any, count: int, classes: int) -> np.ndarray:
    """Given `targets` as int32 `[count]` class ids in `[0, classes)` (a scalar: for every
    image)."""
    array = np.asarray(targets)
    if array.ndim == 0:
        array = np.full(count, array)
    if (array.shape != (count,) or not np.issubdtype(array.dtype, np.integer)
            or np.any(array < 0) or np.any(array >= classes)):
        raise invalid(_OWNER, "targets", targets,
                      f"expected one class id in [0, {classes - 1}] per image ({count}), "
                      "or None for the predicted classes")
    return array.astype(np.int32)


# ------------------------------------------------------------------------------- methods
def _per_model(build: Callable[..., Callable]) -> Callable[..., Callable]:
    """`build(model, *keys)`'s jitted function, memoized per `(model, *keys)` so repeated calls
    reuse its compilation; built afresh for a model that cannot be hashed (a field holding a list,
    as model kwargs read back from a run's config.json do)."""
    cached = functools.lru_cache(maxsize=4)(build)  # compiled executables: few models at once

    @functools.wraps(build)
    def get(*args: Any) -> Callable:
        try:
            hash(args)
        except TypeError:
            return build(*args)
        return cached(*args)

    return get


@_per_model
def _logits_fn(model: nn.Module) -> Callable:
    forward = _forward(model, ())
    return jax.jit(lambda variables, images: forward(variables, images)[0].astype(jnp.float32))


class _Batch:
    """One call's checked images, with what every method needs of them (the module outputs,
    the clean logits, the targets) computed on first use: `explain` shares them among its
    methods, and a method checks its own arguments before anything is compiled."""

    def __init__(self, model: nn.Module, variables: Any, images: Any, targets: Any):
        self.model, self.variables = model, variables
        self.images = _check_images(images)
        self._targets = targets

    @functools.cached_property
    def outputs(self) -> list[ModuleOutput]:
        return module_outputs(self.model, self.variables, self.images.shape[1:], arg="images",
                              value=_shape_of(self.images))

    @functools.cached_property
    def logits(self) -> np.ndarray:
        _logits_of(self.outputs)
        return np.asarray(_logits_fn(self.model)(self.variables, self.images))

    @functools.cached_property
    def targets(self) -> np.ndarray:
        """The requested classes (checked against the abstract trace's class count, before
        anything compiles), else each image's predicted one."""
        if self._targets is None:
            return np.argmax(self.logits, axis=-1).astype(np.int32)
        classes = _logits_of(self.outputs).shape[-1]  # type: ignore[index]
        return _check_targets(self._targets, len(self.images), classes)


def logits(model: nn.Module, variables: Any, images: Any) -> np.ndarray:
    """The model's eval-mode logits `[N, classes]` (float32)."""
    return _Batch(model, variables, images, None).logits


def _class_score(out: Any, targets: Any) -> Any:
    return jnp.take_along_axis(out.astype(jnp.float32), targets[:, None], axis=1).sum()


@_per_model
def _saliency_fn(model: nn.Module) -> Callable:
    forward = _forward(model, ())

    def saliency_map(variables: Any, images: Any, targets: Any) -> Any:
        grads = jax.grad(lambda x: _class_score(forward(variables, x)[0], targets))(images)
        return jnp.abs(grads).max(axis=-1)

    return jax.jit(saliency_map)


def saliency(model: nn.Module, variables: Any, images: Any,
             targets: Any = None) -> np.ndarray:
    """`[N, H, W]`: max over channels of |d score_target / d pixel| (Simonyan et al. 2014),
    scores being logits (their §3.1 uses the unnormalised class score); targets None: the
    predicted classes."""
    return _saliency(_Batch(model, variables, images, targets))


def _saliency(batch: _Batch) -> np.ndarray:
    targets = batch.targets  # checked before the (cached) function is built
    return np.asarray(_saliency_fn(batch.model)(batch.variables, batch.images, targets))


def smoothgrad(model: nn.Module, variables: Any, images: Any, targets: Any = None, *,
               noise: float = 0.15, samples: int = 25, seed: int = 0) -> np.ndarray:
    """`[N, H, W]`: `saliency` averaged over `samples` copies of each image with Gaussian noise
    of standard deviation `noise` times the image's value range (Smilkov et al. 2017,
    "SmoothGrad", who find 10-20% best), which removes much of the raw gradient's speckle.
    Targets are fixed on the clean images; the noise comes from NumPy's `seed`."""
    return _smoothgrad(_Batch(model, variables, images, targets), noise, samples, seed)


def _smoothgrad(batch: _Batch, noise: float = 0.15, samples: int = 25,
                seed: int = 0) -> np.ndarray:
    noise = check_number(_OWNER, "noise", noise, "expected a fraction of the value range >= 0",
                         low=0.0, high=_FLOAT32_MAX, strings=False)
    samples = check_positive_int(_OWNER, "samples", samples)
    rng = np.random.default_rng(check_non_negative_int(_OWNER, "seed", seed))
    images, targets = batch.images, batch.targets
    sigma = noise * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    gradient = _saliency_fn(batch.model)
    total = np.zeros(images.shape[:3], np.float64)
    for _ in range(samples):
        noisy = images + rng.standard_normal(images.shape, np.float32) * sigma[:, None, None, None]
        total += np.asarray(gradient(batch.variables, noisy.astype(np.float32), targets))
    return (total / samples).astype(np.float32)


@_per_model
def _path_gradient_fn(model: nn.Module) -> Callable:
    """d score / d x at `baseline + alpha (image - baseline)`; called once per path point from
    Python (XLA:CPU runs convolutions inside a loop body many times slower)."""
    forward = _forward(model, ())

    def path_gradient(variables: Any, images: Any, baselines: Any, targets: Any,
                      alpha: Any) -> Any:
        path = baselines + alpha * (images - baselines)
        return jax.grad(lambda x: _class_score(forward(variables, x)[0], targets))(path)

    return jax.jit(path_gradient)


def integrated_gradients(model: nn.Module, variables: Any, images: Any, targets: Any = None, *,
                         baseline: Any = 0.0, steps: int = 32) -> np.ndarray:
    """`[N, H, W, C]` attributions `(x - x') * mean over the path of d score / d x`
    (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks"), by the midpoint
    rule with `steps` points from `baseline` x' (a value or an image broadcastable to the
    images; 0: the dataset mean for normalized inputs) to x. They sum to about
    score(x) - score(x') (completeness), closer with more steps; scores are logits."""
    return _integrated_gradients(_Batch(model, variables, images, targets), baseline, steps)


def _integrated_gradients(batch: _Batch, baseline: Any = 0.0, steps: int = 32) -> np.ndarray:
    images = batch.images
    steps = check_positive_int(_OWNER, "steps", steps)
    try:  # real numbers only: None, strings and objects would cast to NaN or parse as text
        given = np.asarray(baseline)
        if given.dtype.kind not in "iuf" and given.dtype != jnp.bfloat16:
            raise TypeError
    except (TypeError, ValueError):
        raise invalid(_OWNER, "baseline", baseline,
                      "expected a number or an array of numbers (0: the dataset mean)") from None
    try:
        baselines = np.broadcast_to(given, images.shape)
    except ValueError:
        raise invalid(_OWNER, "baseline", _shape_of(given),
                      f"expected a value or an array broadcastable to {images.shape}") from None
    baselines = _as_float32(widen_low_precision(baselines), "baseline")  # copied: contiguous
    targets = batch.targets  # checked before the (cached) function is built
    gradient = _path_gradient_fn(batch.model)
    total = np.zeros(images.shape, np.float64)
    for k in range(steps):  # their Eq. 3's Riemann sum, at the midpoints of the m intervals
        total += np.asarray(gradient(batch.variables, images, baselines, targets,
                                     np.float32((k + 0.5) / steps)))
    return ((images - baselines) * total / steps).astype(np.float32)


def occlusion_windows(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of a `patch`-wide occluder along an axis of `size` at `stride`, the last
    one moved to end at the border, so every pixel is covered when `stride <= patch`."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


@_per_model
def _occluded_probability_fn(model: nn.Module, patch: tuple[int, int]) -> Callable:
    forward = _forward(model, ())

    def probabilities(variables: Any, images: Any, fill: Any, index: Any, ys: Any, xs: Any,
                      targets: Any) -> Any:
        block = jnp.broadcast_to(fill, (*patch, images.shape[-1])).astype(images.dtype)

        def occlude(i: Any, y: Any, x: Any) -> Any:
            # a zero of the positions' dtype: a literal 0 is int64 under x64, beside int32 ones
            return jax.lax.dynamic_update_slice(images[i], block, (y, x, jnp.zeros_like(y)))

        batch = jax.vmap(occlude)(index, ys, xs)
        probs = jax.nn.softmax(forward(variables, batch)[0].astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(probs, targets[index][:, None], axis=1)[:, 0]

    return jax.jit(probabilities)


def occlusion(model: nn.Module, variables: Any, images: Any, targets: Any = None, *,
              patch: int | None = None, stride: int | None = None, fill: float = 0.0,
              batch_size: int = 64) -> np.ndarray:
    """`[N, H, W]`: the drop of the target's softmax probability when a `patch` x `patch`
    square of value `fill` covers the pixel, averaged over the square positions (every
    `stride` pixels, the last at the border) that cover it (Zeiler & Fergus 2014, §4.2).

    `fill` 0 is the dataset's mean colour for inputs normalized by it (cnnjax's pipelines), the
    paper's grey square. Defaults: `patch` a quarter of the smaller side, `stride` half the
    patch. The occluded copies are made on the device, `batch_size` at a time.
    """
    return _occlusion(_Batch(model, variables, images, targets), patch, stride, fill,
                      batch_size)


def _occluder(height: int, width: int, patch: int | None,
              stride: int | None) -> tuple[int, int]:
    """The occluder's checked `(patch, stride)` on `height x width` images (None: a quarter of
    the smaller side, half the patch)."""
    patch = check_positive_int(_OWNER, "patch", max(1, round(min(height, width) / 4))
                               if patch is None else patch)
    if patch > min(height, width):
        raise invalid(_OWNER, "patch", patch,
                      f"expected at most the image's smaller side, {min(height, width)}")
    stride = check_positive_int(_OWNER, "stride", max(1, patch // 2) if stride is None
                                else stride)
    if stride > patch:
        raise invalid(_OWNER, "stride", stride,
                      f"expected at most the patch, {patch}, so that every pixel is covered")
    return patch, stride


def _occlusion(batch: _Batch, patch: int | None = None, stride: int | None = None,
               fill: float = 0.0, batch_size: int = 64) -> np.ndarray:
    images = batch.images
    height, width = images.shape[1:3]
    patch, stride = _occluder(height, width, patch, stride)
    fill = check_number(_OWNER, "fill", fill, "expected a finite number (0: the dataset mean)",
                        low=-_FLOAT32_MAX, high=_FLOAT32_MAX, strings=False)
    batch_size = check_positive_int(_OWNER, "batch_size", batch_size)
    targets = batch.targets
    base = jax.nn.softmax(batch.logits, axis=-1)[np.arange(len(images)), targets]
    ys, xs = occlusion_windows(height, patch, stride), occlusion_windows(width, patch, stride)
    grid = np.array([(i, y, x) for i in range(len(images)) for y in ys for x in xs], np.int32)
    fn = _occluded_probability_fn(batch.model, (patch, patch))
    probs = np.empty(len(grid), np.float32)
    for start in range(0, len(grid), batch_size):
        chunk = grid[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        out = fn(batch.variables, images, np.float32(fill), padded[:, 0], padded[:, 1],
                 padded[:, 2], targets)
        probs[start:start + len(chunk)] = np.asarray(out)[:len(chunk)]
    drop = np.zeros(images.shape[:3], np.float64)
    count = np.zeros(images.shape[:3], np.float64)
    for (i, y, x), p in zip(grid, probs, strict=True):
        drop[i, y:y + patch, x:x + patch] += base[i] - p
        count[i, y:y + patch, x:x + patch] += 1
    return (drop / count).astype(np.float32)


@_per_model
def _grad_cam_fn(model: nn.Module, layer: str, output_hw: tuple[int, int],
                 after_relu: bool) -> Callable:
    forward = _forward(model, (layer,), perturb=layer)

    def grad_cam_maps(variables: Any, images: Any, targets: Any, zeros: Any) -> tuple:
        leaves, tree = jax.tree.flatten(variables)

        def traced(leaves: Any, images: Any, targets: Any, delta: Any) -> tuple[Any, Any, Any]:
            out, captured = forward(jax.tree.unflatten(tree, leaves), images, delta)
            return _class_score(out, targets), captured[layer], out

        closed = jax.make_jaxpr(traced)(leaves, images, targets, zeros)
        relu_at = _rectifying_equation(closed.jaxpr, closed.jaxpr.outvars[1]) if after_relu \
            else None

        def score(delta: Any) -> tuple[Any, tuple[Any, Any]]:
            if relu_at is None:  # A^k is the layer's output itself
                result, activation, out = traced(leaves, images, targets, delta)
                return result, (activation, out)
            rectified: list[Any] = []

            def add_delta(index: int, outs: list) -> list:  # A^k is the ReLU's output
                if index == relu_at:
                    outs = [outs[0] + delta.astype(outs[0].dtype)]
                    rectified.append(outs[0])
                return outs

            result, _, out = _evaluate(closed.jaxpr, closed.consts,
                                       [*leaves, images, targets, zeros], jax.nn.relu,
                                       after=add_delta)
            return result, (rectified[0], out)

        grads, (activation, out) = jax.grad(score, has_aux=True)(zeros)
        activation = activation.astype(jnp.float32)
        alpha = grads.astype(jnp.float32).mean(axis=(1, 2))  # [N, K]: §3, Eq. 1
        maps = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", activation, alpha))  # Eq. 2
        up = jax.image.resize(maps, (maps.shape[0], *output_hw), method="bilinear")
        return maps, up, out.astype(jnp.float32), jnp.asarray(relu_at is not None)

    return jax.jit(grad_cam_maps)


def _rectifying_equation(jaxpr: Any, var: Any) -> int | None:
    """The index of the top-level equation of `jaxpr` that applies a ReLU (a `jax.nn.relu` call
    or `max(x, 0)`, not a normalization's variance clamp) to `var` itself, else None."""
    clamps = _variance_clamps(jaxpr)
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name == "custom_jvp_call" and _is_relu(eqn):
            operand = len(eqn.invars) - 1
        else:
            operand = None if index in clamps else _rectified_operand(eqn)
        if operand is not None and eqn.invars[operand] is var:
            return index
    return None


def grad_cam(model: nn.Module, variables: Any, images: Any, targets: Any = None,
             layer: str | None = None, after_relu: bool = True) -> GradCam:
    """Grad-CAM (Selvaraju et al. 2017) of `targets` (None: the predicted classes) at `layer`
    (None: `last_conv_layer`'s choice): `ReLU(sum_k alpha_k A^k)` with `alpha_k` the spatial mean of
    d score / d A^k, scores being logits; also bilinearly upsampled to the input size. With
    `after_relu`, where the model applies a ReLU as a function straight to the layer's output
    (VGG's `nn.relu(conv(x))`), A^k is that ReLU's output: the paper's rectified conv maps."""
    return _grad_cam(_Batch(model, variables, images, targets), layer, after_relu)


def _grad_cam(batch: _Batch, layer: str | None = None, after_relu: bool = True) -> GradCam:
    check_bool(_OWNER, "after_relu", after_relu)
    images, outputs = batch.images, batch.outputs
    _logits_of(outputs)
    if layer is None:
        layer = _default_layer(outputs, images.ndim)
    _check_layers(outputs, (layer,), images.ndim)
    shape = next(o.shape for o in outputs if o.path == layer)
    targets = batch.targets
    zeros = np.zeros((len(images), *shape[1:]), np.float32)
    fn = _grad_cam_fn(batch.model, layer, images.shape[1:3], after_relu)
    maps, up, out, rectified = fn(batch.variables, images, targets, zeros)
    return GradCam(layer, np.asarray(maps), np.asarray(up), targets, np.asarray(out),
                   bool(rectified))


def activations(model: nn.Module, variables: Any, images: Any,
                layers: Sequence[str]) -> dict[str, np.ndarray]:
    """`{layer: [N, h, w, C] output}` of each named module on `images` in eval mode (float32),
    the feature maps Zeiler & Fergus project back; `module_outputs` lists the names."""
    images = _check_images(images)
    if isinstance(layers, str):
        layers = (layers,)
    outputs = module_outputs(model, variables, images.shape[1:], arg="images",
                             value=_shape_of(images))
    _check_layers(outputs, tuple(layers), images.ndim, arg="layers")
    forward = _forward(model, tuple(layers))
    captured = jax.jit(lambda v, x: forward(v, x)[1])(variables, images)
    return {name: np.asarray(captured[name], np.float32) for name in layers}


# ----------------------------------------------------------------------- guided backprop
#: Calls `guided_backprop` inlines when it rewrites a traced model (their bodies are evaluated;
#: `nn.remat`'s checkpoint primitive is "checkpoint", "remat" or "remat2" by jax version).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "named_call",
                    "checkpoint", "remat", "remat2"})
#: How a ReLU passes the gradient back: only where the incoming gradient is positive and, for
#: "guided", where the ReLU's input was positive too.
RELU_RULES = ("guided", "deconvnet")


def _body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """`(jaxpr, consts)` of a call equation, else None."""
    for key in ("jaxpr", "call_jaxpr"):
        inner = eqn.params.get(key)
        if inner is not None and hasattr(getattr(inner, "jaxpr", inner), "eqns"):
            return getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())
    return None


def _rectified_operand(eqn: Any) -> int | None:
    """For a floating `max(x, 0)` or `max(0, x)` with a literal zero (`jnp.maximum(x, 0.)`
    written out), the position of x; else None."""
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    zero = [is_literal(v) and np.all(np.asarray(v.val) == 0) for v in eqn.invars]
    if zero[0] == zero[1]:
        return None
    operand = 1 if zero[0] else 0
    return operand if jnp.issubdtype(eqn.invars[operand].aval.dtype, jnp.floating) else None


#: What a normalization does between clamping a variance at 0 and taking its root.
_TO_ROOT = frozenset({"add", "broadcast_in_dim", "reshape", "convert_element_type", "squeeze",
                      "expand_dims", "copy"})


def _variance_clamps(jaxpr: Any) -> set[int]:
    """Indices of the `max(v, 0)` equations of `jaxpr` whose result reaches an `rsqrt`/`sqrt`
    through reshapes and additions: flax's GroupNorm/LayerNorm clamp of a variance (`var =
    max(0, E[x^2] - E[x]^2)`, then `rsqrt(var + eps)`), which is not a ReLU."""
    users: dict[Any, list[Any]] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not is_literal(v):
                users.setdefault(v, []).append(eqn)
    clamps = set()
    for index, eqn in enumerate(jaxpr.eqns):
        if _rectified_operand(eqn) is None:
            continue
        frontier = list(eqn.outvars)
        for _ in range(8):  # a few reshapes and an epsilon, never a long chain
            following = [u for v in frontier for u in users.get(v, ())]
            if any(u.primitive.name in ("rsqrt", "sqrt") for u in following):
                clamps.add(index)
                break
            frontier = [o for u in following if u.primitive.name in _TO_ROOT for o in u.outvars]
            if not frontier:
                break
    return clamps


def _is_relu(eqn: Any) -> bool:
    """`jax.nn.relu` (flax's `nn.relu`): a call whose body, through nested calls, is one
    `max(x, 0)`."""
    body = _body(eqn)
    while body is not None:
        jaxpr, _ = body
        if len(jaxpr.eqns) != 1:
            return False
        inner = jaxpr.eqns[0]
        if inner.primitive.name == "max":
            return _rectified_operand(inner) is not None
        if inner.primitive.name not in _CALLS:
            return False
        body = _body(inner)
    return False


def _rectifier(rule: str) -> Callable:
    """max(x, 0) whose backward pass follows `rule` (RELU_RULES)."""

    @jax.custom_vjp
    def relu(x: Any) -> Any:
        return jnp.maximum(x, 0)

    def forward(x: Any) -> tuple[Any, Any]:
        return relu(x), x

    def backward(x: Any, g: Any) -> tuple[Any]:
        keep = (g > 0) & (x > 0) if rule == "guided" else g > 0
        return (jnp.where(keep, g, jnp.zeros_like(g)),)

    relu.defvjp(forward, backward)
    return relu


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], relu: Callable,
              after: Callable[[int, list], list] | None = None) -> list:
    """Evaluates `jaxpr` with every ReLU (a `jax.nn.relu` call or a `max(x, 0)` with a literal
    zero, not a normalization's variance clamp) replaced by `relu`, inlining calls; `after(index,
    outputs)` may replace the outputs of each top-level equation."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if is_literal(v) else env[v]

    for v, value in zip(jaxpr.constvars, consts, strict=True):
        env[v] = value
    for v, value in zip(jaxpr.invars, args, strict=True):
        env[v] = value
    clamps = _variance_clamps(jaxpr)
    for index, eqn in enumerate(jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        body = _body(eqn) if eqn.primitive.name in _CALLS else None
        if body is not None and eqn.primitive.name == "custom_jvp_call" and not _count_relus(
                body[0]):
            body = None  # no ReLU inside: bound as it is, keeping its own derivative rule
        rectified = None if index in clamps else _rectified_operand(eqn)
        if eqn.primitive.name == "custom_jvp_call" and _is_relu(eqn):
            outs = [relu(ins[-1])]
        elif rectified is not None:
            outs = [relu(ins[rectified])]
        elif body is not None:
            outs = _evaluate(body[0], body[1], ins, relu)
        else:  # as jax.core.eval_jaxpr binds (a call's body becomes a function again)
            out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = out if eqn.primitive.multiple_results else [out]
        if after is not None:
            outs = after(index, outs)
        for v, value in zip(eqn.outvars, outs, strict=True):
            env[v] = value
    return [read(v) for v in jaxpr.outvars]


def guided_backprop(model: nn.Module, variables: Any, images: Any, targets: Any = None, *,
                    rule: str = "guided") -> np.ndarray:
    """`[N, H, W, C]` d score / d image with every ReLU's backward pass changed by `rule`:
    "guided" passes the gradient only where both the ReLU's input and the incoming gradient are
    positive (Springenberg et al. 2015, "Striving for Simplicity", §3.4); "deconvnet" only where
    the incoming gradient is, whatever the input, which Springenberg et al. show is Zeiler &
    Fergus's (2014) deconvnet projection (max pooling's gradient is its switches). ReLUs are
    found in the traced model as `jax.nn.relu` calls and as `max(x, 0)` with a literal zero
    (`jnp.maximum(x, 0.)`, also inside `jax.nn.relu6`) unless that max clamps a variance on its
    way to a square root (GroupNorm, LayerNorm); other custom-derivative functions are
    differentiated through their bodies. A model without ReLUs gets its plain gradient."""
    return _guided_backprop(_Batch(model, variables, images, targets), rule)


def _guided_backprop(batch: _Batch, rule: str = "guided") -> np.ndarray:
    rule = check_choice(_OWNER, "rule", rule, RELU_RULES)
    targets = batch.targets  # checked before the function is built or traced
    return np.asarray(_guided_gradient_fn(batch.model, rule)(batch.variables, batch.images,
                                                              targets))


@_per_model
def _guided_gradient_fn(model: nn.Module, rule: str) -> Callable:
    """d score / d images with every ReLU's backward pass following `rule`: the model traced to a
    jaxpr and evaluated again with its ReLUs swapped, inside one jitted function, so later
    batches of the same shape reuse its trace and compilation. A ReLU it cannot rewrite is
    refused while tracing, before anything compiles."""
    forward = _forward(model, ())
    relu = _rectifier(rule)

    def guided_gradient(variables: Any, images: Any, targets: Any) -> Any:
        leaves, tree = jax.tree.flatten(variables)

        def score(leaves: Any, x: Any, targets: Any) -> Any:
            return _class_score(forward(jax.tree.unflatten(tree, leaves), x)[0], targets)

        closed = jax.make_jaxpr(score)(leaves, images, targets)
        _count_relus(closed.jaxpr, model)  # refuses ReLUs it could not rewrite

        def rewritten(x: Any) -> Any:
            return _evaluate(closed.jaxpr, closed.consts, [*leaves, x, targets], relu)[0]

        return jax.grad(rewritten)(images)

    return jax.jit(guided_gradient)


def count_relus(model: nn.Module, variables: Any, images: Any) -> int:
    """How many ReLUs guided backpropagation (and its deconvnet rule) would rewrite in `model`'s
    forward pass on `images` (`[N, H, W, C]` or one `[H, W, C]`): the equations of the traced
    model that `guided_backprop` replaces, found by the same rules (a `jax.nn.relu` call, a
    `max(x, 0)` with a literal zero unless it clamps a normalization's variance), each counted
    once per place in the trace. 0 means `guided_backprop` is the plain gradient, so its map
    equals saliency's (e.g. LeNet-5, whose units are tanh): `experiments.visualize` still draws
    both, and adds a note saying so to its output and `visualize.json`. Traces only
    (`jax.make_jaxpr`): nothing compiles."""
    images = _check_images(images)
    forward = _forward(model, ())
    closed = jax.make_jaxpr(lambda v, x: forward(v, x)[0])(variables, images)
    return _count_relus(closed.jaxpr, model)


def _count_relus(jaxpr: Any, model: nn.Module | None = None) -> int:
    """The ReLUs `_evaluate` replaces in `jaxpr`, through nested calls (`count_relus`); a
    ValueError naming `model` where a ReLU sits in a body `_evaluate` does not inline (a scan's,
    a loop's, a cond's branch, a custom_vjp function's): it would keep its plain gradient.
    `_evaluate` binds a custom_jvp function whose body holds none as it is (e.g.
    `conv_impl.conv_general_dilated`'s input-gradient rule, which XLA:CPU needs)."""
    clamps = _variance_clamps(jaxpr)
    count = 0
    for index, eqn in enumerate(jaxpr.eqns):
        body = _body(eqn) if eqn.primitive.name in _CALLS else None
        relu_call = eqn.primitive.name == "custom_jvp_call" and _is_relu(eqn)
        if relu_call or (index not in clamps and _rectified_operand(eqn) is not None):
            count += 1
        elif body is not None:
            count += _count_relus(body[0], model)
        elif any(_count_relus(inner, model) for inner in _sub_jaxprs(eqn)):
            raise invalid(_OWNER, "model", type(model).__name__ if model else "the model",
                          f"it applies a ReLU inside a {eqn.primitive.name!r} (a jax.lax "
                          "control-flow body such as nn.scan's, or a custom_vjp function), "
                          "which guided backprop cannot rewrite: its map would mix guided and "
                          "plain gradients")
    return count


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """Every jaxpr among `eqn`'s parameters (a scan's or loop's body, a cond's branches)."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


class Explanation(NamedTuple):
    """`explain`'s result: each method's `[N, H, W]` map of the same images and targets."""

    maps: dict[str, np.ndarray]  # {method: [N, H, W]}, in METHODS order
    targets: np.ndarray  # [N] the class each map explains
    probabilities: np.ndarray  # [N, classes] softmax of the logits
    layer: str | None  # Grad-CAM's layer (None without grad_cam)


def check_methods(methods: Sequence[str] | str, owner: str = _OWNER,
                  arg: str = "methods") -> tuple[str, ...]:
    """`methods` as a tuple (a str is split at commas) if they are distinct names of `METHODS`,
    at least one; else raises naming `owner` and `arg` (a command checks its flag before it
    loads a checkpoint)."""
    if isinstance(methods, str):
        methods = tuple(m for m in methods.split(",") if m)
    expected = f"expected distinct names from {list(METHODS)}, at least one"
    if isinstance(methods, Sequence):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), METHODS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise invalid(owner, arg, methods,
                          f"{expected}; {unknown[0]!r} is not one{hint}")
    if not isinstance(methods, Sequence) or not methods or len(set(methods)) != len(methods):
        raise invalid(owner, arg, methods, expected)
    return tuple(methods)


def explain(model: nn.Module, variables: Any, images: Any, targets: Any = None, *,
            methods: Sequence[str] = METHODS, layer: str | None = None,
            patch: int | None = None, stride: int | None = None,
            ig_steps: int | None = None) -> Explanation:
    """The `methods` (of `METHODS`) for the same images and targets (None: predicted classes);
    `layer` is Grad-CAM's, `patch` and `stride` the occluder's, `ig_steps` the path points of
    integrated gradients (None: 32; its map is |sum over channels| of its attributions). A
    setting given for a method not in `methods` is refused, not ignored."""
    methods = check_methods(methods)
    for arg, value, method in (("layer", layer, "grad_cam"), ("patch", patch, "occlusion"),
                               ("stride", stride, "occlusion"),
                               ("ig_steps", ig_steps, "integrated_gradients")):
        if value is not None and method not in methods:
            raise invalid(_OWNER, arg, value, f"only {method} reads it, and methods="
                          f"{tuple(methods)!r} lacks it; add {method} or drop {arg}")
    ig_steps = 32 if ig_steps is None else ig_steps
    batch = _Batch(model, variables, images, targets)
    # Every argument is checked before any method runs (each compiles its own function).
    if targets is not None:
        _ = batch.targets  # checks the given targets; nothing compiles
    if "grad_cam" in methods:
        _check_layers(batch.outputs, (layer or _default_layer(batch.outputs, batch.images.ndim),),
                      batch.images.ndim)
    if "occlusion" in methods:
        _occluder(*batch.images.shape[1:3], patch, stride)
    if "integrated_gradients" in methods:
        check_positive_int(_OWNER, "ig_steps", ig_steps)
    maps: dict[str, np.ndarray] = {}
    chosen = None
    for method in METHODS:  # one batch: its logits and targets are computed once for all
        if method not in methods:
            continue
        if method == "saliency":
            maps[method] = _saliency(batch)
        elif method == "smoothgrad":
            maps[method] = _smoothgrad(batch)
        elif method == "guided_backprop":  # max over channels of |.|, as saliency
            maps[method] = np.abs(_guided_backprop(batch)).max(-1)
        elif method == "integrated_gradients":  # |sum over channels|, as Captum draws it
            maps[method] = np.abs(_integrated_gradients(batch, steps=ig_steps).sum(axis=-1))
        elif method == "occlusion":
            maps[method] = _occlusion(batch, patch, stride)
        else:
            cam = _grad_cam(batch, layer)
            maps[method], chosen = cam.upsampled, cam.layer
    probabilities = np.asarray(jax.nn.softmax(batch.logits, axis=-1))
    return Explanation(maps, batch.targets, probabilities, chosen)


# ------------------------------------------------------------------------------- filters
def first_layer_filters(model: nn.Module, variables: Any,
                        input_shape: Sequence[int]) -> tuple[str, np.ndarray]:
    """`(path, kernel [kh, kw, C_in, C_out])` of the first convolution the model runs (its
    first module holding a 4-D `kernel`)."""
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    for output in module_outputs(model, variables, input_shape):
        node: Any = params
        for part in output.path.split("/") if output.path else ():
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        kernel = node.get("kernel") if isinstance(node, Mapping) else None
        if kernel is not None and np.ndim(kernel) == 4:
            return output.path, np.asarray(kernel, np.float32)
    raise invalid(_OWNER, "model", type(model).__name__,
                  "expected a model with a 2-D convolution (a 4-D 'kernel' parameter)")


def filter_grid(kernel: Any, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """The `C_out` filters of a `[kh, kw, C_in, C_out]` kernel tiled into one image (RGB for 3
    input channels, else each filter's mean over channels as grey), each filter min-max
    scaled to [0, 1] on its own, as Krizhevsky et al. (2012, Fig. 3) show them."""
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4:
        raise invalid(_OWNER, "kernel", f"array of shape {kernel.shape}",
                      "expected a 2-D convolution kernel [kh, kw, C_in, C_out]")
    count = kernel.shape[-1]
    columns = check_positive_int(_OWNER, "columns", math.ceil(math.sqrt(count))
                                 if columns is None else columns)
    pad = check_non_negative_int(_OWNER, "pad", pad)  # < 0 would overlap the filters
    filters = np.moveaxis(kernel, -1, 0)  # [C_out, kh, kw, C_in]
    if filters.shape[-1] != 3:
        filters = filters.mean(axis=-1, keepdims=True)
    low = filters.min(axis=(1, 2, 3), keepdims=True)
    span = filters.max(axis=(1, 2, 3), keepdims=True) - low
    filters = (filters - low) / np.where(span > 0, span, 1.0)
    rows = math.ceil(count / columns)
    kh, kw, channels = filters.shape[1:]
    grid = np.ones((rows * (kh + pad) - pad, columns * (kw + pad) - pad, channels))
    for i, f in enumerate(filters):
        r, c = divmod(i, columns)
        grid[r * (kh + pad):r * (kh + pad) + kh, c * (kw + pad):c * (kw + pad) + kw] = f
    return grid


# -------------------------------------------------------------------------- pointing game
def pointing_game(maps: Any, boxes: Any, tolerance: float = 0.0) -> np.ndarray:
    """`[N]` bool: whether each map's maximum (its pixel's centre) lies in its box `[ymin, xmin,
    ymax, xmax]` (pixels) or within `tolerance` pixels of it, Euclidean (Zhang et al. 2018,
    "Top-down neural attention by excitation backprop", use 15 px at 224x224). Ties: the first
    maximum; a map holding NaN is refused."""
    maps = np.asarray(maps, np.float64)
    boxes = np.asarray(boxes, np.float64)
    if maps.ndim != 3:
        raise invalid(_OWNER, "maps", f"array of shape {maps.shape}",
                      "expected [N, H, W] maps (a single map as maps[None])")
    if boxes.shape != (len(maps), 4):
        raise invalid(_OWNER, "boxes", f"array of shape {boxes.shape}",
                      f"expected one box [ymin, xmin, ymax, xmax] per map ({maps.shape})")
    if not np.isfinite(boxes).all() or (boxes[:, :2] > boxes[:, 2:]).any():
        bad = int(np.flatnonzero(~np.isfinite(boxes).all(1) | (boxes[:, :2] > boxes[:, 2:])
                                 .any(1))[0])
        raise invalid(_OWNER, "boxes", f"box {bad} = {boxes[bad].tolist()}",
                      "expected finite [ymin, xmin, ymax, xmax] with ymin <= ymax, "
                      "xmin <= xmax")
    tolerance = check_number(_OWNER, "tolerance", tolerance, "expected pixels >= 0", low=0.0,
                             strings=False)
    if np.isnan(maps).any():
        raise invalid(_OWNER, "maps", "maps holding NaN", "expected finite maps")
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    y, x = np.divmod(flat, maps.shape[2])
    cy, cx = y + 0.5, x + 0.5  # pixel centres
    dy = np.maximum(np.maximum(boxes[:, 0] - cy, cy - boxes[:, 2]), 0.0)
    dx = np.maximum(np.maximum(boxes[:, 1] - cx, cx - boxes[:, 3]), 0.0)
    return np.hypot(dy, dx) <= tolerance


# --------------------------------------------------------------------------------- plots
def displayable(images: Any, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> np.ndarray:
    """Preprocessed images back in [0, 1] for display: `x * std + mean` when the
    normalization is given (both, or neither), else each image min-max scaled; one channel
    becomes grey."""
    images = np.asarray(images, np.float64)
    if images.ndim != 4:
        raise invalid(_OWNER, "images", f"array of shape {images.shape}",
                      "expected preprocessed images [N, H, W, C] (one image as images[None])")
    for name, value, other in (("mean", mean, std), ("std", std, mean)):
        if value is not None and other is None:
            raise invalid(_OWNER, name, value, f"expected {'std' if name == 'mean' else 'mean'}"
                          " too (x * std + mean), or neither (each image min-max scaled)")
    if mean is not None and std is not None:
        images = images * np.asarray(std) + np.asarray(mean)
    else:
        low = images.min(axis=(1, 2, 3), keepdims=True)
        span = images.max(axis=(1, 2, 3), keepdims=True) - low
        images = (images - low) / np.where(span > 0, span, 1.0)
    images = np.clip(images, 0.0, 1.0)
    return images[..., 0] if images.shape[-1] == 1 else images


def attribution_figure(images: np.ndarray, maps: Mapping[str, np.ndarray],
                       titles: Sequence[str] | None = None, *, mean: Any = None,
                       std: Any = None) -> Any:
    """A matplotlib figure: a row per image, its input then each map overlaid on it."""
    import matplotlib.pyplot as plt

    shown = displayable(images, mean, std)
    columns = 1 + len(maps)
    fig, axes = plt.subplots(len(shown), columns, figsize=(2.2 * columns, 2.2 * len(shown)),
                             squeeze=False)
    for i, image in enumerate(shown):
        grey = image.ndim == 2
        axes[i, 0].imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=8)
        for j, (name, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(image.mean(axis=-1) if not grey else image, cmap="gray",
                              vmin=0, vmax=1)
            axes[i, j].imshow(m[i], cmap="jet", alpha=0.5)
            axes[i, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_attributions(images: np.ndarray, maps: Mapping[str, np.ndarray], path: str,
                      titles: Sequence[str] | None = None, *, mean: Any = None,
                      std: Any = None) -> str:
    """`attribution_figure` saved as a PNG at `path` (atomically); returns `path`."""
    return save_figure(attribution_figure(images, maps, titles, mean=mean, std=std), path)


def plot_filters(kernel: Any, path: str, title: str = "") -> str:
    """The `filter_grid` of a first-layer kernel as a PNG at `path`; returns `path`."""
    import matplotlib.pyplot as plt

    grid = filter_grid(kernel)
    fig, ax = plt.subplots(figsize=(5, 5 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return save_figure(fig, path)


def plot_activations(activation: np.ndarray, path: str, title: str = "",
                     max_channels: int = 16) -> str:
    """The first `max_channels` channels of one image's `[h, w, C]` activation, each with its
    own colour scale, as a PNG at `path`; returns `path`."""
    import matplotlib.pyplot as plt

    activation = np.asarray(activation)
    if activation.ndim != 3:
        raise invalid(_OWNER, "activation", f"array of shape {activation.shape}",
                      "expected one image's [h, w, C] feature maps (e.g. activations(...)[layer]"
                      "[i])")
    channels = min(activation.shape[-1], check_positive_int(_OWNER, "max_channels",
                                                            max_channels))
    columns = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.4),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < channels:
            ax.imshow(activation[..., k], cmap="viridis")
            ax.set_title(f"ch {k}", fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
