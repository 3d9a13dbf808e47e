"""Checkpoints with orbax: periodic async saves, keep the last k plus the best, resume w/ fallback.

`Checkpointer` owns `<workdir>/checkpoints`. Saves are asynchronous and atomic (orbax writes into a
temporary directory and renames it when complete), so a process killed mid-save leaves the previous
checkpoints intact. Restoring walks back from the newest step: an unreadable (corrupt) checkpoint is
skipped with a warning and the one before it is used. Each checkpoint's eval metrics are stored
with it (orbax `best_fn`), so "keep the best" still holds after a resume. `SourceCheckpoints`
reads another run's checkpoints read-only (which steps, their shapes, params/batch_stats only)
for warm starts.

Every array's SHA-256 is saved with its checkpoint and checked when it is read back, since orbax
stores no checksums and a flipped bit in a compressed chunk can decode into wrong numbers without
any error: a mismatch makes the checkpoint unreadable (the previous one is used) for a resume, and
an error for a warm start.

A read that fails is retried (`RESTORE_ATTEMPTS` tries, `RESTORE_RETRY_DELAY_S` apart, doubling)
before the checkpoint is called unreadable: a transient error (an NFS hiccup) must not send a good
checkpoint to quarantine. In a multi-process job the processes agree after every try, so all of
them restore the same step or set aside the same ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization, traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from cnnjax.train.ema import metric_scoring
from cnnjax.train.logging import METRICS_FILE, read_metrics
from cnnjax.train.state import WARM_START_COLLECTIONS
from cnnjax.utils.files import read_json, write_json
from cnnjax.utils.log_filters import without_absl_lines
from cnnjax.utils.validation import check_number, check_positive_int, invalid, listed

CHECKPOINT_DIR = "checkpoints"
#: How many times a checkpoint read (arrays, or the metrics file orbax reads at start) is tried
#: before the checkpoint is treated as corrupt, and the wait before the first retry in seconds
#: (doubled before each further one: 0.5 s then 1 s by default). `Checkpointer` arguments override.
RESTORE_ATTEMPTS = 3
RESTORE_RETRY_DELAY_S = 0.5
#: Orbax's per-step metadata file, which holds cnnjax's `run_info` as its custom metadata.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
#: The custom-metadata key of the arrays' digests (`array_digests`), kept out of `run_info`.
_DIGESTS_KEY = "array_digests"
#: The custom-metadata key of the digests' format (`DIGEST_FORMAT`); absent: format 1.
_DIGEST_FORMAT_KEY = "array_digests_format"
#: The custom-metadata key of the zero-size arrays (`{path: [shape, dtype name]}`), which orbax
#: refuses to save ("Cannot save arrays with zero size") and which hold no data.
_EMPTY_ARRAYS_KEY = "zero_size_arrays"
#: How `array_digests` hashes an array's type: 1 (checkpoints saved before the format was
#: recorded) hashed NumPy's dtype string alone, '<V1' for nearly every ml_dtypes 8-bit float and
#: 4-bit int (float8_e4m3fn and float8_e4m3fnuz shared their digests); 2 adds the dtype's name.
DIGEST_FORMAT = 2
_DIGEST_FORMATS = (1, 2)
#: A restore failure that is a failed file read (tensorstore's status codes for damaged or
#: missing data, an OS error, a torn JSON file, another process's failed read), not a state
#: structure mismatch.
_READ_FAILURE = re.compile(
    r"\w+: (NOT_FOUND|OUT_OF_RANGE|DATA_LOSS): |(OSError|FileNotFoundError|PermissionError"
    r"|IsADirectoryError|TimeoutError|JSONDecodeError): |another process could not read it")


def step_folders(directory: str) -> list[int]:
    """The steps of the step folders (named by step) in the checkpoint `directory`, ascending,
    complete or not (read without orbax); [] when it does not exist."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def quarantine_dir(directory: str) -> str:
    """Where the unreadable checkpoints of the checkpoint `directory` are moved
    (`Checkpointer.quarantine`), beside it: a `restart` deletes it with the run."""
    return directory + "_corrupt"


