"""Multi-host training for real: 2 `experiments.train` processes on localhost form one JAX job.

Each process gets 2 CPU devices and the environment `srun` gives a task of a 2-task SLURM step
(SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), so this is the
launch path of launch/sbatch_train.sh without SLURM: JAX derives the coordinator address from the
node list and the job id; cross-process collectives run over gloo. The job is compared with ONE
process on 4 devices fed the same global batches (tests/train/multiprocess_reference.py), and a
job killed mid-run (both processes, SIGKILL) and started again must finish with the uninterrupted
job's params.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnjax.train import distributed
from tests.commands import run_commands
from tests.experiments.test_train import CONFIG, ROOT, _final_params, _leaves

NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
STEPS, CKPT_EVERY, EVAL_EVERY, LOG_EVERY = 24, 8, 12, 4
# The default experiment (LeNet-5 on digits), shortened: an eval and checkpoints mid-run.
FLAGS = [
    f"--config={CONFIG}",
    f"--config.num_train_steps={STEPS}",
    "--config.global_batch_size=32",
    f"--config.checkpoint_every_steps={CKPT_EVERY}",
    f"--config.eval_every_steps={EVAL_EVERY}",
    f"--config.log_every_steps={LOG_EVERY}",
    "--config.schedule.warmup_steps=4",
    "--config.progress_bar=False",
]
JOB_TIMEOUT_S = 300
# SlurmCluster's coordinator port: SLURM_JOB_ID % 4096 + 61440.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 65535 - 2**12 + 1, 2**12


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_experimental_ynn_fusion_type="
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _port_is_free(port: int) -> bool:
    """JAX's coordinator binds `[::]:port`; fall back to IPv4 where IPv6 is off."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
            return True
        except OSError as err:
            if family == socket.AF_INET6 and err.errno == errno.EAFNOSUPPORT:
                continue
            return False
    return False


def free_slurm_job_id(seed: int | None = None) -> str:
    """A SLURM job id whose derived coordinator port is free on this machine now."""
    rng = np.random.default_rng(seed)
    for offset in rng.permutation(_SLURM_PORT_SPAN):
        if _port_is_free(_SLURM_PORT_BASE + int(offset)):
            return str(1_000_000 * _SLURM_PORT_SPAN + int(offset))
    raise RuntimeError("no free port in the SLURM coordinator range 61440-65535")


def _slurm_env(job_id: str, rank: int, ntasks: int = NUM_PROCESSES) -> dict[str, str]:
    return _env(DEVICES_PER_PROCESS) | {
        "SLURM_JOB_ID": job_id,
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }


