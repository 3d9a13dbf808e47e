"""The segmentation train and eval steps: the per-pixel metrics with ignored pixels against
NumPy; on a small FCN (slow: compiling a ResNet-18 FCN) the eval step's masked sums and pixel
confusion matrix against a NumPy / scikit-learn computation from the same model's predictions,
and the train step lowering the per-pixel cross-entropy of a fixed batch."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import confusion_matrix

from cnnjax.analysis.confusion import intersection_over_union
from cnnjax.data.segmentation import IGNORE_LABEL
from cnnjax.models import create_model
from cnnjax.train.state import create_train_state
from cnnjax.train.step import _pixel_metrics, segmentation_eval_step, segmentation_train_step

CLASSES, SIZE = 3, 32


def _setup():
    model = create_model("fcn32s_resnet18", num_classes=CLASSES)
    tx = optax.adam(1e-3)
    state = create_train_state(model, tx, jax.random.key(0), (1, SIZE, SIZE, 3))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.zeros((4, SIZE, SIZE), np.int32)
    for i in range(4):  # a bright square of class 1 or 2 per image
        c, y, x = 1 + i % 2, *rng.integers(0, SIZE - 12, 2)
        images[i, y:y + 12, x:x + 12] += 2.0
        labels[i, y:y + 12, x:x + 12] = c
    labels[:2, :, :5] = IGNORE_LABEL  # an unscored band, as VOC's object borders
    return model, tx, state, images, labels


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_pixel_metrics_skip_ignored_pixels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 6, 4))
    labels = rng.integers(0, 4, (3, 5, 6))
    labels[0, :2] = IGNORE_LABEL
    labels[2] = IGNORE_LABEL  # nothing scored: 0, not NaN
    got = jax.tree.map(np.asarray, _pixel_metrics(jnp.asarray(logits, jnp.float32),
                                                  jnp.asarray(labels, jnp.int32)))
    for i in range(2):
        scored = labels[i] != IGNORE_LABEL
        safe = np.where(scored, labels[i], 0)[..., None]
        picked = np.take_along_axis(_log_softmax(logits[i]), safe, -1)[..., 0]
        np.testing.assert_allclose(got["loss"][i], -picked[scored].mean(), rtol=1e-5)
        assert got["scored"][i] == scored.sum()
        assert got["correct"][i] == (logits[i].argmax(-1) == labels[i])[scored].sum()
    assert got["loss"][2] == 0.0 and got["scored"][2] == 0 and got["correct"][2] == 0


def _on_one_device(fn, *args):
    """`fn` with the collectives of a 1-device data-parallel axis named "data"."""
    return jax.vmap(fn, axis_name="data")(*jax.tree.map(lambda x: x[None], args))


@pytest.mark.slow
def test_eval_sums_and_confusion_match_numpy():
    model, _, state, images, labels = _setup()
    mask = np.array([1, 1, 1, 0], np.float32)  # the last image is padding
    sums = _on_one_device(lambda s, b: segmentation_eval_step(s, b, model=model, axis_name="data"),
                          state, {"image": images, "labels": labels, "mask": mask})
    sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64), sums)
    logits = np.asarray(model.apply(state.variables(), images, train=False), np.float64)
    predictions = logits.argmax(-1)
    scored = labels != IGNORE_LABEL
    picked = np.take_along_axis(_log_softmax(logits), np.where(scored, labels, 0)[..., None],
                                -1)[..., 0]
    assert sums["count"] == 3
    loss = [-picked[i][scored[i]].mean() for i in range(3)]
    np.testing.assert_allclose(sums["loss"], np.sum(loss), rtol=1e-5)
    assert "pixel_accuracy" not in sums  # the host's, from the confusion matrix
    expected = confusion_matrix(labels[:3][scored[:3]], predictions[:3][scored[:3]],
                                labels=range(CLASSES))
    np.testing.assert_array_equal(sums["confusion"], expected)
    scores = intersection_over_union(sums["confusion"])
    assert 0.0 <= scores["miou"] <= 1.0
    correct = (predictions[:3] == labels[:3])[scored[:3]]
    assert scores["pixel_accuracy"] == pytest.approx(correct.mean())  # over all scored pixels


@pytest.mark.slow
def test_train_steps_lower_the_pixel_loss():
    model, tx, state, images, labels = _setup()
    step = jax.jit(lambda s, b: _on_one_device(
        lambda s, b: segmentation_train_step(s, b, model=model, tx=tx,
                                             schedule=optax.constant_schedule(1e-3),
                                             axis_name="data"), s, b))
    batch = {"image": jnp.asarray(images), "labels": jnp.asarray(labels)}
    state1 = jax.tree.map(lambda x: x[None], state)
    losses = []
    for _ in range(8):
        state1, metrics = step(jax.tree.map(lambda x: x[0], state1), batch)
        losses.append(float(metrics["loss"][0]))
        assert 0.0 <= float(metrics["pixel_accuracy"][0]) <= 1.0
    assert losses[-1] < 0.7 * losses[0]  # ln 3 = 1.10 at the start


def test_train_step_loss_is_the_mean_of_per_image_means():
    """`segmentation_train_step`'s loss, hand-computed on 3 images of 1 x 2 pixels, 2 classes,
    logits = the image (a 1-parameter model): image 0 scores both pixels (logits 0, 0: ln 2
    each, mean ln 2); image 1 one pixel (logits ln 3, 0, label 1: ln 4) and ignores the other;
    image 2 none (0). The mean of per-image means is (ln 2 + ln 4 + 0) / 3 = ln 2, where the
    mean over all scored pixels (torchvision's CrossEntropyLoss(ignore_index=255)) would be
    4/3 ln 2 and Caffe FCN's sum 4 ln 2."""
    import flax.linen as nn

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return x * self.param("scale", nn.initializers.ones, ())

    ignore = IGNORE_LABEL
    images = np.zeros((3, 1, 2, 2), np.float32)
    images[1, 0, 0, 0] = np.log(3.0)
    labels = np.array([[[0, 1]], [[1, ignore]], [[ignore, ignore]]], np.int32)
    model, tx = Identity(), optax.sgd(0.0)
    state = create_train_state(model, tx, jax.random.key(0), (1, 1, 2, 2))
    step = jax.vmap(lambda s, b: segmentation_train_step(
        s, b, model=model, tx=tx, schedule=optax.constant_schedule(0.0), axis_name="data"),
        axis_name="data")
    batch = {"image": jnp.asarray(images)[None], "labels": jnp.asarray(labels)[None]}
    _, metrics = step(jax.tree.map(lambda x: x[None], state), batch)
    np.testing.assert_allclose(float(metrics["loss"][0]), np.log(2.0), rtol=1e-6)
    # pixel accuracy over the batch's 3 scored pixels, as eval counts it: image 0 has 1 of 2
    # right, image 1 0 of 1 (argmax class 0, label 1); the mean of per-image accuracies
    # (1/2, 0, 0) would be 1/6.
    np.testing.assert_allclose(float(metrics["pixel_accuracy"][0]), 1 / 3, rtol=1e-6)


def test_confusion_counts_past_2_to_the_24_pixels():
    """float32 counts stop at 2**24 (adding 1 no longer changes them): a 4100x4100 eval image of
    one class, all predicted right, must count every pixel."""

    class Background(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return jnp.stack([jnp.ones(x.shape[:3]), jnp.zeros(x.shape[:3])], -1)

    side = 4100
    batch = {"image": np.zeros((1, side, side, 1), np.float32),
             "labels": np.zeros((1, side, side), np.int32), "mask": np.ones(1, np.float32)}
    state = types.SimpleNamespace(variables=lambda: {})
    sums = _on_one_device(lambda b: segmentation_eval_step(state, b, model=Background(),
                                                           axis_name="data"), batch)
    assert side * side > 2**24
    assert int(sums["confusion"][0, 0, 0]) == side * side
    assert int(np.asarray(sums["confusion"]).sum()) == side * side


class _ImageIsLogits(nn.Module):
    """A dense predictor whose logits are its input (`[B, H, W, C]`) times a scale, 1 at init."""

    @nn.compact
    def __call__(self, x, train=False):
        return x * self.param("scale", nn.initializers.ones, ())


def test_uint8_class_maps_are_counted_in_their_confusion_cells():
    """tfds stores class maps as uint8: the confusion index `label * C + prediction` must not be
    formed in uint8 (20 * 21 wraps at 256). 21 classes (PASCAL VOC), every pixel predicted
    right: the matrix must equal NumPy's (all counts on the diagonal, pixel accuracy exactly 1;
    uint8 arithmetic put 16 of the 40 pixels off the diagonal, accuracy 0.6)."""
    classes = 21
    labels = np.random.default_rng(0).integers(0, classes, (2, 4, 5)).astype(np.uint8)
    labels[0, 0, :2] = (20, IGNORE_LABEL)  # the largest class and an ignored pixel
    logits = np.eye(classes, dtype=np.float32)[np.minimum(labels, classes - 1)]
    model = _ImageIsLogits()
    state = create_train_state(model, optax.sgd(0.0), jax.random.key(0), (1, 4, 5, classes))
    sums = _on_one_device(lambda b: segmentation_eval_step(state, b, model=model,
                                                           axis_name="data"),
                          {"image": logits, "labels": labels, "mask": np.ones(2, np.float32)})
    scored = labels != IGNORE_LABEL
    expected = confusion_matrix(labels[scored], labels[scored], labels=range(classes))
    np.testing.assert_array_equal(np.asarray(sums["confusion"][0]), expected)  # exact counts
    assert intersection_over_union(expected)["pixel_accuracy"] == 1.0


@pytest.mark.parametrize("labels, detail", [
    (np.zeros((2, 4, 5, 1), np.int32), "shape"),  # a tfds mask's channel axis kept
    (np.zeros((2, 5, 4), np.int32), "shape"),  # another size than the images
    (np.zeros((2, 4, 5), np.float32), "dtype"),  # class indices as floats
])
@pytest.mark.parametrize("step", ["train", "eval"])
def test_class_maps_of_another_shape_or_dtype_are_named(labels, detail, step):
    """Both steps refuse labels that are not integer `[B, H, W]` maps of the images' size, with
    an error naming batch['labels'], the value and what is valid, while tracing (before XLA
    compiles anything); a `[B, H, W, 1]` map used to fail deep in a gather, or, with B == H,
    in broadcasting."""
    images = np.zeros((2, 4, 5, 3), np.float32)
    model, tx = _ImageIsLogits(), optax.sgd(0.0)
    state = create_train_state(model, tx, jax.random.key(0), (1, 4, 5, 3))
    if step == "eval":
        batch = {"image": images, "labels": labels, "mask": np.ones(2, np.float32)}
        fn = functools.partial(segmentation_eval_step, state, model=model, axis_name="data")
    else:
        batch = {"image": images, "labels": labels}
        fn = functools.partial(segmentation_train_step, state, model=model, tx=tx,
                               schedule=optax.constant_schedule(0.0), axis_name="data")
    with pytest.raises(ValueError, match=rf"batch\['labels'\]\.{detail}=.*is invalid; expected"):
        _on_one_device(fn, batch)


def test_train_pixel_accuracy_counts_every_device_s_pixels():
    """On 2 devices the pixel accuracy is over all scored pixels of both: device 0's 1 x 2 image
    has 1 of 1 scored pixel right, device 1's 0 of 2 (the devices' mean accuracy would be 1/2)."""

    images = np.zeros((2, 1, 1, 2, 2), np.float32)  # [devices, batch, H, W, classes]
    images[..., 0] = 1.0  # class 0 predicted everywhere
    labels = np.array([[[[0, IGNORE_LABEL]]], [[[1, 1]]]], np.int32)
    model, tx = _ImageIsLogits(), optax.sgd(0.0)
    state = create_train_state(model, tx, jax.random.key(0), (1, 1, 2, 2))
    step = jax.vmap(lambda s, b: segmentation_train_step(
        s, b, model=model, tx=tx, schedule=optax.constant_schedule(0.0), axis_name="data"),
        axis_name="data")
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    _, metrics = step(states, {"image": jnp.asarray(images), "labels": jnp.asarray(labels)})
    np.testing.assert_allclose(np.asarray(metrics["pixel_accuracy"]), [1 / 3, 1 / 3], rtol=1e-6)
