"""Show what a trained classifier looks at: attribution maps, first-layer filters, activations.

    python -m experiments.visualize --workdir=workdirs/lenet5_digits [--num_images=6]
        [--layer=<module path>] [--methods=saliency,smoothgrad,integrated_gradients,...]
        [--step=N] [--ema]
    python -m experiments.visualize --workdir=... --list_layers

Loads the run's best checkpoint (as `experiments.evaluate` does) and its first --num_images
eval images, preprocessed as its evaluation sees them, and writes to --output_dir (default
<workdir>/visualize/):
- `attributions.png`: per image, the input titled with its true and predicted class, then each
  method's map for the predicted class (--target=true: for the true one): gradient saliency
  (Simonyan et al. 2014), SmoothGrad (Smilkov et al. 2017), guided backpropagation (Springenberg
  et al. 2015), integrated gradients (Sundararajan et al. 2017), occlusion sensitivity (Zeiler &
  Fergus 2014) and Grad-CAM (Selvaraju et al. 2017) at --layer (default: the last feature map
  larger than 1x1);
- `filters.png`: the first convolution's kernels (Krizhevsky et al. 2012, Fig. 3);
- `activations.png`: the Grad-CAM layer's channels on the first image;
- `visualize.json`: the layer, checkpoint, `target`, each image's label, prediction, its
  probability and the class its maps explain (`explained`) as model classes, `classes` (the
  dataset label of each model class: `data.classes` of a run on a class subset, which the
  titles show), and `notes`: e.g. that guided
  backpropagation equals saliency on a model without ReLUs (LeNet-5's tanh), also printed.
--list_layers prints every module with its output shape (the names --layer takes) and exits
(the flags it would not read are refused with it; --step and --ema choose the weights).
--pointing_game instead scores each method on the whole eval split of a dataset with object boxes
(tfds `objects/bbox`, e.g. `shapes`): the share of images whose map for the true class peaks
inside that class's box (Zhang et al. 2018), beside the image centre's, in pointing_game.json.
Its own flags, --tolerance and --max_images, are refused without it, and --num_images and
--target=predicted with it (it explains the true class of every eval image, or of the first
--max_images); --layer is refused with it when --methods lacks grad_cam (the figure reads
--layer for its activations too).
See `cnnjax.analysis.attribution` for the methods.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.utils.cli import one_line_errors, parse_flags, start_command  # noqa: E402
from cnnjax.utils.files import check_output_dir, check_outside_run  # noqa: E402
from cnnjax.utils.validation import invalid  # noqa: E402

SUMMARY_FILE = "visualize.json"  # what was explained and the files written, in the output folder

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_EMA = flags.DEFINE_bool("ema", False, "Use the run's weight average instead of its weights.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 6, "Eval images to explain (at most 64, and at "
                                   "most the eval split's size).")
_LAYER = flags.DEFINE_string("layer", None, "Grad-CAM (and activations) layer: a module path "
                             "from --list_layers (default: the last feature-map module).")
_METHODS = flags.DEFINE_list("methods", None, "Attribution methods, in any order (default: all "
                             "of cnnjax.analysis.attribution.METHODS).")
_PATCH = flags.DEFINE_integer("patch", None, "Occluder side in pixels (default: a quarter of "
                              "the image's smaller side).")
_STRIDE = flags.DEFINE_integer("stride", None, "Occluder step (default: half the patch).")
_TARGET = flags.DEFINE_enum("target", "predicted", ["predicted", "true"],
                            "The class the maps explain: the prediction or the true label.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where to write (default <workdir>/visualize).")
flags.DEFINE_alias("out_dir", "output_dir")  # its first name; --output_dir as rcnn_svm's
_LIST_LAYERS = flags.DEFINE_bool("list_layers", False, "Print the model's modules and exit.")
_POINTING = flags.DEFINE_bool("pointing_game", False, "Instead: score each method by the "
                              "pointing game on the eval split (a tfds dataset with "
                              "objects/bbox, e.g. shapes); writes pointing_game.json.")
_TOLERANCE = flags.DEFINE_float("tolerance", None, "Pointing game: pixels a hit may lie outside "
                                "the box (default 15 px at 224, scaled to the image).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Pointing game: the first N eval images "
                                   "(default: all).")
flags.mark_flags_as_required(["workdir"])


def _check_classifier(run: Any) -> None:
    """Refuses a run whose task is not classification (the maps explain one class score)."""
    from cnnjax.train import config as config_lib

    task = config_lib.config_task(run.config)
    if task != "classification":
        raise invalid("visualize", "workdir", run.workdir, f"it holds a {task} run, and the "
                      "attribution maps explain a classifier's class scores")


def _normalization(run: Any, channels: int) -> tuple[Any, Any]:
    """`(mean, std)` the run's pipeline normalized its images by, to show them in their own
    colours; `(None, None)` where unknown (then each image is contrast-stretched)."""
    from cnnjax.data.spec import resolve

    try:
        spec = resolve(run.config.data)
    except (ValueError, KeyError, AttributeError):  # not a cnnjax dataset config
        return None, None
    mean, std = spec.preset.mean, spec.preset.std
    if spec.grey_to_rgb and len(mean) == 1:  # grey images fed as RGB: the statistics repeated
        mean, std = mean * 3, std * 3
    if len(mean) != channels:  # the pipeline then centres with 0.5 / 0.5
        return (0.5,) * channels, (0.5,) * channels
    return mean, std


#: The most images one command explains: attributions.png has a row of maps per image.
MAX_IMAGES = 64


def write_visualizations(run: Any, out_dir: str, num_images: int = 6,
                         methods: Sequence[str] | None = None,
                         layer: str | None = None, patch: int | None = None,
                         stride: int | None = None, target: str = "predicted") -> dict:
    """Writes the module docstring's files for a `load_trained` run into `out_dir`; returns
    the summary written to visualize.json. `methods` None means all of `attribution.METHODS`.
    The maps explain each image's `target` class:
    "predicted" or "true" (its label; e.g. what a misclassified image lacked). Every input is
    checked before anything is written."""
    from cnnjax.analysis import attribution
    from cnnjax.train.trained import dataset_labels, eval_examples
    from cnnjax.utils.files import write_json
    from cnnjax.utils.validation import check_choice, check_positive_int

    _check_classifier(run)
    count = check_positive_int("visualize", "num_images", num_images)
    if count > MAX_IMAGES:  # attributions.png has a row per image (1,000: 440 x 79,000 px)
        raise invalid("visualize", "num_images", num_images,
                      f"expected at most {MAX_IMAGES} (one figure row per image; run several "
                      "commands with --output_dir for more)")
    check_choice("visualize", "target", target, ("predicted", "true"))
    batch = next(eval_examples(run, batch_size=count))
    images, labels = batch["image"][:count], batch["label"][:count]
    if len(images) < count:  # was cut silently to the split's size
        raise invalid("visualize", "num_images", num_images,
                      f"expected at most the {len(images)} examples of the run's eval split")
    methods = attribution.METHODS if methods is None else methods
    if layer is not None and "grad_cam" not in methods:  # explain checks it for Grad-CAM
        attribution.check_layer(run.model, run.variables, images.shape[1:], layer)
    result = attribution.explain(run.model, run.variables, images,
                                 labels if target == "true" else None, methods=methods,
                                 # without Grad-CAM, --layer is the activations' alone
                                 layer=layer if "grad_cam" in methods else None,
                                 patch=patch, stride=stride)
    shown = result.layer or layer or attribution.last_conv_layer(run.model, run.variables,
                                                                 images.shape[1:])
    filter_path, kernel = attribution.first_layer_filters(run.model, run.variables,
                                                          images.shape[1:])
    activation = attribution.activations(run.model, run.variables, images[:1], (shown,))
    os.makedirs(out_dir, exist_ok=True)
    rows = [{"label": int(y), "predicted": int(p.argmax()), "probability": float(p.max()),
             "explained": int(t)}
            for y, t, p in zip(labels, result.targets, result.probabilities, strict=True)]
    classes = dataset_labels(run, result.probabilities.shape[-1])
    titles = image_titles(rows, classes, target)
    name = f"{run.config.model} step {run.step}"
    files = {
        "attributions": attribution.plot_attributions(
            images, result.maps, os.path.join(out_dir, "attributions.png"), titles,
            **dict(zip(("mean", "std"), _normalization(run, images.shape[-1]), strict=True))),
        "filters": attribution.plot_filters(
            kernel, os.path.join(out_dir, "filters.png"),
            f"{name}: {filter_path} ({kernel.shape[-1]} filters {kernel.shape[0]}x"
            f"{kernel.shape[1]})"),
        "activations": attribution.plot_activations(
            activation[shown][0], os.path.join(out_dir, "activations.png"),
            f"{name}: {shown} on eval image 0"),
    }
    notes = []
    if "guided_backprop" in result.maps and not attribution.count_relus(run.model, run.variables,
                                                                        images[:1]):
        notes.append(f"guided_backprop: {run.config.model} has no ReLU, so it equals the "
                     "saliency map")  # its plain gradient: said, not shown as a second method
    summary = {"workdir": run.workdir, "model": run.config.model, "step": run.step,
               "checkpoint": run.how, "weights": "ema" if run.ema else "trained",
               "target": target, "grad_cam_layer": result.layer, "activations_layer": shown,
               "first_conv": filter_path, "methods": list(result.maps), "classes": classes,
               "images": rows,
               "files": files, "notes": notes}
    write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    return summary


def report_lines(summary: dict, json_path: str) -> list[str]:
    """What the command prints of `write_visualizations`' summary: the run, its checkpoint and
    which weights were explained (the weight average said, so --ema is never mistaken for the
    trained weights), how many shown images are classified correctly, the Grad-CAM layer, every
    file written (`json_path` too) and the notes."""
    rows = summary["images"]
    correct = sum(r["label"] == r["predicted"] for r in rows)
    weights = ", EMA weights" if summary["weights"] == "ema" else ""
    return [f"{summary['model']} step {summary['step']} ({summary['checkpoint']} checkpoint"
            f"{weights}): {correct}/{len(rows)} of the eval images shown are classified "
            f"correctly; Grad-CAM layer: {summary['grad_cam_layer'] or '-'}",
            *(f"{key + ':':14s}{path}" for key, path in summary["files"].items()),
            f"{'summary:':14s}{json_path}", *summary["notes"]]


def image_titles(rows: Sequence[dict], classes: Sequence[int], target: str) -> list[str]:
    """attributions.png's titles: true and predicted class as dataset labels (`classes[i]` for
    model class i; `rows` keep the model's indices), the probability, and the explained class
    when it is the true one."""
    return [f"true {classes[r['label']]}, pred {classes[r['predicted']]} ({r['probability']:.2f})"
            + (f", maps for {classes[r['explained']]}" if target == "true" else "")
            for r in rows]


def _eval_objects(run: Any, count: int) -> list[dict]:
    """The first `count` examples of the run's eval split as stored by tfds (stored order, as
    `eval_examples` yields them): `{'image', 'label', 'boxes'}`, boxes normalized `[K, 4]`
    (ymin, xmin, ymax, xmax) of the objects of the image's class."""
    import tensorflow_datasets as tfds

    import cnnjax.data.builders  # noqa: F401  (registers the offline builders)
    from cnnjax.data.pipeline import eval_split_name
    from cnnjax.data.sources import hide_gpus_from_tensorflow
    from cnnjax.data.spec import resolve

    hide_gpus_from_tensorflow()  # as every pipeline entry point: TF must not take JAX's GPU
    spec = resolve(run.config.data)
    if spec.tfds_name is None:
        raise invalid("visualize", "pointing_game", True, f"dataset {run.config.data.name!r} is "
                      "not read from tfds, so it has no boxes")
    builder = tfds.builder(spec.tfds_name, data_dir=spec.data_dir)
    features = builder.info.features
    if "objects" not in features or "bbox" not in features["objects"]:
        raise invalid("visualize", "pointing_game", True, f"tfds {spec.tfds_name!r} has no "
                      "objects/bbox feature (shapes has)")
    dataset = builder.as_dataset(split=eval_split_name(run.config.data), shuffle_files=False)
    examples = []
    for example in tfds.as_numpy(dataset.take(count)):
        objects = example["objects"]
        keep = (objects["label"] == example["label"] if "label" in objects
                else np.ones(len(objects["bbox"]), bool))
        examples.append({"image": example["image"], "label": int(example["label"]),
                         "boxes": objects["bbox"][keep]})
    return examples


