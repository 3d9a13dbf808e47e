"""Submit a cnnjax entry point to SLURM: write `<workdir>/slurm/job.sbatch`, then `sbatch` it.

    python -m launch.submit --entry=train --config=experiments/configs/resnet20_cifar10.py \\
        --workdir=/shared/workdirs/resnet20 --nodes=2 --gpus_per_node=4 --time=04:00:00 \\
        --partition=gpu [--dry_run] -- --config.optimizer.learning_rate=0.05

Everything after `--` goes to the entry point verbatim (`--config.x=y`, `--sweep.x=y`,
`--recipe.x=y`, `--transfer.x=y`). A sweep becomes an array job with one task per trial (the
sweep file decides how many). Every field is checked first, and the config files are loaded with
the overrides (`--nocheck_configs` skips that, ~5 s); nothing is written when a check fails.
`<workdir>/slurm/launch.json` records the spec and every job id. Submitting the same spec again
is safe (the job resumes from the work directory), also with other scheduling settings
(`SCHEDULING_FIELDS`: `--array=1,3` reruns chosen trials, `--time` or `--max_requeues` extend a
job); a spec that would compute something else in a work directory that already has one is
refused unless `--force`. `--dry_run` prints the script and writes and submits nothing; it
refuses what submitting would. The directory it runs in goes first on the job's PYTHONPATH
(`job_import_dir`), as `python -m` put it first on the check's import path: a config file that
imports your own package from there (`import mypkg.models`) loads in the job as in the check.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from cnnjax.launch import checks, slurm
from cnnjax.launch.spec import (
    ENTRY_POINTS,
    SCHEDULING_FIELDS,
    JobSpec,
    absolute_path_overrides,
    json_ready,
    validate_spec,
    without_scheduling,
)
from cnnjax.utils.cli import os_error_message
from cnnjax.utils.files import atomic_write
from cnnjax.utils.validation import invalid

SCRIPT_FILE = "job.sbatch"
RECORD_FILE = "launch.json"
_OWNER = "launch"
#: Where jobs run (`python -m experiments.<entry>` needs the repository on the path).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = flags.DEFINE_enum("entry", None, list(ENTRY_POINTS), "Entry point to run.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The job's directory (passed as --workdir, --sweep_dir, --tune_dir or "
    "--transfer_dir); must be on a filesystem every node shares.")
_CONFIG = flags.DEFINE_string("config", None, "Experiment config file (train, sweep, tune).")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (sweep).")
_RECIPE = flags.DEFINE_string("recipe", None, "Recipe file (tune).")
_TRANSFER = flags.DEFINE_string("transfer", None, "Transfer file (transfer).")
_NODES = flags.DEFINE_integer("nodes", 1, "Nodes (train only may use more than 1).")
_GPUS = flags.DEFINE_integer("gpus_per_node", 1, "GPUs per node (0: CPU only).")
_TASKS = flags.DEFINE_integer(
    "tasks_per_node", None, "Tasks per node; default one per GPU for train, else 1.")
_CPUS = flags.DEFINE_integer("cpus_per_task", 8, "CPUs per task (input pipeline threads).")
_MEM = flags.DEFINE_string("mem", None, "Memory per node, e.g. 64G (default: partition's).")
_TIME = flags.DEFINE_string("time", "04:00:00", "Time limit (HH:MM:SS, D-HH:MM:SS, minutes).")
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "SLURM account.")
_QOS = flags.DEFINE_string("qos", None, "SLURM quality of service.")
_CONSTRAINT = flags.DEFINE_string("constraint", None, "SLURM node features, e.g. a100.")
_JOB_NAME = flags.DEFINE_string("job_name", None, "Job name (default cnnjax-<entry>-<dir>).")
_ARRAY = flags.DEFINE_string(
    "array", None, "Sweep: array tasks to run, e.g. 0-7 or 3,5 (default: all; task i runs trial "
    "i, or trials i*k ... i*k+k-1 with --trials_per_task=k).")
_MAX_PARALLEL = flags.DEFINE_integer(
    "max_parallel", None, "Sweep: at most this many array tasks at once (--array=...%N).")
_TRIALS_PER_TASK = flags.DEFINE_integer(
    "trials_per_task", 1, "Sweep: each array task runs this many consecutive trials (a sweep "
    "larger than the cluster's MaxArraySize; --time must cover them all).")
_SIGNAL_SECONDS = flags.DEFINE_integer(
    "signal_seconds", 300, "Stop and requeue this many seconds before the time limit.")
_MAX_REQUEUES = flags.DEFINE_integer(
    "max_requeues", 3, "Requeue at most this many times (then resubmit by hand).")
_VENV = flags.DEFINE_string(
    "venv", os.path.join(REPOSITORY, ".venv"), "Virtual environment to activate ('' for none).")
_PYTHON = flags.DEFINE_string(
    "python", "python", "Python command (after the venv): a name looked up in PATH, or a path.")
_ENV = flags.DEFINE_multi_string("env", [], "NAME=value exported in the job (repeatable).")
_SETUP = flags.DEFINE_multi_string(
    "setup", [], "A shell line run first, e.g. 'module load cuda/12.4' (repeatable).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the script; write and submit nothing.")
_FORCE = flags.DEFINE_bool("force", False, "Replace a different spec recorded in the workdir.")
_CHECK_CONFIGS = flags.DEFINE_bool(
    "check_configs", True, "Load the config files with the overrides before submitting.")
flags.mark_flags_as_required(["entry", "workdir"])


def _env_pairs(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise invalid(_OWNER, "env", item, "expected NAME=value")
        pairs.append((name, value))
    return tuple(pairs)


def _absolute(path: str | None) -> str | None:
    """`path` against the current directory (the job itself runs in the repository root)."""
    return None if path is None or path == "" else os.path.abspath(os.path.expanduser(path))


def _python_command(python: str) -> str:
    """`--python` as a path against the current directory if it holds a '/'; a bare command
    name (`python3`) stays one, looked up in the job's PATH."""
    return _absolute(python) if os.sep in python else python


