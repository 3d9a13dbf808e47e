"""`python -m launch.submit` as a user runs it, with a stand-in `sbatch`: what it writes and
submits, dry runs, safe resubmission, refusal of a changed spec (and --force), bad input before
anything is written, and `check_configs` (overrides loaded against the config files)."""

import json
import os
import re
import subprocess
import sys

import pytest

from cnnjax.launch.checks import (
    check_array_size,
    check_configs,
    cluster_max_array_size,
    load_files,
)
from cnnjax.launch.spec import JobSpec, validate_spec
from tests.commands import run_commands
from tests.launch.conftest import (
    CONFIG,
    RECIPE,
    ROOT,
    SWEEP,
    TRANSFER,
    own_project,
    path_with,
    stand_in_slurm,
    write_executable,
)


def _submit(tmp_path, *args, cwd=None):
    bin_dir = stand_in_slurm(tmp_path / "bin")
    return subprocess.run([sys.executable, "-m", "launch.submit", *args],
                          cwd=cwd or ROOT, env=path_with(bin_dir) | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def _submit_in_turn(tmp_path, *commands):
    """`python -m launch.submit <args>` for each of `commands`, one after another from the
    repository root, in one interpreter forking a child per command (tests/commands.py): the
    engine's config (JAX, Flax), which the overrides and a resubmission's spec comparison
    import, is imported once, not 3-5 s a run."""
    bin_dir = stand_in_slurm(tmp_path / "bin")
    return run_commands([("launch.submit", *args) for args in commands],
                        env=path_with(bin_dir) | {"PYTHONPATH": str(ROOT)},
                        preimport=["cnnjax.train.config"])


def _train_args(workdir, *extra):
    return ["--entry=train", f"--config={CONFIG}", f"--workdir={workdir}", "--nodes=2",
            "--gpus_per_node=4", "--time=04:00:00", "--partition=gpu", "--nocheck_configs",
            *extra]


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    result = _submit(tmp_path, *_train_args(tmp_path / "run", "--dry_run", "--",
                                            "--config.data.train_split=train[:10%]"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/usr/bin/env bash\n")
    assert "#SBATCH --ntasks-per-node=4\n" in result.stdout
    assert "    '--config.data.train_split=train[:10%]' &\n" in result.stdout
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "bin" / "sbatch.calls").exists()


def test_submit_writes_the_script_and_record_and_resubmits_safely(tmp_path):
    workdir = tmp_path / "run"
    result = _submit(tmp_path, *_train_args(workdir, "--", "--config.seed=1"))
    assert result.returncode == 0, result.stderr
    script = workdir / "slurm" / "job.sbatch"
    assert f"Submitted train job 4242: {script}" in result.stdout
    assert (tmp_path / "bin" / "sbatch.calls").read_text() == f"--parsable {script}\n"
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert record["spec"]["overrides"] == ["--config.seed=1"]
    assert record["spec"]["submit_dir"] == str(ROOT)
    assert record["spec"]["venv"] == str(ROOT / ".venv")
    assert [job["job_id"] for job in record["jobs"]] == ["4242"]
    first = script.read_text()

    # the same job again, from another directory with relative paths: resumes, both recorded
    again = _submit(tmp_path, "--entry=train", f"--config={CONFIG}", "--workdir=run",
                    "--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--nocheck_configs",
                    "--", "--config.seed=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert [job["job_id"] for job in record["jobs"]] == ["4242", "4242"]
    # ... the same script, but for that directory first on the job's import path
    assert record["import_dir"] == str(tmp_path)
    added = ("# where launch.submit ran, first on the import path as in its config check\n"
             f"export PYTHONPATH={tmp_path}${{PYTHONPATH:+:$PYTHONPATH}}\n")
    assert script.read_text().replace(added, "") == first


@pytest.mark.parametrize("python,expected", [("./myenv/bin/python", "{cwd}/myenv/bin/python"),
                                             ("myenv/bin/python", "{cwd}/myenv/bin/python"),
                                             ("python3", "python3")])
def test_a_relative_python_path_is_taken_from_the_current_directory(tmp_path, python,
                                                                     expected):
    """`--python=./myenv/bin/python` was written as given, so the job (running in the
    repository) looked for it there, not where the user was; a bare name stays a PATH lookup."""
    cwd = tmp_path / "elsewhere"
    (cwd / "myenv" / "bin").mkdir(parents=True)
    (cwd / "myenv" / "bin" / "python").write_text("#!/bin/sh\n")
    (cwd / "myenv" / "bin" / "python").chmod(0o755)  # checked as --venv is: it must be there
    result = _submit(tmp_path, *_train_args(tmp_path / "run", "--dry_run", f"--python={python}"),
                     cwd=cwd)
    assert result.returncode == 0, result.stderr
    srun = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --cpus-per-task=8 --kill-on-bad-exit=1 {expected.format(cwd=cwd)} "
                    "-m experiments.train \\"]


def test_path_valued_overrides_are_taken_from_the_current_directory(tmp_path):
    """`-- --config.init_from.workdir=pretrained_run` was passed verbatim, so the job (which
    `cd`s into the repository) read <repo>/pretrained_run, and the checks the login shell's
    ./pretrained_run. The script now holds the path where the user typed it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = _submit(tmp_path, *_train_args("run1", "--dry_run", "--",
                                            "--config.init_from.workdir=pretrained_run",
                                            "--config.data.data_dir=tfds", "--config.seed=1"),
                     cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"    --workdir={cwd}/run1 \\\n" in result.stdout
    assert f"    --config.init_from.workdir={cwd}/pretrained_run \\\n" in result.stdout
    assert f"    --config.data.data_dir={cwd}/tfds \\\n" in result.stdout
    assert "    --config.seed=1 &\n" in result.stdout


_JOB_IMPORTS = ("import os, mypkg; print(os.getcwd()); print(mypkg.__file__); "
                "print(os.environ['PYTHONPATH'])")


@pytest.mark.parametrize("entry,extra,array_task,path_after", [
    ("train", [], {}, "/inherited"),
    ("sweep", [f"--sweep={SWEEP}", "--env=PYTHONPATH=/given"],
     {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}, "/given"),
])
def test_the_job_imports_from_where_launch_submit_ran_as_its_check_did(tmp_path, entry, extra,
                                                                        array_task, path_after):
    """A config file importing the user's package from the current directory passed the check
    (`python -m` puts that directory on the import path), but the job, run in the repository,
    failed in the queue: ModuleNotFoundError: No module named 'mypkg'. The script now puts that
    directory first on the job's PYTHONPATH, ahead of the inherited one or `--env`'s, in an
    array task too; its job step (a stand-in srun running the job's python) imports it."""
    project = own_project(tmp_path / "project")
    workdir = tmp_path / "run"
    result = _submit(tmp_path, f"--entry={entry}", f"--config={project / 'cfg.py'}", *extra,
                     f"--workdir={workdir}", "--gpus_per_node=0", cwd=project)
    assert result.returncode == 0, result.stderr  # the check imported mypkg
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "srun", (
        "#!/usr/bin/env bash\n"
        'while [[ "${1:-}" == --* ]]; do shift; done  # srun options\n'
        f'"$1" -c "{_JOB_IMPORTS}" > {tmp_path}/job_imports\n'))  # $1: the job's python
    env = path_with(bin_dir) | {"PYTHONPATH": "/inherited", "SLURM_JOB_ID": "7"} | array_task
    job = subprocess.run(["bash", str(workdir / "slurm" / "job.sbatch")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    assert (tmp_path / "job_imports").read_text().splitlines() == [
        str(ROOT), str(project / "mypkg" / "__init__.py"), f"{project}:{path_after}"]
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert (record["spec"]["submit_dir"], record["import_dir"]) == (str(ROOT), str(project))


def test_a_resubmission_is_checked_with_the_import_path_its_job_gets(tmp_path):
    """Where launch.submit runs is recorded, not compared: resubmitted from the repository, the
    job would not find `mypkg`, and the check says so now; a resubmission the check does not
    load (`--nocheck_configs`) is the same job, whose script then adds no directory."""
    project = own_project(tmp_path / "project")
    workdir = tmp_path / "run"
    args = ["--entry=train", f"--config={project / 'cfg.py'}", f"--workdir={workdir}",
            "--gpus_per_node=0"]
    assert _submit(tmp_path, *args, cwd=project).returncode == 0
    script = (workdir / "slurm" / "job.sbatch").read_text()
    assert f"\nexport PYTHONPATH={project}${{PYTHONPATH:+:$PYTHONPATH}}\n" in script
    refused = _submit(tmp_path, *args)  # from the repository
    assert refused.returncode == 1
    assert "No module named 'mypkg'" in refused.stderr
    assert (workdir / "slurm" / "job.sbatch").read_text() == script
    unchecked = _submit(tmp_path, *args, "--nocheck_configs")
    assert unchecked.returncode == 0, unchecked.stderr
    assert "PYTHONPATH" not in (workdir / "slurm" / "job.sbatch").read_text()
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert (record["import_dir"], len(record["jobs"])) == (None, 2)


def test_a_current_directory_pythonpath_cannot_hold_is_refused(tmp_path):
    """Its name's ':' would split it into two PYTHONPATH entries, neither of them it."""
    cwd = tmp_path / "a:b"
    cwd.mkdir()
    result = _submit(tmp_path, *_train_args(tmp_path / "run"), cwd=cwd)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: launch: current directory={str(cwd)!r} is invalid; PYTHONPATH cannot hold a "
        "directory whose name has ':', and the job needs it there to import what the config "
        "check imported from it; run launch.submit from another directory.")
    assert not (tmp_path / "run").exists()


def test_a_record_written_before_a_spec_field_existed_still_resubmits(tmp_path):
    """launch.json of an older cnnjax (no `trials_per_task`): the same job resubmits."""
    workdir = tmp_path / "run"
    assert _submit(tmp_path, *_train_args(workdir)).returncode == 0
    path = workdir / "slurm" / "launch.json"
    record = json.loads(path.read_text())
    del record["spec"]["trials_per_task"]
    path.write_text(json.dumps(record))
    again = _submit(tmp_path, *_train_args(workdir))
    assert again.returncode == 0, again.stderr
    assert len(json.loads(path.read_text())["jobs"]) == 2


def test_force_replaces_a_record_with_a_field_this_version_does_not_know(tmp_path):
    """E.g. launch.json written by a newer cnnjax: refused as a different spec, replaced with
    --force."""
    workdir = tmp_path / "run"
    assert _submit(tmp_path, *_train_args(workdir)).returncode == 0
    path = workdir / "slurm" / "launch.json"
    record = json.loads(path.read_text())
    record["spec"]["future_field"] = 3
    path.write_text(json.dumps(record))
    refused = _submit(tmp_path, *_train_args(workdir))
    assert refused.returncode == 1
    assert "it holds a job with a different spec (future_field: 3 -> None)" in refused.stderr
    forced = _submit(tmp_path, *_train_args(workdir, "--force"))
    assert forced.returncode == 0, forced.stderr
    assert "future_field" not in json.loads(path.read_text())["spec"]


@pytest.mark.parametrize("text,reason", [
    ('{"spec": ', r"not valid JSON \(Expecting value: line 1 column 10 \(char 9\)\)"),
    ('{"jobs": []}', r"not what launch.submit writes \(an object with a 'spec' object and a "
                     r"'jobs' list\)"),
    ("[1]", r"not what launch.submit writes \(.*\)"),
])
def test_an_unreadable_launch_record_is_named_and_nothing_is_written(tmp_path, text, reason):
    """A truncated or hand-edited launch.json gave 'error: Expecting value: line 1 column 10'
    (no file named) or a KeyError/TypeError traceback."""
    workdir = tmp_path / "run"
    (workdir / "slurm").mkdir(parents=True)
    (workdir / "slurm" / "launch.json").write_text(text)
    result = _submit(tmp_path, *_train_args(workdir))
    assert result.returncode == 1
    path = workdir / "slurm" / "launch.json"
    assert re.fullmatch(
        rf"error: launch: workdir='{workdir}' is invalid; its launch record {path} is "
        rf"{reason}; repair it, or move it away to submit as if the workdir were new\.\n",
        result.stderr), result.stderr
    assert os.listdir(workdir / "slurm") == ["launch.json"]
    assert path.read_text() == text
    assert not (tmp_path / "bin" / "sbatch.calls").exists()


def test_a_different_spec_for_the_workdir_is_refused_unless_forced(tmp_path):
    workdir = tmp_path / "run"
    assert _submit(tmp_path, *_train_args(workdir)).returncode == 0
    before = (workdir / "slurm" / "job.sbatch").read_text()
    changed = _submit(tmp_path, *_train_args(workdir, "--time=08:00:00", "--",
                                             "--config.seed=2"))
    assert changed.returncode == 1
    # the time limit only schedules the job: the refusal names the seed alone
    assert (f"error: launch: workdir='{workdir}' is invalid; it holds a job with a different "
            "spec (overrides: [] -> ['--config.seed=2']); resubmit the recorded spec to resume "
            "it (only --account, --job_name, --max_requeues, --mem, --qos, --signal_seconds, "
            "--time and the overrides a resumed run accepts, --distributed_timeout and "
            "--config.<runtime field>, may change), choose a new "
            "--workdir, or pass --force to replace it (if the config changed, also pass "
            "--config.restart=True: experiments.train refuses checkpoints of an incompatible "
            "config") in changed.stderr
    assert (workdir / "slurm" / "job.sbatch").read_text() == before
    # Forced, then resubmitted with overrides a resumed run accepts (the README's
    # "--distributed_timeout=600 to change it", the engine's RUNTIME_FIELDS), which were refused
    # as a different spec too; in one interpreter (the resubmission keeps what --force wrote).
    forced, neutral = _submit_in_turn(
        tmp_path, _train_args(workdir, "--time=08:00:00", "--force", "--", "--config.seed=2"),
        _train_args(workdir, "--time=08:00:00", "--", "--config.seed=2",
                    "--distributed_timeout=600", "--config.progress_bar=False"))
    assert forced.returncode == 0, forced.stderr
    assert neutral.returncode == 0, neutral.stderr
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert record["spec"]["time"] == "08:00:00"
    assert record["replaced"][0]["spec"]["time"] == "04:00:00"
    assert len(record["jobs"]) == 3  # the first job, the forced one and the resubmission
    assert "#SBATCH --time=08:00:00\n" in (workdir / "slurm" / "job.sbatch").read_text()
    assert record["spec"]["overrides"] == [
        "--config.seed=2", "--distributed_timeout=600", "--config.progress_bar=False"]


def test_a_dry_run_refuses_what_submitting_would_refuse(tmp_path):
    """A dry run printed the script of a spec the work directory's launch record refuses (and
    of one whose record is unreadable), so it said yes where submitting says no."""
    workdir = tmp_path / "run"
    assert _submit(tmp_path, *_train_args(workdir)).returncode == 0
    record = (workdir / "slurm" / "launch.json").read_text()
    # dry runs write nothing, so each sees the same record: run in one interpreter
    changed, forced, rescheduled = _submit_in_turn(
        tmp_path, _train_args(workdir, "--dry_run", "--", "--config.seed=2"),
        _train_args(workdir, "--dry_run", "--force", "--", "--config.seed=2"),
        _train_args(workdir, "--dry_run", "--time=08:00:00"))
    assert changed.returncode == 1 and changed.stdout == ""
    assert (f"error: launch: workdir='{workdir}' is invalid; it holds a job with a different "
            "spec (overrides: [] -> ['--config.seed=2'])") in changed.stderr
    assert forced.returncode == 0 and forced.stdout.startswith("#!/usr/bin/env bash\n")
    assert rescheduled.returncode == 0, rescheduled.stderr
    assert "#SBATCH --time=08:00:00\n" in rescheduled.stdout
    assert (workdir / "slurm" / "launch.json").read_text() == record  # dry runs write nothing
    (workdir / "slurm" / "launch.json").write_text('{"spec": ')
    broken = _submit(tmp_path, *_train_args(workdir, "--dry_run"))
    assert broken.returncode == 1 and "its launch record" in broken.stderr
    assert len((tmp_path / "bin" / "sbatch.calls").read_text().splitlines()) == 1


def test_a_sweep_is_submitted_as_an_array_over_its_trials(tmp_path):
    workdir = tmp_path / "sweep"
    result = _submit(tmp_path, "--entry=sweep", f"--config={CONFIG}", f"--sweep={SWEEP}",
                     f"--workdir={workdir}", "--max_parallel=2", "--nocheck_configs")
    assert result.returncode == 0, result.stderr
    assert "Submitted sweep job 4242 (4 trials)" in result.stdout
    assert "#SBATCH --array=0-3%2\n" in (workdir / "slurm" / "job.sbatch").read_text()
    assert json.loads((workdir / "slurm" / "launch.json").read_text())["num_trials"] == 4


def test_growing_a_random_sweep_is_pointed_to_force(tmp_path):
    """docs/sweeps_and_tuning.md: a random sweep may grow (a larger num_trials, same seed). Its
    resubmission was refused with only "choose a new --workdir" for a sweep; --force submits it
    and the finished trials stand."""
    sweep = tmp_path / "random_sweep.py"
    sweep.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import log_uniform\n\n\n"
        "def get_config():\n    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.num_trials, c.metric, c.mode = 'random', 0, 2, 'top1', 'max'\n"
        "    c.parameters = (log_uniform('optimizer.learning_rate', 1e-3, 1.0),)\n"
        "    return c\n")
    workdir = tmp_path / "sweep"
    args = ["--entry=sweep", f"--config={CONFIG}", f"--sweep={sweep}", f"--workdir={workdir}",
            "--nocheck_configs"]
    first, grown, forced = _submit_in_turn(
        tmp_path, args, [*args, "--", "--sweep.num_trials=4"],
        [*args, "--force", "--", "--sweep.num_trials=4"])
    assert first.returncode == 0, first.stderr
    assert grown.returncode == 1
    assert grown.stderr.strip().endswith(
        "A random sweep grown with a larger --sweep.num_trials (same seed) is one --force "
        "submits: its finished trials stand and only the new ones run).")
    assert forced.returncode == 0, forced.stderr
    assert "#SBATCH --array=0-3\n" in (workdir / "slurm" / "job.sbatch").read_text()


def _grid_sweep_with_num_trials(tmp_path):
    """A user's 4-value grid file that restates its size as num_trials (accepted)."""
    path = tmp_path / "grid_sweep.py"
    path.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.num_trials, c.metric, c.mode = 'grid', 0, 4, 'top1', 'max'\n"
        "    c.parameters = (choice('optimizer.learning_rate', (0.003, 0.03, 0.3, 3.0)),)\n"
        "    return c\n")
    return str(path)


def test_a_grids_num_trials_override_is_refused_not_ignored(tmp_path):
    """`-- --sweep.num_trials=2` on a 4-trial grid printed `--array=0-3`: the override was
    silently ignored. The grid's own size is accepted; a different one is refused, naming the
    ways to run fewer."""
    sweep = _grid_sweep_with_num_trials(tmp_path)
    args = ["--entry=sweep", f"--config={CONFIG}", f"--sweep={sweep}",
            f"--workdir={tmp_path / 'sweep'}", "--dry_run"]
    same = _submit(tmp_path, *args, "--nocheck_configs")
    assert same.returncode == 0, same.stderr
    assert "#SBATCH --array=0-3\n" in same.stdout
    refused = _submit(tmp_path, *args, "--", "--sweep.num_trials=2")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: sweep: num_trials=2 is invalid; a grid has exactly 4 trials, the product of its "
        "value lists (4), so expected 4 or unset; to run fewer pass --max_trials=N to "
        "experiments.sweep (--array=... to launch.submit), or sample num_trials points with a "
        "random sweep (--sweep.kind=random, or kind='random' in the file).")
    assert "#SBATCH" not in refused.stdout
    # The shipped example grid sets no num_trials: it said "overrides='--sweep.num_trials=2' is
    # invalid; ... the config has no field 'num_trials'", not the grid's size; now the same line.
    example = _submit(tmp_path, "--entry=sweep", f"--config={CONFIG}", f"--sweep={SWEEP}",
                      f"--workdir={tmp_path / 'example'}", "--dry_run", "--",
                      "--sweep.num_trials=2")
    assert example.returncode == 1
    assert example.stderr.strip().splitlines()[-1] == refused.stderr.strip().splitlines()[-1]
    assert "#SBATCH" not in example.stdout
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "example").exists()


