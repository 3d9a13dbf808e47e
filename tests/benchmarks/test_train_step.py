"""benchmarks.train_step: the step it times takes the engine's options, checked before building."""

import pytest

from benchmarks.train_step import build_jax_step, loadavg


def test_accumulation_must_divide_the_per_device_batch():
    with pytest.raises(ValueError, match=r"train_step: grad_accum_steps=3 is invalid; expected a "
                                         r"divisor of the per-device batch 8 \(batch_size 8 / 1 "
                                         r"devices\)"):
        build_jax_step("lenet5", 10, 8, (32, 32, 1), 1, "pmap", "float32", {"accum_steps": 3})


def test_one_image_per_batch_norm_channel_names_the_flags():
    """ResNet-18's stage 4 is 1x1 at 32x32: one image per device left its BatchNorm one value
    per channel, refused by the layer as a traceback from the step's compilation. The flags
    are named as the scripts sharing this step have them (only train_step accumulates)."""
    with pytest.raises(ValueError, match=r"^--batch_size=1 is invalid; on 1 device each batch "
                                         r"holds one image, and BatchNorm stage4_block1/bn1 .*; "
                                         r"use a larger --batch_size or a larger --image_size\.$"):
        build_jax_step("resnet18", 10, 1, (32, 32, 3), 1, "pmap", "float32", {})
    with pytest.raises(ValueError, match=r"^--batch_size=2 is invalid; on 1 device and "
                                         r"--grad_accum_steps=2 each micro-batch holds one image, "
                                         r"and BatchNorm stage4_block1/bn1 .*; use a larger "
                                         r"--batch_size, fewer --grad_accum_steps or a larger "
                                         r"--image_size\.$"):
        build_jax_step("resnet18", 10, 2, (32, 32, 3), 1, "pmap", "float32", {"accum_steps": 2})


def test_the_options_reach_the_state():
    from cnnjax.train.ema import ExponentialMovingAverage

    bench = build_jax_step("lenet5", 10, 8, (32, 32, 1), 1, "pmap", "float32",
                           {"accum_steps": 2, "ema": ExponentialMovingAverage(0.9)})
    assert set(bench["state"].ema) == {"params", "batch_stats"}