def spec_from_flags(overrides: Sequence[str]) -> JobSpec:
    """The JobSpec the command line describes (not yet validated): relative paths, those of
    the path-valued overrides (`PATH_FIELDS`) too, are taken from the current directory; the job
    runs in the repository holding this script."""
    return JobSpec(
        # An empty --workdir= (an unset $WORKDIR) stays '' so the refusal quotes what was given.
        entry=_ENTRY.value, workdir=_absolute(_WORKDIR.value) or _WORKDIR.value,
        config=_absolute(_CONFIG.value),
        sweep=_absolute(_SWEEP.value), recipe=_absolute(_RECIPE.value),
        transfer=_absolute(_TRANSFER.value),
        overrides=absolute_path_overrides(tuple(overrides), os.getcwd()),
        nodes=_NODES.value, gpus_per_node=_GPUS.value, tasks_per_node=_TASKS.value,
        cpus_per_task=_CPUS.value, mem=_MEM.value, time=_TIME.value,
        partition=_PARTITION.value, account=_ACCOUNT.value, qos=_QOS.value,
        constraint=_CONSTRAINT.value, job_name=_JOB_NAME.value, array=_ARRAY.value,
        max_parallel=_MAX_PARALLEL.value, trials_per_task=_TRIALS_PER_TASK.value,
        signal_seconds=_SIGNAL_SECONDS.value,
        max_requeues=_MAX_REQUEUES.value, venv=_absolute(_VENV.value),
        python=_python_command(_PYTHON.value),
        env=_env_pairs(_ENV.value), setup=tuple(_SETUP.value), submit_dir=REPOSITORY,
    )


def job_import_dir(directory: str, repository: str) -> str | None:
    """The directory to put first on the job's PYTHONPATH: `directory`, where launch.submit runs
    (`python -m` puts it first on the config check's import path), or None where it is the
    `repository` the job runs in (its own `python -m` puts that there)."""
    if os.path.realpath(directory) == os.path.realpath(repository):
        return None
    if os.pathsep in directory:
        raise invalid(_OWNER, "current directory", directory,
                      f"PYTHONPATH cannot hold a directory whose name has {os.pathsep!r}, and "
                      "the job needs it there to import what the config check imported from "
                      "it; run launch.submit from another directory")
    return directory


