"""Shared pieces of the launcher tests: the repository's files and stand-in SLURM commands."""

import os
import stat
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "experiments" / "configs" / "lenet5_digits.py")
SWEEP = str(ROOT / "experiments" / "sweeps" / "lenet5_digits_lr.py")  # a 4-trial grid
RECIPE = str(ROOT / "experiments" / "recipes" / "lenet5_digits.py")
TRANSFER = str(ROOT / "experiments" / "transfers" / "digits_0to4_to_5to9.py")


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def stand_in_slurm(bin_dir: Path) -> Path:
    """`srun` runs its command in place; `scontrol` and `sbatch` append their arguments to
    <bin_dir>/<name>.calls; `sbatch --parsable` answers job id 4242 (or fails if
    <bin_dir>/sbatch.fail exists)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    write_executable(bin_dir / "srun", '#!/usr/bin/env bash\nexec "$@"\n')
    here = str(bin_dir)
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
    for name in list(env):
        if name.startswith("SLURM_"):
            del env[name]
    return env
