"""What cnnjax's absl entry points share: flag parsing, the start of `main` and one-line errors.

`ml_collections.config_flags` reports a misspelt `--config.<field>=...` or a missing config file
as a Python traceback from inside absl's parser, and absl its own flag errors as `FATAL Flags
parsing error`. `parse_flags` (pass it to `app.run(main, flags_parser=parse_flags)`) turns every
one of them (an unknown flag, with absl's suggestion; a bad value; a missing required flag; a
config file's error) into one `error: ...` line naming the flag, and `define_config_file` does
the same for the errors raised while a default config file loads (at definition). Every other
bad input to cnnjax's commands gets that line too: `start_command` begins a `main`, and
`one_line_errors` ends the command on the errors of its work with it. `end_command`, which
`start_command` registers to run at exit, spares the interpreter's exit a walk over everything
still alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import flags

from cnnjax.utils.log_filters import without_absl_lines


def parse_flags(argv: list[str],
                unknown_flag_hint: Callable[[str], str] | None = None) -> list[str]:
    """absl's `parse_flags_with_usage`, with every flag error as one `error: ...` line and exit
    status 1 (absl prints `FATAL Flags parsing error` and, for a bad `--config.<field>` value,
    re-parsing the flags there reported "flag defined twice" instead of the bad value).

    A config file's `get_config(<argument>)` that raises (`--config=<file>.py:<argument>`) is
    wrapped by ml_collections and then by absl into a flag error carrying a Python traceback;
    it is reported as `--config='<file>.py:<argument>' is invalid; <the error's message>`.
    `unknown_flag_hint(name)` adds a command's own advice to an unknown flag's message (pass it
    with `functools.partial`). `--config.<field>=None` unsets a field (`parse_with_none`); a
    value starting with `~` is the home folder (`expand_home`)."""
    argv = expand_home(argv)
    try:
        with _without_none_config_warning():  # reported below as the flag's error
            args = parse_with_none(flags.FLAGS, argv)
    except NoneOverrideError as err:
        sys.exit(f"error: {err}")
    except flags.Error as err:
        message = (config_file_error(err) or missing_config_file(flags.FLAGS)
                   or not_a_config(flags.FLAGS) or group_not_value(argv[1:], err)
                   or override_without_its_flag(flags.FLAGS, argv[1:], err)
                   or absl_flag_error(err, unknown_flag_hint))
        sys.exit(f"error: {message}")
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as err:
        # A missing file given with overrides fails at the first override, before absl marks
        # the file's flag parsed: name the flag, not ml_collections' "config_config" module.
        message = (missing_config_file(flags.FLAGS, argv[1:])
                   or not_a_config(flags.FLAGS, argv[1:]) or describe_flag_error(argv[1:], err))
        sys.exit(f"error: {message}")
    missing = missing_config_file(flags.FLAGS) or not_a_config(flags.FLAGS)
    if missing:  # ml_collections would only fail at the first use of the flag's value
        sys.exit(f"error: {missing}")
    both = alias_and_original_given(flags.FLAGS)
    if both:  # absl keeps the last of the two and drops the other without a word
        sys.exit(f"error: {both}")
    repeated = repeated_tuple_field(flags.FLAGS, argv[1:])
    if repeated:  # ml_collections joins the values where any other field keeps the last
        sys.exit(f"error: {repeated}")
    return args


def expand_home(argv: list[str]) -> list[str]:
    """`argv` with each `--<flag>=~/<path>` (or `~user/...`) value's `~` expanded, as the shell
    expands it in `--<flag> ~/<path>` but not after `=`: `--workdir=~/runs/x` made a folder
    named `~` in the current one, as `launch.submit` (which expands it) did not."""
    expanded = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if arg.startswith("-") and eq and value.startswith("~"):
            arg = f"{name}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


_ALIAS_HELP = re.compile(r"^Alias for --(\w+)\.$")  # absl's DEFINE_alias help text


def alias_and_original_given(flag_values: flags.FlagValues) -> str:
    """A message when a flag and its `DEFINE_alias` (`--out_dir` of `--output_dir`) were both
    given, else "": absl parses both into the one flag, so the earlier value was ignored."""
    for name in list(flag_values):
        flag = flag_values[name]
        match = _ALIAS_HELP.match(flag.help or "")
        if (match is None or name != flag.name or not flag.present
                or match.group(1) not in flag_values):
            continue
        original = match.group(1)
        if flag_values[original].present > flag.present:
            return (f"--{name} and --{original} are invalid together; --{name} is another "
                    f"name for --{original}: give one of them")
    return ""


def repeated_tuple_field(flag_values: flags.FlagValues, args: Sequence[str]) -> str:
    """A message when a config's tuple field (`--transfer.budgets`, `--config.data.classes`)
    was given more than once in `args`, else "": ml_collections parses a tuple field as a
    multi-flag and joins the values ((1,) then (5,) gave (1, 5)), where any other field keeps
    the last."""
    given = [arg.partition("=")[0].lstrip("-") for arg in args if arg.startswith("-")]
    for name in list(flag_values):
        flag = flag_values[name]
        times = given.count(name)
        if "." in name and isinstance(flag, flags.MultiFlag) and times > 1:
            return (f"--{name} is invalid given {times} times; ml_collections would join their "
                    "values into one tuple, not keep the last as for other fields: give it "
                    f"once, with every value (e.g. --{name}='(1, 2)')")
    return ""


class NoneOverrideError(ValueError):
    """A `--<config flag>.<field>=None` override that cannot be applied; `override` names it and
    `reason` says why."""

    def __init__(self, override: str, reason: str):
        super().__init__(f"{override} is invalid; {reason}")
        self.override, self.reason = override, reason


def parse_with_none(values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """`values(argv)`, where a config field override whose value is `None` sets the field to
    None: ml_collections parses an override by the field's type, so `None` became the string
    'None' in a str field and an error in a number field, and a field the config file set (a
    warm-start workdir, a weight-average decay) could not be unset from a command line.

    Only a field the config declares None-able (a `FieldReference(None, field_type=...)`, as
    cnnjax's configs do) takes it. A field holding a plain None cannot be overridden at all:
    ml_collections, which reads every override from its own `sys_argv` (the whole command line),
    refuses any value for it, None too ("Type <class 'NoneType'> ... not supported"). A later
    override of the same field wins, as for any other value (a tuple field given twice is
    refused by `parse_flags`: ml_collections joins its values). Raises `NoneOverrideError`,
    and absl's flag error for any error a config file raised as it loaded (`config_file_failure`:
    ml_collections and absl wrap only a TypeError or ValueError so)."""
    rest: list[str] = []
    unset: list[tuple[str, str]] = []  # (flag, field path)
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        target = _none_override(argv, i, values)
        if target is None:
            rest.append(arg)
            continue
        skip_next = "=" not in arg  # absl's `--flag value` syntax
        flag, path = target
        if not any(_overrides(later, flag, path) for later in argv[i + 1 + skip_next:]):
            unset.append(target)
    try:
        args = values(rest)
    except Exception as err:  # noqa: BLE001 — re-raised unless a config file raised it
        failure = None if isinstance(err, flags.Error) else config_file_failure(err)
        if failure is None:
            raise
        raise failure from err
    for flag, path in unset:
        _set_none(values[flag].value, flag, path)
    return args


def none_override_paths(values: flags.FlagValues, argv: Sequence[str], flag: str) -> list[str]:
    """The dotted field paths that `argv` sets to None on config flag `flag`
    (`--<flag>.<path>=None`): `parse_with_none` takes them out of the arguments before
    ml_collections sees them, so the flag's `override_values` does not list them."""
    paths = []
    for i in range(len(argv)):
        target = _none_override(argv, i, values)
        if target is not None and target[0] == flag:
            paths.append(target[1])
    return paths


