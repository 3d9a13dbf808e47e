"""Several `python -m <command> ...` runs for the price of one interpreter start.

A test that checks how commands refuse bad arguments spent most of each run importing JAX,
TensorFlow and cnnjax (3-8 s a process). `run_commands` starts one Python process that imports
each command module's dependencies once, then forks a child per command that runs the module as
`__main__` with that argv (as `python -m` does: `runpy`, flags defined and parsed afresh), its
stdout and stderr captured to files, and `SystemExit` turned into the exit status and message as
the interpreter does. Meant for runs that stop early (bad flags, paths, configs); JAX's backend
is never started before a fork. The entry points import the engine, tfds and TensorFlow only once
running, so name those in `preimport` (e.g. `cnnjax.train.trained`; `cnnjax.data.pipeline` only
where the commands read data, as it brings TensorFlow): without it each child imports them itself
(1.5-6 s a child; a fixture of nine sweep refusals took 42-57 s, and 2-6 s with it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_commands(commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None,
                 timeout: int = 300, preimport: Sequence[str] = ()
                 ) -> list[subprocess.CompletedProcess]:
    """Runs each `[module, *args]` as `python -m module *args` from the repository root; returns
    their `CompletedProcess`es (text stdout/stderr) in order. `preimport`: modules the commands
    import only once running (e.g. `cnnjax.data.pipeline`, TensorFlow), imported once first."""
    env = {**os.environ, "PYTHONPATH": ROOT} if env is None else dict(env)
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "commands.json")
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"commands": [list(c) for c in commands], "timeout": timeout,
                       "preimport": list(preimport)}, f)
        driver = subprocess.run([sys.executable, "-m", "tests.commands", spec], cwd=ROOT,
                                env=env, capture_output=True, text=True,
                                timeout=timeout * (len(commands) + 1))
        assert driver.returncode == 0, driver.stderr[-3000:]
        results = []
        for i, command in enumerate(commands):
            with open(os.path.join(tmp, f"{i}.json"), encoding="utf-8") as f:
                returncode = json.load(f)["returncode"]
            out, err = (_read(os.path.join(tmp, f"{i}.{name}")) for name in ("stdout", "stderr"))
            results.append(subprocess.CompletedProcess([sys.executable, "-m", *command],
                                                       returncode, out, err))
        return results


def assert_exited(result: subprocess.CompletedProcess, status: int, last_line: str | None
                  ) -> None:
    """`result` exited with `status`, its last stderr line being `last_line` (None: no `error:`
    line at all): how a command's exit is told to a script or SLURM."""
    assert result.returncode == status, result.stderr[-2000:]
    if last_line is None:
        assert "error:" not in result.stderr
    else:
        assert result.stderr.strip().splitlines()[-1] == last_line


def wait_for_checkpoint(proc: subprocess.Popen, checkpoints: str | os.PathLike, min_step: int,
                        timeout_s: float = 280) -> None:
    """Returns once `checkpoints` holds a step >= `min_step`, `proc` has ended or `timeout_s`
    passed (the caller's next assertion says which)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(checkpoints) and any(
                n.isdigit() and int(n) >= min_step for n in os.listdir(checkpoints)):
            return
        time.sleep(0.02)


def ctrl_c_after_checkpoint(command: Sequence[str], env: Mapping[str, str],
                            checkpoints: str | os.PathLike, min_step: int) -> str:
    """Runs `command` from the repository root and presses Ctrl-C (SIGINT, not ignored as in a
    background job) once `checkpoints` holds a step >= `min_step`; asserts the command exited
    130 without a traceback and returns its stderr."""
    proc = subprocess.Popen(
        list(command), cwd=ROOT, env=dict(env), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_checkpoint(proc, checkpoints, min_step)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _preimport(module: str) -> None:
    """Imports `module` (and so its dependencies), then forgets it and the flags it defined, so
    that a child can run it as `__main__` as if for the first time."""
    import importlib

    from absl import app, flags  # noqa: F401 — absl's own flags (logging's too) stay defined

    before = set(flags.FLAGS)
    importlib.import_module(module)
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    sys.modules.pop(module, None)


def _child(command: Sequence[str], prefix: str, timeout: int) -> None:
    """Runs one command in a forked child and exits with its status (never returns)."""
    import runpy
    import signal
    import traceback

    code: int | str | None = 1
    try:
        signal.alarm(timeout)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(f"{prefix}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [command[0], *command[1:]]
        runpy.run_module(command[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # noqa: BLE001 — as the interpreter: the traceback, status 1
        traceback.print_exc()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    folder = os.path.dirname(spec_path)
    for module in spec["preimport"]:
        __import__(module)
    for module in dict.fromkeys(command[0] for command in spec["commands"]):
        _preimport(module)
    for i, command in enumerate(spec["commands"]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(command, os.path.join(folder, str(i)), spec["timeout"])
        returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])  # -N: killed by signal N
        with open(os.path.join(folder, f"{i}.json"), "w", encoding="utf-8") as f:
            json.dump({"returncode": returncode}, f)


if __name__ == "__main__":
    _main(sys.argv[1])
