"""cnnjax.utils.cli: config-file flag errors as one line."""

import pytest
from absl import flags
from ml_collections import config_flags

from cnnjax.utils import cli
from tests.commands import ROOT, run_commands


def _parsed(*args):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "an ordinary flag", flag_values=values)
    values(["prog", *args])
    return values


@pytest.mark.parametrize("args", [
    ("--config=experiments/configs/nope.py",),
    ("--config", "experiments/configs/nope.py"),  # absl's other syntax
])
def test_a_missing_config_file_is_named_in_either_flag_syntax(args):
    assert cli.missing_config_file(_parsed(*args)) == (
        "--config='experiments/configs/nope.py' is invalid; no such config file")


def test_a_missing_default_config_file_is_named_with_its_flag(tmp_path, monkeypatch):
    """A default relative to the repository, run from elsewhere: ml_collections' own message
    named neither the flag nor what to do."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "experiments/configs/lenet5_digits.py", "config",
                                    flag_values=values, lock_config=True)
    monkeypatch.chdir(tmp_path)
    values(["prog"])
    assert cli.missing_config_file(values) == (
        f"--config (default 'experiments/configs/lenet5_digits.py') is invalid; no such config "
        f"file in {str(tmp_path)!r} (run from the repository root, or pass --config=<file>)")


def test_existing_files_and_ordinary_flags_ending_in_py_pass():
    values = _parsed("--config=experiments/configs/lenet5_digits.py", "--workdir=runs/exp.py")
    assert cli.missing_config_file(values) is None
    assert cli.missing_config_file(_parsed("--workdir=w")) is None  # no config given at all


def test_the_override_that_failed_is_named():
    err = KeyError(KeyError('\'learnin_rate\'\nDid you mean "learning_rate" instead?'))
    assert cli.describe_flag_error(
        ["--config=c.py", "--config.seed=1", "--config.optimizer.learnin_rate=0.1"], err) == (
        "--config.optimizer.learnin_rate=0.1 is invalid; the config has no field "
        "'learnin_rate'; Did you mean \"learning_rate\" instead?")
    assert cli.describe_flag_error(["--config.bogus=1"], AttributeError(KeyError("'bogus'"))) \
        == "--config.bogus=1 is invalid; the config has no field 'bogus'"
    assert cli.describe_flag_error([], ValueError("bad")) == "bad"


def test_a_misspelt_model_kwargs_field_lists_the_models_fields():
    """The README promises the list; ml_collections' KeyError alone names only the typo."""
    err = AttributeError(KeyError("'depth'"))
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.model_kwargs.depth=3"]
    assert cli.describe_flag_error(args, err) == (
        "--config.model_kwargs.depth=3 is invalid; the config has no field 'depth'; model "
        "'lenet5' accepts model_kwargs ['activation', 'c3_table', 'subsampling']")
    overridden = cli.model_kwargs_hint([*args, "--config.model=resnet20_cifar"])
    assert overridden.startswith("; model 'resnet20_cifar' accepts model_kwargs [")
    assert cli.model_kwargs_hint(["--config=nowhere.py"]) == ""  # only a hint: never raises


def test_a_model_kwargs_field_of_the_overriding_model_names_the_files_model():
    """googlenet's `aux_logits` on a resnet18 config file with --config.model=googlenet was
    refused while the hint listed it among googlenet's valid fields."""
    args = ["--config=experiments/configs/fake_data_benchmark.py", "--config.model=googlenet",
            "--config.model_kwargs.aux_logits=True"]
    assert cli.describe_flag_error(args, AttributeError(KeyError("'aux_logits'"))) == (
        "--config.model_kwargs.aux_logits=True is invalid; the config has no field "
        "'aux_logits'; model 'googlenet' takes it, but the config file declares model_kwargs "
        "for its own model 'resnet18': write a config file with config.model='googlenet' "
        "(experiments/README.md, 'Model hyperparameters')")


def test_absl_flag_errors_are_one_line():
    values = flags.FlagValues()
    flags.DEFINE_integer("steps", 1, "an int flag", flag_values=values)
    flags.DEFINE_bool("verbose", False, "a bool flag", flag_values=values)
    for args, line in [
        (["--steps=abc"], "--steps='abc' is invalid; invalid literal for int() with base 10: "
                          "'abc'"),
        (["--stesp=3"], "Unknown command line flag 'stesp'. Did you mean: steps ? "
                        "(--helpshort lists the flags)"),
        (["--verbose=maybe"], "--verbose='maybe' is invalid; expected true or false"),
    ]:
        with pytest.raises(flags.Error) as caught:
            values(["prog", *args])
        assert cli.absl_flag_error(caught.value) == line
    with pytest.raises(flags.Error) as caught:
        values(["prog", "--config.x=1"])
    assert cli.absl_flag_error(caught.value, lambda name: f"; {name} goes after --") == (
        "Unknown command line flag 'config.x'; config.x goes after -- (--helpshort lists the "
        "flags)")


def test_the_unknown_flag_hint_is_added_to_an_unknown_flag_only():
    """absl's mutual-exclusion error (an IllegalFlagValueError without the `flag --x=v:` text)
    names no single flag: a hint for it was an AttributeError on `err.flagname`."""
    values = flags.FlagValues()
    flags.DEFINE_string("a", None, "", flag_values=values)
    flags.DEFINE_string("b", None, "", flag_values=values)
    flags.mark_flags_as_mutual_exclusive(["a", "b"], flag_values=values)
    with pytest.raises(flags.Error) as caught:
        values(["prog", "--a=1", "--b=2"])
    assert cli.absl_flag_error(caught.value, lambda name: f"; hint for {name}") == (
        "flags a=1, b=2: At most one of (a, b) must have a value other than None. (--helpshort "
        "lists the flags)")


