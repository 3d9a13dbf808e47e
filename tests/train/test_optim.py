"""Optimizers and schedules built from config: against optax, float64 NumPy and torch.optim."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax.train.config import default_config
from cnnjax.train.optim import (
    OPTIMIZER_READS,
    SCHEDULE_READS,
    build_optimizer,
    build_schedule,
    unread_fields,
    weight_decay_mask,
)

STEPS = (0, 1, 7, 30, 55, 99, 100)


def _config(schedule="constant", optimizer="sgd", **fields):
    config = default_config()
    config.num_train_steps = 100
    config.optimizer.learning_rate = 0.1
    config.schedule.name = schedule
    config.optimizer.name = optimizer
    for key, value in fields.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


@pytest.mark.parametrize(
    "name,fields,reference",
    [
        ("constant", {}, optax.constant_schedule(0.1)),
        (
            "piecewise",
            {"schedule__boundaries": (30, 60), "schedule__decay_factor": 0.2},
            optax.piecewise_constant_schedule(0.1, {30: 0.2, 60: 0.2}),
        ),
        (
            "exponential",
            {
                "schedule__transition_steps": 10,
                "schedule__decay_rate": 0.5,
                "schedule__staircase": True,
            },
            optax.exponential_decay(0.1, 10, 0.5, staircase=True),
        ),
        ("cosine", {"schedule__alpha": 0.01}, optax.cosine_decay_schedule(0.1, 100, alpha=0.01)),
        (
            "warmup_cosine",
            {"schedule__warmup_steps": 10, "schedule__end_value": 1e-3},
            optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 1e-3),
        ),
        ("linear", {"schedule__end_value": 0.01}, optax.linear_schedule(0.1, 0.01, 100)),
        # torch's OneCycleLR(total_steps=100): peak at step 0.3 * 100 - 1 = 29, final rate at
        # the last step, 99 (optax's one-cycle over 99 steps; over 100 it ended at step 100)
        ("one_cycle", {}, optax.cosine_onecycle_schedule(99, 0.1, 29 / 99, 25.0, 1e4)),
    ],
)
def test_schedule_matches_optax(name, fields, reference):
    schedule = build_schedule(_config(name, **fields))
    for step in STEPS:
        np.testing.assert_allclose(schedule(step), reference(step), rtol=1e-6)


def test_piecewise_values_by_hand():
    schedule = build_schedule(_config("piecewise", schedule__boundaries=(30, 60)))
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 29, 30, 59, 60, 99)],
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
        rtol=1e-6,
    )


def _after_warmup_by_hand(name, t, span):
    """The docstrings' rate `t` steps after the warmup (float64), the schedule built over the
    `span` = num_train_steps - W steps after it, at peak 0.1 and the fields of
    `test_warmup_then_each_schedule_at_every_step_matches_a_closed_form`."""
    lr = 0.1
    if name == "constant":
        return np.full_like(t, lr)
    if name == "piecewise":  # absolute boundaries 9 and 14 (steps t = 4 and 9), factor 0.5
        return lr * 0.5 ** ((t + 5 >= 9).astype(float) + (t + 5 >= 14))
    if name == "exponential":  # lr * decay_rate ** (t / transition_steps)
        return lr * 0.5 ** (t / 4)
    frac = np.minimum(t, span) / span
    if name == "cosine":  # from lr down to alpha * lr, alpha = 0.1
        return lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
    assert name == "linear"  # from lr to end_value = 0.01
    return lr + (0.01 - lr) * frac


@pytest.mark.parametrize("name,fields", [
    ("constant", {}),
    ("cosine", {"schedule__alpha": 0.1}),
    ("linear", {"schedule__end_value": 0.01}),
    ("piecewise", {"schedule__boundaries": (9, 14), "schedule__decay_factor": 0.5}),
    ("exponential", {"schedule__transition_steps": 4, "schedule__decay_rate": 0.5}),
])
def test_warmup_then_each_schedule_at_every_step_matches_a_closed_form(name, fields):
    """W = 5 warmup steps from init_value 0.02 to the peak 0.1 of a 20-step run, at every step
    0..20 (float32, as a run uses it): init + (peak - init) * s / W for s < W, then the named
    schedule at s - W over the 15 remaining steps. A warmup that reached the peak a step late
    (over W + 1 steps: 0.0733 instead of 0.084 at step 4) went unnoticed: the other tests
    compare schedules with optax's own pieces or have no warmup. float32 rounding: 1e-6
    relative."""
    total, warmup, init = 20, 5, 0.02
    config = _config(name, schedule__warmup_steps=warmup, schedule__init_value=init, **fields)
    config.num_train_steps = total
    steps = np.arange(total + 1)
    got = np.asarray(jax.vmap(build_schedule(config))(jnp.asarray(steps)))
    ramp = init + (0.1 - init) * steps / warmup
    want = np.where(steps < warmup, ramp,
                    _after_warmup_by_hand(name, np.maximum(steps - warmup, 0).astype(float),
                                          total - warmup))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def _torch_one_cycle(total, pct_start, peak, div_factor, final_div_factor):
    """torch.optim.lr_scheduler.OneCycleLR's rate at each step 0..total-1 (float64)."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peak, total_steps=total, pct_start=pct_start, div_factor=div_factor,
        final_div_factor=final_div_factor)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return np.array(rates)


