"""`cnnjax.launch.slurm.render`: the exact directives and command per entry point, bash-valid
scripts, arguments that reach the program byte for byte, and the preemption handling (USR1 ->
stop the step, `scontrol requeue`, at most max_requeues times; TERM -> stop, no requeue), run with
stand-in `srun`/`scontrol` and a stand-in program instead of Python."""

import dataclasses
import os
import shutil
import signal
import subprocess
import time

import pytest

from cnnjax.launch.slurm import command, render
from cnnjax.launch.spec import JobSpec, validate_spec
from tests.launch.conftest import (
    CONFIG,
    RECIPE,
    ROOT,
    SWEEP,
    TRANSFER,
    path_with,
    stand_in_slurm,
    write_executable,
)

AWKWARD = (
    "--config.data.train_split=train[:10%]",
    "--config.name=two words",
    "--config.note=it's \"quoted\" $HOME `date` \\ back;slash && echo pwned",
    "--config.schedule.boundaries=(100, 200)",
    "--config.empty=",
    "--config.glob=*",
)


def _directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_train_directives_and_command(tmp_path):
    spec = validate_spec(JobSpec(
        entry="train", config=CONFIG, workdir=str(tmp_path / "run"), nodes=2, gpus_per_node=4,
        cpus_per_task=6, mem="64G", time="1-00:00:00", partition="gpu", account="proj",
        qos="high", constraint="a100&ib", signal_seconds=600, max_requeues=2,
        overrides=("--config.optimizer.learning_rate=0.05", "--distributed_timeout=600"),
        submit_dir=str(ROOT)))
    script = render(spec)
    wd = tmp_path / "run"
    assert _directives(script) == [
        "--job-name=cnnjax-train-run", f"--chdir={ROOT}", f"--output={wd}/slurm/%x-%j.out",
        "--open-mode=append", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
        "--cpus-per-task=6", "--mem=64G", "--time=1-00:00:00", "--partition=gpu",
        "--account=proj", "--qos=high", "--constraint=a100&ib", "--requeue",
        "--signal=B:USR1@600",
    ]
    assert (f"srun --cpus-per-task=6 --kill-on-bad-exit=1 python -m experiments.train \\\n"
            f"    --config={CONFIG} "
            f"\\\n    --workdir={wd} \\\n    --config.optimizer.learning_rate=0.05 \\\n"
            "    --distributed_timeout=600 &\n") in script
    assert f"source {ROOT}/.venv/bin/activate\n" in script
    assert "MAX_REQUEUES=2\n" in script
    assert f"export JAX_COMPILATION_CACHE_DIR=${{JAX_COMPILATION_CACHE_DIR:-{wd}/jax_cache}}" \
        in script
    assert "--array" not in script


def test_sweep_is_an_array_job_with_one_trial_per_task(tmp_path):
    wd = tmp_path / "sweep"
    spec = validate_spec(JobSpec(entry="sweep", config=CONFIG, sweep=SWEEP, workdir=str(wd),
                                 gpus_per_node=1, max_parallel=2, submit_dir=str(ROOT)),
                         num_trials=4)
    script = render(spec, num_trials=4)
    assert _directives(script) == [
        "--job-name=cnnjax-sweep-sweep", f"--chdir={ROOT}", f"--output={wd}/slurm/%x-%A_%a.out",
        "--open-mode=append", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
        "--cpus-per-task=8", "--time=04:00:00", "--array=0-3%2", "--requeue",
        "--signal=B:USR1@300",
    ]
    assert (f"srun --cpus-per-task=8 python -m experiments.sweep \\\n    --config={CONFIG} \\\n"
            f"    --sweep={SWEEP}"
            f' \\\n    --sweep_dir={wd} \\\n    --trial_index="$SLURM_ARRAY_TASK_ID" &\n') in script
    subset = dataclasses.replace(spec, array="1,3", max_parallel=None)
    assert "#SBATCH --array=1,3\n" in render(subset, num_trials=4)
    with pytest.raises(ValueError, match="num_trials is needed"):
        render(spec)