def _parsed_with_none(*args):
    """`cli.parse_with_none` over the digits config, as an entry point parses its flags."""
    argv = ["prog", "--config=experiments/configs/lenet5_digits.py", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "an ordinary flag", flag_values=values)
    cli.parse_with_none(values, argv)
    return values


def _config_flag(argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    return values


def test_a_tuple_field_given_twice_is_refused_not_joined(monkeypatch):
    """ml_collections joins a tuple field's repeated values ((0, 1) then (2,) gave classes
    (0, 1, 2)), where any other field keeps the last: refused, naming the field."""
    argv = ["prog", "--config=experiments/transfers/digits_0to4_to_5to9.py",
            "--config.source.data.classes=(0, 1)", "--config.target.seed=1",
            "--config.source.data.classes=(2,)", "--config.target.seed=2"]
    values = _config_flag(argv)
    values(argv)
    assert values["config"].value.source.data.classes == (0, 1, 2)  # what ml_collections does
    assert _refusal(monkeypatch, argv, _config_flag(argv)) == (
        "error: --config.source.data.classes is invalid given 2 times; ml_collections would "
        "join their values into one tuple, not keep the last as for other fields: give it once, "
        "with every value (e.g. --config.source.data.classes='(1, 2)')")
    once = [*argv[:2], "--config.source.data.classes=(0, 1, 2)", argv[3], argv[5]]
    monkeypatch.setattr(cli.flags, "FLAGS", _config_flag(once))
    cli.parse_flags(once)
    assert cli.flags.FLAGS["config"].value.target.seed == 2  # the last wins


def test_none_unsets_a_field_the_config_declares_none_able():
    """ml_collections parsed `None` by the field's type: the string 'None' for
    `init_from.workdir` (a warm start from a folder named None) and an error for `ema.decay`."""
    values = _parsed_with_none(
        "--config.ema.decay=0.999", "--config.ema.decay=None", "--config.init_from.workdir=None",
        "--config.freeze", "None",  # absl's `--flag value` syntax
        "--config.model_kwargs.activation=None", "--config.seed=3", "--workdir=None")
    config = values["config"].value
    assert config.ema.decay is None and config.init_from.workdir is None
    assert config.freeze is None and config.model_kwargs.activation is None
    assert config.seed == 3
    assert values["workdir"].value == "None"  # a plain flag is not a config field


@pytest.mark.parametrize("args, decay", [
    (("--config.ema.decay=None", "--config.ema.decay=0.9"), 0.9),  # the last override wins
    (("--config.ema.decay=0.9", "--config.ema.decay=None"), None),
    (("--config.ema.decay=None", "--config.ema.warmup=False"), None),
    (("-config.ema.decay=0.9", "-config.ema.decay=None"), None),  # absl takes one dash too
])
def test_the_last_override_of_a_field_wins_with_none_too(args, decay):
    assert _parsed_with_none(*args)["config"].value.ema.decay == decay


def test_none_for_a_field_that_needs_a_value_is_refused_by_name():
    with pytest.raises(cli.NoneOverrideError) as caught:
        _parsed_with_none("--config.optimizer.learning_rate=None")
    assert str(caught.value) == (
        "--config.optimizer.learning_rate='None' is invalid; config.optimizer.learning_rate "
        "cannot be None (it holds a float; a command line can unset only a field the config "
        "declares None-able)")


def test_none_in_the_space_syntax_is_the_overrides_value_not_an_argument():
    """`--config.freeze None`: left in the arguments, the `None` reached `start_command` as a
    positional argument, which it refuses."""
    argv = ["prog", "--config=experiments/configs/lenet5_digits.py", "--config.freeze", "None",
            "--workdir", "w"]
    values = _config_flags(argv)
    assert cli.parse_with_none(values, argv) == ["prog"]
    assert values["config"].value.freeze is None and values.workdir == "w"


def test_a_later_field_whose_name_starts_the_same_does_not_cancel_none():
    """`model` is a string prefix of `model_kwargs`, not a group above it: setting
    `--config.model` after `--config.model_kwargs.drop_rate=None` leaves the None."""
    from experiments.configs import wrn28_10_cifar10

    assert wrn28_10_cifar10.get_config().model_kwargs.drop_rate == 0.3  # what None replaces
    argv = ["prog", "--config=experiments/configs/wrn28_10_cifar10.py",
            "--config.model_kwargs.drop_rate=None", "--config.model=wrn28_10_cifar"]
    values = _config_flag(argv)
    cli.parse_with_none(values, argv)
    assert values["config"].value.model_kwargs.drop_rate is None
    assert values["config"].value.model == "wrn28_10_cifar"


_DIGITS = "experiments/configs/lenet5_digits.py"


def _config_and_sweep_flags(argv):
    """Two config-file flags, `--config` and `--sweep`, as experiments.sweep defines them."""
    values = _config_flag(argv)
    config_flags.DEFINE_config_file("sweep", None, "sweep file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    return values


def test_the_same_field_of_another_config_flag_does_not_cancel_none():
    argv = ["prog", f"--config={_DIGITS}", f"--sweep={_DIGITS}", "--config.ema.decay=0.9",
            "--config.ema.decay=None", "--sweep.ema.decay=0.5"]
    values = _config_and_sweep_flags(argv)
    cli.parse_with_none(values, argv)
    assert values["config"].value.ema.decay is None
    assert values["sweep"].value.ema.decay == 0.5


def test_none_override_paths_lists_the_named_flags_fields_only():
    """experiments.sweep adds them to --config's overrides: a `--sweep.<field>=None` is not
    one."""
    argv = ["prog", f"--config={_DIGITS}", f"--sweep={_DIGITS}",
            "--config.init_from.workdir=None", "--sweep.ema.decay", "None", "--config.seed=1",
            "--config.ema.warmup=None"]
    values = _config_and_sweep_flags(argv)
    assert cli.none_override_paths(values, argv, "config") == [
        "init_from.workdir", "ema.warmup"]
    assert cli.none_override_paths(values, argv, "sweep") == ["ema.decay"]


def test_a_value_given_to_a_group_of_fields_names_its_fields():
    """`--config.optimizer=adam` (for .name=adam) read "Failed to parse 'adam' as a ConfigDict:
    ValueError('malformed node or string ...')"."""
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.optimizer=adam"]
    # absl's error as the command gets it (the command itself: test_the_command_reports_...)
    err = flags.IllegalFlagValueError(
        "flag --config.optimizer=adam: Failed to parse 'adam' as a ConfigDict: "
        "ValueError('malformed node or string on line 1: <ast.Name object at 0x7f>')")
    assert cli.group_not_value(args, err) == (
        "--config.optimizer='adam' is invalid; config.optimizer is a group of fields (b1, b2, "
        "decay, eps, grad_clip_norm, learning_rate, momentum, name, nesterov, weight_decay), not "
        "a value: set one of them, e.g. --config.optimizer.name=adam")
    assert cli.group_not_value(args, flags.Error("flag --x=1: bad")) == ""


def test_a_config_file_without_get_config_is_named():
    err = AttributeError("module 'sweep_config' has no attribute 'get_config'")
    assert cli.describe_flag_error(["--sweep=helpers.py", "--config=c.py"], err) == (
        "--sweep='helpers.py' is invalid; it defines no get_config() (a config file is a module "
        "whose get_config() returns its ConfigDict)")


def test_a_command_refuses_positional_arguments():
    """In one line: absl's UsageError printed the flag help (24 lines for train) above it."""
    with pytest.raises(SystemExit, match=r"^error: unexpected argument \['extra'\] \(flags are "
                                         r"written --name=value; --helpshort lists them\)$"):
        cli.start_command(["prog", "extra"])
    with pytest.raises(SystemExit, match=r"^error: unexpected arguments \['a', 'b'\] "):
        cli.start_command(["prog", "a", "b"])
    cli.start_command(["prog"])


# A command's end: garbage there is then (`dropped`) is finalized; what is still alive (`kept`,
# a cycle reachable from the module) is frozen, so the exit's collections skip it (and with it
# the rest of TensorFlow, JAX, tfds and orbax). Run in a child: freezing is for a process's end.
# Counts are against the child's start: CPython 3.12 starts with objects of its own in the
# permanent generation (375 on 3.12.1, 0 on 3.11).
_END_COMMAND = """
import gc
before = gc.get_freeze_count()
from cnnjax.utils import cli

class Cycle:
    def __init__(self, name):
        self.name, self.me = name, self

    def __del__(self):
        print("finalized", self.name, flush=True)

dropped = Cycle("dropped")
del dropped
kept = Cycle("kept")
assert gc.get_freeze_count() == before
cli.end_command()
print("frozen", kept.name, any(o is kept for o in gc.get_objects(generation=2)),
      gc.get_freeze_count() > before, flush=True)
"""


def test_a_command_ends_by_finalizing_its_garbage_and_freezing_the_rest():
    """Python's exit ran three full collections over the ~580k objects TensorFlow, JAX, tfds
    and orbax leave (~2.2-2.5 s CPU after make train's last line); end_command collects once
    and freezes the survivors, which are never garbage before the process ends."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _END_COMMAND], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["finalized dropped", "frozen kept False True"]


# An exit handler registered before the command starts runs after those registered later.
_STARTED_COMMAND = """
import atexit, gc
before = gc.get_freeze_count()
freezes, freeze = [], gc.freeze
gc.freeze = lambda: (freezes.append(1), freeze())[-1]
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > before, "times:",
                              len(freezes), flush=True))
