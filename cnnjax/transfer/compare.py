"""`run_transfer`: how much does pretraining help, and how should one fine-tune?

One source run is pretrained once; then, for every label budget of the target task, three arms
train on the target, each one ordinary `train_and_evaluate` run:
    scratch        the target config as it is (random initialization)
    finetune       every layer trained, starting from the source's final checkpoint (head excluded)
    linear_probe   the same start, only the new head trained (`freeze='backbone'`): the backbone's
                   weights stay fixed, but it runs in train mode, so its BatchNorm statistics are
                   re-estimated on the target data and its dropout is on (docs/training.md)
Source and target share one architecture, or the target's `init_from.submodule` names the module
of the target the source's weights fill (e.g. a ResNet classifier's weights in an FCN's
`backbone`); either way the fit is checked on abstract shapes before the source trains.

Layout of a transfer directory:
    transfer.json                   the source/target configs, budget field, arm overrides
                                    (a directory made with different ones is refused)
    trials/source/                  the source pretraining run (plus trial.json)
    trials/<budget>-<arm>-s<seed>/  one target run per budget, arm and seed (plus trial.json)
    results.csv/.json               one row per target run; results.json adds the mean/std table
    transfer.png                    final target metric against training examples (or against
                                    the budget values, when their examples are all the same), one
                                    line per arm
    report.md                       the table, each arm's gain over scratch, the best arm per budget

Runs go one after another; rerunning the same command skips finished runs and resumes an
interrupted one from its own checkpoint (the sweep's per-trial bookkeeping, cnnjax.tune.sweep),
also in a transfer directory moved or renamed since (given by its new path).
A failed or diverged run is recorded and the others go on; if the source run does not complete,
the arms that need it are recorded as failed. Budgets, arms and seeds may grow between reruns
(each run has its own directory); the configs may not change. The final eval (at the last step)
is what is compared: the best-over-evals value is reported too, but it selects on the eval split.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import statistics
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from cnnjax.train import config as config_lib
from cnnjax.train.loop import incompatible_saved_fields
from cnnjax.train.preemption import StopRequest
from cnnjax.tune import space as space_lib
from cnnjax.tune.sweep import (
    TRIAL_FILE,
    TRIALS_DIR,
    check_metric,
    config_changes,
    default_mode,
    finished_status,
    interrupted_trial,
    run_trial,
    say,
    start_trial,
    task_metrics,
    trial_result,
    trial_workdir,
)
from cnnjax.tune.sweep import failure_message as sweep_failure_message
from cnnjax.utils.files import atomic_write, check_output_dir, read_json, save_figure
from cnnjax.utils.lock import directory_lock
from cnnjax.utils.validation import invalid

ARMS = ("scratch", "finetune", "linear_probe")
ARM_LABELS = {"scratch": "from scratch", "finetune": "fine-tune all layers",
              "linear_probe": "linear probe (frozen backbone weights, BN stats adapt)"}
SOURCE_ID = "source"
#: What a comparison varies by default (`budgets` of it), and its default seeds.
DEFAULT_BUDGET_FIELD = "data.train_examples_per_class"
DEFAULT_SEEDS = (0,)
TRANSFER_FILE = "transfer.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_FILE = "transfer.png"
REPORT_FILE = "report.md"
# Fields each arm sets itself; the target config and arm_overrides may not.
_ARM_FIELDS = ("init_from.workdir", "freeze")
_OWNER = "transfer"


def _source_trial() -> space_lib.Trial:
    return space_lib.Trial(0, SOURCE_ID, OrderedDict())


def budget_slug(value: Any) -> str:
    """A directory-name form of a budget value: `10` -> '10', `'train[:10%]'` -> 'train_10pct',
    `'train[10%:]'` -> 'train_10pct_to', `'train[-50:]'` -> 'train_minus50_to' (a prefix slice
    keeps the short name; other slices say where they start and end)."""
    text = str(value).replace("%", "pct").replace("[:", "[").replace(":", "_to_")
    text = text.replace("-", "minus")
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "default"


def arm_overrides(arm: str, source_workdir: str, source_steps: int) -> OrderedDict:
    """The config fields an arm sets: none for scratch; the source's final checkpoint for the
    others (its last step, not its best-evaluated one: no selection on the source's eval split),
    plus `freeze='backbone'` for the linear probe."""
    if arm == "scratch":
        return OrderedDict()
    fields = OrderedDict([("init_from.workdir", os.path.abspath(source_workdir)),
                          ("init_from.step", int(source_steps))])
    if arm == "linear_probe":
        fields["freeze"] = "backbone"
    return fields


#: A transfer file's fields: the required ones and the optional ones with their defaults.
_TRANSFER_REQUIRED = ("source", "target", "budgets")
_TRANSFER_DEFAULTS = {"budget_field": DEFAULT_BUDGET_FIELD, "arms": ARMS,
                      "seeds": DEFAULT_SEEDS, "arm_overrides": None, "metric": None}


def transfer_parts(config: Any) -> tuple[Any, Any, dict[str, Any]]:
    """`(source, target, run_transfer's keyword arguments)` from a transfer file's config, read
    one way by the entry point and by launch.submit's checks; a missing required field (source,
    target, budgets) is a ValueError, the others take run_transfer's defaults."""
    missing = [name for name in _TRANSFER_REQUIRED if config.get(name) is None]
    if missing:
        raise invalid(_OWNER, "file", f"a config without {', '.join(missing)}",
                      f"expected the fields {list(_TRANSFER_REQUIRED)} (source and target "
                      "configs, the budget values), optionally "
                      f"{list(_TRANSFER_DEFAULTS)}; see experiments/transfers/*.py")
    kwargs = {name: config.get(name, default) for name, default in _TRANSFER_DEFAULTS.items()}
    return config.source, config.target, {"budgets": config.budgets, **kwargs}


