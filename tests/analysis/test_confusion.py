"""cnnjax.analysis.confusion against scikit-learn's confusion_matrix."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from cnnjax.analysis.confusion import confusion_matrix, per_class_accuracy, plot_confusion_matrix


def test_equals_sklearn_and_per_class_accuracy_is_each_rows_recall():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 500)
    predictions = np.where(rng.random(500) < 0.7, labels, rng.integers(0, 6, 500))
    matrix = confusion_matrix(labels, predictions, 7)  # class 6 never occurs
    np.testing.assert_array_equal(matrix, sklearn_confusion_matrix(labels, predictions,
                                                                   labels=range(7)))
    recall = per_class_accuracy(matrix)
    for c in range(6):
        assert recall[c] == np.mean(predictions[labels == c] == c)
    assert np.isnan(recall[6])


def test_no_examples_give_a_matrix_of_zeros():
    """An empty split (no labels, no predictions) counts nothing: a [C, C] int64 matrix of
    zeros (hand reference), not a failure of min() on an empty array."""
    matrix = confusion_matrix(np.array([], int), np.array([], int), 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, np.zeros((3, 3), np.int64))


def test_bfloat16_class_indices_count_as_their_values():
    import ml_dtypes

    labels, predictions = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    np.testing.assert_array_equal(
        confusion_matrix(labels.astype(ml_dtypes.bfloat16),
                         predictions.astype(ml_dtypes.bfloat16), 3),
        confusion_matrix(labels, predictions, 3))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"^confusion_matrix: predictions.shape=\(2,\) is "
                                         r"invalid; expected the labels' shape \(3,\)"):
        confusion_matrix([0, 1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: predictions=.* expected class "
                                         r"indices in \[0, 3\)"):
        confusion_matrix([0, 1, 2], [0, 1, 3], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: num_classes=0 is invalid"):
        confusion_matrix([0], [0], 0)


def test_non_integer_and_multi_dimensional_inputs_are_refused_not_truncated():
    # 0.7 and 1.9 used to count silently as classes 0 and 1.
    with pytest.raises(ValueError, match=r"^confusion_matrix: predictions='values like \[0.7, "
                                         r"1.9\]' is invalid; expected integer class indices"):
        confusion_matrix([0, 1], np.array([0.7, 1.9]), 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: labels='values like \[nan\]'"):
        confusion_matrix([np.nan, 1.0], [0, 1], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: labels.dtype='bool' is invalid; "
                                         r"expected integer class indices"):
        confusion_matrix(np.array([True, False]), [0, 1], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: labels.shape=\(2, 2\) is invalid; "
                                         r"expected a 1-D array of class indices"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 3)
    # Integral floats are class indices: the same matrix as their integer form.
    np.testing.assert_array_equal(confusion_matrix([0.0, 2.0], [2.0, 2.0], 3),
                                  confusion_matrix([0, 2], [2, 2], 3))


def test_plot_writes_a_png(tmp_path):
    matrix = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    path = plot_confusion_matrix(matrix, str(tmp_path / "c.png"), title="t")
    assert path.endswith("c.png") and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intersection_over_union_equals_sklearns_jaccard():
    from sklearn.metrics import jaccard_score

    from cnnjax.analysis.confusion import intersection_over_union

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 4000)  # class 5 is never true, class 6 never anything
    predictions = np.where(rng.random(4000) < 0.6, labels, rng.integers(0, 6, 4000))
    scores = intersection_over_union(confusion_matrix(labels, predictions, 7))
    present = [0, 1, 2, 3, 4, 5]  # class 5 is predicted, so its IoU is 0 and it counts
    per_class = jaccard_score(labels, predictions, labels=present, average=None)
    assert scores["miou"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert [scores[f"iou/{c}"] for c in present] == pytest.approx(list(per_class), abs=1e-12)
    assert "iou/6" not in scores and scores["iou/5"] == 0.0
    from sklearn.metrics import accuracy_score

    assert scores["pixel_accuracy"] == pytest.approx(accuracy_score(labels, predictions),
                                                     abs=1e-12)
    with pytest.raises(ValueError, match=r"intersection_over_union: matrix.shape=\(2, 3\)"):
        intersection_over_union(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="expected at least one counted pixel"):
        intersection_over_union(np.zeros((3, 3)))


def test_plot_segmentation_writes_a_png(tmp_path):
    from cnnjax.analysis.confusion import plot_segmentation

    rng = np.random.default_rng(0)
    maps = rng.integers(0, 5, (3, 16, 16))
    path = plot_segmentation(rng.normal(size=(3, 16, 16, 3)), maps, maps[::-1],
                             str(tmp_path / "s.png"), num_classes=5, title="fcn")
    assert path == str(tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 1000
    ignored = np.where(maps == 0, 255, maps)  # unscored pixels (IGNORE_LABEL), 12 classes
    plot_segmentation(rng.normal(size=(3, 16, 16, 3)), ignored, maps, str(tmp_path / "i.png"),
                      num_classes=12)
    assert (tmp_path / "i.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="plot_segmentation: images=0 is invalid"):
        plot_segmentation(np.zeros((0, 4, 4, 3)), maps, maps, str(tmp_path / "t.png"), 5)


@pytest.mark.parametrize("num_classes", [5, 21, 70])
def test_segmentation_colours_are_distinct_per_class(num_classes):
    """21 classes (PASCAL VOC) must not share colours, as tab20's last one would."""
    from cnnjax.analysis.confusion import _class_colours

    cmap = _class_colours(num_classes)
    colours = {tuple(np.round(cmap(c / max(cmap.N - 1, 1)), 6)) for c in range(num_classes)}
    assert len(colours) == num_classes == cmap.N


