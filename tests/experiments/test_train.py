"""The `experiments.train` script as a user runs it: SIGKILL + rerun resumes exactly; errors are
one-line messages with a non-zero exit status, never a bare traceback."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.commands import ctrl_c_after_checkpoint, run_commands, wait_for_checkpoint
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "lenet5_digits.py")
# A short run of the default experiment: 120 steps, a checkpoint every 20.
TINY = [
    "--config.num_train_steps=120",
    "--config.global_batch_size=32",
    "--config.checkpoint_every_steps=20",
    "--config.eval_every_steps=60",
    "--config.schedule.warmup_steps=10",
]


def _command(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        *TINY,
        *extra,
    ]


def _env():
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _final_params(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, str(step), "default"))
    return step, tree["params"], tree["opt_state"]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key], f"{prefix}/{key}")
    else:
        yield prefix, np.asarray(tree)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run and the run to kill go side by side to save wall time.
    ref_proc = subprocess.Popen(
        _command(reference),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc = subprocess.Popen(
        _command(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / "checkpoints"
    wait_for_checkpoint(proc, ckpt, 20, timeout_s=240)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    steps_at_kill = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    assert steps_at_kill and max(steps_at_kill) < 120
    assert ref_proc.wait(timeout=300) == 0

    rerun = subprocess.run(
        _command(killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(Path(killed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert 20 <= summary["resumed_from_step"] < 120
    # The printed line pairs this run's steps with this run's time.
    assert (f"steps {summary['resumed_from_step']}->120 in {summary['wall_time_s']:.1f} s, "
            f"{summary['total_wall_time_s']:.1f} s with the earlier runs") in rerun.stdout
    ref_step, ref_params, ref_opt = _final_params(reference)
    step, params, opt = _final_params(killed)
    assert ref_step == step == 120
    for (name, a), (name_b, b) in zip(
        _leaves({"p": ref_params, "o": ref_opt}), _leaves({"p": params, "o": opt}), strict=True
    ):
        assert name == name_b
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.slow  # 19 s in CI; divergence itself is tested in-process in tests/train/test_loop.py
def test_divergence_exits_nonzero_with_message(tmp_path):
    result = subprocess.run(
        _command(
            tmp_path,
            "--config.optimizer.learning_rate=1000",
            "--config.num_train_steps=40",
            "--config.schedule.name=constant",
        ),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: Training diverged at step" in result.stderr
    assert "learning rate too high or bad initialization" in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(Path(tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] >= 1


_MISSPELT = [
    ("train", ["--config=experiments/configs/lenet5_digits.py", "--workdir={tmp}",
               "--config.optimizer.learnin_rate=0.1"],
     "error: --config.optimizer.learnin_rate=0.1 is invalid; the config has no field "
     "'learnin_rate'; Did you mean \"learning_rate\" instead of \"learnin_rate\"?"),
    ("train", ["--config=experiments/configs/lenet5_dgits.py", "--workdir={tmp}"],
     "error: --config='experiments/configs/lenet5_dgits.py' is invalid; no such config file"),
    ("sweep", ["--config=experiments/configs/lenet5_digits.py", "--sweep_dir={tmp}",
               "--sweep=experiments/sweeps/lenet5_digits_lr.py", "--sweep.kindd=random"],
     "error: --sweep.kindd=random is invalid; the config has no field 'kindd'; Did you mean "
     "\"kind\" instead of \"kindd\"?"),
    ("tune", ["--config=experiments/configs/lenet5_digits.py", "--tune_dir={tmp}",
              "--recipe=experiments/recipes/lenet5_digits.py", "--recipe.lr_mx=0.1"],
     "error: --recipe.lr_mx=0.1 is invalid; the config has no field 'lr_mx'; Did you mean "
     "\"lr_max\" instead of \"lr_mx\"?"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """{case: (workdir, result)} of the commands that end with a one-line error before
    training, and of experiments.train under the stand-in drivers of `_STAND_INS` (case: the
    stand-in's name), run by one interpreter forking a child each (tests/commands.py). The
    commands import the engine, tfds (data presets) and the tune recipe only once running
    (~2.2 s a child): imported once first, the fixture takes ~3 s, where it took 4-5.5 s and
    the two stand-ins' own processes 3 s each. No command reads data, so TensorFlow (~6 s) is
    left out."""
    root = tmp_path_factory.mktemp("refused")
    commands = {}
    for case in ("bad_config", "refused_workdir", "in_use"):
        (root / case).mkdir()
        commands[case] = (root / case, _command(root / case)[2:])
    commands["bad_config"][1].append("--config.optimizer.name=lamb")
    commands["bad_timeout"] = (root / "bad_timeout",  # not made: the refusal must not make it
                               _command(root / "bad_timeout", "--distributed_timeout=-1")[2:])
    (root / "refused_workdir" / "tune.json").write_text("{}")
    for i, (script, args, _) in enumerate(_MISSPELT):
        workdir = root / f"misspelt{i}" / "out"
        workdir.parent.mkdir()
        commands[("misspelt", i)] = (
            workdir, [f"experiments.{script}", *(a.format(tmp=workdir) for a in args)])
    for name in _STAND_INS:
        if name != "crash_in_a_new_workdir":  # that one must make its workdir itself
            (root / name).mkdir()
        commands[name] = (root / name, ["tests.experiments.test_train", name,
                                        *_command(root / name)[2:], *_STAND_IN_FLAGS.get(name, [])])
    (root / "crash_log_unwritable" / "error.log").mkdir()
    (root / "trained" / "error.log").write_text("an earlier run's traceback\n")
    (root / "crash_again" / "error.log").write_text(
        "Traceback (most recent call last):\nRuntimeError: an earlier bug\n")
    (root / "ctrl_c_over_an_old_failure" / "summary.json").write_text(json.dumps(
        {"status": "failed", "error": "ValueError", "message": "an earlier failure"}))
    with helpers.locked_by_another_process(root / "in_use") as holder:
        results = run_commands([command for _, command in commands.values()], env=_env(),
                               preimport=["cnnjax.train.trained", "cnnjax.data.presets",
                                          "cnnjax.tune.recipe"])
    refused = {case: (workdir, result)
               for (case, (workdir, _)), result in zip(commands.items(), results, strict=True)}
    refused["in_use_holder_pid"] = holder.pid
    return refused


def test_bad_config_is_a_one_line_error(refused):
    tmp_path, result = refused["bad_config"]
    assert result.returncode != 0
    assert "error: optimizer: name='lamb' is invalid; expected one of" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(f"(details in {tmp_path / 'summary.json'})")
    assert json.loads(Path(tmp_path / "summary.json").read_text())["status"] == "failed"


def test_a_bad_distributed_timeout_writes_nothing(refused):
    """A flag's refusal made the workdir to write error.startup.log into it (a multi-process
    job's refusal is recorded there, and the flag was checked inside that path)."""
    workdir, result = refused["bad_timeout"]
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: distributed: distributed_timeout=-1.0 is invalid; expected a positive finite "
        "number.")
    assert not workdir.exists()


