"""The commands the documentation shows exist: every `python -m <module> --flag ...` in the README,
docs/, the experiment and benchmark READMEs and the config docstrings (also one wrapped over
lines of a paragraph) names a module of this repository and only flags that module (or the
libraries it parses flags with) defines. A renamed flag or script then fails here instead of in
a newcomer's terminal. Also: the config fields and repository paths the documents name exist,
README links every docs/ page, docs/architecture.md lists every module and states the import
order the code keeps, the `cnnjax.*` names and snippet imports the documents cite are defined,
their relative links and anchors resolve, and README's Python snippet runs as printed (slow)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

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


# An inline code span (`...`, not a ``` fence) may wrap onto the next lines of a paragraph.
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def _unwrapped(text: str) -> str:
    """`text` with the line breaks inside inline code spans made spaces, so a command wrapped in
    a paragraph (`python -m experiments.evaluate --workdir=<run> [--split=test]` then `[--ema]`
    on the next line) is read whole."""
    return INLINE_CODE.sub(lambda m: m.group(0) if "\n\n" in m.group(1)
                           else m.group(0).replace("\n", " "), text)


def _commands() -> list[tuple[str, str, str]]:
    found = []
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = _unwrapped(f.read())
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


# `--config.<field>` (and `--sweep.`, `--recipe.`, `--transfer.`) overrides the documents show.
OVERRIDE = re.compile(r"--(config|sweep|recipe|transfer)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
CONFIG_FILE = re.compile(r"--config=(experiments/configs/\w+\.py)(?::(\w+))?")
# Shown on purpose as what is refused: a misspelt field; a grid sweep's `num_trials` (a field of
# the sweep schema that grid files leave out).
SHOWN_AS_REFUSED = {("config", "optimizer.learnin_rate"), ("sweep", "num_trials")}
PLACEHOLDER = "x"  # `--config.x=y`
KIND_FILES = {"config": "configs", "sweep": "sweeps", "recipe": "recipes", "transfer": "transfers"}


def _load(path: str, argument: str | None = None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_docs_" + re.sub(r"\W", "_", os.path.relpath(path, ROOT)), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _fields(config, prefix: str = "") -> set[str]:
    names = set()
    for key, value in config.items():
        names.add(prefix + key)
        if hasattr(value, "items"):
            names |= _fields(value, prefix + key + ".")
    return names


@pytest.fixture(scope="module")
def known_fields():
    """Every field of every experiment, sweep, recipe and transfer file, and every model's
    `model_kwargs` entry (a document may show one for a model no config file uses)."""
    from cnnjax.models import list_models
    from cnnjax.train.config import model_kwargs_config

    known = {}
    for kind, folder in KIND_FILES.items():
        names = set()
        for path in glob.glob(os.path.join(ROOT, "experiments", folder, "[a-z]*.py")):
            names |= _fields(_load(path))
        known[kind] = names
    for model in list_models(task=None):
        known["config"] |= {f"model_kwargs.{name}" for name in model_kwargs_config(model)}
    return known


def _overrides() -> list[tuple[str, int, str, str]]:
    found = []
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in OVERRIDE.finditer(text):
            found.append((os.path.relpath(path, ROOT), text.count("\n", 0, match.start()) + 1,
                          match.group(1), match.group(2)))
    return found


def test_every_documented_override_names_a_field(known_fields):
    """A `--config.x.y=...` anywhere in the documents names a field some config declares (a
    renamed field fails here, not as `the config has no field` in a reader's terminal)."""
    unknown = [f"{where}:{line}: --{kind}.{field}" for where, line, kind, field in _overrides()
               if (kind, field) not in SHOWN_AS_REFUSED and field != PLACEHOLDER
               and field not in known_fields[kind]]
    assert not unknown, f"overrides of fields no file declares: {unknown}"


def test_a_documented_command_overrides_fields_of_its_own_config():
    """In a command that names its config file, every `--config.<field>` is one of that file's
    (with the `:argument` the command passes)."""
    wrong, cache = [], {}
    for where, module, arguments in COMMANDS:
        named = CONFIG_FILE.search(arguments)
        if named is None:
            continue
        key = (named.group(1), named.group(2))
        if key not in cache:
            cache[key] = _fields(_load(os.path.join(ROOT, key[0]), key[1]))
        for kind, field in OVERRIDE.findall(arguments):
            if (kind == "config" and field not in cache[key]
                    and (kind, field) not in SHOWN_AS_REFUSED):
                wrong.append(f"{where}: `python -m {module}` with {key[0]}: --config.{field}")
    assert not wrong, f"fields the command's own config lacks: {wrong}"


def test_config_docstrings_keep_their_line_continuations():
    """A lone backslash at a line end inside a (non-raw) docstring joins the lines in `__doc__`
    (what `help()` and the reader of `--config` docs see): write `\\\\`."""
    import ast

    joined = []
    for path in DOCUMENTS:
        if not path.endswith(".py"):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
        if not (tree.body and isinstance(tree.body[0], ast.Expr)
                and isinstance(tree.body[0].value, ast.Constant)
                and isinstance(tree.body[0].value.value, str)):
            continue
        written = ast.get_source_segment(source, tree.body[0].value)
        if written.count("\n") != tree.body[0].value.value.count("\n"):
            joined.append(os.path.relpath(path, ROOT))
    assert not joined, f"docstrings whose lines a trailing backslash joins: {joined}"


# Repository paths a document names (`cnnjax/train/loop.py`, `experiments/sweeps/<name>.py` is a
# pattern and skipped: `<`, `$` or `*` precede or follow it).
REPO_PATH = re.compile(r"(?<![\w/.<$*-])((?:cnnjax|experiments|launch|benchmarks|tests|docs|\.ci)"
                       r"/[\w./-]*\w)(?![\w<*])")


def test_every_repository_path_a_document_names_exists():
    """A moved or renamed file fails here, not as `No such file` in a reader's terminal."""
    missing = []
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in REPO_PATH.finditer(text):
            if not os.path.exists(os.path.join(ROOT, match.group(1))):
                missing.append(f"{os.path.relpath(path, ROOT)}:"
                               f"{text.count(chr(10), 0, match.start()) + 1}: {match.group(1)}")
    assert not missing, f"paths no file or folder of the repository has: {missing}"


def test_the_readme_links_every_documentation_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Documentation", 1)[1]
    pages = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    linked = set(re.findall(r"\]\(docs/(\w+\.md)\)", section))
    assert linked == pages, (f"README's Documentation section: unlisted {sorted(pages - linked)}, "
                             f"no such page {sorted(linked - pages)}")


def _architecture_tree() -> dict[str, str]:
    """docs/architecture.md's layout block: each top-level entry of `cnnjax/` (a package or a
    module) -> the text of its lines, in the order listed."""
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        block = f.read().split("```", 2)[1]
    tree, current = {}, None
    for line in block.splitlines():
        top = re.match(r"^  (\w+)(?:/|\.py)", line)
        if top:
            current = top.group(1)
            tree.setdefault(current, "")
        elif not line.startswith("   "):
            current = None  # experiments/, launch/, ... beside cnnjax/
        if current is not None:
            tree[current] += line + "\n"
    return tree


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md's layout names every module of cnnjax/ under its own package, every
    experiment script and every top-level file of tests/."""
    tree = _architecture_tree()
    unlisted = []
    for path in sorted(glob.glob(os.path.join(ROOT, "cnnjax", "**", "*.py"), recursive=True)):
        relative = os.path.relpath(path, os.path.join(ROOT, "cnnjax"))
        parts = relative.split(os.sep)
        if parts[-1] == "__init__.py":
            continue
        package = parts[0].removesuffix(".py")
        within = "/".join(parts[1:]) or parts[0]
        named = rf"(?<![\w/])(?:{package}/)?{re.escape(within)}\b"
        if not re.search(named, tree.get(package, "")):
            unlisted.append(relative)
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        layout = f.read()
    experiments = layout.split("\nexperiments/", 1)[1].split("\nlaunch/", 1)[0]
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "[a-z]*.py"))):
        if not re.search(rf"\b{re.escape(os.path.basename(path))}", experiments):
            unlisted.append(os.path.relpath(path, ROOT))
    tests = layout.split("\ntests/", 1)[1].split("\ndocs/", 1)[0]
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "[a-z]*.py"))):  # the top level
        name = os.path.basename(path).removesuffix(".py")
        if name != "conftest" and not re.search(rf"\b{name}\b", tests):
            unlisted.append(os.path.relpath(path, ROOT))
    assert not unlisted, f"docs/architecture.md does not list {unlisted}"


def test_the_architecture_layering_holds_for_module_level_imports():
    """"Each package imports at module level only the ones above it in this list": a module's
    top-level `import cnnjax.<package>` names its own package or one listed before it."""
    order = list(_architecture_tree())
    wrong = []
    for path in sorted(glob.glob(os.path.join(ROOT, "cnnjax", "**", "*.py"), recursive=True)):
        relative = os.path.relpath(path, os.path.join(ROOT, "cnnjax"))
        package = relative.split(os.sep)[0].removesuffix(".py")
        if package not in order:
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for imported in re.findall(r"^(?:from|import) cnnjax\.(\w+)", source, re.M):
            if imported in order and order.index(imported) > order.index(package):
                wrong.append(f"cnnjax/{relative} imports cnnjax.{imported}")
    assert not wrong, f"module-level imports against docs/architecture.md's order: {wrong}"


# `docs/performance.md, "Decision"` or `launch/README.md, "On a real (one-node) SLURM"`: a section
# of another document (or a passage of a source file) cited by its title.
CITED_SECTION = re.compile(r"([\w./-]+\.(?:md|py|sh))[`)\]]*,?\s+\"([^\"\n]{3,60})\"")


def test_a_cited_section_exists():
    """A section a document, script comment or docstring sends the reader to is a heading of
    that markdown file (or a string in that source file): a renamed heading fails here."""
    citing = sorted({*DOCUMENTS, *glob.glob(os.path.join(ROOT, "launch", "*.sh")),
                     *glob.glob(os.path.join(ROOT, "benchmarks", "*.*")),
                     *glob.glob(os.path.join(ROOT, "cnnjax", "**", "*.py"), recursive=True)})
    dangling = []
    for path in citing:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in CITED_SECTION.finditer(text):
            named, section = match.groups()
            candidates = [os.path.join(ROOT, named), os.path.join(os.path.dirname(path), named),
                          os.path.join(ROOT, "docs", os.path.basename(named))]
            target = next((c for c in candidates if os.path.isfile(c)), None)
            where = f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            if target is None:
                dangling.append(f"{where}: {named} (no such file)")
                continue
            with open(target, encoding="utf-8") as f:
                cited = f.read()
            found = (re.search(rf"^#+ .*{re.escape(section)}", cited, re.M)
                     if target.endswith(".md") else section in cited)
            if not found:
                dangling.append(f'{where}: {named}, "{section}"')
    assert not dangling, f"cited sections that do not exist: {dangling}"


# `cnnjax.train.trained.load_trained` in prose, `from cnnjax.layers.conv import Conv2D, ...` in a
# snippet or a `python -c "..."` line.
PYTHON_NAME = re.compile(r"(?<![\w./-])(cnnjax(?:\.[A-Za-z_]\w*)+)(?![\w/-])")
FROM_IMPORT = re.compile(r"\bfrom (cnnjax(?:\.\w+)*) import ([\w ,]+)")


def _defined_names(body: list) -> set[str]:
    """The names a module or class body binds: defs, classes, assignments, imports, `__all__`."""
    import ast

    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names |= {e.value for e in getattr(node.value, "elts", [])
                          if isinstance(e, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            names |= _defined_names(node.body + getattr(node, "orelse", [])
                                    + [n for h in getattr(node, "handlers", []) for n in h.body])
    return names


def _python_name_problem(dotted: str) -> str | None:
    """Why `dotted` names nothing in the repository (None if it does), read from the source:
    the packages and modules it walks exist, the next part is bound at the module's top level
    (a lazy package attribute is in `__all__`), and a class's attribute is bound in its body."""
    import ast

    parts = dotted.split(".")
    path, i = os.path.join(ROOT, parts[0]), 1
    while i < len(parts) and (os.path.isdir(os.path.join(path, parts[i]))
                              or os.path.isfile(os.path.join(path, parts[i] + ".py"))):
        path, i = os.path.join(path, parts[i]), i + 1
    if i == len(parts):
        return None
    source = path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")
    with open(source, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    module = ".".join(parts[:i])
    if parts[i] not in _defined_names(tree.body):
        return f"{module} has no {parts[i]}"
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if (i + 1 < len(parts) and parts[i] in classes
            and parts[i + 1] not in _defined_names(classes[parts[i]].body)):
        return f"{module}.{parts[i]} has no {parts[i + 1]}"
    return None


def test_every_python_name_a_document_cites_exists():
    """`cnnjax.x.y` in the documents and the names their snippets import from cnnjax are
    defined with that spelling: a renamed function fails here, not in a reader's snippet."""
    wrong = []
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cited = [(m.start(), m.group(1)) for m in PYTHON_NAME.finditer(text)]
        cited += [(m.start(), f"{m.group(1)}.{name.split()[0]}")
                  for m in FROM_IMPORT.finditer(text) for name in m.group(2).split(",")
                  if name.strip()]
        for start, dotted in cited:
            problem = _python_name_problem(dotted)
            if problem:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, start) + 1}:"
                             f" {dotted} ({problem})")
    assert not wrong, f"names no cnnjax module defines: {wrong}"


