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

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from flax.traverse_util import flatten_dict

from cnnjax.train import config as config_lib
from cnnjax.train.checkpoint import SourceCheckpoints
from cnnjax.train.logging import CONFIG_FILE, SUMMARY_FILE
from cnnjax.train.state import (
    WARM_START_COLLECTIONS,
    excluded_source_modules,
    module_paths,
    select_pretrained,
    under_submodule,
)
from cnnjax.utils.files import read_json
from cnnjax.utils.validation import invalid

CONVERTED_STATUS = "converted"  # summary.json's status in a workdir of converted weights


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
    for key, value in sorted((source_config.get("model_kwargs") or {}).items()):
        if mine.get(key) != value:
            raise invalid("init_from", "workdir", source_workdir,
                          f"its converted torchvision weights need model_kwargs.{key}={value!r} "
                          f"(torchvision sets it when it loads them) and this run has "
                          f"{mine.get(key)!r}; pass --config.model_kwargs.{key}={value}")


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
    source = SourceCheckpoints(init_from.workdir)
    try:
        source_config: dict = {}
        config_path = os.path.join(source.workdir, CONFIG_FILE)
        if os.path.exists(config_path):
            with open(config_path) as f:
                source_config = json.load(f)
        check_pretrained_model_kwargs(config, source.workdir, source_config)
        average = bool(init_from.get("ema", False))
        step, how = source.choose_step(
            init_from.get("step"),
            source_config.get("best_metric", "top1"),
            source_config.get("best_mode", "max"),
            ema=average,
        )
        source_shapes = source.variable_shapes(step, ema=average)
        if average and not jax.tree.leaves(source_shapes):
            raise invalid("init_from", "ema", True,
                          f"the checkpoint at step {step} of {source.workdir!r} holds no "
                          "weight average (a run with config.ema.decay None, or converted "
                          "weights); set init_from.ema=False to load its weights")
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
        loaded = under_submodule(source.restore_variables(step, selected, ema=average),
                                 init_from.get("submodule"))
        skipped = excluded_source_modules(source_shapes, tuple(init_from.exclude))
        source_leaves = sum(len(_leaf_paths(source_shapes.get(c))) for c in WARM_START_COLLECTIONS)
    finally:
        source.close()

    model_modules = module_paths(variable_shapes)
    unloaded = model_modules - module_paths(loaded)
    # The outermost modules nothing was loaded into, e.g. ['aux1/head', 'aux2/head', 'head'].
    fresh = sorted("/".join(m) for m in unloaded if m[:-1] not in unloaded)
    # A name only the source has (a deeper source's extra block, excluded on purpose) matches.
    named = model_modules | module_paths(source_shapes)
    unmatched = set(init_from.exclude) - {m[-1] for m in named}
    if unmatched:
        logging.warning(
            "init_from.exclude names %s, which model %r does not have, nor the source (its "
            "top-level modules: %s).",
            sorted(unmatched), config.model,
            sorted(m[0] for m in model_modules if len(m) == 1),
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
        "freeze": config.get("freeze"),
    }
    logging.info(
        "Warm start (init_from): %sparams and batch_stats of the %s checkpoint (step %d) of "
        "%s (model %r); freshly initialized: %s; optimizer state and step start fresh.",
        "averaged " if average else "", how, step, source.workdir, record["model"],
        fresh or "nothing",
    )
    return loaded, record
