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


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"^confusion_matrix: predictions.shape=\(2,\) is "
                                         r"invalid; expected the labels' shape \(3,\)"):
        confusion_matrix([0, 1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: predictions=.* expected class "
                                         r"indices in \[0, 3\)"):
        confusion_matrix([0, 1, 2], [0, 1, 3], 3)
    with pytest.raises(ValueError, match=r"^confusion_matrix: num_classes=0 is invalid"):
        confusion_matrix([0], [0], 0)


def test_plot_writes_a_png(tmp_path):
    matrix = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    path = plot_confusion_matrix(matrix, str(tmp_path / "c.png"), title="t")
    assert path.endswith("c.png") and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