def failure_message(rows: list[dict], transfer_dir: str) -> str | None:
    """A one-line error for the failed target runs (None if none failed). A diverged source is
    final (a rerun does not retry it), so its arms' message says what to change instead."""
    not_run = [r for r in rows if r["status"] == "failed"
               and r.get("reason") == "not run: the source run diverged"]
    if not_run:
        source = os.path.join(trial_workdir(transfer_dir, _source_trial()), "summary.json")
        return (f"the source run diverged ({source} says where), so {len(not_run)} "
                "warm-started run(s) did not run, and a rerun will not retry it: change the "
                "source config (e.g. a lower learning rate) and use a new --transfer_dir")
    return sweep_failure_message(rows, "run")


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """A comparison's checked settings (metric, arms, seeds, budgets, arm overrides)."""

    metric: str
    mode: str
    source_metric: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    budget_field: str
    budgets: list
    slugs: dict  # {directory name: budget}
    overrides: dict  # {arm: OrderedDict of dotted fields}, arms not run included

    def run_fields(self, source_dir: str,
                   source_steps: int) -> Iterator[tuple[str, str, Any, str, int, OrderedDict]]:
        """`(run_id, slug, budget, arm, seed, overrides)` of every target run, in run order."""
        for slug, budget in self.slugs.items():
            for arm in self.arms:
                for seed in self.seeds:
                    fields = OrderedDict([(self.budget_field, budget), ("seed", seed)])
                    fields.update(arm_overrides(arm, source_dir, source_steps))
                    fields.update(self.overrides.get(arm, {}))
                    yield f"{slug}-{arm}-s{seed}", slug, budget, arm, seed, fields


def check_settings(source: Any, target: Any, budget_field: str, budgets: Sequence[Any],
                   arms: Sequence[str], seeds: Sequence[int],
                   overrides: Mapping[str, Mapping[str, Any]] | None,
                   metric: str | None) -> TransferSettings:
    """Checks the metric, arms, seeds, budgets and arm overrides against the configs (their
    fields only: no dataset, no devices), so a bad value fails before anything is queued."""
    metric = check_metric(_OWNER, metric, target)
    # The source is reported by the same metric when its task has it (else by its own
    # best_metric, e.g. top1 for a classifier pretrained for a segmentation target).
    source_metric = (metric if metric in task_metrics(source)
                     else check_metric(_OWNER, None, source))
    arms = _check_arms(arms)
    seeds = _check_seeds(seeds)
    if budget_field in (*_ARM_FIELDS, "init_from.step", "seed"):
        raise invalid(_OWNER, "budget_field", budget_field,
                      "the comparison sets it itself; expected a target field such as "
                      "'data.train_examples_per_class' or 'data.train_split'")
    if not _is_list(budgets) or not budgets:
        raise invalid(_OWNER, "budgets", budgets,
                      f"expected a non-empty list of values for {budget_field!r}")
    values = list(budgets)
    slugs = [budget_slug(b) for b in values]
    if len(set(slugs)) != len(slugs):
        raise invalid(_OWNER, "budgets", values,
                      f"expected distinct values (their directory names are {slugs})")
    try:
        space_lib.check_fields(target, space_lib.grid({budget_field: values}))
    except ValueError as err:
        raise ValueError(f"transfer: budget_field={budget_field!r} / budgets={budgets!r} "
                         f"do not fit the target config: {err}") from None
    for value in values:  # each value's type too, named as the user gave it
        try:
            space_lib.apply_overrides(target, {budget_field: value})
        except ValueError as err:
            raise ValueError(f"transfer: budgets value {value!r} does not fit the target "
                             f"config's {budget_field}: {err}") from None
    return TransferSettings(metric, default_mode(metric), source_metric, arms, seeds,
                            budget_field, values, dict(zip(slugs, values, strict=True)),
                            _check_overrides(overrides, arms, target, budget_field))


