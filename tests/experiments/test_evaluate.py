"""`experiments.evaluate` end to end on a trained LeNet-5: the calibration block, the reliability
diagram and temperature scaling on a held-out split. The quick checks of the script (one-line
errors, --n_bins) and of the functions it calls are in tests/train/test_trained.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.commands import run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _command(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_calibration_and_temperature_scaling_of_a_trained_lenet(tmp_path):
    """LeNet-5 trained 100 steps on digits' train[:90%], evaluated on test with T fitted on the
    held-out train[90%:] (144 scans), as a user types it."""
    workdir = tmp_path / "lenet"
    train = _command("experiments.train", "--config=experiments/configs/lenet5_digits.py",
                     f"--workdir={workdir}", "--config.num_train_steps=100",
                     "--config.eval_every_steps=100", "--config.progress_bar=False",
                     "--config.data.train_split=train[:90%]", timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    result = _command("experiments.evaluate", f"--workdir={workdir}", "--n_bins=10",
                      "--temperature_split=train[90%:]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "After temperature scaling (T=" in result.stdout
    out = workdir / "eval"
    record = json.loads((out / "test_step100.json").read_text())
    for name in ("test_step100.png", "test_step100_reliability.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert record["reliability_plot"] == str(out / "test_step100_reliability.png")
    calibration = record["calibration"]
    scaled = calibration["temperature_scaling"]
    # At T = 1 the NLL is the engine's eval loss (it sums float32: 1e-5) and top-1 its top-1.
    np.testing.assert_allclose(calibration["nll"], record["loss"], rtol=1e-5)
    np.testing.assert_allclose(calibration["top1"], record["top1"], rtol=1e-6)
    assert (scaled["split"], scaled["num_fit_examples"], scaled["same_split"]) == (
        "train[90%:]", 144, False)
    assert 0.05 < scaled["temperature"] < 20 and not scaled["at_bound"]
    assert scaled["fit_nll_after"] <= scaled["fit_nll_before"]
    assert scaled["top1"] == calibration["top1"]
    for scores in (calibration, scaled):  # ECE and MCE recomputed from the written bins
        bins = scores["bins"]
        assert len(bins) == scores["n_bins"] == 10
        assert sum(b["count"] for b in bins) == scores["num_examples"] == 359
        assert [b["hi"] for b in bins] == pytest.approx(np.linspace(0.1, 1, 10).tolist())
        gaps = [abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]]
        ece = sum(b["count"] * g for b, g in zip([b for b in bins if b["count"]], gaps,
                                                  strict=True)) / 359
        np.testing.assert_allclose(scores["ece"], ece, rtol=1e-9)
        np.testing.assert_allclose(scores["mce"], max(gaps), rtol=1e-9)

    # Fitting on the evaluated split is refused, as is a split the dataset lacks, both before
    # anything compiles (one line, no traceback).
    same = _command("experiments.evaluate", f"--workdir={workdir}", "--temperature_split=test")
    assert same.returncode == 1 and "Traceback" not in same.stderr
    assert same.stderr.strip().splitlines()[-1].startswith(
        "error: --temperature_split='test' is invalid; it holds the evaluated split")
    missing = _command("experiments.evaluate", f"--workdir={workdir}",
                       "--temperature_split=validation")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    line = missing.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --temperature_split='validation' is invalid; ")
    assert "'digits' has splits ['train', 'test']" in line, line
    # --split is checked the same way, slices included, on one line naming the flag (tfds's
    # parse error spans two lines).
    sliced = _command("experiments.evaluate", f"--workdir={workdir}", "--split=test[:200%]")
    assert sliced.returncode == 1 and "Traceback" not in sliced.stderr
    assert sliced.stderr.strip().splitlines()[-1].startswith(
        "error: --split='test[:200%]' is invalid; 'digits' has splits ['train', 'test']; "
        "expected a tfds split string such as 'train', 'test[:10%]'"), sliced.stderr[-500:]

    # A split the model gets entirely right has no best T: the command says so, exits 1, and
    # still writes the engine's metrics (here to --output) and the calibration at T = 1.
    output = tmp_path / "perfect.json"
    perfect = _command("experiments.evaluate", f"--workdir={workdir}", "--noplot",
                       "--temperature_split=train[:2%]", f"--output={output}")
    assert perfect.returncode == 1 and "Traceback" not in perfect.stderr, perfect.stderr[-3000:]
    last = perfect.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --temperature_split='train[:2%]' is invalid; no temperature "
                           "fits it")
    assert last.endswith(f"(the other metrics are written to {output})")
    written = json.loads(output.read_text())
    assert written["top1"] == record["top1"] and written["calibration_error"] in last
    assert {"ece", "mce", "nll", "brier"} <= set(written["calibration"])
    assert "temperature_scaling" not in written["calibration"]
    # --nocalibration: the engine's metrics only.
    plain = _command("experiments.evaluate", f"--workdir={workdir}", "--noplot",
                     "--nocalibration", f"--output={tmp_path / 'plain.json'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    written = json.loads((tmp_path / "plain.json").read_text())
    assert "calibration" not in written and "plot" not in written
    # --noplot drops the PNG only: the matrix and per-class top-1 are still in the JSON (they
    # were dropped with the drawing, review BG), the same as the plotted run's
    assert not (tmp_path / "plain.png").exists()
    for key in ("classes", "per_class_top1", "confusion_matrix"):
        assert written[key] == record[key], key
    assert np.trace(written["confusion_matrix"]) / 359 == pytest.approx(record["top1"])


@pytest.mark.slow
def test_overlapping_slices_and_joins_are_refused_or_warned_about(tmp_path):
    """A 2-step LeNet-5 run on digits' train[:60%]: --temperature_split=train[60%:]+test holds
    the evaluated test split (refused), train[50%:] overlaps the training slice (warned)."""
    workdir = tmp_path / "lenet"
    train = _command("experiments.train", "--config=experiments/configs/lenet5_digits.py",
                     f"--workdir={workdir}", "--config.num_train_steps=2",
                     "--config.schedule.warmup_steps=0", "--config.global_batch_size=4",
                     "--config.eval_every_steps=2",
                     "--config.checkpoint_every_steps=2", "--config.progress_bar=False",
                     "--config.data.train_split=train[:60%]", timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    joined = _command("experiments.evaluate", f"--workdir={workdir}",
                      "--temperature_split=train[60%:]+test")
    assert joined.returncode == 1 and "Traceback" not in joined.stderr
    assert joined.stderr.strip().splitlines()[-1].startswith(
        "error: --temperature_split='train[60%:]+test' is invalid; it holds the "
        "evaluated split 'test'")
    sliced = _command("experiments.evaluate", f"--workdir={workdir}", "--noplot",
                      "--temperature_split=train[50%:]", f"--output={tmp_path / 'e.json'}")
    assert "Traceback" not in sliced.stderr, sliced.stderr[-3000:]
    assert ("warning: --temperature_split='train[50%:]' shares examples with the run's training "
            "split 'train[:60%]'") in sliced.stderr
    # Results it may not write (the writer refused, as in a read-only workdir even for root):
    # one line naming the file, and where else they can go.
    denied = subprocess.run(
        [sys.executable, "-c", _DENIED_WRITER, f"--workdir={workdir}", "--noplot",
         "--nocalibration"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=300)
    assert denied.returncode == 1 and "Traceback" not in denied.stderr, denied.stderr[-3000:]
    assert denied.stderr.strip().splitlines()[-1] == (
        f"error: cannot access {str(workdir / 'eval' / 'test_step2.json')!r}: Permission "
        "denied (pass --output=<a JSON path> to write them elsewhere)")


_DENIED_WRITER = """
from absl import app
from cnnjax.utils import files