class Job:
    """The processes of one job; logs go to `<log_dir>/<name>.<rank>.log`."""

    def __init__(self, commands_envs: list[tuple[list[str], dict]], log_dir: Path, name: str):
        self.logs = [log_dir / f"{name}.{rank}.log" for rank in range(len(commands_envs))]
        self.procs: list[subprocess.Popen] = []
        for (command, env), log in zip(commands_envs, self.logs, strict=True):
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            self.procs.append(proc)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs)

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> list[int]:
        """Exit statuses; kills every process and fails if the job runs past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"job still running after {timeout_s} s; killed.\n{self.tails()}")
            time.sleep(0.05)
        return [p.returncode for p in self.procs]


def _train_command(workdir: Path, flags: list[str] = FLAGS) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags]


def launch_reference(workdir: Path, log_dir: Path, name: str, flags: list[str] = FLAGS) -> Job:
    """The one-process run on NUM_PROCESSES * DEVICES_PER_PROCESS devices fed the same batches."""
    return Job(
        [(
            [sys.executable, "-m", "tests.train.multiprocess_reference", f"--workdir={workdir}",
             *flags],
            _env(NUM_PROCESSES * DEVICES_PER_PROCESS),
        )],
        log_dir,
        name,
    )


def launch_two_processes(
    workdir: Path,
    job_id: str,
    log_dir: Path,
    name: str,
    *extra,
    env: dict | None = None,
    flags: list[str] = FLAGS,
) -> Job:
    return Job(
        [(_train_command(workdir, flags) + list(extra), _slurm_env(job_id, r) | (env or {}))
         for r in range(NUM_PROCESSES)],
        log_dir,
        name,
    )


def _state(workdir: Path) -> tuple[int, dict]:
    step, params, opt_state = _final_params(str(workdir))
    return step, dict(_leaves({"params": params, "opt_state": opt_state}))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference; 2-process jobs: pmap, shard_map, and pmap killed and rerun."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    out = {"tmp": tmp, "wall": {}}
    jobs: list[Job] = []
    try:
        start = time.monotonic()
        reference = launch_reference(tmp / "reference", tmp, "reference")
        jobs.append(reference)
        assert reference.wait() == [0], reference.tails()
        out["wall"]["reference"] = time.monotonic() - start

        start = time.monotonic()
        # An empty tfds data dir: both processes generate `digits` at once on first use (one
        # uses the other's copy); its content is deterministic, so the params still match.
        job = launch_two_processes(
            tmp / "job", free_slurm_job_id(), tmp, "job", env={"TFDS_DATA_DIR": str(tmp / "tfds")}
        )
        jobs.append(job)
        out["job_status"] = job.wait()
        out["job_logs"] = [log.read_text() for log in job.logs]
        out["wall"]["job"] = time.monotonic() - start

        # The same job with shard_map over the global 4-device mesh instead of pmap.
        start = time.monotonic()
        shard = launch_two_processes(
            tmp / "shard_map", free_slurm_job_id(), tmp, "shard_map", "--config.parallel=shard_map"
        )
        jobs.append(shard)
        out["shard_map_status"] = shard.wait()
        out["shard_map_logs"] = [log.read_text() for log in shard.logs]
        out["wall"]["shard_map_job"] = time.monotonic() - start

        # Killed mid-run: SIGKILL both processes once a mid-run checkpoint is on disk, then rerun
        # the same command with the same job id (as a requeued SLURM job would).
        start = time.monotonic()
        job_id = free_slurm_job_id()
        killed = launch_two_processes(tmp / "killed", job_id, tmp, "killed")
        jobs.append(killed)
        ckpt = tmp / "killed" / "checkpoints"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in killed.procs):
            if ckpt.is_dir() and any(n.isdigit() for n in os.listdir(ckpt)):
                break
            time.sleep(0.02)
        killed.kill()
        out["killed_status"] = [p.returncode for p in killed.procs]
        out["steps_at_kill"] = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
        rerun = launch_two_processes(tmp / "killed", job_id, tmp, "rerun")
        jobs.append(rerun)
        out["rerun_status"] = rerun.wait()
        out["rerun_logs"] = [log.read_text() for log in rerun.logs]
        out["wall"]["killed_and_rerun"] = time.monotonic() - start
        yield out
    finally:
        for job in jobs:
            job.kill()


@pytest.mark.slow
def test_two_processes_match_one_process_on_four_devices(runs):
    assert runs["job_status"] == [0, 0], runs["job_logs"]
    ref_step, reference = _state(runs["tmp"] / "reference")
    step, params = _state(runs["tmp"] / "job")
    assert ref_step == step == STEPS
    diff = _max_abs_diff(reference, params)
    print(f"max |params/opt_state 2 processes - 1 process| = {diff:.3g}; wall {runs['wall']}")
    # The same per-device batches and the same program; only the all-reduce differs (gloo across
    # processes vs. XLA's in-process CPU reduction), i.e. float32 summation order: after 24 SGD
    # steps that stays within the 1e-5 the 1-vs-4-device test allows.
    assert diff < 1e-5
    ref_summary = json.loads((runs["tmp"] / "reference" / "summary.json").read_text())
    summary = json.loads((runs["tmp"] / "job" / "summary.json").read_text())
    assert summary["num_devices"] == ref_summary["num_devices"] == 4
    assert summary["final_eval"]["num_examples"] == ref_summary["final_eval"]["num_examples"] == 359
    assert abs(summary["final_eval"]["loss"] - ref_summary["final_eval"]["loss"]) < 1e-4


@pytest.mark.slow
def test_two_processes_with_shard_map_match_one_process(runs):
    """shard_map over a mesh spanning both processes: same update as pmap, up to reduce order."""
    assert runs["shard_map_status"] == [0, 0], runs["shard_map_logs"]
    _, reference = _state(runs["tmp"] / "reference")
    step, params = _state(runs["tmp"] / "shard_map")
    _, pmap_params = _state(runs["tmp"] / "job")
    assert step == STEPS
    print(
        f"shard_map job: max diff vs 1 process {_max_abs_diff(reference, params):.3g}, "
        f"vs pmap job {_max_abs_diff(pmap_params, params):.3g}"
    )
    assert _max_abs_diff(reference, params) < 1e-5
    assert _max_abs_diff(pmap_params, params) < 1e-5
    summary = json.loads((runs["tmp"] / "shard_map" / "summary.json").read_text())
    assert summary["parallel"] == "shard_map" and summary["num_devices"] == 4


@pytest.mark.slow
def test_two_processes_write_one_complete_set_of_outputs(runs):
    assert runs["job_status"] == [0, 0], runs["job_logs"]
    workdir = runs["tmp"] / "job"
    assert sorted(os.listdir(workdir)) == sorted(
        ["checkpoints", "config.json", "learning_curves.png", "metrics.jsonl", "run.lock",
         "summary.json", "tensorboard"]
    )
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["resumed_from_step"] == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # Exactly one record per logged step and eval: a second writer would duplicate lines.
    assert [(r["step"], r["split"]) for r in records] == sorted(
        [(s, "train") for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
        + [(s, "eval") for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)],
        key=lambda r: (r[0], r[1] == "eval"),
    )
    assert all(r["num_examples"] == 359 for r in records if r["split"] == "eval")
    assert len(os.listdir(workdir / "tensorboard")) == 1
    ckpt = workdir / "checkpoints"
    # Saves at every checkpoint step and every eval; keep_checkpoints=3 plus the best by top1
    # (evals are at 12 and 24, both among the last 3).
    saved = {*range(CKPT_EVERY, STEPS + 1, CKPT_EVERY), *range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)}
    kept = sorted(saved)[-3:]
    assert sorted(int(n) for n in os.listdir(ckpt)) == kept
    for step in os.listdir(ckpt):
        assert (ckpt / step / "_CHECKPOINT_METADATA").is_file()
        assert (ckpt / step / "default" / "commit_success.txt").is_file()
    # Process 0 prints the summary; process 1 trains silently.
    assert "Finished lenet5 on digits" in runs["job_logs"][0]
    assert "Finished lenet5 on digits" not in runs["job_logs"][1]
    assert "(process 1 of 2)" in runs["job_logs"][1]


@pytest.mark.slow
def test_killed_two_process_job_resumes_exactly(runs):
    assert runs["killed_status"] == [-signal.SIGKILL] * 2, "the job finished before the kill"
    assert runs["steps_at_kill"] and max(runs["steps_at_kill"]) < STEPS
    assert runs["rerun_status"] == [0, 0], runs["rerun_logs"]
    summary = json.loads((runs["tmp"] / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumed_from_step"] == max(runs["steps_at_kill"])
    step, resumed = _state(runs["tmp"] / "killed")
    job_step, uninterrupted = _state(runs["tmp"] / "job")
    assert step == job_step == STEPS
    for name in uninterrupted:  # same process layout, same reductions: bitwise on CPU
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


@pytest.mark.slow
def test_workdir_not_shared_between_processes_is_refused(runs, tmp_path):
    """Node-local workdirs: process 0 finds the finished job's checkpoints, process 1 none. Both
    must stop with a clear error instead of training from different states."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(runs["tmp"] / "job", node0)
    job_id = free_slurm_job_id()
    job = Job(
        [(_train_command(node), _slurm_env(job_id, r)) for r, node in enumerate([node0, node1])],
        tmp_path,
        "nodelocal",
    )
    try:
        statuses = job.wait()
    finally:
        job.kill()
    assert statuses == [1, 1], job.tails()
    for log in job.logs:
        text = log.read_text()
        assert "error: workdir: the processes see different newest checkpoints" in text, text
        assert f"(process 0: {STEPS}, process 1: none); the workdir must be on a file" in text


