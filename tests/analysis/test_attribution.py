"""`cnnjax.analysis.attribution` against float64 NumPy references: saliency and occlusion of a
linear classifier (whose gradient is its weight), Grad-CAM of a global-average-pooled network
(where it equals the class activation map, Selvaraju et al. 2017 §3.1), plus layers, filters, the
pointing game, plots and every refused input."""

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.analysis import attribution as at
from cnnjax.models.registry import create_model

SHAPE = (12, 10, 2)
CLASSES = 3


class Linear(nn.Module):
    """logits = flatten(x) @ W + b: no `train` argument, one Dense."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))


class Twice(nn.Module):
    """One convolution applied twice (a shared module), then a pooled head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = nn.Conv(x.shape[-1], (3, 3), name="shared")
        return nn.Dense(CLASSES, name="head")(conv(conv(x)).mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def linear():
    model = Linear()
    rng = np.random.RandomState(0)
    images = rng.randn(4, *SHAPE).astype(np.float32)
    variables = model.init(jax.random.key(1), images[:1])
    kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["head"]["bias"], np.float64)
    return model, variables, images, kernel, bias


@pytest.fixture(scope="module")
def resnet():
    model = create_model("resnet20_cifar", num_classes=4)
    images = np.random.RandomState(2).randn(3, 32, 32, 3).astype(np.float32)
    return model, model.init(jax.random.key(0), images[:1], train=False), images


def _bilinear(maps, height, width):
    """float64 bilinear resize of `[N, h, w]` with half-pixel centres and clamped edges (what
    torch's interpolate(mode="bilinear", align_corners=False) and tf.image.resize "bilinear"
    compute; for upsampling also jax.image.resize's, whose antialiasing only acts when
    shrinking)."""

    def weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        frac = src - low
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), low] += 1 - frac
        matrix[np.arange(n_out), np.minimum(low + 1, n_in - 1)] += frac
        return matrix

    rows, cols = weights(maps.shape[1], height), weights(maps.shape[2], width)
    return np.einsum("ih,nhw,jw->nij", rows, np.asarray(maps, np.float64), cols)


def test_bilinear_reference_is_torchs_half_pixel_interpolation():
    torch = pytest.importorskip("torch")
    maps = np.random.RandomState(3).rand(2, 8, 5)
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(32, 13),
                                               mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(_bilinear(maps, 32, 13), expected.numpy(), rtol=1e-12,
                               atol=1e-12)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_saliency_of_a_linear_classifier_is_its_weight(linear):
    model, variables, images, kernel, _ = linear
    targets = np.array([0, 2, 1, 2])
    got = at.saliency(model, variables, images, targets)
    weight = np.abs(kernel.T.reshape(CLASSES, *SHAPE))  # d logit_c / d x = W[:, c]
    np.testing.assert_allclose(got, weight[targets].max(axis=-1), rtol=1e-6)


def test_smoothgrad_averages_saliency_over_noisy_copies(linear, resnet):
    """A linear classifier's gradient does not depend on the input, so SmoothGrad equals its
    saliency at any noise; on ResNet-20 it equals saliency without noise, and with noise it is
    the mean of saliency over the same noisy copies (NumPy's stream, sigma from the range)."""
    model, variables, images, *_ = linear
    np.testing.assert_allclose(at.smoothgrad(model, variables, images, noise=0.3, samples=3),
                               at.saliency(model, variables, images), rtol=1e-6)
    model, variables, images = resnet
    targets = np.array([0, 1, 2])
    np.testing.assert_allclose(at.smoothgrad(model, variables, images, targets, noise=0.0,
                                             samples=2),
                               at.saliency(model, variables, images, targets), rtol=1e-6)
    got = at.smoothgrad(model, variables, images, targets, noise=0.2, samples=3, seed=7)
    rng = np.random.default_rng(7)
    sigma = 0.2 * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    copies = [images + rng.standard_normal(images.shape, np.float32) * sigma[:, None, None, None]
              for _ in range(3)]
    expected = np.mean([at.saliency(model, variables, c.astype(np.float32), targets)
                        for c in copies], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, at.saliency(model, variables, images, targets))
    with pytest.raises(ValueError, match=r"noise=-0.1 is invalid; expected a fraction"):
        at.smoothgrad(model, variables, images, noise=-0.1)


#: The ways a model may write its ReLU; guided backprop must find each of them.
RELUS = {
    "nn.relu": nn.relu,
    "maximum(h, 0.)": lambda h: jnp.maximum(h, 0.0),
    "maximum(0, h)": lambda h: jnp.maximum(0, h),
    "relu6 (within 6)": lambda h: jax.nn.relu6(h),
}


class MLP(nn.Module):
    """flatten -> Dense(6) -> ReLU -> Dense(3): one ReLU layer, whose backward rules are easy to
    write out."""

    relu: str = "nn.relu"

    @nn.compact
    def __call__(self, x):
        hidden = RELUS[self.relu](nn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(CLASSES, name="head")(hidden)


@pytest.mark.parametrize("relu", RELUS)
@pytest.mark.parametrize("rule", at.RELU_RULES)
def test_guided_backprop_and_deconvnet_follow_their_relu_rules(rule, relu):
    """Score W2[:, t] . relu(W1 x + b1): the gradient reaching the ReLU is W2[:, t]; guided
    backprop keeps it where it and the ReLU's input are positive, the deconvnet where it is
    positive (Springenberg et al. 2015, Fig. 1), then W1 carries it to the input. The hidden
    values stay below 6, so relu6 is a ReLU here."""
    model = MLP(relu)
    images = np.random.RandomState(0).randn(4, 2, 2, 1).astype(np.float32)
    variables = model.init(jax.random.key(0), images)
    w1, b1, w2 = (np.asarray(variables["params"][m][k], np.float64)
                  for m, k in (("hidden", "kernel"), ("hidden", "bias"), ("head", "kernel")))
    targets = np.array([0, 1, 2, 1])
    hidden = images.reshape(4, -1).astype(np.float64) @ w1 + b1
    incoming = w2[:, targets].T
    keep = (incoming > 0) & (hidden > 0) if rule == "guided" else incoming > 0
    expected = ((incoming * keep) @ w1.T).reshape(images.shape)
    assert keep.any() and not keep.all() and np.all(hidden < 6)
    got = at.guided_backprop(model, variables, images, targets, rule=rule)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(num_groups=2), nn.LayerNorm],
                         ids=["GroupNorm", "LayerNorm"])