def array_digests(tree: Any, digest_format: int = DIGEST_FORMAT) -> dict[str, str]:
    """`{"params/conv1/kernel": digest, ...}` for every array of the nested dict `tree`: the first
    16 hex digits of the SHA-256 of its dtype (its exact name, e.g. float8_e4m3fn, and NumPy's
    string), shape and bytes (~1.8 GB/s here), in native byte order (orbax stores values, and
    restores a big-endian array as a native one). A None leaf (an unset optional field of an
    optimizer state or struct) holds no array and has none. `digest_format` 1 is the digest of
    checkpoints saved before `DIGEST_FORMAT` was recorded (no dtype name)."""
    digests = {}
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
        if leaf is None:
            continue
        array = np.asarray(leaf)
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("="))
        kind = array.dtype.str if digest_format == 1 else f"{array.dtype.name} {array.dtype.str}"
        digest = hashlib.sha256(f"{kind} {array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        digests[path] = digest.hexdigest()[:16]
    return digests


def _is_empty_array(leaf: Any) -> bool:
    return leaf is not None and hasattr(leaf, "shape") and math.prod(np.shape(leaf)) == 0


def _split_empty_arrays(tree: Any) -> tuple[Any, dict[str, list]]:
    """`tree` (nested dicts, as `to_state_dict` gives) without its zero-size arrays, and those
    as `{"a/b": [shape, dtype name]}`."""
    empties: dict[str, list] = {}

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            kept = {}
            for key, value in node.items():
                path = f"{prefix}{key}"
                if _is_empty_array(value):
                    empties[path] = [list(np.shape(value)), np.asarray(value).dtype.name]
                else:
                    kept[key] = walk(value, path + "/")
            return kept
        return node

    return walk(tree, ""), empties


def _with_empty_arrays(tree: Any, empties: dict[str, Any]) -> Any:
    """`tree` with the zero-size arrays of `empties` (`{"a/b": array}`) put back in place."""
    out = dict(tree)
    for path, array in empties.items():
        *parents, last = path.split("/")
        node = out
        for key in parents:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[last] = array
    return out


def _empty_array(spec: list) -> np.ndarray:
    """The zero-size array of a saved `[shape, dtype name]`."""
    import ml_dtypes  # noqa: F401 — registers bfloat16, float8_* ... with NumPy by name

    shape, dtype = spec
    return np.zeros(tuple(shape), np.dtype(dtype))


class CheckpointDigestError(Exception):
    """Restored arrays differ from the digests saved with them: the files changed on disk."""


def check_digests(restored: Any, saved: dict[str, str] | None, where: str,
                  cast: frozenset[str] = frozenset(), digest_format: int = DIGEST_FORMAT) -> None:
    """Raises `CheckpointDigestError` naming the first restored array (of `where`) whose digest
    is not the one saved (computed in `digest_format`, the one they were saved in); checkpoints
    saved without digests (`saved` None) pass, and so do the `cast` paths (orbax converted them
    to the template's dtype: other bytes by design). Digests of a format this version does not
    know (a newer cnnjax's) cannot be checked: a warning, and the arrays' own reads decide."""
    if not saved:
        return
    if digest_format not in _DIGEST_FORMATS:
        logging.warning("The array digests of %s are in format %r, which this version cannot "
                        "check (it knows %s); restoring without them.", where, digest_format,
                        _DIGEST_FORMATS)
        return
    for path, digest in array_digests(restored, digest_format).items():
        if path in saved and saved[path] != digest and path not in cast:
            raise CheckpointDigestError(
                f"array {path} of {where} differs from the digest saved with it (its files "
                "changed on disk after the save)")


def _sleep(seconds: float) -> None:
    """`time.sleep`, through a module function so tests can skip the retry waits."""
    time.sleep(seconds)


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds in every process (a collective in a multi-process job, which every
    process must reach the same number of times); `ok` itself for a single process."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.int32(ok))
    return bool(np.all(np.asarray(flags)))


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable error is a late tensorstore read calling back into a closed loop."""
    error = getattr(unraisable, "exc_value", None)
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def read_error(err: BaseException, limit: int = 300) -> str:
    """`'<type>: <message>'` of a failed checkpoint read, for one line: tensorstore appends its
    whole JSON spec to its errors (`[tensorstore_spec=...]`), which would fill the line before
    orbax's own words (which array, which file, what is wrong) end, so it is cut off."""
    text = str(err).split(" [tensorstore_spec=")[0]
    text = (text.splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _drop_closed_loop_callbacks() -> None:
    """Installs (once per process) a `sys.unraisablehook` that drops "Event loop is closed"
    RuntimeErrors and passes every other unraisable error to the hook it replaces.

    When one array of a checkpoint fails to read, orbax closes its event loop at once while
    tensorstore's other reads of that checkpoint are still in flight; each of them then tries to
    call back into the closed loop, and Python prints a bare traceback for every one (dozens,
    during the retries or later in training) after a fallback that otherwise worked. A save that
    fails in the background (a full disk) leaves its other writes calling back the same way, so
    the first save installs it too (before the failure, which happens on orbax's threads).
    """
    if getattr(sys.unraisablehook, "_cnnjax_drops_closed_loop_callbacks", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._cnnjax_drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    hook.__wrapped__ = previous  # type: ignore[attr-defined]  # lets a StopRequest find its own
    sys.unraisablehook = hook


def _without_missing_metrics_warning() -> contextlib.AbstractContextManager:
    """Silences orbax's "Requested `tracked_metric`; did not provide metrics." warning during a
    save: a checkpoint without eval metrics is expected (periodic saves), and it is simply not
    a candidate for "best"."""
    return without_absl_lines("did not provide metrics")


class CheckpointShapeError(ValueError):
    """A checkpoint that reads fine but holds arrays of other shapes than the current state."""


def _shape_mismatches(restored: dict, target: dict) -> list[str]:
    """`'path: saved (..) vs now (..)'` for every array of `restored` whose shape differs from
    the same entry of `target` (orbax restores the stored shape whatever the template's)."""
    saved = traverse_util.flatten_dict(restored, sep="/")
    wanted = traverse_util.flatten_dict(target, sep="/")
    return [f"{path}: saved {np.shape(value)} vs now {np.shape(wanted[path])}"
            for path, value in saved.items()
            if path in wanted and np.shape(value) != np.shape(wanted[path])]


class Checkpointer:
    """Saves and restores `TrainState` host copies under `<workdir>/checkpoints`.

    Args:
      workdir: the run directory.
      keep: how many of the most recent checkpoints to keep.
      best_metric: eval metric name used to also keep the best checkpoint (e.g. 'top1'); None
        keeps only the most recent ones.
      best_mode: 'max' or 'min' — whether a larger or smaller `best_metric` is better.
      also_best: another eval metric (same mode) whose best checkpoint is kept too: with a
        weight average, the twin of `best_metric` (`top1` <-> `ema_top1`), so loading either
        weights' best finds it kept.
      use_async: write in a background thread (training continues meanwhile).
      restore_attempts: tries of a checkpoint read before it counts as corrupt (>= 1; default
        `RESTORE_ATTEMPTS`).
      restore_retry_delay_s: seconds before the first retry, doubled before each further one
        (>= 0; default `RESTORE_RETRY_DELAY_S`).
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        best_metric: str | None = "top1",
        best_mode: str = "max",
        also_best: str | None = None,
        use_async: bool = True,
        restore_attempts: int | None = None,
        restore_retry_delay_s: float | None = None,
    ):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        check_positive_int("checkpoint", "keep", keep)
        attempts = RESTORE_ATTEMPTS if restore_attempts is None else restore_attempts
        delay = RESTORE_RETRY_DELAY_S if restore_retry_delay_s is None else restore_retry_delay_s
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise invalid("checkpoint", "restore_attempts", attempts,
                          "expected an integer >= 1 (how many times a read is tried)")
        self.restore_attempts = attempts
        self.restore_retry_delay_s = check_number(
            "checkpoint", "restore_retry_delay_s", delay,
            "expected a finite number of seconds >= 0", low=0.0, high=math.inf, high_open=True,
            strings=False)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.also_best = also_best if best_metric else None
        self.keep = keep
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
        if self.also_best:
            policies.append(  # a missing or NaN value ranks last: never kept as its best
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: _score_or(m.get(also_best), self._worst),
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        # `best_fn` makes orbax write each checkpoint's metrics next to it, so a resumed run
        # (a new manager) still knows which older checkpoint is the best one to keep.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._quarantine_unreadable_metrics()
        # The handler up front: `item_metadata` of a checkpoint then works before any restore.
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=ocp.StandardCheckpointHandler(), options=options)

    def _quarantine_unreadable_metrics(self) -> None:
        """Rewrites, or else moves away, checkpoints' metrics files that are not valid JSON.

        Orbax reads every checkpoint's metrics when the manager starts and fails on a corrupt
        one. The file holds the step's eval, which metrics.jsonl holds too: rewritten from
        there, the checkpoint stays (an older one may be the best, which summary.json names);
        without that eval it is treated like any other unreadable checkpoint, with a warning.
        """
        paths = {}
        for step in step_folders(self.directory):
            path = self._metrics_path(step)
            if os.path.isfile(path):
                paths[step] = path
        broken = []
        for attempt in range(1, self.restore_attempts + 1):  # local files: no agreement needed
            broken = [step for step in sorted(paths) if not _is_json(paths[step])]
            if not broken or attempt == self.restore_attempts:
                break
            self._wait_to_retry(attempt, f"the metrics files of steps {broken}")
            paths = {step: paths[step] for step in broken}
        multi = jax.process_count() > 1
        if multi:  # every process has scanned before any file moves: they agree on `broken`
            multihost_utils.sync_global_devices("cnnjax_checkpoint_scan")
        evals = self._logged_evals(broken)
        for step in sorted(evals):
            message = (f"The metrics file of the checkpoint at step {step} in {self.directory} "
                       f"is unreadable; it is rewritten from that step's eval in {METRICS_FILE}.")
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            if jax.process_index() == 0:
                write_json(paths[step], evals[step])
        broken = [step for step in broken if step not in evals]
        kept = [step for step in step_folders(self.directory) if step not in broken]
        for step in broken:
            if kept and step < max(kept):  # a newer one is kept: nothing falls back
                message = (f"Checkpoint at step {step} in {self.directory} has an unreadable "
                           f"metrics file, and {METRICS_FILE} no eval of that step to rewrite it "
                           f"from; it is moved to {self.quarantine}.")
            else:
                fallback = (f"falling back to the checkpoint at step {max(kept)}" if kept
                            else "there is no other checkpoint to fall back to")
                message = (f"Checkpoint at step {step} in {self.directory} could not be restored "
                           f"(its metrics file is unreadable); {fallback} (the unreadable one is "
                           f"moved to {self.quarantine}).")
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        if broken:
            self._move_to_quarantine(broken)
        if multi:  # all processes, whatever they found: nobody starts orbax before the move
            multihost_utils.sync_global_devices("cnnjax_checkpoint_quarantine")

    def _logged_evals(self, steps: list[int]) -> dict[int, dict[str, Any]]:
        """`{step: eval metrics}` of those `steps` that metrics.jsonl (beside the checkpoints)
        records an eval of, rankable by `best_metric` (as the save stored them)."""
        if not steps:
            return {}
        evals = {}
        for record in read_metrics(os.path.join(os.path.dirname(self.directory), METRICS_FILE)):
            if record.get("split") == "eval" and record.get("step") in steps:
                evals[record["step"]] = {k: v for k, v in record.items()
                                         if k not in ("step", "split")}
        return {step: metrics for step, metrics in evals.items()
                if self.best_metric is None or _finite(metrics.get(self.best_metric))}

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def prune(self) -> list[int]:
        """Deletes the checkpoints the keep policy (the last `keep` plus the best) no longer
        holds, and returns their steps. Orbax prunes only after a later save commits, so a run
        killed between its final save and that pruning would otherwise keep one too many."""
        steps = self.all_steps()
        kept = set(steps[-self.keep:])
        if self.best_metric and self._manager.best_step() is not None:
            kept.add(self._manager.best_step())
        if self.also_best:
            kept |= self._best_steps_by(self.also_best, steps)
        dropped = [step for step in steps if step not in kept]
        for step in dropped:
            self._manager.delete(step)
        return dropped

    @property
    def _worst(self) -> float:
        """The score that ranks last in `best_mode`."""
        return math.inf if self.best_mode == "min" else -math.inf

    def _metrics_path(self, step: int) -> str:
        """The eval metrics orbax keeps beside the checkpoint at `step` (JSON)."""
        return os.path.join(self.directory, str(step), "metrics", "metrics")

    def _best_steps_by(self, metric: str, steps: list[int]) -> set[int]:
        """The step (a set of at most one) of `steps` whose saved eval scored best by `metric`,
        read from the checkpoints' metrics files; none if no step has a finite score."""
        scores = {}
        for step in steps:
            saved = read_json(self._metrics_path(step))
            if isinstance(saved, dict) and _finite(saved.get(metric)):
                scores[step] = saved[metric]
        return {_best_step(scores, self.best_mode)} if scores else set()

    def save(self, step: int, state: Any, metrics: dict | None = None,
             run_info: dict | None = None) -> None:
        """Starts saving the host pytree `state` at `step`; `metrics` (eval) rank it for 'best';
        `run_info` (JSON) is kept with the step, e.g. the device count (`run_info`)."""
        item = serialization.to_state_dict(state)
        if metrics is not None and self.best_metric:
            metrics = {k: float(v) for k, v in metrics.items()}
            score = metrics.get(self.best_metric)
            if score is not None and not math.isfinite(score):
                # orbax ranks a NaN neither above nor below the best, and deleted the best
                # for it: kept as a recent checkpoint, never a candidate for "best".
                message = (f"Checkpoint at step {step}: {self.best_metric}={score} is not "
                           "finite, so it is not ranked as the best checkpoint (it is kept "
                           "only while among the most recent).")
                logging.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                metrics = None
        else:
            metrics = None
        custom = {**(run_info or {}), _DIGESTS_KEY: array_digests(item),
                  _DIGEST_FORMAT_KEY: DIGEST_FORMAT}
        item, empties = _split_empty_arrays(item)  # orbax refuses them; they hold no data
        if empties:
            custom[_EMPTY_ARRAYS_KEY] = empties
        _drop_closed_loop_callbacks()
        with _without_missing_metrics_warning():  # periodic saves have no eval metrics
            self._manager.save(step, args=ocp.args.StandardSave(item), metrics=metrics,
                               force=True, custom_metadata=custom)

    def run_info(self, step: int) -> dict:
        """The `run_info` saved with `step` ({} for checkpoints written without one, or, with a
        warning, when its metadata cannot be read: the arrays still restore)."""
        try:
            info = dict(self._manager.metadata(step).custom_metadata or {})
        except Exception as err:  # noqa: BLE001 — unreadable metadata only loses this information
            self._warn_run_info_lost(step, f"{type(err).__name__}: {str(err)[:200]}")
            return {}
        for key in (_DIGESTS_KEY, _DIGEST_FORMAT_KEY, _EMPTY_ARRAYS_KEY):
            info.pop(key, None)
        if not info:  # orbax reads a torn or empty metadata file as "no metadata"
            path = os.path.join(self.directory, str(step), STEP_METADATA_FILE)
            try:
                if os.path.isfile(path):
                    with open(path) as f:
                        json.load(f)
            except (OSError, ValueError) as err:
                self._warn_run_info_lost(step, f"{type(err).__name__} reading {path}")
        return info

    def _warn_run_info_lost(self, step: int, why: str) -> None:
        message = (f"The metadata of the checkpoint at step {step} in {self.directory} cannot be "
                   f"read ({why}): the run resumes, but without the device and process counts "
                   "it recorded, and the first train log after the resume averages fewer steps.")
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def restore_latest(self, template: Any) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into the structure of `template`.

        Returns `(state, step)`, or None when there is no checkpoint. A checkpoint whose read
        fails `restore_attempts` times in a row (in any process) is reported with a warning and
        the previous one is tried; once an older one loads, the unreadable ones are moved to
        `<workdir>/checkpoints_corrupt`. If none loads, raises a ValueError (and moves nothing).
        """
        full_target = serialization.to_state_dict(template)
        corrupt: list[int] = []
        reasons: dict[int, str] = {}
        digest_failures: list[str] = []
        result = None
        newest_first = list(reversed(self.all_steps()))
        # A step whose metadata file is damaged has lost its arrays' digests (orbax reads a torn
        # file as "no metadata"), so its arrays cannot be checked: it is tried only after every
        # checked one, and quarantined, as unreadable, when an older checked one restores.
        unchecked = [s for s in newest_first if self._metadata_damaged(s)]
        order = [s for s in newest_first if s not in unchecked] + unchecked
        for index, step in enumerate(order):
            restored, why = self._restore_step(step, template, full_target)
            if restored is not None:
                result = restored, step
                break
            corrupt.append(step)
            reasons[step] = why
            if why.startswith(CheckpointDigestError.__name__):
                digest_failures.append(why)
            fallback = (
                f"falling back to the checkpoint at step {order[index + 1]} (this one is moved "
                f"to {self.quarantine} once another one restores)" if index + 1 < len(order)
                else "there is no other checkpoint to fall back to")
            message = (
                f"Checkpoint at step {step} in {self.directory} could not be restored "
                f"({why}; tried {self.restore_attempts} time(s)); {fallback}."
            )
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if corrupt and result is None:
            # Nothing restores: leave the files alone and stop, saying what the newest failure
            # points to (its first line): changed arrays, damaged files, or else, more likely,
            # a state structure (code or config) other than the one saved.
            steps, newest = sorted(corrupt), max(corrupt)
            first_line = (reasons[newest].splitlines() or [""])[0][:200]
            start_fresh = "to start fresh use a new --workdir or delete the checkpoints."
            if len(digest_failures) == len(corrupt):
                # Every one read back other numbers than it saved: corrupt, not a code mismatch.
                raise ValueError(
                    f"checkpoint: every checkpoint in {self.directory} (steps {steps}) is "
                    f"corrupt ({digest_failures[0]}); {start_fresh}")
            # Changed arrays (a failed digest) are damage to the files too, not a code mismatch.
            if all(_READ_FAILURE.match(reasons[s])
                   or reasons[s].startswith(CheckpointDigestError.__name__) for s in corrupt):
                damage = "damaged, missing or corrupt" if digest_failures else "damaged or missing"
                raise ValueError(
                    f"checkpoint: no checkpoint in {self.directory} (steps {steps}) can be read: "
                    f"their files are {damage} (step {newest}: {first_line}); {start_fresh}")
            raise ValueError(
                f"checkpoint: no checkpoint in {self.directory} (steps {steps}) could be "
                f"restored into the current state structure (step {newest}: {first_line}); "
                f"{start_fresh}")
        # untried: newer than the checked one that restored (tried ones that failed are corrupt)
        passed_over = [s for s in unchecked
                       if result is not None and s > result[1] and s not in corrupt]
        for step in passed_over:
            message = (f"Checkpoint at step {step} in {self.directory} has a damaged metadata "
                       f"file ({STEP_METADATA_FILE}), so its arrays cannot be checked against "
                       f"their digests; resuming from step {result[1]}, the newest checked "
                       f"checkpoint (the damaged one is moved to {self.quarantine}).")
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        corrupt += passed_over
        if corrupt:  # an older one restored, so the newer ones really are unreadable
            self._quarantine(corrupt)
        return result

    def _metadata_damaged(self, step: int) -> bool:
        """Whether `step`'s metadata file exists but is not JSON (torn or garbled on disk:
        orbax writes it before the step's atomic rename). A step without one (written before
        orbax kept it) is not damaged."""
        path = os.path.join(self.directory, str(step), STEP_METADATA_FILE)
        return os.path.isfile(path) and not _is_json(path)

    def _restore_step(self, step: int, template: Any,
                      full_target: dict) -> tuple[Any, str | None]:
        """`(state, None)` once every process has read `step`, trying up to `restore_attempts`
        times with backoff; else `(None, why)` (its last error). Every process takes part in each
        try's agreement, so all of them return a state or all of them give up on the step."""
        why = ""
        for attempt in range(1, self.restore_attempts + 1):
            try:
                state: Any = self._read_step(step, template, full_target)
            except CheckpointShapeError:  # read fine, fits no longer: neither retried nor moved
                raise
            except Exception as err:  # noqa: BLE001 — any read failure: retry, then "corrupt"
                state, why = None, f"{type(err).__name__}: {str(err)[:200]}"
                _drop_closed_loop_callbacks()  # the failed read's other arrays call back late
            if _all_processes(state is not None):
                return state, None
            if state is not None:
                why = "another process could not read it"
            if attempt < self.restore_attempts:
                self._wait_to_retry(attempt, f"the checkpoint at step {step} ({why})")
        return None, why

    def _read_step(self, step: int, template: Any, full_target: dict) -> Any:
        """The checkpoint at `step` in the structure of `template` (raises if unreadable)."""
        # An empty field the checkpoint lacks (`ema` when not averaging, in checkpoints
        # written before the field existed) holds no array: it comes from the template.
        metadata = self._manager.item_metadata(step)
        metadata = getattr(metadata, "tree", metadata) or {}
        saved = _saved_digests(self._manager, step)
        # Zero-size arrays are not in orbax's files but in the step's metadata.
        wanted, _ = _split_empty_arrays(full_target)
        on_disk = set(metadata)
        absent = {k: v for k, v in full_target.items()
                  if k not in on_disk and not jax.tree.leaves(wanted.get(k))}
        target = {k: v for k, v in wanted.items() if k not in absent}
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        restored = _with_empty_arrays(restored, {
            path: _empty_array(spec) for path, spec in saved.empty_arrays.items()})
        target = {k: v for k, v in full_target.items() if k not in absent}
        mismatched = _shape_mismatches(restored, target)
        if mismatched:
            raise CheckpointShapeError(
                f"checkpoint: the checkpoint at step {step} in {self.directory} does not fit the "
                f"current state: {'; '.join(mismatched[:3])}"
                f"{f' (and {len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}. The "
                "model or optimizer changed since it was saved; to start fresh use a new "
                "--workdir or delete the checkpoints."
            )
        check_digests(restored, saved.digests, f"step {step}", _cast_paths(metadata, restored),
                      saved.digest_format)
        return serialization.from_state_dict(template, {**restored, **absent})

    def _wait_to_retry(self, attempt: int, what: str) -> None:
        """Logs that `what` could not be read on try `attempt` and sleeps the backoff."""
        delay = self.restore_retry_delay_s * 2 ** (attempt - 1)
        logging.warning("Could not read %s in %s (try %d of %d); retrying in %.3g s.",
                        what, self.directory, attempt, self.restore_attempts, delay)
        _sleep(delay)

    @property
    def quarantine(self) -> str:
        """Where unreadable checkpoints are moved, so training can save those steps again."""
        return quarantine_dir(self.directory)

    def _quarantine(self, steps: list[int]) -> None:
        """Moves `steps` aside (process 0) and, once every process knows they are gone, drops
        them from each manager's step list, so those steps can be saved again."""
        self._move_to_quarantine(steps)
        if jax.process_count() > 1:  # no process re-reads the directory before the move
            multihost_utils.sync_global_devices("cnnjax_checkpoint_restore_quarantine")
        self._manager.reload()

    def _move_to_quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            os.makedirs(self.quarantine, exist_ok=True)
            for step in steps:
                source = os.path.join(self.directory, str(step))
                if os.path.isdir(source):
                    shutil.move(source, _free_path(
                        os.path.join(self.quarantine, f"{step}.{int(time.time())}")))

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        # orbax starts cleaning up unfinished saves' temporary directories in a thread when the
        # manager opens and awaits it only before the first save; a run that stops before any
        # save (a bad init_from, a failed restore) would exit with that thread still scheduling
        # work and print its traceback after the run's own error. (Private in orbax 0.12.)
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._manager.close()


def _cast_paths(metadata: Any, restored: Any) -> frozenset[str]:
    """Paths of the restored arrays whose dtype is not the saved one (from the checkpoint's
    `metadata` tree): orbax casts to the template's dtype, as it did before digests existed."""
    saved = traverse_util.flatten_dict(metadata, sep="/")
    return frozenset(
        path for path, leaf in traverse_util.flatten_dict(restored, sep="/").items()
        if leaf is not None and getattr(saved.get(path), "dtype", None) is not None
        and np.dtype(saved[path].dtype) != np.asarray(leaf).dtype)


@dataclasses.dataclass(frozen=True)
class _SavedDigests:
    """What a step's metadata says about its arrays: their `digests` (None: none saved), the
    `digest_format` they were computed in and the zero-size arrays orbax did not store."""

    digests: dict[str, str] | None = None
    digest_format: int = 1
    empty_arrays: dict[str, list] = dataclasses.field(default_factory=dict)


def _saved_digests(manager: Any, step: int) -> _SavedDigests:
    """The digests saved with `step` (None if it has none, or its metadata cannot be read: the
    arrays' own reads are then the only check, as before digests were saved), their format and
    the step's zero-size arrays."""
    try:
        custom = manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 — `run_info` warns about unreadable metadata
        return _SavedDigests()
    return _SavedDigests(custom.get(_DIGESTS_KEY), custom.get(_DIGEST_FORMAT_KEY, 1),
                         dict(custom.get(_EMPTY_ARRAYS_KEY) or {}))


def _best_step(scores: dict[int, Any], best_mode: str) -> int:
    """The step of the best of the finite `scores` (`{step: value}`) in `best_mode`; ties go
    to the later checkpoint (more training)."""
    sign = -1.0 if best_mode == "min" else 1.0
    return max(scores, key=lambda step: (sign * float(scores[step]), step))


def _score_or(value: Any, worst: float) -> float:
    """`value` as a checkpoint's score, `worst` if it is missing or not a finite number."""
    return float(value) if _finite(value) else worst


def _finite(value: Any) -> bool:
    """Whether `value` is a finite number (a metric that can rank checkpoints)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _free_path(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... when taken: `shutil.move` onto an existing folder
    would put the source inside it (a step quarantined twice within one second)."""
    candidate, count = path, 0
    while os.path.exists(candidate):
        count += 1
        candidate = f"{path}.{count}"
    return candidate


def _is_json(path: str) -> bool:
    """Whether the file at `path` can be read and parsed as JSON."""
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


#: How deep `where_the_runs_are` looks for runs inside a directory (a sweep's trials/<id>).
_RUN_SEARCH_DEPTH = 3


def where_the_runs_are(path: str) -> str:
    """The end of a "has no checkpoints" error for a `path` next to runs: a run's own
    `checkpoints/` folder names its run; a sweep, tuning or transfer directory names the runs
    inside it whose `checkpoints/` holds a step (at most 5, up to `_RUN_SEARCH_DEPTH` levels
    down: a trial that diverged before its first save has none); else nothing."""
    if os.path.basename(path) == CHECKPOINT_DIR and os.path.isdir(path):
        return f"; it is the checkpoints folder of the run {os.path.dirname(path)!r}: pass that"
    runs = []
    for root, dirs, _ in os.walk(path):
        depth = os.path.relpath(root, path).count(os.sep) + (root != path)
        if CHECKPOINT_DIR in dirs and root != path:
            if step_folders(os.path.join(root, CHECKPOINT_DIR)):
                runs.append(root)
            dirs.clear()  # a run's own folders hold no further runs
        elif depth >= _RUN_SEARCH_DEPTH:
            dirs.clear()
        dirs.sort()
    if not runs:
        return ""
    return f"; it holds runs with checkpoints: {listed(sorted(runs), 5)}"


# ------------------------------------------------------------------ another run's checkpoints
class CorruptSourceCheckpointError(ValueError):
    """`SourceCheckpoints.restore` of a checkpoint whose arrays fail their digests; `reason`
    names the array, for a caller that words the refusal itself (`init_from`: by its field)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class SourceCheckpoints:
    """Read-only view of another run's `<workdir>/checkpoints` (for `config.init_from` and
    `cnnjax.train.trained`).

    Opens orbax in read-only mode (no temporary-directory cleanup, no deletions), so warm-starting
    from a run that is still training cannot disturb it. Raises a ValueError naming where it
    looked if `workdir` has no complete checkpoint.
    """

    def __init__(self, workdir: str, owner: str = "init_from"):
        self.owner = owner  # names the caller in errors
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        if not os.path.isdir(self.directory):
            what = "does not exist" if not os.path.exists(self.workdir) else "has no checkpoints"
            raise ValueError(
                f"{owner}: workdir={workdir!r} is invalid; it {what} (looked for checkpoints "
                f"in {self.directory!r}); expected the --workdir of a run that saved "
                f"checkpoints{where_the_runs_are(self.workdir)}."
            )
        # A damaged checkpoint's failed read (of its metadata or arrays) leaves tensorstore's
        # other reads calling back into the loop orbax closed: no bare tracebacks for those.
        _drop_closed_loop_callbacks()
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, cleanup_tmp_directories=False
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=ocp.PyTreeCheckpointHandler(), options=options
        )
        self.steps = sorted(self._manager.all_steps())
        if not self.steps:
            self.close()
            raise ValueError(
                f"{owner}: workdir={workdir!r} is invalid; it has no complete checkpoint "
                f"(looked in {self.directory!r}); expected the --workdir of a run that saved "
                "checkpoints."
            )

    def check_step(self, step: int) -> int:
        """Returns `step` if a checkpoint exists there, else raises listing the available ones."""
        if step not in self.steps:
            raise ValueError(
                f"{self.owner}: step={step!r} is invalid; {self.directory!r} has checkpoints at "
                f"steps {self.steps}."
            )
        return step

    def choose_step(
        self, requested: int | None, best_metric: str | None, best_mode: str = "max",
        ema: bool = False,
    ) -> tuple[int, str]:
        """`(step, how)`: `requested` if given ('requested'); else the best kept checkpoint by
        `best_metric` among those evaluated at their step in the run's metrics.jsonl ('best');
        else the newest ('latest', e.g. no kept checkpoint was evaluated).

        `best_metric` is read for the weights being loaded: with `ema` (the weight average) a
        run's `top1` becomes `ema_top1`, without it `ema_top1` becomes `top1`, so the pick is the
        step where those weights, not the others, scored best.
        """
        if requested is not None:
            return self.check_step(requested), "requested"
        if best_metric:
            best_metric = metric_scoring(best_metric, ema)
            evals = {
                r["step"]: r[best_metric]
                for r in read_metrics(os.path.join(self.workdir, METRICS_FILE))
                if r.get("split") == "eval" and r.get("step") in self.steps and best_metric in r
                and _finite(r[best_metric])  # a NaN would win `max` by coming first
            }
            if evals:
                return _best_step(evals, best_mode), "best"
        return self.steps[-1], "latest"

    def shapes(self, step: int, collections: tuple[str, ...]) -> dict[str, Any]:
        """`{collection: nested dict of jax.ShapeDtypeStruct}` of the checkpoint at `step`,
        read from its metadata (no array is loaded); an absent or empty collection is `{}`.
        Raises a ValueError if that metadata is gone (a damaged checkpoint, not an empty one)."""
        tree = self._manager.item_metadata(step)
        if tree is None:  # orbax returns None when the item's _METADATA file is gone
            raise ValueError(f"its tree metadata ({step}/default/_METADATA) is missing, so "
                             "which arrays it holds is unknown")
        tree = getattr(tree, "tree", tree) or {}
        empties = {path: _empty_array(spec)
                   for path, spec in _saved_digests(self._manager, step).empty_arrays.items()}
        tree = _with_empty_arrays(tree, empties)
        return {
            name: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree.get(name) or {}
            )
            for name in collections
        }

    def restore(self, step: int, shapes: dict[str, Any]) -> dict[str, Any]:
        """Loads only the leaves named in `shapes` (as from `shapes`, possibly pruned) as NumPy
        arrays; the optimizer state and everything else in the checkpoint is never read."""
        shapes = {k: v for k, v in shapes.items() if jax.tree.leaves(v)}
        if not shapes:
            return {}
        item = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        item, empties = _split_empty_arrays(item)  # not in orbax's files: no data to read
        item = {k: v for k, v in item.items() if jax.tree.leaves(v)}
        saved = _saved_digests(self._manager, step)
        restored = {}
        if item:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        item)
            restored = self._manager.restore(
                step,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        restored = _with_empty_arrays(restored, {
            path: _empty_array(saved.empty_arrays[path]) if path in saved.empty_arrays
            else _empty_array(spec) for path, spec in empties.items()})
        try:
            check_digests(restored, saved.digests, f"step {step}",
                          digest_format=saved.digest_format)
        except CheckpointDigestError as err:
            raise CorruptSourceCheckpointError(
                f"{self.owner}: the checkpoint at step {step} in {self.directory} is corrupt: "
                f"{err}; pick another of its steps {[s for s in self.steps if s != step]}",
                str(err)) from None
        return restored

    def variable_shapes(self, step: int, ema: bool = False) -> dict[str, Any]:
        """`shapes` of the model variables (`WARM_START_COLLECTIONS`) of the checkpoint at
        `step`: its trained weights, or with `ema` its weight average (`{}` per collection when
        it kept none)."""
        if not ema:
            return self.shapes(step, WARM_START_COLLECTIONS)
        average = self.shapes(step, ("ema",))["ema"]  # {'params', 'batch_stats'}
        return {name: average.get(name) or {} for name in WARM_START_COLLECTIONS}

    def restore_variables(self, step: int, shapes: dict[str, Any],
                          ema: bool = False) -> dict[str, Any]:
        """`restore` of `shapes` (from `variable_shapes` with the same `ema`, possibly pruned):
        the weights', or the weight average's, variables at the same collection paths."""
        if not ema:
            return self.restore(step, shapes)
        return self.restore(step, {"ema": shapes}).get("ema", {})

    def close(self) -> None:
        """Closes the underlying checkpoint manager (waits for pending saves)."""
        self._manager.close()