def test_a_sweep_task_may_run_several_consecutive_trials(tmp_path):
    """trials_per_task=3 over 7 trials: 3 array tasks, task i starting at trial 3i."""
    wd = tmp_path / "sweep"
    spec = validate_spec(JobSpec(entry="sweep", config=CONFIG, sweep=SWEEP, workdir=str(wd),
                                 trials_per_task=3, submit_dir=str(ROOT)), num_trials=7)
    script = render(spec, num_trials=7)
    assert "#SBATCH --array=0-2\n" in script
    assert (f' \\\n    --sweep_dir={wd} \\\n'
            '    --trial_index="$((SLURM_ARRAY_TASK_ID * 3))" \\\n'
            '    --trial_count=3 &\n') in script
    start = subprocess.run(["bash", "-c", 'echo "$((SLURM_ARRAY_TASK_ID * 3))"'],
                           env={"SLURM_ARRAY_TASK_ID": "2"}, capture_output=True, text=True)
    assert start.stdout == "6\n"  # the last task runs trial 6 alone (trial_count stops at 7)


@pytest.mark.parametrize("entry,files,module,dir_flag", [
    ("tune", {"config": CONFIG, "recipe": RECIPE}, "experiments.tune", "tune_dir"),
    ("transfer", {"transfer": TRANSFER}, "experiments.transfer", "transfer_dir"),
])
def test_tune_and_transfer_run_one_process(tmp_path, entry, files, module, dir_flag):
    wd = tmp_path / entry
    spec = validate_spec(JobSpec(entry=entry, workdir=str(wd), gpus_per_node=2, venv=None,
                                 time="90", submit_dir=str(ROOT), **files))
    script = render(spec)
    assert _directives(script) == [
        f"--job-name=cnnjax-{entry}-{entry}", f"--chdir={ROOT}", f"--output={wd}/slurm/%x-%j.out",
        "--open-mode=append", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=2",
        "--cpus-per-task=8", "--time=90", "--requeue", "--signal=B:USR1@300",
    ]
    flags = " \\\n    ".join(f"--{k}={v}" for k, v in files.items())
    assert (f"srun --cpus-per-task=8 python -m {module} \\\n    {flags} \\\n"
            f"    --{dir_flag}={wd} &\n") in script
    assert "activate" not in script


def test_cpu_only_job_asks_for_no_gpus(tmp_path):
    spec = validate_spec(JobSpec(entry="train", config=CONFIG, workdir=str(tmp_path),
                                 gpus_per_node=0, nodes=2, submit_dir=str(ROOT)))
    directives = _directives(render(spec))
    assert "--ntasks-per-node=1" in directives
    assert not any(d.startswith("--gpus") for d in directives)


def test_environment_and_setup_lines(tmp_path):
    spec = validate_spec(JobSpec(
        entry="train", config=CONFIG, workdir=str(tmp_path), submit_dir=str(ROOT),
        env=(("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true"),
             ("NOTE", "a b'c")), setup=("module load cuda/12.4",)))
    script = render(spec)
    lines = script.splitlines()
    assert lines.index("module load cuda/12.4") < lines.index(f"source {ROOT}/.venv/bin/activate")
    assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in lines
    assert "export NOTE='a b'\"'\"'c'" in lines
    assert lines.index("export PYTHONUNBUFFERED=1") < lines.index("export NOTE='a b'\"'\"'c'")


def _stand_in_program(tmp_path):
    """A 'python' that records its arguments (NUL-separated), then works until TERM."""
    return write_executable(tmp_path / "fake_python", (
        "#!/usr/bin/env bash\n"
        f'printf "%s\\0" "$@" > {tmp_path}/args\n'
        f"trap 'echo TERM >> {tmp_path}/program.log; exit 143' TERM\n"
        f"echo started >> {tmp_path}/program.log\n"
        'if [ -n "${FAKE_WORK:-}" ]; then for _ in $(seq 600); do sleep 0.05; done; fi\n'))


