"""`run_rcnn_svm`: R-CNN's SVM + ridge stage (`rcnn_svm`) on a finished `rcnn_small` run.

Loads the run's model and best checkpoint read-only (`cnnjax.train.trained.load_trained`),
extracts fc7 and pool5 features of the run's external proposals (its dense windows, or each
scene's selective-search boxes when it trained with `data.proposals`) and ground-truth boxes of
the first `train_images` train scenes (`RCNN.region_features`), trains the per-class SVMs with
hard-negative mining and the ridge box regressors, and evaluates on the whole eval split, with
the same windows and the same NMS / mAP code (`DetectionEvaluator`):

    softmax        the engine's detector: softmax probabilities, the head's box deltas
    svm            SVM scores, the windows unmoved
    svm_head_box   SVM scores, the head's box deltas
    svm_ridge_box  SVM scores, the ridge regressors' boxes (the paper's R-CNN BB)

Memory: every one of the 149 windows (or ~40 selective-search boxes) of a train scene is kept
(fc7 only; pool5 only for the regression pairs, so pool5's feature scale is measured on those),
~0.15 GB of features per 1,000 scenes, and mining scans all of them.

Output directory (nothing else in the run's workdir is written; checkpoints are read-only):
    features_train.npz  features_test.npz  models.npz   cached artifacts, each holding the
                        settings it was made with; reused when they match, else remade
                        with a printed line naming the changed settings
    results.json  report.md   the metrics of every arm, mining history, timings
    status.json               the stage it is at, or why it stopped
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from cnnjax.detection import rcnn_svm
from cnnjax.detection.ground_truth import has_area
from cnnjax.utils.files import (
    atomic_file,
    atomic_write,
    check_directory_kind,
    check_outside_run,
    write_json,
)
from cnnjax.utils.lock import directory_lock
from cnnjax.utils.validation import (
    check_number,
    check_positive_float,
    check_positive_int,
    invalid,
)

OWNER = "rcnn_svm"
OUTPUT_SUBDIR = "rcnn_svm"
FEATURE_VERSION = 6  # bump when what extract_*_features store changes (6: no difficult gt)
ARMS = ("softmax", "svm", "svm_head_box", "svm_ridge_box")
ARM_LABELS = {
    "softmax": "softmax head (the engine's detector)",
    "svm": "SVM scores, windows unmoved",
    "svm_head_box": "SVM scores, the head's box deltas",
    "svm_ridge_box": "SVM scores, ridge box regression (paper's R-CNN BB)",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the stage is trained with (the experiment's flags, same names)."""

    train_images: int = 1000  # the first N train scenes (features of every window kept)
    svm_c: float = 1e-3  # liblinear C, on features scaled to mean norm `feature_norm`
    positive_weight: float = 2.0  # class weight of the positives (rcnn's pos_loss_weight)
    positive_iou: float | None = None  # None: positives are gt boxes only (the paper)
    initial_negatives: int = 5000  # random negatives the mining starts from, per class
    mining_rounds: int = 10  # at most this many mining passes per class
    ridge_lambda: float = 1000.0
    feature_norm: float = rcnn_svm.PAPER_FEATURE_NORM
    batch_size: int = 16  # images per feature-extraction call
    step: int | None = None  # checkpoint step (`load_trained`); None: the run's best
    seed: int = 0

    def check(self) -> Settings:
        """Raises a ValueError naming the flag for any invalid value; returns self."""
        for name in ("train_images", "initial_negatives", "mining_rounds", "batch_size"):
            check_positive_int(OWNER, name, getattr(self, name))
        for name in ("svm_c", "positive_weight", "ridge_lambda", "feature_norm"):
            check_positive_float(OWNER, name, getattr(self, name))
        if self.positive_iou is not None:
            check_number(OWNER, "positive_iou", self.positive_iou,
                         f"expected None or an IoU in [{rcnn_svm.NEGATIVE_IOU}, 1]",
                         low=rcnn_svm.NEGATIVE_IOU, high=1.0)
        if self.step is not None:
            check_positive_int(OWNER, "step", self.step)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise invalid(OWNER, "seed", self.seed, "expected an integer >= 0")
        return self

    def model_settings(self) -> dict[str, Any]:
        """The fields the SVMs and regressors depend on (besides the train features)."""
        return {k: getattr(self, k) for k in ("svm_c", "positive_weight", "positive_iou",
                                              "initial_negatives", "mining_rounds",
                                              "ridge_lambda", "feature_norm", "seed")}


