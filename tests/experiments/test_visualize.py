"""`experiments.visualize`: the files it writes for a trained run, and one-line errors."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from cnnjax.train import loop
from cnnjax.train.trained import load_trained
from experiments.visualize import image_titles, report_lines, write_visualizations
from tests.commands import run_commands
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"
_IN_THE_WAY = ["output_dir", "out_dir", "default"]


def test_a_trained_run_gets_its_maps_filters_and_activations(tmp_path, monkeypatch, capsys):
    helpers.install_fake_pipeline(monkeypatch)
    # one eval and one checkpoint (the maps need a trained run, not a long one)
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=6, checkpoint_every_steps=6,
                                                **{"ema.decay": 0.5}), str(tmp_path / "run"))
    run = load_trained(str(tmp_path / "run"))
    out = tmp_path / "vis"
    summary = write_visualizations(run, str(out), num_images=3, patch=4)
    assert summary["methods"] == ["saliency", "smoothgrad", "guided_backprop",
                                  "integrated_gradients", "occlusion", "grad_cam"]
    assert summary["grad_cam_layer"] == summary["activations_layer"]
    assert summary["step"] == run.step and len(summary["images"]) == 3
    assert summary["notes"] == []  # its ReLU makes guided backprop differ from saliency
    assert summary["classes"] == list(range(helpers.NUM_CLASSES))
    for row in summary["images"]:
        assert 0 <= row["predicted"] < helpers.NUM_CLASSES and 0 < row["probability"] <= 1
        assert row["explained"] == row["predicted"]
    true = write_visualizations(run, str(tmp_path / "true"), num_images=3, methods=["grad_cam"],
                                target="true")
    assert [r["explained"] for r in true["images"]] == [r["label"] for r in true["images"]]
    with pytest.raises(ValueError, match=r"visualize: target='label' is invalid"):
        write_visualizations(run, str(tmp_path / "none"), target="label")
    assert json.loads((out / "visualize.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("attributions", "filters", "activations"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    # The printed header said nothing of the weights: --ema and not read the same.
    ema = write_visualizations(load_trained(str(tmp_path / "run"), ema=True),
                               str(tmp_path / "ema"), num_images=2, methods=["saliency"])
    assert (summary["weights"], ema["weights"]) == ("trained", "ema")
    lines = report_lines(summary, str(out / "visualize.json"))
    assert lines[0].startswith(f"{summary['model']} step {run.step} ({run.how} checkpoint): ")
    assert lines[1:] == [f"{key + ':':14s}{path}" for key, path in summary["files"].items()] + [
        f"summary:      {out / 'visualize.json'}"]
    assert report_lines(ema, "v.json")[0].startswith(
        f"{ema['model']} step {ema['step']} ({ema['checkpoint']} checkpoint, EMA weights): ")
    with pytest.raises(ValueError, match=r"visualize: num_images=0 is invalid"):
        write_visualizations(run, str(tmp_path / "none"), num_images=0)
    # More than the split holds was cut silently (1,000 -> 359 on digits, a 79,000 px figure).
    with pytest.raises(ValueError, match=rf"^visualize: num_images=30 is invalid; expected at "
                                         rf"most the {helpers.NUM_EVAL} examples of the run's "
                                         r"eval split"):
        write_visualizations(run, str(tmp_path / "none"), num_images=30)
    with pytest.raises(ValueError, match=r"^visualize: num_images=65 is invalid; expected at "
                                         r"most 64 \(one figure row per image"):
        write_visualizations(run, str(tmp_path / "none"), num_images=65)
    # 64 itself is allowed (at most 64): refused only as more than the split's 27.
    with pytest.raises(ValueError, match=rf"^visualize: num_images=64 is invalid; expected at "
                                         rf"most the {helpers.NUM_EVAL} examples"):
        write_visualizations(run, str(tmp_path / "none"), num_images=64)
    _check_misclassified_images_explain_the_asked_class(run, tmp_path)
    _check_a_layer_without_grad_cam_is_the_activations(run, tmp_path, monkeypatch)
    _check_the_command_names_step_and_writes_the_pointing_game(run, tmp_path, monkeypatch,
                                                               capsys)
    with pytest.raises(ValueError, match=r"attribution: methods=\['lime'\] is invalid"):
        write_visualizations(run, str(tmp_path / "none"), methods=["lime"])
    # Without grad_cam, a bad --layer (the activations') was refused only after every method
    # had run, and as `layers=('bogus',)`.
    from cnnjax.analysis import attribution

    ran = []
    monkeypatch.setattr(attribution, "explain", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"^attribution: layer='bogus' is invalid; it is not a "
                                         r"module of the model"):
        write_visualizations(run, str(tmp_path / "none"), methods=["saliency"], layer="bogus")
    assert not ran and not (tmp_path / "none").exists()


def _check_misclassified_images_explain_the_asked_class(run, tmp_path) -> None:
    """The tiny model gets the first images right, so the predicted and true class agree there:
    its head negated misclassifies some, where --target=true must explain the label, and the
    probability shown is the predicted class's (float64 NumPy softmax of the logits, 1e-5)."""
    from cnnjax.train.trained import eval_examples

    params = dict(run.variables["params"])
    params["head"] = {k: -np.asarray(v) for k, v in params["head"].items()}
    wrong = dataclasses.replace(run, variables={**run.variables, "params": params})
    images, labels = (next(eval_examples(wrong, batch_size=8))[k][:8] for k in ("image", "label"))
    logits = np.asarray(wrong.apply(images), np.float64)
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    rows = write_visualizations(wrong, str(tmp_path / "wrong"), num_images=8,
                                methods=["saliency"], target="true")["images"]
    assert [r["label"] for r in rows] == [r["explained"] for r in rows] == labels.tolist()
    assert [r["predicted"] for r in rows] == softmax.argmax(-1).tolist()
    assert any(r["label"] != r["predicted"] for r in rows)  # else the two targets agree
    np.testing.assert_allclose([r["probability"] for r in rows], softmax.max(-1), rtol=1e-5)


