"""Run by test_parallel.py in a subprocess with 4 fake CPU devices; prints one JSON line of diffs.

`multidevice_script.py ROOT steps` trains the tiny BatchNorm model for a few steps on the same
global batches with: 1 device (pmap), 4 devices (pmap), 4 devices (shard_map), 1 device
(shard_map); with dropout, 4-device pmap vs 4-device shard_map; and with the matmul BatchNorm on 4
devices; and R-CNN's MaskedBatchNorm with unevenly masked shards, 4 devices vs 1. Reports the
max absolute parameter/batch-stat differences.

`multidevice_script.py ROOT runs` runs whole `train_and_evaluate` runs on 1 and 4 devices:
classification (padded eval, EMA, resuming on another device count) and the detection task (YOLO
on in-memory boxes). Most of its time is compiling their programs (test_parallel.py has figures).
"""

import json
import os
import sys
import tempfile
import types

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, sys.argv[1])
from cnnjax.train.parallel import DataParallel  # noqa: E402
from cnnjax.train.state import create_train_state  # noqa: E402
from cnnjax.train.step import make_steps  # noqa: E402
from tests.train import helpers  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 3


def train(mode: str, num_devices: int, dropout: float = 0.0, batch_norm_impl: str = "flax"):
    model = helpers.TinyNet(axis_name="data", dropout_rate=dropout)
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data",
                               batch_norm_impl=batch_norm_impl)
    parallel = DataParallel(mode, jax.devices()[:num_devices])
    step = parallel.wrap_train(train_step)
    state = parallel.replicate(jax.device_get(state))
    batches = helpers.train_batches(
        None, global_batch_size=GLOBAL_BATCH, num_devices=num_devices, seed=0
    )
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, parallel.shard_batch(next(batches)))
        losses.append(float(parallel.metrics_to_host(metrics)["loss"]))
    host = parallel.unreplicate(state)
    return {"params": host.params, "batch_stats": host.batch_stats}, losses


def train_same_data_per_device(num_devices: int, dropout: float):
    """Every device gets the same 4 examples: only per-device dropout keys can make the devices'
    gradients differ (BatchNorm statistics are identical on every device)."""
    model = helpers.TinyNet(axis_name="data", dropout_rate=dropout)
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data")
    parallel = DataParallel("pmap", jax.devices()[:num_devices])
    batch = next(helpers.train_batches(None, global_batch_size=4, num_devices=1, seed=0))
    batch = {k: np.repeat(v, num_devices, axis=0) for k, v in batch.items()}
    state, _ = parallel.wrap_train(train_step)(
        parallel.replicate(jax.device_get(state)), parallel.shard_batch(batch)
    )
    return parallel.unreplicate(state).params


def loop_error(tmp: str, **overrides) -> str:
    """The ValueError message of a `train_and_evaluate` run expected to be refused."""
    try:
        run_loop(tmp, **overrides)
    except ValueError as err:
        return str(err)
    return "<no error>"


def max_diff(a, b):
    return max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _install_fake_pipeline() -> types.ModuleType:
    """The synthetic data module, installed for the rest of this process (no test undoes it)."""
    import cnnjax.data

    module = helpers.fake_pipeline_module()
    sys.modules["cnnjax.data.pipeline"] = module
    cnnjax.data.pipeline = module
    helpers.accept_stand_in_data_names(pytest.MonkeyPatch())
    return module


def run_loop(tmp: str, **overrides) -> dict:
    """Whole `train_and_evaluate` runs (padded eval batches, checkpoints) on the synthetic data."""
    from cnnjax.train.loop import train_and_evaluate

    _install_fake_pipeline()
    name = "_".join(f"{k}{v}" for k, v in overrides.items())
    # one eval and one checkpoint, at the end: only the final eval is compared (the step-6 eval
    # and the step-4/8 checkpoints of tiny_config cost ~0.6 s a run here)
    config = helpers.tiny_config(**{"eval_every_steps": 12, "checkpoint_every_steps": 12,
                                    **overrides})
    return train_and_evaluate(config, os.path.join(tmp, name))


