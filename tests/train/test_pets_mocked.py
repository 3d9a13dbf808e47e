"""The catalogue segmentation path through the engine, offline: Oxford-IIIT Pet served by
`tfds.testing.mock_data` (records from tests/data/test_segmentation.py). `fcn_pets.py` passes
every pre-compilation check, and an FCN trains and evaluates on the mocked trimaps, whose
outline pixels (`IGNORE_LABEL`) count in no metric; an eval split of outline only is refused by
name."""

from functools import partial

import jax
import numpy as np
import pytest
import tensorflow as tf

from cnnjax.models.registry import create_model
from cnnjax.train import loop
from cnnjax.train.config import check_config
from experiments.configs import fcn_pets
from tests.data.test_presets import _mock, _write_metadata
from tests.data.test_segmentation import _pets_as_dataset


@pytest.fixture
def pets_root(tmp_path):
    root = str(tmp_path / "tfds")
    _write_metadata(root, "oxford_iiit_pet", {"train": 8, "test": 5})
    with _mock(root, 5, as_dataset_fn=_pets_as_dataset):
        yield root


def test_the_fcn_pets_config_passes_every_check(pets_root):
    config = fcn_pets.get_config()
    config.data.data_dir = pets_root
    # The mocked train split holds 8 images (the real one 3,680): the config's batch is refused
    # there by name, and everything else checks with a batch that fits.
    with pytest.raises(ValueError, match=r"^config: global_batch_size=32 is invalid; expected "
                                         r"at most the 8 examples of the train split of "
                                         r"'oxford_iiit_pet'"):
        check_config(config)
    config.global_batch_size = 8
    checked = check_config(config)
    assert (checked.data_info.name, checked.data_info.num_classes) == ("oxford_iiit_pet", 2)
    assert checked.data_info.image_shape == (224, 224, 3)
    assert (checked.data_info.num_train, checked.data_info.num_eval) == (8, 5)


@pytest.mark.slow
def test_an_fcn_trains_and_evaluates_on_mocked_pets(pets_root, tmp_path):
    config = fcn_pets.get_config()
    config.model = "fcn32s_resnet18"
    config.model_kwargs = {}
    config.data.data_dir, config.data.image_size = pets_root, 32
    config.global_batch_size = config.eval_batch_size = 4
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.log_every_steps, config.schedule.warmup_steps = 1, 1
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["status"] == "completed"
    final = summary["final_eval"]
    assert final["num_examples"] == 5 and set(final) >= {"miou", "iou/0", "iou/1"}
    assert "iou/2" not in final  # the outline is ignored, not a third class
    assert 0.0 <= final["pixel_accuracy"] <= 1.0 and np.isfinite(final["loss"])


def _outline_only_test_split(self, split, decoders=None, read_config=None, shuffle_files=False):
    """`_pets_as_dataset` with every trimap pixel of the test split the outline (3, ignored)."""
    ds = _pets_as_dataset(self, split, decoders, read_config, shuffle_files)
    if "test" not in str(split):
        return ds
    return ds.map(lambda ex: {**ex, "segmentation_mask": tf.zeros_like(ex["segmentation_mask"])
                              + 3})


def test_an_eval_split_without_a_scored_pixel_is_refused_by_name(tmp_path):
    """No pixel to score: pixel accuracy and mIoU are undefined. This failed naming
    `intersection_over_union: matrix='all zeros'`; the engine's eval (training's and
    `experiments.evaluate`'s, both through `evaluate_variables`) now names the split."""
    root = str(tmp_path / "tfds")
    _write_metadata(root, "oxford_iiit_pet", {"train": 8, "test": 5})
    config = fcn_pets.get_config()
    config.model, config.model_kwargs = "fcn32s_resnet18", {}
    config.data.data_dir, config.data.image_size = root, 32
    config.global_batch_size = config.eval_batch_size = 4
    model = create_model("fcn32s_resnet18", num_classes=2)
    # jitted: op by op, ResNet-18's init compiled one program per op
    variables = jax.jit(partial(model.init, train=False))(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    with _mock(root, 5, as_dataset_fn=_outline_only_test_split), \
            pytest.raises(ValueError) as err:
        loop.evaluate_variables(config, variables)
    assert str(err.value) == (
        "data: eval_split='test' is invalid; expected a split of 'oxford_iiit_pet' with at least "
        "one scored pixel, but every pixel of it is the ignore label (IGNORE_LABEL=255: no "
        "class), so its pixel accuracy and mIoU are undefined.")
