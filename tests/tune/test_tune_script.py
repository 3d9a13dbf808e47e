"""The `experiments.tune` script and `launch/sbatch_tune.sh` as a user runs them: recipe files
are valid for their base config, bad values are one-line errors before anything is written, and
the SLURM script runs (and resumes) a tune."""

import glob
import json
import os
import subprocess
import sys

import pytest

from cnnjax.tune import recipe as rc
from cnnjax.tune.sweep import trial_configs
from tests.commands import assert_exited, ctrl_c_after_checkpoint, run_commands
from tests.experiments.test_configs import _load
from tests.experiments.test_sweep import _fake_srun
from tests.experiments.test_train import _env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "lenet5_digits.py")
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "recipes", "*.py"))
                 if not p.endswith("__init__.py"))
# A LeNet-5 tune small enough for a test: 2 trials of 6 steps, one round.
TINY = ["--recipe.num_lrs=2", "--recipe.round1_steps=6", "--recipe.max_rounds=1",
        "--recipe.max_trials=2", "--recipe.evals_per_trial=3", "--recipe.logs_per_trial=6",
        "--config.schedule.warmup_steps=1", "--config.global_batch_size=16",
        "--config.progress_bar=False", "--config.tensorboard=False"]


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_files_document_their_command_and_fit_their_base(path):
    module = _load(path)
    assert "python -m experiments.tune" in module.__doc__
    assert "Measured" in module.__doc__ or "Expected" in module.__doc__
    recipe = rc.Recipe.from_config(module.get_config())
    plan = rc.first_round(recipe)
    assert len(trial_configs(plan.base_config(_load(CONFIG).get_config()), plan.space())) \
        == recipe.num_lrs


def _command(tune_dir, *extra):
    return [sys.executable, "-m", "experiments.tune", f"--config={CONFIG}",
            f"--recipe={RECIPES[0]}", f"--tune_dir={tune_dir}", *extra]


def test_bad_recipe_value_is_a_one_line_error_before_anything_is_written(tmp_path):
    result = subprocess.run(_command(tmp_path / "tune", "--recipe.lr_min=2.0"), cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: recipe: lr_min=2.0 is invalid; expected lr_min < lr_max (lr_max=1.0)." \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tune").exists()


@pytest.mark.slow  # 20 s in CI: a whole tune in a subprocess
def test_a_tune_whose_every_trial_diverged_exits_nonzero(tmp_path):
    """Status no_result (no trial completed) exited 0: a script or SLURM read success and found
    no best config."""
    result = subprocess.run(_command(tmp_path / "tune", *TINY, "--recipe.lr_min=300",
                                     "--recipe.lr_max=3000"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: no trial has completed (every one diverged or failed)")
    with open(tmp_path / "tune" / rc.RECIPE_FILE) as f:
        assert json.load(f)["status"] == "no_result"


@pytest.mark.slow
def test_sbatch_tune_runs_the_recipe_and_a_resubmission_trains_nothing(tmp_path):
    tune_dir = tmp_path / "tune"
    command = ["bash", os.path.join(ROOT, "launch", "sbatch_tune.sh"), CONFIG, RECIPES[0],
               str(tune_dir), *TINY]
    env = _fake_srun(tmp_path)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tune_dir / "recipe.json").read_text())
    assert record["status"] == "budget_spent" and record["num_trials"] == 2
    assert [t["status"] for t in record["rounds"][0]["trials"]] == ["completed"] * 2
    assert "Tune budget_spent after 1 round(s), 2 trials" in result.stdout
    summaries = sorted(glob.glob(str(tune_dir / "round_1" / "trials" / "*" / "summary.json")))
    mtimes = [os.stat(p).st_mtime_ns for p in summaries]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already completed, skipped." in result.stdout
    assert [os.stat(p).st_mtime_ns for p in summaries] == mtimes


