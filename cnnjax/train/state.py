"""`TrainState`: everything a training run carries from step to step, as one pytree.

Holding `step`, `params`, `batch_stats`, `opt_state` and the base `rng` together makes a checkpoint
one object and resuming exact: the step's dropout key is derived from `(rng, step, device)`, never
carried as mutable host state. Warm starts (`config.init_from`) replace the fresh variables with
another run's (`select_pretrained` checks, `warm_start` substitutes); `freeze_optimizer` restricts
training to the head (with the backbone in eval mode for 'backbone_eval').
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from cnnjax.train.ema import initial_average
from cnnjax.utils.validation import invalid, listed

#: The variable collections a warm start loads (never the optimizer state or the step).
WARM_START_COLLECTIONS = ("params", "batch_stats")


class TrainState(struct.PyTreeNode):
    """Training state; every field is an array pytree so it can be replicated, donated and saved."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray
    # {'params', 'batch_stats'} averaged over steps (`cnnjax.train.ema`); {} when not averaging.
    ema: Any = struct.field(default_factory=dict)

    def variables(self) -> dict:
        """The flax variable collections for `model.apply`."""
        variables = {"params": self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a run's `seed` (0 <= seed < 2**63, as `validate_config` allows).

    `jax.random.PRNGKey` keeps only a seed's low 32 bits (without x64), so seeds 2**32 apart
    would share initial weights and dropout; the high bits are folded in. Seeds below 2**32
    keep `PRNGKey(seed)`, the key every earlier run used.
    """
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, seed >> 32) if seed >> 32 else key


#: XLA options of `create_train_state`'s init program on CPU: LLVM's level 1 instead of XLA's
#: default. The program runs once, and the default level spent most of its compile time there
#: (LeNet-5 3.0 -> 0.9 s, ResNet-20 5.4 -> 1.8 s, DenseNet-40 112 -> 15 s on 2 cores); the
#: variables are bitwise those of levels 2 and 3 (tests/train/test_state_init.py; level 0
#: differs). The train and eval steps keep XLA's level.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}

def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initializes `model` on a zeros batch of `input_shape` (N, H, W, C), in eval mode."""
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros(input_shape, jnp.float32)
    return model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    ema: bool = False,
) -> TrainState:
    """Builds the initial state: fresh params/batch_stats, optimizer state, step 0, and with
    `ema` a weight average starting at the fresh variables (`ema.initial_average`).

    `rng` is split into an init key and the base key that dropout keys are folded from.
    """
    init_rng, train_rng = jax.random.split(rng)
    init = jax.jit(lambda r: init_variables(model, r, input_shape))
    if jax.devices()[0].platform == "cpu":  # a one-shot program: compiled fast, same bits
        variables = init.lower(init_rng).compile(compiler_options=INIT_COMPILER_OPTIONS)(init_rng)
    else:
        variables = init(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=train_rng,
        ema=initial_average(params, batch_stats) if ema else {},
    )


def in_excluded(path: tuple[str, ...], exclude: Collection[str]) -> bool:
    """Whether the leaf at `path` lies in a module named in `exclude`, at any depth (a
    warm start leaves it freshly initialized)."""
    return any(module in exclude for module in path[:-1])


def outermost_module(src_path: tuple[str, ...]) -> str | None:
    """The outermost module holding the source leaf at `src_path`, the name to add to
    `init_from.exclude` to skip it; None for a top-level leaf, which no exclusion can skip."""
    return src_path[0] if len(src_path) > 1 else None


def matched_leaves(
    new_tree: Mapping[str, Any] | None,
    source_tree: Mapping[str, Any] | None,
    exclude: Collection[str],
    submodule: str | None = None,
) -> Iterator[tuple[tuple[str, ...], Any, tuple[str, ...], Any]]:
    """`(path, leaf, src_path, src_leaf)` for each leaf of `new_tree` (one collection's nested
    dict of shaped leaves) a warm start loads from `source_tree`'s: those in `submodule` (all
    when None) outside the modules of `exclude`, with their source path (`path` less
    `submodule`) and the source's leaf there (None when it has none)."""
    prefix = (submodule,) if submodule is not None else ()
    src_flat = flatten_dict(dict(source_tree or {}))
    for path, leaf in flatten_dict(dict(new_tree or {})).items():
        if path[:len(prefix)] != prefix or in_excluded(path, exclude):
            continue
        src_path = path[len(prefix):]
        yield path, leaf, src_path, src_flat.get(src_path)


