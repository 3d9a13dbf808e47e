"""tests/conftest.py: each pytest run gets its own private XLA compilation cache, which its xdist
workers share and which is removed when the run ends; a JAX_COMPILATION_CACHE_DIR you set wins."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two tests that compile a program and record the cache directory their process was given.
_PROBE = textwrap.dedent("""
    import json, os
    import jax, jax.numpy as jnp
    import pytest

    @pytest.mark.parametrize("i", [0, 1])
    def test_record(i):
        jax.jit(lambda x: jnp.sin(x) * 3.0 + i)(jnp.ones(4)).block_until_ready()
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
        record = {"dir": path, "mode": os.stat(path).st_mode & 0o777, "entries": os.listdir(path),
                  "worker": os.environ.get("PYTEST_XDIST_WORKER")}
        with open(os.path.join(os.environ["PROBE_OUT"], f"{i}.json"), "w") as f:
            json.dump(record, f)
""")


def _run_probe(tmp_path, workers: int, **env_changes: str) -> list[dict]:
    """Runs the probe in a fresh pytest under tests/conftest.py on `workers` xdist workers (0:
    none) without the outer run's cache directory; returns what its two tests recorded."""
    (tmp_path / "test_probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=ROOT, PROBE_OUT=str(tmp_path), JAX_PLATFORMS="cpu", **env_changes)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "tests.conftest",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]


def test_a_run_makes_a_private_cache_and_removes_it(tmp_path):
    """Not the fixed `$TMPDIR/cnnjax_test_jax_cache` of before: JAX runs what it finds in the
    cache, so whoever made that path first supplied the tests' executables, and it grew without
    bound across runs."""
    first, second = _run_probe(tmp_path, 0)
    path = first["dir"]
    assert second["dir"] == path
    assert os.path.basename(path).startswith("cnnjax_test_jax_cache_")
    assert first["mode"] == 0o700
    assert any(name.startswith("jit_") for name in second["entries"])  # the cache is used
    assert not os.path.exists(path)


@pytest.mark.slow  # 19-25 s: two xdist workers each import torchvision; the env inheritance it
# relies on is the default test's single process, whose directory and removal it checks
def test_xdist_workers_share_the_runs_cache(tmp_path):
    records = _run_probe(tmp_path, 2)
    assert {record["worker"] for record in records} == {"gw0", "gw1"}
    assert records[0]["dir"] == records[1]["dir"]
    assert not os.path.exists(records[0]["dir"])


def test_a_cache_dir_you_set_is_used_and_kept(tmp_path):
    mine = tmp_path / "my_cache"
    first, _ = _run_probe(tmp_path, 0, JAX_COMPILATION_CACHE_DIR=str(mine))
    assert first["dir"] == str(mine)
    assert any(name.startswith("jit_") for name in os.listdir(mine))
