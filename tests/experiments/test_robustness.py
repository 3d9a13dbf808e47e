"""`experiments.robustness` on tiny trained LeNet-5 runs: the cells against the model applied to
independently corrupted eval images, resume per cell, grey runs, refusals, and the
`cifar10_corrupted` and `imagenet2012_corrupted` paths under `tfds.testing.mock_data`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from cnnjax.analysis import corruptions as C
from cnnjax.analysis import robustness as R
from cnnjax.data.pipeline import DatasetNotPreparedError, default_data_config
from cnnjax.train import loop
from cnnjax.train.config import default_config
from cnnjax.train.trained import eval_examples, evaluate_run, load_trained
from tests.data.test_presets import _mock, _write_metadata

pytestmark = pytest.mark.slow  # each module run trains four tiny runs (~15-30 s each, 2 cores)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _train(workdir: str, data, ema_decay: float | None = None) -> str:
    """LeNet-5 trained 2 steps of 4 images on `data` (keeping a weight average of decay
    `ema_decay`): a real run of the engine, in seconds."""
    config = default_config()
    config.ema.decay = ema_decay
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
    """RGB and grey runs on the in-memory `fake` set (20 eval images), and an RGB one keeping a
    weight average ("ema")."""
    root = tmp_path_factory.mktemp("runs")
    return {**{c: _train(str(root / f"c{c}"), _fake(c)) for c in (3, 1)},
            "ema": _train(str(root / "ema"), _fake(3), ema_decay=0.5)}


@pytest.fixture
def rgb_run(trained, tmp_path):
    """A private copy of the RGB run (each test writes its own robustness/)."""
    return shutil.copytree(trained[3], tmp_path / "rgb")


def _expected_top1(workdir, name: str, severity: int, seed: int = 0, ema: bool = False) -> float:
    """The run's top-1 (its weight average's with `ema`) on its eval images as the engine's eval
    pipeline yields them, brought back to 0..255 levels, corrupted, stored as uint8 and
    normalized again (fake: mean = std = 0.5)."""
    run = load_trained(str(workdir), ema=ema)
    batch = next(eval_examples(run, batch_size=64))
    pixels = np.rint((batch["image"].astype(np.float64) * 0.5 + 0.5) * 255)
    corrupted = C.quantize(C.corrupt(pixels, name, severity, seed)) / 255.0
    logits = run.apply(((corrupted - 0.5) / 0.5).astype(np.float32))
    return float(np.mean(np.asarray(np.argmax(logits, -1)) == batch["label"]))


def test_cells_are_the_models_top1_on_independently_corrupted_images(rgb_run, monkeypatch):
    """Cells are corrupted and classified 7 images at a time (a split in chunks, so a cell never
    holds a whole corrupted copy of it); each image's noise is its own, so every cell equals
    one corrupt() call on all 20 images."""
    monkeypatch.setattr(R, "_CHUNK", 7)
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


def test_ema_measures_the_weight_average_in_its_own_file(trained, tmp_path):
    """With `ema` the cells are the weight average's top-1 (robustness had no way to measure
    it), written beside the trained weights' record, which stays as it was."""
    workdir = shutil.copytree(trained["ema"], tmp_path / "ema")
    trained_record, _ = R.run_robustness(str(workdir), "gaussian_noise,contrast", "5", log=print)
    record, path = R.run_robustness(str(workdir), "gaussian_noise,contrast", "5", ema=True,
                                    log=print)
    assert path == str(workdir / "robustness" / "robustness_ema.json")
    assert record["settings"]["weights"] == "ema" and "weights" not in trained_record["settings"]
    averaged, raw = load_trained(str(workdir), ema=True), load_trained(str(workdir))
    images = next(eval_examples(raw, batch_size=64))["image"]
    assert not np.allclose(averaged.apply(images), raw.apply(images))  # other weights
    assert record["clean_top1"] == pytest.approx(evaluate_run(averaged)["top1"], abs=1e-9)
    for name in ("gaussian_noise", "contrast"):
        assert record["cells"][name]["5"] == pytest.approx(
            _expected_top1(workdir, name, 5, ema=True), abs=1e-9)
    with open(workdir / "robustness" / "robustness.json") as f:
        assert json.load(f) == trained_record
    assert "clean top-1 (EMA weights) " in R.table(record)
    assert "(EMA weights)" not in R.table(trained_record)
    with pytest.raises(ValueError, match=r"kept no weight average"):
        R.run_robustness(str(trained[3]), "contrast", "5", ema=True)


