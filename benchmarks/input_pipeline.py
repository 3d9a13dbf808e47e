r"""Is the input pipeline the bottleneck? Step time with real tf.data batches vs. an in-memory one.

Three figures for one dataset, model and batch size:
1. raw pipeline throughput: images/s of `cnnjax.data.pipeline.train_batches` alone (host numpy
   batches, no model);
2. train step on a synthetic batch already on the device (reused every step);
3. train step fed by the pipeline: each step takes the next batch, copies it to the devices and
   runs, all on the main thread (the engine's loop additionally overlaps the copy with the step
   in a background thread, so this is an upper bound on the input cost it sees).
Rounds of 2 and 3 are interleaved so both see the same machine load. If 3 matches 2, and 1 is
well above both, input is not what limits training speed.

  python -m benchmarks.input_pipeline --dataset=fake --model=resnet18 --batch_size=128
  python -m benchmarks.input_pipeline --dataset=digits --image_size=32 --model=lenet5

`--mock_examples=N` runs a catalogue dataset (e.g. cifar10) on N random examples per split
(`cnnjax.data.sources.mock_tfds_dataset`), so its decode and augmentation path is timed without
the data. Figures are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags

from benchmarks.train_step import (
    build_jax_step,
    check_devices,
    check_json_out,
    check_model,
    compile_jax_step,
    environment,
    interleaved_rounds,
    loadavg,
    prepare_platform,
    run_jax_steps,
    summarize,
    write_json_out,
)

FLAGS = flags.FLAGS


def data_config(dataset: str, image_size: int | None, fake_num_train: int | None,
                randaugment_layers: int = 0, randaugment_magnitude: float = 9.0):
    """The pipeline's data config for `dataset`, with the benchmark's overrides;
    `fake_num_train` sizes the `fake` set only (the data config refuses it for another
    dataset): it is given to `fake`, and must be None for any other."""
    from cnnjax.data import pipeline

    config = pipeline.default_data_config(dataset)
    config.image_size = image_size
    if dataset == "fake":
        config.fake_num_train = fake_num_train
    elif fake_num_train is not None:
        raise ValueError(f"--fake_num_train={fake_num_train} is invalid with "
                         f"--dataset={dataset}: it sizes the in-memory `fake` set only; "
                         "expected it unset, or --dataset=fake")
    config.randaugment_layers = randaugment_layers
    config.randaugment_magnitude = randaugment_magnitude
    return config


def enter_mock(stack: contextlib.ExitStack, config, num_examples: int) -> None:
    """Reads `config`'s catalogue dataset as `num_examples` mocked examples per split until
    `stack` closes (`cnnjax.data.sources.mock_tfds_dataset`, its split metadata in a temporary
    folder that `config.data_dir` then names)."""
    import tempfile

    from cnnjax.data import sources
    from cnnjax.data.spec import resolve

    if config.name == "fake":
        raise ValueError(f"--mock_examples={num_examples} is invalid with --dataset=fake, which "
                         "is generated in memory; expected 0, or a tfds dataset such as cifar10")
    config.data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mock_tfds_"))
    stack.enter_context(sources.mock_tfds_dataset(resolve(config), num_examples))


def check_batch_fits(batch_size: int, info: Any, mock_examples: int,
                     fake_num_train: int) -> None:
    """A ValueError naming --batch_size when the train split holds fewer examples than one batch
    (train_batches would find an epoch without a step), before the step is built."""
    if batch_size <= info.num_train:
        return
    fix = "lower --batch_size"
    if mock_examples > 0:
        fix = f"--mock_examples={mock_examples} mocks {mock_examples} per split: raise it, or {fix}"
    elif info.name == "fake":
        fix = f"--fake_num_train={fake_num_train}: raise it, or {fix}"
    raise ValueError(f"--batch_size={batch_size} is invalid; expected at most the "
                     f"{info.num_train} training examples of {info.name} ({fix})")


def time_pipeline(batches: Iterator[dict], warmup: int, count: int) -> dict[str, float]:
    """Images/s of pulling `count` batches (after `warmup`) from a host batch iterator."""
    for _ in range(warmup):
        next(batches)
    images = 0
    start = time.perf_counter()
    for _ in range(count):
        images += next(batches)["label"].size
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "batch_ms": 1e3 * seconds / count}


class FedBatches:
    """The pipeline-fed step's batches: each call takes the next host batch and copies it to the
    devices, timing the wait and the copy. Passed to `interleaved_rounds` as `on_timed`,
    `keep_timed` keeps the timed steps' figures in `timed` and drops the warm-up's, as the step
    times do."""

    def __init__(self, host: Iterator[dict], shard: Callable[[dict], Any],
                 runner: str = "pipeline"):
        self.host, self.shard, self.runner = host, shard, runner
        self.timed: list[tuple[float, float]] = []  # (wait, copy) seconds of each timed step
        self._pending: list[tuple[float, float]] = []  # since the runner's last timed steps

    def __call__(self) -> Any:
        import jax

        start = time.perf_counter()
        host = next(self.host)
        wait = time.perf_counter() - start
        device = jax.block_until_ready(self.shard(host))
        self._pending.append((wait, time.perf_counter() - start - wait))
        return device

    def keep_timed(self, name: str, _round: int, times: list) -> None:
        if name == self.runner:  # one batch a step: the last len(times) fed the timed steps
            self.timed += self._pending[len(self._pending) - len(times):]
            self._pending.clear()


def define_flags() -> None:
    """Defines this script's command-line flags (only when run as a script)."""
    flags.DEFINE_string("dataset", "fake", "Dataset name (cnnjax.data.presets.list_datasets()).")
    flags.DEFINE_integer("image_size", None, "Output image side (None: the dataset's native size).")
    flags.DEFINE_integer("fake_num_train", 4096, "Training examples of the `fake` dataset.",
                         lower_bound=1)
    flags.DEFINE_integer("mock_examples", 0, "If > 0, read the dataset through "
                         "tfds.testing.mock_data with this many examples per split.",
                         lower_bound=0)
    flags.DEFINE_integer("randaugment_layers", 0, "RandAugment ops per image (0: off).",
                         lower_bound=0)
    flags.DEFINE_float("randaugment_magnitude", 9.0, "RandAugment magnitude (0..10).")
    flags.DEFINE_string("model", "resnet18", "Registry name of the model.")
    flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
    flags.DEFINE_integer("num_devices", 1, "Data-parallel devices (0: all).", lower_bound=0)
    flags.DEFINE_enum("parallel", "pmap", ["pmap", "shard_map"], "How the step is distributed.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
    flags.DEFINE_integer("steps", 10, "Timed train steps per round and feeding mode.",
                         lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps (or batches) before each timed run.",
                         lower_bound=0)
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds of (synthetic, pipeline) steps.",
                         lower_bound=1)
    flags.DEFINE_integer("pipeline_batches", 50, "Batches timed for the raw pipeline throughput.",
                         lower_bound=1)
    flags.DEFINE_bool("xla_defaults", True, "Apply cnnjax.platform.configure_cpu_defaults().")
    flags.DEFINE_string("json_out", None, "Also write the results as JSON to this path.")


