"""The test suite's warning policy (pyproject.toml's filterwarnings): a deprecation that cnnjax's
own code (or a test's) triggers fails the test, one raised inside a third-party library is ignored.

A library's deprecation shim warns with stacklevel=2, so the warning is attributed to the module
that called the deprecated API; these tests build such shims and callers in named modules.
"""

import types
import warnings

import pytest


def _module(name: str, source: str) -> types.SimpleNamespace:
    """The functions defined by `source`, run with `__name__ == name` (warnings' attribution)."""
    namespace = {"__name__": name}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 — fixed test source
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if callable(v)})


_SHIM = _module("somelib._src.api", """
import warnings
def old_api(category):
    warnings.warn("old_api is deprecated; use new_api", category, stacklevel=2)
""")


def _caller(name: str):
    """A module named `name` whose `call` uses the deprecated third-party API."""
    return _module(name, "def call(shim, category):\n    shim.old_api(category)\n")


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["cnnjax", "cnnjax.train.loop", "experiments.run",
                                    "launch.slurm", "tests.train.test_step"])
def test_a_deprecation_triggered_by_cnnjax_code_is_an_error(module, category):
    with pytest.raises(category, match="old_api is deprecated"):
        _caller(module).call(_SHIM, category)


@pytest.mark.parametrize("module", ["flax.linen.module", "optax._src.alias", "somelib.other",
                                    "cnnjaxfork.layers", "my_tests"])
def test_a_deprecation_raised_inside_a_third_party_library_is_ignored(module):
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters pytest set
        _caller(module).call(_SHIM, DeprecationWarning)
    assert caught == []


def test_a_test_modules_own_deprecated_call_is_an_error():
    with pytest.raises(DeprecationWarning, match="old_api is deprecated"):
        _SHIM.old_api(DeprecationWarning)  # attributed to this module, tests.test_warnings
