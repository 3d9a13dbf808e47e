"""Model registry: create any cnnjax architecture by name (timm's `create_model`, in JAX style).

Model modules register factory functions with `@register_model(...)`; importing
`cnnjax.models` imports them all, so `create_model("resnet50", num_classes=10)` works. A model
registered by a module of your own is named `"<module>:<name>"` (`"mypkg.models:mynet"`): every
lookup imports that module first, so a run's config.json names a model any command can reload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_float_dtype,
    check_nhwc_nonempty,
    check_positive_int,
    checked_input_shape,
    invalid,
)

#: Constructor fields the caller (the engine) or flax sets, never offered as hyperparameters.
ENGINE_MODEL_FIELDS = frozenset({"num_classes", "dtype", "axis_name", "parent", "name"})
# ... of which `create_model` callers set these (the engine too: from the dataset and config).
ENGINE_KEYWORDS = ("num_classes", "dtype", "axis_name")
#: How every model declares `ENGINE_KEYWORDS`, for errors naming a model that lacks one.
ENGINE_FIELDS_DOC = ("num_classes: int, dtype: Any = jnp.float32 and axis_name: str | None = "
                     "None, and uses them (docs/conventions.md, \"Fields every model has\")")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model besides how to build it."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # native (height, width, channels), e.g. (224, 224, 3)
    min_input_size: int  # smallest square input side the design admits
    num_classes: int  # default number of classes
    paper: str  # short citation
    task: str = "classification"  # or "detection": what the model's outputs are
    module: str = ""  # the module whose import registered it: "<module>:<name>" lookups import it


#: What a registered model does: classifiers return logits; detectors return raw detection outputs
#: and have `loss(images, gt_boxes, gt_labels, gt_valid)` and `detect(images)` methods.
TASKS = ("classification", "detection", "segmentation")


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    min_input_size: int | None = None,
    num_classes: int = 1000,
    paper: str = "",
    task: str = "classification",
    module: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering `factory(**kwargs) -> nn.Module` under `name`: a model class (or a
    function building one) whose fields include `num_classes`, `dtype` and `axis_name`
    (docs/conventions.md). `min_input_size` defaults to 32, or the native side if smaller;
    `module`, the registering module, to the caller's. Registry names are global: a second
    registration of a name is refused, unless the same module registers it again (a reload).
    The arguments are checked here, where a bad one is written: `None` as a name broke every
    later lookup, and a bad shape or size failed only in training."""
    module = _caller_module() if module is None else module
    _check_name(name)
    shape = checked_input_shape("register_model", input_shape)
    if len(shape) != 3:
        raise invalid("register_model", "input_shape", input_shape,
                      "expected the native (height, width, channels), e.g. (224, 224, 3)")
    if min_input_size is None:
        min_input_size = min(32, *shape[:2])
    smallest = check_positive_int("register_model", "min_input_size", min_input_size,
                                  high=min(shape[:2]), valid=(
                                      "expected a positive int, the smallest square input "
                                      "side the design admits, at most the native input's "
                                      f"{min(shape[:2])} (input_shape={shape})"))
    classes = check_positive_int("register_model", "num_classes", num_classes)
    if not isinstance(paper, str):
        raise invalid("register_model", "paper", paper, "expected a str (a short citation)")
    check_choice("register_model", "task", task, TASKS)

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if isinstance(factory, nn.Module) or not callable(factory):
            shown = (_Shown(f"{type(factory).__name__}(...)")  # a module's repr spans lines
                     if isinstance(factory, nn.Module) else factory)
            raise invalid("register_model", "factory", shown,
                          "expected a model class or a function returning a model (decorate "
                          "the class itself, not an instance)")
        if name in _REGISTRY and not _reregistered(_REGISTRY[name], module, factory):
            raise invalid("register_model", "name", name,
                          f"it is already registered (by {_REGISTRY[name].factory!r} of "
                          f"{_REGISTRY[name].module}); registry names are global: pick "
                          "another name")
        _REGISTRY[name] = ModelInfo(name, factory, shape, smallest, classes, paper, task,
                                    module)
        return factory

    return decorator


def _caller_module(depth: int = 2) -> str:
    """The `__name__` of the module whose code called the function calling this one (`depth`
    frames up): where a `@register_model` is written."""
    return str(sys._getframe(depth).f_globals.get("__name__", ""))


