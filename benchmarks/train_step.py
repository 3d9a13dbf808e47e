r"""Train-step throughput: cnnjax's compiled step vs. the same network and step in PyTorch eager.

Times the engine's real per-device train step (`cnnjax.train.step`, wrapped by `DataParallel`
with pmap or shard_map) on a synthetic in-memory batch: compile time, then the median step time
over `--steps` steps after `--warmup`. With `--torch` it also builds the same architecture in
torch.nn (same layer shapes, checked by parameter count) and times SGD+momentum steps in eager
mode, interleaving JAX and PyTorch rounds in this one process so both see the same machine load.
Each round's images/s is printed as soon as it is timed (a run cut off by a time cap keeps them),
the whole report at the end.

  python -m benchmarks.train_step --model=resnet18 --batch_size=128 --image_size=32 --torch

`--conv_impl=xla --conv_impl=auto` (repeatable) times the step once per convolution lowering
(`cnnjax.layers.conv_impl`), interleaved, and `--batch_norm_impl=flax --batch_norm_impl=auto`
once per BatchNorm lowering (`cnnjax.layers.batch_norm_impl`; every pair of the two lists);
`--stem=cifar` swaps a ResNet's stem for the 3x3/1, no-max-pool CIFAR layout (in PyTorch too).

PyTorch is optional: `pip install .[bench]` (a CPU-only wheel is enough). Figures measured with
this script are in docs/performance.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

try:
    import resource  # Unix only: page faults and system CPU per step
except ImportError:  # pragma: no cover - Windows
    resource = None

from cnnjax.platform import configure_cpu_defaults, parse_xla_flags

FLAGS = flags.FLAGS

StepTime = tuple[float, float]  # (wall seconds, process CPU seconds) of one step

LEARNING_RATE = 0.1
MOMENTUM = 0.9


# ------------------------------------------------------------------------------------ flag checks
def check_model(model_name: str, image_size: int | None, stem: str | None = None) -> None:
    """Refuses (a one-line ValueError naming `--model` / `--image_size` / `--stem`) a model the
    benchmark cannot time: not registered, not a classifier (the step is the classification
    step), given inputs smaller than its design admits, or a `--stem` it has no field for.
    Cheap: no JAX backend, nothing compiled."""
    from cnnjax.models import list_models, model_info
    from cnnjax.models.registry import settable_fields

    classifiers = list_models()
    if model_name not in classifiers:
        raise ValueError(f"--model={model_name!r} is invalid; expected a classification model, "
                         f"one of {classifiers}")
    smallest = model_info(model_name).min_input_size
    if image_size is not None and image_size < smallest:
        raise ValueError(f"--image_size={image_size} is invalid; {model_name} takes inputs of at "
                         f"least {smallest}x{smallest}")
    if stem is not None and "stem" not in settable_fields(model_name):
        raise ValueError(f"--stem={stem!r} is invalid with --model={model_name}, which has no "
                         "stem to swap; expected it unset, or a model that takes one (e.g. "
                         "resnet18)")


def check_devices(batch_size: int, num_devices: int, accum_steps: int = 1) -> None:
    """Refuses a global batch that `num_devices` (0: all, not known yet) does not split evenly,
    or a per-device batch that `accum_steps` micro-batches do not split (one-line ValueErrors
    naming the flags)."""
    if num_devices > 0 and batch_size % num_devices:
        raise ValueError(f"--batch_size={batch_size} is invalid; expected a multiple of "
                         f"--num_devices={num_devices}")
    if num_devices > 0 and (batch_size // num_devices) % accum_steps:
        raise ValueError(f"--grad_accum_steps={accum_steps} is invalid; expected a divisor of "
                         f"the per-device batch {batch_size // num_devices} (--batch_size="
                         f"{batch_size} / --num_devices={num_devices})")


def check_json_out(path: str | None) -> None:
    """Refuses a `--json_out` that could not be written after the run: a directory, or a file in
    the way of its folder (a missing folder is created when the JSON is written)."""
    if path is not None:
        from cnnjax.utils.files import check_output_file

        check_output_file(path, "--json_out", "--json_out's folder")


def write_json_out(path: str, result: dict[str, Any]) -> None:
    """Writes `result` to `path` atomically (its folder created if missing): a check killed by
    its time cap mid-write leaves the whole file or none."""
    from cnnjax.utils.files import make_parent_dir, write_json

    write_json(make_parent_dir(path), result)


def check_torch(model_name: str, device: str) -> None:
    """Refuses `--torch` for a network with no torch.nn twin here, without PyTorch installed, or
    on a CUDA device PyTorch does not see."""
    if model_name not in TORCH_RESNETS:
        raise ValueError(f"--model={model_name!r} is invalid with --torch; expected one of "
                         f"{sorted(TORCH_RESNETS)}")
    try:
        import torch
    except ImportError as err:
        raise ValueError(f"--torch is invalid here; PyTorch is not installed ({err}): "
                         "pip install .[bench] (the CPU-only wheel is enough)") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--torch_device=cuda: PyTorch sees no CUDA device here; use "
                         "--torch_device=cpu.")


# ------------------------------------------------------------------------------------------ JAX
def prepare_platform(xla_defaults: bool, num_devices: int) -> dict[str, str]:
    """Sets XLA flags before JAX starts; returns the cnnjax CPU defaults it added.

    Adds cnnjax's CPU defaults if `xla_defaults`, and for `num_devices > 1` asks for that many host
    devices (CPU only; ignored by accelerators). Flags already in XLA_FLAGS always win.
    """
    changed = configure_cpu_defaults() if xla_defaults else {}
    if num_devices > 1 and "xla_force_host_platform_device_count" not in parse_xla_flags(
            os.environ.get("XLA_FLAGS", "")):
        # JAX's own option, not XLA_FLAGS: it holds under CNNJAX_CPU_DEFAULTS=0 and beside a
        # flags file, which configure_cpu_defaults leaves alone.
        import jax

        jax.config.update("jax_num_cpu_devices", num_devices)
    return changed


def build_jax_step(model_name: str, num_classes: int, batch_size: int,
                   image_shape: tuple[int, int, int], num_devices: int, parallel: str,
                   dtype: str, train_options: dict[str, Any] | None = None,
                   **model_overrides: Any) -> dict[str, Any]:
    """The engine's train step (not yet compiled), its initial state and a synthetic batch.

    `train_options` are `make_steps` keywords (`accum_steps`, `ema`, `mixing`), to time what
    gradient accumulation, weight averaging or mixup/CutMix add to a step, and
    `batch_norm_impl` (default "auto", the engine's, resolved for this backend).

    Returns a dict with `step` (the `DataParallel`-wrapped step), `state`, `batch` (random
    images and labels already on the devices), `parallel` (the `DataParallel`), `num_devices`,
    `num_params` and `platform`.
    """
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from cnnjax.models import create_model
    from cnnjax.train.checks import one_value_batch_norm
    from cnnjax.train.config import default_config
    from cnnjax.train.optim import build_optimizer, build_schedule
    from cnnjax.train.parallel import AXIS_NAME, DataParallel
    from cnnjax.train.state import create_train_state
    from cnnjax.train.step import make_steps

    devices = jax.devices()
    n = len(devices) if num_devices == 0 else num_devices
    if n > len(devices):
        raise ValueError(f"train_step: num_devices={n} is invalid; only {len(devices)} devices "
                         "exist.")
    if batch_size % n:
        raise ValueError(f"train_step: batch_size={batch_size} is invalid; expected a multiple of "
                         f"num_devices={n}.")
    config = default_config()
    config.num_train_steps = 1000
    config.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "nesterov": False})
    config.schedule = ml_collections.ConfigDict({"name": "constant"})
    schedule = build_schedule(config)
    tx = build_optimizer(config, schedule)
    model = create_model(model_name, num_classes=num_classes, dtype=jnp.dtype(dtype),
                         axis_name=AXIS_NAME, **model_overrides)
    dp = DataParallel(parallel, devices[:n])
    train_options = {"batch_norm_impl": "auto", **(train_options or {})}
    per_device = batch_size // n
    if per_device % train_options.get("accum_steps", 1):
        raise ValueError(f"train_step: grad_accum_steps={train_options['accum_steps']} is "
                         f"invalid; expected a divisor of the per-device batch {per_device} "
                         f"(batch_size {batch_size} / {n} devices).")
    accum = train_options.get("accum_steps", 1)
    layer = one_value_batch_norm(model, per_device // accum, n, image_shape)
    if layer is not None:  # else the BatchNorm's own refusal, as a traceback from `.lower()`
        # (Only on one device: on more, BatchNorm's statistics span every device's images.)
        accumulated = f" and --grad_accum_steps={accum}" if accum > 1 else ""
        raise ValueError(f"--batch_size={batch_size} is invalid; on 1 device{accumulated} "
                         f"each {'micro-' if accum > 1 else ''}batch holds one image, and "
                         f"{layer} then normalizes each channel over a single value; use a "
                         f"larger --batch_size{', fewer --grad_accum_steps' if accum > 1 else ''}"
                         " or a larger --image_size.")
    train_fn, _ = make_steps(model, tx, schedule, AXIS_NAME, **train_options)
    step = dp.wrap_train(train_fn)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (per_device, *image_shape),
                               ema=train_options.get("ema") is not None)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    state = dp.replicate(state)
    rng = np.random.default_rng(0)
    batch = dp.shard_batch({
        "image": rng.standard_normal((n, per_device, *image_shape), np.float32),
        "label": rng.integers(0, num_classes, (n, per_device)).astype(np.int32),
    })
    return {"step": step, "state": state, "batch": batch, "parallel": dp, "num_devices": n,
            "num_params": num_params, "platform": devices[0].platform}


def compile_jax_step(bench: dict[str, Any], conv_impl: str = "auto") -> float:
    """Compiles the step ahead of time; returns seconds and stores the executable in `bench`.

    `conv_impl` ("xla", "matmul", "auto"; see `cnnjax.layers.conv_impl`) picks how the model's
    `nn.Conv` layers are lowered; the choice is baked into the executable.
    """
    from cnnjax.layers.conv_impl import conv_impl as conv_impl_context

    start = time.perf_counter()
    with conv_impl_context(conv_impl):
        bench["compiled"] = bench["step"].lower(bench["state"], bench["batch"]).compile()
    return time.perf_counter() - start


def run_jax_steps(bench: dict[str, Any], steps: int,
                  next_batch: Callable[[], Any] | None = None) -> list[StepTime]:
    """Runs `steps` compiled steps; returns each one's (wall, process CPU) seconds, results ready.

    Every step reuses the in-memory `bench["batch"]`, unless `next_batch()` supplies a fresh
    device batch per step (its time counts as part of the step).
    """
    import jax
    import numpy as np

    times = []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = bench["batch"] if next_batch is None else next_batch()
        bench["state"], metrics = bench["compiled"](bench["state"], batch)
        jax.block_until_ready((bench["state"], metrics))
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        # After the clock: the training loss on the (repeated) batch, a smoke check that it falls.
        bench.setdefault("losses", []).append(float(np.mean(jax.device_get(metrics["loss"]))))
    return times


def peak_device_memory() -> int | None:
    """Peak bytes in use on the first local device so far (None where the backend keeps no
    statistics, e.g. CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# -------------------------------------------------------------------------------------- PyTorch
TORCH_RESNETS = {  # registry name -> (block kind, blocks per stage), as in cnnjax/models/resnet.py
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def build_torch_resnet(model_name: str, num_classes: int, stem: str = "imagenet"):
    """The cnnjax ResNet (v1.5, projection shortcuts; `stem` as `ResNet.stem`) in torch.nn."""
    import torch
    from torch import nn

    if model_name not in TORCH_RESNETS:
        raise ValueError(f"train_step: model={model_name!r} is invalid with --torch; expected one "
                         f"of {sorted(TORCH_RESNETS)}.")
    kind, stages = TORCH_RESNETS[model_name]

    def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            if kind == "basic":
                cout = width
                layers = [*conv_bn(cin, width, 3, stride), nn.ReLU(), *conv_bn(width, width, 3, 1)]
            else:  # bottleneck, stride on the 3x3 (v1.5)
                cout = width * 4
                layers = [*conv_bn(cin, width, 1, 1), nn.ReLU(), *conv_bn(width, width, 3, stride),
                          nn.ReLU(), *conv_bn(width, cout, 1, 1)]
            self.body = nn.Sequential(*layers)
            self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                             if stride != 1 or cin != cout else nn.Identity())
            self.out_channels = cout

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    blocks: list[nn.Module] = []
    channels = 64
    for i, count in enumerate(stages):
        for j in range(count):
            block = Block(channels, 64 * 2**i, 2 if i > 0 and j == 0 else 1)
            blocks.append(block)
            channels = block.out_channels
    stem_layers = ([*conv_bn(3, 64, 3, 1), nn.ReLU()] if stem == "cifar" else
                   [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)])
    return nn.Sequential(
        *stem_layers, *blocks,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes),
    )