def test_a_train_job_resubmitted_with_a_longer_time_limit_resumes(tmp_path):
    """Time limit and requeue count are scheduling: the same run, given more time, is accepted
    without --force (nothing replaced) and its script carries the new limit."""
    workdir = tmp_path / "run"
    assert _submit(tmp_path, *_train_args(workdir)).returncode == 0
    longer = _submit(tmp_path, *_train_args(workdir, "--time=1-00:00:00", "--max_requeues=9"))
    assert longer.returncode == 0, longer.stderr
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert (record["spec"]["time"], record["spec"]["max_requeues"]) == ("1-00:00:00", 9)
    assert "replaced" not in record and len(record["jobs"]) == 2
    script = (workdir / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --time=1-00:00:00\n" in script and "MAX_REQUEUES=9\n" in script


def test_a_sweep_resubmitted_with_array_reruns_chosen_trials(tmp_path):
    """launch/README.md's `--array=1,3 reruns chosen trials`: the array (and --max_parallel)
    only choose which of the same trials are queued, so the resubmission is accepted and its
    script runs tasks 1 and 3; a change to what the trials compute is still refused, with the
    sweep's own advice (not train's --config.restart)."""
    workdir = tmp_path / "sweep"
    args = ["--entry=sweep", f"--config={CONFIG}", f"--sweep={SWEEP}", f"--workdir={workdir}",
            "--nocheck_configs"]
    assert _submit(tmp_path, *args).returncode == 0
    script = workdir / "slurm" / "job.sbatch"
    assert "#SBATCH --array=0-3\n" in script.read_text()

    rerun = _submit(tmp_path, *args, "--array=1,3", "--max_parallel=1")
    assert rerun.returncode == 0, rerun.stderr
    assert "#SBATCH --array=1,3%1\n" in script.read_text()
    record = json.loads((workdir / "slurm" / "launch.json").read_text())
    assert (record["spec"]["array"], record["spec"]["max_parallel"]) == ("1,3", 1)
    assert "replaced" not in record and len(record["jobs"]) == 2

    only = _submit(tmp_path, *args, "--array=1,3")
    assert only.returncode == 0, only.stderr
    assert "#SBATCH --array=1,3\n" in script.read_text()

    changed = _submit(tmp_path, *args, "--array=1,3", "--", "--config.num_train_steps=5")
    assert changed.returncode == 1
    assert ("it holds a job with a different spec (overrides: [] -> "
            "['--config.num_train_steps=5']); resubmit the recorded spec to resume it (only "
            "--account, --array, --job_name, --max_parallel, --max_requeues, --mem, --qos, "
            "--signal_seconds, --time, --trials_per_task and the overrides a resumed run "
            "accepts") in changed.stderr
    assert ("pass --force to replace it (experiments.sweep still refuses a --sweep_dir holding "
            "another search space or base config; for those choose a new --workdir. A random "
            "sweep grown") in changed.stderr
    assert "restart" not in changed.stderr
    assert "#SBATCH --array=1,3\n" in script.read_text()
    assert len(json.loads((workdir / "slurm" / "launch.json").read_text())["jobs"]) == 3


def _stand_in_scontrol(bin_dir, max_array_size):
    """An `scontrol` whose `show config` reports `MaxArraySize` as a SLURM 23 controller does."""
    write_executable(bin_dir / "scontrol", (
        "#!/usr/bin/env bash\n"
        '[ "$*" = "show config" ] || exit 1\n'
        "echo 'Configuration data as of 2026-11-30T08:00:00'\n"
        "echo 'MaxArrayIdleTime        = 0'\n"
        f"echo 'MaxArraySize            = {max_array_size}'\n"
        "echo 'MaxJobCount             = 10000'\n"))


def test_a_sweep_larger_than_the_clusters_array_limit_is_refused_naming_the_fix(tmp_path):
    """MaxArraySize 3 (indices 0-2) and a 4-trial sweep: refused before anything is written,
    naming --trials_per_task=2; with it, 2 array tasks of 2 trials each are submitted."""
    bin_dir = stand_in_slurm(tmp_path / "bin")
    _stand_in_scontrol(bin_dir, 3)
    args = [sys.executable, "-m", "launch.submit", "--entry=sweep", f"--config={CONFIG}",
            f"--sweep={SWEEP}", f"--workdir={tmp_path / 'sweep'}", "--nocheck_configs"]
    env = path_with(bin_dir) | {"PYTHONPATH": str(ROOT)}
    refused = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1
    assert ("error: launch: trials_per_task=1 is invalid; its largest array index is 3, but this "
            "cluster's MaxArraySize is 3 (scontrol show config), so SLURM accepts indices up to "
            "2; pass --trials_per_task=2 to run the 4 trials in 2 array tasks of up to 2 trials "
            "each (give --time for all 2)") in refused.stderr
    assert not (tmp_path / "sweep").exists()
    assert not (bin_dir / "sbatch.calls").exists()
    submitted = subprocess.run([*args, "--trials_per_task=2"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    assert ("Submitted sweep job 4242 (4 trials, 2 per array task, 2 tasks)"
            in submitted.stdout)
    script = (tmp_path / "sweep" / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --array=0-1\n" in script and "--trial_count=2" in script


def test_the_array_limit_is_read_from_scontrol_where_there_is_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: unknown, not checked
    assert cluster_max_array_size() is None
    _stand_in_scontrol(tmp_path, 1001)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path), "/usr/bin", "/bin"]))  # bash
    assert cluster_max_array_size() == 1001
    spec = validate_spec(JobSpec(entry="sweep", config=CONFIG, sweep=SWEEP,
                                 workdir=str(tmp_path / "s"), array="1,3",
                                 submit_dir=str(ROOT)), num_trials=4)
    check_array_size(spec, 4, 4)  # largest index 3 < 4
    with pytest.raises(ValueError, match=r"^launch: entry='sweep' is invalid; this cluster's "
                                         r"MaxArraySize is 0 .*: job arrays are disabled"):
        check_array_size(spec, 4, 0)
    with pytest.raises(ValueError, match=r"^launch: array='1,3' is invalid; its largest array "
                                         r"index is 3, but this cluster's MaxArraySize is 3"):
        check_array_size(spec, 4, 3)


