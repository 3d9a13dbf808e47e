"""Shared pieces of the launcher tests: the repository's files and stand-in SLURM commands."""

import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "experiments" / "configs" / "lenet5_digits.py")
SWEEP = str(ROOT / "experiments" / "sweeps" / "lenet5_digits_lr.py")  # a 4-trial grid
RECIPE = str(ROOT / "experiments" / "recipes" / "lenet5_digits.py")
TRANSFER = str(ROOT / "experiments" / "transfers" / "digits_0to4_to_5to9.py")


def own_project(directory: Path, num_train_steps: int = 2) -> Path:
    """A researcher's project outside the repository: `cfg.py`, a few steps of LeNet-5/digits
    whose count comes from `mypkg` beside it, a package found only through the current directory
    (as `python -m` puts it on the import path). Returns `directory`."""
    (directory / "mypkg").mkdir(parents=True)
    (directory / "mypkg" / "__init__.py").write_text(f"NUM_TRAIN_STEPS = {num_train_steps}\n")
    (directory / "cfg.py").write_text(
        Path(CONFIG).read_text() + "\n\nimport mypkg  # noqa: E402\n\n_base = get_config\n\n\n"
        "def get_config():  # noqa: F811\n    config = _base()\n"
        "    config.num_train_steps = mypkg.NUM_TRAIN_STEPS\n"
        "    config.eval_every_steps = config.checkpoint_every_steps = mypkg.NUM_TRAIN_STEPS\n"
        "    config.schedule.warmup_steps = 1\n    config.global_batch_size = 16\n"
        "    config.progress_bar = False\n    return config\n")
    return directory


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def stand_in_slurm(bin_dir: Path) -> Path:
    """Stand-in SLURM commands. `srun` runs its command as a child, recorded in
    <bin_dir>/srun.tasks, answers TERM as real srun does (SIGKILL to its tasks: "forcing job
    termination"), and its tasks die with it. `scancel --signal=S` sends S to those tasks (real
    scancel signals every step of the job, not the batch shell). `scontrol`, `scancel` and
    `sbatch` append their arguments to <bin_dir>/<name>.calls; `sbatch --parsable` answers job
    id 4242 (or fails if <bin_dir>/sbatch.fail exists)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    here = str(bin_dir)
    write_executable(bin_dir / "srun", (
        "#!/usr/bin/env bash\n"
        'while [[ "${1:-}" == --* ]]; do shift; done  # srun options\n'
        # The task is registered before it runs (as slurmstepd knows its tasks before they
        # start), so a scancel that comes once the program has started always reaches it.
        f'(echo "$BASHPID" >> {here}/srun.tasks; exec "$@") &\n'
        "child=$!\n"
        # the step dies with its srun (slurmstepd's cleanup when srun is gone, even by KILL)
        '(while kill -0 $$ 2>/dev/null; do sleep 0.1; done; kill -KILL "$child" 2>/dev/null) &\n'
        "trap 'echo \"srun: forcing job termination\" >&2; kill -KILL \"$child\"' TERM\n"
        'wait "$child"; status=$?\n'
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done\n'
        'exit "$status"\n'))
    write_executable(bin_dir / "scancel", (
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {here}/scancel.calls\n'
        "sig=TERM\n"
        'for arg in "$@"; do case $arg in --signal=*) sig=${arg#--signal=};; esac; done\n'
        f'[ -e {here}/srun.tasks ] || exit 0\n'
        f'while read -r pid; do kill -"$sig" "$pid" 2>/dev/null; done < {here}/srun.tasks\n'))
    write_executable(bin_dir / "scontrol",
                     f'#!/usr/bin/env bash\necho "$@" >> {here}/scontrol.calls\n')
    write_executable(bin_dir / "sbatch", (
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {here}/sbatch.calls\n'
        f'if [ -e {here}/sbatch.fail ]; then echo "sbatch: error: invalid partition" >&2; '
        "exit 1; fi\n"
        'echo "4242;cluster"\n'))
    return bin_dir


def path_with(bin_dir: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env  # without SLURM_* variables: tests/conftest.py removed them


def pytest_collection_modifyitems(config, items):
    """The launcher's default `venv` is the repository's `.venv` (what `make test` and CI create);
    where it is missing (tests run from another environment) the launcher tests are skipped
    saying so, rather than failing 28 ways on "venv='.venv' is invalid"."""
    if (ROOT / ".venv" / "bin" / "activate").is_file():
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"the launcher's default venv {ROOT / '.venv'} does not exist "
                                   "(run `make test`, which creates it)")
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(skip)