@pytest.mark.parametrize("total,pct_start,div_factor,final_div_factor", [
    (20, 0.3, 25.0, 1e4),  # the peak on a step (5)
    (20, 0.25, 10.0, 100.0),  # ... (4), other factors
    (37, 0.3, 25.0, 1e4),  # the peak between two steps (10.1)
    (37, 0.2, 25.0, 1e4),  # alexnet_imagenette's pct_start (6.4)
    (3, 0.3, 25.0, 1e4),  # the warm-up ends before step 0 (-0.1): the run starts annealing
    (1, 0.3, 25.0, 1e4),  # one step: torch's final rate on it
])
def test_one_cycle_matches_torch_one_cycle_lr(total, pct_start, div_factor, final_div_factor):
    """one_cycle equals torch's OneCycleLR(total_steps=num_train_steps) at every step the run
    takes: the same peak step (pct_start * total - 1, not rounded to a step) and the final rate
    at the last step, total - 1 (optax's cosine_onecycle_schedule(total) reached it a step late,
    at total, which the run never takes). float64, as torch's: in float32 the cosine's
    cancellation near the end leaves ~1e-3 relative there (a few 1e-8 of the peak)."""
    config = _config("one_cycle", schedule__pct_start=pct_start,
                     schedule__div_factor=div_factor,
                     schedule__final_div_factor=final_div_factor)
    config.num_train_steps = total
    want = _torch_one_cycle(total, pct_start, 0.1, div_factor, final_div_factor)
    with jax.enable_x64(True):
        schedule = build_schedule(config)
        got = np.array([schedule(step) for step in range(total)])
        after = schedule(total + 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(after, want[-1], rtol=1e-6)  # held after the last step
    if total > 1:
        assert got[-1] == pytest.approx(0.1 / (div_factor * final_div_factor), rel=1e-6)


def test_one_cycle_in_float32_matches_torch_to_its_precision():
    """The float32 rates a run uses: torch's at every step to 1e-6 relative or 1e-6 of the
    peak (float32 rounding; a step's offset moves a rate by up to ~1e-2 of the peak)."""
    config = _config("one_cycle", schedule__pct_start=0.2)
    config.num_train_steps = 563
    want = _torch_one_cycle(563, 0.2, 0.1, 25.0, 1e4)
    got = np.asarray(jax.vmap(build_schedule(config))(jnp.arange(563)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * 0.1)


def test_one_cycle_without_a_warmup_step_is_logged(caplog):
    """pct_start * num_train_steps <= 1: torch's warm-up ends at or before step 0."""
    config = _config("one_cycle")
    config.num_train_steps = 1
    build_schedule(config)
    assert "no step warms up" in caplog.text
    config.num_train_steps = 100
    caplog.clear()
    build_schedule(config)
    assert "no step warms up" not in caplog.text


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.full(4, 2.0), "bias": jnp.full(4, 0.5)},
        "head": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.ones(3)},
    }


def _grads(i):
    return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * i, _params())


