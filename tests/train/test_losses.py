"""Loss and metrics against float64 NumPy; the padded/masked eval step against unpadded NumPy."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import losses
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers


def _np_cross_entropy(logits, labels, smoothing):
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    n = logits.shape[-1]
    targets = np.eye(n)[labels] * (1 - smoothing) + smoothing / n
    return -(targets * log_p).sum(-1)


def _np_topk(logits, labels, k):
    top = np.argsort(-logits, axis=-1)[:, :k]
    return (top == labels[:, None]).any(-1).astype(np.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (32, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    np.testing.assert_allclose(got, _np_cross_entropy(logits, labels, smoothing), rtol=1e-5)


def _np_soft_cross_entropy(logits, targets, smoothing):
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    targets = targets * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(targets * log_p).sum(-1)


def _soft_targets(rng, n, num_classes):
    """mixup-style targets lam * onehot(a) + (1 - lam) * onehot(b), one lam per example."""
    eye, lam = np.eye(num_classes), rng.uniform(0, 1, (n, 1))
    return lam * eye[rng.integers(0, num_classes, n)] + (1 - lam) * eye[
        rng.integers(0, num_classes, n)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_cross_entropy_matches_numpy_and_one_hot_cross_entropy(smoothing):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (32, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    one_hot = losses.soft_cross_entropy(jnp.asarray(logits), jnp.eye(10)[labels], smoothing)
    np.testing.assert_allclose(
        one_hot, losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing),
        rtol=1e-6)
    targets = _soft_targets(rng, 32, 10)
    got = losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets, jnp.float32),
                                    smoothing)
    np.testing.assert_allclose(got, _np_soft_cross_entropy(logits, targets, smoothing), rtol=1e-5)


def test_example_metrics_with_soft_targets_score_their_dominant_label():
    """Loss against the whole distribution, top-1/top-5 against its argmax; one-hot soft targets
    give the int-label metrics."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    targets = _soft_targets(rng, 64, 10)
    got = losses.example_metrics(jnp.asarray(logits), jnp.asarray(targets, jnp.float32), 0.1)
    np.testing.assert_allclose(got["loss"], _np_soft_cross_entropy(logits, targets, 0.1),
                               rtol=1e-5)
    dominant = targets.argmax(-1)
    for k in (1, 5):
        np.testing.assert_array_equal(got[f"top{k}"], _np_topk(logits, dominant, k))
    labels = rng.integers(0, 10, 64)
    hard = losses.example_metrics(jnp.asarray(logits), jnp.asarray(labels))
    soft = losses.example_metrics(jnp.asarray(logits), jnp.eye(10)[labels])
    for name in hard:
        np.testing.assert_allclose(soft[name], hard[name], rtol=1e-6)


def test_topk_matches_numpy_and_caps_k():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    for k in (1, 5):
        got = losses.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
        np.testing.assert_array_equal(got, _np_topk(logits, labels, k))
    three = losses.topk_correct(jnp.asarray(logits[:, :3]), jnp.asarray(labels % 3), 5)
    np.testing.assert_array_equal(three, np.ones(64))  # k capped at 3 classes: always correct


def test_topk_ties_rank_the_lower_class_first_and_nan_is_never_correct():
    """As argmax and lax.top_k on ties: constant logits are right only for class 0;
    a model with NaN logits scores 0, not 100%."""
    labels = jnp.asarray([0, 1, 3, 2])
    np.testing.assert_array_equal(losses.topk_correct(jnp.zeros((4, 10)), labels, 1),
                                  [1, 0, 0, 0])
    np.testing.assert_array_equal(losses.topk_correct(jnp.zeros((4, 10)), labels, 3),
                                  [1, 1, 0, 1])  # ranks 0, 1, 3, 2
    tied = jnp.asarray([[1.0, 2.0, 2.0, 0.0]] * 2)
    np.testing.assert_array_equal(losses.topk_correct(tied, jnp.asarray([1, 2]), 1), [1, 0])
    nan = jnp.full((2, 10), jnp.nan).at[1, :].set(jnp.arange(10.0)).at[1, 0].set(jnp.nan)
    np.testing.assert_array_equal(losses.topk_correct(nan, jnp.asarray([0, 9]), 5), [0, 0])
    sums = losses.masked_sums({"loss": jnp.asarray([1.0, jnp.nan])}, jnp.asarray([1.0, 0.0]))
    assert float(sums["loss"]) == 1.0 and float(sums["count"]) == 1.0  # NaN padding ignored


