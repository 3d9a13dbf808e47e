"""Orbax checkpointing: keep the last k plus the best by an eval metric; exact round trip."""

import json
import os
import re
import types
import warnings

import jax
import numpy as np
import pytest

from cnnjax.train.checkpoint import (
    Checkpointer,
    CheckpointShapeError,
    SourceCheckpoints,
    step_folders,
)
from cnnjax.train.preemption import StopRequest


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


@pytest.mark.parametrize("best_metric, kept", [("top1", [20, 40, 50]), (None, [40, 50])])
def test_prune_applies_the_keep_policy_orbax_had_not_applied_yet(tmp_path, best_metric, kept):
    """Orbax prunes only once a later save commits: a run killed between its final save and
    the pruning kept one checkpoint too many for good. `prune` applies the policy at once."""
    before = Checkpointer(str(tmp_path), keep=5, best_metric="top1")
    for step, top1 in {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.65}.items():
        before.save(step, _state(step), {"top1": top1})
    before.close()
    after = Checkpointer(str(tmp_path), keep=2, best_metric=best_metric)
    assert after.all_steps() == [10, 20, 30, 40, 50]
    assert after.prune() == sorted({10, 20, 30} - set(kept))
    assert after.all_steps() == kept and after.prune() == []
    after.close()


@pytest.mark.parametrize("also_best, kept", [("ema_top1", [1, 3, 5]), (None, [3, 5])])
def test_the_weight_averages_best_checkpoint_is_kept_too(tmp_path, also_best, kept):
    """With a weight average, the step where `ema_top1` peaked (1) was deleted when `top1`
    peaked elsewhere (3), and `evaluate --ema` loaded another step as its "best". `also_best`
    keeps it; a NaN or missing twin value ranks last. `prune` keeps the same steps."""
    evals = {1: {"top1": 0.5, "ema_top1": 0.9}, 2: {"top1": 0.6, "ema_top1": 0.5},
             3: {"top1": 0.7, "ema_top1": 0.4}, 4: {"top1": 0.4, "ema_top1": float("nan")},
             5: {"top1": 0.3}}
    checkpointer = Checkpointer(str(tmp_path), keep=1, best_metric="top1", also_best=also_best)
    for step, metrics in evals.items():
        checkpointer.save(step, _state(step), metrics)
    checkpointer.wait()
    assert checkpointer.all_steps() == kept
    assert checkpointer.prune() == []
    checkpointer.close()
    resumed = Checkpointer(str(tmp_path), keep=1, best_metric="top1", also_best=also_best)
    resumed.save(6, _state(6), {"top1": 0.2, "ema_top1": 0.3})
    resumed.wait()
    assert resumed.all_steps() == [*kept[:-1], 6]
    resumed.close()


def test_prune_keeps_the_weight_averages_best_checkpoint(tmp_path):
    """`prune` (a run killed before orbax pruned) keeps the `also_best` metric's best step."""
    before = Checkpointer(str(tmp_path), keep=5, best_metric="top1", also_best="ema_top1")
    for step, (top1, ema) in {1: (0.5, 0.9), 2: (0.7, 0.4), 3: (0.6, 0.5), 4: (0.3, 0.2)}.items():
        before.save(step, _state(step), {"top1": top1, "ema_top1": ema})
    before.close()
    after = Checkpointer(str(tmp_path), keep=1, best_metric="top1", also_best="ema_top1")
    assert after.prune() == [3]
    assert after.all_steps() == [1, 2, 4]
    after.close()


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
    checkpointer.save(3, {"params": {"w": np.zeros((4, 4), np.float32)},
                          "step": np.array(3, np.int32)})
    checkpointer.save(7, state)
    template = {"params": {"w": np.zeros((4, 4), np.float32)}, "step": np.array(0, np.int32)}
    restored, step = checkpointer.restore_latest(template)
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
    assert "could be restored into the current state structure (step 5: " in str(err.value)
    assert "use a new --workdir or delete the checkpoints" in str(err.value)
    assert checkpointer.all_steps() == [5]
    checkpointer.close()


def test_a_template_collection_with_arrays_the_checkpoint_lacks_is_not_filled_from_it(tmp_path,
                                                                                      waits):
    """Only an empty field the checkpoint lacks (`ema` when not averaging) comes from the
    template; a collection holding arrays (a weight average added to the config after the save)
    is a state mismatch, not arrays to take from the template's initial values."""
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(2, _state(2))
    checkpointer.close()
    template = {**_state(0), "ema": {"w": np.full((2, 3), 7.0, np.float32)}}
    resumed = Checkpointer(str(tmp_path), use_async=False)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as err:
        resumed.restore_latest(template)
    assert "could be restored into the current state structure (step 2: " in str(err.value)
    assert resumed.all_steps() == [2]
    resumed.close()


def test_a_step_older_than_the_newest_is_saved_too(tmp_path):
    """Orbax silently skips a save whose step is not past its latest unless forced; the caller
    decides what to save, so every save asked for is written."""
    checkpointer = Checkpointer(str(tmp_path), best_metric=None, use_async=False)
    checkpointer.save(4, _state(4))
    checkpointer.save(2, _state(2))
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.close()


