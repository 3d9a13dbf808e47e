"""`data.proposals`: the config's checks and defaults, the on-disk cache, the tf.data join by
tfds id. (The proposals in real batches are checked in test_detection.py, on shapes_multi.)"""

import dataclasses
import errno
import json
import os
import re
import sys
import types

import cv2
import numpy as np
import pytest
import tensorflow as tf

from cnnjax.data import proposals as pl
from cnnjax.data.detection import default_data_config, prepare_proposals
from cnnjax.detection import selective_search


def _config(**fields):
    config = pl.default_proposals_config()
    for key, value in fields.items():
        config[key] = value
    return config


def test_unset_means_no_proposals_and_defaults_fill_in():
    assert pl.proposal_spec(_config()) is None
    assert pl.proposal_spec(None) is None
    assert pl.proposal_spec(default_data_config("shapes").proposals) is None  # detection data
    assert pl.proposal_spec(_config(method="selective_search")) == pl.ProposalSpec(
        "selective_search", "fast", 1.0, pl.DEFAULT_MAX_PROPOSALS)
    spec = pl.proposal_spec(_config(method="selective_search", strategy="quality", scale=2.0,
                                    max_proposals=64))
    assert spec == pl.ProposalSpec("selective_search", "quality", 2.0, 64)
    builder = types.SimpleNamespace(data_dir="/data/shapes_multi/1.0.0")
    assert spec.cache_path(builder, "train") == (
        "/data/shapes_multi/1.0.0/proposals/train-selective_search-quality-x2-max64.npz")
    sliced = {spec.cache_path(builder, s) for s in ("train[:90%]", "train[90%:]", "train[:90]")}
    assert len(sliced) == 3  # one file name would serve the wrong examples
    assert all(os.path.basename(p).startswith("train_90_-") for p in sliced)


@pytest.mark.parametrize("fields,message", [
    ({"method": "edge_boxes"}, "data.proposals: method='edge_boxes' is invalid; expected one of "
                               "['selective_search']."),
    ({"method": "selective_search", "strategy": "best"},
     "data.proposals: strategy='best' is invalid; expected one of ['fast', 'quality']."),
    ({"method": "selective_search", "scale": 20.0},
     "data.proposals: scale=20.0 is invalid; expected a number in [0.25, 8]"),
    ({"method": "selective_search", "max_proposals": -1},
     "data.proposals: max_proposals=-1 is invalid; expected a positive integer."),
    ({"method": "selective_search", "max_proposals": 0},
     "data.proposals: max_proposals=0 is invalid; expected a positive integer."),
    ({"method": "selective_search", "max_proposals": 10**9},
     "data.proposals: max_proposals=1000000000 is invalid; expected at most 10,000"),
    ({"method": "selective_search", "strategy": ""},
     "data.proposals: strategy='' is invalid; expected one of ['fast', 'quality']."),
    # settings of no method were ignored (the run used its own proposals and recorded these)
    ({"strategy": "quality"}, "data.proposals: strategy='quality' is invalid; expected it unset "
                              "while method is unset (the model's own proposals or dense "
                              "windows); set method to one of ['selective_search'] to use it"),
    ({"scale": 2.0, "max_proposals": -5}, "data.proposals: scale=2.0 is invalid; expected it "
                                          "unset while method is unset"),
])
def test_bad_settings(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pl.proposal_spec(_config(**fields))


def test_max_proposals_at_the_limit_is_taken_one_past_it_refused():
    """The message says "at most 10,000": 10,000 itself is allowed."""
    spec = pl.proposal_spec(_config(method="selective_search", max_proposals=10_000))
    assert spec.max_proposals == 10_000
    with pytest.raises(ValueError, match=re.escape(
            "data.proposals: max_proposals=10001 is invalid; expected at most 10,000")):
        pl.proposal_spec(_config(method="selective_search", max_proposals=10_001))


def test_cache_files_of_nearby_scales_differ():
    """Scales that differ within 10 significant digits get their own file: with a coarser
    name, 1.2's cache would be read (and recomputed, with a warning) for 1.25 on every run."""
    builder = types.SimpleNamespace(data_dir="/d")
    base = pl.proposal_spec(_config(method="selective_search"))
    paths = {scale: dataclasses.replace(base, scale=scale).cache_path(builder, "train")
             for scale in (1.2, 1.25, 1.0, 1.0000001)}
    assert paths[1.2] == "/d/proposals/train-selective_search-fast-x1.2-max256.npz"
    assert len(set(paths.values())) == 4
    assert paths[1.0000001].endswith("-x1.0000001-max256.npz")


def test_nothing_to_prepare_without_a_method(tmp_path):
    config = default_data_config("shapes")
    config.data_dir = str(tmp_path)  # refused before any dataset is opened or built
    with pytest.raises(ValueError, match=re.escape(
            "data: proposals.method=None is invalid; expected one of ['selective_search'] "
            "(nothing to prepare).")):
        prepare_proposals(config)
    assert not os.listdir(tmp_path)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=re.escape(
            "data.proposals: field='top_k' is invalid; expected one of ['method', 'strategy', "
            "'scale', 'max_proposals'].")):
        pl.proposal_spec({"method": "selective_search", "top_k": 5})
    with pytest.raises(ValueError, match=r"data.proposals: config='selective_search' is invalid"):
        pl.proposal_spec("selective_search")


