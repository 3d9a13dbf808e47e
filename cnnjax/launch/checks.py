"""Checks that load the job's config files the way its entry point will, before it is queued.

`count_trials` reads only the sweep file (cheap, no JAX) with its `--sweep.*` overrides and counts
the trials with `cnnjax.tune.space`, so a sweep's array covers it exactly. `check_configs` loads
every config file with all overrides through `ml_collections.config_flags` (as the entry point
does at start-up), runs the entry point's own pre-training checks that need no dataset and no
devices (`entry_checks`: a sweep's metric and mode, a tune's recipe, a transfer's arms, seeds and
budgets) and the engine's value checks (`validate_config`) on every config the job will train,
each trial of a sweep included: a misspelt field, a wrong type or a bad value fails here rather
than after hours in the queue; it also checks that the batch splits evenly over the job's GPUs.
It imports JAX and the engine's config checks (~5 s), not TensorFlow: the shipped configs load
without it (`tests/experiments/test_configs.py`). A `<file>.py:<argument>` is loaded with its
argument, as config_flags passes it to `get_config`.
`check_array_size` compares a sweep's array with the cluster's `MaxArraySize`
(`cluster_max_array_size` asks `scontrol`), which SLURM would otherwise enforce only at `sbatch`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from cnnjax.launch.spec import JobSpec, array_indices, split_file_argument, validate_spec
from cnnjax.platform import parse_xla_flags
from cnnjax.utils.cli import (
    NoneOverrideError,
    config_file_error,
    explain_flag_error,
    find_culprit,
    override_path,
    parse_with_none,
    repeated_tuple_field,
)
from cnnjax.utils.files import check_directory_kind
from cnnjax.utils.validation import invalid

_OWNER = "launch"
_FLAG_DEFINERS = {float: flags.DEFINE_float, int: flags.DEFINE_integer,
                  bool: flags.DEFINE_bool, str: flags.DEFINE_string}
_MAX_ARRAY_SIZE = re.compile(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", re.MULTILINE)


def load_files(paths: dict[str, str], overrides: Sequence[str],
               extra_flags: Mapping[str, type] | None = None) -> dict[str, Any]:
    """`{flag: ConfigDict}` of each config file with `overrides` applied (locked, as the entry
    points load them). Raises ValueError naming the override that does not apply."""
    values = flags.FlagValues()
    argv = ["launch", *(f"--{flag}={path}" for flag, path in paths.items()), *overrides]
    for flag in paths:
        config_flags.DEFINE_config_file(flag, None, f"{flag} file", flag_values=values,
                                        lock_config=True, sys_argv=argv)
        if flag == "sweep":  # as experiments.sweep loads it: --sweep.metric=... always applies
            from cnnjax.tune.space import sweep_file_parser

            values[flag].parser = sweep_file_parser(flag)
    for flag, kind in (extra_flags or {}).items():  # plain flags the entry point also accepts
        _FLAG_DEFINERS[kind](flag, None, flag, flag_values=values)
    try:
        parse_with_none(values, argv)
    except NoneOverrideError as err:
        raise invalid(_OWNER, "overrides", err.override.replace("'None'", "None"),
                      err.reason) from None
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as err:
        own = config_file_error(err) if isinstance(err, flags.Error) else None
        if own is not None:  # the file's get_config(<argument>) raised: its own message
            raise ValueError(f"{_OWNER}: {own}") from None
        culprit, reason = explain_flag_error(argv, err)  # names config-field overrides only
        culprit = culprit or find_culprit(overrides, err) or list(overrides)
        raise invalid(_OWNER, "overrides", culprit,
                      f"loading {', '.join(paths.values())} with it failed: {reason}") from None
    repeated = repeated_tuple_field(values, overrides)  # the entry point refuses it at start
    if repeated:
        raise ValueError(f"{_OWNER}: the job would fail at start: {repeated}")
    return {flag: values[flag].value for flag in paths}


def cluster_max_array_size() -> int | None:
    """This cluster's `MaxArraySize` (array indices must be below it) from `scontrol show
    config`; None where it cannot be read (no `scontrol` on PATH: not a SLURM host)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _MAX_ARRAY_SIZE.search(result.stdout) if result.returncode == 0 else None
    return int(match.group(1)) if match else None


def check_array_size(spec: JobSpec, num_trials: int | None, max_array_size: int | None) -> None:
    """Raises unless every array index of a (validated) sweep spec is below the cluster's
    `max_array_size` (None: unknown, not checked), naming the `trials_per_task` that fits."""
    if spec.entry != "sweep" or max_array_size is None or num_trials is None:
        return
    if spec.array is not None:
        largest = max(array_indices(spec.array, num_trials, spec.trials_per_task))
    else:
        largest = spec.num_array_tasks(num_trials) - 1
    if max_array_size < 1:
        raise invalid(_OWNER, "entry", spec.entry,
                      f"this cluster's MaxArraySize is {max_array_size} (scontrol show config): "
                      "job arrays are disabled, so a sweep cannot run as one; run its trials "
                      "in one process instead (`python -m experiments.sweep` without "
                      "--trial_index runs them in turn), e.g. from your own sbatch script")
    if largest < max_array_size:
        return
    fits = math.ceil(num_trials / max_array_size)
    field, value = ("array", spec.array) if spec.array is not None else (
        "trials_per_task", spec.trials_per_task)
    raise invalid(_OWNER, field, value,
                  f"its largest array index is {largest}, but this cluster's MaxArraySize is "
                  f"{max_array_size} (scontrol show config), so SLURM accepts indices up to "
                  f"{max_array_size - 1}; pass --trials_per_task={fits} to run the "
                  f"{num_trials} trials in {math.ceil(num_trials / fits)} array tasks of up to "
                  f"{fits} trials each (give --time for all {fits})")


def count_trials(spec: JobSpec) -> int:
    """The number of trials of a sweep spec's sweep file (with its `--sweep.*` overrides)."""
    from cnnjax.tune import space as space_lib

    if spec.sweep is None:
        raise invalid(_OWNER, "sweep", None, "a sweep job needs --sweep=<file>")
    path = os.path.join(spec.submit_dir, spec.sweep)
    if not os.path.isfile(split_file_argument(path)[0]):
        raise invalid(_OWNER, "sweep", spec.sweep,
                      f"no such file ({os.path.normpath(split_file_argument(path)[0])})")
    sweep = load_files({"sweep": path}, spec.overrides_for("sweep"))["sweep"]
    return len(space_lib.from_config(sweep).trials)


def _batch_fields(config: Any) -> dict[str, int]:
    return {name: config[name] for name in ("global_batch_size", "eval_batch_size")
            if name in config and isinstance(config[name], int)}


def check_configs(spec: JobSpec) -> None:
    """Loads the (validated) spec's config files with its overrides; raises ValueError for an
    override the file refuses, a sweep field the base config lacks, a value the engine's
    `validate_config` refuses, a data field its input module refuses (`check_data_fields`),
    an unknown model or a `model_kwargs` field it does not take (`check_model_fields`),
    or a batch size that does not split evenly over the devices the engine will use
    (`job_devices`) or into `grad_accum_steps` micro-batches. A sweep's checks run on every
    trial's config, since a trial may set the batch size or any other field."""
    from cnnjax.train.config import (
        check_batch_divisible,
        check_data_fields,
        check_model_fields,
        validate_config,
    )

    spec = validate_spec(spec, count_trials(spec) if spec.entry == "sweep" else None)
    entry = spec.entry_point
    loaded = load_files(spec.files, spec.overrides, entry.extra_flags)
    try:
        experiments = entry_checks(spec, loaded)
    except ValueError as err:
        raise ValueError(f"launch: the job would fail at start: {err}") from None
    for which, config in experiments.items():
        where = f" (in {which})" if which else ""
        try:
            validate_config(config)
            check_data_fields(config)  # as `check_config` checks it at start
            check_model_fields(config)  # the model's name and model_kwargs, without tracing
        except ValueError as err:
            raise ValueError(f"launch: the job would fail at start{where}: {err}") from None
        devices, layout = job_devices(spec, config, where)
        for name, size in _batch_fields(config).items():
            if size % devices:
                raise invalid(_OWNER, f"config.{name}", size,
                              f"expected a multiple of the job's {devices} devices ({layout})"
                              f"{where}: the batch is split evenly over every device")
        try:  # also each device's batch into `grad_accum_steps` micro-batches
            check_batch_divisible(config, devices)
        except ValueError as err:
            raise ValueError(f"launch: the job would fail at start{where}: {err}") from None


def job_devices(spec: JobSpec, config: Any, where: str = "") -> tuple[int, str]:
    """The number of devices the engine will train `config` on in this (validated) job, counted
    as `train.config.check_config` will at start, and how they are laid out (for messages).
    Each task is one JAX process; a task of a job of several owns one GPU (numbered by
    `SLURM_LOCALID`), the one task of a single-process job all `gpus_per_node`; a CPU task is
    one device, or as many as XLA_FLAGS forces (`forced_host_devices`). `config.num_devices`
    (> 0) picks that many local devices of a single-process job."""
    processes = spec.num_tasks
    gpus = spec.gpus_per_node
    local = gpus if gpus and processes == 1 else 1
    host_devices = forced_host_devices(spec)
    requested = config.get("num_devices") or 0
    if not requested:
        if gpus:
            return processes * local, f"{spec.nodes} node(s) x {gpus} GPU(s)"
        per_task = f" x {host_devices} host device(s)" if host_devices > 1 else ""
        return processes * host_devices, (f"{spec.nodes} node(s) x {spec.tasks_per_node} CPU "
                                          f"task(s){per_task}")
    if processes > 1:
        raise invalid(_OWNER, "config.num_devices", requested,
                      f"this job runs {processes} processes ({spec.nodes} node(s) x "
                      f"{spec.tasks_per_node} task(s)){where}, and a multi-process job trains "
                      "on every device of every process: leave num_devices=0")
    if gpus and requested > local:
        raise invalid(_OWNER, "config.num_devices", requested,
                      f"expected at most the job's {local} GPU(s) (gpus_per_node){where}, or 0 "
                      "for all of them")
    if not gpus and requested > host_devices:
        raise invalid(_OWNER, "config.num_devices", requested,
                      f"a CPU task has {host_devices} device(s){where}: expected 0 or at most "
                      f"{host_devices}, or more host devices through XLA_FLAGS="
                      f"--xla_force_host_platform_device_count={requested} (in --env, or "
                      "exported where you submit: sbatch passes your environment on)")
    return requested, f"config.num_devices={requested}"


def forced_host_devices(spec: JobSpec) -> int:
    """The CPU devices each task of `spec`'s job will have: the
    `--xla_force_host_platform_device_count` XLA reads from the XLA_FLAGS it runs with (its
    `--env`, else the submitting environment, which sbatch exports to the job), else 1."""
    given = dict(spec.env).get("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    count = parse_xla_flags(given).get("xla_force_host_platform_device_count") or ""
    return max(int(count), 1) if count.isdigit() else 1


def entry_checks(spec: JobSpec, loaded: dict[str, Any]) -> dict[str, Any]:
    """Runs the entry point's own pre-training checks that need neither the dataset nor the
    job's devices (sweep: space, fields, metric and mode; tune: `recipe.check_tune`; transfer:
    `compare.check_transfer`), and its checks of the job's directory (another command's outputs;
    a sweep's or tune's record of another space, base config or recipe; a train run's
    checkpoints of an incompatible config without `restart`), which would otherwise
    end every task at start; returns `{where: config}` of every config the job will train."""
    check_directory_kind(spec.workdir, spec.entry_point.directory_kind, "workdir")
    if spec.entry == "sweep":
        from cnnjax.tune import space as space_lib
        from cnnjax.tune.sweep import (
            check_overrides_not_swept,
            check_ranking,
            check_sweep_dir,
            check_swept_fields_are_read,
        )

        base, sweep = loaded["config"], loaded["sweep"]
        space = space_lib.from_config(sweep)
        overridden = [override_path(o).removeprefix("config.")
                      for o in spec.overrides_for("config")]
        check_overrides_not_swept(overridden, space, f"--sweep={spec.files['sweep']}")
        trials = space_lib.trial_configs(base, space)
        metric, mode = check_ranking(base, trials, sweep.get("metric"), sweep.get("mode"))
        check_sweep_dir(spec.workdir, space, base, metric, mode)  # a rerun of another sweep
        check_swept_fields_are_read(space, {t.trial_id: config for t, config in trials})
        return {f"trial {t.index} {dict(t.overrides)}": config for t, config in trials}
    if spec.entry == "tune":
        from cnnjax.tune import space as space_lib
        from cnnjax.tune.recipe import check_tune, check_tune_dir

        base = loaded["config"]
        recipe, plan = check_tune(base, loaded["recipe"])
        check_tune_dir(spec.workdir, base, recipe)
        return {"": base} | {
            f"round 1 trial {t.index} {dict(t.overrides)}": config
            for t, config in space_lib.trial_configs(plan.base_config(base), plan.space())}
    if spec.entry == "transfer":
        from cnnjax.transfer import compare

        source, target, kwargs = compare.transfer_parts(loaded["transfer"])
        configs = compare.check_transfer(source, target, spec.workdir, **kwargs)
        return {"the transfer's " + ("source config" if run_id == compare.SOURCE_ID
                                     else f"run {run_id}"): config
                for run_id, config in configs.items()}
    from cnnjax.train.loop import check_workdir_resumes

    check_workdir_resumes(spec.workdir, loaded["config"])  # a rerun of another config
    return {"": loaded["config"]}