def _python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)


def test_a_python_block_of_a_document_parses():
    import ast

    blocks = [(p, b) for p in DOCUMENTS if p.endswith(".md") for b in _python_blocks(p)]
    assert blocks, "no ```python block found: has the fence changed?"
    for path, block in blocks:
        ast.parse(block, filename=os.path.relpath(path, ROOT))


# A markdown link to a file of the repository: `[README](../README.md)`, `[x](docs/y.md#z)`.
LINK = re.compile(r"\]\((?!\w+://|mailto:)([^)\s#]*)(?:#([^)\s]*))?\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_a_relative_link_of_a_document_resolves():
    """A link is relative to the document that holds it (`../README.md` from docs/), and its
    `#anchor`, if any, is a heading of the target."""
    broken = []
    for path in DOCUMENTS:
        if not path.endswith(".md"):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in LINK.finditer(text):
            target, anchor = match.groups()
            where = f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            full = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if not os.path.exists(full):
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and full.endswith(".md"):
                with open(full, encoding="utf-8") as f:
                    headings = {_anchor(h) for h in re.findall(r"^#+ (.*)$", f.read(), re.M)}
                if anchor not in headings:
                    broken.append(f"{where}: {target}#{anchor} (no such heading)")
    assert not broken, f"links that lead nowhere: {broken}"


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written(capsys):
    """README's "Reusing modules in your own code" snippet, executed as printed; its `# 55`
    comment holds too. Slow: 18 s on 2 busy cores (the summary compiles ResNet-18 at 224x224),
    and each name it imports is checked by the default test above."""
    (block,) = _python_blocks(os.path.join(ROOT, "README.md"))
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert "Total" in capsys.readouterr().out
    assert namespace["conv_output_size"](224, kernel=11, stride=4, padding=2) == 55
    assert namespace["logits"].shape == (1, 10) and "stage4" in namespace["features"]


def test_the_train_step_on_your_own_arrays_runs_as_written():
    """docs/reusing.md's engine-without-the-loop snippet, executed as printed on two CPU devices
    (a subprocess: the device count is fixed when JAX starts)."""
    blocks = _python_blocks(os.path.join(ROOT, "docs", "reusing.md"))
    engine = [i for i, b in enumerate(blocks) if "DataParallel" in b]
    assert len(engine) == 1
    # The next block ("CPU speed in your own training loop") continues it.
    assert "conv_impl(" in blocks[engine[0] + 1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    script = blocks[engine[0]] + "\n" + blocks[engine[0] + 1] + "\nprint(int(state.step[0]))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"loss \d\.\d{3}, top-1 0\.\d{3}\n4\n", result.stdout), result.stdout