def denied(path, record):
    raise PermissionError(13, "Permission denied", path)

files.write_json = denied
from experiments import evaluate
app.run(evaluate.main)
"""


# (flags, the last line of stderr) in a workdir holding no run: a flag error is printed before
# the run is read; a valid value (--num_devices=0: every device; --n_bins=1) gets as far as the
# workdir, whose error it then ends on.
_NO_RUN = ("error: --workdir='{workdir}' is invalid; expected the --workdir of a training run (no "
           "readable config.json with a model in it).")
_BAD_FLAGS = [
    (["--temperature_split=train", "--nocalibration"],
     "error: --temperature_split is invalid with --nocalibration; drop one of them"),
    (["--plot_images=0"], "error: --plot_images=0 is invalid; expected at least 1 (or --noplot)"),
    (["--num_devices=0"], _NO_RUN),
    (["--n_bins=1"], _NO_RUN),
    (["--output={workdir}/res.PNG"],  # the plot's own name, whatever its case
     "error: --output='{workdir}/res.PNG' is invalid; expected a JSON file path (the plot is "
     "written beside it, with the suffix .png)"),
    (["--output={workdir}"],
     "error: --output='{workdir}' is invalid; expected a JSON file path, not a directory"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """{case: (workdir, result)} of the commands refused before the run is read (no workdir
    holds one), run by one interpreter forking a child each (tests/commands.py): one process
    start, not eleven. test_an_output_among_the_runs_own_files_... starts the real command."""
    root = tmp_path_factory.mktemp("refused")
    commands = {}
    for given in (False, True):
        workdir = root / f"in_the_way_{given}"
        workdir.mkdir()
        (workdir / "eval").write_text("")
        args = [f"--output={workdir / 'eval' / 'r.json'}"] if given else []
        commands[("in_the_way", given)] = (workdir, [f"--workdir={workdir}", *args])
    for case, args in (("empty_output", ["--output="]),
                       ("allow_same_split", ["--allow_same_split"])):
        (root / case).mkdir()
        commands[case] = (root / case, [f"--workdir={root / case}", *args])
    for i, (args, _) in enumerate(_BAD_FLAGS):
        workdir = root / f"bad_flag{i}"
        workdir.mkdir()
        commands[("bad_flag", i)] = (workdir, [f"--workdir={workdir}",
                                               *(a.format(workdir=workdir) for a in args)])
    # JAX and the engine, imported once (experiments.evaluate imports them only once running)
    results = run_commands([("experiments.evaluate", *args) for _, args in commands.values()],
                           preimport=["cnnjax.train.trained"])
    return {case: (workdir, result)
            for (case, (workdir, _)), result in zip(commands.items(), results, strict=True)}


@pytest.mark.parametrize("case", range(len(_BAD_FLAGS)),
                         ids=["temperature_split_nocalibration", "plot_images", "num_devices_0",
                              "n_bins_1", "output_png", "output_dir"])
def test_a_bad_flag_is_one_line_before_the_run_is_read(refused, case):
    """Each flag's own check, or none for a valid edge value (the run-less workdir's error
    then); nothing is written."""
    workdir, result = refused[("bad_flag", case)]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == _BAD_FLAGS[case][1].format(workdir=workdir)
    assert result.stdout == "" and os.listdir(workdir) == []


@pytest.mark.parametrize("given", [False, True])
def test_an_output_folder_a_file_is_in_the_way_of_is_refused_before_evaluating(refused, given):
    """Checked before the run is loaded (the workdir holds none), naming the folder's source:
    --output's folder when passed, else the workdir's eval folder."""
    tmp_path, result = refused[("in_the_way", given)]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    label = "--output's folder" if given else "--workdir's eval folder"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {label}={str(tmp_path / 'eval')!r} is invalid; expected a directory or a path "
        "to create, but a file is in the way.")


def test_an_output_among_the_runs_own_files_is_refused_before_evaluating(tmp_path):
    """--output=<workdir>/config.json replaced the run's training config with eval metrics: it
    could no longer be evaluated, resumed or warm-started from. (The real `python -m` command,
    where the other refusals here share one interpreter.)"""
    (tmp_path / "config.json").write_text("{}")
    result = _command("experiments.evaluate", f"--workdir={tmp_path}",
                      f"--output={tmp_path / 'config.json'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --output={str(tmp_path / 'config.json')!r} is invalid; it would write among the "
        f"run's own files in {str(tmp_path)!r} (its config, summary and checkpoints): use a "
        "subfolder or another directory.")
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> str:
    """LeNet-5 trained 2 steps on the in-memory `fake` set (splits train and test)."""
    from tests.experiments.test_robustness import _fake, _train

    return _train(str(tmp_path_factory.mktemp("fake") / "run"), _fake(1))


@pytest.mark.slow  # 17 s in CI: trains a run first
def test_a_split_or_weight_average_the_run_lacks_is_one_line_naming_the_flag(fake_run):
    """--split is checked against the run's dataset before anything compiles, and named as the
    flag (not the config's data.eval_split); --ema on a run without a weight average says to
    drop --ema (not the Python API's ema=False)."""
    workdir = fake_run
    # one interpreter forking a child per command (tests/commands.py): 3 process starts cost
    # ~12 s more; test_an_output_among_the_runs_own_files_... starts the real command
    bad_split, no_average, bad_flags, no_step, no_devices, no_fit_split = run_commands(
        [("experiments.evaluate", f"--workdir={workdir}", flag)
         for flag in ("--split=validation", "--ema", "--step=0", "--step=5",
                      "--num_devices=4096", "--temperature_split=validation")],
        preimport=["cnnjax.data.pipeline"])
    assert bad_split.returncode == 1 and "Traceback" not in bad_split.stderr
    assert bad_split.stderr.strip().splitlines()[-1] == (
        "error: --split='validation' is invalid; 'fake' has splits ['train', 'test'].")
    assert no_average.returncode == 1 and no_average.stderr.strip().splitlines()[-1] == (
        f"error: --ema is invalid; the run in {workdir!r} kept no weight average (its "
        "config.ema.decay is None); drop --ema to use its trained weights.")
    assert not os.path.exists(os.path.join(workdir, "eval", "validation_step2.json"))
    # named as the flags, not as load_trained's step or the config's num_devices
    assert bad_flags.returncode == 1 and bad_flags.stderr.strip().splitlines()[-1] == (
        "error: --step=0 is invalid; expected a checkpoint step >= 1 (or leave it out: the best "
        "checkpoint, else the newest)")
    # load_trained's step, the config's num_devices and check_temperature_split's
    # temperature_split were named as the library's arguments, not as the flags that set them
    for result in (no_step, no_devices, no_fit_split):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert no_step.stderr.strip().splitlines()[-1] == (
        f"error: --step=5 is invalid; {os.path.join(workdir, 'checkpoints')!r} has checkpoints "
        "at steps [2].")
    # whole line: the hint to pass --num_devices is for a run's own count, not the flag's
    assert re.fullmatch(r"error: --num_devices=4096 is invalid; only \d+ local devices are "
                        r"available\.", no_devices.stderr.strip().splitlines()[-1])
    assert no_fit_split.stderr.strip().splitlines()[-1] == (
        "error: --temperature_split='validation' is invalid; 'fake' has splits ['train', 'test'].")


@pytest.mark.slow  # ~20 s: trains a run (shared) and evaluates it 3 times
def test_plots_an_evaluation_did_not_draw_are_removed_not_left_stale(fake_run, tmp_path):
    """Rerun with --noplot (or --nocalibration) into the same eval folder, an evaluation left
    the earlier run's PNGs beside its new JSON, to be taken for its own plots; only those the
    earlier JSON names are removed, never a file no evaluation drew."""
    workdir = shutil.copytree(fake_run, tmp_path / "run")
    stem = workdir / "eval" / "test_step2"
    plotted, uncalibrated, unplotted = run_commands(
        [("experiments.evaluate", f"--workdir={workdir}", *flags)
         for flags in ((), ("--nocalibration",), ("--noplot",))],
        preimport=["cnnjax.data.pipeline"])
    for result in (plotted, uncalibrated, unplotted):
        assert result.returncode == 0, result.stderr[-3000:]
    confusion, reliability = f"{stem}.png", f"{stem}_reliability.png"
    assert "Removed" not in plotted.stdout
    assert uncalibrated.stdout.strip().splitlines()[-1] == (
        f"Removed {reliability}: an earlier evaluation's plot, which this one did not draw")
    assert unplotted.stdout.strip().splitlines()[-1] == (
        f"Removed {confusion}: an earlier evaluation's plot, which this one did not draw")
    assert sorted(os.listdir(workdir / "eval")) == ["test_step2.json"]
    record = json.loads((workdir / "eval" / "test_step2.json").read_text())
    assert "plot" not in record and "reliability_plot" not in record
    # a file there that no evaluation drew (its JSON names none) is the user's: left alone
    with open(confusion, "wb") as f:
        f.write(b"mine")
    mine, = run_commands([("experiments.evaluate", f"--workdir={workdir}", "--noplot")])
    assert mine.returncode == 0 and "Removed" not in mine.stdout, mine.stderr[-3000:]
    with open(confusion, "rb") as f:
        assert f.read() == b"mine"
    # a rerun that draws them writes them again
    again, = run_commands([("experiments.evaluate", f"--workdir={workdir}")])
    assert again.returncode == 0 and "Removed" not in again.stdout, again.stderr[-3000:]
    for path in (confusion, reliability):
        with open(path, "rb") as f:
            assert f.read(8) == PNG


_CTRL_C_WHILE_LOADING = """
from absl import app
from cnnjax.train import trained

def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt

trained.load_trained = ctrl_c
from experiments import evaluate
app.run(evaluate.main)
"""


def test_ctrl_c_is_one_line(tmp_path):
    """Ctrl-C ended `experiments.evaluate` with a KeyboardInterrupt traceback; train, sweep,
    tune and the LR range test print one `interrupted:` line (exit status 130)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_LOADING,
                             f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted: Ctrl-C; evaluate only reads the run in {str(tmp_path)!r}: rerun the "
        "command to evaluate it.")


_IGNORED_FLAGS = """
import json
from experiments.evaluate import ignored_flags

cases = [({"plot_images"}, "classification", True, True, None),
         ({"plot_images"}, "detection", True, True, None),
         ({"plot_images"}, "segmentation", True, True, None),
         ({"plot_images"}, None, False, True, None),
         ({"n_bins"}, "detection", True, True, None),
         ({"n_bins"}, "classification", True, True, None),
         ({"n_bins"}, None, True, False, None),
         ({"allow_same_split"}, "classification", True, True, None),
         ({"allow_same_split"}, "classification", True, True, "test"),
         (set(), "classification", True, True, None)]
print(json.dumps([ignored_flags(*case) for case in cases]))
"""


def test_an_empty_output_is_refused_naming_the_flag(refused):
    """`--output=` was taken for the default path (<workdir>/eval/...) without a word; refused
    before the run is read, as an empty --workdir is."""
    tmp_path, result = refused["empty_output"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --output='' is invalid; expected a JSON file path (or leave it out: "
        "<workdir>/eval/<split>_step<N>.json)")
    assert not (tmp_path / "eval").exists()


def test_a_flag_the_run_or_the_other_flags_would_ignore_is_refused(refused):
    """`--plot_images=4` on a classifier (whose plot is the confusion matrix), `--n_bins` on a
    detector or with --nocalibration, --plot_images with --noplot and --allow_same_split
    without --temperature_split were accepted and silently ignored."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", _IGNORED_FLAGS], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "--plot_images is invalid for a classification run; a classifier's plot is its "
        "confusion matrix over every example (the flag sets the images a detector's or a dense "
        "predictor's plot draws)",
        None, None,
        "--plot_images is invalid with --noplot (it sets the plot's images); drop one",
        "--n_bins is invalid for a detection run; calibration (ECE, MCE, reliability diagram) is "
        "reported for classifiers only",
        None,
        "--n_bins is invalid with --nocalibration (it sets calibration's bins); drop one",
        "--allow_same_split is invalid without --temperature_split (it allows that split to be "
        "the evaluated one); pass --temperature_split or drop it",
        None, None]
    # the command checks the flags' own combinations before it loads anything (no run here)
    _, command = refused["allow_same_split"]
    assert command.returncode == 1 and command.stderr.strip().splitlines()[-1] == (
        "error: --allow_same_split is invalid without --temperature_split (it allows that split "
        "to be the evaluated one); pass --temperature_split or drop it")