def test_a_refused_workdir_is_not_pointed_to_for_details(refused):
    """A refusal leaves the directory's files alone, so the error must not send the user to a
    summary.json that does not hold it."""
    tmp_path, result = refused["refused_workdir"]
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith(f"error: workdir={str(tmp_path)!r} is "
                                                      "invalid; it holds a tune (tune.json)")
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("case", range(len(_MISSPELT)),
                         ids=[f"{script}{i}" for i, (script, _, _) in enumerate(_MISSPELT)])
def test_a_misspelt_override_or_missing_config_file_is_one_line(refused, case):
    """ml_collections raises these from inside absl's parser; the entry points' `parse_flags`
    turns them into the usual one-line error, before anything is written."""
    workdir, result = refused[("misspelt", case)]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == _MISSPELT[case][2]
    assert not workdir.exists()


# experiments.train with train_and_evaluate replaced by a stand-in bug
_CRASH = ("import sys; import cnnjax.train.loop as loop\n"
          "def boom(config, workdir): raise RuntimeError('stand-in bug')\n"
          "loop.train_and_evaluate = boom\n"
          "sys.argv = sys.argv[1:]\n"
          "import runpy; runpy.run_module('experiments.train', run_name='__main__')")


def _fails_keeping_traceback(code: str, workdir: Path, error: str) -> Path:
    """Runs experiments.train through `code` (a stand-in driver) into `workdir`; checks it ends
    with `error: <error>` and its traceback in error.log, whose path it returns."""
    failed = subprocess.run([sys.executable, "-c", code, *_command(workdir)[2:]], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    return _kept_traceback(failed, workdir, error)


def _kept_traceback(failed: subprocess.CompletedProcess, workdir: Path, error: str) -> Path:
    """Checks that `failed` (experiments.train into `workdir`) ended with `error: <error>` and
    its traceback in error.log, whose path it returns."""
    assert failed.returncode == 1
    log = workdir / "error.log"
    assert failed.stderr.strip().splitlines()[-2:] == [f"error: {error}",
                                                       f"(traceback in {log})"]
    assert error in log.read_text()
    return log


@pytest.mark.slow  # 24 s in CI: two training subprocesses
def test_an_unexpected_error_keeps_its_traceback_until_a_rerun_succeeds(tmp_path):
    """A bug's traceback goes to <workdir>/error.log; once a rerun completes it is kept aside as
    error.previous.log, so the workdir no longer looks failed."""
    log = _fails_keeping_traceback(_CRASH, tmp_path, "RuntimeError: stand-in bug")
    rerun = subprocess.run(_command(tmp_path, "--config.num_train_steps=2",
                                    "--config.schedule.warmup_steps=0"),
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not log.exists()
    assert "stand-in bug" in (tmp_path / "error.previous.log").read_text()


def test_an_unexpected_error_whose_log_cannot_be_written_still_says_why(refused):
    """Writing error.log (a full disk, a read-only workdir; here a folder in its place) raised a
    second OSError over the first, and the message naming the error was lost."""
    workdir, failed = refused["crash_log_unwritable"]
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-2:]
    assert last[0] == "error: RuntimeError: stand-in bug"
    log = workdir / "error.log"
    assert last[1].startswith(f"(traceback above: it could not be written to {log}: ")
    assert "RuntimeError: stand-in bug" in failed.stderr.split("error: RuntimeError")[0]


# experiments.train (imported, so a test can set its constants) with train_and_evaluate replaced
_STAND_IN = ("import json, os, sys, threading\n"
             "from absl import app\n"
             "import cnnjax.train.loop as loop\n"
             "from cnnjax.utils.cli import parse_flags\n"
             "sys.argv = sys.argv[1:]\n"
             "import experiments.train as T\n"
             "import cnnjax.utils.cli as cli\n"
             "cli.STUCK_THREAD_WAIT_S = 0.5\n"
             "{body}\n"
             "loop.train_and_evaluate = stand_in\n"
             "app.run(T.main, flags_parser=parse_flags)")
_FAILED_IN_TRAINING = (
    "def stand_in(config, workdir):\n"
    "    message = 'bad record in the input pipeline'\n"
    "    with open(os.path.join(workdir, 'summary.json'), 'w') as f:  # as the loop records it\n"
    "        json.dump({'status': 'failed', 'error': 'ValueError', 'message': message,\n"
    "                   'step': 12, 'resumes_from_step': 10}, f)\n"
    "    raise ValueError(message)")
_STUCK = ("def stand_in(config, workdir):\n"
          "    threading.Thread(target=threading.Event().wait, name='stuck_saver').start()\n"
          "    raise RuntimeError('save failed')")


def test_a_value_error_after_training_started_keeps_its_traceback(refused):
    """Every ValueError was taken for a refusal of the config: one raised in training (a bad
    record, a library's) left no traceback anywhere. summary.json recording where a rerun
    resumes from tells it apart."""
    workdir, failed = refused["failed_in_training"]
    _kept_traceback(failed, workdir, "ValueError: bad record in the input pipeline")


def test_a_failure_leaves_without_waiting_for_stuck_background_threads(tmp_path):
    """A checkpoint save that could not create its step folder left orbax's threads waiting
    300 s for it: the error was printed, then the process hung 5 minutes before exiting. (A
    process of its own: a forked child of `run_commands` ends with `os._exit`, which would not
    wait for the thread.)"""
    code = _STAND_IN.format(body=_STUCK)
    failed = subprocess.run([sys.executable, "-c", code, *_command(tmp_path)[2:]], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "Leaving 1 background thread(s) that did not finish (stuck_saver)." in failed.stderr
    assert failed.stderr.strip().splitlines()[-2] == "error: RuntimeError: save failed"


_REFUSED_IN_A_STOPPED_RUN = (
    "def stand_in(config, workdir):\n"
    "    message = 'num_train_steps=9 is invalid; the stopped run trains 120'\n"
    "    with open(os.path.join(workdir, 'summary.json'), 'w') as f:  # the engine's note\n"
    "        json.dump({'status': 'interrupted', 'refused': {'message': message}}, f)\n"
    "    raise ValueError(message)")
_DATA_NOT_PREPARED = (  # DatasetNotPreparedError is a FileNotFoundError
    "def stand_in(config, workdir):\n"
    "    message = 'cifar10 is not prepared in /data'\n"
    "    with open(os.path.join(workdir, 'summary.json'), 'w') as f:\n"
    "        json.dump({'status': 'failed', 'error': 'DatasetNotPreparedError',\n"
    "                   'message': message}, f)\n"
    "    raise FileNotFoundError(message)")
_CTRL_C = ("def stand_in(config, workdir):\n"
           "    raise KeyboardInterrupt")
# The summary a finished resumed run returns, and `distributed.initialize` as a job whose other
# process never came (it records the reason through `on_timeout`, then ends the process).
_TRAINS = ("import cnnjax.train.distributed as distributed\n"
           "def stand_in(config, workdir):\n"
           "    return {'model': 'lenet5', 'dataset': 'digits', 'step': 10, 'wall_time_s': 1.0,\n"
           "            'resumed_from_step': 5, 'total_wall_time_s': 3.0,\n"
           "            'images_per_sec': 100.0, 'best': None,\n"
           "            'final_eval': {'loss': 0.5, 'top1': 0.9, 'num_examples': 359.0},\n"
           "            'outputs': {'plot': 'P.png', 'checkpoints': 'C', 'metrics': 'M.jsonl',\n"
           "                        'tensorboard': 'TB'}}\n"
           "def initialize(timeout_s, on_timeout=None):\n"
           "    print(f'initialize(timeout_s={timeout_s!r})', flush=True)\n"
           "    on_timeout('stand-in: process 1 never joined', 0)\n"
           "    sys.exit(distributed.EXIT_STATUS)\n"
           "distributed.initialize = initialize\n"
           "for name in [k for k in os.environ if k.startswith('SLURM_')]:\n"
           "    del os.environ[name]\n"
           "os.environ.update(%s)")
# a task of a 2-task srun step: `should_initialize(None)` would connect the processes
_SRUN_TASK_1 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}


# Stand-in drivers the `refused` fixture runs (`python -m tests.experiments.test_train <name>
# experiments.train <flags>`, forked by run_commands): each runs experiments.train as the code
# would through `python -c <code> experiments.train <flags>`
_STAND_INS = {"crash_log_unwritable": _CRASH,
              "failed_in_training": _STAND_IN.format(body=_FAILED_IN_TRAINING),
              "refused_in_a_stopped_run": _STAND_IN.format(body=_REFUSED_IN_A_STOPPED_RUN),
              "data_not_prepared": _STAND_IN.format(body=_DATA_NOT_PREPARED),
              "crash_in_a_new_workdir": _CRASH,
              "crash_again": _CRASH,
              "crash_in_process_1": "import jax\njax.process_index, jax.process_count = (lambda: 1,"
                                    " lambda: 2)\n" + _CRASH,
              "ctrl_c_over_an_old_failure": _STAND_IN.format(body=_CTRL_C),
              "trained": _STAND_IN.format(body=_TRAINS % "{}"),
              "nodistributed_in_an_srun_step": _STAND_IN.format(body=_TRAINS % _SRUN_TASK_1),
              "config_distributed": _STAND_IN.format(body=_TRAINS % "{}")}
_STAND_IN_FLAGS = {"nodistributed_in_an_srun_step": ["--nodistributed"],
                   "config_distributed": ["--config.distributed=True"]}


def test_a_refusal_noted_in_a_stopped_runs_summary_points_to_it(refused):
    """A refused rerun of a stopped run notes itself as `refused` in its summary.json (the
    run's own message stays): the error must still point there."""
    workdir, failed = refused["refused_in_a_stopped_run"]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-2:] == [
        "error: num_train_steps=9 is invalid; the stopped run trains 120",
        f"(details in {workdir / 'summary.json'})"]