def test_sbatch_tune_without_arguments_prints_its_usage(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "sbatch_tune.sh")],
                            cwd=tmp_path, env=_fake_srun(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "usage: sbatch launch/sbatch_tune.sh CONFIG RECIPE TUNE_DIR" in result.stderr


@pytest.mark.slow
def test_ctrl_c_inside_a_trial_is_one_line_naming_the_round_and_trial(tmp_path):
    """Ctrl-C ended the tune with a ~60-line KeyboardInterrupt traceback (the sweep and
    experiments.train say one line); it names the round, the trial, where it stopped and the
    results so far, and exits 130."""
    tune_dir = tmp_path / "tune"
    tiny = ["--recipe.num_lrs=2", "--recipe.round1_steps=4000", "--recipe.max_rounds=1",
            "--recipe.max_trials=2", "--recipe.max_steps=4000", "--recipe.evals_per_trial=400",
            "--recipe.logs_per_trial=400", "--config.schedule.warmup_steps=1",
            "--config.global_batch_size=16", "--config.progress_bar=False",
            "--config.tensorboard=False",
            # orbax logs its own traceback when Ctrl-C lands while it finishes an async save
            "--config.async_checkpoints=False"]
    recipe = _load(RECIPES[0]).get_config()
    recipe.update(num_lrs=2, round1_steps=4000, max_steps=4000, max_rounds=1, max_trials=2,
                  evals_per_trial=400, logs_per_trial=400)
    trial = rc.first_round(rc.Recipe.from_config(recipe)).space().trials[0]
    workdir = tune_dir / "round_1" / "trials" / trial.trial_id
    stderr = ctrl_c_after_checkpoint(_command(tune_dir, *tiny), _env(), workdir / "checkpoints",
                                     20)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: round 1: trial {trial.trial_id} (index 0, "
        f"{{optimizer.learning_rate={trial.overrides['optimizer.learning_rate']:.3g}}}): "
        f"{summary['message']} Results so far: {tune_dir / 'round_1' / 'results.csv'}")
    assert json.loads((tune_dir / rc.RECIPE_FILE).read_text())["status"] == "interrupted"


# experiments.tune with `run_tune` replaced: it prints what the command gives it and returns the
# record given as the driver's first argument (`python -m tests.tune.test_tune_script <record>
# experiments.tune <flags>`, forked by run_commands)
_STAND_IN = ("import json, sys\n"
             "import cnnjax.tune.recipe as recipe_lib\n"
             "record = json.loads(sys.argv.pop(1))\n"
             "def run_tune(config, recipe, tune_dir):\n"
             "    print(config.model, recipe.num_lrs, tune_dir, flush=True)\n"
             "    return record\n"
             "recipe_lib.run_tune = run_tune\n"
             "sys.argv = sys.argv[1:]\n"
             "import runpy; runpy.run_module('experiments.tune', run_name='__main__')")
# the tune's status: the command's exit status
_STATUSES = {"budget_spent": 0, "failed": 1, "no_result": 1}


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory):
    """{status: (tune_dir, CompletedProcess)} of experiments.tune under a stand-in `run_tune`
    returning a record of that status, one interpreter forking a child per status (~3 s)."""
    root = tmp_path_factory.mktemp("stand_in")
    commands = [["tests.tune.test_tune_script",
                 json.dumps({"status": status, "reason": f"stand-in {status} reason"}),
                 *_command(root / status, "--recipe.num_lrs=3")[2:]] for status in _STATUSES]
    results = run_commands(commands, env=_env(),
                           preimport=["cnnjax.tune.recipe", "cnnjax.data.presets"])
    return {status: (root / status, result)
            for status, result in zip(_STATUSES, results, strict=True)}


@pytest.mark.parametrize("status", _STATUSES)
def test_the_exit_status_and_report_line_follow_the_tunes_record(stand_in_runs, status):
    """Every tune names its report; a failed tune or one with no result must exit 1 with its
    reason (a script or SLURM must not read success)."""
    tune_dir, result = stand_in_runs[status]
    assert_exited(result, _STATUSES[status],
                  f"error: stand-in {status} reason" if _STATUSES[status] else None)
    assert result.stdout.splitlines() == [f"lenet5 3 {tune_dir}",
                                          f"Report: {tune_dir}/report.md"]


if __name__ == "__main__":  # a stand-in driver, for `stand_in_runs`
    exec(_STAND_IN)  # noqa: S102