_STALE_PLOTS = """
import json

from experiments.evaluate import _earlier_plots, _remove_stale_plots

with open("res.json", "w") as f:  # as an earlier run from the parent folder wrote it
    json.dump({"plot": "sub/res.png", "reliability_plot": "sub/elsewhere.png"}, f)
print(_remove_stale_plots("res", _earlier_plots("res.json"),
                          {"reliability_plot": "res_reliability.png"}))
# an earlier plot the user has since deleted (res.png, just removed) is skipped, not an error
print(_remove_stale_plots("res", {"res.png", "res_reliability.png"}, {}))
"""


def test_stale_plots_are_matched_by_name_beside_the_json(tmp_path):
    """The earlier JSON names its plots as its run built the paths, relative to that run's
    folder (`sub/res.png`): a rerun from elsewhere left them, matching whole paths. (In a
    subprocess: importing the command configures this process's XLA flags.)"""
    (tmp_path / "sub").mkdir()
    for name in ("res.png", "res_reliability.png", "other.png"):
        (tmp_path / "sub" / name).write_bytes(b"png")
    result = subprocess.run([sys.executable, "-c", _STALE_PLOTS], capture_output=True, text=True,
                            cwd=tmp_path / "sub", env={**os.environ, "PYTHONPATH": ROOT},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == ["['res.png']", "['res_reliability.png']"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["other.png", "res.json"]


_CALIBRATION_LINE = """
import json
from experiments.evaluate import _calibration_line

record = {"n_bins": 15, "ece": 0.0932, "mce": 0.1216, "nll": 0.3311, "brier": 0.1458,
          "temperature_scaling": {"temperature": 1.5, "split": "train[90%:]",
                                  "num_fit_examples": 144, "ece": 0.0217, "mce": 0.0875,
                                  "nll": 0.2904, "brier": 0.1399, "at_bound": False}}
print(json.dumps(_calibration_line(record)))
"""


def test_the_calibration_line_prints_each_score_under_its_name():
    """The printed line is all a user reads of the scores (the JSON has the rest): each number
    follows its own name, before and after temperature scaling (hand-written record, distinct
    values). In a subprocess: importing the command configures this process's XLA flags."""
    result = subprocess.run([sys.executable, "-c", _CALIBRATION_LINE], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == (
        "Calibration (15 bins): ECE 0.0932, MCE 0.1216, NLL 0.3311, Brier 0.1458\n"
        "After temperature scaling (T=1.5000, fitted on 'train[90%:]', 144 examples): ECE "
        "0.0217, MCE 0.0875, NLL 0.2904, Brier 0.1399")
