"""Faster R-CNN: output shapes, the loss as the sum of its terms with sane untrained values,
gradients reaching every layer, detections recomposed from the raw outputs in float64.

Compiling the whole detector takes 10-30 s on 2 cores: those tests are `slow`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.postprocess import batched_nms
from cnnjax.models import create_model, list_models, model_info
from cnnjax.models.faster_rcnn import FasterRCNN, detect_from_head
from tests.models import detectors
from tests.models.detectors import (
    BAD_GROUND_TRUTH,
    assert_eager_detect_equals_jitted,
    with_defaults,
)

BOXES = jnp.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 0, 10, 10], [0, 0, 0, 0]]])
LABELS = jnp.array([[1, 2], [3, 0]])
VALID = jnp.array([[True, True], [True, False]])


@pytest.fixture(scope="module")
def model_and_variables():
    model = create_model("faster_rcnn_small", num_classes=4, rpn_post_nms_train=16,
                         rpn_post_nms_test=16, rpn_pre_nms_train=200, rpn_pre_nms_test=200,
                         roi_samples=16, max_detections=10)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    return model, jax.jit(model.init)(jax.random.key(1), x), x


def test_registered_as_detector():
    assert "faster_rcnn_small" in list_models(task="detection")
    assert "faster_rcnn_small" not in list_models()
    assert model_info("faster_rcnn_small").input_shape == (64, 64, 3)


@pytest.mark.slow
def test_call_shapes(model_and_variables):
    model, variables, x = model_and_variables
    logits, deltas, proposals = model.apply(variables, x)
    assert logits.shape == (2, 16, 5) and deltas.shape == (2, 16, 5, 4)
    assert proposals.boxes.shape == (2, 16, 4) and proposals.valid.dtype == jnp.bool_
    rpn = model.apply(variables, x, False, method="rpn")
    assert rpn.features.shape == (2, 8, 8, 128)  # stride 8
    assert rpn.anchors.shape == (8 * 8 * 6, 4) and rpn.objectness.shape == (2, 384)


@pytest.mark.slow
def test_loss_terms_and_gradients(model_and_variables):
    model, variables, x = model_and_variables

    def loss(params):
        (value, terms), _ = model.apply(
            {**variables, "params": params}, x, BOXES, LABELS, VALID, train=True, method="loss",
            mutable=["batch_stats"], rngs={"sample": jax.random.key(2)})
        return value, terms

    (value, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    parts = ("rpn_objectness", "rpn_box", "classification", "box")
    np.testing.assert_allclose(float(value), sum(float(terms[k]) for k in parts), rtol=1e-6)
    # Untrained: objectness near log 2 (logits ~0), classification near log(C + 1).
    assert abs(float(terms["rpn_objectness"]) - np.log(2)) < 0.05
    assert abs(float(terms["classification"]) - np.log(5)) < 0.3
    assert float(terms["rpn_box"]) > 0 and float(terms["box"]) >= 0
    for path in ("rpn_conv", "rpn_objectness", "rpn_deltas", "head/fc6", "head/fc7",
                 "head/class_logits", "head/box_deltas", "backbone"):
        tree = grads
        for key in path.split("/"):
            tree = tree[key]
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree))
        name = path
        assert np.isfinite(norm) and norm > 0, name


@pytest.mark.slow
def test_detect_is_per_class_nms_of_decoded_proposals(model_and_variables):
    model, variables, x = model_and_variables
    det = jax.jit(lambda v, x: model.apply(v, x, method="detect"))(variables, x)
    assert det.boxes.shape == (2, 10, 4) and det.classes.dtype == jnp.int32
    # Independent recomposition: softmax * decoded boxes from the raw outputs, then batched_nms.
    logits, deltas, proposals = model.apply(variables, x)
    probs = np.asarray(jax.nn.softmax(logits, -1))[..., 1:]
    d = np.asarray(deltas, np.float64)[:, :, 1:] / np.array([10, 10, 5, 5])
    p = np.asarray(proposals.boxes, np.float64)[:, :, None]
    w, h = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    cx, cy = p[..., 0] + w / 2 + d[..., 0] * w, p[..., 1] + h / 2 + d[..., 1] * h
    bw, bh = np.exp(d[..., 2]) * w, np.exp(d[..., 3]) * h
    boxes = np.clip(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1), 0, 64)
    for i in range(2):
        kept = np.asarray(proposals.valid[i])[:, None] & np.all(  # torchvision's 1e-2 px
            boxes[i, ..., 2:] - boxes[i, ..., :2] >= 1e-2, axis=-1)
        scores = np.where(kept, probs[i], 0)
        classes = np.broadcast_to(np.arange(4), scores.shape)
        want = batched_nms(boxes[i].reshape(-1, 4).astype(np.float32), scores.reshape(-1),
                           classes.reshape(-1), 0.5, 10, 0.05)
        np.testing.assert_array_equal(np.asarray(det.valid[i]), np.asarray(want.valid))
        np.testing.assert_allclose(np.asarray(det.scores[i]), np.asarray(want.scores), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(det.boxes[i]), np.asarray(want.boxes), atol=1e-3)


@pytest.mark.slow
def test_detect_on_an_image_off_the_stride_is_the_same_eager_and_under_jit():
    """60 px at stride 8: the 7x7 map covers 56 px, and proposals clipped to the 60-px image
    reach past it. RoIAlign clamps them under jit (torchvision's rule); eager (concrete boxes,
    checked) must accept them and give the same detections."""
    model = FasterRCNN(num_classes=3, backbone_stages=((4,), (4,), (8,)), rpn_channels=8,
                       rpn_pre_nms_test=200, rpn_post_nms_test=32, head_features=16,
                       max_detections=10)
    x = jax.random.normal(jax.random.key(0), (1, 60, 60, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    _, _, proposals = jax.jit(model.apply)(variables, x)
    assert float(jnp.where(proposals.valid[..., None], proposals.boxes, 0).max()) > 56
    assert_eager_detect_equals_jitted(model, variables, x)


def test_min_input_size_is_the_smallest_image_with_an_anchor_inside():
    """The RPN trains only on anchors inside the image (py-faster-rcnn's allowed_border=0):
    below `min_input_size` no default anchor fits and its losses would be 0 forever."""
    from cnnjax.detection.anchors import anchor_grid, anchors_inside, generate_anchors

    model, size = create_model("faster_rcnn_small"), model_info("faster_rcnn_small").min_input_size
    base = generate_anchors(model.stride, model.anchor_ratios, model.anchor_scales)

    def count_inside(side):
        rpn = jax.eval_shape(lambda x: model.init_with_output(
            jax.random.key(0), x, False, method="rpn")[0],
            jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
        anchors = anchor_grid(rpn.features.shape[1:3], model.stride, base)
        return int(anchors_inside(anchors, (side, side)).sum())

    assert count_inside(size - 1) == 0 and count_inside(size) > 0
    with pytest.raises(ValueError, match=re.escape(
            "FasterRCNN: anchor_scales=(1.5, 3.0) is invalid; no anchor (anchor_ratios=(0.5, 1.0, "
            f"2.0), stride 8) lies inside the {size - 1}x{size - 1} image, and the RPN trains only "
            "on anchors inside it, so its losses would stay 0; expected smaller anchor_scales or "
            "larger images.")):
        trace_loss(model, size - 1, size - 1)
    trace_loss(model, size, size)
    # The engine refuses the smaller size before tracing anything (min_input_size).
    from cnnjax.train import checks

    checks.check_input_size(model, "faster_rcnn_small", (size, size, 3), size)
    with pytest.raises(ValueError, match=f"the model needs inputs of at least {size}x{size}"):
        checks.check_input_size(model, "faster_rcnn_small", (size - 1, size - 1, 3), size)


def trace_loss(model, height, width, gt=(BOXES, LABELS, VALID)):
    """The training loss traced on `height x width` images (nothing compiled): its shapes."""
    return detectors.trace_loss(model, gt, height, width)


def test_loss_refuses_images_no_anchor_fits():
    """Non-square images or large anchor_scales: the loss refuses them when traced."""
    wide = create_model("faster_rcnn_small", anchor_scales=(8.0,))  # 64-px anchors at stride 8
    with pytest.raises(ValueError, match=re.escape(
            "FasterRCNN: anchor_scales=(8.0,) is invalid; no anchor (anchor_ratios=(0.5, 1.0, "
            "2.0), stride 8) lies inside the 64x64 image")):
        trace_loss(wide, 64, 64)
    trace_loss(wide, 72, 72)  # at 72 px one 64-px anchor fits
    with pytest.raises(ValueError, match="inside the 16x64 image"):
        trace_loss(create_model("faster_rcnn_small"), 16, 64)


@pytest.mark.slow
def test_rpn_learns_at_the_min_input_size():
    """At `min_input_size` the RPN losses are not 0: some anchor is labelled and sampled."""
    side = model_info("faster_rcnn_small").min_input_size
    model = FasterRCNN(num_classes=3, backbone_stages=((4,), (4,), (8,)), rpn_channels=8,
                       head_features=16, roi_samples=8, rpn_post_nms_train=8)
    x = jax.random.normal(jax.random.key(0), (1, side, side, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    (_, terms), _ = jax.jit(lambda v, x: model.apply(
        v, x, jnp.array([[[2.0, 2, 14, 14]]]), jnp.array([[0]]), jnp.array([[True]]),
        method="loss", mutable=["batch_stats"], rngs={"sample": jax.random.key(2)}))(variables, x)
    assert float(terms["rpn_objectness"]) > 0.1 and float(terms["rpn_box"]) > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 0}, "FasterRCNN: num_classes=0 is invalid; expected a positive integer."),
    ({"backbone_stages": ()}, "FasterRCNN: backbone_stages=() is invalid"),
    ({"anchor_scales": (0.0,)}, "FasterRCNN: anchor_scales=(0.0,) is invalid; expected a "
                                "non-empty sequence of positive numbers."),
    ({"anchor_scales": ()}, "FasterRCNN: anchor_scales=() is invalid; expected a non-empty "
                            "sequence of positive numbers."),
    ({"anchor_ratios": (0.5, -1.0)}, "FasterRCNN: anchor_ratios=(0.5, -1.0) is invalid"),
    ({"anchor_ratios": (0.001,)}, "FasterRCNN: anchor_ratios=(0.001,) is invalid; ratio 0.001 "
                                  "rounds a side of the 8x8 base box to 0 pixels."),
    ({"nms_iou": 2.0}, "FasterRCNN: nms_iou=2.0 is invalid; expected a number in [0, 1]."),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError) as err:
        FasterRCNN(**kwargs)
    assert str(err.value).startswith(message)


def test_rpn_loss_against_float64_reference():
    """Labels recomputed with a float64 IoU loop (0.7 / 0.3, forced best anchor); the sampled
    anchors are the ones `sample_balanced` draws with the same key; BCE and smooth L1 in NumPy."""
    from cnnjax.detection.anchors import anchor_grid, generate_anchors
    from cnnjax.detection.matching import sample_balanced
    from cnnjax.models.faster_rcnn import rpn_loss
    from tests.detection.reference import iou_ref

    rng = np.random.default_rng(0)
    anchors = np.asarray(anchor_grid((6, 6), 8, generate_anchors(8, (0.5, 1.0, 2.0), (1.5, 3.0))))
    gt = np.array([[6.0, 5, 20, 21], [25, 30, 47, 44], [0, 0, 0, 0]])
    valid = np.array([True, True, False])
    logits = rng.normal(0, 1, len(anchors)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (len(anchors), 4)).astype(np.float32)
    inside = np.ones(len(anchors), bool)
    key = jax.random.key(3)
    got_cls, got_box = rpn_loss(key, logits, deltas, anchors, gt, valid, inside, 32)

    iou = np.array([[iou_ref(a, g) for g in gt[:2]] for a in anchors.astype(np.float64)])
    labels = np.where(iou.max(1) < 0.3, 0, -1)
    labels[(iou == iou.max(0)).any(1)] = 1
    labels[iou.max(1) >= 0.7] = 1
    pos, neg = (np.asarray(m) for m in sample_balanced(key, jnp.asarray(labels, jnp.int32), 32))
    sampled = pos | neg
    x = logits.astype(np.float64)
    bce = np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * (labels == 1)
    assert pos.sum() > 0 and sampled.sum() == 32
    np.testing.assert_allclose(float(got_cls), bce[sampled].mean(), rtol=1e-5)
    a = anchors.astype(np.float64)
    g = gt[iou.argmax(1)]
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    targets = np.stack([(g[:, 0] + gw / 2 - a[:, 0] - aw / 2) / aw,
                        (g[:, 1] + gh / 2 - a[:, 1] - ah / 2) / ah,
                        np.log(gw / aw), np.log(gh / ah)], 1)
    diff = np.abs(deltas - targets)
    beta = 1 / 9
    huber = np.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    np.testing.assert_allclose(float(got_box), huber[pos].sum() / sampled.sum(), rtol=1e-5)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, 1e30])
def test_detect_from_head_ignores_whatever_invalid_rows_hold(garbage):
    """Rows not `valid` (padded proposals, their logits and deltas) never change the detections:
    the same as those rows zeroed, and as the valid rows alone."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (20, 2))
    props = np.concatenate([xy, xy + rng.uniform(5, 20, (20, 2))], 1).astype(np.float32)
    props = np.concatenate([props, props + rng.normal(0, 1, props.shape).astype(np.float32)])
    props = np.concatenate([props, np.zeros((2, 4), np.float32)])[None]  # 2 padded rows
    logits = rng.normal(0, 2, (1, 42, 4)).astype(np.float32)
    deltas = rng.normal(0, 0.1, (1, 42, 4, 4)).astype(np.float32)
    valid = np.arange(42)[None] < 40
    run = jax.jit(lambda lg, d, p: detect_from_head(lg, d, p, valid, (64, 64), 0.05, 0.5, 100))
    clean = run(logits, deltas, props)
    alone = jax.jit(  # one compile (eagerly, each op compiles on its own)
        lambda lg, d, p: detect_from_head(lg, d, p, valid[:, :40], (64, 64), 0.05, 0.5, 100))(
        logits[:, :40], deltas[:, :40], props[:, :40])
    dirty_props, dirty_logits, dirty_deltas = props.copy(), logits.copy(), deltas.copy()
    dirty_props[0, 40] = [garbage, -garbage, garbage, garbage]
    dirty_props[0, 41] = [0, 0, garbage, garbage]
    dirty_logits[0, 40:], dirty_deltas[0, 40:] = garbage, garbage
    dirty = run(dirty_logits, dirty_deltas, dirty_props)
    assert 10 < int(clean.valid.sum()) < 100
    for field in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_array_equal(getattr(dirty, field), getattr(clean, field))
        np.testing.assert_allclose(getattr(alone, field), getattr(clean, field), atol=1e-5)


@pytest.mark.parametrize("gt, message", BAD_GROUND_TRUTH)
def test_loss_refuses_bad_ground_truth(gt, message):
    """Before tracing: a batch mismatch was JAX's vmap error, float labels were truncated, -1
    became background and label C a NaN loss, a NaN or inverted box reached roi_align."""
    model = create_model("faster_rcnn_small", num_classes=4)
    with pytest.raises(ValueError) as err:
        trace_loss(model, 64, 64, with_defaults(gt))
    assert str(err.value).startswith(f"FasterRCNN.loss: {message}")


def test_loss_traces_with_no_ground_truth_rows():
    """`G = 0` (no object in any image): was a gather TypeError in the RPN's matching."""
    model = create_model("faster_rcnn_small", num_classes=4)
    (loss, terms), _ = trace_loss(model, 64, 64, (np.zeros((2, 0, 4)), np.zeros((2, 0), int),
                                                  np.zeros((2, 0), bool)))
    assert loss.shape == () and set(terms) >= {"rpn_box", "box"}


def test_refuses_images_below_the_stride():
    """Was a max_pool2d error from inside the backbone."""
    x = jax.ShapeDtypeStruct((1, 7, 9, 3), jnp.float32)
    with pytest.raises(ValueError, match=re.escape(
            "FasterRCNN: input.shape=(1, 7, 9, 3) is invalid; expected height and width >= 8 (the "
            "backbone's stride, 2**len(backbone_stages)).")):
        jax.eval_shape(lambda x: FasterRCNN(num_classes=4).init(jax.random.key(0), x), x)


def test_refuses_rpn_min_size_beyond_the_image():
    """Proposals are clipped to the image, so every one was dropped silently (0 of 64 valid: no
    detection); at the shorter side exactly, a box of the whole image may survive."""
    x = jax.ShapeDtypeStruct((1, 48, 40, 3), jnp.float32)
    with pytest.raises(ValueError) as err:
        jax.eval_shape(lambda x: FasterRCNN(num_classes=4, rpn_min_size=40.5).init(
            jax.random.key(0), x), x)
    assert str(err.value) == (
        "FasterRCNN: rpn_min_size=40.5 is invalid; expected at most 40, the shorter side of the "
        "48x40 (height x width) image: proposals are clipped to the image, so every one would be "
        "dropped.")
    jax.eval_shape(lambda x: FasterRCNN(num_classes=4, rpn_min_size=40).init(
        jax.random.key(0), x), x)


@pytest.mark.parametrize("seed, score_threshold, nms_iou, k, outside", [
    (0, 0.05, 0.5, 20, False), (1, 0.3, 0.5, 5, False), (2, 0.05, 0.3, 100, False),
    (3, 0.05, 0.5, 100, True),
])
def test_detect_from_head_against_torchvision_postprocess(seed, score_threshold, nms_iou, k,
                                                          outside):
    """torchvision's `RoIHeads.postprocess_detections` on the same logits, deltas and proposals
    (weights 10, 10, 5, 5): the same detections in the same order. With `outside`, some boxes
    are moved off the image and clip to zero width, which torchvision drops
    (`remove_small_boxes(1e-2)`) and detect_from_head kept as sure false positives."""
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    rng = np.random.default_rng(seed)
    n, p, c, size = 2, 60, 4, (64, 80)
    xy = rng.uniform(0, 50, (n, p, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(4, 30, (n, p, 2))], -1).astype(np.float32)
    logits = rng.normal(0, 2, (n, p, c + 1)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (n, p, c + 1, 4)).astype(np.float32)
    if outside:  # every third proposal's class-1 box 10 widths to the right: off the image
        deltas[:, ::3, 1, 0] = 100.0
        logits[:, ::3, 1] = 6.0
    heads = roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0),
                               score_threshold, nms_iou, k)
    boxes, scores, labels = heads.postprocess_detections(
        torch.tensor(logits.reshape(n * p, c + 1)), torch.tensor(deltas.reshape(n * p, -1)),
        [torch.tensor(x) for x in proposals], [size] * n)
    got = detect_from_head(logits, deltas, proposals, np.ones((n, p), bool), size,
                           score_threshold, nms_iou, k)
    for i in range(n):
        m = len(scores[i])
        assert m > 0 and int(got.valid[i].sum()) == m
        np.testing.assert_array_equal(np.asarray(got.classes[i, :m]) + 1, labels[i].numpy())
        np.testing.assert_allclose(np.asarray(got.scores[i, :m]), scores[i].numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got.boxes[i, :m]), boxes[i].numpy(), atol=1e-4)


