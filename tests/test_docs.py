"""The commands the documentation shows exist: every `python -m <module> --flag ...` in the README,
docs/, the experiment and benchmark READMEs and the config docstrings names a module of this
repository and only flags that module (or the libraries it parses flags with) defines. A renamed
flag or script then fails here instead of in a newcomer's terminal."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = sorted(
    [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
     *glob.glob(os.path.join(ROOT, "*", "README.md")),
     *glob.glob(os.path.join(ROOT, "experiments", "*", "*.py")),
     *glob.glob(os.path.join(ROOT, "experiments", "*.py"))])
# `python -m module` and its arguments, through backslash-continued lines.
COMMAND = re.compile(r"python3? -m ([A-Za-z_][\w.]*\w)(?![\w.])((?:[^\n`]*\\\n)*[^\n`]*)")
FLAG = re.compile(r"(?:^|\s|\[)--([A-Za-z_]\w*)(?=[=\s.\]]|$)")
DEFINED = re.compile(r"(?:DEFINE_\w+|define_config_file)\(\s*[\"'](\w+)[\"']")
# Flags absl itself defines (app.run), which the documents may show.
ABSL_FLAGS = {"helpfull", "help", "helpshort", "verbosity", "v", "logtostderr", "alsologtostderr",
              "flagfile", "undefok"}


def _commands() -> list[tuple[str, str, str]]:
    found = []
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in COMMAND.finditer(text):
            found.append((os.path.relpath(path, ROOT), match.group(1), match.group(2)))
    return found


def _module_file(module: str) -> str | None:
    base = os.path.join(ROOT, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__main__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _defined_flags(path: str) -> set[str]:
    """Flags the module defines, also through the repository modules it imports."""
    seen, todo, names = set(), [path], set(ABSL_FLAGS)
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        with open(current, encoding="utf-8") as f:
            source = f.read()
        names |= set(DEFINED.findall(source))
        for module in re.findall(r"^\s*(?:from|import) ((?:cnnjax|experiments|launch|benchmarks)"
                                 r"[\w.]*)", source, re.M):
            imported = _module_file(module)
            if imported is not None:
                todo.append(imported)
    return names


COMMANDS = _commands()


def test_the_documents_show_commands():
    modules = {module for _, module, _ in COMMANDS}
    assert {"experiments.train", "experiments.evaluate", "experiments.sweep", "experiments.tune",
            "launch.submit", "benchmarks.train_step"} <= modules


@pytest.mark.parametrize("where, module, arguments", COMMANDS,
                         ids=[f"{w}:{m}" for w, m, _ in COMMANDS])
def test_a_documented_command_names_a_module_and_its_flags(where, module, arguments):
    path = _module_file(module)
    assert path is not None, f"{where}: `python -m {module}`: no such module in the repository"
    defined = _defined_flags(path)
    own = re.split(r"\s--(?:\s|$)", arguments)[0]  # after a bare `--`: the launched script's
    used = set(FLAG.findall(own))
    unknown = sorted(name for name in used
                     if name not in defined and name.removeprefix("no") not in defined)
    assert not unknown, (f"{where}: `python -m {module}` shows flags {unknown} that it does not "
                         f"define (it defines {sorted(defined - ABSL_FLAGS)})")


@pytest.mark.parametrize("where, module, arguments", COMMANDS,
                         ids=[f"{w}:{m}" for w, m, _ in COMMANDS])
def test_a_documented_command_names_files_that_exist(where, module, arguments):
    """Config, sweep, recipe and transfer files passed to a documented command exist."""
    files = re.findall(r"(?<![\w/<])((?:experiments|launch|benchmarks)/[\w/]+\.py)", arguments)
    missing = [f for f in files if not os.path.isfile(os.path.join(ROOT, f))]
    assert not missing, f"{where}: `python -m {module}` names missing files {missing}"
