"""Run by test_accumulation.py in a subprocess with 4 fake CPU devices; prints one JSON line.

A model without BatchNorm trained with the engine's optimizer (SGD + momentum, masked L2 weight
decay, gradient clipping, warmup then cosine) on the same global batches: 1 device without
accumulation, and 4 devices with 2 and 4 micro-batches each under pmap and shard_map. Reports
the max parameter difference to the 1-device run and each step's logged learning rate.
"""

import json
import sys

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, sys.argv[1])
from cnnjax.train.config import default_config  # noqa: E402
from cnnjax.train.optim import build_optimizer, build_schedule  # noqa: E402
from cnnjax.train.parallel import DataParallel  # noqa: E402
from cnnjax.train.state import create_train_state  # noqa: E402
from cnnjax.train.step import make_steps  # noqa: E402

STEPS, BATCH, SHAPE = 4, 32, (8, 8, 1)


class Net(nn.Module):
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def optimization():
    config = default_config()
    config.num_train_steps = 10
    config.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3,
                            grad_clip_norm=0.5)
    config.schedule.update(name="cosine", warmup_steps=2)
    schedule = build_schedule(config)
    return build_optimizer(config, schedule), schedule


def train(num_devices: int, accum_steps: int, mode: str = "pmap"):
    tx, schedule = optimization()
    state = create_train_state(Net(), tx, jax.random.PRNGKey(0), (1, *SHAPE))
    train_step, _ = make_steps(Net(), tx, schedule, "data", accum_steps=accum_steps)
    parallel = DataParallel(mode, devices=jax.devices()[:num_devices])
    step, state = parallel.wrap_train(train_step), parallel.replicate(jax.device_get(state))
    rng, rates = np.random.default_rng(0), []
    for _ in range(STEPS):
        images = rng.normal(size=(BATCH, *SHAPE)).astype(np.float32)
        labels = rng.integers(0, 4, BATCH).astype(np.int32)
        batch = {"image": images.reshape(num_devices, -1, *SHAPE),
                 "label": labels.reshape(num_devices, -1)}
        state, metrics = step(state, parallel.shard_batch(batch))
        rates.append(float(parallel.metrics_to_host(metrics)["learning_rate"]))
    return parallel.unreplicate(state).params, rates


def main():
    assert jax.device_count() == 4, jax.devices()
    reference, reference_rates = train(1, 1)
    runs = {f"{mode}_4x{k}": train(4, k, mode) for mode in ("pmap", "shard_map") for k in (2, 4)}
    print(json.dumps({
        "param_diff": {name: max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(reference), strict=True))
            for name, (params, _) in runs.items()},
        "rates": {"1x1": reference_rates, **{name: r for name, (_, r) in runs.items()}},
    }))


if __name__ == "__main__":
    main()