def check_transfer(source: Any, target: Any, transfer_dir: str, *,
                   budget_field: str = DEFAULT_BUDGET_FIELD,
                   budgets: Sequence[Any], arms: Sequence[str] = ARMS,
                   seeds: Sequence[int] = DEFAULT_SEEDS,
                   arm_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   metric: str | None = None) -> dict[str, Any]:
    """`{run_id: config}` of the source and every target run after the checks that need neither
    the dataset nor the devices (`check_settings`, `validate_config` on each run): what
    launch.submit runs on a login node; `run_transfer` adds the engine's checks."""
    settings = check_settings(source, target, budget_field, budgets, arms, seeds, arm_overrides,
                              metric)
    for role, config in (("source", source), ("target", target)):
        try:
            config_lib.validate_config(config)
        except ValueError as err:
            raise ValueError(f"transfer: the {role} config is invalid: {err}") from None
    _check_roles(source, target, settings)
    source_dir = trial_workdir(transfer_dir, _source_trial())
    configs = {SOURCE_ID: source}
    for run_id, _, budget, arm, seed, fields in settings.run_fields(source_dir,
                                                                   source.num_train_steps):
        config = space_lib.apply_overrides(target, fields)
        try:
            config_lib.validate_config(config)
        except ValueError as err:
            raise ValueError(f"transfer: run {run_id} "
                             f"{_run_origin(settings.budget_field, budget, arm, seed)} has an "
                             f"invalid config: {err}") from None
        configs[run_id] = config
    return configs


def _run_origin(budget_field: str, budget: Any, arm: str, seed: int) -> str:
    """Which of the user's settings made a run, for its errors: the budget the run's config
    field comes from is a value of `budgets`, not something the user set on the field."""
    return f"(budgets value {budget!r} for {budget_field}, arm {arm!r}, seed {seed})"


class TransferPlan:
    """Every run of a comparison and its config, checked before anything trains."""

    def __init__(self, source: Any, target: Any, transfer_dir: str, budget_field: str,
                 budgets: Sequence[Any], arms: Sequence[str], seeds: Sequence[int],
                 overrides: Mapping[str, Mapping[str, Any]], metric: str | None):
        settings = check_settings(source, target, budget_field, budgets, arms, seeds,
                                  overrides, metric)
        self.metric, self.mode = settings.metric, settings.mode
        self.source_metric = settings.source_metric
        self.arms, self.seeds = settings.arms, settings.seeds
        self.budget_field, self.budgets = settings.budget_field, settings.budgets
        self.slugs, self.overrides = settings.slugs, settings.overrides
        checked_source = _check_configs(source, target, settings)
        self.source, self.target = source, target
        self.source_dir = trial_workdir(transfer_dir, _source_trial())
        self.runs: list[dict] = []  # {trial, budget, slug, arm, seed, config}
        source_shapes = None  # the source's variable shapes, traced for the first warm start
        for run_id, slug, budget, arm, seed, fields in settings.run_fields(
                self.source_dir, source.num_train_steps):
            config = space_lib.apply_overrides(target, fields)
            try:  # the batch against each budget's examples: check_data, with a budget hint
                checked = config_lib.check_config(config, for_training=False)
            except ValueError as err:
                raise ValueError(f"transfer: run {run_id} "
                                 f"{_run_origin(self.budget_field, budget, arm, seed)} has an "
                                 f"invalid config: {err}") from None
            if arm != "scratch":  # arm_overrides may change the model's shapes
                source_shapes = source_shapes or _variable_shapes(checked_source)
                _check_source_fits(source.model, source_shapes, config, checked, run_id)
            trial = space_lib.Trial(len(self.runs) + 1, run_id, fields)
            self.runs.append({"trial": trial, "budget": budget, "slug": slug,
                              "arm": arm, "seed": seed, "config": config})

    def check_data(self) -> dict[str, int]:
        """Training examples of the source and of every run (`{trial_id: n}`); raises if one is
        smaller than that run's global batch (an epoch would have no step), or if two budgets of
        `data.train_examples_per_class` give the same examples (each class's first n: both
        above every class's count). Reads labels, trains nothing."""
        known: dict[str, int] = {}  # task + data config (JSON) -> examples: one per budget
        sizes = {}
        for run_id, config in [(SOURCE_ID, self.source)] + [
                (run["trial"].trial_id, run["config"]) for run in self.runs]:
            key = json.dumps([config_lib.config_task(config), config_lib.flatten(config.data)],
                             sort_keys=True)
            if key not in known:  # the task's own input module (TensorFlow starts here)
                pipeline = config_lib.data_pipeline(config)
                known[key] = pipeline.get_dataset_info(config.data).num_train
            num_train = sizes[run_id] = known[key]
            if num_train < config.global_batch_size:
                what = "the source run" if run_id == SOURCE_ID else f"run {run_id}"
                raise invalid(_OWNER, "global_batch_size", config.global_batch_size,
                              f"{what} has {num_train} training examples; expected a global "
                              "batch of at most that many (lower it or raise the budget)")
        if self.budget_field == DEFAULT_BUDGET_FIELD:
            self._check_budgets_differ(sizes)
        return sizes

    def _check_budgets_differ(self, sizes: dict[str, int]) -> None:
        """Raises if two per-class budgets train on the same examples: the same count means the
        same first n of each class, so the two would compare arms on identical data."""
        budgets_of: dict[int, list[Any]] = {}
        for run in self.runs:
            same = budgets_of.setdefault(sizes[run["trial"].trial_id], [])
            if run["budget"] not in same:
                same.append(run["budget"])
        for num_train, budgets in budgets_of.items():
            if len(budgets) > 1:
                raise invalid(_OWNER, "budgets", tuple(self.budgets),
                              f"{self.budget_field} values {budgets} give the same {num_train} "
                              "training examples (a class with fewer than a budget gives all of "
                              "its own), so their runs would train on identical data; expected "
                              "budgets that give different numbers of examples")

    def describe(self) -> dict:
        """What must not change between reruns of one transfer directory."""
        return json.loads(json.dumps({
            "source": config_lib.flatten(self.source),
            "target": {k: v for k, v in config_lib.flatten(self.target).items()
                       if k not in (self.budget_field, "seed")},
            "budget_field": self.budget_field,
            "arm_overrides": {arm: dict(f) for arm, f in self.overrides.items()},
        }, default=str))


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _check_arms(arms: Any) -> tuple[str, ...]:
    if (not _is_list(arms) or not arms or len(set(arms)) != len(arms)
            or not all(a in ARMS for a in arms)):
        raise invalid(_OWNER, "arms", arms,
                      f"expected a non-empty list of distinct arms from {list(ARMS)}")
    return tuple(arms)


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    if (not _is_list(seeds) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                       for s in seeds)):
        raise invalid(_OWNER, "seeds", seeds,
                      "expected a non-empty list of distinct integers >= 0 (each arm runs once "
                      "per seed)")
    return tuple(seeds)


