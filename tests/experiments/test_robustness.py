"""`experiments.robustness` on tiny trained LeNet-5 runs: the cells against the model applied to
independently corrupted eval images, resume per cell, grey runs, refusals, and the
`cifar10_corrupted` path under `tfds.testing.mock_data`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cnnjax.analysis import corruptions as C
from cnnjax.analysis import robustness as R
from cnnjax.data.pipeline import DatasetNotPreparedError, default_data_config
from cnnjax.train import loop
from cnnjax.train.config import default_config
from cnnjax.train.trained import eval_examples, evaluate_run, load_trained
from tests.data.test_presets import _mock, _write_metadata

pytestmark = pytest.mark.slow  # each module run trains three tiny runs (~15-30 s on 2 cores)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _train(workdir: str, data) -> str:
    """LeNet-5 trained 2 steps of 4 images on `data`: a real run of the engine, in seconds."""
    config = default_config()
    config.model = "lenet5"
    config.data = data
    config.global_batch_size = 4
    config.num_train_steps = 2
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 2
    config.progress_bar = config.tensorboard = config.async_checkpoints = False
    loop.train_and_evaluate(config, workdir)
    return workdir


def _fake(channels: int):
    data = default_data_config("fake")
    data.fake_image_shape = (32, 32, channels)
    data.fake_num_train, data.fake_num_eval = 8, 20
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """RGB and grey runs on the in-memory `fake` set (20 eval images)."""
    root = tmp_path_factory.mktemp("runs")
    return {c: _train(str(root / f"c{c}"), _fake(c)) for c in (3, 1)}


@pytest.fixture
def rgb_run(trained, tmp_path):
    """A private copy of the RGB run (each test writes its own robustness/)."""
    return shutil.copytree(trained[3], tmp_path / "rgb")


def _expected_top1(workdir, name: str, severity: int, seed: int = 0) -> float:
    """The run's top-1 on its eval images as the engine's eval pipeline yields them, brought
    back to 0..255 levels, corrupted, stored as uint8 and normalized again (fake: mean = std =
    0.5)."""
    run = load_trained(str(workdir))
    batch = next(eval_examples(run, batch_size=64))
    pixels = np.rint((batch["image"].astype(np.float64) * 0.5 + 0.5) * 255)
    corrupted = C.quantize(C.corrupt(pixels, name, severity, seed)) / 255.0
    logits = run.apply(((corrupted - 0.5) / 0.5).astype(np.float32))
    return float(np.mean(np.asarray(np.argmax(logits, -1)) == batch["label"]))


def test_cells_are_the_models_top1_on_independently_corrupted_images(rgb_run):
    lines = []
    record, path = R.run_robustness(str(rgb_run), "gaussian_noise,saturate,pixelate", "1,5",
                                    batch_size=8, log=lines.append)
    assert path == str(rgb_run / "robustness" / "robustness.json")
    with open(path) as f:
        assert json.load(f) == record
    with open(record["plot"], "rb") as f:
        assert f.read(8) == PNG
    # Clean top-1 is the engine's eval top-1 (native 32x32 pixels: the uint8 storage is exact).
    assert record["clean_top1"] == pytest.approx(evaluate_run(load_trained(str(rgb_run)))["top1"],
                                                 abs=1e-9)
    assert record["num_examples"] == 20 and record["skipped"] == {}
    assert list(record["cells"]) == ["gaussian_noise", "saturate", "pixelate"]
    for name, per in record["cells"].items():
        assert list(per) == ["1", "5"]
        for severity, top1 in per.items():
            assert top1 == pytest.approx(_expected_top1(rgb_run, name, int(severity)), abs=1e-9)
    cells = [v for per in record["cells"].values() for v in per.values()]
    assert record["mean_corruption_top1"] == pytest.approx(np.mean(cells))
    assert record["relative_drop"] == pytest.approx(
        (record["clean_top1"] - np.mean(cells)) / record["clean_top1"])
    assert record["parameters"]["pixelate"] == [0.95, 0.9, 0.85, 0.75, 0.65]
    assert lines[0].startswith("clean top-1 ") and lines[-1].startswith("[6/6] pixelate "
                                                                        "severity 5: top-1 ")
    assert "saturate" in R.table(record) and "relative drop" in R.table(record)


class _StopError(Exception):
    pass


def test_an_interrupted_command_resumes_per_cell_and_a_finished_one_reprints(rgb_run,
                                                                            monkeypatch):
    args = (str(rgb_run), "contrast,brightness", "2,4")

    def stop_after_two_cells(line: str) -> None:
        if line.startswith("[2/"):
            raise _StopError
    with pytest.raises(_StopError):
        R.run_robustness(*args, log=stop_after_two_cells)
    path = rgb_run / "robustness" / "robustness.json"
    assert json.loads(path.read_text())["cells"] == {
        "contrast": pytest.approx({"2": _expected_top1(rgb_run, "contrast", 2),
                                   "4": _expected_top1(rgb_run, "contrast", 4)}),
        "brightness": {}}
    lines = []
    record, _ = R.run_robustness(*args, log=lines.append)
    assert [line.split(":")[0] for line in lines[1:]] == [
        "[1/2] brightness severity 2", "[2/2] brightness severity 4"]
    assert record["cells"]["brightness"]["4"] == pytest.approx(
        _expected_top1(rgb_run, "brightness", 4))

    def no_model(*_):
        raise AssertionError("a finished record is reprinted, not measured again")
    monkeypatch.setattr(R, "make_classify", no_model)
    lines = []
    again, _ = R.run_robustness(*args, log=lines.append)
    assert lines == [f"All 4 cells already measured in {path}:"]
    assert {k: again[k] for k in ("cells", "clean_top1", "mean_corruption_top1")} == {
        k: record[k] for k in ("cells", "clean_top1", "mean_corruption_top1")}
    monkeypatch.undo()
    lines = []
    other, _ = R.run_robustness(*args, seed=3, log=lines.append)  # other settings: afresh
    assert "holds other settings" in lines[0] and other["settings"]["seed"] == 3
    assert len([line for line in lines if line.startswith("[")]) == 4


def test_a_second_command_on_the_same_run_is_refused(rgb_run):
    """Two robustness commands on one run would race on its JSON: the second is refused."""
    from cnnjax.utils.lock import DirectoryInUseError
    from tests.train.helpers import locked_by_another_process

    with (locked_by_another_process(str(rgb_run / "robustness")),
          pytest.raises(DirectoryInUseError, match=r"^workdir: .*robustness.* is in use")):
        R.run_robustness(str(rgb_run), "contrast", "1", log=lambda _: None)


def test_a_grey_run_skips_saturate_and_refuses_it_by_name(trained):
    record, _ = R.run_robustness(trained[1], "all", "3", max_examples=8, log=lambda _: None)
    assert list(record["cells"]) == list(C.available(1)) and "saturate" not in record["cells"]
    assert record["skipped"] == {"saturate": "defined for RGB images only; this run's images "
                                             "have 1 channel"}
    assert record["num_examples"] == 8 and record["settings"]["max_examples"] == 8
    with pytest.raises(ValueError, match=r"corruptions: name='saturate' is invalid; it is "
                                         r"defined for RGB images only"):
        R.run_robustness(trained[1], "saturate,contrast", "1")


def test_without_opencv_all_skips_its_four_corruptions_and_a_named_one_is_refused(monkeypatch):
    """OpenCV is the optional `robustness` extra: on the fly, `all` skips what needs it (saying
    why) and naming one is refused; cifar10_corrupted's stored images need no OpenCV."""
    monkeypatch.setitem(sys.modules, "cv2", None)
    names, skipped = R.parse_corruptions("all", 3)
    assert set(skipped) == set(C.NEEDS_OPENCV) and not set(names) & set(C.NEEDS_OPENCV)
    assert len(names) + len(skipped) == len(C.CORRUPTIONS)
    assert all("pip install 'cnnjax[robustness]'" in why for why in skipped.values())
    with pytest.raises(ValueError, match=r"corruptions: name='snow' is invalid; it needs OpenCV"):
        R.parse_corruptions("contrast,snow", 3)
    assert R.parse_corruptions("all", 3, on_the_fly=False) == (list(C.CORRUPTIONS), {})
    assert R.parse_corruptions("snow", 3, on_the_fly=False) == (["snow"], {})