def _program_answering_term(tmp_path, on_term: str):
    """Replaces `_job`'s 'python' with one that runs `on_term` (shell) on TERM, else works ~30 s;
    each line it logs goes to program.log."""
    write_executable(tmp_path / "fake_python", (
        "#!/usr/bin/env bash\n"
        f"trap '{on_term}' TERM\n"
        f"echo started >> {tmp_path}/program.log\n"
        "for _ in $(seq 600); do sleep 0.05; done\n"))


def _job(tmp_path, entry="train", **kw):
    files = {"train": {"config": CONFIG}, "sweep": {"config": CONFIG, "sweep": SWEEP}}[entry]
    spec = validate_spec(JobSpec(entry=entry, workdir=str(tmp_path / "wd"), venv=None,
                                 python=str(_stand_in_program(tmp_path)), submit_dir=str(ROOT),
                                 **files, **kw), num_trials=4 if entry == "sweep" else None)
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec, num_trials=4 if entry == "sweep" else None))
    return spec, script


def test_generated_scripts_are_valid_bash(tmp_path):
    for entry in ("train", "sweep"):
        _, script = _job(tmp_path, entry, overrides=AWKWARD)
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_awkward_overrides_reach_the_program_verbatim(tmp_path):
    spec, script = _job(tmp_path, "sweep", overrides=AWKWARD)
    bin_dir = stand_in_slurm(tmp_path / "bin")
    # As SLURM sets them for task 2 of array job 5 (events name `5_2`, the id squeue shows)
    env = path_with(bin_dir) | {"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5",
                                "SLURM_ARRAY_TASK_ID": "2"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    assert args == command(spec)[1:] + ["--trial_index=2"]
    assert args[-7:-1] == list(AWKWARD)
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text().splitlines()
    assert events[0].endswith("job 5_2: started on " + os.uname().nodename + " (restart 0)")
    assert events[1].endswith("job 5_2: finished with exit status 0")


def test_config_and_venv_paths_with_spaces_and_quotes_reach_the_job_verbatim(tmp_path):
    """Config files and the venv are not in #SBATCH lines, so their paths may hold what those
    cannot: the script quotes them, sources that venv and passes the paths byte for byte."""
    awkward = tmp_path / "my configs 'q' \"dq\" $HOME `id` %j #1 back\\slash;&*"
    (awkward / "venv" / "bin").mkdir(parents=True)
    activated = tmp_path / "activated"
    (awkward / "venv" / "bin" / "activate").write_text(
        f'printf "%s" "${{BASH_SOURCE[0]}}" > {activated}\n')
    shutil.copy(CONFIG, awkward / "c.py")
    shutil.copy(SWEEP, awkward / "s.py")
    spec = validate_spec(JobSpec(
        entry="sweep", workdir=str(tmp_path / "wd"), config=str(awkward / "c.py"),
        sweep=str(awkward / "s.py"), venv=str(awkward / "venv"),
        python=str(_stand_in_program(tmp_path)), submit_dir=str(ROOT)), num_trials=4)
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec, num_trials=4))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert all("configs" not in line for line in _directives(script.read_text()))
    env = path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_ARRAY_JOB_ID": "5",
                                                         "SLURM_ARRAY_TASK_ID": "1"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert activated.read_text() == str(awkward / "venv" / "bin" / "activate")
    args = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    assert args[:4] == ["-m", "experiments.sweep", f"--config={awkward}/c.py",
                        f"--sweep={awkward}/s.py"]
    assert args == command(spec)[1:] + ["--trial_index=1"]


def _usr1_job(restarts):
    def prepare(tmp_path):
        _, script = _job(tmp_path, max_requeues=3)
        env = path_with(stand_in_slurm(tmp_path / "bin")) | {
            "SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": str(restarts)}
        return script, env, signal.SIGUSR1
    return prepare