from cnnjax.utils import cli
cli.start_command(["prog"])
cli.start_command(["prog"])  # a second command in one process: still one handler (once)
print("started", gc.get_freeze_count() - before, flush=True)
"""


def test_a_started_command_ends_its_process_with_end_command():
    """start_command registers end_command at exit, so every command's exit (evaluate, sweep,
    tune, ... as well as train, on success or error) skips the walk over what is alive."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _STARTED_COMMAND], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["started 0", "frozen at exit: True times: 1"]


# Ctrl-C (a SIGINT 0.5 s in) while XLA compiles a ~1-2 s program, inside exit_on_ctrl_c.
_CTRL_C_MID_COMPILE = """
import atexit, os, signal, threading
import jax, jax.numpy as jnp
from cnnjax.utils.cli import exit_on_ctrl_c
atexit.register(lambda: print("exit handlers ran", flush=True))
def f(x, ws):
    for i, w in enumerate(ws):
        x = jax.nn.relu(jax.lax.conv(x, w, (1, 1), "SAME"))
        x = jnp.sin(x) * jnp.cos(x * (1 + i % 7)) + jnp.tanh(x) ** 2 - jnp.exp(-x * x)
    return x.sum()
ws = [jnp.full((8, 8, 3, 3), 0.01) for _ in range(200)]
lowered = jax.jit(jax.grad(f, argnums=1)).lower(jnp.ones((8, 8, 32, 32)), ws)
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
with exit_on_ctrl_c(lambda: "mid-compile"):
    lowered.compile()
    print("compiled before the signal", flush=True)
"""


