"""Multi-host start-up for entry points: when to call `jax.distributed.initialize()`, and a clear,
bounded failure when the processes cannot form one JAX job.

JAX finds the coordinator address, process count and index itself under SLURM (and Open MPI,
Kubernetes); elsewhere `JAX_COORDINATOR_ADDRESS` plus `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
(read here: JAX reads only the first) describe the job. If the job does not form, XLA aborts the
process from C++ with a misleading "another task died ... DEADLINE_EXCEEDED" and Python cannot catch
it, so a watchdog thread ends the process first, with a message saying what was missing.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from cnnjax.utils.validation import check_positive_float, check_positive_int, invalid

_OWNER = "distributed"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
#: JAX's own default for how long processes wait for each other at start-up.
DEFAULT_TIMEOUT_S = 300
#: JAX's deadline is set this much later than the watchdog's, so the watchdog speaks first.
_JAX_GRACE_S = 30
EXIT_STATUS = 1


def _env_int(environ: Mapping[str, str], name: str, valid: str = "expected an integer"
             ) -> int | None:
    """The integer in `environ[name]` (None if unset or empty); ASCII digits only, since `int`
    also reads '2_0' as 20, and Arabic-Indic or fullwidth digits."""
    value = environ.get(name)
    if value is None or value == "":
        return None
    if re.fullmatch(r"[+-]?[0-9]+", value.strip()) is None:
        raise invalid(_OWNER, name, value, valid)
    return int(value)


#: What `srun` sets in each task of a job step, and JAX's SLURM detection reads (an `salloc`
#: shell or a batch script outside `srun` has SLURM_NTASKS but not these).
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_tasks(environ: Mapping[str, str] | None = None) -> int:
    """`SLURM_NTASKS` (1 when unset or empty); ValueError for one that is not a positive integer
    (0 ran one process)."""
    env = os.environ if environ is None else environ
    valid = "expected a positive integer (the job step's task count)"
    tasks = _env_int(env, "SLURM_NTASKS", valid)
    if tasks is not None and tasks < 1:
        raise invalid(_OWNER, "SLURM_NTASKS", env["SLURM_NTASKS"], valid)
    return tasks or 1


def in_slurm_step(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a task of an `srun` job step (JAX then finds the job itself)."""
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in SLURM_STEP_VARIABLES)