def test_a_checkpoint_of_other_shapes_is_refused_by_name_not_restored(tmp_path):
    """Orbax restores the stored shape whatever the template's: a model changed under the same
    config would resume with wrong-shaped weights and fail later, in the first step."""
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(5, _state(5))
    wider = {"params": {"w": np.zeros((4, 6), np.float32)}, "step": np.array(0, np.int32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not taken for corruption: no fallback warning
        with pytest.raises(CheckpointShapeError) as err:
            checkpointer.restore_latest(wider)
    assert str(err.value).startswith(
        f"checkpoint: the checkpoint at step 5 in {checkpointer.directory} does not fit the "
        "current state: params/w: saved (2, 3) vs now (4, 6). The model or optimizer changed")
    assert checkpointer.all_steps() == [5]  # nothing quarantined
    checkpointer.close()


def test_unreadable_metrics_file_quarantines_that_checkpoint(tmp_path):
    """Orbax reads every checkpoint's metrics when it starts: a corrupt metrics file must not
    stop a resume; that checkpoint is set aside like any unreadable one."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2), {"top1": 0.5})
    checkpointer.save(4, _state(4), {"top1": 0.7})
    checkpointer.close()
    (tmp_path / "checkpoints" / "4" / "metrics" / "metrics").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"step 4 .* \(its metrics file is unreadable\); "
                                            r"falling back to the checkpoint at step 2 \("):
        resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    restored, step = resumed.restore_latest(_state(0))
    assert step == 2 and resumed.all_steps() == [2]
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["4"]
    resumed.close()


def test_an_only_checkpoint_with_an_unreadable_metrics_file_promises_no_fallback(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(4, _state(4), {"top1": 0.7})
    checkpointer.close()
    (tmp_path / "checkpoints" / "4" / "metrics" / "metrics").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"step 4 .* \(its metrics file is unreadable\); "
                                            r"there is no other checkpoint to fall back to \("):
        Checkpointer(str(tmp_path), use_async=False).close()


def _metrics_file(tmp_path, step):
    return tmp_path / "checkpoints" / str(step) / "metrics" / "metrics"


def test_an_unreadable_metrics_file_is_rewritten_from_the_eval_in_metrics_jsonl(tmp_path):
    """The checkpoint's metrics are its eval, which metrics.jsonl holds too: an older best's
    torn file was moved to quarantine with its intact arrays, while summary.json (from
    metrics.jsonl) still named it as the best; now the file is rewritten and the best kept."""
    checkpointer = Checkpointer(str(tmp_path), keep=1, use_async=False)
    checkpointer.save(2, _state(2), {"top1": 0.9, "loss": 0.25})  # the best
    checkpointer.save(4, _state(4), {"top1": 0.5, "loss": 0.75})
    checkpointer.close()
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "split": split, **metrics}) + "\n" for step, split, metrics in
        [(2, "train", {"loss": 0.5}), (2, "eval", {"top1": 0.9, "loss": 0.25}),
         (4, "eval", {"top1": 0.5, "loss": 0.75})]))
    _metrics_file(tmp_path, 2).write_text('{"top1": 0.')
    with pytest.warns(RuntimeWarning) as caught:
        resumed = Checkpointer(str(tmp_path), keep=1, use_async=False)
    assert [str(w.message) for w in caught] == [
        f"The metrics file of the checkpoint at step 2 in {resumed.directory} is unreadable; it "
        "is rewritten from that step's eval in metrics.jsonl."]
    assert json.loads(_metrics_file(tmp_path, 2).read_text()) == {"top1": 0.9, "loss": 0.25}
    resumed.save(6, _state(6), {"top1": 0.7, "loss": 0.5})
    assert resumed.all_steps() == [2, 6]  # still ranked as the best, so still kept
    assert not (tmp_path / "checkpoints_corrupt").exists()
    resumed.close()


def test_an_older_checkpoint_set_aside_for_its_metrics_file_promises_no_fallback(tmp_path):
    """Without its eval in metrics.jsonl the step goes to quarantine; the warning said "falling
    back to the checkpoint at step 4" of an older step, though the run resumes from 4 anyway."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2), {"top1": 0.9})
    checkpointer.save(4, _state(4), {"top1": 0.5})
    checkpointer.close()
    _metrics_file(tmp_path, 2).write_text('{"top1": 0.')
    with pytest.warns(RuntimeWarning) as caught:
        resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    quarantine = tmp_path / "checkpoints_corrupt"
    assert [str(w.message) for w in caught] == [
        f"Checkpoint at step 2 in {resumed.directory} has an unreadable metrics file, and "
        f"metrics.jsonl no eval of that step to rewrite it from; it is moved to {quarantine}."]
    assert resumed.all_steps() == [4]
    resumed.close()


def test_step_folders_lists_the_step_named_folders_complete_or_not(tmp_path):
    """The loop reads a workdir's checkpoints without orbax (its newest step, the recorded
    config): every folder named by a step counts, in step order, not orbax's temporary ones."""
    assert step_folders(str(tmp_path / "missing")) == []
    for name in ("10", "2", "8.orbax-checkpoint-tmp-1", "tmp", "1e3"):
        (tmp_path / name).mkdir()
    assert step_folders(str(tmp_path)) == [2, 10]


def test_close_awaits_the_temporary_directory_cleanup_orbax_starts_on_open(tmp_path):
    """Else a run that stops before its first save (bad init_from, failed restore) exits while
    orbax's cleanup thread still schedules work, printing a traceback after the run's error."""
    checkpointer = Checkpointer(str(tmp_path), keep=2, use_async=True)
    manager = checkpointer._manager
    if not hasattr(manager, "_cleanup_tmp_directory_future"):
        pytest.skip("this orbax version has no open-time cleanup future")
    checkpointer.close()
    assert manager._cleanup_tmp_directory_future is None  # awaited and cleared


