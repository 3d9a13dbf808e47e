"""Preemption-safe stops: SIGTERM asks the loop to checkpoint the current step and exit cleanly.

SLURM preemption, `scancel` and the USR1 -> TERM of `cnnjax.launch`'s sbatch scripts send SIGTERM.
`StopRequest` installs a handler that only sets a flag (main thread only; the previous handler is
restored on exit, so the engine stays usable as a library); the loop polls `should_stop(step)`
between steps, saves a checkpoint of that step, writes summary.json with status "interrupted"
and raises `TrainingInterrupted`. Multi-process: the flags are combined with one tiny allgather
every `sync_every` steps, so every process stops at the same step (latency <= sync_every steps).
SIGINT (Ctrl-C) keeps Python's KeyboardInterrupt: an immediate stop without a final checkpoint.
One that lands inside a callback whose errors Python only reports (JAX's garbage-collection
callback: "Exception ignored in ... KeyboardInterrupt") would be lost; while a `StopRequest` is
active `sys.unraisablehook` notes it, and the next poll raises the KeyboardInterrupt instead.
A SIGTERM that arrives after a run's last poll (during its final eval and checkpoint) cannot stop
that run; it stays pending for the process, so the next run of a sweep, tune or transfer
comparison stops before training (`TrainingInterrupted` with `started=False`) instead of the
signal being dropped with the finished run's handler.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

#: Exit status of a process stopped by SIGTERM after saving its checkpoint (128 + SIGTERM).
EXIT_CODE = 128 + signal.SIGTERM


class TrainingInterrupted(KeyboardInterrupt, SystemExit):
    """The run stopped at `step` on `signal_name` after checkpointing that step.

    A KeyboardInterrupt, so callers that already stop on Ctrl-C (sweeps, the tuning recipe,
    transfer comparisons) record "interrupted" and stop too; and a SystemExit with code
    `EXIT_CODE`, so when nothing catches it the process exits with the conventional 143.
    """

    def __init__(self, step: int, signal_name: str = "SIGTERM", checkpointed: bool = True,
                 started: bool = True):
        SystemExit.__init__(self, EXIT_CODE)
        self.step = step
        self.signal_name = signal_name
        self.checkpointed = checkpointed  # False: a short run that a rerun redoes (LR range test)
        self.started = started  # False: stopped before its first step by a pending signal

    def __str__(self) -> str:
        if not self.started:
            return (f"Stopped by {self.signal_name} before training (it arrived as the previous "
                    "run finished); rerun the same command to run or resume it.")
        if not self.checkpointed:
            return (f"Stopped by {self.signal_name} at step {self.step} (nothing to resume); "
                    "rerun the same command to redo it.")
        return (f"Training stopped by {self.signal_name} at step {self.step} after saving a "
                "checkpoint of that step; rerun the same command to resume.")


#: The signal a `StopRequest` caught that no loop has acted on yet (`should_stop` returned it,
#: or `take_pending`): the next `StopRequest` of the process starts with it.
_pending: str | None = None


#: A Ctrl-C that Python swallowed (raised inside a callback, reported to `sys.unraisablehook`)
#: and no poll has raised yet; cleared when the outermost `StopRequest` exits.
_swallowed_interrupt = False
_active_requests = 0  # StopRequests entered and not yet exited (nested: sweep, then run)
_noting_hook: Callable[[Any], None] | None = None  # the hook `_notes_interrupts` last made


def _notes_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` that notes a swallowed KeyboardInterrupt while a StopRequest is
    active, then reports every error as `previous` would; `__wrapped__` names `previous`."""

    def hook(unraisable: Any) -> None:
        global _swallowed_interrupt
        exc_type = getattr(unraisable, "exc_type", None)
        if (_active_requests and isinstance(exc_type, type)
                and issubclass(exc_type, KeyboardInterrupt)):
            _swallowed_interrupt = True
        previous(unraisable)

    hook.__wrapped__ = previous  # type: ignore[attr-defined]
    return hook


def _hook_installed(hook: Callable[[Any], None] | None) -> bool:
    """Whether `hook` is `sys.unraisablehook` or a hook it reaches through `__wrapped__`."""
    current = sys.unraisablehook
    while hook is not None and current is not None:
        if current is hook:
            return True
        current = getattr(current, "__wrapped__", None)
    return False


def raise_swallowed_interrupt() -> None:
    """Raises the KeyboardInterrupt of a Ctrl-C that Python swallowed, once."""
    global _swallowed_interrupt
    if _swallowed_interrupt:
        _swallowed_interrupt = False
        raise KeyboardInterrupt


def take_pending() -> str | None:
    """The pending signal's name (None if none), which is then acted on: no longer pending."""
    global _pending
    name, _pending = _pending, None
    return name


def stop_if_pending() -> None:
    """Raises `TrainingInterrupted` (`started=False`) for a pending signal, taking it: a run
    about to start stops before it trains. Logged as a stop mid-run is: uncaught, it exits 143
    and prints nothing itself (a sweep stopped this way ended without a word)."""
    name = take_pending()
    if name is not None:
        err = TrainingInterrupted(0, name, checkpointed=False, started=False)
        logging.warning("%s", err)
        raise err


class StopRequest:
    """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

    It starts with the process's pending signal, one an earlier `StopRequest` caught after its
    loop's last poll."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested: str | None = None  # name of the signal received on this process
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _pending
        self.requested = _pending = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        global _active_requests, _noting_hook
        if self.requested is None:
            self.requested = _pending
        if _active_requests == 0 and not _hook_installed(_noting_hook):
            _noting_hook = sys.unraisablehook = _notes_interrupts(sys.unraisablehook)
        _active_requests += 1
        # signal.signal only works in the main thread; elsewhere the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """Restores the signal handlers, and the unraisable hook unless one installed inside the
        request wraps ours (the checkpoints' filter of late tensorstore callbacks, which must
        outlive the failed read that raised out of here): ours then stays, noting nothing."""
        global _active_requests, _swallowed_interrupt, _noting_hook
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        _active_requests -= 1
        if _active_requests == 0:
            if _noting_hook is not None and sys.unraisablehook is _noting_hook:
                sys.unraisablehook, _noting_hook = _noting_hook.__wrapped__, None
            _swallowed_interrupt = False

    def should_stop(self, step: int, sync_every: int) -> str | None:
        """The signal name if every process must stop after `step`, else None.

        One process: as soon as its flag is set. Several: only at multiples of `sync_every`,
        where all processes allgather their flags (every process calls this at every step, so
        they reach the collective together); any process's flag stops them all. A Ctrl-C that
        Python swallowed since the last poll is raised here (KeyboardInterrupt).
        """
        raise_swallowed_interrupt()
        if jax.process_count() == 1:
            name = self.requested
        elif step % sync_every:
            return None
        else:
            flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
            name = (self.requested or "SIGTERM") if np.any(np.asarray(flags)) else None
        if name is not None:  # the caller stops on it
            take_pending()
        return name