def _check_overrides(overrides: Any, arms: tuple[str, ...], target: Any,
                     budget_field: str) -> dict[str, OrderedDict]:
    """`{arm: {dotted field: value}}`, e.g. a lower learning rate for `finetune`; nested mappings
    (a config file's `arm_overrides.finetune.optimizer.learning_rate = 0.005`) are flattened.
    An arm that `arms` leaves out keeps its overrides, checked and recorded (transfer.json must
    not change with the arms run) but applied to no run; a name that is no arm is refused."""
    if overrides is None:
        return {}
    if not hasattr(overrides, "items"):
        raise invalid(_OWNER, "arm_overrides", overrides,
                      "expected a mapping {arm: {dotted config field: value}}")
    checked = {}
    for arm, fields in overrides.items():
        if arm not in ARMS:
            raise invalid(_OWNER, "arm_overrides", arm, f"expected an arm of {list(ARMS)}")
        if not hasattr(fields, "items"):
            raise invalid(_OWNER, f"arm_overrides[{arm!r}]", fields,
                          "expected a mapping {dotted config field: value}")
        fields = OrderedDict(config_lib.flatten(fields))
        for name in fields:
            if name in (*_ARM_FIELDS, "init_from.step", budget_field, "seed"):
                raise invalid(_OWNER, f"arm_overrides[{arm!r}]", name,
                              f"the comparison sets {name!r} itself; expected another field")
            if name == "data" or name.startswith("data."):
                raise invalid(_OWNER, f"arm_overrides[{arm!r}]", name,
                              "every arm trains and is evaluated on the same data (set data "
                              "fields on the target config); expected a training field such "
                              "as 'optimizer.learning_rate'")
        try:  # named as the user gave it, not as the sweep's parameters it is checked as
            if fields:
                space_lib.check_fields(target, space_lib.grid({k: [v] for k, v in
                                                               fields.items()}))
                space_lib.apply_overrides(target, fields)
        except ValueError as err:
            raise ValueError(f"transfer: arm_overrides[{arm!r}] does not fit the target config: "
                             f"{err}") from None
        checked[arm] = fields
    unrun = [arm for arm in checked if arm not in arms]
    if unrun:  # e.g. --transfer.arms="('scratch',)" on a file that overrides finetune
        logging.info("transfer: arm_overrides of %s not applied: arms=%s does not run them "
                     "(still checked, and recorded in %s).", unrun, list(arms), TRANSFER_FILE)
    return checked


def _check_configs(source: Any, target: Any, settings: TransferSettings) -> Any:
    """The engine's pre-compilation checks on both configs, then `_check_roles`. Returns the
    source's `CheckedConfig`."""
    checked = {}
    for role, config in (("source", source), ("target", target)):
        try:
            checked[role] = config_lib.check_config(config, for_training=False)  # check_data
        except ValueError as err:
            raise ValueError(f"transfer: the {role} config is invalid: {err}") from None
    _check_roles(source, target, settings)
    return checked["source"]