def test_tfds_configs_use_tfds_names_for_glass_blur_and_elastic():
    """cifar10_corrupted calls glass_blur `frosted_glass_blur` and elastic_transform `elastic`."""
    config = default_config()
    config.data = default_data_config("cifar10")
    for name, expected in (("glass_blur", "frosted_glass_blur_3"), ("elastic_transform",
                                                                    "elastic_3"),
                           ("contrast", "contrast_3")):
        got = R.corrupted_config(config, name, 3).data
        assert got.tfds_name == f"cifar10_corrupted/{expected}" and got.eval_split == "test"


@pytest.mark.parametrize("kwargs, message", [
    (dict(severities="0,6"), r"robustness: severities='0,6' is invalid; expected integers "
                             r"from 1 to 5, e.g. '1,3,5'\."),
    (dict(severities="x"), r"severities='x' is invalid"),
    (dict(corruptions="frost"), r"corruptions: name='frost' is invalid; expected one of "
                              r"\['gaussian_noise'"),
    (dict(corruptions=" , "), r"robustness: corruptions=' , ' is invalid; expected 'all' or "
                              r"some of \['gaussian_noise'"),
    (dict(max_examples=0), r"robustness: max_examples=0 is invalid"),
    (dict(seed=-2), r"robustness: seed=-2 is invalid; expected a non-negative integer"),
    (dict(source="tfds"), r"robustness: source='tfds' is invalid; cifar10_corrupted is "
                          r"CIFAR-10's test set, and this run was trained on 'fake'; use "
                          r"source='on_the_fly'"),
])
def test_bad_settings_are_refused_naming_the_setting(trained, kwargs, message):
    with pytest.raises(ValueError, match=message):
        R.run_robustness(trained[3], **kwargs)


