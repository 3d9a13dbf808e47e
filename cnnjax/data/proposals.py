"""Per-image external region proposals for the detection input (`data.proposals`).

R-CNN, SPP-net and Fast R-CNN classify regions proposed outside the network. With
`data.proposals.method = "selective_search"` every image of a split gets its selective-search
boxes (`cnnjax.detection.selective_search`), computed once per split and setting and cached
beside the prepared dataset:

    <tfds data_dir>/<name>/<version>/proposals/<split>-<method>-<strategy>-x<scale>-max<P>.npz

holding each example's `tfds_id`, its boxes normalized like tfds' `bbox` (`[ymin, xmin, ymax,
xmax]` in [0, 1], so resizing and flipping treat them as the ground truth) padded to `P` rows,
and their count, plus a JSON `record` of what produced them (`ALGORITHM_VERSION`, the OpenCV
version, the settings, the split, the dataset and its version). `cnnjax.data.detection` joins
them to the examples by `tfds_id`. A cache whose record differs from the current one (or that
has none: written before records existed, or before they held the OpenCV version) is stale: it
is recomputed, with a warning that names the difference. Where selective search cannot run
(OpenCV, or its contrib modules, not installed: nothing could recompute it), a cache is used
whatever OpenCV made it. The cache is written atomically; concurrent processes each compute it
and the last rename wins (same content).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import time
import zipfile
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from cnnjax.data.spec import (  # noqa: F401 — the proposal settings live in spec.py
    DEFAULT_MAX_PROPOSALS,
    FIELDS,
    MAX_PROPOSALS_LIMIT,
    METHODS,
    ProposalSpec,
    default_proposals_config,
    proposal_spec,
    split_names,
)
from cnnjax.detection.selective_search import opencv_version, selective_search
from cnnjax.utils.files import atomic_file

#: Bumped whenever the boxes one setting produces change, so older caches are recomputed.
#: 1: caches without a record; 2: selective_search maps boxes back by cv2.resize's rounded
#: factors (7e2cdb4; version 1's boxes were off by up to half a resized pixel).
ALGORITHM_VERSION = 2
_RECOMPUTE = ("recomputing it (to do so ahead of a multi-process job: python -m "
              "experiments.proposals --config=<the experiment's config>)")


@dataclasses.dataclass(frozen=True)
class ProposalTable:
    """Every example's proposals of one split: `keys [N]` (tfds ids), `boxes [N, P, 4]`
    normalized `[ymin, xmin, ymax, xmax]` (zero rows past `counts [N]`)."""

    keys: np.ndarray
    boxes: np.ndarray
    counts: np.ndarray


def _normalized(boxes: np.ndarray, height: int, width: int, rows: int) -> np.ndarray:
    """Pixel `(x1, y1, x2, y2)` boxes as tfds' normalized `[ymin, xmin, ymax, xmax]`, padded."""
    out = np.zeros((rows, 4), np.float32)
    scaled = boxes[:, [1, 0, 3, 2]] / np.array([height, width, height, width], np.float32)
    out[: len(boxes)] = scaled
    return out


