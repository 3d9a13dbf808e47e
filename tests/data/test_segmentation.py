"""`shapes_segmentation` through the segmentation input pipeline: class maps aligned with their
images, nearest-neighbour resizing, joint flips, exact resume, eval padding, bad datasets.
Building the dataset (2,500 scenes) takes a few seconds, so the tests that read it are `slow`."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax.data import segmentation


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_shapes_segmentation"))
    segmentation.get_dataset_info(_config(root))  # generated on first use
    return root


def _config(root, **overrides):
    config = segmentation.default_data_config("shapes")
    config.tfds_name, config.data_dir = "shapes_segmentation", root
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.slow
def test_eval_batches_are_the_stored_class_maps(data_dir):
    info = segmentation.get_dataset_info(_config(data_dir))
    assert (info.name, info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        "shapes_segmentation", 5, (64, 64, 3), 2000, 500)
    stored = list(tfds.as_numpy(tfds.builder("shapes_segmentation", data_dir=data_dir)
                                .as_dataset(split="test")))
    batches = list(segmentation.eval_batches(_config(data_dir), global_batch_size=64,
                                             num_devices=2))
    labels = np.concatenate([b["labels"].reshape(-1, 64, 64) for b in batches])
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    assert labels.dtype == np.int32 and mask.sum() == 500 and not mask[500:].any()
    np.testing.assert_array_equal(labels[:500], np.stack([e["segmentation_mask"][..., 0]
                                                          for e in stored]))
    small = next(segmentation.eval_batches(_config(data_dir, image_size=32), global_batch_size=8,
                                           num_devices=1))
    # Nearest neighbour with half-pixel centres: output pixel i samples input 2i + 1.
    np.testing.assert_array_equal(small["labels"][0], labels[:8, 1::2, 1::2])


@pytest.mark.slow
def test_flip_moves_image_and_class_map_together_and_resume_replays(data_dir):
    kwargs = {"global_batch_size": 16, "num_devices": 1, "seed": 3}
    plain = next(segmentation.train_batches(_config(data_dir, augment=False), **kwargs))
    stream = segmentation.train_batches(_config(data_dir, augment=True), **kwargs)
    flipped = [next(stream) for _ in range(3)]
    mirrored = 0
    for i in range(16):
        if np.array_equal(plain["image"][0, i], flipped[0]["image"][0, i]):
            np.testing.assert_array_equal(plain["labels"][0, i], flipped[0]["labels"][0, i])
            continue
        mirrored += 1
        np.testing.assert_array_equal(plain["image"][0, i, :, ::-1], flipped[0]["image"][0, i])
        np.testing.assert_array_equal(plain["labels"][0, i, :, ::-1], flipped[0]["labels"][0, i])
    assert 0 < mirrored < 16
    resumed = next(segmentation.train_batches(_config(data_dir, augment=True), start_step=2,
                                              **kwargs))
    for key in ("image", "labels"):
        np.testing.assert_array_equal(flipped[2][key], resumed[key])


def test_a_dataset_without_class_maps_is_refused(digits_dir):
    config = segmentation.default_data_config("digits")
    config.data_dir = digits_dir
    with pytest.raises(ValueError, match=r"data: tfds_name='digits' is invalid; expected a "
                                         r"dataset with a `segmentation_mask` feature"):
        segmentation.get_dataset_info(config)