@pytest.mark.parametrize("args,message", [
    (["--nodes=0"], "error: launch: nodes=0 is invalid; expected a positive integer"),
    (["--tasks_per_node=1"], "error: launch: tasks_per_node=1 is invalid; expected one task"),
    (["--env=NOEQUALS"], "error: launch: env='NOEQUALS' is invalid; expected NAME=value"),
    (["--", "--config.seed", "1"], "error: launch: overrides='--config.seed' is invalid"),
    # the later --workdir= wins: an unset $WORKDIR read as workdir=None
    (["--workdir="], "error: launch: workdir='' is invalid; expected a path"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, args, message):
    result = _submit(tmp_path, *_train_args(tmp_path / "run", *args))
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_sbatch_failure_is_reported_and_no_job_is_recorded(tmp_path):
    stand_in_slurm(tmp_path / "bin")
    (tmp_path / "bin" / "sbatch.fail").touch()
    result = _submit(tmp_path, *_train_args(tmp_path / "run"))
    assert result.returncode == 1
    assert "error: sbatch failed (exit 1): sbatch: error: invalid partition" in result.stderr
    assert json.loads((tmp_path / "run" / "slurm" / "launch.json").read_text())["jobs"] == []


def test_a_spec_sbatch_refused_can_be_corrected_without_force(tmp_path):
    """Nothing ran under a record without jobs, so a corrected partition is no other job."""
    stand_in_slurm(tmp_path / "bin")
    (tmp_path / "bin" / "sbatch.fail").touch()
    assert _submit(tmp_path, *_train_args(tmp_path / "run", "--partition=gpux")).returncode == 1
    (tmp_path / "bin" / "sbatch.fail").unlink()
    result = _submit(tmp_path, *_train_args(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "slurm" / "launch.json").read_text())
    assert record["spec"]["partition"] == "gpu"
    assert [job["job_id"] for job in record["jobs"]] == ["4242"]
    assert "replaced" not in record
    changed = _submit(tmp_path, *_train_args(tmp_path / "run", "--partition=gpux"))
    assert changed.returncode == 1  # once a job was queued, the spec is that job's
    assert "holds a job with a different spec (partition: 'gpu' -> 'gpux')" in changed.stderr


def test_without_sbatch_on_path_the_script_is_still_written(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "launch.submit",
                             *_train_args(tmp_path / "run")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PATH": str(tmp_path / "empty")})
    assert result.returncode == 1
    assert "sbatch not found on PATH: submit from a SLURM login node" in result.stderr
    assert (tmp_path / "run" / "slurm" / "job.sbatch").exists()


def _light_config(tmp_path, batch=36):
    """An engine config file that loads without TensorFlow (no data pipeline import)."""
    path = tmp_path / "light.py"
    path.write_text(
        "from cnnjax.train.config import default_config\n\n\ndef get_config():\n"
        "    config = default_config()\n"
        "    config.model = 'lenet5'\n"
        f"    config.global_batch_size = {batch}\n"
        "    return config\n")
    return str(path)


def test_check_configs_loads_the_overrides_like_the_entry_point(tmp_path):
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   nodes=2, gpus_per_node=4, submit_dir=str(ROOT))
    check_configs(spec)
    with pytest.raises(ValueError, match=r"^launch: overrides='--config.optimizer.learnin_rate="
                                         r"0.5' is invalid; loading .*light.py with it failed: "
                                         r".*Did you mean \"learning_rate\""):
        check_configs(JobSpec(**{**spec.__dict__,
                                 "overrides": ("--config.optimizer.learnin_rate=0.5",)}))
    with pytest.raises(ValueError, match=r"overrides='--config.global_batch_size=abc' is invalid"):
        check_configs(JobSpec(**{**spec.__dict__,
                                 "overrides": ("--config.global_batch_size=abc",)}))
    with pytest.raises(ValueError, match=r"^launch: config.global_batch_size=36 is invalid; "
                                         r"expected a multiple of the job's 8 devices"):
        check_configs(JobSpec(**{**spec.__dict__,
                                 "overrides": ("--config.global_batch_size=36",)}))
    check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--config.global_batch_size=36",),
                             "gpus_per_node": 0, "nodes": 1, "tasks_per_node": None}))
    with pytest.raises(ValueError, match=r"^launch: config.global_batch_size=32 is invalid; "
                                         r"expected a multiple of the job's 3 devices "
                                         r"\(1 node\(s\) x 3 CPU task\(s\)\)"):  # a process each
        check_configs(JobSpec(**{**spec.__dict__, "gpus_per_node": 0, "nodes": 1,
                                 "tasks_per_node": 3}))