def test_data_not_prepared_is_one_line_pointing_to_the_summary(refused):
    """DatasetNotPreparedError (a FileNotFoundError) is a refusal the summary records: one line
    and the summary's path, no traceback kept in error.log."""
    workdir, failed = refused["data_not_prepared"]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-2:] == [
        "error: cifar10 is not prepared in /data", f"(details in {workdir / 'summary.json'})"]
    assert not (workdir / "error.log").exists()


@pytest.mark.parametrize("case", ["crash_in_a_new_workdir", "crash_again"])
def test_an_unexpected_error_keeps_one_traceback_even_in_a_new_workdir(refused, case):
    """The workdir is made for error.log when the crash came before the engine made it, and a
    rerun's error.log replaces the earlier one's (one traceback: this run's)."""
    workdir, failed = refused[case]
    log = _kept_traceback(failed, workdir, "RuntimeError: stand-in bug")
    text = log.read_text()
    assert text.count("Traceback (most recent call last):") == 1 and "earlier bug" not in text


def test_an_unexpected_error_in_process_1_keeps_its_own_log(refused):
    """Each process of a job writes its traceback to its own file: process 1 must not
    overwrite process 0's error.log."""
    workdir, failed = refused["crash_in_process_1"]
    assert failed.returncode == 1
    log = workdir / "error.process1.log"
    assert failed.stderr.strip().splitlines()[-2:] == ["error: RuntimeError: stand-in bug",
                                                       f"(traceback in {log})"]
    assert "RuntimeError: stand-in bug" in log.read_text()
    assert not (workdir / "error.log").exists()