def _table(rows: int = 3) -> pl.ProposalTable:
    boxes = np.zeros((2, rows, 4), np.float32)
    boxes[0, :2] = [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]
    boxes[1, :1] = [[0.25, 0.5, 0.75, 1.0]]
    return pl.ProposalTable(np.array([b"set-train__0", b"set-train__1"]), boxes,
                            np.array([2, 1], np.int32))


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """`(calls, builder, spec)` with `compute_table` replaced by a stub that records its splits."""
    calls = []

    def compute(builder, split, spec):
        calls.append(split)
        return _table(spec.max_proposals)

    monkeypatch.setattr(pl, "compute_table", compute)
    builder = types.SimpleNamespace(data_dir=str(tmp_path))
    return calls, builder, pl.ProposalSpec("selective_search", "fast", 1.0, 3)


def test_the_cache_is_computed_once(tmp_path, counted):
    calls, builder, spec = counted
    first = pl.load_table(builder, "train", spec)
    again = pl.load_table(builder, "train", spec)
    assert calls == ["train"]  # the second call read the file
    for field in ("keys", "boxes", "counts"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert os.listdir(tmp_path / "proposals") == [os.path.basename(
        spec.cache_path(builder, "train"))]  # no temp file left behind
    pl.load_table(builder, "test", spec)
    assert calls == ["train", "test"]  # one cache per split


def test_a_slice_of_cached_whole_splits_reads_their_tables(counted):
    """R-CNN's SVM stage reads `train[0:N]`; the whole `train` table (joined by tfds_id) serves
    it instead of a second selective search."""
    calls, builder, spec = counted
    pl.load_table(builder, "train", spec)
    sliced = pl.load_table(builder, "train[0:6]", spec)
    assert calls == ["train"]
    np.testing.assert_array_equal(sliced.keys, _table(3).keys)
    pl.load_table(builder, "train[0:6]+test[0:2]", spec)  # test is not cached: computed
    assert calls == ["train", "train[0:6]+test[0:2]"]
    pl.load_table(builder, "test", spec)
    joined = pl.load_table(builder, "train[2:]+test[:1]", spec)
    assert calls == ["train", "train[0:6]+test[0:2]", "test"]
    assert joined.keys.size == 2 * _table(3).keys.size


def test_an_unreadable_or_foreign_cache_is_recomputed(counted, caplog):
    calls, builder, spec = counted
    path = spec.cache_path(builder, "train")
    pl.load_table(builder, "train", spec)
    with open(path, "r+b") as f:  # a partial copy
        f.truncate(300)
    table = pl.load_table(builder, "train", spec)
    assert calls == ["train", "train"] and "recomputing it" in caplog.text
    np.testing.assert_array_equal(table.boxes, _table(3).boxes)
    other = pl.load_table(builder, "test", spec)  # written for "test" ...
    os.replace(spec.cache_path(builder, "test"), path)  # ... then found under "train"'s name
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train", "test", "train"] and other.keys.size == 2
    assert "it holds the proposals of split 'test'" in caplog.text


def test_a_cache_of_another_dataset_or_scale_at_the_same_path_is_stale(counted, caplog):
    """The path holds neither the dataset's name (a data dir copied between datasets) nor the
    scale past 10 digits (`.10g`): the record does, and a cache that differs there is
    recomputed, with a warning naming the field."""
    calls, builder, spec = counted
    builder.name, builder.version = "voc", "1.0.0"
    pl.load_table(builder, "train", spec)
    builder.name = "shapes_multi"  # voc's cache found at shapes_multi's path
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train"]
    assert "it was computed with dataset='voc' (now 'shapes_multi')" in caplog.text
    finer = dataclasses.replace(spec, scale=1.00000000001)
    assert finer.cache_path(builder, "train") == spec.cache_path(builder, "train")
    pl.load_table(builder, "train", finer)
    assert calls == ["train"] * 3
    assert "it was computed with scale=1.0 (now 1.00000000001)" in caplog.text


def test_a_cache_write_that_fails_midway_leaves_no_file(counted, monkeypatch):
    """The cache is written atomically: a write that fails after some bytes (a full disk, a
    killed process) leaves nothing at the cache path for a reader to trip on, and the next
    call computes and writes it."""
    calls, builder, spec = counted

    def savez(file, **arrays):
        file.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pl.np, "savez", savez)
        with pytest.raises(OSError, match="No space left on device"):
            pl.load_table(builder, "train", spec)
    assert os.listdir(os.path.join(builder.data_dir, "proposals")) == []
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train"]
    assert os.listdir(os.path.join(builder.data_dir, "proposals")) == [
        os.path.basename(spec.cache_path(builder, "train"))]