def test_check_configs_unsets_a_field_with_none_like_the_entry_point(tmp_path):
    """`--config.<field>=None` unsets a None-able field at submission as at start (it was the
    string 'None' or a parse error), and a field that needs a value is refused by name."""
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   submit_dir=str(ROOT))
    loaded = load_files(spec.files, ("--config.ema.decay=0.9", "--config.ema.decay=None",
                                     "--config.init_from.workdir=None"))
    assert loaded["config"].ema.decay is None and loaded["config"].init_from.workdir is None
    with pytest.raises(ValueError, match=r"^launch: overrides='--config.optimizer.learning_rate="
                                         r"None' is invalid; config.optimizer.learning_rate cannot "
                                         r"be None \(it holds a float"):
        check_configs(JobSpec(**{**spec.__dict__,
                                 "overrides": ("--config.optimizer.learning_rate=None",)}))


def test_a_grid_sweeps_num_trials_override_is_explained_as_the_sweep_command_does(tmp_path):
    """It read "loading ... failed: 'num_trials'", then "the config has no field 'num_trials'";
    now the grid's size, as `experiments.sweep` says it."""
    spec = JobSpec(entry="sweep", config=_light_config(tmp_path, 32), sweep=SWEEP,
                   workdir=str(tmp_path / "w"), nodes=1, gpus_per_node=1, submit_dir=str(ROOT),
                   overrides=("--sweep.num_trials=5",))
    with pytest.raises(ValueError, match=r"^sweep: num_trials=5 is invalid; a grid has exactly 4 "
                                         r"trials, the product of its value lists \(4\), so "
                                         r"expected 4 or unset; to run fewer pass --max_trials=N"):
        check_configs(spec)


