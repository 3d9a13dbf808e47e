"""`digits`: scikit-learn's 1,797 real 8x8 handwritten digit scans as an offline tfds dataset.

The scans ship inside scikit-learn (`sklearn.datasets.load_digits`), so the dataset is generated
locally into the tfds data dir on first use; nothing is downloaded. It is the default dataset of
`make train` (LeNet-5 upsamples the images to 32x32 in the input pipeline, not here).

Split (deterministic, stratified, independent of library versions): for each class `c`, the indices
of that class in `load_digits()` are permuted by the legacy `numpy.random.RandomState(0)` generator
(whose stream NumPy keeps frozen) and the first `round(0.2 * n_c)` go to `test`, the rest to
`train`. Class counts are 178, 182, 177, 183, 181, 182, 181, 179, 174, 180, so the splits hold

    train: 1,438 examples (142, 146, 142, 146, 145, 146, 145, 143, 139, 144 per class)
    test:    359 examples ( 36,  36,  35,  37,  36,  36,  36,  36,  35,  36 per class)

Pixels are the scans' 0..16 block counts rescaled to uint8 0..255 with exact integer rounding
(halves up): `(x * 255 + 8) // 16`, so 0 -> 0, 8 -> 128, 16 -> 255.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_TRAIN = 1438
NUM_TEST = 359

_DESCRIPTION = """\
The 1,797 8x8 handwritten digit images bundled with scikit-learn (the test set of the UCI
"Optical Recognition of Handwritten Digits" data: 32x32 NIST bitmaps reduced to 8x8 blocks of
on-pixel counts 0..16), rescaled to uint8 0..255, with a stratified 80/20 train/test split
(1,438 / 359 examples) drawn per class with numpy.random.RandomState(0).
"""

_CITATION = """\
@misc{alpaydin1998digits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}
"""


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as `(images uint8 [1797, 8, 8, 1], labels int64 [1797])`."""
    from sklearn.datasets import load_digits  # Deferred: only building the dataset needs sklearn.

    digits = load_digits()
    counts = digits.images.astype(np.int64)  # Integer block counts 0..16 stored as float64.
    images = ((counts * 255 + 8) // 16).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the sorted example indices of the `train` and `test` splits (see module doc)."""
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        num_test = int(round(TEST_FRACTION * len(members)))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


class Digits(tfds.core.GeneratorBasedBuilder):
    """tfds builder for scikit-learn's 8x8 digit scans (registered as `digits`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1,438 train / 359 test, stratified, seed 0."}
    SPLIT_NAMES = ("train", "test")  # split_indices' keys: known before the data is generated

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    # Row of the example in `sklearn.datasets.load_digits()`, for traceability.
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=_CITATION,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager,
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # The scans ship with scikit-learn: nothing to download.
        images, labels = load_scans()
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in split_indices(labels).items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}