def test_the_script_reports_throughput_and_the_falling_training_loss(tmp_path):
    """A whole run as a user types it: the JSON holds the images/s, the loss on the repeated
    batch (lower at the last step than at the first) and no device memory on CPU."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--model=lenet5", "--batch_size=16",
         "--image_size=32", "--num_classes=10", "--steps=6", "--warmup=2", "--rounds=1",
         f"--json_out={out}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    first, last = report["jax_auto_loss_first_last"]
    assert last < first and report["jax"]["images_per_s"] > 0
    assert report["peak_device_bytes"] is None
    assert "training loss on the repeated batch" in result.stdout
    assert report["jax"]["page_faults_per_step"] >= 0 and "page faults per step" in result.stdout
    # each round printed as it was timed, before the report (a capped run keeps them)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("compile: auto ") and lines[1].startswith("round 1/1 jax_auto: ")
    assert float(lines[1].split()[-2]) == pytest.approx(report["jax_auto_rounds_images_per_s"][0],
                                                        abs=0.05)


def test_on_timed_sees_each_runners_timed_steps_and_not_its_warmup():
    from benchmarks.train_step import interleaved_rounds

    def runner(steps):  # a warm-up of 1 step and 3 timed ones: told apart by their length
        return [(float(steps), 0.0)] * steps

    seen = []
    rounds = interleaved_rounds(2, 3, 1, {"a": runner, "b": runner},
                                on_timed=lambda *call: seen.append(call))
    assert seen == [("a", 0, rounds["a"][0]), ("b", 0, rounds["b"][0]),
                    ("a", 1, rounds["a"][1]), ("b", 1, rounds["b"][1])]
    assert all(times == [(3.0, 0.0)] * 3 for _, _, times in seen)


def test_rounds_record_the_page_faults_of_freshly_mapped_memory():
    """A step that fills 64 MiB of freshly mapped memory (as glibc serves XLA's large blocks)
    takes at least its 16,384 pages in faults; a step that maps nothing takes next to none."""
    pytest.importorskip("resource")
    import mmap

    from benchmarks.train_step import interleaved_rounds, usage_summary

    size = 64 * 2**20
    pages = size // mmap.PAGESIZE

    def fresh_array(steps):
        for _ in range(steps):
            with mmap.mmap(-1, size) as block:  # anonymous, small pages even under THP=always
                if hasattr(mmap, "MADV_NOHUGEPAGE"):
                    block.madvise(mmap.MADV_NOHUGEPAGE)
                block.write(b"\x01" * size)
        return [(0.0, 0.0)] * steps

    usage: dict = {}
    interleaved_rounds(2, 3, 1, {"fresh": fresh_array, "idle": lambda k: [(0.0, 0.0)] * k},
                       usage)
    assert [len(usage[name]) for name in ("fresh", "idle")] == [2, 2]
    fresh, idle = usage_summary(usage["fresh"]), usage_summary(usage["idle"])
    assert fresh["page_faults_per_step"] >= 0.95 * pages, fresh
    assert idle["page_faults_per_step"] < 0.05 * pages, idle
    assert fresh["system_cpu_s_per_step"] >= 0 and idle["system_cpu_s_per_step"] >= 0


#: What JAX logs (JAX_LOG_COMPILES=1, set by `_run`) for each program it compiles: the reports
#: are printed whole at the end, so an empty stdout could not show that nothing compiled.
_COMPILED = "Finished XLA compilation"


def _run(*args, env=None):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_LOG_COMPILES": "1", **(env or {})})


@pytest.mark.parametrize("flag", ["--steps=0", "--rounds=0", "--batch_size=0", "--warmup=-1"])
def test_counts_that_would_time_nothing_are_refused_before_compiling(flag):
    result = _run("--model=lenet5", flag)
    assert result.returncode == 1
    name, value = flag.split("=")
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {name}={value!r} is invalid; {value} is not a ")


@pytest.mark.slow  # a benchmark command importing torch, ~8 s: with `make test-all`
def test_torch_on_cuda_without_a_gpu_is_refused_before_compiling():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = _run("--model=resnet18", "--torch", "--torch_device=cuda")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--torch_device=cuda: PyTorch sees no CUDA device here" in result.stderr
    assert _COMPILED not in result.stderr  # nothing was built


@pytest.mark.parametrize("flag", ["--torch_device=cpu", "--torch_channels_last"])
def test_a_pytorch_flag_without_torch_is_refused_before_compiling(flag):
    """They were read only by the PyTorch step, and ignored silently without --torch."""
    result = _run("--model=lenet5", flag)
    name = flag.split("=")[0]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {name} is invalid without --torch (only the PyTorch step reads it); pass "
        f"--torch or drop {name}")
    assert _COMPILED not in result.stderr


def test_extra_host_devices_hold_without_cnnjax_cpu_defaults(tmp_path):
    """--num_devices=2 asked for host devices through cnnjax's XLA_FLAGS defaults, which
    CNNJAX_CPU_DEFAULTS=0 turns off: the run then found one device."""
    result = _run("--model=lenet5", "--batch_size=8", "--num_devices=2", "--steps=1",
                  "--warmup=0", "--rounds=1", env={"CNNJAX_CPU_DEFAULTS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "devices=2" in result.stdout


def test_models_it_cannot_time_are_refused_by_flag():
    """An unknown name, a detector (the step is the classification step) and inputs below the
    model's smallest: one ValueError naming the flag, before any JAX backend starts."""
    from benchmarks.train_step import check_model

    with pytest.raises(ValueError, match=r"^--model='resnet19' is invalid; expected a "
                                         r"classification model, one of \[.*'resnet18'"):
        check_model("resnet19", 32)
    with pytest.raises(ValueError, match=r"^--model='fast_rcnn_small' is invalid"):
        check_model("fast_rcnn_small", 32)
    with pytest.raises(ValueError, match=r"^--image_size=16 is invalid; lenet5 takes inputs of "
                                         r"at least 32x32"):
        check_model("lenet5", 16)
    check_model("lenet5", 32)


def test_batches_the_devices_do_not_split_are_refused_by_flag():
    from benchmarks.train_step import check_devices

    with pytest.raises(ValueError, match=r"^--batch_size=7 is invalid; expected a multiple of "
                                         r"--num_devices=2"):
        check_devices(7, 2)
    with pytest.raises(ValueError, match=r"^--grad_accum_steps=3 is invalid; expected a divisor "
                                         r"of the per-device batch 4"):
        check_devices(8, 2, 3)
    check_devices(8, 2, 2)
    check_devices(7, 0)  # all devices: checked once JAX has counted them (build_jax_step)


def test_json_out_that_cannot_be_written_is_refused_and_a_missing_folder_is_made(tmp_path):
    """It was written after the whole run, so a file in the way of its folder or a directory
    at its path raised a traceback after minutes of timing; a missing folder raised too."""
    import json

    from benchmarks.train_step import check_json_out, write_json_out

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^--json_out's folder=.* a file is in the way"):
        check_json_out(str(blocker / "bench.json"))
    with pytest.raises(ValueError, match=r"^--json_out=.* is invalid; it is a directory"):
        check_json_out(str(tmp_path))
    target = tmp_path / "new" / "deeper" / "bench.json"
    check_json_out(str(target))
    write_json_out(str(target), {"images_per_s": 1.0})
    assert json.loads(target.read_text()) == {"images_per_s": 1.0}


def test_torch_without_pytorch_installed_is_refused_by_flag(monkeypatch):
    """`import torch` ran after the JAX steps compiled: a ModuleNotFoundError traceback."""
    import sys

    from benchmarks.train_step import check_torch

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ValueError, match=r"^--torch is invalid here; PyTorch is not installed"):
        check_torch("resnet18", "cpu")
    with pytest.raises(ValueError, match=r"^--model='lenet5' is invalid with --torch; expected "
                                         r"one of \['resnet101'"):
        check_torch("lenet5", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model=resnet19"], "error: --model='resnet19' is invalid; expected a classification"),
    (["--model=lenet5", "--batch_size=7", "--num_devices=2"],
     "error: --batch_size=7 is invalid; expected a multiple of --num_devices=2"),
    (["--model=lenet5", "--json_out=README.md/bench.json"],
     "error: --json_out's folder="),
])
def test_bad_flags_end_the_script_in_one_line_before_compiling(args, message):
    result = _run(*args, "--steps=1", "--warmup=0", "--rounds=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert _COMPILED not in result.stderr


def test_the_load_average_prints_as_the_kernel_gives_it(monkeypatch):
    """/proc/loadavg has two decimals; the report shows 6.74, not the float 6.7421875."""
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (6.7421875, 1.0, 1.0))
    assert repr(loadavg()) == "6.74"