# ResNet-20 (BatchNorm after every conv) on the same digits, for a few steps with 4 examples per
# device: the engine gives the model its data-parallel axis_name, so each BatchNorm normalizes with
# the mean/var of the GLOBAL batch (lax.pmean over both processes' devices) and every device keeps
# the same running statistics. Statistics synced only within a process would differ between the
# processes and from the 1-process run, which syncs all 4 devices (measured with BatchNorm patched
# to axis_index_groups=[[0, 1], [2, 3]]: running var off by 0.049, params by 2.5e-4).
# The learning rate is tiny on purpose: at the recipe's 0.05 this net (no input normalization,
# 4 images per BatchNorm shard) is in its unstable regime, where float32 reduce-order differences
# grow ~1000x per step (1e-3 in params after 3 steps, even between two correct 1-process runs).
BN_STEPS = 4
BN_FLAGS = [
    f"--config={CONFIG}",
    "--config.model=resnet20_cifar",
    f"--config.num_train_steps={BN_STEPS}",
    "--config.global_batch_size=16",
    f"--config.checkpoint_every_steps={BN_STEPS}",
    f"--config.eval_every_steps={BN_STEPS}",
    f"--config.log_every_steps={BN_STEPS}",
    "--config.schedule.warmup_steps=0",
    "--config.optimizer.learning_rate=1e-4",
    "--config.progress_bar=False",
]