def test_an_unfinished_saves_temporary_directory_is_cleaned_up(tmp_path):
    """A process killed mid-save leaves orbax's temporary directory (never renamed into a step):
    the next run's checkpointer deletes it, or every preemption would leave one behind."""
    leftover = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000" / "default"
    leftover.mkdir(parents=True)
    (leftover / "x").write_text("partial")
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(6, _state(6))
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]


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
    # the only checkpoint: no checked one is newer, so it is not set aside as passed over
    assert resumed.all_steps() == [2] and not (tmp_path / "checkpoints_corrupt").exists()
    resumed.close()


def test_a_checkpoint_without_a_metadata_file_is_not_damaged_and_restores(tmp_path):
    """A step without `_CHECKPOINT_METADATA` (written before orbax kept one) has no digests to
    check, but nothing on disk is damaged: it is the newest and restores; only a metadata file
    that exists and is not JSON sends a step behind the checked ones."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2))
    checkpointer.save(4, _state(4))
    checkpointer.close()
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()
    resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    restored, step = resumed.restore_latest(_state(0))
    assert step == 4
    np.testing.assert_array_equal(restored["params"]["w"], _state(4)["params"]["w"])
    assert resumed.all_steps() == [2, 4] and not (tmp_path / "checkpoints_corrupt").exists()
    resumed.close()


class _TwoProcesses:
    """`jax` as the checkpoint module sees it, in process 0 of 2 (orbax keeps the real one)."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def process_count():
        return 2


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

    monkeypatch.setattr(checkpoint_lib, "jax", _TwoProcesses())
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


@pytest.mark.parametrize("times, names", [
    ((1700000000.0, 1700000001.0), ["4.1700000000", "4.1700000001"]),
    ((1700000000.0, 1700000000.5), ["4.1700000000", "4.1700000000.1"]),  # within one second
], ids=["seconds-apart", "same-second"])
def test_a_step_quarantined_twice_keeps_both_copies(tmp_path, monkeypatch, times, names):
    """A step saved again after it was set aside, and found unreadable again, is a second
    quarantined copy beside the first (named by step and time, then a count if that name is
    taken), not moved inside it."""
    from cnnjax.train import checkpoint as checkpoint_lib

    clock = iter(times)
    monkeypatch.setattr(checkpoint_lib, "time", types.SimpleNamespace(
        time=lambda: next(clock), sleep=lambda seconds: None))
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False, restore_attempts=1)
    checkpointer.save(2, _state(2))
    checkpointer.save(4, _state(4))
    for _ in range(2):
        checkpointer.close()
        (tmp_path / "checkpoints" / "4" / "default" / "_METADATA").write_text("")
        checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False, restore_attempts=1)
        with pytest.warns(RuntimeWarning, match="step 4"):
            assert checkpointer.restore_latest(_state(0))[1] == 2
        checkpointer.save(4, _state(4))
    checkpointer.close()
    quarantine = tmp_path / "checkpoints_corrupt"
    assert sorted(p.name for p in quarantine.iterdir()) == names
    assert all(sorted(os.listdir(quarantine / name)) == sorted(os.listdir(
        tmp_path / "checkpoints" / "4")) for name in names)  # each a whole step folder


# ------------------------------------------------------------------ retries before quarantine
@pytest.fixture
def waits(monkeypatch):
    """The retry waits `Checkpointer` asks for, in seconds (recorded, not slept)."""
    from cnnjax.train import checkpoint as checkpoint_lib

    recorded: list[float] = []
    monkeypatch.setattr(checkpoint_lib, "_sleep", recorded.append)
    return recorded


def _two_checkpoints(tmp_path):
    """Steps 2 and 4 on disk, then a new `Checkpointer` (a resume) on them."""
    checkpointer = Checkpointer(str(tmp_path), keep=3, use_async=False)
    checkpointer.save(2, _state(2), {"top1": 0.5})
    checkpointer.save(4, _state(4), {"top1": 0.7})
    checkpointer.close()
    return Checkpointer(str(tmp_path), keep=3, use_async=False)


def test_a_transient_read_error_is_retried_and_quarantines_nothing(tmp_path, waits, recwarn):
    """An NFS hiccup on the newest checkpoint (an OSError on the first read only) must not
    send a good checkpoint to quarantine: the read is retried after a short wait."""
    import errno

    resumed = _two_checkpoints(tmp_path)
    original, calls = resumed._manager.restore, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        return original(*args, **kwargs)

    resumed._manager.restore = flaky
    restored, step = resumed.restore_latest(_state(0))
    assert step == 4 and calls == [4, 4] and waits == [0.5]
    np.testing.assert_array_equal(restored["params"]["w"], _state(4)["params"]["w"])
    assert resumed.all_steps() == [2, 4] and not (tmp_path / "checkpoints_corrupt").exists()
    assert not [w for w in recwarn if "could not be restored" in str(w.message)]
    resumed.close()


def test_a_checkpoint_that_never_reads_is_quarantined_after_the_retries(tmp_path, waits):
    """Truncated array files fail on every try: after `RESTORE_ATTEMPTS` tries, with doubling
    waits between them, the checkpoint is set aside as before and the previous one restores."""
    resumed = _two_checkpoints(tmp_path)
    truncated = 0
    for path in (tmp_path / "checkpoints" / "4" / "default").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name.lower():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            truncated += 1
    assert truncated
    with pytest.warns(RuntimeWarning, match=r"step 4 .* could not be restored .*tried 3 time.*"
                      r"; falling back to the checkpoint at step 2 \(this one is moved to "):
        restored, step = resumed.restore_latest(_state(0))
    assert step == 2 and waits == [0.5, 1.0]
    assert resumed.all_steps() == [2]
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["4"]
    resumed.close()


