"""The `experiments.rcnn_svm` script as a user runs it: a bad flag is a one-line error with exit
status 1 before anything is read or written; a tiny run end to end prints one line per arm that
agrees with its results.json (the stage itself: tests/detection/test_rcnn_svm.py)."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from tests.commands import run_commands
from tests.experiments.test_train import _env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "experiments.rcnn_svm", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


_BAD_FLAGS = [
    (["--svm_c=0"], "error: rcnn_svm: svm_c=0.0 is invalid; expected a positive finite number."),
    (["--positive_iou=1.5"],
     "error: rcnn_svm: positive_iou=1.5 is invalid; expected None or an IoU in [0.3, 1]."),
    # each flag reaches the stage's Settings (a flag left at its default was refused as the
    # workdir, never checked)
    (["--train_images=0"], "error: rcnn_svm: train_images=0 is invalid; expected a positive "
                           "integer."),
    (["--initial_negatives=0"], "error: rcnn_svm: initial_negatives=0 is invalid; expected a "
                                "positive integer."),
    (["--mining_rounds=0"], "error: rcnn_svm: mining_rounds=0 is invalid; expected a positive "
                            "integer."),
    (["--step=0"], "error: rcnn_svm: step=0 is invalid; expected a positive integer."),
    ([], "error: rcnn_svm: workdir='{workdir}' is invalid; expected the --workdir of a "
         "finished R-CNN run."),
]
_MALFORMED = [
    (["--svm_c=1e-3"], "error: --workdir is required"),
    (["--workdir=x", "--svm_c=abc"],
     "error: --svm_c='abc' is invalid; could not convert string to float: 'abc'"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """{case: (tmp_path, result)} of the commands refused in one line, run by one interpreter
    forking a child each (tests/commands.py): 12 process starts importing JAX cost ~20 s more
    of a cold run. The script imports the engine's trained-run loading (orbax, optax, the
    models) only once running: imported once first, ~0.6 s a child less."""
    root = tmp_path_factory.mktemp("refused")
    commands = {}
    for i, (args, _) in enumerate(_BAD_FLAGS):
        tmp = root / f"bad_flag{i}"
        tmp.mkdir()
        commands[("bad_flag", i)] = (tmp, [f"--workdir={tmp / 'run'}", *args])  # no such dir
    for i, (args, _) in enumerate(_MALFORMED):
        commands[("malformed", i)] = (None, args)
    commands["positional"] = (None, ["--workdir=x", "extra"])
    (root / "no_run").mkdir()
    commands["no_run"] = (root / "no_run", [f"--workdir={root / 'no_run'}"])
    (root / "output_dir").mkdir()
    commands["output_dir"] = (root / "output_dir", [f"--workdir={root / 'output_dir'}",
                                                    f"--output_dir={root / 'output_dir'}"])
    results = run_commands([("experiments.rcnn_svm", *args) for _, args in commands.values()],
                           env=_env(), timeout=120, preimport=["cnnjax.train.trained"])
    return {case: (tmp, result)
            for (case, (tmp, _)), result in zip(commands.items(), results, strict=True)}


# Each refused before the workdir is opened (the script starts no TensorFlow: ~2 s each; the
# other settings' checks are tested on `Settings.check` in tests/detection/test_rcnn_svm.py).
@pytest.mark.parametrize("case", range(len(_BAD_FLAGS)),
                         ids=["svm_c", "positive_iou", "train_images", "initial_negatives",
                              "mining_rounds", "step", "workdir"])
def test_a_bad_flag_is_a_one_line_error(refused, case):
    tmp_path, result = refused[("bad_flag", case)]
    message = _BAD_FLAGS[case][1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message.format(workdir=tmp_path / "run")
    assert result.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", range(len(_MALFORMED)), ids=["missing", "malformed"])
def test_a_missing_or_malformed_flag_is_refused_in_one_line(refused, case):
    """absl's own parse errors (cnnjax.utils.cli.parse_flags): exit status 1, one line."""
    _, result = refused[("malformed", case)]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FATAL" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == _MALFORMED[case][1]