def _run(tx, steps=4):
    params = _params()
    state = tx.init(params)
    for i in range(steps):
        updates, state = tx.update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "name,fields,reference",
    [
        (
            "sgd",
            {
                "optimizer__momentum": 0.9,
                "optimizer__nesterov": True,
                "optimizer__weight_decay": 1e-2,
            },
            lambda lr: optax.chain(
                optax.add_decayed_weights(1e-2, weight_decay_mask),
                optax.sgd(lr, 0.9, nesterov=True),
            ),
        ),
        ("adam", {"optimizer__b1": 0.8}, lambda lr: optax.adam(lr, b1=0.8)),
        (
            "adamw",
            {"optimizer__weight_decay": 0.05},
            lambda lr: optax.adamw(lr, weight_decay=0.05, mask=weight_decay_mask),
        ),
        (
            "rmsprop",
            {"optimizer__decay": 0.95, "optimizer__momentum": 0.5},
            lambda lr: optax.rmsprop(lr, decay=0.95, momentum=0.5),
        ),
        (
            "sgd",
            {"optimizer__momentum": 0.0, "optimizer__grad_clip_norm": 0.5},
            lambda lr: optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(lr)),
        ),
    ],
)
def test_optimizer_matches_optax(name, fields, reference):
    config = _config("cosine", name, **fields)
    schedule = build_schedule(config)
    got, want = _run(build_optimizer(config, schedule)), _run(reference(schedule))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_sgd_momentum_weight_decay_matches_numpy_float64():
    """Independent reference: L2-coupled heavy-ball SGD (PyTorch semantics) in float64."""
    config = _config("constant", "sgd", optimizer__momentum=0.9, optimizer__weight_decay=0.1)
    got = _run(build_optimizer(config))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), _params())
    mask = weight_decay_mask(params)
    velocity = jax.tree.map(np.zeros_like, params)
    for i in range(4):
        grads = jax.tree.map(lambda g: np.asarray(g, np.float64), _grads(i))
        grads = jax.tree.map(lambda g, p, m: g + 0.1 * p * m, grads, params, mask)
        velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
        params = jax.tree.map(lambda p, v: p - 0.1 * v, params, velocity)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)


# ---------------------------------------------------------------------------------------------
# Update rules against independent float64 references (test_optimizer_matches_optax above only
# checks the wiring: it builds the same optax chain as cnnjax.train.optim).
# The NumPy rules below are written from the papers and PyTorch's documented algorithms:
#   Adam: Kingma & Ba (2015) Alg. 1, bias-corrected, step = lr * m_hat / (sqrt(v_hat) + eps)
#     (eps outside the root, after the bias correction: PyTorch's and optax's placement).
#   Adam + weight_decay: the classic L2 term, g <- g + wd * p before the moments (PyTorch's
#     `Adam(weight_decay=)`), on kernels only.
#   AdamW: Loshchilov & Hutter (2019) decoupled decay, p <- p - lr_t * (adam_step + wd * p), with
#     the decay multiplied by the *scheduled rate* lr_t (PyTorch's AdamW and optax's adamw; the
#     paper's eta_t multiplies only the schedule factor, i.e. its decay is wd * lr_t / lr_0).
#   RMSprop (Tieleman & Hinton; optax's default, TensorFlow's convention): v <- d v + (1-d) g^2,
#     u = lr_t * g / sqrt(v + eps): eps *inside* the root (PyTorch puts it outside,
#     g / (sqrt(v) + eps)); no centering (cnnjax does not offer it); momentum accumulates the
#     rate-scaled step, b <- mu b + u, p <- p - b (PyTorch: b <- mu b + g/(...), p <- p - lr_t b;
#     the same under a constant rate); Nesterov: p <- p - (u + mu b).
#   SGD Nesterov (Sutskever et al. 2013 as PyTorch writes it): b <- mu b + g,
#     p <- p - lr_t (g + mu b).
#   Weight decay (all but adamw) and the decoupled decay skip biases and norm parameters; the
#   gradient is first clipped to global norm <= c over all leaves (g <- g * c / ||g|| if above).
# Rates follow a cosine schedule over the run, so a rate applied at the wrong step also fails.
# ---------------------------------------------------------------------------------------------