def test_cells_are_corrupted_from_the_stored_images_the_clean_top1_scores(rgb_run,
                                                                          monkeypatch):
    """Resized data (digits' upsampled scans) has pixels between levels: the clean top-1 was
    measured on them stored (uint8, truncated) while each cell corrupted the unstored floats,
    so the PIL corruptions (which round) scored above the clean top-1 at their mildest."""
    original = R.eval_pixels

    def between_levels(*args, **kwargs):
        pixels, labels, transforms = original(*args, **kwargs)
        return np.clip(pixels + 0.6, 0, 255).astype(np.float32), labels, transforms

    corrupted, classified = [], []

    def identity(images, name, severity, seed=0, first_index=0):
        corrupted.append(np.array(images))
        return np.asarray(images, np.float64)

    original_classify = R.make_classify

    def recording(*args, **kwargs):
        classify = original_classify(*args, **kwargs)
        return lambda images: classified.append(np.array(images)) or classify(images)

    monkeypatch.setattr(R, "eval_pixels", between_levels)
    monkeypatch.setattr(C, "corrupt", identity)
    monkeypatch.setattr(R, "make_classify", recording)
    record, _ = R.run_robustness(str(rgb_run), "contrast", "1", log=lambda _: None)
    stored = classified[0]  # the clean top-1's images
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate(corrupted), stored)
    assert record["cells"]["contrast"]["1"] == record["clean_top1"]


def test_a_rerun_without_baseline_keeps_the_errors_of_the_same_cells(rgb_run):
    """`--baseline` adds baseline_errors to the record; the same command without it rewrote the
    record and dropped them (they are kept while the requested cells are the same)."""
    args = (str(rgb_run), "contrast", "1")
    _, path = R.run_robustness(*args, log=lambda _: None)
    with open(path) as f:
        record = json.load(f)
    errors = {"mce": 0.5, "baseline": {"workdir": "/elsewhere"}}
    with open(path, "w") as f:
        json.dump({**record, "baseline_errors": errors}, f)
    again, _ = R.run_robustness(*args, log=lambda _: None)
    assert again["baseline_errors"] == errors
    with open(path) as f:
        assert json.load(f)["baseline_errors"] == errors
    fewer, _ = R.run_robustness(str(rgb_run), "contrast", "1", max_examples=None,
                                log=lambda _: None)
    assert fewer["baseline_errors"] == errors
    other, _ = R.run_robustness(str(rgb_run), "contrast,brightness", "1", log=lambda _: None)
    assert "baseline_errors" not in other  # other cells: those errors are not theirs
    # A reprint (every cell on file) of fewer cells than the errors were of drops them too.
    with open(path, "w") as f:
        json.dump({**other, "baseline_errors": errors}, f)
    subset, _ = R.run_robustness(*args, log=lambda _: None)
    assert subset["requested"]["corruptions"] == ["contrast"]
    assert "baseline_errors" not in subset
    with open(path) as f:
        assert "baseline_errors" not in json.load(f)


def test_a_baseline_that_cannot_be_compared_is_refused_before_any_cell_is_measured(
        rgb_run, monkeypatch):
    """A baseline lacking requested cells, or measured with other settings, was refused by
    `corruption_errors` only after every cell had been measured."""
    _, path = R.run_robustness(str(rgb_run), "contrast", "1", log=lambda _: None)
    with open(path) as f:
        baseline = json.load(f)

    def measured(*args, **kwargs):
        raise AssertionError("measured before the baseline was refused")

    monkeypatch.setattr(R, "_measure_clean", measured)
    monkeypatch.setattr(R, "_measure_cells", measured)
    with pytest.raises(ValueError, match=r"^robustness: baseline='/b' is invalid; the baseline "
                                         r"lacks cells contrast severity 2, brightness severity "
                                         r"1, brightness severity 2;"):
        R.run_robustness(str(rgb_run), "contrast,brightness", "1,2", log=lambda _: None,
                         baseline=baseline, baseline_given_as="/b")
    with pytest.raises(ValueError, match=r"^robustness: baseline='/b' is invalid; it was "
                                         r"measured with other settings \(seed: 3 here, 0 "
                                         r"there\)"):
        R.run_robustness(str(rgb_run), "contrast", "1", seed=3, log=lambda _: None,
                         baseline=baseline, baseline_given_as="/b")
    assert not os.path.exists(os.path.join(os.path.dirname(path), "robustness_seed3.json"))
    # a baseline covering the request passes the check (the record on file: nothing measured)
    record, _ = R.run_robustness(str(rgb_run), "contrast", "1", log=lambda _: None,
                                 baseline=baseline)
    assert R.corruption_errors(record, baseline)["corruption_error"] == {"contrast": 1.0}


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
    kept = path.read_bytes()
    # Other settings have their own file: the measurement above is neither replaced nor mixed in
    # (a --max_examples check used to delete it).
    other, other_path = R.run_robustness(*args, seed=3, log=lines.append)
    assert other_path == str(rgb_run / "robustness" / "robustness_seed3.json")
    assert other["settings"]["seed"] == 3 and path.read_bytes() == kept
    assert len([line for line in lines if line.startswith("[")]) == 4
    # The run's checkpoint moved on (its settings' step changed): the old file is kept aside.
    stale = json.loads(kept)
    stale["settings"]["step"] = stale["step"] = 1
    path.write_text(json.dumps(stale))
    lines = []
    R.run_robustness(*args, log=lines.append)
    assert "kept as " + str(rgb_run / "robustness" / "robustness_step1.json") in lines[0]
    assert json.loads((rgb_run / "robustness" / "robustness_step1.json").read_text()) == stale


