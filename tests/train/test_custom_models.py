"""A researcher's own registered model that breaks a convention of docs/conventions.md is refused
before compiling, naming the model (or the config field) and the convention, not the labels or an
empty `model_kwargs`."""

import logging
import re
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import pytest

from cnnjax.models import registry
from cnnjax.train import config as config_lib
from cnnjax.train import loop
from cnnjax.train.config import check_config, check_model_fields
from tests.train import helpers

_INFO = helpers.TINY_MODEL_INFO  # the synthetic data's 8x8x1 images, 4 classes


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


def _refused(config, tmp_path, message: str) -> str:
    """The loop's error for `config` (which `check_config` raises alike), with `message` in it
    and nothing compiled or checkpointed."""
    with pytest.raises(ValueError) as checked:
        check_config(config)
    with pytest.raises(ValueError) as trained:
        loop.train_and_evaluate(config, str(tmp_path))
    assert str(trained.value) == str(checked.value)
    assert message in str(checked.value)
    assert not (tmp_path / "checkpoints").exists()
    return str(checked.value)


class _Pooled(nn.Module):
    """conv -> global mean -> `head` of `outputs` units (default: num_classes)."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    axis_name: str | None = None
    outputs: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = jnp.mean(nn.Conv(4, (3, 3), name="conv")(x), axis=(1, 2))
        return nn.Dense(self.outputs or self.num_classes, name="head")(x)


class _DenseMap(nn.Module):
    """Per-pixel logits at `1 / stride` of the input's resolution."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    axis_name: str | None = None
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        return nn.Conv(self.num_classes, (3, 3), strides=self.stride, name="head")(x)


def test_a_classifier_that_ignores_num_classes_is_refused_naming_the_dataset(tmp_path):
    """A head hard-coding 10 outputs trained 10-way on a 4-class dataset, silently."""
    with registry.registered_model("fixed_ten", lambda **kw: _Pooled(outputs=10, **kw), **_INFO):
        _refused(helpers.tiny_config(model="fixed_ten"), tmp_path,
                 "config: model='fixed_ten' is invalid; its output (eval mode, one 8x8x1 image) "
                 "has shape (1, 10), where a classification run needs logits [N, num_classes] = "
                 "(1, 4); the model must size its final layer (the submodule `head`) by its "
                 "`num_classes` field, which the engine sets, not by a fixed number "
                 "(num_classes=4: the classes of dataset 'synthetic'")
    with registry.registered_model("pooled", _Pooled, **_INFO):
        assert check_config(helpers.tiny_config(model="pooled")).model.num_classes == 4


def test_a_classifier_returning_a_dense_map_is_refused_before_the_first_step(tmp_path):
    """It failed in the first train step as `example_metrics: labels.shape=(16,) is invalid`,
    naming the labels, after the workdir was written."""
    with registry.registered_model("dense_classifier", _DenseMap, **_INFO):
        _refused(helpers.tiny_config(model="dense_classifier"), tmp_path,
                 "config: model='dense_classifier' is invalid; its output (eval mode, one 8x8x1 "
                 "image) has shape (1, 8, 8, 4), where a classification run needs logits "
                 "[N, num_classes] = (1, 4); a classifier must pool or flatten its spatial axes")


@pytest.mark.parametrize("factory, shape", [(lambda **kw: _DenseMap(stride=2, **kw), (1, 4, 4, 4)),
                                            (_Pooled, (1, 4))])
def test_a_segmentation_model_must_return_logits_at_the_input_resolution(monkeypatch, factory,
                                                                          shape):
    """The per-pixel cross-entropy compares [N, H, W, C] logits with the images' [N, H, W] label
    maps: a map at another resolution, or one logit vector per image, is refused."""
    monkeypatch.setattr(config_lib, "data_pipeline", lambda config: helpers.fake_pipeline_module())
    config = helpers.tiny_config(task="segmentation", best_metric="miou")
    with registry.registered_model("my_fcn", _DenseMap, task="segmentation", **_INFO):
        config.model = "my_fcn"
        assert check_config(config).model.num_classes == 4
    with registry.registered_model("bad_fcn", factory, task="segmentation", **_INFO):
        config.model = "bad_fcn"
        with pytest.raises(ValueError, match=re.escape(
                f"config: model='bad_fcn' is invalid; its output (eval mode, one 8x8x1 image) "
                f"has shape {shape}, where a segmentation run needs per-pixel logits "
                "[N, H, W, num_classes] at the input's H, W = (1, 8, 8, 4)")):
            check_config(config)


class _NoEngineFields(nn.Module):
    """Declares num_classes but not `dtype` and `axis_name`."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def test_a_model_lacking_the_engine_fields_is_named_not_its_empty_model_kwargs(tmp_path):
    """It said `config: model_kwargs={} is invalid; ... its settable fields are []`."""
    with registry.registered_model("no_axis", _NoEngineFields, **_INFO):
        config = helpers.tiny_config(model="no_axis")
        message = _refused(
            config, tmp_path,
            "config: model='no_axis' is invalid; its class lacks the fields 'dtype' and "
            "'axis_name', which the engine sets on every model; every cnnjax model declares the "
            "fields num_classes: int, dtype: Any = jnp.float32 and axis_name: str | None = None, "
            "and uses them (docs/conventions.md, \"Fields every model has\").")
        assert "model_kwargs" not in message
        with pytest.raises(ValueError) as launcher:  # a launcher's check says the same
            check_model_fields(config)
        assert str(launcher.value) == message


class _FcClassifier(nn.Module):
    """A classifier whose final layer is named `fc`, not `head`."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = jnp.mean(nn.Conv(4, (3, 3))(x), axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


