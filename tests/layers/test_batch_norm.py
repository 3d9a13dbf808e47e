"""MaskedBatchNorm: masked statistics of the whole synced batch (float64 NumPy reference), the
same gradients sharded over a named axis as on one device, and nn.BatchNorm unchanged without
a mask. BatchNorm: flax's results, and training on one value per channel refused (the input
PyTorch's BatchNorm refuses too). Devices are simulated with `jax.vmap(axis_name=...)`, whose
`psum` is the collective's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models
from cnnjax.layers import BatchNorm, MaskedBatchNorm
from cnnjax.layers.batch_norm_impl import batch_norm_impl
from tests.layers.calls import calls_and_intermediates

SHARDS, ROWS, FEATURES = 4, 8, 5
COUNTS = (3, 0, 7, 1)  # masked-in rows per shard: unequal, one shard with none
RTOL = 1e-5  # float32 sums of 32 values against float64


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, (SHARDS, ROWS, 3, 3, FEATURES)).astype(np.float32)
    mask = np.zeros((SHARDS, ROWS), bool)
    for shard, count in enumerate(COUNTS):
        mask[shard, rng.choice(ROWS, count, replace=False)] = True
    return x, mask


def _sharded(module, variables, x, mask):
    """The module applied per shard under a named axis; `(y, updated batch_stats)`."""
    def apply(x, mask):
        return module.apply(variables, x, mask=mask[:, None, None, None],
                            mutable=["batch_stats"])
    y, state = jax.vmap(apply, axis_name="devices")(jnp.asarray(x), jnp.asarray(mask))
    return y, jax.tree.map(lambda s: s[0], state["batch_stats"])


def _reference(x, mask):
    """float64 mean and (biased) variance per feature of the masked-in rows of every shard."""
    rows = x.astype(np.float64)[mask]
    return rows.mean(axis=(0, 1, 2)), rows.var(axis=(0, 1, 2))


@pytest.mark.parametrize("fast_variance", [True, False])
def test_masked_statistics_are_the_whole_batchs_masked_rows(fast_variance):
    x, mask = _data()
    module = MaskedBatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5,
                             axis_name="devices", use_fast_variance=fast_variance)
    variables = module.init(jax.random.key(0), x[0])
    y, stats = _sharded(module, variables, x, mask)
    mean, var = _reference(x, mask)
    np.testing.assert_allclose(stats["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(stats["var"], var, rtol=RTOL)
    expected = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # flax's own BatchNorm averages the shards' means with equal weight (and the empty
    # shard's is NaN): the quantity this layer exists to replace.
    flax_module = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="devices")
    _, flax_stats = _sharded(flax_module, variables, x, mask)
    assert not np.allclose(flax_stats["mean"], mean, rtol=1e-2)


def test_sharded_gradients_equal_one_device_holding_the_global_batch():
    x, mask = _data(1)
    module = MaskedBatchNorm(use_running_average=False, axis_name="devices")
    single = MaskedBatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x[0])
    weights = jnp.asarray(np.random.default_rng(2).normal(size=x.shape[1:]), jnp.float32)

    def loss(params, x, mask, bn):
        y, _ = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        mask=mask[:, None, None, None], mutable=["batch_stats"])
        return jnp.sum(y * jnp.tile(weights, (x.shape[0] // ROWS, 1, 1, 1)))

    def per_shard(x, mask):
        grads, dx = jax.grad(loss, argnums=(0, 1))(variables["params"], x, mask, module)
        return jax.lax.psum(grads, "devices"), dx

    grads, dx = jax.vmap(per_shard, axis_name="devices")(jnp.asarray(x), jnp.asarray(mask))
    flat_x, flat_mask = x.reshape(SHARDS * ROWS, *x.shape[2:]), mask.reshape(-1)
    ref_grads, ref_dx = jax.grad(loss, argnums=(0, 1))(variables["params"], flat_x, flat_mask,
                                                       single)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5),
                 grads, ref_grads)
    np.testing.assert_allclose(dx.reshape(flat_x.shape), ref_dx, rtol=1e-4, atol=1e-5)


def test_no_masked_in_position_anywhere_uses_every_position():
    x, _ = _data(3)
    module = MaskedBatchNorm(use_running_average=False, momentum=0.0, axis_name="devices")
    variables = module.init(jax.random.key(0), x[0])
    _, stats = _sharded(module, variables, x, np.zeros((SHARDS, ROWS), bool))
    mean, var = _reference(x, np.ones((SHARDS, ROWS), bool))
    np.testing.assert_allclose(stats["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(stats["var"], var, rtol=RTOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_without_a_mask_it_is_flax_batch_norm(dtype):
    x, mask = _data(4)
    kwargs = dict(use_running_average=False, momentum=0.9, dtype=dtype)
    ours, theirs = MaskedBatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    variables = theirs.init(jax.random.key(0), x[0])
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x[0])) == jax.tree.map(
        jnp.shape, variables)
    np.testing.assert_array_equal(  # eval mode: the running statistics, as flax
        np.asarray(MaskedBatchNorm(use_running_average=True, dtype=dtype).apply(
            variables, x[0], mask=mask[0][:, None, None, None]), np.float32),
        np.asarray(nn.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x[0]),
                   np.float32))
    y, s = ours.apply(variables, x[0], mutable=["batch_stats"])
    y_ref, s_ref = theirs.apply(variables, x[0], mutable=["batch_stats"])
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    jax.tree.map(np.testing.assert_array_equal, s, s_ref)
    # a masked call (every row in) in bf16 returns flax's output dtype too
    y_masked, _ = ours.apply(variables, x[0], mask=np.ones((ROWS, 1, 1, 1), bool),
                             mutable=["batch_stats"])
    assert y_masked.dtype == dtype
    np.testing.assert_allclose(np.asarray(y_masked, np.float32), np.asarray(y, np.float32),
                               rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-2)


ONE_VALUE = "normalizes each channel over a single value"


def test_one_value_per_channel_gives_flax_a_zero_input_gradient():
    """The failure the check exists for: flax's training BatchNorm on one value per channel
    returns its bias whatever the input, so the input gradient is exactly zero."""
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 1, 1, 4)), jnp.float32)
    bn = nn.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)

    def loss(x):
        return jnp.sum(bn.apply(variables, x, mutable=["batch_stats"])[0] * jnp.arange(4.0))

    np.testing.assert_array_equal(jax.grad(loss)(x), np.zeros_like(x))


@pytest.mark.parametrize("impl", ["flax", "matmul"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (1, 4)])
def test_batch_norm_refuses_one_value_per_channel_in_training(impl, shape):
    x = jnp.ones(shape, jnp.float32)
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)  # initialization is not checked
    with batch_norm_impl(impl), pytest.raises(ValueError, match=ONE_VALUE) as err:
        bn.apply(variables, x, mutable=["batch_stats"])
    assert str(err.value).startswith(f"BatchNorm: input.shape={shape} is invalid;")
    # eval mode reads the running statistics: nothing to refuse
    BatchNorm(use_running_average=True).apply(variables, x)


def test_pytorch_refuses_the_same_inputs():
    """The reference behaviour: torch's training BatchNorm raises on one value per channel and
    accepts two, in either place (batch or map)."""
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(4).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.ones(1, 4, 1, 1))
    bn(torch.ones(2, 4, 1, 1))
    bn(torch.ones(1, 4, 1, 2))


@pytest.mark.parametrize("impl", ["flax", "matmul"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 1, 2, 4), (2, 4)])
def test_batch_norm_is_flax_batch_norm_on_more_than_one_value(impl, shape):
    x = jnp.asarray(np.random.default_rng(6).normal(size=shape), jnp.float32)
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    with batch_norm_impl(impl):
        y, s = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
        y_ref, s_ref = nn.BatchNorm(use_running_average=False).apply(variables, x,
                                                                     mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_ref)
    jax.tree.map(np.testing.assert_array_equal, s, s_ref)


@pytest.mark.parametrize("devices, refused", [(1, True), (2, False)])
def test_one_value_per_device_counts_every_device_of_the_axis(devices, refused):
    """Synced statistics reduce over every device of `axis_name`: one value on each of two
    devices is two values per channel; on a one-device axis it is still one."""
    x = jnp.asarray(np.random.default_rng(7).normal(size=(devices, 1, 1, 1, 4)), jnp.float32)
    bn = BatchNorm(use_running_average=False, axis_name="devices")
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])

    def apply(x):
        return bn.apply(variables, x, mutable=["batch_stats"])[0]

    if refused:
        with pytest.raises(ValueError, match=f"{ONE_VALUE} .*every device of 'devices'"):
            jax.vmap(apply, axis_name="devices")(x)
    else:
        y = jax.vmap(apply, axis_name="devices")(x)
        mean, var = x.mean(axis=0), x.var(axis=0)  # the two devices' values per channel
        np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)


def test_masked_batch_norm_refuses_one_value_per_channel_with_a_mask():
    x = jnp.ones((1, 1, 1, 4), jnp.float32)
    bn = MaskedBatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=ONE_VALUE):
        bn.apply(variables, x, mask=np.ones((1, 1, 1, 1), bool), mutable=["batch_stats"])


def test_a_model_names_its_layer_that_sees_one_value_per_channel():
    """resnet20_cifar (CIFAR layout, /4 overall) on one 4x4 image reaches a 1x1 map in stage 3; the
    error names the first BatchNorm there, before anything is compiled (a shape-only trace)."""
    model = models.create_model("resnet20_cifar", num_classes=10)
    image = jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)  # eval: fine
    expected = r"^BatchNorm stage3_block1/\w+: input.shape=\(1, 1, 1, "
    with pytest.raises(ValueError, match=expected):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables, image)


@pytest.mark.parametrize("cls", [BatchNorm, MaskedBatchNorm])
def test_one_call_is_one_intercepted_call_and_one_intermediate(cls):
    """The subclasses run flax's body inside their own call: method interceptors and
    `capture_intermediates` see each layer call once, as for `nn.BatchNorm`."""
    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 2, 2, 3)), jnp.float32)
    bn = cls(use_running_average=False)
    seen, y, state = calls_and_intermediates(bn, bn.init(jax.random.key(0), x), x,
                                             mutable=("batch_stats",))
    assert seen == [(cls.__name__, "__call__")]
    (captured,) = state["intermediates"]["__call__"]
    np.testing.assert_array_equal(captured, y)


@pytest.mark.parametrize("cls", [BatchNorm, MaskedBatchNorm])
@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": jnp.int32}, "dtype='int32' is invalid; expected None or a floating-point dtype"),
    ({"dtype": "float8"}, "dtype='float8' is invalid"),
    ({"dtype": jnp.float8_e4m3fn}, "dtype='float8_e4m3fn' is invalid"),
    ({"param_dtype": jnp.int8}, "param_dtype='int8' is invalid"),
])
def test_dtypes_are_checked_at_construction(cls, kwargs, message):
    """flax failed only at init, in its words ('Dtype must be inexact', a TypeError for an
    unknown name, a TypePromotionError for float8), naming neither the layer nor the field."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {message}"):
        cls(use_running_average=False, **kwargs)