def test_the_headline_covers_the_requested_grid_once_it_is_complete():
    """The mean averaged whatever cells the file held: an earlier command's other severities,
    or the first 50 of 85 cells of an interrupted one (the easier ones)."""
    record = {"clean_top1": 1.0, "cells": {"fog": {"1": 0.8, "5": 0.2}, "contrast": {"1": 0.6}},
              "requested": {"corruptions": ["fog", "contrast"], "severities": [1]}}
    done = R.summarize(dict(record))
    assert done["complete"] and done["mean_corruption_top1"] == pytest.approx(0.7)
    assert done["per_corruption_mean_top1"] == pytest.approx({"fog": 0.8, "contrast": 0.6})
    assert done["relative_drop"] == pytest.approx(0.3)
    partial = R.summarize({**record, "requested": {"corruptions": ["fog", "contrast"],
                                                   "severities": [1, 5]}})
    assert not partial["complete"] and partial["measured_cells"] == "3 of 4"
    assert partial["mean_corruption_top1"] is None and partial["relative_drop"] is None
    assert "incomplete: 3 of 4 requested cells measured" in R.table(
        {**partial, "severities": [1, 5]})


def test_a_corruptions_mean_waits_for_its_requested_severities():
    """Like the headline, a corruption's mean covers its requested severities once every one
    is measured: an interrupted command's record gave contrast 0.6 as its 'mean' over
    severities 1 and 5 from severity 1 alone (the easy end), and the table printed it."""
    record = {"clean_top1": 1.0, "severities": [1, 5],
              "cells": {"fog": {"1": 0.8, "5": 0.2}, "contrast": {"1": 0.6}},
              "requested": {"corruptions": ["fog", "contrast"], "severities": [1, 5]}}
    partial = R.summarize(record)
    assert partial["per_corruption_mean_top1"] == pytest.approx({"fog": 0.5})
    rows = {line.split()[0]: line.split()[1:] for line in R.table(partial).splitlines()}
    assert rows["fog"] == ["0.8000", "0.2000", "0.5000"]
    assert rows["contrast"] == ["0.6000", "-", "-"]  # mean "-" until severity 5 is measured
    # cells outside the requested grid (an earlier command's) are still not averaged
    record["cells"]["contrast"]["3"] = 0.1
    record["cells"]["contrast"]["5"] = 0.4
    done = R.summarize(record)
    assert done["complete"] and done["per_corruption_mean_top1"] == pytest.approx(
        {"fog": 0.5, "contrast": 0.5})
    # nor shown: the table printed an earlier command's cells beside a mean that left them out
    # (review BG); the record keeps them
    again = R.summarize({**record, "severities": [1, 3, 5],
                         "requested": {"corruptions": ["contrast"], "severities": [5]}})
    header, contrast, *rest = R.table(again).splitlines()
    assert header.split() == ["corruption", "s5", "mean"]
    assert contrast.split() == ["contrast", "0.4000", "0.4000"]
    assert not any(row.startswith("fog") for row in rest)