@pytest.mark.parametrize("other_reads", [[False, True], [False, False, False]],
                         ids=["other_process_recovers", "other_process_never_reads"])
def test_every_process_makes_the_same_retry_and_quarantine_decision(tmp_path, monkeypatch,
                                                                     waits, other_reads):
    """Multi-process, seen from process 0 of 2, which reads step 4 fine: the other process's
    reads are gathered after every try. If it recovers, both restore step 4 and nothing moves;
    if it never does, process 0 gives the step up too (both restore step 2, the same state)."""
    from cnnjax.train import checkpoint as checkpoint_lib

    resumed = _two_checkpoints(tmp_path)

    gathered = []

    def allgather(flag):
        gathered.append(int(flag))
        return np.array([int(flag), int(other_reads[len(gathered) - 1])], np.int32)

    monkeypatch.setattr(checkpoint_lib, "jax", _TwoProcesses())
    monkeypatch.setattr(checkpoint_lib.multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(checkpoint_lib.multihost_utils, "sync_global_devices", lambda name: None)
    if other_reads[-1]:
        assert resumed.restore_latest(_state(0))[1] == 4
        assert gathered == [1, 1] and waits == [0.5]
        assert not (tmp_path / "checkpoints_corrupt").exists()
    else:
        other_reads.append(True)  # step 2: both read it
        with pytest.warns(RuntimeWarning, match="step 4 .*another process could not read it"):
            assert resumed.restore_latest(_state(0))[1] == 2
        assert gathered == [1, 1, 1, 1] and waits == [0.5, 1.0]
        assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == [
            "4"]
    resumed.close()


def test_a_transient_error_reading_a_metrics_file_quarantines_nothing(tmp_path, monkeypatch,
                                                                      waits):
    """Orbax reads every metrics file when it starts; one read failing once is retried, not a
    reason to set the checkpoint aside."""
    from cnnjax.train import checkpoint as checkpoint_lib

    _two_checkpoints(tmp_path).close()
    original, failed = checkpoint_lib._is_json, []

    def flaky(path):
        if "/4/" in path and not failed:
            failed.append(path)
            return False
        return original(path)

    monkeypatch.setattr(checkpoint_lib, "_is_json", flaky)
    resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    assert failed and waits == [0.5]
    assert resumed.all_steps() == [2, 4] and resumed.restore_latest(_state(0))[1] == 4
    assert not (tmp_path / "checkpoints_corrupt").exists()
    resumed.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"restore_attempts": 0}, "restore_attempts=0 is invalid; expected an integer >= 1"),
    ({"restore_attempts": 2.0}, "restore_attempts=2.0 is invalid"),
    ({"restore_retry_delay_s": -1}, "restore_retry_delay_s=-1 is invalid; expected a finite"),
    ({"restore_retry_delay_s": float("nan")}, "restore_retry_delay_s=nan is invalid"),
    ({"keep": -1}, r"^checkpoint: keep=-1 is invalid; expected a positive integer"),
    ({"keep": 0}, r"^checkpoint: keep=0 is invalid"),
])
def test_bad_retry_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Checkpointer(str(tmp_path), **kwargs)


def test_reads_left_running_by_a_failed_restore_print_no_tracebacks(tmp_path, monkeypatch,
                                                                     waits):
    """A checkpoint missing one file fails its read while tensorstore still reads its other
    arrays; orbax closes its event loop at once, and each late read's callback then raised
    "Event loop is closed" into `sys.unraisablehook`, which printed dozens of bare tracebacks
    after a fallback that worked. Those are dropped; any other unraisable error still passes.
    The hook is replaced after the saves, as in a fresh process that resumes before it saves:
    the failed read itself installs the filter."""
    import sys

    resumed = _two_checkpoints(tmp_path)
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    (tmp_path / "checkpoints" / "4" / "default" / "manifest.ocdbt").unlink()
    with pytest.warns(RuntimeWarning, match="step 4 .* could not be restored"):
        assert resumed.restore_latest(_state(0))[1] == 2
    resumed.close()
    late_read = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(late_read)
    sys.unraisablehook(other)
    assert [str(e) for e in seen if str(e) == "Event loop is closed"] == []
    assert other.exc_value in seen


def test_a_save_installs_the_closed_loop_filter_before_it_can_fail(tmp_path, monkeypatch):
    """A save failing on orbax's threads (measured: a full disk) left its other writes calling
    back into a closed loop: 7 bare "Event loop is closed" tracebacks before the run's own error
    line. The filter must be in place before the save starts, as the failure is asynchronous."""
    import sys
    import types

    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(2, _state(2))
    checkpointer.close()
    late_write = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    sys.unraisablehook(late_write)
    assert seen == []


