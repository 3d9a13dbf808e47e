"""A config file's own errors, and a config not built on `default_config()`, as one line."""

import os

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from cnnjax.train.config import REQUIRED_FIELDS, default_config, validate_config
from cnnjax.utils import cli


def _parse_exit(argv, monkeypatch):
    """`parse_flags(argv)`'s exit line with only a `--config` file flag defined."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    monkeypatch.setattr(cli.flags, "FLAGS", values)
    with pytest.raises(SystemExit) as exited:
        cli.parse_flags(argv)
    return exited.value.code


@pytest.mark.parametrize("source, reason", [
    ("def get_config(:\n  pass\n", "SyntaxError: invalid syntax (line 1)"),
    ("from cnnjax.train.config import default_config\ndef get_config():\n"
     "  c = default_config()\n  c.model = lenet5\n  return c\n",
     "NameError: name 'lenet5' is not defined (line 4)"),
    ("from cnnjax.train.config import default_confg\n",
     "ImportError: cannot import name 'default_confg' from 'cnnjax.train.config'"),
    ("def get_config():\n  return 1 / 0\n", "ZeroDivisionError: division by zero (line 2)"),
    # raised in a helper: the helper's line (the deepest in the file), not get_config()'s call
    ("def helper():\n  return undefined_name\n\ndef get_config():\n  return helper()\n",
     "NameError: name 'undefined_name' is not defined (line 2)"),
])
def test_a_config_files_own_error_is_one_line_naming_its_line(source, reason, tmp_path,
                                                              monkeypatch):
    """A SyntaxError, NameError, ImportError... in the file was a 15-27 frame traceback (only a
    ValueError or TypeError was reported in one line)."""
    path = tmp_path / "cfg.py"
    path.write_text(source)
    line = _parse_exit(["prog", f"--config={path}"], monkeypatch)
    assert line.startswith(f"error: --config='{path}' is invalid; {reason}")
    assert "\n" not in line


def test_launch_reads_a_config_files_own_error_as_a_flag_error(tmp_path):
    """`parse_with_none` (launch.submit's checks parse with it) raises absl's flag error."""
    path = tmp_path / "cfg.py"
    path.write_text("def get_config():\n  return undefined_name\n")
    argv = ["prog", f"--config={path}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "c", flag_values=values, sys_argv=argv)
    with pytest.raises(flags.Error) as caught:
        cli.parse_with_none(values, argv)
    assert cli.config_file_error(caught.value) == (
        f"--config='{path}' is invalid; NameError: name 'undefined_name' is not defined (line 2)")


def test_a_default_config_files_error_is_one_line(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import no_such_module_here\n")
    with pytest.raises(SystemExit) as exited:
        cli.define_config_file("config", str(path), "c", flag_values=flags.FlagValues(),
                               sys_argv=["prog"])
    assert exited.value.code == (
        f"error: --config='{path}' is invalid; ModuleNotFoundError: No module named "
        "'no_such_module_here' (line 1)")


def test_an_error_outside_the_config_file_keeps_its_traceback(tmp_path):
    """An error raised by code loading the file (not the file's own) is not disguised."""
    path = tmp_path / "cfg.py"
    path.write_text("def get_config():\n  return None\n")

    class BrokenParser(ConfigFileFlagParser):
        def parse(self, path):
            super().parse(path)
            raise RuntimeError("a bug in the parser")

    argv = ["prog", f"--config={path}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "c", flag_values=values, sys_argv=argv)
    values["config"].parser = BrokenParser("config")
    with pytest.raises(RuntimeError, match="a bug in the parser"):
        cli.parse_with_none(values, argv)


def test_a_trailing_colon_says_get_config_takes_no_argument(monkeypatch):
    line = _parse_exit(["prog", "--config=experiments/configs/lenet5_digits.py:"], monkeypatch)
    assert line == (
        "error: --config='experiments/configs/lenet5_digits.py:' is invalid; TypeError: "
        "get_config() takes 0 positional arguments but 1 was given; the part after ':' ('') is "
        "passed to get_config() as its argument, and experiments/configs/lenet5_digits.py's "
        "get_config() takes none: drop the ':'")


def test_an_override_before_its_config_file_says_where_it_goes(monkeypatch):
    line = _parse_exit(["prog", "--config.seed=1", "--config=experiments/configs/lenet5_digits.py"],
                       monkeypatch)
    assert line == ("error: Found --config.seed=1 in argv before a value for --config was "
                    "specified: put the overrides after --config=<file>")


def test_a_config_not_built_on_default_config_names_the_missing_fields():
    """`ConfigDict(dict(model="lenet5"))` failed with a bare AttributeError "'distributed'"."""
    with pytest.raises(ValueError) as caught:
        validate_config(ConfigDict(dict(model="lenet5", distributed=False)))
    message = str(caught.value)
    assert message.startswith(f"config: fields {[f for f in REQUIRED_FIELDS if f != 'model']} "
                              "are missing")
    assert "cnnjax.train.config.default_config()" in message
    config = default_config()
    del config["optimizer"]
    with pytest.raises(ValueError, match=r"^config: fields \['optimizer'\] are missing"):
        validate_config(config)


def test_every_required_field_is_one_default_config_declares():
    assert set(REQUIRED_FIELDS) <= set(default_config())


def test_a_home_relative_value_after_equals_is_expanded(monkeypatch, tmp_path):
    """`--workdir=~/runs/x`: the shell leaves `~` after `=`, and train made a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.expand_home(["prog", "--workdir=~/runs/x", "--config.init_from.workdir=~",
                            "--name=a~b", "~/positional", "name=~/x"]) == [
        "prog", f"--workdir={os.path.join(str(tmp_path), 'runs', 'x')}",
        f"--config.init_from.workdir={tmp_path}", "--name=a~b", "~/positional",
        "name=~/x"]  # not a flag: a positional argument, left as given


def test_parse_flags_expands_home_in_plain_and_config_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["prog", "--config=experiments/configs/lenet5_digits.py", "--workdir=~/runs/x",
            "--config.init_from.workdir=~/runs/y"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "c", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "w", flag_values=values)
    monkeypatch.setattr(cli.flags, "FLAGS", values)
    cli.parse_flags(argv)
    assert values.workdir == str(tmp_path / "runs" / "x")
    assert values.config.init_from.workdir == str(tmp_path / "runs" / "y")


def test_evaluate_on_a_workdir_that_is_a_file_names_the_workdir(tmp_path):
    """It was refused as "--workdir's eval folder='<file>/eval' is invalid"."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "run").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path / 'run'}"],
        cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={str(tmp_path / 'run')!r} is invalid; it is a file, not a training "
        "run's directory.")