def check_data_flags(dataset: str, randaugment_layers: int, randaugment_magnitude: float) -> None:
    """`--dataset` and the RandAugment flags against what the data config takes, up front: its
    own refusals name its fields (`data: name='x'`), not the flags."""
    from cnnjax.data.presets import list_datasets
    from cnnjax.data.spec import check_randaugment

    if dataset not in list_datasets():
        raise ValueError(f"--dataset={dataset!r} is invalid; expected one of {list_datasets()}")
    check_randaugment("benchmarks.input_pipeline", randaugment_layers, randaugment_magnitude,
                      layers_arg="--randaugment_layers", magnitude_arg="--randaugment_magnitude")


def check_model_at_native_size(model: str, native_hw: Sequence[int]) -> None:
    """`check_model` at the dataset's native size, which --image_size left unset."""
    try:
        check_model(model, min(native_hw))
    except ValueError as err:
        raise ValueError(f"{err} (unset, the dataset's native size; set a larger "
                         "--image_size)") from None


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)  # positional arguments: one error line
    with one_line_errors():  # bad flags: one line, before the dataset is read or a step compiled
        check_model(FLAGS.model, FLAGS.image_size)
        check_data_flags(FLAGS.dataset, FLAGS.randaugment_layers, FLAGS.randaugment_magnitude)
        check_devices(FLAGS.batch_size, FLAGS.num_devices)
        check_json_out(FLAGS.json_out)
        changed = prepare_platform(FLAGS.xla_defaults, FLAGS.num_devices)
    from cnnjax.data import pipeline
    from cnnjax.data.spec import resolve

    load_start = loadavg()
    with contextlib.ExitStack() as mock:
        with one_line_errors():
            fake_num_train = (FLAGS.fake_num_train if FLAGS.dataset == "fake"
                              or FLAGS["fake_num_train"].present else None)
            config = data_config(FLAGS.dataset, FLAGS.image_size, fake_num_train,
                                 FLAGS.randaugment_layers, FLAGS.randaugment_magnitude)
            # The native size of a fixed-size preset is known before its data is read (or,
            # for cnnjax's offline sets, generated); a variable-size dataset's only after.
            native_hw = resolve(config).known_output_hw()
            if FLAGS.image_size is None and native_hw is not None:
                check_model_at_native_size(FLAGS.model, native_hw)
            if FLAGS.mock_examples > 0:
                enter_mock(mock, config, FLAGS.mock_examples)
            info = pipeline.get_dataset_info(config)
            if FLAGS.image_size is None and native_hw is None:
                check_model_at_native_size(FLAGS.model, info.image_shape[:2])
            check_batch_fits(FLAGS.batch_size, info, FLAGS.mock_examples, FLAGS.fake_num_train)
            bench = build_jax_step(FLAGS.model, info.num_classes, FLAGS.batch_size,
                                   info.image_shape, FLAGS.num_devices, FLAGS.parallel,
                                   FLAGS.dtype)
        n, dp = bench["num_devices"], bench["parallel"]

        def batches(seed: int) -> Iterator[dict]:
            return pipeline.train_batches(config, global_batch_size=FLAGS.batch_size,
                                          num_devices=n, seed=seed)

        raw = time_pipeline(batches(0), FLAGS.warmup, FLAGS.pipeline_batches)
        feed = batches(1)
        # The synthetic batch is a real one, kept on the devices: same shapes, dtypes, values.
        bench["batch"] = dp.shard_batch(next(feed))
        compile_s = compile_jax_step(bench)
        fed_batches = FedBatches(feed, dp.shard_batch)
        rounds = interleaved_rounds(FLAGS.rounds, FLAGS.steps, FLAGS.warmup, {
            "synthetic": lambda k: run_jax_steps(bench, k),
            "pipeline": lambda k: run_jax_steps(bench, k, fed_batches),
        }, on_timed=fed_batches.keep_timed)

    synthetic = summarize(sum(rounds["synthetic"], []), FLAGS.batch_size)
    fed = summarize(sum(rounds["pipeline"], []), FLAGS.batch_size)
    result: dict[str, Any] = {
        "dataset": info.name, "image_shape": info.image_shape, "model": FLAGS.model,
        "batch_size": FLAGS.batch_size, "num_devices": n, "parallel": FLAGS.parallel,
        "dtype": FLAGS.dtype, "mock_examples": FLAGS.mock_examples,
        "randaugment": [FLAGS.randaugment_layers, FLAGS.randaugment_magnitude],
        "xla_defaults_added": changed, **environment(), "compile_s": compile_s,
        "pipeline_only": raw, "synthetic": synthetic, "with_pipeline": fed,
        "median_wait_for_batch_ms": 1e3 * statistics.median(w for w, _ in fed_batches.timed),
        "median_copy_to_device_ms": 1e3 * statistics.median(c for _, c in fed_batches.timed),
        "slowdown": synthetic["images_per_s"] / fed["images_per_s"],
        "loadavg_start": load_start, "loadavg_end": loadavg(),
    }
    print("\n".join([
        f"dataset={info.name} image={info.image_shape} model={FLAGS.model} "
        f"batch={FLAGS.batch_size} devices={n} ({FLAGS.parallel}) dtype={FLAGS.dtype}",
        f"jax {result['jax_version']}, XLA_FLAGS={result['xla_flags']!r}",
        f"pipeline alone:        {raw['images_per_s']:9.1f} img/s ({raw['batch_ms']:.1f} ms/batch)",
        f"step, synthetic batch: {synthetic['images_per_s']:9.1f} img/s "
        f"(median {synthetic['median_step_s'] * 1e3:.0f} ms, CPU "
        f"{synthetic['median_cpu_s_per_step']:.2f} s/step)",
        f"step, pipeline batch:  {fed['images_per_s']:9.1f} img/s "
        f"(median {fed['median_step_s'] * 1e3:.0f} ms, CPU {fed['median_cpu_s_per_step']:.2f} "
        f"s/step; waiting for the next batch "
        f"{result['median_wait_for_batch_ms']:.1f} ms, copying it to the devices "
        f"{result['median_copy_to_device_ms']:.1f} ms)",
        f"synthetic / pipeline:  {result['slowdown']:.2f}x   compile {compile_s:.1f} s",
        f"load average (1 min): {load_start} -> {result['loadavg_end']}",
    ]))
    if FLAGS.json_out:
        write_json_out(FLAGS.json_out, result)


if __name__ == "__main__":
    define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
