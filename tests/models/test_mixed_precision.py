"""bfloat16 models: no gradient sum over a feature map runs in bfloat16.

A sum of bfloat16 terms accumulated in bfloat16 stalls once its ulp exceeds twice a term (at
256 for terms below 1): the conv bias gradients, sums of the output cotangent over every
position, were 78-98% low on XLA:CPU (tests/layers/test_conv.py). The traced gradient of each
model with biased convolutions is searched for a bfloat16 `reduce_sum` of more than 256 terms;
nothing is compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import create_model, model_info
from tests.models.detectors import GT_BOXES, GT_LABELS, GT_VALID

MAX_BFLOAT16_TERMS = 256


def _bfloat16_sums(jaxpr, found):
    """(shape, terms, where) of each reduce_sum over more than MAX_BFLOAT16_TERMS bfloat16
    terms in `jaxpr` and the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        operand = eqn.invars[0].aval if eqn.invars else None
        if (eqn.primitive.name == "reduce_sum" and operand.dtype == jnp.bfloat16
                and np.prod([operand.shape[a] for a in eqn.params["axes"]]) > MAX_BFLOAT16_TERMS):
            found.append((operand.shape, str(eqn.source_info.name_stack)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _bfloat16_sums(inner, found)
    return found


@pytest.mark.parametrize("name, kwargs, size", [
    ("lenet5", {}, 32), ("lenet5", {"subsampling": "trainable", "c3_table": "paper"}, 32),
    ("alexnet", {}, 63), ("vgg11", {}, 32), ("nin_cifar", {}, 32), ("googlenet", {}, 47),
    ("fcn8s_vgg16", {}, 64), ("faster_rcnn_small", {}, 128), ("resnet20_cifar", {}, 32),
    ("preact_resnet110_cifar", {}, 32), ("densenet40_cifar", {}, 32),
    ("yolo_v1_small", {}, 64),
], ids=["lenet5", "lenet5-paper", "alexnet", "vgg11", "nin_cifar", "googlenet", "fcn8s_vgg16",
        "faster_rcnn_small", "resnet20_cifar", "preact_resnet110_cifar", "densenet40_cifar",
        "yolo_v1_small"])
def test_no_bfloat16_sum_over_a_map_in_the_gradient(name, kwargs, size):
    """LeNet-5's paper options (trainable subsampling's coefficient and bias, the C3 table's
    bias) summed over the map in bfloat16 too (their 2 x 14 x 14 and 2 x 10 x 10 sums), and
    Faster R-CNN's RPN convolutions (flax's nn.Conv: 2 x 16 x 16 positions here)."""
    info = model_info(name)
    # 260 images: a fully connected layer's bias gradient sums over the batch rows (its flax
    # nn.Dense summed them in bfloat16: 0.5-1% off at 32-512 rows); nothing is computed.
    batch = 2 if info.task == "detection" else MAX_BFLOAT16_TERMS + 4
    x = jnp.zeros((batch, size, size, info.input_shape[2]))
    model = create_model(name, num_classes=4, dtype=jnp.bfloat16, **kwargs)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    # NumPy zeros: an eager jnp.zeros compiled a kernel per distinct leaf shape (~7 s of
    # densenet40_cifar's test); the traced gradient is the same.
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    def loss(params):
        args, method = ((GT_BOXES, GT_LABELS, GT_VALID), "loss") if info.task == "detection" \
            else ((), None)
        out = model.apply({**variables, "params": params}, x, *args, method=method, train=True,
                          rngs={"dropout": jax.random.key(1), "sample": jax.random.key(2)},
                          mutable=["batch_stats"])[0]
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
    assert _bfloat16_sums(jaxpr, []) == []


def test_the_search_finds_flaxs_bfloat16_bias_sum():
    """The check itself: flax's own nn.Conv sums its bias gradient in bfloat16."""
    import flax.linen as nn

    conv = nn.Conv(4, (3, 3), dtype=jnp.bfloat16)
    x = jnp.zeros((2, 32, 32, 3))
    params = conv.init(jax.random.key(0), x)["params"]
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda p: jnp.sum(conv.apply({"params": p}, x).astype(jnp.float32))))(params).jaxpr
    assert [shape for shape, _ in _bfloat16_sums(jaxpr, [])] == [(2, 32, 32, 4)]


def test_lenet_subsampling_sums_its_windows_in_float32():
    """LeNet-5's trainable S-layer in bfloat16 summed each 2x2 window in bfloat16 (a rounding
    per add): 24% of its outputs were off the correctly rounded mean, by up to 1.5 ulp.
    Reference: float64 window sums of the bfloat16 inputs times the initial 1/4, rounded once."""
    import ml_dtypes

    from cnnjax.models.lenet import TrainableSubsampling

    x = np.random.default_rng(0).normal(1.0, 0.05, (4, 16, 16, 6)).astype(ml_dtypes.bfloat16)
    layer = TrainableSubsampling(dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    y = np.asarray(layer.apply(variables, x))
    sums = x.astype(np.float64).reshape(4, 8, 2, 8, 2, 6).sum(axis=(2, 4))
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y, (sums / 4).astype(ml_dtypes.bfloat16))