def _check_roles(source: Any, target: Any, settings: TransferSettings) -> None:
    """The fields the arms own are unset in `target`; source and target share one architecture
    unless `target.init_from.submodule` names the module the source fills; and a warm-started
    arm that loads the source's weight average (`init_from.ema`) has a source that keeps one
    (else every such run would fail when it starts, after the source trained)."""
    for name in _ARM_FIELDS:
        value = space_lib.get_field(target, name)
        if value is not None:
            raise invalid(_OWNER, f"target.{name}", value,
                          "expected None: each arm sets it (scratch: unset)")
    if source.model != target.model and space_lib.get_field(target,
                                                            "init_from.submodule") is None:
        raise invalid(_OWNER, "target.model", target.model,
                      f"expected the source's model {source.model!r} (so that the pretrained "
                      "weights fit the target network), or target.init_from.submodule naming "
                      "the target module they fill (e.g. 'backbone': an FCN's ResNet trunk "
                      "from a ResNet classifier)")
    if config_lib.ema_rule(source) is not None:
        return
    for arm in settings.arms:  # the target's own init_from.ema=True fails its validation
        if arm != "scratch" and settings.overrides.get(arm, {}).get("init_from.ema") is True:
            raise invalid(_OWNER, f"arm_overrides[{arm!r}].init_from.ema", True,
                          "the source config keeps no weight average (source.ema.decay is "
                          "None), so its checkpoints hold none to load; set source.ema.decay "
                          "(e.g. 0.999) or drop the override")


def _variable_shapes(checked: Any) -> Any:
    """Abstract shapes of a fresh init of `checked`'s model: the leaves its checkpoints hold."""
    import jax

    from cnnjax.train.state import init_variables

    input_shape = (1, *checked.data_info.image_shape)
    return jax.eval_shape(lambda rng: init_variables(checked.model, rng, input_shape),
                          jax.random.key(0))


def _check_source_fits(source_model: str, source_shapes: Any, config: Any, checked: Any,
                       run_id: str) -> None:
    """Before the source trains: its variables fill the warm-started run `config` as the engine
    will require when that run starts (`check_exclude_names`: every `init_from.exclude` name
    is a module's; `check_input_channels`: grey and RGB input layers named by
    `data.grey_to_rgb`; `select_pretrained`: same names and shapes, and every source variable
    loaded, with `init_from.exclude` and `init_from.submodule` applied)."""
    from cnnjax.train.init_from import check_exclude_names, check_input_channels
    from cnnjax.train.state import select_pretrained

    init_from = config.init_from
    try:
        check_exclude_names(tuple(init_from.exclude), config.model, checked.variable_shapes,
                            source_shapes)
        check_input_channels(checked.variable_shapes, source_shapes, tuple(init_from.exclude),
                             init_from.get("submodule"), source_workdir=init_from.workdir,
                             source_step=init_from.step, model=config.model,
                             grey_to_rgb=bool(config.data.get("grey_to_rgb", False)))
        select_pretrained(checked.variable_shapes, source_shapes, tuple(init_from.exclude),
                          source_workdir=init_from.workdir, source_step=init_from.step,
                          model=config.model, source_model=source_model,
                          submodule=init_from.get("submodule"))
    except ValueError as err:
        raise ValueError(f"transfer: the source run's weights cannot warm-start run {run_id}: "
                         f"{err}") from None


def _prepare_dir(transfer_dir: str, plan: TransferPlan) -> None:
    """Creates transfer.json, or checks the existing one describes the same comparison."""
    current = plan.describe()
    path = os.path.join(transfer_dir, TRANSFER_FILE)
    saved = read_json(path)
    if saved is not None:
        fresh = "use a new --transfer_dir or restore the original configs"
        for role in ("source", "target"):
            details = config_changes(saved.get(role, {}), current[role])
            if details:
                raise ValueError(f"transfer: transfer_dir={transfer_dir!r} was made with a "
                                 f"different {role} config ({details}); {fresh}.")
        for key in ("budget_field", "arm_overrides"):
            if saved.get(key) != current[key]:
                raise ValueError(f"transfer: transfer_dir={transfer_dir!r} was made with "
                                 f"{key}={saved.get(key)!r}, now {current[key]!r}; {fresh}.")
    os.makedirs(os.path.join(transfer_dir, "trials"), exist_ok=True)
    atomic_write(path, json.dumps(current, indent=2))