def test_a_normalizations_variance_clamp_is_not_a_relu(norm):
    """flax's GroupNorm/LayerNorm clamp their variance with max(0, .) before rsqrt: guided
    backprop leaves it alone, so a model without ReLUs still gets its plain gradient."""

    class Normalized(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = norm()(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))

    model = Normalized()
    images = np.random.RandomState(0).randn(2, 4, 4, 1).astype(np.float32)
    variables = model.init(jax.random.key(0), images)
    plain = jax.jit(jax.grad(lambda x: model.apply(variables, x)[:, 1].sum()))(images)
    np.testing.assert_allclose(at.guided_backprop(model, variables, images, [1, 1]), plain,
                               rtol=1e-5, atol=1e-7)


def test_count_relus_finds_the_relus_guided_backprop_rewrites(linear, resnet):
    """ResNet-20 has ReLUs (guided backprop differs from the gradient); LeNet-5 (tanh), a
    linear model and a LayerNorm's variance clamp have none: their guided map is saliency's."""
    model, variables, images = resnet
    assert at.count_relus(model, variables, images[:1]) == 19  # the stem's + 2 per block x 9
    lenet = create_model("lenet5", num_classes=10)
    grey = np.zeros((1, 32, 32, 1), np.float32)
    lenet_variables = jax.eval_shape(lambda x: lenet.init(jax.random.key(0), x, train=False), grey)
    assert at.count_relus(lenet, lenet_variables, grey) == 0
    model, variables, images, _, _ = linear
    assert at.count_relus(model, variables, images[0]) == 0

    class Normalized(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.Conv(4, (3, 3))(x))
            return nn.Dense(CLASSES)(nn.relu(x).mean(axis=(1, 2)))

    images = np.zeros((1, 4, 4, 1), np.float32)
    model = Normalized()
    assert at.count_relus(model, model.init(jax.random.key(0), images), images) == 1


class _ConvRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3), name="conv")(x))


class _TwoBlocks(nn.Module):
    """Two conv-ReLU blocks, each wrapped by `wrap` (identity or nn.remat), and a linear head."""

    wrap: Callable = staticmethod(lambda module: module)

    @nn.compact
    def __call__(self, x):
        x = self.wrap(_ConvRelu)(name="b2")(self.wrap(_ConvRelu)(name="b1")(x))
        return nn.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))


def test_relus_inside_nn_remat_are_rewritten_too():
    """nn.remat traces its module into a checkpoint primitive, whose body guided backprop did
    not enter: it counted 0 ReLUs and returned the plain gradient (a CLI said "no ReLU")."""
    images = np.random.RandomState(0).randn(2, 6, 6, 2).astype(np.float32)
    plain, remat = _TwoBlocks(), _TwoBlocks(wrap=nn.remat)
    variables = plain.init(jax.random.key(0), images)
    assert at.count_relus(remat, variables, images) == at.count_relus(plain, variables, images) == 2
    np.testing.assert_array_equal(at.guided_backprop(remat, variables, images, [0, 2]),
                                  at.guided_backprop(plain, variables, images, [0, 2]))
    # Its layers' values live in the checkpoint's own trace: refused by name, not jax's
    # UnexpectedTracerError.
    for layer in ("b1", "b1/conv"):
        with pytest.raises(ValueError, match=rf"^attribution: layer='{layer}' is invalid; it is, "
                                             r"or runs inside, a module wrapped in a lifted"):
            at.grad_cam(remat, variables, images, [0, 2], layer=layer)
    with pytest.raises(ValueError, match=r"^attribution: layers='b2' is invalid; it is, or"):
        at.activations(remat, variables, images, ["b2"])


class _StemThenRemat(nn.Module):
    """A plain conv-ReLU stem, then a remat-wrapped conv-ReLU block (whose output is the last
    feature map), and a linear head."""

    @nn.compact
    def __call__(self, x):
        x = nn.remat(_ConvRelu)(name="block")(_ConvRelu(name="stem")(x))
        return nn.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))


def test_default_grad_cam_layer_skips_lifted_modules():
    """Grad-CAM's default layer was the last feature map even inside nn.remat, which Grad-CAM
    then refused, naming a layer the caller never passed; `explain` refused it only after its
    other methods had run."""
    images = np.random.RandomState(0).randn(2, 6, 6, 2).astype(np.float32)
    model = _StemThenRemat()
    variables = model.init(jax.random.key(0), images)
    outputs = {o.path: o for o in at.module_outputs(model, variables, (6, 6, 2))}
    assert outputs["block"].lifted and outputs["block/conv"].lifted
    assert not outputs["stem"].lifted and not outputs[""].lifted
    assert at.last_conv_layer(model, variables, (6, 6, 2)) == "stem"
    assert at.grad_cam(model, variables, images, [0, 2]).layer == "stem"
    assert at.explain(model, variables, images, methods=("grad_cam",)).layer == "stem"


def test_default_grad_cam_layer_skips_a_one_by_one_map():
    """LeNet-5 on 32x32: C1 28x28, C3 10x10, C5 1x1 (5x5 VALID on S4's 5x5), by hand; C5's
    single position has no spatial answer, so the default is C3, the last map wider than 1x1."""
    model = create_model("lenet5", num_classes=10)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32),
                           train=False)
    shapes = {o.path: o.shape for o in at.module_outputs(model, variables, (32, 32, 1))}
    assert [shapes[p] for p in ("c1", "c3", "c5")] == [(1, 28, 28, 6), (1, 10, 10, 16),
                                                       (1, 1, 1, 120)]
    assert at.last_conv_layer(model, variables, (32, 32, 1)) == "c3"


def test_explain_checks_the_default_grad_cam_layer_before_any_method(monkeypatch):
    images = np.random.RandomState(0).randn(2, 6, 6, 2).astype(np.float32)
    remat = _TwoBlocks(wrap=nn.remat)
    variables = _TwoBlocks().init(jax.random.key(0), images)
    monkeypatch.setattr(at, "_saliency", lambda batch: pytest.fail("saliency ran first"))
    with pytest.raises(ValueError, match=r"^attribution: layer=None is invalid; the model has no "
                                         r"module with a feature-map output that runs once"):
        at.explain(remat, variables, images, methods=("saliency", "grad_cam"))