def test_ctrl_c_during_an_xla_compile_exits_130_after_the_exit_handlers():
    """The KeyboardInterrupt leaves JAX's wait while the compile goes on in XLA's threads;
    sys.exit(130) then destroyed LLVM's globals under them: exit -11 (SIGSEGV) or -6 in 2 of
    6 runs of this script, 8 of 10 Ctrl-C'd `experiments.train` compiles. Two runs at once."""
    import subprocess
    import sys

    runs = [subprocess.Popen([sys.executable, "-c", _CTRL_C_MID_COMPILE], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 130, stderr[-2000:]
        assert stdout.splitlines() == ["exit handlers ran"], (stdout, stderr[-2000:])
        assert stderr.splitlines()[-1] == "interrupted: mid-compile"


def test_sigterms_training_interrupted_goes_through_exit_on_ctrl_c(monkeypatch, capsys):
    """TrainingInterrupted is a KeyboardInterrupt too, but also a SystemExit: it leaves with
    143 (SIGTERM), where a Ctrl-C's KeyboardInterrupt ends the process with 130 and a line."""
    from cnnjax.train.preemption import TrainingInterrupted

    exits = []
    monkeypatch.setattr(cli, "exit_after_exit_handlers", exits.append)
    with pytest.raises(TrainingInterrupted) as caught, cli.exit_on_ctrl_c(lambda: "step 5"):
        raise TrainingInterrupted(5)
    assert caught.value.code == 143 and exits == [] and capsys.readouterr().err == ""
    with cli.exit_on_ctrl_c(lambda: "step 5"):
        raise KeyboardInterrupt
    assert exits == [130] and capsys.readouterr().err == "interrupted: step 5\n"


def test_a_command_that_loaded_triton_is_not_frozen_as_it_ends():
    """torchvision imports triton, whose nanobind bindings print ~100 lines of "nanobind: leaked
    ..." at exit for each of their objects still alive then, frozen ones included."""
    pytest.importorskip("torchvision")
    import subprocess
    import sys

    script = "import torchvision\n" + _STARTED_COMMAND
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["started 0", "frozen at exit: False times: 0"]
    assert "leaked" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("err, line", [
    (ValueError("robustness: seed=-1 is invalid; expected a non-negative integer"),
     "error: robustness: seed=-1 is invalid; expected a non-negative integer"),
    (FileNotFoundError("data: dataset 'x' is not prepared"),
     "error: data: dataset 'x' is not prepared"),
])
def test_bad_input_ends_the_command_in_one_line(err, line):
    with pytest.raises(SystemExit) as exited, cli.one_line_errors():
        raise err
    assert exited.value.code == line


def test_the_hint_follows_the_error_and_other_errors_pass_through():
    with pytest.raises(SystemExit) as exited, cli.one_line_errors(lambda err: " (a hint)"):
        raise ValueError("bad")
    assert exited.value.code == "error: bad (a hint)"
    with pytest.raises(KeyError), cli.one_line_errors():
        raise KeyError("a bug is a traceback")


def test_a_library_argument_set_by_a_given_flag_is_named_by_the_flag():
    """evaluate and visualize printed `load_trained: step=5 is invalid` for `--step=5`."""
    values = flags.FlagValues()
    step = flags.DEFINE_integer("step", None, "", flag_values=values)
    workdir = flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(["prog", "--step=5"])
    named = {"load_trained: step=": step, "load_trained: workdir=": workdir}
    with pytest.raises(SystemExit) as exited, cli.one_line_errors(flags_named=named):
        raise ValueError("load_trained: step=5 is invalid; it has checkpoints [2, 4]")
    assert exited.value.code == "error: --step=5 is invalid; it has checkpoints [2, 4]"
    # a flag left out (the library chose the value) keeps the library's words, as other errors
    for err in ("load_trained: workdir='x' is invalid; no run", "data: name='x' is invalid"):
        with pytest.raises(SystemExit) as exited, cli.one_line_errors(flags_named=named):
            raise ValueError(err)
        assert exited.value.code == f"error: {err}"


def test_only_a_value_error_is_renamed_to_the_flag_that_set_the_argument():
    """A FileNotFoundError from the library keeps its words, given flag or not."""
    values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(["prog", "--workdir=x"])
    named = {"load_trained: workdir=": workdir}
    text = "load_trained: workdir='x' is invalid; no run there"
    with pytest.raises(SystemExit) as exited, cli.one_line_errors(flags_named=named):
        raise FileNotFoundError(text)
    assert exited.value.code == f"error: {text}"
    with pytest.raises(SystemExit) as exited, cli.one_line_errors(flags_named=named):
        raise ValueError(text)
    assert exited.value.code == "error: --workdir='x' is invalid; no run there"


@pytest.mark.parametrize("err, line", [
    (PermissionError(13, "Permission denied", "/runs/a/robustness"),
     "error: cannot access '/runs/a/robustness': Permission denied"),
    (PermissionError(13, "Permission denied", "/runs/a/r.json.1.tmp", None, "/runs/a/r.json"),
     "error: cannot access '/runs/a/r.json.1.tmp' or '/runs/a/r.json': Permission denied"),
    (OSError(30, "Read-only file system", b"/runs/b"),
     "error: cannot access '/runs/b': Read-only file system"),
    (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),
])
def test_a_path_it_cannot_write_ends_the_command_in_one_line_naming_it(err, line):
    with pytest.raises(SystemExit) as exited, cli.one_line_errors():
        raise err
    assert exited.value.code == line


def test_a_config_file_argument_that_get_config_refuses_is_named_in_one_line():
    from absl import flags as absl_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values)
    with pytest.raises(absl_flags.Error) as caught:
        values(["prog", "--config=experiments/configs/rcnn_shapes.py:bogus"])
    assert cli.config_file_error(caught.value) == (
        "--config='experiments/configs/rcnn_shapes.py:bogus' is invalid; config: "
        "argument='bogus' is invalid; expected one of ['windows', 'selective_search'].")
    assert cli.config_file_error(absl_flags.Error("Unknown command line flag 'x'")) is None


def test_the_command_reports_flag_errors_in_one_line():
    """`python -m experiments.train` (and sweep) with eight bad command lines, run by one
    interpreter that forks a child per command (tests/commands.py: 6 process starts cost
    17 s)."""
    import os

    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    lenet = ("--config=experiments/configs/lenet5_digits.py", "--workdir=unused")
    bad, unknown, bad_value, group, typo, default, no_sweep, no_workdir = run_commands([
        ("experiments.train", "--config=experiments/configs/rcnn_shapes.py:bogus",
         "--workdir=unused"),
        ("experiments.train", "--bogusflag=1"),
        ("experiments.train", *lenet, "--config.num_train_steps=abc"),
        ("experiments.train", *lenet, "--config.optimizer=adam"),
        ("experiments.train", *lenet, "--config.bogus=1"),
        ("experiments.train", "--workdir=unused", "--config.model_kwargs.depth=3"),
        # an override without its config-file flag: the missing flag, not an unknown flag
        ("experiments.sweep", lenet[0], "--sweep_dir=unused", "--sweep.seed=1"),
        ("experiments.train", lenet[0]),  # no --workdir: not a TypeError deep in the engine
    ], env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "FATAL" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --config='experiments/configs/rcnn_shapes.py:bogus' is invalid; config: "
        "argument='bogus' is invalid; expected one of ['windows', 'selective_search'].")
    assert unknown.returncode == 1 and "FATAL" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1] == (
        "error: Unknown command line flag 'bogusflag' (--helpshort lists the flags)")
    # absl's own report re-parsed the flags, and ml_collections' override flags were then
    # "defined twice": the bad value went unreported
    assert bad_value.returncode == 1 and "defined twice" not in bad_value.stderr
    assert bad_value.stderr.strip().splitlines()[-1] == (
        "error: --config.num_train_steps='abc' is invalid; invalid literal for int() with "
        "base 10: 'abc'")
    assert group.returncode == 1 and group.stderr.strip().splitlines()[-1].startswith(
        "error: --config.optimizer='adam' is invalid; config.optimizer is a group of fields (b1,")
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines()[-1].startswith(
        "error: --config.bogus=1 is invalid; the config has no field 'bogus'; config has fields "
        "['async_checkpoints', ")
    # the default config file is loaded, with the overrides, when the flag is defined: that
    # was a traceback at import
    assert default.returncode == 1 and "Traceback" not in default.stderr
    assert default.stderr.strip().splitlines()[-1] == (
        "error: --config.model_kwargs.depth=3 is invalid; the config has no field 'depth'; "
        "model 'lenet5' accepts model_kwargs ['activation', 'c3_table', 'subsampling']")
    assert no_sweep.returncode == 1 and no_sweep.stderr.strip().splitlines()[-1] == (
        "error: --sweep is required (--sweep.seed sets a field of the file --sweep names: give "
        "--sweep=<file>.py before it)")
    assert no_workdir.returncode == 1 and "Traceback" not in no_workdir.stderr
    assert no_workdir.stderr.strip().splitlines()[-1] == "error: --workdir is required"


