"""Data parallelism on 4 fake CPU devices (subprocess): 4 devices == 1 device; pmap == shard_map.

Train steps run in the default suite, whole runs (slow) in a second subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Both parts are compile-bound. From an empty XLA cache on 2 cores, `steps` costs 24 s of CPU (16 s
# with the cache warm) and `runs` 53 s (the 3 detection runs about 30 s of it); at load 13-14 they
# took 90 s and 178-187 s of wall time (the single fixture they replace, 237 s at load 12 under a
# 300 s timeout). The timeout leaves room for a CI machine loaded several times over.
TIMEOUT_S = 900


def _run_part(part: str) -> dict:
    """The JSON diffs multidevice_script.py prints for `part`, run on 4 fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = os.path.join(ROOT, "tests", "train", "multidevice_script.py")
    result = subprocess.run(
        [sys.executable, script, ROOT, part],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def diffs():
    """Single train steps (the default suite)."""
    return _run_part("steps")


@pytest.fixture(scope="module")
def run_diffs():
    """Whole train_and_evaluate runs (slow)."""
    return _run_part("runs")


def test_four_devices_match_one_device_with_batchnorm(diffs):
    # Same global batch: pmean'd gradients and cross-device BatchNorm statistics make the update
    # identical up to float32 summation order.
    assert diffs["pmap4_vs_1"] < 1e-5
    assert diffs["shard4_vs_1"] < 1e-5
    assert diffs["loss_diff"] < 1e-5


def test_matmul_batch_norm_syncs_statistics_and_gradients_across_devices(diffs):
    # cnnjax.layers.batch_norm_impl's hand-written backward pmeans its two channel sums: on 4
    # devices it must train as flax's BatchNorm does on 1 device with the same global batch.
    assert diffs["matmul_bn_pmap4_vs_flax1"] < 1e-5
    assert diffs["matmul_bn_shard4_vs_flax1"] < 1e-5


def test_matmul_batch_norm_syncs_only_within_axis_index_groups(diffs):
    # nn.BatchNorm(axis_index_groups=[[0, 1], [2, 3]]) under pmap: gradients and statistics as
    # flax's (to 1e-5 of the largest value), the statistics shared inside a group and different
    # across the two groups.
    assert diffs["grouped_bn_matmul_vs_flax"] < 1e-5
    assert diffs["grouped_bn_within_group"] < 1e-6
    assert diffs["grouped_bn_across_groups"] > 1e-3


def test_matmul_batch_norm_under_a_vma_checking_shard_map_runs_flax_code(diffs):
    """A user's own jax.shard_map (check_vma=True) around a BatchNorm under batch_norm_impl
    ("auto" is matmul on CPU): its gradient was a JAX type error; now flax's computation."""
    assert diffs["vma_checked_bn_matmul_vs_flax"] == 0.0


def test_masked_batch_norm_pools_uneven_shards_like_one_device(diffs):
    """R-CNN's BatchNorm counts only the sampled warps; with 3, 0, 2 and 1 of them on the four
    devices its statistics and gradients are those of one device holding all 16 rows (flax's
    own masked BatchNorm averaged the devices' means, and the empty one's was NaN)."""
    assert diffs["masked_bn_pmap4_vs_1"] < 1e-5
    assert diffs["masked_bn_shard4_vs_1"] < 1e-5


def test_pmap_and_shard_map_agree(diffs):
    assert diffs["shard1_vs_pmap1"] < 1e-6
    assert diffs["pmap4_vs_shard4"] < 1e-6
    # Same per-device dropout keys (folded from step and device index) in both wrappers.
    assert diffs["dropout_pmap4_vs_shard4"] < 1e-6
    assert diffs["dropout_vs_no_dropout"] > 1e-4  # dropout really is active in training


@pytest.mark.slow
def test_whole_run_on_four_devices_matches_one(run_diffs):
    """train_and_evaluate end to end: padded eval over 4 devices counts every example once."""
    assert run_diffs["loop_num_devices"] == [1, 4]
    assert run_diffs["loop_eval_count"] == [27, 27]
    assert run_diffs["loop_eval_loss_4_vs_1"] < 1e-4
    assert len(set(run_diffs["loop_eval_top1"])) == 1


@pytest.mark.slow
def test_a_shard_map_run_resumes_on_another_device_count(run_diffs):
    """shard_map runs checkpointed at step 6 on 4 devices resume on 1, and on 1 resume on 4: the
    data order continues and BatchNorm is synced, so each ends as an uninterrupted 1-device run
    does, and summary.json records both counts."""
    assert run_diffs["resumed_from"] == [[6, [4, 1]], [6, [1, 4]]]
    assert max(run_diffs["resumed_eval_loss_vs_1"]) < 1e-4


@pytest.mark.slow
def test_the_weight_average_is_the_same_on_four_devices(run_diffs):
    """config.ema on 4 devices: the averaged model evaluates as on 1 device (and is not simply
    the trained weights)."""
    assert run_diffs["ema_eval_loss_4_vs_1"] < 1e-4
    assert run_diffs["ema_vs_raw_loss"] > 1e-4


def test_accumulation_must_divide_the_per_device_batch(diffs):
    assert diffs["accum_error"].startswith(
        "config: grad_accum_steps=8 is invalid; expected a divisor of the per-device batch 4 "
        "(global_batch_size 16 / 4 devices)")


def test_dropout_keys_differ_per_device(diffs):
    """Same examples on all 4 devices: with per-device dropout keys the averaged gradient differs
    from device 0's alone (the 1-device run); without dropout the runs agree."""
    assert diffs["no_dropout_same_data_4_vs_1"] < 1e-6
    assert diffs["dropout_same_data_4_vs_1"] > 1e-4


def test_batch_not_divisible_by_the_device_count_is_refused(diffs):
    """Through train_and_evaluate on 4 devices, before anything is compiled."""
    assert diffs["batch_error"].startswith(
        "config: global_batch_size=18 is invalid; expected a multiple of the device count 4"
    )
    assert diffs["eval_batch_error"].startswith(
        "config: eval_batch_size=10 is invalid; expected a multiple of the device count 4"
    )


@pytest.mark.slow
def test_detection_runs_match_across_device_counts(run_diffs):
    # Detection training and mAP over the padded eval split (every device's detections gathered
    # to the host): 1 device, 4 pmap, 4 shard_map agree up to float32 summation order.
    (one, pmap4, shard4) = run_diffs["detection_eval"]
    assert one[2] == pmap4[2] == shard4[2] == 21  # every eval example counted once
    assert one[0] > 0.5  # trained: a non-trivial mAP to compare
    for other in (pmap4, shard4):
        assert abs(other[0] - one[0]) < 1e-3 and abs(other[1] - one[1]) < 1e-3
    losses = run_diffs["detection_train_loss"]
    assert max(losses) - min(losses) < 1e-3 * max(losses)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_no_devices_or_a_device_twice_is_refused_by_name(mode):
    """`DataParallel(mode, [])` and a device listed twice were accepted and failed in the
    first step ("need at least one array to stack", "safe_zip() argument 1 has length 2")."""
    import jax

    from cnnjax.train.parallel import DataParallel

    device = jax.devices()[0]
    with pytest.raises(ValueError, match=r"DataParallel: devices=\[\] is invalid; expected at "
                                         r"least one"):
        DataParallel(mode, [])
    with pytest.raises(ValueError, match=r"DataParallel: devices=\[.*\] is invalid; expected "
                                         r"distinct devices .*listed 2 times"):
        DataParallel(mode, [device, device])
    with pytest.raises(ValueError, match=r"DataParallel: devices=\['cpu'\] is invalid; "
                                         r"expected jax.Device"):
        DataParallel(mode, ["cpu"])
    # One device for a list: list(device) was a TypeError ("'Device' object is not iterable").
    with pytest.raises(ValueError, match=r"DataParallel: devices=.* is invalid; expected a "
                                         r"sequence of jax.Device objects \(one device: "
                                         r"\[device\]\)"):
        DataParallel(mode, device)
    assert DataParallel(mode, [device]).num_devices == 1


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_a_typed_prng_key_is_replicated_and_unreplicated_as_a_key(mode):
    """A state built from `jax.random.key(0)` (not `PRNGKey`) failed in `replicate`: NumPy
    cannot hold a typed key. Raw keys and arrays still come back as NumPy."""
    import jax
    import numpy as np

    from cnnjax.train.parallel import DataParallel

    parallel = DataParallel(mode, jax.devices()[:1])
    tree = {"key": jax.random.key(3), "raw": jax.random.PRNGKey(3), "w": np.arange(4.0)}
    back = parallel.unreplicate(parallel.replicate(tree))
    assert jax.dtypes.issubdtype(back["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(back["key"]),
                                  jax.random.key_data(tree["key"]))
    assert isinstance(back["raw"], np.ndarray) and isinstance(back["w"], np.ndarray)
    np.testing.assert_array_equal(back["raw"], tree["raw"])
    np.testing.assert_array_equal(back["w"], tree["w"])
    if mode == "pmap":
        assert parallel.replicate(tree)["key"].shape == (1,)