def build_torch_step(model_name: str, num_classes: int, batch_size: int, image_size: int,
                     dtype: str, channels_last: bool, stem: str = "imagenet",
                     device: str = "cpu") -> dict[str, Any]:
    """A PyTorch eager SGD+momentum step on the same network and a synthetic batch, on `device`
    ("cpu" or "cuda"; a CUDA step waits for the GPU before it counts as done).

    The returned `model`, `images` and `labels` are the ones `step` trains on, so a test can load
    the cnnjax network's weights and batch into them (tests/benchmarks/test_torch_twin.py)."""
    import torch

    torch.manual_seed(0)
    where = torch.device(device)
    if where.type == "cuda":
        # Let cuDNN time its convolution algorithms on the first steps (the warmup), as XLA:GPU
        # autotunes its own; PyTorch's default picks by heuristic and would be the handicapped side.
        torch.backends.cudnn.benchmark = True
    model = build_torch_resnet(model_name, num_classes, stem).train().to(where)
    images = torch.randn(batch_size, 3, image_size, image_size).to(where)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,)).to(where)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    autocast = dtype == "bfloat16"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(where.type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if where.type == "cuda":
            torch.cuda.synchronize()

    num_params = sum(p.numel() for p in model.parameters())
    return {"step": step, "model": model, "images": images, "labels": labels,
            "num_params": num_params, "threads": torch.get_num_threads(),
            "version": torch.__version__, "device": device,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def run_torch_steps(bench: dict[str, Any], steps: int) -> list[StepTime]:
    """Runs `steps` eager steps; returns each one's (wall, process CPU) seconds."""
    times = []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        bench["step"]()
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


# ------------------------------------------------------------------------------------ reporting
def loadavg() -> float | None:
    """The 1-minute load average to the kernel's two decimals (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)  # 6.74, not its binary value 6.7421875
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Machine and library versions for the report."""
    import jax

    return {"python": platform.python_version(), "jax_version": jax.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def summarize(times: list[StepTime], batch_size: int) -> dict[str, float]:
    """Median wall step time, images/s and median process CPU seconds per step over `times`.

    CPU seconds (all threads of this process) are less sensitive to other processes' load than
    wall time, so they help compare XLA options on a busy machine; they are not comparable
    across frameworks (idle worker threads may spin).
    """
    walls = [wall for wall, _ in times]
    median = statistics.median(walls)
    return {"median_step_s": median, "images_per_s": batch_size / median,
            "min_step_s": min(walls), "max_step_s": max(walls),
            "median_cpu_s_per_step": statistics.median(cpu for _, cpu in times)}


def round_images_per_s(rounds: list[list[StepTime]], batch_size: int) -> list[float]:
    """Images/s of each round (from its median wall step time)."""
    return [batch_size / statistics.median(wall for wall, _ in r) for r in rounds]


def interleaved_rounds(rounds: int, steps: int, warmup: int, runners: dict[str, Callable],
                       usage: dict[str, list[dict[str, float]]] | None = None,
                       on_timed: Callable[[str, int, list[StepTime]], None] | None = None):
    """Runs each runner's `steps` in turn, `rounds` times; returns {name: [times per round]}.

    With a `usage` dict it also records, per runner and round, the process's page faults and
    system CPU seconds per timed step (`getrusage`, all threads). Freshly mapped memory shows
    here: XLA's and PyTorch's large blocks are unmapped and faulted in again every step.
    `on_timed(name, round_index, times)` is called after each runner's timed steps (never after
    its warm-up), e.g. to print figures as they are measured.
    """
    results: dict[str, list[list[float]]] = {name: [] for name in runners}
    measure = usage is not None and resource is not None
    for index in range(rounds):
        for name, run in runners.items():
            if warmup:
                run(warmup)
            before = resource.getrusage(resource.RUSAGE_SELF) if measure else None
            results[name].append(run(steps))
            if measure:
                after = resource.getrusage(resource.RUSAGE_SELF)
                usage.setdefault(name, []).append({
                    "page_faults_per_step": (after.ru_minflt + after.ru_majflt - before.ru_minflt
                                             - before.ru_majflt) / steps,
                    "system_cpu_s_per_step": (after.ru_stime - before.ru_stime) / steps})
            if on_timed is not None:
                on_timed(name, index, results[name][-1])
    return results


def print_round(name: str, index: int, times: list[StepTime]) -> None:
    """Prints one runner's round as soon as it is timed, so a run cut off later (a time cap, as
    device_check.sh's) still shows what it measured; the report at the end repeats it."""
    print(f"round {index + 1}/{FLAGS.rounds} {name}: "
          f"{round_images_per_s([times], FLAGS.batch_size)[0]:.1f} img/s", flush=True)


def usage_summary(per_round: list[dict[str, float]]) -> dict[str, float]:
    """The median over rounds of each `interleaved_rounds` usage figure ({} if none)."""
    keys = per_round[0] if per_round else {}
    return {key: statistics.median(r[key] for r in per_round) for key in keys}


def usage_phrase(summary: dict[str, float]) -> str:
    """`; system CPU x s and n page faults per step`, or nothing where they were not measured."""
    if "page_faults_per_step" not in summary:
        return ""
    return (f"; system CPU {summary['system_cpu_s_per_step']:.2f} s and "
            f"{summary['page_faults_per_step']:,.0f} page faults per step")


def define_flags() -> None:
    """Defines this script's command-line flags (only when run as a script)."""
    flags.DEFINE_string("model", "resnet18", "Registry name (see cnnjax.models.list_models()).")
    flags.DEFINE_integer("num_classes", 10, "Number of classes of the classifier head.",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 128, "Global batch size (split over the devices).",
                         lower_bound=1)
    flags.DEFINE_integer("image_size", 32, "Square input side; inputs have 3 channels.",
                         lower_bound=1)
    flags.DEFINE_integer("num_devices", 1, "Data-parallel devices; on CPU extra host devices are "
                         "created (JAX's jax_num_cpu_devices). 0: all devices.", lower_bound=0)
    flags.DEFINE_integer("steps", 10, "Timed steps per round.", lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps before each round's timed ones, for every "
                         "step being timed.", lower_bound=0)
    flags.DEFINE_integer("rounds", 3, "Rounds of (JAX steps, PyTorch steps), interleaved.",
                         lower_bound=1)
    flags.DEFINE_enum("parallel", "pmap", ["pmap", "shard_map"], "How the step is distributed.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype "
                      "(parameters stay float32; PyTorch autocasts on its device for bfloat16).")
    flags.DEFINE_bool("torch", False, "Also time the same network and step in PyTorch eager.")
    flags.DEFINE_bool("torch_channels_last", False, "Run PyTorch in channels_last memory format.")
    flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"], "Where the PyTorch step runs (cuda: "
                      "a GPU comparison; JAX uses its default backend).")
    flags.DEFINE_bool("xla_defaults", True, "Apply cnnjax.platform.configure_cpu_defaults() "
                      "(flags you set in XLA_FLAGS always win).")
    flags.DEFINE_multi_enum("conv_impl", ["auto"], ["xla", "matmul", "auto"],
                            "How nn.Conv layers are lowered (cnnjax.layers.conv_impl; auto is "
                            "the engine's default); repeat the flag to time several in "
                            "interleaved rounds.")
    flags.DEFINE_multi_enum("batch_norm_impl", ["auto"], ["flax", "matmul", "auto"],
                            "How training-mode BatchNorms are lowered "
                            "(cnnjax.layers.batch_norm_impl; auto is the engine's default: "
                            "matmul channel sums on CPU, flax's elsewhere); "
                            "repeatable, as --conv_impl.")
    flags.DEFINE_enum("stem", None, ["imagenet", "cifar"], "ResNet stem override (cifar: 3x3/1 "
                      "conv, no max pool); default: the model's own.")
    flags.DEFINE_string("json_out", None, "Also write the results as JSON to this path.")
    flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per step (config.grad_accum_steps)",
                         lower_bound=1)
    flags.DEFINE_float("ema_decay", None, "Keep a weight average with this decay (config.ema).")
    flags.DEFINE_float("mixup_alpha", 0.0, "mixup's Beta alpha (config.mixing; 0: off).")
    flags.DEFINE_float("cutmix_alpha", 0.0, "CutMix's Beta alpha (config.mixing; 0: off).")


def train_options() -> dict[str, Any]:
    """The `make_steps` keywords the option flags ask for (empty: the plain step)."""
    from cnnjax.train.ema import ExponentialMovingAverage
    from cnnjax.train.mixing import Mixing

    options: dict[str, Any] = {}
    if FLAGS.grad_accum_steps != 1:
        options["accum_steps"] = FLAGS.grad_accum_steps
    if FLAGS.ema_decay is not None:
        options["ema"] = ExponentialMovingAverage(FLAGS.ema_decay)
    mixing = Mixing(mixup_alpha=FLAGS.mixup_alpha, cutmix_alpha=FLAGS.cutmix_alpha)
    if mixing.enabled:
        options["mixing"] = mixing
    return options


def check_flags() -> None:
    """Every check of the flags that needs no JAX backend (one-line ValueErrors naming the flag,
    before anything is built or compiled)."""
    check_model(FLAGS.model, FLAGS.image_size, FLAGS.stem)
    check_devices(FLAGS.batch_size, FLAGS.num_devices, FLAGS.grad_accum_steps)
    check_json_out(FLAGS.json_out)
    from cnnjax.train.mixing import MIN_ALPHA  # no backend: XLA's flags are not read yet

    # The ranges ExponentialMovingAverage and Mixing take, checked here to name the flags.
    if FLAGS.ema_decay is not None and not 0 <= FLAGS.ema_decay < 1:  # NaN too
        raise ValueError(f"--ema_decay={FLAGS.ema_decay} is invalid; expected 0 <= --ema_decay "
                         "< 1, e.g. 0.999")
    for name in ("mixup_alpha", "cutmix_alpha"):
        value = FLAGS[name].value
        if not (value == 0 or MIN_ALPHA <= value < float("inf")):
            raise ValueError(f"--{name}={value} is invalid; expected 0 (off) or a finite number "
                             f">= {MIN_ALPHA:g} (mixing.MIN_ALPHA)")
    if FLAGS.torch:
        check_torch(FLAGS.model, FLAGS.torch_device)
    else:  # read only by the PyTorch step: ignored silently without it
        for name in ("torch_device", "torch_channels_last"):
            if FLAGS[name].present:
                raise ValueError(f"--{name} is invalid without --torch (only the PyTorch step "
                                 f"reads it); pass --torch or drop --{name}")


def main(argv: list[str]) -> None:
    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(argv)  # positional arguments: one error line
    norm_impls = list(dict.fromkeys(FLAGS.batch_norm_impl))
    lowerings = lowerings_to_time(norm_impls)
    impls = list(lowerings)
    with one_line_errors():  # bad flags: one line, before anything is compiled
        check_flags()
        changed = prepare_platform(FLAGS.xla_defaults, FLAGS.num_devices)
        options = checked_train_options()
        benches = build_jax_steps(lowerings, options)
        bench = benches[impls[-1]]  # the last one built: its device count, platform and size
        if FLAGS.torch and bench["platform"] != "cpu" and bench["num_devices"] > 1:
            # PyTorch's step runs on one device: a ratio against several would mean nothing.
            raise ValueError(
                f"--num_devices: --torch compares with one PyTorch device, and JAX would run on "
                f"{bench['num_devices']} {bench['platform']} devices; use --num_devices=1 with "
                "--torch (host devices on a CPU share its cores, so there any count compares)")
    load_start = loadavg()
    compile_s, runners = compile_jax_runners(benches, lowerings)
    print("compile: " + ", ".join(f"{impl} {s:.1f} s" for impl, s in compile_s.items()),
          flush=True)
    torch_bench = None
    if FLAGS.torch:
        torch_bench, runners["torch"] = torch_runner(bench)
    usage: dict[str, list[dict[str, float]]] = {}
    rounds = interleaved_rounds(FLAGS.rounds, FLAGS.steps, FLAGS.warmup, runners, usage,
                                print_round)
    result = run_settings(bench, changed, compile_s, impls, norm_impls, options)
    lines = report_lines(result, rounds, usage, benches, impls, torch_bench)
    result["loadavg_start"], result["loadavg_end"] = load_start, loadavg()
    lines.append(f"load average (1 min): {load_start} -> {result['loadavg_end']}")
    print("\n".join(lines))
    if FLAGS.json_out:
        write_json_out(FLAGS.json_out, result)
    sys.stdout.flush()


def lowerings_to_time(norm_impls: list[str]) -> dict[str, tuple[str, str]]:
    """`{label: (conv_impl, batch_norm_impl)}` for every pair of the --conv_impl and the
    `norm_impls` lowerings; a label names the conv lowering alone when one BatchNorm one is
    timed."""
    return {(conv if len(norm_impls) == 1 else f"{conv}/bn={norm}"): (conv, norm)
            for conv in dict.fromkeys(FLAGS.conv_impl) for norm in norm_impls}


def checked_train_options() -> dict[str, Any]:
    """`train_options()`, refused with --torch (which times the plain step only)."""
    options = train_options()
    if FLAGS.torch and options:
        raise ValueError("--torch times the plain step: leave --grad_accum_steps, "
                         "--ema_decay, --mixup_alpha and --cutmix_alpha at their defaults.")
    return options


def build_jax_steps(lowerings: dict[str, tuple[str, str]],
                    options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The engine's step built (not yet compiled) once per lowering, with the train options."""
    overrides = {} if FLAGS.stem is None else {"stem": FLAGS.stem}
    return {impl: build_jax_step(
        FLAGS.model, FLAGS.num_classes, FLAGS.batch_size,
        (FLAGS.image_size, FLAGS.image_size, 3), FLAGS.num_devices, FLAGS.parallel,
        FLAGS.dtype, {**options, "batch_norm_impl": norm}, **overrides)
        for impl, (_, norm) in lowerings.items()}


def compile_jax_runners(benches: dict[str, dict[str, Any]], lowerings: dict[str, tuple[str, str]],
                        ) -> tuple[dict[str, float], dict[str, Callable]]:
    """Compiles each lowering's step under its conv lowering; returns the compile seconds and
    the runners `interleaved_rounds` times (`jax_<label>`)."""
    compile_s: dict[str, float] = {}
    runners: dict[str, Callable] = {}
    for impl, (conv, _) in lowerings.items():
        bench = benches[impl]
        compile_s[impl] = compile_jax_step(bench, conv)
        runners[f"jax_{impl}"] = lambda k, b=bench: run_jax_steps(b, k)
    return compile_s, runners


def torch_runner(jax_bench: dict[str, Any]) -> tuple[dict[str, Any], Callable]:
    """PyTorch's step of the same network and its runner; a RuntimeError when its parameter
    count differs from `jax_bench`'s (not the same architecture)."""
    torch_bench = build_torch_step(FLAGS.model, FLAGS.num_classes, FLAGS.batch_size,
                                   FLAGS.image_size, FLAGS.dtype, FLAGS.torch_channels_last,
                                   FLAGS.stem or "imagenet", FLAGS.torch_device)
    if torch_bench["num_params"] != jax_bench["num_params"]:
        raise RuntimeError(f"PyTorch network has {torch_bench['num_params']} parameters, the "
                           f"cnnjax one {jax_bench['num_params']}: not the same architecture.")
    return torch_bench, lambda k: run_torch_steps(torch_bench, k)


def run_settings(bench: dict[str, Any], changed: dict[str, str], compile_s: dict[str, float],
                 impls: list[str], norm_impls: list[str],
                 options: dict[str, Any]) -> dict[str, Any]:
    """The JSON result's first entries: what was timed, where, and the compile times."""
    return {
        "model": FLAGS.model, "stem": FLAGS.stem, "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size, "num_devices": bench["num_devices"],
        "parallel": FLAGS.parallel, "dtype": FLAGS.dtype, "platform": bench["platform"],
        "num_params": bench["num_params"], "xla_defaults_added": changed, **environment(),
        "compile_s": compile_s, "conv_impls": impls, "batch_norm_impls": norm_impls,
        "train_options": {name: str(value) for name, value in options.items()},
    }


def report_lines(result: dict[str, Any], rounds: dict[str, list[list[StepTime]]],
                 usage: dict[str, list[dict[str, float]]], benches: dict[str, dict[str, Any]],
                 impls: list[str], torch_bench: dict[str, Any] | None) -> list[str]:
    """Adds the timings of every runner and the peak device memory to `result`; returns the
    report's lines, the load average's excepted."""
    lines = header_lines(result)
    lines += jax_lines(result, rounds, usage, benches, impls)
    lines += peak_memory_lines(result)
    if torch_bench is not None:
        lines += torch_lines(result, rounds, usage, torch_bench)
        lines += ratio_lines(result, impls)
    return lines


def header_lines(result: dict[str, Any]) -> list[str]:
    """The report's first lines: what was timed, JAX and its XLA flags, the compile times."""
    return [
        f"model={FLAGS.model} stem={FLAGS.stem or 'default'} params={result['num_params']:,} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size} devices={result['num_devices']} "
        f"({result['platform']}, {FLAGS.parallel}) dtype={FLAGS.dtype}"
        + (f" train options {result['train_options']}" if result["train_options"] else ""),
        f"jax {result['jax_version']}, XLA_FLAGS={result['xla_flags']!r} "
        f"(added by cnnjax: {sorted(result['xla_defaults_added']) or 'none'})",
        "compile: " + ", ".join(f"{impl} {s:.1f} s" for impl, s in result["compile_s"].items()),
    ]


def record_timing(result: dict[str, Any], name: str, rounds: dict[str, list[list[StepTime]]],
                  usage: dict[str, list[dict[str, float]]]) -> str:
    """Adds runner `name`'s timing (with its CPU usage) and images/s per round to `result`;
    returns its `timing_phrase`."""
    result[name] = summarize(sum(rounds[name], []), FLAGS.batch_size)
    result[f"{name}_rounds_images_per_s"] = round_images_per_s(rounds[name], FLAGS.batch_size)
    result[name].update(usage_summary(usage.get(name, [])))
    return timing_phrase(result[name], result[f"{name}_rounds_images_per_s"])


def timing_phrase(summary: dict[str, float], per_round: list[float]) -> str:
    """`<images/s> img/s (median step, CPU per step, images/s per round[, usage]` of one timed
    step, its closing parenthesis left to the caller."""
    return (f"{summary['images_per_s']:8.1f} img/s (median step "
            f"{summary['median_step_s'] * 1e3:.0f} ms, CPU "
            f"{summary['median_cpu_s_per_step']:.2f} s/step; per round "
            f"{', '.join(f'{v:.1f}' for v in per_round)}"
            f"{usage_phrase(summary)}")


def jax_lines(result: dict[str, Any], rounds: dict[str, list[list[StepTime]]],
              usage: dict[str, list[dict[str, float]]], benches: dict[str, dict[str, Any]],
              impls: list[str]) -> list[str]:
    """Adds each lowering's timing and first and last training loss to `result`; returns their
    lines."""
    lines = []
    for impl in impls:
        lines.append(f"jax ({impl:6s}): {record_timing(result, f'jax_{impl}', rounds, usage)})")
    result["jax"] = result[f"jax_{impls[0]}"]  # the first impl, for older readers of the JSON
    for impl in impls:
        losses = benches[impl].get("losses", [])
        result[f"jax_{impl}_loss_first_last"] = [losses[0], losses[-1]] if losses else None
        if losses:
            lines.append(f"jax ({impl:6s}) training loss on the repeated batch: {losses[0]:.4f} "
                         f"-> {losses[-1]:.4f} over {len(losses)} steps")
    return lines


def peak_memory_lines(result: dict[str, Any]) -> list[str]:
    """Adds the peak device memory to `result`; its line where the backend keeps one."""
    result["peak_device_bytes"] = peak_device_memory()
    if result["peak_device_bytes"] is None:
        return []
    return [f"peak device memory: {result['peak_device_bytes'] / 2**30:.2f} GiB"]


def torch_lines(result: dict[str, Any], rounds: dict[str, list[list[StepTime]]],
                usage: dict[str, list[dict[str, float]]],
                torch_bench: dict[str, Any]) -> list[str]:
    """Adds PyTorch's timing and setup to `result`; returns its line."""
    timing = record_timing(result, "torch", rounds, usage)
    result["torch_version"] = torch_bench["version"]
    result["torch_threads"] = torch_bench["threads"]
    result["torch_device"] = torch_bench["device"]
    result["torch_channels_last"] = FLAGS.torch_channels_last
    result["torch_cudnn_benchmark"] = torch_bench["cudnn_benchmark"]
    return [f"torch:        {timing}"
            f"; torch {torch_bench['version']} on {torch_bench['device']}, "
            f"{torch_bench['threads']} threads)"]


def ratio_lines(result: dict[str, Any], impls: list[str]) -> list[str]:
    """Adds each lowering's images/s over PyTorch's (overall and per round) to `result`;
    returns their lines."""
    lines = []
    for impl in impls:
        name = f"jax_{impl}"
        ratio = result[name]["images_per_s"] / result["torch"]["images_per_s"]
        round_ratios = [j / t for j, t in zip(result[f"{name}_rounds_images_per_s"],
                                              result["torch_rounds_images_per_s"], strict=True)]
        result[f"ratio_{impl}"], result[f"round_ratios_{impl}"] = ratio, round_ratios
        lines.append(f"ratio jax ({impl}) / torch: {ratio:.2f}x (per round "
                     f"{', '.join(f'{r:.2f}' for r in round_ratios)})")
    result["ratio"] = result[f"ratio_{impls[0]}"]
    return lines


if __name__ == "__main__":
    define_flags()
    from cnnjax.utils.cli import parse_flags  # flag errors: one `error:` line, as elsewhere

    app.run(main, flags_parser=parse_flags)