def test_relus_inside_a_scan_are_refused_by_guided_backprop():
    """A ReLU in nn.scan's body cannot be rewritten (the body is not inlined): it counted 0
    and guided backprop silently returned the plain gradient there."""

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            def body(cell, carry, _):
                return nn.relu(nn.Dense(carry.shape[-1], name="dense")(carry)), None

            scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                           length=3)
            x, _ = scan(self, x.reshape(x.shape[0], -1), None)
            return nn.Dense(CLASSES, name="head")(x)

    images = np.random.RandomState(1).randn(2, 2, 2, 1).astype(np.float32)
    model = Scanned()
    variables = model.init(jax.random.key(0), images)
    message = (r"^attribution: model='Scanned' is invalid; it applies a ReLU inside a 'scan' "
               r"\(a jax.lax control-flow body")
    with pytest.raises(ValueError, match=message):
        at.count_relus(model, variables, images)
    with pytest.raises(ValueError, match=message):
        at.guided_backprop(model, variables, images, [0, 1])
    np.testing.assert_array_equal(at.saliency(model, variables, images, [0, 1]).shape, (2, 2, 2))


def test_guided_backprop_changes_only_relus(linear, resnet):
    model, variables, images, kernel, _ = linear  # no ReLU: the plain gradient, W[:, t]
    np.testing.assert_allclose(at.guided_backprop(model, variables, images, [0, 1, 2, 0]),
                               kernel.T.reshape(CLASSES, *SHAPE)[[0, 1, 2, 0]], rtol=1e-6)
    model, variables, images = resnet
    guided = at.guided_backprop(model, variables, images[:1], [1])
    plain = jax.jit(jax.grad(lambda x: model.apply(variables, x, train=False)[0, 1]))(
        images[:1])
    assert not np.allclose(guided, plain)  # ResNet-20's ReLUs were found and rewritten
    with pytest.raises(ValueError, match=r"rule='relu' is invalid; expected one of"):
        at.guided_backprop(model, variables, images, rule="relu")


def test_integrated_gradients_of_a_linear_classifier_are_exact(linear):
    """IG of x -> W x + b is (x - x') * W[:, t] for any number of path points."""
    model, variables, images, kernel, _ = linear
    baseline = np.random.RandomState(5).randn(*SHAPE).astype(np.float32)
    targets = np.array([2, 0, 1, 1])
    got = at.integrated_gradients(model, variables, images, targets, baseline=baseline, steps=3)
    weight = kernel.T.reshape(CLASSES, *SHAPE)[targets]
    np.testing.assert_allclose(got, (images - baseline) * weight, rtol=1e-5, atol=1e-7)


class _SquaredNorm(nn.Module):
    """logits [sum x^2, 0] (plus 0 x a Dense head, so the model has parameters)."""

    @nn.compact
    def __call__(self, x):
        score = (x**2).sum(axis=(1, 2, 3))
        head = nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))
        return jnp.stack([score, jnp.zeros_like(score)], axis=-1) + 0 * head


def test_integrated_gradients_take_the_midpoint_of_each_step():
    """Along the path a * x the gradient of sum x^2 is 2 a x, linear in a, so the midpoint
    rule is exact at any number of steps: IG = x * mean_k 2 a_k x = x^2 (hand reference; it also
    sums to score(x) - score(0), completeness). The left end points a = 0, 1/2 of 2 steps give
    x^2 / 2."""
    model = _SquaredNorm()
    images = np.full((1, 2, 2, 1), 2.0, np.float32)
    variables = model.init(jax.random.key(0), images)
    got = at.integrated_gradients(model, variables, images, [0], baseline=0.0, steps=2)
    np.testing.assert_allclose(got, images.astype(np.float64) ** 2, rtol=1e-6)


def test_integrated_gradients_are_complete_on_a_resnet(resnet):
    """Completeness (Sundararajan et al. 2017, Prop. 1): the attributions sum to the score
    difference between image and baseline, up to the midpoint rule's error (a random baseline,
    so the path does not run through 0, where a bias-free ReLU network is exactly linear)."""
    model, variables, images = resnet
    baseline = np.random.RandomState(1).randn(32, 32, 3).astype(np.float32)
    got = at.integrated_gradients(model, variables, images, baseline=baseline, steps=256)
    scores = at.logits(model, variables, images)
    targets = scores.argmax(axis=1)
    start = at.logits(model, variables, np.broadcast_to(baseline, images.shape))
    difference = (scores - start)[np.arange(3), targets]
    assert np.abs(difference).max() > 0.1
    np.testing.assert_allclose(got.reshape(3, -1).sum(axis=1), difference, atol=0.02)


@pytest.mark.parametrize(("patch", "stride", "fill"), [(4, 3, 0.0), (5, 5, -1.5), (10, 1, 0.0),
                                                      (None, None, 0.0)])
def test_occlusion_matches_a_float64_loop_over_occluder_positions(linear, patch, stride, fill):
    """Every position (the last moved to the border), the probability drop averaged per pixel
    over the positions covering it; targets default to the predicted classes. The defaults
    (None): a quarter of the smaller side, round(10 / 4) = 2, at half of it, stride 1."""
    model, variables, images, kernel, bias = linear
    got = at.occlusion(model, variables, images, patch=patch, stride=stride, fill=fill,
                       batch_size=7)
    if patch is None:
        patch, stride = 2, 1
    x = images.astype(np.float64)
    probs = _softmax(x.reshape(len(x), -1) @ kernel + bias)
    targets = probs.argmax(axis=1)
    drop, count = np.zeros(x.shape[:3]), np.zeros(x.shape[:3])
    for i in range(len(x)):
        for y0 in at.occlusion_windows(SHAPE[0], patch, stride):
            for x0 in at.occlusion_windows(SHAPE[1], patch, stride):
                occluded = x[i].copy()
                occluded[y0:y0 + patch, x0:x0 + patch] = fill
                p = _softmax(occluded.reshape(1, -1) @ kernel + bias)[0, targets[i]]
                drop[i, y0:y0 + patch, x0:x0 + patch] += probs[i, targets[i]] - p
                count[i, y0:y0 + patch, x0:x0 + patch] += 1
    assert count.min() >= 1  # every pixel covered
    np.testing.assert_allclose(got, drop / count, atol=2e-6)


def test_occlusion_windows_cover_the_axis():
    assert at.occlusion_windows(10, 4, 3) == [0, 3, 6]
    assert at.occlusion_windows(11, 4, 3) == [0, 3, 6, 7]
    assert at.occlusion_windows(4, 4, 2) == [0]