def test_a_matrix_that_is_not_counts_is_refused():
    """A negative or NaN entry let a class's union cancel to 0 (TP + FP + FN = 1 + 0 - 1) and
    was refused as 'all zeros'; a string matrix failed in NumPy's float conversion unnamed; a
    non-square matrix reached the plot (a 1-D one failed with an AxisError)."""
    from cnnjax.analysis.confusion import intersection_over_union, plot_confusion_matrix

    for entry, shown in ((-1, r"-1\.0"), (np.nan, "nan"), (np.inf, "inf")):
        with pytest.raises(ValueError, match=rf"^intersection_over_union: matrix\[0, 1\]="
                                             rf"{shown} is invalid; expected counts: finite"):
            intersection_over_union([[1, entry], [0, 1]])
    with pytest.raises(ValueError, match=r"^intersection_over_union: matrix=.* is invalid; "
                                         r"expected a square \[C, C\] confusion matrix of"):
        intersection_over_union([["a"]])
    for shape in ((3,), (2, 3), (0, 0)):
        with pytest.raises(ValueError, match=r"^plot_confusion_matrix: matrix.shape="):
            plot_confusion_matrix(np.zeros(shape, np.int64), "/nonexistent/never_written.png")
    # counts still score as before: hand reference, IoU of class 0 = 1 / (1 + 1 + 0)
    assert intersection_over_union([[1, 1], [0, 2]])["iou/0"] == 0.5


def _drawn_ticks(monkeypatch, **kwargs):
    """The x and y tick labels of `plot_confusion_matrix`'s figure."""
    from cnnjax.analysis import confusion

    drawn = {}
    monkeypatch.setattr(confusion, "save_figure", lambda fig, path: drawn.setdefault("fig", fig)
                        and path)
    confusion.plot_confusion_matrix(confusion_matrix([0, 1, 2], [0, 2, 2], 3), "c.png", **kwargs)
    ax = drawn["fig"].axes[0]
    return ([t.get_text() for t in ax.get_xticklabels()],
            [t.get_text() for t in ax.get_yticklabels()])


def test_plot_labels_the_classes_it_is_given(monkeypatch):
    """A run on a class subset (data.classes=(5, 6, 7)) is drawn with the dataset's labels, not
    the renumbered 0..2 the model predicts."""
    assert _drawn_ticks(monkeypatch) == (["0", "1", "2"], ["0", "1", "2"])
    assert _drawn_ticks(monkeypatch, class_labels=["5", "6", "7"]) == (["5", "6", "7"],
                                                                       ["5", "6", "7"])


