"""Warm starts (`config.init_from`): which checkpoint of which run, and what of it is loaded.

`load_init_from` picks the source run's checkpoint (requested step, else the best by the metric of
the weights loaded, `ema_top1` for its average), checks architecture and shapes against the new
model (`state.select_pretrained`: every variable of the new model outside `init_from.exclude`
must be in the source, and every variable of the source outside it must be loaded, so a
different architecture is never loaded in part silently), and reads only params and BatchNorm
statistics, never the optimizer state; all before anything is compiled. The engine calls it
only for a fresh workdir: a run's own checkpoints always win, so resuming stays exact.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from absl import logging
from flax.traverse_util import flatten_dict

from cnnjax.train import config as config_lib
from cnnjax.train.checkpoint import CorruptSourceCheckpointError, SourceCheckpoints, read_error
from cnnjax.train.logging import CONFIG_FILE, SUMMARY_FILE
from cnnjax.train.state import (
    WARM_START_COLLECTIONS,
    excluded_source_modules,
    matched_leaves,
    module_paths,
    outermost_module,
    select_pretrained,
    trainable_heads,
    under_submodule,
)
from cnnjax.utils.files import read_json
from cnnjax.utils.validation import invalid

CONVERTED_STATUS = "converted"  # summary.json's status in a workdir of converted weights
_OWNER = "init_from"  # names the config block in errors (`invalid`'s owner)


def holds_converted_weights(workdir: str, saved_config: Mapping[str, Any] | None) -> bool:
    """Whether `workdir` (whose config.json reads `saved_config`) holds torchvision weights
    converted for `init_from` (`cnnjax.models.torchvision_weights`), not a training run: its
    summary.json says so or, the converter writing summary.json last, its config.json has a
    `source` record and no training fields (an interrupted conversion)."""
    summary = read_json(os.path.join(workdir, SUMMARY_FILE)) or {}
    saved_config = saved_config or {}
    return summary.get("status") == CONVERTED_STATUS or (
        "source" in saved_config and "optimizer" not in saved_config)


def check_pretrained_model_kwargs(config: Any, source_workdir: str, source_config: dict) -> None:
    """Converted torchvision weights of this run's model record the model settings they need
    (googlenet_bn's `transform_input=True`: torchvision rescales the input for those weights);
    a run without them would fine-tune from wrongly scaled inputs, so it is refused."""
    if (not holds_converted_weights(source_workdir, source_config)
            or source_config.get("model") != config.model):
        return
    mine = config_lib.model_kwargs(config)
    declared = config.get("model_kwargs") or {}
    for key, value in sorted((source_config.get("model_kwargs") or {}).items()):
        if mine.get(key) != value:
            # The command line can only set a field the config file declared (for its own model).
            declare = ("" if key in declared else
                       f" in a config whose model_kwargs declares {config.model}'s fields "
                       f"(this one's does not have {key!r}: in the config file, "
                       f"config.model_kwargs = model_kwargs_config({config.model!r}) from "
                       "cnnjax.train.config)")
            raise invalid(_OWNER, "workdir", source_workdir,
                          f"its converted torchvision weights need model_kwargs.{key}={value!r} "
                          f"(torchvision sets it when it loads them) and this run has "
                          f"{mine.get(key)!r}; pass --config.model_kwargs.{key}={value}{declare}")


def _source_config(workdir: str, path_workdir: str) -> dict:
    """The source run's config.json (`{}` if it has none: checkpoints alone still load); one
    that is not a JSON object (truncated, emptied) is a ValueError naming `init_from.workdir`."""
    path = os.path.join(path_workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        saved = err
    if not isinstance(saved, dict):
        what = (f"{type(saved).__name__}: {saved}" if isinstance(saved, Exception)
                else f"it holds a {type(saved).__name__}")
        raise invalid(_OWNER, "workdir", workdir,
                      f"its {path!r} is not a run's config (not a JSON object: {what}); "
                      "expected the --workdir of a training run or of converted weights")
    return saved


@contextlib.contextmanager
def _readable(workdir: str, source: SourceCheckpoints, step: int, how: str) -> Iterator[None]:
    """Reads of the checkpoint at `step` (chosen `how`) inside: a damaged one (orbax and
    tensorstore raise many kinds: OUT_OF_RANGE, DATA_LOSS, NOT_FOUND, a lost _METADATA; or its
    arrays fail their digests) becomes a ValueError naming the init_from field that chose it and
    the steps to pick instead; the engine's other refusals ('init_from: ...') pass as they are."""
    try:
        yield
    except CorruptSourceCheckpointError as err:  # read, but its arrays fail their digests
        raise _unreadable(workdir, source, step, how, f"is corrupt ({err.reason})") from None
    except Exception as err:
        if isinstance(err, ValueError) and str(err).startswith(f"{_OWNER}: "):
            raise
        raise _unreadable(workdir, source, step, how,
                          f"could not be read ({read_error(err)})") from None


def _unreadable(workdir: str, source: SourceCheckpoints, step: int, how: str,
                problem: str) -> ValueError:
    """`_readable`'s error: the field that chose `step` (init_from.step when requested, else
    init_from.workdir) and the other kept steps."""
    others = [s for s in source.steps if s != step]
    instead = (f"another of its steps {others}" if others
               else "another step: it keeps no other checkpoint")
    if how == "requested":
        return invalid(_OWNER, "step", step,
                       f"the checkpoint at step {step} of {workdir!r} {problem}; expected "
                       f"{instead} (or check its files)")
    return invalid(_OWNER, "workdir", workdir,
                   f"its {how} checkpoint (step {step}) {problem}; set init_from.step to "
                   f"{instead} (or check its files)")


def check_exclude_names(exclude: tuple[str, ...], model: str, variable_shapes: Mapping,
                        source_shapes: Mapping) -> list[str]:
    """Every `init_from.exclude` name must name a module, at any depth, of the new model
    (`variable_shapes`) or of the source (a deeper source's extra block, excluded on purpose):
    a misspelt one would leave the module it meant loaded, so it is a ValueError listing
    module names. The default 'head' may match neither (an FCN warm-started from an FCN): it is
    returned, for a warning."""
    named = module_paths(variable_shapes) | module_paths(source_shapes)
    unmatched = [name for name in exclude if name not in {m[-1] for m in named}]
    typos = [name for name in unmatched if name != "head"]
    if typos:
        top = sorted({m[0] for m in named})
        examples = top if len(top) <= 12 else [*top[:12], "..."]
        raise invalid(_OWNER, "exclude", exclude,
                      f"{', '.join(map(repr, typos))} name{'' if len(typos) > 1 else 's'} no "
                      f"module of model {model!r} nor of its source; expected module names "
                      f"such as {examples} (a name matches a module at any depth)")
    return unmatched


def check_input_channels(variable_shapes: Mapping, source_shapes: Mapping,
                         exclude: tuple[str, ...], submodule: str | None, *, source_workdir: str,
                         source_step: int, model: str, grey_to_rgb: bool = False) -> None:
    """A source whose input layer takes RGB images for grey data: a convolution kernel (4-D,
    `[h, w, in, out]`) the warm start would load, of 3 input channels in the source and 1 in the
    new model (all else equal), is a ValueError naming `data.grey_to_rgb`, which feeds grey
    images as RGB (`select_pretrained` would only suggest excluding the layer). So is the
    converse, 1 in the source and 3 in a run with `grey_to_rgb` (a grey source: unset it)."""
    for path, leaf, src_path, src_leaf in matched_leaves(
            variable_shapes.get("params"), source_shapes.get("params"), exclude, submodule):
        if src_leaf is None:
            continue
        new, src = tuple(leaf.shape), tuple(src_leaf.shape)
        if len(new) != 4 or src[:2] + src[3:] != new[:2] + new[3:]:
            continue
        if (src[2], new[2]) == (3, 1):
            why = ("the source's input layer takes 3-channel (RGB) images and this run's have 1 "
                   "channel (grey); set data.grey_to_rgb=True to feed them as RGB (the channel "
                   "repeated 3 times)")
        elif (src[2], new[2]) == (1, 3) and grey_to_rgb:
            why = ("the source's input layer takes 1-channel (grey) images and this run feeds "
                   "its grey images as RGB (data.grey_to_rgb=True); set data.grey_to_rgb=False "
                   "to feed them as the source saw them")
        else:
            continue
        top = outermost_module(src_path)
        name = "/".join(("params", *path))
        exclude_hint = (f", or add {top!r} to init_from.exclude to train that layer from scratch"
                        if top is not None else "")
        raise invalid(_OWNER, "workdir", source_workdir,
                      f"{name} has shape {src} in the checkpoint at step {source_step} of "
                      f"{source_workdir!r} but {new} in the new model {model!r}: {why}"
                      f"{exclude_hint}")


def _frozen(fresh: list[str], variable_shapes: Mapping, freeze: str | None) -> list[str]:
    """The outermost parts of the `fresh` (not loaded) modules whose every parameter `freeze`
    keeps fixed: they stay at their random initialization for the whole run. A fresh module
    that trains a nested head (GoogLeNet's `aux1`) is named by its frozen parts (`aux1/conv`,
    `aux1/fc`)."""
    if freeze is None or not fresh:
        return []
    trainable = flatten_dict(dict(trainable_heads(variable_shapes["params"])))
    frozen: list[str] = []

    def visit(prefix: tuple[str, ...]) -> None:
        inside = {path: on for path, on in trainable.items() if path[:len(prefix)] == prefix}
        if not any(inside.values()):
            frozen.append("/".join(prefix))
            return
        for child in sorted({path[len(prefix)] for path in inside if len(path) > len(prefix)}):
            visit((*prefix, child))

    for module in fresh:
        visit(tuple(module.split("/")))
    return frozen


def _leaf_paths(tree: Any) -> list[tuple[str, ...]]:
    """Key paths of the leaves of a nested dict of variables (empty for None / {})."""
    return list(flatten_dict(dict(tree))) if tree else []


def load_init_from(config: Any, variable_shapes: dict) -> tuple[dict, dict]:
    """Reads `config.init_from`'s checkpoint for a model whose variables have `variable_shapes`:
    `(variables to load, record for summary.json and init_from.json)`.

    The record says what was loaded (`loaded_leaves` of the source's `source_leaves`), what of
    the source `init_from.exclude` left out (`excluded_source_modules`, e.g. ['head']) and which
    of the new model's modules start fresh (`fresh_modules`).

    Every check (source exists and has checkpoints, step, architecture, shapes) runs before
    anything is compiled; only params and batch_stats are read, never the optimizer state.
    """
    init_from = config.init_from
    source = SourceCheckpoints(init_from.workdir, owner=_OWNER)
    try:
        source_config = _source_config(init_from.workdir, source.workdir)
        check_pretrained_model_kwargs(config, source.workdir, source_config)
        average = bool(init_from.get("ema", False))
        step, how = source.choose_step(
            init_from.get("step"),
            source_config.get("best_metric", "top1"),
            source_config.get("best_mode", "max"),
            ema=average,
        )
        with _readable(init_from.workdir, source, step, how):
            source_shapes = source.variable_shapes(step, ema=average)
        if average and not jax.tree.leaves(source_shapes):
            raise invalid(_OWNER, "ema", True,
                          f"the checkpoint at step {step} of {source.workdir!r} holds no "
                          "weight average (a run with config.ema.decay None, or converted "
                          "weights); set init_from.ema=False to load its weights")
        unmatched = check_exclude_names(tuple(init_from.exclude), config.model, variable_shapes,
                                        source_shapes)
        check_input_channels(variable_shapes, source_shapes, tuple(init_from.exclude),
                             init_from.get("submodule"), source_workdir=source.workdir,
                             source_step=step, model=config.model,
                             grey_to_rgb=bool(config.data.get("grey_to_rgb", False)))
        selected = select_pretrained(
            variable_shapes,
            source_shapes,
            tuple(init_from.exclude),
            source_workdir=source.workdir,
            source_step=step,
            model=config.model,
            source_model=source_config.get("model"),
            submodule=init_from.get("submodule"),
        )
        with _readable(init_from.workdir, source, step, how):
            restored = source.restore_variables(step, selected, ema=average)
        loaded = under_submodule(restored, init_from.get("submodule"))
        skipped = excluded_source_modules(source_shapes, tuple(init_from.exclude))
        source_leaves = sum(len(_leaf_paths(source_shapes.get(c))) for c in WARM_START_COLLECTIONS)
    finally:
        source.close()

    model_modules = module_paths(variable_shapes)
    unloaded = model_modules - module_paths(loaded)
    # The outermost modules nothing was loaded into, e.g. ['aux1/head', 'aux2/head', 'head'].
    fresh = sorted("/".join(m) for m in unloaded if m[:-1] not in unloaded)
    frozen_fresh = _frozen(fresh, variable_shapes, config.get("freeze"))
    if frozen_fresh:
        logging.warning(
            "freeze=%r keeps %s at their random initialization: the warm start loaded nothing "
            "into them (named in init_from.exclude, or not in the source) and the frozen "
            "backbone never trains them (load them, or leave freeze unset to train them).",
            config.get("freeze"), frozen_fresh,
        )
    if unmatched:  # the default 'head', of two networks without one (an FCN from an FCN)
        logging.warning(
            "init_from.exclude names %s, which model %r does not have, nor the source (its "
            "top-level modules: %s).",
            unmatched, config.model, sorted(m[0] for m in model_modules if len(m) == 1),
        )
    record = {
        "workdir": source.workdir,
        "step": step,
        "checkpoint": how,
        "model": source_config.get("model"),
        "exclude": list(init_from.exclude),
        "submodule": init_from.get("submodule"),
        "ema": average,
        "loaded_leaves": sum(len(_leaf_paths(loaded.get(c))) for c in WARM_START_COLLECTIONS),
        "source_leaves": source_leaves,
        "excluded_source_modules": skipped,
        "fresh_modules": fresh,
        "frozen_fresh_modules": frozen_fresh,
        "freeze": config.get("freeze"),
    }
    logging.info(
        "Warm start (init_from): %sparams and batch_stats of the %s checkpoint (step %d) of "
        "%s (model %r); freshly initialized: %s; optimizer state and step start fresh.",
        "averaged " if average else "", how, step, source.workdir, record["model"],
        fresh or "nothing",
    )
    return loaded, record