def _usr1_during_setup(tmp_path):
    _, script = _job(tmp_path, setup=(f"touch {tmp_path / 'setup.started'}", "sleep 2"))
    return script, path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "99"}, \
        signal.SIGUSR1


def _term_as_slurm_requeues(when):
    def prepare(tmp_path):
        _, script = _job(tmp_path, max_requeues=3)
        bin_dir = stand_in_slurm(tmp_path / "bin")
        term = "kill -TERM $PPID" if when != "after" else "(sleep 0.2; kill -TERM $PPID) &"
        write_executable(bin_dir / "scontrol",
                         f'#!/usr/bin/env bash\necho "$@" >> {bin_dir}/scontrol.calls\n{term}\n')
        return script, path_with(bin_dir) | {"SLURM_JOB_ID": "99"}, signal.SIGUSR1
    return prepare


_ARRAY_ENVS = [
    # SLURM's environment of the array's first task: its job id is the array job id, which
    # scancel/scontrol read as every task of the array.
    ({"SLURM_JOB_ID": "36", "SLURM_ARRAY_JOB_ID": "36", "SLURM_ARRAY_TASK_ID": "0"}, "36_0"),
    ({"SLURM_JOB_ID": "38", "SLURM_ARRAY_JOB_ID": "36", "SLURM_ARRAY_TASK_ID": "2"}, "36_2"),
    ({"SLURM_JOB_ID": "38"}, "38"),  # not an array: the job id
]


def _usr1_array_task(array_env):
    def prepare(tmp_path):
        entry = "sweep" if "SLURM_ARRAY_JOB_ID" in array_env else "train"
        _, script = _job(tmp_path, entry)
        return script, path_with(stand_in_slurm(tmp_path / "bin")) | array_env, signal.SIGUSR1
    return prepare


def _term(tmp_path):
    _, script = _job(tmp_path)
    return script, path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "5"}, \
        signal.SIGTERM


def _step_ending_by_itself(status):
    def prepare(tmp_path):
        _, script = _job(tmp_path)
        _program_answering_term(tmp_path, f"echo TERM >> {tmp_path}/program.log; exit {status}")
        env = path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "6"}
        return script, env, signal.SIGUSR1
    return prepare


def _failing_requeue(tmp_path):
    _, script = _job(tmp_path)
    bin_dir = stand_in_slurm(tmp_path / "bin")
    write_executable(bin_dir / "scontrol", "#!/usr/bin/env bash\nexit 1\n")
    return script, path_with(bin_dir) | {"SLURM_JOB_ID": "5"}, signal.SIGUSR1


def _step_ignoring_term(tmp_path):
    _, script = _job(tmp_path, signal_seconds=2, time="1")
    _program_answering_term(tmp_path, f"echo TERM ignored >> {tmp_path}/program.log")
    env = path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "8"}
    return script, env, signal.SIGUSR1


# The signalled jobs of the tests below, each `prepare(tmp_path) -> (script, env, signal)`: the
# signal goes to the batch shell once the program started ("during_setup": once its setup did,
# within the setup's 2 s sleep; it runs first for that reason)
_SIGNALLED = {
    "during_setup": _usr1_during_setup,
    **{f"usr1_restarts{r}": _usr1_job(r) for r in (0, 2, 3)},
    **{f"term_as_requeued_{w}": _term_as_slurm_requeues(w)
       for w in ("before scontrol returns", "after")},
    **{f"array{i}": _usr1_array_task(array_env) for i, (array_env, _) in enumerate(_ARRAY_ENVS)},
    "term": _term,
    **{f"ends_by_itself{s}": _step_ending_by_itself(s) for s in (0, 1)},
    "failed_requeue": _failing_requeue,
    "ignores_term": _step_ignoring_term,
}