def test_plot_normalizes_each_true_class_to_one(monkeypatch, tmp_path):
    """The heat map shows each row (true class) over its total, as the colour bar says.
    Reference by hand: [[8, 2], [0, 10]] -> [[8/10, 2/10], [0/10, 10/10]] (over the columns'
    totals, 8 and 12, it would be [[1, 1/6], [0, 5/6]])."""
    import matplotlib.axes

    shown = []
    imshow = matplotlib.axes.Axes.imshow

    def spy(self, data, *args, **kwargs):
        shown.append(np.array(data, np.float64))
        return imshow(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    plot_confusion_matrix(np.array([[8, 2], [0, 10]]), str(tmp_path / "c.png"))
    assert len(shown) == 1
    np.testing.assert_allclose(shown[0], [[0.8, 0.2], [0.0, 1.0]], rtol=1e-15, atol=0)


def test_plot_refuses_class_labels_of_another_length(tmp_path):
    with pytest.raises(ValueError, match=r"^plot_confusion_matrix: class_labels=\['5', '6'\] is "
                                         r"invalid; expected 3 labels, one per row"):
        plot_confusion_matrix(confusion_matrix([0, 1, 2], [0, 2, 2], 3),
                              str(tmp_path / "never.png"), class_labels=["5", "6"])
    assert not (tmp_path / "never.png").exists()


@pytest.mark.parametrize(("matrix", "message"), [
    (np.array([3, 1]), r"matrix.shape=\(2,\) is invalid; expected a square \[C, C\]"),
    (np.ones((2, 3)), r"matrix.shape=\(2, 3\) is invalid; expected a square \[C, C\]"),
    (np.array([[1, -2], [0, 1]]), r"matrix\[0, 1\]=-2.0 is invalid; expected counts"),
    (np.array([[1, np.nan], [0, 1]]), r"matrix\[0, 1\]=nan is invalid; expected counts"),
])
def test_per_class_accuracy_refuses_what_is_not_a_confusion_matrix(matrix, message):
    """A [2, 3] matrix returned the diagonal over 3-entry rows (1/3, 1/3) as two recalls; a
    negative count made a row total < 1 read as 'no example' (NaN), and a 1-D array failed in
    NumPy with an AxisError naming no argument."""
    with pytest.raises(ValueError, match=r"^per_class_accuracy: " + message):
        per_class_accuracy(matrix)
    # counts still score as sklearn's recall (hand reference: row 0 1/3, row 1 empty -> NaN)
    np.testing.assert_array_equal(per_class_accuracy([[1, 2], [0, 0]]), [1 / 3, np.nan])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, r"num_classes=0 is invalid; expected a positive integer"),
    ({"num_classes": -1}, r"num_classes=-1 is invalid; expected a positive integer"),
    ({"num_classes": 2.5}, r"num_classes=2.5 is invalid; expected a positive integer"),
    ({"max_images": 0}, r"max_images=0 is invalid; expected a positive integer"),
    ({"labels": np.zeros((1, 4, 4), int)}, r"labels.shape=\(1, 4, 4\) is invalid; expected "
                                           r"\[N, h, w\] class maps, one per image \(N = 2\)"),
    ({"predictions": np.zeros((2, 4, 5), int)}, r"predictions.shape=\(2, 4, 5\) is invalid; "
                                                r"expected the labels' shape \(2, 4, 4\)"),
])
def test_plot_segmentation_names_a_bad_argument(tmp_path, kwargs, message):
    """num_classes=0 drew every pixel as 'no class' (blank maps) and -1 or 2.5 failed in
    matplotlib's words; class maps fewer than the images failed with an IndexError, and
    max_images=0 was reported as images=0."""
    from cnnjax.analysis.confusion import plot_segmentation

    args = {"images": np.zeros((2, 4, 4, 3)), "labels": np.zeros((2, 4, 4), int),
            "predictions": np.zeros((2, 4, 4), int), "path": str(tmp_path / "s.png"),
            "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match="^plot_segmentation: " + message):
        plot_segmentation(**args)
    assert not (tmp_path / "s.png").exists()
