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

`shapes_multi` (`ShapesMulti`, same shapes and rendering) is the detection set: 64x64 scenes of
1-4 shapes with disjoint boxes, `train` 4,000 (split seed 11), `test` 500 (seed 12).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
    foreground = _colour_apart(background, rng)
    coverage = _coverage(label, cx, cy, r, IMAGE_SIZE)
    image = background * (1 - coverage[..., None]) + foreground * coverage[..., None]
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    bbox = np.clip(np.array([cy - r, cx - r, cy + r, cx + r]) / IMAGE_SIZE, 0.0, 1.0)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), bbox.astype(np.float32)


def _coverage(label: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Fraction `[size, size]` of each pixel the shape covers (4x4 supersampling)."""
    n = size * SUPERSAMPLING
    grid = (np.arange(n) + 0.5) / SUPERSAMPLING  # sub-pixel centres in pixel units
    mask = _INSIDE[CLASS_NAMES[label]](grid[None, :] - cx, grid[:, None] - cy, r)
    return mask.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean((1, 3))


def _colour_apart(background: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A random RGB colour at least `MIN_COLOR_DISTANCE` (L1) from `background`."""
    colour = rng.randint(0, 256, size=3)
    while np.abs(colour - background).sum() < MIN_COLOR_DISTANCE:
        colour = rng.randint(0, 256, size=3)
    return colour


def generate(split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(key, example)` for every example of `split`, in order."""
    num_examples, split_seed = SPLITS[split]
    for i in range(num_examples):
        label = i % len(CLASS_NAMES)
        image, bbox = render(label, np.random.RandomState([split_seed, i]))
        yield i, {"image": image, "label": label,
                  "objects": {"bbox": bbox[None], "label": np.array([label])}}


def _features(image_size: int) -> tfds.features.FeaturesDict:
    """Both builders' features: an RGB image, its label and every shape's box and class."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(image_size, image_size, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "objects": tfds.features.Sequence(
                {
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
        }
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """tfds builder for synthetic one-shape images (registered as `shapes`)."""

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_NAMES = tuple(SPLITS)  # known before the data is generated
    RELEASE_NOTES = {"1.0.0": "Initial release: 2,000 train / 400 test, 4 balanced classes."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_features(IMAGE_SIZE),
            supervised_keys=("image", "label"),
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager,
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # Generated locally: nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from generate(split)


# ------------------------------------------------------------------------------ shapes_multi
MULTI_IMAGE_SIZE = 64
MULTI_MAX_OBJECTS = 4
MULTI_SPLITS = {"train": (4000, 11), "test": (500, 12)}  # name: (examples, split seed)
_PLACEMENT_TRIES = 100


def render_multi(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws one `shapes_multi` scene: `(image uint8 [64, 64, 3], bboxes float32 [n, 4]
    normalized [ymin, xmin, ymax, xmax], labels int64 [n])`, 1 <= n <= 4 (`render_scene`)."""
    return render_scene(rng)[:3]


def render_scene(rng: np.random.RandomState,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draws one scene: `(image uint8 [64, 64, 3], bboxes float32 [n, 4] normalized [ymin, xmin,
    ymax, xmax], labels int64 [n], class_map uint8 [64, 64])`, 1 <= n <= 4; `class_map` is 0
    for background and `label + 1` where a shape covers at least half the pixel.

    The scene wants `n ~ U{1..4}` shapes of random class, half-size in [5, 12] px, each in its
    own colour (at least 150 L1 from the background) and with a box disjoint from the others'
    (a shape that finds no free place in 100 tries is left out, so every box is fully visible).
    """
    wanted = rng.randint(1, MULTI_MAX_OBJECTS + 1)
    background = rng.randint(0, 256, size=3)
    image = np.broadcast_to(background.astype(np.float64), (MULTI_IMAGE_SIZE,) * 2 + (3,))
    class_map = np.zeros((MULTI_IMAGE_SIZE, MULTI_IMAGE_SIZE), np.uint8)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(wanted):
        label = rng.randint(len(CLASS_NAMES))
        r = rng.uniform(MIN_RADIUS, MAX_RADIUS)
        colour = _colour_apart(background, rng)
        for _ in range(_PLACEMENT_TRIES):
            cx, cy = rng.uniform(r, MULTI_IMAGE_SIZE - r, size=2)
            box = np.array([cy - r, cx - r, cy + r, cx + r])
            if all(box[0] >= b[2] or b[0] >= box[2] or box[1] >= b[3] or b[1] >= box[3]
                   for b in boxes):
                break
        else:
            continue
        coverage = _coverage(label, cx, cy, r, MULTI_IMAGE_SIZE)[..., None]
        image = image * (1 - coverage) + colour * coverage
        class_map[coverage[..., 0] >= 0.5] = label + 1
        boxes.append(box)
        labels.append(label)
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    bboxes = np.clip(np.array(boxes) / MULTI_IMAGE_SIZE, 0.0, 1.0).astype(np.float32)
    return (np.clip(np.rint(image), 0, 255).astype(np.uint8), bboxes,
            np.array(labels, np.int64), class_map)


def generate_multi(split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(key, example)` for every `shapes_multi` example of `split`, in order."""
    num_examples, split_seed = MULTI_SPLITS[split]
    for i in range(num_examples):
        image, bboxes, labels = render_multi(np.random.RandomState([split_seed, i]))
        sides = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        yield i, {"image": image, "label": int(labels[np.argmax(sides)]),
                  "objects": {"bbox": bboxes, "label": labels}}


class ShapesMulti(tfds.core.GeneratorBasedBuilder):
    """tfds builder for 64x64 scenes of 1-4 shapes (registered as `shapes_multi`).

    `objects` holds every shape's box and class (detection); the image-level `label` is the class
    of the shape with the largest bounding box (the first on ties; not the largest painted area,
    which favours squares over crosses and triangles of the same box), so the set also reads as
    a classification set.
    """

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_NAMES = tuple(MULTI_SPLITS)  # known before the data is generated
    RELEASE_NOTES = {"1.0.0": "Initial release: 4,000 train / 500 test scenes of 1-4 shapes."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=render_multi.__doc__,
            features=_features(MULTI_IMAGE_SIZE),
            supervised_keys=("image", "label"),
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager,
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # Generated locally: nothing to download.
        return {split: self._generate_examples(split) for split in MULTI_SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from generate_multi(split)


# ----------------------------------------------------------------------- shapes_segmentation
SEGMENTATION_CLASSES = ("background", *CLASS_NAMES)  # class_map value i is class i
SEGMENTATION_SPLITS = {"train": (2000, 21), "test": (500, 22)}  # name: (examples, split seed)


def generate_segmentation(split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(key, example)` for every `shapes_segmentation` example of `split`, in order:
    `shapes_multi`-style scenes (other seeds) with their per-pixel class map."""
    num_examples, split_seed = SEGMENTATION_SPLITS[split]
    for i in range(num_examples):
        image, bboxes, labels, class_map = render_scene(np.random.RandomState([split_seed, i]))
        sides = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        yield i, {"image": image, "label": int(labels[np.argmax(sides)]),
                  "objects": {"bbox": bboxes, "label": labels},
                  "segmentation_mask": class_map[..., None]}


class ShapesSegmentation(tfds.core.GeneratorBasedBuilder):
    """tfds builder for 64x64 scenes of 1-4 shapes with a per-pixel class map (registered as
    `shapes_segmentation`): `segmentation_mask` uint8 `[64, 64, 1]`, 0 background and
    `1 + label` on each shape (classes in `metadata['segmentation_classes']`), plus the same
    `objects` and image `label` as `shapes_multi`."""

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_NAMES = tuple(SEGMENTATION_SPLITS)  # known before the data is generated
    RELEASE_NOTES = {"1.0.0": "Initial release: 2,000 train / 500 test scenes, 5 classes."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = dict(_features(MULTI_IMAGE_SIZE))
        features["segmentation_mask"] = tfds.features.Image(
            shape=(MULTI_IMAGE_SIZE, MULTI_IMAGE_SIZE, 1), dtype=np.uint8)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "segmentation_mask"),
            metadata=tfds.core.MetadataDict(segmentation_classes=list(SEGMENTATION_CLASSES)),
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager,
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # Generated locally: nothing to download.
        return {split: self._generate_examples(split) for split in SEGMENTATION_SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from generate_segmentation(split)
