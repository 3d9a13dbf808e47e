"""SIGTERM (preemption, scancel): the loop checkpoints the step it stops at, writes summary.json
with status "interrupted" and exits with 143; the rerun resumes bitwise. In-process on the
synthetic data, and as `python -m experiments.train` on LeNet-5/digits (slow)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cnnjax.train import loop, preemption
from tests.train import helpers
from tests.train.test_loop import _final_params


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


def _sigterm_when_batch(monkeypatch, index: int) -> None:
    """Makes the data source send this process SIGTERM when it produces batch `index` (from the
    prefetch thread, as an external `kill` would arrive: asynchronously to the loop)."""
    original = helpers.train_batches

    def terminating(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == index:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", terminating)


def test_sigterm_checkpoints_the_stop_step_and_the_rerun_is_bitwise(tmp_path, monkeypatch):
    # No periodic checkpoint before the end: the only one a stop leaves is the stop step's.
    config = helpers.tiny_config(checkpoint_every_steps=100, **{"model_kwargs.dropout_rate": 0.3})
    reference = tmp_path / "reference"
    loop.train_and_evaluate(config, str(reference))

    _sigterm_when_batch(monkeypatch, 5)
    before = signal.getsignal(signal.SIGTERM)
    stopped = tmp_path / "stopped"
    with pytest.raises(preemption.TrainingInterrupted) as info:
        loop.train_and_evaluate(config, str(stopped))
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert isinstance(info.value, KeyboardInterrupt) and info.value.code == 143
    step = info.value.step
    assert 1 <= step < 12
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["step"] == summary["checkpoint_step"] == step
    assert summary["exit_code"] == 143
    assert sorted(int(n) for n in os.listdir(stopped / "checkpoints") if n.isdigit()) == [step]

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches",
                        helpers.train_batches)
    resumed = loop.train_and_evaluate(config, str(stopped))
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == step
    a, _ = _final_params(str(reference), config)
    b, _ = _final_params(str(stopped), config)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_handler_is_installed_only_from_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with preemption.StopRequest():
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["handler"] is before
    with preemption.StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the Python-level handler runs at the next bytecode
        assert stop.should_stop(3, sync_every=10) == "SIGTERM"  # one process: at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_no_loop_acted_on_stops_the_next_run_before_it_trains(tmp_path, caplog):
    """A SIGTERM caught after a run's last poll stays pending (it used to be dropped with the
    handler, so a sweep's next trial trained on): the next run stops before training, writing
    nothing; once acted on it is gone and a rerun trains."""
    with preemption.StopRequest():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the Python-level handler runs at the next bytecode
    with preemption.StopRequest() as stop:  # carried into the next request, until acted on
        assert stop.requested == "SIGTERM"
    with pytest.raises(preemption.TrainingInterrupted) as info, caplog.at_level("WARNING"):
        loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    assert info.value.code == 143 and not info.value.started
    assert "before training" in str(info.value)
    assert str(info.value) in caplog.text  # said once: uncaught, it exits 143 without a word
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
    with preemption.StopRequest() as stop:
        assert stop.requested is None
    assert loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))["status"] == "completed"


def test_a_sigterm_after_the_last_poll_lets_the_run_complete_and_stays_pending(tmp_path,
                                                                            monkeypatch):
    """The last poll is after step 11 of 12 (step 12 is checkpointed anyway): a SIGTERM while
    step 12 runs cannot stop the run, which completes; the signal stays pending for the
    process's next run (preemption.py), instead of the final step being saved as a stop."""
    record = loop._Run.record

    def sigterm_at_step_11(self, step, *args):
        if step == 11:  # recorded after step 12 was dispatched, past the step-11 poll
            os.kill(os.getpid(), signal.SIGTERM)
        return record(self, step, *args)

    monkeypatch.setattr(loop._Run, "record", sigterm_at_step_11)
    try:
        with helpers.sigterm_fallback() as caught:
            try:
                summary = loop.train_and_evaluate(helpers.tiny_config(num_train_steps=12),
                                                  str(tmp_path))
            except preemption.TrainingInterrupted as err:  # a KeyboardInterrupt: ends pytest
                pytest.fail(f"the run stopped after its last poll: {err}")
    finally:
        pending = preemption.take_pending()  # acted on here: no later test inherits it
    assert caught == []  # the run's handler took it
    assert summary["status"] == "completed" and summary["step"] == 12
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert pending == "SIGTERM"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reported, as meant
def test_a_ctrl_c_python_swallowed_in_a_gc_callback_stops_at_the_next_poll(tmp_path,
                                                                          monkeypatch):
    """Ctrl-C's KeyboardInterrupt raised inside a garbage-collection callback (JAX registers
    one) is only reported by Python ("Exception ignored in ..."), and training went on; the
    loop's next poll now raises it, so the run stops as on any Ctrl-C."""
    import gc

    def interrupted_collection(phase, info):
        if phase == "start":
            raise KeyboardInterrupt

    record = loop._Run.record

    def ctrl_c_in_gc_at_step_3(self, step, *args):
        if step == 3:
            gc.callbacks.append(interrupted_collection)
            try:
                gc.collect()  # the KeyboardInterrupt is swallowed here, as in JAX's callback
            finally:
                gc.callbacks.remove(interrupted_collection)
        return record(self, step, *args)

    monkeypatch.setattr(loop._Run, "record", ctrl_c_in_gc_at_step_3)
    hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt) as info:
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=12), str(tmp_path))
    assert not isinstance(info.value, preemption.TrainingInterrupted)
    assert sys.unraisablehook is hook  # restored
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "KeyboardInterrupt"
    assert 3 <= summary["step"] < 12
    preemption.raise_swallowed_interrupt()  # raised once: nothing left for the next run


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reported, as meant
def test_a_swallowed_ctrl_c_is_forgotten_when_the_outermost_request_exits():
    """Noted only while a StopRequest is active; one no poll raised (it arrived after a run's
    last step) stops the next run of the same sweep, not a later, unrelated command."""
    with preemption.StopRequest():
        with preemption.StopRequest():
            sys.unraisablehook(_unraisable(KeyboardInterrupt()))
        with preemption.StopRequest() as stop, pytest.raises(KeyboardInterrupt):
            stop.should_stop(1, sync_every=1)  # the sweep's next run
        sys.unraisablehook(_unraisable(KeyboardInterrupt()))
    with preemption.StopRequest() as stop:
        assert stop.should_stop(1, sync_every=1) is None
    sys.unraisablehook(_unraisable(ValueError()))  # outside any request: not noted
    with preemption.StopRequest() as stop:
        assert stop.should_stop(1, sync_every=1) is None


