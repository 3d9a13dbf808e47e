"""plot_detections draws exactly the ground truth and the detections above the threshold."""

import re

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from cnnjax.detection import visualize
from cnnjax.detection.postprocess import Detections


def test_draws_valid_gt_and_confident_detections_only(tmp_path, monkeypatch):
    figures = []
    save = visualize.save_figure
    monkeypatch.setattr(visualize, "save_figure",
                        lambda fig, path: figures.append(fig) or save(fig, path))
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3))
    detections = Detections(
        boxes=np.tile(np.array([[1.0, 2, 8, 9], [3, 3, 12, 12], [0, 0, 4, 4]]), (3, 1, 1)),
        scores=np.array([[0.9, 0.6, 0.4]] * 3),
        classes=np.array([[0, 1, 2]] * 3),
        valid=np.array([[True, True, True], [True, False, True], [False, False, False]]))
    gt_boxes = np.tile(np.array([[1.0, 1, 9, 9], [0, 0, 0, 0]]), (3, 1, 1))
    gt_valid = np.array([[True, False]] * 3)
    path = visualize.plot_detections(images, detections, gt_boxes, np.full((3, 2), 4),
                                     gt_valid, str(tmp_path / "d.png"), score_threshold=0.5)
    assert (tmp_path / "d.png").stat().st_size > 1000 and path.endswith("d.png")
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.images]
    drawn = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in axes]
    # Image 0: gt + 2 detections >= 0.5; image 1: gt + 1 (the 0.6 one is not valid); image 2: gt.
    assert [len(d) for d in drawn] == [3, 2, 1]
    assert drawn[0][1].get_xy() == (1.0, 2.0) and drawn[0][1].get_width() == 7.0
    assert [t.get_text() for t in axes[0].texts] == ["4", "0:0.90", "1:0.60"]
    assert axes[0].texts[0].get_position() == (1.0, 9.0)  # the gt class below its box


def test_bad_arguments_are_named(tmp_path):
    empty = Detections(*(np.zeros((1, 1, 4)), np.zeros((1, 1)), np.zeros((1, 1), int),
                         np.zeros((1, 1), bool)))
    args = (np.zeros((1, 8, 8, 1)), empty, np.zeros((1, 1, 4)), np.zeros((1, 1), int),
            np.zeros((1, 1), bool), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"^plot_detections: score_threshold=1.5 is invalid"):
        visualize.plot_detections(*args, score_threshold=1.5)
    with pytest.raises(ValueError, match=r"^plot_detections: max_images=0 is invalid"):
        visualize.plot_detections(*args, max_images=0)


def test_boxes_and_pixels_share_continuous_coordinates(tmp_path, monkeypatch):
    """Pixel i spans [i, i + 1] on the axes, as a box's (x1, y1, x2, y2): an object filling
    pixels 4..7 is the box (4, 4, 8, 8) and is drawn on the pixel edges (imshow's default extent
    centred pixel i on i, half a pixel off every box)."""
    figures = []
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or path)
    image = np.zeros((1, 16, 12, 1))
    image[0, 4:8, 4:8] = 1.0
    box = np.array([[[4.0, 4, 8, 8]]])
    visualize.plot_detections(image, Detections(box, np.array([[0.9]]), np.array([[0]]),
                                                np.array([[True]])),
                              box, np.zeros((1, 1), int), np.array([[True]]),
                              str(tmp_path / "d.png"))
    (ax,) = [ax for ax in figures[0].axes if ax.images]
    left, right, bottom, top = ax.images[0].get_extent()
    assert (left, right, bottom, top) == (0, 12, 16, 0)
    # Data x of pixel column 4's left edge: left + 4 * (right - left) / width.
    assert left + 4 * (right - left) / 12 == 4.0 and top + 8 * (bottom - top) / 16 == 8.0
    rect = [p for p in ax.patches if isinstance(p, Rectangle)][1]
    assert rect.get_xy() == (4.0, 4.0) and rect.get_width() == 4.0


def _detections(n, k=1):
    return Detections(np.zeros((n, k, 4)), np.zeros((n, k)), np.zeros((n, k), int),
                      np.zeros((n, k), bool))


@pytest.mark.parametrize("images, detections, gt_boxes, message", [
    # no image: a ZeroDivisionError from the grid layout
    (np.zeros((0, 8, 8, 3)), _detections(0), np.zeros((0, 1, 4)),
     r"^plot_detections: images.shape=\(0, 8, 8, 3\) is invalid; expected \[N, H, W, C\] with "
     r"N >= 1"),
    (np.zeros((8, 8, 3)), _detections(1), np.zeros((1, 1, 4)),
     r"^plot_detections: images.shape=\(8, 8, 3\) is invalid"),
    # fewer ground-truth rows or detections than images: an IndexError mid-drawing
    (np.zeros((2, 8, 8, 3)), _detections(2), np.zeros((1, 1, 4)),
     r"^plot_detections: gt_boxes.shape=\(1, 1, 4\) is invalid; expected \(2, M, 4\)"),
    (np.zeros((2, 8, 8, 3)), _detections(1), np.zeros((2, 1, 4)),
     r"^plot_detections: detections.boxes.shape=\(1, 1, 4\) is invalid; expected \(2, K, 4\)"),
    # 2 channels: matplotlib's TypeError mid-drawing; 4: drawn as RGBA, silently
    (np.zeros((1, 8, 8, 2)), _detections(1), np.zeros((1, 1, 4)),
     r"^plot_detections: images.shape=\(1, 8, 8, 2\) is invalid; expected 1 \(grey\) or 3"),
    (np.zeros((1, 8, 8, 4)), _detections(1), np.zeros((1, 1, 4)),
     r"^plot_detections: images.shape=\(1, 8, 8, 4\) is invalid; expected 1 \(grey\) or 3"),
])
def test_bad_batches_are_a_value_error(tmp_path, images, detections, gt_boxes, message):
    n = gt_boxes.shape[0]
    with pytest.raises(ValueError, match=message):
        visualize.plot_detections(images, detections, gt_boxes, np.zeros((n, 1), int),
                                  np.zeros((n, 1), bool), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_gt_labels_of_another_shape_are_named(tmp_path):
    """The labels are drawn now, so a shorter row was an IndexError mid-drawing."""
    with pytest.raises(ValueError, match=re.escape(
            "plot_detections: gt_labels.shape=(1,) is invalid; expected (1, 1), one per "
            "ground-truth box")):
        visualize.plot_detections(np.zeros((1, 8, 8, 3)), _detections(1), np.zeros((1, 1, 4)),
                                  np.zeros(1, int), np.ones((1, 1), bool),
                                  str(tmp_path / "x.png"))


@pytest.mark.parametrize("count", [1, 4])
def test_the_title_fits_the_figure(tmp_path, monkeypatch, count):
    """With one image the figure is 3 in wide, and the title with its legend on one line (about
    4.5 in) was cut on both sides."""
    figures = []
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path: figures.append(fig) or path)
    visualize.plot_detections(np.zeros((count, 8, 8, 3)), _detections(count),
                              np.zeros((count, 1, 4)), np.zeros((count, 1), int),
                              np.zeros((count, 1), bool), str(tmp_path / "d.png"),
                              title="rcnn_small, step 1000 (best map50)")
    (fig,) = figures
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    assert fig._suptitle.get_text().splitlines()[0] == "rcnn_small, step 1000 (best map50)"
