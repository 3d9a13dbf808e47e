r"""Backend parity: cnnjax's layers and models on the accelerator against the same code on the CPU.

Every case is one pure function of arrays made on the host (inputs, Flax variables), run twice
under `jax.default_matmul_precision("highest")` (so a GPU's TF32 convolutions are not the
difference): once with its arguments on the default device and once on the CPU. The CPU results
are the ones the default test suite checks against TensorFlow, PyTorch and float64 NumPy, so a
case that agrees here is checked on the accelerator too. It prints each case's relative error
`|accel - cpu| / |cpu|` (2-norm over all outputs) and its worst absolute error, and exits 1 when a
case exceeds `--tolerance` (`--grad_tolerance` for gradients) or fails to run, and 3 when none
failed but `--max_seconds` left cases unrun (not every case was checked). A layer that
picks its lowering from `jax.default_backend()` (max pooling's custom JVP, the per-phase
transposed convolution, the "auto" convolution and BatchNorm lowerings) is traced once, in the
accelerator's form, which the CPU then runs too: the CPU's own forms are left to the test suite.

  python -m benchmarks.backend_parity                       # on a machine with a GPU/TPU
  python -m benchmarks.backend_parity --models=all --json_out=/tmp/parity.json

Layer cases run each layer forward and take the gradient of a fixed random projection of its
output with respect to its input and parameters (RoI pooling's custom JVP included); model
cases run each registered model forward in eval mode and, with `--model_grads`, the gradient
of a projection of its train-mode output (BatchNorm on batch statistics) with respect to its
parameters. On a machine without an accelerator, `--allow_cpu` compares the CPU
with itself (a check of this script, not of a backend).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks.train_step import check_json_out, write_json_out
from cnnjax.platform import configure_cpu_defaults

#: Registered models checked by default: one or two of each family and every layer type they use
#: (the VGG LRN variant, AlexNet's two towers, FCN's transposed convolutions, the detectors' RoI
#: pooling and NMS), the deepest last. `--models=all` checks every registered model.
DEFAULT_MODELS = (
    "lenet5", "alexnet", "alexnet_2tower", "zfnet", "vgg11_lrn", "nin", "nin_cifar",
    "resnet20_cifar", "plain20_cifar", "wrn16_4_cifar", "resnet18", "fcn8s_vgg16",
    "fcn8s_resnet18", "rcnn_small", "sppnet_small", "fast_rcnn_small", "faster_rcnn_small",
    "yolo_v1_small", "vgg16_bn", "googlenet", "googlenet_bn", "resnet50", "densenet_bc100_cifar",
    "preact_resnet164_cifar",
)

FLAGS = flags.FLAGS

#: The exit status when every case run passed but `--max_seconds` left some unrun: not 0 (not
#: everything was checked), nor 1 (no case failed), nor 124 (`timeout`'s) or device_check.sh's 2.
INCOMPLETE_EXIT = 3


def define_flags() -> None:
    """Defines this script's command-line flags (only when run as a script: the tests import
    the module beside other commands' flags)."""
    flags.DEFINE_list("models", list(DEFAULT_MODELS),
                      "Registered model names to check, or 'all'; empty for none.")
    flags.DEFINE_bool("layers", True, "Check the layer cases (cnnjax.layers).")
    flags.DEFINE_bool("model_grads", True, "Also compare each model's train-mode parameter "
                      "gradient, not only its forward.")
    flags.DEFINE_integer("batch_size", 2, "Batch size of every case's input.")
    flags.DEFINE_integer("image_size", 32, "Input side of the model cases (raised to a model's "
                         "smallest admitted input where that is larger).")
    flags.DEFINE_float("tolerance", 1e-4, "Largest relative error a forward case may show.")
    flags.DEFINE_float("grad_tolerance", 1e-3, "Largest relative error a gradient case may show.")
    flags.DEFINE_bool("allow_cpu", False, "Run even when the default backend is the CPU (the "
                      "CPU is then compared with itself: a check of this script only).")
    flags.DEFINE_list("skip", [], "Cases to leave out, as `name` or `name:kind` (kind forward or "
                      "grad), e.g. one that crashes a backend's compiler.")
    flags.DEFINE_float("max_seconds", 0, "Start no case after this many seconds (0: no limit; the "
                       "first always runs); the cases left are listed as not run, so a "
                       f"time-boxed run still reports (and exits {INCOMPLETE_EXIT} if none "
                       "failed).")
    flags.DEFINE_string("json_out", None, "Write every case's figures to this JSON file.")