@pytest.mark.parametrize("script", [
    *(f"experiments/{name}.py" for name in ("evaluate", "lr_range_test", "proposals", "rcnn_svm",
                                            "robustness", "sweep", "train", "transfer", "tune",
                                            "visualize")),
    "launch/submit.py", "cnnjax/analysis/summary.py", "cnnjax/analysis/zoo.py",
    "cnnjax/analysis/effective_receptive_field.py", "cnnjax/models/torchvision_weights.py",
    "cnnjax/tune/diagnose.py",
])
def test_every_entry_point_parses_its_flags_with_parse_flags(script):
    """So a bad flag or config file is reported the same one-line way by every command."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, script), encoding="utf-8") as f:
        source = f.read()
    assert ("app.run(main, flags_parser=parse_flags)" in source
            or "app.run(main, flags_parser=functools.partial(parse_flags," in source)
    assert "config_flags.DEFINE_config_file(" not in source  # define_config_file's errors too


def test_launch_submit_says_where_an_entry_points_override_goes():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--entry=train", "--workdir=unused", "--dry_run",
         "--config=experiments/configs/lenet5_digits.py", "--config.num_train_steps=40"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Unknown command line flag 'config.num_train_steps'; --config.num_train_steps "
        "looks like an override of the entry point: put it after `--` (... --dry_run -- "
        "--config.num_train_steps=...) (--helpshort lists the flags)")


def test_an_override_below_a_plain_value_names_that_value():
    """`--config.model.name=x` where `model` is a string: ml_collections' lookup fails with
    "string indices must be integers", which named neither the flag nor the field."""
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.seed=1",
            "--config.model.name=bogus"]
    err = TypeError("string indices must be integers, not 'str'")
    assert cli.describe_flag_error(args, err) == (
        "--config.model.name=bogus is invalid; config.model is a str ('lenet5'), not a group of "
        "fields; set it with --config.model=<value>")
    assert cli.value_not_group(args, "--config.num_train_steps.x=1") == (
        "config.num_train_steps is an int (600), not a group of fields; set it with "
        "--config.num_train_steps=<value>")
    assert cli.value_not_group(args, "--config.optimizer.name=adam") == ""  # a real field
    assert cli.value_not_group(args, "--config.nope.x=1") == ""  # missing: KeyError's message
    assert cli.value_not_group(["--config=nowhere.py"], "--config.model.x=1") == ""


def test_a_misspelt_field_without_a_close_match_lists_its_groups_fields():
    """ml_collections suggests a field only when one is close (`mixupp` is not close to
    `mixup_alpha`): the error then named the typo but nothing valid."""
    from experiments.configs import lenet5_digits

    config = lenet5_digits.get_config()
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.mixing.name=mixup"]
    assert cli.describe_flag_error(args, AttributeError(KeyError("'name'"))) == (
        "--config.mixing.name=mixup is invalid; the config has no field 'name'; config.mixing "
        f"has fields {sorted(config.mixing)}")
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.zzz.yyy=1"]
    assert cli.describe_flag_error(args, AttributeError(KeyError("'zzz'"))) == (
        "--config.zzz.yyy=1 is invalid; the config has no field 'zzz'; config has fields "
        f"{sorted(config)}")
    suggested = AttributeError(KeyError("'nam'\nDid you mean \"name\" instead of \"nam\"?"))
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.optimizer.nam=sgd"]
    assert "has fields" not in cli.describe_flag_error(args, suggested)  # the suggestion is
    assert cli.missing_field_hint(["--config=nowhere.py"], "--config.x=1") == ""  # enough


def test_a_misspelt_group_on_the_path_is_named():
    err = AttributeError(KeyError("'nam'\nDid you mean \"name\" instead of \"nam\"?"))
    args = ["--config=experiments/configs/lenet5_digits.py", "--config.optimizer.nam.x=1"]
    assert cli.describe_flag_error(args, err) == (
        "--config.optimizer.nam.x=1 is invalid; the config has no field 'nam'; Did you mean "
        "\"name\" instead of \"nam\"?")


def test_a_misspelt_field_is_blamed_not_a_valid_override_naming_a_similar_one():
    """`decay` is in "weight_decy ... weight_decay": the override ml_collections' KeyError names
    first is the culprit, not the first one any of whose names the message contains."""
    err = AttributeError(KeyError("'weight_decy'\nDid you mean \"weight_decay\" instead?"))
    args = ["--config=c.py", "--config.ema.decay=0.999", "--config.optimizer.weight_decy=1e-4"]
    assert cli.describe_flag_error(args, err).startswith(
        "--config.optimizer.weight_decy=1e-4 is invalid; the config has no field 'weight_decy'")
    err = AttributeError(KeyError("'warmup_step'\nDid you mean \"warmup_steps\" instead?"))
    args = ["--config.schedule.warmup_steps=5", "--config.schedule.warmup_step=5"]
    assert cli.describe_flag_error(args, err).startswith("--config.schedule.warmup_step=5 is ")


def test_the_config_file_given_with_a_space_is_read_for_the_hints():
    """absl takes `--config FILE` as well as `--config=FILE`; the hints read either."""
    args = ["--config", "experiments/configs/lenet5_digits.py", "--config.model.name=bogus"]
    assert cli.describe_flag_error(args, TypeError("string indices must be integers")) == (
        "--config.model.name=bogus is invalid; config.model is a str ('lenet5'), not a group of "
        "fields; set it with --config.model=<value>")
    assert cli.model_kwargs_hint(args).startswith("; model 'lenet5' accepts model_kwargs [")
    assert cli.flag_value(["--config=a.py", "--config", "b.py"], "config") == "b.py"  # the last
    # absl stops at a bare `--` (what follows is positional), unless it is a flag's value
    assert cli.flag_value(["--config=a.py", "--", "--config=b.py"], "config") == "a.py"
    assert cli.flag_value(["--", "--config", "b.py"], "config") is None
    assert cli.flag_value(["--config", "--"], "config") == "--"


UNWRITABLE_OUTPUT_COMMANDS = [
    ("experiments.tune", "--config=experiments/configs/lenet5_digits.py",
     "--recipe=experiments/recipes/lenet5_digits.py", "--tune_dir=/proc/cnnjax_test/tune"),
    ("launch.submit", "--entry=train", "--config=experiments/configs/lenet5_digits.py",
     "--workdir=/proc/cnnjax_test/job", "--gpus_per_node=0", "--nocheck_configs",
     "--venv="),  # no venv: the repository's .venv is absent where tests run from another
    ("experiments.transfer", "--transfer=experiments/transfers/digits_0to4_to_5to9.py",
     "--transfer_dir=/proc/cnnjax_test/transfer"),
    ("experiments.proposals", "--config=experiments/configs/rcnn_shapes.py:selective_search",
     "--config.data.data_dir=/proc/cnnjax_test/data"),
    ("experiments.sweep", "--config=experiments/configs/lenet5_digits.py",
     "--sweep=experiments/sweeps/lenet5_digits_lr.py", "--sweep_dir=/proc/cnnjax_test/sweep"),
]


@pytest.fixture(scope="module")
def unwritable_output_results(tmp_path_factory) -> dict:
    """The commands run by one interpreter forking a child each (tests/commands.py: one process
    start and TensorFlow import instead of five), with an empty tfds data dir of their own under
    the key "tfds_data_dir"."""
    import os

    tfds_dir = tmp_path_factory.mktemp("tfds_untouched")
    env = {**os.environ, "PYTHONPATH": ROOT, "TFDS_DATA_DIR": str(tfds_dir)}
    # what the commands import only once running, imported once (JAX, flax and orbax with
    # cnnjax.tune.sweep: ~1.5 s a child otherwise)
    results = run_commands(UNWRITABLE_OUTPUT_COMMANDS, env=env,
                           preimport=["cnnjax.data.pipeline", "cnnjax.tune.sweep",
                                      "cnnjax.data.proposals"])
    return {**dict(zip(UNWRITABLE_OUTPUT_COMMANDS, results, strict=True)),
            "tfds_data_dir": tfds_dir}


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("args", UNWRITABLE_OUTPUT_COMMANDS)
def test_an_output_folder_that_cannot_be_made_ends_the_command_in_one_line(
        args, unwritable_output_results):
    """tune and launch.submit as sweep does: an OSError on their output folder (here under
    /proc, where nothing can be created, even by root) is one `error:` line naming it."""
    result = unwritable_output_results[args]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/proc/cnnjax_test" in last, last
    # Refused before reading data: sweep, tune and transfer generated `digits` first (tfds's
    # build banner on stdout) wherever the data dir did not hold it yet.
    assert result.stdout == "", result.stdout
    assert not any(unwritable_output_results["tfds_data_dir"].iterdir())


@pytest.mark.parametrize("args", [
    ("--config=experiments/configs/nope.py", "--config.seed=1"),
    ("--config", "experiments/configs/nope.py", "--config.seed=1"),
])
def test_a_missing_config_file_given_with_overrides_is_named(args, monkeypatch):
    """The override's parse failed first with ml_collections' OSError, reported as
    "Configuration is not available ... config_config ..." without the flag's name."""
    argv = ["prog", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "an ordinary flag", flag_values=values)
    assert _refusal(monkeypatch, argv, values) == (
        "error: --config='experiments/configs/nope.py' is invalid; no such config file")