def _started(case: str, tmp_path) -> bool:
    if case == "during_setup":
        return (tmp_path / "setup.started").exists()
    log = tmp_path / "program.log"
    return log.exists() and "started" in log.read_text()


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict:
    """{case: (tmp_path, returncode, stderr)} of the jobs of `_SIGNALLED`, run side by side:
    each spends >= 1 s in the script's stop loop (its `sleep 1`), ~17 s one after another."""
    jobs = {}
    for case, prepare in _SIGNALLED.items():
        tmp_path = tmp_path_factory.mktemp(case.replace(" ", "_"))
        script, env, sig = prepare(tmp_path)
        if case != "during_setup":
            env |= {"FAKE_WORK": "1"}
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        jobs[case] = tmp_path, proc, sig
    for case, (tmp_path, proc, sig) in jobs.items():
        deadline = time.monotonic() + 30
        while not _started(case, tmp_path):
            assert time.monotonic() < deadline and proc.poll() is None, (case,
                                                                          proc.communicate())
            time.sleep(0.02)
        proc.send_signal(sig)
    ended = {case: (tmp_path, proc.communicate(timeout=30)[1])
             for case, (tmp_path, proc, _) in jobs.items()}
    time.sleep(0.3)  # a late TERM (as SLURM requeues), if a shell were still there to log it
    return {case: (tmp_path, jobs[case][1].returncode, stderr)
            for case, (tmp_path, stderr) in ended.items()}


@pytest.mark.parametrize("restarts,requeued", [(0, True), (2, True), (3, False)])
def test_usr1_stops_the_step_and_requeues_at_most_max_requeues_times(signalled, restarts,
                                                                     requeued):
    """USR1 stops the step (TERM) and requeues the job while it was requeued fewer than
    max_requeues=3 times."""
    tmp_path, returncode, stderr = signalled[f"usr1_restarts{restarts}"]
    bin_dir = tmp_path / "bin"
    assert (tmp_path / "program.log").read_text() == "started\nTERM\n"  # the step was stopped
    calls = bin_dir / "scontrol.calls"
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text()
    assert "USR1: time limit or preemption ahead; stopping the job step" in events
    if requeued:
        assert returncode == 0, stderr
        assert calls.read_text() == "requeue 99\n"
        assert f"requeued (restart {restarts + 1} of at most 3); the rerun resumes" in events
    else:
        assert returncode == 1
        assert not calls.exists()
        assert ("not requeued: already requeued 3 time(s) (max_requeues=3); resubmit the same "
                "job to continue from the newest checkpoint") in events
    assert "finished with exit status" not in events


def test_usr1_during_the_site_setup_requeues_the_job(signalled):
    """The traps were installed after the setup lines: a USR1 during a slow `module load`
    killed the batch shell (exit 138), unrequeued, with nothing in events.log."""
    tmp_path, returncode, stderr = signalled["during_setup"]
    assert returncode == 0, stderr
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == "requeue 99\n"
    assert not (tmp_path / "program.log").exists()  # the program never started
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text()
    assert "USR1: time limit or preemption ahead" in events and "requeued (restart 1" in events


@pytest.mark.parametrize("when", ["before scontrol returns", "after"])
def test_the_term_slurm_sends_as_it_requeues_is_not_a_cancellation(signalled, when):
    """Real SLURM (slurm-wlm 22.05, launch/local_slurm.sh) TERMs the batch shell as it requeues
    the job, often before `scontrol requeue` returns: events.log ended "TERM (scancel or
    preemption without requeue) ... not requeued" for a job that was requeued."""
    tmp_path, returncode, stderr = signalled[f"term_as_requeued_{when}"]
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text()
    assert returncode == 0, stderr
    assert events.count("requeued (restart 1 of at most 3); the rerun resumes") == 1, events
    assert "not requeued" not in events


@pytest.mark.parametrize("case,ref", [(f"array{i}", ref) for i, (_, ref) in enumerate(_ARRAY_ENVS)],
                         ids=[ref for _, ref in _ARRAY_ENVS])