@dataclass(frozen=True)
class Case:
    """One check: `fn(*args)` returns a pytree of arrays; `kind` is "forward" or "grad".
    `args` may be a function that makes them, called when the case runs (a model's variables:
    initializing every model up front would spend a time-boxed run before its first case)."""

    name: str
    kind: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] | Callable[[], tuple[Any, ...]]

    def arguments(self) -> tuple[Any, ...]:
        return self.args() if callable(self.args) else self.args


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str
    rel_error: float | None
    max_abs_error: float | None
    seconds: float
    error: str | None = None

    def passed(self, tolerance: float, grad_tolerance: float) -> bool:
        limit = grad_tolerance if self.kind == "grad" else tolerance
        return self.error is None and self.rel_error is not None and self.rel_error <= limit


def check_flags() -> list[str]:
    """The model names to check; a ValueError naming the flag for a bad value."""
    from cnnjax.models.registry import list_models

    known = list_models(task=None)
    names = known if FLAGS.models == ["all"] else FLAGS.models
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; expected 'all' or names from {known}")
    if not names and not FLAGS.layers:
        raise ValueError("--models is empty and --layers=false: there is nothing to compare; "
                         "name a model or leave --layers on")
    for flag in ("batch_size", "image_size"):
        if getattr(FLAGS, flag) < 1:
            raise ValueError(f"--{flag}={getattr(FLAGS, flag)} is invalid; expected >= 1")
    if not FLAGS.max_seconds >= 0:  # NaN too: every comparison with it is False
        raise ValueError(f"--max_seconds={FLAGS.max_seconds} is invalid; expected >= 0 (0: none)")
    for flag in ("tolerance", "grad_tolerance"):
        if not getattr(FLAGS, flag) > 0:
            raise ValueError(f"--{flag}={getattr(FLAGS, flag)} is invalid; expected > 0")
    check_json_out(FLAGS.json_out)
    return list(names)


def select_cases(cases: list[Case], skip: list[str]) -> list[Case]:
    """`cases` less those named in `skip` (`name` or `name:kind`); a ValueError naming `--skip`
    for an entry that matches no case."""
    unmatched = [entry for entry in skip
                 if not any(entry in (c.name, f"{c.name}:{c.kind}") for c in cases)]
    if unmatched:
        raise ValueError(f"--skip: {unmatched} match no case; expected `name` or `name:kind` "
                         f"of {sorted({c.name for c in cases})}")
    kept = [c for c in cases if c.name not in skip and f"{c.name}:{c.kind}" not in skip]
    if not kept:
        raise ValueError(f"--skip={','.join(skip)} leaves no case to compare")
    return kept


def _projection_grad(apply: Callable[..., Any], wrt: tuple[int, ...], seed: int) -> Callable:
    """The gradient, w.r.t. the arguments at `wrt`, of `sum(out * w)` for a fixed random `w` per
    floating output leaf (drawn from the output's shape, identical on every backend)."""
    import jax
    import jax.numpy as jnp

    def scalar(*args):
        total = jnp.float32(0)
        leaves = [leaf for leaf in jax.tree.leaves(apply(*args))
                  if jnp.issubdtype(leaf.dtype, jnp.floating)]
        for i, leaf in enumerate(leaves):
            w = jax.random.normal(jax.random.key(seed + i), leaf.shape, jnp.float32)
            total = total + jnp.sum(leaf.astype(jnp.float32) * w)
        return total

    return jax.grad(scalar, argnums=wrt)