def test_a_label_outside_the_classes_is_never_correct():
    """Label 5 of 5 classes read NaN past the end (ranked first: "correct"), and -1 wrapped to
    the last class; neither is a class, so neither is right at any k."""
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 5), jnp.float32)
    labels = jnp.asarray([5, 100, -1, int(np.argmax(logits[3]))])
    for k in (1, 5):
        np.testing.assert_array_equal(losses.topk_correct(logits, labels, k), [0, 0, 0, 1])


def test_masked_eval_step_exact_vs_numpy():
    """27 examples in batches of 8 (last padded with 5 zeros) give the unpadded NumPy metrics."""
    model = helpers.TinyNet(axis_name="data")
    state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(3), (1, 8, 8, 1))
    _, eval_step = make_steps(model, optax.sgd(0.1), optax.constant_schedule(0.1), "data")
    parallel = DataParallel("pmap")
    p_eval = parallel.wrap_eval(eval_step)
    replicated = parallel.replicate(jax.device_get(state))
    totals = {}
    for batch in helpers.eval_batches(None, global_batch_size=8, num_devices=1):
        sums = parallel.metrics_to_host(p_eval(replicated, parallel.shard_batch(batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    assert totals["count"] == helpers.NUM_EVAL

    images, labels = helpers._examples("eval", helpers.NUM_EVAL)
    logits = np.asarray(model.apply(state.variables(), images, train=False), np.float64)
    np.testing.assert_allclose(
        totals["loss"] / totals["count"], _np_cross_entropy(logits, labels, 0.0).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        totals["top1"] / totals["count"], _np_topk(logits, labels, 1).mean(), rtol=1e-12
    )
    np.testing.assert_allclose(
        totals["top5"] / totals["count"], _np_topk(logits, labels, 5).mean(), rtol=1e-12
    )


class _AuxOutputs(tuple):
    """Stands in for GoogLeNetOutputs: a named tuple whose `logits` field is the main head."""

    _fields = ("logits", "aux1")

    @property
    def logits(self):
        return self[0]

    @property
    def aux1(self):
        return self[1]


class _AuxNet(nn.Module):
    """Two linear heads on the flattened image; the second is an auxiliary head in training."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(self.num_classes, name="head")(x)
        aux = nn.Dense(self.num_classes, name="aux")(x)  # built in eval too, as GoogLeNet does
        return _AuxOutputs((logits, aux)) if train else logits


def test_split_auxiliary_of_googlenet_outputs_and_plain_arrays():
    from cnnjax.models.googlenet import GoogLeNetOutputs

    a, b, c = jnp.zeros((2, 3)), jnp.ones((2, 3)), 2 * jnp.ones((2, 3))
    main, aux = losses.split_auxiliary(GoogLeNetOutputs(a, b, c))
    assert main is a and aux == (b, c)
    assert losses.split_auxiliary(a) == (a, ())


@pytest.mark.parametrize("weight,smoothing", [(0.0, 0.0), (0.3, 0.0), (0.3, 0.1)])
def test_auxiliary_loss_and_label_smoothing_in_the_gradient(weight, smoothing):
    """One SGD step equals a float64 NumPy step on CE(main) + weight * CE(aux), both with
    `smoothing`-smoothed targets; the reported losses are the smoothed ones."""
    rng = np.random.default_rng(3)
    images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int32)
    model, lr = _AuxNet(), 0.5
    tx, schedule = optax.sgd(lr), optax.constant_schedule(lr)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 2, 2, 1))
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    train_step, _ = make_steps(
        model, tx, schedule, "data", label_smoothing=smoothing, aux_loss_weight=weight
    )
    params = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(state.params))
    batch = parallel.shard_batch({"image": images[None], "label": labels[None]})
    new_state, metrics = parallel.wrap_train(train_step)(parallel.replicate(state), batch)
    metrics = parallel.metrics_to_host(metrics)

    x = images.reshape(6, -1).astype(np.float64)
    targets = np.eye(4)[labels] * (1 - smoothing) + smoothing / 4

    def ce_grads(p):
        z = x @ p["kernel"] + p["bias"]
        prob = np.exp(z - z.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        dz = (prob - targets) / len(x)
        return _np_cross_entropy(z, labels, smoothing), {"kernel": x.T @ dz, "bias": dz.sum(0)}

    main_loss, g_main = ce_grads(params["head"])
    aux_loss, g_aux = ce_grads(params["aux"])
    expected = {
        "head": {k: params["head"][k] - lr * g_main[k] for k in g_main},
        "aux": {k: params["aux"][k] - lr * weight * g_aux[k] for k in g_aux},
    }
    got = parallel.unreplicate(new_state.params)
    for name in expected:
        for k in expected[name]:
            np.testing.assert_allclose(got[name][k], expected[name][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], main_loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["aux_loss"], aux_loss.mean(), rtol=1e-5)


class _TwoAuxNet(nn.Module):
    """GoogLeNet's output layout on linear heads: `GoogLeNetOutputs(logits, aux1, aux2)`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        from cnnjax.models.googlenet import GoogLeNetOutputs

        x = x.reshape(x.shape[0], -1)
        heads = [nn.Dense(4, name=name)(x) for name in ("head", "aux1", "aux2")]
        return GoogLeNetOutputs(*heads) if train else heads[0]


def test_two_auxiliary_heads_each_weigh_0_3_and_aux_loss_is_their_summed_cross_entropy():
    """GoogLeNet's two auxiliary classifiers: one SGD step equals a float64 NumPy step on
    CE(main) + 0.3 * CE(aux1) + 0.3 * CE(aux2) (Szegedy et al.: each weighted by 0.3), and the
    reported `aux_loss` is the batch mean of CE(aux1) + CE(aux2), so the optimized loss is
    `loss + aux_loss_weight * aux_loss` (rtol 1e-5: float32 against float64)."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int32)
    model, lr, weight = _TwoAuxNet(), 0.5, 0.3
    tx, schedule = optax.sgd(lr), optax.constant_schedule(lr)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 2, 2, 1))
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    train_step, _ = make_steps(model, tx, schedule, "data", aux_loss_weight=weight)
    params = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(state.params))
    batch = parallel.shard_batch({"image": images[None], "label": labels[None]})
    new_state, metrics = parallel.wrap_train(train_step)(parallel.replicate(state), batch)
    metrics = parallel.metrics_to_host(metrics)

    x = images.reshape(6, -1).astype(np.float64)
    targets = np.eye(4)[labels]
    ce, got = {}, parallel.unreplicate(new_state.params)
    for name, scale in (("head", 1.0), ("aux1", weight), ("aux2", weight)):
        p = params[name]
        z = x @ p["kernel"] + p["bias"]
        prob = np.exp(z - z.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        dz = (prob - targets) / len(x)
        ce[name] = _np_cross_entropy(z, labels, 0.0)
        for k, g in (("kernel", x.T @ dz), ("bias", dz.sum(0))):
            np.testing.assert_allclose(got[name][k], p[k] - lr * scale * g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ce["head"].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["aux_loss"], (ce["aux1"] + ce["aux2"]).mean(), rtol=1e-5)


@pytest.mark.parametrize("smoothing", [1.0, 1.5, -0.2, float("nan"), float("inf"), True, "0.1",
                                       None])
def test_a_bad_label_smoothing_is_named_not_trained_with(smoothing):
    """label_smoothing outside [0, 1) made targets with negative entries (1.5: a loss of 2.52
    that rewards the wrong classes, -0.2: sharper than one-hot), NaN a NaN loss, True smoothed
    by 1; each is refused naming the argument and the valid range, by the losses and by the
    train step while it is traced (before any compilation)."""
    logits, labels = jnp.array([[1.0, 2.0, 3.0, 0.5]]), jnp.array([2])
    message = (r"label_smoothing=.* is invalid; expected a number 0 <= label_smoothing < 1 "
               r"\(0: off\)")
    for call in (lambda: losses.cross_entropy(logits, labels, smoothing),
                 lambda: losses.soft_cross_entropy(logits, jnp.eye(4)[labels], smoothing),
                 lambda: losses.example_metrics(logits, labels, smoothing)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="train_step: " + message):
        _train_once(helpers.TinyNet(axis_name="data"), label_smoothing=smoothing)


@pytest.mark.parametrize("weight", [-0.3, float("nan"), float("inf"), True])
def test_a_bad_auxiliary_loss_weight_is_named(weight):
    with pytest.raises(ValueError, match=r"train_step: aux_loss_weight=.* is invalid; expected "
                                         r"a finite number >= 0"):
        _train_once(helpers.TinyNet(axis_name="data"), aux_loss_weight=weight)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_topk_refuses_a_k_that_is_not_a_positive_integer(k):
    """k=0 (or negative) scored every example wrong rather than saying k is meaningless."""
    with pytest.raises(ValueError, match=r"topk_correct: k=.* is invalid; expected a positive "
                                         r"integer"):
        losses.topk_correct(jnp.zeros((2, 3)), jnp.array([0, 1]), k)


def _train_once(model, **options):
    """One train step of `model` on one device with `make_steps` `options`."""
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data", **options)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    batch = next(helpers.train_batches(None, global_batch_size=4, num_devices=1, seed=0))
    return parallel.wrap_train(train_step)(parallel.replicate(state), parallel.shard_batch(batch))


@pytest.mark.parametrize("call", ["cross_entropy", "example_metrics", "topk_correct",
                                  "soft_cross_entropy"])
def test_labels_of_another_shape_than_the_logits_are_refused_not_broadcast(call):
    """Class ids `[N, 1]` (a dataset whose label has shape (1,)) were taken as soft targets and
    broadcast against `[N, C]` logits: losses 8.4, 20.1, 28.4, -0 and top-1 0 for labels whose
    true cross-entropy is ~1-2.5, with no error. Soft targets of another class count too."""
    logits = jnp.zeros((4, 5))
    labels = jnp.array([[1], [2], [3], [0]]) if call != "soft_cross_entropy" else jnp.ones(
        (4, 3)) / 3
    args = (logits, labels, 1) if call == "topk_correct" else (logits, labels)
    with pytest.raises(ValueError, match=rf"{call}: labels\.shape=\({labels.shape[0]}, "
                                         rf"{labels.shape[1]}\) is invalid; expected .*\(4, 5\)"):
        getattr(losses, call)(*args)


def test_the_train_step_refuses_labels_of_another_shape_while_tracing():
    model = helpers.TinyNet(axis_name="data")
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data")
    batch = {"image": np.zeros((1, 4, *helpers.IMAGE_SHAPE), np.float32),
             "label": np.zeros((1, 4, 1), np.int32)}
    with pytest.raises(ValueError, match=r"labels\.shape=\(4, 1\) is invalid"):
        jax.eval_shape(jax.vmap(train_step, axis_name="data"),
                       jax.tree.map(lambda x: x[None], state), batch)


@pytest.mark.parametrize("call", ["cross_entropy", "example_metrics", "topk_correct"])
def test_class_ids_that_are_not_integers_are_refused(call):
    """Float ids: `cross_entropy` one-hot encoded 1.5 as all zeros (loss 0, no error) and
    `example_metrics` failed in `take_along_axis` with a TypeError."""
    args = (jnp.zeros((3, 4)), jnp.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=rf"{call}: labels\.dtype=dtype\('float32'\) is "
                                         r"invalid; expected integer class ids"):
        getattr(losses, call)(*args, *((1,) if call == "topk_correct" else ()))


@pytest.mark.parametrize("call", ["cross_entropy", "example_metrics"])
@pytest.mark.parametrize("labels,first,outside", [([0, 3, 1], "labels[1]=3", 1),
                                                   ([-1, 0, 7], "labels[0]=-1", 2)])
def test_concrete_class_ids_outside_the_classes_are_refused_not_a_loss_of_0(call, labels, first,
                                                                             outside):
    """One-hot of id 3 (or -1) of 3 classes is an all-zero row: the example had loss 0 and no
    gradient, silently (a num_classes below the labels' range trained on part of the data)."""
    logits = jnp.asarray([[2.0, 0.0, -1.0]] * 3)
    with pytest.raises(ValueError, match=rf"^cross_entropy: {re.escape(first)} is invalid; "
                                         rf"expected class ids in \[0, 3\) for logits of 3 "
                                         rf"classes \({outside} of 3 labels are outside"):
        getattr(losses, call)(logits, jnp.asarray(labels))


def test_traced_class_ids_are_not_checked_so_jit_still_compiles():
    """Inside jit the ids are tracers: no check, and in-range ids give numpy's loss."""
    logits = jnp.asarray([[2.0, 0.0, -1.0]])
    loss = jax.jit(losses.cross_entropy)(logits, jnp.asarray([0]))
    expected = -np.log(np.exp(2.0) / np.exp([2.0, 0.0, -1.0]).sum())
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)