def select_pretrained(
    new_shapes: Mapping[str, Any],
    source_shapes: Mapping[str, Any],
    exclude: Sequence[str],
    *,
    source_workdir: str,
    source_step: int,
    model: str,
    source_model: str | None,
    submodule: str | None = None,
) -> dict[str, Any]:
    """Which source leaves a warm start loads: `{collection: nested dict of source shapes}`.

    `new_shapes` / `source_shapes` map each of `WARM_START_COLLECTIONS` to a nested dict of
    shaped leaves (the new model's `jax.eval_shape` of init; the checkpoint's metadata). Leaves
    inside a module named in `exclude`, at the top level or nested, are not loaded (they stay
    freshly initialized): the default ('head',) also covers GoogLeNet's auxiliary classifiers'
    own heads `aux1/head`, `aux2/head`, whose shapes depend on num_classes like `head`'s. Every
    other leaf of the new model must exist in the source with the same shape. Raises a
    ValueError naming the first missing or mis-shaped leaf; if `source_model` differs from
    `model`, the error says the architectures differ instead.

    The match is checked both ways: every source leaf outside an excluded module must be loaded
    too, else a ValueError names both models and the unused source modules
    (`unused_source_modules`). Without that, a new model whose variables are a subset of the
    source's (resnet18 from a resnet34 run: only the first blocks of each stage; vgg11 from
    vgg11_bn: conv weights trained to feed the BatchNorm layers that are dropped) would be
    warm-started from part of another network silently. A partial warm start that is really
    intended names the unused modules in `exclude`.

    With `submodule` (a top-level module of the new model) only that module's leaves are
    matched, source path `p` against `submodule/p` (the rest of the new model stays fresh); the
    result keeps the source's paths (what `SourceCheckpoints.restore` reads): nest it under
    `submodule` with `under_submodule` before `warm_start`.
    """
    if submodule is not None and submodule not in (new_shapes.get("params") or {}):
        raise invalid("init_from", "submodule", submodule,
                      f"model {model!r} has no such top-level module; it has "
                      f"{sorted(new_shapes.get('params') or {})}")
    excluded = tuple(exclude)
    source = f"the checkpoint at step {source_step} of {source_workdir!r}"
    selected: dict[str, Any] = {}
    # (what is wrong, `outermost_module` of the leaf below `submodule`: the name to exclude, or
    # None for a leaf directly in the model / the submodule, which no exclusion can skip)
    problem: tuple[str, str | None] | None = None
    differing: set[str] = set()  # every module below `submodule` some mismatch lies in
    for collection in WARM_START_COLLECTIONS:
        chosen = {}
        # With `submodule` the architectures differ on purpose: only its leaves are matched.
        for path, leaf, src_path, src_leaf in matched_leaves(
                new_shapes.get(collection), source_shapes.get(collection), excluded, submodule):
            name = "/".join((collection, *path))
            if (src_leaf is None or tuple(src_leaf.shape) != tuple(leaf.shape)) \
                    and outermost_module(src_path) is not None:
                differing.add(outermost_module(src_path))
            if src_leaf is None:
                problem = problem or (
                    f"the new model needs {name} but {source} (model {source_model!r}) has no "
                    f"such variable{' as ' + '/'.join(src_path) if submodule is not None else ''}",
                    outermost_module(src_path),
                )
            elif tuple(src_leaf.shape) != tuple(leaf.shape):
                problem = problem or (
                    f"{name} has shape {tuple(src_leaf.shape)} in {source} but "
                    f"{tuple(leaf.shape)} in the new model {model!r}",
                    outermost_module(src_path),
                )
            else:
                chosen[src_path] = src_leaf
        selected[collection] = unflatten_dict(chosen) if chosen else {}
    if problem is not None:
        what, top = problem
        if submodule is None and source_model is not None and source_model != model:
            raise invalid(
                "init_from",
                "workdir",
                source_workdir,
                f"it holds a {source_model!r} run but config.model={model!r}, and their variables "
                f"do not match ({what}); different architectures cannot be warm-started whole (set "
                f"init_from.submodule to load the source into one module of the new model)",
            )
        if submodule is not None and len(differing) > 1:  # not one module to leave fresh
            raise invalid(
                "init_from", "workdir", source_workdir,
                f"its run (model {source_model!r}) does not fit module {submodule!r} of "
                f"{model!r}: {len(differing)} of the module's parts differ "
                f"({listed(sorted(differing), 4)}; first: {what}); expected a run of the "
                f"architecture {submodule!r} is (init_from.exclude can leave one part fresh, "
                "not replace the architecture)")
        if top is None and submodule is not None:  # a leaf of the submodule itself
            raise invalid("init_from", "submodule", submodule,
                          f"{what}; expected the top-level module the source's variables fill")
        if top is None:  # a top-level leaf: init_from.exclude names modules only
            raise invalid("init_from", "workdir", source_workdir,
                          f"{what}, a top-level variable no init_from.exclude can skip")
        raise invalid(
            "init_from",
            "exclude",
            excluded,
            f"{what}; add {top!r} to init_from.exclude to keep it freshly initialized",
        )
    unused = unused_source_modules(source_shapes, selected, excluded)
    if unused:
        raise invalid(
            "init_from",
            "exclude",
            excluded,
            f"{source} (model {source_model!r}) has variables the new model {model!r} would not "
            f"load{' into ' + repr(submodule) if submodule is not None else ''}: "
            f"{_unused_summary(unused)}; a warm start loads every source variable "
            "outside init_from.exclude, so that a different (e.g. deeper) network is never "
            "loaded in part silently. Warm-start from a source whose variables match the new "
            "model's, or, if a partial warm start is really intended, add those modules to "
            f"config.init_from.exclude{_exclude_hint(excluded, unused)}",
        )
    return selected