def test_grad_cam_of_a_pooled_network_is_its_class_activation_map(resnet):
    """ResNet-20 ends in global average pooling and one Dense layer, so Grad-CAM at the last
    block equals ReLU(sum_k w_k^c A^k) / (h w), the CAM of Zhou et al. 2016."""
    model, variables, images = resnet
    targets = np.array([1, 3, 0])
    cam = at.grad_cam(model, variables, images, targets)
    assert cam.layer == "stage3_block3"
    features = at.activations(model, variables, images, [cam.layer])[cam.layer]
    weight = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    expected = np.maximum(np.einsum("nhwk,nk->nhw", features.astype(np.float64),
                                    weight[:, targets].T), 0.0) / (8 * 8)
    assert expected.max() > 0 and (expected == 0).any()  # the ReLU bites on both sides
    np.testing.assert_allclose(cam.maps, expected, rtol=1e-4, atol=1e-7)
    assert cam.upsampled.shape == (3, 32, 32)
    # what `explain` returns and the plots draw: the 8 x 8 maps bilinearly upsampled 4x (float32
    # against the float64 reference: rtol 1e-5, atol 1e-6 of the largest map value)
    np.testing.assert_allclose(cam.upsampled, _bilinear(cam.maps, 32, 32), rtol=1e-5,
                               atol=1e-6 * cam.maps.max())
    np.testing.assert_array_equal(cam.targets, targets)
    np.testing.assert_allclose(cam.logits, at.logits(model, variables, images), rtol=1e-5)


class ConvThenRelu(nn.Module):
    """VGG's pattern: a conv module whose ReLU the parent applies as a function (`rectify`),
    then max pooling and a Dense head; `features` and `head` split it at that ReLU."""

    rectify: str = "nn.relu"

    def setup(self):
        self.conv = nn.Conv(6, (3, 3))
        self.dense = nn.Dense(CLASSES)

    def features(self, x):
        y = self.conv(x)
        return nn.relu(y) if self.rectify == "nn.relu" else jnp.maximum(y, 0.0)

    def head(self, a):
        return self.dense(nn.max_pool(a, (2, 2), (2, 2)).reshape(a.shape[0], -1))

    def __call__(self, x):
        return self.head(self.features(x))


def _grad_cam_reference(activation, gradient):
    """float64 Grad-CAM from a layer's activation A and d score / d A (Selvaraju et al. §3)."""
    alpha = gradient.astype(np.float64).mean(axis=(1, 2))
    return np.maximum(np.einsum("nhwk,nk->nhw", activation.astype(np.float64), alpha), 0.0)


@pytest.mark.parametrize("rectify", ["nn.relu", "jnp.maximum"])
def test_grad_cam_takes_the_rectified_maps_of_a_layer_followed_by_a_relu(rectify):
    """The paper's A^k are rectified conv maps (VGG-16's conv5_3 after its ReLU): where the
    parent applies the ReLU as a function, the map uses that ReLU's output and the gradient
    with respect to it; `after_relu=False` keeps the module's own (pre-ReLU) output."""
    model = ConvThenRelu(rectify)
    images = np.random.RandomState(5).randn(3, *SHAPE).astype(np.float32)
    variables = model.init(jax.random.key(3), images[:1])
    targets = np.array([0, 2, 1])

    def score(a):
        logits = model.apply(variables, a, method=ConvThenRelu.head)
        return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

    rectified, pre = jax.jit(lambda v, x: (
        model.apply(v, x, method=ConvThenRelu.features),
        model.apply(v, x, method=lambda m, x: m.conv(x))))(variables, images)
    g_post = np.asarray(jax.jit(jax.grad(score))(rectified))
    g_pre = np.where(np.asarray(pre) > 0, g_post, 0.0)  # the ReLU's gradient, 0 at 0
    assert (np.asarray(pre) < 0).mean() > 0.2 and np.abs(g_post[np.asarray(pre) < 0]).max() > 0

    cam = at.grad_cam(model, variables, images, targets)
    assert cam.layer == "conv" and cam.after_relu
    expected = _grad_cam_reference(np.asarray(rectified), g_post)
    np.testing.assert_allclose(cam.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())

    raw = at.grad_cam(model, variables, images, targets, after_relu=False)
    assert not raw.after_relu
    expected_raw = _grad_cam_reference(np.asarray(pre), g_pre)
    np.testing.assert_allclose(raw.maps, expected_raw, rtol=1e-4,
                               atol=1e-6 * expected_raw.max())
    assert np.abs(expected - expected_raw).max() > 0.1 * expected.max()  # the choice matters


def test_grad_cam_keeps_a_layer_not_followed_by_a_relu(resnet):
    """ResNet-20's blocks rectify inside the module; nothing rectifies their output again."""
    model, variables, images = resnet
    assert not at.grad_cam(model, variables, images, np.array([1, 3, 0])).after_relu


def test_activations_are_the_features_the_model_returns(resnet):
    model, variables, images = resnet
    _, features = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))(
        variables, images)
    got = at.activations(model, variables, images, ["stage2_block3", "stage3_block3"])
    np.testing.assert_allclose(got["stage3_block3"], features["stage3"], rtol=1e-6)
    np.testing.assert_allclose(got["stage2_block3"], features["stage2"], rtol=1e-6)


def test_module_outputs_list_every_call_children_first(resnet):
    model, variables, _ = resnet
    outputs = at.module_outputs(model, variables, (32, 32, 3))
    paths = [o.path for o in outputs]
    assert paths[-2:] == ["head", ""] and paths.index("stage1_block1/conv1") < paths.index(
        "stage1_block1")
    assert {o.path: o.shape for o in outputs}["stage2_block1"] == (1, 16, 16, 32)
    assert at.last_conv_layer(model, variables, (32, 32, 3)) == "stage3_block3"


def test_first_layer_filters_and_their_grid(resnet):
    model, variables, _ = resnet
    path, kernel = at.first_layer_filters(model, variables, (32, 32, 3))
    np.testing.assert_array_equal(kernel, variables["params"][path]["kernel"])
    grid = at.filter_grid(kernel, pad=1)
    assert grid.shape == (4 * 4 - 1, 4 * 4 - 1, 3)  # 16 filters of 3x3 in a 4x4 grid
    first = (kernel[..., 0] - kernel[..., 0].min()) / np.ptp(kernel[..., 0])
    np.testing.assert_allclose(grid[:3, :3], first, rtol=1e-6)
    grey = at.filter_grid(np.arange(2 * 2 * 2 * 5, dtype=float).reshape(2, 2, 2, 5), columns=5)
    assert grey.shape == (2, 14, 1) and grey.min() == 0.0 and grey.max() == 1.0


