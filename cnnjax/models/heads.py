"""Transfer learning: swap a model's classifier for a new number of classes, freeze the rest.

Every cnnjax classification model names its final classifier `head` and has a `num_classes`
field, so `replace_head` works for all of them: it clones the model with the new `num_classes`,
re-initializes the head (`head`; FCN's skip-score and upsampling layers; GoogLeNet's auxiliary
heads) with the model's own initializers, and copies every other parameter and all BatchNorm
statistics unchanged. `trainable_mask` / `freeze_backbone`
then restrict training to the new head (linear probing) or leave everything trainable
(fine-tuning); `backbone_eval_mode` also runs the backbone's BatchNorm and dropout layers in eval
mode while the model trains (the linear-evaluation protocol's frozen backbone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from cnnjax.layers.regularization import DropPath
from cnnjax.models.registry import list_models, model_info
from cnnjax.utils.validation import check_bool, check_positive_int, invalid

Array = Any

#: Top-level parameter names that belong to the task head: the classifier `head` of every model
#: and FCN's class-dependent skip-score and upsampling layers.
HEAD_MODULES = ("head", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore_final")


def _native_input_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """Distinct native inputs (H, W, C) of the registry entries that build `type(model)`."""
    shapes: list[tuple[int, int, int]] = []
    for info in map(model_info, list_models() + list_models(task="segmentation")):
        try:
            built = info.factory(num_classes=info.num_classes)
        except (TypeError, ValueError):  # a factory that cannot be built this way: skip it
            continue
        if type(built) is type(model) and info.input_shape not in shapes:
            shapes.append(info.input_shape)
    return shapes


def _shapes(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten_dict(unfreeze(tree)).items()}


def _matching_sample_input(model: nn.Module, variables: Mapping[str, Any], rng: Array,
                           candidates: Sequence[Array]) -> Array:
    """The first of `candidates` at which `model.init` gives `variables`' leaves and shapes (the
    input they were initialized for), else a ValueError saying what differs: the collections,
    the leaves (another architecture) or only their shapes (another input shape)."""
    old_shapes = _shapes(variables)
    expected: dict = {}
    for x in candidates:
        expected = _shapes(jax.eval_shape(model.init, rng, x))
        if expected == old_shapes:
            return x
    collections = sorted({k[0] for k in expected})
    if expected and collections != sorted(variables):
        raise invalid(  # e.g. params alone for a BatchNorm model: not an input-shape issue
            "replace_head", "variables", f"collections {sorted(variables)}",
            f"expected the model's collections {collections} (all of model.init's output)")
    missing = sorted(set(expected) - set(old_shapes))
    extra = sorted(set(old_shapes) - set(expected))
    if missing or extra:  # other leaves at any input size: another architecture
        leaf, where = (missing[0], "the model has but the variables lack") if missing else (
            extra[0], "the variables have but the model lacks")
        raise invalid(
            "replace_head", "variables", type(model).__name__,
            f"they are not this model's: {'/'.join(leaf)} is a leaf {where} "
            f"({len(missing)} such, {len(extra)} the other way); pass the model the "
            "variables came from")
    tried = [tuple(x.shape) for x in candidates]
    differing = next(k for k in sorted(expected) if expected[k] != old_shapes[k])
    raise invalid(
        "replace_head",
        "variables",
        type(model).__name__,
        f"they do not match the model at input shapes {tried} ({'/'.join(differing)}: "
        f"{old_shapes[differing]} in the variables, {expected[differing]} in the model); "
        "pass the sample_input the model was initialized with",
    )


def replace_head(
    model: nn.Module,
    variables: Mapping[str, Any],
    num_classes: int,
    rng: Array,
    sample_input: Array | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Returns `(new_model, new_variables)` for `num_classes` outputs.

    `new_model` is `model.clone(num_classes=num_classes)`. In `new_variables` the head (the
    modules `trainable_mask` trains in a linear probe: `head`, FCN's score and upsampling
    layers, GoogLeNet's `aux1/head` and `aux2/head`) and any other leaf whose shape depends on
    `num_classes` are freshly initialized from `rng` with the model's own initializers, also
    when `num_classes` is unchanged; every other leaf of every collection is the same array as
    in `variables`. `sample_input` is an input the model accepts (only its shape matters); by
    default the registered native input shapes of the model's class are tried in turn.

    Raises ValueError if `num_classes` is not a positive int, if `variables` has no `head`, or
    if `variables` does not fit `model` at the sample input's shape.
    """
    check_positive_int("replace_head", "num_classes", num_classes)
    if not hasattr(model, "num_classes"):
        raise invalid("replace_head", "model", type(model).__name__, "expected a num_classes field")
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    if "head" not in params:
        raise invalid(
            "replace_head",
            "variables",
            f"params keys {sorted(params)}",
            "expected a 'head' submodule (the final classifier) in variables['params']",
        )
    if sample_input is None:
        candidates = [jnp.zeros((1, *shape), jnp.float32) for shape in _native_input_shapes(model)]
    else:
        candidates = [sample_input]
    sample_input = _matching_sample_input(model, variables, rng, candidates)

    new_model = model.clone(num_classes=num_classes)
    new_shapes = _shapes(jax.eval_shape(new_model.init, rng, sample_input))
    old_shapes = _shapes(variables)
    fresh_keys = sorted(
        k
        for k, shape in new_shapes.items()
        if (k[0] == "params" and _in_head(k[1:], HEAD_MODULES)) or shape != old_shapes[k]
    )

    # Only the fresh leaves are outputs, so XLA prunes the initialization of everything else.
    def init_fresh(key: Array) -> list[Array]:
        flat = flatten_dict(unfreeze(new_model.init(key, sample_input)))
        return [flat[k] for k in fresh_keys]

    fresh = dict(zip(fresh_keys, jax.jit(init_fresh)(rng), strict=True))
    flat_old = flatten_dict(unfreeze(variables))
    new_flat = {k: fresh.get(k, flat_old[k]) for k in new_shapes}
    return new_model, unflatten_dict(new_flat)