def test_check_configs_counts_devices_as_the_engine_will(tmp_path):
    """`config.num_devices` picks the devices of a single-process job, and each device's batch
    must split into `grad_accum_steps` micro-batches, as `check_config` requires at start."""
    spec = JobSpec(entry="sweep", config=_light_config(tmp_path, 30), sweep=SWEEP,
                   workdir=str(tmp_path / "w"), nodes=1, gpus_per_node=4, submit_dir=str(ROOT))
    with pytest.raises(ValueError, match=r"expected a multiple of the job's 4 devices"):
        check_configs(spec)
    check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--config.num_devices=1",)}))
    with pytest.raises(ValueError, match=r"^launch: config.global_batch_size=32 is invalid; "
                                         r"expected a multiple of the job's 3 devices "
                                         r"\(config.num_devices=3\)"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": (
            "--config.num_devices=3", "--config.global_batch_size=32")}))
    with pytest.raises(ValueError, match=r"^launch: config.num_devices=8 is invalid; expected "
                                         r"at most the job's 4 GPU\(s\)"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--config.num_devices=8",)}))
    train = JobSpec(entry="train", config=_light_config(tmp_path, 64), workdir=str(tmp_path / "t"),
                    nodes=2, gpus_per_node=2, submit_dir=str(ROOT))
    check_configs(train)
    with pytest.raises(ValueError, match=r"^launch: config.num_devices=2 is invalid; this job "
                                         r"runs 4 processes .* leave num_devices=0"):
        check_configs(JobSpec(**{**train.__dict__, "overrides": ("--config.num_devices=2",)}))
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: config: "
                                         r"grad_accum_steps=32 is invalid; expected a divisor "
                                         r"of the per-device batch 16"):
        check_configs(JobSpec(**{**train.__dict__, "overrides": ("--config.grad_accum_steps=32",)}))