def test_pointing_game():
    """Hits inside the box, or within `tolerance` of it by Euclidean distance (pixel centres):
    (9.5, 9.5) is 6.36 from the box's corner (5, 5), (5.5, 0.5) is 1.5 from its left side."""
    maps = np.zeros((3, 10, 10))
    maps[0, 2, 3] = maps[1, 9, 9] = maps[2, 5, 0] = 1.0
    boxes = np.array([[2, 3, 3, 4], [0, 0, 5, 5], [4, 2, 7, 5]], float)
    np.testing.assert_array_equal(at.pointing_game(maps, boxes), [True, False, False])
    np.testing.assert_array_equal(at.pointing_game(maps, boxes, tolerance=2), [True, False, True])
    np.testing.assert_array_equal(at.pointing_game(maps, boxes, tolerance=6.3)[1], False)
    np.testing.assert_array_equal(at.pointing_game(maps, boxes, tolerance=6.4)[1], True)
    # A 2x5 map: its maximum at row 0, column 4 has its centre at (0.5, 4.5), in [0, 4, 1, 5]
    wide = np.zeros((1, 2, 5))
    wide[0, 0, 4] = 1.0
    np.testing.assert_array_equal(at.pointing_game(wide, np.array([[0.0, 4.0, 1.0, 5.0]])),
                                  [True])
    with pytest.raises(ValueError, match=r"maps='maps holding NaN' is invalid"):
        at.pointing_game(np.full((1, 2, 2), np.nan), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"maps='array of shape \(10, 10\)' is invalid; "
                                         r"expected \[N, H, W\] maps"):
        at.pointing_game(maps[0], boxes[:1])
    # A NaN or inverted box was a silent miss.
    for bad in ([np.nan, 3, 3, 4], [3, 3, 2, 4]):
        with pytest.raises(ValueError, match=r"boxes='box 1 = .*' is invalid; expected finite "
                                             r"\[ymin, xmin, ymax, xmax\] with ymin <= ymax"):
            at.pointing_game(maps, np.array([boxes[0], bad, boxes[2]]))


class Listed(nn.Module):
    """Convolutions of `widths` filters, each followed by a ReLU, then a pooled head: a model
    whose list field (as a zoo model's kwargs read back from config.json) flax cannot hash."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{i}")(x))
        return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))


def test_a_model_with_a_list_field_is_explained_too():
    """Model kwargs read back from config.json hold lists, which flax cannot hash: the jitted
    functions are then built per call instead of cached."""
    model = Listed(widths=[4, 8])  # as create_model("resnet20_cifar", widths=[4, 8, 8]) is,
    with pytest.raises(TypeError):  # in a model small enough to compile each method quickly
        hash(model)
    images = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    result = at.explain(model, variables, images, patch=4, ig_steps=2)
    assert {k: v.shape for k, v in result.maps.items()} == {m: (2, 16, 16) for m in at.METHODS}


def test_explain_runs_each_method_for_the_same_targets(resnet, tmp_path):
    model, variables, images = resnet
    result = at.explain(model, variables, images, methods="grad_cam,integrated_gradients,saliency",
                        ig_steps=4)
    assert list(result.maps) == ["saliency", "integrated_gradients", "grad_cam"]
    assert list(at.explain(model, variables, images[:1], methods="smoothgrad").maps) == [
        "smoothgrad"]
    assert result.layer == "stage3_block3"
    np.testing.assert_array_equal(result.targets, result.probabilities.argmax(axis=1))
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    path = at.plot_attributions(images, result.maps, str(tmp_path / "a.png"), ["x"] * 3)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, kernel = at.first_layer_filters(model, variables, (32, 32, 3))
    for path in (at.plot_filters(kernel, str(tmp_path / "f.png")),
                 at.plot_activations(np.ones((4, 4, 20)), str(tmp_path / "act.png"))):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_reduces_each_methods_channels_as_documented(linear):
    """Integrated gradients: |sum over channels| (signed contributions cancel, as Captum
    draws it); guided backprop: max over channels of |.|, as saliency. Reference: the linear
    classifier's float64 IG from 0, x * W[:, t], and its guided gradient, W[:, t] (no ReLU)."""
    model, variables, images, kernel, _ = linear
    targets = np.array([0, 1])
    result = at.explain(model, variables, images[:2], targets,
                        methods="guided_backprop,integrated_gradients", ig_steps=2)
    weight = kernel.T.reshape(CLASSES, *SHAPE)[targets]
    ig = images[:2].astype(np.float64) * weight
    assert not np.allclose(np.abs(ig.sum(-1)), np.abs(ig).sum(-1))  # the two orders differ
    np.testing.assert_allclose(result.maps["integrated_gradients"], np.abs(ig.sum(-1)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.maps["guided_backprop"], np.abs(weight).max(-1),
                               rtol=1e-6)


def test_explain_checks_every_argument_before_any_method_runs(resnet, monkeypatch):
    """A bad occluder or ig_steps used to be refused only when explain reached that method,
    after saliency, SmoothGrad, ... had compiled and run."""
    model, variables, images = resnet
    for name in ("_saliency", "_smoothgrad", "_guided_backprop", "_integrated_gradients",
                 "_occlusion", "_grad_cam"):
        monkeypatch.setattr(at, name, lambda *a, _name=name, **k: pytest.fail(_name + " ran"))
    for kwargs, message in [({"patch": 40}, r"patch=40 is invalid; expected at most the "
                                            r"image's smaller side, 32"),
                            ({"patch": 8, "stride": 0}, r"stride=0 is invalid"),
                            ({"ig_steps": 0}, r"ig_steps=0 is invalid; expected a positive "
                                              r"integer")]:
        with pytest.raises(ValueError, match="^attribution: " + message):
            at.explain(model, variables, images, **kwargs)


def test_bad_inputs_are_named(resnet, linear):
    model, variables, images = resnet
    with pytest.raises(ValueError, match=r"^attribution: layer='stage9' is invalid; it is not a "
                                         r"module of the model; expected one of the feature-map "
                                         r"layers \[.*'stage3_block3'\] \(last 8 of"):
        at.grad_cam(model, variables, images, layer="stage9")
    with pytest.raises(ValueError, match=r"^attribution: after_relu='yes' is invalid"):
        at.grad_cam(model, variables, images, after_relu="yes")
    with pytest.raises(ValueError, match=r"layer='head' is invalid; it outputs \(1, 4\), not a "
                                         r"feature map"):
        at.explain(model, variables, images, layer="head")
    with pytest.raises(ValueError, match=r"targets=.* is invalid; expected one class id in "
                                         r"\[0, 3\] per image \(3\)"):
        at.saliency(model, variables, images, targets=[0, 1, 4])
    with pytest.raises(ValueError, match=r"patch=40 is invalid; expected at most the image's "
                                         r"smaller side, 32"):
        at.occlusion(model, variables, images, patch=40)
    with pytest.raises(ValueError, match=r"stride=9 is invalid; expected at most the patch, 8, "
                                         r"so that every pixel is covered"):
        at.occlusion(model, variables, images, patch=8, stride=9)
    with pytest.raises(ValueError, match=r"images='array of shape \(32, 32\)' is invalid"):
        at.saliency(model, variables, images[0, ..., 0])
    huge = np.asarray(images, np.float64)
    huge[0, 0, 0, 0] = 1e39  # finite in float64, inf once cast: inf logits and attributions
    with pytest.raises(ValueError, match=r"images='<values up to 1e\+39 in magnitude>' is "
                                         r"invalid; expected finite float32 values"):
        at.saliency(model, variables, huge)
    with pytest.raises(ValueError, match=r"input_shape=\(16, 16, 1\) is invalid; the model with "
                                         r"these variables does not run on a \(16, 16, 1\) input"):
        at.module_outputs(model, variables, (16, 16, 1))
    with pytest.raises(ValueError, match=r"baseline='array of shape \(5,\)' is invalid; "
                                         r"expected a value or an array broadcastable to"):
        at.integrated_gradients(model, variables, images, baseline=np.zeros(5))
    with pytest.raises(ValueError, match=r"steps=0 is invalid; expected a positive integer"):
        at.integrated_gradients(model, variables, images, steps=0)
    with pytest.raises(ValueError, match=r"methods=\('saliency', 'lime'\) is invalid"):
        at.explain(model, variables, images, methods=("saliency", "lime"))
    twice = Twice()
    small = np.zeros((1, 6, 6, 2), np.float32)
    twice_vars = twice.init(jax.random.key(0), small)
    with pytest.raises(ValueError, match=r"layer='shared' is invalid; it runs 2 times per "
                                         r"forward pass"):
        at.grad_cam(twice, twice_vars, small, layer="shared")
    lin_model, lin_vars, lin_images, *_ = linear
    with pytest.raises(ValueError, match=r"layer=None is invalid; the model has no module with "
                                         r"a feature-map output"):
        at.grad_cam(lin_model, lin_vars, lin_images)
    with pytest.raises(ValueError, match=r"patch=11 is invalid; expected at most the image's "
                                         r"smaller side, 10"):  # 12x10: not the larger side
        at.occlusion(lin_model, lin_vars, lin_images, patch=11)
    with pytest.raises(ValueError, match=r"model='Linear' is invalid; expected a model with a "
                                         r"2-D convolution"):
        at.first_layer_filters(lin_model, lin_vars, SHAPE)
    with pytest.raises(ValueError, match=r"boxes='array of shape \(2, 4\)' is invalid"):
        at.pointing_game(np.zeros((3, 4, 4)), np.zeros((2, 4)))


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "guided_backprop",
                                    "integrated_gradients", "occlusion", "grad_cam", "explain"])