@pytest.mark.parametrize("shape", [(64, 64, 3), (224, 32, 3)])
def test_sizes_without_a_table_are_refused(trained, monkeypatch, shape):
    """The tables are for 32x32 (CIFAR-10-C) and 224x224 (ImageNet-C): a run whose model sees
    64x64 or 224x32 images is refused by name, naming both."""
    real = R.eval_pipeline

    def reshaped(config):
        spec, source, transforms = real(config)
        return spec, source, dataclasses.replace(transforms, out_shape=shape)

    monkeypatch.setattr(R, "eval_pipeline", reshaped)
    with pytest.raises(ValueError, match=rf"robustness: workdir=.* is invalid; its model sees "
                                         rf"{shape[0]}x{shape[1]} images; the corruption tables "
                                         r"are for 32x32 \(CIFAR-10-C's\) and 224x224 "
                                         r"\(ImageNet-C's\)"):
        R.run_robustness(trained[3])


def test_detectors_and_segmenters_are_refused(trained, monkeypatch):
    import cnnjax.train.trained as trained_lib

    for task in ("detection", "segmentation"):
        def load(workdir, step=None, task=task):
            run = load_trained(workdir, step)
            config = run.config.copy_and_resolve_references()
            config.task = task
            return dataclasses.replace(run, config=config)

        monkeypatch.setattr(trained_lib, "load_trained", load)
        with pytest.raises(ValueError, match=rf"robustness: workdir=.* is invalid; expected a "
                                             rf"classifier's run, not a {task} run"):
            R.run_robustness(trained[3])


