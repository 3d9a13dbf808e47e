"""A grid of images with a detector's boxes (coloured by class, with scores) over the truth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnjax.utils.files import save_figure
from cnnjax.utils.validation import check_number, check_positive_int, invalid


def _displayable(image: np.ndarray) -> np.ndarray:
    """A normalized image rescaled to [0, 1] per image for display (grey if single-channel)."""
    image = np.asarray(image, np.float64)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return image[..., 0] if image.shape[-1] == 1 else image


def _check_batch(images: Any, detections: Any, gt_boxes: Any, gt_labels: Any,
                 gt_valid: Any) -> None:
    """A ValueError naming the first argument whose shape does not fit `images` `[N, H, W, C]`
    (N >= 1): an empty batch or a shorter ground truth failed mid-drawing, not by name."""
    shape = tuple(np.shape(images))
    if len(shape) != 4 or min(shape) < 1:
        raise invalid("plot_detections", "images.shape", shape,
                      "expected [N, H, W, C] with N >= 1 images")
    if shape[3] not in (1, 3):  # matplotlib fails on 2 channels and reads 4 as alpha
        raise invalid("plot_detections", "images.shape", shape,
                      "expected 1 (grey) or 3 (RGB) channels")
    n = shape[0]
    box_shape = tuple(np.shape(getattr(detections, "boxes", None)))
    if len(box_shape) != 3 or box_shape[0] != n or box_shape[2] != 4:
        raise invalid("plot_detections", "detections.boxes.shape", box_shape,
                      f"expected ({n}, K, 4), as many images as images.shape[0]")
    for field in ("scores", "classes", "valid"):
        got = tuple(np.shape(getattr(detections, field)))
        if got != box_shape[:2]:
            raise invalid("plot_detections", f"detections.{field}.shape", got,
                          f"expected {box_shape[:2]}, one per detection")
    gt_shape = tuple(np.shape(gt_boxes))
    if len(gt_shape) != 3 or gt_shape[0] != n or gt_shape[2] != 4:
        raise invalid("plot_detections", "gt_boxes.shape", gt_shape,
                      f"expected ({n}, M, 4), as many images as images.shape[0]")
    for name, value in (("gt_labels", gt_labels), ("gt_valid", gt_valid)):
        if tuple(np.shape(value)) != gt_shape[:2]:
            raise invalid("plot_detections", f"{name}.shape", tuple(np.shape(value)),
                          f"expected {gt_shape[:2]}, one per ground-truth box")


def plot_detections(images: Any, detections: Any, gt_boxes: Any, gt_labels: Any, gt_valid: Any,
                    path: str, score_threshold: float = 0.5, max_images: int = 16,
                    title: str = "") -> str:
    """Draws up to `max_images` images with the ground-truth boxes (dashed white, their class
    below the left corner) and the valid detections scoring at least `score_threshold` (solid,
    one colour per class, labelled `class:score`); saves the grid to `path` (PNG) and returns
    it. Inputs are NumPy batches: images `[N, H, W, C]`, `Detections` fields `[N, K, ...]`,
    ground truth `[N, M, ...]`.
    Boxes are continuous `(x1, y1, x2, y2)` pixels: pixel `i` spans `[i, i + 1]` on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    score_threshold = check_number("plot_detections", "score_threshold", score_threshold,
                                   "expected a number in [0, 1]", low=0.0, high=1.0)
    _check_batch(images, detections, gt_boxes, gt_labels, gt_valid)
    count = min(check_positive_int("plot_detections", "max_images", max_images), len(images))
    columns = min(4, count)
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        image = _displayable(images[index])
        # Boxes are continuous pixels (pixel i covers [i, i + 1]); imshow's default extent
        # centres pixel i on i, which would draw every box half a pixel off.
        ax.imshow(image, cmap="gray", extent=(0, image.shape[1], image.shape[0], 0))
        for box, label, valid in zip(gt_boxes[index], gt_labels[index], gt_valid[index],
                                     strict=True):
            if valid:
                x1, y1, x2, y2 = box
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white",
                                       ls="--", lw=1.0))
                ax.text(x1, y2, f"{int(label)}", color="white", fontsize=7, va="top")
        for box, score, cls, valid in zip(detections.boxes[index], detections.scores[index],
                                          detections.classes[index], detections.valid[index],
                                          strict=True):
            if valid and score >= score_threshold:
                x1, y1, x2, y2 = box
                colour = colours(int(cls) % 10)
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour,
                                       lw=1.5))
                ax.text(x1, y1, f"{int(cls)}:{score:.2f}", color=colour, fontsize=7,
                        va="bottom")
    # One line per part: in one line the legend outgrew a one-column grid (3 in) and was cut.
    legend = ["dashed: ground truth", f"solid: detections, score >= {score_threshold:g}"]
    fig.suptitle("\n".join([title] * bool(title) + legend), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
