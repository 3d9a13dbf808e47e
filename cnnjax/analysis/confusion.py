"""Where a classifier's errors go: the confusion matrix, per-class accuracy, and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnjax.utils.files import save_figure
from cnnjax.utils.validation import check_positive_int, invalid, widen_low_precision


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """`[C, C]` counts: row = true class, column = predicted class."""
    num_classes = check_positive_int("confusion_matrix", "num_classes", num_classes)
    labels, predictions = (widen_low_precision(np.asarray(v)) for v in (labels, predictions))
    if labels.ndim != 1:
        raise invalid("confusion_matrix", "labels.shape", labels.shape,
                      "expected a 1-D array of class indices (flatten per-pixel labels first)")
    if predictions.shape != labels.shape:
        raise invalid("confusion_matrix", "predictions.shape", predictions.shape,
                      f"expected the labels' shape {labels.shape}, one prediction per label")
    for name, values in (("labels", labels), ("predictions", predictions)):
        _check_class_indices(name, values)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise invalid("confusion_matrix", name, f"values in [{values.min()}, {values.max()}]",
                          f"expected class indices in [0, {num_classes})")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def _check_class_indices(name: str, values: np.ndarray) -> None:
    """Class indices must be integers (integer dtype, or floats with integral values): anything
    else is refused, never truncated (0.7 would silently count as class 0)."""
    if values.dtype.kind in "iu":
        return
    if values.dtype.kind != "f":
        raise invalid("confusion_matrix", f"{name}.dtype", str(values.dtype),
                      "expected integer class indices")
    bad = values[~(np.isfinite(values) & (values == np.round(values)))]
    if bad.size:
        raise invalid("confusion_matrix", name, f"values like {bad[:3].tolist()}",
                      "expected integer class indices (argmax the scores first)")


def _check_counts(owner: str, matrix: Any) -> np.ndarray:
    """`matrix` as float64 after checking it is a square matrix of finite counts >= 0 (a
    negative entry could cancel a row or a union to 0, read as 'no example')."""
    try:
        matrix = np.asarray(widen_low_precision(np.asarray(matrix)), np.float64)
    except (TypeError, ValueError):
        raise invalid(owner, "matrix", matrix,
                      "expected a square [C, C] confusion matrix of counts") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise invalid(owner, "matrix.shape", matrix.shape,
                      "expected a square [C, C] confusion matrix")
    if not np.all(np.isfinite(matrix) & (matrix >= 0)):
        bad = tuple(int(i) for i in np.argwhere(~(np.isfinite(matrix) & (matrix >= 0)))[0])
        raise invalid(owner, f"matrix[{bad[0]}, {bad[1]}]", float(matrix[bad]),
                      "expected counts: finite and >= 0")
    return matrix


def per_class_accuracy(matrix: Any) -> np.ndarray:
    """Recall of each class (diagonal over row sums); NaN for a class with no example."""
    matrix = _check_counts("per_class_accuracy", matrix)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / totals, np.nan)


def intersection_over_union(matrix: Any) -> dict[str, float]:
    """Segmentation scores of a pixel confusion matrix (rows: true class, columns: predicted):
    `pixel_accuracy`, correct pixels over all counted pixels (FCN's "pixel accuracy"); `miou`,
    the mean over classes present in the truth or the predictions of `TP / (TP + FP + FN)`
    (PASCAL VOC's and Cityscapes' mean IoU), and `iou/<c>` per such class."""
    matrix = _check_counts("intersection_over_union", matrix)
    hits = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    present = np.flatnonzero(union > 0)
    if present.size == 0:
        raise invalid("intersection_over_union", "matrix", "all zeros",
                      "expected at least one counted pixel")
    iou = hits[present] / union[present]
    return {"pixel_accuracy": float(hits.sum() / matrix.sum()), "miou": float(np.mean(iou)),
            **{f"iou/{c}": float(v) for c, v in zip(present, iou, strict=True)}}


def plot_confusion_matrix(matrix: np.ndarray, path: str, title: str = "",
                          class_labels: Sequence[str] | None = None) -> str:
    """Row-normalized heat map (each true class sums to 1) with the counts written in cells of
    matrices up to 20 classes; saved to `path` (PNG). Returns `path`. The ticks read
    `class_labels` (one per row; default the indices), e.g. the dataset's labels of a run on a
    class subset, whose model numbers its classes 0..C-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise invalid("plot_confusion_matrix", "matrix.shape", matrix.shape,
                      "expected a square [C, C] confusion matrix (confusion_matrix's)")
    num_classes = matrix.shape[0]
    if class_labels is None:
        class_labels = [str(i) for i in range(num_classes)]
    elif isinstance(class_labels, str) or len(class_labels) != num_classes:
        raise invalid("plot_confusion_matrix", "class_labels", class_labels,
                      f"expected {num_classes} labels, one per row of the matrix")
    rows = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = min(12.0, 2.0 + 0.45 * num_classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if num_classes <= 20:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, [str(label) for label in class_labels])
        ax.set_yticks(ticks, [str(label) for label in class_labels])
        for i in range(num_classes):
            for j in range(num_classes):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if normalized[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title} (accuracy {accuracy:.4f}, {matrix.sum()} examples)".strip())
    fig.tight_layout()
    return save_figure(fig, path)


def _class_colours(num_classes: int) -> Any:
    """One distinct colour per class (tab10, else tab20 + tab20b + tab20c for up to 60, else
    evenly spaced hues), white for pixels that are no class (ignored)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if num_classes <= 10:
        colours = list(colormaps["tab10"].colors)
    elif num_classes <= 60:
        colours = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    else:
        colours = list(colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False)))
    return ListedColormap(colours[:num_classes]).with_extremes(bad="white")


def plot_segmentation(images: Any, labels: Any, predictions: Any, path: str, num_classes: int,
                      max_images: int = 8, title: str = "") -> str:
    """Rows of (image, true class map, predicted class map) for the first `max_images` images
    (`images [N, H, W, C]` as fed to the model, rescaled per image for display; class maps
    `[N, H, W]` drawn with one fixed colour per class, white where the label is no class, e.g.
    an ignored border); saved to `path` (PNG). Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    owner = "plot_segmentation"
    num_classes = check_positive_int(owner, "num_classes", num_classes)
    max_images = check_positive_int(owner, "max_images", max_images)
    images = np.asarray(images, np.float64)
    if images.ndim != 4:
        raise invalid(owner, "images.shape", images.shape,
                      "expected [N, H, W, C] images as fed to the model")
    check_positive_int(owner, "images", len(images))
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.ndim != 3 or len(labels) != len(images):
        raise invalid(owner, "labels.shape", labels.shape,
                      f"expected [N, h, w] class maps, one per image (N = {len(images)})")
    if predictions.shape != labels.shape:
        raise invalid(owner, "predictions.shape", predictions.shape,
                      f"expected the labels' shape {labels.shape}, one prediction per pixel")
    images = images[:max_images]
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    class_maps = {"cmap": _class_colours(num_classes), "vmin": -0.5, "vmax": num_classes - 0.5,
                  "interpolation": "nearest"}
    for i in range(n):
        image = images[i]
        image = (image - image.min()) / max(float(np.ptp(image)), 1e-12)
        panels = (image[..., 0] if image.shape[-1] == 1 else image,
                  *(np.ma.masked_outside(np.asarray(m[i]), 0, num_classes - 1)
                    for m in (labels, predictions)))
        for ax, panel, name in zip(axes[i], panels, ("image", "truth", "prediction"),
                                   strict=True):
            ax.imshow(panel, **({} if name == "image" else class_maps))
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / n) if title else None)
    return save_figure(fig, path)
