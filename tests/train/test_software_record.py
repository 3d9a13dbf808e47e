"""The software stack (Python, jax, jaxlib, flax, optax, orbax-checkpoint, backend) each checkpoint
records: a resume under another one is warned about and kept in summary.json, as a resume on
another device count is (tests/train/test_loop.py). Other stacks are simulated by patching
`loop.software_stack`; a real one (jax 0.10.2 -> 0.11.2) resumed at the same step, parameters
~1e-7 from an uninterrupted run after 200 lenet5 steps."""

import platform
import sys
import types

import flax
import jax
import jaxlib
import optax
import orbax.checkpoint
import pytest

from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer
from tests.train import helpers

STACK_A = {"python": "3.11.7", "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8",
           "optax": "0.2.8", "orbax-checkpoint": "0.12.8"}
STACK_B = {**STACK_A, "python": "3.12.1", "jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.12.12"}
CHANGED = "software stack"  # in the warning, and in no other warning of these runs


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


def _use_stack(monkeypatch, stack: dict) -> None:
    """This process "runs" `stack` (the backend stays the real one)."""
    monkeypatch.setattr(loop, "software_stack", lambda backend: {**stack, "backend": backend})


def _software(workdir, step: int):
    """The software record of `step`'s checkpoint (None without one)."""
    checkpoints = Checkpointer(str(workdir))
    try:
        return checkpoints.run_info(step).get(loop.SOFTWARE)
    finally:
        checkpoints.close()


def _stack_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and CHANGED in r.getMessage()]


def test_software_stack_names_the_running_versions_as_json_strings():
    stack = loop.software_stack("cpu")
    assert stack == {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "optax": optax.__version__,
                     "orbax-checkpoint": orbax.checkpoint.__version__, "backend": "cpu"}
    assert stack["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")


def test_a_resume_under_another_software_stack_is_warned_and_recorded(tmp_path, monkeypatch,
                                                                       caplog):
    """Written under A, resumed under B: one warning naming each change (old -> new); the
    checkpoints after it and summary.json keep [A, B], through a second resume under B, which
    warns no more."""
    backend = jax.devices()[0].platform
    a, b = {**STACK_A, "backend": backend}, {**STACK_B, "backend": backend}
    config = helpers.tiny_config()
    _use_stack(monkeypatch, STACK_A)
    helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=5)
    assert _software(tmp_path, 4) == [a]

    _use_stack(monkeypatch, STACK_B)
    with caplog.at_level("WARNING"):
        helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=9)
    (warning,) = _stack_warnings(caplog)
    for change in ("python 3.11.7 -> 3.12.1", "jax 0.10.2 -> 0.11.2", "jaxlib 0.10.2 -> 0.11.2",
                   "flax 0.12.8 -> 0.12.12"):
        assert change in warning
    assert "optax" not in warning and "backend" not in warning
    assert "continues" in warning and "not be bitwise" in warning
    assert _software(tmp_path, 8) == [a, b]

    caplog.clear()
    with caplog.at_level("WARNING"):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert _stack_warnings(caplog) == []
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
    assert summary[loop.SOFTWARE] == [a, b]
    assert _software(tmp_path, 12) == [a, b]


def test_a_resume_under_the_same_software_stack_is_silent(tmp_path, monkeypatch, caplog):
    """The real stack throughout: nothing warned, summary.json has no `software` list."""
    config = helpers.tiny_config()
    helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=5)
    with caplog.at_level("WARNING"):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert _stack_warnings(caplog) == []
    assert summary["resumed_from_step"] == 4 and loop.SOFTWARE not in summary
    real = loop.software_stack(jax.devices()[0].platform)
    assert _software(tmp_path, 12) == [real]


def test_a_checkpoint_without_a_software_record_resumes_silently(tmp_path, monkeypatch,
                                                                  caplog):
    """Checkpoints written before the record was kept resume under any stack without a
    warning; the checkpoints from there on record the stack they were written under."""
    config = helpers.tiny_config()
    save = Checkpointer.save

    def save_without_record(self, step, item, metrics=None, run_info=None):
        run_info = {k: v for k, v in (run_info or {}).items() if k != loop.SOFTWARE}
        return save(self, step, item, metrics, run_info=run_info)

    _use_stack(monkeypatch, STACK_A)
    monkeypatch.setattr(Checkpointer, "save", save_without_record)
    helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=5)
    monkeypatch.setattr(Checkpointer, "save", save)
    assert _software(tmp_path, 4) is None

    _use_stack(monkeypatch, STACK_B)
    with caplog.at_level("WARNING"):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert _stack_warnings(caplog) == []
    assert summary["resumed_from_step"] == 4 and loop.SOFTWARE not in summary
    assert _software(tmp_path, 12) == [{**STACK_B, "backend": jax.devices()[0].platform}]


@pytest.mark.parametrize("info, warned", [
    ({}, []),  # written before the record was kept
    ({loop.SOFTWARE: [{**STACK_A, "backend": "cpu"}]}, []),
    ({loop.SOFTWARE: [{**STACK_B, "backend": "cpu"}]}, ["jax 0.11.2 -> 0.10.2"]),
    ({loop.SOFTWARE: [{**STACK_A, "backend": "gpu"}]}, ["backend gpu -> cpu"]),
    # a record lacking a key (an older cnnjax's) is no change in that key
    ({loop.SOFTWARE: [{"jax": "0.10.2"}]}, []),
])
def test_warn_if_software_changed_compares_the_last_recorded_stack(info, warned, caplog):
    current = {**STACK_A, "backend": "cpu"}
    run = types.SimpleNamespace(current_software=lambda: current)
    with caplog.at_level("WARNING"):
        loop._Run.warn_if_software_changed(run, info)
    assert len(caplog.records) == len(warned)
    for record, text in zip(caplog.records, warned, strict=True):
        assert text in record.getMessage()
    recorded = info.get(loop.SOFTWARE, [])
    assert run.software == (recorded + [current] if warned else recorded)