def job_environment(spec: JobSpec, directory: str | None) -> JobSpec:
    """`spec` as the script runs it: `directory` (`job_import_dir`) first on the job's PYTHONPATH,
    whatever else it holds (inherited: sbatch exports the submitting shell's; set by a `--setup`
    line; given in `--env`). Only the script changes: the spec recorded and compared stays as
    given, as the submitting shell's environment is not recorded either."""
    if directory is None:
        return spec
    export = f"export PYTHONPATH={shlex.quote(directory)}${{PYTHONPATH:+:$PYTHONPATH}}"
    env = tuple((name, f"{directory}{os.pathsep}{value}" if value else directory)
                if name == "PYTHONPATH" else (name, value) for name, value in spec.env)
    return dataclasses.replace(spec, env=env, setup=(
        *spec.setup, "# where launch.submit ran, first on the import path as in its config check",
        export))


def prepare(spec: JobSpec, *, check_configs: bool = True, max_array_size: int | None = None,
            import_dir: str | None = None) -> tuple[JobSpec, int | None, str]:
    """Validates `spec` (and loads its configs if `check_configs`); returns the normalized spec,
    the sweep's trial count (None for other entry points) and the sbatch script.
    `max_array_size`: the cluster's `MaxArraySize` a sweep's array must fit (None: unchecked).
    `import_dir`: `job_import_dir`, put first on the job's PYTHONPATH (None: nothing added)."""
    num_trials = checks.count_trials(spec) if spec.entry == "sweep" else None
    spec = validate_spec(spec, num_trials)
    checks.check_array_size(spec, num_trials, max_array_size)
    if check_configs:
        checks.check_configs(spec)
    return spec, num_trials, slurm.render(job_environment(spec, import_dir), num_trials)


#: JobSpec's defaults as launch.json stores them, for records written before a field existed.
_SPEC_DEFAULTS = json_ready({f.name: f.default for f in dataclasses.fields(JobSpec)
                             if f.default is not dataclasses.MISSING})


def _read_record(path: str, workdir: str) -> dict[str, Any] | None:
    """The launch record at `path` (None if there is none); ValueError naming it when it is not
    one this command writes (truncated, hand-edited)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as err:
            reason = f"not valid JSON ({err})"
        else:
            if (isinstance(record, dict) and isinstance(record.get("spec"), dict)
                    and isinstance(record.get("jobs"), list)):
                return record
            reason = ("not what launch.submit writes (an object with a 'spec' object and a "
                      "'jobs' list)")
    raise invalid(_OWNER, "workdir", workdir, f"its launch record {path} is {reason}; repair "
                  "it, or move it away to submit as if the workdir were new")


#: Scheduling fields only a sweep (an array job) takes.
_SWEEP_ONLY = ("array", "max_parallel", "trials_per_task")
#: What `--force` leaves to the entry point itself, which checks its work directory at start:
#: the refusal names the one that applies, so a sweep is not told about train's restart.
_REPLACE_HINTS = {
    "train": "if the config changed, also pass --config.restart=True: experiments.train refuses "
             "checkpoints of an incompatible config, and restart deletes them",
    "sweep": "experiments.sweep still refuses a --sweep_dir holding another search space or "
             "base config; for those choose a new --workdir. A random sweep grown with a "
             "larger --sweep.num_trials (same seed) is one --force submits: its finished "
             "trials stand and only the new ones run",
    "tune": "experiments.tune still refuses a --tune_dir made with another base config or "
            "recipe (only --recipe.max_rounds may change); for those choose a new --workdir",
    "transfer": "experiments.transfer still refuses a --transfer_dir made with other configs, "
                "budget field or arm overrides; for those choose a new --workdir",
}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def planned_record(spec: JobSpec, num_trials: int | None, *, force: bool = False,
                   import_dir: str | None = None) -> dict[str, Any]:
    """The launch record submitting `spec` writes: ValueError when the work directory's record
    holds a spec that differs in more than `SCHEDULING_FIELDS`, unless `force`: then the old spec
    is kept in the record's `replaced` list. A spec differing only in those (`--array=1,3` to
    rerun two trials of a sweep, a longer `--time`) is the same job queued differently. A record
    without jobs (`sbatch` refused it, or was not found) is replaced freely: nothing ran under
    it. Reads only, so a dry run refuses what submitting would. `import_dir` (`job_import_dir`)
    is recorded beside the spec, not compared: where launch.submit runs may change, since the
    config check run there loads what the job will import (as for the submitting environment)."""
    record = _read_record(os.path.join(slurm.slurm_dir(spec), RECORD_FILE), spec.workdir)
    new = spec.to_json()
    if record is not None:  # fields added since it was written read as their defaults
        record["spec"] = {**_SPEC_DEFAULTS, **record["spec"]}
    kept, wanted = without_scheduling(record["spec"] if record else {}), without_scheduling(new)
    if record is not None and kept != wanted and record["jobs"]:
        changes = _differences(kept, wanted)
        if not force:
            scheduling = ", ".join(f"--{name}" for name in sorted(SCHEDULING_FIELDS)
                                   if spec.entry == "sweep" or name not in _SWEEP_ONLY)
            raise invalid(
                _OWNER, "workdir", spec.workdir,
                f"it holds a job with a different spec ({'; '.join(changes)}); resubmit the "
                f"recorded spec to resume it (only {scheduling} and the overrides a resumed run "
                "accepts, --distributed_timeout and --config.<runtime field>, may change), "
                "choose a new "
                f"--workdir, or pass --force to replace it ({_REPLACE_HINTS[spec.entry]})")
        record = {**record, "replaced": [*record.get("replaced", []),
                                         {"spec": record["spec"], "until": _now()}]}
    if record is None:
        record = {"spec": new, "jobs": []}
    record.update(spec=new, num_trials=num_trials, script=SCRIPT_FILE, import_dir=import_dir)
    return record


def write_job(spec: JobSpec, num_trials: int | None, script: str, *, force: bool = False,
              import_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """Writes `<workdir>/slurm/job.sbatch` and the launch record (`planned_record`, whose
    refusal writes nothing); returns (script path, record)."""
    record = planned_record(spec, num_trials, force=force, import_dir=import_dir)
    directory = slurm.slurm_dir(spec)
    os.makedirs(directory, exist_ok=True)
    script_path = os.path.join(directory, SCRIPT_FILE)
    with open(script_path, "w") as f:
        f.write(script)
    os.chmod(script_path, 0o755)
    _write_json(os.path.join(directory, RECORD_FILE), record)
    return script_path, record


def _write_json(path: str, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(json_ready(data), indent=2) + "\n")


def sbatch(script_path: str, spec: JobSpec, record: dict[str, Any]) -> str:
    """Runs `sbatch --parsable <script>`; records and returns the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True,
                                text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found on PATH: submit from a SLURM login node (or use "
                           f"--dry_run); the script is in {script_path}") from None
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    record["jobs"].append({"job_id": job_id, "submitted": _now()})
    _write_json(os.path.join(slurm.slurm_dir(spec), RECORD_FILE), record)
    return job_id