def test_the_table_does_not_print_an_undefined_drop_as_zero():
    """With a clean top-1 of 0 the relative drop (clean - mean) / clean is undefined (None in
    the record), and the table printed it as 'relative drop 0.0000': no drop at all."""
    record = R.summarize({"clean_top1": 0.0, "severities": [1], "cells": {"fog": {"1": 0.0}},
                          "requested": {"corruptions": ["fog"], "severities": [1]}})
    assert record["relative_drop"] is None
    last = R.table(record).splitlines()[-1]
    assert "relative drop n/a (clean top-1 is 0)" in last and "0.0000;" not in last.split(";")[-1]


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
    """cifar10_corrupted calls glass_blur `frosted_glass_blur` and elastic_transform `elastic`;
    imagenet2012_corrupted keeps the authors' names, and holds a validation split only."""
    config = default_config()
    config.data = default_data_config("cifar10")
    for name, expected in (("glass_blur", "frosted_glass_blur_3"), ("elastic_transform",
                                                                    "elastic_3"),
                           ("contrast", "contrast_3")):
        got = R.corrupted_config(config, name, 3).data
        assert got.tfds_name == f"cifar10_corrupted/{expected}" and got.eval_split == "test"
    config.data.train_examples_per_class = 1  # a low-data run: its limit must not thin the cells
    assert R.corrupted_config(config, "contrast", 1).data.train_examples_per_class is None
    config.data = default_data_config("imagenet2012")
    for name in ("glass_blur", "elastic_transform", "contrast"):
        got = R.corrupted_config(config, name, 4).data
        assert got.tfds_name == f"imagenet2012_corrupted/{name}_4"
        assert got.eval_split == got.train_split == "validation"
    config.data = default_data_config("cifar100")
    with pytest.raises(ValueError, match=r"robustness: source='tfds' is invalid; tfds has "
                                         r"corrupted copies of 'cifar10' .* and 'imagenet2012' "
                                         r".* only, and this run was trained on 'cifar100'"):
        R.corrupted_config(config, "contrast", 1)


@pytest.mark.parametrize("tfds_name", ["cifar10_corrupted", "imagenet2012_corrupted"])
def test_every_corruption_maps_to_a_config_of_the_installed_tfds_builder(tfds_name):
    """The config names cnnjax asks for are the installed tfds builder's own, for every
    corruption cnnjax computes at every severity (so none is refused for lack of a config);
    frost is the one config of each set cnnjax does not compute."""
    import tensorflow_datasets as tfds

    configs = {c.name for c in tfds.builder_cls(tfds_name).BUILDER_CONFIGS}
    wanted = {f"{C.tfds_config_name(n, tfds_name)}_{s}" for n in C.CORRUPTIONS
              for s in range(1, 6)}
    assert wanted <= configs and len(wanted) == 90
    assert configs - wanted == {f"frost_{s}" for s in range(1, 6)}
    assert R.parse_corruptions("all", 3, on_the_fly=False, tfds_dataset=tfds_name) == (
        list(C.CORRUPTIONS), {})


def test_a_corruption_a_tfds_set_lacks_is_skipped_by_all_and_refused_by_name(monkeypatch):
    """Were a tfds set to hold no configs of a corruption cnnjax computes, `all` skips it
    (saying why) and naming it is refused, naming the set and what it holds."""
    held = {n: n for n in C.CORRUPTIONS if n != "snow"}
    monkeypatch.setitem(C.TFDS_CONFIG_NAMES, "imagenet2012_corrupted", held)
    names, skipped = R.parse_corruptions("all", 3, on_the_fly=False,
                                         tfds_dataset="imagenet2012_corrupted")
    assert "snow" not in names and len(names) == len(C.CORRUPTIONS) - 1
    assert skipped == {"snow": "tfds's imagenet2012_corrupted has no configs of it"}
    with pytest.raises(ValueError, match=r"corruptions: name='snow' is invalid; tfds's "
                                         r"imagenet2012_corrupted has no snow configs; it holds "
                                         r"\['gaussian_noise'"):
        R.parse_corruptions("contrast,snow", 3, on_the_fly=False,
                            tfds_dataset="imagenet2012_corrupted")
    with pytest.raises(ValueError, match=r"corruptions: name='frost' is invalid; cnnjax does "
                                         r"not compute frost .*; expected one of "
                                         r"\['gaussian_noise'"):
        C.tfds_config_name("frost", "imagenet2012_corrupted")
    with pytest.raises(ValueError, match=r"corruptions: tfds_dataset='mnist_corrupted' is "
                                         r"invalid; expected one of \['cifar10_corrupted', "
                                         r"'imagenet2012_corrupted'\]"):
        C.tfds_config_name("contrast", "mnist_corrupted")