def trainable_mask(
    params: Mapping[str, Any],
    train_backbone: bool = False,
    head_names: Sequence[str] = HEAD_MODULES,
) -> Any:
    """A pytree of bools like `params`: True for leaves to train.

    With `train_backbone=False` only the top-level submodules named in `head_names` (the
    classifier `head`; FCN's score/upsampling layers) and every nested module named `head` (the
    final layers of GoogLeNet's auxiliary classifiers, `aux1/head` and `aux2/head`, whose shapes
    follow num_classes too) are trainable; with True every leaf is. Use it as an optax mask
    (`optax.masked`) or through `freeze_backbone`.
    """
    check_bool("trainable_mask", "train_backbone", train_backbone)
    if not train_backbone and not any(name in params for name in head_names):
        raise invalid(
            "trainable_mask",
            "params",
            f"top-level keys {sorted(params)}",
            f"expected at least one head submodule among {list(head_names)}",
        )
    flat = flatten_dict(unfreeze(params))
    mask = {k: bool(train_backbone or _in_head(k, head_names)) for k in flat}
    return unflatten_dict(mask)


def _in_head(path: tuple[str, ...], head_names: Sequence[str]) -> bool:
    """Whether the parameter at `path` belongs to the head: a top-level module in `head_names`
    or any nested module named `head` (GoogLeNet's `aux1/head`, `aux2/head`)."""
    return path[0] in head_names or in_head_module(path[:-1], head_names)


def in_head_module(module_path: Sequence[str], head_names: Sequence[str] = HEAD_MODULES) -> bool:
    """Whether the module at `module_path` (its names from the model's root, flax's
    `Module.path`) is a head module of `trainable_mask` or lies inside one."""
    return bool(module_path) and (module_path[0] in head_names or "head" in module_path[1:])


#: The layers whose training behaviour `backbone_eval_mode` switches off, with the flag (a
#: field or the call's second argument) that puts each in eval mode when True.
EVAL_MODE_FLAGS: tuple[tuple[type, str], ...] = (
    (nn.BatchNorm, "use_running_average"),  # cnnjax's BatchNorm and MaskedBatchNorm included
    (nn.Dropout, "deterministic"),
    (DropPath, "deterministic"),
)


@contextlib.contextmanager
def backbone_eval_mode(head_names: Sequence[str] = HEAD_MODULES) -> Iterator[None]:
    """Within the block, every BatchNorm, Dropout and DropPath outside the head modules
    (`in_head_module`) runs in eval mode even when the model is applied with `train=True`:
    BatchNorm normalizes with its running statistics and leaves them unchanged, dropout and
    stochastic depth are identities. The head's own layers keep the model's mode.

    This is a linear probe's frozen backbone in the linear-evaluation protocol (MoCo's
    `main_lincls.py`: `model.eval()`, only the classifier trained). Like `conv_impl`, it acts
    when a function is traced, so wrap the tracing; the flag is set for each call only (a field
    given at construction is restored afterwards, one given as the call's argument replaced).
    """

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict,
                    context: nn.module.InterceptorContext) -> Any:
        module = context.module
        flag = next((name for cls, name in EVAL_MODE_FLAGS if isinstance(module, cls)), None)
        if (flag is None or context.method_name != "__call__"
                or in_head_module(module.path, head_names)):
            return next_fun(*args, **kwargs)
        # flax's merge_param refuses a flag given both as field and argument: set whichever
        # of the two the model gave (both left None is flax's own error, unchanged).
        if len(args) > 1 and args[1] is not None:
            args = (args[0], True, *args[2:])
        elif kwargs.get(flag) is not None:
            kwargs = {**kwargs, flag: True}
        own = getattr(module, flag)
        if own is None:
            return next_fun(*args, **kwargs)
        object.__setattr__(module, flag, True)  # modules are frozen dataclasses; restored below
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, flag, own)

    with nn.intercept_methods(interceptor):
        yield


def freeze_backbone(
    tx: optax.GradientTransformation,
    params: Mapping[str, Any],
    head_names: Sequence[str] = HEAD_MODULES,
) -> optax.GradientTransformation:
    """Wraps `tx` so only the head is updated; backbone updates are exactly zero, so
    `optax.apply_updates` leaves the backbone bitwise unchanged.

    (Backbone BatchNorm statistics still update in `train=True` mode, and backbone dropout stays
    on; apply the model inside `backbone_eval_mode` to freeze those too.)
    """
    mask = trainable_mask(params, train_backbone=False, head_names=head_names)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": _keep()}, labels)


def _keep() -> optax.GradientTransformation:
    """Updates of -0.0: p + (-0.0) is p bitwise for every p, where optax.set_to_zero's +0.0
    turned a parameter of -0.0 into +0.0 (IEEE: -0.0 + 0.0 = +0.0)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u: jnp.full_like(u, -0.0), updates))
