"""YOLO v1 model: the paper's layer table and parameter count, the output layout the loss reads,
decoding against a float64 loop, and the registry's detection tag."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.yolo import yolo_v1_loss, yolo_v1_targets
from cnnjax.models import create_model, list_models, model_info, register_model
from cnnjax.models.yolo import YOLO_V1_LAYERS, YOLOv1, decode_yolo_v1
from tests.detection.test_postprocess import batched_nms_ref


def _count_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_paper_network_layers_and_params():
    convs = [layer for layer in YOLO_V1_LAYERS if layer != "M"]
    assert len(convs) == 24 and YOLO_V1_LAYERS.count("M") == 4  # Fig. 3: 24 conv + 4 pools
    model = create_model("yolo_v1")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 448, 448, 3)))
    out, features = jax.eval_shape(
        lambda v, x: model.apply(v, x, return_features=True), variables,
        jnp.zeros((1, 448, 448, 3)))
    assert features["trunk"].shape == (1, 7, 7, 1024)  # the paper's 7x7x1024 before the fcs
    assert out.shape == (1, 7, 7, 30)  # S=7, B=2, C=20: 7x7x30
    # Independent count: k*k*cin*cout + cout per conv, then 7*7*1024 -> 4096 -> 7*7*30.
    expected, cin = 0, 3
    for cout, k, _ in convs:
        expected += k * k * cin * cout + cout
        cin = cout
    expected += (7 * 7 * 1024 + 1) * 4096 + (4096 + 1) * 7 * 7 * 30
    assert _count_params(variables) == expected == 271_703_550


def test_convolutions_pad_like_darknet():
    """darknet's pad=1 is kernel // 2 on every side: with the 7x7/2 first layer, output row 0
    sees input rows 0..3 (rows -3..-1 are padding). SAME padding (2 before, 3 after at an even
    size) shifted the window: rows 0..4."""
    model = YOLOv1(layers=((2, 7, 2),), grid_size=2, hidden_features=8, num_classes=1)
    x = jnp.zeros((1, 16, 16, 1))
    variables = model.init(jax.random.key(0), x)

    def first_trunk_row(image):
        return model.apply(variables, image, return_features=True)[1]["trunk"][0, 0].sum()

    seen = np.abs(np.asarray(jax.grad(first_trunk_row)(x + 1.0)))[0, :, :, 0].sum(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(seen), [0, 1, 2, 3])

def test_registry_tags_detectors():
    assert list_models("yolo*", task="detection") == ["yolo_v1", "yolo_v1_small"]
    assert "yolo_v1" not in list_models()  # classifier listings (zoo, head tests) skip it
    assert "yolo_v1" in list_models(task=None)
    assert model_info("yolo_v1_small").task == "detection"
    assert model_info("lenet5").task == "classification"
    with pytest.raises(ValueError, match=r"list_models: task='segment' is invalid; expected one "
                                         r"of \['classification', 'detection', 'segmentation'\]"):
        list_models(task="segment")
    with pytest.raises(ValueError, match=r"register_model: task='segment' is invalid"):
        register_model("never_registered", task="segment")
    assert "never_registered" not in list_models(task=None)


@pytest.fixture(scope="module")
def small():
    model = create_model("yolo_v1_small", num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    return model, jax.jit(model.init)(jax.random.key(1), x), x


def test_loss_is_the_batch_mean_of_eq3(small):
    model, variables, x = small
    boxes = jnp.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 0, 10, 10], [9, 9, 9, 9]]])
    labels = jnp.array([[1, 2], [0, 7]])  # the padded row's label is never read
    valid = jnp.array([[True, True], [True, False]])
    (loss, metrics), _ = model.apply(variables, x, boxes, labels, valid, train=True,
                                     method="loss", mutable=["batch_stats"])
    outputs, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    per_image = [yolo_v1_loss(outputs[i], yolo_v1_targets(
        boxes[i][valid[i]], labels[i][valid[i]], jnp.ones(int(valid[i].sum()), bool), (64, 64),
        8, 3)) for i in range(2)]
    np.testing.assert_allclose(float(loss), np.mean(per_image), rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)


def _decode_ref(out, size, b, score_threshold, iou, k):
    """Float64 loop over cells, predictors and classes: the paper's decode (sec. 2, "class-specific
    confidence scores for each box" conf * P(c); darknet v1 scores every class of every box),
    boxes clipped to under 1e-2 px dropped, then per-class NMS. The grid may be rectangular,
    `[S_h, S_w]`: x in cells of 1/S_w of the image width, y of 1/S_h of its height."""
    rows, cols = out.shape[:2]
    h, w = size
    boxes, scores, classes = [], [], []
    for row in range(rows):
        for col in range(cols):
            for j in range(b):
                x, y, sw, sh, conf = out[row, col, 5 * j:5 * j + 5]
                cx, cy = (col + x) / cols * w, (row + y) / rows * h
                bw, bh = sw * sw * w, sh * sh * h
                corners = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
                box = [min(max(v, 0), lim) for v, lim in zip(corners, [w, h, w, h], strict=True)]
                if box[2] - box[0] < 1e-2 or box[3] - box[1] < 1e-2:
                    continue  # wholly off the image
                for c, p in enumerate(out[row, col, 5 * b:]):
                    boxes.append(box)
                    scores.append(conf * p)
                    classes.append(c)
    boxes, scores, classes = np.array(boxes), np.array(scores), np.array(classes)
    keep = batched_nms_ref(boxes, scores, classes, iou, k, score_threshold)
    return boxes[keep], scores[keep], classes[keep]


def _assert_decodes_like_ref(out, size, b, score_threshold, iou, k):
    got = decode_yolo_v1(jnp.asarray(out), size, b, score_threshold, iou, k)
    boxes, scores, classes = _decode_ref(out.astype(np.float64), size, b, score_threshold, iou, k)
    n = len(scores)
    assert int(got.valid.sum()) == n and not np.asarray(got.valid[n:]).any()
    np.testing.assert_allclose(np.asarray(got.boxes[:n]), boxes.reshape(n, 4), atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.scores[:n]), scores, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.classes[:n]), classes)
    return n


@pytest.mark.parametrize("grid", [(4, 4), (2, 4), (5, 3)])
def test_decode_matches_float64_loop(grid):
    rng = np.random.default_rng(0)
    out = rng.uniform(0, 1, (*grid, 2 * 5 + 3)).astype(np.float32)
    assert 0 < _assert_decodes_like_ref(out, (48, 64), 2, 0.1, 0.5, 20) <= 20


def test_decode_on_a_rectangular_grid_by_hand():
    """A 2 x 4 output over a 32 x 64 image (cells 16 x 16 px): the predictor of cell (row 1,
    col 2) at offset (0.5, 0.5), size 0.5^2 of the image, is centred at x = 2.5 / 4 * 64 = 40,
    y = 1.5 / 2 * 32 = 24, 16 x 8 px: [32, 20, 48, 28]."""
    out = np.zeros((2, 4, 5 + 1), np.float32)
    out[1, 2] = [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    got = decode_yolo_v1(jnp.asarray(out), (32, 64), 1, 0.1, 0.5, 5)
    np.testing.assert_array_equal(np.asarray(got.valid), [True] + [False] * 4)
    np.testing.assert_allclose(np.asarray(got.boxes[0]), [32, 20, 48, 28], atol=1e-5)
    assert float(got.scores[0]) == pytest.approx(1.0) and int(got.classes[0]) == 0


def test_decode_scores_every_class_of_every_predictor():
    """A predictor (conf 0.9) in a cell with P = (0.50, 0.45), over an object of class 1, gives a
    class-1 detection (0.405) besides class 0's (0.45): each box has a score per class, and boxes
    of different classes never suppress each other. Keeping only a predictor's best class (the
    old decode) never found that object. The cell's second predictor, the same box with conf 0.5,
    is suppressed in each class by the first."""
    out = np.zeros((2, 2, 2 * 5 + 2), np.float32)
    out[0, 0, :10] = [0.5, 0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]
    out[0, 0, 10:] = [0.50, 0.45]
    out[1, 1, :5] = [0.2, 0.7, 0.3, 0.6, 0.8]  # a separate box, class 0 only scores
    out[1, 1, 10:] = [0.7, 0.0]
    assert _assert_decodes_like_ref(out, (32, 32), 2, 0.005, 0.5, 10) == 3
    got = decode_yolo_v1(jnp.asarray(out), (32, 32), 2, 0.005, 0.5, 10)
    np.testing.assert_allclose(np.asarray(got.scores[:3]), [0.56, 0.45, 0.405], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.classes[:3]), [0, 0, 1])
    np.testing.assert_allclose(np.asarray(got.boxes[1:3]), [[4, 4, 12, 12]] * 2, atol=1e-5)


def test_decode_drops_predictors_clipped_off_the_image():
    """A box wholly off the image clips to zero width: a sure false positive, dropped (as the
    R-CNN family's `detect_from_head` drops it), however well it scores."""
    out = np.zeros((2, 2, 5 + 2), np.float32)
    out[0, 0, :5] = [-3.0, 0.5, 0.3, 0.3, 0.9]  # centre 1.25 cells left of the image
    out[1, 1, :5] = [0.5, 0.5, 0.3, 0.3, 0.6]
    out[..., 5:] = [0.9, 0.1]
    assert _assert_decodes_like_ref(out, (64, 64), 1, 0.005, 0.5, 10) == 2
    got = decode_yolo_v1(jnp.asarray(out), (64, 64), 1, 0.005, 0.5, 10)
    np.testing.assert_allclose(np.asarray(got.boxes[:2, 2] - got.boxes[:2, 0]), 0.09 * 64,
                               rtol=1e-5)  # (sqrt_w = 0.3)**2 image widths


def test_decode_takes_traced_image_sizes_under_vmap():
    """Per-image sizes under `vmap` (as `yolo_v1_targets` takes them) decode as separate calls
    with Python sizes do."""
    rng = np.random.default_rng(2)
    outs = jnp.asarray(rng.uniform(0, 1, (2, 3, 3, 2 * 5 + 2)).astype(np.float32))
    sizes = jnp.array([[48, 64], [30, 20]])
    got = jax.vmap(lambda o, s: decode_yolo_v1(o, s, 2, 0.1, 0.5, 12))(outs, sizes)
    for i, size in enumerate([(48, 64), (30, 20)]):
        want = decode_yolo_v1(outs[i], size, 2, 0.1, 0.5, 12)
        assert int(want.valid.sum()) > 0
        for field in ("boxes", "scores", "classes", "valid"):
            np.testing.assert_allclose(getattr(got, field)[i], getattr(want, field), rtol=1e-6)
        assert got.boxes.dtype == want.boxes.dtype == jnp.float32


def test_detect_shapes_under_jit(small):
    model, variables, x = small
    det = jax.jit(lambda v, x: model.apply(v, x, method="detect"))(variables, x)
    assert det.boxes.shape == (2, 100, 4) and det.scores.shape == (2, 100)
    assert det.classes.dtype == jnp.int32 and det.valid.dtype == jnp.bool_
    assert np.all(np.asarray(det.boxes) >= 0) and np.all(np.asarray(det.boxes) <= 64)


@pytest.mark.parametrize("kwargs,message", [
    ({"layers": ()}, "YOLOv1: layers=() is invalid; expected a non-empty sequence"),
    ({"layers": ((8, 3, 0),)}, "YOLOv1: layers=((8, 3, 0),) is invalid"),
    ({"grid_size": 0}, "YOLOv1: grid_size=0 is invalid; expected a positive integer."),
    ({"nms_iou": True}, "YOLOv1: nms_iou=True is invalid; expected a number in [0, 1]."),
    ({"score_threshold": 1.0},
     "YOLOv1: score_threshold=1.0 is invalid; expected a number in [0, 1)."),
    ({"dropout_rate": 1.0}, "YOLOv1: dropout_rate=1.0 is invalid; expected a number in [0, 1)."),
    ({"lambda_coord": -5.0},
     "YOLOv1: lambda_coord=-5.0 is invalid; expected a finite number >= 0."),
    ({"lambda_noobj": float("nan")},
     "YOLOv1: lambda_noobj=nan is invalid; expected a finite number >= 0."),
    ({"lambda_noobj": True}, "YOLOv1: lambda_noobj=True is invalid"),
    ({"confidence_target": "IOU"},
     "YOLOv1: confidence_target='IOU' is invalid; expected one of ['iou', 'one']."),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError) as err:
        YOLOv1(**kwargs)
    assert str(err.value).startswith(message)


def test_loss_settings_are_refused_at_construction_not_at_the_first_step():
    """`create_model` refuses the loss settings the loss would refuse only once traced in the
    train step (same rule, `check_yolo_v1_loss_settings`); valid ones pass through."""
    with pytest.raises(ValueError, match=r"^YOLOv1: confidence_target='IOU' is invalid; "
                                         r"expected one of \['iou', 'one'\]\.$"):
        create_model("yolo_v1_small", confidence_target="IOU")
    with pytest.raises(ValueError, match=r"^YOLOv1: lambda_coord=-5.0 is invalid"):
        create_model("yolo_v1_small", lambda_coord=-5.0)
    with pytest.raises(ValueError, match=r"^YOLOv1: lambda_noobj=nan is invalid"):
        create_model("yolo_v1_small", lambda_noobj=float("nan"))
    model = create_model("yolo_v1_small", lambda_coord=0.0, lambda_noobj=1, confidence_target="one")
    assert (model.lambda_coord, model.lambda_noobj, model.confidence_target) == (0.0, 1, "one")


def test_decode_ignores_whatever_unscored_cells_hold():
    """Predictors scoring below the threshold never change the detections, even with NaN boxes
    (a NaN there used to enter batched_nms' class offsets and stop every suppression)."""
    rng = np.random.default_rng(1)
    out = rng.uniform(0, 1, (4, 4, 2 * 5 + 3)).astype(np.float32)
    out[0, :, [4, 9]] = 0.0  # row 0: both predictors' confidence 0, score 0 <= 0.1
    clean = decode_yolo_v1(jnp.asarray(out), (48, 64), 2, 0.1, 0.5, 100)
    dirty = out.copy()
    dirty[0, :, [0, 1, 2, 3, 5, 6, 7, 8]] = np.nan
    got = decode_yolo_v1(jnp.asarray(dirty), (48, 64), 2, 0.1, 0.5, 100)
    assert 0 < int(clean.valid.sum()) < 72  # of 3 classes x 24 scored predictors
    for field in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_array_equal(getattr(got, field), getattr(clean, field))


def test_numpy_integer_layer_sizes_are_valid():
    layers = ((np.int64(16), 3, 1), "M", (32, np.int32(3), 1))
    assert YOLOv1(layers=layers).layers == layers


@pytest.mark.parametrize("shape, b, size, message", [
    ((4, 4, 13), 3, (48, 64), "decode_yolo_v1: output.shape=(4, 4, 13) is invalid; expected "
                              "[S, S, B * 5 + C] with B = boxes_per_cell = 3 and C >= 1."),
    ((4, 4, 10), 2, (48, 64), "decode_yolo_v1: output.shape=(4, 4, 10) is invalid"),
    ((4, 13), 2, (48, 64), "decode_yolo_v1: output.shape=(4, 13) is invalid"),
    ((4, 4, 13), 0, (48, 64), "decode_yolo_v1: boxes_per_cell=0 is invalid; expected a positive "
                              "integer."),
    ((4, 4, 13), 2, (-48, 64), "decode_yolo_v1: image_size=(-48, 64) is invalid; expected "
                               "(height, width), two positive numbers."),
])
def test_decode_refuses_bad_inputs(shape, b, size, message):
    """These were a reshape TypeError, an empty-argmax error, an unpacking error, or (B = 0, a
    negative height) silently no detections."""
    with pytest.raises(ValueError) as err:
        decode_yolo_v1(jnp.zeros(shape), size, b, 0.1, 0.5, 20)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("n, labels, valid, message", [
    (1, None, None, "YOLOv1.loss: gt_boxes.shape=(1, 1, 4) is invalid; expected (2, G, 4) "
                    "(x1, y1, x2, y2) for 2 images."),
    (2, np.array([[1.7], [0.2]]), None,
     "YOLOv1.loss: gt_labels.dtype='float64' is invalid; expected an integer array"),
    # the checks the R-CNN family shares (detection.ground_truth): class range, boxes, dtype
    (2, np.array([[1], [3]]), None,
     "YOLOv1.loss: gt_labels[1, 0]=3 is invalid; expected a class in [0, 3)"),
    (2, None, np.ones((2, 1), np.int32),
     "YOLOv1.loss: gt_valid.dtype='int32' is invalid; expected a bool array."),
    (2, np.array([1, 0]), None,
     "YOLOv1.loss: gt_labels.shape=(2,) is invalid; expected (2, 1), one per gt box."),
    (2, None, np.array([[True, False], [True, True]]),
     "YOLOv1.loss: gt_valid.shape=(2, 2) is invalid; expected (2, 1), one per gt box."),
])
def test_loss_refuses_mismatched_ground_truth(small, n, labels, valid, message):
    """A batch mismatch was JAX's vmap error; float labels were truncated (1.7 -> class 1)."""
    model, variables, x = small
    boxes = np.array([[[4.0, 4, 20, 20]], [[0, 0, 10, 10]]])[:n]
    labels = np.array([[1], [0]]) if labels is None else labels
    valid = np.ones((2, 1), bool) if valid is None else valid
    with pytest.raises(ValueError) as err:
        model.apply(variables, x, boxes, labels, valid, method="loss", mutable=["batch_stats"])
    assert str(err.value).startswith(message)


def test_loss_refuses_a_valid_box_without_area(small):
    """As torchvision's detectors do: a zero-width box was accepted, its cell trained towards an
    object whose confidence target (the IoU) is always 0. As padding (`gt_valid` False): fine."""
    model, variables, x = small
    boxes = np.array([[[4.0, 4, 20, 20]], [[10, 0, 10, 10]]])
    labels = np.array([[1], [0]])
    with pytest.raises(ValueError) as err:
        model.apply(variables, x, boxes, labels, np.ones((2, 1), bool), method="loss",
                    mutable=["batch_stats"])
    assert str(err.value).startswith(
        "YOLOv1.loss: gt_boxes[1, 0]=[10.0, 0.0, 10.0, 10.0] is invalid; expected a positive "
        "width and height (x1 < x2 and y1 < y2)")
    (loss, _), _ = jax.eval_shape(lambda v, x: model.apply(
        v, x, boxes, labels, np.array([[True], [False]]), method="loss", mutable=["batch_stats"]),
        variables, x)
    assert loss.shape == ()


def test_train_must_be_a_bool(small):
    """train="False" is truthy: __call__ and loss ran BatchNorm on batch statistics (and dropout)
    silently, `yolo_v1_small`'s outputs 1.6 from eval mode's; the R-CNN family refuses it."""
    model, variables, x = small
    message = re.escape("YOLOv1: train='False' is invalid; expected True or False.")
    with pytest.raises(ValueError, match=message):
        model.apply(variables, x, "False", mutable=["batch_stats"])
    with pytest.raises(ValueError, match=message):
        model.apply(variables, x, np.zeros((2, 0, 4)), np.zeros((2, 0), int),
                    np.zeros((2, 0), bool), "False", method="loss", mutable=["batch_stats"])


def test_training_without_a_dropout_key_names_the_rate():
    """Was flax's InvalidRngError from inside the Dropout layer, naming neither model nor rate."""
    model = create_model("yolo_v1_small", dropout_rate=0.5)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match=re.escape(
            "YOLOv1: train=True is invalid; dropout_rate=0.5 draws random masks in training: pass "
            "rngs={'dropout': key} to apply, or train=False.")):
        jax.eval_shape(lambda v, x: model.apply(v, x, True, mutable=["batch_stats"]),
                       variables, x)


def test_a_batch_of_no_images_gives_no_rows_of_outputs():
    """`x.reshape(0, -1)` is ambiguous: a batch of 0 failed with a ZeroDivisionError from inside
    JAX, where the other detectors and segmenters return an empty batch."""
    model = create_model("yolo_v1_small")
    x = jax.ShapeDtypeStruct((0, *model_info("yolo_v1_small").input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (0, model.grid_size, model.grid_size, model.cell_outputs)
    with pytest.raises(ValueError, match=re.escape(  # the loss, a mean over images, was NaN
            "YOLOv1.loss: images.shape=(0, 64, 64, 3) is invalid; expected at least one image")):
        jax.eval_shape(lambda v, x: model.apply(
            v, x, np.zeros((0, 1, 4)), np.zeros((0, 1), int), np.zeros((0, 1), bool),
            method="loss", mutable=["batch_stats"]), variables, x)