def module_paths(tree: Mapping[str, Any]) -> set[tuple[str, ...]]:
    """Paths of every module (top-level and nested) holding a leaf of `tree`
    (`{collection: nested dict}`), over all of `WARM_START_COLLECTIONS`."""
    return {
        path[:i]
        for collection in WARM_START_COLLECTIONS
        for path in flatten_dict(dict(tree.get(collection) or {}))
        for i in range(1, len(path))
    }


def unused_source_modules(
    source_shapes: Mapping[str, Any], selected: Mapping[str, Any], exclude: Sequence[str]
) -> dict[str, int]:
    """What of the source a warm start would silently drop: `{name: number of leaves}`, sorted,
    for the outermost source modules none of whose leaves is loaded (`selected`, source paths)
    and whose dropped leaves are not excluded (a module named in `exclude` on their path), e.g.
    `'stage1_block3'` for a resnet34 source of a resnet18, `'features/bn1_1'` for vgg11_bn into
    vgg11. A dropped leaf with no such module (one a partly loaded module has and the new
    model's lacks, or a top-level one) is named itself, as 'collection/path'. Empty when nothing
    is dropped."""
    excluded = set(exclude)
    loaded_modules = module_paths(selected)
    unused: dict[str, int] = {}
    for collection in WARM_START_COLLECTIONS:
        chosen = set(flatten_dict(dict(selected.get(collection) or {})))
        for path in flatten_dict(dict(source_shapes.get(collection) or {})):
            if path in chosen or in_excluded(path, excluded):
                continue
            module = next((path[:i] for i in range(1, len(path))
                           if path[:i] not in loaded_modules), None)
            name = "/".join(module) if module else "/".join((collection, *path))
            unused[name] = unused.get(name, 0) + 1
    return dict(sorted(unused.items()))


def excluded_source_modules(source_shapes: Mapping[str, Any], exclude: Sequence[str]) -> list[str]:
    """Sorted paths of the outermost source modules `exclude` skips (a warm start's record of
    what of the source it left out on purpose), e.g. `['head']`."""
    excluded = set(exclude)
    return sorted({
        "/".join(path[:next(i for i in range(len(path) - 1) if path[i] in excluded) + 1])
        for collection in WARM_START_COLLECTIONS
        for path in flatten_dict(dict(source_shapes.get(collection) or {}))
        if in_excluded(path, excluded)
    })


def _unused_summary(unused: Mapping[str, int], limit: int = 6) -> str:
    """'N leaves in M modules[, K variables] ('a', 'b', ... and J more)' for
    `unused_source_modules`."""
    names = list(unused)
    modules = sum(name.split("/")[0] not in WARM_START_COLLECTIONS for name in names)
    what = ", ".join(
        f"{n} {noun}{'' if n == 1 else 's'}"
        for n, noun in ((modules, "module"), (len(names) - modules, "variable")) if n
    )
    leaves = sum(unused.values())
    return f"{leaves} {'leaf' if leaves == 1 else 'leaves'} in {what} ({listed(names, limit)})"


def exclude_flag(names: Sequence[str]) -> str:
    """The command-line override setting `init_from.exclude` to `names`, as a Python literal in
    shell double quotes (ml_collections reads `a,b` as the single name 'a,b')."""
    return f'--config.init_from.exclude="{tuple(names)!r}"'


def _exclude_hint(excluded: tuple[str, ...], unused: Mapping[str, int]) -> str:
    """How `init_from.exclude` would name `unused`: module names match at any depth, so a
    nested module is excluded by its last name; a single variable cannot be excluded alone."""
    unused = list(unused)
    leaves = [u for u in unused if u.split("/")[0] in WARM_START_COLLECTIONS]
    names = sorted({u.split("/")[-1] for u in unused if u not in leaves})
    hint = ""
    if names:
        flag = exclude_flag((*excluded, *names))
        hint = (f" (it names modules at any depth: {flag})"
                if len(names) <= 8 else
                f" (it names modules at any depth, e.g. {names[0]!r} for {unused[0]!r})")
    if leaves:
        hint += (f"; {', '.join(map(repr, leaves[:3]))} lie in modules that are otherwise "
                 "loaded (or at the top level): exclude their module to start it fresh, or use "
                 "a source of the same architecture")
    return hint