def test_the_closed_loop_filter_outlives_the_stop_request_it_was_installed_in(tmp_path,
                                                                              monkeypatch):
    """A run (and a sweep) trains inside a `StopRequest`, which put back the unraisable hook it
    found on exit and so dropped the filter a read inside it installed: a damaged init_from
    source's late callbacks, arriving after the error raised out of the request, printed dozens
    of bare "Event loop is closed" tracebacks around the one-line error."""
    import sys
    import types

    _two_checkpoints(tmp_path).close()  # before the hook below, as by another process
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    late_read = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    with pytest.raises(ValueError, match="damaged"), StopRequest():  # as `_train_and_evaluate`
        SourceCheckpoints(str(tmp_path)).close()  # as load_init_from: installs the filter
        raise ValueError("the source's checkpoint is damaged")
    sys.unraisablehook(late_read)
    sys.unraisablehook(other)
    assert seen == [other.exc_value]
    hook = sys.unraisablehook
    with StopRequest():  # the next run of the process (a sweep's) stacks no further hooks
        checkpointer = Checkpointer(str(tmp_path / "next"), use_async=False)
        checkpointer.save(2, _state(2))  # installs the filter if it is not on top
        checkpointer.close()
    assert sys.unraisablehook is hook


# ------------------------------------------------------------------ digests of the saved arrays
def _replace_arrays(tmp_path, step: int, value: float) -> None:
    """Overwrites the array files of checkpoint `step` with those of a checkpoint of the same
    structure holding `value` (a valid checkpoint's files: they decode without error), keeping
    the step's own metadata: its arrays changed on disk after the save."""
    import shutil

    other = Checkpointer(str(tmp_path / "other"), use_async=False)
    other.save(step, _state(value))
    other.close()
    saved = tmp_path / "checkpoints" / str(step) / "default"
    shutil.rmtree(saved)
    shutil.copytree(tmp_path / "other" / "checkpoints" / str(step) / "default", saved)


def test_arrays_changed_on_disk_fail_their_digests_and_the_previous_step_restores(tmp_path,
                                                                                   waits):
    """Orbax stores no checksums: files that decode into other numbers restored silently. The
    SHA-256 saved with each array catches them; the step is treated as unreadable."""
    resumed = _two_checkpoints(tmp_path)
    _replace_arrays(tmp_path, 4, 9)
    with pytest.warns(RuntimeWarning, match=r"step 4 .* could not be restored \("
                      r"CheckpointDigestError: array params/w of step 4 differs from the digest "
                      r"saved with it \(its files changed on disk after the save\)"):
        _assert_step_2_restored_and_4_quarantined(tmp_path, resumed)
    resumed.close()


def _assert_step_2_restored_and_4_quarantined(tmp_path, resumed: Checkpointer) -> None:
    restored, step = resumed.restore_latest(_state(0))
    assert step == 2
    np.testing.assert_array_equal(restored["params"]["w"], _state(2)["params"]["w"])
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["4"]