def main(argv: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # for a config file importing TensorFlow
    try:
        spec = spec_from_flags(argv[1:])
        import_dir = job_import_dir(os.getcwd(), spec.submit_dir)
        spec, num_trials, script = prepare(
            spec, check_configs=_CHECK_CONFIGS.value, import_dir=import_dir,
            max_array_size=checks.cluster_max_array_size() if spec.entry == "sweep" else None)
        if _DRY_RUN.value:  # refuses as submitting would
            planned_record(spec, num_trials, force=_FORCE.value, import_dir=import_dir)
            print(script, end="")
            return
        script_path, record = write_job(spec, num_trials, script, force=_FORCE.value,
                                        import_dir=import_dir)
        job_id = sbatch(script_path, spec, record)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # an output folder it cannot create or write
        sys.exit(f"error: {os_error_message(err)}")
    trials = f" ({num_trials} trials)" if num_trials else ""
    if num_trials and spec.trials_per_task > 1:
        trials = (f" ({num_trials} trials, {spec.trials_per_task} per array task, "
                  f"{spec.num_array_tasks(num_trials)} tasks)")
    print(f"Submitted {spec.entry} job {job_id}{trials}: {script_path}\n"
          f"Logs and events: {slurm.slurm_dir(spec)}/", flush=True)


def _unknown_flag_hint(name: str) -> str:
    """An entry point's override (`--config.x=y`) given before `--` reaches this command's own
    flags: say where it goes."""
    if "." not in name:
        return ""
    return (f"; --{name} looks like an override of the entry point: put it after `--` "
            f"(... --dry_run -- --{name}=...)")


if __name__ == "__main__":
    import functools

    from cnnjax.utils.cli import parse_flags

    app.run(main, flags_parser=functools.partial(parse_flags,
                                                 unknown_flag_hint=_unknown_flag_hint))