@pytest.mark.parametrize("kwargs, message", [
    (dict(severities="0,6"), r"robustness: severities='0,6' is invalid; expected integers "
                             r"from 1 to 5, e.g. '1,3,5'\."),
    (dict(severities="x"), r"severities='x' is invalid"),
    (dict(corruptions="frost"), r"corruptions: name='frost' is invalid; cnnjax does not "
                              r"compute frost .*; expected one of \['gaussian_noise'"),
    (dict(corruptions=" , "), r"robustness: corruptions=' , ' is invalid; expected 'all' or "
                              r"some of \['gaussian_noise'"),
    (dict(max_examples=0), r"robustness: max_examples=0 is invalid"),
    (dict(seed=-2), r"robustness: seed=-2 is invalid; expected an integer >= 0\."),
    (dict(source="tfds"), r"robustness: source='tfds' is invalid; tfds has corrupted copies "
                          r"of 'cifar10' \(cifar10_corrupted: CIFAR-10's test split\) and "
                          r"'imagenet2012' \(imagenet2012_corrupted: ImageNet's validation "
                          r"split\) only, and this run was trained on 'fake'; use "
                          r"source='on_the_fly'\.$"),
    (dict(source="tfsd"), r"robustness: source='tfsd' is invalid; expected one of "
                          r"\['on_the_fly', 'tfds'\]"),
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
        def load(workdir, step=None, task=task, **kwargs):
            run = load_trained(workdir, step, **kwargs)
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
    ok = subprocess.run([*command, "--corruptions=contrast", "--severities=5",
                         "--eval_batch_size=16"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "contrast" in ok.stdout and "clean top-1" in ok.stdout and "Written to" in ok.stdout
    # The plot is named as the JSON without its suffix (it read robustness*.json.png).
    written = ok.stdout.splitlines()[-1].removeprefix("Written to ").split(" and ")
    assert len(written) == 2 and written[0].endswith(".json") and all(map(os.path.isfile, written))
    assert written[1] == written[0][:-len(".json")] + ".png"
    assert os.path.dirname(written[0]) == os.path.join(trained[1], "robustness")
    # What `all` left out on a grey run is printed, not only recorded.
    every = subprocess.run([*command, "--corruptions=all", "--severities=1", "--max_examples=4"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert every.returncode == 0, every.stderr[-2000:]
    assert [line for line in every.stdout.splitlines() if line.startswith("skipped ")] == [
        "skipped saturate: defined for RGB images only; this run's images have 1 channel"]
    # A run against itself as the baseline (its record of the same flags): every CE is 1.
    same = subprocess.run([*command, "--corruptions=contrast", "--severities=5",
                           f"--baseline={trained[1]}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "mCE 1.0000, relative mCE " in same.stdout and trained[1] in same.stdout
    with open(os.path.join(trained[1], "robustness", "robustness.json")) as f:
        record = json.load(f)
    assert record["baseline_errors"]["corruption_error"] == {"contrast": 1.0}
    missing = subprocess.run([*command, "--baseline=/nonexistent/run"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == (
        "error: robustness: baseline='/nonexistent/run' is invalid; it does not exist (expected "
        "another run's workdir or its robustness JSON)")
    # A baseline without the record of these flags: refused before the measurement (it was
    # refused after all the cells), so the run gets no robustness_seed3.json.
    empty = os.path.join(os.path.dirname(trained[1]), "no_robustness_run")
    os.makedirs(empty, exist_ok=True)
    late = subprocess.run([*command, "--corruptions=contrast", "--severities=5", "--seed=3",
                           f"--baseline={empty}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert late.returncode == 1 and late.stderr.strip().splitlines()[-1] == (
        f"error: robustness: baseline={empty!r} is invalid; it has no "
        "robustness/robustness_seed3.json: run experiments.robustness on the baseline run "
        "first, with the same flags.")
    assert not os.path.exists(os.path.join(trained[1], "robustness", "robustness_seed3.json"))
    bad = subprocess.run([*command, "--severities=7", "--batch_size=16"],  # the alias
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: robustness: severities='7' is invalid; expected integers from 1 to 5, e.g. "
        "'1,3,5'.")
    # A split the run's dataset lacks: named as the split the user passed, with the dataset's
    # splits, not tfds's error at the first read (nor data.eval_split, a field never set).
    split = subprocess.run([*command, "--corruptions=contrast", "--severities=1",
                            "--split=validation"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert split.returncode == 1 and "Traceback" not in split.stderr
    assert split.stderr.strip().splitlines()[-1] == (
        "error: robustness: split='validation' is invalid; 'fake' has splits ['train', 'test'].")
    no_average = subprocess.run([*command, "--corruptions=contrast", "--ema"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
    assert no_average.returncode == 1 and no_average.stderr.strip().splitlines()[-1] == (
        f"error: --ema is invalid; the run in {trained[1]!r} kept no weight average (its "
        "config.ema.decay is None); drop --ema to use its trained weights.")




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
                                 r"`tfds build cifar10_corrupted/contrast_5.* For source='tfds', "
                                 r"prepare each `cifar10_corrupted/<corruption>_<severity>` "
                                 r"config you evaluate \(`tfds build cifar10_corrupted` "
                                 r"prepares all 95\), or use source='on_the_fly'\.$"):
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
        assert record["tfds_dataset"] == "cifar10_corrupted"
        assert record["parameters"]["contrast"] == list(C.PARAMETERS["contrast"])
        assert record["clean_top1"] == pytest.approx(evaluate_run(run)["top1"], abs=1e-9)
        for name, severity in (("contrast", 1), ("gaussian_noise", 1), ("gaussian_noise", 5)):
            corrupted = dataclasses.replace(run, config=R.corrupted_config(run.config, name,
                                                                           severity))
            assert record["cells"][name][str(severity)] == pytest.approx(
                evaluate_run(corrupted)["top1"], abs=1e-9), (name, severity)


# ------------------------------------------------------- imagenet2012_corrupted, mocked
def _imagenet_images(full_name: str, split: str) -> np.ndarray | list[np.ndarray]:
    """Seeded uint8 images of the mocked ImageNet sets: 6 per split, of varying sizes for
    imagenet2012 (as its JPEGs are), 224x224 for an imagenet2012_corrupted config (`full_name`
    is tfds's `<name>/<config>/<version>`)."""
    rng = np.random.default_rng(zlib.crc32(f"{full_name}:{split}".encode()))
    if full_name.startswith("imagenet2012_corrupted/"):
        return rng.integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((60, 80), (80, 60), (64, 64), (50, 90), (90, 50), (70, 70))]


def _imagenet_as_dataset(labels: dict[str, np.ndarray]):
    """tfds's `as_dataset` for the mocked ImageNet sets: `_imagenet_images`, PNG-encoded as
    stored (decoded unless the reader skips decoding), labels from `labels[full_name]` (filled
    in by the test) or 0..5."""
    import tensorflow as tf

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del read_config, shuffle_files
        name = self.info.full_name
        images = _imagenet_images(name, str(split))
        encoded = [tf.io.encode_png(image).numpy() for image in images]
        ds = tf.data.Dataset.from_tensor_slices(
            {"image": encoded, "label": labels.get(name, np.arange(len(images)))})
        if not decoders:
            ds = ds.map(lambda ex: {"image": tf.io.decode_png(ex["image"], channels=3),
                                    "label": ex["label"]})
        return ds

    return as_dataset


def test_tfds_source_reads_imagenet2012_corrupted_as_stored(tmp_path, monkeypatch):
    """A run trained on (mocked) imagenet2012 at 224x224; with source='tfds' each cell reads
    `imagenet2012_corrupted/<name>_<severity>`'s validation split. Its images are stored as
    ImageNet-C's 224x224 centre crops, so the model gets exactly the stored pixels (the run's
    resize-and-crop would zoom into them again), normalized with ImageNet's statistics, and
    each cell is the top-1 of those against the stored labels; the clean top-1 is the run's own
    evaluation of imagenet2012's validation split. Settings it cannot measure are refused by
    name before anything is written, as is a config that is not prepared (naming how to
    prepare imagenet2012_corrupted)."""
    from cnnjax.data.presets import IMAGENET_MEAN, IMAGENET_STD

    root = str(tmp_path / "tfds")
    _write_metadata(root, "imagenet2012", {"train": 6, "validation": 6})
    configs = {"contrast_1": ("contrast", 1), "glass_blur_5": ("glass_blur", 5)}
    for config in configs:
        _write_metadata(root, f"imagenet2012_corrupted/{config}", {"validation": 6})
    data = default_data_config("imagenet2012")
    data.data_dir = root
    read = {}  # tfds name -> (pixels, labels) each eval_pixel_batches call yields
    real_batches = R.eval_pixel_batches

    def recorded(config, max_examples, as_stored=False):
        batches, transforms = real_batches(config, max_examples, as_stored, chunk=4)
        batches = list(batches)  # 6 images in chunks of 4: a cell is counted over both
        assert [len(labels) for _, labels in batches] == [4, 2]
        read[config.data.tfds_name] = tuple(np.concatenate(v) for v in zip(*batches, strict=True))
        return iter(batches), transforms

    monkeypatch.setattr(R, "eval_pixel_batches", recorded)
    classified_clean = []  # the clean pixels the clean top-1 is measured on
    real_measure_clean = R._measure_clean

    def measure_clean(record, classify, clean, *args):
        classified_clean.append(clean)
        return real_measure_clean(record, classify, clean, *args)

    monkeypatch.setattr(R, "_measure_clean", measure_clean)
    labels = {}
    with _mock(root, 6, as_dataset_fn=_imagenet_as_dataset(labels)):
        workdir = _train(str(tmp_path / "run"), data)
        run = load_trained(workdir)
        assert run.config.data.name == "imagenet2012"
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        expected = {}
        for config, (name, severity) in configs.items():
            # Labels: the model's class for the stored pixels on examples 0-2, another on 3-5,
            # so a cell read as stored has top-1 exactly 0.5.
            full_name = f"imagenet2012_corrupted/{config}/3.1.0"
            stored = _imagenet_images(full_name, "validation")
            normalized = ((stored / 255.0 - mean) / std).astype(np.float32)
            predicted = np.argmax(np.asarray(run.apply(normalized)), -1)
            labels[full_name] = np.where(np.arange(6) < 3, predicted, (predicted + 1) % 1000)
            expected[name, severity] = stored, labels[full_name]
        args = (workdir, "contrast,glass_blur")
        with pytest.raises(DatasetNotPreparedError,
                           match=r"tfds 'imagenet2012_corrupted/contrast_5'\) is not prepared.*"
                                 r"For source='tfds', prepare each `imagenet2012_corrupted/"
                                 r"<corruption>_<severity>` config you evaluate \(`tfds build "
                                 r"imagenet2012_corrupted` prepares all 95, from ImageNet's "
                                 r"validation archive, which tfds needs downloaded by hand\), "
                                 r"or use source='on_the_fly'\.$"):
            R.run_robustness(*args, "1,5", source="tfds", log=lambda _: None)
        with pytest.raises(ValueError, match=r"robustness: split='train' is invalid; "
                                             r"imagenet2012_corrupted holds ImageNet's "
                                             r"validation split only, .*evaluate "
                                             r"split='validation'"):
            R.run_robustness(*args, "1", split="train", source="tfds", log=lambda _: None)
        assert not os.path.exists(os.path.join(workdir, "robustness"))

        lines = []
        read.clear()
        R.run_robustness(workdir, "contrast", "1", source="tfds", log=lines.append)
        record, path = R.run_robustness(workdir, "glass_blur", "5", source="tfds",
                                        log=lines.append)  # merged with the cell before
        clean_top1 = evaluate_run(run)["top1"]
    assert path.endswith("robustness/robustness_tfds.json")
    assert record["tfds_dataset"] == "imagenet2012_corrupted" and record["source"] == "tfds"
    with open(path) as f:
        assert json.load(f)["tfds_dataset"] == "imagenet2012_corrupted"
    assert "corrupted cells from tfds's imagenet2012_corrupted" in lines[0]
    assert record["split"] == "validation" and record["num_examples"] == 6
    assert record["clean_top1"] == pytest.approx(clean_top1, abs=1e-9)
    # ... on the evaluation's own (resized, non-integer) pixels: truncated to uint8 as an
    # on-the-fly cell's source is, they were half a level darker on average.
    clean_pixels = read[None][0]  # imagenet2012 itself: its config names no tfds_name
    assert np.mean(clean_pixels != np.round(clean_pixels)) > 0.5
    np.testing.assert_array_equal(classified_clean[-1], clean_pixels)
    assert record["settings"]["clean"] == "the run's evaluation"
    # ImageNet-C's table: the one imagenet2012_corrupted's images were made with.
    assert record["parameters"]["contrast"] == list(C.IMAGENET_PARAMETERS["contrast"])
    assert record["cells"] == {"contrast": {"1": 0.5}, "glass_blur": {"5": 0.5}}
    for config, (name, severity) in configs.items():
        pixels, cell_labels = read[f"imagenet2012_corrupted/{config}"]
        stored, stored_labels = expected[name, severity]
        np.testing.assert_allclose(pixels, stored, atol=1e-4)  # as stored, not cropped again
        np.testing.assert_array_equal(cell_labels, stored_labels)


def _loaded_as(dataset: str):
    """`load_trained`, with the loaded run's config naming `dataset` as its data."""

    def load(workdir, step=None, **kwargs):
        run = load_trained(workdir, step, **kwargs)
        config = run.config.copy_and_resolve_references()
        config.data.name = dataset
        return dataclasses.replace(run, config=config)

    return load


def test_an_imagenet2012_run_not_at_224_is_refused_for_tfds(trained, monkeypatch):
    """imagenet2012_corrupted's images are 224x224 crops read as stored: a run on imagenet2012
    whose model sees 32x32 images is refused by name (on the fly it is measured)."""
    import cnnjax.train.trained as trained_lib

    workdir = trained[3]
    real_pipeline = R.eval_pipeline

    def fake_data(config):  # the run's own (fake) data, read as if it were ImageNet's
        config = config.copy_and_resolve_references()
        config.data.name = "fake"
        return real_pipeline(config)

    monkeypatch.setattr(trained_lib, "load_trained", _loaded_as("imagenet2012"))
    monkeypatch.setattr(R, "eval_pipeline", fake_data)
    with pytest.raises(ValueError, match=r"robustness: split='test' is invalid; "
                                         r"imagenet2012_corrupted holds ImageNet's validation "
                                         r"split only"):
        R.run_robustness(workdir, "contrast", "1", source="tfds", log=lambda _: None)
    with pytest.raises(ValueError, match=r"robustness: workdir=.* is invalid; its model sees "
                                         r"32x32 images, and imagenet2012_corrupted stores "
                                         r"224x224 centre crops, read as stored; use "
                                         r"source='on_the_fly'\.$"):
        R.run_robustness(workdir, "contrast", "1", split="validation", source="tfds",
                         log=lambda _: None)


def test_a_cifar10_run_at_224_reads_cifar10_corrupted_with_cifar_10_cs_table(rgb_run,
                                                                              monkeypatch):
    """cifar10_corrupted's images were made with CIFAR-10-C's table, whatever size the run
    resizes them to: a run on cifar10 whose model sees 224x224 images records CIFAR-10-C's
    parameters (contrast 0.75 ... 0.15), not ImageNet-C's for its size. The run's own data (fake)
    is read as if it were cifar10 and its corrupted set, resized to 224; the record is checked
    before anything is classified."""
    import cnnjax.train.trained as trained_lib

    real_pipeline = R.eval_pipeline

    def fake_data_at_224(config):
        config = config.copy_and_resolve_references()
        config.data.name, config.data.image_size = "fake", 224
        config.data.tfds_name = None  # a cifar10_corrupted config's, read as the fake set too
        return real_pipeline(config)

    def stop(record, *args):
        raise _StopError(record)

    monkeypatch.setattr(trained_lib, "load_trained", _loaded_as("cifar10"))
    monkeypatch.setattr(R, "eval_pipeline", fake_data_at_224)
    monkeypatch.setattr(R, "_measure_clean", stop)
    with pytest.raises(_StopError) as stopped:
        R.run_robustness(str(rgb_run), "contrast", "1", source="tfds", log=lambda _: None)
    record = stopped.value.args[0]
    assert record["tfds_dataset"] == "cifar10_corrupted"
    assert record["parameters"]["contrast"] == [0.75, 0.5, 0.4, 0.3, 0.15]
    assert C.PARAMETERS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)


def test_a_reprint_of_fewer_cells_writes_the_headline_it_prints(rgb_run, monkeypatch):
    """A finished grid reprinted for a subset (--corruptions=contrast after contrast,brightness)
    printed the subset's mean and 'Written to <path>', while the file kept the whole grid's
    headline and request: the JSON now holds what was printed (as after a measuring command
    asking for fewer), with its plot."""
    record, path = R.run_robustness(str(rgb_run), "contrast,brightness", "2,4")

    def no_model(*_):
        raise AssertionError("a finished record is reprinted, not measured again")
    monkeypatch.setattr(R, "make_classify", no_model)
    subset, same_path = R.run_robustness(str(rgb_run), "contrast", "4", log=lambda _: None)
    assert same_path == path
    assert subset["mean_corruption_top1"] == pytest.approx(record["cells"]["contrast"]["4"])
    with open(path) as f:
        on_file = json.load(f)
    assert on_file == subset
    assert on_file["requested"] == {"corruptions": ["contrast"], "severities": [4]}
    assert on_file["cells"] == record["cells"]  # every measured cell is kept
    with open(subset["plot"], "rb") as f:
        assert f.read(8) == PNG