@pytest.mark.parametrize(("targets", "shown"), [([0, 3, 1, 2], r"\[0, 3, 1, 2\]"), (-1, "-1"),
                                                ([0, 1], r"\[0, 1\]"), (1.0, "1.0")])
def test_bad_targets_are_refused_before_the_model_compiles(resnet, monkeypatch, method,
                                                           targets, shown):
    """Given targets were checked against the clean logits, i.e. only after the model's forward
    pass had compiled and run; the class count comes from the abstract trace (4 classes, 3
    images here)."""
    model, variables, images = resnet
    monkeypatch.setattr(at, "_logits_fn", lambda *a: pytest.fail("the logits compiled"))
    # building a jitted function is fine; calling it (compiling, running) is not
    monkeypatch.setattr(jax, "jit", lambda *a, **k: lambda *a, **k: pytest.fail("it ran"))
    with pytest.raises(ValueError, match=rf"^attribution: targets={shown} is invalid; expected "
                                         r"one class id in \[0, 3\] per image \(3\)"):
        getattr(at, method)(model, variables, images, targets=targets)


def test_image_dtypes_baselines_and_columns_are_checked(linear):
    """Complex images lost their imaginary part with only a NumPy warning, bfloat16 ones were
    refused as an 'array of shape (4, 12, 10, 2)'; a string baseline was named as a shape ()
    that does not broadcast; filter_grid(columns=0) took 0 as 'not given'. Reference for the
    bfloat16 images: saliency of the same values in float32 (the linear model's |weight| max)."""
    model, variables, images, kernel, _ = linear
    for dtype in (bool, complex, "<U1"):
        with pytest.raises(ValueError, match=rf"^attribution: images.dtype='{np.dtype(dtype)}' "
                                             r"is invalid; expected real numbers"):
            at.saliency(model, variables, np.zeros((1, *SHAPE), dtype))
    low = images.astype(jnp.bfloat16)
    np.testing.assert_allclose(at.saliency(model, variables, low, targets=1),
                               at.saliency(model, variables, low.astype(np.float32), targets=1),
                               rtol=0, atol=0)
    # None (cast to NaN) was refused as 'an array with NaN or inf', numeric text was read
    for baseline in ("zero", None, "0.5", [True], [[1, "a"]]):
        with pytest.raises(ValueError, match=rf"^attribution: baseline={re.escape(repr(baseline))}"
                                             r" is invalid; expected a number or an array of "
                                             r"numbers"):
            at.integrated_gradients(model, variables, images, baseline=baseline)
    with pytest.raises(ValueError, match=r"^attribution: columns=0 is invalid; expected a "
                                         r"positive integer"):
        at.filter_grid(np.zeros((3, 3, 1, 4)), columns=0)
    assert at.filter_grid(np.zeros((3, 3, 1, 4))).shape == (7, 7, 1)  # None: ceil(sqrt(4)) = 2


