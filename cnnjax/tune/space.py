"""Hyperparameter search spaces over config fields named by dotted paths.

A `Param` says which field to vary (`optimizer.learning_rate`, `model_kwargs.activation`,
`global_batch_size`) and how: `choice` (listed values), `uniform`, `log_uniform` or `int_uniform`
(both ends included). `grid(params)` is the cartesian product of choices in a fixed order (the
first parameter varies slowest); `random(params, num_trials, seed)` draws distinct points from a
seeded NumPy generator, so the same seed always gives the same trials. Each `Trial` carries its
overrides (an ordered dict) and an id hashed from them, so rerunning a sweep maps every trial to
the same work directory. Nothing here imports JAX: spaces are checked before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

import ml_collections
import numpy as np

from cnnjax.utils.validation import (
    check_choice,
    check_non_negative_int,
    check_positive_int,
    invalid,
)

DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")
KINDS = ("grid", "random")
#: Every field a sweep file's `get_config()` may set (metric and mode are read by the sweep).
SWEEP_FIELDS = ("kind", "parameters", "num_trials", "seed", "metric", "mode")
#: The sweep file fields a command line may set although the file leaves them out (or None):
#: `{name: (type, default)}`, declared by `declare_optional_fields`.
OPTIONAL_FIELDS = {"metric": (str, None), "mode": (str, None), "seed": (int, 0),
                   "num_trials": (int, None)}
_OWNER = "sweep"
# How many draws `random` may spend per requested trial looking for distinct points.
_MAX_DRAWS_PER_TRIAL = 100


@dataclasses.dataclass(frozen=True)
class Param:
    """One swept field: `field` (dotted config path) and its distribution.

    `values` is used by `choice`; `low`/`high` by the others (`int_uniform` includes `high`).
    """

    field: str
    distribution: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if not isinstance(self.field, str) or not self.field or " " in self.field:
            raise invalid(_OWNER, "parameter field", self.field,
                          "expected a dotted config path such as 'optimizer.learning_rate'")
        name = f"parameters[{self.field!r}]"
        check_choice(_OWNER, f"{name}.distribution", self.distribution, DISTRIBUTIONS)
        # An argument of the other kind of distribution would be silently ignored.
        unused = (("low", "high") if self.distribution == "choice" else ("values",))
        for arg in unused:
            if getattr(self, arg) not in (None, ()):
                raise invalid(_OWNER, f"{name}.{arg}", getattr(self, arg),
                              f"expected no {arg!r} for distribution={self.distribution!r} "
                              "(choice takes values; uniform, log_uniform and int_uniform take "
                              "low and high)")
        if self.distribution == "choice":
            values = self.values
            if isinstance(values, str | bytes) or not isinstance(values, Iterable):
                raise invalid(_OWNER, f"{name}.values", values,
                              "expected a list or tuple of values to choose from")
            if isinstance(values, Mapping | ml_collections.ConfigDict):  # a nested field
                keys = list(values.keys())
                example = f"{self.field}.{keys[0]}" if keys else "optimizer.learning_rate"
                shown = (values.to_dict() if isinstance(values, ml_collections.ConfigDict)
                         else values)
                raise invalid(_OWNER, f"{name}.values", shown,
                              "expected a list or tuple of values, not a mapping: a nested field "
                              f"is named by its dotted path, {{{example!r}: (...)}} in a dict or "
                              f"choice({example!r}, (...)) in a list (a sweep file's ConfigDict "
                              "cannot hold dotted keys)")
            if isinstance(values, Set):  # str hashing differs per process
                raise invalid(_OWNER, f"{name}.values", values,
                              "expected a list or tuple: a set's order changes from one process "
                              "to the next, and with it which trial each index is, so a rerun "
                              "could not resume the sweep")
            values = tuple(values)
            if not values:
                raise invalid(_OWNER, f"{name}.values", values,
                              "expected at least one value to choose from")
            for value in values:
                try:
                    _canonical(value)
                except TypeError:
                    raise invalid(_OWNER, f"{name}.values", value,
                                  "expected bool, int, finite float, str, None or tuples of them "
                                  "(values a command line and JSON can hold)") from None
            # Equal values, or values the trial id cannot tell apart ((1, 2) and [1, 2]).
            keys = [json.dumps(_canonical(v), sort_keys=True) for v in values]
            repeated = [v for i, v in enumerate(values)
                        if v in values[:i] or keys[i] in keys[:i]]
            if repeated:
                raise invalid(_OWNER, f"{name}.values", values,
                              f"expected distinct values ({repeated[0]!r} repeats an equal value: "
                              "both would be the same trial)")
            object.__setattr__(self, "values", values)
            return
        for arg in ("low", "high"):
            value = getattr(self, arg)
            integral = self.distribution == "int_uniform"
            ok = (isinstance(value, int) if integral else isinstance(value, int | float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise invalid(_OWNER, f"{name}.{arg}", value,
                              f"expected a finite {'integer' if integral else 'number'}")
        if self.low >= self.high:
            raise invalid(_OWNER, f"{name}.low", self.low,
                          f"expected low < high (high={self.high!r})")
        if self.distribution == "log_uniform" and self.low <= 0:
            raise invalid(_OWNER, f"{name}.low", self.low,
                          "expected low > 0: log_uniform samples exp(uniform(log low, log high))")

    @property
    def numeric(self) -> bool:
        """True when every value the parameter can take is a (non-bool) number."""
        if self.distribution != "choice":
            return True
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.values)

    @property
    def log_scale(self) -> bool:
        """Plot on a log axis: log_uniform, or positive numeric choices spanning > 1 decade."""
        if self.distribution == "log_uniform":
            return True
        if self.distribution == "choice" and self.numeric and len(self.values) > 1:
            low, high = min(self.values), max(self.values)
            return low > 0 and high / low > 10
        return False

    def num_points(self) -> float:
        """How many distinct values the parameter can take (inf for continuous ones)."""
        if self.distribution == "choice":
            return len(self.values)
        if self.distribution == "int_uniform":
            return self.high - self.low + 1
        return math.inf

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw; Python scalars (not NumPy ones) so configs and JSON take them as they are."""
        if self.distribution == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.distribution == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.distribution == "log_uniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return int(rng.integers(self.low, self.high + 1))

    def describe(self) -> dict:
        """The parameter as JSON-ready data (what sweep.json stores)."""
        out: dict[str, Any] = {"field": self.field, "distribution": self.distribution}
        if self.distribution == "choice":
            out["values"] = _canonical(list(self.values))
        else:
            out["low"], out["high"] = self.low, self.high
        return out