def test_ctrl_c_does_not_report_an_earlier_failures_message(refused):
    """summary.json still holding an earlier run's failure (Ctrl-C came before the engine wrote
    its own) is not where this run stopped: the line says 'Ctrl-C'."""
    _, stopped = refused["ctrl_c_over_an_old_failure"]
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == "interrupted: Ctrl-C"


def test_a_finished_run_prints_its_summary_and_retires_an_old_traceback(refused):
    """A one-process run outside SLURM (summary from a stand-in engine, resumed at step 5):
    no multi-process start-up nor SLURM warning; the summary lines; an earlier error.log moved
    to error.previous.log."""
    workdir, result = refused["trained"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialize(" not in result.stdout
    assert "outside an srun job step" not in result.stderr
    assert result.stdout.splitlines() == [
        "Finished lenet5 on digits: steps 5->10 in 1.0 s, 3.0 s with the earlier runs "
        "(100 train images/s).",
        "Final eval: loss=0.5000, top1=0.9000",  # num_examples is a count, not a metric
        "Learning curves: P.png",
        "Checkpoints:     C",
        "Metrics:         M.jsonl (TensorBoard: TB)"]
    assert not (workdir / "error.log").exists()
    assert (workdir / "error.previous.log").read_text() == "an earlier run's traceback\n"


def test_nodistributed_in_an_srun_step_trains_as_one_process(refused):
    """--nodistributed wins over the automatic start-up of a task of a 2-task srun step."""
    _, result = refused["nodistributed_in_an_srun_step"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialize(" not in result.stdout
    assert result.stdout.startswith("Finished lenet5 on digits")


def test_config_distributed_starts_the_job_with_the_default_timeout(refused):
    """config.distributed=True (no flag) starts the multi-process job, waiting the documented
    300 s (launch/README.md); process 0's refusal goes to error.startup.log, unsuffixed."""
    workdir, result = refused["config_distributed"]
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["initialize(timeout_s=300.0)"]
    assert sorted(os.listdir(workdir)) == ["error.startup.log"]
    assert (workdir / "error.startup.log").read_text() == (
        "error: stand-in: process 1 never joined\n")


# experiments.train with an exit handler registered before it (so run after its own): what the
# interpreter's exit is left to collect once the command has ended
_AT_EXIT = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
            "sys.argv = sys.argv[1:]\n"
            "import runpy; runpy.run_module('experiments.train', run_name='__main__')")


@pytest.mark.slow
def test_a_finished_run_leaves_the_exit_nothing_to_collect(tmp_path):
    """The command ends with cli.end_command: Python's exit walked the ~580k objects
    TensorFlow, JAX, tfds and orbax leave three times (~2.2-2.5 s CPU after the last line)."""
    result = subprocess.run([sys.executable, "-c", _AT_EXIT,
                             *_command(tmp_path, "--config.num_train_steps=2",
                                       "--config.schedule.warmup_steps=0")[2:]],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "frozen at exit: True"


def test_a_workdir_in_use_is_a_one_line_error_and_left_untouched(refused):
    tmp_path, result = refused["in_use"]
    holder_pid = refused["in_use_holder_pid"]
    assert result.returncode == 1
    assert (f"error: workdir: {str(tmp_path)!r} is in use by another run (pid {holder_pid} "
            in result.stderr)
    assert "summary.json" not in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["run.lock"]


@pytest.mark.slow
def test_make_train_default_reaches_97_percent_and_says_where_outputs_are(tmp_path):
    """`make train`'s command (LeNet-5 on digits, default config) with a fresh tfds data dir:
    >= 97% test top-1 (the issue's "under 2 minutes" is measured, ~15 s, not asserted), final
    metrics and output paths printed."""
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    command = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 600
    assert summary["final_eval"]["num_examples"] == 359  # the whole digits test split
    assert summary["final_eval"]["top1"] >= 0.97  # its time is measured, not asserted (README)
    out = result.stdout
    assert f"Final eval: loss={summary['final_eval']['loss']:.4f}, " in out
    assert f"top1={summary['final_eval']['top1']:.4f}" in out
    for label, path in (("Learning curves:", "learning_curves.png"),
                        ("Checkpoints:", "checkpoints"), ("Metrics:", "metrics.jsonl")):
        line = next(x for x in out.splitlines() if x.startswith(label))
        assert str(workdir / path) in line and (workdir / path).exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_step_and_the_checkpoint_a_rerun_resumes_from(tmp_path):
    """Ctrl-C ends `experiments.train` with status 130 and one line, the message summary.json
    records (where it stopped, what a rerun resumes from), not a traceback."""
    workdir = tmp_path / "run"
    command = _command(workdir, "--config.num_train_steps=2000", "--config.eval_every_steps=1000",
                       "--config.checkpoint_every_steps=10",
                       # orbax logs its own traceback when Ctrl-C lands while it finishes a save
                       "--config.async_checkpoints=False")
    stderr = ctrl_c_after_checkpoint(command, _env(), workdir / "checkpoints", 10)
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "interrupted" and summary["error"] == "KeyboardInterrupt"
    assert "resume" in summary["message"], summary["message"]
    assert stderr.strip().splitlines()[-1] == f"interrupted: {summary['message']}"


if __name__ == "__main__":  # a stand-in driver, for the `refused` fixture (see `_STAND_INS`)
    exec(_STAND_INS[sys.argv.pop(1)])  # noqa: S102 — argv then reads as `python -c` gives it
