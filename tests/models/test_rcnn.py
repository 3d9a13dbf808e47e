"""R-CNN and Fast R-CNN on window proposals: the windows, the shared RoI loss, gradients, and
R-CNN's warps being the image regions resampled (compiling a detector is `slow`)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import create_model, list_models
from cnnjax.models.faster_rcnn import FasterRCNN
from cnnjax.models.rcnn import RCNN, FastRCNN, SPPNet, window_proposals
from tests.models.detectors import (
    BAD_GROUND_TRUTH,
    assert_eager_detect_equals_jitted,
    trace_loss,
    with_defaults,
)

BOXES = jnp.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 0, 10, 10], [0, 0, 0, 0]]])
LABELS = jnp.array([[1, 2], [3, 0]])
VALID = jnp.array([[True, True], [True, False]])


def test_window_proposals_by_hand():
    got = window_proposals((10, 12), (4, 10), 4)
    # Side 4: x in {0, 4, 8}, y in {0, 4, 6} (6 = flush with the bottom edge); side 10: x in
    # {0, 2}, y in {0}.
    want = [[x, y, x + 4, y + 4] for y in (0, 4, 6) for x in (0, 4, 8)]
    want += [[0, 0, 10, 10], [2, 0, 12, 10]]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    with pytest.raises(ValueError, match=r"window_proposals: sizes=\(11,\) is invalid; expected "
                                         r"sides <= 10"):
        window_proposals((10, 12), (11,), 4)
    with pytest.raises(ValueError, match=re.escape(
            "window_proposals: sizes[1]=-1 is invalid; expected a positive integer.")):
        window_proposals((10, 12), (4, -1), 4)
    assert window_proposals(np.array([10, 12]), np.array([4, 10]), 4).shape == (11, 4)


@pytest.mark.parametrize("image_size, sizes, message", [
    # Were a TypeError, NumPy's "need at least one array", "sides <= 0" and an unpack error;
    # a fractional image size was used as given.
    ((10, 12), 4, "sizes=4 is invalid; expected a non-empty sequence of positive ints"),
    ((10, 12), (), "sizes=() is invalid; expected a non-empty sequence"),
    ((0, 12), (4,), "image_size=(0, 12) is invalid; expected every entry >= 1."),
    ((10, 12, 3), (4,), "image_size=(10, 12, 3) is invalid; expected an int or a pair of ints."),
    ((10.5, 12), (4,), "image_size=(10.5, 12) is invalid; expected an int or a pair of ints."),
])
def test_window_proposals_refuses_bad_arguments(image_size, sizes, message):
    with pytest.raises(ValueError) as err:
        window_proposals(image_size, sizes, 4)
    assert str(err.value).startswith(f"window_proposals: {message}")


def test_registered():
    assert {"fast_rcnn_small", "rcnn_small", "sppnet_small"} <= set(list_models(task="detection"))


@pytest.mark.parametrize("kwargs,message", [
    ({"proposal_sizes": ()}, "FastRCNN: proposal_sizes=() is invalid"),
    ({"roi_size": 0}, "FastRCNN: roi_size=0 is invalid; expected a positive integer."),
    ({"nms_iou": -1}, "FastRCNN: nms_iou=-1 is invalid; expected a number in [0, 1]."),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError) as err:
        FastRCNN(**kwargs)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError, match="RCNN: warp_size=0 is invalid"):
        RCNN(warp_size=0)
    with pytest.raises(ValueError, match=re.escape(
            "RCNN: context_padding=12 is invalid; expected an integer in [0, 11] (warped pixels "
            "per side, less than half of warp_size=24).")):
        RCNN(context_padding=12)
    with pytest.raises(ValueError, match=re.escape(  # was a max_pool2d error when traced
            "RCNN: warp_size=7 is invalid; expected at least 8 = 2**len(cnn_stages)")):
        RCNN(warp_size=7, context_padding=1)
    for cls in (FastRCNN, RCNN, FasterRCNN):
        with pytest.raises(ValueError, match=re.escape(
                f"{cls.__name__}: roi_sample_positions='exact' is invalid; expected "
                "'torchvision' (torchvision's positions, through a host callback")):
            cls(roi_sample_positions="exact")
    for levels in ((2, 0), (), 3):
        with pytest.raises(ValueError, match=re.escape(
                f"SPPNet: pyramid_levels={levels!r} is invalid; expected a non-empty sequence of "
                "positive ints (the bins per side of each level).")):
            SPPNet(pyramid_levels=levels)
    with pytest.raises(ValueError, match="SPPNet: head_features=0 is invalid"):
        SPPNet(head_features=0)


def test_sppnet_head_reads_each_windows_pyramid_of_the_shared_map():
    """The head's input is `roi_spatial_pyramid_pool` of the backbone's map at stride 8."""
    from cnnjax.layers.roi import roi_spatial_pyramid_pool

    model = SPPNet(num_classes=2, backbone_stages=((4,), (4,), (8,)), head_features=16,
                   pyramid_levels=(1, 2))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    captured = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "backbone":
            captured["map"] = out["block3"]
        if context.module.name == "head":
            captured["pooled"] = args[0]
        return out

    variables = jax.jit(model.init)(jax.random.key(0), images)
    with nn.intercept_methods(spy):
        logits, deltas, windows = model.apply(variables, images)
    n, r = windows.shape[:2]
    assert logits.shape == (2, r, 3) and deltas.shape == (2, r, 3, 4)
    want = roi_spatial_pyramid_pool(captured["map"], windows.reshape(n * r, 4),
                                    jnp.repeat(jnp.arange(n), r), (1, 2), 1 / 8)
    assert captured["pooled"].shape == (n * r, 8 * (1 + 4))
    np.testing.assert_array_equal(captured["pooled"], want)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [FastRCNN, SPPNet])
def test_detect_on_an_image_off_the_stride_is_the_same_eager_and_under_jit(cls):
    """60 px at stride 8: the 7x7 map covers 56 px, and the windows flush with the image's far
    edge reach 60 px. RoI pooling clamps them to the map under jit (torchvision's rule); eager
    (concrete boxes, checked) must accept them and give the same detections."""
    model = cls(num_classes=3, backbone_stages=((4,), (4,), (8,)), head_features=16,
                max_detections=10)
    x = jax.random.normal(jax.random.key(0), (1, 60, 60, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert float(model.apply({}, x, method="windows")[0].max()) == 60.0
    assert_eager_detect_equals_jitted(model, variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("name,trunk", [("fast_rcnn_small", "backbone"), ("rcnn_small", "cnn"),
                                        ("sppnet_small", "backbone")])
def test_loss_gradients_and_detections(name, trunk):
    model = create_model(name, roi_samples=16, max_detections=10)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    logits, deltas, windows = model.apply(variables, x)
    p = len(window_proposals((64, 64), model.proposal_sizes, model.proposal_stride))
    assert logits.shape == (2, p, 5) and deltas.shape == (2, p, 5, 4) and windows.shape == (2, p, 4)

    def loss(params):
        (value, terms), _ = model.apply(
            {**variables, "params": params}, x, BOXES, LABELS, VALID, train=True, method="loss",
            mutable=["batch_stats"], rngs={"sample": jax.random.key(2)})
        return value, terms

    (value, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    np.testing.assert_allclose(float(value), float(terms["classification"] + terms["box"]),
                               rtol=1e-6)
    assert abs(float(terms["classification"]) - np.log(5)) < 0.3  # untrained: ~uniform
    for part in (trunk, "head"):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[part]))
        assert np.isfinite(norm) and norm > 0
    det = jax.jit(lambda v, x: model.apply(v, x, method="detect"))(variables, x)
    assert det.boxes.shape == (2, 10, 4) and det.valid.all()  # low threshold: 10 survive


@pytest.mark.slow
@pytest.mark.parametrize("context", [0, 1])
def test_rcnn_warps_are_the_image_regions(context):
    # An image that is linear in x and y: RoIAlign's warp of a region samples the same plane,
    # so the warp of window (x1, y1, x2, y2) at bin centres is known in closed form. With
    # context padding p the warped region is the window scaled by 8 / (8 - 2p) about its centre
    # (the paper's dilation), so the window itself fills the central 8 - 2p bins.
    model = RCNN(num_classes=2, warp_size=8, context_padding=context)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    image = np.stack([xx, yy, xx + yy], -1)[None].astype(np.float32)
    captured = {}

    def spy(next_fun, args, kwargs, context):
        if context.module.name == "cnn":
            captured["warps"] = args[0]
        return next_fun(*args, **kwargs)

    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(image))
    with nn.intercept_methods(spy):
        model.apply(variables, jnp.asarray(image))
    windows = window_proposals((64, 64), model.proposal_sizes, model.proposal_stride)
    scale = 8 / (8 - 2 * context)
    centres, halves = (windows[:, :2] + windows[:, 2:]) / 2, (windows[:, 2:] - windows[:, :2]) / 2
    regions = np.concatenate([centres - scale * halves, centres + scale * halves], axis=1)
    warps = np.asarray(captured["warps"])
    interior = np.flatnonzero((regions[:, :2] >= 1).all(1) & (regions[:, 2:] <= 63).all(1))
    assert len(interior) > 30  # (at the border, bilinear samples clamp to the edge pixel)
    for k in interior:
        x1, y1, x2, y2 = regions[k]
        cx = x1 + (np.arange(8) + 0.5) * (x2 - x1) / 8  # bin centres, aligned=True
        cy = y1 + (np.arange(8) + 0.5) * (y2 - y1) / 8
        np.testing.assert_allclose(warps[k, :, :, 0], np.broadcast_to(cx[None], (8, 8)),
                                   atol=1e-4)
        np.testing.assert_allclose(warps[k, :, :, 1], np.broadcast_to(cy[:, None], (8, 8)),
                                   atol=1e-4)


@pytest.mark.parametrize("name", list_models(task="detection"))
def test_every_detector_passes_the_engine_input_check(name):
    """The engine traces `init` under a method interceptor before compiling (train/checks.py):
    hyperparameter checks must not be module methods that run before binding."""
    from cnnjax.models import model_info
    from cnnjax.train import checks

    info = model_info(name)
    checks.check_input_size(create_model(name, axis_name="data"), name, info.input_shape,
                            info.min_input_size)


def test_external_proposals_replace_the_windows():
    model = create_model("fast_rcnn_small")
    images = jnp.zeros((2, 64, 64, 3))
    rois, valid = model.apply({}, images, method="windows")
    p = len(window_proposals((64, 64), model.proposal_sizes, model.proposal_stride))
    assert rois.shape == (2, p, 4) and bool(valid.all())
    given = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    flags = jnp.array([[True, False, True], [False, False, False]])
    rois, valid = model.apply({}, images, given, flags, method="windows")
    np.testing.assert_array_equal(rois, jnp.where(flags[..., None], given, 0))  # padding zeroed
    np.testing.assert_array_equal(valid, flags)
    _, valid = model.apply({}, images, given, method="windows")  # no flags: all valid
    assert valid.shape == (2, 3) and bool(valid.all())
    with pytest.raises(ValueError, match=re.escape(
            "FastRCNN: proposals='array of shape (3, 3, 4)' is invalid; expected [2, P, 4]")):
        model.apply({}, images, jnp.zeros((3, 3, 4)), method="windows")
    with pytest.raises(ValueError, match=re.escape(
            "FastRCNN: proposal_valid='array of shape (2, 4)' is invalid; expected (2, 3), one "
            "flag per proposal.")):
        model.apply({}, images, given, jnp.ones((2, 4), bool), method="windows")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fast_rcnn_small", "rcnn_small", "sppnet_small"])
def test_loss_and_detections_use_only_the_valid_external_proposals(name):
    # Room for every candidate (3 valid proposals x 4 classes), so NMS alone decides.
    model = create_model(name, roi_samples=8, max_detections=16, score_threshold=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    # The first two proposals of each image overlap (IoU > 0.5): NMS has work to do.
    proposals = jnp.array([[[2.0, 2, 22, 22], [3, 3, 23, 23], [30, 28, 52, 62], [0, 0, 64, 64]],
                           [[1, 1, 9, 12], [1, 1, 9, 11], [40, 40, 60, 60], [0, 0, 0, 0]]])
    valid = jnp.array([[True, True, True, False], [True, True, True, False]])
    detect = jax.jit(lambda v, x, p, m: model.apply(v, x, p, m, method="detect"))
    det = detect(variables, x, proposals, valid)
    # Every detection is a valid proposal moved by its class's deltas: score it on the valid
    # proposals alone and the same detections come back.
    alone = jax.jit(lambda v, x, p: model.apply(v, x, p, method="detect"))(
        variables, x, proposals[:, :3])
    for field in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_allclose(getattr(det, field), getattr(alone, field), atol=1e-5)
    assert det.valid.any() and int(det.valid[0].sum()) < 12  # some suppressed
    # Padded proposals may hold anything (`sample_rois`' promise): NaN, inf or huge boxes there
    # change nothing (a NaN row used to enter batched_nms' class offsets and stop all NMS).
    for garbage in ([jnp.nan] * 4, [jnp.inf, -jnp.inf, jnp.inf, 1e30], [0, 0, 1e30, 1e30]):
        dirty = proposals.at[:, 3].set(jnp.array(garbage, jnp.float32))
        got = detect(variables, x, dirty, valid)
        for field in ("boxes", "scores", "classes", "valid"):
            np.testing.assert_array_equal(getattr(got, field), getattr(det, field))

    def loss(params, p, m):
        (value, terms), _ = model.apply(
            {**variables, "params": params}, x, BOXES, LABELS, VALID, True, p, m,
            method="loss", mutable=["batch_stats"], rngs={"sample": jax.random.key(2)})
        return value

    value = jax.jit(loss)(variables["params"], proposals, valid)
    dense = jax.jit(lambda params: loss(params, None, None))(variables["params"])
    assert np.isfinite(float(value)) and float(value) != float(dense)


def test_numpy_integers_are_valid_sizes():
    """Sizes computed with NumPy (np.int64) are integers, as check_positive_int has it."""
    assert FastRCNN(proposal_sizes=tuple(np.array([12, 18]))).proposal_sizes == (12, 18)
    assert RCNN(context_padding=np.int64(2)).context_padding == 2
    with pytest.raises(ValueError, match=re.escape("FastRCNN: proposal_sizes=(12, 1.5) is ")):
        FastRCNN(proposal_sizes=(12, 1.5))


@pytest.mark.parametrize("gt, message", BAD_GROUND_TRUTH)
@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN])
def test_loss_refuses_bad_ground_truth(cls, gt, message):
    """Before tracing: a batch mismatch was JAX's vmap error, float labels were truncated, -1
    became background, label C a NaN loss, and a NaN or inverted gt box was silently dropped."""
    with pytest.raises(ValueError) as err:
        trace_loss(cls(num_classes=4), with_defaults(gt))
    assert str(err.value).startswith(f"{cls.__name__}.loss: {message}")


PROPOSALS = np.array([[[2.0, 2, 22, 22], [3, 3, 23, 23]], [[1, 1, 9, 12], [0, 0, 0, 0]]])


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN])
@pytest.mark.parametrize("size, proposals, valid, message", [
    (20, None, None, "proposal_sizes=(12, 18, 26) is invalid; expected sizes <= the images' "
                     "height and width (input.shape=(2, 20, 20, 3)) for the dense windows"),
    (64, PROPOSALS, PROPOSALS[..., 2] > 5.0, None),  # a bool mask: fine
    (64, PROPOSALS, np.ones((2, 2)), "proposal_valid.dtype='float64' is invalid; expected a "
                                     "bool array."),  # was cast: 0.5 read as True
    (64, np.where(np.arange(4) == 2, np.nan, PROPOSALS), None,
     "proposals[0, 0]=[2.0, 2.0, nan, 22.0] is invalid; expected finite coordinates."),
    (64, PROPOSALS[..., ::-1], np.array([[False, False], [True, False]]),
     "proposals[1, 0]=[12.0, 9.0, 1.0, 1.0] is invalid; expected x1 <= x2"),
    # was roi_align's (roi_spatial_pyramid_pool's) error on `boxes[3]` of the flattened RoIs
    (64, np.where(np.arange(4) == 1, -2.0, PROPOSALS), None,
     "proposals[0, 0]=[2.0, -2.0, 22.0, 22.0] is invalid; boxes must lie inside the image, "
     "x1 >= 0 and y1 >= 0"),
])
def test_detect_checks_the_regions(cls, size, proposals, valid, message):
    """Eager (concrete) proposals are checked as gt boxes are; under jit they went to roi_align
    unchecked."""
    model = cls(num_classes=4)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(
        (2, 64, 64, 3), jnp.float32))

    def detect():
        return jax.eval_shape(lambda v, x: model.apply(v, x, proposals, valid, method="detect"),
                              variables, x)

    if message is None:
        assert detect().boxes.shape == (2, 100, 4)
        return
    with pytest.raises(ValueError) as err:
        detect()
    assert str(err.value).startswith(f"{cls.__name__}: {message}")


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN, FasterRCNN])
def test_detect_on_no_images_and_no_proposals(cls):
    """A batch of 0 images, or 0 external proposals: was a reshape ZeroDivisionError (`-1` in
    a reshape of 0 elements); gives all-padding detections."""
    model = cls(num_classes=4, max_detections=5)
    x = jax.ShapeDtypeStruct((0, 64, 64, 3), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, method="detect")[0],
                         x)
    assert out.boxes.shape == (0, 5, 4)
    if cls is FasterRCNN:
        return
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, np.zeros((2, 0, 4)), method="detect"),
                         variables, x)
    assert out.boxes.shape == (2, 5, 4)


def test_shared_map_detectors_refuse_images_below_the_stride():
    """With external proposals a 6x6 image reached the backbone: a max_pool2d error."""
    for cls in (FastRCNN, SPPNet):
        x = jnp.zeros((1, 6, 6, 3))
        with pytest.raises(ValueError, match=re.escape(
                f"{cls.__name__}: input.shape=(1, 6, 6, 3) is invalid; expected height and width "
                ">= 8 (the backbone's stride, 2**len(backbone_stages)).")):
            jax.eval_shape(lambda x: cls(num_classes=4).init(  # noqa: B023
                jax.random.key(0), x, proposals=np.array([[[0.0, 0, 4, 4]]])), x)


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet])
def test_shared_map_pooling_against_torchvision(cls):
    """The head's input is torchvision's `roi_align` (Fast R-CNN: 4x4, sampling ratio 2,
    aligned) or `roi_pool` per pyramid level (SPP-net) of the backbone's map at
    `spatial_scale = 1/8`, each image's RoIs on its own map: the logits and deltas of `score`
    equal the head applied to torchvision's pooled features (NCHW -> NHWC)."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    from cnnjax.models.faster_rcnn import BoxHead

    model = cls(num_classes=2, backbone_stages=((4,), (4,), (8,)), head_features=16)
    x = jax.random.normal(jax.random.key(0), (2, 40, 48, 3))
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 30, (2, 5, 2))
    rois = np.concatenate([xy, np.minimum(xy + rng.uniform(4, 24, (2, 5, 2)), [48, 40])], -1)
    rois = rois.astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    logits, deltas = jax.jit(lambda v, x, r: model.apply(v, x, r, False, method="score"))(
        variables, x, rois)
    features = model.apply(variables, x, method=lambda m, x: m.backbone(x, False)["block3"])
    nchw = torch.tensor(np.asarray(features).transpose(0, 3, 1, 2))
    boxes = [torch.tensor(r) for r in rois]
    if cls is FastRCNN:
        pooled = [ops.roi_align(nchw, boxes, 4, 1 / 8, sampling_ratio=2, aligned=True)]
    else:
        pooled = [ops.roi_pool(nchw, boxes, level, 1 / 8) for level in model.pyramid_levels]
    flat = np.concatenate([p.numpy().transpose(0, 2, 3, 1).reshape(10, -1) for p in pooled], 1)
    want_logits, want_deltas = BoxHead(2, 16).apply({"params": variables["params"]["head"]},
                                                    jnp.asarray(flat))
    np.testing.assert_allclose(logits.reshape(10, -1), want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas.reshape(10, 3, 4), want_deltas, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rois, message", [
    (np.zeros((1, 3, 4)), "rois.shape=(1, 3, 4) is invalid; expected (2, R, 4)"),  # image 0's
    (np.zeros((3, 3, 4)), "rois.shape=(3, 3, 4) is invalid; expected (2, R, 4)"),
    (np.array([[[0.0, 0, 10, np.nan]]] * 2), "rois[0, 0]=[0.0, 0.0, 10.0, nan] is invalid"),
])
def test_region_features_checks_the_rois(rois, message):
    """A batch of RoIs that did not match the images was read silently (1 of 2: image 0 only)."""
    model = RCNN(num_classes=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError) as err:
        jax.eval_shape(lambda v, x: model.apply(v, x, rois, method="region_features"),
                       variables, x)
    assert str(err.value).startswith(f"RCNN.region_features: {message}")


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN, FasterRCNN])
def test_train_must_be_a_bool(cls):
    """train="False" is truthy: loss trained BatchNorm with it silently, __call__ failed in flax."""
    model = cls(num_classes=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    message = re.escape(f"{cls.__name__}: train='False' is invalid; expected True or False.")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda v, x: model.apply(v, x, "False"), variables, x)
    with pytest.raises(ValueError, match=message):
        trace_loss(model, (*with_defaults((None, None, None)), "False"))


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN, FasterRCNN])
def test_loss_refuses_a_batch_of_no_images(cls):
    """The loss is a mean over the images: of none it was NaN, silently (torchvision's
    detectors fail on an empty batch too)."""
    model = cls(num_classes=4)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    with pytest.raises(ValueError, match=re.escape(
            f"{cls.__name__}.loss: images.shape=(0, 64, 64, 3) is invalid; expected at least one "
            "image: the loss is a mean over the images (of 0 images, NaN).")):
        jax.eval_shape(lambda v, x: model.apply(
            v, x, np.zeros((0, 1, 4)), np.zeros((0, 1), int), np.zeros((0, 1), bool),
            method="loss", mutable=["batch_stats"], rngs={"sample": jax.random.key(1)}),
            variables, jax.ShapeDtypeStruct((0, 64, 64, 3), jnp.float32))