REF_STEPS, REF_TOTAL, REF_LR, REF_CLIP = 5, 6, 0.1, 5.0
# Per-step gradient scales: global norms of ~1, 10, 3, 20, 0.5, so a clip at 5 acts on some steps.
GRAD_SCALES = (0.1, 1.0, 0.3, 2.0, 0.05)
# Which leaves decay, written out here rather than taken from weight_decay_mask.
DECAYS = {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False},
          "head": {"kernel": True, "bias": False}}


def _ref_params():
    """The float32 starting point (numbers drawn by NumPy, not derived from JAX)."""
    rng = np.random.default_rng(0)
    shapes = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
              "head": {"kernel": (4, 3), "bias": (3,)}}
    return {m: {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()}
            for m, leaves in shapes.items()}


def _ref_grads():
    """A gradient sequence of changing sign, direction and scale (float32, exact in float64)."""
    rng = np.random.default_rng(1)
    params = _ref_params()
    return [{m: {k: (scale * rng.normal(size=p.shape)).astype(np.float32)
                 for k, p in leaves.items()} for m, leaves in params.items()}
            for scale in GRAD_SCALES]


def _ref_rate(step):
    """optax/PyTorch-style cosine decay to 0 over REF_TOTAL steps, evaluated at the step count."""
    return REF_LR * 0.5 * (1.0 + np.cos(np.pi * step / REF_TOTAL))


def _flat(tree):
    return [(m, k, v) for m, leaves in tree.items() for k, v in leaves.items()]


def _global_norm(grads):
    return np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for _, _, g in _flat(grads)))


def _numpy_reference(name, *, wd=0.0, clip=None, momentum=0.0, nesterov=False, b1=0.9,
                     b2=0.999, eps=1e-8, decay=0.9, rate=_ref_rate):
    """float64 parameters after REF_STEPS updates of rule `name` (see the block comment)."""
    params = {m: {k: v.astype(np.float64) for k, v in leaves.items()}
              for m, leaves in _ref_params().items()}
    state = {(m, k): {"m": 0.0, "v": 0.0, "b": 0.0} for m, k, _ in _flat(params)}
    for t, grads in enumerate(_ref_grads()):
        lr = rate(t)
        scale = 1.0
        if clip is not None and _global_norm(grads) > clip:
            scale = clip / _global_norm(grads)
        for m, k, p in _flat(params):
            g = grads[m][k].astype(np.float64) * scale
            s = state[(m, k)]
            decays = DECAYS[m][k]
            if name != "adamw" and decays:
                g = g + wd * p  # classic L2, coupled to the gradient
            if name in ("adam", "adamw"):
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                m_hat = s["m"] / (1 - b1 ** (t + 1))
                v_hat = s["v"] / (1 - b2 ** (t + 1))
                step = m_hat / (np.sqrt(v_hat) + eps)
                if name == "adamw" and decays:
                    step = step + wd * p  # decoupled, scaled by the scheduled rate below
                new = p - lr * step
            elif name == "rmsprop":
                s["v"] = decay * s["v"] + (1 - decay) * g * g
                u = lr * g / np.sqrt(s["v"] + eps)
                if momentum:
                    s["b"] = momentum * s["b"] + u
                    u = u + momentum * s["b"] if nesterov else s["b"]
                new = p - u
            else:  # sgd
                if momentum:
                    s["b"] = momentum * s["b"] + g
                    g = g + momentum * s["b"] if nesterov else s["b"]
                new = p - lr * g
            params[m][k] = new
    return params


def _run_cnnjax(config, schedule=None):
    """Parameters after cnnjax's optimizer (float32) ran over the reference gradient sequence."""
    tx = build_optimizer(config, schedule)
    params = jax.tree.map(jnp.asarray, _ref_params())
    state = tx.init(params)
    for grads in _ref_grads():
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def _ref_config(name, fields):
    config = _config("cosine", name, **fields)
    config.num_train_steps = REF_TOTAL
    config.optimizer.learning_rate = REF_LR
    return config