def _module_cases(name: str, module: Any, x: np.ndarray) -> list[Case]:
    """Forward and input+parameter gradient of a Flax layer initialized on the host."""
    import jax

    variables = jax.device_get(module.init(jax.random.key(0), x))
    apply = module.apply
    return [Case(name, "forward", apply, (variables, x)),
            Case(name, "grad", _projection_grad(apply, (0, 1), seed=1), (variables, x))]


def _function_cases(name: str, fn: Callable[..., Any], *args: Any,
                    grad: bool = True) -> list[Case]:
    """Forward and input gradient of a pure layer function of array arguments."""
    cases = [Case(name, "forward", fn, args)]
    if grad:
        cases.append(Case(name, "grad", _projection_grad(fn, (0,), seed=2), args))
    return cases


def layer_cases(batch: int) -> list[Case]:
    """Every convolution, pooling, RoI and normalization layer of cnnjax.layers."""
    from functools import partial

    from cnnjax import layers as L

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 13, 13, 8)).astype(np.float32)
    cases: list[Case] = []
    convs = {
        "conv_zeros_3x3_s2": L.Conv2D(16, 3, strides=2, padding=1),
        "conv_same_5x5": L.Conv2D(16, 5, padding="SAME"),
        "conv_reflect": L.Conv2D(16, 3, padding=2, padding_mode="reflect"),
        "conv_replicate": L.Conv2D(16, 3, padding=1, padding_mode="replicate"),
        "conv_circular": L.Conv2D(16, 3, padding=1, padding_mode="circular"),
        "conv_dilated": L.Conv2D(16, 3, padding=2, dilation=2),
        "conv_grouped": L.Conv2D(16, 3, padding=1, groups=4),
        "conv_1x1": L.Conv2D(16, 1),
        "locally_connected": L.LocallyConnected2D(4, 3, strides=2),
        "tiled_conv": L.TiledConv2D(4, 3, tile_size=2),
        "conv_transpose_s2": L.ConvTranspose2D(4, 4, strides=2, padding=1),
        "conv_transpose_grouped": L.ConvTranspose2D(8, 3, strides=2, groups=2, output_padding=1),
        "local_response_norm": L.LocalResponseNorm(),
    }
    for name, module in convs.items():
        cases += _module_cases(name, module, x)
    pools = {
        "max_pool_3x3_s2_pad1": partial(L.max_pool2d, kernel_size=3, stride=2, padding=1),
        "max_pool_ceil": partial(L.max_pool2d, kernel_size=3, stride=2, ceil_mode=True),
        "avg_pool_exclude_pad": partial(L.avg_pool2d, kernel_size=3, stride=2, padding=1,
                                        count_include_pad=False),
        "global_avg_pool": L.global_avg_pool,
        "global_max_pool": L.global_max_pool,
        "adaptive_avg_pool_5": partial(L.adaptive_avg_pool2d, output_size=5),
        "adaptive_max_pool_5": partial(L.adaptive_max_pool2d, output_size=5),
        "spatial_pyramid_pool": partial(L.spatial_pyramid_pool, levels=(1, 2, 4)),
    }
    for name, fn in pools.items():
        cases += _function_cases(name, fn, x)
    boxes = np.array([[0.0, 0.0, 12.0, 12.0], [2.5, 1.0, 9.0, 7.5], [4.0, 4.0, 5.0, 6.0],
                      [1.2, 3.3, 11.9, 10.1]], np.float32)
    indices = np.array([0, 1 % batch, 0, 1 % batch], np.int32)
    rois = {
        "roi_pool": partial(L.roi_pool, boxes=boxes, batch_indices=indices, output_size=3),
        "roi_align": partial(L.roi_align, boxes=boxes, batch_indices=indices, output_size=3,
                             sampling_ratio=2),
        "roi_align_adaptive": partial(L.roi_align, boxes=boxes, batch_indices=indices,
                                      output_size=(2, 3), aligned=False),
        "roi_spatial_pyramid_pool": partial(L.roi_spatial_pyramid_pool, boxes=boxes,
                                            batch_indices=indices, levels=(1, 2)),
    }
    for name, fn in rois.items():
        cases += _function_cases(name, fn, x)
    many = np.concatenate([rng.uniform(0, 20, (64, 2)), rng.uniform(21, 40, (64, 2))], axis=1)
    scores = rng.uniform(0, 1, 64).astype(np.float32)
    cases += _function_cases("nms", partial(L.nms, iou_threshold=0.3, max_output_size=20),
                             many.astype(np.float32), scores, grad=False)
    cases += _function_cases("box_iou", L.box_iou, many[:10].astype(np.float32),
                             many[5:25].astype(np.float32), grad=False)
    return cases