def run_resumed_loop(tmp: str, first_devices: int, then_devices: int) -> dict:
    """A `shard_map` run that dies after its step-6 checkpoint on `first_devices` devices, then
    is run again to its end on `then_devices` (a requeued job landing on another machine)."""
    from cnnjax.train.loop import train_and_evaluate

    module = _install_fake_pipeline()
    workdir = os.path.join(tmp, f"resume_{first_devices}to{then_devices}")

    def config(num_devices: int):
        return helpers.tiny_config(eval_every_steps=12, checkpoint_every_steps=6,
                                   num_devices=num_devices, parallel="shard_map")

    original = module.train_batches
    module.train_batches = helpers.crashing_batches(original, 9)
    try:
        train_and_evaluate(config(first_devices), workdir)
    except helpers.SimulatedCrashError:
        pass
    else:
        raise AssertionError("the first run was meant to die at step 9")
    finally:
        module.train_batches = original
    return train_and_evaluate(config(then_devices), workdir)


def run_detection_loop(tmp: str, **overrides) -> dict:
    """A whole detection run (YOLO, in-memory boxes, padded eval split, mAP on the host)."""
    import cnnjax.data
    from cnnjax.train.loop import train_and_evaluate
    from tests.train import test_detection_loop as boxes

    module = types.ModuleType("cnnjax.data.detection")
    module.get_dataset_info = boxes._info
    module.train_batches = boxes._train_batches
    module.eval_batches = boxes._eval_batches
    sys.modules["cnnjax.data.detection"] = module
    cnnjax.data.detection = module
    helpers.accept_stand_in_data_names(pytest.MonkeyPatch())  # its 'boxes'
    name = "det_" + "_".join(f"{k}{v}" for k, v in overrides.items())
    # one checkpoint and a few log lines: _config's checkpoint every 4th step cost about a
    # quarter of these three runs (55 -> 40 s measured)
    config = boxes._config(num_train_steps=150, eval_every_steps=150, global_batch_size=16,
                           checkpoint_every_steps=150, log_every_steps=50,
                           **{"model_kwargs.hidden_features": 128, "model_kwargs.grid_size": 2},
                           **overrides)
    return train_and_evaluate(config, os.path.join(tmp, name))


def grouped_batch_norm(impl: str):
    """flax BatchNorm synced within device groups {0, 1} and {2, 3} under pmap: each device's
    (param grads, input grads, new statistics) of a per-device loss, under `impl`."""
    import flax.linen as nn
    import jax.numpy as jnp

    from cnnjax.layers.batch_norm_impl import batch_norm_impl

    x = np.random.default_rng(5).standard_normal((4, 6, 3, 3, 2)).astype(np.float32) * 2 + 1
    model = nn.BatchNorm(use_running_average=False, axis_name="g",
                         axis_index_groups=[[0, 1], [2, 3]])
    variables = model.init(jax.random.PRNGKey(0), x[0])

    def loss(params, xi, stats):
        with batch_norm_impl(impl):
            y, updates = model.apply({"params": params, "batch_stats": stats}, xi,
                                     mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * xi), updates

    replicate = lambda tree: jax.tree.map(lambda v: np.stack([v] * 4), tree)
    grads = jax.pmap(jax.grad(loss, argnums=(0, 1), has_aux=True), axis_name="g")(
        replicate(variables["params"]), x, replicate(variables["batch_stats"]))
    return jax.device_get(grads)


