"""Checkpoints with orbax: periodic async saves, keep the last k plus the best, resume w/ fallback.

`Checkpointer` owns `<workdir>/checkpoints`. Saves are asynchronous and atomic (orbax writes into a
temporary directory and renames it when complete), so a process killed mid-save leaves the previous
checkpoints intact. Restoring walks back from the newest step: an unreadable (corrupt) checkpoint is
skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores `TrainState` host copies under `<workdir>/checkpoints`.

    Args:
      workdir: the run directory.
      keep: how many of the most recent checkpoints to keep.
      best_metric: eval metric name used to also keep the best checkpoint (e.g. 'top1'); None
        keeps only the most recent ones.
      best_mode: 'max' or 'min' — whether a larger or smaller `best_metric` is better.
      use_async: write in a background thread (training continues meanwhile).
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        best_metric: str | None = "top1",
        best_mode: str = "max",
        use_async: bool = True,
    ):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.best_metric = best_metric
        policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: float(m[best_metric]),
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        """Starts saving the host pytree `state` at `step`; `metrics` (eval) rank it for 'best'."""
        item = serialization.to_state_dict(state)
        if metrics is not None and self.best_metric:
            metrics = {k: float(v) for k, v in metrics.items()}
        else:
            metrics = None
        self._manager.save(step, args=ocp.args.StandardSave(item), metrics=metrics, force=True)

    def restore_latest(self, template: Any) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into the structure of `template`.

        Returns `(state, step)`, or None when there is no checkpoint. A checkpoint that fails to
        load is reported with a warning and the previous one is tried; once an older one loads,
        the unreadable ones are moved to `<workdir>/checkpoints_corrupt`. If none loads, raises
        a ValueError (and moves nothing).
        """
        target = serialization.to_state_dict(template)
        corrupt: list[int] = []
        result = None
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
                result = serialization.from_state_dict(template, restored), step
                break
            except Exception as err:  # noqa: BLE001 — any read failure means "corrupt", fall back
                corrupt.append(step)
                message = (
                    f"Checkpoint at step {step} in {self.directory} could not be restored "
                    f"({type(err).__name__}: {str(err)[:200]}); falling back to the previous "
                    f"checkpoint (the unreadable one is moved to {self.quarantine})."
                )
                logging.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        if corrupt and result is None:
            # Nothing restores: more likely a template/code mismatch than corruption of every
            # checkpoint, so leave the files alone and stop.
            raise ValueError(
                f"checkpoint: no checkpoint in {self.directory} (steps {sorted(corrupt)}) could "
                "be restored into the current state structure; to start fresh use a new "
                "--workdir, pass --config.restart=True, or delete the checkpoints."
            )
        if corrupt:  # an older one restored, so the newer ones really are unreadable
            self._quarantine(corrupt)
        return result

    @property
    def quarantine(self) -> str:
        """Where unreadable checkpoints are moved, so training can save those steps again."""
        return self.directory + "_corrupt"

    def _quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            os.makedirs(self.quarantine, exist_ok=True)
            for step in steps:
                source = os.path.join(self.directory, str(step))
                if os.path.isdir(source):
                    target = os.path.join(self.quarantine, f"{step}.{int(time.time())}")
                    shutil.move(source, target)
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