@pytest.mark.slow
def test_approximate_joint_training_stops_gradients_at_the_proposals():
    """Ren et al. sec. 3.2's approximate joint training: the box head's loss reaches the RPN's
    layers only through proposals, which carry no gradient, so its gradient there is exactly 0;
    the RPN's loss never reaches the box head; both train the shared backbone."""
    model = FasterRCNN(num_classes=3, backbone_stages=((4,), (4,), (8,)), rpn_channels=8,
                       head_features=16, roi_samples=8, rpn_post_nms_train=8,
                       rpn_pre_nms_train=100)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    gt = (jnp.array([[[2.0, 2, 14, 14], [10, 12, 30, 28]], [[0, 0, 20, 10], [0, 0, 0, 0]]]),
          jnp.array([[0, 2], [1, 0]]), jnp.array([[True, True], [True, False]]))

    def gradient_norms(names):
        def part(params):
            (_, terms), _ = model.apply({**variables, "params": params}, x, *gt, method="loss",
                                        mutable=["batch_stats"], rngs={"sample": jax.random.key(2)})
            return sum(terms[name] for name in names)

        grads = jax.jit(jax.grad(part))(variables["params"])
        return {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v)))
                for k, v in grads.items()}

    head = gradient_norms(("classification", "box"))
    rpn = gradient_norms(("rpn_objectness", "rpn_box"))
    assert head["rpn_conv"] == head["rpn_objectness"] == head["rpn_deltas"] == 0.0
    assert rpn["head"] == 0.0
    assert min(head["head"], head["backbone"], rpn["rpn_conv"], rpn["backbone"]) > 0



