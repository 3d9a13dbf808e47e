"""cnnjax.platform: CPU defaults are opt-in, never override the user's XLA_FLAGS, and reach XLA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnnjax import platform

REPO = Path(__file__).resolve().parents[1]
YNN = "xla_cpu_experimental_ynn_fusion_type"

# A conv + reduce + dot function whose compiled CPU HLO has YNNPACK fusions under jaxlib 0.10's
# default flags; shared by the subprocess checks below.
_HLO_PROBE = """
import jax, jax.numpy as jnp
def _probe(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) * 2.0, axis=(1, 2)) @ jnp.ones((8, 4))
def compiled_hlo():
    return jax.jit(_probe).lower(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 8))).compile().as_text()
"""


def _run(code: str, **env_overrides: str) -> dict:
    """Runs `code` in a fresh interpreter (no XLA_FLAGS unless given); returns its JSON stdout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", platform.OPT_OUT_ENV, platform.TF_LOG_LEVEL_ENV)}
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parse_xla_flags_reads_values_bare_flags_and_quotes():
    parsed = platform.parse_xla_flags(
        "--a=1  --b= --c --d='x y' --a=2 --e=k=v --f=\"say \\\"hi\\\"\" --g=it's")
    assert parsed == {"a": "2", "b": "", "c": None, "d": "x y", "e": "k=v", "f": 'say "hi"',
                      "g": "it's"}
    assert platform.parse_xla_flags("") == {}
    assert platform.parse_xla_flags("--unbalanced='x y") == {"unbalanced": "x y"}


def test_xla_stops_reading_at_the_first_token_that_is_no_flag():
    """XLA's parser ends at a stray word (or a bool flag's separate value) and ignores the
    rest: a flag after it is not set, whatever the string says."""
    assert platform.read_xla_flags("--a=1 --c 'ignored' --d=2") == (
        {"a": "1", "c": None}, "'ignored' --d=2")
    assert platform.read_xla_flags("--a=1 false --b") == ({"a": "1"}, "false --b")
    assert platform.read_xla_flags("  --a  ") == ({"a": None}, "")


def test_defaults_go_before_a_stray_token_with_a_warning():
    """Appended after it, they were reported as added and never read (YNN fusions stayed on);
    a flag of the user's after it is not set either, so the default is added."""
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 stray --{YNN}=reduce"}
    with pytest.warns(RuntimeWarning, match=r"XLA stops reading XLA_FLAGS at 'stray'"):
        added = platform.configure_cpu_defaults(environ=env)
    assert added == {YNN: ""}
    assert env["XLA_FLAGS"] == (f"--{YNN}= --xla_force_host_platform_device_count=2 stray "
                                f"--{YNN}=reduce")
    assert platform.parse_xla_flags(env["XLA_FLAGS"]) == {
        YNN: "", "xla_force_host_platform_device_count": "2"}


def test_adds_defaults_to_an_empty_environment():
    env: dict[str, str] = {}
    added = platform.configure_cpu_defaults(environ=env)
    assert added == platform.CPU_DEFAULT_FLAGS
    assert platform.parse_xla_flags(env["XLA_FLAGS"]) == platform.CPU_DEFAULT_FLAGS
    assert f"--{YNN}=" in env["XLA_FLAGS"].split()


def test_user_flags_are_preserved_and_win():
    user = f"--{YNN}=reduce --xla_force_host_platform_device_count=4"
    env = {"XLA_FLAGS": user}
    assert platform.configure_cpu_defaults(environ=env) == {}
    assert env["XLA_FLAGS"] == user
    # Flags the user did not name are appended after theirs, theirs unchanged.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    added = platform.configure_cpu_defaults({"a_flag": "1", YNN: ""}, environ=env)
    assert added == {"a_flag": "1", YNN: ""}
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 --a_flag=1 --{YNN}="


def test_values_with_spaces_are_quoted():
    env: dict[str, str] = {}
    platform.configure_cpu_defaults({"x": "a b"}, environ=env)
    assert platform.parse_xla_flags(env["XLA_FLAGS"]) == {"x": "a b"}


def test_idempotent():
    env: dict[str, str] = {}
    first = platform.configure_cpu_defaults(environ=env)
    flags_after_first = env["XLA_FLAGS"]
    assert first
    assert platform.configure_cpu_defaults(environ=env) == {}
    assert env["XLA_FLAGS"] == flags_after_first


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_opt_out_env_var(value):
    env = {platform.OPT_OUT_ENV: value}
    assert platform.configure_cpu_defaults(environ=env) == {}
    assert "XLA_FLAGS" not in env


@pytest.mark.parametrize("value", ["/cluster/xla_flags.txt", "  flags.txt"])
def test_a_flags_file_is_left_alone(value):
    """XLA reads an XLA_FLAGS value not starting with '-' as a file of flags; appending ours to
    it made XLA open '<path> --xla_...' and abort."""
    env = {"XLA_FLAGS": value}
    assert platform.configure_cpu_defaults(environ=env) == {}
    assert env == {"XLA_FLAGS": value}


