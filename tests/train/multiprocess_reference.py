"""Run by test_multiprocess.py: `experiments.train` in ONE process with 4 CPU devices, fed exactly
the global batches of a 2-process x 2-device job.

Each process of a multi-host job reads its own shard of the split (`cnnjax.data.pipeline`), so a
plain 1-process run sees different batches. Here the real pipeline is called once per simulated
process (`process_index=p, process_count=2`, 2 devices each) and the shards are stacked on the
device axis: devices 2p, 2p+1 get process p's examples, as in the real job, where the global device
order is process 0's devices then process 1's. Same flags as experiments.train.
"""

from __future__ import annotations

import functools

import numpy as np
from absl import app

import experiments.train as train_script

SIMULATED_PROCESSES = 2


def _stacked(real_fn, data_config, *, num_devices, process_index=0, process_count=1, **kwargs):
    """`real_fn`'s batches of every simulated process, concatenated along the device axis."""
    assert (process_index, process_count) == (0, 1), "the reference runs as a single process"
    assert num_devices % SIMULATED_PROCESSES == 0, num_devices
    shards = [
        real_fn(
            data_config,
            num_devices=num_devices // SIMULATED_PROCESSES,
            process_index=p,
            process_count=SIMULATED_PROCESSES,
            **kwargs,
        )
        for p in range(SIMULATED_PROCESSES)
    ]
    for batches in zip(*shards, strict=True):
        yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def main(argv: list[str]) -> None:
    from cnnjax.data import pipeline

    pipeline.train_batches = functools.partial(_stacked, pipeline.train_batches)
    pipeline.eval_batches = functools.partial(_stacked, pipeline.eval_batches)
    train_script.main(argv)


if __name__ == "__main__":
    app.run(main)
