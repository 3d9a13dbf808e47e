"""input_pipeline and profile_step refuse bad flags in one `error:` line before reading data or
compiling (an unknown model was a traceback from create_model; a --json_out or --trace_dir with
a file in the way failed only after the whole run)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    ("input_pipeline", ["--model=resnet19"], "error: --model='resnet19' is invalid; expected a "
                                             "classification model"),
    ("input_pipeline", ["--model=lenet5", "--batch_size=7", "--num_devices=2"],
     "error: --batch_size=7 is invalid; expected a multiple of --num_devices=2"),
    ("input_pipeline", ["--model=lenet5", "--json_out=README.md/bench.json"],
     "error: --json_out's folder="),
    ("profile_step", ["--model=resnet19"], "error: --model='resnet19' is invalid"),
    ("profile_step", ["--model=lenet5", "--trace_dir=README.md/trace"],
     "error: --trace_dir='README.md/trace' is invalid; expected a directory or a path to create"),
])
def test_bad_flags_are_one_line_before_any_work(script, args, message):
    result = _run(script, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert result.stdout == ""


@pytest.mark.slow  # ~20 s of benchmark commands on 2 cores: with `make test-all`
def test_layer_and_model_arguments_are_one_line_before_any_work(tmp_path):
    """Each was a traceback: profile_step's build of a model that takes no --stem ran outside the
    error handler; conv_transpose and roi_pool checked nothing, some only after timing a first
    form; proposals took any --num_images into a tfds slice (-498: all but the last 498) and
    --strategies/--scales only after reading the images."""
    from tests.commands import run_commands

    cases = [
        # these named the library's arguments (create_model's stem=, the layer's features=,
        # ExponentialMovingAverage's decay=, Mixing's, the data config's name=), not the flags
        (["benchmarks.profile_step", "--model=lenet5", "--stem=cifar", "--steps=1"],
         "error: --stem='cifar' is invalid with --model=lenet5, which has no stem to swap; "
         "expected it unset, or a model that takes one (e.g. resnet18)"),
        (["benchmarks.train_step", "--model=lenet5", "--stem=cifar", "--steps=1"],
         "error: --stem='cifar' is invalid with --model=lenet5"),
        (["benchmarks.train_step", "--model=lenet5", "--ema_decay=2"],
         "error: --ema_decay=2.0 is invalid; expected 0 <= --ema_decay < 1, e.g. 0.999"),
        (["benchmarks.train_step", "--model=lenet5", "--mixup_alpha=-1"],
         "error: --mixup_alpha=-1.0 is invalid; expected 0 (off) or a finite number >= 1e-37 "
         "(mixing.MIN_ALPHA)"),
        (["benchmarks.train_step", "--model=lenet5", "--cutmix_alpha=1e-38"],
         "error: --cutmix_alpha=1e-38 is invalid; expected 0 (off) or a finite number >= 1e-37 "
         "(mixing.MIN_ALPHA)"),
        (["benchmarks.train_step", "--model=lenet5", "--cutmix_alpha=nan"],
         "error: --cutmix_alpha=nan is invalid; expected 0 (off) or a finite number >= 1e-37"),
        (["benchmarks.input_pipeline", "--model=lenet5", "--dataset=bogus"],
         "error: --dataset='bogus' is invalid; expected one of ['cifar10', "),
        (["benchmarks.input_pipeline", "--model=lenet5", "--image_size=32",
          "--randaugment_layers=2", "--randaugment_magnitude=11"],
         "error: benchmarks.input_pipeline: --randaugment_magnitude=11.0 is invalid; expected a "
         "number in [0, 10]"),
        (["benchmarks.conv_transpose", "--groups=1,3", "--repeats=1"],
         "error: benchmarks.conv_transpose: --groups='3' is invalid; expected divisors of "
         "--channels=64, or 'depthwise'."),
        (["benchmarks.conv_transpose", "--size=1", "--kernel=1", "--padding=5"],
         "error: benchmarks.conv_transpose: --padding=5 is invalid; the output would be -9x-9 "
         "for --size=1, --kernel=1 and --stride=2; expected at most 0."),
        (["benchmarks.conv_transpose", "--groups=0"],
         "error: benchmarks.conv_transpose: --groups='0' is invalid; expected positive integers "
         "or 'depthwise'."),
        (["benchmarks.roi_pool", "--levels=1,x"],
         "error: benchmarks.roi_pool: --levels='1,x' is invalid; expected positive integers"),
        (["benchmarks.proposals", "--strategies=fast,bogus"],
         "error: benchmarks.proposals: --strategies='bogus' is invalid; expected one of "
         "['fast', 'quality']."),
        (["benchmarks.proposals", "--scales=1,abc"],
         "error: benchmarks.proposals: --scales='abc' is invalid; expected numbers in [0.25, 8]"),
        # tracebacks: a KeyError on 'objects', and tfds's "test[:5][:500]" parse error
        (["benchmarks.proposals", "--dataset=digits"],
         "error: benchmarks.proposals: --dataset='digits' is invalid; expected a detection "
         "dataset with objects/bbox boxes"),
        (["benchmarks.proposals", "--split=test[:5]"],
         "error: benchmarks.proposals: --split='test[:5]' is invalid; expected a split name "
         "without a slice"),
        # empty lists ran nothing and exited 0; positional arguments were ignored; an unknown
        # dataset printed tfds's whole catalogue; NaN passed as 'no limit'
        (["benchmarks.conv_transpose", "--groups="],
         "error: benchmarks.conv_transpose: --groups='' is invalid; expected positive integers"),
        (["benchmarks.proposals", "--strategies="],
         "error: benchmarks.proposals: --strategies='' is invalid; expected at least one value"),
        (["benchmarks.roi_pool", "levels=7"], "error: unexpected argument ['levels=7']"),
        (["benchmarks.proposals", "--dataset=no_such_dataset"],
         "error: benchmarks.proposals: --dataset='no_such_dataset' is invalid; expected a "
         "detection dataset"),
        (["benchmarks.backend_parity", "--max_seconds=nan", "--allow_cpu"],
         "error: --max_seconds=nan is invalid; expected >= 0"),
        # tfds printed its build banner and failed in it ("cannot access 'README.md/downloads'");
        # a catalogue dataset not prepared went on to download it
        (["benchmarks.proposals", "--data_dir=README.md"],
         "error: --data_dir='README.md' is invalid; expected a directory or a path to create, "
         "but a file is in the way."),
        (["benchmarks.proposals", "--dataset=voc/2007", f"--data_dir={tmp_path}"],
         f"error: benchmarks.proposals: --dataset='voc/2007' is not prepared in the tfds "
         f"data_dir "
         f"'{tmp_path}'; its files would be in '{tmp_path}/voc/2007/"),
        # an offline set's first-use build into a dir nothing can be created in (/proc):
        # tfds's build banner, then a bare "[Errno 2] No such file or directory"
        (["benchmarks.proposals", "--data_dir=/proc/cnnjax_test/tfds"],
         "error: --data_dir='/proc/cnnjax_test/tfds' is invalid; cnnjax generates "
         "'shapes_multi' there on first use, but nothing can be created in '/proc'"),
        # the model was checked against --image_size only, not the dataset's native 8x8
        (["benchmarks.input_pipeline", "--dataset=digits", "--model=lenet5"],
         "error: --image_size=8 is invalid; lenet5 takes inputs of at least 32x32 (unset, the "
         "dataset's native size; set a larger --image_size)"),
    ]
    results = run_commands([command for command, _ in cases],
                           preimport=["cnnjax.models", "cnnjax.data.pipeline", "cnnjax.train.step"])
    for (command, message), result in zip(cases, results, strict=True):
        assert result.returncode == 1 and "Traceback" not in result.stderr, (command,
                                                                            result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1].startswith(message), (command,
                                                                            result.stderr[-2000:])
        assert result.stdout == "", command
    bounded = run_commands([["benchmarks.proposals", "--num_images=-498"],
                            ["benchmarks.roi_pool", "--repeats=0"]])
    for result in bounded:
        assert result.returncode == 1 and "is not a positive integer" in result.stderr, (
            result.stderr[-2000:])


def test_importing_the_proposals_benchmark_defines_no_flags():
    """Its module-level flags clashed with input_pipeline's `--dataset` in one process. A fresh
    interpreter: another test in this worker may have defined flags of those names."""
    code = ("from absl import flags; import benchmarks.proposals; "
            "print(sorted({'dataset', 'num_images', 'strategies'} & set(flags.FLAGS)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_every_benchmark_reports_a_flag_error_in_one_line():
    """absl's own `FATAL Flags parsing error` and help pointer, in place of the `error:` line
    every other entry point prints (bad values too: --batch_size=0)."""
    from tests.commands import run_commands

    scripts = ("backend_parity", "conv_transpose", "input_pipeline", "profile_step", "proposals",
               "roi_pool", "train_step")
    results = run_commands([[f"benchmarks.{s}", "--no_such_flag=1"] for s in scripts]
                           + [["benchmarks.train_step", "--batch_size=0"]])
    for script, result in zip(scripts, results, strict=False):
        assert result.returncode == 1 and "FATAL" not in result.stderr, (script, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith(
            "error: Unknown command line flag 'no_such_flag'"), (script, result.stderr)
    assert results[-1].stderr.strip().splitlines()[-1] == (
        "error: --batch_size='0' is invalid; 0 is not a positive integer")
