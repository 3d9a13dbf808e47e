"""The whole path on one machine: `launch.submit` writes the job (stand-in `sbatch`), the
generated script runs real LeNet-5/digits training through a stand-in `srun`, and a simulated
preemption (USR1 to the batch shell, as `--signal=B:USR1@...` sends it) stops the run, requeues
it through a stand-in `scontrol`, and the requeued run resumes from the checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.conftest import CONFIG, ROOT, own_project, path_with, stand_in_slurm

TINY = ["--config.global_batch_size=16", "--config.progress_bar=False",
        "--config.schedule.warmup_steps=1"]


def _env(bin_dir, **slurm):
    env = path_with(bin_dir) | {"JAX_PLATFORMS": "cpu"}
    env.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    return env | {k: str(v) for k, v in slurm.items()}


def _submit(tmp_path, workdir, *overrides):
    bin_dir = stand_in_slurm(tmp_path / "bin")
    result = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--entry=train", f"--config={CONFIG}",
         f"--workdir={workdir}", "--gpus_per_node=0", "--time=30", "--signal_seconds=60",
         "--", *TINY, *overrides],
        cwd=ROOT, env=_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return bin_dir, workdir / "slurm" / "job.sbatch"


def _summary(workdir):
    with open(workdir / "summary.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_submitted_script_trains_lenet_for_three_steps(tmp_path):
    workdir = tmp_path / "lenet"
    bin_dir, script = _submit(tmp_path, workdir, "--config.num_train_steps=3",
                              "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3")
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env=_env(bin_dir, SLURM_JOB_ID=4242), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(workdir)
    assert (summary["status"], summary["step"]) == ("completed", 3)
    events = (workdir / "slurm" / "events.log").read_text().splitlines()
    assert [e.split(": ", 1)[1] for e in events] == [
        f"started on {os.uname().nodename} (restart 0)", "finished with exit status 0"]
    assert not (bin_dir / "scontrol.calls").exists()


@pytest.mark.slow
def test_a_config_importing_a_package_from_the_submit_directory_trains_in_the_job(tmp_path):
    """Submitted from a project directory whose config file imports the project's own package
    (found there, as the check found it), the job, which runs in the repository, trains: it
    failed at start with `ModuleNotFoundError: No module named 'mypkg'`. The step count is
    mypkg's, so the job imported that package."""
    project = own_project(tmp_path / "project", num_train_steps=2)
    bin_dir = stand_in_slurm(tmp_path / "bin")
    workdir = tmp_path / "own"
    submitted = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--entry=train", "--config=cfg.py",
         f"--workdir={workdir}", "--gpus_per_node=0", "--time=30", "--signal_seconds=60"],
        cwd=project, env=_env(bin_dir) | {"PYTHONPATH": str(ROOT)},  # this checkout's launcher
        capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    result = subprocess.run(["bash", str(workdir / "slurm" / "job.sbatch")], cwd=tmp_path,
                            capture_output=True, text=True, env=_env(bin_dir, SLURM_JOB_ID=5),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(workdir)
    assert (summary["status"], summary["step"]) == ("completed", 2)


@pytest.mark.slow
def test_preempted_job_requeues_itself_and_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "preempted"
    bin_dir, script = _submit(tmp_path, workdir, "--config.num_train_steps=400",
                              "--config.checkpoint_every_steps=10",
                              "--config.eval_every_steps=400")
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_env(bin_dir, SLURM_JOB_ID=77))
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(n.isdigit() for n in os.listdir(checkpoints))):
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell before the time limit
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    assert (bin_dir / "scontrol.calls").read_text() == "requeue 77\n"
    assert (bin_dir / "scancel.calls").read_text() == "--signal=TERM 77\n"
    # The tasks got the TERM (not srun's SIGKILL): the stop step is checkpointed and recorded.
    stopped = _summary(workdir)
    assert stopped["status"] == "interrupted", stopped
    assert str(stopped["step"]) in os.listdir(checkpoints)

    # SLURM reruns the same script in the requeued job, with SLURM_RESTART_COUNT=1
    rerun = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                           env=_env(bin_dir, SLURM_JOB_ID=77, SLURM_RESTART_COUNT=1), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = _summary(workdir)
    assert (summary["status"], summary["step"]) == ("completed", 400)
    assert summary["resumed_from_step"] == stopped["step"]  # nothing lost
    events = [e.split(": ", 1)[1] for e in
              (workdir / "slurm" / "events.log").read_text().splitlines()]
    assert events == [
        f"started on {os.uname().nodename} (restart 0)",
        "USR1: time limit or preemption ahead; stopping the job step",
        "requeued (restart 1 of at most 3); the rerun resumes",
        f"started on {os.uname().nodename} (restart 1)",
        "finished with exit status 0",
    ]


@pytest.mark.slow  # 34 s in CI; test_slurm.py checks the script's trial arithmetic unrun
def test_a_sweep_array_task_runs_its_consecutive_trials(tmp_path):
    """`--trials_per_task=2` over the 4-trial LeNet sweep: the generated script, run as array
    task 1, trains trials 2 and 3 (only them) and answers for them in its exit status."""
    from tests.launch.conftest import SWEEP

    bin_dir = stand_in_slurm(tmp_path / "bin")
    sweep_dir = tmp_path / "sweep"
    submitted = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--entry=sweep", f"--config={CONFIG}",
         f"--sweep={SWEEP}", f"--workdir={sweep_dir}", "--gpus_per_node=0",
         "--trials_per_task=2", "--time=30", "--signal_seconds=60", "--", *TINY,
         "--config.num_train_steps=2", "--config.eval_every_steps=2"],
        cwd=ROOT, env=_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "(4 trials, 2 per array task, 2 tasks)" in submitted.stdout
    script = sweep_dir / "slurm" / "job.sbatch"
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env=_env(bin_dir, SLURM_JOB_ID=4243, SLURM_ARRAY_TASK_ID=1),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep_dir / "results.json") as f:
        statuses = {r["index"]: r["status"] for r in json.load(f)["trials"]}
    assert statuses == {0: "pending", 1: "pending", 2: "completed", 3: "completed"}