@pytest.mark.parametrize("cls", [BatchNorm, MaskedBatchNorm])
@pytest.mark.parametrize("kwargs, message", [
    # a string flag read as True: eval mode (running averages, never updated), silently
    ({"use_running_average": "False"}, r"use_running_average='False' is invalid; expected True, "
                                       r"False or None"),
    ({"momentum": 1.5}, r"momentum=1.5 is invalid; expected a number in \[0, 1\]"),  # drifted
    ({"momentum": "0.9"}, r"momentum='0.9' is invalid"),
    ({"epsilon": -1.0}, r"epsilon=-1.0 is invalid; expected a positive number"),  # NaN outputs
    ({"epsilon": "1e-5"}, r"epsilon='1e-5' is invalid"),  # a bare TypeError at the call
    ({"axis": 2.0}, r"axis=2.0 is invalid; expected an int or a sequence of ints"),
    ({"use_bias": 0}, r"use_bias=0 is invalid; expected True or False"),
])
def test_fields_flax_takes_as_they_come_are_checked_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {message}"):
        cls(**{"use_running_average": False, **kwargs})


@pytest.mark.parametrize("cls", [BatchNorm, MaskedBatchNorm])
def test_bad_inputs_name_the_layer(cls):
    """flax failed as a bare IndexError (an axis beyond the input's rank), a TypeError or
    ScopeParamShapeError (other channels than the statistics were made for), or a broadcasting
    error (a mask of another shape), none naming the layer."""
    x = jnp.ones((8, 4, 4, 3))
    layer = cls(use_running_average=False)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: input.shape=\(8, 4, 4, 2\) is "
                                         r"invalid; its statistics were created for \(3,\)"):
        layer.apply(variables, x[..., :2], mutable=["batch_stats"])
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: use_running_average='no' is "
                                         r"invalid"):
        cls().apply(variables, x, use_running_average="no")
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: input.shape=\(8, 4, 4, 3\) is "
                                         r"invalid; expected an array with axis 4"):
        cls(use_running_average=True, axis=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: mask.shape=\(8, 4\) is invalid; "
                                         r"expected a shape that broadcasts"):
        layer.apply(variables, x, mask=jnp.ones((8, 4), bool), mutable=["batch_stats"])