# ------------------------------------------------------------------------------------- run
def run_transfer(
    source_config: Any,
    target_config: Any,
    transfer_dir: str,
    *,
    budget_field: str = DEFAULT_BUDGET_FIELD,
    budgets: Sequence[Any],
    arms: Sequence[str] = ARMS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    arm_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    metric: str | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Pretrains `source_config` once, then trains each arm at each budget (and seed) on
    `target_config` with `budget_field` set to the budget; returns one row per target run.

    `metric` compares the target runs; None: the target config's `best_metric`. Everything
    (arms, seeds, budgets, arm overrides, every run's config, the data sizes and the transfer
    directory) is checked before anything trains.
    """
    check_output_dir(transfer_dir, "transfer: transfer_dir")  # before the plan's checks read data
    plan = TransferPlan(source_config, target_config, transfer_dir, budget_field, budgets, arms,
                        seeds, arm_overrides, metric)
    sizes = plan.check_data()
    with directory_lock(transfer_dir, "transfer_dir", kind="transfer comparison"):
        return _run_plan(plan, transfer_dir, sizes, verbose)


def _run_plan(plan: TransferPlan, transfer_dir: str, sizes: dict[str, int],
              verbose: bool) -> list[dict]:
    """`run_transfer` once `transfer_dir` is held: the source run, then every target run."""
    _prepare_dir(transfer_dir, plan)

    # SIGTERM between runs (no run holds a handler then) is kept pending, not the default
    # kill: the next run stops before training, recorded as interrupted (exit 143).
    with StopRequest():
        try:
            source_status = _run_once(plan.source, plan.source_dir, _source_trial(), "source",
                                      verbose)
        finally:  # KeyboardInterrupt included: the table shows the source run interrupted
            rows = write_results(transfer_dir, plan, sizes)
        for i, run in enumerate(plan.runs, start=1):
            trial, workdir = run["trial"], trial_workdir(transfer_dir, run["trial"])
            label = f"Run {i}/{len(plan.runs)} {trial.trial_id}"
            if run["arm"] != "scratch" and source_status != "completed":
                if not finished_status(workdir, run["config"]):
                    _record_not_run(trial, workdir, f"not run: the source run {source_status}")
                    say(verbose, f"{label}: not run (the source run {source_status}).")
                continue
            config = _with_recorded_source(run["config"], workdir, plan.source_dir)
            try:
                _run_once(config, workdir, trial, label, verbose)
            finally:  # KeyboardInterrupt included: the table shows what has finished so far
                rows = write_results(transfer_dir, plan, sizes)
    rows = write_results(transfer_dir, plan, sizes)
    if verbose:
        print(format_table(summarize(rows, plan.metric)), flush=True)
        print(f"Results: {os.path.join(transfer_dir, RESULTS_CSV)}, "
              f"{os.path.join(transfer_dir, REPORT_FILE)}", flush=True)
    return rows


def interruption_message(transfer_dir: str) -> str:
    """What a Ctrl-C'd `run_transfer` in `transfer_dir` stopped: the interrupted run (the
    source or a target run) and its engine's message (the step, the checkpoint a rerun resumes
    from), and where the results so far are."""
    where = f"Results so far: {os.path.join(transfer_dir, RESULTS_CSV)}"
    trials_dir = os.path.join(transfer_dir, TRIALS_DIR)
    stopped = interrupted_trial(trials_dir)
    if stopped is None:
        return f"Ctrl-C; rerunning the same command resumes the comparison. {where}"
    record, what = stopped
    run_id = record.get("trial_id")
    label = "the source run" if run_id == SOURCE_ID else f"run {run_id}"
    return f"{label} ({os.path.join(trials_dir, str(run_id))}): {what} {where}"


def _run_once(config: Any, workdir: str, trial: space_lib.Trial, label: str,
              verbose: bool) -> str:
    """Runs (or resumes) one trial unless it already finished; returns its status."""
    finished = finished_status(workdir, config)
    if finished:
        say(verbose, f"{label}: already {finished}, skipped.")
        return finished
    say(verbose, f"{label} -> {workdir}")
    record = run_trial(config, workdir, start_trial(trial, workdir))
    say(verbose, f"{label}: {record['status']}"
                  + (f" ({record['reason']})" if record["reason"] else ""))
    return record["status"]


def _with_recorded_source(config: Any, workdir: str, source_dir: str) -> Any:
    """`config` with the `init_from.workdir` that the checkpoints in `workdir` recorded, when that
    is this comparison's source before the transfer directory was moved (or copied): its
    absolute path ends in trials/source but is not `source_dir`'s. The run resumes from its own
    checkpoint (init_from unread), so the engine must not refuse the changed path."""
    try:
        differ = incompatible_saved_fields(workdir, config)
    except ValueError:  # an unreadable record: the run itself says so (recorded as failed)
        return config
    for name, saved, current in differ:
        if (name == "init_from.workdir" and current == os.path.abspath(source_dir)
                and isinstance(saved, str)
                and saved.split(os.sep)[-2:] == [TRIALS_DIR, SOURCE_ID]):
            return space_lib.apply_overrides(config, {name: saved})
    return config


def _record_not_run(trial: space_lib.Trial, workdir: str, reason: str) -> None:
    """A trial.json saying why a run that needs the source was not started (retried on rerun)."""
    os.makedirs(workdir, exist_ok=True)
    record = {**trial.describe(), "status": "failed", "reason": reason, "wall_time_s": 0.0,
              "invocations": 0}
    atomic_write(os.path.join(workdir, TRIAL_FILE), json.dumps(record, indent=2))


# --------------------------------------------------------------------------------- results
def write_results(transfer_dir: str, plan: TransferPlan, sizes: Mapping[str, int]) -> list[dict]:
    """Rebuilds results.csv/.json, transfer.png and report.md from the run directories."""
    source = trial_result(transfer_dir, _source_trial(), plan.source_metric,
                          default_mode(plan.source_metric))
    source["num_train"] = sizes.get(SOURCE_ID)
    source["metric"] = plan.source_metric
    rows = []
    for run in plan.runs:
        row = trial_result(transfer_dir, run["trial"], plan.metric, plan.mode)
        rows.append({"budget": run["budget"], "num_train": sizes.get(run["trial"].trial_id),
                     "arm": run["arm"], "seed": run["seed"],
                     **{k: row[k] for k in ("trial_id", "status", "final", "best", "best_step",
                                            "steps", "wall_time_s", "reason", "workdir")}})
    table = summarize(rows, plan.metric)
    atomic_write(os.path.join(transfer_dir, RESULTS_JSON), json.dumps(
        {"metric": plan.metric, "budget_field": plan.budget_field, "source": source,
         "runs": rows, "summary": table}, indent=2))
    atomic_write(os.path.join(transfer_dir, RESULTS_CSV), _csv(rows, plan.metric))
    atomic_write(os.path.join(transfer_dir, REPORT_FILE),
                  report_markdown(table, source, plan.metric, plan.budget_field,
                                  setup=describe_setup(plan.source, plan.target)))
    if any(r["final"] is not None for r in rows):
        plot_results(table, source, plan.metric, os.path.join(transfer_dir, PLOT_FILE),
                     plan.budget_field)
    return rows


def summarize(rows: list[dict], metric: str) -> list[dict]:
    """One entry per (budget, arm), in run order: mean and sample std of the final metric over
    the completed seeds, how many completed, and the gain over scratch at that budget: the mean
    of the per-seed improvements (higher accuracy, or lower loss: positive is better) over the
    seeds both arms completed (`paired_seeds`), so a failed run of either arm drops its seed
    from the comparison instead of biasing a mean."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((json.dumps(row["budget"]), row["arm"]), []).append(row)
    table, finals_by_seed = [], {}
    for key, group in groups.items():
        finals = {r["seed"]: r["final"] for r in group
                  if r["status"] == "completed" and r["final"] is not None}
        finals_by_seed[key] = finals
        values = list(finals.values())
        table.append({"budget": group[0]["budget"], "num_train": group[0]["num_train"],
                      "arm": group[0]["arm"], "metric": metric,
                      "mean": statistics.fmean(values) if values else None,
                      "std": statistics.stdev(values) if len(values) > 1 else None,
                      "completed": len(values), "runs": len(group),
                      "statuses": sorted({r["status"] for r in group})})
    better = 1.0 if default_mode(metric) == "max" else -1.0  # a lower loss is a gain
    for entry in table:
        budget = json.dumps(entry["budget"])
        scratch = finals_by_seed.get((budget, "scratch"), {})
        mine = finals_by_seed[(budget, entry["arm"])]
        paired = [s for s in mine if s in scratch] if entry["arm"] != "scratch" else []
        entry["paired_seeds"] = len(paired)
        entry["gain_over_scratch"] = (
            statistics.fmean(better * (mine[s] - scratch[s]) for s in paired) if paired
            else None)
    return table


