"""The hand-written examples `launch/sbatch_{train,sweep,tune}.sh`, run with a stand-in `srun`:
the command they start, and the CPUs their job step gets; `launch/local_slurm.sh`'s checks
where SLURM is missing or refuses a job."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import (
    CONFIG,
    RECIPE,
    ROOT,
    SWEEP,
    path_with,
    stand_in_slurm,
    write_executable,
)

SCRIPTS = {
    "train": (["work"], {}, "experiments.train",
              ["--config=" + CONFIG, "--workdir=work"]),
    "sweep": ([SWEEP, "sweep"], {"SLURM_ARRAY_TASK_ID": "3"}, "experiments.sweep",
              ["--config=" + CONFIG, "--sweep=" + SWEEP, "--sweep_dir=sweep",
               "--trial_index=3"]),
    "tune": ([RECIPE, "tune"], {}, "experiments.tune",
             ["--config=" + CONFIG, "--recipe=" + RECIPE, "--tune_dir=tune"]),
}


@pytest.mark.parametrize("entry", sorted(SCRIPTS))
def test_the_job_step_gets_the_jobs_cpus_per_task(tmp_path: Path, entry):
    """srun of SLURM 22.05-23.02 does not inherit sbatch's --cpus-per-task (its release notes:
    "srun will no longer read in SLURM_CPUS_PER_TASK ... set the new SRUN_CPUS_PER_TASK"), so
    these scripts' steps ran on one CPU, starving the input pipeline; the launcher's scripts pass
    it to srun already."""
    args, env, module, flags = SCRIPTS[entry]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", (
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "${{SRUN_CPUS_PER_TASK:-unset}}" > {tmp_path}/cpus\n'
        'while [[ "${1:-}" == --* ]]; do shift; done  # srun options\n'
        f'printf "%s\\0" "$@" > {tmp_path}/args\n'))
    env = path_with(bin_dir) | env | {"SLURM_CPUS_PER_TASK": "6", "PYTHON": "py",
                                      "SLURM_SUBMIT_DIR": str(ROOT)}
    script = ROOT / "launch" / f"sbatch_{entry}.sh"
    result = subprocess.run(["bash", str(script), CONFIG, *args, "--config.x=a b"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cpus").read_text() == "6\n"
    assert (tmp_path / "args").read_bytes().decode().split("\0")[:-1] == [
        "py", "-m", module, *flags, "--config.x=a b"]


def test_outside_a_job_srun_keeps_its_own_default(tmp_path: Path):
    """No SLURM_CPUS_PER_TASK (sbatch without --cpus-per-task): SRUN_CPUS_PER_TASK stays unset."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", (
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "${{SRUN_CPUS_PER_TASK-unset}}" > {tmp_path}/cpus\n'))
    env = path_with(bin_dir) | {"PYTHON": "py", "SLURM_SUBMIT_DIR": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "sbatch_train.sh"), CONFIG, "w"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cpus").read_text() == "unset\n"


def test_local_slurm_checks_without_slurm_say_so(tmp_path: Path):
    """`launch/local_slurm.sh check` before `start` (no SLURM commands) exited 1 without a word:
    launch.submit's error was sent to /dev/null. It names the missing command and `start`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    for command in ("check", "time_limit", "two_node"):
        result = subprocess.run(
            [shutil.which("bash"), str(ROOT / "launch" / "local_slurm.sh"), command],
            env={"PATH": str(bin_dir), "OUT": str(tmp_path / "out")}, capture_output=True,
            text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"error: local_slurm.sh {command}: sbatch is not on the PATH; start SLURM first "
            "(sudo launch/local_slurm.sh start, or start_two_node for two_node)"]
        assert not (tmp_path / "out").exists()


def _local_slurm_check_with_no_job_queued(tmp_path: Path, sbatch_fails: bool = False,
                                          ) -> subprocess.CompletedProcess:
    """`local_slurm.sh check` against the stand-in SLURM, its squeue listing no job (and its
    sbatch refusing every submission when `sbatch_fails`), writing under `tmp_path/out`."""
    bin_dir = stand_in_slurm(tmp_path / "bin")
    if sbatch_fails:
        (bin_dir / "sbatch.fail").touch()
    write_executable(bin_dir / "squeue", "#!/usr/bin/env bash\n")
    env = path_with(bin_dir) | {"OUT": str(tmp_path / "out"),
                                "PYTHON": str(Path(sys.executable))}
    return subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "check"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_local_slurm_check_reports_a_failed_submission(tmp_path: Path):
    """A submission SLURM refuses stopped `check` silently (exit 1, launch.submit's error
    discarded); it now prints that error and stops before waiting for a job."""
    result = _local_slurm_check_with_no_job_queued(tmp_path, sbatch_fails=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: local_slurm.sh: submitting {tmp_path}/out/train failed: error: sbatch "
        "failed (exit 1): sbatch: error: invalid partition"]


def test_local_slurm_check_stops_when_the_job_to_preempt_ends_early(tmp_path):
    """`check` waited for the second job's log to reach step 60 with no end: a job that failed
    or ended earlier (here: submitted, gone from the queue at once, no log) hung it forever.
    It now says which job ended before what, and fails."""
    result = _local_slurm_check_with_no_job_queued(tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"FAIL job 4242 ended before its log showed 'step 60/200'; see {tmp_path}/out/preempted"
        "/slurm/"]