def model_cases(names: list[str], batch: int, image_size: int, grads: bool) -> list[Case]:
    """Each registered model forward in eval mode (and its train-mode parameter gradient)."""
    import jax

    from cnnjax.models.registry import create_model, model_info
    from cnnjax.train.checks import one_value_batch_norm

    cases = []
    for name in names:
        info = model_info(name)
        size = max(image_size, info.min_input_size)
        x = np.random.default_rng(1).standard_normal(
            (batch, size, size, info.input_shape[2])).astype(np.float32)
        model = create_model(name)
        variables = _initializer(model, x)
        if grads:  # one image through a 1x1 map: flax's check would fail the case, not the flag
            layer = one_value_batch_norm(model, batch, 1, x.shape[1:])
            if layer is not None:
                raise ValueError(
                    f"--batch_size={batch} is invalid with --model_grads for {name}: in "
                    f"training mode its {layer} would see one value per channel at "
                    f"--image_size={image_size}; use --batch_size >= 2, a larger --image_size, "
                    "or --nomodel_grads")

        def forward(variables, x, model=model):
            return model.apply(variables, x, train=False)

        cases.append(Case(name, "forward", forward, lambda v=variables, x=x: (v(), x)))
        if grads:
            def train_output(params, rest, x, model=model):
                out, _ = model.apply({"params": params, **rest}, x, train=True,
                                     rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
                return out

            def train_args(v=variables, x=x):
                variables = v()
                return variables["params"], {k: u for k, u in variables.items()
                                             if k != "params"}, x

            cases.append(Case(name, "grad", _projection_grad(train_output, (0,), seed=4),
                              train_args))
    return cases


def _initializer(model: Any, x: np.ndarray) -> Callable[[], Any]:
    """`model`'s variables for input `x` on the host, made (jitted) on the first call only."""
    import functools

    import jax

    @functools.cache
    def variables():
        key = jax.random.key(0)
        return jax.device_get(jax.jit(model.init)({"params": key, "dropout": key}, x))

    return variables


def run_case(case: Case, accelerator: Any, cpu: Any) -> Outcome:
    """Runs `case` on both devices (highest matmul precision); its errors, or why it failed."""
    import jax

    start = time.perf_counter()
    try:
        fn, args = jax.jit(case.fn), case.arguments()
        with jax.default_matmul_precision("highest"):
            got = jax.device_get(fn(*jax.device_put(args, accelerator)))
            want = jax.device_get(fn(*jax.device_put(args, cpu)))
        rel, worst = compare(got, want)
    except Exception as err:  # noqa: BLE001 - a case that cannot run is reported, not fatal
        return Outcome(case.name, case.kind, None, None, time.perf_counter() - start,
                       f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return Outcome(case.name, case.kind, rel, worst, time.perf_counter() - start)


def compare(got: Any, want: Any) -> tuple[float, float]:
    """Relative 2-norm error over all leaves (float64) and the largest absolute error; integer
    and boolean leaves must match exactly (an exact mismatch counts as relative error inf)."""
    import jax

    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise ValueError(f"{len(got_leaves)} output leaves against {len(want_leaves)}")
    diff_sq = ref_sq = worst = 0.0
    for g, w in zip(got_leaves, want_leaves, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            raise ValueError(f"output shape {g.shape} against {w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            if not np.array_equal(g, w):
                return float("inf"), float(np.max(np.abs(g.astype(np.int64) - w)))
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        if not (np.isfinite(g64).all() and np.isfinite(w64).all()):
            return float("nan"), float("nan")
        diff_sq += float(np.sum((g64 - w64) ** 2))
        ref_sq += float(np.sum(w64 ** 2))
        worst = max(worst, float(np.max(np.abs(g64 - w64), initial=0.0)))
    rel = np.sqrt(diff_sq / ref_sq) if ref_sq > 0 else np.sqrt(diff_sq)
    return float(rel), worst


def report(outcomes: list[Outcome], tolerance: float, grad_tolerance: float) -> list[str]:
    """One line per case and a closing count."""
    lines = [f"{'case':32s} {'kind':7s} {'rel error':>10s} {'max abs':>10s} {'s':>6s}  result"]
    for o in outcomes:
        figures = ("" if o.rel_error is None
                   else f"{o.rel_error:10.2e} {o.max_abs_error:10.2e}")
        verdict = ("ok" if o.passed(tolerance, grad_tolerance)
                   else f"FAIL {o.error}" if o.error else "FAIL")
        lines.append(f"{o.name:32s} {o.kind:7s} {figures:21s} {o.seconds:6.1f}  {verdict}")
    failed = sum(not o.passed(tolerance, grad_tolerance) for o in outcomes)
    lines.append(f"{len(outcomes) - failed} of {len(outcomes)} cases within tolerance "
                 f"(forward {tolerance:g}, grad {grad_tolerance:g}); {failed} failed")
    return lines


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)
    with one_line_errors():
        names = check_flags()
        configure_cpu_defaults()
        import jax

        accelerator, cpu = jax.devices()[0], jax.devices("cpu")[0]
        if accelerator.platform == "cpu" and not FLAGS.allow_cpu:
            raise ValueError("backend_parity: the default backend is the CPU, so there is "
                             "nothing to compare; run it where JAX sees a GPU/TPU, or pass "
                             "--allow_cpu to check the script against itself")
        cases = layer_cases(FLAGS.batch_size) if FLAGS.layers else []
        cases += model_cases(names, FLAGS.batch_size, FLAGS.image_size, FLAGS.model_grads)
        cases = select_cases(cases, FLAGS.skip)  # a bad --skip: one line, before any case runs
    print(f"jax {jax.__version__}: {accelerator.device_kind} ({accelerator.platform}) against "
          f"{cpu.device_kind} (cpu)", flush=True)
    outcomes, not_run, start = [], [], time.perf_counter()
    for i, case in enumerate(cases):
        if i and FLAGS.max_seconds and time.perf_counter() - start > FLAGS.max_seconds:
            not_run = [f"{c.name} {c.kind}" for c in cases[i:]]
            break
        outcomes.append(run_case(case, accelerator, cpu))
        o = outcomes[-1]
        print(f"  {o.name} {o.kind}: "
              + (o.error or f"rel {o.rel_error:.2e}, max abs {o.max_abs_error:.2e}"),
              flush=True)
    lines = report(outcomes, FLAGS.tolerance, FLAGS.grad_tolerance)
    if not_run:
        lines.append(f"{len(not_run)} of {len(cases)} cases not run (--max_seconds="
                     f"{FLAGS.max_seconds:g}): {', '.join(not_run)}")
    print("\n".join(lines))
    if FLAGS.json_out:
        write_json_out(FLAGS.json_out, {
            "jax_version": jax.__version__, "accelerator": accelerator.device_kind,
            "tolerance": FLAGS.tolerance, "grad_tolerance": FLAGS.grad_tolerance,
            "cases": [o.__dict__ for o in outcomes], "not_run": not_run})
    if any(not o.passed(FLAGS.tolerance, FLAGS.grad_tolerance) for o in outcomes):
        sys.exit(1)
    if not_run:
        sys.exit(INCOMPLETE_EXIT)


if __name__ == "__main__":
    define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
