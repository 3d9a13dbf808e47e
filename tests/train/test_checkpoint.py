"""Orbax checkpointing: keep the last k plus the best by an eval metric; exact round trip."""

import jax
import numpy as np
import pytest

from cnnjax.train.checkpoint import Checkpointer


def _state(value):
    return {"params": {"w": np.full((2, 3), value, np.float32)}, "step": np.array(value, np.int32)}


@pytest.mark.parametrize(
    "mode,metric,values,best",
    [
        ("max", "top1", {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.65}, 20),
        ("min", "loss", {10: 2.0, 20: 0.3, 30: 0.8, 40: 0.9, 50: 0.7}, 20),
    ],
)
def test_keeps_last_k_and_best(tmp_path, mode, metric, values, best):
    checkpointer = Checkpointer(
        str(tmp_path), keep=2, best_metric=metric, best_mode=mode, use_async=True
    )
    for step, value in values.items():
        checkpointer.save(step, _state(step), {metric: value, "other": 0.0})
        checkpointer.save(step + 5, _state(step + 5))  # a periodic save without eval metrics
    checkpointer.wait()
    assert checkpointer.all_steps() == sorted({best, 50, 55})
    checkpointer.close()


@pytest.mark.parametrize("mode, first, later", [("max", 0.9, 0.5), ("min", 0.5, 0.9)])
def test_best_survives_a_resume(tmp_path, mode, first, later):
    """The best checkpoint of an earlier process is still kept after a resume (a new
    Checkpointer on the same workdir): the ranking metrics are on disk, not only in memory."""
    before = Checkpointer(str(tmp_path), keep=1, best_metric="top1", best_mode=mode)
    before.save(2, _state(2), {"top1": first})  # the best, in this mode
    before.save(4, _state(4))
    before.close()
    resumed = Checkpointer(str(tmp_path), keep=1, best_metric="top1", best_mode=mode)
    resumed.save(6, _state(6), {"top1": later})
    resumed.save(8, _state(8))
    resumed.wait()
    assert resumed.all_steps() == [2, 8]  # best (from before the resume) + the latest
    resumed.close()


def test_saves_without_metrics_do_not_warn(tmp_path, caplog):
    checkpointer = Checkpointer(str(tmp_path), keep=2, best_metric="top1", use_async=False)
    with caplog.at_level("WARNING"):
        checkpointer.save(1, _state(1))
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
    checkpointer.close()


def test_round_trip_is_exact_and_restores_newest(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    rng = np.random.default_rng(0)
    state = {
        "params": {"w": rng.normal(size=(4, 4)).astype(np.float32)},
        "step": np.array(7, np.int32),
    }
    checkpointer.save(3, _state(3))
    checkpointer.save(7, state)
    restored, step = checkpointer.restore_latest(_state(0))
    assert step == 7
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert restored["params"]["w"].dtype == np.float32
    checkpointer.close()
    assert Checkpointer(str(tmp_path / "empty")).restore_latest(_state(0)) is None


def test_nothing_restorable_raises_and_keeps_files(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(5, _state(5))
    wrong = {
        "params": {"w": np.zeros((2, 3), np.float32), "extra": np.zeros(2)},
        "step": np.array(0, np.int32),
    }
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as err:
        checkpointer.restore_latest(wrong)
    assert "could be restored into the current state structure" in str(err.value)
    assert "--config.restart=True" in str(err.value)
    assert checkpointer.all_steps() == [5]
    checkpointer.close()


def test_unreadable_metrics_file_quarantines_that_checkpoint(tmp_path):
    """Orbax reads every checkpoint's metrics when it starts: a corrupt metrics file must not
    stop a resume; that checkpoint is set aside like any unreadable one."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2), {"top1": 0.5})
    checkpointer.save(4, _state(4), {"top1": 0.7})
    checkpointer.close()
    (tmp_path / "checkpoints" / "4" / "metrics" / "metrics").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"step 4 .* \(its metrics file is unreadable\)"):
        resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    restored, step = resumed.restore_latest(_state(0))
    assert step == 2 and resumed.all_steps() == [2]
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["4"]
    resumed.close()


def test_close_awaits_the_temporary_directory_cleanup_orbax_starts_on_open(tmp_path):
    """Else a run that stops before its first save (bad init_from, failed restore) exits while
    orbax's cleanup thread still schedules work, printing a traceback after the run's error."""
    checkpointer = Checkpointer(str(tmp_path), keep=2, use_async=True)
    manager = checkpointer._manager
    if not hasattr(manager, "_cleanup_tmp_directory_future"):
        pytest.skip("this orbax version has no open-time cleanup future")
    checkpointer.close()
    assert manager._cleanup_tmp_directory_future is None  # awaited and cleared


def test_unreadable_metadata_warns_that_run_info_is_lost(tmp_path):
    """The arrays still restore; the recorded device/process counts and train-log window do
    not, and the run says so instead of silently changing its logs."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2), run_info={"num_devices": 4})
    assert checkpointer.run_info(2) == {"num_devices": 4}
    checkpointer.close()
    (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_text("")  # torn
    resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    with pytest.warns(RuntimeWarning, match=r"metadata of the checkpoint at step 2 .* cannot be "
                                            r"read .* without the device and process counts"):
        assert resumed.run_info(2) == {}
    assert resumed.restore_latest(_state(0))[1] == 2
    resumed.close()


def test_every_process_drops_a_quarantined_step_only_after_it_is_moved(tmp_path, monkeypatch):
    """Multi-process: process 0 moves an unreadable step aside; a process reloading its step
    list before that move would keep the step and fail to save it again (orbax's
    StepAlreadyExistsError). The reload waits at a barrier after the move."""
    from cnnjax.train import checkpoint as checkpoint_lib

    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2))
    checkpointer.save(4, _state(4))
    checkpointer.close()
    (tmp_path / "checkpoints" / "4" / "default" / "_METADATA").write_text("")
    events = []

    class TwoProcesses:
        """`jax` as the checkpoint module sees it, in process 0 of 2 (orbax keeps the real one)."""

        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def process_count():
            return 2

    monkeypatch.setattr(checkpoint_lib, "jax", TwoProcesses())
    monkeypatch.setattr(checkpoint_lib.multihost_utils, "sync_global_devices",
                        lambda name: events.append(f"barrier {name}"))
    resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    move, reload = resumed._move_to_quarantine, resumed._manager.reload
    monkeypatch.setattr(resumed, "_move_to_quarantine",
                        lambda steps: (move(steps), events.append(f"move {steps}")))
    monkeypatch.setattr(resumed._manager, "reload", lambda: (reload(), events.append("reload")))
    with pytest.warns(RuntimeWarning, match="step 4"):
        assert resumed.restore_latest(_state(0))[1] == 2
    assert events[-3:] == ["move [4]", "barrier cnnjax_checkpoint_restore_quarantine", "reload"]
    resumed.save(4, _state(5))  # the step can be written again
    resumed.close()
