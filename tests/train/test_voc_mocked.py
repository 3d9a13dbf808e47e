"""The catalogue detection path through the engine, offline: PASCAL VOC 2007 served by
`tfds.testing.mock_data` (records from tests/data/test_detection.py). `yolo_voc2007.py` passes
every pre-compilation check, and a small detector trains and evaluates on the mocked set with
its difficult objects flagged."""

import json

import pytest

from cnnjax.train import loop
from cnnjax.train.config import check_config
from experiments.configs import yolo_voc2007
from tests.data.test_detection import _voc_as_dataset
from tests.data.test_presets import _mock, _write_metadata


@pytest.fixture
def voc_root(tmp_path):
    root = str(tmp_path / "tfds")
    _write_metadata(root, "voc/2007", {"train": 5, "validation": 3, "test": 6})
    with _mock(root, 6, as_dataset_fn=_voc_as_dataset):
        yield root


def test_the_yolo_voc2007_config_passes_every_check(voc_root):
    config = yolo_voc2007.get_config()
    config.data.data_dir = voc_root
    # The mocked train split holds 8 images (the real one 5,011): the config's batch is refused
    # there by name, and everything else checks with a batch that fits.
    with pytest.raises(ValueError, match=r"^config: global_batch_size=64 is invalid; expected "
                                         r"at most the 8 examples of the train split of "
                                         r"'voc2007'"):
        check_config(config)
    config.global_batch_size = 8
    checked = check_config(config)
    assert (checked.data_info.name, checked.data_info.num_classes) == ("voc2007", 20)
    assert checked.data_info.image_shape == (448, 448, 3)
    assert (checked.data_info.num_train, checked.data_info.num_eval) == (8, 6)
    # VOC2007's 11-point AP, the metric of the papers' VOC 2007 tables, can pick the best
    # checkpoint; a misspelt metric is refused by name.
    config.best_metric = "map50_voc07"
    check_config(config)
    config.best_metric = "map50_voc7"
    with pytest.raises(ValueError, match=r"^config: best_metric='map50_voc7' is invalid; "
                                         r"expected one of \[.*'map50_voc07'\]"):
        check_config(config)


@pytest.mark.slow
def test_a_detector_trains_and_evaluates_on_mocked_voc(voc_root, tmp_path):
    config = yolo_voc2007.get_config()
    config.model = "yolo_v1_small"
    config.model_kwargs = {}
    config.data.data_dir, config.data.image_size, config.data.max_boxes = voc_root, 64, 8
    config.global_batch_size = config.eval_batch_size = 4
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.log_every_steps, config.schedule.warmup_steps = 1, 1
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["status"] == "completed"
    assert summary["final_eval"]["num_examples"] == 6
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [2]
    # All-point and 11-point VOC AP side by side, each a mean of the per-class values.
    final = summary["final_eval"]
    for name, prefix in (("map50", "ap50/"), ("map50_voc07", "ap50_voc07/")):
        per_class = [v for k, v in final.items() if k.startswith(prefix)]
        assert per_class and final[name] == pytest.approx(sum(per_class) / len(per_class))