def test_a_flipped_bit_in_a_compressed_chunk_is_not_restored(tmp_path, waits):
    """Real bit rot: one flipped bit mid-file in the newest checkpoint's largest array file
    decoded (zstd) into wrong values (off by up to 3e19, or NaN) without any error before the
    digests; now the previous checkpoint restores."""
    state = {"params": {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)},
             "step": np.array(4, np.int32)}
    checkpointer = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    checkpointer.save(2, {**state, "step": np.array(2, np.int32)})
    checkpointer.save(4, state)
    checkpointer.close()
    files = [p for p in (tmp_path / "checkpoints" / "4" / "default").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10
    largest.write_bytes(bytes(data))
    resumed = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    with pytest.warns(RuntimeWarning, match="step 4 .* could not be restored"):
        restored, step = resumed.restore_latest(_state(0) | {"params": {"w": np.zeros((64, 64),
                                                                                  np.float32)}})
    assert step == 2
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    resumed.close()


def test_changed_arrays_behind_a_torn_metadata_file_are_not_restored(tmp_path, waits):
    """Orbax reads a torn metadata file as "no metadata", which lost the digests too: the
    changed arrays of step 4 restored unchecked (and the train-log window was lost). Now the
    newest checked checkpoint restores and step 4 is quarantined; a run whose only checkpoint
    lost its metadata still resumes from it (above, with the run_info warning)."""
    resumed = _two_checkpoints(tmp_path)
    _replace_arrays(tmp_path, 4, 9)
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text('{"custom_met')
    with pytest.warns(RuntimeWarning, match=r"step 4 .* has a damaged metadata file "
                                            r"\(_CHECKPOINT_METADATA\), so its arrays cannot be "
                                            r"checked .* resuming from step 2"):
        _assert_step_2_restored_and_4_quarantined(tmp_path, resumed)
    assert resumed.all_steps() == [2]
    resumed.close()


def test_when_every_checkpoint_fails_its_digests_the_error_says_corrupt(tmp_path, waits):
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(4, _state(4))
    checkpointer.close()
    _replace_arrays(tmp_path, 4, 9)
    resumed = Checkpointer(str(tmp_path), use_async=False)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as err:
        resumed.restore_latest(_state(0))
    assert str(err.value).startswith(
        f"checkpoint: every checkpoint in {resumed.directory} (steps [4]) is corrupt "
        "(CheckpointDigestError: array params/w of step 4 differs")
    assert resumed.all_steps() == [4]  # nothing moved when nothing restores
    resumed.close()


def test_when_no_checkpoint_can_be_read_the_error_carries_the_read_error(tmp_path, waits):
    """Every checkpoint's data cut short: the error said only that none fit "the current state
    structure" (a code mismatch, to a reader); the read error itself, the real cause, was in
    the warnings alone."""
    _two_checkpoints(tmp_path).close()
    for step in ("2", "4"):
        (tmp_path / "checkpoints" / step / "default" / "manifest.ocdbt").unlink()
    resumed = Checkpointer(str(tmp_path), use_async=False)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as err:
        resumed.restore_latest(_state(0))
    message = str(err.value)
    assert message.startswith(f"checkpoint: no checkpoint in {resumed.directory} (steps [2, 4]) "
                              "can be read: their files are damaged or missing (step 4: ")
    assert "NOT_FOUND" in message  # tensorstore: the missing manifest
    resumed.close()


def test_changed_arrays_beside_a_damaged_checkpoint_are_reported_as_damage(tmp_path, waits):
    """Step 4's arrays changed on disk (their digests fail) and step 2's manifest is gone (its
    read fails): the error blamed "the current state structure" (a code or config change) for
    what is damage to both checkpoints' files."""
    _two_checkpoints(tmp_path).close()
    _replace_arrays(tmp_path, 4, 9)
    (tmp_path / "checkpoints" / "2" / "default" / "manifest.ocdbt").unlink()
    resumed = Checkpointer(str(tmp_path), use_async=False)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as err:
        resumed.restore_latest(_state(0))
    message = str(err.value)
    assert message.startswith(
        f"checkpoint: no checkpoint in {resumed.directory} (steps [2, 4]) can be read: their "
        "files are damaged, missing or corrupt (step 4: CheckpointDigestError: array params/w "
        "of step 4 differs from the digest saved with it")
    assert "state structure" not in message
    assert message.endswith("; to start fresh use a new --workdir or delete the checkpoints.")
    assert resumed.all_steps() == [2, 4]  # nothing moved when nothing restores
    resumed.close()


def test_a_damaged_only_checkpoint_is_reported_as_unreadable_with_no_fallback(tmp_path, waits):
    """A run's only checkpoint cut short: the warning promised a fallback to "the previous
    checkpoint" and a move to quarantine (neither happened), and the error blamed "the current
    state structure" (a code mismatch) for what is a truncated file."""
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(4, _state(4))
    checkpointer.close()
    for path in (tmp_path / "checkpoints" / "4" / "default" / "d").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    resumed = Checkpointer(str(tmp_path), use_async=False)
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(ValueError) as err:
        resumed.restore_latest(_state(0))
    [warning] = [str(w.message) for w in caught if "could not be restored" in str(w.message)]
    assert warning.endswith("tried 3 time(s)); there is no other checkpoint to fall back to.")
    message = str(err.value)
    assert message.startswith(f"checkpoint: no checkpoint in {resumed.directory} (steps [4]) "
                              "can be read: their files are damaged or missing (step 4: ")
    assert "OUT_OF_RANGE" in message and "\n" not in message  # the read error's first line
    assert message.endswith("; to start fresh use a new --workdir or delete the checkpoints.")
    assert resumed.all_steps() == [4] and not (tmp_path / "checkpoints_corrupt").exists()
    resumed.close()


def test_a_warm_start_from_arrays_changed_on_disk_is_refused(tmp_path):
    from cnnjax.train.checkpoint import SourceCheckpoints

    _two_checkpoints(tmp_path).close()
    _replace_arrays(tmp_path, 4, 9)
    source = SourceCheckpoints(str(tmp_path))
    try:
        shapes = source.shapes(4, ("params",))
        with pytest.raises(ValueError) as err:
            source.restore(4, shapes)
        np.testing.assert_array_equal(source.restore(2, shapes)["params"]["w"],
                                      _state(2)["params"]["w"])
    finally:
        source.close()
    assert str(err.value) == (
        f"init_from: the checkpoint at step 4 in {source.directory} is corrupt: array params/w "
        "of step 4 differs from the digest saved with it (its files changed on disk after the "
        "save); pick another of its steps [2]")  # not the corrupt step 4 itself


def test_digests_stay_out_of_run_info_and_checkpoints_without_them_restore(tmp_path):
    """Checkpoints written before digests were saved restore as before."""
    import json

    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(4, _state(4), run_info={"num_devices": 2})
    assert checkpointer.run_info(4) == {"num_devices": 2}
    checkpointer.close()
    path = tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    assert set(metadata["custom_metadata"]["array_digests"]) == {"params/w", "step"}
    del metadata["custom_metadata"]["array_digests"]
    path.write_text(json.dumps(metadata))
    resumed = Checkpointer(str(tmp_path), use_async=False)
    restored, step = resumed.restore_latest(_state(0))
    assert step == 4 and resumed.run_info(4) == {"num_devices": 2}
    np.testing.assert_array_equal(restored["params"]["w"], _state(4)["params"]["w"])
    resumed.close()


def _every_leaf_kind() -> dict:
    """A state with each kind of leaf a train state holds: nested dicts and lists (flax's
    `to_state_dict` keys), bfloat16, big-endian float32, bool, uint8, 0-d ints, an empty field
    (`ema` when not averaging), an empty optax state and an unset (None) optional field."""
    import ml_dtypes

    return {
        "params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
                            "scale": np.full(3, 1.5, ml_dtypes.bfloat16),
                            "bias": np.arange(3, dtype=">f4")}},  # big-endian, e.g. np.load
        "opt_state": [{"trace": {"conv": {"kernel": np.ones((1, 2, 3), np.float32)}}},
                      {"count": np.array(5, np.int32)}, (), None],
        "mask": np.array([True, False, True]),
        "pixels": np.arange(4, dtype=np.uint8),
        "step": np.array(5, np.int32),
        "ema": {},
    }