def test_the_command_prints_the_table_and_errors_in_one_line(trained):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "experiments.robustness", f"--workdir={trained[1]}"]
    ok = subprocess.run([*command, "--corruptions=contrast", "--severities=5"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "contrast" in ok.stdout and "clean top-1" in ok.stdout and "Written to" in ok.stdout
    bad = subprocess.run([*command, "--severities=7"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: robustness: severities='7' is invalid; expected integers from 1 to 5, e.g. "
        "'1,3,5'.")




def test_a_file_in_the_way_of_the_robustness_folder_is_named_as_that_folder(rgb_run):
    (rgb_run / "robustness").write_text("")
    with pytest.raises(ValueError, match=r"^--workdir's robustness folder='.*robustness' is "
                                         r"invalid; expected a directory or a path to create, "
                                         r"but a file is in the way\.$"):
        R.run_robustness(str(rgb_run), "contrast", "1", log=lambda _: None)


# The command with the results' writer refused (as on a workdir it may not write): for a root
# user, whom chmod does not stop.
_DENIED_WRITER = """
import sys
from absl import app
from cnnjax.utils import files

def denied(path, record):
    raise PermissionError(13, "Permission denied", path)

files.write_json = denied
from experiments import robustness
app.run(robustness.main)
"""


def _robustness_command(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = ["-c", script] if script else ["-m", "experiments.robustness"]
    return subprocess.run([sys.executable, *start, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_a_workdir_it_may_not_write_is_one_line_naming_it(rgb_run):
    os.chmod(rgb_run, 0o555)
    try:
        result = _robustness_command(f"--workdir={rgb_run}", "--corruptions=contrast",
                                     "--severities=5")
    finally:
        os.chmod(rgb_run, 0o755)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot access {str(rgb_run / 'robustness')!r}: Permission denied")


def test_results_it_may_not_write_are_one_line_naming_them(rgb_run):
    result = _robustness_command(f"--workdir={rgb_run}", "--corruptions=contrast",
                                 "--severities=5", script=_DENIED_WRITER)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot access {str(rgb_run / 'robustness' / 'robustness.json')!r}: "
        "Permission denied")


# ------------------------------------------------------------ cifar10_corrupted, mocked
def test_tfds_source_reads_cifar10_corrupted_through_the_runs_preprocessing(tmp_path):
    """A run trained on (mocked) cifar10; with source='tfds' each cell is the run's engine
    evaluation on `cifar10_corrupted/<name>_<severity>`'s test split; a config that is not
    prepared is named, with what to build, before any cell is measured."""
    root = str(tmp_path / "tfds")
    _write_metadata(root, "cifar10", {"train": 12, "test": 12})
    for config in ("contrast_1", "gaussian_noise_1", "gaussian_noise_5"):
        _write_metadata(root, f"cifar10_corrupted/{config}", {"test": 12})
    data = default_data_config("cifar10")
    data.data_dir = root
    with _mock(root, 12):
        workdir = _train(str(tmp_path / "run"), data)
        with pytest.raises(DatasetNotPreparedError,
                           match=r"tfds 'cifar10_corrupted/contrast_5'\) is not prepared.*"
                                 r"`tfds build cifar10_corrupted/contrast_5"):
            R.run_robustness(workdir, "contrast,gaussian_noise", "1,5", source="tfds",
                             log=lambda _: None)
        assert not os.path.exists(os.path.join(workdir, "robustness"))
        with pytest.raises(ValueError, match=r"robustness: split='train' is invalid; "
                                             r"cifar10_corrupted holds CIFAR-10's test split "
                                             r"only"):
            R.run_robustness(workdir, "contrast", "1", split="train", source="tfds",
                             log=lambda _: None)
        R.run_robustness(workdir, "contrast,gaussian_noise", "1", source="tfds",
                         log=lambda _: None)
        record, path = R.run_robustness(workdir, "gaussian_noise", "5", source="tfds",
                                        log=lambda _: None)  # merged with the cells before
        run = load_trained(workdir)
        assert path.endswith("robustness/robustness_tfds.json") and record["source"] == "tfds"
        assert record["clean_top1"] == pytest.approx(evaluate_run(run)["top1"], abs=1e-9)
        for name, severity in (("contrast", 1), ("gaussian_noise", 1), ("gaussian_noise", 5)):
            corrupted = dataclasses.replace(run, config=R.corrupted_config(run.config, name,
                                                                           severity))
            assert record["cells"][name][str(severity)] == pytest.approx(
                evaluate_run(corrupted)["top1"], abs=1e-9), (name, severity)