def _full_state(workdir: Path) -> tuple[int, dict]:
    """The newest checkpoint's step and its params, batch_stats and opt_state leaves by path."""
    ckpt = workdir / "checkpoints"
    step = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(str(ckpt / str(step) / "default"))
    keep = ("params", "batch_stats", "opt_state")
    return step, dict(_leaves({k: tree[k] for k in keep}))


@pytest.mark.slow
def test_batchnorm_statistics_are_synced_across_processes(tmp_path):
    """A BatchNorm model: 2 processes x 2 devices end with the 1-process 4-device run's params
    AND running mean/var, so BatchNorm statistics were reduced over all devices of all processes."""
    jobs: list[Job] = []
    try:
        start = time.monotonic()
        reference = launch_reference(tmp_path / "reference", tmp_path, "bn_reference",
                                     BN_FLAGS)
        jobs.append(reference)
        assert reference.wait() == [0], reference.tails()
        reference_wall = time.monotonic() - start
        start = time.monotonic()
        job = launch_two_processes(
            tmp_path / "job", free_slurm_job_id(), tmp_path, "bn_job", flags=BN_FLAGS
        )
        jobs.append(job)
        assert job.wait() == [0, 0], job.tails()
        job_wall = time.monotonic() - start
    finally:
        for started in jobs:
            started.kill()
    ref_step, ref_state = _full_state(tmp_path / "reference")
    step, state = _full_state(tmp_path / "job")
    assert ref_step == step == BN_STEPS
    stats = sorted(k for k in state if k.startswith("/batch_stats/"))
    # 19 BatchNorms in ResNet-20 (stem + 2 per block x 9 blocks), a mean and a var each.
    assert len(stats) == 2 * 19 and {k.rsplit("/", 1)[1] for k in stats} == {"mean", "var"}
    stats_diff = _max_abs_diff({k: ref_state[k] for k in stats}, {k: state[k] for k in stats})
    params = sorted(k for k in state if k.startswith("/params/"))
    params_diff = _max_abs_diff({k: ref_state[k] for k in params}, {k: state[k] for k in params})
    opt = [k for k in state if k.startswith("/opt_state/") and np.size(state[k])]
    # Relative to the largest momentum of the network: a convolution's bias before a BatchNorm
    # has a zero gradient, so its momentum is float noise, and relative to itself any size.
    opt_scale = max(float(np.max(np.abs(ref_state[k]))) for k in opt)
    opt_rel_diff = max(float(np.max(np.abs(ref_state[k] - state[k]))) for k in opt) / opt_scale
    print(
        f"BatchNorm job: max diff vs 1 process: batch_stats {stats_diff:.3g}, params "
        f"{params_diff:.3g}, opt_state (relative to its largest value) {opt_rel_diff:.3g}; wall "
        f"reference {reference_wall:.1f} s, job {job_wall:.1f} s"
    )
    # Summation order only, as for LeNet-5 above. Measured on an AVX2 machine: 4.8e-7, 1.5e-8
    # and 3.9e-6 absolute for opt_state; on an AVX-512 one 8.3e-7, 3.0e-8 and 2.7e-4 absolute
    # (3.6e-4 relative to that leaf's own max, with flax's BatchNorm: the momentum of conv
    # kernels sums gradients over 16x32x32 positions whose order differs between 4 local
    # devices and 2 processes x 2). Statistics synced only within each process differ by 0.049,
    # far above these bounds.
    assert stats_diff < 1e-5
    assert params_diff < 1e-5
    # With the CPU default batch_norm_impl="auto" (matmul channel sums) on a Sapphire Rapids
    # machine: 2.1e-3 of the largest momentum (params still 2.7e-7 apart).
    assert opt_rel_diff < 1e-2
    ref_summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["num_devices"] == ref_summary["num_devices"] == 4
    assert summary["final_eval"]["num_examples"] == 359