def _check_a_layer_without_grad_cam_is_the_activations(run, tmp_path, monkeypatch) -> None:
    """Without grad_cam, --layer is the activations' alone (Grad-CAM's is None), drawn on eval
    image 0 as flax's own captured output of that module; the guided-backprop note is given
    only when guided_backprop ran (a model without ReLUs: count_relus stubbed to 0)."""
    from cnnjax.analysis import attribution
    from cnnjax.train.trained import eval_examples

    drawn = []
    plot = attribution.plot_activations
    monkeypatch.setattr(attribution, "plot_activations",
                        lambda activation, *a, **k: drawn.append(activation) or plot(
                            activation, *a, **k))
    monkeypatch.setattr(attribution, "count_relus", lambda *a, **k: 0)
    summary = write_visualizations(run, str(tmp_path / "layer"), num_images=3,
                                   methods=["saliency"], layer="conv")
    assert (summary["grad_cam_layer"], summary["activations_layer"]) == (None, "conv")
    assert summary["notes"] == []  # guided_backprop did not run
    images = next(eval_examples(run, batch_size=3))["image"][:3]
    _, state = run.model.apply(run.variables, images, train=False, capture_intermediates=True)
    conv = np.asarray(state["intermediates"]["conv"]["__call__"][0])
    assert len(drawn) == 1 and not np.allclose(conv[0], conv[-1])
    np.testing.assert_allclose(drawn[0], conv[0], rtol=1e-5, atol=1e-6)
    guided = write_visualizations(run, str(tmp_path / "guided"), num_images=1,
                                  methods=["guided_backprop"])
    assert guided["notes"] == [f"guided_backprop: {run.config.model} has no ReLU, so it "
                               "equals the saliency map"]