@dataclasses.dataclass(frozen=True)
class TrainedDetector:
    """A finished R-CNN run (`cnnjax.train.trained.TrainedRun`: model, checkpoint variables,
    where they came from) with its dataset's info."""

    run: Any  # TrainedRun
    data_info: Any


# ----------------------------------------------------------------------------- the model
def restore_detector(workdir: str, step: int | None = None) -> TrainedDetector:
    """The R-CNN of a finished run in `workdir`, from `cnnjax.train.trained.load_trained` (its
    config.json's model built as the engine does, the best or `step`'s checkpoint read
    read-only), plus its dataset's info."""
    from cnnjax.train import config as config_lib
    from cnnjax.train.trained import load_trained

    run = load_trained(workdir, step)
    if not hasattr(run.model, "region_features"):
        raise invalid(OWNER, "workdir", workdir,
                      f"expected a run of an R-CNN (rcnn_small); it trained {run.config.model!r}")
    data_info = config_lib.data_pipeline(run.config).get_dataset_info(run.config.data)
    return TrainedDetector(run, data_info)


def params_checksum(variables: Any) -> str:
    """A short fingerprint of the checkpoint's values (the sum of |x| over every leaf), so
    cached features of a run that was retrained in the same workdir are not reused."""
    import jax

    total = sum(float(np.sum(np.abs(np.asarray(leaf, np.float64))))
                for leaf in jax.tree.leaves(variables))
    return f"{total:.10e}"


def train_split(detector: TrainedDetector, num_images: int) -> str:
    """The tfds split string of the run's first `num_images` train scenes (a sliced or joined
    train split, e.g. `train[:90%]`, resolved to absolute ranges: tfds cannot slice a slice)."""
    from cnnjax.data import presets

    data = detector.run.config.data
    name = data.get("train_split") or presets.get_preset(data.name).train_split
    if "[" in name or "+" in name:
        from cnnjax.data import detection

        return detection.head_split(data, name, num_images)
    return f"{name}[:{num_images}]"


def _region_batches(detector: TrainedDetector, split: str | None, batch_size: int,
                    ) -> Iterator[tuple[dict, Any, np.ndarray, np.ndarray]]:
    """`(images' batch dict without padding, RegionFeatures of windows + gt boxes, windows
    [n, P, 4], window validity [n, P])` of each batch of `split` (stored order, no augmentation;
    `trained.predictions`). The windows are the run's: its dense windows, or each image's
    external proposals (`data.proposals`, e.g. selective search) with their validity."""
    import jax.numpy as jnp

    from cnnjax.train.step import proposal_kwargs
    from cnnjax.train.trained import predictions

    def features(run: Any, batch: dict) -> tuple[Any, Any, Any]:
        windows, valid = run.model.apply(run.variables, batch["image"], method="windows",
                                         **proposal_kwargs(batch))
        rois = jnp.concatenate([windows, batch["boxes"]], axis=1)
        return (run.model.apply(run.variables, batch["image"], rois, method="region_features"),
                windows, valid)

    for batch, (regions, windows, valid) in predictions(detector.run, split, batch_size,
                                                        features):
        yield batch, regions, np.asarray(windows), np.asarray(valid)


