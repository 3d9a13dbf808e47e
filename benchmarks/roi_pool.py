r"""RoI max pooling (`cnnjax.layers.roi.roi_pool`, as SPP-net and Fast R-CNN use it): forward +
backward time of its two reductions, the one-shot masked max (small maps) and the row/column
loop (large maps), on the same boxes, with the pyramid levels summed like SPP-net's.

  python -m benchmarks.roi_pool --boxes=1024 --map=8 --channels=128 --levels=1,2,4

Prints the median wall and CPU time per call of each path and which one `roi_pool` picks at this
size (`_VECTORIZED_ROI_POOL_ELEMENTS`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from absl import app, flags

from cnnjax.platform import configure_cpu_defaults


def _define_flags() -> None:
    """The command's flags, defined when it runs (importing `median_times` defines none, so it
    clashes with no other command's `--stride`)."""
    flags.DEFINE_integer("boxes", 1024, "RoIs (e.g. 16 images x 64 sampled RoIs).",
                         lower_bound=1)
    flags.DEFINE_integer("map", 8, "Side of the square feature map.", lower_bound=1)
    flags.DEFINE_integer("channels", 128, "Feature channels.", lower_bound=1)
    flags.DEFINE_integer("stride", 8, "Image pixels per feature cell.", lower_bound=1)
    flags.DEFINE_list("levels", ["1", "2", "4"], "Output sizes (pyramid levels).")
    flags.DEFINE_integer("repeats", 10, "Timed calls per path.", lower_bound=1)


def median_times(times: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The median wall time and the median CPU time of `(wall, cpu)` pairs, each on its own:
    the CPU time of the median-wall call is not the median CPU time (a call may be slow on the
    wall clock while waiting, not computing), and an even count averages the two middle ones."""
    return (statistics.median(wall for wall, _ in times),
            statistics.median(cpu for _, cpu in times))


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnnjax.layers import roi
    from cnnjax.utils.validation import invalid

    opts = flags.FLAGS
    with one_line_errors():  # before anything compiles
        if not all(v.isdigit() and int(v) > 0 for v in opts.levels) or not opts.levels:
            raise invalid("benchmarks.roi_pool", "--levels", ",".join(opts.levels),
                          "expected positive integers (output sizes), e.g. 1,2,4")
    levels = [int(v) for v in opts.levels]
    images, side = 16, opts.map * opts.stride
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(images, opts.map, opts.map, opts.channels)),
                           jnp.float32)
    xs, ys = np.sort(rng.uniform(0, side, (2, opts.boxes, 2)), axis=2)
    boxes = jnp.asarray(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1), jnp.float32)
    batch = jnp.asarray(rng.integers(0, images, opts.boxes), jnp.int32)

    def loss(f):
        return sum(jnp.sum(roi.roi_pool(f, boxes, batch, level, 1.0 / opts.stride) ** 2)
                   for level in levels)

    budget = roi._VECTORIZED_ROI_POOL_ELEMENTS
    largest = opts.boxes * max(levels) * opts.map ** 2 * opts.channels
    print(f"{opts.boxes} boxes on {images}x{opts.map}x{opts.map}x{opts.channels}, levels "
          f"{levels}: roi_pool uses the {'vectorized' if largest <= budget else 'loop'} path "
          f"({largest:,} masked values at the largest level, limit {budget:,})")
    try:
        for name, limit in (("vectorized", 2**62), ("loop", 0)):
            roi._VECTORIZED_ROI_POOL_ELEMENTS = limit
            roi._roi_pool.clear_cache()
            step = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(step(features))
            times = []
            for _ in range(opts.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(step(features))
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
            wall, cpu = median_times(times)
            print(f"{name:>10}: forward+backward {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms "
                  "CPU")
    finally:  # the module's limit as it was, whatever happened
        roi._VECTORIZED_ROI_POOL_ELEMENTS = budget
        roi._roi_pool.clear_cache()


if __name__ == "__main__":
    configure_cpu_defaults()
    _define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