def _main(monkeypatch, capsys, *args: str) -> tuple[object, str]:
    """`experiments.visualize.main` in this process, its flags parsed from `args` (its exit
    handler and log settings left out): (the SystemExit code, None if none; stdout). Parsing
    absl's flags sets the "absl" logger's level from --verbosity (WARNING), which would hide
    later tests' INFO records from caplog: it is restored."""
    from absl import flags

    from experiments import visualize

    monkeypatch.setattr(visualize, "start_command", lambda argv: None)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    flags.FLAGS(["visualize", *args])
    try:
        visualize.main(["visualize"])
        code = None
    except SystemExit as exit_:
        code = exit_.code
    finally:
        flags.FLAGS.unparse_flags()
        absl_logger.setLevel(level)
    return code, capsys.readouterr().out


def _check_the_command_names_step_and_writes_the_pointing_game(run, tmp_path, monkeypatch,
                                                               capsys) -> None:
    """load_trained's `step=5` error (no checkpoint 5) reads as the flag the user gave
    (--step=5); the pointing game writes pointing_game.json alone, never visualize.json (its
    scores stubbed: they need a dataset with boxes)."""
    from experiments import visualize

    code, _ = _main(monkeypatch, capsys, f"--workdir={run.workdir}", "--step=5",
                    f"--output_dir={tmp_path / 'step5'}")
    assert code == (f"error: --step=5 is invalid; "
                    f"{os.path.join(run.workdir, 'checkpoints')!r} has checkpoints at steps [6].")
    scores = {"images": 2, "tolerance_px": 1.0, "grad_cam_layer": "conv",
              "accuracy": {"saliency": 0.5, "centre": 1.0}}
    monkeypatch.setattr(visualize, "pointing_game_run", lambda *a: scores)
    out = tmp_path / "pointing"
    code, stdout = _main(monkeypatch, capsys, f"--workdir={run.workdir}", "--pointing_game",
                         f"--output_dir={out}")
    assert code is None and os.listdir(out) == ["pointing_game.json"]
    assert json.loads((out / "pointing_game.json").read_text()) == {
        "workdir": run.workdir, "model": run.config.model, "step": run.step, **scores}
    assert stdout.splitlines() == [
        "Pointing game, 2 eval images, tolerance 1.0 px (Grad-CAM layer conv):",
        f"  {'saliency':22s} 0.500", f"  {'centre':22s} 1.000",
        f"Written to {out / 'pointing_game.json'}"]
@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """{case: (tmp_path, result)} of the commands refused in one line, run by one interpreter
    forking a child each (tests/commands.py): one process start, not four."""
    root = tmp_path_factory.mktemp("refused")
    commands = {}
    (root / "no_run").mkdir()
    commands["no_run"] = (root / "no_run", [f"--workdir={root / 'no_run'}"])
    (root / "unknown_method").mkdir()  # no run in it: the names are checked before loading
    commands["unknown_method"] = (root / "unknown_method", [f"--workdir={root / 'unknown_method'}",
                                                            "--methods=saliency,lime"])
    for where in _IN_THE_WAY:
        tmp = root / where
        tmp.mkdir()
        (tmp / "file").write_text("")
        if where == "default":
            (tmp / "visualize").write_text("")
        args = [] if where == "default" else [f"--{where}={tmp / 'file' / 'x'}"]
        commands[where] = (tmp, [f"--workdir={tmp}", *args])
    for case, output in (("into_run", ""), ("into_checkpoints", "checkpoints")):
        (root / case).mkdir()
        commands[case] = (root / case, [f"--workdir={root / case}",
                                        f"--output_dir={root / case / output}"])
    (root / "empty_output").mkdir()
    commands["empty_output"] = (root / "empty_output", [f"--workdir={root / 'empty_output'}",
                                                        "--output_dir="])
    (root / "layer_without_grad_cam").mkdir()
    commands["layer_without_grad_cam"] = (root / "layer_without_grad_cam", [
        f"--workdir={root / 'layer_without_grad_cam'}", "--pointing_game", "--methods=saliency",
        "--layer=c1"])
    (root / "list_layers").mkdir()  # --list_layers writes nothing: a file in the way is no matter
    (root / "list_layers" / "visualize").write_text("")
    commands["list_layers"] = (root / "list_layers", [f"--workdir={root / 'list_layers'}",
                                                      "--list_layers"])
    # JAX and the engine, imported once (experiments.visualize imports them only once running)
    results = run_commands([("experiments.visualize", *args) for _, args in commands.values()],
                           timeout=120, preimport=["cnnjax.train.trained"])
    return {case: (tmp, result)
            for (case, (tmp, _)), result in zip(commands.items(), results, strict=True)}