def _restores_step_5_unless(tmp_path, tampered):
    """Step 5 of `_every_leaf_kind()` restores bitwise, or, with the digest of array `tampered`
    changed, is refused naming that array (a warning, then the error: no older step to fall
    back to)."""
    resumed = Checkpointer(str(tmp_path), use_async=False, best_metric=None, restore_attempts=1)
    try:
        if tampered is None:
            restored, step = resumed.restore_latest(_every_leaf_kind())
            assert step == 5
            jax.tree.map(np.testing.assert_array_equal, restored, _every_leaf_kind())
        else:
            with pytest.warns(RuntimeWarning), pytest.raises(
                    ValueError, match=f"CheckpointDigestError: array {tampered} of step 5"):
                resumed.restore_latest(_every_leaf_kind())
    finally:
        resumed.close()


@pytest.mark.parametrize("tampered", [None, "params/conv/scale", "params/conv/bias",
                                      "opt_state/1/count", "mask", "pixels", "step"])
def test_digests_of_every_leaf_kind_pass_unchanged_and_catch_each_changed_array(tmp_path,
                                                                                tampered):
    """A None leaf made every save a TypeError ('Cannot change data-type for array of
    references'), and a big-endian array (restored native) read as corrupt; each array's digest,
    whatever its dtype or depth, is checked on restore."""
    import json

    checkpointer = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    checkpointer.save(5, _every_leaf_kind())
    checkpointer.close()
    path = tmp_path / "checkpoints" / "5" / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    digests = metadata["custom_metadata"]["array_digests"]
    assert set(digests) == {"params/conv/kernel", "params/conv/scale", "params/conv/bias",
                            "opt_state/0/trace/conv/kernel", "opt_state/1/count", "mask",
                            "pixels", "step"}
    if tampered is not None:
        digests[tampered] = "0" * 16
        path.write_text(json.dumps(metadata))
    _restores_step_5_unless(tmp_path, tampered)


def test_a_template_of_another_dtype_restores_cast_not_as_corrupt(tmp_path):
    """Orbax casts to the template's dtype (float32 saved, bfloat16 asked): other bytes by
    design, so the digest is not compared there and the cast restore works as before digests;
    the arrays that keep their dtype are still checked."""
    import ml_dtypes

    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    checkpointer.save(4, _state(4.5))
    checkpointer.close()
    resumed = Checkpointer(str(tmp_path), use_async=False)
    template = {"params": {"w": np.zeros((2, 3), ml_dtypes.bfloat16)},
                "step": np.array(0, np.int32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, step = resumed.restore_latest(template)
    assert step == 4 and restored["params"]["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"], np.float32), 4.5)
    resumed.close()


def test_a_source_path_beside_a_run_says_where_the_runs_are(tmp_path):
    """A `checkpoints/` folder or a sweep/transfer directory given as a run: "has no
    checkpoints" alone did not say where to point instead."""
    from cnnjax.train.checkpoint import SourceCheckpoints

    trials = tmp_path / "sweep" / "trials"
    for trial in ("0003", "0001"):
        (trials / trial / "checkpoints" / "6").mkdir(parents=True)
    (trials / "0002" / "checkpoints").mkdir(parents=True)  # diverged before its first save
    with pytest.raises(ValueError) as err:
        SourceCheckpoints(str(tmp_path / "sweep"))
    assert "it has no checkpoints" in str(err.value)
    assert str(err.value).endswith(
        "; it holds runs with checkpoints: " + ", ".join(
            repr(str(trials / t)) for t in ("0001", "0003")) + ".")
    with pytest.raises(ValueError) as err:
        SourceCheckpoints(str(trials / "0001" / "checkpoints"), owner="load_trained")
    assert str(err.value).startswith(
        f"load_trained: workdir={str(trials / '0001' / 'checkpoints')!r} is invalid; it has no "
        "checkpoints")
    assert str(err.value).endswith(
        f"; it is the checkpoints folder of the run {str(trials / '0001')!r}: pass that.")


def test_load_trained_of_a_sweep_directory_names_its_runs(tmp_path):
    from cnnjax.train.trained import load_trained

    (tmp_path / "sweep" / "trials" / "0002" / "checkpoints" / "6").mkdir(parents=True)
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(
            "(no readable config.json with a model in it); it holds runs with checkpoints: "
            f"{str(tmp_path / 'sweep' / 'trials' / '0002')!r}.")):
        load_trained(str(tmp_path / "sweep"))


# ------------------------------------------------------------------ zero-size arrays, dtype names
def _with_empty_arrays(value: float) -> dict:
    """A state with zero-size leaves beside ordinary ones: a parameter with a 0 dimension, a
    batch_stats leaf of 0 channels, an optimizer state whose only array is empty, and a
    bfloat16 one."""
    import ml_dtypes

    return {
        "params": {"w": np.full((2, 3), value, np.float32), "empty": np.zeros((0, 3), np.float32)},
        "batch_stats": {"bn": {"mean": np.zeros((0,), np.float32)}},
        "opt_state": [{"trace": np.zeros((4, 0), ml_dtypes.bfloat16)}, {"count": np.array(3)}],
        "step": np.array(value, np.int32),
    }