def choice(field: str, values: Sequence[Any]) -> Param:
    """`field` takes one of `values` (every one of them in a grid)."""
    return Param(field, "choice", values=values)


def uniform(field: str, low: float, high: float) -> Param:
    """`field` drawn uniformly from [low, high)."""
    return Param(field, "uniform", low=low, high=high)


def log_uniform(field: str, low: float, high: float) -> Param:
    """`field` drawn so that its logarithm is uniform: each decade equally likely (0 < low)."""
    return Param(field, "log_uniform", low=low, high=high)


def int_uniform(field: str, low: int, high: int) -> Param:
    """`field` an integer drawn uniformly from low..high, both included."""
    return Param(field, "int_uniform", low=low, high=high)


def parse_param(spec: Any) -> Param:
    """A `Param` from itself or a mapping `{'field', 'distribution', 'values' | 'low', 'high'}`."""
    if isinstance(spec, Param):
        return spec
    if not isinstance(spec, Mapping) and not hasattr(spec, "items"):
        raise invalid(_OWNER, "parameter", spec,
                      "expected a Param (choice(...), log_uniform(...), ...) or a mapping with "
                      "'field' and 'distribution'")
    spec = dict(spec.items())
    unknown = sorted(set(spec) - {"field", "distribution", "values", "low", "high"})
    if unknown or "field" not in spec or "distribution" not in spec:
        raise invalid(_OWNER, "parameter", spec,
                      "expected keys 'field', 'distribution' and 'values' (choice) or "
                      "'low'/'high' (uniform, log_uniform, int_uniform)")
    return Param(**spec)


