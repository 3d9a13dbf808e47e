"""The `experiments.sweep` script as a user runs it: sweep configs are valid, errors are one-line
messages, and a sweep killed (SIGKILL) inside a trial resumes that trial when rerun."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from cnnjax.tune import space as sp
from cnnjax.tune.sweep import trial_workdir
from tests.commands import (
    assert_exited,
    ctrl_c_after_checkpoint,
    run_commands,
    wait_for_checkpoint,
)
from tests.experiments.test_configs import _load
from tests.experiments.test_train import _env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "lenet5_digits.py")
SWEEPS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "experiments", "sweeps", "*.py"))
    if not p.endswith("__init__.py")
)


def _sweep_file(tmp_path, parameters: str, extra: str = "") -> str:
    """A grid sweep file over `parameters` (a grid sets no num_trials: its size is fixed)."""
    path = tmp_path / "sweep_config.py"
    path.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.metric, c.mode = 'grid', 0, 'top1', 'max'\n"
        f"    c.parameters = {parameters}\n"
        f"{extra}"
        "    return c\n"
    )
    return str(path)


def _command(sweep, sweep_dir, *extra):
    return [sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}", f"--sweep={sweep}",
            f"--sweep_dir={sweep_dir}", "--config.progress_bar=False", *extra]


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_sweep_configs_document_their_command_and_fit_their_base(path):
    from cnnjax.train.config import validate_config

    module = _load(path)
    assert "python -m experiments.sweep" in module.__doc__
    assert "Expected" in module.__doc__ or "Measured" in module.__doc__
    sweep_config = module.get_config()
    space = sp.from_config(sweep_config)
    base = _load(CONFIG).get_config()
    sp.check_fields(base, space)
    for trial in space.trials:
        validate_config(sp.apply_overrides(base, trial.overrides))
    assert sweep_config.metric in ("loss", "top1", "top5")


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """{case: (tmp_path, result)} of the commands refused before training, run by one
    interpreter forking a child each (tests/commands.py: one process start, not nine)."""
    root = tmp_path_factory.mktemp("refused")
    tiny = ["--config.num_train_steps=40", "--config.eval_every_steps=20"]  # if it trained
    commands = {}
    tmp = root / "misspelt"
    tmp.mkdir()
    sweep = _sweep_file(tmp, "(choice('optimizer.learnig_rate', (0.1, 0.2)),)")
    commands["misspelt"] = (tmp, _command(sweep, tmp / "sweep"))
    tmp = root / "num_trials"
    tmp.mkdir()
    sweep = _sweep_file(tmp, "(choice('optimizer.learning_rate', (0.003, 0.03, 0.3, 3.0)),)",
                        extra="    c.num_trials = 4\n")
    commands["num_trials"] = (tmp, _command(sweep, tmp / "sweep", *tiny, "--sweep.num_trials=2"))
    tmp = root / "example_num_trials"
    tmp.mkdir()
    lr_sweep = os.path.join(ROOT, "experiments", "sweeps", "lenet5_digits_lr.py")
    commands["example_num_trials"] = (
        tmp, _command(lr_sweep, tmp / "sweep", *tiny, "--sweep.num_trials=2"))
    tmp = root / "unknown_field"
    tmp.mkdir()
    commands["unknown_field"] = (tmp, _command(lr_sweep, tmp / "sweep", "--sweep.foo=1"))
    tmp = root / "swept_override"
    tmp.mkdir()
    commands["swept_override"] = (tmp, _command(lr_sweep, tmp / "sweep", *tiny,
                                                "--config.optimizer.learning_rate=-1",
                                                "--max_trials=0"))
    tmp = root / "swept_none"
    tmp.mkdir()
    sweep = _sweep_file(tmp, "(choice('ema.decay', (0.9, 0.99)),)")
    commands["swept_none"] = (tmp, _command(sweep, tmp / "sweep", *tiny,
                                            "--config.ema.decay", "None", "--max_trials=0"))
    tmp = root / "empty_mapping"
    tmp.mkdir()
    empty = tmp / "empty_sweep.py"
    empty.write_text("import ml_collections\n\n\ndef get_config():\n"
                     "    c = ml_collections.ConfigDict()\n    c.kind = 'grid'\n"
                     "    c.parameters = ml_collections.ConfigDict()\n    return c\n")
    commands["empty_mapping"] = (tmp, _command(str(empty), tmp / "sweep"))
    tmp = root / "file_in_the_way"
    tmp.mkdir()
    (tmp / "file").write_text("")
    sweep = _sweep_file(tmp, "(choice('optimizer.learning_rate', (0.1, 0.2)),)")
    for inside, sweep_dir in ((False, tmp / "file"), (True, tmp / "file" / "x")):
        commands[("in_the_way", inside)] = (sweep_dir, _command(sweep, sweep_dir))
    # What the commands import only once running, imported once: the engine (JAX, flax and
    # orbax) with cnnjax.tune.sweep, tfds with the data presets (~1.5 s a child otherwise).
    # Each is refused before anything reads data, so TensorFlow (~6 s) is left out.
    results = run_commands([command[2:] for _, command in commands.values()], env=_env(),
                           preimport=["cnnjax.tune.sweep", "cnnjax.data.presets"])
    return {case: (path, result)
            for (case, (path, _)), result in zip(commands.items(), results, strict=True)}


def test_misspelt_field_is_a_one_line_error_before_training(refused):
    tmp_path, result = refused["misspelt"]
    assert result.returncode == 1
    assert (
        "error: sweep: parameters['optimizer.learnig_rate'].field='optimizer.learnig_rate' is "
        "invalid; the base config has no such field (close matches: "
        "['optimizer.learning_rate'])." in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_grids_num_trials_override_is_refused_before_training(refused):
    """`--sweep.num_trials=2` on a 4-trial grid was ignored: all 4 trials ran, unannounced."""
    tmp_path, result = refused["num_trials"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sweep: num_trials=2 is invalid; a grid has exactly 4 trials, the product of its "
        "value lists (4), so expected 4 or unset; to run fewer pass --max_trials=N to "
        "experiments.sweep (--array=... to launch.submit), or sample num_trials points with a "
        "random sweep (--sweep.kind=random, or kind='random' in the file).")
    assert "Trial 1/" not in result.stdout
    assert not (tmp_path / "sweep").exists()


def test_the_example_grid_refuses_a_num_trials_override(refused):
    """The newcomer's command on the shipped grid file, which sets no num_trials: it said "the
    config has no field 'num_trials'", not the grid's size, unlike a file restating its size
    (above); both now say the same."""
    tmp_path, result = refused["example_num_trials"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sweep: num_trials=2 is invalid; a grid has exactly 4 trials, the product of its "
        "value lists (4), so expected 4 or unset; to run fewer pass --max_trials=N to "
        "experiments.sweep (--array=... to launch.submit), or sample num_trials points with a "
        "random sweep (--sweep.kind=random, or kind='random' in the file).")
    assert not (tmp_path / "sweep").exists()


def test_an_unknown_sweep_field_lists_every_field_the_command_line_can_set(refused):
    """The hint listed the fields of the file as written, leaving out `num_trials` (which the
    shipped grid file does not set, and `--sweep.num_trials=N` can)."""
    tmp_path, result = refused["unknown_field"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --sweep.foo=1 is invalid; the config has no field 'foo'; sweep has fields "
        "['kind', 'metric', 'mode', 'num_trials', 'parameters', 'seed']")
    assert not (tmp_path / "sweep").exists()


def test_an_override_of_a_swept_field_is_refused_before_anything_runs(refused):
    """`--config.optimizer.learning_rate=-1` on a learning-rate sweep: each trial's value
    replaced it without a word, and the sweep ran (or tabulated) every trial."""
    tmp_path, result = refused["swept_override"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.optimizer.learning_rate is invalid; the sweep (--sweep="
        f"{os.path.join(ROOT, 'experiments', 'sweeps', 'lenet5_digits_lr.py')}) sets that field "
        "in every trial; drop it (or remove it from the sweep)")
    assert not (tmp_path / "sweep").exists()


def test_a_none_override_of_a_swept_field_is_refused_too(refused):
    """`--config.ema.decay None` on an `ema.decay` sweep: `parse_with_none` takes a None
    override out of the arguments before ml_collections lists it, so the check above missed it
    and each trial's value replaced it without a word."""
    tmp_path, result = refused["swept_none"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --config.ema.decay is invalid; the sweep (--sweep={tmp_path / 'sweep_config.py'}) "
        "sets that field in every trial; drop it (or remove it from the sweep)")
    assert not (tmp_path / "sweep").exists()