def test_normalized_divides_y_by_height_and_x_by_width():
    """Pixel `(x1, y1, x2, y2)` on a 40 (high) x 80 (wide) image, by hand: `[y1/40, x1/80,
    y2/40, x2/80]`, then zero rows up to `rows`."""
    boxes = np.array([[0, 0, 10, 20], [8, 4, 80, 40]], np.float32)
    np.testing.assert_allclose(pl._normalized(boxes, height=40, width=80, rows=3),
                               [[0, 0, 0.5, 0.125], [0.1, 0.1, 1.0, 1.0], [0, 0, 0, 0]],
                               rtol=1e-6)


def test_compute_table_covers_every_image_of_a_small_non_square_split(monkeypatch):
    """Selective search (stubbed) runs once per image with the spec's settings, and each
    image's boxes are normalized by its own height and width; a split of fewer than 10 images
    (progress chunks of total // 10 = 0) still gets every image."""
    seen = []

    def search(image, *, strategy, scale, max_boxes):
        seen.append((image.shape, strategy, scale, max_boxes))
        return np.array([[0, 0, 10, 20]], np.float32)  # (x1, y1, x2, y2) pixels

    monkeypatch.setattr(pl, "selective_search", search)
    ids = [f"x-train__{i}".encode() for i in range(5)]
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((5, 40, 80, 3), np.uint8), "tfds_id": ids})
    builder = types.SimpleNamespace(name="x", as_dataset=lambda **kwargs: dataset)
    spec = pl.ProposalSpec("selective_search", "quality", 2.0, 4)
    table = pl.compute_table(builder, "train", spec)
    assert table.keys.tolist() == ids and table.counts.tolist() == [1] * 5
    assert seen == [((40, 80, 3), "quality", 2.0, 4)] * 5
    expected = np.zeros((5, 4, 4), np.float32)
    expected[:, 0] = [0, 0, 20 / 40, 10 / 80]  # [ymin, xmin, ymax, xmax]
    np.testing.assert_allclose(table.boxes, expected, rtol=1e-6)