def test_a_hook_installed_inside_a_request_outlives_it_and_ctrl_c_is_still_noted(monkeypatch):
    """A hook installed inside a request (the checkpoints' filter of late tensorstore callbacks)
    wraps the request's own; restoring the hook found on entry dropped it. It stays now, and the
    request's hook under it notes a swallowed Ctrl-C only inside the next request, unstacked."""
    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))

    def wrapping(previous):
        def hook(unraisable):
            previous(unraisable)

        hook.__wrapped__ = previous
        return hook

    with preemption.StopRequest():
        sys.unraisablehook = inner = wrapping(sys.unraisablehook)
    assert sys.unraisablehook is inner
    sys.unraisablehook(_unraisable(KeyboardInterrupt()))  # between runs: reported, not noted
    with preemption.StopRequest() as stop:
        assert sys.unraisablehook is inner  # the hook under `inner` is reused, not stacked
        assert stop.should_stop(1, sync_every=1) is None
        sys.unraisablehook(_unraisable(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            stop.should_stop(2, sync_every=1)
    assert sys.unraisablehook is inner
    assert seen == [KeyboardInterrupt, KeyboardInterrupt]


def _unraisable(error: BaseException):
    """What Python passes `sys.unraisablehook` for an error it cannot raise."""
    return type("UnraisableHookArgs", (), {"exc_type": type(error), "exc_value": error,
                                           "exc_traceback": None, "err_msg": "Exception ignored",
                                           "object": None})()


def test_processes_agree_only_at_sync_steps(monkeypatch):
    """Two processes, only the other one signalled: no collective off sync steps, and at a sync
    step the other's flag stops this one too."""
    from jax.experimental import multihost_utils

    gathered = []

    def allgather(flag):
        gathered.append(int(flag))
        return np.array([int(flag), 1], np.int32)  # process 1 has its flag set

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    stop = preemption.StopRequest()
    assert [stop.should_stop(s, sync_every=4) for s in (1, 2, 3)] == [None] * 3
    assert gathered == []
    assert stop.should_stop(4, sync_every=4) == "SIGTERM"
    assert gathered == [0]


@pytest.mark.slow
def test_sigterm_to_experiments_train_then_rerun_is_bitwise(tmp_path):
    """The real entry point on LeNet-5/digits: SIGTERM mid-run -> exit 143, summary "interrupted",
    a checkpoint at the stop step (periodic ones are off); rerun == an uninterrupted run."""
    from tests.experiments.test_train import ROOT, _command, _env, _final_params, _leaves

    extra = ("--config.checkpoint_every_steps=1000", "--config.log_every_steps=10")
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    ref_proc = subprocess.Popen(_command(reference, *extra), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_command(stopped, *extra), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"train"' in metrics.read_text():
            break  # training has started (first train log at step 10)
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    step = summary["checkpoint_step"]
    assert 10 <= step < 120, "the run finished before it could be stopped"
    assert sorted(int(n) for n in os.listdir(stopped / "checkpoints") if n.isdigit()) == [step]
    assert ref_proc.wait(timeout=300) == 0

    rerun = subprocess.run(_command(stopped, *extra), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(Path(stopped / "summary.json").read_text())["resumed_from_step"] == step
    ref_step, ref_params, ref_opt = _final_params(reference)
    final_step, params, opt = _final_params(stopped)
    assert ref_step == final_step == 120
    for (name, a), (name_b, b) in zip(
        _leaves({"p": ref_params, "o": ref_opt}), _leaves({"p": params, "o": opt}), strict=True
    ):
        assert name == name_b
        np.testing.assert_array_equal(a, b, err_msg=name)
