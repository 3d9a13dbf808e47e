r"""Transposed convolution on the CPU: `ConvTranspose2D`'s per-phase form against the
input-dilated one (`lax.conv_transpose`'s), forward and forward + backward, dense and grouped.

  python -m benchmarks.conv_transpose --batch=8 --size=28 --channels=64 --kernel=4 --stride=2

Builds one `ConvTranspose2D` per `--groups` value (default: 1 and depthwise), times a jitted
forward and a jitted forward + backward (gradients of a squared-sum loss with respect to the
input and the kernel), and prints the backward's ahead-of-time compile time and the median wall
time per call, in the layer's default form and in the input-dilated one (what the layer emits
inside `cnnjax.layers.conv_impl.xla_convolutions()`). The per-phase form is the CPU default
while `stride²` is at most `MAX_PHASES` (`MAX_PHASES_GROUPED` with groups); the script says
which form the layer picks.
"""

from __future__ import annotations

import contextlib
import statistics
import time

from absl import app, flags

from cnnjax.platform import configure_cpu_defaults


def _define_flags() -> None:
    """The command's flags, defined only when it runs."""
    flags.DEFINE_integer("batch", 8, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("size", 28, "Side of the square input map.", lower_bound=1)
    flags.DEFINE_integer("channels", 64, "Input and output channels.", lower_bound=1)
    flags.DEFINE_integer("kernel", 4, "Kernel side.", lower_bound=1)
    flags.DEFINE_integer("stride", 2, "Stride (the upsampling factor).", lower_bound=1)
    flags.DEFINE_integer("padding", 1, "Padding cropped from each side of the full output.",
                         lower_bound=0)
    flags.DEFINE_list("groups", ["1", "depthwise"], "Group counts to time ('depthwise': "
                      "--channels).")
    flags.DEFINE_integer("repeats", 5, "Timed calls per form.", lower_bound=1)


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)
    import jax
    import jax.numpy as jnp

    from cnnjax.layers.conv import ConvTranspose2D, _use_phases
    from cnnjax.layers.conv_impl import xla_convolutions
    from cnnjax.utils.validation import invalid

    opts = flags.FLAGS
    c = opts.channels
    shape = (opts.batch, opts.size, opts.size, c)
    layers = []
    owner = "benchmarks.conv_transpose"
    with one_line_errors():  # every flag and layer checked before anything compiles
        # The layer's own refusals name its arguments (`features=`), not the flags: these first.
        side = (opts.size - 1) * opts.stride + opts.kernel - 2 * opts.padding
        if side < 1:
            raise invalid(owner, "--padding", opts.padding,
                          f"the output would be {side}x{side} for --size={opts.size}, "
                          f"--kernel={opts.kernel} and --stride={opts.stride}; expected at most "
                          f"{((opts.size - 1) * opts.stride + opts.kernel - 1) // 2}")
        if not opts.groups:
            raise invalid(owner, "--groups", "",
                          "expected positive integers or 'depthwise' (nothing to time)")
        for value in opts.groups:
            if value != "depthwise" and not (value.isdigit() and int(value) > 0):
                raise invalid(owner, "--groups", value,
                              "expected positive integers or 'depthwise'")
            groups = c if value == "depthwise" else int(value)
            if c % groups:
                raise invalid(owner, "--groups", value,
                              f"expected divisors of --channels={c}, or 'depthwise'")
            layer = ConvTranspose2D(c, opts.kernel, strides=opts.stride, padding=opts.padding,
                                    groups=groups, use_bias=False)
            # the layer's remaining input checks, on shapes only
            jax.eval_shape(layer.init, jax.random.key(1), jax.ShapeDtypeStruct(shape, jnp.float32))
            layers.append((groups, layer))
    x = jax.random.normal(jax.random.key(0), shape)
    for groups, layer in layers:
        variables = layer.init(jax.random.key(1), x)
        out = jax.eval_shape(layer.apply, variables, x).shape
        picks = "per-phase" if _use_phases((opts.stride,) * 2, out[1:3], groups) else \
            "input-dilated"
        print(f"{tuple(x.shape)} -> {tuple(out)}, kernel {opts.kernel}, stride {opts.stride}, "
              f"groups {groups}: ConvTranspose2D uses the {picks} form here")

        def loss(v, xs, m=layer):
            return jnp.sum(m.apply(v, xs) ** 2)

        for name, ctx in (("layer default", contextlib.nullcontext()),
                          ("input-dilated", xla_convolutions())):
            with ctx:  # the form is chosen while tracing, i.e. at lowering
                start = time.perf_counter()
                backward = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()
                compile_s = time.perf_counter() - start
                # A fresh function per form: jit would replay the first form's cached trace.
                forward = jax.jit(lambda v, xs, m=layer: m.apply(v, xs)).lower(
                    variables, x).compile()
            times = {}
            for kind, fn in (("forward", forward), ("forward+backward", backward)):
                jax.block_until_ready(fn(variables, x))
                walls = []
                for _ in range(opts.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(variables, x))
                    walls.append(time.perf_counter() - start)
                times[kind] = statistics.median(walls)
            print(f"{name:>14}: forward {times['forward'] * 1e3:8.1f} ms, forward+backward "
                  f"{times['forward+backward'] * 1e3:8.1f} ms (backward compiled in "
                  f"{compile_s:.2f} s)")


if __name__ == "__main__":
    configure_cpu_defaults()
    _define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