def test_a_cpu_job_may_use_more_than_one_device_only_with_forced_host_devices(tmp_path,
                                                                            monkeypatch):
    """A CPU task is one device unless XLA_FLAGS forces more; num_devices=2 passed every launch
    check, then failed at start ("only 1 local devices are available") after the queue."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   gpus_per_node=0, submit_dir=str(ROOT), overrides=("--config.num_devices=2",))
    with pytest.raises(ValueError, match=r"^launch: config.num_devices=2 is invalid; a CPU task "
                                         r"has 1 device\(s\): expected 0 or at most 1, or more "
                                         r"host devices through XLA_FLAGS=--xla_force_host_"
                                         r"platform_device_count=2"):
        check_configs(spec)
    forced = "--xla_force_host_platform_device_count=4"
    check_configs(JobSpec(**{**spec.__dict__, "env": (("XLA_FLAGS", forced),)}))
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_foo=1 {forced}")  # sbatch exports it
    check_configs(spec)
    with pytest.raises(ValueError, match=r"a CPU task has 1 device"):  # --env wins
        check_configs(JobSpec(**{**spec.__dict__, "env": (("XLA_FLAGS", ""),)}))
    check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--config.num_devices=1",)}))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    with pytest.raises(ValueError, match=r"^launch: config.global_batch_size=32 is invalid; "
                                         r"expected a multiple of the job's 3 devices \(1 "
                                         r"node\(s\) x 1 CPU task\(s\) x 3 host device"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": ()}))  # all 3, as at start


def test_a_tuple_field_given_twice_is_refused_before_submission(tmp_path):
    """The entry point refuses it at start (ml_collections would join the values); the launch
    checks loaded the joined tuple and queued the job."""
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   submit_dir=str(ROOT), overrides=("--config.init_from.exclude=('head',)",
                                                    "--config.init_from.exclude=('fc',)"))
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: "
                                         r"--config.init_from.exclude is invalid given 2 times"):
        check_configs(spec)


def test_check_configs_types_the_entry_points_plain_flags(tmp_path):
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   submit_dir=str(ROOT), overrides=("--distributed_timeout=600",))
    check_configs(spec)
    # (refused by validate_spec, which check_configs runs first, naming what is valid)
    with pytest.raises(ValueError, match=r"^launch: overrides='--distributed_timeout=abc' is "
                                         r"invalid; --distributed_timeout takes a positive, "
                                         r"finite number of seconds"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--distributed_timeout=abc",)}))


def test_check_configs_refuses_a_dataset_the_pipeline_would_not_know(tmp_path):
    """An unknown `data.name` is refused as `check_config` refuses it at start (which is before
    TensorFlow loads), not after the job waited in the queue."""
    spec = JobSpec(entry="train", config=_light_config(tmp_path, 32), workdir=str(tmp_path / "w"),
                   submit_dir=str(ROOT), overrides=("--config.data.name=cifar",))
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: data: "
                                         r"name='cifar' is invalid; expected one of \['cifar10'"):
        check_configs(spec)


@pytest.mark.parametrize("overrides, message", [
    (("--config.model=resnet99",), r"config: model='resnet99' is invalid; did you mean \["),
    # lenet5_digits.py declares LeNet-5's model_kwargs; another model does not take them
    (("--config.model=resnet20_cifar", "--config.model_kwargs.activation=relu"),
     r"config: model_kwargs=\{'activation': 'relu'\} is invalid; model 'resnet20_cifar' does "
     r"not accept them"),
])
def test_check_configs_refuses_a_model_the_entry_point_would_refuse(tmp_path, overrides,
                                                                   message):
    """An unknown model name, or a model_kwargs field the model does not take, passed every
    launch check and failed at start, after the queue (review BI)."""
    spec = JobSpec(entry="train", config=str(ROOT / "experiments/configs/lenet5_digits.py"),
                   workdir=str(tmp_path / "w"), submit_dir=str(ROOT), overrides=overrides)
    check_configs(JobSpec(**{**spec.__dict__, "overrides": ()}))
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: " + message):
        check_configs(spec)


def test_check_configs_runs_the_engine_value_checks_on_every_trial(tmp_path):
    """A bad value, or a batch one trial sets that the job's GPUs cannot split, is refused at
    submission instead of failing every array task at start."""
    spec = JobSpec(entry="sweep", config=_light_config(tmp_path, 32), sweep=SWEEP,
                   workdir=str(tmp_path / "w"), nodes=1, gpus_per_node=4, submit_dir=str(ROOT))
    check_configs(spec)
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start \(in trial 0 "
                                         r".*\): optimizer: name='sgdd' is invalid"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": ("--config.optimizer.name=sgdd",)}))
    batches = ("--sweep.parameters=({'field': 'global_batch_size', 'distribution': 'choice', "
               "'values': (64, 30)},)")
    with pytest.raises(ValueError, match=r"^launch: config.global_batch_size=30 is invalid; "
                                         r"expected a multiple of the job's 4 devices .* \(in "
                                         r"trial 1 \{'global_batch_size': 30\}\)"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": (batches,)}))


def test_check_configs_refuses_a_sweep_field_the_base_config_lacks(tmp_path):
    spec = JobSpec(entry="sweep", config=_light_config(tmp_path, 32), sweep=SWEEP,
                   workdir=str(tmp_path / "w"), submit_dir=str(ROOT))
    check_configs(spec)  # the sweep varies optimizer.learning_rate, which the config has
    with pytest.raises(ValueError, match=r"sweep: parameters\['model.width'\].field"):
        check_configs(JobSpec(**{**spec.__dict__, "overrides": (
            "--sweep.parameters=({'field': 'model.width', 'distribution': 'choice', "
            "'values': (1, 2)},)",)}))


@pytest.mark.parametrize("field, value", [("optimizer.learning_rate", "0.5"),
                                          ("ema.decay", "None")])
def test_an_override_of_a_swept_field_is_refused_before_submitting(tmp_path, field, value):
    """Each array task refused `--config.<swept field>=...` at start (experiments.sweep's
    check), so the job was queued to fail; None takes the same check."""
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.metric, c.mode = 'grid', 0, 'top1', 'max'\n"
        f"    c.parameters = (choice('{field}', (0.9, 0.5)),)\n"
        "    return c\n")
    spec = JobSpec(entry="sweep", config=_light_config(tmp_path, 32), sweep=str(sweep),
                   workdir=str(tmp_path / "w"), submit_dir=str(ROOT),
                   overrides=(f"--config.{field}={value}",))
    with pytest.raises(ValueError) as caught:
        check_configs(spec)
    assert str(caught.value) == (
        f"launch: the job would fail at start: --config.{field} is invalid; the sweep "
        f"(--sweep={sweep}) sets that field in every trial; drop it (or remove it from the "
        "sweep)")
    assert not (tmp_path / "w").exists()


def test_check_configs_refuses_a_workdir_the_entry_point_would_refuse_at_start(tmp_path):
    """Each array task of a sweep queued on a folder of another sweep (an edited sweep file,
    resubmitted) exited at start; so did a train job aimed at a sweep's folder."""
    from cnnjax.tune import space as space_lib
    from cnnjax.tune.sweep import _prepare_sweep_dir

    config = _light_config(tmp_path, 32)
    workdir = tmp_path / "w"
    spec = JobSpec(entry="sweep", config=config, sweep=SWEEP, workdir=str(workdir),
                   submit_dir=str(ROOT))
    loaded = load_files(spec.files, ())
    other = space_lib.grid([space_lib.choice("optimizer.learning_rate", (0.5, 0.25))])
    _prepare_sweep_dir(str(workdir), other, loaded["config"], "top1", "max")
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: sweep: "
                                         r"sweep_dir='.*/w' holds a different search space"):
        check_configs(spec)
    with pytest.raises(ValueError, match=r"^launch: the job would fail at start: workdir='.*/w' "
                                         r"is invalid; it holds a sweep \(sweep.json\), not a "
                                         r"training run"):
        check_configs(JobSpec(entry="train", config=config, workdir=str(workdir),
                              submit_dir=str(ROOT)))
    # The same sweep's folder is a resubmission that resumes: accepted.
    _prepare_sweep_dir(str(tmp_path / "same"), space_lib.from_config(loaded["sweep"]),
                       loaded["config"], "top1", "max")
    check_configs(JobSpec(**{**spec.__dict__, "workdir": str(tmp_path / "same")}))