def _none_override(argv: Sequence[str], i: int,
                   values: flags.FlagValues) -> tuple[str, str] | None:
    """(flag, field path) when `argv[i]` (with `argv[i + 1]` in absl's `--flag value` syntax)
    sets a config flag's field to None, else None."""
    from ml_collections.config_flags.config_flags import is_config_flag

    name, eq, value = argv[i].partition("=")
    if not eq and i + 1 < len(argv):
        value = argv[i + 1]
    match = re.fullmatch(r"--?(\w+)\.([\w.]+)", name)
    if value != "None" or match is None or match.group(1) not in values:
        return None
    if not is_config_flag(values[match.group(1)]):
        return None
    return match.group(1), match.group(2)


def _overrides(arg: str, flag: str, path: str) -> bool:
    """Whether `arg` sets `--<flag>.<path>` or a group of fields above it."""
    name = arg.partition("=")[0].lstrip("-")
    return f"{path}.".startswith(name.partition(".")[2] + ".") and name.startswith(f"{flag}.")


def _set_none(config: Any, flag: str, path: str) -> None:
    """Sets `config`'s field at the dotted `path` to None (`NoneOverrideError` unless it can
    hold None)."""
    import ml_collections

    override = f"--{flag}.{path}='None'"
    holder, *names = [config, *path.split(".")]
    for depth, name in enumerate(names):
        if not isinstance(holder, ml_collections.ConfigDict) or name not in holder:
            where = ".".join([flag, *names[:depth]])
            raise NoneOverrideError(override, f"{where} has no field {name!r}")
        if depth < len(names) - 1:
            holder = holder[name]
    field = names[-1]
    # ConfigDict keeps a typed None-able field as a FieldReference (no public accessor).
    declared = holder._fields.get(field)  # noqa: SLF001
    # (a plain None passes here, but ml_collections has refused it already when, as in every
    # caller, the flag's `sys_argv` is this `argv`)
    if holder[field] is not None and not isinstance(declared, ml_collections.FieldReference):
        kind = type(holder[field]).__name__
        raise NoneOverrideError(override, (
            f"{flag}.{path} cannot be None (it holds a {kind}; a command line can unset only a "
            "field the config declares None-able)"))
    holder[field] = None


