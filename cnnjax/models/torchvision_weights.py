"""torchvision ImageNet checkpoints as cnnjax variables and warm-start workdirs (transfer learning).

cnnjax never downloads weights, but a torchvision checkpoint on disk (`resnet50-0676ba61.pth`, a
`state_dict`) can be converted: `convert_state_dict(model_name, state_dict)` maps every tensor by
an explicit per-architecture name table onto the cnnjax model of the same layout and returns its
`{"params", "batch_stats"}`; `write_warm_start_workdir` stores them as a step-0 orbax checkpoint
with the engine's own `Checkpointer`, so `--config.init_from.workdir=<that dir>` fine-tunes from
them in any experiment (head excluded by default). The command line does both:

    python -m cnnjax.models.torchvision_weights --model=resnet50 \\
        --weights=/path/resnet50-0676ba61.pth --workdir=workdirs/pretrained/resnet50

Layouts: conv weights OIHW -> HWIO; linear (out, in) -> (in, out); BatchNorm weight / bias /
running_mean / running_var -> params scale / bias, batch_stats mean / var (`num_batches_tracked`
is ignored: flax BatchNorm uses a fixed momentum). VGG's fc6 and AlexNet's fc6 read a flattened
map, in (c, h, w) order in torch and (h, w, c) in cnnjax, so their rows are permuted too. Both
sides use the same BatchNorm epsilon (1e-5; 1e-3 in GoogLeNet) and momentum (flax 0.9 = torch
0.1).

Preprocessing: torchvision's weights expect RGB in [0, 1] normalized by the ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); cnnjax's `imagenet2012` / `imagenette`
presets use exactly these (`cnnjax.data.presets.IMAGENET_MEAN/STD`, RGB from tfds), with TF's
antialiased bilinear resize instead of PIL's (a small pixel-level difference). Other presets
normalize with their own dataset's statistics (e.g. CIFAR-10's), not ImageNet's. torchvision's
googlenet weights (ported from TensorFlow) expect [-1, 1] input instead: torchvision builds that
model with `transform_input=True`, which rescales the ImageNet-normalized input, and so must the
cnnjax model (`pretrained_model_kwargs(name)` lists such settings; the command prints them).

Supported: `SUPPORTED_MODELS`, the cnnjax models torchvision checkpoints convert to;
`TORCHVISION_BUILDERS` names the torchvision builder (`torchvision.models.<builder>`) of each: the
same name, except that torchvision's `googlenet` converts to cnnjax's `googlenet_bn` (cnnjax's
`googlenet` is the paper's network). Not convertible: `UNSUPPORTED_MODELS` says why for each
cnnjax model that resembles a torchvision one. Torch keys that are read but not converted:
`IGNORED_SUFFIXES` (every model) and `IGNORED_PREFIXES` (per model), with the reasons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cnnjax.models.registry import create_model, model_info
from cnnjax.utils.files import check_output_dir, write_json
from cnnjax.utils.validation import invalid, listed

#: Torch keys ending in these are read and dropped, with the reason.
IGNORED_SUFFIXES: dict[str, str] = {
    "num_batches_tracked": "BatchNorm's update counter; flax BatchNorm uses a fixed momentum "
    "(torch's momentum=None cumulative average has no counterpart)",
}

#: Per cnnjax model: torch key prefixes that are read and dropped, with the reason.
IGNORED_PREFIXES: dict[str, dict[str, str]] = {
    "googlenet_bn": {
        prefix: "torchvision's googlenet auxiliary classifier: training-only, and not trained in "
        "torchvision's published checkpoint (which has them; torchvision warns they are NOT "
        "pretrained); the converted model is googlenet_bn without aux heads (aux_logits=False). "
        "To fine-tune with aux_logits=True, also exclude aux1 and aux2 from the warm start "
        "(--config.init_from.exclude=\"('head', 'aux1', 'aux2')\") so they start fresh"
        for prefix in ("aux1.", "aux2.")
    },
}

#: The key prefix of a state_dict saved from a DataParallel / DistributedDataParallel wrapper.
WRAPPER_PREFIX = "module."

#: cnnjax models that resemble a torchvision model but whose layout differs, and why.
UNSUPPORTED_MODELS: dict[str, str] = {
    "googlenet": "cnnjax's googlenet is the paper's network (conv with bias, 5x5 branch, LRN, no "
    "BatchNorm), torchvision's googlenet is a BatchNorm variant (conv without bias + BatchNorm "
    "eps 1e-3 everywhere, 3x3 kernels in the '5x5' branch, no LRN, transform_input): convert "
    "torchvision's googlenet to model 'googlenet_bn', which has its layout",
    "alexnet_2tower": "torchvision only has the single-tower alexnet (use model 'alexnet')",
    "zfnet": "torchvision has no ZFNet",
    "vgg11_lrn": "torchvision has no VGG configuration A-LRN (vgg11 with LRN after conv1_1)",
    "vgg16_c": "torchvision has no VGG configuration C (1x1 convolutions in blocks 3-5)",
}


# ------------------------------------------------------------------------------- leaf layouts
@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one torch tensor becomes one cnnjax leaf, and the torch shape a cnnjax shape needs."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    ndim: int


def _flatten_chw_dense(channels: int) -> _Layout:
    """A linear layer on a flattened (c, h, w) map: rows permuted to cnnjax's (h, w, c) order."""

    def to_flax(w: np.ndarray) -> np.ndarray:
        out, fan_in = w.shape  # shape already checked: channels * side * side inputs
        side = math.isqrt(fan_in // channels)
        chw = w.reshape(out, channels, side, side)
        return chw.transpose(2, 3, 1, 0).reshape(fan_in, out)

    return _Layout(f"linear on a flattened ({channels}, h, w) map", to_flax,
                   lambda s: (s[1], s[0]), 2)


_CONV = _Layout("conv OIHW -> HWIO", lambda w: w.transpose(2, 3, 1, 0),
                lambda s: (s[3], s[2], s[0], s[1]), 4)
_DENSE = _Layout("linear (out, in) -> (in, out)", lambda w: w.T, lambda s: (s[1], s[0]), 2)
_VECTOR = _Layout("vector", lambda w: w, lambda s: s, 1)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One torch tensor -> one cnnjax leaf (`collection`, `path`)."""

    torch_key: str
    collection: str
    path: tuple[str, ...]
    layout: _Layout

    @property
    def target(self) -> str:
        return "/".join((self.collection, *self.path))


def _conv(torch_name: str, path: str, bias: bool) -> list[_Leaf]:
    leaves = [_Leaf(f"{torch_name}.weight", "params", (*path.split("/"), "kernel"), _CONV)]
    if bias:
        leaves.append(_Leaf(f"{torch_name}.bias", "params", (*path.split("/"), "bias"), _VECTOR))
    return leaves


def _dense(torch_name: str, path: str, layout: _Layout = _DENSE) -> list[_Leaf]:
    return [_Leaf(f"{torch_name}.weight", "params", (path, "kernel"), layout),
            _Leaf(f"{torch_name}.bias", "params", (path, "bias"), _VECTOR)]


def _bn(torch_name: str, path: str) -> list[_Leaf]:
    p = tuple(path.split("/"))
    return [_Leaf(f"{torch_name}.weight", "params", (*p, "scale"), _VECTOR),
            _Leaf(f"{torch_name}.bias", "params", (*p, "bias"), _VECTOR),
            _Leaf(f"{torch_name}.running_mean", "batch_stats", (*p, "mean"), _VECTOR),
            _Leaf(f"{torch_name}.running_var", "batch_stats", (*p, "var"), _VECTOR)]


# ------------------------------------------------------------------ per-architecture tables
def _resnet_leaves(model: nn.Module) -> list[_Leaf]:
    """torchvision `resnet*` (v1.5, downsample = 1x1 conv + BN) -> `cnnjax.models.resnet`."""
    from cnnjax.models.resnet import BottleneckBlock

    bottleneck = issubclass(model.block_cls, BottleneckBlock)
    leaves = _conv("conv1", "conv_init", bias=False) + _bn("bn1", "bn_init")
    for i, num_blocks in enumerate(model.stage_sizes):
        for j in range(num_blocks):
            t, c = f"layer{i + 1}.{j}", f"stage{i + 1}_block{j + 1}"
            for k in range(1, 4 if bottleneck else 3):
                leaves += _conv(f"{t}.conv{k}", f"{c}/conv{k}", bias=False)
                leaves += _bn(f"{t}.bn{k}", f"{c}/bn{k}")
            if j == 0 and (i > 0 or bottleneck):  # the block changes the shape: projection
                leaves += _conv(f"{t}.downsample.0", f"{c}/proj_conv", bias=False)
                leaves += _bn(f"{t}.downsample.1", f"{c}/proj_bn")
    return leaves + _dense("fc", "head")


def _vgg_leaves(model: nn.Module) -> list[_Leaf]:
    """torchvision `vgg*` / `vgg*_bn` (`features.<i>` Sequential, `classifier.0/3/6`)."""
    leaves: list[_Leaf] = []
    index = 0
    for b, block in enumerate(model.stages, start=1):
        for i in range(1, len(block) + 1):
            leaves += _conv(f"features.{index}", f"features/conv{b}_{i}", bias=True)
            if model.batch_norm:
                leaves += _bn(f"features.{index + 1}", f"features/bn{b}_{i}")
            index += 3 if model.batch_norm else 2  # conv (, bn), relu
        index += 1  # the block's max pool
    leaves += _dense("classifier.0", "fc6", _flatten_chw_dense(model.stages[-1][-1]))
    return leaves + _dense("classifier.3", "fc7") + _dense("classifier.6", "head")


def _alexnet_leaves(model: nn.Module) -> list[_Leaf]:
    """torchvision `alexnet` (`features.0/3/6/8/10`, `classifier.1/4/6`)."""
    leaves: list[_Leaf] = []
    for n, index in enumerate((0, 3, 6, 8, 10), start=1):
        leaves += _conv(f"features.{index}", f"conv{n}", bias=True)
    leaves += _dense("classifier.1", "fc6", _flatten_chw_dense(model.widths[-1]))
    return leaves + _dense("classifier.4", "fc7") + _dense("classifier.6", "head")


def _densenet_leaves(model: nn.Module) -> list[_Leaf]:
    """torchvision `densenet*` (`features.conv0/norm0/denseblock<i>/transition<i>/norm5`)."""
    leaves = _conv("features.conv0", "conv_init", bias=False) + _bn("features.norm0", "bn_init")
    for i, num_layers in enumerate(model.block_sizes, start=1):
        for j in range(1, num_layers + 1):
            t, c = f"features.denseblock{i}.denselayer{j}", f"block{i}/layer{j}"
            for k in (1, 2):
                leaves += _bn(f"{t}.norm{k}", f"{c}/bn{k}")
                leaves += _conv(f"{t}.conv{k}", f"{c}/conv{k}", bias=False)
        if i < len(model.block_sizes):
            leaves += _bn(f"features.transition{i}.norm", f"transition{i}/bn")
            leaves += _conv(f"features.transition{i}.conv", f"transition{i}/conv", bias=False)
    return leaves + _bn("features.norm5", "bn_final") + _dense("classifier", "head")


def _googlenet_bn_leaves(model: nn.Module) -> list[_Leaf]:
    """torchvision `googlenet` -> `cnnjax.models.googlenet.GoogLeNetBN` (no aux heads).

    Every `BasicConv2d` `<t>` is `<t>.conv` + `<t>.bn`. Stem `conv1/conv2/conv3` -> `conv1`,
    `conv2_reduce`, `conv2` (the paper model's names); in each `inception<i>`, `branch1`,
    `branch2.0/.1`, `branch3.0/.1`, `branch4.1` (after the pool) -> `branch1x1`,
    `branch3x3_reduce`/`branch3x3`, `branch5x5_reduce`/`branch5x5`, `pool_proj`; `fc` -> `head`.
    The auxiliary classifiers `aux1.*`/`aux2.*` are dropped (`IGNORED_PREFIXES`).
    """
    from cnnjax.models.googlenet import INCEPTION_V1

    def basic(torch_name: str, path: str) -> list[_Leaf]:
        return (_conv(f"{torch_name}.conv", f"{path}/conv", bias=False)
                + _bn(f"{torch_name}.bn", f"{path}/bn"))

    leaves = basic("conv1", "conv1") + basic("conv2", "conv2_reduce") + basic("conv3", "conv2")
    branches = {"branch1": "branch1x1", "branch2.0": "branch3x3_reduce", "branch2.1": "branch3x3",
                "branch3.0": "branch5x5_reduce", "branch3.1": "branch5x5",
                "branch4.1": "pool_proj"}
    for name in INCEPTION_V1:
        for t, c in branches.items():
            leaves += basic(f"inception{name}.{t}", f"inception{name}/{c}")
    return leaves + _dense("fc", "head")


# torchvision's own fix-up for its published DenseNet files ("norm.1" -> "norm1", ...).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_old_densenet_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames the keys of torchvision's published DenseNet checkpoints (`...norm.1.weight`,
    saved before PyTorch 0.4) to the module names (`...norm1.weight`), as torchvision does."""
    renamed = {}
    for key, value in state_dict.items():
        match = _OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


@dataclasses.dataclass(frozen=True)
class _Architecture:
    leaves: Callable[[nn.Module], list[_Leaf]]
    head: str  # torch module of the classifier (its weight gives num_classes)
    rename: Callable[[Mapping[str, Any]], Mapping[str, Any]] = dict
    # torchvision's builder, where its name is not the cnnjax model's.
    torchvision_name: str | None = None
    # cnnjax model keywords that reproduce torchvision's pretrained model (settings torchvision
    # itself changes when it loads its weights).
    pretrained_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_RESNET = _Architecture(_resnet_leaves, "fc")
_VGG = _Architecture(_vgg_leaves, "classifier.6")
_DENSENET = _Architecture(_densenet_leaves, "classifier", _rename_old_densenet_keys)

_ARCHITECTURES: dict[str, _Architecture] = {
    **{f"resnet{d}": _RESNET for d in (18, 34, 50, 101, 152)},
    **{f"vgg{d}{bn}": _VGG for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    "alexnet": _Architecture(_alexnet_leaves, "classifier.6"),
    **{f"densenet{d}": _DENSENET for d in (121, 161, 169, 201)},
    "googlenet_bn": _Architecture(_googlenet_bn_leaves, "fc", torchvision_name="googlenet",
                                  pretrained_kwargs={"transform_input": True}),
}

#: cnnjax models that torchvision checkpoints convert to.
SUPPORTED_MODELS: tuple[str, ...] = tuple(sorted(_ARCHITECTURES))

#: cnnjax model -> the torchvision builder (`torchvision.models.<name>`) whose checkpoints convert
#: to it: the same name but for `googlenet_bn` (torchvision's `googlenet`).
TORCHVISION_BUILDERS: dict[str, str] = {
    name: arch.torchvision_name or name for name, arch in sorted(_ARCHITECTURES.items())
}


# --------------------------------------------------------------------------------- conversion
def _without_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drops `WRAPPER_PREFIX` when every key has it (a model saved inside `nn.DataParallel` or
    `DistributedDataParallel`), as torch's `consume_prefix_in_state_dict_if_present` does."""
    if not state_dict or not all(k.startswith(WRAPPER_PREFIX) for k in state_dict):
        return state_dict
    return {k[len(WRAPPER_PREFIX):]: v for k, v in state_dict.items()}


def _architecture(model_name: Any) -> _Architecture:
    owner = "torchvision_weights"
    if not isinstance(model_name, str):  # e.g. a list: unhashable, `in` would raise TypeError
        raise invalid(owner, "model", model_name, f"expected one of {list(SUPPORTED_MODELS)}")
    if model_name in _ARCHITECTURES:
        return _ARCHITECTURES[model_name]
    if model_name in UNSUPPORTED_MODELS:
        raise invalid(owner, "model", model_name,
                      f"it cannot take torchvision weights: {UNSUPPORTED_MODELS[model_name]}; "
                      f"supported models: {list(SUPPORTED_MODELS)}")
    raise invalid(owner, "model", model_name, f"expected one of {list(SUPPORTED_MODELS)}")


def pretrained_model_kwargs(model_name: str) -> dict[str, Any]:
    """Keywords the cnnjax model needs to reproduce torchvision's pretrained `model_name` (e.g.
    `{"transform_input": True}` for `googlenet_bn`; `{}` for most), for `create_model` or
    `--config.model_kwargs.<field>`: torchvision sets them itself when it loads its weights."""
    return dict(_architecture(model_name).pretrained_kwargs)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in np.shape(value))


def _float32(owner: str, key: str, value: Any) -> np.ndarray:
    """A state_dict value (NumPy array or CPU tensor: bfloat16 and gradient-tracking tensors
    included, which NumPy cannot read directly) as float32 NumPy. A value that is not an array
    of real numbers is refused: NumPy would turn None into NaN and drop an imaginary part."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # a torch tensor
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise invalid(owner, key, f"array of dtype {array.dtype}",
                      "expected real numbers (a float tensor, as a torch state_dict holds)")
    return array.astype(np.float32)


def _list(keys: Collection[str], limit: int = 8) -> str:
    """`keys`, sorted, as `listed` names them."""
    return listed(sorted(keys), limit)


def expected_variable_shapes(model_name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """`{"params/.../kernel": shape, ...}` of the cnnjax model as the engine initializes it."""
    from cnnjax.train.state import init_variables  # the engine's own init (same leaves)

    model = create_model(model_name, num_classes=num_classes)
    input_shape = (1, *model_info(model_name).input_shape)
    tree = jax.eval_shape(lambda r: init_variables(model, r, input_shape), jax.random.key(0))
    return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(tree)).items()}


def convert_state_dict(model_name: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision `state_dict` (name -> array, NumPy or CPU tensor) -> cnnjax `{"params",
    "batch_stats"}` (float32 NumPy) for the registered model `model_name`.

    `num_classes` is the classifier's output count in `state_dict`. Strict: every leaf of the
    cnnjax model is filled exactly once with the right shape and every torch key is used
    (`IGNORED_SUFFIXES` excepted); otherwise a ValueError names the model, the key or leaf, the
    shapes and what was expected. `batch_stats` is `{}` for models without BatchNorm. Keys of a
    model saved inside `nn.DataParallel` / DDP (all prefixed `module.`) are accepted too.
    Torch keys under `IGNORED_PREFIXES[model_name]` (googlenet's auxiliary classifiers) are
    dropped. `state_dict` is that of torchvision's `TORCHVISION_BUILDERS[model_name]`.
    """
    arch = _architecture(model_name)
    owner = f"torchvision_weights({model_name!r})"
    builder = TORCHVISION_BUILDERS[model_name]
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise invalid(owner, "state_dict", type(state_dict).__name__,
                      "expected a mapping of parameter names to arrays (a torch state_dict)")
    tensors = dict(arch.rename(_without_wrapper_prefix(state_dict)))
    head_key = f"{arch.head}.weight"
    if head_key not in tensors or len(_shape(tensors[head_key])) != 2:
        found = _shape(tensors[head_key]) if head_key in tensors else "missing"
        raise invalid(owner, "state_dict", f"{head_key}: {found}",
                      f"expected the classifier weight {head_key!r} of shape "
                      "(num_classes, features); is this a torchvision "
                      f"{builder} checkpoint?")
    num_classes = _shape(tensors[head_key])[0]
    model = create_model(model_name, num_classes=num_classes)
    expected = expected_variable_shapes(model_name, num_classes)
    leaves = arch.leaves(model)

    targets = [leaf.target for leaf in leaves]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    unmapped = sorted(set(expected) - set(targets))
    if twice or unmapped or set(targets) - set(expected):
        raise ValueError(f"{owner}: the mapping table does not fill each cnnjax leaf exactly once "
                         f"(unmapped: {_list(unmapped)}; mapped twice: {_list(twice)}; not in "
                         f"the model: {_list(set(targets) - set(expected))}); the model's "
                         "parameter names changed, update cnnjax/models/torchvision_weights.py.")
    missing = [leaf for leaf in leaves if leaf.torch_key not in tensors]
    if missing:
        details = ", ".join(
            f"{leaf.torch_key!r} (torch shape {leaf.layout.torch_shape(expected[leaf.target])} "
            f"for {leaf.target})" for leaf in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise invalid(owner, "state_dict", f"{len(tensors)} keys",
                      f"it lacks {details}{more}; expected every key of torchvision's "
                      f"{builder}(num_classes={num_classes})")
    used = {leaf.torch_key for leaf in leaves}
    dropped = tuple(IGNORED_PREFIXES.get(model_name, {}))
    extra = [k for k in tensors if k not in used and k.rsplit(".", 1)[-1] not in IGNORED_SUFFIXES
             and not k.startswith(dropped)]
    if extra:
        details = ", ".join(f"{k!r} {_shape(tensors[k])}" for k in sorted(extra)[:8])
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        raise invalid(owner, "state_dict", f"{len(tensors)} keys",
                      f"it has keys torchvision's {builder} does not: {details}{more}; "
                      "is this the right model name?")

    # num_classes came from the head weight's first dim: check its second before trusting it.
    head = next(leaf for leaf in leaves if leaf.torch_key == head_key)
    features = head.layout.torch_shape(expected[head.target])[1]
    found = _shape(tensors[head_key])
    if found[1] != features:
        transposed = (f"; it looks transposed, (features, num_classes) as JAX/Keras store a "
                      f"dense kernel: transpose it to {(found[1], found[0])}"
                      if found[0] == features else "")
        raise invalid(owner, head_key, f"array of shape {found}",
                      f"torchvision's {builder} classifier weight has shape "
                      f"(num_classes, {features}) (torch's nn.Linear stores (out, in))"
                      f"{transposed}")

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for leaf in leaves:
        value = tensors[leaf.torch_key]
        want = expected[leaf.target]
        torch_want = leaf.layout.torch_shape(want)
        if _shape(value) != torch_want:
            raise invalid(owner, leaf.torch_key, f"array of shape {_shape(value)}",
                          f"cnnjax's {leaf.target} needs shape {want} ({leaf.layout.name}), "
                          f"i.e. a torch tensor of shape {torch_want}")
        array = np.asarray(leaf.layout.to_flax(_float32(owner, leaf.torch_key, value)))
        flat[(leaf.collection, *leaf.path)] = np.ascontiguousarray(array)
    variables = unflatten_dict(flat)
    return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


# ----------------------------------------------------------------------------- torch files
#: torch.hub's naming of a published file, `<name>-<first hex digits of its SHA-256>.<ext>`
#: (`resnet18-f37072fd.pth`), which torch.hub checks after a download. Digits only may be one
#: (`vgg13-19584684.pth`) or a date or step number (`ckpt-001000.pth`): a mismatch is then a hint.
_NAMED_DIGEST = re.compile(r"-([0-9a-f]{6,64})\.[^.-]+$")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a torchvision `.pth` state_dict (`torch.load(weights_only=True)`) as NumPy arrays.

    torch is optional: without it an ImportError says how to install it.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "torchvision_weights: reading .pth files needs PyTorch, which cnnjax does not "
            "install by default; install it with `pip install torch` (CPU is enough) or "
            "`pip install -e '.[torchvision]'`, or pass a NumPy state_dict to "
            "convert_state_dict."
        ) from err
    if not os.path.isfile(path):
        raise invalid("torchvision_weights", "weights", path, "expected an existing .pth file")
    if not os.path.getsize(path):
        raise invalid("torchvision_weights", "weights", path,
                      "the file is empty (an interrupted download?); fetch it again")
    try:  # weights_only: a file that pickles whole objects is refused, never executed
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — torch raises many kinds (KeyError on some junk)
        why = (str(err).splitlines() or [""])[0]
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        if zipped and not zipfile.is_zipfile(path):  # its start, but no end: cut short
            raise invalid("torchvision_weights", "weights", path,
                          "the file is not a complete torch.save archive (a truncated or "
                          "corrupted download?); fetch it again and compare its SHA-256 with "
                          f"the digits in its name ({type(err).__name__}: "
                          f"{why.split('. ')[0][:200]})") from None
        named = None if zipped else _NAMED_DIGEST.search(os.path.basename(path))
        prefix = named.group(1) if named else ""  # the digest the name carries, if any
        digest = file_sha256(path)[:len(prefix)] if prefix else ""
        if digest != prefix and not prefix.isdigit():
            # The legacy (pre-zip) format has no end marker; the name's digest tells a cut or
            # corrupted download of it (torch then raises EOFError, struct.error, even
            # UnpicklingError) from a file refused for what it holds.
            raise invalid("torchvision_weights", "weights", path,
                          f"its SHA-256 starts {digest}, not the {prefix} its name carries: a "
                          f"truncated or corrupted download; fetch it again "
                          f"({type(err).__name__}: {why.split('. ')[0][:200]})") from None
        why = why[:300]
        cut = ""  # digits only: a digest (vgg13-19584684.pth) or a date or step number
        if digest != prefix:
            cut = (f"; if {prefix} begins its SHA-256, as in torch.hub's names, the file "
                   f"(SHA-256 {digest}...) is a truncated or corrupted download: fetch it again")
        raise invalid("torchvision_weights", "weights", path,
                      "expected a state_dict saved with torch.save(model.state_dict(), path) "
                      "(a file holding a whole pickled model is not read, since unpickling it "
                      f"could run arbitrary code; {type(err).__name__}"
                      f"{': ' + why if why else ''}){cut}") from None
    if not isinstance(loaded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        keys = sorted(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise invalid("torchvision_weights", "weights", path,
                      f"expected a state_dict (parameter name -> tensor), found {keys}; for a "
                      "training checkpoint save its model's state_dict() first")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in loaded.items()}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (torchvision's file names carry its first 8 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------ warm-start workdir


def write_warm_start_workdir(
    workdir: str,
    model_name: str,
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
    overwrite: bool = False,
) -> bool:
    """Stores `variables` as a step-0 checkpoint in `<workdir>/checkpoints` (the engine's
    `Checkpointer`), `config.json` (the model, read by `init_from`) and `summary.json`.

    `source` (e.g. the weights file and its SHA-256) is recorded in both JSON files. Returns
    False and writes nothing when the workdir already holds this conversion (same model and
    source); a workdir holding other checkpoints is refused unless `overwrite`. summary.json is
    written last, so an interrupted conversion is recognizable and redone with `overwrite`.
    """
    from cnnjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
    from cnnjax.train.init_from import CONVERTED_STATUS
    from cnnjax.train.loop import CONFIG_FILE, SUMMARY_FILE

    _architecture(model_name)
    record = {"model": model_name, "source": dict(source)}
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            previous = json.load(f)
        if previous.get("status") == CONVERTED_STATUS and all(
                previous.get(k) == v for k, v in record.items()):
            return False
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        if not overwrite:
            raise invalid("torchvision_weights", "workdir", workdir,
                          f"it already holds checkpoints that are not this conversion of "
                          f"{model_name} (see its summary.json, if any); use a new --workdir or "
                          "pass --overwrite to replace them")
        shutil.rmtree(ckpt_dir)
        for name in (SUMMARY_FILE, CONFIG_FILE):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))

    params, batch_stats = variables.get("params") or {}, variables.get("batch_stats") or {}
    got = {"/".join(k): _shape(v)
           for k, v in flatten_dict({"params": params, "batch_stats": batch_stats}).items()}
    num_classes = (got.get("params/head/bias") or (0,))[0]
    if not num_classes or got != expected_variable_shapes(model_name, num_classes):
        raise invalid("torchvision_weights", "variables", f"{len(got)} leaves",
                      f"expected exactly the variables of cnnjax's {model_name} (as "
                      "convert_state_dict returns them)")
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=1, best_metric=None, use_async=False)
    try:
        checkpointer.save(0, {"params": params, "batch_stats": batch_stats})
    finally:
        checkpointer.close()
    # init_from reads `model` (architecture check), `best_metric` (None: take the latest) and
    # `model_kwargs` (settings a run must share to use these weights, e.g. transform_input).
    config = {**record, "num_classes": num_classes, "best_metric": None, "best_mode": "max",
              "model_kwargs": pretrained_model_kwargs(model_name)}
    write_json(os.path.join(workdir, CONFIG_FILE), config)
    count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
    write_json(summary_path, {
        **record, "status": CONVERTED_STATUS, "num_classes": num_classes, "step": 0,
        "model_kwargs": pretrained_model_kwargs(model_name),
        "num_params": count(params), "num_batch_stats": count(batch_stats),
        "message": "torchvision weights converted for --config.init_from.workdir; not a "
                   "training run (resuming into this workdir is refused)",
    })
    return True


def convert_file(model_name: str, weights: str, workdir: str, overwrite: bool = False) -> dict:
    """Converts the torchvision file `weights` for `model_name` into the warm-start `workdir`.

    Returns the workdir's summary record (with `"written": False` if it was already there).
    """
    from cnnjax.train.loop import SUMMARY_FILE

    _architecture(model_name)  # a bad name fails before torch reads hundreds of megabytes
    check_output_dir(workdir, "--workdir")  # a file in the way fails before the work, too
    if not os.path.isfile(weights):
        raise invalid("torchvision_weights", "weights", weights,
                      "no such file (cnnjax never downloads: fetch the torchvision .pth first)")
    source = {"weights": os.path.abspath(weights), "sha256": file_sha256(weights)}
    variables = convert_state_dict(model_name, load_torch_state_dict(weights))
    written = write_warm_start_workdir(workdir, model_name, variables, source, overwrite)
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        return {**json.load(f), "written": written}


# ---------------------------------------------------------------------------------- command
def _define_flags() -> None:
    from absl import flags

    models = ", ".join(name if builder == name else f"{name} (from torchvision's {builder})"
                       for name, builder in TORCHVISION_BUILDERS.items())
    flags.DEFINE_string("model", None, f"cnnjax model to convert to: {models}.", required=True)
    flags.DEFINE_string("weights", None, "torchvision state_dict (.pth) of the model's torchvision "
                        "builder.", required=True)
    flags.DEFINE_string("workdir", None, "Warm-start directory to write.", required=True)
    flags.DEFINE_bool("overwrite", False, "Replace checkpoints already in --workdir.")


def main(argv: Sequence[str]) -> None:
    """Writes the warm-start workdir and prints how to fine-tune from it."""
    from absl import flags

    from cnnjax.utils.cli import start_command

    start_command(list(argv))  # refuses stray arguments; quiets orbax's INFO lines
    f = flags.FLAGS
    try:
        result = convert_file(f.model, f.weights, f.workdir, f.overwrite)
    except (ImportError, ValueError) as err:  # messages name the flag, the value and the fix
        sys.exit(f"error: {err}")
    state = "wrote" if result["written"] else "already converted (nothing written):"
    print(f"{state} {f.workdir}: {f.model}, {result['num_classes']} classes, "
          f"{result['num_params']:,} parameters, {result['num_batch_stats']:,} BatchNorm "
          f"statistics, from {result['source']['weights']} (sha256 "
          f"{result['source']['sha256'][:12]}...)")
    needed = result.get("model_kwargs") or {}  # absent in workdirs converted before it existed
    kwargs = "".join(f" --config.model_kwargs.{k}={v}" for k, v in needed.items())
    print(f"fine-tune with: --config.model={f.model}{kwargs} "
          f"--config.init_from.workdir={f.workdir}  (the head is re-initialized by default)")
    if kwargs:  # settings torchvision applies when it loads these weights
        print(f"(these weights need{kwargs.replace(' --config.', ' ')}, which torchvision sets "
              f"when it loads them; the config must declare {f.model}'s model_kwargs: "
              f"model_kwargs_config({f.model!r}))")


if __name__ == "__main__":
    from absl import app

    from cnnjax.utils.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