def extract_train_features(detector: TrainedDetector, split: str, batch_size: int,
                           ) -> dict[str, np.ndarray]:
    """SVM and ridge training data of `split`: every valid window and the gt boxes the detector's
    training keeps (valid, with an area, not VOC "difficult") of every scene (`fc7`, `overlaps`
    [M, C] by `class_overlaps`, `gt_class` (-1: a window), `image`), and the regression pairs
    among the windows (`reg_pool5`, `reg_classes`, `reg_targets`).

    The scenes come from the eval pipeline, which takes a scene's first `data.max_boxes` objects
    before difficult and area-less ones are dropped (training drops them first): a scene with
    more objects than that can lose one training keeps; the pipeline warns then, naming the
    `data.max_boxes` that would keep all."""
    num_classes = detector.data_info.num_classes
    out: dict[str, list] = {k: [] for k in ("fc7", "overlaps", "gt_class", "image", "reg_pool5",
                                            "reg_classes", "reg_targets")}
    count = 0
    for batch, regions, windows, window_valid in _region_batches(detector, split, batch_size):
        p = windows.shape[1]
        for i in range(len(batch["image"])):
            # The eval pipeline keeps boxes without area (pycocotools does) and VOC difficult ones
            # (flagged, for the devkit's ignore rule); training drops both. A difficult box is
            # left out entirely, as the roidbs of SPP-net (roidb_from_voc) and Fast R-CNN
            # (pascal_voc.py, use_diff=False) do: no positive, no regression target and no
            # overlap, so a region over it can be a negative. (R-CNN's own roidb kept it.)
            valid = batch["box_valid"][i] & has_area(batch["boxes"][i])
            if "box_difficult" in batch:
                valid &= ~batch["box_difficult"][i]
            gt, labels = batch["boxes"][i][valid], batch["labels"][i][valid]
            kept = np.flatnonzero(window_valid[i])
            rows = np.concatenate([kept, p + np.flatnonzero(valid)])
            boxes = np.concatenate([windows[i][kept], gt])
            out["fc7"].append(regions.fc7[i][rows])
            out["overlaps"].append(rcnn_svm.class_overlaps(
                boxes, gt, labels, np.ones(len(gt), bool), num_classes).astype(np.float32))
            out["gt_class"].append(
                np.concatenate([np.full(len(kept), -1), labels]).astype(np.int32))
            out["image"].append(np.full(len(rows), count, np.int32))
            selected, classes, targets = rcnn_svm.regression_targets(
                windows[i][kept], gt, labels, np.ones(len(gt), bool))
            out["reg_pool5"].append(regions.pool5[i][kept][selected])
            out["reg_classes"].append(classes[selected].astype(np.int32))
            out["reg_targets"].append(targets[selected].astype(np.float32))
            count += 1
    if count == 0:
        raise invalid(OWNER, "split", split, "expected a split with at least one scene")
    return {k: np.concatenate(v) for k, v in out.items()}


def extract_test_features(detector: TrainedDetector, batch_size: int) -> dict[str, np.ndarray]:
    """Everything the four arms need on the run's eval split: per scene and window `fc7`,
    `pool5`, the head's `logits` and `deltas`, the `windows` and their `window_valid`; the
    padded ground truth with its difficult flags (all False for a set without them)."""
    out: dict[str, list] = {k: [] for k in ("fc7", "pool5", "logits", "deltas", "windows",
                                            "window_valid", "boxes", "labels", "box_valid",
                                            "box_difficult")}
    for batch, regions, windows, window_valid in _region_batches(detector, None, batch_size):
        p = windows.shape[1]
        for name in ("fc7", "pool5", "logits", "deltas"):
            out[name].append(getattr(regions, name)[:, :p])
        out["windows"].append(windows)
        out["window_valid"].append(window_valid)
        for name in ("boxes", "labels", "box_valid"):
            out[name].append(batch[name])
        out["box_difficult"].append(batch.get("box_difficult",
                                              np.zeros(batch["box_valid"].shape, bool)))
    if not out["windows"]:
        raise invalid(OWNER, "eval split", "empty", "expected at least one scene")
    return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------- training/eval
def check_every_class_has_boxes(gt_class: np.ndarray, num_classes: int, split: str,
                                train_images: int) -> None:
    """A ValueError naming `train_images` if a class has no ground-truth box in the extracted
    scenes: its SVM would have no positive (R-CNN's positives are the gt boxes only)."""
    counts = np.bincount(gt_class[gt_class >= 0], minlength=num_classes)
    missing = [int(c) for c in np.flatnonzero(counts == 0)]
    if missing:
        raise invalid(OWNER, "train_images", train_images,
                      f"the train scenes it selects ({split}) hold no ground-truth box of "
                      f"class{'es' if len(missing) > 1 else ''} {missing}, so no SVM positive; "
                      "use more train scenes")