# ------------------------------------------------------------------------- fast (default suite)
_SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


def test_should_initialize_from_flag_or_an_srun_step_of_several_tasks():
    assert not distributed.should_initialize(None, {})
    assert not distributed.should_initialize(None, {**_SRUN_TASK, "SLURM_NTASKS": "1"})
    assert distributed.should_initialize(None, {**_SRUN_TASK, "SLURM_NTASKS": "2"})
    assert distributed.should_initialize(True, {})
    # --nodistributed: one process even in a step
    assert not distributed.should_initialize(False, {**_SRUN_TASK, "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("missing", distributed.SLURM_STEP_VARIABLES)
def test_an_allocation_of_several_tasks_outside_an_srun_step_stays_one_process(missing):
    """An `salloc -n 2` shell (or a batch script running python without srun) has SLURM_NTASKS=2
    but not the step's variables JAX needs: initialize() failed ("coordinator_address should be
    defined") and even --nodistributed could not run the one process."""
    env = {**_SRUN_TASK, "SLURM_NTASKS": "2"}
    del env[missing]
    assert not distributed.in_slurm_step(env)
    assert not distributed.should_initialize(None, env)
    with pytest.raises(ValueError, match=r"distributed: SLURM_NTASKS='two' is invalid; expected"):
        distributed.should_initialize(False, {"SLURM_NTASKS": "two"})


@pytest.mark.parametrize("value", ["0", "-2", "\u0662", "2_0"])
def test_a_malformed_slurm_task_count_is_a_clear_error(value):
    """SLURM_NTASKS of 0 or below ran the job as one process, silently, and Python's int read
    '\u0662' (an Arabic-Indic 2) and '2_0' (20) as numbers; each is refused naming the variable,
    with or without --distributed."""
    for requested in (None, False, True):
        with pytest.raises(ValueError, match=r"distributed: SLURM_NTASKS=.* is invalid; expected "
                                              r"a positive integer"):
            distributed.should_initialize(requested, {"SLURM_NTASKS": value})


def test_explicit_params_from_jax_env_variables():
    assert distributed.explicit_params({}) == {}
    env = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.explicit_params(env) == {"num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=4 is invalid; expected 0 <= JAX_PROC"):
        distributed.explicit_params({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES=0 is invalid; expected a positive"):
        distributed.explicit_params({"JAX_NUM_PROCESSES": "0"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID='x' is invalid; expected an integer"):
        distributed.explicit_params({"JAX_PROCESS_ID": "x"})
    with pytest.raises(ValueError,
                       match=r"JAX_PROCESS_ID=-1 is invalid; expected an integer >= 0\.$"):
        distributed.explicit_params({"JAX_PROCESS_ID": "-1"})  # JAX_NUM_PROCESSES unset
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='\uff14' is invalid; expected an int"):
        distributed.explicit_params({"JAX_NUM_PROCESSES": "\uff14"})  # a fullwidth 4


def test_initialize_rejects_non_positive_timeout():
    with pytest.raises(ValueError, match=r"distributed: timeout_s=0 is invalid; expected a posit"):
        distributed.initialize(0)


def test_missing_coordinator_is_a_clear_error_not_a_hang(tmp_path):
    """Process 1 of 2 started alone: no coordinator ever listens. It must exit 1 (within the
    120 s wait: no hang)."""
    job_id = free_slurm_job_id()
    job = Job(
        [(_train_command(tmp_path / "w") + ["--distributed_timeout=2"], _slurm_env(job_id, 1))],
        tmp_path,
        "orphan",
    )
    try:
        assert job.wait(timeout_s=120) == [distributed.EXIT_STATUS], job.tails()
    finally:
        job.kill()
    log = job.logs[0].read_text()
    port = _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN
    assert (
        f"error: distributed: process 1 of 2 could not reach the JAX coordinator at "
        f"localhost:{port} within 2 s. Process 0 starts the coordinator"
    ) in log, log[-3000:]
    assert "Terminating process" not in log  # XLA's own abort message never came
    # The reason is also in the work directory (there is no summary.json without a job).
    recorded = (tmp_path / "w" / "error.startup.process1.log").read_text()
    assert recorded.startswith("error: distributed: process 1 of 2 could not reach"), recorded


def test_distributed_without_a_described_job_is_a_clear_error():
    """`initialize` outside any cluster and without JAX_* variables: ValueError saying what to set
    (in a subprocess: the test process's JAX backend is already running)."""
    code = (
        "from cnnjax.train import distributed\n"
        "try:\n    distributed.initialize(30)\n"
        "except ValueError as err:\n    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "distributed: could not set up the multi-process JAX job (coordinator_address should be "
        "defined.). Launch under SLURM (srun) or set JAX_COORDINATOR_ADDRESS=host:port, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process."
    )


@pytest.fixture(scope="module")
def refused_flags(tmp_path_factory):
    """`experiments.train` with `--distributed` (no cluster; also with a file as --workdir) and
    with `--distributed_timeout=0`, one process each, all forked from one interpreter
    (`run_commands`): `{case: (workdir, CompletedProcess)}`."""
    root = tmp_path_factory.mktemp("refused_flags")
    (root / "a_file").write_text("")
    runs = {"--distributed": ("--distributed", root / "distributed"),
            "--distributed_timeout=0": ("--distributed_timeout=0", root / "timeout"),
            "workdir_a_file": ("--distributed", root / "a_file")}
    results = run_commands(
        [[*_train_command(workdir)[2:], flag] for flag, workdir in runs.values()],
        env=_env(1), timeout=120)
    return {case: (workdir, result)
            for (case, (_, workdir)), result in zip(runs.items(), results, strict=True)}


def test_distributed_flag_without_a_job_is_recorded_in_the_workdir(refused_flags):
    """`experiments.train --distributed` with no cluster: exit 1, the reason on stderr and in
    `<workdir>/error.startup.log`, before any config is loaded or anything compiled."""
    workdir, result = refused_flags["--distributed"]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: distributed: could not set up the multi-process JAX job" in result.stderr
    recorded = (workdir / "error.startup.log").read_text()
    assert recorded.startswith("error: distributed: could not set up the multi-process JAX job")
    assert "JAX_COORDINATOR_ADDRESS=host:port" in recorded


def test_a_refused_start_up_whose_workdir_cannot_be_made_is_still_one_line(refused_flags):
    """Recording the refusal (a file where the workdir should be) raised FileExistsError inside
    the handler: a two-exception traceback buried the reason. It stays the error line."""
    workdir, result = refused_flags["workdir_a_file"]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("error: distributed: could not set up the multi-process JAX job")
    assert last[1].startswith(f"(could not record it in {workdir}: [Errno 17] File exists")
    assert workdir.read_text() == ""


def test_a_run_in_an_allocation_of_two_tasks_outside_srun_trains_as_one_process(tmp_path):
    """`python -m experiments.train` in an `salloc -n 2` shell: it failed in initialize()
    ("coordinator_address should be defined"), with or without --nodistributed."""
    env = {**_env(1), "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node1"}
    result = subprocess.run(
        _train_command(tmp_path / "w", [*FLAGS[:1], "--config.num_train_steps=2",
                                        "--config.eval_every_steps=2", *FLAGS[2:3],
                                        "--config.log_every_steps=1",
                                        "--config.schedule.warmup_steps=0", *FLAGS[-1:]]),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("SLURM_NTASKS=2 outside an srun job step: training as one process (launch with srun "
            "for a 2-process JAX job).") in result.stderr
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["status"] == "completed"


def test_a_bad_distributed_timeout_is_refused_naming_the_flag(refused_flags):
    """--distributed_timeout=0 (or -5, nan, inf) was ignored by a one-process run, which trained,
    and under SLURM with several tasks refused as 'timeout_s=0', a name the user never gave. It
    is refused in every run, naming the flag, before anything is loaded or compiled."""
    value = "0"
    workdir, result = refused_flags[f"--distributed_timeout={value}"]
    assert result.returncode == 1, result.stderr[-2000:]
    line = (f"error: distributed: distributed_timeout={float(value)!r} is invalid; expected a "
            "positive finite number.")
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-2000:]
    assert not workdir.exists()  # a flag refusal writes nothing (stderr holds the line)


def test_timeout_message_when_processes_are_missing():
    message = distributed.timeout_message(5, 0, 3, "node1:6000", coordinator_reachable=True)
    assert message == (
        "distributed: process 0 of 3 started the coordinator at node1:6000, but not all 3 "
        "processes joined within 5 s. Check that every process was started (SLURM_NTASKS / "
        "JAX_NUM_PROCESSES) and that each can reach the coordinator."
    )


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_checkpointed_step(tmp_path):
    """Only process 1 gets SIGTERM (as when one node is preempted first): the flags are agreed
    at the next log step, so neither hangs in a collective; both save that step and exit 143,
    and the rerun resumes from it."""
    steps = 400
    flags = [f for f in FLAGS if not f.startswith(("--config.num_train_steps",
                                                   "--config.checkpoint_every_steps"))]
    flags += [f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=1000"]
    workdir, job_id = tmp_path / "job", free_slurm_job_id()
    job = launch_two_processes(workdir, job_id, tmp_path, "term", flags=flags)
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in job.procs):
            if metrics.exists() and '"train"' in metrics.read_text():
                break
            time.sleep(0.02)
        job.procs[1].send_signal(signal.SIGTERM)
        assert job.wait() == [143, 143], job.tails()
    finally:
        job.kill()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    step = summary["checkpoint_step"]
    assert step % LOG_EVERY == 0 and step < steps, "the job finished before it was stopped"
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints")) == [step]
    assert all(f"Training stopped by SIGTERM at step {step}" in log.read_text()
               for log in job.logs)

    rerun = launch_two_processes(workdir, job_id, tmp_path, "term_rerun", flags=flags)
    try:
        assert rerun.wait() == [0, 0], rerun.tails()
    finally:
        rerun.kill()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == step