def test_too_late_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(platform, "jax_backend_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--x=1")
    monkeypatch.delenv(platform.OPT_OUT_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="backend is already initialized"):
        assert platform.configure_cpu_defaults() == {}
    assert os.environ["XLA_FLAGS"] == "--x=1"


def test_explicit_environ_is_edited_even_after_the_backend_started(monkeypatch):
    """A mapping passed in (a subprocess's environment) is not this process's XLA state."""
    monkeypatch.setattr(platform, "jax_backend_initialized", lambda: True)
    env = {"XLA_FLAGS": "--x=1"}
    assert platform.configure_cpu_defaults(environ=env) == platform.CPU_DEFAULT_FLAGS
    assert env["XLA_FLAGS"].startswith("--x=1 --xla_cpu_experimental_ynn_fusion_type=")


def test_quiet_tensorflow_info_sets_tf_log_level_only_when_the_user_has_not():
    env: dict[str, str] = {}
    assert platform.quiet_tensorflow_info(environ=env) is True
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "1"}
    assert platform.quiet_tensorflow_info(environ=env) is False  # idempotent
    user = {"TF_CPP_MIN_LOG_LEVEL": "0"}  # a user debugging TF keeps its INFO lines
    assert platform.quiet_tensorflow_info(environ=user) is False
    assert user == {"TF_CPP_MIN_LOG_LEVEL": "0"}


def test_configure_entry_point_quiets_tf_and_adds_the_cpu_defaults(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=reduce")  # the user's value: nothing to add
    assert platform.configure_entry_point() == {}
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert os.environ["XLA_FLAGS"] == f"--{YNN}=reduce"


@pytest.mark.parametrize("module", ["evaluate", "lr_range_test", "proposals", "rcnn_svm",
                                    "robustness", "sweep", "train", "transfer", "tune",
                                    "visualize"])
def test_experiment_commands_configure_the_process_before_importing_jax_or_tensorflow(module):
    """Each `experiments.<command>` calls `configure_entry_point()` before its first import of
    absl, JAX, TensorFlow or cnnjax's heavier modules (their settings are read once, at start)."""
    source = (REPO / "experiments" / f"{module}.py").read_text()
    call = source.index("\nconfigure_entry_point()\n")
    for heavy in ("\nimport jax", "\nfrom jax", "\nimport tensorflow", "\nfrom absl",
                  "\nfrom cnnjax.utils", "\nfrom cnnjax.train", "\nfrom cnnjax.data"):
        where = source.find(heavy)
        assert where == -1 or where > call, (module, heavy)


def test_importing_cnnjax_changes_no_global_state():
    """Importing every cnnjax module leaves XLA_FLAGS alone, and XLA keeps its own defaults."""
    out = _run(_HLO_PROBE + """
import importlib, json, os, pkgutil
import cnnjax, jaxlib
failed = []
for info in pkgutil.walk_packages(cnnjax.__path__, "cnnjax."):
    try:
        importlib.import_module(info.name)
    except Exception as e:  # recorded: a module that does not import is not checked at all
        failed.append(f"{info.name}: {e!r}")
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS"), "failed": failed,
                  "ynn": "__ynn_fusion" in compiled_hlo(), "jaxlib": jaxlib.__version__}))
""")
    assert out["failed"] == [] and out["xla_flags"] is None, out
    if out["jaxlib"].startswith("0.10."):  # the default this module works around is in effect
        assert out["ynn"], "expected XLA's default YNN fusions without configure_cpu_defaults()"


def test_flags_reach_xla_and_a_late_call_warns():
    """Called after `import jax` but before the backend starts, the flags take effect."""
    out = _run(_HLO_PROBE + """
import json, warnings
from cnnjax.platform import configure_cpu_defaults
added = configure_cpu_defaults()
added_count = configure_cpu_defaults({"xla_force_host_platform_device_count": "3"})
devices = jax.device_count()
ynn = "__ynn_fusion" in compiled_hlo()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    late = configure_cpu_defaults({"xla_cpu_enable_fast_math": "false"})
print(json.dumps({"added": added, "count": added_count, "devices": devices, "ynn": ynn,
                  "late": late, "warnings": [str(w.message) for w in caught]}))
""")
    assert out["added"] == platform.CPU_DEFAULT_FLAGS
    assert out["count"] == {"xla_force_host_platform_device_count": "3"}
    assert out["devices"] == 3
    assert not out["ynn"], "YNN fusions still compiled in with the cnnjax CPU defaults"
    assert out["late"] == {}
    assert len(out["warnings"]) == 1 and "already initialized" in out["warnings"][0]


def test_defaults_before_a_stray_token_reach_xla():
    """The same in a fresh process: the flag put before the stray word takes effect."""
    out = _run(_HLO_PROBE + """
import json, warnings
from cnnjax.platform import configure_cpu_defaults
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    added = configure_cpu_defaults()
print(json.dumps({"added": added, "devices": jax.device_count(),
                  "ynn": "__ynn_fusion" in compiled_hlo(), "warned": len(caught)}))
""", XLA_FLAGS="--xla_force_host_platform_device_count=2 stray")
    assert out == {"added": platform.CPU_DEFAULT_FLAGS, "devices": 2, "ynn": False, "warned": 1}
