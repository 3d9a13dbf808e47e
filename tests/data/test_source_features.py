"""A tfds dataset whose features do not fit a classification source is refused by name:
`image` missing or not uint8, `label` not a ClassLabel (a KeyError, an AttributeError, or
uint16 pixels scaled by 1/255 into the hundreds)."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax.data import sources
from cnnjax.data.pipeline import default_data_config, get_dataset_info
from cnnjax.data.spec import resolve


def _examples(n, image_key="image", dtype=np.uint8):
    for i in range(n):
        yield i, {image_key: np.full((4, 4, 1), i, dtype), "label": i % 2}


class CnnjaxTestPixelsFeature(tfds.core.GeneratorBasedBuilder):
    """Its images are under `pixels`, as eurosat/all keeps them under `sentinel2`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "pixels": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": _examples(4, "pixels"), "test": _examples(2, "pixels")}

    def _generate_examples(self, examples):
        yield from examples


class CnnjaxTestScalarLabel(CnnjaxTestPixelsFeature):
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": _examples(4), "test": _examples(2)}


class CnnjaxTestUint16(CnnjaxTestPixelsFeature):
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 1), dtype=np.uint16),
            "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": _examples(4, dtype=np.uint16), "test": _examples(2, dtype=np.uint16)}


@pytest.mark.parametrize("tfds_name, message", [
    ("cnnjax_test_pixels_feature", "expected a dataset with an `image` feature (a tfds Image); "
                                   "it has ['label', 'pixels']."),
    ("cnnjax_test_scalar_label", "expected its `label` to be a tfds ClassLabel (class ids with a "
                                 "class count); it is a Scalar."),
    ("cnnjax_test_uint16", "expected uint8 images (pixels are scaled by 1/255); its `image` is "
                           "uint16."),
])
def test_features_that_do_not_fit_are_refused_by_name(tmp_path, tfds_name, message):
    tfds.builder(tfds_name, data_dir=str(tmp_path)).download_and_prepare()
    config = default_data_config("digits")
    config.data_dir, config.tfds_name = str(tmp_path), tfds_name
    with pytest.raises(ValueError, match=re.escape(
            f"data: tfds_name={tfds_name!r} is invalid; {message}")):
        get_dataset_info(config)


def test_a_catalogue_set_with_its_images_under_another_name_is_refused(tmp_path):
    """eurosat/all keeps its pixels under `sentinel2` beside a ClassLabel `label` (mocked
    offline)."""
    config = default_data_config("cifar10")
    config.data_dir, config.tfds_name = str(tmp_path), "eurosat/all"
    with sources.mock_tfds_dataset(resolve(config), 4), pytest.raises(ValueError, match=re.escape(
            "data: tfds_name='eurosat/all' is invalid; expected a dataset with an `image` "
            "feature (a tfds Image); it has ['filename', 'label', 'sentinel2'].")):
        get_dataset_info(config)


def test_opening_a_source_reads_no_deprecated_feature_attribute(digits_config, monkeypatch):
    """`FeatureConnector.dtype` is deprecated (tfds logs a warning each time, ~3 per training
    run, and will remove it): the image's dtype is read from `np_dtype`."""
    def deprecated(self):
        raise AssertionError("FeatureConnector.dtype read")

    monkeypatch.setattr(tfds.features.FeatureConnector, "dtype", property(deprecated))
    assert get_dataset_info(digits_config()).num_classes == 10
