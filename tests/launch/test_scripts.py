"""The hand-written examples `launch/sbatch_{train,sweep,tune}.sh`, run with a stand-in `srun`:
the command they start, and the CPUs their job step gets."""

import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import CONFIG, RECIPE, ROOT, SWEEP, path_with, write_executable

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