def compute_table(builder: Any, split: str, spec: ProposalSpec) -> ProposalTable:
    """Selective search on every image of `split`, streamed in chunks over all cores (OpenCV
    releases the GIL), with progress logged every ~10%."""
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 read_config=tfds.ReadConfig(add_tfds_id=True,
                                                             try_autocache=False))
    total = len(dataset)
    started = time.time()
    logging.info("cnnjax.data: selective search (%s, x%g) on %d images of %s[%s]...",
                 spec.strategy, spec.scale, total, builder.name, split)

    def one(image: np.ndarray) -> tuple[np.ndarray, int]:
        boxes = selective_search(image, strategy=spec.strategy, scale=spec.scale,
                                 max_boxes=spec.max_proposals)
        return _normalized(boxes, image.shape[0], image.shape[1], spec.max_proposals), len(boxes)

    keys, results = [], []
    every = max(1, total // 10)
    examples = iter(tfds.as_numpy(dataset))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        # In chunks, so a large split's images are never all in memory (sizes may differ).
        while chunk := list(itertools.islice(examples, every)):
            keys.extend(ex["tfds_id"] for ex in chunk)
            results.extend(pool.map(one, [ex["image"] for ex in chunk]))
            if len(results) < total:
                elapsed = time.time() - started
                logging.info("cnnjax.data: selective search %d/%d images, %.0f s, ETA %.0f s",
                             len(results), total, elapsed,
                             elapsed * (total - len(results)) / len(results))
    logging.info("cnnjax.data: selective search done in %.1f s (%.1f boxes per image)",
                 time.time() - started, np.mean([r[1] for r in results]) if results else 0.0)
    return ProposalTable(
        keys=np.asarray(keys, dtype=object).astype(bytes),
        boxes=np.stack([r[0] for r in results]) if results else
        np.zeros((0, spec.max_proposals, 4), np.float32),
        counts=np.asarray([r[1] for r in results], np.int32))


def cache_record(builder: Any, split: str, spec: ProposalSpec) -> dict[str, Any]:
    """What a cache of `split` computed with `spec` records of its making (JSON-safe)."""
    version = getattr(builder, "version", None)
    return {"algorithm_version": ALGORITHM_VERSION, "opencv_version": opencv_version(),
            "split": split,
            "dataset": getattr(builder, "name", None),
            "dataset_version": None if version is None else str(version),
            **dataclasses.asdict(spec)}


class StaleCacheError(ValueError):
    """A readable cache made by another algorithm version, OpenCV, setting, split or dataset."""


def _check_record(found: Any, expected: dict[str, Any]) -> None:
    """A StaleCacheError naming how the cache's `found` record (None: absent) differs."""
    if not isinstance(found, dict):
        raise StaleCacheError(
            f"it has no record of its making: written by an older cnnjax (algorithm version 1), "
            f"before version {ALGORITHM_VERSION}'s fix of its boxes")
    if found.get("split") != expected["split"]:
        raise StaleCacheError(f"it holds the proposals of split {found.get('split')!r}")
    # Without selective search here (None: no OpenCV, or no contrib modules) the cache cannot
    # be recomputed, so any OpenCV's is used.
    differ = [f"{name}={found.get(name)!r} (now {value!r})"
              for name, value in expected.items() if found.get(name) != value
              and not (name == "opencv_version" and value is None)]
    if differ:
        raise StaleCacheError("it was computed with " + ", ".join(differ))


def _read_cache(path: str, expected: dict[str, Any], then: str = _RECOMPUTE
                ) -> ProposalTable | None:
    """The table cached at `path` if its record is `expected`; None (with a warning ending in
    what happens `then`) for a file that is unreadable (a partial copy) or stale (another
    version, OpenCV, setting, split or dataset)."""
    try:
        with np.load(path) as cached:
            record = json.loads(str(cached["record"])) if "record" in cached else None
            _check_record(record, expected)
            return ProposalTable(cached["keys"], cached["boxes"], cached["counts"])
    except StaleCacheError as err:
        logging.warning("cnnjax.data: the proposals cache %s is stale (%s); %s.", path, err,
                        then)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        logging.warning("cnnjax.data: ignoring the proposals cache %s (%s: %s); %s.",
                        path, type(err).__name__, err, then)
    return None


def load_table(builder: Any, split: str, spec: ProposalSpec) -> ProposalTable:
    """The cached table of `split`, computed and cached (atomically) first if missing or
    unusable. A slice or join of whole splits whose tables are cached (e.g. `train[0:6]` after
    `experiments.proposals` prepared `train`) reads those: the join is by `tfds_id`, so a
    table of more examples serves a slice of them."""
    path = spec.cache_path(builder, split)
    record = cache_record(builder, split, spec)
    if os.path.exists(path) and (table := _read_cache(path, record)) is not None:
        return table
    if (whole := _whole_split_tables(builder, split, spec)) is not None:
        return whole
    table = compute_table(builder, split, spec)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path, "wb") as f:
        np.savez(f, keys=table.keys, boxes=table.boxes, counts=table.counts,
                 record=np.asarray(json.dumps(record, sort_keys=True)))
    return table


def _whole_split_tables(builder: Any, split: str, spec: ProposalSpec) -> ProposalTable | None:
    """The cached tables of the whole splits `split` slices or joins, merged; None when it is
    a plain split name or one of them is not cached."""
    names = split_names(split)
    if names == [split]:
        return None
    tables = []
    for name in names:
        path = spec.cache_path(builder, name)
        record = cache_record(builder, name, spec)
        # This slice's own table is computed instead; the whole split's stays as it is until
        # a run (or experiments.proposals) reads that split itself.
        table = (_read_cache(path, record, f"computing {split!r} on its own instead")
                 if os.path.exists(path) else None)
        if table is None:
            return None
        tables.append(table)
    # Every table of one spec has `max_proposals` rows per example (its cache name says so).
    return ProposalTable(*(np.concatenate([getattr(t, f) for t in tables])
                           for f in ("keys", "boxes", "counts")))


class ProposalLookup:
    """A tf.data-side join: `(boxes [P, 4], count)` of an example from its `tfds_id`."""

    def __init__(self, table: ProposalTable):
        self._rows = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(table.keys, tf.string),
                tf.range(len(table.keys), dtype=tf.int64)),
            default_value=-1)
        self._boxes = tf.constant(table.boxes, tf.float32)
        self._counts = tf.constant(table.counts, tf.int32)

    def __call__(self, tfds_id: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The example's cached `(boxes [P, 4], count)`; fails in the graph for an unknown id."""
        row = self._rows.lookup(tfds_id)
        tf.debugging.assert_non_negative(row, message="an example without cached proposals")
        return tf.gather(self._boxes, row), tf.gather(self._counts, row)
