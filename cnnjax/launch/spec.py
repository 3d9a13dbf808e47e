"""What a cluster job runs and on what: `JobSpec`, and its checks before anything is written.

A spec names one entry point (`ENTRY_POINTS`: train, sweep, tune, transfer), its config files, the
directory it works in and `--<file>.<field>=<value>` overrides passed through verbatim (but a
relative path in one of `PATH_FIELDS`, made absolute), plus the SLURM resources and the
preemption settings. `validate_spec` checks every field without touching the cluster (a
`ValueError` naming the field, the value and what is valid) and returns the spec with absolute
paths, so the same job described from another directory compares equal. Nothing here
imports JAX or loads an experiment config; `cnnjax.launch.checks` does that.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from cnnjax.utils.validation import (
    check_choice,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
    invalid,
)

_OWNER = "launch"


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """How to run one `experiments.<name>` script: its module, the flags that take a config file
    (in command-line order), the flag that takes the work directory, what that directory holds
    (its kind in `cnnjax.utils.files.DIRECTORY_MARKERS`), and the plain flags a user may pass
    through, with their types. `multi_process`: the script joins several processes into one JAX
    job."""

    module: str
    file_flags: tuple[str, ...]
    dir_flag: str
    directory_kind: str
    extra_flags: Mapping[str, type] = dataclasses.field(default_factory=dict)
    multi_process: bool = False


ENTRY_POINTS: dict[str, EntryPoint] = {
    "train": EntryPoint("experiments.train", ("config",), "workdir", "training run",
                        extra_flags={"distributed_timeout": float}, multi_process=True),
    "sweep": EntryPoint("experiments.sweep", ("config", "sweep"), "sweep_dir", "sweep"),
    "tune": EntryPoint("experiments.tune", ("config", "recipe"), "tune_dir", "tune"),
    "transfer": EntryPoint("experiments.transfer", ("transfer",), "transfer_dir",
                           "transfer comparison"),
}
FILE_FLAGS = ("config", "sweep", "recipe", "transfer")

# Every pattern below is matched whole (`fullmatch`): `re.match` with a trailing `$` also takes
# a value ending in a newline, which split the `#SBATCH` block where the value was written.
# SLURM time limits: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Numbers are ASCII digits (re.ASCII):
# `\d` and `int` also take e.g. Arabic-Indic ones, which sbatch refuses.
_TIME = re.compile(r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)", re.ASCII)
# sbatch's --mem; 0: all of the node's memory
_MEM = re.compile(r"(0|[1-9]\d*)[KMGTkmgt]?", re.ASCII)
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Partition, account and QOS names: sbatch takes them verbatim ('%' is a file-name pattern only
# in --output/--error), a list of partitions (or QOS) comma-separated. A constraint is node
# features joined by its operators: & (and), | (or), , (and), * (count), ! (not), [] and ().
_SLURM_NAME = r"[A-Za-z0-9_.-]+"
_NAME_CHARS = "letters, digits, '_', '.' and '-'"
_SCHEDULER_NAMES = {
    "partition": (re.compile(rf"{_SLURM_NAME}(,{_SLURM_NAME})*", re.ASCII),
                  f"SLURM partition names of {_NAME_CHARS}, comma-separated (e.g. gpu,gpu-long),"),
    "account": (re.compile(_SLURM_NAME, re.ASCII),
                f"a SLURM account name of {_NAME_CHARS} (one account),"),
    "qos": (re.compile(rf"{_SLURM_NAME}(,{_SLURM_NAME})*", re.ASCII),
            f"SLURM QOS names of {_NAME_CHARS}, comma-separated,"),
    "constraint": (re.compile(r"[A-Za-z0-9_.:&|,*!\[\]()-]+", re.ASCII),
                   "SLURM node features (letters, digits, '_', '.', '-', ':') joined by its "
                   "operators & | , * ! [ ] ( ) (e.g. a100&ib),"),
}
_OVERRIDE = re.compile(r"--(?P<flag>[A-Za-z_]\w*)(?P<field>(?:\.[A-Za-z_]\w*)*)=(?P<value>.*)",
                       re.DOTALL)
_ARRAY_ITEM = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
#: Config fields whose value is a path: another run's directory (`train.config.DIRECTORY_FIELDS`)
#: and the tfds data directory (`data.spec.default_data_config`). Spelled out here, since this
#: module imports no engine code; tests/launch/test_spec.py fails if the configs gain another.
PATH_FIELDS = ("init_from.workdir", "distill.teacher_workdir", "data.data_dir")
#: The path fields written into `#SBATCH` lines (`--chdir`, `--output`), so spelt as sbatch reads
#: them; the config files, venv and python are written only shell-quoted into the script's body.
DIRECTIVE_PATHS = ("workdir", "submit_dir")
#: `--signal`'s largest lead time (SLURM stores it in 16 bits).
MAX_SIGNAL_SECONDS = 65535


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One SLURM job of a cnnjax entry point (defaults: one node, one GPU, 4 hours)."""

    entry: str
    workdir: str
    config: str | None = None
    sweep: str | None = None
    recipe: str | None = None
    transfer: str | None = None
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # None: one per GPU (train), else 1
    cpus_per_task: int = 8
    mem: str | None = None  # per node, SLURM units (e.g. 64G); None: the partition's default
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # None: cnnjax-<entry>-<workdir name>
    array: str | None = None  # sweep: array task indices to run ("0-7", "3,5"); None: all
    max_parallel: int | None = None  # sweep: at most this many array tasks at once
    trials_per_task: int = 1  # sweep: array task i runs trials i*k ... i*k+k-1
    signal_seconds: int = 300  # USR1 this long before the time limit: stop, requeue
    max_requeues: int = 3
    venv: str | None = ".venv"  # activated before running; None: `python` from PATH
    python: str = "python"  # a command (PATH lookup) or, with a '/', a path (made absolute)
    env: tuple[tuple[str, str], ...] = ()  # exported after the defaults (yours win)
    setup: tuple[str, ...] = ()  # shell lines run first, e.g. "module load cuda/12.4"
    submit_dir: str = "."  # the repository root the job runs in (relative paths start here)

    @property
    def entry_point(self) -> EntryPoint:
        """How to run the spec's `entry` script (its `ENTRY_POINTS` record)."""
        return ENTRY_POINTS[self.entry]

    @property
    def files(self) -> dict[str, str]:
        """`{flag: path}` of the entry point's config files, in command-line order."""
        return {flag: getattr(self, flag) for flag in self.entry_point.file_flags}

    @property
    def num_tasks(self) -> int:
        """Processes in the job, `nodes * tasks_per_node` (needs a spec from `validate_spec`,
        which sets `tasks_per_node`)."""
        return self.nodes * self.tasks_per_node  # type: ignore[operator]

    def num_array_tasks(self, num_trials: int) -> int:
        """Array tasks a sweep of `num_trials` needs, `trials_per_task` trials each."""
        return math.ceil(num_trials / self.trials_per_task)

    def overrides_for(self, flag: str) -> tuple[str, ...]:
        """The overrides of one config-file flag (`--sweep.num_trials=8` for "sweep")."""
        return tuple(o for o in self.overrides if o.startswith(f"--{flag}."))

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-able data (tuples become lists); `from_json` reads it back."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        """The spec `to_json` wrote (lists back to tuples); a ValueError for unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise invalid(_OWNER, "spec", unknown, f"unknown fields; known: {sorted(known)}")
        values = dict(data)
        for name in ("overrides", "setup"):
            values[name] = tuple(values.get(name, ()))
        values["env"] = tuple(tuple(pair) for pair in values.get("env", ()))
        return cls(**values)