@pytest.mark.parametrize("freeze", ["backbone", "backbone_eval"])
def test_freezing_a_model_without_a_head_names_config_freeze(tmp_path, freeze):
    """It said `trainable_mask: params="top-level keys ['Conv_0', 'fc']" is invalid`, naming
    neither config.freeze nor the convention; the model itself trains unfrozen."""
    with registry.registered_model("fc_net", _FcClassifier, **_INFO):
        _refused(helpers.tiny_config(model="fc_net", freeze=freeze), tmp_path,
                 f"config: freeze={freeze!r} is invalid; it trains only the classifier head, and "
                 "model 'fc_net' has none: its top-level parameters are ['Conv_0', 'fc']; the "
                 "final classifier must be a submodule named 'head' (docs/conventions.md")
        check_config(helpers.tiny_config(model="fc_net"))


class _TrainingKeyword(nn.Module):
    """`__call__(x, training=...)` instead of the convention's `train=`."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, training: bool = False):
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def test_a_call_without_the_train_keyword_is_refused_with_the_signature(tmp_path):
    """It advised checking `config.model_kwargs`, which cannot mend a call signature."""
    with registry.registered_model("training_kw", _TrainingKeyword, **_INFO):
        message = _refused(
            helpers.tiny_config(model="training_kw"), tmp_path,
            "training_kw: _TrainingKeyword.__call__ does not take the keyword 'train', which "
            "the engine passes to every model; give it the signature __call__(self, x, train: "
            "bool = False, return_features: bool = False) (docs/conventions.md, \"Models\").")
        assert "model_kwargs" not in message


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """The user's own package `own_e2e_pkg`, outside cnnjax, whose `models` module registers
    `own_net` (the `_Pooled` shape, for the synthetic data) when imported; forgotten after."""
    package = tmp_path / "project" / "own_e2e_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "import flax.linen as nn\n"
        "import jax.numpy as jnp\n"
        "from cnnjax.models import register_model\n\n\n"
        "@register_model('own_net', input_shape=(8, 8, 1), min_input_size=4, num_classes=4)\n"
        "class OwnNet(nn.Module):\n"
        "    num_classes: int = 4\n"
        "    dtype: object = jnp.float32\n"
        "    axis_name: object = None\n\n"
        "    @nn.compact\n"
        "    def __call__(self, x, train=False, return_features=False):\n"
        "        x = jnp.mean(nn.Conv(4, (3, 3), name='conv')(x), axis=(1, 2))\n"
        "        return nn.Dense(self.num_classes, name='head')(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "project"))
    yield "own_e2e_pkg.models:own_net"
    _forget_own_package()


def _forget_own_package():
    """As a fresh process that never imported the package: no registry entry, no module."""
    registry._REGISTRY.pop("own_net", None)
    for module in ("own_e2e_pkg.models", "own_e2e_pkg"):
        sys.modules.pop(module, None)


def test_a_run_of_a_model_named_with_its_module_reloads_where_it_was_never_imported(
        own_package, tmp_path, caplog):
    from cnnjax.train.trained import load_trained

    workdir = str(tmp_path / "run")
    config = helpers.at_the_end_only(helpers.tiny_config(model=own_package))
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(config, workdir)
    assert "outside cnnjax" not in caplog.text
    _forget_own_package()
    trained = load_trained(workdir)  # imports own_e2e_pkg.models itself, as the name says
    assert type(trained.model).__name__ == "OwnNet"
    assert "own_e2e_pkg.models" in sys.modules


def test_a_plain_name_registered_outside_cnnjax_warns_with_the_name_that_reloads(caplog):
    with (registry.registered_model("pooled", _Pooled, **_INFO),
          caplog.at_level(logging.WARNING)):
        check_config(helpers.tiny_config(model="pooled"))
    assert (f"config.model='pooled' is registered by {__name__}, outside cnnjax: commands that "
            "reload this run import only cnnjax and will not find it; name it "
            f"config.model='{__name__}:pooled'") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib._warn_if_not_reloadable("lenet5")  # cnnjax's own
    assert "outside cnnjax" not in caplog.text


def test_a_model_registered_by_the_script_being_run_warns_that_it_cannot_reload(caplog):
    with (registry.registered_model("script_net", _Pooled, module="__main__", **_INFO),
          caplog.at_level(logging.WARNING)):
        config_lib._warn_if_not_reloadable("script_net")
    assert ("config.model='script_net' is registered by the script being run (__main__): "
            "commands that reload this run cannot import it; register it in a module of an "
            "importable package and name it config.model='<module>:script_net'") in caplog.text


def test_a_plain_named_run_continues_under_the_name_that_reloads_it(own_package):
    registry.create_model(own_package)  # imports and registers own_net
    assert config_lib.incompatible_fields({"model": "own_net"}, {"model": own_package}) == []
    assert config_lib.incompatible_fields({"model": "own_net"}, {"model": "lenet5"}) == ["model"]
    assert config_lib.incompatible_fields({"model": "gone_net"}, {"model": "gone_net"}) == []
    assert config_lib.incompatible_fields({"model": "gone_net"},
                                          {"model": "x.y:gone_net"}) == ["model"]
