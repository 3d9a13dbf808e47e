"""`data.grey_to_rgb`: grey images fed as RGB (the channel repeated 3 times), e.g. to fine-tune an
RGB (ImageNet-pretrained) model on mnist, fashion_mnist or digits; the preset's one-channel
mean/std repeated with it. RGB data is refused by name."""

from __future__ import annotations

import dataclasses
import itertools
import re

import ml_collections
import numpy as np
import pytest

from cnnjax.data import pipeline, presets
from cnnjax.data.pipeline import eval_batches, get_dataset_info, train_batches
from cnnjax.data.sources import open_source
from cnnjax.data.spec import default_data_config, resolve
from cnnjax.data.transforms import make_transforms


def _first(iterator, n=2):
    return list(itertools.islice(iterator, n))


def test_the_default_is_off_and_it_must_be_a_bool(digits_config):
    assert default_data_config("mnist").grey_to_rgb is False
    assert resolve(digits_config()).grey_to_rgb is False
    with pytest.raises(ValueError, match=re.escape(
            "data: grey_to_rgb='yes' is invalid; expected True or False")):
        resolve(ml_collections.ConfigDict({"name": "digits", "grey_to_rgb": "yes"}))


def test_digits_as_rgb_are_the_grey_batches_with_the_channel_repeated(digits_config):
    """Every batch (augmented training, padded eval) is the grey one repeated over 3 channels:
    the same pixels normalized by the same statistics, each channel by the preset's."""
    grey = digits_config(image_size=12)
    rgb = digits_config(image_size=12, grey_to_rgb=True)
    info = get_dataset_info(rgb)
    assert info.image_shape == (12, 12, 3)
    assert info == dataclasses.replace(get_dataset_info(grey), image_shape=(12, 12, 3))
    layout = {"global_batch_size": 32, "num_devices": 1}
    for want, got in zip(_first(train_batches(grey, seed=3, **layout)),
                         _first(train_batches(rgb, seed=3, **layout)), strict=True):
        np.testing.assert_array_equal(got["image"], np.repeat(want["image"], 3, axis=-1))
        np.testing.assert_array_equal(got["label"], want["label"])
    for want, got in zip(eval_batches(grey, **layout), eval_batches(rgb, **layout), strict=True):
        np.testing.assert_array_equal(got["image"], np.repeat(want["image"], 3, axis=-1))
        np.testing.assert_array_equal(got["mask"], want["mask"])
    spec = resolve(rgb)
    transforms = make_transforms(spec, open_source(spec))
    preset = presets.get_preset("digits")
    assert transforms.mean == preset.mean * 3 and transforms.std == preset.std * 3
    assert transforms.out_shape == (12, 12, 3)


def test_grey_fake_images_as_rgb():
    config = pipeline.default_data_config("fake")
    config.fake_image_shape, config.fake_num_train, config.fake_num_eval = (6, 6, 1), 16, 4
    config.grey_to_rgb = True
    assert get_dataset_info(config).image_shape == (6, 6, 3)
    batch = next(train_batches(config, global_batch_size=8, num_devices=1, seed=0))
    assert batch["image"].shape == (1, 8, 6, 6, 3)
    np.testing.assert_array_equal(batch["image"][..., 1:], np.repeat(batch["image"][..., :1], 2,
                                                                      axis=-1))


def test_rgb_data_is_refused_by_name():
    config = ml_collections.ConfigDict({"name": "fake", "grey_to_rgb": True})
    with pytest.raises(ValueError, match=re.escape(
            "data: grey_to_rgb=True is invalid; 'fake' has 3-channel images; expected False "
            "(grey_to_rgb repeats the one channel of grey images 3 times)")):
        get_dataset_info(config)


def test_randaugment_sees_the_rgb_image_and_keeps_it_grey(digits_config):
    """The channel is repeated before augmentation: RandAugment's ops run on an RGB image whose
    channels are equal, and keep them equal (its colour ops mix channels of equal values)."""
    config = digits_config(image_size=12, grey_to_rgb=True, randaugment_layers=2,
                           randaugment_magnitude=9)
    batch = next(train_batches(config, global_batch_size=64, num_devices=1, seed=1))
    image = batch["image"]
    assert image.shape == (1, 64, 12, 12, 3)
    np.testing.assert_array_equal(image[..., 1], image[..., 0])
    np.testing.assert_array_equal(image[..., 2], image[..., 0])


def test_workdirs_from_before_grey_to_rgb_still_resume():
    """A config.json written before the field existed lacks it; LEGACY_DEFAULTS says it was off,
    so it stays compatible with today's default data config, and turning it on is a change."""
    from cnnjax.train import config as config_lib

    current = config_lib.default_config()
    current.data = pipeline.default_data_config("digits")
    new = config_lib.flatten(current)
    assert new["data.grey_to_rgb"] is False
    old = {k: v for k, v in new.items() if k != "data.grey_to_rgb"}
    assert config_lib.incompatible_fields(old, new) == []
    assert config_lib.incompatible_fields(new, old) == []
    assert config_lib.incompatible_fields(old, dict(new, **{"data.grey_to_rgb": True})) == [
        "data.grey_to_rgb"]
    filled = config_lib.with_legacy_defaults({"data": {"name": "mnist"}})
    assert filled["data"]["grey_to_rgb"] is False


@pytest.mark.slow
def test_fine_tuning_an_rgb_lenet5_on_digits(digits_config, tmp_path):
    """A LeNet-5 whose first convolution takes RGB images (as ImageNet weights do) warm-starts a
    digits run only with grey_to_rgb: without it the error names the option, with it every
    weight but the head is loaded and the run trains."""
    import json

    import jax

    from cnnjax.models import create_model
    from cnnjax.train import loop
    from cnnjax.train.checkpoint import Checkpointer
    from cnnjax.train.config import default_config
    from cnnjax.train.state import init_variables

    source = tmp_path / "source"
    variables = jax.device_get(init_variables(create_model("lenet5", num_classes=10),
                                              jax.random.key(1), (1, 32, 32, 3)))
    checkpointer = Checkpointer(str(source), use_async=False)
    checkpointer.save(3, {**variables, "step": np.int32(3)})
    checkpointer.close()
    (source / "config.json").write_text(json.dumps({"model": "lenet5"}))

    def config(**data):
        c = default_config()
        c.model, c.data = "lenet5", digits_config(image_size=32, **data)
        c.global_batch_size, c.num_train_steps, c.eval_every_steps = 32, 2, 2
        c.progress_bar = c.tensorboard = c.async_checkpoints = False
        c.init_from.workdir = str(source)
        return c

    with pytest.raises(ValueError, match=re.escape(
            "(5, 5, 1, 6) in the new model 'lenet5': the source's input layer takes 3-channel "
            "(RGB) images and this run's have 1 channel (grey); set data.grey_to_rgb=True")):
        loop.train_and_evaluate(config(), str(tmp_path / "grey"))
    summary = loop.train_and_evaluate(config(grey_to_rgb=True), str(tmp_path / "rgb"))
    assert summary["status"] == "completed"
    assert summary["init_from"]["fresh_modules"] == ["head"]