def _alias_flags():
    values = flags.FlagValues()
    flags.DEFINE_string("output_dir", None, "Where.", flag_values=values)
    flags.DEFINE_alias("out_dir", "output_dir", flag_values=values)
    flags.DEFINE_integer("eval_batch_size", 256, "Batch.", flag_values=values)
    flags.DEFINE_alias("batch_size", "eval_batch_size", flag_values=values)
    return values


@pytest.mark.parametrize("args", [["--output_dir=a", "--out_dir=b"],
                                  ["--out_dir=b", "--output_dir=a"],
                                  ["--out_dir=a", "--output_dir=a"]])
def test_a_flag_and_its_alias_given_together_are_refused(args, monkeypatch):
    """`experiments.visualize --output_dir=a --out_dir=b` wrote to b and ignored a without a
    word (absl parses both names into one flag, the last one winning); so did robustness's
    --eval_batch_size/--batch_size and the ERF tool's --output/--out."""
    monkeypatch.setattr(flags, "FLAGS", _alias_flags())
    with pytest.raises(SystemExit, match=r"^error: --out_dir and --output_dir are invalid "
                                         r"together; --out_dir is another name for "
                                         r"--output_dir: give one of them$"):
        cli.parse_flags(["prog", *args])


@pytest.mark.parametrize("args", [["--out_dir=b"], ["--output_dir=a"], [],
                                  ["--out_dir=a", "--out_dir=b", "--batch_size=8"]])