#: JobSpec fields that decide only how the job is queued and kept alive, not what it computes
#: (nor which trials a sweep has), so a job resubmitted into its work directory may change them
#: and still resume it: which array tasks run and how many at once (`array`, `max_parallel`,
#: `trials_per_task`: every trial keeps its own folder), the time limit and requeue settings (a
#: stopped job resumes from its checkpoints), memory, the account and priority, and the job's
#: name. Not here, because they can change results: the process layout (`nodes`,
#: `gpus_per_node`, `tasks_per_node`), `cpus_per_task` (XLA:CPU's thread pool, whose work split
#: can change summation order), the hardware (`partition`, `constraint`: e.g. TF32 matmuls on
#: one GPU model, not on another) and the software (`venv`, `python`, `env`, `setup`,
#: `submit_dir`).
SCHEDULING_FIELDS = frozenset({
    "array", "max_parallel", "trials_per_task", "time", "signal_seconds", "max_requeues", "mem",
    "account", "qos", "job_name",
})


def without_scheduling(spec_json: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's JSON (`JobSpec.to_json`, or a launch record's, which may hold fields of another
    cnnjax version) without `SCHEDULING_FIELDS` and without the overrides a resumed run accepts
    (`runtime_override`): what a resubmission into the same work directory must keep to resume
    the job there."""
    kept = {k: v for k, v in spec_json.items() if k not in SCHEDULING_FIELDS}
    if isinstance(kept.get("overrides"), list | tuple):
        kept["overrides"] = [o for o in kept["overrides"] if not runtime_override(o)]
    return kept


def runtime_override(override: Any) -> bool:
    """Whether `override` sets how a run runs rather than what it trains: the entry points'
    `--distributed_timeout`, or a `--config.<field>` the engine lets change on resume
    (`train.config.RUNTIME_FIELDS`: progress bar, log and checkpoint cadence, data_dir, ...;
    some, such as num_devices, parallel or batch_norm_impl, can change the numbers through the
    device layout or float summation order)."""
    from cnnjax.train.config import RUNTIME_FIELDS  # deferred: imports the model registry
    from cnnjax.utils.cli import override_path

    name = override_path(str(override))
    return name == "distributed_timeout" or name.removeprefix("config.") in RUNTIME_FIELDS


def json_ready(value: Any) -> Any:
    """`value` with tuples turned into lists, recursively (what a JSON round trip gives)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def time_limit_seconds(value: Any) -> int:
    """Seconds in a SLURM time limit (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`)."""
    valid = ("expected a SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
             "D-HH:MM:SS (minutes and seconds < 60 after the first field), more than 0")
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise invalid(_OWNER, "time", value, valid)
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        d, h, m, s = g["days"], g["dh"], g.get("dm", 0), g.get("ds", 0)
        if h >= 24 or m >= 60 or s >= 60:
            raise invalid(_OWNER, "time", value, valid)
    elif "c" in g:
        d, h, m, s = 0, g["a"], g["b"], g["c"]
        if m >= 60 or s >= 60:
            raise invalid(_OWNER, "time", value, valid)
    else:
        d, h, m, s = 0, 0, g["a"], g.get("b", 0)
        if "b" in g and s >= 60:
            raise invalid(_OWNER, "time", value, valid)
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    if seconds <= 0:
        raise invalid(_OWNER, "time", value, valid)
    return seconds