def _csv(rows: list[dict], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["budget", "num_train", "arm", "seed", "trial_id", "status",
                     f"final_{metric}", f"best_{metric}", "best_step", "steps", "wall_time_s",
                     "reason"])
    for r in rows:
        writer.writerow([r["budget"], _blank(r["num_train"]), r["arm"], r["seed"], r["trial_id"],
                         r["status"], _blank(r["final"]), _blank(r["best"]),
                         _blank(r["best_step"]), r["steps"],
                         "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}",
                         r["reason"]])
    return buffer.getvalue()


def _mean_std(entry: dict) -> str:
    if entry["mean"] is None:
        return "/".join(entry["statuses"])
    text = f"{entry['mean']:.4f}"
    if entry["std"] is not None:
        text += f" ± {entry['std']:.4f}"
    if entry["completed"] < entry["runs"]:
        text += f" ({entry['completed']}/{entry['runs']} runs)"
    return text


def _pivot(table: list[dict]) -> tuple[list[dict], list[str]]:
    """Budgets in run order, each `{'budget', 'num_train', arm: entry}`; and the arms."""
    budgets: dict[str, dict] = {}
    arms: list[str] = []
    for entry in table:
        line = budgets.setdefault(json.dumps(entry["budget"]), {
            "budget": entry["budget"], "num_train": entry["num_train"]})
        line[entry["arm"]] = entry
        if entry["arm"] not in arms:
            arms.append(entry["arm"])
    return list(budgets.values()), arms