def should_initialize(requested: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """`requested` when given (`--distributed` / `--nodistributed`); None (automatic) is True in
    a task of an `srun` step with `SLURM_NTASKS` > 1. A one-process run in an allocation of more
    tasks (an `salloc -n 4` shell, a batch script outside `srun`) stays one process: JAX could
    not find the job there. Raises ValueError for a malformed `SLURM_NTASKS`, in every case."""
    env = os.environ if environ is None else environ
    tasks = slurm_tasks(env)
    if requested is not None:
        return bool(requested)
    return tasks > 1 and in_slurm_step(env)


def explicit_params(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """`num_processes` / `process_id` from `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` when set.

    Unset ones are left to JAX's cluster detection (SLURM etc.). Raises ValueError for a
    non-integer value or an index outside `[0, num_processes)`.
    """
    env = os.environ if environ is None else environ
    params: dict[str, int] = {}
    num = _env_int(env, NUM_PROCESSES_ENV)
    pid = _env_int(env, PROCESS_ID_ENV)
    if num is not None:
        params["num_processes"] = check_positive_int(_OWNER, NUM_PROCESSES_ENV, num)
    if pid is not None:
        if pid < 0 or (num is not None and pid >= num):
            raise invalid(_OWNER, PROCESS_ID_ENV, pid,
                          "expected an integer >= 0" if num is None
                          else f"expected 0 <= {PROCESS_ID_ENV} < {NUM_PROCESSES_ENV}={num}")
        params["process_id"] = pid
    return params


def check_timeout(timeout_s: Any, name: str = "timeout_s") -> float:
    """`timeout_s` as float if it is a positive, finite number of seconds, else ValueError naming
    `name` (the entry point's flag: `--distributed_timeout`)."""
    return check_positive_float(_OWNER, name, timeout_s)


def _job_state() -> tuple[Any, Any, str | None]:
    """(process id, process count, coordinator address) as JAX resolved them (best effort)."""
    try:
        from jax._src.distributed import global_state
    except ImportError:  # pragma: no cover - JAX moved its internals
        return "?", "?", None
    return (
        getattr(global_state, "process_id", None),
        getattr(global_state, "num_processes", None),
        getattr(global_state, "coordinator_address", None),
    )


def _reachable(address: str | None, timeout_s: float = 2.0) -> bool:
    if not address or ":" not in address:
        return False
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def timeout_message(timeout_s: float, process_id: Any, num_processes: Any,
                    coordinator: str | None, coordinator_reachable: bool) -> str:
    """What to tell the user when the job did not form within `timeout_s` seconds."""
    where = f"process {process_id} of {num_processes}"
    if coordinator is None:
        return (f"{_OWNER}: {where} could not start the JAX job within {timeout_s:g} s (no "
                "coordinator address was resolved).")
    if process_id != 0 and not coordinator_reachable:
        return (f"{_OWNER}: {where} could not reach the JAX coordinator at {coordinator} within "
                f"{timeout_s:g} s. Process 0 starts the coordinator: check that it is running on "
                "that host and that the port is open (set by SLURM_STEP_NODELIST and "
                "SLURM_JOB_ID, or JAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_PORT).")
    role = "started the coordinator" if process_id == 0 else "reached the coordinator"
    return (f"{_OWNER}: {where} {role} at {coordinator}, but not all {num_processes} processes "
            f"joined within {timeout_s:g} s. Check that every process was started (SLURM_NTASKS /"
            " JAX_NUM_PROCESSES) and that each can reach the coordinator.")


def initialize(timeout_s: float = DEFAULT_TIMEOUT_S, *,
               environ: Mapping[str, str] | None = None,
               on_timeout: Callable[[str, Any], None] | None = None) -> None:
    """Calls `jax.distributed.initialize()`; ends the process if the job has not formed in time.

    Must run before anything starts a JAX backend. If the processes have not all connected after
    `timeout_s` seconds, writes `error: <what was missing>` to stderr and exits with status
    `EXIT_STATUS` (JAX would otherwise abort later with an unrelated-sounding message). Raises
    ValueError when the job cannot be described (e.g. `--distributed` outside a cluster without
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). `environ` (default
    `os.environ`) is where `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` are read; JAX reads the rest
    (SLURM_*, `JAX_COORDINATOR_ADDRESS`, `JAX_COORDINATOR_PORT`) from `os.environ` itself.
    `on_timeout(message, process_id)`, if given, runs before the exit (e.g. to write the message
    into the work directory); its own failure is reported and does not stop the exit.
    """
    import jax

    timeout_s = check_timeout(timeout_s)
    params = explicit_params(environ)
    formed = threading.Event()

    def watchdog() -> None:
        if formed.wait(timeout_s):
            return
        pid, num, coordinator = _job_state()
        message = timeout_message(timeout_s, pid, num, coordinator, _reachable(coordinator))
        sys.stderr.write(f"error: {message}\n")
        if on_timeout is not None:
            try:
                on_timeout(message, pid)
            except Exception as err:  # noqa: BLE001 - the exit must happen regardless
                sys.stderr.write(f"error: could not record the failure: {err!r}\n")
        sys.stderr.flush()
        os._exit(EXIT_STATUS)

    threading.Thread(target=watchdog, name="cnnjax-distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            initialization_timeout=math.ceil(timeout_s) + _JAX_GRACE_S, **params
        )
    except ValueError as err:  # the job is not described (no cluster detected, no env vars)
        raise ValueError(
            f"{_OWNER}: could not set up the multi-process JAX job ({err}). Launch under SLURM "
            f"(srun) or set JAX_COORDINATOR_ADDRESS=host:port, {NUM_PROCESSES_ENV} and "
            f"{PROCESS_ID_ENV} in every process."
        ) from None
    finally:
        formed.set()