def test_every_method_runs_under_x64_and_agrees_with_x32(linear):
    """With `jax_enable_x64` on (as float64 reference checks turn it on), occlusion failed
    inside its jitted occluder: the literal 0 of `dynamic_update_slice`'s start indices
    became int64 beside the int32 square positions ('lax.concatenate requires arguments to
    have the same dtypes'). Every method gives what it gives without x64 (float32 inputs,
    parameters and scores: 1e-6)."""
    model, variables, images, _, _ = linear
    targets = np.array([0, 2, 1, 1])
    methods = {
        "saliency": lambda: at.saliency(model, variables, images, targets),
        "smoothgrad": lambda: at.smoothgrad(model, variables, images, targets, samples=3),
        "integrated_gradients": lambda: at.integrated_gradients(model, variables, images,
                                                                targets, steps=4),
        "occlusion": lambda: at.occlusion(model, variables, images, targets, patch=3,
                                          stride=2, fill=0.5, batch_size=5),
        "guided_backprop": lambda: at.guided_backprop(model, variables, images, targets),
    }
    expected = {name: method() for name, method in methods.items()}
    with jax.enable_x64(True):
        for name, method in methods.items():
            np.testing.assert_allclose(method(), expected[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize(("call", "message"), [
    # pad -1 overlapped neighbouring filters and -3 painted all 4 on one 3x3 tile, silently
    (lambda: at.filter_grid(np.ones((3, 3, 3, 4)), pad=-1),
     r"^attribution: pad=-1 is invalid; expected an integer >= 0"),
    (lambda: at.filter_grid(np.ones((3, 3, 3, 4)), pad=1.5),
     r"^attribution: pad=1.5 is invalid; expected an integer >= 0"),
    # matplotlib's 'TypeError: Invalid shape (4,) for image data', after the figure was made
    (lambda: at.plot_activations(np.ones((4, 4)), "unused.png"),
     r"^attribution: activation='array of shape \(4, 4\)' is invalid; expected one image's "
     r"\[h, w, C\] feature maps"),
    # NumPy's 'axis 3 is out of bounds for array of dimension 3'
    (lambda: at.displayable(np.ones((4, 4, 3))),
     r"^attribution: images='array of shape \(4, 4, 3\)' is invalid; expected preprocessed "
     r"images \[N, H, W, C\]"),
])
def test_plot_helpers_name_a_bad_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    # the valid forms: pad 0 tiles without gaps, one image's maps, a batch of images
    assert at.filter_grid(np.ones((3, 3, 3, 4)), columns=2, pad=0).shape == (6, 6, 3)
    assert at.displayable(np.ones((1, 4, 4, 3))).shape == (1, 4, 4, 3)


def test_explain_refuses_a_setting_of_a_method_it_does_not_run(linear, monkeypatch):
    """layer (Grad-CAM's), patch and stride (the occluder's) and ig_steps (integrated
    gradients') were silently ignored when their method was not among `methods`: refused, naming
    the method to add, before any method runs."""
    model, variables, images, *_ = linear
    for name in ("_saliency", "_smoothgrad", "_guided_backprop", "_integrated_gradients",
                 "_occlusion", "_grad_cam"):
        monkeypatch.setattr(at, name, lambda *a, _name=name, **k: pytest.fail(_name + " ran"))
    for kwargs, method in [({"layer": "head"}, "grad_cam"), ({"patch": 4}, "occlusion"),
                           ({"stride": 2}, "occlusion"), ({"ig_steps": 8}, "integrated_gradients")]:
        (arg, value), = kwargs.items()
        with pytest.raises(ValueError, match=rf"^attribution: {arg}={value!r} is invalid; only "
                                             rf"{method} reads it, and methods=\('saliency',\) "
                                             rf"lacks it; add {method} or drop {arg}\.$"):
            at.explain(model, variables, images, methods=("saliency",), **kwargs)


@pytest.mark.parametrize("given", [{"mean": (0.5,)}, {"std": (0.25,)}])
def test_displayable_refuses_half_a_normalization(given):
    """A mean without its std (or the reverse) was dropped silently: each image was min-max
    scaled instead of un-normalized, with nothing said."""
    (name, value), = given.items()
    other = "std" if name == "mean" else "mean"
    with pytest.raises(ValueError, match=rf"^attribution: {name}={re.escape(repr(value))} is "
                                         rf"invalid; expected "
                                         rf"{other} too \(x \* std \+ mean\), or neither"):
        at.displayable(np.ones((1, 4, 4, 1)), **given)
    np.testing.assert_allclose(at.displayable(np.ones((1, 4, 4, 1)), (0.5,), (0.25,)), 0.75)


def test_sequential_classifiers_are_called_without_train():
    """nn.Sequential's `**kwargs` was read as taking `train`, handed on to its first layer:
    every method refused the model. Reference: a linear model's saliency is |weight|, max over
    channels."""
    model = nn.Sequential([lambda x: x.reshape(x.shape[0], -1), nn.Dense(CLASSES)])
    images = np.random.RandomState(0).randn(2, 4, 5, 2).astype(np.float32)
    variables = model.init(jax.random.key(0), images)
    kernel = np.asarray(variables["params"]["layers_1"]["kernel"])
    expected = np.abs(kernel[:, 1].reshape(4, 5, 2)).max(-1)
    np.testing.assert_allclose(at.saliency(model, variables, images, targets=1),
                               np.stack([expected, expected]), rtol=1e-6)



def test_a_model_whose_eval_call_updates_state_is_named():
    """A BatchNorm that always normalizes by batch statistics updates 'batch_stats' even in the
    eval call: it was refused as not running on `input_shape`."""

    class AlwaysBatchStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=False)(x)
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))

    model = AlwaysBatchStats()
    images = np.ones((2, 4, 5, 2), np.float32)
    variables = model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"^attribution: model='AlwaysBatchStats' is invalid; "
                                         r"called with no `train` argument it still updates "
                                         r"state .*ModifyScopeVariableError"):
        at.saliency(model, variables, images, targets=1)


@pytest.mark.parametrize("methods, named", [
    ("saliency,gradcam", "'gradcam' is not one (did you mean 'grad_cam'?)."),
    (("occlusion", "lime"), "'lime' is not one."),
])
def test_an_unknown_method_is_named_with_its_close_match(methods, named):
    """It was refused only as 'expected distinct names from [...]', leaving the reader to find
    which name was wrong."""
    with pytest.raises(ValueError, match=re.escape(named) + "$"):
        at.check_methods(methods, "visualize", "--methods")


def test_a_repeated_or_empty_method_list_is_refused_without_naming_an_unknown_one():
    for methods in ("saliency,saliency", ""):
        with pytest.raises(ValueError, match=r"at least one\.$"):
            at.check_methods(methods)