def test_check_configs_refuses_a_train_workdir_of_an_incompatible_config(tmp_path):
    """A train job queued on a workdir holding checkpoints of another config (here another
    learning rate) was accepted and then exited at start, after its time in the queue, with
    `holds checkpoints of an incompatible config`; it is refused before queueing, with the
    engine's own message. The same config (a resubmission that resumes) and `restart=True`
    (which empties the workdir) are accepted."""
    from cnnjax.train.config import flatten

    config = _light_config(tmp_path, 32)
    workdir = tmp_path / "w"
    spec = JobSpec(entry="train", config=config, workdir=str(workdir), submit_dir=str(ROOT))
    saved = load_files(spec.files, ())["config"]
    (workdir / "checkpoints" / "100").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(saved.to_dict()))
    assert "optimizer.learning_rate" in flatten(saved.to_dict())
    check_configs(spec)  # the same config: the job resumes
    other = JobSpec(**{**spec.__dict__, "overrides": ("--config.optimizer.learning_rate=0.5",)})
    with pytest.raises(ValueError, match=(
            r"^launch: the job would fail at start: workdir: '.*/w' holds checkpoints of an "
            r"incompatible config \(optimizer.learning_rate: 0.1 -> 0.5\); to start fresh use "
            r"a new --workdir, pass --config.restart=True, or delete the workdir.$")):
        check_configs(other)
    check_configs(JobSpec(**{**other.__dict__, "overrides": (
        "--config.optimizer.learning_rate=0.5", "--config.restart=True")}))


def _bad_metric_sweep(tmp_path):
    path = tmp_path / "bad_metric_sweep.py"
    path.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.metric, c.mode = 'grid', 0, 'accuracy', 'max'\n"
        "    c.parameters = (choice('optimizer.learning_rate', (0.01, 0.1)),)\n"
        "    return c\n")
    return str(path)