def array_indices(value: str, num_trials: int, trials_per_task: int = 1) -> list[int]:
    """The array task indices an array spec (`0-7`, `0,3,5-6`) selects; each must name a task
    of the sweep's `num_trials` trials run `trials_per_task` to a task (task = trial when 1)."""
    count = math.ceil(num_trials / trials_per_task)
    tasks = (f"the sweep's {num_trials} trials" if trials_per_task == 1 else
             f"the {count} array tasks running the sweep's {num_trials} trials "
             f"{trials_per_task} to a task")
    example = f"'0-{count - 1}'" + (f" or '0,{count - 1}'" if count > 1 else "")
    valid = (f"expected comma-separated indices or ranges a-b (a <= b) of {tasks}, "
             f"0-{count - 1}, e.g. {example}")
    if isinstance(value, str) and "%" in value:
        raise invalid(_OWNER, "array", value, f"{valid}; for sbatch's '%N' throttle (at most N "
                      "tasks at once) pass --max_parallel=N")
    indices: list[int] = []
    for item in value.split(",") if isinstance(value, str) else [None]:
        match = _ARRAY_ITEM.fullmatch(item) if item is not None else None
        if match is None:
            raise invalid(_OWNER, "array", value, valid)
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if low > high or high >= count:
            raise invalid(_OWNER, "array", value, valid)
        indices.extend(range(low, high + 1))
    if len(set(indices)) != len(indices):
        raise invalid(_OWNER, "array", value, f"{valid}; an index is listed twice")
    return indices


def _check_word(field: str, value: Any, pattern: re.Pattern | None = None,
                what: str = "a SLURM name") -> None:
    """Raises unless `value` is None or a non-empty string a `#SBATCH` line can carry."""
    if value is None:
        return
    ok = isinstance(value, str) and value != "" and not re.search(r"[\s'\"#\\]", value)
    if ok and pattern is not None:
        ok = pattern.fullmatch(value) is not None
    if not ok:
        raise invalid(_OWNER, field, value,
                      f"expected {what} without spaces, quotes, '#' or backslashes")


