"""Show what a trained classifier looks at: attribution maps, first-layer filters, activations.

    python -m experiments.visualize --workdir=workdirs/lenet5_digits [--num_images=8]
        [--layer=<module path>] [--methods=saliency,occlusion,grad_cam] [--step=N] [--ema]
    python -m experiments.visualize --workdir=... --list_layers

Loads the run's best checkpoint (as `experiments.evaluate` does) and its first --num_images
eval images, preprocessed as its evaluation sees them, and writes to --out_dir (default
<workdir>/visualize/):
- `attributions.png`: per image, the input titled with its true and predicted class, then each
  method's map for the predicted class: gradient saliency (Simonyan et al. 2014), occlusion
  sensitivity (Zeiler & Fergus 2014) and Grad-CAM (Selvaraju et al. 2017) at --layer (default:
  the last module with a feature-map output);
- `filters.png`: the first convolution's kernels (Krizhevsky et al. 2012, Fig. 3);
- `activations.png`: the Grad-CAM layer's channels on the first image;
- `visualize.json`: the layer, checkpoint, and each image's label, prediction and probability.
--list_layers prints every module with its output shape (the names --layer takes) and exits.
See `cnnjax.analysis.attribution` for the methods.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from cnnjax.platform import configure_cpu_defaults

configure_cpu_defaults()

from absl import app, flags  # noqa: E402

from cnnjax.utils.cli import parse_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_EMA = flags.DEFINE_bool("ema", False, "Use the run's weight average instead of its weights.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 6, "Eval images to explain.")
_LAYER = flags.DEFINE_string("layer", None, "Grad-CAM (and activations) layer: a module path "
                             "from --list_layers (default: the last feature-map module).")
_METHODS = flags.DEFINE_list("methods", ["saliency", "occlusion", "grad_cam"],
                             "Attribution methods, in any order.")
_PATCH = flags.DEFINE_integer("patch", None, "Occluder side in pixels (default: a quarter of "
                              "the image's smaller side).")
_STRIDE = flags.DEFINE_integer("stride", None, "Occluder step (default: half the patch).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write (default <workdir>/visualize).")
_LIST_LAYERS = flags.DEFINE_bool("list_layers", False, "Print the model's modules and exit.")
flags.mark_flags_as_required(["workdir"])


def write_visualizations(run: Any, out_dir: str, num_images: int = 6,
                         methods: Sequence[str] = ("saliency", "occlusion", "grad_cam"),
                         layer: str | None = None, patch: int | None = None,
                         stride: int | None = None) -> dict:
    """Writes the module docstring's files for a `load_trained` run into `out_dir`; returns
    the summary written to visualize.json. Every input is checked before anything is written."""
    from cnnjax.analysis import attribution
    from cnnjax.train.trained import eval_examples
    from cnnjax.utils.files import write_json
    from cnnjax.utils.validation import check_positive_int

    count = check_positive_int("visualize", "num_images", num_images)
    batch = next(eval_examples(run, batch_size=count))
    images, labels = batch["image"][:count], batch["label"][:count]
    result = attribution.explain(run.model, run.variables, images, methods=methods, layer=layer,
                                 patch=patch, stride=stride)
    shown = result.layer or layer or attribution.last_conv_layer(run.model, run.variables,
                                                                 images.shape[1:])
    filter_path, kernel = attribution.first_layer_filters(run.model, run.variables,
                                                          images.shape[1:])
    activation = attribution.activations(run.model, run.variables, images[:1], (shown,))
    os.makedirs(out_dir, exist_ok=True)
    rows = [{"label": int(y), "predicted": int(t), "probability": float(p[t])}
            for y, t, p in zip(labels, result.targets, result.probabilities, strict=True)]
    titles = [f"true {r['label']}, pred {r['predicted']} ({r['probability']:.2f})" for r in rows]
    name = f"{run.config.model} step {run.step}"
    files = {
        "attributions": attribution.plot_attributions(
            images, result.maps, os.path.join(out_dir, "attributions.png"), titles),
        "filters": attribution.plot_filters(
            kernel, os.path.join(out_dir, "filters.png"),
            f"{name}: {filter_path} ({kernel.shape[-1]} filters {kernel.shape[0]}x"
            f"{kernel.shape[1]})"),
        "activations": attribution.plot_activations(
            activation[shown][0], os.path.join(out_dir, "activations.png"),
            f"{name}: {shown} on eval image 0"),
    }
    summary = {"workdir": run.workdir, "model": run.config.model, "step": run.step,
               "checkpoint": run.how, "weights": "ema" if run.ema else "trained",
               "grad_cam_layer": result.layer, "activations_layer": shown,
               "first_conv": filter_path, "methods": list(result.maps), "images": rows,
               "files": files}
    write_json(os.path.join(out_dir, "visualize.json"), summary)
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from cnnjax.train.logging import quiet_library_logs

    quiet_library_logs()
    from cnnjax.analysis import attribution
    from cnnjax.analysis.effective_receptive_field import eval_images
    from cnnjax.train.trained import load_trained

    try:
        run = load_trained(_WORKDIR.value, _STEP.value, ema=_EMA.value)
        if _LIST_LAYERS.value:
            shape = eval_images(run, 1).shape[1:]
            for o in attribution.module_outputs(run.model, run.variables, shape):
                print(f"{o.path or '(model)':40s} {o.kind:20s} "
                      f"{'x'.join(map(str, o.shape)) if o.shape else '-'}"
                      + (f"  (runs {o.calls} times)" if o.calls > 1 else ""))
            return
        summary = write_visualizations(
            run, _OUT_DIR.value or os.path.join(_WORKDIR.value, "visualize"), _NUM_IMAGES.value,
            _METHODS.value, _LAYER.value, _PATCH.value, _STRIDE.value)
    except ValueError as err:
        sys.exit(f"error: {err}")
    rows = summary["images"]
    correct = sum(r["label"] == r["predicted"] for r in rows)
    print(f"{summary['model']} step {summary['step']} ({summary['checkpoint']} checkpoint): "
          f"{correct}/{len(rows)} of the eval images shown are classified correctly; Grad-CAM "
          f"layer: {summary['grad_cam_layer'] or '-'}")
    for key, path in summary["files"].items():
        print(f"{key + ':':14s}{path}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