def test_lookup_joins_by_tfds_id():
    lookup = pl.ProposalLookup(_table())
    boxes, count = lookup(tf.constant("set-train__1"))
    np.testing.assert_array_equal(boxes.numpy(), _table().boxes[1])
    assert int(count) == 1
    ds = tf.data.Dataset.from_tensor_slices(["set-train__1", "set-train__0"]).map(lookup)
    got = list(ds.as_numpy_iterator())
    assert [int(c) for _, c in got] == [1, 2]
    np.testing.assert_array_equal(got[1][0], _table().boxes[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="without cached proposals"):
        lookup(tf.constant("set-test__0"))


def _old_format_cache(path: str, table: pl.ProposalTable, split: str) -> None:
    """A cache as cnnjax wrote it before caches recorded their making (algorithm version 1)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, keys=table.keys, boxes=table.boxes, counts=table.counts,
             split=np.asarray(split))
    assert path.endswith(".npz") and os.path.exists(path)


def test_an_old_format_cache_is_stale_and_recomputed(counted, caplog):
    """Caches written before 7e2cdb4 hold boxes off by up to half a resized pixel; they have no
    record, so they are recomputed (and overwritten) rather than silently reused."""
    calls, builder, spec = counted
    path = spec.cache_path(builder, "train")
    old = _table(3)
    old.boxes[0, 0] += 0.01  # what the old version computed differs
    _old_format_cache(path, old, "train")
    table = pl.load_table(builder, "train", spec)
    assert calls == ["train"]
    np.testing.assert_array_equal(table.boxes, _table(3).boxes)
    assert (f"the proposals cache {path} is stale (it has no record of its making: written by "
            f"an older cnnjax (algorithm version 1), before version {pl.ALGORITHM_VERSION}'s "
            "fix of its boxes); recomputing it (to do so ahead of a multi-process job: python -m "
            "experiments.proposals --config=<the experiment's config>)") in caplog.text
    with np.load(path) as rewritten:
        assert json.loads(str(rewritten["record"])) == pl.cache_record(builder, "train", spec)
    pl.load_table(builder, "train", spec)
    assert calls == ["train"]  # the rewritten cache is current


def test_a_cache_of_another_version_or_setting_is_stale(counted, caplog, monkeypatch):
    calls, builder, spec = counted
    builder.name, builder.version = "shapes_multi", "1.0.0"
    path = spec.cache_path(builder, "train")
    pl.load_table(builder, "train", spec)
    monkeypatch.setattr(pl, "ALGORITHM_VERSION", pl.ALGORITHM_VERSION + 1)
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train"]
    assert (f"it was computed with algorithm_version={pl.ALGORITHM_VERSION - 1} "
            f"(now {pl.ALGORITHM_VERSION})") in caplog.text
    builder.version = "1.0.1"  # a cache copied over from another dataset version
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train", "train"]
    assert "dataset_version='1.0.0' (now '1.0.1')" in caplog.text
    assert os.path.exists(path)


def _rewrite_record(path: str, **changes: object) -> None:
    """The cache at `path` with its record's fields changed (None: removed)."""
    with np.load(path) as cached:
        arrays = dict(cached)
    record = json.loads(str(arrays["record"]))
    record.update(changes)
    record = {k: v for k, v in record.items() if v is not None}
    np.savez(path, **arrays | {"record": np.asarray(json.dumps(record))})


def test_a_cache_of_another_opencv_is_stale(counted, caplog, monkeypatch):
    """Selective search's boxes are OpenCV's: a cache made with another OpenCV (or recorded
    before the record held its version) was reused silently. Without OpenCV here nothing could
    recompute it, so it is used."""
    calls, builder, spec = counted
    path = spec.cache_path(builder, "train")
    pl.load_table(builder, "train", spec)
    now = pl.cache_record(builder, "train", spec)["opencv_version"]
    assert now == cv2.__version__
    _rewrite_record(path, opencv_version="4.5.0")
    pl.load_table(builder, "train", spec)
    assert calls == ["train", "train"]
    assert f"it was computed with opencv_version='4.5.0' (now {now!r})" in caplog.text
    _rewrite_record(path, opencv_version=None)  # written before the field existed
    pl.load_table(builder, "train", spec)
    assert calls == ["train"] * 3
    assert f"it was computed with opencv_version=None (now {now!r})" in caplog.text
    pl.load_table(builder, "train", spec)
    assert calls == ["train"] * 3  # the rewritten cache is current
    _rewrite_record(path, opencv_version="4.5.0")
    monkeypatch.setattr(pl, "opencv_version", lambda: None)  # OpenCV not installed
    pl.load_table(builder, "train", spec)
    assert calls == ["train"] * 3


def test_a_stale_whole_split_table_does_not_serve_a_slice(counted, caplog):
    calls, builder, spec = counted
    _old_format_cache(spec.cache_path(builder, "train"), _table(3), "train")
    pl.load_table(builder, "train[0:6]", spec)
    assert calls == ["train[0:6]"] and "is stale" in caplog.text
    # The warning said "recomputing it" of the whole split's file, which stays as it is.
    assert "computing 'train[0:6]' on its own instead" in caplog.text
    assert "recomputing it" not in caplog.text


def test_numpy_integer_max_proposals_is_cached(counted):
    """A NumPy integer (a sweep's value) is a valid max_proposals; the cache's JSON record
    refused to serialize it (TypeError) until the spec held it as an int."""
    calls, builder, _ = counted
    spec = pl.proposal_spec({"method": "selective_search", "max_proposals": np.int64(3)})
    assert type(spec.max_proposals) is int
    pl.load_table(builder, "train", spec)
    pl.load_table(builder, "train", spec)
    assert calls == ["train"]


def test_a_cache_of_another_opencv_is_used_where_opencv_lacks_its_contrib_modules(
        counted, monkeypatch):
    """OpenCV without cv2.ximgproc (the opencv-python wheel, not -contrib) cannot run selective
    search: its version was recorded as current, so a good cache made with another OpenCV was
    discarded and recomputing it failed with selective search's ImportError."""
    calls, builder, spec = counted
    path = spec.cache_path(builder, "train")
    pl.load_table(builder, "train", spec)
    _rewrite_record(path, opencv_version="4.5.0")
    base_wheel = types.ModuleType("cv2")
    base_wheel.__version__ = "4.11.0"
    monkeypatch.setitem(sys.modules, "cv2", base_wheel)
    with pytest.raises(ImportError, match="contrib modules"):
        selective_search._cv2()
    assert pl.opencv_version() is None
    pl.load_table(builder, "train", spec)
    assert calls == ["train"]


def test_a_config_without_a_proposals_field_is_told_which_config_has_one():
    """experiments.proposals on lenet5_digits said proposals.method=None, and setting
    --config.data.proposals.method was then refused: the config has no such field."""
    from cnnjax.data.spec import check_proposals_set
    from experiments.configs import lenet5_digits

    with pytest.raises(ValueError, match=re.escape(
            "data: proposals=None is invalid; expected a detection config with data.proposals "
            "set (nothing to prepare), e.g. experiments/configs/rcnn_shapes.py:selective_search")):
        check_proposals_set(lenet5_digits.get_config().data)