def test_a_flag_or_its_alias_alone_is_accepted(args, monkeypatch):
    values = _alias_flags()
    monkeypatch.setattr(flags, "FLAGS", values)
    assert cli.parse_flags(["prog", *args]) == ["prog"]
    assert cli.alias_and_original_given(values) == ""


def test_a_plain_multi_flag_given_twice_keeps_both_values(monkeypatch):
    """Only a config's tuple field is refused given twice: `launch.submit --env A=1 --env B=2`
    repeats its multi flag as its help says."""
    values = flags.FlagValues()
    flags.DEFINE_multi_string("env", [], "KEY=VALUE, repeatable", flag_values=values)
    monkeypatch.setattr(cli.flags, "FLAGS", values)
    assert cli.parse_flags(["prog", "--env=A=1", "--env", "B=2"]) == ["prog"]
    assert values.env == ["A=1", "B=2"]


def test_exit_command_exits_as_sys_exit_without_stuck_threads():
    from cnnjax.utils import cli

    with pytest.raises(SystemExit) as exited:
        cli.exit_command("error: x")
    assert exited.value.code == "error: x"


@pytest.mark.parametrize(("status", "code", "err"), [
    ("error: save failed", 1, "error: save failed\n"),  # as sys.exit: a message is status 1
    (None, 0, ""),
    (3, 3, ""),
])
def test_exit_command_leaves_without_a_stuck_thread(monkeypatch, capsys, status, code, err):
    """A failed checkpoint save left orbax's threads waiting 300 s: sys.exit waited for them
    (a sweep or a run said why, then hung 5 minutes). The command now ends past them, with
    the status sys.exit(status) has."""
    import threading

    from cnnjax.utils import cli

    left = []
    monkeypatch.setattr(cli, "STUCK_THREAD_WAIT_S", 0.2)
    monkeypatch.setattr(cli, "exit_after_exit_handlers", left.append)
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="stuck_saver")
    stuck.start()
    try:
        cli.exit_command(status)
    finally:
        release.set()
        stuck.join()
    assert left == [code] and capsys.readouterr().err.endswith(err)