def _reregistered(info: ModelInfo, module: str, factory: Callable[..., nn.Module]) -> bool:
    """Whether `factory` registered by `module` is `info`'s registration made again by a reload
    of its module (`importlib.reload`, a notebook's autoreload): same module, same name."""
    return bool(module) and info.module == module and (
        getattr(factory, "__qualname__", None) == getattr(info.factory, "__qualname__", None))


class _Shown(str):
    """A value named in an error by this text, unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _check_name(name: Any) -> None:
    """A registry name is a non-empty str without whitespace or ':' (which separates a module
    from a name in lookups); a class or function is `@register_model` written without a call."""
    if callable(name):
        raise invalid("register_model", "name", name,
                      'expected a name: write @register_model("mynet", ...) with the name '
                      "(unlike timm, the name is not taken from the function)")
    if not isinstance(name, str) or not name or ":" in name or re.search(r"\s", name):
        raise invalid("register_model", "name", name,
                      'expected a non-empty str without whitespace or ":", e.g. "mynet"')


def check_train(module: nn.Module, train: Any, **rates: float) -> bool:
    """`train` as a bool, checked where a model's `__call__` begins: a string such as "False" is
    truthy and would train. In training, a rate in `rates` (e.g. `dropout_rate=0.5`) above 0
    draws random masks, which needs a 'dropout' PRNG key: without one flax fails inside the
    layer, naming neither the model nor the setting."""
    owner = type(module).__name__
    train = check_bool(owner, "train", train)
    drawn = [f"{field}={rate}" for field, rate in rates.items() if rate > 0]
    if train and drawn and not module.has_rng("dropout"):
        verb = "draws" if len(drawn) == 1 else "draw"
        raise invalid(owner, "train", True, f"{' and '.join(drawn)} {verb} random masks in "
                      "training: pass rngs={'dropout': key} to apply, or train=False")
    return train


def check_images(owner: str, x: Any) -> None:
    """`x` a floating-point NHWC batch with pixels, checked where a model takes images (`__call__`,
    and a detector's `loss` and `detect`): integer images (uint8 0..255) went silently through
    `jnp.asarray(x, dtype)` as unnormalized floats."""
    check_nhwc_nonempty(owner, x)
    _, height, width, channels = x.shape
    if height in (1, 3, 4) and channels > 4 and height < width == channels:  # (N, 3, 224, 224)
        raise invalid(owner, "input.shape", tuple(x.shape),
                      "expected NHWC images (batch, height, width, channels), but this looks "
                      "like NCHW (channels first, PyTorch's layout): pass "
                      "x.transpose(0, 2, 3, 1)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise invalid(owner, "input.dtype", str(x.dtype),
                      "expected floating-point images, normalized as the model was trained "
                      "(cnnjax.data's transforms give float32 (pixels / 255 - mean) / std)")


def check_call(module: nn.Module, x: Any, train: Any, return_features: Any = False,
               first_conv: str | None = None, **rates: float) -> bool:
    """A model's call, checked where its `__call__` begins (before anything is traced):
    `x` a floating-point NHWC batch with pixels, `train` as `check_train` has it, and
    `return_features` a bool (a trunk without that flag, such as `VGGFeatures`, leaves it
    False). Returns `train` as a bool. `first_conv`: the name of a model's first convolution
    when it is a plain `nn.Conv` (see `_check_first_conv_channels`).

    Refused: integer images (uint8 0..255 went silently through `jnp.asarray(x, dtype)` as
    unnormalized floats), and training on a batch of 0 images (nothing to learn from, and
    BatchNorm's statistics of no images are NaN, which replaced the running ones)."""
    owner = type(module).__name__
    check_images(owner, x)
    if first_conv is not None:
        _check_first_conv_channels(module, x, first_conv)
    check_bool(owner, "return_features", return_features)
    train = check_train(module, train, **rates)
    if train and x.shape[0] == 0:
        raise invalid(owner, "train", True, "a batch of 0 images has nothing to train on (and "
                      "BatchNorm's statistics of no images are NaN): pass train=False")
    return train


def _check_first_conv_channels(module: nn.Module, x: Any, first_conv: str) -> None:
    """Refuses images whose channels differ from those the model's first convolution (a flax
    `nn.Conv` submodule named `first_conv`) was initialized for: flax's ScopeParamShapeError,
    no ValueError, named neither the model nor the channels (cnnjax's `Conv2D` checks itself)."""
    if not module.has_variable("params", first_conv):
        return  # Initialization: the convolution is created for this input.
    built = module.get_variable("params", first_conv)["kernel"].shape[-2]
    if built != x.shape[-1]:
        raise invalid(type(module).__name__, "input.shape", tuple(x.shape),
                      f"its parameters were initialized for {built}-channel images (first "
                      f"convolution {first_conv!r}), this input has {x.shape[-1]}; a model takes "
                      "the channel count it was initialized with (a config's data.grey_to_rgb "
                      "feeds grey images as 3 channels)")


def unregister_model(name: str) -> ModelInfo:
    """Removes `name` from the registry and returns its entry (a ValueError if unknown)."""
    info = _lookup(name)
    del _REGISTRY[info.name]
    return info


@contextlib.contextmanager
def registered_model(
    name: str, factory: Callable[..., nn.Module], **info
) -> Iterator[ModelInfo]:
    """Registers `factory` under `name` (keywords as for `register_model`) for the `with` block
    only, e.g. a test-only model that must not stay in `list_models()` for later tests."""
    register_model(name, **{"module": _caller_module(3), **info})(factory)
    try:
        yield _REGISTRY[name]
    finally:
        _REGISTRY.pop(name, None)


#: How an unknown name's error says where a model of your own is found.
_OWN_MODELS = ('a model your own module registers is named "<module>:<name>" '
               '(e.g. "mypkg.models:mynet"), which imports that module first')


def _lookup(name: str) -> ModelInfo:
    """The entry of `name`, or of `"<module>:<name>"` after importing `<module>`, which must be
    the module that registered it (or a package above it)."""
    if not isinstance(name, str):  # difflib would raise a bare TypeError
        raise ValueError(f"create_model: name={name!r} is invalid; expected a str, one of "
                         f"{sorted(_REGISTRY)}")
    qualified = ":" in name
    module, key = name.split(":", 1) if qualified else ("", name)
    if qualified:
        if not module or not key or ":" in key:
            raise UnknownModelError(name, 'expected "<module>:<name>", a module path and a '
                                          'registered name joined by one ":", e.g. '
                                          '"mypkg.models:mynet"')
        _import_registering_module(name, module)
    if key not in _REGISTRY:
        close = _close_names(key)
        hint = f"did you mean {close}? " if close else ""
        where = (f"module {module!r} registers no model {key!r}; " if qualified else "")
        raise UnknownModelError(name, f"{where}{hint}valid names: {sorted(_REGISTRY)}; "
                                      f"{_OWN_MODELS}")
    info = _REGISTRY[key]
    if qualified and not (info.module == module or info.module.startswith(module + ".")):
        raise UnknownModelError(name, f"module {module!r} registers no model {key!r}; "
                                      f"{info.module} does: name it {reloadable_name(key)!r}")
    return info


def _import_registering_module(name: str, module: str) -> None:
    """Imports `module`, whose `@register_model` calls register the model `name` names; a module
    that is not found here is an `UnknownModelError` saying so. An error inside the module
    (one of its own imports missing too) is raised as it is, with its traceback."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if not (err.name == module or module.startswith(f"{err.name}.")):
            raise
        raise UnknownModelError(name, f"its module {module!r} cannot be imported here "
                                      f"({type(err).__name__}: {err}); install its package "
                                      "or add its directory to PYTHONPATH") from None


class UnknownModelError(ValueError):
    """A model name the registry does not hold; `valid` (close matches, then every name) lets a
    CLI name its own flag with the same advice."""

    def __init__(self, name: str, valid: str | None = None):
        # One argument: the whole message, as ml_collections re-raises an error from a config
        # file (`type(err)(text)`).
        message = name if valid is None else f"create_model: unknown model name={name!r}; {valid}"
        super().__init__(message)
        self.valid = message if valid is None else valid


def reloadable_name(name: str) -> str:
    """The name of model `name` that any process finds: `"<module>:<name>"` for one a module
    outside cnnjax registered (a process importing only cnnjax, such as a command reloading a
    run, would not find its plain name), the plain name for cnnjax's own."""
    info = _lookup(name)
    own = info.module.split(".")[0] in ("cnnjax", "")  # "": an entry made without register_model
    return info.name if own else f"{info.module}:{info.name}"


def _close_names(name: str) -> list[str]:
    """Up to 5 registered names like `name`, compared lowercased without '-' and '_' (so
    `ResNet-18` finds `resnet18`), keeping only the best and near-best matches: a looser cutoff
    offered alexnet, googlenet and two densenets for `lenet6`."""
    def key(text: str) -> str:
        return re.sub(r"[-_]", "", text.lower())

    scored = sorted(((difflib.SequenceMatcher(None, key(name), key(n)).ratio(), n)
                     for n in _REGISTRY), key=lambda pair: (-pair[0], pair[1]))
    best = scored[0][0] if scored else 0.0
    return [n for ratio, n in scored if ratio >= max(0.7, best - 0.05)][:5]


def model_info(name: str) -> ModelInfo:
    """Returns the registry entry for `name` (a ValueError lists close matches and all names)."""
    return _lookup(name)


def min_input_size(name: str, model: nn.Module) -> int:
    """The smallest square input side `model`, built by `create_model(name, ...)`, admits: its
    own `smallest_input()` where its settings decide (DenseNet's stem), else the registry's
    figure for `name`'s default settings."""
    own = getattr(model, "smallest_input", None)
    return int(own()) if callable(own) else _lookup(name).min_input_size


class ModelArgumentError(ValueError):
    """A keyword `create_model` was given that the model does not take or its name fixes."""

    def __init__(self, message: str, keyword: str):
        super().__init__(message)
        self.keyword = keyword  # the rejected keyword argument


class ModelField(NamedTuple):
    """A constructor field of a model a caller may set: its default and its type annotation."""

    default: Any
    annotation: Any


def build_variant(variant: functools.partial, kwargs: dict[str, Any]) -> nn.Module:
    """Builds a registered variant, a `functools.partial` of a model class: the fields the
    partial sets are the ones its name fixes, so passing one in `kwargs` raises the
    duplicate-keyword TypeError `create_model` reports as a `ModelArgumentError` (calling the
    partial itself would let it override them: resnet18 with `stage_sizes` of a ResNet-34)."""
    return variant.func(*variant.args, **variant.keywords, **kwargs)


def settable_fields(name: str) -> dict[str, ModelField]:
    """The constructor fields of model `name` that `create_model(name, field=...)` accepts, in
    declaration order: not those its registered name fixes (resnet20_cifar's `depth`), nor
    `ENGINE_MODEL_FIELDS`. Found by building the default model and probing the factory."""
    factory = _lookup(name).factory
    module, base = _build_with_defaults(name)
    fields: dict[str, ModelField] = {}
    for field in dataclasses.fields(module):
        if field.name in ENGINE_MODEL_FIELDS:
            continue
        value = getattr(module, field.name)
        try:
            factory(**base, **{field.name: value})
        except (TypeError, KeyError):  # the factory sets this field itself (e.g. depth=20)
            continue
        fields[field.name] = ModelField(value, field.type)
    return fields


def create_model(name: str, /, **overrides) -> nn.Module:
    """Builds the registered model `name`; overrides (num_classes, dtype, ...) go to its factory.

    A keyword the model does not have, or one its name fixes (`create_model("resnet20_cifar",
    depth=32)`), raises a `ModelArgumentError` (a ValueError) listing the settable fields.
    """
    info = _lookup(name)
    overrides.setdefault("num_classes", info.num_classes)
    # Fields every architecture passes down unchecked: a bad one failed only at init, in flax's
    # or Python's words ("'str' object is not callable"), naming neither the model nor the field.
    if "dtype" in overrides:
        check_float_dtype(name, "dtype", overrides["dtype"], computable=True)
    if "axis_name" in overrides:
        _check_axis_name(name, overrides["axis_name"])
    if "act" in overrides and not callable(overrides["act"]) and "act" in settable_fields(name):
        raise invalid(name, "act", overrides["act"],
                      "expected a callable activation such as flax.linen.relu (a Python "
                      "function: it cannot come from a command line or JSON config)")
    try:
        return info.factory(**overrides)
    except TypeError as err:
        bad = _rejected_keyword(str(err), overrides)
        if bad is None:
            raise
    # Outside the `except`: there CPython 3.11 turns the probes' duplicate-keyword TypeErrors
    # into KeyErrors.
    missing = missing_engine_fields(name)
    if bad in missing:  # the model breaks the convention: no keyword of the caller's can mend it
        raise ModelArgumentError(str(invalid(
            "create_model", bad, overrides[bad],
            f"model {name!r} lacks the {field_list(missing)}, which every model declares: "
            f"{ENGINE_FIELDS_DOC}"
        )), bad)
    refused = f"model {name!r} does not take {bad!r} (unknown, or fixed by its name)"
    try:
        fields = settable_fields(name)
    except Exception as probe:  # a factory that needs more than num_classes: no list to offer
        raise ModelArgumentError(str(invalid(
            "create_model", bad, overrides[bad],
            f"{refused}; its settable fields cannot be listed, as building it with only "
            f"num_classes raised {type(probe).__name__}: {probe}")), bad) from probe
    settable = [*sorted(fields), *(k for k in ENGINE_KEYWORDS if k not in missing)]
    close = difflib.get_close_matches(bad, settable, n=1, cutoff=0.8)  # not param_dtype -> dtype
    hint = f' Did you mean "{close[0]}"?' if close else ""
    raise ModelArgumentError(str(invalid(
        "create_model", bad, overrides[bad], f"{refused}; it takes {settable}.{hint}")), bad)


def missing_engine_fields(name: str) -> list[str]:
    """The `ENGINE_KEYWORDS` model `name` does not declare as fields, in that order: read from its
    class where the factory is one (or a partial of one), else from the model its factory builds
    with default settings ([] when it cannot build one so)."""
    factory = _lookup(name).factory
    while isinstance(factory, functools.partial):
        factory = factory.func
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        declared = {field.name for field in dataclasses.fields(factory)}
    else:
        try:
            module, _ = _build_with_defaults(name)
        except Exception:  # it needs more than num_classes: leave the refused keyword to the caller
            return []
        declared = {field.name for field in dataclasses.fields(module)}
    return [key for key in ENGINE_KEYWORDS if key not in declared]


def field_list(names: list[str]) -> str:
    """`names` as an English phrase for an error: "field 'a'", "fields 'a', 'b' and 'c'"."""
    quoted = [repr(name) for name in names]
    if len(quoted) == 1:
        return f"field {quoted[0]}"
    return f"fields {', '.join(quoted[:-1])} and {quoted[-1]}"


def _build_with_defaults(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Model `name` built with its registered class count (a field without default), or with no
    arguments for a factory refusing `num_classes` (a model lacking the field: `create_model`'s
    error names it), and the keywords it was built with; the first build's error if neither."""
    info = _lookup(name)
    base = {"num_classes": info.num_classes}
    try:
        return info.factory(**base), base
    except TypeError as with_classes:
        try:
            return info.factory(), {}
        except TypeError:
            raise with_classes from None


def _check_axis_name(model: str, axis_name: object) -> None:
    """BatchNorm's cross-device axis must be None or a mapped axis's name: an int was taken as an
    array axis at the first train-mode call ("axis 5 is out of bounds for array of dimension 0")."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if axis_name is not None and not (names and all(isinstance(n, str) and n for n in names)):
        raise invalid(model, "axis_name", axis_name,
                      'expected None (no cross-device BatchNorm sync) or the name of the pmap / '
                      'shard_map axis, a non-empty str such as "batch" (or a tuple of them)')


def _rejected_keyword(message: str, overrides: dict) -> str | None:
    """The keyword a factory's TypeError `message` names as unexpected or duplicated, if it is
    one of `overrides`; None for any other TypeError (a genuine error, re-raised)."""
    match = re.search(r"(?:unexpected keyword argument|multiple values for (?:keyword )?argument)"
                      r" '(\w+)'", message)
    return match.group(1) if match and match.group(1) in overrides else None


def list_models(pattern: str = "*", task: str | None = "classification") -> list[str]:
    """Sorted registered names matching a shell-style `pattern` (e.g. "resnet*") of one `task`.

    The default lists the classifiers (the classifier tests iterate over them);
    `task="detection"` lists the detectors, `task="segmentation"` the FCNs, `task=None` every
    model.
    """
    if not isinstance(pattern, str):  # fnmatch would raise a bare TypeError
        raise invalid("list_models", "pattern", pattern,
                      'expected a shell-style str such as "resnet*" or "*"')
    if task is not None:
        check_choice("list_models", "task", task, TASKS)
    return sorted(n for n, info in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (task is None or info.task == task))
