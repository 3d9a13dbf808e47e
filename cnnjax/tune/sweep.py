"""`run_sweep`: every trial of a search space is one `train_and_evaluate` run in its own workdir.

Layout of a sweep directory:
    sweep.json            the space, its trials and the base config (refuses a different sweep)
    sweep.lock            locked while a driver checks and writes sweep.json, or rebuilds the
                          results (one at a time)
    trials/<trial_id>/    the engine's workdir for that trial (checkpoints, metrics.jsonl,
                          summary.json) plus trial.json (status, reason, wall time)
    results.csv/.json     one row per trial, best first; rewritten atomically after every trial
    sweep.png             the metric against each swept hyperparameter

Trials run one after another in this process, or one alone (`trial_index`, e.g. a cluster array
task), or a few consecutive ones (`trial_index`, `trial_count`: an array task running several).
Resume is per trial: a trial whose summary.json says completed (or trial.json diverged) is not run
again, an interrupted one continues from its own checkpoint (the engine resumes exactly), a failed
one is retried. A trial whose workdir another process holds (`cnnjax.utils.lock`) is skipped, not
run twice (with `trial_index`, trials asked for by index, it is an error instead). Results are
always rebuilt from the trial directories, read and written under sweep.lock, so the last table
written has seen every trial finished before it: concurrent array tasks and reruns agree on one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging

from cnnjax.train import config as config_lib
from cnnjax.train.ema import METRIC_PREFIX
from cnnjax.train.logging import METRICS_FILE
from cnnjax.train.loop import (
    CONFIG_FILE,
    SUMMARY_FILE,
    TrainingDivergedError,
    train_and_evaluate,
)
from cnnjax.train.optim import unread_fields
from cnnjax.train.preemption import StopRequest, stop_if_pending
from cnnjax.tune.metrics_file import read_checked_metrics
from cnnjax.tune.space import SearchSpace, Trial
from cnnjax.tune.space import trial_configs as space_trial_configs
from cnnjax.utils.files import (
    atomic_write,
    check_directory_kind,
    check_output_dir,
    read_json,
    remove_stale_temporaries,
    retire_error_log,
    save_figure,
    temporary_path,
)
from cnnjax.utils.lock import LOCK_FILE, DirectoryInUseError, directory_lock, waiting_lock
from cnnjax.utils.validation import check_choice, invalid

SWEEP_FILE = "sweep.json"
SWEEP_LOCK = "sweep.lock"  # held while sweep.json is checked and written, and the results rebuilt
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_FILE = "sweep.png"
#: Row statuses: `incomplete` = started but not finished (running elsewhere, or killed).
STATUSES = ("completed", "diverged", "failed", "interrupted", "incomplete", "pending")
_OWNER = "sweep"


def default_mode(metric: str) -> str:
    """'min' for a loss (`loss`, `ema_loss`), 'max' for every other eval metric (top-k
    accuracies, mAPs)."""
    return "min" if config_lib.lower_is_better(metric) else "max"


def task_metrics(config: Any) -> tuple[str, ...]:
    """The eval metrics runs of `config` report (`config_lib.eval_metrics`: its task's, and
    their `ema_` twins when it keeps a weight average)."""
    return config_lib.eval_metrics(config)


def check_metric(owner: str, metric: Any, config: Any) -> str:
    """`metric` if runs of `config` report it (`task_metrics`), else a ValueError naming the
    task's metrics. None means `config.best_metric`, the metric the runs keep their best
    checkpoint by (top1 for classification, map50 in the detection configs)."""
    task = config_lib.config_task(config)
    if metric is None:
        metric = config.best_metric
    choices = list(task_metrics(config))
    if metric not in choices:
        hint = (" and ema.decay unset: set it to report the weight average's ema_* metrics"
                if isinstance(metric, str) and metric.startswith(METRIC_PREFIX) else "")
        raise invalid(owner, "metric", metric,
                      f"expected one of {choices} (the eval metrics of config.task={task!r}"
                      f"{hint})")
    return metric


def check_mode(owner: str, metric: str, mode: Any) -> str:
    """The ranking `mode` for `metric`: its `default_mode` when None. The other one is refused:
    a loss ranked by 'max' would put the worst trial first."""
    expected = default_mode(metric)
    if mode is None:
        return expected
    check_choice(owner, "mode", mode, ("max", "min"))
    if mode != expected:
        better = "lower" if expected == "min" else "higher"
        raise invalid(owner, "mode", mode, f"expected {expected!r} for metric={metric!r} "
                      f"({better} is better); leave mode unset to follow the metric")
    return mode


def check_ranking(base_config: Any, trials: Sequence[tuple[Trial, Any]], metric: Any,
                  mode: Any) -> tuple[str, str]:
    """`(metric, mode)` the trials are ranked by (None: the base config's best_metric, and the
    metric's default mode), checked against every trial's config (`trials`, as
    `space.trial_configs` builds them), not the base's: a trial that cannot report the metric
    (e.g. one without ema.decay for ema_top1) would train and stay unranked. run_sweep and
    launch's entry checks both call it, before anything trains."""
    if metric is None:
        metric = base_config.best_metric
    unranked = [(trial, config) for trial, config in trials
                if metric not in task_metrics(config)]
    if unranked and len(unranked) == len(trials):  # no trial reports it: the sweep's metric
        check_metric(_OWNER, metric, unranked[0][1])
    for trial, config in unranked[:1]:  # some do: name the first that does not
        check_metric(f"{_OWNER}: trial {trial.index} ({trial.trial_id}, "
                     f"{dict(trial.overrides)}) would be left unranked", metric, config)
    return metric, check_mode(_OWNER, metric, mode)


def trial_workdir(sweep_dir: str, trial: Trial) -> str:
    """The work directory of `trial`: `<sweep_dir>/trials/<trial_id>`."""
    return os.path.join(sweep_dir, TRIALS_DIR, trial.trial_id)


def run_sweep(
    base_config: Any,
    space: SearchSpace,
    sweep_dir: str,
    metric: str | None = None,
    mode: str | None = None,
    *,
    trial_index: int | None = None,
    trial_count: int = 1,
    max_trials: int | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Runs the trials of `space` not yet finished in `sweep_dir`; returns the result rows.

    `metric` (an eval metric of the base config's task: loss, top1, top5 for classification;
    map50, map, coco_map50, coco_map75 for detection; None: the base config's `best_metric`) and
    `mode` ('max'/'min'; default by
    metric) rank the trials by their best eval value. `trial_index` runs only that trial (array
    jobs), or with `trial_count` the trials `trial_index ... trial_index + trial_count - 1` (those
    that exist) one after another (an array task running several); `max_trials` caps how many
    trials this call starts (0: only rewrite results and plot; a random sweep's num_trials
    above the one sweep_dir holds is refused, not recorded). Every field, value and trial config
    is checked before anything trains.
    """
    trials = space_trial_configs(base_config, space)
    metric, mode = check_ranking(base_config, trials, metric, mode)
    _check_selection(space, trial_index, trial_count, max_trials)
    # A file in the way: one line, no traceback, before the trial configs read (or generate) data.
    check_output_dir(sweep_dir, f"{_OWNER}: sweep_dir")
    check_directory_kind(sweep_dir, "sweep", "sweep_dir")
    configs = _checked_configs(space, trials)
    _prepare_sweep_dir(sweep_dir, space, base_config, metric, mode, may_grow=max_trials != 0)

    selected = (space.trials if trial_index is None
                else space.trials[trial_index:trial_index + trial_count])
    started = 0
    # SIGTERM between trials (no run holds a handler then) is kept pending, not the default
    # kill: the next trial stops before it trains, recorded as interrupted (exit 143).
    with StopRequest():
        for trial in selected:
            workdir = trial_workdir(sweep_dir, trial)
            if _skip_finished(trial, workdir, configs[trial.trial_id], space, verbose):
                continue
            if max_trials is not None and started >= max_trials:
                break
            try:
                with directory_lock(workdir):  # the engine takes it again (re-entrant)
                    # again under the lock: another driver may have finished it since
                    if _skip_finished(trial, workdir, configs[trial.trial_id], space, verbose):
                        continue
                    started += 1
                    record = _run_and_tabulate(trial, configs[trial.trial_id], workdir, sweep_dir,
                                               space, metric, mode, verbose)
            except DirectoryInUseError as err:  # another array task or driver is running it
                _skip_busy_trial(trial, err, trial_index, verbose)
                continue
            say(verbose, f"Trial {trial.trial_id}: {record['status']}"
                          + (f" ({record['reason']})" if record["reason"] else ""))
    rows = write_results(sweep_dir, space, metric, mode)
    if verbose:
        _print_results(rows, space, metric, sweep_dir)
    return rows


def _skip_finished(trial: Trial, workdir: str, config: Any, space: SearchSpace,
                   verbose: bool) -> bool:
    """Whether `trial` is finished (`finished_status`), so this call skips it (saying so)."""
    finished = finished_status(workdir, config)
    if finished:
        say(verbose, f"Trial {trial.index + 1}/{len(space.trials)} {trial.trial_id} "
                      f"{_fmt(trial.overrides)}: already {finished}, skipped.")
    return bool(finished)


def check_overrides_not_swept(overrides: Iterable[str], space: SearchSpace, sweep: str,
                              flag: str = "config") -> None:
    """Refuses a command-line override of the base config (`--<flag>.<path>`, each dotted
    `path` of `overrides`) of a field the sweep sets in every trial, or of a group holding or
    held by one: each trial's value replaced it without a word. `sweep` names the sweep file
    as given (`--sweep=<file>`)."""
    for path in overrides:
        for field in space.fields:
            if path == field or field.startswith(f"{path}.") or path.startswith(f"{field}."):
                which = "that field" if path == field else f"{field}"
                raise ValueError(f"--{flag}.{path} is invalid; the sweep ({sweep}) sets {which} "
                                 "in every trial; drop it (or remove it from the sweep)")


def _check_selection(space: SearchSpace, trial_index: Any, trial_count: Any,
                     max_trials: Any) -> None:
    """Refuses a `trial_index` outside the space, a `trial_count` below 1 (or above 1 without
    `trial_index`) and a negative `max_trials`, before any trial config is built."""
    if trial_index is not None and (
        isinstance(trial_index, bool)
        or not isinstance(trial_index, int)
        or not 0 <= trial_index < len(space.trials)
    ):
        raise invalid(_OWNER, "trial_index", trial_index,
                      f"expected an integer in [0, {len(space.trials) - 1}] (the space has "
                      f"{len(space.trials)} trials)")
    if isinstance(trial_count, bool) or not isinstance(trial_count, int) or trial_count < 1:
        raise invalid(_OWNER, "trial_count", trial_count, "expected an integer >= 1")
    if trial_count > 1 and trial_index is None:
        raise invalid(_OWNER, "trial_count", trial_count,
                      "expected 1 without trial_index (it counts the trials from trial_index)")
    if max_trials is not None and (
        isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 0
    ):
        raise invalid(_OWNER, "max_trials", max_trials, "expected an integer >= 0 or None")


def _run_and_tabulate(trial: Trial, config: Any, workdir: str, sweep_dir: str,
                      space: SearchSpace, metric: str, mode: str, verbose: bool) -> dict:
    """Starts and runs one trial (its workdir locked by the caller), rewriting the results
    table when it starts (shown incomplete) and when it ends, however it ends."""
    say(verbose, f"Trial {trial.index + 1}/{len(space.trials)} {trial.trial_id} "
                  f"{_fmt(trial.overrides)} -> {workdir}")
    record = start_trial(trial, workdir)
    try:  # the table first shows it incomplete; a Ctrl-C then is recorded as the trial's too
        return run_trial(config, workdir, record,
                         announce=lambda: write_results(sweep_dir, space, metric, mode))
    finally:  # KeyboardInterrupt included: the table shows what has finished so far
        write_results(sweep_dir, space, metric, mode)


def _skip_busy_trial(trial: Trial, err: DirectoryInUseError, trial_index: int | None,
                     verbose: bool) -> None:
    """Says a trial whose workdir another process holds is skipped; with `trial_index` (these
    trials were asked for) that is an error naming the trial instead."""
    busy = _in_use(err)
    if trial_index is not None:  # asked for these trials: say one was not run
        raise DirectoryInUseError(
            f"{_OWNER}: trial_index={trial.index} (trial {trial.trial_id}): {busy}; "
            "another task or driver of this sweep is running it: wait for it to finish "
            "or stop it, then rerun.") from None
    say(verbose, f"Trial {trial.trial_id}: skipped, {busy}.")


def _print_results(rows: list[dict], space: SearchSpace, metric: str, sweep_dir: str) -> None:
    """Prints the ranked table and where the results and the plot are."""
    print(format_table(rows, space, metric), flush=True)
    print(f"Results: {os.path.join(sweep_dir, RESULTS_CSV)}", flush=True)
    nothing = no_result_message(rows)
    if nothing:
        print(f"{nothing[0].upper()}{nothing[1:]}.", flush=True)
    elif os.path.exists(os.path.join(sweep_dir, PLOT_FILE)):
        print(f"Plot:    {os.path.join(sweep_dir, PLOT_FILE)}", flush=True)


def trial_configs(base_config: Any, space: SearchSpace) -> dict[str, Any]:
    """`{trial_id: base + overrides}`, each checked by the engine's `check_config` (fields,
    values, model, dataset, schedule ...), so a bad trial is refused before any trial trains."""
    return _checked_configs(space, space_trial_configs(base_config, space))


def _checked_configs(space: SearchSpace, trials: Sequence[tuple[Trial, Any]]) -> dict[str, Any]:
    """`trial_configs` of the `(trial, config)` pairs `space.trial_configs` built."""
    configs = {}
    for trial, config in trials:
        try:
            config_lib.check_config(config)  # the engine's own pre-compilation checks
        except ValueError as err:
            raise ValueError(
                f"sweep: trial {trial.index} ({trial.trial_id}, {dict(trial.overrides)}) has an "
                f"invalid config: {err}"
            ) from None
        configs[trial.trial_id] = config
    check_swept_fields_are_read(space, configs)
    return configs


def check_swept_fields_are_read(space: SearchSpace, configs: dict[str, Any]) -> None:
    """Refuses a swept `optimizer.*`/`schedule.*` field that no trial's optimizer or schedule
    reads (`momentum` under adam: every trial would train the same network), and logs the
    trials that repeat another's training because they differ only in fields their own
    optimizer/schedule ignores (a grid over `optimizer.name` x `optimizer.momentum`)."""
    unread = {trial.trial_id: unread_fields(configs[trial.trial_id]) for trial in space.trials}
    for field in space.fields:
        reasons = {unread[trial.trial_id].get(field) for trial in space.trials}
        if None not in reasons:
            why = "; ".join(sorted(reasons))
            raise invalid(_OWNER, "parameters", field,
                          f"expected a field some trial reads: {why}, so every trial would "
                          "train alike; sweep a field the chosen optimizer and schedule read, "
                          "or sweep optimizer.name / schedule.name with it")
    trainings: dict[str, list[Trial]] = {}
    for trial in space.trials:
        read = {f: v for f, v in trial.overrides.items() if f not in unread[trial.trial_id]}
        trainings.setdefault(json.dumps(read, sort_keys=True, default=repr), []).append(trial)
    repeats = [same for same in trainings.values() if len(same) > 1]
    if repeats:
        example = repeats[0]
        ignored = sorted({f for t in example for f in t.overrides if f in unread[t.trial_id]})
        logging.warning(
            "sweep: %d of %d trials train the same network as another trial: they differ only "
            "in fields their optimizer/schedule does not read, e.g. trials %s differ only in %s "
            "(%s).", sum(len(s) - 1 for s in repeats), len(space.trials),
            [t.index for t in example], ignored, unread[example[0].trial_id][ignored[0]])


# ------------------------------------------------------------------------------ sweep.json
def _sweep_description(space: SearchSpace, base_config: Any, metric: str, mode: str) -> dict:
    swept = set(space.fields)
    base = {k: v for k, v in config_lib.flatten(base_config).items() if k not in swept}
    description = {
        "space": space.describe(),
        "trials": [t.describe() for t in space.trials],
        "base_config": base,
        "metric": metric,
        "mode": mode,
    }
    return json.loads(json.dumps(description))  # tuples -> lists, as they read back


def _prepare_sweep_dir(
    sweep_dir: str, space: SearchSpace, base_config: Any, metric: str, mode: str,
    *, may_grow: bool = True,
) -> None:
    """Creates sweep.json, or checks (`check_sweep_dir`) that the existing one describes the
    same sweep, as one step: two drivers started together on a new sweep_dir each found no
    sweep.json, and the second's overwrote the first's while the first's trials ran. The check
    and the write run under `<sweep_dir>/sweep.lock` (a blocking flock, held for milliseconds
    here; `write_results` holds it while it rebuilds the table),
    and a new sweep.json is created only where none exists (a hard link: atomic on a file
    system without flock too), so one driver writes it and the other is refused by
    `check_sweep_dir` (or, the same sweep, goes on with it).

    They also run holding `<sweep_dir>/run.lock`, which a tune, training run, transfer
    comparison or LR range test holds from before it writes its marker to its end, and the
    directory's kind is checked again there, as those commands check it once they hold the
    lock: a sweep and one of them started together on a new directory both passed
    `check_directory_kind` before either wrote its marker, and both ran there. Now the one
    that comes second is refused (the directory is in use, or holds the other's marker).

    Without `may_grow` (max_trials=0: only the table is rebuilt) a grown random sweep is refused,
    not recorded: a look at more trials must not make the sweep's own command a "shrink"."""
    check_sweep_dir(sweep_dir, space, base_config, metric, mode)  # refused: nothing created
    os.makedirs(os.path.join(sweep_dir, TRIALS_DIR), exist_ok=True)
    path = os.path.join(sweep_dir, SWEEP_FILE)
    with (waiting_lock(os.path.join(sweep_dir, SWEEP_LOCK)),
          directory_lock(sweep_dir, "sweep_dir", kind="sweep")):
        current = check_sweep_dir(sweep_dir, space, base_config, metric, mode)
        text = json.dumps(current, indent=2)
        if not os.path.exists(path):
            if not _create_new(path, text):  # another driver's, created since: the same sweep?
                check_sweep_dir(sweep_dir, space, base_config, metric, mode)
        else:
            saved = read_json(path)
            if saved != current:  # a grown random sweep, or another metric or mode
                if not may_grow and saved["space"] != current["space"]:
                    raise _growth_refused(sweep_dir, saved["space"], current["space"])
                atomic_write(path, text)


def _growth_refused(sweep_dir: str, saved: dict, current: dict) -> ValueError:
    """The error of max_trials=0 (rebuild the table) with a larger random sweep's num_trials
    than `sweep_dir` holds (`saved`, `current`: described spaces `check_sweep_dir` accepted)."""
    old, new = saved["num_trials"], current["num_trials"]
    return invalid(_OWNER, "max_trials", 0,
                   f"with num_trials={new} it would grow the random sweep in "
                   f"sweep_dir={sweep_dir!r} from its {old} trials, and max_trials=0 only "
                   f"rebuilds the results table of the trials it holds: rerun with "
                   f"num_trials={old} to rebuild the table, or with max_trials unset or >= 1 "
                   f"to grow the sweep to {new} trials")


def _create_new(path: str, text: str) -> bool:
    """Writes `text` to `path` only if no file is there, atomically (a complete file or none,
    whoever reads it); False if one is."""
    remove_stale_temporaries(path)  # a killed driver's temporary
    temporary = temporary_path(path)
    try:
        atomic_write(temporary, text)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: O_EXCL keeps the first writer's file
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def check_sweep_dir(
    sweep_dir: str, space: SearchSpace, base_config: Any, metric: str, mode: str
) -> dict:
    """Raises a ValueError when `sweep_dir`'s sweep.json describes another sweep; returns this
    sweep's description (writes nothing: `launch.submit` calls it before queuing a job).

    The metric and mode may change between runs (they only re-rank); the space, the trials and
    every trajectory-defining base-config field (the engine's RUNTIME_FIELDS excepted) may not,
    except that a random sweep may grow: a larger `num_trials` with the same seed draws the same
    first trials, so the finished ones stand and only the new ones run. The refusal names each
    field that differs, old -> new (`space_changes`, `config_changes`).
    """
    current = _sweep_description(space, base_config, metric, mode)
    path = os.path.join(sweep_dir, SWEEP_FILE)
    fresh = (
        "to start fresh use a new --sweep_dir or delete this one; to resume this sweep run it "
        "with its original sweep file and base config (sweep.json in it records them)"
    )
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except ValueError as err:  # cut short (a disk error): say which file, and what to do
            raise ValueError(
                f"sweep: {path!r} is unreadable ({type(err).__name__}: {err}); it records "
                "which sweep sweep_dir holds: restore it, or delete it and rerun the sweep's own "
                "command (its finished trials are kept).") from None
        if not _same_or_grown(saved, current):
            raise ValueError(
                f"sweep: sweep_dir={sweep_dir!r} holds a different search space "
                f"({space_changes(saved.get('space') or {}, current['space'])}); {fresh}."
            )
        details = config_changes(saved.get("base_config", {}), current["base_config"])
        if details:
            raise ValueError(
                f"sweep: sweep_dir={sweep_dir!r} was created with a different base config "
                f"({details}); {fresh}."
            )
    return current


def _same_or_grown(saved: dict, current: dict) -> bool:
    """Whether `current` (a sweep description) is the saved sweep, or the saved random sweep
    with more trials: the same space but `num_trials`, and the saved trials as its first ones."""
    old_space, new_space = saved.get("space") or {}, current["space"]
    old_trials, new_trials = saved.get("trials") or [], current["trials"]
    if old_space == new_space:
        return old_trials == new_trials
    grown = (new_space.get("kind") == "random"
             and {**old_space, "num_trials": None} == {**new_space, "num_trials": None}
             and isinstance(old_space.get("num_trials"), int)
             and new_space["num_trials"] > old_space["num_trials"])
    return grown and new_trials[:len(old_trials)] == old_trials


def space_changes(saved: dict, current: dict) -> str:
    """What differs between two described spaces (`SearchSpace.describe()`), field by field as
    "name: old -> new" ("kind: 'grid' -> 'random'", "parameters['x'].values: [1, 2] -> [1, 3]",
    a parameter added or dropped, their order), long value lists shortened."""
    parts = []
    grids = "grid" in (saved.get("kind"), current.get("kind"))  # a grid records None for both
    for key in ("kind",) if grids else ("kind", "seed", "num_trials"):
        old, new = saved.get(key), current.get(key)
        if old != new:
            shrunk = (key == "num_trials" and isinstance(old, int) and isinstance(new, int)
                      and new < old)
            parts.append(f"{key}: {old!r} -> {new!r}" + (
                " (a random sweep may grow, not shrink: run fewer with --max_trials)"
                if shrunk else ""))
    old_params = {p.get("field"): p for p in saved.get("parameters") or []}
    new_params = {p["field"]: p for p in current.get("parameters") or []}
    for field, new in new_params.items():
        old = old_params.get(field)
        name = f"parameters[{field!r}]"
        if old is None:
            parts.append(f"{name}: <not swept> -> {_param_text(new)}")
        elif old.get("distribution") != new["distribution"]:
            parts.append(f"{name}: {_param_text(old)} -> {_param_text(new)}")
        else:
            parts += [f"{name}.{key}: {_brief(old.get(key))} -> {_brief(new.get(key))}"
                      for key in ("values", "low", "high") if old.get(key) != new.get(key)]
    parts += [f"parameters[{field!r}]: {_param_text(old)} -> <not swept>"
              for field, old in old_params.items() if field not in new_params]
    if list(old_params) != list(new_params) and set(old_params) == set(new_params):
        parts.append(f"parameter order: {list(old_params)} -> {list(new_params)} (it orders "
                     "the trials)")
    return "; ".join(parts) or ("the same space, but sweep.json lists other trials for it: it "
                                "was written by another version of cnnjax")


def _param_text(param: dict) -> str:
    """`choice [0.1, 0.3]`, `log_uniform 0.001..0.1`: a described parameter, briefly."""
    if param.get("distribution") == "choice":
        return f"choice {_brief(param.get('values'))}"
    return f"{param.get('distribution')} {param.get('low')!r}..{param.get('high')!r}"


def _brief(value: Any, limit: int = 6) -> str:
    """`repr(value)` (`<unset>` for None), a list of more than `limit` values shortened to its
    first and last ones and its length."""
    if isinstance(value, list) and len(value) > limit:
        head = ", ".join(repr(v) for v in value[:limit - 2])
        return f"[{head}, ..., {value[-1]!r}] ({len(value)} values)"
    return "<unset>" if value is None else repr(value)


def config_changes(saved: dict, current: dict, limit: int = 8) -> str:
    """The trajectory-defining fields that differ between two flat configs, as "name: old -> new"
    (up to `limit`), or "" when a run made with `saved` may resume under `current`."""
    differ = config_lib.incompatible_fields(saved, current)
    return ", ".join(f"{n}: {saved.get(n, '<unset>')!r} -> {current.get(n, '<unset>')!r}"
                     for n in differ[:limit])


# --------------------------------------------------------------------------------- trials
def finished_status(workdir: str, config: Any) -> str | None:
    """'completed' or 'diverged' when the trial need not run again, else None (run/resume).

    A divergence is deterministic (same config, same data order), so rerunning it would only
    diverge again, unless `max_loss` (the loss counted as divergence; a runtime field, so it may
    change on a rerun) is not the one it diverged under; a failure may be transient (memory, a
    missing dataset) and is retried.
    """
    summary = read_json(os.path.join(workdir, SUMMARY_FILE)) or {}
    record = read_json(os.path.join(workdir, TRIAL_FILE)) or {}
    if summary.get("status") == "completed" and summary.get("step") == config.num_train_steps:
        return "completed"
    if summary.get("status") == "diverged" and record.get("status") == "diverged":
        ran = read_json(os.path.join(workdir, CONFIG_FILE)) or {}
        if ran.get("max_loss") == config.get("max_loss"):
            return "diverged"
    return None


def start_trial(trial: Trial, workdir: str) -> dict:
    """Marks the trial started (status incomplete, `started_at`) in trial.json, keeping its past
    wall time plus that of a previous start that never recorded its own (`killed_run_time`)."""
    path = os.path.join(workdir, TRIAL_FILE)
    previous = read_json(path) or {}
    record = {
        **trial.describe(),
        "status": "incomplete",
        "reason": "",
        "wall_time_s": float(previous.get("wall_time_s", 0.0)) + killed_run_time(workdir,
                                                                                previous),
        "invocations": int(previous.get("invocations", 0)) + 1,
        "started_at": time.time(),
    }
    os.makedirs(workdir, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2))
    return record


def _written_since(path: str, started: Any) -> bool:
    """Whether the file at `path` was written at or after `started` (a time.time(); None or
    invalid: True, nothing to compare with)."""
    if isinstance(started, bool) or not isinstance(started, int | float):
        return True
    try:
        return os.stat(path).st_mtime >= started
    except OSError:
        return False


def killed_run_time(workdir: str, previous: dict) -> float:
    """Seconds a previous start of the trial ran without recording them (SIGKILL, power loss:
    trial.json still says incomplete and holds its `started_at`), measured to the newest file it
    wrote in `workdir` (metrics, checkpoints), so the time between the kill and the rerun is not
    counted; 0.0 when the previous start recorded its time or left nothing to measure by."""
    started = previous.get("started_at")
    if (previous.get("status") != "incomplete" or isinstance(started, bool)
            or not isinstance(started, int | float) or not math.isfinite(started)):
        return 0.0
    newest = started
    for root, _, names in os.walk(workdir):
        for name in names:
            # trial.json holds the record; run.lock is rewritten by this very start
            if root == workdir and name in (TRIAL_FILE, LOCK_FILE):
                continue
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:  # removed meanwhile (an old checkpoint being pruned)
                continue
    return newest - started


def run_trial(config: Any, workdir: str, record: dict,
              announce: Callable[[], None] | None = None) -> dict:
    """One `train_and_evaluate` call; records its outcome and wall time in trial.json (and
    drops `started_at`, so the next start does not count this time again) and returns it.
    `announce` (a sweep's results table showing the trial started) runs first, inside the
    recording: a Ctrl-C there left trial.json "incomplete", like a killed trial's."""
    path = os.path.join(workdir, TRIAL_FILE)
    started = time.time()
    try:
        if announce is not None:
            announce()
        stop_if_pending()  # a SIGTERM since the last run: stop before this one trains
        train_and_evaluate(config, workdir)
        record["status"] = "completed"
        retire_error_log(workdir)  # an earlier failed try's traceback is not this outcome
    except TrainingDivergedError as err:
        record.update(status="diverged", reason=str(err))
    except KeyboardInterrupt as err:  # Ctrl-C, or TrainingInterrupted (SIGTERM: names it)
        record.update(status="interrupted",
                      reason=f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        raise
    except Exception as err:  # noqa: BLE001 — one failing trial must not end the sweep
        record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        with open(os.path.join(workdir, "error.log"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        record["wall_time_s"] += time.time() - started
        record.pop("started_at", None)
        atomic_write(path, json.dumps(record, indent=2))
    return record


# -------------------------------------------------------------------------------- results
def failure_message(rows: list[dict], what: str = "trial") -> str | None:
    """A one-line error naming the failed rows (up to 3), or None if none failed."""
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return None
    return (f"{len(failed)} {what}(s) failed: "
            + "; ".join(f"{r['trial_id']}: {r['reason']}" for r in failed[:3])
            + f" (tracebacks in <{what} workdir>/error.log; rerun the command to retry them)")


def no_result_message(rows: list[dict]) -> str | None:
    """A line saying no trial has completed, with the count of each status, or None if one
    has: nothing is ranked then, and `sweep.png` (it plots completed trials) is not drawn."""
    if not rows or any(r["status"] == "completed" for r in rows):
        return None
    return (f"no trial has completed ({_status_counts(rows)}): nothing is ranked and "
            f"{PLOT_FILE} is not drawn (it plots the completed trials)")


def no_result_error(rows: list[dict]) -> str | None:
    """The error of a sweep whose every trial has finished (diverged or failed) without one
    completing: a sweep with no result. None while one completed or one may still (pending,
    incomplete, interrupted)."""
    if not rows or any(r["status"] not in ("diverged", "failed") for r in rows):
        return None
    return (f"the sweep has no result: none of its {len(rows)} trials completed "
            f"({_status_counts(rows)}; each one's reason is in {RESULTS_CSV})")


def _status_counts(rows: list[dict]) -> str:
    """'2 diverged, 1 pending': how many rows have each status, in `STATUSES` order."""
    counts = {status: sum(r["status"] == status for r in rows) for status in STATUSES}
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)


def trial_result(sweep_dir: str, trial: Trial, metric: str, mode: str) -> dict:
    """One result row, read from the trial's summary.json, trial.json and metrics.jsonl (whose
    records the diagnosis's checks accept: a repeated or percent eval is refused, not ranked)."""
    workdir = trial_workdir(sweep_dir, trial)
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    summary = read_json(summary_path)
    record = read_json(os.path.join(workdir, TRIAL_FILE))
    records = read_checked_metrics(os.path.join(workdir, METRICS_FILE), _OWNER)
    evals = [r for r in records
             if r.get("split") == "eval" and isinstance(r.get(metric), int | float)]
    summary_status = (summary or {}).get("status")
    if summary_status == "completed":
        status = "completed"
    elif record is not None:
        status = record["status"]
        if (status == "incomplete" and summary_status in ("diverged", "failed", "interrupted")
                and _written_since(summary_path, record.get("started_at"))):
            status = summary_status  # the process died after the engine wrote its summary
            # (an older summary is the previous attempt's: this one is running, or was killed)
    elif summary is not None:
        status = summary_status if summary_status in STATUSES else "incomplete"
    else:
        status = "pending"
    sign = 1 if mode == "max" else -1
    # Ties go to the later eval, as in the engine's summary.json (the checkpoint kept as best).
    best = max(evals, key=lambda r: (sign * r[metric], r["step"])) if evals else None
    final = ((summary or {}).get("final_eval") or {}).get(metric) if status == "completed" else None
    if summary and "step" in summary and (
        status in ("completed", "diverged")
        or (status == "interrupted" and summary_status == "interrupted")
    ):  # the engine's step (a SIGTERM stop's checkpoint), not the last one logged
        steps = int(summary["step"])
    else:
        steps = max((int(r["step"]) for r in records), default=0)
    reason = (record or {}).get("reason") or ""
    if not reason and status != "completed" and summary:
        reason = summary.get("message", "")
    wall = (record or {}).get("wall_time_s", (summary or {}).get("wall_time_s"))
    if record is not None and record.get("status") == "incomplete":  # killed, or running now
        wall = (wall or 0.0) + killed_run_time(workdir, record)
    return {
        "rank": None,
        "index": trial.index,
        "trial_id": trial.trial_id,
        "overrides": dict(trial.overrides),
        "status": status,
        "best": best[metric] if best else None,
        "best_step": best["step"] if best else None,
        "final": final,
        "steps": steps,
        "wall_time_s": wall,
        "reason": reason,
        "workdir": workdir,
    }


def rank_results(rows: list[dict], mode: str) -> list[dict]:
    """Completed trials first, best metric first (ties: lower index); others after, by index."""
    sign = -1 if mode == "max" else 1
    done = sorted(
        (r for r in rows if r["status"] == "completed" and r["best"] is not None),
        key=lambda r: (sign * r["best"], r["index"]),
    )
    ranked = {r["trial_id"] for r in done}
    rest = sorted((r for r in rows if r["trial_id"] not in ranked), key=lambda r: r["index"])
    for rank, row in enumerate(done, start=1):
        row["rank"] = rank
    return done + rest


def write_results(sweep_dir: str, space: SearchSpace, metric: str, mode: str) -> list[dict]:
    """Rebuilds results.csv, results.json and sweep.png from the trial directories (atomic).
    Reads and writes under `<sweep_dir>/sweep.lock`: unlocked, a task that read while another's
    trial was running could write after that task's complete table, leaving it 'incomplete'."""
    with waiting_lock(os.path.join(sweep_dir, SWEEP_LOCK)):
        rows = rank_results([trial_result(sweep_dir, t, metric, mode) for t in space.trials],
                            mode)
        atomic_write(
            os.path.join(sweep_dir, RESULTS_JSON),
            json.dumps({"metric": metric, "mode": mode, "fields": space.fields, "trials": rows},
                       indent=2),
        )
        atomic_write(os.path.join(sweep_dir, RESULTS_CSV), _csv(rows, space, metric))
        if any(r["status"] == "completed" for r in rows):
            plot_results(rows, space, metric, os.path.join(sweep_dir, PLOT_FILE))
    return rows


def _csv(rows: list[dict], space: SearchSpace, metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "trial_id", "index", *space.fields, "status", f"best_{metric}",
                     "best_step", f"final_{metric}", "steps", "wall_time_s", "reason"])
    for r in rows:
        writer.writerow([
            "" if r["rank"] is None else r["rank"], r["trial_id"], r["index"],
            *(json.dumps(r["overrides"][f]) if isinstance(r["overrides"][f], list | tuple)
              else r["overrides"][f] for f in space.fields),
            r["status"], _blank(r["best"]), _blank(r["best_step"]), _blank(r["final"]),
            r["steps"], "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}",
            r["reason"],
        ])
    return buffer.getvalue()


def format_table(rows: list[dict], space: SearchSpace, metric: str) -> str:
    """The ranked results as an aligned text table (best first)."""
    header = ["rank", "trial", *space.fields, "status", f"best {metric}", "final", "steps",
              "wall s"]
    lines = [header]
    columns = [_labels([r["overrides"][f] for r in rows]) for f in space.fields]
    for i, r in enumerate(rows):
        lines.append([
            "-" if r["rank"] is None else str(r["rank"]), r["trial_id"],
            *(column[i] for column in columns), r["status"],
            "-" if r["best"] is None else f"{r['best']:.4f}",
            "-" if r["final"] is None else f"{r['final']:.4f}", str(r["steps"]),
            "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def plot_results(rows: list[dict], space: SearchSpace, metric: str, path: str) -> str:
    """Writes `results_figure` to `path` (PNG, atomically) and returns `path`."""
    return save_figure(results_figure(rows, space, metric), path)


def results_figure(rows: list[dict], space: SearchSpace, metric: str) -> Any:
    """One panel per swept field: best eval metric of completed trials against the value (log x
    for log-uniform or decade-spanning values, categories in listed order for non-numeric ones);
    values of diverged/failed trials as red dotted lines. Uses the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = space.params
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    done = [r for r in rows if r["status"] == "completed" and r["best"] is not None]
    bad = [r for r in rows if r["status"] in ("diverged", "failed")]
    for ax, param in zip(axes[0], params, strict=True):
        if param.numeric:
            position = float
            if param.log_scale:
                ax.set_xscale("log")
        else:  # categorical: the choices in their listed order
            labels = _labels(param.values)
            position = param.values.index  # the trials' values are the choice's own
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        xs = [position(r["overrides"][param.field]) for r in done]
        ax.scatter(xs, [r["best"] for r in done], color="tab:blue", zorder=3,
                   label="completed")
        for i, r in enumerate(bad):
            ax.axvline(position(r["overrides"][param.field]), color="tab:red", linestyle=":",
                       label=r["status"] if i == 0 else None)
        if param.numeric and param.log_scale:
            _without_crowded_minor_labels(ax)
        ax.set_xlabel(param.field)
        ax.set_ylabel(f"best eval {metric}")
        ax.grid(True, alpha=0.3)
        if bad:
            ax.legend(fontsize=8)
    fig.suptitle(f"{len(done)} of {len(rows)} trials completed")
    fig.tight_layout()
    return fig


def _without_crowded_minor_labels(ax: Any) -> None:
    """Drops the minor-tick labels (2x10^-2, 3x10^-2, ...) matplotlib puts on a log x axis that
    spans under about two decades, printed over each other in a 4-inch panel, when a decade's
    own label is in view (within one decade they are the only labels: kept)."""
    from matplotlib.ticker import NullFormatter

    low, high = ax.get_xlim()
    if low > 0 and math.floor(math.log10(high)) >= math.ceil(math.log10(low)):
        ax.xaxis.set_minor_formatter(NullFormatter())


def interruption_message(sweep_dir: str) -> str:
    """What a Ctrl-C'd `run_sweep` in `sweep_dir` stopped: the interrupted trial and its
    engine's message (the step, the checkpoint a rerun resumes from), and where the results so
    far are."""
    where = f"Results so far: {os.path.join(sweep_dir, RESULTS_CSV)}"
    stopped = interrupted_trial(os.path.join(sweep_dir, TRIALS_DIR))
    if stopped is None:
        return f"Ctrl-C; rerunning the same command resumes the sweep. {where}"
    record, what = stopped
    # by its id, as the progress lines ("Trial 2/4 <id>") and results.csv name it; index is
    # results.csv's 0-based column (and --trial_index's), not the progress line's count
    return (f"trial {record.get('trial_id')} (index {record.get('index')}, "
            f"{_fmt(record.get('overrides') or {})}): {what} {where}")


def interrupted_trial(trials_dir: str) -> tuple[dict, str] | None:
    """The trial.json record of the trial under `trials_dir` that a Ctrl-C stopped last (status
    interrupted, recorded by `run_trial` on the way out) and what stopped: its engine's message
    (the step, the checkpoint a rerun resumes from), or the reason; None when no trial there was
    interrupted. The interruption messages of sweeps, tunes and transfer comparisons."""
    found = []
    try:
        names = os.listdir(trials_dir)
    except OSError:
        return None
    for name in names:
        path = os.path.join(trials_dir, name, TRIAL_FILE)
        record = read_json(path)
        if isinstance(record, dict) and record.get("status") == "interrupted":
            try:
                found.append((os.stat(path).st_mtime, name, record))
            except OSError:
                continue
    if not found:
        return None
    _, name, record = max(found, key=lambda f: f[:2])  # this invocation's: recorded last
    summary = read_json(os.path.join(trials_dir, name, SUMMARY_FILE))
    what = (summary.get("message") if isinstance(summary, dict) else None) or (
        f"{record.get('reason') or 'Ctrl-C'}; rerunning the same command resumes it.")
    return record, what


# -------------------------------------------------------------------------------- helpers
def _in_use(err: DirectoryInUseError) -> str:
    """"its workdir '<path>' is in use by another run (<holder>)" from the lock's error, without
    its advice to pass a different --workdir: a sweep has no such flag (trial workdirs are
    <sweep_dir>/trials/<trial_id>)."""
    text = str(err).removeprefix("workdir: ")
    cut = text.find("; wait for it")
    return "its workdir " + (text[:cut] if cut >= 0 else text.rstrip("."))


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _short(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _labels(values: list | tuple) -> list[str]:
    """`_short` labels of `values`, with as many significant digits as it takes for different
    values to get different labels (0.99995 and 0.99999 are both "1" at 4), else their reprs."""
    distinct = len({json.dumps(v, sort_keys=True, default=repr) for v in values})
    for digits in range(4, 18):
        labels = [_short(v, digits) for v in values]
        if len(set(labels)) == distinct:
            return labels
    return [repr(v) for v in values]  # e.g. the string "1" beside the integer 1


def _fmt(overrides: dict) -> str:
    return "{" + ", ".join(f"{k}={_short(v)}" for k, v in overrides.items()) + "}"


def say(verbose: bool, message: str) -> None:
    """Prints a progress line (flushed: a cluster job's log shows it at once) when `verbose`."""
    if verbose:
        print(message, flush=True)