def _channel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two channels' pixels; a flat (constant) channel has none: 1.0
    when both are flat (the same blank channel, up to scale), else 0.0 (a blank eval image
    matched any stored one; numpy's NaN was counted as a match)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _check_stored_order(images: np.ndarray, labels: np.ndarray, stored: list[dict]) -> None:
    """Raises unless the pipeline's eval `images` and `labels` are the `stored` tfds examples
    (`_eval_objects`'), one for one at their stored size: only then are the stored boxes
    theirs."""
    for i, (image, example) in enumerate(zip(images, stored, strict=True)):
        if example["image"].shape != image.shape:
            raise invalid("visualize", "pointing_game", True, f"the run's eval images are "
                          f"{image.shape}, resized from the stored {example['image'].shape}: "
                          "boxes need images at the stored size")
        same = [_channel_correlation(image[..., c], example["image"][..., c])
                for c in range(image.shape[-1])]
        if example["label"] != labels[i] or not min(same) > 0.99:  # the pipeline's order
            raise invalid("visualize", "pointing_game", True, f"eval example {i} of the "
                          f"pipeline is not the stored example {i} (a class subset or "
                          "reordering): boxes cannot be matched")


#: Eval images read, and explained, per step of the pointing game.
_POINTING_GAME_BATCH = 64


def pointing_game_run(run: Any, methods: Sequence[str] | None = None,
                      layer: str | None = None, patch: int | None = None,
                      stride: int | None = None, tolerance: float | None = None,
                      max_images: int | None = None) -> dict:
    """The pointing game (Zhang et al. 2018) of each method, and of the image centre, on the
    run's eval split: the share of images whose map, for the true class, peaks inside a box of
    that class grown by `tolerance` pixels (None: their 15 px at 224 scaled to the image)."""
    from cnnjax.analysis import attribution
    from cnnjax.train.trained import eval_examples
    from cnnjax.utils.validation import check_number, check_positive_int

    _check_classifier(run)
    if max_images is not None:
        check_positive_int("visualize", "max_images", max_images)
    if tolerance is not None:  # before the eval images are read and the methods compiled
        check_number("visualize", "tolerance", tolerance, "expected pixels >= 0", low=0.0,
                     strings=False)
    images, labels = [], []
    for batch in eval_examples(run, batch_size=_POINTING_GAME_BATCH):
        images.extend(batch["image"])
        labels.extend(batch["label"])
        if max_images is not None and len(images) >= max_images:
            break
    images, labels = np.stack(images[:max_images]), np.asarray(labels[:max_images])
    height, width = images.shape[1:3]
    stored = _eval_objects(run, len(images))
    _check_stored_order(images, labels, stored)
    boxes = [e["boxes"] * [height, width, height, width] for e in stored]
    if tolerance is None:
        tolerance = 15.0 * min(height, width) / 224
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(images), _POINTING_GAME_BATCH):
        chunk = slice(start, start + _POINTING_GAME_BATCH)
        result = attribution.explain(
            run.model, run.variables, images[chunk], labels[chunk],
            methods=attribution.METHODS if methods is None else methods, layer=layer,
            patch=patch, stride=stride)
        centre = np.zeros((len(images[chunk]), height, width))
        centre[:, height // 2, width // 2] = 1.0
        for name, maps in {**result.maps, "centre": centre}.items():
            for m, b in zip(maps, boxes[chunk], strict=True):
                hit = any(attribution.pointing_game(m[None], box[None], tolerance)[0]
                          for box in b)
                hits.setdefault(name, []).append(bool(hit))
        # The Grad-CAM layer `explain` chose when `layer` is None: the later chunks explain at
        # it too (not resolving it again), and the summary names it.
        layer = result.layer or layer
    return {"images": len(images), "tolerance_px": tolerance, "grad_cam_layer": layer,
            "accuracy": {name: float(np.mean(h)) for name, h in hits.items()}}


#: Flags only the pointing game reads, and those only the attribution figure reads.
POINTING_GAME_FLAGS = ("tolerance", "max_images")
OCCLUSION_FLAGS = ("patch", "stride")


def conflicting_flags(given: Collection[str], pointing_game: bool, target: str,
                      methods: Collection[str] | None = None) -> str | None:
    """Why flags given on the command line (`given`: their names) do not go with the chosen
    mode or `methods` (None: all of them), which would ignore them silently, as one line; None
    when they do."""
    if methods is not None and "occlusion" not in methods:
        for name in OCCLUSION_FLAGS:
            if name in given:
                return (f"--{name} is invalid without occlusion in --methods (only the "
                        f"occluder reads it); add occlusion to --methods or drop --{name}")
    if not pointing_game:
        for name in POINTING_GAME_FLAGS:
            if name in given:
                return (f"--{name} is invalid without --pointing_game (only the pointing game "
                        f"reads it); pass --pointing_game or drop --{name}")
        return None
    if "layer" in given and methods is not None and "grad_cam" not in methods:
        return ("--layer is invalid with --pointing_game without grad_cam in --methods (only "
                "Grad-CAM reads it there); add grad_cam to --methods or drop --layer")
    if "num_images" in given:
        return ("--num_images is invalid with --pointing_game; it scores every eval image, or "
                "the first --max_images=N")
    if "target" in given and target != "true":
        return (f"--target={target!r} is invalid with --pointing_game; it explains each "
                "image's true class, the one whose box it scores")
    return None


#: Flags --list_layers leaves unread (it prints the modules and exits): refused with it.
LIST_LAYERS_IGNORES = ("pointing_game", "num_images", "methods", "layer", "patch", "stride",
                       "target", "tolerance", "max_images", "output_dir")


def list_layers_conflict(given: Collection[str]) -> str | None:
    """Why a flag given with --list_layers (`given`: their names) would be ignored, as one
    line; None when every one is read (--workdir, --step, --ema choose the model)."""
    for name in LIST_LAYERS_IGNORES:
        if name in given:
            return (f"--{name} is invalid with --list_layers, which only prints the model's "
                    "modules and exits; drop one of them")
    return None


def _out_dir() -> str:
    """The output folder, checked up front: `--output_dir`, else `<workdir>/visualize` (an
    empty `--output_dir=` is refused: it was taken for the default without a word)."""
    if _OUTPUT_DIR.value == "":
        raise ValueError("--output_dir='' is invalid; expected a folder path (or leave it out: "
                         "<workdir>/visualize)")
    if _OUTPUT_DIR.value:  # not among the run's own files, as evaluate's --output
        check_outside_run(_OUTPUT_DIR.value, _WORKDIR.value, "--output_dir", folder=True)
        return check_output_dir(_OUTPUT_DIR.value, "--output_dir")
    return check_output_dir(os.path.join(_WORKDIR.value, "visualize"),
                            "--workdir's visualize folder")


def main(argv: list[str]) -> None:
    start_command(argv)
    from cnnjax.analysis import attribution
    from cnnjax.analysis.effective_receptive_field import eval_images
    from cnnjax.train.trained import NoWeightAverageError, argument_prefix, load_trained
    from cnnjax.utils.files import write_json

    given = {name for name in (*POINTING_GAME_FLAGS, *OCCLUSION_FLAGS, "num_images", "target",
                               "layer")
             if flags.FLAGS[name].present}
    if _LIST_LAYERS.value:
        error = list_layers_conflict({name for name in LIST_LAYERS_IGNORES
                                      if flags.FLAGS[name].present})
    else:
        error = conflicting_flags(given, _POINTING.value, _TARGET.value, _METHODS.value)
    if error is not None:
        sys.exit(f"error: {error}")
    with one_line_errors(flags_named={argument_prefix("workdir"): _WORKDIR,
                                      argument_prefix("step"): _STEP}):
        out_dir = None if _LIST_LAYERS.value else _out_dir()  # before loading and model work
        if _METHODS.value is not None:  # names only: the checkpoint takes seconds to load
            attribution.check_methods(_METHODS.value, "visualize", "--methods")
        try:
            run = load_trained(_WORKDIR.value, _STEP.value, ema=_EMA.value)
        except NoWeightAverageError as err:
            sys.exit(f"error: {err.flag_message('--ema')}")
        if _LIST_LAYERS.value:
            shape = eval_images(run, 1).shape[1:]
            for o in attribution.module_outputs(run.model, run.variables, shape):
                print(f"{o.path or '(model)':40s} {o.kind:20s} "
                      f"{'x'.join(map(str, o.shape)) if o.shape else '-'}"
                      + (f"  (runs {o.calls} times)" if o.calls > 1 else ""))
            return
        if _POINTING.value:
            result = pointing_game_run(run, _METHODS.value, _LAYER.value, _PATCH.value,
                                       _STRIDE.value, _TOLERANCE.value, _MAX_IMAGES.value)
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "pointing_game.json")
            write_json(path, {"workdir": run.workdir, "model": run.config.model,
                              "step": run.step, **result})
            print(f"Pointing game, {result['images']} eval images, tolerance "
                  f"{result['tolerance_px']:.1f} px (Grad-CAM layer "
                  f"{result['grad_cam_layer'] or '-'}):")
            for name, accuracy in result["accuracy"].items():
                print(f"  {name:22s} {accuracy:.3f}")
            print(f"Written to {path}")
            return
        summary = write_visualizations(
            run, out_dir, _NUM_IMAGES.value,
            _METHODS.value, _LAYER.value, _PATCH.value, _STRIDE.value, _TARGET.value)
    print("\n".join(report_lines(summary, os.path.join(out_dir, SUMMARY_FILE))))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