def test_a_positional_argument_is_refused(refused):
    _, result = refused["positional"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unexpected argument ['extra'] (flags are written --name=value; --helpshort "
        "lists them)")
    assert "--helpfull" not in result.stderr  # absl's usage text is not printed


def test_a_directory_without_a_run_is_a_one_line_error_and_left_empty(refused):
    tmp_path, result = refused["no_run"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: load_trained: workdir={str(tmp_path)!r} is invalid; expected the --workdir of a "
        "training run (no readable config.json with a model in it).")
    assert os.listdir(tmp_path) == []


def test_an_output_dir_among_the_runs_own_files_is_refused_naming_the_flag(refused):
    """--output_dir=<the workdir> would write results.json among the run's files: refused
    before the run is read, naming the flag as evaluate's --output does (it read
    `output_dir='...'`, the library's argument)."""
    tmp_path, result = refused["output_dir"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir={str(tmp_path)!r} is invalid; it would write among the run's own "
        f"files in {str(tmp_path)!r} (its config, summary and checkpoints): use a subfolder or "
        "another directory.")
    assert result.stdout == "" and os.listdir(tmp_path) == []


# A tiny R-CNN: 8- and 12-px windows every 8 px, warped to 8x8, two small conv stages.
TINY = dict(proposal_sizes=(8, 12), proposal_stride=8, warp_size=8, cnn_stages=((4,), (8,)),
            head_features=16, max_detections=20)


@pytest.mark.slow  # builds shapes_multi (10-30 s) and starts JAX and TensorFlow in a subprocess
def test_tiny_run_end_to_end(tmp_path):
    """A randomly initialised rcnn_small saved as a finished run on a fresh `shapes_multi`; the
    script trains the SVMs on 6 train scenes, evaluates the four arms on 8 test scenes, prints
    one line per arm (what results.json holds, to 4 decimals) and the output directory, writes
    only its rcnn_svm/ directory, and a rerun reuses every cached stage."""
    from cnnjax.models import create_model
    from cnnjax.train.checkpoint import Checkpointer
    from cnnjax.train.state import init_variables
    from experiments.configs import rcnn_shapes

    config = rcnn_shapes.get_config()
    for key, value in TINY.items():
        config.model_kwargs[key] = value
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.eval_split = "test[:8]"
    workdir = tmp_path / "run"
    model = create_model("rcnn_small", num_classes=4, **TINY)
    variables = init_variables(model, jax.random.key(0), (1, 64, 64, 3))
    checkpointer = Checkpointer(str(workdir), keep=1, best_metric=None, use_async=False)
    checkpointer.save(5, jax.device_get(dict(variables)))
    checkpointer.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    before = sorted(str(p) for p in workdir.rglob("*"))

    args = (f"--workdir={workdir}", "--train_images=6", "--initial_negatives=50",
            "--mining_rounds=2")
    result = _script(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "rcnn_svm"
    saved = json.loads((out / "results.json").read_text())
    assert saved["checkpoint"]["step"] == 5
    lines = result.stdout.strip().splitlines()
    from cnnjax.detection.rcnn_svm_run import ARM_LABELS

    for arm, label in ARM_LABELS.items():
        line = next(x for x in lines if x.startswith(label))
        found = re.search(r"mAP@0\.5 (\d\.\d{4})  COCO mAP (\d\.\d{4})$", line)
        assert found, line
        metrics = saved["test"][arm]
        assert metrics["num_examples"] == 8
        assert float(found[1]) == round(metrics["map50"], 4), (arm, line, metrics)
        assert float(found[2]) == round(metrics["map"], 4), (arm, line, metrics)
    assert lines[-1].endswith(f"s; results.json and report.md in {out}")
    assert json.loads((out / "status.json").read_text()) == {"status": "completed"}
    assert sorted(str(p) for p in workdir.rglob("*") if "rcnn_svm" not in str(p)) == before

    rerun = _script(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["reused"] == {"train_features": True, "test_features": True, "models": True}
    assert again["test"] == saved["test"]