def test_usr1_stops_and_requeues_only_this_array_task(signalled, case, ref):
    """scancel and scontrol name the array task (`<array job>_<task>`), not the array job."""
    tmp_path, returncode, stderr = signalled[case]
    assert returncode == 0, stderr
    assert (tmp_path / "bin" / "scancel.calls").read_text() == f"--signal=TERM {ref}\n"
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == f"requeue {ref}\n"


def test_term_stops_the_step_without_requeueing(signalled):
    """The script cannot tell a cancellation from a preemption SLURM requeues itself
    (PreemptMode=REQUEUE): events.log said "not requeued" for both."""
    tmp_path, returncode, _ = signalled["term"]
    assert returncode == 143
    assert (tmp_path / "program.log").read_text() == "started\nTERM\n"
    assert not (tmp_path / "bin" / "scontrol.calls").exists()
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text()
    assert ("job 5: TERM (scancel or preemption): stopping the job step; this script does not "
            "requeue (SLURM does where the job's preemption mode requeues it)\n") in events
    assert "not requeued" not in events


@pytest.mark.parametrize("status", [0, 1])
def test_a_step_that_ends_by_itself_during_the_stop_is_not_requeued(signalled, status):
    """A step that finished (0) or failed (1) while USR1 stopped it, rather than stopping on
    the TERM (143), was requeued all the same: a finished run reran, a broken one looped."""
    tmp_path, returncode, stderr = signalled[f"ends_by_itself{status}"]
    assert returncode == status, stderr
    assert (tmp_path / "program.log").read_text() == "started\nTERM\n"
    assert not (tmp_path / "bin" / "scontrol.calls").exists()
    events = (tmp_path / "wd" / "slurm" / "events.log").read_text()
    assert (f"job 6: the job step ended by itself (exit status {status}: finished or failed, "
            "not stopped by the signal); not requeued\n") in events
    assert "requeued (restart" not in events


def test_failed_requeue_is_reported(signalled):
    """A failing `scontrol requeue` is an error in events.log saying how to resume."""
    tmp_path, returncode, _ = signalled["failed_requeue"]
    assert returncode == 1
    assert "scontrol requeue 5 failed; resubmit the same job to resume" in \
        (tmp_path / "wd" / "slurm" / "events.log").read_text()


def test_program_exit_status_is_the_job_status(tmp_path):
    _, script = _job(tmp_path)
    write_executable(tmp_path / "fake_python", "#!/usr/bin/env bash\nexit 3\n")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                            env=path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "1"})
    assert result.returncode == 3
    assert "finished with exit status 3" in (tmp_path / "wd" / "slurm" / "events.log").read_text()


def test_a_step_that_ignores_term_is_killed_after_the_grace_period(signalled):
    """A process stuck (e.g. in a collective) must not hold up the requeue past the time limit:
    with signal_seconds=2 the grace is 1 s, then SIGKILL, then the requeue."""
    tmp_path, returncode, _ = signalled["ignores_term"]
    assert returncode == 0
    assert (tmp_path / "program.log").read_text() == "started\nTERM ignored\n"
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == "requeue 8\n"
    assert "STOP_GRACE_SECONDS=1\n" in (tmp_path / "job.sbatch").read_text()


def test_site_setup_may_read_unset_variables_but_the_job_body_may_not(tmp_path):
    """`module load` scripts often read unset variables: `set -u` starts after the setup lines,
    and still guards the job's own lines."""
    _, script = _job(tmp_path, setup=('echo "module path: ${SITE_MODULEPATH_UNSET}"',))
    lines = script.read_text().splitlines()
    assert lines.index("set -u") > lines.index('echo "module path: ${SITE_MODULEPATH_UNSET}"')
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                            env=path_with(stand_in_slurm(tmp_path / "bin")) | {"SLURM_JOB_ID": "1"})
    assert result.returncode == 0, result.stderr
    assert "finished with exit status 0" in (tmp_path / "wd" / "slurm" / "events.log").read_text()
