"""`shapes`: synthetic 32x32 RGB images of one geometric shape each, generated offline.

A small colour dataset that needs no download: quick CIFAR-style experiments (ResNet-20 with
pad-crop-flip augmentation) and, through its `objects` boxes, a toy localization/detection set.

Each image shows one shape (`circle`, `square`, `triangle`, `cross`; class `i % 4` for example
`i`, so classes are balanced) of half-size `r` in [5, 12] px at a random centre where it fits,
in a random colour at least 150 (L1 over RGB) from a random background colour, rendered with 4x4
supersampling (soft edges) plus Gaussian noise (sigma 8 grey levels). Every example draws from
`numpy.random.RandomState([split_seed, i])` (a frozen NumPy stream), so builds are identical.

Splits: `train` 2,000 examples (500 per class, split seed 1), `test` 400 (100 per class, seed 2).
`objects/bbox` is the shape's box `[ymin, xmin, ymax, xmax]` normalized to [0, 1].
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
CLASS_NAMES = ("circle", "square", "triangle", "cross")
SPLITS = {"train": (2000, 1), "test": (400, 2)}  # name: (examples, split seed)
SUPERSAMPLING = 4
NOISE_STD = 8.0
MIN_RADIUS, MAX_RADIUS = 5.0, 12.0
MIN_COLOR_DISTANCE = 150


# Whether offsets `(dx, dy)` from the centre (pixel units) lie inside a shape of half-size `r`.
_INSIDE = {
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "square": lambda dx, dy, r: (np.abs(dx) <= r) & (np.abs(dy) <= r),
    # Apex up at (0, -r); base from -r to r at dy = r.
    "triangle": lambda dx, dy, r: (dy <= r) & (np.abs(dx) <= (dy + r) / 2),
    # A plus sign with arms of width 2r/3.
    "cross": lambda dx, dy, r: ((np.abs(dx) <= r) & (np.abs(dy) <= r / 3))
    | ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)),
}


def render(label: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Draws one example: `(image uint8 [32, 32, 3], bbox float32 [4] normalized)`."""
    r = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
    background = rng.randint(0, 256, size=3)
    foreground = rng.randint(0, 256, size=3)
    while np.abs(foreground - background).sum() < MIN_COLOR_DISTANCE:
        foreground = rng.randint(0, 256, size=3)
    n = IMAGE_SIZE * SUPERSAMPLING
    grid = (np.arange(n) + 0.5) / SUPERSAMPLING  # sub-pixel centres in pixel units
    mask = _INSIDE[CLASS_NAMES[label]](grid[None, :] - cx, grid[:, None] - cy, r)
    coverage = mask.reshape(IMAGE_SIZE, SUPERSAMPLING, IMAGE_SIZE, SUPERSAMPLING).mean((1, 3))
    image = background * (1 - coverage[..., None]) + foreground * coverage[..., None]
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    bbox = np.clip(np.array([cy - r, cx - r, cy + r, cx + r]) / IMAGE_SIZE, 0.0, 1.0)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), bbox.astype(np.float32)


def generate(split: str):
    """Yields `(key, example)` for every example of `split`, in order."""
    num_examples, split_seed = SPLITS[split]
    for i in range(num_examples):
        label = i % len(CLASS_NAMES)
        image, bbox = render(label, np.random.RandomState([split_seed, i]))
        yield i, {"image": image, "label": label,
                  "objects": {"bbox": bbox[None], "label": np.array([label])}}


class Shapes(tfds.core.GeneratorBasedBuilder):
    """tfds builder for synthetic one-shape images (registered as `shapes`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 2,000 train / 400 test, 4 balanced classes."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                                 dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                        }
                    ),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Generated locally: nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        yield from generate(split)
