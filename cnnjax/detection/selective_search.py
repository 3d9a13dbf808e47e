"""Selective search region proposals (Uijlings et al., IJCV 2013), the external proposals of
R-CNN, SPP-net and Fast R-CNN.

A thin wrapper around OpenCV's implementation (`cv2.ximgproc.segmentation`, from the
`opencv-contrib-python-headless` wheel: `pip install "cnnjax[proposals]"`), which follows the
paper: Felzenszwalb-Huttenlocher segmentations grouped hierarchically by colour, texture, size and
fill similarity, in several colour spaces. "fast" is the paper's Selective Search Fast (2 colour
spaces, 2 segmentation scales; R-CNN's mode), "quality" its Selective Search Quality (5 colour
spaces, 4 scales: more boxes, ~3x slower).

Small images yield few segments, so `scale` upsamples before segmenting (boxes are returned in
the input's pixels). On `shapes_multi` (64x64 scenes) "fast" at scale 2 covers 99.9% of the
objects with IoU >= 0.7 using a median of 33 boxes per image (at most ~270; `python -m
benchmarks.proposals` on test[:500], 2026-12-06).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnjax.utils.validation import check_choice, check_number, check_positive_int, invalid

STRATEGIES = ("fast", "quality")
#: The upsampling factors `scale` may take (both ends included).
SCALE_RANGE = (0.25, 8.0)
_OWNER = "selective_search"


def _cv2() -> Any:
    """OpenCV with its contrib modules, or an ImportError that says which wheel to install."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError('selective search needs OpenCV: pip install "cnnjax[proposals]" '
                          "(opencv-contrib-python-headless)") from e
    if not hasattr(cv2, "ximgproc"):
        raise ImportError("selective search needs OpenCV's contrib modules (cv2.ximgproc): "
                          "install opencv-contrib-python-headless instead of opencv-python")
    return cv2


def opencv_version() -> str | None:
    """The version of the OpenCV `selective_search` runs on (`cv2.__version__`; its boxes
    depend on it), None where it cannot run (OpenCV, or its contrib modules, not installed)."""
    try:
        return str(_cv2().__version__)
    except ImportError:
        return None


def check_settings(owner: str, strategy: Any, scale: Any) -> None:
    """A ValueError naming `owner` unless `strategy` is one of STRATEGIES and `scale` in
    [0.25, 8]."""
    check_choice(owner, "strategy", strategy, STRATEGIES)
    low, high = SCALE_RANGE
    check_number(owner, "scale", scale, f"expected a number in [{low:g}, {high:g}] (the "
                 "upsampling applied before segmenting)", low=low, high=high, strings=False)


def pixel_levels(array: np.ndarray) -> np.ndarray:
    """A checked image (`_check_pixels`) as uint8 levels: floats rounded (254.9 is 255, not the
    cast's 254)."""
    return (np.rint(array) if np.issubdtype(array.dtype, np.floating) else array).astype(np.uint8)


def _check_pixels(array: np.ndarray, scale: float) -> None:
    """A ValueError unless `array` holds real, finite pixel values in [0, 255] and stays at least
    2 pixels per side once scaled (cv2.resize fails on an empty result; NaN, complex and
    out-of-range values were cast to uint8 silently)."""
    dtype = array.dtype
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer)
                                 or np.issubdtype(dtype, np.floating)):
        raise invalid(_OWNER, "image.dtype", str(dtype),
                      "expected uint8 (or another integer or float dtype, values in [0, 255])")
    if np.issubdtype(dtype, np.floating) and not np.isfinite(array).all():
        raise invalid(_OWNER, "image", "an array with NaN or infinite values",
                      "expected finite values in [0, 255]")
    # A normalized or 16-bit image would be clipped to uint8 and segmented as a near-flat one;
    # so would a float one in [0, 1] (all 0 and 1 levels: one box for a three-object scene).
    if array.size and (array.min() < 0 or array.max() > 255 or (
            np.issubdtype(dtype, np.floating) and array.max() <= 1 and array.any())):
        raise invalid(_OWNER, "image", f"<{dtype} values in [{array.min()}, {array.max()}]>",
                      "expected values in [0, 255] (pixel levels, not normalized to [0, 1] or "
                      "[-1, 1], nor 16-bit)")
    height, width = array.shape[:2]
    scaled = [int(np.rint(side * scale)) for side in (height, width)]  # cv2.resize's rounding
    if min(scaled) < 2:
        raise invalid(_OWNER, "scale", scale,
                      f"expected at least 2 pixels per side once scaled: the {height}x{width} "
                      f"image would be {scaled[0]}x{scaled[1]}")


def selective_search(image: Any, *, strategy: str = "fast", scale: float = 1.0,
                     max_boxes: int | None = None) -> np.ndarray:
    """Proposals `[K, 4]` float32 `(x1, y1, x2, y2)` in `image`'s pixels, duplicates removed,
    sorted (OpenCV ranks boxes with the C library's `rand()`, so its own order is not
    reproducible; the set is). With more than `max_boxes`, a uniformly random subset of that size
    (fixed seed) is kept, still sorted.

    `image`: `[H, W, 3]` RGB or `[H, W, 1]` / `[H, W]` grey, uint8 (or floats in [0, 255]).
    """
    check_settings(_OWNER, strategy, scale)
    if max_boxes is not None:
        check_positive_int(_OWNER, "max_boxes", max_boxes)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 2:
        raise invalid(_OWNER, "image", f"array of shape {np.shape(image)}",
                      "expected [H, W, 3], [H, W, 1] or [H, W] with H, W >= 2")
    _check_pixels(array, scale)
    cv2 = _cv2()
    bgr = np.ascontiguousarray(pixel_levels(array)[..., ::-1])
    if scale != 1:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if strategy == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), np.float64).reshape(-1, 4)  # (x, y, w, h)
    height, width = array.shape[:2]
    # Back by the actual resize factors: cv2.resize rounds W * scale and H * scale to whole
    # pixels, so dividing by `scale` misplaces boxes by up to half a resized pixel.
    factors = np.array([bgr.shape[1] / width, bgr.shape[0] / height] * 2)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / factors
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    boxes = np.unique(boxes, axis=0)
    if max_boxes is not None and len(boxes) > max_boxes:
        keep = np.random.default_rng(0).choice(len(boxes), max_boxes, replace=False)
        boxes = boxes[np.sort(keep)]
    return boxes