def _assert_close(got, want):
    assert sorted((m, k) for m, k, _ in _flat(got)) == sorted((m, k) for m, k, _ in _flat(want))
    for m, k, b in _flat(want):
        # float32 arithmetic over 5 steps vs float64: relative error ~1e-7, so rtol 1e-5
        np.testing.assert_allclose(got[m][k], b, rtol=1e-5, atol=1e-6, err_msg=f"{m}/{k}")


# b2 = 1 - 2**-9, a float32 number: float32(0.999) is 1.3e-5 (relative) off in 1 - b2, which
# alone moves a float32 run ~2e-6 away from a float64 reference.
B2 = 1 - 2**-9
# (cnnjax optimizer fields, reference keyword arguments). Large eps values (1e-3 for adam,
# 0.1 for rmsprop) make eps's placement change the result well beyond the tolerance.
REFERENCE_CASES = {
    "adam": ("adam", {"optimizer__b1": 0.8, "optimizer__b2": 0.99, "optimizer__eps": 1e-3,
                      "optimizer__grad_clip_norm": REF_CLIP},
             {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "clip": REF_CLIP}),
    "adam_l2": ("adam", {"optimizer__weight_decay": 0.5, "optimizer__b2": B2},
                {"wd": 0.5, "b2": B2}),
    "adamw": ("adamw", {"optimizer__weight_decay": 0.3, "optimizer__eps": 1e-3,
                        "optimizer__b2": B2, "optimizer__grad_clip_norm": REF_CLIP},
              {"wd": 0.3, "eps": 1e-3, "b2": B2, "clip": REF_CLIP}),
    "rmsprop": ("rmsprop", {"optimizer__decay": 0.95, "optimizer__eps": 0.1,
                            "optimizer__momentum": 0.0, "optimizer__weight_decay": 0.2},
                {"decay": 0.95, "eps": 0.1, "wd": 0.2}),
    "rmsprop_momentum": ("rmsprop", {"optimizer__decay": 0.8, "optimizer__eps": 0.1,
                                     "optimizer__momentum": 0.7,
                                     "optimizer__grad_clip_norm": REF_CLIP},
                         {"decay": 0.8, "eps": 0.1, "momentum": 0.7, "clip": REF_CLIP}),
    "rmsprop_nesterov": ("rmsprop", {"optimizer__decay": 0.8, "optimizer__eps": 1e-4,
                                     "optimizer__momentum": 0.7, "optimizer__nesterov": True},
                         {"decay": 0.8, "eps": 1e-4, "momentum": 0.7, "nesterov": True}),
    "sgd_nesterov": ("sgd", {"optimizer__momentum": 0.9, "optimizer__nesterov": True,
                             "optimizer__weight_decay": 0.05,
                             "optimizer__grad_clip_norm": REF_CLIP},
                     {"momentum": 0.9, "nesterov": True, "wd": 0.05, "clip": REF_CLIP}),
}


def test_reference_gradients_clip_on_some_steps_only():
    """The clipped cases are not vacuous: the clip acts on some steps and not on others."""
    clipped = [_global_norm(g) > REF_CLIP for g in _ref_grads()]
    assert any(clipped) and not all(clipped), clipped


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_optimizer_matches_numpy_float64_reference(case):
    """cnnjax's optimizer after 5 steps on a masked param tree equals the float64 reference."""
    name, fields, kwargs = REFERENCE_CASES[case]
    _assert_close(_run_cnnjax(_ref_config(name, fields)), _numpy_reference(name, **kwargs))


def _torch_reference(name, *, wd=0.0, clip=None, momentum=0.0, nesterov=False, b1=0.9,
                     b2=0.999, eps=1e-8, decay=0.9, rate=_ref_rate):
    """The same run with torch.optim in float64 (decay masked with per-group weight_decay)."""
    torch = pytest.importorskip("torch")
    tensors = {(m, k): torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for m, k, v in _flat(_ref_params())}
    groups = [{"params": [t for key, t in tensors.items() if DECAYS[key[0]][key[1]] == d],
               "weight_decay": wd if d else 0.0} for d in (True, False)]
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=rate(0), betas=(b1, b2), eps=eps)
    elif name == "rmsprop":
        opt = torch.optim.RMSprop(groups, lr=rate(0), alpha=decay, eps=eps, momentum=momentum)
    else:
        opt = torch.optim.SGD(groups, lr=rate(0), momentum=momentum, nesterov=nesterov)
    for t, grads in enumerate(_ref_grads()):
        for (m, k), tensor in tensors.items():
            tensor.grad = torch.tensor(grads[m][k], dtype=torch.float64)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip)
        for group in opt.param_groups:
            group["lr"] = rate(t)
        opt.step()
    out = {m: {} for m in DECAYS}
    for (m, k), tensor in tensors.items():
        out[m][k] = tensor.detach().numpy()
    return out