@pytest.mark.parametrize("method", ["loss", "detect"])
@pytest.mark.parametrize("name", ["fast_rcnn_small", "sppnet_small", "rcnn_small",
                                  "faster_rcnn_small", "yolo_v1_small"])
def test_loss_and_detect_refuse_integer_images(name, method):
    """uint8 pixels 0..255 went through the backbone as unnormalized floats in `loss` and
    `detect` too (`__call__` is tests/models/test_registry.py's): refused before tracing."""
    model = create_model(name, num_classes=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
    args = with_defaults((None, None, None)) if method == "loss" else ()
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: input\.dtype='uint8' is "
                                         r"invalid; expected floating-point images"):
        jax.eval_shape(lambda x: model.apply({"params": {}}, x, *args, method=method,
                                             mutable=["batch_stats"],
                                             rngs={"sample": jax.random.key(1)}), x)


def test_rcnn_refuses_training_on_no_proposals():
    """R-CNN's CNN runs on the warps: 0 external proposals in training gave it a batch of none,
    and every BatchNorm running mean and variance became NaN. Eval on them still works
    (test_detect_on_no_images_and_no_proposals)."""
    model = RCNN(num_classes=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    with pytest.raises(ValueError, match=re.escape(
            "RCNN: train=True is invalid; 0 regions (proposals.shape=(2, 0, 4)) have nothing to "
            "train on (and BatchNorm's statistics of no warps are NaN): pass train=False.")):
        jax.eval_shape(lambda x: model.apply({"params": {}}, x, True, proposals=np.zeros((2, 0, 4)),
                                             mutable=["batch_stats"]), x)


@pytest.mark.parametrize("cls, sampled", [(FastRCNN, "RoIs"), (SPPNet, "RoIs"), (RCNN, "RoIs"),
                                          (FasterRCNN, "anchors and RoIs")])
def test_loss_without_a_sample_key_says_how_to_pass_one(cls, sampled):
    """Was flax's InvalidRngError ('None needs PRNG for "sample"'), naming neither the model nor
    what the key is for."""
    model = cls(num_classes=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match=re.escape(
            f"{cls.__name__}.loss: the loss samples {sampled} at random, which needs a 'sample' "
            "PRNG key: pass rngs={'sample': key} to apply.")):
        jax.eval_shape(lambda v, x: model.apply(v, x, *with_defaults((None, None, None)),
                                                method="loss", mutable=["batch_stats"]),
                       variables, x)


@pytest.mark.parametrize("cls", [FastRCNN, SPPNet, RCNN, FasterRCNN])
def test_loss_checks_only_the_valid_ground_truth_rows(cls):
    """Padded rows (`gt_valid` False) may hold anything, as sample_rois promises: NaN or
    inverted boxes and labels outside [0, C) there are not refused."""
    boxes = np.array([[[4.0, 4, 20, 20], [np.nan, np.inf, -5, 3]], [[np.nan] * 4, [9, 0, 0, 9]]])
    labels = np.array([[1, -9], [99, 7]])
    valid = np.array([[True, False], [False, False]])
    (loss, _), _ = trace_loss(cls(num_classes=4), (boxes, labels, valid))
    assert loss.shape == ()


_TINY = {FastRCNN: {"backbone_stages": ((4,), (8,)), "head_features": 8},
         RCNN: {"cnn_stages": ((4,), (8,)), "warp_size": 8, "head_features": 8},
         FasterRCNN: {"backbone_stages": ((4,), (8,)), "rpn_channels": 8, "rpn_pre_nms_test": 50,
                      "rpn_post_nms_test": 8, "head_features": 8, "anchor_scales": (3.0,)}}


@pytest.mark.slow
@pytest.mark.parametrize("cls", [FastRCNN, RCNN, FasterRCNN])
def test_detectors_with_kernel_roi_sample_positions_export_for_cpu(cls):
    """roi_align of traced boxes on CPU takes torchvision's sample positions from a host
    callback, so `jax.export` could not serialize a detector's `detect` (NotImplementedError:
    'serialization of host_callbacks is not yet implemented'). `roi_sample_positions='kernel'`
    (roi_align's `sample_positions`) serializes, and the deserialized program gives the jitted
    detector's detections bit for bit (`Detections` is registered for export's serialization)."""
    model = cls(num_classes=2, max_detections=5, roi_sample_positions="kernel", **_TINY[cls])
    x = jax.random.normal(jax.random.key(0), (1, 24, 24, 3))
    proposals = jnp.array([[[1.0, 2.0, 20.5, 13.0], [0.0, 0.0, 24.0, 24.0], [5.0, 7.0, 9.0, 8.0]]])
    args = (x,) if cls is FasterRCNN else (x, proposals)
    variables = jax.jit(model.init)(jax.random.key(1), x, **(
        {} if cls is FasterRCNN else {"proposals": proposals}))

    def detect(variables, *args):
        return model.apply(variables, *args, method="detect")

    exported = jax.export.export(jax.jit(detect), platforms=["cpu"])(variables, *args)
    restored = jax.export.deserialize(exported.serialize())
    got, expected = restored.call(variables, *args), jax.jit(detect)(variables, *args)
    assert bool(expected.valid.any())
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    default = model.clone(roi_sample_positions="torchvision")
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        jax.export.export(jax.jit(lambda v, *a: default.apply(v, *a, method="detect")),
                          platforms=["cpu"])(variables, *args).serialize()


def test_rcnn_batch_norm_statistics_come_from_the_sampled_regions_only():
    """R-CNN's CNN runs in training on every row `sample_rois` returns, padding included: with
    selective search (~40 boxes a scene) ~18 of rcnn_shapes' 32 rows per image were padding, all
    warps of a zero box, and they made up more than half of the BatchNorm statistics (and the
    running means and variances the eval normalizes with). Here 3 candidates fill 3 of 8 rows
    (the 2 foreground fit the 25% cap, deterministic for any key): the training step's BatchNorm
    update must be that of the 3 sampled warps alone."""
    model = RCNN(num_classes=2, roi_samples=8, context_padding=2, cnn_stages=((4,), (8,)),
                 head_features=8)
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, proposals=jnp.zeros((1, 1, 4)))
    gt = jnp.array([[[4.0, 5, 20, 22]]])
    proposals = jnp.array([[[5.0, 5, 20, 21], [22, 2, 31, 12]]])  # foreground, background
    sampled = jnp.concatenate([proposals[:, :1], gt, proposals[:, 1:]], axis=1)  # fg, gt, bg

    @jax.jit  # one program: op by op, the sampler and the CNN took ~2x longer
    def updates():
        _, trained = model.apply(variables, x, gt, jnp.array([[0]]), jnp.array([[True]]), True,
                                 proposals, method="loss", mutable=["batch_stats"],
                                 rngs={"sample": jax.random.key(2)})
        _, alone = model.apply(variables, x, sampled, True, method="warped_features",
                               mutable=["batch_stats"])
        return trained, alone

    trained, alone = updates()
    for path, value in jax.tree_util.tree_leaves_with_path(trained["batch_stats"]):
        expected = alone["batch_stats"]
        for key in path:
            expected = expected[key.key]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_rcnn_batch_norm_statistics_do_not_depend_on_the_device_count():
    """R-CNN's CNN counts only the sampled warps in its BatchNorm statistics. Across devices
    flax averaged each device's masked mean with equal weight, and a device without a valid
    row fell back to all of its padding rows, so 2 devices trained other statistics than 1
    device holding the same global batch. Devices are simulated with vmap's named axis."""
    kwargs = dict(num_classes=2, warp_size=8, cnn_stages=((4,),), head_features=8)
    sharded, single = RCNN(axis_name="devices", **kwargs), RCNN(**kwargs)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)  # [shards, N, H, W, C]
    corners = rng.uniform(0, 14, (2, 2, 5, 2))
    rois = np.concatenate([corners, corners + rng.uniform(4, 16, (2, 2, 5, 2))], -1)
    valid = np.zeros((2, 2, 5), bool)
    valid[1, 0, :3] = valid[1, 1, :1] = True  # shard 0: none valid; shard 1: 4 of 10

    @jax.jit
    def both(images, rois, valid):  # init and both runs in one program: one compilation
        variables = single.init(jax.random.key(0), images[0])

        def stats(model, images, rois, valid):
            _, state = model.apply(variables, images, rois, True, valid,
                                   method="warped_features", mutable=["batch_stats"])
            return state["batch_stats"]

        per_device = jax.vmap(lambda *a: stats(sharded, *a), axis_name="devices")(
            images, rois, valid)
        whole = stats(single, *(a.reshape(4, *a.shape[2:]) for a in (images, rois, valid)))
        return per_device, whole

    per_device, whole = both(jnp.asarray(images), jnp.asarray(rois, jnp.float32),
                             jnp.asarray(valid))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
                 per_device, whole)