def trial_id(overrides: Mapping[str, Any]) -> str:
    """A 10-hex-digit id hashed from the overrides (field order does not matter).

    The same overrides give the same id in every process and on every rerun, so a trial always
    finds its own work directory again.
    """
    text = json.dumps(_canonical(dict(overrides)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of a space: its position, its id and the config overrides it applies."""

    index: int
    trial_id: str
    overrides: OrderedDict

    def describe(self) -> dict:
        """JSON-ready description: index, trial_id and the overrides."""
        return {"index": self.index, "trial_id": self.trial_id,
                "overrides": _canonical(dict(self.overrides))}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A grid or random space and its trials (computed once, in a fixed order)."""

    kind: str
    params: tuple[Param, ...]
    trials: tuple[Trial, ...]
    seed: int | None = None
    num_trials: int | None = None

    @property
    def fields(self) -> list[str]:
        """The config fields the space varies, in parameter order."""
        return [p.field for p in self.params]

    def describe(self) -> dict:
        """JSON-ready description: kind, seed, num_trials and each parameter."""
        return {"kind": self.kind, "seed": self.seed, "num_trials": self.num_trials,
                "parameters": [p.describe() for p in self.params]}


def _params(params: Any) -> tuple[Param, ...]:
    """Accepts a sequence of Params/specs, or a mapping `{field: values | Param}` (a sweep
    file's ConfigDict too, whose keys cannot hold dotted fields)."""
    if isinstance(params, Mapping | ml_collections.ConfigDict):
        items = [p if isinstance(p, Param) else choice(f, p) for f, p in params.items()]
        for key, param in zip(params.keys(), items, strict=True):
            if param.field != key:  # one of the two names would be silently ignored
                raise invalid(_OWNER, f"parameters[{key!r}].field", param.field,
                              f"expected the field to be its key {key!r}: key it "
                              f"{param.field!r} in a dict, or list it in parameters = "
                              f"(choice({param.field!r}, ...), ...) (a sweep file's ConfigDict "
                              "cannot hold dotted keys)")
    elif isinstance(params, str) or not isinstance(params, Iterable):
        raise invalid(_OWNER, "parameters", params,
                      "expected a list of parameters (choice(...), log_uniform(...), ...) or a "
                      "mapping {field: values} (a sweep file's ConfigDict cannot hold dotted "
                      "fields as keys: list choice('optimizer.learning_rate', ...) there)")
    else:
        items = [parse_param(p) for p in params]
    if not items:  # a ConfigDict's repr ends in a newline: shown as the mapping it holds
        shown = params.to_dict() if isinstance(params, ml_collections.ConfigDict) else params
        raise invalid(_OWNER, "parameters", shown, "expected at least one parameter to sweep")
    fields = [p.field for p in items]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise invalid(_OWNER, "parameters", repeated, "expected each field swept only once")
    return tuple(items)


def _trial(index: int, params: Sequence[Param], values: Sequence[Any]) -> Trial:
    overrides = OrderedDict((p.field, v) for p, v in zip(params, values, strict=True))
    return Trial(index, trial_id(overrides), overrides)


def grid(params: Any) -> SearchSpace:
    """Every combination of the choices, the first parameter varying slowest (itertools order).

    Every parameter must be a `choice` (a grid over a continuous range has no natural points:
    list them, or use `random`).
    """
    params = _params(params)
    for p in params:
        if p.distribution != "choice":
            raise invalid(_OWNER, f"parameters[{p.field!r}].distribution", p.distribution,
                          "expected 'choice' in a grid (list the values, or use kind='random' "
                          "for uniform/log_uniform/int_uniform)")
    combos = itertools.product(*(p.values for p in params))
    trials = tuple(_trial(i, params, combo) for i, combo in enumerate(combos))
    return SearchSpace("grid", params, trials)


def random(params: Any, num_trials: int, seed: int = 0) -> SearchSpace:
    """`num_trials` distinct points drawn with `np.random.default_rng(seed)`, parameter by
    parameter in the given order; the same seed and parameters always give the same trials."""
    params = _params(params)
    if num_trials is None:  # e.g. a grid file run with --sweep.kind=random
        raise invalid(_OWNER, "num_trials", num_trials,
                      "expected a positive integer: a random sweep draws num_trials points; set "
                      "num_trials = N in the sweep file or pass --sweep.num_trials=N")
    # Python ints from here (a NumPy one too): describe() writes both to the sweep's JSON.
    num_trials = check_positive_int(_OWNER, "num_trials", num_trials)
    seed = check_non_negative_int(_OWNER, "seed", seed)
    size = math.prod(p.num_points() for p in params)
    if num_trials > size:
        raise invalid(_OWNER, "num_trials", num_trials,
                      f"expected at most {size}, the number of distinct points in the space "
                      "(or use kind='grid' to run them all)")
    rng = np.random.default_rng(seed)
    trials: list[Trial] = []
    seen: set[str] = set()
    for _ in range(num_trials * _MAX_DRAWS_PER_TRIAL):
        if len(trials) == num_trials:
            break
        trial = _trial(len(trials), params, [p.sample(rng) for p in params])
        if trial.trial_id not in seen:  # a repeated point would be a repeated run
            seen.add(trial.trial_id)
            trials.append(trial)
    if len(trials) < num_trials:  # pragma: no cover - only near-exhausted finite spaces
        raise invalid(_OWNER, "num_trials", num_trials,
                      f"found only {len(trials)} distinct points in "
                      f"{num_trials * _MAX_DRAWS_PER_TRIAL} draws; ask for fewer trials")
    return SearchSpace("random", params, tuple(trials), seed=seed, num_trials=num_trials)


def check_sweep_fields(sweep_config: Any) -> None:
    """Refuses a sweep config field outside `SWEEP_FIELDS`, so a misspelt `sead` or `metirc` is
    an error naming it, not a default silently used instead."""
    if not hasattr(sweep_config, "items"):
        raise invalid(_OWNER, "config", sweep_config, "expected a ConfigDict or mapping")
    unknown = sorted(str(name) for name in dict(sweep_config.items()) if name not in SWEEP_FIELDS)
    if not unknown:
        return
    close = {n: difflib.get_close_matches(n, SWEEP_FIELDS, n=1, cutoff=0.6) for n in unknown}
    hints = [f"{n!r} -> {m[0]!r}" for n, m in close.items() if m]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    plural = "s" if len(unknown) > 1 else ""
    raise invalid(_OWNER, "field" + plural, unknown if plural else unknown[0],
                  f"a sweep file has no such field{plural}{hint}; expected fields among "
                  f"{list(SWEEP_FIELDS)}")


def declare_optional_fields(sweep_config: Any) -> Any:
    """`sweep_config` (a ConfigDict, changed in place; anything else is returned as it is) with
    each of `OPTIONAL_FIELDS` it lacks added with its default, and those it sets None, and a set
    `metric` or `mode`, made typed None-able fields (`FieldReference`). ml_collections applies a
    `--sweep.<field>=...` override only to a field the file has, and parses it by the field's
    type, so `--sweep.metric=loss` was refused for a file leaving the metric to its default (no
    such field) or setting it None (a NoneType field takes no override), and
    `--sweep.metric=None` for one naming a metric (a str field cannot be None). Defaults are
    what `from_config` and the sweep use for an unset field: the metric None (the base config's
    `best_metric`), the mode None (the metric's), the seed 0, `num_trials` None. A grid file's
    `--sweep.num_trials=N` thus reaches `check_grid_num_trials`, which names the grid's size
    (it was "the config has no field 'num_trials'"), and `--sweep.kind=random
    --sweep.num_trials=N` draws N points of the grid's values."""
    if not isinstance(sweep_config, ml_collections.ConfigDict):
        return sweep_config
    with sweep_config.unlocked():
        for name, (kind, default) in OPTIONAL_FIELDS.items():
            value = sweep_config.get(name, default)
            if name not in sweep_config or value is None or kind is str and isinstance(value,
                                                                                       str):
                sweep_config[name] = ml_collections.FieldReference(value, field_type=kind)
    return sweep_config


def sweep_file_parser(name: str = "sweep", lock_config: bool = True) -> Any:
    """An ml_collections config-file parser for the `--<name>=<sweep file>` flag that applies
    `declare_optional_fields` to the loaded file before the command line's `--<name>.<field>`
    overrides are: set it as the flag's `parser` (experiments.sweep, launch.submit's checks)."""
    from ml_collections.config_flags import config_flags

    class SweepFileParser(config_flags.ConfigFileFlagParser):
        def parse(self, path: str) -> Any:
            return declare_optional_fields(super().parse(path))

    return SweepFileParser(name=name, lock_config=lock_config)


def check_grid_num_trials(num_trials: Any, space: SearchSpace) -> None:
    """Refuses a grid sweep config's `num_trials` unless it is None (unset) or the grid's size.

    A grid runs every combination of its values, so its size is the product of the value
    lists; a `num_trials` (or `--sweep.num_trials=N`) that differs would otherwise be silently
    ignored, every trial still running and `launch.submit` still sizing the array to the whole
    grid. The grid's own size is accepted: it only restates the count. Fewer trials are run
    with `experiments.sweep --max_trials=N` (or `launch.submit --array=...`); `kind='random'`
    (`--sweep.kind=random`) samples `num_trials` points instead.
    """
    size = len(space.trials)
    if num_trials is None or (isinstance(num_trials, int) and not isinstance(num_trials, bool)
                              and num_trials == size):
        return
    counts = [len(p.values) for p in space.params]
    product = f"{' x '.join(map(str, counts))} = {size}" if len(counts) > 1 else str(size)
    trials = "trial" if size == 1 else "trials"
    raise invalid(_OWNER, "num_trials", num_trials,
                  f"a grid has exactly {size} {trials}, the product of its value lists "
                  f"({product}), so expected {size} or unset; to run fewer pass --max_trials=N to "
                  "experiments.sweep (--array=... to launch.submit), or sample num_trials points "
                  "with a random sweep (--sweep.kind=random, or kind='random' in the file)")


def from_config(sweep_config: Any) -> SearchSpace:
    """The space a sweep config describes: `kind`, `parameters`, and for random `num_trials`,
    `seed` (an ml_collections ConfigDict or a mapping); fields outside `SWEEP_FIELDS` are
    refused (`check_sweep_fields`), and so is a grid's `num_trials` other than its size
    (`check_grid_num_trials`), since a grid always runs all of its trials, or a grid's non-zero
    `seed`, which nothing would read.

    A grid's space records `num_trials=None` whatever the file says, so sweep.json of a grid
    (which `run_sweep` compares on every rerun) is the same with or without the field."""
    check_sweep_fields(sweep_config)
    get = sweep_config.get
    kind = check_choice(_OWNER, "kind", get("kind"), KINDS)
    params = get("parameters")
    if kind == "grid":
        space = grid(params)
        check_grid_num_trials(get("num_trials"), space)
        seed = get("seed")
        if seed not in (None, 0) or isinstance(seed, bool):  # 0: the files' explicit default
            raise invalid(_OWNER, "seed", seed,
                          "a grid draws nothing at random, so its seed would be ignored; expected "
                          "0 or unset (the trials' training seed is --config.seed; sweep it as a "
                          "parameter to repeat each point)")
        return space
    seed = get("seed")  # unset or None: 0, as declare_optional_fields documents
    return random(params, get("num_trials"), 0 if seed is None else seed)


def _leaf_paths(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": value}` for each leaf of a nested config (sub-configs are not leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(_leaf_paths(value, name + "."))
        else:
            out[name] = value
    return out


def check_fields(base_config: Any, space: SearchSpace) -> None:
    """Raises unless every swept field is an existing leaf of `base_config` (close matches named).

    Runs before any training, so a misspelt `optimizer.learnig_rate` costs nothing.
    """
    leaves = _leaf_paths(base_config)
    for param in space.params:
        if param.field in leaves:
            continue
        members = sorted(n for n in leaves if n.startswith(param.field + "."))
        if members:  # a sub-config: its fields are swept one by one, by their dotted paths
            raise invalid(_OWNER, f"parameters[{param.field!r}].field", param.field,
                          f"the base config's {param.field!r} is a group of settings, not one "
                          "setting; sweep its fields by their dotted paths: "
                          f"{members[:12]}{' ...' if len(members) > 12 else ''}")
        group, _, last = param.field.rpartition(".")
        siblings = sorted(n for n in leaves if group and n.rpartition(".")[0] == group)
        if siblings:
            # Within an existing group only its own fields are compared, by their last name:
            # on whole paths the shared prefix made 'optimizer.b2' the match of 'optimizer.lr'.
            names = {n.rpartition(".")[2]: n for n in siblings}
            close = [names[m] for m in difflib.get_close_matches(last, list(names), n=5,
                                                                 cutoff=0.6)]
            hint = (f"close matches: {close}" if close
                    else f"fields under {group!r}: {siblings}")
        else:  # top-level, or a misspelt group: whole paths, and the same last name anywhere
            same_name = [n for n in leaves if n.rpartition(".")[2] == last]
            similar = difflib.get_close_matches(param.field, list(leaves), n=5, cutoff=0.8)
            close = list(dict.fromkeys(similar + same_name))
            top = sorted(n for n in leaves if "." not in n)
            hint = (f"close matches: {close}" if close
                    else f"no close match; top-level fields: {top}" if not group and top
                    else "no close match")
        raise invalid(_OWNER, f"parameters[{param.field!r}].field", param.field,
                      f"the base config has no such field ({hint})")


def get_field(config: Any, field: str, default: Any = None) -> Any:
    """The value at dotted `field` (`optimizer.learning_rate`) of a nested config, or `default`
    where a part of the path is missing or not a mapping."""
    target = config
    for name in field.split("."):
        try:
            target = target[name]
        except (KeyError, AttributeError, TypeError):
            return default
    return target


def apply_overrides(base_config: Any, overrides: Mapping[str, Any]) -> Any:
    """A deep copy of `base_config` with each dotted field set (types checked by ConfigDict)."""
    config = copy.deepcopy(base_config)
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        target = config
        for name in parents:
            target = target[name]
        try:
            target[leaf] = value
        except (TypeError, KeyError, AttributeError) as err:
            raise invalid(_OWNER, f"parameters[{field!r}] value", value,
                          f"the base config refuses it ({err})") from None
    return config


def trial_configs(base_config: Any, space: SearchSpace) -> list[tuple[Trial, Any]]:
    """`(trial, base_config with its overrides)` for every trial, once `check_fields` passed
    (value checks are the caller's: the engine's, with or without the dataset)."""
    check_fields(base_config, space)
    return [(trial, apply_overrides(base_config, trial.overrides)) for trial in space.trials]


def _canonical(value: Any) -> Any:
    """JSON-ready copy (tuples as lists); TypeError for values JSON cannot hold faithfully."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"non-finite float {value!r}")
        return value
    if isinstance(value, np.generic):
        return _canonical(value.item())
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in JSON")