def define_config_file(name: str, default: str | None, help_string: str,
                       **kwargs: Any) -> Any:
    """`config_flags.DEFINE_config_file`, reporting as `parse_flags` does the errors it raises
    itself: ml_collections loads a default file, with the command line's `--<name>.<field>`
    overrides, when the flag is defined, so a misspelt override of the default config raised a
    traceback at import."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except flags.Error as err:
        sys.exit(f"error: {config_file_error(err) or absl_flag_error(err)}")
    except Exception as err:  # noqa: BLE001 — re-raised unless a config file or override failed
        failure = config_file_failure(err)
        if failure is not None:
            sys.exit(f"error: {config_file_error(failure)}")
        if not isinstance(err, KeyError | AttributeError | TypeError | ValueError | OSError):
            raise
        args = sys.argv[1:]
        if default is not None and not any(a.startswith(f"--{name}=") for a in args):
            args = [f"--{name}={default}", *args]  # the file the overrides apply to
        sys.exit(f"error: {describe_flag_error(args, err)}")


_ILLEGAL_VALUE = re.compile(r"^flag (--[^=\s]+)=(.*?): (.*)$", re.DOTALL)


def absl_flag_error(err: flags.Error,
                    unknown_flag_hint: Callable[[str], str] | None = None) -> str:
    """absl's flag error `err` on one line: a value its flag cannot take as `--flag='value' is
    invalid; <why>`, any other (an unknown flag, with absl's suggestions and the command's
    `unknown_flag_hint(name)`) as absl words it, with where to see the flags."""
    text = error_message(err)
    match = _ILLEGAL_VALUE.match(text)
    if isinstance(err, flags.IllegalFlagValueError) and match is not None:
        flag, value, why = match.groups()
        if why.endswith("must have a value other than None."):  # mark_flag_as_required
            return f"{flag} is required"
        if why.startswith("('Non-boolean argument to boolean flag'"):  # absl's bare tuple
            why = "expected true or false"
        return f"{flag}={value!r} is invalid; {why}"
    if isinstance(err, flags.UnrecognizedFlagError) and unknown_flag_hint is not None:
        text += unknown_flag_hint(err.flagname)
    order = _OVERRIDE_FIRST.match(text)
    if order is not None:  # ml_collections' FlagOrderError
        return f"{text}: put the overrides after {order.group(1)}=<file>"
    return f"{text} (--helpshort lists the flags)"


def override_without_its_flag(values: flags.FlagValues, args: Sequence[str],
                              err: flags.Error) -> str:
    """For absl's unknown-flag error on `--config.<field>=...` whose config-file flag `--config`
    was not given (ml_collections defines a file's override flags only once the file is named):
    that `--config` is required (or missing), as the command says without the override, not
    that the override is an unknown flag; '' for any other error."""
    from ml_collections.config_flags.config_flags import is_config_flag

    if not isinstance(err, flags.UnrecognizedFlagError) or "." not in err.flagname:
        return ""
    name = err.flagname.partition(".")[0]
    if name not in values or not is_config_flag(values[name]):
        return ""
    if values[name].present or flag_value(args, name) is not None:
        return ""  # given: the override names a field its file lacks (reported as absl words it)
    need = (f"--{err.flagname} sets a field of the file --{name} names: give "
            f"--{name}=<file>.py before it")
    state = "required" if _is_required(values[name]) else "missing"
    return f"--{name} is {state} ({need})"


def _is_required(flag: flags.Flag) -> bool:
    """Whether `flag` was marked required (absl's `mark_flag_as_required` validator)."""
    return any(str(getattr(v, "message", "")).endswith("must have a value other than None.")
               for v in flag.validators)


_OVERRIDE_FIRST = re.compile(r"^Found \S+ in argv before a value for (--\w+) was specified$")
_CONFIG_FILE_ERROR = re.compile(r"^flag (--[^=\s]+)=(.*?): Error whilst parsing config file",
                                re.DOTALL)


def config_file_error(err: flags.Error) -> str | None:
    """The one-line message for absl's flag error `err` when it wraps an error raised while
    ml_collections loaded a config file (naming the flag and the file's own error); else None."""
    match = _CONFIG_FILE_ERROR.match(str(err))
    if match is None:
        return None
    inner = err.__context__
    while inner is not None and str(inner).startswith("Error whilst parsing config file"):
        inner = inner.__context__  # ml_collections re-raises type(e)(<text with traceback>)
    if isinstance(inner, ValueError):  # the file's own refusal: its message says it all
        reason = error_message(inner)
    elif inner is not None:  # a NameError, ImportError, ...: what and where, in the user's file
        path = match.group(2).split(":", 1)[0]
        line = config_file_line(inner, path)
        message = inner.msg if isinstance(inner, SyntaxError) else error_message(inner)
        reason = f"{type(inner).__name__}: {message}"
        if line is not None:
            reason += f" (line {line})"
        reason += _argument_hint(match.group(2), inner)
    else:  # no chained cause: the traceback text's last line, `ValueError: <message>`
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = lines[-1].split(": ", 1)[-1].strip()
    return f"{match.group(1)}={match.group(2)!r} is invalid; {reason}"


def config_file_failure(err: Exception) -> flags.IllegalFlagValueError | None:
    """absl's flag error `--<flag>=<file>.py: Error whilst parsing config file: ...` (its
    context `err`, read by `config_file_error`) for `err`, raised while ml_collections loaded a
    config file, when the file itself raised it (or a module it imports: the traceback passes
    through the file) or it is the file's SyntaxError; else None. ml_collections and absl
    wrap so only a TypeError or ValueError: a NameError, ImportError or SyntaxError in a config
    file reached the user as a traceback. An error raised elsewhere (cnnjax's own) stays one."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    tb = err.__traceback__
    while tb is not None:  # the (outermost) parser's call that loaded the file
        parser, spec = tb.tb_frame.f_locals.get("self"), tb.tb_frame.f_locals.get("path")
        if isinstance(parser, ConfigFileFlagParser) and isinstance(spec, str):
            break
        tb = tb.tb_next
    if tb is None or config_file_line(err, spec.split(":", 1)[0]) is None:
        return None
    failure = flags.IllegalFlagValueError(
        f"flag --{parser.name}={spec}: Error whilst parsing config file: "
        f"{type(err).__name__}: {err}")
    failure.__context__ = err
    return failure


def config_file_line(err: BaseException, path: str) -> int | None:
    """The line of the config file at `path` where `err` was raised (the file's own SyntaxError,
    or its deepest frame in `err`'s traceback); None when the file is not involved."""
    def same(filename: str | None) -> bool:
        return bool(filename) and os.path.realpath(filename) == os.path.realpath(path)

    if isinstance(err, SyntaxError) and same(err.filename):
        return err.lineno
    lines = []
    tb = err.__traceback__
    while tb is not None:
        if same(tb.tb_frame.f_code.co_filename):
            lines.append(tb.tb_lineno)
        tb = tb.tb_next
    return lines[-1] if lines else None


def _argument_hint(spec: str, err: BaseException) -> str:
    """What a `--config=<file>.py:<argument>` whose get_config() takes no argument means (a
    trailing ':' passes '' to it), for ml_collections' TypeError; else ''."""
    file, colon, argument = spec.partition(":")
    if not (colon and isinstance(err, TypeError)
            and re.match(r"get_config\(\) takes 0 positional arguments", str(err))):
        return ""
    return (f"; the part after ':' ({argument!r}) is passed to get_config() as its argument, "
            f"and {file}'s get_config() takes none: drop the ':'")


def _config_file_flags(values: flags.FlagValues) -> Iterator[tuple[str, flags.Flag]]:
    """`(name, flag)` of each ml_collections config-file flag among the parsed `values`."""
    for name in values:
        if hasattr(type(values[name]), "config_filename"):
            yield name, values[name]


def missing_config_file(values: flags.FlagValues, args: Sequence[str] | None = None
                        ) -> str | None:
    """The error for the first config-file flag (`--config=<file>.py[:arg]`, in either flag
    syntax, or a default file when the flag is not given) of the parsed `values` whose file does
    not exist, else None. With `args`, each flag's file is read from them instead: a parse that
    failed at an override (`--config=nope.py --config.seed=1`: ml_collections' OSError) left the
    flag unparsed."""
    for name, flag in _config_file_flags(values):
        spec, given = ((_parsed_config_file(flag), flag.present) if args is None
                       else (flag_value(args, name), True))
        if spec == "" and given:  # ml_collections: "Path to config file is an empty string."
            return f"--{name}='' is invalid; expected a config file path"
        if not spec or os.path.isfile(spec.split(":", 1)[0]):
            continue
        if given:
            return f"--{name}={spec!r} is invalid; no such config file"
        return (f"--{name} (default {spec!r}) is invalid; no such config file in "
                f"{os.getcwd()!r} (run from the repository root, or pass --{name}=<file>)")
    return None


def not_a_config(values: flags.FlagValues, args: Sequence[str] | None = None) -> str | None:
    """The error for the first config-file flag given in the parsed `values` whose file's
    `get_config()` returned no config (None, a number), else None: ml_collections only logs a
    warning for None, and the command failed at the first use of the value (a traceback, or
    `--sweep is required` for a required flag that was given). With `args`, each flag's file
    is loaded from them instead: a parse that failed at an override left the flag unparsed."""
    from ml_collections import ConfigDict
    from ml_collections.config_flags import config_flags

    # ml_collections' stand-in for a file it failed to load (private: without it, no check)
    error_config = getattr(config_flags, "_ErrorConfig", ())

    for name, flag in _config_file_flags(values):
        if args is None:
            if not flag.present:
                continue
            spec, value = _parsed_config_file(flag), flag.value
        else:
            spec = flag_value(args, name)
            if spec is None:
                continue
            try:
                with _without_none_config_warning():
                    value = load_flag_config(args, name)
            except Exception:  # noqa: BLE001 — the file's own error is reported elsewhere
                continue
        if isinstance(value, ConfigDict | Mapping):
            continue
        if isinstance(value, error_config):  # an OSError ml_collections keeps for the first use
            reason = error_message(object.__getattribute__(value, "_error"))
            return f"--{name}={spec!r} is invalid; it cannot be loaded ({reason})"
        kind = type(value).__name__
        got = "None" if value is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        return (f"--{name}={spec!r} is invalid; its get_config() returned {got} (expected an "
                "ml_collections.ConfigDict)")
    return None


def _without_none_config_warning() -> contextlib.AbstractContextManager:
    """The block without ml_collections' warning that a config file's get_config() returned
    None (`not_a_config` reports that as the flag's one-line error)."""
    return without_absl_lines("get_config() returned None")


def _parsed_config_file(flag: flags.Flag) -> str | None:
    """The `<file>.py[:arg]` of a parsed ml_collections config-file flag; None without one."""
    try:
        return flag.config_filename
    except flags.Error:  # ml_collections' UnparsedFlagError: no file given, no default
        return None


# ml_collections loads `--<flag>=<file>.py` as a module named `<flag>_config`.
_NO_GET_CONFIG = re.compile(r"^module '(\w+)_config' has no attribute 'get_config'$")


def describe_flag_error(args: Sequence[str], err: Exception) -> str:
    """One line saying which override of `args` made loading the config files fail, and why."""
    culprit, reason = explain_flag_error(args, err)
    return f"{culprit} is invalid; {reason}" if culprit else reason


def explain_flag_error(args: Sequence[str], err: Exception) -> tuple[str | None, str]:
    """`(culprit, reason)`: the flag or override of `args` that made loading the config files
    fail (None when none can be named) and why, in words (a misspelt model_kwargs field, a
    value given fields, a file without `get_config`)."""
    missing = _NO_GET_CONFIG.match(error_message(err)) if isinstance(err, AttributeError) else None
    if missing is not None:  # e.g. --config=<a helper module>, not a config file
        flag = missing.group(1)
        return (f"--{flag}={flag_value(args, flag)!r}", "it defines no get_config() (a config "
                "file is a module whose get_config() returns its ConfigDict)")
    overrides = [a for a in args if a.startswith("--") and "." in a.split("=", 1)[0]]
    if isinstance(err, TypeError | AttributeError | KeyError):
        for override in overrides:  # `--config.model.name=x` where `model` is a string
            below = value_not_group(args, override)
            if below:
                return override, below
    culprit = find_culprit(overrides, err)
    message = error_message(err)
    if culprit and isinstance(err, KeyError | AttributeError):
        path = override_path(culprit)
        field = next((f for f in reversed(path.split(".")) if message.startswith(repr(f))),
                     path.rsplit(".", 1)[-1])
        if message.startswith(repr(field)):  # ml_collections' KeyError: the name, a suggestion
            suggestion = message[len(repr(field)):].strip()
            message = f"the config has no field {field!r}" + (f"; {suggestion}" if suggestion
                                                             else "")
            if path == f"config.model_kwargs.{field}":
                message += model_kwargs_hint(args, field)
            elif not suggestion:  # nothing close to suggest: list what the group does hold
                message += missing_field_hint(args, culprit)
    return culprit, message


def load_config_file(spec: str) -> Any:
    """The config a `--config=<file>.py[:<argument>]` value names: `get_config(<argument>)`,
    or `get_config()` without one (as ml_collections' `DEFINE_config_file` calls it)."""
    import runpy

    path, _, argument = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(argument) if argument else get_config()


def load_flag_config(args: Sequence[str], flag: str) -> Any:
    """The config `--<flag>=<file>.py[:<argument>]` of `args` names, loaded by the flag's own
    parser where it is a config-file flag (the sweep flag's adds the fields a file may leave
    out, which its overrides can set), else by `load_config_file`."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    spec = flag_value(args, flag) or ""
    parser = flags.FLAGS[flag].parser if flag in flags.FLAGS else None
    if isinstance(parser, ConfigFileFlagParser):
        return parser.parse(spec)
    return load_config_file(spec)


def missing_field_hint(args: Sequence[str], override: str) -> str:
    """`; config.mixing has fields [...]`: the group in which `override` (`--config.a.b=v`)
    names a field it lacks, and the fields it has, so that a misspelling ml_collections finds
    nothing close to is answered with what is valid; '' when the file cannot be loaded or every
    field on the path exists."""
    from ml_collections import ConfigDict

    flag, *path = override_path(override).split(".")
    try:
        node = load_flag_config(args, flag)
    except Exception:  # noqa: BLE001 — only a hint: the error stands without it
        return ""
    for depth, part in enumerate(path):
        if not isinstance(node, ConfigDict):
            return ""
        if part not in node:
            return f"; {'.'.join([flag, *path[:depth]])} has fields {sorted(node)}"
        node = node[part]
    return ""


def value_not_group(args: Sequence[str], override: str) -> str:
    """Why `override` (`--config.a.b=v`) cannot be set when `config.a` is a value, not a group
    of fields (ml_collections then fails inside its lookup, e.g. "string indices must be
    integers"); '' when every parent on its path is a group or the file cannot be loaded."""
    from ml_collections import ConfigDict

    flag, *path = override_path(override).split(".")
    spec = flag_value(args, flag)
    if spec is None or len(path) < 2:
        return ""
    try:
        node = load_flag_config(args, flag)
    except Exception:  # noqa: BLE001 — only an explanation: the original error stands
        return ""
    for depth, part in enumerate(path[:-1], start=1):
        if not isinstance(node, ConfigDict) or part not in node:
            return ""
        node = node[part]
        if not isinstance(node, ConfigDict):
            parent = ".".join([flag, *path[:depth]])
            kind = type(node).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            return (f"{parent} is {article} {kind} ({node!r}), not a group of fields; "
                    f"set it with --{parent}=<value>")
    return ""


_NOT_A_CONFIG_DICT = re.compile(r"^flag (--[^=\s]+)=(.*?): Failed to parse .* as a ConfigDict",
                                re.DOTALL)


def group_not_value(args: Sequence[str], err: flags.Error) -> str:
    """For absl's error on `--config.optimizer=adam` (a value given to a group of fields, which
    ml_collections failed to parse as a ConfigDict literal): the group's fields and how to set
    one; '' for any other error."""
    from ml_collections import ConfigDict

    match = _NOT_A_CONFIG_DICT.match(str(err))
    if match is None:
        return ""
    override, value = match.groups()
    flag, *path = override.lstrip("-").split(".")
    fields = ""
    try:
        node = load_flag_config(args, flag)
        for part in path:
            node = node[part]
        if isinstance(node, ConfigDict):
            fields = f" ({', '.join(sorted(node))})"
    except Exception:  # noqa: BLE001 — only the list of fields: the advice stands without it
        pass
    group = ".".join([flag, *path])
    example = "name" if "name" in fields.strip(" ()").split(", ") else "<field>"
    return (f"{override}={value!r} is invalid; {group} is a group of fields{fields}, not a "
            f"value: set one of them, e.g. --{group}.{example}={value}")


def model_kwargs_hint(args: Sequence[str], field: str | None = None) -> str:
    """`; model '<name>' accepts model_kwargs [...]` for the model `args` configure (the
    `--config=<file>.py[:arg]` file's `model`, or a `--config.model=` override), so a misspelt
    `--config.model_kwargs.<field>` lists the valid fields; '' when that cannot be worked out.
    A `field` the overriding model takes but the file's model does not is no typo: the file
    declared model_kwargs for its own model, and the hint says so."""
    spec, model = flag_value(args, "config"), flag_value(args, "config.model")
    try:
        own = load_config_file(spec).model if spec is not None else None
        model = model if model is not None else own
        if model is None:
            return ""
        from cnnjax.models import settable_fields  # deferred: imports every architecture

        fields = sorted(settable_fields(model))
        if field in fields and own is not None and own != model:
            return (f"; model {model!r} takes it, but the config file declares model_kwargs "
                    f"for its own model {own!r}: write a config file with config.model="
                    f"{model!r} (experiments/README.md, 'Model hyperparameters')")
        return f"; model {model!r} accepts model_kwargs {fields}"
    except Exception:  # noqa: BLE001 — only a hint: the error stands without it
        return ""


def override_path(override: str) -> str:
    """The dotted field path an override sets: `config.a.b` for `--config.a.b=v`."""
    return override.lstrip("-").split("=", 1)[0]


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value `args` give `--flag`, as `--flag=value` or `--flag value` (absl takes both);
    the last one wins, as in absl. None when it is not given. A bare `--` ends the flags, as in
    absl (what follows it is a positional argument)."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def find_culprit(overrides: Sequence[str], err: Exception) -> str | None:
    """The override of `overrides` that `err` is about: first one whose field ml_collections'
    KeyError names exactly (its message starts with the name), else the first whose field the
    message mentions (`names_field`), else None."""
    message = error_message(err)
    for override in overrides:
        fields = override_path(override).split(".")[1:]
        if any(message.startswith(repr(field)) for field in fields):
            return override
    return next((o for o in overrides if names_field(o, err)), None)


def names_field(override: str, err: Exception) -> bool:
    """True when `err`'s message names the field that `override` (`--config.a.b=v`) sets."""
    name = override_path(override)
    message = error_message(err)
    return (any(part in message for part in (name, name.split(".", 1)[-1], name.rsplit(".")[-1]))
            or any(repr(field) in message for field in name.split(".")[1:]))


def error_message(err: Exception) -> str:
    """`err`'s text on one line, unwrapped from the KeyErrors ml_collections nests."""
    while isinstance(err, KeyError | AttributeError) and err.args \
            and isinstance(err.args[0], BaseException):
        err = err.args[0]
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split())


def start_command(argv: list[str]) -> None:
    """Refuses positional arguments (`argv` is absl's, program name first) in one `error:` line,
    where absl's `app.UsageError` printed the whole flag help above its message, quiets
    library logs, and has the process end with `end_command` (an exit handler registered now
    runs after those TensorFlow, JAX and orbax register later): how every command's `main`
    begins."""
    atexit.unregister(end_command)  # once, however many commands one process starts
    atexit.register(end_command)
    if len(argv) > 1:
        sys.exit(f"error: unexpected argument{'s' if len(argv) > 2 else ''} {argv[1:]} (flags "
                 "are written --name=value; --helpshort lists them)")
    from cnnjax.train.logging import quiet_library_logs

    quiet_library_logs()


def end_command() -> None:
    """How a command's process ends (`start_command` registers it as an exit handler), its
    work done and its outputs written and closed: collects the garbage there is (finalizers run
    as usual), then freezes everything still alive (`gc.freeze`), so that the interpreter's
    exit does not walk it again.

    Python's exit runs full collections. After make train they walked the ~580k objects that
    TensorFlow (with the keras it imports), JAX, tfds and orbax leave in ~5,000 modules, none of
    it garbage: 2.2-2.5 s of CPU after the last atexit handler, 0.25 s once frozen; the one
    collection here costs ~0.5 s (make train's last line to exit: median 4.4 -> 2.0 s at a
    load of 10-12 on 2 cores). Only commands use it, through `start_command`: frozen objects
    are never collected, so it is only for a process about to exit (a reference cycle left
    among them is not finalized at exit, which Python does not promise anyway).
    """
    import gc

    if "triton" in sys.modules:  # (torchvision imports it) its nanobind bindings would report
        return  # each frozen object of theirs as a leak at exit, ~100 lines of "leaked ..."
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def one_line_errors(hint: Callable[[Exception], str] | None = None,
                    flags_named: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ends the command with `error: <err><hint(err)>` and exit status 1 on a ValueError or
    OSError in the block (`os_error_message`, but for a FileNotFoundError's own text): bad input
    or a path it cannot read or write is reported as one line, not a traceback.

    `flags_named` maps how a library's error names an argument (`"load_trained: step="`) to the
    flag (absl FlagHolder) that set it: where the user gave that flag, the line names it instead
    (`--step=5 is invalid; ...`)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        text = str(err)
        for prefix, flag in (flags_named or {}).items():
            if isinstance(err, ValueError) and text.startswith(prefix) and flag.present:
                text = f"--{flag.name}={text.removeprefix(prefix)}"
                break
        sys.exit(f"error: {text}{hint(err) if hint is not None else ''}")
    except OSError as err:  # e.g. PermissionError on a read-only workdir
        sys.exit(f"error: {os_error_message(err)}{hint(err) if hint is not None else ''}")


@contextlib.contextmanager
def exit_on_ctrl_c(message: Callable[[], str]) -> Iterator[None]:
    """Ends the command on Ctrl-C (a KeyboardInterrupt from the block) with one line,
    `interrupted: <message()>` (where it stopped, how a rerun resumes), and exit status 130 (128 +
    SIGINT, what a shell reports for a Ctrl-C'd command), not a ~60-line traceback. SIGTERM's
    `TrainingInterrupted`, a KeyboardInterrupt that is also a SystemExit, goes on (exit 143).
    The process ends through `exit_after_exit_handlers`: a Ctrl-C may leave an XLA compile
    running."""
    try:
        yield
    except KeyboardInterrupt as err:
        if isinstance(err, SystemExit):
            raise
        sys.stderr.write(f"interrupted: {message()}\n")
        exit_after_exit_handlers(130)


def exit_after_exit_handlers(status: int) -> None:
    """Ends the process with `status` once its `atexit` handlers (JAX's, TensorFlow's,
    logging's, `end_command`) have run, skipping the interpreter's finalization and C++'s static
    destructors. A Ctrl-C raises its KeyboardInterrupt out of JAX's wait for an XLA compile while
    the compile goes on in XLA's threads; `sys.exit` then tore LLVM's and XLA's globals down under
    those threads, and 8 of 10 commands Ctrl-C'd mid-compile died with SIGSEGV or SIGABRT ("pure
    virtual method called") after their `interrupted:` line (session 51)."""
    atexit._run_exitfuncs()  # what sys.exit runs first  # noqa: SLF001
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


#: How long a command ending waits for its background threads before leaving without them.
STUCK_THREAD_WAIT_S = 10.0


def stuck_threads() -> list[threading.Thread]:
    """Non-daemon threads still running `STUCK_THREAD_WAIT_S` after a command's work ended,
    with a warning naming them. A checkpoint save that could not create its step
    folder (no space, no permission) leaves orbax's signalling threads waiting 300 s for it,
    and Python waits for them before exiting (the run had said why and written summary.json)."""
    deadline = time.monotonic() + STUCK_THREAD_WAIT_S
    alive = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    for thread in alive:  # Thread's own join: orbax's raises TimeoutError (or its error)
        threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
    stuck = [t for t in alive if t.is_alive()]
    if stuck:
        from absl import logging

        logging.warning("Leaving %d background thread(s) that did not finish (%s).", len(stuck),
                        ", ".join(t.name for t in stuck[:4]))
    return stuck


def exit_command(status: str | int | None = None) -> None:
    """`sys.exit(status)` (a message: printed, status 1), but without waiting for stuck
    background threads (`stuck_threads`): then the process ends once its exit handlers ran."""
    if not stuck_threads():
        sys.exit(status)
    if isinstance(status, str):
        sys.stderr.write(status + "\n")
    exit_after_exit_handlers(status if isinstance(status, int) else 0 if status is None else 1)


def os_error_message(err: OSError) -> str:
    """`err` on one line naming its path(s), `cannot access '<path>': <reason>`, so the user
    knows which file or folder to fix (its text as it is when it names none)."""
    paths = [os.fsdecode(p) if isinstance(p, bytes) else p
             for p in (err.filename, err.filename2) if p is not None]
    if not paths or not err.strerror:
        return error_message(err)
    return f"cannot access {' or '.join(repr(p) for p in paths)}: {err.strerror}"