_ENTRY_CHECK_CASES = [
    ("sweep", lambda tmp: [f"--config={CONFIG}", f"--sweep={_bad_metric_sweep(tmp)}"],
     "sweep: metric='accuracy' is invalid; expected one of ['loss', 'top1', 'top5']"),
    ("sweep", lambda tmp: [f"--config={CONFIG}", f"--sweep={SWEEP}", "--",
                           "--sweep.mode=maximize"],
     "sweep: mode='maximize' is invalid; expected one of ['max', 'min']"),
    ("tune", lambda tmp: [f"--config={CONFIG}", f"--recipe={RECIPE}", "--",
                          "--recipe.lr_min=2.0"],
     "recipe: lr_min=2.0 is invalid; expected lr_min < lr_max (lr_max=1.0)"),
    ("tune", lambda tmp: [f"--config={CONFIG}", f"--recipe={RECIPE}", "--",
                          "--recipe.regularizers=foo"],
     "recipe: regularizers='foo' is invalid; expected one of ['weight_decay',"),
    ("tune", lambda tmp: [f"--config={CONFIG}", f"--recipe={RECIPE}", "--",
                          "--recipe.metric=map50"],
     "recipe: metric='map50' is invalid; expected one of ['loss', 'top1', 'top5']"),
    ("transfer", lambda tmp: [f"--transfer={TRANSFER}", "--",
                              "--transfer.arms=('scratch','bogus')"],
     "transfer: arms=('scratch', 'bogus') is invalid; expected a non-empty list of distinct "
     "arms from ['scratch', 'finetune', 'linear_probe']"),
    ("transfer", lambda tmp: [f"--transfer={TRANSFER}", "--", "--transfer.seeds=(0, 0)"],
     "transfer: seeds=(0, 0) is invalid; expected a non-empty list of distinct integers"),
]


def test_the_entry_points_own_checks_refuse_a_job_before_it_is_queued(tmp_path):
    """A sweep's metric/mode, a tune's recipe and a transfer's arms/seeds are checked as the
    entry point checks them, so a job that would fail at start is never queued."""
    # one interpreter forking a child per command (tests/commands.py), the entry points'
    # modules imported once: 7 process starts importing JAX and the tune/transfer code cost
    # ~60 s of a cold 2-core run more
    bin_dir = stand_in_slurm(tmp_path / "bin")
    workdirs = [tmp_path / f"w{i}" for i in range(len(_ENTRY_CHECK_CASES))]
    results = run_commands(
        [("launch.submit", f"--entry={entry}", f"--workdir={workdir}", "--dry_run",
          *args(tmp_path))
         for (entry, args, _), workdir in zip(_ENTRY_CHECK_CASES, workdirs, strict=True)],
        env=path_with(bin_dir) | {"PYTHONPATH": str(ROOT)},
        preimport=["cnnjax.tune.recipe", "cnnjax.transfer.compare"])
    for (entry, _, message), workdir, result in zip(_ENTRY_CHECK_CASES, workdirs, results,
                                                    strict=True):
        assert result.returncode == 1, (entry, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"error: launch: the job would fail at start: {message}"), (
            errors[0])
        assert "Traceback" not in result.stderr and not result.stdout
        assert not workdir.exists()
    assert not (bin_dir / "sbatch.calls").exists()


def test_a_config_argument_reaches_the_checks_and_the_script(tmp_path):
    """`--config=<file>.py:<argument>` is loaded with its argument before queueing (here the
    argument sets a batch the job's 8 devices cannot split) and passed on in the script."""
    path = tmp_path / "light_arg.py"
    path.write_text(
        "from cnnjax.train.config import default_config\n\n\ndef get_config(batch='32'):\n"
        "    config = default_config()\n"
        "    config.model = 'lenet5'\n"
        "    config.global_batch_size = int(batch)\n"
        "    return config\n")
    spec = JobSpec(entry="train", config=f"{path}:36", workdir=str(tmp_path / "w"), nodes=2,
                   gpus_per_node=4, submit_dir=str(ROOT))
    with pytest.raises(ValueError, match=r"config.global_batch_size=36 is invalid; expected a "
                                         r"multiple of the job's 8 devices"):
        check_configs(spec)
    check_configs(JobSpec(**{**spec.__dict__, "config": f"{path}:64"}))
    result = _submit(tmp_path, "--entry=train", f"--config={path}:64",
                     f"--workdir={tmp_path / 'run'}", "--nodes=2", "--gpus_per_node=4",
                     "--dry_run")
    assert result.returncode == 0, result.stderr
    assert f"    --config={path}:64 \\\n" in result.stdout


def test_a_config_files_own_error_is_one_line_naming_the_file():
    """A `get_config(<argument>)` that raises is reported as the entry point reports it, not as
    `overrides=[] is invalid` over ml_collections' flattened traceback."""
    config = str(ROOT / "experiments" / "configs" / "rcnn_shapes.py")
    spec = JobSpec(entry="train", config=f"{config}:bogus", workdir="w", submit_dir=str(ROOT))
    with pytest.raises(ValueError) as caught:
        check_configs(spec)
    assert str(caught.value) == (
        f"launch: --config='{config}:bogus' is invalid; config: argument='bogus' is invalid; "
        "expected one of ['windows', 'selective_search'].")


def test_a_sweep_over_a_field_the_optimizer_ignores_is_refused_before_submitting(tmp_path):
    """Sweeping adam's momentum would queue an array job of identical trainings."""
    path = tmp_path / "momentum_sweep.py"
    path.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.metric, c.mode = 'grid', 0, 'top1', 'max'\n"
        "    c.parameters = (choice('optimizer.momentum', (0.5, 0.9)),)\n"
        "    return c\n")
    refused = _submit(tmp_path, "--entry=sweep", f"--config={CONFIG}", f"--sweep={path}",
                      f"--workdir={tmp_path / 'sweep'}", "--dry_run", "--",
                      "--config.optimizer.name=adam")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: launch: the job would fail at start: sweep: parameters='optimizer.momentum' "
        "is invalid; expected a field some trial "
        "reads: optimizer 'adam' does not read it (only 'sgd' and 'rmsprop' do), so every trial "
        "would train alike; sweep a field the chosen optimizer and schedule read, or sweep "
        "optimizer.name / schedule.name with it.")
    assert "#SBATCH" not in refused.stdout and not (tmp_path / "sweep").exists()
