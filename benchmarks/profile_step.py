r"""Where a train step's time goes: the engine's step under `jax.profiler`, grouped by HLO op kind.

Builds and compiles the same step as `benchmarks/train_step.py`, records `--steps` steps with
`jax.profiler.trace` and reads the Perfetto trace it writes: every executed HLO op (thunk) with
its start and, for ops XLA:CPU runs asynchronously (convolutions, large fusions), the matching
"end: <op>" event. Prints the wall time per step (the steps alone: starting and stopping the
profiler, which writes the trace, is not counted), each op kind's time in flight per step (from
its dispatch to its "end:" event, or its own event) and its share, the time its own events held a
runtime thread, then the most expensive single ops.

  python -m benchmarks.profile_step --model=resnet18 --stem=cifar --batch_size=128

Ops run concurrently (XLA:CPU executes independent ops on two threads while convolutions use its
intra-op pool), so the times add up to more than the step's wall time; compare shares, not sums.
Time in flight includes waiting: an asynchronous op queued behind others (a 1 MB parameter copy
queued behind convolutions: 80 ms in flight, 0.4 ms in its own event) is charged for the wait, so
in-flight shares overstate ops that wait; own-event times undercount asynchronous ops (a
convolution's own event is its dispatch). Neither is a per-op CPU time, which the trace does not
record. Figures measured with this script are in docs/performance.md.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from absl import app, flags

from benchmarks.train_step import (
    build_jax_step,
    check_model,
    compile_jax_step,
    prepare_platform,
    run_jax_steps,
)

FLAGS = flags.FLAGS

_END_PREFIX = "end: "
#: An HLO instruction's name ("fusion.41", "conv_general_dilated.63", "all-reduce"); host-side
#: spans on the calling thread ("PjitFunction(jit(_fun))", "ParseArguments") never match.
_HLO_NAME = re.compile(r"^[a-z_][a-z0-9_\-]*(\.\d+)*$")
#: (category, pattern on the op name without its ".N" suffix), first match wins.
CATEGORIES = (
    ("convolution", re.compile(r"^(convolution|conv_general_dilated)")),  # not "convert"
    ("matmul (dot)", re.compile(r"^(dot|.*_dot_fusion|dot_)")),
    ("collective", re.compile(
        r"^(all-reduce|psum|pmin|pmax|pmean|all-gather|reduce-scatter|collective)")),
    ("reduction", re.compile(r"reduce")),
    ("transpose / copy", re.compile(r"(transpose|^copy)")),
    ("elementwise fusion", re.compile(r"fusion|^wrapped_")),
)


def categorize(op_name: str) -> str:
    """The category of an HLO op named like "transpose_copy_fusion.41" (else "other")."""
    base = re.sub(r"\.\d+$", "", op_name)
    for category, pattern in CATEGORIES:
        if pattern.search(base):
            return category
    return "other"


def _hlo_events(events: Iterable[Mapping[str, Any]], skip_threads: Iterable[str]
                ) -> Iterator[tuple[str, bool, Mapping[str, Any]]]:
    """`(op, is_end, event)` for each complete event of an HLO op (its own, or its "end: <op>")
    on a thread not named in `skip_threads`; the executor's bookkeeping and the caller's host
    work are left out."""
    events = list(events)
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
               for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    skip = set(skip_threads)
    for e in events:
        if e.get("ph") != "X" or threads.get((e.get("pid"), e.get("tid"))) in skip:
            continue
        is_end = e["name"].startswith(_END_PREFIX)
        op = e["name"][len(_END_PREFIX):] if is_end else e["name"]
        if _HLO_NAME.match(op):
            yield op, is_end, e


def op_busy_times(events: Iterable[Mapping[str, Any]],
                  skip_threads: Iterable[str] = ("python",)) -> dict[str, float]:
    """Microseconds each HLO op was in flight, summed over its executions.

    `events` are Chrome/Perfetto trace events: thread-name metadata ("ph": "M") and complete
    events ("ph": "X", with "ts" and "dur"). An op runs from the start of its event to the end of
    the first later "end: <op>" event when XLA finished it asynchronously, else to the end of its
    own event. Python-side events, host spans on any thread (absl renames the main thread, so
    its name cannot tell them apart) and the executor's bookkeeping spans are skipped.
    """
    starts: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    ends: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for op, is_end, e in _hlo_events(events, skip_threads):
        (ends if is_end else starts)[op].append(e)
    busy: dict[str, float] = collections.defaultdict(float)
    for name, runs in starts.items():
        finishes = sorted(ends.get(name, ()), key=lambda e: e["ts"])
        for run in sorted(runs, key=lambda e: e["ts"]):
            end = run["ts"] + run["dur"]
            later = next((f for f in finishes if f["ts"] >= run["ts"]), None)
            if later is not None:
                end = max(end, later["ts"] + later["dur"])
                finishes.remove(later)
            busy[name] += end - run["ts"]
    return dict(busy)


def op_own_times(events: Iterable[Mapping[str, Any]],
                 skip_threads: Iterable[str] = ("python",)) -> dict[str, float]:
    """Microseconds of each HLO op's own events (the time it held a runtime thread: the whole op
    when it ran inline, only its dispatch when it ran asynchronously), summed over executions."""
    own: dict[str, float] = collections.defaultdict(float)
    for op, is_end, e in _hlo_events(events, skip_threads):
        if not is_end:
            own[op] += e["dur"]
    return dict(own)


def by_category(busy: Mapping[str, float]) -> dict[str, float]:
    """Sums `op_busy_times` per `categorize` category, largest first."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, micros in busy.items():
        totals[categorize(name)] += micros
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def load_trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The events of the newest Perfetto trace `jax.profiler.trace` wrote under `trace_dir`."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                          "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"profile_step: no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def report(busy: Mapping[str, float], steps: int, wall_s_per_step: float, top: int,
           own: Mapping[str, float] | None = None) -> str:
    """The printed table: per-category and top-`top` single-op seconds per step in flight (and in
    their own events, when `own` is given)."""
    own = own or {}
    total = sum(busy.values()) or 1.0
    own_by_category = by_category(own)
    lines = [f"wall time per step: {wall_s_per_step:.3f} s; op time in flight per step: "
             f"{total / 1e6 / steps:.3f} s (ops overlap; in flight includes queueing)", "",
             f"{'category':22s} {'in flight s/step':>16s} {'share':>7s} {'own events s/step':>17s}"]
    for category, micros in by_category(busy).items():
        lines.append(f"{category:22s} {micros / 1e6 / steps:16.3f} {100 * micros / total:6.1f}% "
                     f"{own_by_category.get(category, 0.0) / 1e6 / steps:17.3f}")
    lines += ["", f"top {top} ops (in flight, own events):"]
    for name, micros in sorted(busy.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {micros / 1e6 / steps:8.3f} {own.get(name, 0.0) / 1e6 / steps:8.3f} "
                     f"s/step  {categorize(name):20s} {name}")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", "resnet18", "Registered model name.")
    flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
    flags.DEFINE_integer("image_size", 32, "Square input resolution (3 channels).", lower_bound=1)
    flags.DEFINE_integer("num_classes", 10, "Classifier outputs.", lower_bound=1)
    flags.DEFINE_enum("stem", None, ["imagenet", "cifar"], "ResNet stem override.")
    flags.DEFINE_enum("conv_impl", "auto", ["xla", "matmul", "auto"], "Convolution lowering.")
    flags.DEFINE_enum("batch_norm_impl", "auto", ["flax", "matmul", "auto"],
                      "Training-mode BatchNorm lowering.")
    flags.DEFINE_integer("steps", 2, "Profiled steps (after one untimed step).", lower_bound=1)
    flags.DEFINE_integer("top", 15, "How many single ops to list.", lower_bound=1)
    flags.DEFINE_string("trace_dir", None, "Keep the trace here (TensorBoard/Perfetto can open "
                        "it); default: a temporary directory, deleted afterwards.")