def _head_outputs(n=1, p=3, k=5):
    """Zero logits and deltas of `p` unit-size proposals per image, all valid."""
    return (np.zeros((n, p, k), np.float32), np.zeros((n, p, k, 4), np.float32),
            np.tile(np.array([1.0, 1, 10, 10], np.float32), (n, p, 1)), np.ones((n, p), bool))


@pytest.mark.parametrize("change, message", [
    # A batch mismatch was broadcast silently, a class mismatch a broadcasting error, a float
    # mask a TypeError, K = 1 (background only) and score_threshold 2 gave nothing silently.
    ({"proposals": _head_outputs(n=2)[2]},
     "proposals.shape=(2, 3, 4) is invalid; expected (1, 3, 4) for logits of shape (1, 3, 5)."),
    ({"deltas": _head_outputs(k=3)[1]}, "deltas.shape=(1, 3, 3, 4) is invalid; expected "
                                        "(1, 3, 5, 4)"),
    ({"valid": np.ones((1, 3))}, "valid.dtype='float64' is invalid; expected a bool array."),
    ({"logits": np.zeros((1, 3, 1)), "deltas": np.zeros((1, 3, 1, 4))},
     "logits.shape=(1, 3, 1) is invalid; expected [N, P, C + 1] with C >= 1"),
    ({"proposals": np.array([[[1.0, 1, 10, 10], [1, 1, np.nan, 3], [1, 1, 10, 10]]])},
     "proposals[0, 1]=[1.0, 1.0, nan, 3.0] is invalid; expected finite coordinates."),
    ({"score_threshold": 2.0}, "score_threshold=2.0 is invalid; expected a number in [0, 1)."),
])
def test_detect_from_head_refuses_bad_arguments(change, message):
    logits, deltas, proposals, valid = _head_outputs()
    args = {"logits": logits, "deltas": deltas, "proposals": proposals, "valid": valid,
            "image_size": (64, 64), "score_threshold": 0.05, "nms_iou": 0.5,
            "max_detections": 10, **change}
    with pytest.raises(ValueError) as err:
        detect_from_head(**args)
    assert str(err.value).startswith(f"detect_from_head: {message}")


def test_rpn_loss_shapes_and_no_ground_truth():
    """Objectness of the wrong length was a broadcasting TypeError; `G = 0` an IndexError (now
    every sampled anchor is negative: no box loss)."""
    from cnnjax.detection.anchors import anchor_grid, generate_anchors
    from cnnjax.models.faster_rcnn import rpn_loss

    anchors = np.asarray(anchor_grid((4, 4), 8, generate_anchors(8, (1.0,), (1.0,))))
    key, inside = jax.random.key(0), np.ones(16, bool)
    with pytest.raises(ValueError, match=re.escape(
            "rpn_loss: objectness.shape=(15,) is invalid; expected (16,), one row per anchor "
            "(anchors.shape[0]=16).")):
        rpn_loss(key, np.zeros(15), np.zeros((16, 4)), anchors, np.zeros((1, 4)),
                 np.zeros(1, bool), inside)
    objectness, box = rpn_loss(key, np.zeros(16, np.float32), np.zeros((16, 4), np.float32),
                               anchors, np.zeros((0, 4)), np.zeros(0, bool), inside)
    np.testing.assert_allclose(float(objectness), np.log(2), rtol=1e-6)
    assert float(box) == 0.0