def test_an_empty_parameters_mapping_is_a_one_line_error(refused):
    """A ConfigDict's repr ends in a newline, which split the error over two lines."""
    _, result = refused["empty_mapping"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sweep: parameters={} is invalid; expected at least one parameter to sweep.")


@pytest.mark.slow  # 15 s in CI: a whole sweep in a subprocess
def test_a_sweep_file_without_metric_mode_or_seed_takes_them_from_the_command_line(tmp_path):
    """`--sweep.metric=loss` was refused ("the config has no field 'metric'") for a sweep file
    that leaves the metric to its default, and `Type NoneType ... is not supported for
    overriding` for one that sets it None; likewise `--sweep.mode`, `--sweep.seed` (a random
    sweep without a seed draws with 0) and unsetting a file's metric with `--sweep.metric=None`
    (its `best_metric`, top1)."""
    lrs = "(log_uniform('optimizer.learning_rate', 0.01, 0.3),)"
    files = {}
    for name, body in (("bare", "    c.kind = 'random'\n    c.num_trials = 2\n"),
                       ("none", "    c.kind = 'random'\n    c.num_trials = 2\n"
                                "    c.metric = None\n    c.mode = None\n    c.seed = None\n"),
                       ("set", "    c.kind = 'random'\n    c.num_trials = 2\n"
                               "    c.metric = 'loss'\n    c.mode = 'min'\n")):
        path = tmp_path / f"{name}.py"
        path.write_text("import ml_collections\nfrom cnnjax.tune.space import log_uniform\n\n\n"
                        "def get_config():\n    c = ml_collections.ConfigDict()\n"
                        f"{body}    c.parameters = {lrs}\n    return c\n")
        files[name] = str(path)
    runs = {
        "bare": (files["bare"], "--sweep.metric=loss", "--sweep.seed=3"),
        "none": (files["none"], "--sweep.metric=loss", "--sweep.mode=min", "--sweep.seed=3"),
        "unset": (files["set"], "--sweep.metric=None", "--sweep.mode=None"),
    }
    results = run_commands(
        [_command(sweep, tmp_path / name, "--max_trials=0", *extra)[2:]
         for name, (sweep, *extra) in runs.items()],
        env=_env(), preimport=["cnnjax.data.pipeline"])
    for name, result in zip(runs, results, strict=True):
        assert result.returncode == 0, (name, result.stderr[-2000:])
        with open(tmp_path / name / "sweep.json") as f:
            saved = json.load(f)
        expected = ("top1", "max", 0) if name == "unset" else ("loss", "min", 3)
        assert (saved["metric"], saved["mode"], saved["space"]["seed"]) == expected, name
    with open(tmp_path / "bare" / "results.json") as f:
        assert json.load(f)["metric"] == "loss"


@pytest.mark.parametrize("inside", [False, True])
def test_a_sweep_dir_a_file_is_in_the_way_of_is_one_line_before_training(refused, inside):
    sweep_dir, result = refused[("in_the_way", inside)]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sweep: sweep_dir={str(sweep_dir)!r} is invalid; expected a directory or a path "
        "to create, but a file is in the way.")