def build_step(model: str = "resnet18", batch_size: int = 128, image_size: int = 32,
               num_classes: int = 10, stem: str | None = None,
               batch_norm_impl: str = "auto") -> dict:
    """The one-device train step to profile, built (not compiled): a bad model argument (a
    `stem` the model does not take) is a ValueError here, before anything compiles."""
    overrides = {} if stem is None else {"stem": stem}
    return build_jax_step(model, num_classes, batch_size, (image_size, image_size, 3), 1, "pmap",
                          "float32", {"batch_norm_impl": batch_norm_impl}, **overrides)


def profile(model: str = "resnet18", batch_size: int = 128, image_size: int = 32,
            num_classes: int = 10, stem: str | None = None, conv_impl: str = "auto",
            steps: int = 2, top: int = 15, trace_dir: str | None = None,
            batch_norm_impl: str = "auto", bench: dict | None = None) -> str:
    """Compiles the step (`bench`, or `build_step`'s of these arguments), runs one untimed step,
    then `steps` steps under `jax.profiler.trace`; returns the printed text (a header, then
    `report`).

    The wall time per step is the mean of the steps' own times (`run_jax_steps`, results ready):
    starting the profiler and stopping it, which writes and converts the trace, take longer than
    a small model's steps and are not part of a step.
    """
    import jax

    if bench is None:
        bench = build_step(model, batch_size, image_size, num_classes, stem, batch_norm_impl)
    compile_s = compile_jax_step(bench, conv_impl)
    run_jax_steps(bench, 1)
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = trace_dir or scratch
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            times = run_jax_steps(bench, steps)
        wall = sum(step_wall for step_wall, _ in times) / steps
        events = load_trace_events(trace_dir)
        busy, own = op_busy_times(events), op_own_times(events)
    header = (f"model={model} stem={stem or 'default'} batch={batch_size} image={image_size} "
              f"conv_impl={conv_impl} batch_norm_impl={batch_norm_impl} ({bench['platform']}, "
              f"jax {jax.__version__}); compile {compile_s:.1f} s")
    return header + "\n" + report(busy, steps, wall, top, own)


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command
    from cnnjax.utils.files import check_output_dir

    start_command(argv)  # positional arguments: one error line
    with one_line_errors():  # bad flags: one line, before anything is compiled
        check_model(FLAGS.model, FLAGS.image_size, FLAGS.stem)
        if FLAGS.trace_dir is not None:
            check_output_dir(FLAGS.trace_dir, "--trace_dir")
        prepare_platform(True, 1)
        bench = build_step(FLAGS.model, FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes,
                           FLAGS.stem, FLAGS.batch_norm_impl)
    print(profile(FLAGS.model, FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes, FLAGS.stem,
                  FLAGS.conv_impl, FLAGS.steps, FLAGS.top, FLAGS.trace_dir, FLAGS.batch_norm_impl,
                  bench))


if __name__ == "__main__":
    define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