def vma_checked_batch_norm(impl: str):
    """flax BatchNorm synced over "d" inside a jax.shard_map with its default check_vma=True (the
    engine's has it off): the parameter gradient of a global loss under `impl` (the matmul
    path's hand-written backward returned per-device sums there, which the typing refused)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec

    from cnnjax.layers.batch_norm_impl import batch_norm_impl

    x = (np.random.default_rng(7).standard_normal((16, 3, 3, 2)) * 2 + 1).astype(np.float32)
    model = nn.BatchNorm(use_running_average=False, axis_name="d")
    variables = model.init(jax.random.PRNGKey(0), x)

    def grads(params, xi):
        def loss(p):
            with batch_norm_impl(impl):
                y, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, xi,
                                   mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))
        return jax.grad(loss)(params)

    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    return jax.device_get(jax.jit(jax.shard_map(
        grads, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("d")),
        out_specs=PartitionSpec()))(variables["params"], x))


def masked_batch_norm(mode: str, num_devices: int):
    """MaskedBatchNorm over a global batch of 16 rows with 6 masked in, unevenly (3, 0, 2, 1
    per 4-row shard): `(param grads, input grads, new statistics)` of a loss on the global
    batch, its rows split over `num_devices` (`mode`: pmap or shard_map, axis "data")."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec

    from cnnjax.layers import MaskedBatchNorm

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((16, 3, 3, 2)) * 2 + 1).astype(np.float32)
    mask = np.zeros(16, bool)
    mask[[0, 1, 3, 8, 9, 14]] = True
    weights = rng.standard_normal(x.shape).astype(np.float32)
    model = MaskedBatchNorm(use_running_average=False, axis_name="data")
    variables = model.init(jax.random.PRNGKey(0), x)

    def grads(params, xi, mi, wi):
        def loss(params, xi):
            y, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     xi, mask=mi[:, None, None, None], mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * wi), updates
        (g, dx), updates = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, xi)
        return jax.lax.psum(g, "data"), dx, updates

    split = lambda a: a.reshape(num_devices, -1, *a.shape[1:])  # noqa: E731
    # A copy of the parameters per device, as the engine replicates them: each device's
    # gradient is its own, summed by the psum above (under shard_map a replicated input's
    # gradient would already be summed over the axis).
    copies = jax.tree.map(lambda v: np.stack([v] * num_devices), variables["params"])
    if mode == "pmap":
        g, dx, updates = jax.pmap(grads, axis_name="data")(
            copies, split(x), split(mask), split(weights))
        g, updates = jax.tree.map(lambda v: v[0], (g, updates))  # the same on every device
        dx = dx.reshape(x.shape)
    else:
        mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
        rows = PartitionSpec("data")
        g, dx, updates = jax.jit(jax.shard_map(
            lambda p, *a: grads(jax.tree.map(lambda v: v[0], p), *a), mesh=mesh,
            in_specs=(rows, rows, rows, rows),
            out_specs=(PartitionSpec(), rows, PartitionSpec())))(copies, x, mask, weights)
    return jax.device_get((g, dx, updates))


def steps_part() -> dict:
    """Single train steps: 4 devices == 1 device, pmap == shard_map, synced BatchNorm, dropout
    keys, and the config refusals (nothing compiles for those)."""
    with tempfile.TemporaryDirectory() as tmp:
        accum_error = loop_error(tmp, grad_accum_steps=8)
        batch_error = loop_error(tmp, global_batch_size=18)
        eval_batch_error = loop_error(tmp, eval_batch_size=10)
    one, one_losses = train("pmap", 1)
    four_pmap, four_losses = train("pmap", 4)
    four_shard, _ = train("shard_map", 4)
    one_shard, _ = train("shard_map", 1)
    # BatchNorm as matrix-vector products, backward synced by hand (cnnjax.layers.batch_norm_impl)
    grouped_matmul, grouped_flax = grouped_batch_norm("matmul"), grouped_batch_norm("flax")
    grouped_means = np.asarray(grouped_matmul[1]["batch_stats"]["mean"])
    matmul_four_pmap, _ = train("pmap", 4, batch_norm_impl="matmul")
    matmul_four_shard, _ = train("shard_map", 4, batch_norm_impl="matmul")
    drop_pmap, _ = train("pmap", 4, dropout=0.5)
    drop_shard, _ = train("shard_map", 4, dropout=0.5)
    vma_matmul, vma_flax = vma_checked_batch_norm("matmul"), vma_checked_batch_norm("flax")
    masked_one = masked_batch_norm("pmap", 1)
    masked_pmap, masked_shard = masked_batch_norm("pmap", 4), masked_batch_norm("shard_map", 4)
    same_data_one = train_same_data_per_device(1, dropout=0.5)
    same_data_four = train_same_data_per_device(4, dropout=0.5)
    same_data_four_no_dropout = train_same_data_per_device(4, dropout=0.0)
    same_data_one_no_dropout = train_same_data_per_device(1, dropout=0.0)
    return {
        "pmap4_vs_1": max_diff(one, four_pmap),
        "shard4_vs_1": max_diff(one, four_shard),
        "shard1_vs_pmap1": max_diff(one, one_shard),
        "matmul_bn_pmap4_vs_flax1": max_diff(one, matmul_four_pmap),
        "matmul_bn_shard4_vs_flax1": max_diff(one, matmul_four_shard),
        "grouped_bn_matmul_vs_flax": max_diff(grouped_matmul, grouped_flax) / max(
            float(np.abs(leaf).max()) for leaf in jax.tree.leaves(grouped_flax)),
        "grouped_bn_within_group": float(np.abs(grouped_means[0] - grouped_means[1]).max()),
        "grouped_bn_across_groups": float(np.abs(grouped_means[0] - grouped_means[2]).max()),
        "vma_checked_bn_matmul_vs_flax": max_diff(vma_matmul, vma_flax),
        "masked_bn_pmap4_vs_1": max_diff(masked_one, masked_pmap),
        "masked_bn_shard4_vs_1": max_diff(masked_one, masked_shard),
        "pmap4_vs_shard4": max_diff(four_pmap, four_shard),
        "dropout_pmap4_vs_shard4": max_diff(drop_pmap, drop_shard),
        "dropout_vs_no_dropout": max_diff(drop_pmap, four_pmap),
        "dropout_same_data_4_vs_1": max_diff(same_data_one, same_data_four),
        "no_dropout_same_data_4_vs_1": max_diff(
            same_data_one_no_dropout, same_data_four_no_dropout
        ),
        "batch_error": batch_error,
        "accum_error": accum_error,
        "eval_batch_error": eval_batch_error,
        "loss_diff": max(abs(a - b) for a, b in zip(one_losses, four_losses, strict=True)),
    }