@pytest.mark.slow
def test_sigkill_inside_a_trial_then_rerun_resumes_it(tmp_path):
    sweep = _sweep_file(tmp_path, "(choice('optimizer.learning_rate', (0.05, 0.1)),)")
    sweep_dir = tmp_path / "sweep"
    tiny = ["--config.num_train_steps=120", "--config.global_batch_size=32",
            "--config.checkpoint_every_steps=20", "--config.eval_every_steps=60",
            "--config.schedule.warmup_steps=10"]
    space = sp.grid({"optimizer.learning_rate": (0.05, 0.1)})
    first, second = (trial_workdir(str(sweep_dir), t) for t in space.trials)
    proc = subprocess.Popen(_command(sweep, sweep_dir, *tiny), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, os.path.join(second, "checkpoints"), 20)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep finished before it could be killed"
    with open(os.path.join(first, "summary.json")) as f:
        assert json.load(f)["status"] == "completed"
    first_mtimes = {n: os.stat(os.path.join(first, n)).st_mtime_ns
                    for n in ("summary.json", "metrics.jsonl", "trial.json")}
    with open(sweep_dir / "results.csv") as f:
        assert f.read().count(",incomplete,") == 1  # the killed trial, as the table last saw it

    rerun = subprocess.run(_command(sweep, sweep_dir, *tiny), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (f"Trial 1/2 {space.trials[0].trial_id} {{optimizer.learning_rate=0.05}}: already "
            "completed, skipped." in rerun.stdout)
    assert {n: os.stat(os.path.join(first, n)).st_mtime_ns for n in first_mtimes} == first_mtimes
    with open(os.path.join(second, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["step"] == 120
    assert 20 <= summary["resumed_from_step"] < 120
    with open(sweep_dir / "results.json") as f:
        results = json.load(f)
    assert [r["status"] for r in results["trials"]] == ["completed", "completed"]
    assert [r["rank"] for r in results["trials"]] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_inside_a_trial_is_one_line_naming_it_and_how_to_resume(tmp_path):
    """Ctrl-C ended the sweep with a ~60-line KeyboardInterrupt traceback (`experiments.train`
    says one line since 5a06d73); it says which trial stopped where and exits 130."""
    sweep = _sweep_file(tmp_path, "(choice('optimizer.learning_rate', (0.05, 0.1)),)")
    sweep_dir = tmp_path / "sweep"
    tiny = ["--config.num_train_steps=2000", "--config.global_batch_size=32",
            "--config.checkpoint_every_steps=10", "--config.eval_every_steps=1000",
            "--config.schedule.warmup_steps=10",
            # orbax logs its own traceback when Ctrl-C lands while it finishes an async save
            "--config.async_checkpoints=False"]
    space = sp.grid({"optimizer.learning_rate": (0.05, 0.1)})
    first = trial_workdir(str(sweep_dir), space.trials[0])
    stderr = ctrl_c_after_checkpoint(_command(sweep, sweep_dir, *tiny), _env(),
                                     os.path.join(first, "checkpoints"), 10)
    with open(os.path.join(first, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "interrupted"
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: trial {space.trials[0].trial_id} (index 0, "
        "{optimizer.learning_rate=0.05}): "
        f"{summary['message']} Results so far: {sweep_dir / 'results.csv'}")
    with open(sweep_dir / "results.csv") as f:
        assert f.read().count(",interrupted,") == 1


def _fake_srun(tmp_path) -> dict:
    """An environment whose `srun` just runs its arguments (what srun does for one task)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\nexec "$@"\n')
    srun.chmod(0o755)
    env = _env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["SLURM_SUBMIT_DIR"] = ROOT
    env["PYTHON"] = sys.executable
    return env


def test_sbatch_sweep_array_task_runs_its_trial(tmp_path):
    """launch/sbatch_sweep.sh as array task 1: only trial 1 runs, in its own folder."""
    sweep = _sweep_file(tmp_path, "(choice('optimizer.learning_rate', (0.05, 0.1)),)")
    sweep_dir = tmp_path / "sweep"
    env = _fake_srun(tmp_path) | {"SLURM_ARRAY_TASK_ID": "1"}
    script = os.path.join(ROOT, "launch", "sbatch_sweep.sh")
    result = subprocess.run(
        ["bash", script, CONFIG, sweep, str(sweep_dir), "--config.num_train_steps=4",
         "--config.eval_every_steps=4", "--config.global_batch_size=16",
         "--config.progress_bar=False", "--config.schedule.warmup_steps=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (trial_workdir(str(sweep_dir), t)
                     for t in sp.grid({"optimizer.learning_rate": (0.05, 0.1)}).trials)
    assert not os.path.exists(os.path.join(first, "summary.json"))
    with open(os.path.join(second, "summary.json")) as f:
        assert json.load(f)["status"] == "completed"


def test_sbatch_sweep_outside_an_array_job_says_how_to_submit(tmp_path):
    env = _fake_srun(tmp_path)
    env.pop("SLURM_ARRAY_TASK_ID", None)
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "sbatch_sweep.sh"), CONFIG, "s.py", "d"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "run with sbatch --array=0-N (one task per trial)" in result.stderr


# experiments.sweep with `run_sweep` replaced: it prints what the command forwards and returns
# the rows given as the driver's first argument (`python -m tests.experiments.test_sweep <rows>
# experiments.sweep <flags>`, forked by run_commands)
_STAND_IN = ("import json, sys\n"
             "import cnnjax.tune.sweep as sweep_lib\n"
             "rows = json.loads(sys.argv.pop(1))\n"
             "def run_sweep(base, space, sweep_dir, **kwargs):\n"
             "    print(json.dumps(kwargs, sort_keys=True), flush=True)\n"
             "    return rows\n"
             "sweep_lib.run_sweep = run_sweep\n"
             "sys.argv = sys.argv[1:]\n"
             "import runpy; runpy.run_module('experiments.sweep', run_name='__main__')")
_DONE, _FAILED = ({"index": 0, "status": "completed", "trial_id": "t0"},
                  {"index": 1, "status": "failed", "trial_id": "t1", "reason": "boom"})
_DIVERGED = [{"index": i, "status": "diverged", "trial_id": f"t{i}"} for i in range(2)]
_FAILURE = ("error: 1 trial(s) failed: t1: boom (tracebacks in <trial workdir>/error.log; rerun "
            "the command to retry them)")
_NO_RESULT = ("error: the sweep has no result: none of its 2 trials completed (2 diverged; each "
              "one's reason is in results.csv)")
# (rows run_sweep returns, flags): exit status, last stderr line, kwargs run_sweep received
_ARRAY = {"trial_index": 0, "trial_count": 1, "max_trials": None}
_STAND_IN_CASES = {
    "failed_trial": ([_DONE, _FAILED], [], 1, _FAILURE,
                     {"trial_index": None, "trial_count": 1, "max_trials": None}),
    # an array task answers for its own trials only: trial 0's task, trial 1 failed
    "array_task_0": ([_DONE, _FAILED], ["--trial_index=0"], 0, None, _ARRAY),
    "array_tasks_0_1": ([_DONE, _FAILED], ["--trial_index=0", "--trial_count=2",
                                          "--max_trials=0"], 1, _FAILURE,
                        {"trial_index": 0, "trial_count": 2, "max_trials": 0}),
    "no_result": (_DIVERGED, [], 1, _NO_RESULT,
                  {"trial_index": None, "trial_count": 1, "max_trials": None}),
    # another task's trials may still complete
    "array_task_no_result": (_DIVERGED, ["--trial_index=0"], 0, None, _ARRAY),
}


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory):
    """{case: CompletedProcess} of experiments.sweep under the stand-in `run_sweep`, one
    interpreter forking a child per case (~3 s)."""
    root = tmp_path_factory.mktemp("stand_in")
    sweep = os.path.join(ROOT, "experiments", "sweeps", "lenet5_digits_lr.py")
    commands = [["tests.experiments.test_sweep", json.dumps(rows),
                 *_command(sweep, root / case, *extra)[2:]]
                for case, (rows, extra, *_) in _STAND_IN_CASES.items()]
    results = run_commands(commands, env=_env(),
                           preimport=["cnnjax.tune.sweep", "cnnjax.data.presets"])
    return dict(zip(_STAND_IN_CASES, results, strict=True))


@pytest.mark.parametrize("case", _STAND_IN_CASES)
def test_the_exit_status_answers_for_the_trials_of_this_invocation(stand_in_runs, case):
    """The flags reach run_sweep; a failed trial (or a sweep with no result) exits 1 naming it,
    except in an array task whose own trials (index..index+count-1) did not fail."""
    _, _, status, line, forwarded = _STAND_IN_CASES[case]
    result = stand_in_runs[case]
    assert_exited(result, status, line)
    kwargs = json.loads(result.stdout.splitlines()[-1])
    assert kwargs == {**forwarded, "metric": "top1", "mode": None}  # as the sweep file sets


if __name__ == "__main__":  # a stand-in driver, for `stand_in_runs`
    exec(_STAND_IN)  # noqa: S102