# torch.optim where its semantics coincide with cnnjax's. RMSprop: only at a negligible eps
# (1e-16; here v > 4e-10, so g/sqrt(v + eps) and g/(sqrt(v) + eps) agree to ~1e-7; at the
# default 1e-8 they differ by up to ~30% where |g| ~ 1e-4) and, with momentum, under a
# constant rate (PyTorch's buffer holds unscaled steps). No Nesterov RMSprop in PyTorch.
TORCH_CASES = {
    "adam": (REFERENCE_CASES["adam"], False),
    "adam_l2": (REFERENCE_CASES["adam_l2"], False),
    "adamw": (REFERENCE_CASES["adamw"], False),
    "rmsprop": (("rmsprop", {"optimizer__decay": 0.95, "optimizer__momentum": 0.0,
                             "optimizer__eps": 1e-16, "optimizer__weight_decay": 0.2},
                 {"decay": 0.95, "eps": 1e-16, "wd": 0.2}), False),
    "rmsprop_momentum": (("rmsprop", {"optimizer__decay": 0.8, "optimizer__momentum": 0.7,
                                      "optimizer__eps": 1e-16,
                                      "optimizer__grad_clip_norm": REF_CLIP},
                          {"decay": 0.8, "eps": 1e-16, "momentum": 0.7, "clip": REF_CLIP}),
                         True),
    "sgd_nesterov": (REFERENCE_CASES["sgd_nesterov"], False),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_optimizer_matches_torch_optim(case):
    """Second independent reference: torch.optim in float64, rates set per step."""
    (name, fields, kwargs), constant = TORCH_CASES[case]
    config = _ref_config(name, fields)
    schedule, rate = (optax.constant_schedule(REF_LR), lambda t: REF_LR) if constant else (
        None, _ref_rate)
    want = _torch_reference(name, rate=rate, **kwargs)
    _assert_close(_run_cnnjax(config, schedule), want)


def test_weight_decay_mask_excludes_biases_and_norm_params():
    mask = weight_decay_mask(_params())
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "head": {"kernel": True, "bias": False},
    }


def test_weight_decay_mask_excludes_vectors_whatever_their_name():
    """Rank <= 1 parameters are biases or scales under any name (LeNet-5's trainable `coef`):
    the mask's tests held only `kernel`/`bias`/`scale`, so the rank rule decided nothing."""
    from cnnjax.models import create_model

    params = {"pool": {"coef": jnp.ones((6,)), "weight": jnp.ones((3, 3))},
              "gain": jnp.ones(()), "embedding": jnp.ones((4, 2, 3))}
    assert weight_decay_mask(params) == {"pool": {"coef": False, "weight": True}, "gain": False,
                                         "embedding": True}
    model = create_model("lenet5", subsampling="trainable")
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False))
    decays = {"/".join(str(k.key) for k in path): d
              for path, d in jax.tree_util.tree_leaves_with_path(
                  weight_decay_mask(variables["params"]))}
    coefs = [p for p in decays if p.endswith("/coef")]
    assert coefs and not any(decays[p] for p in coefs)