def runs_part() -> dict:
    """Whole `train_and_evaluate` runs: classification (padded eval, EMA, resuming on another
    device count) and detection, on 1 and 4 devices."""
    with tempfile.TemporaryDirectory() as tmp:
        detection = [run_detection_loop(tmp, num_devices=1),
                     run_detection_loop(tmp, num_devices=4),
                     run_detection_loop(tmp, num_devices=4, parallel="shard_map")]
        loop_one = run_loop(tmp, num_devices=1)
        loop_four = run_loop(tmp, num_devices=4, parallel="shard_map")
        loop_four_pmap = run_loop(tmp, num_devices=4)
        resumed = [run_resumed_loop(tmp, 4, 1), run_resumed_loop(tmp, 1, 4)]
        ema_one = run_loop(tmp, num_devices=1, **{"ema.decay": 0.9})
        ema_four = run_loop(tmp, num_devices=4, **{"ema.decay": 0.9})
    return {
        "ema_eval_loss_4_vs_1": abs(ema_four["final_eval"]["ema_loss"]
                                    - ema_one["final_eval"]["ema_loss"]),
        "ema_vs_raw_loss": abs(ema_one["final_eval"]["ema_loss"]
                               - ema_one["final_eval"]["loss"]),
        "loop_eval_loss_4_vs_1": abs(
            loop_four["final_eval"]["loss"] - loop_one["final_eval"]["loss"]
        ),
        "loop_eval_top1": [
            loop_one["final_eval"]["top1"],
            loop_four["final_eval"]["top1"],
            loop_four_pmap["final_eval"]["top1"],
        ],
        "loop_eval_count": [
            loop_one["final_eval"]["num_examples"],
            loop_four["final_eval"]["num_examples"],
        ],
        "loop_num_devices": [loop_one["num_devices"], loop_four["num_devices"]],
        "resumed_eval_loss_vs_1": [abs(r["final_eval"]["loss"] - loop_one["final_eval"]["loss"])
                                   for r in resumed],
        "resumed_from": [[r["resumed_from_step"], r["device_counts"]] for r in resumed],
        "detection_eval": [
            [r["final_eval"][k] for k in ("map50", "map", "num_examples")]
            for r in detection
        ],
        "detection_train_loss": [r["final_train"]["loss"] for r in detection],
    }


PARTS = {"steps": steps_part, "runs": runs_part}


def main(part: str):
    assert jax.device_count() == 4, jax.devices()
    print(json.dumps(PARTS[part]()))


if __name__ == "__main__":
    from cnnjax.train.logging import MetricLogger

    # The learning-curve PNG (host-side matplotlib, ~0.5 s each eval; test_logging.py and
    # test_loop.py check it) does not depend on the device count, and nothing here reads it.
    MetricLogger.plot = lambda self, background=False: None
    with helpers.tiny_model_registered():
        main(sys.argv[2])