def _config_flags(argv, required=False):
    """A `--config` config-file flag (and `--workdir`), as an entry point defines them."""
    values = _config_flag(argv)
    flags.DEFINE_string("workdir", None, "an ordinary flag", flag_values=values)
    if required:
        flags.mark_flag_as_required("config", flag_values=values)
    return values


def _refusal(monkeypatch, argv, values):
    """The one-line exit message of `cli.parse_flags(argv)` with `values` as absl's flags."""
    monkeypatch.setattr(cli.flags, "FLAGS", values)
    with pytest.raises(SystemExit) as caught:
        cli.parse_flags(argv)
    return caught.value.code


@pytest.mark.parametrize("required", [False, True])
@pytest.mark.parametrize(("body", "got"), [("None", "None"), ("5", "an int")])
@pytest.mark.parametrize("overrides", [(), ("--config.seed=1",)])
def test_a_config_file_returning_no_config_is_named_in_one_line(tmp_path, monkeypatch, capsys,
                                                                required, body, got, overrides):
    """get_config() returning None or an int: ml_collections only logged a warning, and the
    command failed at the first use (a traceback, or `--sweep is required` for a required flag
    that was given)."""
    path = tmp_path / "bad.py"
    path.write_text(f"def get_config():\n    return {body}\n")
    argv = ["prog", f"--config={path}", *overrides]
    assert _refusal(monkeypatch, argv, _config_flags(argv, required)) == (
        f"error: --config={str(path)!r} is invalid; its get_config() returned {got} (expected "
        "an ml_collections.ConfigDict)")
    assert "did you forget a return statement" not in capsys.readouterr().err  # one line


@pytest.mark.parametrize("args", [("--config=",), ("--config", ""),
                                  ("--config=", "--config.seed=1")])
def test_an_empty_config_file_path_is_named_in_one_line(monkeypatch, args):
    """`--config=` reached the user as ml_collections' OSError ("Path to config file is an
    empty string.") at the first use of the config, naming no flag."""
    argv = ["prog", *args]
    assert (_refusal(monkeypatch, argv, _config_flags(argv))
            == "error: --config='' is invalid; expected a config file path")


def test_a_config_file_returning_a_config_passes(monkeypatch):
    argv = ["prog", "--config=experiments/configs/lenet5_digits.py"]
    monkeypatch.setattr(cli.flags, "FLAGS", _config_flags(argv, required=True))
    assert cli.parse_flags(argv) == ["prog"]
    assert cli.not_a_config(cli.flags.FLAGS) is None


@pytest.mark.parametrize(("required", "state"), [(True, "required"), (False, "missing")])
@pytest.mark.parametrize("override", [("--config.seed=1",), ("--config.seed", "1")])
@pytest.mark.parametrize("tail", [(), ("--", f"--config={_DIGITS}")])
def test_an_override_without_its_config_flag_names_the_missing_flag(monkeypatch, required,
                                                                    state, override, tail):
    """`experiments.sweep --sweep_dir=d --config.num_train_steps=40` (no --config) was refused
    as "Unknown command line flag 'config.num_train_steps'", not as the missing --config. A
    `--config=` after `--` is a positional argument to absl: the flag is still missing."""
    argv = ["prog", "--workdir=w", *override, *tail]
    assert _refusal(monkeypatch, argv, _config_flags(argv, required)) == (
        f"error: --config is {state} (--config.seed sets a field of the file --config names: "
        "give --config=<file>.py before it)")


@pytest.mark.parametrize("value", ["1", "None"])
def test_an_unknown_dotted_flag_that_overrides_no_config_flag_stays_unknown(monkeypatch, value):
    """`=None` too: `--workdir.x=None` is no config override for `parse_with_none` to unset."""
    argv = ["prog", "--workdir=w", f"--workdir.x={value}", f"--bogus.seed={value}"]
    assert _refusal(monkeypatch, argv, _config_flags(argv, required=True)).startswith(
        "error: Unknown command line flag 'workdir.x'")