@pytest.mark.parametrize(
    "name,expected_kernel",
    [
        # decoupled (adamw) and L2 (sgd) decay both give p * (1 - lr * wd) on a zero gradient
        ("adamw", lambda p: p * (1 - 0.1 * 0.5)),
        ("sgd", lambda p: p * (1 - 0.1 * 0.5)),
        # adam normalizes the L2 gradient wd * p: the first step moves by lr * sign(p)
        ("adam", lambda p: p - 0.1 * np.sign(p)),
    ],
)
def test_weight_decay_leaves_biases_and_norm_untouched(name, expected_kernel):
    """With zero gradients only decay moves params: kernels shrink, biases/scales stay put."""
    config = _config("constant", name, optimizer__weight_decay=0.5, optimizer__momentum=0.0)
    tx = build_optimizer(config)
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for module, leaf in (("bn", "scale"), ("bn", "bias"), ("conv", "bias"), ("head", "bias")):
        np.testing.assert_array_equal(new[module][leaf], params[module][leaf])
    for module in ("conv", "head"):
        np.testing.assert_allclose(
            new[module]["kernel"], expected_kernel(np.asarray(params[module]["kernel"])),
            rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize("model_name", ["resnet20_cifar", "vgg11_bn", "densenet121"])
def test_weight_decay_mask_on_zoo_models(model_name):
    """On real models: every parameter of a normalization layer (a module that also keeps
    batch_stats) and every bias is excluded; every conv/dense kernel decays."""
    from cnnjax.models import create_model

    model = create_model(model_name, num_classes=10)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    norm_modules = {
        tuple(str(k.key) for k in path[:-1])
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    }
    mask = weight_decay_mask(variables["params"])
    counts = {"norm": 0, "bias": 0, "kernel": 0}
    for path, decays in jax.tree_util.tree_leaves_with_path(mask):
        keys = tuple(str(k.key) for k in path)
        if keys[:-1] in norm_modules:
            kind = "norm"
        else:
            kind = keys[-1]
            assert kind in ("bias", "kernel"), keys
        counts[kind] += 1
        assert decays == (kind == "kernel"), keys
    assert counts["norm"] >= 2 * 3 and counts["kernel"] >= 8  # scale+bias of several BNs


@pytest.mark.parametrize(
    "group,field,value,message",
    [
        (
            "optimizer",
            "name",
            "lamb",
            "optimizer: name='lamb' is invalid; expected one of ['sgd', "
            "'adam', 'adamw', 'rmsprop']",
        ),
        (
            "schedule",
            "name",
            "cyclic",
            "schedule: name='cyclic' is invalid; expected one of ['constant', 'piecewise'",
        ),
        ("optimizer", "learning_rate", 0.0, "optimizer: learning_rate=0.0 is invalid"),
        ("optimizer", "learning_rate", -1.0, "optimizer: learning_rate=-1.0 is invalid"),
        ("optimizer", "weight_decay", -0.1, "optimizer: weight_decay=-0.1 is invalid"),
        ("optimizer", "grad_clip_norm", -1.0, "optimizer: grad_clip_norm=-1.0 is invalid"),
        ("schedule", "boundaries", (60, 30), "schedule: boundaries=(60, 30) is invalid"),
        ("schedule", "warmup_steps", 100, "schedule: warmup_steps=100 is invalid"),
    ],
)
def test_bad_optimizer_or_schedule_messages(group, field, value, message):
    config = _config("warmup_cosine" if field == "warmup_steps" else "piecewise")
    config[group][field] = value
    with pytest.raises(ValueError) as err:
        build_optimizer(config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("transition_steps", 0, "schedule: transition_steps=0 is invalid; expected a positive"),
        ("decay_rate", 0.0, "schedule: decay_rate=0.0 is invalid; expected 0 < decay_rate <= 1"),
    ],
)
def test_bad_exponential_schedule_messages(field, value, message):
    config = _config("exponential")
    config.schedule[field] = value
    with pytest.raises(ValueError) as err:
        build_schedule(config)
    assert message in str(err.value)


@pytest.mark.parametrize("group,field,value", [
    ("optimizer", "b1", 5.0), ("optimizer", "eps", -1.0), ("optimizer", "decay", float("nan")),
    ("optimizer", "b2", 1.0), ("schedule", "transition_steps", -5),
    ("schedule", "decay_rate", float("nan")), ("schedule", "pct_start", 7.0),
    ("schedule", "decay_factor", -3.0), ("schedule", "div_factor", 0.0),
])
def test_a_bad_value_in_a_field_the_chosen_rule_does_not_read_is_refused(group, field, value):
    """sgd with warmup_cosine ignored adam's b1, rmsprop's decay or exponential's decay_rate,
    so a typo there surfaced only when a sweep switched the optimizer or the schedule."""
    config = _config("warmup_cosine")
    config.schedule.warmup_steps = 5
    assert config.optimizer.name == "sgd"
    config[group][field] = value
    with pytest.raises(ValueError, match=rf"^{group}: {field}={value!r} is invalid; expected"):
        build_optimizer(config)