def under_submodule(loaded: Mapping[str, Any], submodule: str | None) -> dict[str, Any]:
    """`loaded` (`{collection: nested dict}`) nested under the top-level module `submodule`
    (unchanged when None): where `select_pretrained(..., submodule=...)` leaves load."""
    if submodule is None:
        return dict(loaded)
    return {c: {submodule: tree} if tree else {} for c, tree in loaded.items()}


def warm_start(state: TrainState, loaded: Mapping[str, Any]) -> TrainState:
    """`state` with the leaves of `loaded` (`{collection: nested dict}`, a subset of the paths
    of `state.params` / `state.batch_stats`) substituted, cast to the state's dtypes; every
    other field (step, optimizer state, rng) and every leaf not in `loaded` is kept. A weight
    average (`state.ema`) restarts from the warm-started variables."""
    updated = {}
    for collection in WARM_START_COLLECTIONS:
        current = flatten_dict(dict(getattr(state, collection) or {}))
        new = flatten_dict(dict(loaded.get(collection) or {}))
        if not current:
            updated[collection] = getattr(state, collection)
            continue
        merged = {
            path: np.asarray(new[path], dtype=np.asarray(leaf).dtype) if path in new else leaf
            for path, leaf in current.items()
        }
        updated[collection] = unflatten_dict(merged)
    if state.ema:
        updated["ema"] = initial_average(updated["params"], updated["batch_stats"])
    return state.replace(**updated)


#: `config.freeze`'s values: None trains every parameter, 'backbone' only the head (the backbone
#: in train mode), 'backbone_eval' only the head with the backbone in eval mode.
FREEZE_MODES = (None, "backbone", "backbone_eval")


def check_freeze(owner: str, value: Any) -> None:
    """Refuses (a ValueError naming `owner`'s `freeze`) a value not in `FREEZE_MODES`."""
    if value not in FREEZE_MODES:
        raise invalid(owner, "freeze", value,
                      "expected None (train every parameter), 'backbone' (train only the head; "
                      "backbone BatchNorm and dropout in train mode) or 'backbone_eval' (train "
                      "only the head; backbone BatchNorm and dropout in eval mode)")


def freeze_optimizer(
    tx: optax.GradientTransformation, params: Any, freeze: str | None
) -> optax.GradientTransformation:
    """`tx` for `config.freeze`: None returns it unchanged; 'backbone' and 'backbone_eval' train
    only the head.

    Both give `tx`'s updates to the leaves of `trainable_heads` (the top-level modules in
    `heads.HEAD_MODULES`: `head`, FCN's score/upsampling layers; and nested `head` modules:
    GoogLeNet's auxiliary classifiers' `aux1/head`, `aux2/head`), every other
    parameter (BatchNorm scale/bias included) an exactly zero update, so it stays bitwise equal
    to its initial (e.g. warm-started) value. They differ in the backbone's BatchNorm statistics
    and dropout. 'backbone': the train step runs the model in train mode, so backbone BatchNorm
    layers normalize with batch statistics and keep updating their running averages, which eval
    then uses, and backbone dropout / stochastic depth stay on (PyTorch's `requires_grad=False`
    with `model.train()`). 'backbone_eval': the train steps (`backbone_eval`, set by
    `loop.wrap_steps`) run every BatchNorm, Dropout and DropPath outside the head modules in
    eval mode: running statistics used and left bitwise unchanged, no dropout (the
    linear-evaluation protocol, MoCo's `main_lincls.py`). `params` may hold
    `jax.ShapeDtypeStruct` leaves.
    """
    check_freeze("config", freeze)
    if freeze is None:
        return tx
    from cnnjax.models.heads import freeze_backbone  # deferred: imports the model registry

    return freeze_backbone(tx, params)


def trainable_heads(params: Any) -> Any:
    """The `freeze='backbone'` / `'backbone_eval'` mask (a pytree of bools like `params`),
    `heads.trainable_mask`: True for the head modules (`head`, FCN's score/upsampling layers) and
    for every nested module named `head`, i.e. GoogLeNet's auxiliary classifiers' final layers
    `aux1/head`, `aux2/head`.

    Those are classifier heads too: their shape follows num_classes, a warm start leaves them
    freshly initialized (`init_from.exclude` ('head',)), so frozen they would stay random and
    their `aux_loss_weight`-weighted losses would be noise. Trained (as PyTorch's Inception
    fine-tuning recipe does with `AuxLogits.fc`), they are fitted on the frozen features; the
    rest of each auxiliary branch (conv, fc) is backbone and frozen. The main head's updates are
    the same either way (separate parameters; backbone gradients are zeroed).
    """
    from cnnjax.models.heads import trainable_mask  # deferred: imports the model registry

    return trainable_mask(params)