def format_table(table: list[dict]) -> str:
    """The mean final metric per budget (rows) and arm (columns), as aligned text."""
    lines, arms = _pivot(table)
    header = ["budget", "examples", *arms]
    cells = [header] + [[str(line["budget"]), _blank(line["num_train"], "-"),
                         *(_mean_std(line[a]) for a in arms)] for line in lines]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def describe_setup(source: Any, target: Any) -> str:
    """One line naming the source and target models and datasets (and where the source's
    weights go when the architectures differ)."""
    def dataset(config: Any) -> str:  # the tfds dataset when it is not the preset's own
        return config.data.get("tfds_name") or config.data.name

    line = f"Source {source.model} on {dataset(source)}; target {target.model} on {dataset(target)}"
    submodule = space_lib.get_field(target, "init_from.submodule")
    if submodule is not None:
        line += f", warm-started arms load the source into its `{submodule}`"
    return line + "."


def report_markdown(table: list[dict], source: dict, metric: str, budget_field: str,
                    setup: str | None = None) -> str:
    """A short markdown report: the setup line, the source run, the table with gains, the best
    arm per budget."""
    lines, arms = _pivot(table)
    source_value = "-" if source.get("final") is None else f"{source['final']:.4f}"
    out = [
        "# Transfer learning: from scratch vs fine-tuning vs linear probe", "",
        *([setup, ""] if setup else []),
        f"Source run: {source['status']}, final eval {source.get('metric', metric)} "
        f"{source_value} after "
        f"{source['steps']} steps on {_blank(source.get('num_train'), '?')} training examples.",
        f"Target: final eval {metric} (at the last step) per label budget (`{budget_field}`); "
        "mean ± sample std over seeds.", "",
        "| budget | examples | " + " | ".join(ARM_LABELS[a] for a in arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    for line in lines:
        cells = []
        for arm in arms:
            entry = line[arm]
            cell = _mean_std(entry)
            if entry["gain_over_scratch"] is not None:
                cell += f" ({entry['gain_over_scratch']:+.4f})"
            cells.append(cell)
        out.append(f"| {line['budget']} | {_blank(line['num_train'], '?')} | "
                   + " | ".join(cells) + " |")
    out += ["", "In parentheses: the gain over training from scratch at the same budget."]
    if "linear_probe" in arms:
        out += ["", "Linear probe: the backbone's weights stay fixed, but it trains in train mode "
                "(BatchNorm statistics re-estimated on the target data, dropout on; "
                "docs/training.md, `freeze`)."]
    out.append("")
    for line in lines:
        done = [(line[a]["mean"], a) for a in arms if line[a]["mean"] is not None]
        if done:
            best_value, best_arm = max(done) if default_mode(metric) == "max" else min(done)
            out.append(f"- budget {line['budget']} ({_blank(line['num_train'], '?')} examples): "
                       f"best arm {ARM_LABELS[best_arm]} ({best_value:.4f})")
    return "\n".join(out) + "\n"


def plot_results(table: list[dict], source: dict, metric: str, path: str,
                 budget_field: str | None = None) -> str:
    """Writes `results_figure` to `path` (PNG, atomically) and returns `path`."""
    return save_figure(results_figure(table, source, metric, budget_field), path)


def results_figure(table: list[dict], source: dict, metric: str,
                   budget_field: str | None = None) -> Any:
    """Final eval metric against the budgets (`_budget_axis`), one line per arm, error bars =
    the std over seeds. Uses the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, arms = _pivot(table)
    xs_of_budget, label, scale, ticks = _budget_axis(lines, budget_field)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for arm in arms:
        points = sorted((x, line[arm]["mean"], line[arm]["std"] or 0.0)
                        for x, line in zip(xs_of_budget, lines, strict=True)
                        if line[arm]["mean"] is not None)
        if points:
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=ARM_LABELS[arm],
                        linestyle="-" if ticks is None else "none")  # no trend across categories
    ax.set_xscale(scale)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
    ax.set_xlabel(label)
    ax.set_ylabel(f"final eval {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    source_value = "-" if source.get("final") is None else f"{source['final']:.3f}"
    ax.set_title(f"pretrained source: {source.get('metric', metric)} {source_value} "
                 f"({source['status']})", fontsize=9)
    fig.tight_layout()
    return fig


def _budget_axis(lines: list[dict],
                 budget_field: str | None) -> tuple[list[float], str, str, list[str] | None]:
    """`(x of each budget, axis label, scale, tick labels or None)` for `results_figure`: the
    budgets' training examples (log axis) when those tell every budget apart, as a data-size
    budget's do; else (a budget of num_train_steps, of a learning rate, two train_split slices
    of one size) the budget values themselves, numbers on their own axis (log if all positive),
    anything else one evenly spaced tick per budget in run order. Decided from the examples, not
    the field's name: a field's name does not say whether it changes the data's size."""
    sizes = [line["num_train"] for line in lines]
    if None not in sizes and len(set(sizes)) == len(sizes):
        return sizes, "target training examples", "log", None
    label = f"budget: {budget_field}" if budget_field else "budget"
    values = [line["budget"] for line in lines]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values, label, "log" if all(v > 0 for v in values) else "linear", None
    return list(range(len(values))), label, "linear", [str(v) for v in values]


# --------------------------------------------------------------------------------- helpers
def _blank(value: Any, empty: str = "") -> Any:
    return empty if value is None else value