def train_models(train: dict[str, np.ndarray], num_classes: int, settings: Settings,
                 ) -> dict[str, Any]:
    """The SVMs (fc7) and ridge regressors (pool5), with their feature scales and records.

    fc7 is scaled to mean norm `feature_norm` over every training region, pool5 over the
    regression pairs only (the only pool5 kept); rcnn measured both on regions sampled from the
    whole training set (`rcnn_feature_stats`). The pool5 scale sets what `ridge_lambda` means."""
    fc7_scale = rcnn_svm.feature_scale(train["fc7"], settings.feature_norm)
    svms, histories = rcnn_svm.train_class_svms(
        train["fc7"] * np.float32(fc7_scale), train["overlaps"], train["gt_class"],
        positive_iou=settings.positive_iou, c=settings.svm_c,
        positive_weight=settings.positive_weight,
        initial_negatives=settings.initial_negatives, max_rounds=settings.mining_rounds,
        seed=settings.seed)
    # No window at IoU >= 0.6 in any scene: every class gets the zero regressor (no pairs).
    pool5_scale = (rcnn_svm.feature_scale(train["reg_pool5"], settings.feature_norm)
                   if len(train["reg_pool5"]) else 1.0)
    regressors, pairs = rcnn_svm.train_box_regressors(
        train["reg_pool5"] * np.float32(pool5_scale), train["reg_classes"],
        train["reg_targets"], num_classes, settings.ridge_lambda)
    return {"svm_weights": svms.weights, "svm_bias": svms.bias, "fc7_scale": fc7_scale,
            "ridge_weights": regressors.weights, "ridge_bias": regressors.bias,
            "pool5_scale": pool5_scale, "mining": histories, "regression_pairs": pairs}


def evaluate_arms(test: dict[str, np.ndarray], models: dict[str, Any], detector: TrainedDetector,
                  chunk: int = 100) -> dict[str, dict[str, float]]:
    """mAP (`DetectionEvaluator`) of every arm in `ARMS` on the extracted eval split."""
    import jax.numpy as jnp

    from cnnjax.detection.box_coding import decode_boxes
    from cnnjax.detection.evaluation import DetectionEvaluator
    from cnnjax.models.faster_rcnn import BOX_WEIGHTS, detect_from_head

    model = detector.run.model
    image_size = tuple(detector.data_info.image_shape[:2])
    svms = rcnn_svm.LinearModels(models["svm_weights"], models["svm_bias"])
    ridge = rcnn_svm.LinearModels(models["ridge_weights"], models["ridge_bias"])
    evaluators = {arm: DetectionEvaluator(detector.data_info.num_classes) for arm in ARMS}
    for start in range(0, len(test["fc7"]), chunk):
        part = {k: v[start:start + chunk] for k, v in test.items()}
        windows, valid = part["windows"], part["window_valid"]
        detections = {"softmax": detect_from_head(
            part["logits"], part["deltas"], windows, jnp.asarray(valid), image_size,
            model.score_threshold, model.nms_iou, model.max_detections)}
        scores = rcnn_svm.svm_scores(part["fc7"] * models["fc7_scale"], svms)
        scores = np.where(valid[..., None], scores, -np.inf)  # padding proposals: never kept
        candidates = {
            "svm": np.broadcast_to(windows[:, :, None], scores.shape + (4,)),
            "svm_head_box": decode_boxes(part["deltas"][:, :, 1:], windows[:, :, None],
                                         BOX_WEIGHTS),
            "svm_ridge_box": rcnn_svm.regressed_boxes(rcnn_svm.regressed_deltas(
                part["pool5"] * models["pool5_scale"], ridge), windows),
        }
        for arm, boxes in candidates.items():
            detections[arm] = rcnn_svm.detect_with_scores(scores, boxes, image_size,
                                                          model.nms_iou, model.max_detections)
        for arm, found in detections.items():
            evaluators[arm].add(found, part["boxes"], part["labels"], part["box_valid"],
                                gt_difficult=part["box_difficult"])
    return {arm: evaluators[arm].compute() | {"num_examples": float(evaluators[arm].num_images)}
            for arm in ARMS}


# ------------------------------------------------------------------------------- caching
def save_npz(path: str, arrays: dict[str, Any], meta: dict) -> None:
    """Writes `arrays` and the JSON `meta` (the settings they were made with) to `path`
    atomically."""
    with atomic_file(path, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(meta, default=float)), **arrays)