def test_plain_dict_config_is_accepted():
    config = ml_collections.ConfigDict(
        {
            "num_train_steps": 10,
            "optimizer": {"name": "adam", "learning_rate": 1e-3},
            "schedule": {"name": "linear"},
        }
    )
    np.testing.assert_allclose(build_schedule(config)(5), 5e-4, rtol=1e-6)


# A value each field can take that differs from `_READ_BASE`'s and that its readers accept.
_OPTIMIZER_CHANGES = {"momentum": 0.5, "nesterov": True, "b1": 0.5, "b2": 0.9, "eps": 0.1,
                      "decay": 0.5, "weight_decay": 0.1, "grad_clip_norm": 0.5,
                      "learning_rate": 0.05}
_SCHEDULE_CHANGES = {"warmup_steps": 10, "init_value": 0.01, "boundaries": (60,),
                     "decay_factor": 0.5, "transition_steps": 10, "decay_rate": 0.5,
                     "staircase": True, "alpha": 0.1, "end_value": 0.01, "pct_start": 0.5,
                     "div_factor": 10.0, "final_div_factor": 100.0}


def _read_base(schedule="constant", optimizer="sgd"):
    """A config in which every field matters to the optimizer/schedule that reads it (momentum
    for Nesterov, a boundary for decay_factor, a warmup for init_value)."""
    config = _config(schedule, optimizer)
    config.optimizer.momentum = 0.9
    if schedule == "piecewise":
        config.schedule.boundaries = (30,)
    if schedule != "one_cycle":
        config.schedule.warmup_steps = 5
    return config


def _outcome(config, what):
    """The trained params (optimizer) or the rates at every step (schedule), or 'refused'."""
    try:
        if what == "optimizer":
            return np.concatenate([np.ravel(x) for x in jax.tree.leaves(
                _run(build_optimizer(config)))])
        steps = jnp.arange(config.num_train_steps + 1)
        return np.asarray(jax.vmap(build_schedule(config))(steps))
    except ValueError:
        return "refused"


@pytest.mark.parametrize("group,reads,changes", [
    ("optimizer", OPTIMIZER_READS, _OPTIMIZER_CHANGES),
    ("schedule", SCHEDULE_READS, _SCHEDULE_CHANGES),
])
def test_unread_fields_are_exactly_those_whose_change_changes_nothing(group, reads, changes):
    """The read tables behind the sweep's refusal, checked against the builders: changing a
    field listed as read changes the trained params (or the rates); changing an unread one
    leaves them bitwise equal or is refused by the builder."""
    assert set(changes) >= set(default_config()[group]) - {"name"}
    for name in reads:
        base = _read_base(**{group: name})
        unread = unread_fields(base)
        want = _outcome(base, group)
        for field, value in changes.items():
            changed = _read_base(**{group: name})
            changed[group][field] = value
            got = _outcome(changed, group)
            if f"{group}.{field}" in unread:
                assert isinstance(got, str) or np.array_equal(got, want), (name, field)
            else:
                assert not isinstance(got, str), (name, field)
                assert not np.array_equal(got, want), (name, field)


def test_init_value_is_unread_without_a_warmup():
    config = _config("cosine")
    assert "schedule.init_value" in unread_fields(config)
    config.schedule.warmup_steps = 5
    assert "schedule.init_value" not in unread_fields(config)
    assert unread_fields(_config("cosine", "adam"))["optimizer.momentum"] == (
        "optimizer 'adam' does not read it (only 'sgd' and 'rmsprop' do)")
    # an unknown name is the builders' to refuse: no field of its group is called unread
    assert not any(f.startswith("optimizer.") for f in unread_fields(_config("cosine", "sgdd")))
