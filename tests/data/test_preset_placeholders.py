"""`data.cache` / `data.shuffle_buffer` unset (None) stand for the preset `data.name` names now:
a config made for one dataset and pointed at another (`--config.data.name=imagenet2012` on a
CIFAR config) kept the first preset's values (imagenet2012 cached whole in RAM). Workdirs saved
when the fields held the preset's value itself still resume."""

from __future__ import annotations

import json

import ml_collections
import pytest

from cnnjax.data.presets import get_preset, list_datasets
from cnnjax.data.spec import default_data_config, resolve
from cnnjax.train.config import default_config, flatten, incompatible_fields, to_json

# (cache, shuffle_buffer) of the presets, written out: a preset's own value, not the first one's.
EXPECTED = {"digits": (True, 2048), "cifar10": (True, 50_000), "imagenet2012": (False, 10_000),
            "voc2007": (False, 5_011)}


@pytest.mark.parametrize("first", ["digits", "cifar10", "imagenet2012"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_changing_name_takes_the_new_presets_cache_and_shuffle_buffer(first, name):
    config = default_data_config(first)
    config.name = name
    spec = resolve(config)
    assert (spec.cache, spec.shuffle_buffer) == EXPECTED[name]


def test_every_preset_fills_its_own_values_and_set_values_win():
    for name in list_datasets():
        spec = resolve(ml_collections.ConfigDict({"name": name}))  # fields missing: unset
        preset = get_preset(name)
        assert (spec.cache, spec.shuffle_buffer) == (preset.cache, preset.shuffle_buffer)
    config = default_data_config("cifar10")
    assert (config.cache, config.shuffle_buffer) == (None, None)
    config.name, config.cache, config.shuffle_buffer = "imagenet2012", True, 7
    spec = resolve(config)
    assert (spec.cache, spec.shuffle_buffer) == (True, 7)


@pytest.mark.parametrize("field, value, message", [
    ("shuffle_buffer", 0, r"data: shuffle_buffer=0 is invalid; expected a positive integer"),
    ("shuffle_buffer", 2.5, r"data: shuffle_buffer=2.5 is invalid; expected a positive integer"),
    ("cache", "yes", r"data: cache='yes' is invalid; expected True or False"),
])
def test_bad_set_values_are_still_refused(field, value, message):
    config = ml_collections.ConfigDict({"name": "digits", field: value})
    with pytest.raises(ValueError, match=f"^{message}"):
        resolve(config)


def _saved(data_fields: dict) -> dict:
    """A run's flattened config as a config.json round trip holds it."""
    config = default_config()
    config.data = default_data_config("digits")
    for key, value in data_fields.items():
        config.data[key] = value
    return flatten(json.loads(to_json(config)))


def test_workdirs_saved_with_the_presets_values_still_resume():
    """config.json of a run before the placeholders holds `shuffle_buffer: 2048` (digits'); the
    same config now holds null: the same trajectory, so no field differs."""
    old = _saved({"cache": True, "shuffle_buffer": 2048})
    new = _saved({})
    assert new["data.shuffle_buffer"] is None and old["data.shuffle_buffer"] == 2048
    assert incompatible_fields(old, new) == []
    assert incompatible_fields(new, old) == []
    # Another buffer is another shuffle: refused either way round, set or unset.
    other = _saved({"shuffle_buffer": 1000})
    assert incompatible_fields(old, other) == ["data.shuffle_buffer"]
    assert incompatible_fields(other, new) == ["data.shuffle_buffer"]
    # A field missing from a data block is unset too (`resolve` fills it the same way).
    bare = {k: v for k, v in new.items() if k not in ("data.cache", "data.shuffle_buffer")}
    assert incompatible_fields(old, bare) == []
    # The preset compared with is the config's own: cifar10's buffer is not digits'.
    cifar = dict(new, **{"data.name": "cifar10"})
    assert incompatible_fields(dict(old, **{"data.name": "cifar10"}), cifar) == [
        "data.shuffle_buffer"]
    assert incompatible_fields(dict(old, **{"data.name": "cifar10", "data.shuffle_buffer":
                                            50_000}), cifar) == []