def load_npz(path: str, key: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """`(arrays, meta)` of `path` if it was made with `key` (meta["key"]), else None with a log
    line saying what changed (a missing or unreadable file is simply remade)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                changed = sorted(n for n in set(key) | set(meta.get("key", {}))
                                 if key.get(n) != meta.get("key", {}).get(n))
                print(f"{path} was made with other settings (" + ", ".join(
                    f"{n}: {meta.get('key', {}).get(n)!r} -> {key.get(n)!r}" for n in changed)
                    + "); recomputing it.", flush=True)
                return None
            return {k: data[k] for k in data.files if k != "meta"}, meta
    except (OSError, ValueError, KeyError) as err:
        logging.warning("%s is unreadable (%s); remaking it.", path, err)
        return None


def _cached(path: str, key: dict, make: Callable[[], tuple[dict[str, Any], dict]], stage: str,
            status_path: str) -> tuple[dict[str, Any], dict, bool]:
    """`(arrays, meta, reused)`: the cache at `path` if its key matches, else `make()` saved."""
    found = load_npz(path, key)
    if found is not None:
        print(f"{stage}: reusing {path}", flush=True)
        return (*found, True)
    write_json(status_path, {"status": "running", "stage": stage})
    started = time.time()
    arrays, extra = make()
    meta = {"key": key, "seconds": time.time() - started, **extra}
    save_npz(path, arrays, meta)
    print(f"{stage}: {meta['seconds']:.1f} s -> {path}", flush=True)
    return arrays, meta, False


# ---------------------------------------------------------------------------------- run
def run_rcnn_svm(workdir: str, output_dir: str | None = None,
                 settings: Settings = Settings()) -> dict:
    """Trains and evaluates the SVM + ridge stage on the run in `workdir`; returns (and writes
    to `<output_dir>/results.json`, default `<workdir>/rcnn_svm`) the results. Every check of
    the arguments runs before anything is compiled or extracted; that every class has a
    ground-truth box in the selected train scenes, right after their extraction (cached)."""
    settings.check()
    if not isinstance(workdir, str) or not os.path.isdir(workdir):
        raise invalid(OWNER, "workdir", workdir, "expected the --workdir of a finished R-CNN run")
    if output_dir is not None:  # never among the run's own files or another command's
        check_outside_run(output_dir, workdir, "output_dir", folder=True)
        check_directory_kind(output_dir, "R-CNN SVM stage", "output_dir")
    output_dir = output_dir or os.path.join(workdir, OUTPUT_SUBDIR)
    detector = restore_detector(workdir, settings.step)
    if settings.train_images > detector.data_info.num_train:
        raise invalid(OWNER, "train_images", settings.train_images,
                      f"expected at most the {detector.data_info.num_train} train scenes of "
                      f"{detector.data_info.name!r}")
    status_path = os.path.join(output_dir, "status.json")
    with directory_lock(output_dir, "output_dir"):
        try:
            results = _run(detector, output_dir, settings, status_path)
        except BaseException as err:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            write_json(status_path, {"status": status, "error": type(err).__name__,
                                     "message": str(err)})
            raise
        write_json(status_path, {"status": "completed"})
    return results


def _run(detector: TrainedDetector, output_dir: str, settings: Settings,
         status_path: str) -> dict:
    started = time.time()
    run = detector.run
    source = {"workdir": run.workdir, "step": run.step, "model": run.config.model,
              "params_checksum": params_checksum(run.variables), "version": FEATURE_VERSION}
    split = train_split(detector, settings.train_images)
    train_key = {**source, "split": split}
    test_key = {**source, "split": "eval"}
    train, train_meta, train_reused = _cached(
        os.path.join(output_dir, "features_train.npz"), train_key,
        lambda: (extract_train_features(detector, split, settings.batch_size), {}),
        f"train features ({split})", status_path)
    test, test_meta, test_reused = _cached(
        os.path.join(output_dir, "features_test.npz"), test_key,
        lambda: (extract_test_features(detector, settings.batch_size), {}),
        "test features", status_path)

    check_every_class_has_boxes(train["gt_class"], detector.data_info.num_classes, split,
                                settings.train_images)

    def make_models() -> tuple[dict[str, Any], dict[str, Any]]:
        models = train_models(train, detector.data_info.num_classes, settings)
        records = {k: models.pop(k) for k in ("mining", "regression_pairs")}
        return models, records

    models, models_meta, models_reused = _cached(
        os.path.join(output_dir, "models.npz"), {**train_key, **settings.model_settings()},
        make_models, "SVMs + ridge regressors", status_path)
    write_json(status_path, {"status": "running", "stage": "evaluation"})
    eval_started = time.time()
    metrics = evaluate_arms(test, {k: np.asarray(v) for k, v in models.items()}, detector)
    classes = range(detector.data_info.num_classes)
    results = {
        "status": "completed",
        "workdir": run.workdir,
        "output_dir": os.path.abspath(output_dir),
        "checkpoint": {"step": run.step, "how": run.how},
        "model": run.config.model,
        "dataset": detector.data_info.name,
        "settings": dataclasses.asdict(settings),
        "train": {
            "split": split,
            "regions": int(len(train["fc7"])),
            "positives": [int(np.sum(rcnn_svm.svm_labels(train["overlaps"], train["gt_class"], c,
                                                         positive_iou=settings.positive_iou) == 1))
                          for c in classes],
            "negatives": [int(np.sum(train["overlaps"][:, c] < rcnn_svm.NEGATIVE_IOU))
                          for c in classes],
            "regression_pairs": models_meta["regression_pairs"],
            "fc7_scale": float(models["fc7_scale"]),
            "pool5_scale": float(models["pool5_scale"]),
        },
        "mining": models_meta["mining"],
        "test": metrics,
        "seconds": {
            "train_features": train_meta["seconds"], "test_features": test_meta["seconds"],
            "svm_ridge_training": models_meta["seconds"],
            "evaluation": time.time() - eval_started, "this_run": time.time() - started,
        },
        "reused": {"train_features": train_reused, "test_features": test_reused,
                   "models": models_reused},
    }
    write_json(os.path.join(output_dir, "results.json"), results)
    atomic_write(os.path.join(output_dir, "report.md"), report(results))
    return results


def report(results: dict) -> str:
    """A short Markdown report: the arms' mAPs, the data, the mining, the timings."""
    test, train, s = results["test"], results["train"], results["settings"]
    softmax = test["softmax"]
    lines = [
        f"# R-CNN SVM + ridge stage on {results['workdir']}",
        "",
        f"Checkpoint step {results['checkpoint']['step']} ({results['checkpoint']['how']}) of "
        f"`{results['model']}`; evaluated on {int(softmax['num_examples'])} "
        f"`{results['dataset']}` eval scenes, the same windows and NMS for every arm.",
        "",
        "| arm | mAP@0.5 (VOC) | COCO mAP | AP50 | AP75 | per-class AP50 |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        m = test[arm]
        per_class = " ".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("ap50/"))
        lines.append(f"| {ARM_LABELS[arm]} | {m['map50']:.3f} | {m['map']:.3f} | "
                     f"{m['coco_map50']:.3f} | {m['coco_map75']:.3f} | {per_class} |")
    rounds = [len(h) for h in results["mining"]]
    positives = ("gt boxes, the paper's rule" if s.get("positive_iou") is None
                 else f"gt boxes and regions at IoU >= {s['positive_iou']:g}, not the paper's")
    lines += [
        "",
        f"Training: {train['split']}: {train['regions']:,} regions (every window and gt box); "
        f"positives ({positives}) per class {train['positives']}, negatives (IoU < "
        f"{rcnn_svm.NEGATIVE_IOU}) per class {train['negatives']}; ridge pairs (IoU >= "
        f"{rcnn_svm.REGRESSION_IOU}) per class {train['regression_pairs']}.",
        f"SVM: C={s['svm_c']:g}, positive weight {s['positive_weight']:g}, features scaled to "
        f"mean norm {s['feature_norm']:g}; hard-negative mining from {s['initial_negatives']} "
        f"negatives, fits per class {rounds}, final cache per class "
        f"{[h[-1]['cache'] for h in results['mining']]}, converged (no new margin violator) "
        f"{[h[-1].get('added') == 0 for h in results['mining']]}.",
        f"Ridge: lambda={s['ridge_lambda']:g} on pool5 scaled to mean norm "
        f"{s['feature_norm']:g} over the regression pairs.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items())
        + f" (reused: {', '.join(k for k, v in results['reused'].items() if v) or 'nothing'}).",
        "",
    ]
    return "\n".join(lines)