def test_the_command_says_what_is_wrong_in_one_line(refused):
    tmp_path, result = refused["no_run"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={str(tmp_path)!r} is invalid")


def test_the_command_reads_layer_and_the_output_folder_only_where_it_uses_them(refused):
    """`--pointing_game --methods=saliency --layer=c1` is refused before the run loads (the
    workdir holds none), and --list_layers, which writes nothing, ignores a file where
    <workdir>/visualize would go: it reaches the missing run."""
    tmp_path, result = refused["layer_without_grad_cam"]
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: --layer is invalid with --pointing_game without grad_cam in --methods (only "
        "Grad-CAM reads it there); add grad_cam to --methods or drop --layer")
    tmp_path, result = refused["list_layers"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={str(tmp_path)!r} is invalid")


def test_an_empty_output_dir_is_refused_naming_the_flag(refused):
    """`--output_dir=` was taken for the default folder (<workdir>/visualize) without a word."""
    tmp_path, result = refused["empty_output"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --output_dir='' is invalid; expected a folder path (or leave it out: "
        "<workdir>/visualize)")
    assert not (tmp_path / "visualize").exists()


@pytest.mark.slow
def test_the_command_on_a_trained_lenet(tmp_path):
    """LeNet-5 trained on digits for 60 steps, then the command as a user types it."""
    workdir = tmp_path / "lenet"
    env = {**os.environ, "PYTHONPATH": ROOT}
    train = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=experiments/configs/lenet5_digits.py",
         f"--workdir={workdir}", "--config.num_train_steps=60", "--config.eval_every_steps=60",
         "--config.progress_bar=False"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "experiments.visualize", f"--workdir={workdir}",
                             "--list_layers"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "c1", "c3", "c5", "f6", "head", "(model)"]
    result = subprocess.run([sys.executable, "-m", "experiments.visualize", f"--workdir={workdir}",
                             "--num_images=4"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad-CAM layer: c3" in result.stdout
    assert "(best checkpoint): " in result.stdout  # its trained weights, no "EMA weights"
    assert f"summary:      {workdir / 'visualize' / 'visualize.json'}" in result.stdout.splitlines()
    summary = json.loads((workdir / "visualize" / "visualize.json").read_text())
    assert summary["first_conv"] == "c1" and len(summary["images"]) == 4
    note = "guided_backprop: lenet5 has no ReLU, so it equals the saliency map"  # tanh units
    assert summary["notes"] == [note] and result.stdout.splitlines()[-1] == note
    no_average = subprocess.run([sys.executable, "-m", "experiments.visualize",
                                 f"--workdir={workdir}", "--ema"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    assert no_average.returncode == 1 and no_average.stderr.strip().splitlines()[-1] == (
        f"error: --ema is invalid; the run in {str(workdir)!r} kept no weight average (its "
        "config.ema.decay is None); drop --ema to use its trained weights.")
    bad = subprocess.run([sys.executable, "-m", "experiments.visualize", f"--workdir={workdir}",
                          "--layer=f6"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "error: attribution: layer='f6' is invalid; it outputs (1, 84), not a feature map; "
        "expected one of the feature-map layers ['c1', 'c3', 'c5'].")


def test_the_pointing_game_needs_a_tfds_dataset_with_boxes(monkeypatch):
    """Its checks read the run's config and eval images, never its weights: a run holding the
    config a trained run's config.json gives back, without training one first (loading a run
    is tests/train/test_trained.py's)."""
    import ml_collections

    from cnnjax.data.pipeline import default_data_config
    from cnnjax.train.trained import TrainedRun
    from experiments.visualize import pointing_game_run

    helpers.register_tiny_model(monkeypatch)
    config = helpers.tiny_config(num_train_steps=2)
    config.data = default_data_config("fake")  # the pipeline's own in-memory source
    config.data.update(fake_image_shape=helpers.IMAGE_SHAPE,
                       fake_num_classes=helpers.NUM_CLASSES, fake_num_train=32, fake_num_eval=8)
    # as load_trained reads a run's config back: from its config.json
    config = ml_collections.ConfigDict(json.loads(config.to_json()))
    run = TrainedRun("w", config, model=None, variables={}, step=2, how="best")
    with pytest.raises(ValueError, match=r"^visualize: pointing_game=True is invalid; dataset "
                                         r"'fake' is not read from tfds, so it has no boxes"):
        pointing_game_run(run, max_images=4)
    with pytest.raises(ValueError, match=r"^visualize: max_images=0 is invalid; expected a "
                                         r"positive integer"):
        pointing_game_run(run, max_images=0)
    # Before any eval image is read (here the 'fake' refusal would come first otherwise).
    with pytest.raises(ValueError, match=r"^visualize: tolerance=-1.0 is invalid; expected "
                                         r"pixels >= 0"):
        pointing_game_run(run, tolerance=-1.0)


def test_a_detector_is_refused_in_one_line():
    import ml_collections

    from cnnjax.train.trained import TrainedRun
    from experiments.visualize import pointing_game_run

    run = TrainedRun("workdirs/yolo", ml_collections.ConfigDict({"task": "detection"}),
                     model=None, variables={}, step=1, how="best")
    for call in (write_visualizations, pointing_game_run):
        with pytest.raises(ValueError, match=r"^visualize: workdir='workdirs/yolo' is invalid; it "
                                             r"holds a detection run, and the attribution maps "
                                             r"explain a classifier's class scores"):
            call(run, *(("out",) if call is write_visualizations else ()))


def test_the_pointing_game_refuses_eval_images_that_are_not_the_stored_ones():
    """Boxes are the stored tfds examples': a resized, relabelled or reordered eval image would
    be scored against another image's boxes."""
    from experiments.visualize import _check_stored_order

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2])
    stored = [{"image": (image * 0.5).astype(np.uint8), "label": int(label)}  # the same pixels
              for image, label in zip(images, labels, strict=True)]  # up to scale and type
    _check_stored_order(images, labels, stored)
    with pytest.raises(ValueError) as err:
        _check_stored_order(images[:, :4, :4], labels, stored)
    assert str(err.value) == (
        "visualize: pointing_game=True is invalid; the run's eval images are (4, 4, 3), resized "
        "from the stored (8, 8, 3): boxes need images at the stored size.")
    for order, given_labels, first_wrong in [([0, 2, 1], labels[[0, 2, 1]], 1),  # reordered
                                             ([0, 1, 2], np.array([0, 1, 1]), 2)]:  # relabelled
        with pytest.raises(ValueError) as err:
            _check_stored_order(images[order], given_labels, stored)
        assert str(err.value) == (
            f"visualize: pointing_game=True is invalid; eval example {first_wrong} of the "
            f"pipeline is not the stored example {first_wrong} (a class subset or reordering): "
            "boxes cannot be matched.")
    # Every channel must match: the stored copy of image 0 with channel 2 alone another image's.
    other = [dict(stored[0], image=stored[0]["image"].copy())]
    other[0]["image"][..., 2] = stored[1]["image"][..., 2]
    # A flat (constant) channel has no correlation: the same only where both are flat. A blank
    # eval image (numpy's NaN counted as a match) matched any stored image of its label.
    flat = images[:1].copy()
    flat[..., 1] = 7.0
    flat_stored = [dict(stored[0], image=(flat[0] * 0.5).astype(np.uint8))]
    blank = [dict(stored[0], image=np.full((8, 8, 3), 9, np.uint8))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in divide"
        _check_stored_order(flat, labels[:1], flat_stored)
        _check_stored_order(np.zeros_like(flat), labels[:1], blank)
        for given, stored_as in [(images[:1], other), (np.zeros_like(flat), stored[:1]),
                                 (images[:1], blank), (flat, stored[:1]),
                                 (images[:1], flat_stored)]:
            with pytest.raises(ValueError, match=r"eval example 0 of the pipeline is not the "
                                                 r"stored example 0"):
                _check_stored_order(given, labels[:1], stored_as)


def test_the_pointing_games_centre_baseline_is_the_centre_pixel(monkeypatch):
    """The centre map peaks at pixel (h // 2, w // 2) (centre (4.5, 3.5) on 8x6 images): a box
    around it alone is a hit, one in a corner a miss, so the baseline is 1/2 (hand-computed),
    with the eval images and boxes stubbed (no tfds set) and no method run."""
    import types

    import ml_collections

    from cnnjax.analysis import attribution
    from cnnjax.train import trained
    from experiments import visualize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 6, 3)).astype(np.float32)
    labels = np.array([1, 0])
    boxes = [np.array([[4.2 / 8, 3.2 / 6, 4.8 / 8, 3.8 / 6]]), np.array([[0, 0, 1 / 8, 1 / 6]])]
    monkeypatch.setattr(trained, "eval_examples",
                        lambda run, batch_size: iter([{"image": images, "label": labels}]))
    monkeypatch.setattr(visualize, "_eval_objects", lambda run, count: [
        {"image": image.astype(np.uint8), "label": int(label), "boxes": box}
        for image, label, box in zip(images, labels, boxes, strict=True)])
    monkeypatch.setattr(attribution, "explain",
                        lambda *a, **k: types.SimpleNamespace(maps={}, layer=None))
    run = trained.TrainedRun("w", ml_collections.ConfigDict({"task": "classification"}),
                             model=None, variables={}, step=1, how="best")
    assert visualize.pointing_game_run(run, tolerance=0.0) == {
        "images": 2, "tolerance_px": 0.0, "grad_cam_layer": None, "accuracy": {"centre": 0.5}}


@pytest.mark.slow
def test_the_pointing_game_on_shapes(tmp_path):
    """ResNet-20 trained briefly on `shapes`: every method scores in [0, 1] on the first 48 test
    images, and the centre baseline equals a NumPy check of the centre pixel against the stored
    boxes (so images and boxes were paired in the right order and scale)."""
    import numpy as np
    import tensorflow_datasets as tfds

    from cnnjax.data.pipeline import default_data_config
    from experiments.visualize import pointing_game_run

    config = helpers.tiny_config(model="resnet20_cifar", num_train_steps=20, global_batch_size=32,
                                 eval_every_steps=20, **{"optimizer.learning_rate": 0.1})
    config.data = default_data_config("shapes")
    config.data.data_dir = str(tmp_path / "tfds")
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    result = pointing_game_run(load_trained(str(tmp_path / "run")), patch=8, max_images=48)
    assert result["images"] == 48 and result["grad_cam_layer"] == "stage3_block3"
    assert set(result["accuracy"]) == {"saliency", "smoothgrad", "guided_backprop",
                                       "integrated_gradients", "occlusion", "grad_cam", "centre"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    tol = 15 * 32 / 224
    stored = tfds.as_numpy(tfds.builder("shapes", data_dir=config.data.data_dir)
                           .as_dataset(split="test", shuffle_files=False).take(48))
    centre = [any(y0 * 32 - tol <= 16.5 <= y1 * 32 + tol and x0 * 32 - tol <= 16.5 <= x1 * 32 + tol
                  for y0, x0, y1, x1 in e["objects"]["bbox"]) for e in stored]
    assert result["accuracy"]["centre"] == pytest.approx(np.mean(centre))


def test_inputs_are_shown_in_the_colours_the_pipeline_normalized_away():
    import ml_collections

    from cnnjax.data.pipeline import default_data_config
    from cnnjax.data.presets import get_preset
    from cnnjax.train.trained import TrainedRun
    from experiments.visualize import _normalization

    def run_of(data):
        return TrainedRun("w", ml_collections.ConfigDict({"data": data}), model=None,
                          variables={}, step=1, how="best")

    preset = get_preset("shapes")
    assert _normalization(run_of(default_data_config("shapes")), 3) == (preset.mean, preset.std)
    assert _normalization(run_of(default_data_config("fake")), 5) == ((0.5,) * 5, (0.5,) * 5)
    assert _normalization(run_of({"name": "synthetic"}), 1) == (None, None)
    # data.grey_to_rgb: the grey statistics on each of the 3 channels, not 0.5 / 0.5
    grey = get_preset("digits")
    rgb = default_data_config("digits")
    rgb.grey_to_rgb = True
    assert _normalization(run_of(rgb), 3) == (grey.mean * 3, grey.std * 3)
    # As the pipeline normalizes: a 3-channel preset's statistics on grey images fed as RGB.
    import types

    from cnnjax.data.spec import resolve
    from cnnjax.data.transforms import make_transforms

    cifar = default_data_config("cifar10")
    cifar.update(tfds_name="mnist", grey_to_rgb=True)
    for data in (rgb, cifar):
        pipeline = make_transforms(resolve(data), types.SimpleNamespace(native_shape=(28, 28, 1)))
        assert _normalization(run_of(data), 3) == (pipeline.mean, pipeline.std)
    assert pipeline.mean == get_preset("cifar10").mean


def test_an_unknown_method_is_refused_by_its_flag_before_the_checkpoint_loads(refused):
    """It was refused as `attribution: methods=...` once the checkpoint had loaded (6-7 s)."""
    _, result = refused["unknown_method"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: visualize: --methods=['saliency', 'lime'] is invalid; expected distinct names "
        "from ['saliency', 'smoothgrad', ") and last.endswith("'lime' is not one.")


@pytest.mark.parametrize("where", _IN_THE_WAY)
def test_an_output_folder_a_file_is_in_the_way_of_is_refused_before_any_work(refused, where):
    """Checked before the run is loaded (the workdir here holds no run at all); `--out_dir`, the
    flag's first name, is an alias of `--output_dir`."""
    tmp_path, result = refused[where]
    if where != "default":
        label, path = "--output_dir", str(tmp_path / "file" / "x")
    else:
        label, path = "--workdir's visualize folder", str(tmp_path / "visualize")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {label}={path!r} is invalid; expected a directory or a path to create, but a "
        "file is in the way.")


@pytest.mark.parametrize("case", ["into_run", "into_checkpoints"])
def test_an_output_folder_among_the_runs_own_files_is_refused_as_evaluate_refuses_it(refused,
                                                                                     case):
    """The maps were written beside the run's config.json or among its checkpoints, where
    evaluate --output and rcnn_svm --output_dir are refused."""
    tmp_path, result = refused[case]
    path = str(tmp_path / ("" if case == "into_run" else "checkpoints"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir={path!r} is invalid; it would write among the run's own files in "
        f"{str(tmp_path)!r} (its config, summary and checkpoints): use a subfolder or another "
        "directory.")


def test_titles_name_a_class_subsets_dataset_labels():
    """A run on data.classes=(5, 6, 7) predicts 0..2: its titles read the digits, not 0..2."""
    rows = [{"label": 0, "predicted": 2, "probability": 0.5, "explained": 0},
            {"label": 1, "predicted": 1, "probability": 0.875, "explained": 1}]
    assert image_titles(rows, [5, 6, 7], "predicted") == ["true 5, pred 7 (0.50)",
                                                          "true 6, pred 6 (0.88)"]
    assert image_titles(rows, [5, 6, 7], "true")[0] == "true 5, pred 7 (0.50), maps for 5"
    assert image_titles(rows, [0, 1, 2], "predicted")[0] == "true 0, pred 2 (0.50)"


def test_the_header_counts_images_whose_prediction_is_their_label():
    """With --target=true an image's `explained` class is its label: a misclassified image is
    still counted as wrong (hand-counted: 1 of 3 right)."""
    rows = [{"label": 0, "predicted": 1, "explained": 0, "probability": 0.5},
            {"label": 2, "predicted": 2, "explained": 2, "probability": 0.75},
            {"label": 3, "predicted": 0, "explained": 3, "probability": 0.5}]
    summary = {"model": "m", "step": 4, "checkpoint": "best", "weights": "trained",
               "grad_cam_layer": None, "images": rows, "files": {}, "notes": []}
    assert report_lines(summary, "v.json") == [
        "m step 4 (best checkpoint): 1/3 of the eval images shown are classified correctly; "
        "Grad-CAM layer: -", "summary:      v.json"]


def test_flags_the_chosen_mode_would_ignore_are_refused():
    """`--tolerance=2` without `--pointing_game` ran the attribution figure and dropped it, and
    `--num_images=10 --pointing_game` scored the whole eval split: each is one line now."""
    from experiments.visualize import conflicting_flags

    assert conflicting_flags({"tolerance"}, pointing_game=False, target="predicted") == (
        "--tolerance is invalid without --pointing_game (only the pointing game reads it); "
        "pass --pointing_game or drop --tolerance")
    assert conflicting_flags({"workdir", "max_images"}, False, "predicted").startswith(
        "--max_images is invalid without --pointing_game")
    assert conflicting_flags({"num_images"}, True, "predicted") == (
        "--num_images is invalid with --pointing_game; it scores every eval image, or the first "
        "--max_images=N")
    assert conflicting_flags({"target"}, True, "predicted") == (
        "--target='predicted' is invalid with --pointing_game; it explains each image's true "
        "class, the one whose box it scores")
    for given, pointing_game, target in [({"target"}, True, "true"),  # what it does anyway
                                         ({"tolerance", "max_images"}, True, "predicted"),
                                         ({"num_images", "target"}, False, "true"), (set(), True,
                                                                                     "predicted")]:
        assert conflicting_flags(given, pointing_game, target) is None


def test_occluder_flags_without_occlusion_among_the_methods_are_refused():
    """`--methods=saliency --patch=4` ran without an occluder and dropped --patch silently."""
    from experiments.visualize import conflicting_flags

    for name in ("patch", "stride"):
        assert conflicting_flags({name}, False, "predicted", ["saliency", "grad_cam"]) == (
            f"--{name} is invalid without occlusion in --methods (only the occluder reads it); "
            f"add occlusion to --methods or drop --{name}")
        assert conflicting_flags({name}, True, "predicted", ["saliency"]).startswith(
            f"--{name} is invalid without occlusion in --methods")
        for methods in (None, ["occlusion"], ["saliency", "occlusion"]):  # None: every method
            assert conflicting_flags({name}, False, "predicted", methods) is None
    assert conflicting_flags(set(), False, "predicted", ["saliency"]) is None


def test_a_grad_cam_layer_without_grad_cam_in_the_pointing_game_is_refused():
    """`--pointing_game --methods=saliency --layer=x` scored saliency and dropped --layer (the
    pointing game draws no activations, the figure's other reader of --layer); the figure still
    takes --layer without grad_cam, for its activations."""
    from experiments.visualize import conflicting_flags

    assert conflicting_flags({"layer"}, True, "true", ["saliency", "occlusion"]) == (
        "--layer is invalid with --pointing_game without grad_cam in --methods (only Grad-CAM "
        "reads it there); add grad_cam to --methods or drop --layer")
    for pointing_game, methods in [(True, None), (True, ["grad_cam"]), (False, ["saliency"])]:
        assert conflicting_flags({"layer"}, pointing_game, "true", methods) is None


def test_flags_list_layers_would_ignore_are_refused():
    """`--list_layers --pointing_game` (or --methods, --num_images, ...) printed the layers and
    exited, dropping the rest unannounced; --step and --ema, which choose the weights, stay."""
    from experiments.visualize import LIST_LAYERS_IGNORES, list_layers_conflict

    assert list_layers_conflict({"pointing_game", "workdir"}) == (
        "--pointing_game is invalid with --list_layers, which only prints the model's modules and "
        "exits; drop one of them")
    for name in LIST_LAYERS_IGNORES:
        assert list_layers_conflict({name}).startswith(f"--{name} is invalid with --list_layers")
    assert {"num_images", "methods", "layer", "output_dir"} <= set(LIST_LAYERS_IGNORES)
    assert list_layers_conflict({"workdir", "step", "ema"}) is None