# A process of its own: lax's input gradient of this Conv2D aborts XLA:CPU (conv_impl routes it).
_ROUTED_CONV_NET = """
import sys
import flax.linen as nn, jax, numpy as np
from cnnjax.analysis import attribution
from cnnjax.layers import Conv2D
from cnnjax.layers.conv_impl import conv_impl

class Net(nn.Module):
    impl: str = "auto"  # a model per implementation: the methods cache a jitted function per
                        # model, whose trace (made under one conv_impl) another call would replay

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.relu(Conv2D(4, 3, padding=1, name="conv1")(images))
        x = nn.relu(Conv2D(4, (2, 3), strides=2, padding=((1, 1), (0, 0)), name="conv2")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))

net, x = Net(), np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
variables = net.init(jax.random.key(0), x)
maps = {}
for impl in ("auto", "matmul"):  # "matmul": patches + matmul, no convolution to route
    with conv_impl(impl):
        model = Net(impl)
        maps[f"guided_{impl}"] = attribution.guided_backprop(model, variables, x)
        maps[f"cam_{impl}"] = attribution.grad_cam(model, variables, x, layer="conv1").maps
np.savez(sys.argv[1], **maps)
"""


def test_guided_backprop_and_grad_cam_keep_the_routed_convolutions_gradient(tmp_path):
    """`_evaluate` inlined every custom_jvp body but ReLU's, dropping
    `conv_impl.conv_general_dilated`'s input-gradient rule: guided backprop and Grad-CAM at a
    layer before a routed Conv2D aborted the process in XLA:CPU. They run, and match the same
    maps computed with every convolution as patches + matmul."""
    import subprocess
    import sys

    out = tmp_path / "maps.npz"
    result = subprocess.run([sys.executable, "-c", _ROUTED_CONV_NET, str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    maps = np.load(out)
    for name in ("guided", "cam"):
        assert np.abs(maps[f"{name}_auto"]).max() > 0
        np.testing.assert_allclose(maps[f"{name}_auto"], maps[f"{name}_matmul"], rtol=1e-4,
                                   atol=1e-6 * np.abs(maps[f"{name}_matmul"]).max())


def test_guided_backprop_traces_once_per_model_rule_and_image_shape(monkeypatch):
    """It built a fresh jitted function on every call, so each call traced and compiled the
    model again (5.3 s a call on ResNet-20, where saliency takes 0.3 s after its first): a second
    batch of the same shape, with other targets, now reuses the first one's trace. `_evaluate`,
    which re-evaluates the traced model with its ReLUs swapped, runs only while tracing.
    Reference: the hand-written guided gradient of one Dense-ReLU-Dense network."""

    class OwnMLP(nn.Module):  # a class of its own: no other test has traced it
        @nn.compact
        def __call__(self, x):
            return nn.Dense(CLASSES, name="head")(
                nn.relu(nn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1))))

    traced = []
    evaluate = at._evaluate
    monkeypatch.setattr(at, "_evaluate", lambda *a, **k: traced.append(1) or evaluate(*a, **k))
    model = OwnMLP()
    rng = np.random.RandomState(4)
    first, second = (rng.randn(4, 2, 2, 1).astype(np.float32) for _ in range(2))
    variables = model.init(jax.random.key(0), first)
    w1, b1, w2 = (np.asarray(variables["params"][m][k], np.float64)
                  for m, k in (("hidden", "kernel"), ("hidden", "bias"), ("head", "kernel")))

    def expected(images, targets):
        hidden = images.reshape(len(images), -1).astype(np.float64) @ w1 + b1
        incoming = w2[:, targets].T
        return ((incoming * ((incoming > 0) & (hidden > 0))) @ w1.T).reshape(images.shape)

    def check(images, targets):
        np.testing.assert_allclose(at.guided_backprop(model, variables, images, targets),
                                   expected(images, np.array(targets)), rtol=1e-5, atol=1e-7)

    check(first, [0, 1, 2, 1])
    traces = len(traced)
    assert traces > 0  # the counter sees the first call's trace
    check(second, [2, 2, 0, 1])
    assert len(traced) == traces  # the second batch reused the first one's trace
    check(first[:3], [0, 1, 2])  # another batch size: traced anew
    assert len(traced) > traces


@pytest.mark.parametrize("method", ["saliency", "occlusion", "integrated_gradients", "grad_cam",
                                    "explain", "activations"])
def test_images_the_model_does_not_run_on_are_named_as_images(resnet, method):
    """Images of another channel count were refused as `input_shape=(16, 16, 1)`, an argument
    none of these methods takes; `module_outputs`, which takes it, still names it."""
    model, variables, _ = resnet
    grey = np.zeros((2, 16, 16, 1), np.float32)
    args = (["stage1_block1"],) if method == "activations" else ()  # the layers it reads
    with pytest.raises(ValueError, match=r"^attribution: images='array of shape \(2, 16, 16, "
                                         r"1\)' is invalid; the model with these variables does "
                                         r"not run on a \(16, 16, 1\) input \("):
        getattr(at, method)(model, variables, grey, *args)


@pytest.mark.parametrize("baseline", [1e39, -1e39, "pixel"])
def test_a_baseline_beyond_float32_is_named_by_its_magnitude_without_a_warning(linear, baseline):
    """A finite float64 baseline beyond float32's range was cast first: NumPy warned of an
    overflow and the baseline was refused as holding 'NaN or inf'. It is refused as images of
    such values are, before the cast; NaN is still refused as such, and a bfloat16 baseline is
    the float32 one of the same values (a linear model's IG is (x - x') W[:, t])."""
    model, variables, images, kernel, _ = linear
    if baseline == "pixel":
        baseline = np.zeros(SHAPE)
        baseline[3, 4, 1] = 2e39
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"^attribution: baseline='<values up to [12]e\+39 "
                                             r"in magnitude>' is invalid; expected finite float32 "
                                             r"values \(magnitude <= 3.4e\+38\)\.$"):
            at.integrated_gradients(model, variables, images, baseline=baseline)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    with pytest.raises(ValueError, match=r"^attribution: baseline='an array with NaN or inf' is "
                                         r"invalid; expected finite values\.$"):
        at.integrated_gradients(model, variables, images, baseline=np.nan)
    low = np.full(SHAPE, 0.375, jnp.bfloat16)  # exact in bfloat16
    weight = kernel.T.reshape(CLASSES, *SHAPE)[[1, 1, 1, 1]]
    np.testing.assert_allclose(at.integrated_gradients(model, variables, images, 1, baseline=low,
                                                       steps=2),
                               (images - 0.375) * weight, rtol=1e-5, atol=1e-7)