@pytest.mark.parametrize("use_async", [False, True])
def test_zero_size_arrays_round_trip(tmp_path, use_async):
    """Orbax refuses to save an array with a 0 dimension ('Cannot save arrays with zero size:
    ParamInfo: [name=params.empty...]'), so a state holding one could not be checkpointed at
    all (asynchronously: the save failed in orbax's thread). They hold no data: their shape and
    dtype are saved beside the others' digests and they restore as they were, resumed and as a
    warm-start source."""
    from cnnjax.train.checkpoint import SourceCheckpoints

    checkpointer = Checkpointer(str(tmp_path), use_async=use_async, best_metric=None)
    checkpointer.save(2, _with_empty_arrays(2))
    checkpointer.save(4, _with_empty_arrays(4), run_info={"num_devices": 1})
    checkpointer.close()
    resumed = Checkpointer(str(tmp_path), use_async=False, best_metric=None, restore_attempts=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, step = resumed.restore_latest(_with_empty_arrays(0))
    # the zero-size arrays' shapes are kept beside run_info, not in it
    assert resumed.run_info(4) == {"num_devices": 1} and resumed.run_info(2) == {}
    resumed.close()
    assert step == 4
    expected = _with_empty_arrays(4)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert np.shape(got) == np.shape(want) and np.asarray(got).dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    source = SourceCheckpoints(str(tmp_path))
    try:
        shapes = source.shapes(2, ("params", "batch_stats"))
        assert shapes["params"]["empty"].shape == (0, 3)
        assert shapes["batch_stats"]["bn"]["mean"].shape == (0,)
        variables = source.restore(2, shapes)
    finally:
        source.close()
    assert variables["params"]["empty"].shape == (0, 3)
    assert variables["batch_stats"]["bn"]["mean"].shape == (0,)
    np.testing.assert_array_equal(variables["params"]["w"], np.full((2, 3), 2, np.float32))


def test_a_zero_size_array_of_another_shape_now_is_refused_by_name(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    checkpointer.save(4, _with_empty_arrays(4))
    checkpointer.close()
    template = _with_empty_arrays(0)
    template["params"]["empty"] = np.zeros((0, 5), np.float32)
    resumed = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    with pytest.raises(CheckpointShapeError, match=re.escape(
            "params/empty: saved (0, 3) vs now (0, 5)")):
        resumed.restore_latest(template)
    resumed.close()


def test_same_size_dtypes_have_their_own_digests():
    """The digest hashed NumPy's dtype string, which is '<V1' for nearly every ml_dtypes 8-bit
    float and 4-bit int and '<V2' for bfloat16: an float8_e4m3fn array had the digest of the
    same bytes read as float8_e4m3fnuz (other numbers), so a checkpoint whose dtype changed on
    disk passed its digests. The exact dtype name is now hashed too."""
    import ml_dtypes

    from cnnjax.train.checkpoint import array_digests

    bits = np.arange(16, dtype=np.uint8)
    names = ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
             "float8_e5m2fnuz", "float8_e4m3", "float8_e3m4", "int4", "uint4", "uint8", "int8"]
    digests = {name: array_digests({"a": bits.view(getattr(ml_dtypes, name, None)
                                                   or np.dtype(name))})["a"]
               for name in names}
    assert len(set(digests.values())) == len(names), digests
    halves = np.arange(4, dtype=np.uint16)
    assert (array_digests({"a": halves.view(ml_dtypes.bfloat16)})
            != array_digests({"a": halves.view(np.float16)}))


def _digest_format_1(tree: dict) -> dict[str, str]:
    """The digests checkpoints were saved with before the dtype's name was hashed (format 1,
    no "array_digests_format" key): SHA-256 of '<dtype.str> <shape>' and the native bytes."""
    import hashlib

    from flax import traverse_util

    out = {}
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
        if leaf is None:
            continue
        array = np.asarray(leaf)
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("="))
        digest = hashlib.sha256(f"{array.dtype.str} {array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        out[path] = digest.hexdigest()[:16]
    return out


@pytest.mark.parametrize("tampered", [None, "params/conv/scale"])
def test_checkpoints_with_format_1_digests_are_still_checked(tmp_path, tampered):
    """A checkpoint saved before the format was versioned has the old digests and no format
    key: it restores, and a changed array still fails its (old) digest."""
    import json

    from flax import serialization

    checkpointer = Checkpointer(str(tmp_path), use_async=False, best_metric=None)
    checkpointer.save(5, _every_leaf_kind())
    checkpointer.close()
    path = tmp_path / "checkpoints" / "5" / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    assert metadata["custom_metadata"]["array_digests_format"] == 2
    del metadata["custom_metadata"]["array_digests_format"]
    old = _digest_format_1(serialization.to_state_dict(_every_leaf_kind()))
    assert old != metadata["custom_metadata"]["array_digests"]
    if tampered:
        old[tampered] = "0" * 16
    metadata["custom_metadata"]["array_digests"] = old
    path.write_text(json.dumps(metadata))
    _restores_step_5_unless(tmp_path, tampered)


@pytest.mark.parametrize("mode, values", [("max", (0.5, 0.2, 0.3)), ("min", (0.2, 0.5, 0.4))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_best_metric_never_replaces_the_best_checkpoint(tmp_path, mode, values,
                                                                     bad):
    """A checkpoint whose `best_metric` is NaN or infinite (a detector's mAP with no ground
    truth, a broken average's `ema_loss`) is kept as a recent one but never ranked: a NaN took
    the best's place and deleted it (orbax compares it as neither better nor worse)."""
    checkpointer = Checkpointer(str(tmp_path), keep=1, best_metric="m", best_mode=mode,
                                use_async=False)
    best, *later = values
    checkpointer.save(1, _state(1), {"m": best})
    with pytest.warns(RuntimeWarning, match=r"step 2: m=-?(nan|inf) is not finite"):
        checkpointer.save(2, _state(2), {"m": bad})
    assert checkpointer.all_steps() == [1, 2]
    for step, value in enumerate(later, start=3):
        checkpointer.save(step, _state(step), {"m": value})
    assert checkpointer.all_steps() == [1, 4]  # the best and the latest
    checkpointer.close()