def _absolute(path: str, base: str) -> str:
    """`path` (`~` expanded) made absolute against `base`, normalized."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _check_path(field: str, value: Any, base: str, *, must_exist: str | None) -> str:
    """`value` made absolute against `base`, which must exist as `must_exist` ("file"/"dir") if
    given. One of `DIRECTIVE_PATHS` may not hold whitespace, quotes, backslashes, '%' (SLURM reads
    `%` in log paths as a pattern) or '#' (a `#SBATCH` line ends at it); the others are only
    written shell-quoted into the script body, which carries any character."""
    if not isinstance(value, str) or not value:
        raise invalid(_OWNER, field, value, "expected a path")
    path = _absolute(value, base)
    # the absolute path is what the directive holds: `~`, or a cwd behind "." (submit_dir's
    # default), may bring in what the value as typed does not
    if field in DIRECTIVE_PATHS and re.search(r"[\s%#'\"\\]", path):
        where = ("; submit_dir is the repository the job runs in (launch.submit's own "
                 "checkout): clone or move it to such a path" if field == "submit_dir" else "")
        resolved = f"; {value!r} is {path!r}" if path != value else ""
        raise invalid(_OWNER, field, value,
                      "expected a path without whitespace, quotes, backslashes, '%' or '#' "
                      f"(SLURM directives cannot carry them){where}{resolved}")
    if must_exist == "file" and not os.path.isfile(path):
        raise invalid(_OWNER, field, value, f"no such file ({path})")
    if must_exist == "dir" and not os.path.isdir(path):
        raise invalid(_OWNER, field, value, f"no such directory ({path})")
    return path


def absolute_path_overrides(overrides: Any, base: str) -> Any:
    """`overrides` with the relative value of each `PATH_FIELDS` override (of any config file,
    e.g. `--transfer.source.data.data_dir=tfds`) made absolute against `base`, `~` expanded: the
    job runs in the repository, not where the path was typed. Absolute paths, URLs
    (`gs://...`), None (unset) and '' stay as given, as does anything that is not a tuple of
    overrides (`check_override` says why)."""
    if not isinstance(overrides, tuple):
        return overrides
    out = []
    for override in overrides:
        match = _OVERRIDE.fullmatch(override) if isinstance(override, str) else None
        value = match.group("value") if match else ""
        if (match and value not in ("", "None") and not os.path.isabs(value)
                and "://" not in value  # a URL (tfds reads gs://...) is no local path
                and any(match.group("field").endswith(f".{name}") for name in PATH_FIELDS)):
            override = override[:match.start("value")] + _absolute(value, base)
        out.append(override)
    return tuple(out)


def check_override(spec_entry: str, override: Any) -> str:
    """Raises unless `override` is `--<file flag>.<field>=<value>` for one of the entry point's
    config files, or `--<extra flag>=<value>` for one it accepts (e.g. train's
    `--distributed_timeout`). Values are kept verbatim (quoted when the script is written)."""
    entry = ENTRY_POINTS[spec_entry]
    forms = [f"--{f}.<field>=<value>" for f in entry.file_flags]
    forms += [f"--{f}=<value>" for f in entry.extra_flags]
    valid = f"{spec_entry} accepts {', '.join(forms)} (note the '=')"
    match = _OVERRIDE.fullmatch(override) if isinstance(override, str) else None
    if match is None or "\0" in override:
        raise invalid(_OWNER, "overrides", override, valid)
    flag, field = match.group("flag"), match.group("field")
    if flag in entry.file_flags and field:
        return override
    if flag in entry.extra_flags and not field:
        _check_extra_value(flag, entry.extra_flags[flag], match.group("value"), override)
        return override
    set_by_launcher = {entry.dir_flag: "--workdir",
                       **{f: f"its own --{f}" for f in entry.file_flags}}
    if spec_entry == "sweep":  # only the sweep script has (and gets) these two flags
        set_by_launcher |= {"trial_index": "the array task", "trial_count": "--trials_per_task"}
    source = set_by_launcher.get(flag)
    if source is not None and not field:
        valid = f"--{flag} is set by the launcher (from {source}); {valid}"
    raise invalid(_OWNER, "overrides", override, valid)


def _check_extra_value(flag: str, kind: type, value: str, override: str) -> None:
    """Raises unless `value` suits the entry point's plain flag `flag`. Its float flags
    (train's `--distributed_timeout`) are seconds, which the entry point checks only once the
    job runs (and only with several processes): a positive, finite number."""
    if kind is not float:
        return
    try:
        check_positive_float(_OWNER, flag, value)
    except ValueError:
        raise invalid(_OWNER, "overrides", override,
                      f"--{flag} takes a positive, finite number of seconds") from None


def validate_spec(spec: JobSpec, num_trials: int | None = None) -> JobSpec:
    """Checks every field of `spec`; returns it with absolute paths (those of the path-valued
    overrides too, `absolute_path_overrides`) and defaults filled in.

    `num_trials` (the sweep's size, `cnnjax.launch.checks.count_trials`) is required for a sweep:
    the array may not name a trial past the last one. Config files must exist; whether the work
    directory is on a filesystem every node shares cannot be checked from here.
    """
    entry_name = check_choice(_OWNER, "entry", spec.entry, ENTRY_POINTS)
    submit_dir = _check_path("submit_dir", spec.submit_dir, os.getcwd(), must_exist="dir")
    files = _check_files(spec, submit_dir)
    workdir = _check_path("workdir", spec.workdir, submit_dir, must_exist=None)
    if os.path.isfile(workdir):
        raise invalid(_OWNER, "workdir", spec.workdir, "expected a directory, found a file")
    if not isinstance(spec.overrides, tuple):
        raise invalid(_OWNER, "overrides", spec.overrides, "expected a tuple of strings")
    for override in spec.overrides:
        check_override(entry_name, override)
    overrides = absolute_path_overrides(spec.overrides, submit_dir)
    tasks = _tasks_per_node(spec)
    _check_schedule(spec)
    _check_array(spec, num_trials)
    job_name = spec.job_name
    if job_name is None:
        job_name = re.sub(r"[^A-Za-z0-9._-]", "_", f"cnnjax-{entry_name}-"
                          f"{os.path.basename(workdir)}")
    _check_word("job_name", job_name, _JOB_NAME, "letters, digits, '.', '_', '-'")
    venv, python = _check_environment(spec, submit_dir)
    return dataclasses.replace(spec, submit_dir=submit_dir, workdir=workdir, venv=venv,
                               python=python, overrides=overrides,
                               tasks_per_node=tasks, job_name=job_name, **files)


def _check_files(spec: JobSpec, submit_dir: str) -> dict[str, str]:
    """`{flag: absolute path}` of the entry point's config files; others must be unset."""
    entry = ENTRY_POINTS[spec.entry]
    files = {}
    for flag in FILE_FLAGS:
        value = getattr(spec, flag)
        if flag not in entry.file_flags:
            if value is not None:
                raise invalid(_OWNER, flag, value,
                              f"{spec.entry} takes no --{flag}; it takes "
                              + ", ".join(f"--{f}" for f in entry.file_flags))
            continue
        if value is None:
            raise invalid(_OWNER, flag, value, f"{spec.entry} needs --{flag}=<file>")
        path, argument = split_file_argument(value)
        checked = _check_path(flag, path, submit_dir, must_exist=None)
        if not os.path.isfile(checked):
            raise invalid(_OWNER, flag, value, f"no such file ({checked})")
        if argument is not None and re.search(r"[\s%#'\"\\]", argument):
            raise invalid(_OWNER, flag, value, "expected an argument after ':' without "
                          "whitespace, quotes, backslashes, '%' or '#'")
        files[flag] = checked if argument is None else f"{checked}:{argument}"
    return files


def split_file_argument(value: str) -> tuple[str, str | None]:
    """`<file>.py:<argument>` -> (file, argument), as ml_collections' config_flags splits it
    (at the first colon: the text after it goes to the file's `get_config`); no colon: None."""
    path, colon, argument = value.partition(":")
    return path, (argument if colon else None)


def _tasks_per_node(spec: JobSpec) -> int:
    """Checks nodes, GPUs and tasks; returns tasks per node (default: one per GPU for a
    multi-process entry point, else 1). A multi-process entry point's job of one task in all is
    one process using every GPU of its node, as on one machine."""
    entry = ENTRY_POINTS[spec.entry]
    for name in ("nodes", "cpus_per_task"):
        check_positive_int(_OWNER, name, getattr(spec, name))
    gpus = spec.gpus_per_node
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise invalid(_OWNER, "gpus_per_node", gpus, "expected an integer >= 0 (0: CPU only)")
    tasks = spec.tasks_per_node
    if tasks is None:
        tasks = gpus if entry.multi_process and gpus > 0 else 1
    check_positive_int(_OWNER, "tasks_per_node", tasks)
    if entry.multi_process:
        if gpus > 0 and tasks != gpus and spec.nodes * tasks > 1:
            raise invalid(_OWNER, "tasks_per_node", tasks,
                          f"expected one task per GPU, {gpus} (gpus_per_node), or 1 on one node "
                          f"(one process using all its GPUs): this job's {spec.nodes} node(s) x "
                          f"{tasks} task(s) would join {spec.nodes * tasks} JAX processes, each "
                          "of which uses only the GPU numbered by its SLURM_LOCALID")
        return tasks
    if spec.nodes != 1:
        raise invalid(_OWNER, "nodes", spec.nodes,
                      f"expected 1: {spec.entry} runs one process (it uses every GPU of its "
                      "node); spread a sweep's trials over an array job instead")
    if tasks != 1:
        raise invalid(_OWNER, "tasks_per_node", tasks,
                      f"expected 1: {spec.entry} runs one process using all gpus_per_node")
    return tasks


def _check_schedule(spec: JobSpec) -> None:
    """Time limit, requeue signal and count, memory, and the scheduler's names."""
    limit = time_limit_seconds(spec.time)
    signal_s = check_positive_int(_OWNER, "signal_seconds", spec.signal_seconds)
    if signal_s > MAX_SIGNAL_SECONDS or signal_s >= limit:
        raise invalid(_OWNER, "signal_seconds", signal_s,
                      f"expected 1..{min(MAX_SIGNAL_SECONDS, limit - 1)}: seconds before the time "
                      f"limit ({spec.time} = {limit} s) at which the job stops and requeues")
    check_non_negative_int(_OWNER, "max_requeues", spec.max_requeues)
    _check_word("mem", spec.mem, _MEM,
                "a size in MB or with a K/M/G/T suffix (e.g. 64G; 0: all of the node's memory),")
    for name, (pattern, what) in _SCHEDULER_NAMES.items():
        _check_word(name, getattr(spec, name), pattern, what)


def _check_array(spec: JobSpec, num_trials: int | None) -> None:
    """A sweep's array must lie within its `num_trials`; other entry points take none."""
    if spec.entry != "sweep":
        for name, unset in (("array", None), ("max_parallel", None), ("trials_per_task", 1)):
            if getattr(spec, name) != unset:
                raise invalid(_OWNER, name, getattr(spec, name),
                              f"only a sweep is an array job; {spec.entry} takes no {name}")
        return
    num_trials = check_positive_int(_OWNER, "num_trials (of the sweep)", num_trials)
    check_positive_int(_OWNER, "trials_per_task", spec.trials_per_task)
    if spec.array is not None:
        array_indices(spec.array, num_trials, spec.trials_per_task)
    if spec.max_parallel is not None:
        check_positive_int(_OWNER, "max_parallel", spec.max_parallel)


def _check_environment(spec: JobSpec, submit_dir: str) -> tuple[str | None, str]:
    """Checks venv, python, env and setup; returns the venv's absolute path (or None) and the
    python command, made absolute against `submit_dir` if it is a path (holds a '/')."""
    venv = spec.venv
    if venv is not None:
        venv = _check_path("venv", venv, submit_dir, must_exist="dir")
        if not os.path.isfile(os.path.join(venv, "bin", "activate")):
            raise invalid(_OWNER, "venv", spec.venv,
                          f"expected a virtual environment ({venv}/bin/activate is missing)")
    if not isinstance(spec.python, str) or not spec.python or re.search(r"\s", spec.python):
        raise invalid(_OWNER, "python", spec.python, "expected a command without whitespace")
    python = spec.python
    if os.sep in python:  # a path: the job runs in submit_dir; a bare name is looked up in PATH
        # checked here as the venv and config files are: the cluster's filesystem is shared
        python = _check_path("python", python, submit_dir, must_exist="file")
        if not os.access(python, os.X_OK):
            raise invalid(_OWNER, "python", spec.python,
                          f"expected an executable python ({python} is not executable)")
    if not isinstance(spec.env, tuple):
        raise invalid(_OWNER, "env", spec.env, "expected a tuple of (NAME, value) pairs")
    for pair in spec.env:
        strings = (isinstance(pair, tuple) and len(pair) == 2
                   and all(isinstance(part, str) for part in pair))
        if not strings or not _ENV_NAME.fullmatch(pair[0]) or "\0" in pair[1]:
            raise invalid(_OWNER, "env", "=".join(pair) if strings else pair,
                          "expected NAME=value with NAME of letters, digits and '_' (not "
                          "starting with a digit)")
    if not isinstance(spec.setup, tuple):
        raise invalid(_OWNER, "setup", spec.setup, "expected a tuple of shell lines")
    for line in spec.setup:
        if not isinstance(line, str) or not line.strip() or "\n" in line or "\0" in line:
            raise invalid(_OWNER, "setup", line, "expected one non-empty shell line")
    return venv, python
