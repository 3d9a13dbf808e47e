"""Every bad-input path of the engine raises a ValueError with a clear message before compiling."""

import json
import re

import flax.linen as nn
import numpy as np
import pytest

from cnnjax.layers import BatchNorm, Conv2D, max_pool2d
from cnnjax.models import registry
from cnnjax.train import checks, loop
from cnnjax.train.config import (
    check_batch_divisible,
    check_config,
    check_model_fields,
    default_config,
    eval_batch,
    validate_config,
)
from cnnjax.utils.validation import INPUT_TOO_SMALL_HINT
from tests.train import helpers


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


def _raises(config, tmp_path, message):
    with pytest.raises(ValueError) as err:
        loop.train_and_evaluate(config, str(tmp_path))
    assert message in str(err.value)
    assert not (tmp_path / "checkpoints").exists()  # failed before building/compiling anything
    return str(err.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model", "resnet9000", "config: model='resnet9000' is invalid; did you mean ['resnet"),
        (
            "optimizer.name",
            "lbfgs",
            "optimizer: name='lbfgs' is invalid; expected one of ['sgd', "
            "'adam', 'adamw', 'rmsprop']",
        ),
        (
            "schedule.name",
            "cyclic",
            "schedule: name='cyclic' is invalid; expected one of "
            "['constant', 'piecewise', 'exponential', 'cosine', "
            "'warmup_cosine', 'linear', 'one_cycle']",
        ),
        (
            "optimizer.learning_rate",
            0.0,
            "optimizer: learning_rate=0.0 is invalid; expected a positive",
        ),
        ("optimizer.learning_rate", -0.1, "optimizer: learning_rate=-0.1 is invalid"),
        (
            "global_batch_size",
            0,
            "config: global_batch_size=0 is invalid; expected a positive integer",
        ),
        ("global_batch_size", -8, "config: global_batch_size=-8 is invalid"),
        ("num_train_steps", 0, "config: num_train_steps=0 is invalid"),
        # Past int32's range the step counter overflowed when the first step compiled.
        ("num_train_steps", 2**31, "config: num_train_steps=2147483648 is invalid; expected a "
         "positive integer <= 2147483647 (2**31 - 1: the step counter is int32)."),
        (
            "parallel",
            "pjit",
            "config: parallel='pjit' is invalid; expected one of ['pmap', 'shard_map']",
        ),
        ("compute_dtype", "float16", "config: compute_dtype='float16' is invalid"),
        (
            "conv_impl",
            "cudnn",
            "config: conv_impl='cudnn' is invalid; expected one of ['xla', 'matmul', 'auto']",
        ),
        ("label_smoothing", 1.0, "config: label_smoothing=1.0 is invalid"),
        ("aux_loss_weight", -0.3,
         "config: aux_loss_weight=-0.3 is invalid; expected a finite number >= 0"),
        ("aux_loss_weight", float("nan"),
         "config: aux_loss_weight=nan is invalid; expected a finite number >= 0"),
        ("aux_loss_weight", float("inf"),
         "config: aux_loss_weight=inf is invalid; expected a finite number >= 0"),
        (
            "best_metric",
            "f1",
            "config: best_metric='f1' is invalid; expected one of ['loss', 'top1'",
        ),
        ("num_classes", 7, "config: num_classes=7 is invalid; dataset 'synthetic' has 4 classes"),
        ("num_devices", 64, "config: num_devices=64 is invalid; only"),
        ("seed", -1, "config: seed=-1 is invalid; expected an integer 0 <= seed < 2**63."),
        ("best_metric", "loss", "config: best_mode='max' is invalid; expected 'min' for "
                                "best_metric='loss' (lower is better only for a loss); set "
                                "--config.best_mode=min."),
        ("best_mode", "min", "config: best_mode='min' is invalid; expected 'max' for "
                             "best_metric='top1'"),
        ("seed", 2**63, "config: seed=9223372036854775808 is invalid; expected an integer"),
        ("num_devices", -1, "config: num_devices=-1 is invalid; expected 0 (all local devices)"),
        ("eval_batch_size", 0, "config: eval_batch_size=0 is invalid; expected a positive"),
        ("log_every_steps", 0, "config: log_every_steps=0 is invalid; expected a positive"),
        ("eval_every_steps", -5, "config: eval_every_steps=-5 is invalid"),
        ("checkpoint_every_steps", 0, "config: checkpoint_every_steps=0 is invalid"),
        ("keep_checkpoints", 0, "config: keep_checkpoints=0 is invalid"),
        ("best_mode", "lowest", "config: best_mode='lowest' is invalid; expected one of "
                                "['max', 'min']"),
        ("max_loss", -1.0, "config: max_loss=-1.0 is invalid; expected a positive finite number"),
        ("num_classes", 0, "config: num_classes=0 is invalid; expected a positive integer"),
        ("model", "", "config: model='' is invalid; expected a registered model name"),
    ],
)
def test_bad_config_messages(tmp_path, field, value, message):
    config = helpers.tiny_config(**{field: value})
    _raises(config, tmp_path, message)


def test_unknown_model_is_refused_as_the_config_field(tmp_path):
    """An unknown `config.model` is named as the config field, with the registry's advice
    (close matches, then every name), not as `create_model: unknown model name=...`; the
    launcher's `check_model_fields` says the same."""
    with pytest.raises(registry.UnknownModelError) as unknown:
        registry.model_info("nope_net")
    expected = f"config: model='nope_net' is invalid; {unknown.value.valid}."
    assert "valid names: [" in expected
    assert _raises(helpers.tiny_config(model="nope_net"), tmp_path, expected) == expected
    with pytest.raises(ValueError) as err:
        check_model_fields(helpers.tiny_config(model="nope_net"))
    assert str(err.value) == expected


def test_unknown_dataset_message(tmp_path, monkeypatch):
    """With the real data pipeline: an unknown dataset name is refused, listing the valid ones."""
    monkeypatch.undo()  # drop the synthetic pipeline
    helpers.register_tiny_model(monkeypatch)  # undo() unregistered it too
    import cnnjax.data.pipeline as pipeline

    assert loop is not None and pipeline.get_dataset_info  # the real module, not the fake
    config = helpers.tiny_config()
    config.data.name = "imagenet9"
    message = _raises(config, tmp_path, "imagenet9")
    assert "digits" in message and "cifar10" in message  # lists valid names


def test_batch_not_divisible_by_devices():
    config = default_config()
    config.global_batch_size = 10
    with pytest.raises(ValueError) as err:
        check_batch_divisible(config, 4)
    assert str(err.value) == (
        "config: global_batch_size=10 is invalid; expected a multiple of the "
        "device count 4 (per-device batch = global_batch_size / 4)."
    )
    config.global_batch_size, config.eval_batch_size = 8, 6
    with pytest.raises(
        ValueError, match="config: eval_batch_size=6 is invalid; expected a multiple"
    ):
        check_batch_divisible(config, 4)
    check_batch_divisible(default_config(), 4)  # 128 splits evenly


def test_a_batch_the_devices_do_not_split_names_the_num_devices_that_would():
    """A run resumed on a machine with 3 devices (num_devices=0: all of them) was told to change
    global_batch_size, which a resume refuses; num_devices, a runtime field, is the way out.
    The counts offered split every batch field: 16 over 1, 2, 4; eval 12 over 1, 2, 3, 4; and
    grad_accum_steps=8 each device's 16, 8 (not 4)."""
    config = default_config()
    config.global_batch_size, config.num_devices = 16, 0
    with pytest.raises(ValueError) as err:
        check_batch_divisible(config, 3, local_devices=3)
    assert str(err.value) == (
        "config: global_batch_size=16 is invalid; expected a multiple of the device count 3 "
        "(per-device batch = global_batch_size / 3); num_devices=0 took every local device "
        "(3): set --config.num_devices=1 or 2 to split it (a runtime field: a resumed run may "
        "change it).")
    config.num_devices, config.eval_batch_size = 3, 12
    with pytest.raises(ValueError) as err:
        check_batch_divisible(config, 3, local_devices=4)
    assert str(err.value).endswith(
        "(per-device batch = global_batch_size / 3); or set --config.num_devices=1, 2 or 4 to "
        "split it (a runtime field: a resumed run may change it).")
    config.grad_accum_steps = 8
    with pytest.raises(ValueError) as err:
        check_batch_divisible(config, 3, local_devices=4)
    assert "; or set --config.num_devices=1 or 2 to split it" in str(err.value)
    config.grad_accum_steps = 32  # no device count splits it: no advice to follow
    with pytest.raises(ValueError) as err:
        check_batch_divisible(config, 3, local_devices=4)
    assert "num_devices" not in str(err.value)


def test_train_and_evaluate_names_num_devices_for_a_batch_all_local_devices_do_not_split(
        tmp_path, monkeypatch):
    """Through the engine, on a machine with 3 local devices and num_devices=0."""
    import jax

    devices = jax.local_devices()
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: devices[:1] * 3)
    config = helpers.tiny_config()
    config.global_batch_size, config.num_devices = 16, 0
    _raises(config, tmp_path, "num_devices=0 took every local device (3): set "
                              "--config.num_devices=1 or 2 to split it")


def test_a_finished_run_evaluates_on_devices_its_training_batch_does_not_divide():
    """A run trained with batch 30 on one device was refused by evaluate on a 4-device machine
    ("global_batch_size=30 ... expected a multiple of the device count 4"), though evaluation
    pads and masks: its eval batch is the training batch rounded up to the devices."""
    config = default_config()
    config.global_batch_size, config.grad_accum_steps = 30, 4
    with pytest.raises(ValueError, match="global_batch_size=30 is invalid"):
        check_batch_divisible(config, 4)
    check_batch_divisible(config, 4, for_training=False)  # nor grad_accum_steps (7 per device)
    assert (eval_batch(config, 4), eval_batch(config, 1), eval_batch(config, 3)) == (32, 30, 30)
    config.eval_batch_size = 6  # an explicit one is used as given, and so checked
    assert eval_batch(config, 4) == 6
    with pytest.raises(ValueError, match="eval_batch_size=6 is invalid"):
        check_batch_divisible(config, 4, for_training=False)


def test_default_config_is_valid():
    validate_config(default_config())


class _ValidConvNet(nn.Module):
    num_classes: int = 3
    dtype: object = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        x = nn.Conv(4, (5, 5), padding="VALID", name="conv1")(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.Conv(8, (5, 5), padding="VALID", name="conv2")(x)
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def test_input_too_small_names_the_layer():
    checks.check_input_size(_ValidConvNet(), "validnet", (16, 16, 1))  # 16 -> 12 -> 6 -> 2: fine
    with pytest.raises(ValueError) as err:
        checks.check_input_size(_ValidConvNet(), "validnet", (12, 12, 1))  # 12 -> 8 -> 4 -> 0
    assert str(err.value).startswith(
        "validnet: input resolution='12x12' is invalid; too small: layer conv2 (Conv) fails"
    )
    with pytest.raises(ValueError, match="layer conv1 \\(Conv\\) fails"):
        checks.check_input_size(_ValidConvNet(), "validnet", (4, 4, 1))


class _SlicingBatchNormNet(nn.Module):
    """A map emptied by a slice in the model's own code, then fed to cnnjax's BatchNorm (a flax
    layer's subclass, so checked for an input with no features as flax's own layers are)."""
    num_classes: int = 3
    dtype: object = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        x = nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv1")(x)
        x = BatchNorm(use_running_average=not train, name="bn1")(x[:, 1:-1, 1:-1])
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def test_a_batch_norm_given_an_empty_map_is_named_with_what_fed_it():
    checks.check_input_size(_SlicingBatchNormNet(), "slicenet", (9, 9, 1))  # 4x4 -> 2x2: fine
    with pytest.raises(ValueError) as err:
        checks.check_input_size(_SlicingBatchNormNet(), "slicenet", (5, 5, 1))  # 2x2 -> 0x0
    assert str(err.value).startswith(
        "slicenet: input resolution='5x5' is invalid; too small: layer bn1 (BatchNorm) fails "
        "(its input has shape (1, 0, 0, 4), no features; the input came from layer conv1 (Conv), "
        "shape (1, 2, 2, 4))")


class _OnePixelNet(nn.Module):
    """An 8x8 conv to a 1x1 map, then cnnjax's BatchNorm: one value per channel per image."""
    num_classes: int = helpers.NUM_CLASSES
    dtype: object = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        x = nn.Conv(4, (8, 8), padding="VALID", name="conv")(x)
        x = BatchNorm(use_running_average=not train, axis_name=self.axis_name, name="bn")(x)
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("batch, accum, refused", [(1, 1, True), (4, 4, True), (2, 1, False),
                                                   (4, 2, False)])
def test_one_image_per_batch_norm_step_is_refused_by_the_batch_fields(monkeypatch, batch, accum,
                                                                      refused):
    """One image per device and accumulation micro-batch at a 1x1 map gives a BatchNorm one
    value per channel: the layer refused it only in the first train step (after the workdir was
    written) and, under accumulation, advised a larger batch where fewer micro-batches were
    meant. Refused before anything is written, naming the batch fields."""
    from cnnjax.train.config import check_config

    helpers.install_fake_pipeline(monkeypatch)
    with registry.registered_model("one_pixel_net", _OnePixelNet, **helpers.TINY_MODEL_INFO):
        config = helpers.tiny_config(model="one_pixel_net", global_batch_size=batch,
                                     grad_accum_steps=accum)
        if not refused:
            check_config(config)
            return
        with pytest.raises(ValueError, match=re.escape(
                f"config: global_batch_size={batch} is invalid; with grad_accum_steps={accum} "
                "on 1 device each train micro-batch holds 1 image, and BatchNorm bn then "
                "normalizes each channel over a single value")):
            check_config(config)
        check_config(config, for_training=False)  # loading a finished run's model: no step


def test_input_too_small_for_a_pooling_function_names_what_fed_it():
    """Pooling written as a function (not a submodule) fails inside the model's own __call__:
    the message names that model, the op and the layer whose output it received."""
    from cnnjax.models import create_model

    with pytest.raises(ValueError) as err:  # registry minimum (63) skipped: the trace decides
        checks.check_input_size(create_model("alexnet", num_classes=10), "alexnet", (40, 40, 3))
    message = str(err.value)
    assert message.startswith("alexnet: input resolution='40x40' is invalid; too small: layer "
                              "AlexNet (AlexNet) fails (ValueError: max_pool2d: kernel_size=3")
    assert "the input it got came from layer conv5 (Conv2D), shape (1, 1, 1, 256)" in message


class _ConvPoolConvNet(nn.Module):
    """Two cnnjax convolutions with a pooling function (no submodule) between: 5x5 -> 2x2."""
    num_classes: int = 3
    dtype: object = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        x = max_pool2d(Conv2D(8, 3, padding=1, name="c1")(x), 3, 2)
        return Conv2D(16, 3, name="c2")(x)


def test_a_layer_failing_on_its_input_names_that_input_not_the_last_layers():
    """c2 was said to get its input from c1 at (1, 5, 5, 8), though the pool between made it
    2x2 ((5 - 3) // 2 + 1), and its own hint was cut at 200 characters: the layer's own input
    is named, after the whole of its message."""
    with pytest.raises(ValueError) as err:
        checks.check_input_size(_ConvPoolConvNet(), "cpc", (5, 5, 1))
    message = str(err.value)
    assert message.startswith("cpc: input resolution='5x5' is invalid; too small: layer c2 "
                              "(Conv2D) fails (ValueError: Conv2D: kernel_size=(3, 3) is invalid")
    assert f"{INPUT_TOO_SMALL_HINT}; its input has shape (1, 2, 2, 8)); use a larger" in message
    assert "came from" not in message


def test_a_layer_that_fails_at_any_size_is_not_blamed_on_the_input_size():
    """AlexNet at its own 224x224 with groups that do not divide a layer's channels: the layer's
    own error, pointing at the model's settings, not "use a larger data.image_size"."""
    from cnnjax.models.alexnet import AlexNet  # the registry's names fix their groups

    model = AlexNet(num_classes=10, widths=(64, 192, 384, 256, 256), groups=(1, 1, 5, 1, 1),
                    conv1_padding=2, lrn=False, pool_size=6, dropout_before_fc=True)
    with pytest.raises(ValueError) as err:
        checks.check_input_size(model, "alexnet", (224, 224, 3))
    message = str(err.value)
    assert message.startswith("alexnet: layer ")
    assert "fails on a 224x224 input and on a 896x896 one alike" in message
    assert "so not for the input size; check the model's settings (config.model_kwargs): " \
           "ValueError: Conv2D: groups=5 is invalid" in message
    assert "image_size" not in message


def test_a_model_setting_limited_by_the_input_size_is_named_in_the_hint():
    """Faster R-CNN's `rpn_min_size` above the image's side: a larger image would do, but so
    would a smaller setting; the hint named only the image size and "a model meant for small
    images" before."""
    from cnnjax.models import create_model

    model = create_model("faster_rcnn_small", num_classes=4, rpn_min_size=100.0)
    with pytest.raises(ValueError) as err:
        checks.check_input_size(model, "faster_rcnn_small", (64, 64, 3))
    message = str(err.value)
    assert message.startswith("faster_rcnn_small: input resolution='64x64' is invalid; too "
                              "small: layer FasterRCNN (FasterRCNN.rpn) fails (ValueError: "
                              "FasterRCNN: rpn_min_size=100.0 is invalid")
    assert message.endswith("; use a larger data.image_size or change "
                            "config.model_kwargs.rpn_min_size.")


def test_dense_window_sizes_above_the_image_are_named_in_the_hint():
    """Fast R-CNN's `proposal_sizes` above the image's side: the hint said "a model meant for
    small images" (the layer's error named `input.shape`, not the setting)."""
    from cnnjax.models import create_model

    model = create_model("fast_rcnn_small", num_classes=4, proposal_sizes=(100,))
    with pytest.raises(ValueError) as err:
        checks.check_input_size(model, "fast_rcnn_small", (64, 64, 3))
    assert str(err.value).endswith("; use a larger data.image_size or change "
                                   "config.model_kwargs.proposal_sizes.")


class _HostMaskNet(nn.Module):
    """Builds a NumPy mask over the map at trace time, as LeNet-5's subsampling does."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h, w = x.shape[1:3]
        if h * w > 10**6:  # what NumPy does for LeNet-5 at 1000000x1000000 (1.8 TiB)
            raise MemoryError(f"Unable to allocate {h * w * 8} bytes")
        return nn.Dense(2)(x.reshape(x.shape[0], -1) * np.ones(h * w * x.shape[-1]))


def test_an_input_too_large_to_trace_is_blamed_on_the_input_size():
    """A MemoryError read as "fails at any size, check the model's settings" before."""
    checks.check_input_size(_HostMaskNet(), "masknet", (32, 32, 1))
    with pytest.raises(ValueError, match=r"^masknet: input resolution='2000x2000' is invalid; "
                                         r"too large: layer .* runs out of memory building it "
                                         r"\(MemoryError: Unable to allocate .*\); use a smaller "
                                         r"data.image_size\.$"):
        checks.check_input_size(_HostMaskNet(), "masknet", (2000, 2000, 1))


_COLLAPSING = "test_collapsing_convnet"


@pytest.fixture
def collapsing_model():
    """Registers the test-only `_COLLAPSING` model for one test: it must never reach the zoo
    list (`list_models()`) of tests that run later in the same session."""
    with registry.registered_model(_COLLAPSING, lambda **kw: _ValidConvNet(**kw),
                                   input_shape=(16, 16, 1), min_input_size=1, num_classes=4):
        yield _COLLAPSING


def test_test_models_are_registered_only_during_their_tests(collapsing_model):
    assert {collapsing_model, helpers.TINY_MODEL} <= set(registry.list_models())


def test_test_models_are_gone_after_their_fixture():
    """The fixture's teardown (what pytest runs after each test) unregisters the model, in any
    test order or worker: driven here by hand."""
    fixture = collapsing_model.__wrapped__()
    assert next(fixture) in registry.list_models()
    with pytest.raises(StopIteration):
        next(fixture)
    assert _COLLAPSING not in registry.list_models()


def test_registered_model_unregisters_even_when_the_block_fails():
    with pytest.raises(RuntimeError, match="^boom$"), registry.registered_model(
        "test_temporary", lambda **kw: _ValidConvNet(**kw), input_shape=(8, 8, 1)
    ) as info:
        assert registry.model_info("test_temporary") is info
        raise RuntimeError("boom")
    assert "test_temporary" not in registry.list_models()
    with pytest.raises(ValueError, match="unknown model name='test_temporary'"):
        registry.unregister_model("test_temporary")


def test_input_too_small_is_refused_by_the_loop_before_compiling(tmp_path, collapsing_model):
    """Registry minimum 1 passes; the abstract trace finds the layer (8 -> 4 -> 2 -> conv2)."""
    _raises(
        helpers.tiny_config(model=_COLLAPSING),
        tmp_path,
        f"{_COLLAPSING}: input resolution='8x8' is invalid; too small: layer conv2 (Conv) fails",
    )


def test_input_below_registry_minimum(tmp_path):
    config = helpers.tiny_config(model="lenet5")
    _raises(
        config,
        tmp_path,
        "lenet5: input resolution='8x8' is invalid; the model needs inputs of at least 32x32",
    )


def test_missing_dataset_is_recorded_in_summary(tmp_path, monkeypatch):
    """A catalogue dataset that is not prepared: FileNotFoundError, status 'failed' on disk."""
    monkeypatch.undo()  # the real pipeline
    helpers.register_tiny_model(monkeypatch)  # undo() unregistered it too
    from cnnjax.data.pipeline import default_data_config

    config = helpers.tiny_config()
    config.data = default_data_config("cifar10")
    config.data.data_dir = str(tmp_path / "no_tfds_here")
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError) as err:
        loop.train_and_evaluate(config, str(workdir))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["message"] == str(err.value) and "cifar10" in summary["message"]


# ------------------------------------------------------------------------------ model_kwargs
def test_model_kwargs_config_declares_settable_fields_unset():
    from cnnjax.train.config import model_kwargs_config

    lenet = model_kwargs_config("lenet5")
    assert dict(lenet.items()) == {"activation": None, "subsampling": None, "c3_table": None}
    assert lenet.get_type("activation") is str
    cifar = model_kwargs_config("resnet20_cifar")
    # depth is fixed by the factory (the model name), act holds a function, num_classes/dtype/
    # axis_name are the engine's.
    assert set(cifar) == {"widths", "shortcut", "zero_init_last_bn", "drop_path_rate"}
    assert cifar.get_type("widths") is tuple and cifar.get_type("zero_init_last_bn") is bool
    fcn = model_kwargs_config("fcn8s_vgg16")
    assert fcn.get_type("dropout_rate") is float  # default None: type from `float | None`
    assert model_kwargs_config("alexnet_2tower").get_type("dropout_rate") is float


def test_model_kwargs_reach_the_model_and_unset_ones_are_not_passed(tmp_path):
    from cnnjax.train.config import model_kwargs_config

    config = helpers.tiny_config()
    config.model_kwargs = model_kwargs_config(helpers.TINY_MODEL)
    assert dict(config.model_kwargs.items()) == {"dropout_rate": None}
    run = loop._Run(config, str(tmp_path / "default"), 0.0)
    run.setup()
    assert run.model.dropout_rate == 0.0  # TinyNet's default
    config.model_kwargs.dropout_rate = 0.25
    run = loop._Run(config, str(tmp_path / "set"), 0.0)
    run.setup()
    assert run.model.dropout_rate == 0.25


def test_unknown_model_kwarg_is_refused_listing_the_fields(tmp_path):
    config = helpers.tiny_config(**{"model_kwargs.dropout_rate": 0.1})
    config.model_kwargs.widht = 8
    message = _raises(config, tmp_path, "config: model_kwargs={'dropout_rate': 0.1, 'widht': 8} "
                                        f"is invalid; model {helpers.TINY_MODEL!r} does not "
                                        "accept them (")
    assert "'widht'" in message and "its settable fields are ['dropout_rate']" in message


def test_unset_and_missing_fields_are_compatible():
    """A workdir saved before a config declared `model_kwargs` placeholders still resumes."""
    from cnnjax.train.config import incompatible_fields

    saved = {"model": "lenet5", "optimizer.name": "sgd", "log_every_steps": 10}
    current = dict(saved, **{"model_kwargs.activation": None, "log_every_steps": 1})
    assert incompatible_fields(saved, current) == []  # log_every_steps is a runtime field
    current["model_kwargs.activation"] = "relu"
    assert incompatible_fields(saved, current) == ["model_kwargs.activation"]
    assert incompatible_fields(current, saved) == ["model_kwargs.activation"]


def test_empty_eval_split_is_reported(tmp_path, monkeypatch):
    """An eval split with no examples (e.g. a slice like `test[90%:90%]`) cannot be averaged."""
    import sys

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "eval_batches",
                        lambda *args, **kwargs: iter(()))
    config = helpers.tiny_config(num_train_steps=2, eval_every_steps=2)
    with pytest.raises(ValueError, match="data: eval split of 'synthetic' yielded no examples"):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "yielded no examples" in summary["message"]


def _bad_schedule():
    return helpers.tiny_config(**{"schedule.name": "warmup_cosine", "schedule.warmup_steps": 12})


def _unknown_kwarg():
    config = helpers.tiny_config(**{"model_kwargs.dropout_rate": 0.1})
    config.model_kwargs.widht = 8
    return config


@pytest.mark.parametrize(
    "make,message",
    [
        (_bad_schedule, "schedule: warmup_steps=12 is invalid; expected 0 <= warmup_steps < "
                        "num_train_steps=12"),
        (lambda: helpers.tiny_config(num_classes=7), "config: num_classes=7 is invalid"),
        (lambda: helpers.tiny_config(global_batch_size=2 * helpers.NUM_TRAIN),
         f"config: global_batch_size={2 * helpers.NUM_TRAIN} is invalid; expected at most the "
         f"{helpers.NUM_TRAIN} examples of the train split of 'synthetic' (an epoch would "
         "have no step)."),
        # a batch of only padding: a huge one trained and then died at the first eval
        (lambda: helpers.tiny_config(eval_batch_size=10**8),
         f"config: eval_batch_size=100000000 is invalid; expected at most {helpers.NUM_EVAL}: "
         f"the eval split of 'synthetic' has {helpers.NUM_EVAL} examples (rounded up to a "
         "multiple of the 1 devices), and a larger batch holds only padding"),
        (lambda: helpers.tiny_config(num_devices=64), "config: num_devices=64 is invalid"),
        (lambda: helpers.tiny_config(**{"data.name": "nope"}), "data: name='nope' is invalid"),
        (lambda: helpers.tiny_config(model=_COLLAPSING), "too small: layer conv2 (Conv) fails"),
        (lambda: helpers.tiny_config(model="yolo_v1"), "it is a detection model"),
        (_unknown_kwarg, "does not accept them"),
    ],
)
def test_check_config_refuses_what_the_loop_refuses_with_the_same_message(
    tmp_path, make, message, collapsing_model
):
    """`check_config` is the loop's own pre-compilation check: same errors, no workdir output
    (the schedule is checked before config.json is written, not when training starts)."""
    from cnnjax.train.config import check_config

    with pytest.raises(ValueError) as checked:
        check_config(make())
    assert message in str(checked.value)
    with pytest.raises(ValueError) as trained:
        loop.train_and_evaluate(make(), str(tmp_path))
    assert str(trained.value) == str(checked.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock", "summary.json"]


def test_check_config_returns_what_the_loop_trains_with(tmp_path, monkeypatch):
    from cnnjax.train.config import check_config

    monkeypatch.chdir(tmp_path)
    checked = check_config(helpers.tiny_config(freeze="backbone",
                                               **{"model_kwargs.dropout_rate": 0.25}))
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert checked.task == "classification" and checked.data_info.num_classes == 4
    assert checked.model.dropout_rate == 0.25 and checked.model.num_classes == 4
    assert float(checked.schedule(0)) == float(np.float32(0.05))  # cosine from the peak
    assert set(checked.variable_shapes["params"]) == {"conv", "bn", "head"}


def test_num_devices_in_a_multi_process_job_is_refused(tmp_path, monkeypatch):
    """Each process would build its data-parallel axis from its own devices only: separate
    models that never exchange gradients."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    _raises(helpers.tiny_config(num_devices=1), tmp_path,
            "config: num_devices=1 is invalid; a multi-process job trains on every local device "
            "of every process (leave num_devices=0)")


def test_an_unaccepted_model_kwarg_lists_the_fields_of_a_model_that_pins_some(tmp_path):
    """resnet20_cifar pins `depth`: probing it must not turn into a bare KeyError."""
    import ml_collections

    config = helpers.tiny_config(model="resnet20_cifar")
    config.model_kwargs = ml_collections.ConfigDict({"activation": "relu"})
    _raises(config, tmp_path,
            "config: model_kwargs={'activation': 'relu'} is invalid; model 'resnet20_cifar' does "
            "not accept them")
    message = _raises(config, tmp_path, "its settable fields are")
    assert "['drop_path_rate', 'shortcut', 'widths', 'zero_init_last_bn']" in message


def test_numpy_scalars_in_model_kwargs_are_saved_as_their_python_values():
    """A model now takes np.True_ for a bool field (as the call flags did); config.json wrote it
    as the string "unserializable object: True", which a reload then refused, and a rerun's
    comparison read as a changed config."""
    from cnnjax.train.config import flatten, to_json

    config = default_config()
    config.model = "nin_cifar"
    config.model_kwargs.relu_logits = np.True_
    config.model_kwargs.dropout_rate = np.float32(0.25)
    saved = json.loads(to_json(config))["model_kwargs"]
    assert saved == {"relu_logits": True, "dropout_rate": 0.25}
    assert flatten(json.loads(to_json(config)))["model_kwargs.relu_logits"] is True
    assert flatten(config)["model_kwargs.relu_logits"] is True


def test_legacy_defaults_fill_old_config_json_at_any_depth():
    """An old config.json lacks the fields added since: they take their old implicit values,
    inside a saved block too (its own fields win)."""
    from cnnjax.train.config import with_legacy_defaults

    old = {"model": "lenet5", "data": {"name": "digits", "augment": False}}
    filled = with_legacy_defaults(old)
    assert filled["task"] == "classification" and filled["grad_accum_steps"] == 1
    assert filled["data"] == {"name": "digits", "augment": False, "randaugment_layers": 0,
                              "randaugment_magnitude": 9.0, "grey_to_rgb": False}
    assert filled["ema"] == {"decay": None, "warmup": True}
    assert filled["mixing"]["mixup_alpha"] == 0.0
    assert old == {"model": "lenet5", "data": {"name": "digits", "augment": False}}


def test_engine_fields_in_model_kwargs_are_named(tmp_path, monkeypatch):
    """num_classes, dtype and axis_name are the engine's: in model_kwargs a named error, not the
    duplicate-keyword TypeError of the model call."""
    helpers.install_fake_pipeline(monkeypatch)
    for field, value in (("num_classes", 5), ("axis_name", "x")):
        config = helpers.tiny_config()
        with config.model_kwargs.ignore_type():
            config.model_kwargs[field] = value
        with pytest.raises(ValueError, match=rf"config: model_kwargs.{field}={value!r} is "
                                             r"invalid; the engine sets it"):
            check_config(config)


def test_a_config_json_without_init_from_still_loads(tmp_path, monkeypatch):
    """Runs from before init_from existed: their config.json gets no partial init_from block,
    and a resume compares init_from.ema as its old implicit False."""
    import json

    from cnnjax.train import loop
    from cnnjax.train.config import flatten, incompatible_fields
    from cnnjax.train.trained import load_trained

    helpers.install_fake_pipeline(monkeypatch)
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=2), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("init_from", "freeze"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_trained(str(tmp_path)).step == 2
    warm = flatten(helpers.tiny_config(**{"init_from.workdir": "/src"}))
    old_warm = {k: v for k, v in warm.items() if k != "init_from.ema"}
    assert incompatible_fields(old_warm, warm) == []
    assert incompatible_fields(old_warm, {**warm, "init_from.ema": True}) == ["init_from.ema"]


# -------------------------------------------- settings a task or block would silently ignore
def test_an_unknown_init_from_field_is_named(tmp_path):
    """`init_from.use_ema=True` in a Python config file (the command line refuses it) used to
    load the source's raw weights silently; refused like an unknown mixing/distill field."""
    from cnnjax.train.config import INIT_FROM_FIELDS

    assert set(default_config().init_from) == set(INIT_FROM_FIELDS)  # the schema's fields
    config = helpers.tiny_config(**{"init_from.workdir": str(tmp_path / "source")})
    config.init_from.use_ema = True
    message = ("init_from: field='use_ema' is invalid; expected one of ['workdir', 'step', "
               "'exclude', 'submodule', 'ema'].")
    with pytest.raises(ValueError) as err:
        validate_config(config)
    assert str(err.value) == message
    _raises(config, tmp_path / "run", message)
    assert not (tmp_path / "run" / "config.json").exists()
    config = helpers.tiny_config()  # no warm start: still refused (the typo is still a typo)
    config.init_from.wokdir = "/src"
    with pytest.raises(ValueError, match=r"^init_from: field='wokdir' is invalid"):
        validate_config(config)


@pytest.mark.parametrize("name, task", [("fcn_shapes", "segmentation"),
                                        ("yolo_shapes", "detection")])
def test_label_smoothing_is_refused_where_the_loss_has_no_class_labels(name, task,
                                                                      monkeypatch):
    """The detection and segmentation steps never read label_smoothing: refused, as mixing is,
    rather than ignored; 0 (the default) passes."""
    import importlib

    monkeypatch.undo()  # the configs import the real data modules: never bind them to the fake
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    validate_config(config)
    config.label_smoothing = 0.1
    with pytest.raises(ValueError) as err:
        validate_config(config)
    assert str(err.value) == (
        f"config: label_smoothing=0.1 is invalid; label smoothing needs class labels "
        f"(config.task='classification', not {task!r}); set label_smoothing=0.")
    validate_config(helpers.tiny_config(label_smoothing=0.1))  # classification: used


def test_yolo_loss_settings_in_model_kwargs_are_refused_by_check_config(monkeypatch):
    """lambda_coord/lambda_noobj/confidence_target used to be checked only when the loss was
    traced in the first train step; now `check_config` (the loop's pre-compilation check)
    refuses them when it builds the model."""
    monkeypatch.undo()  # the real detection pipeline module, with its dataset info stubbed
    from cnnjax.data import detection, pipeline
    from experiments.configs import yolo_shapes

    monkeypatch.setattr(detection, "get_dataset_info", lambda data: pipeline.DatasetInfo(
        "shapes_multi", 4, (64, 64, 3), 4000, 500))
    for field, value, message in (
        ("confidence_target", "IOU",
         "YOLOv1: confidence_target='IOU' is invalid; expected one of ['iou', 'one']."),
        ("lambda_coord", -5.0,
         "YOLOv1: lambda_coord=-5.0 is invalid; expected a finite number >= 0."),
        ("lambda_noobj", float("nan"),
         "YOLOv1: lambda_noobj=nan is invalid; expected a finite number >= 0."),
    ):
        config = yolo_shapes.get_config()
        config.model_kwargs[field] = value
        validate_config(config)  # field values only: the model is built by check_config
        with pytest.raises(ValueError) as err:
            check_config(config)
        assert str(err.value) == message


def test_faster_rcnn_anchors_that_fit_no_image_are_refused_by_check_config(monkeypatch):
    """`--config.model_kwargs.anchor_scales=(500,)` on 64x64 scenes: no anchor lies inside the
    image (the RPN would never train). FasterRCNN.loss refuses that when traced, which was in
    the first train step, after the workdir was written and the init had compiled (80 s into
    `experiments.train`, summary.json 'failed'); `check_config` now refuses it first."""
    monkeypatch.undo()  # the real detection pipeline module, with its dataset info stubbed
    from cnnjax.data import detection, pipeline
    from experiments.configs import faster_rcnn_shapes

    monkeypatch.setattr(detection, "get_dataset_info", lambda data: pipeline.DatasetInfo(
        "shapes_multi", 4, (64, 64, 3), 4000, 500))
    config = faster_rcnn_shapes.get_config()
    config.model_kwargs.anchor_scales = (500.0,)
    with pytest.raises(ValueError) as err:
        check_config(config)
    assert str(err.value) == (
        "FasterRCNN: anchor_scales=(500.0,) is invalid; no anchor (anchor_ratios=(0.5, 1.0, "
        "2.0), stride 8) lies inside the 64x64 image, and the RPN trains only on anchors inside "
        "it, so its losses would stay 0; expected smaller anchor_scales or larger images.")
    config.model_kwargs.anchor_scales = (7.0,)  # 56-px anchors fit the 64x64 scenes
    check_config(config)


@pytest.mark.parametrize("value", [None, float("nan"), -0.1])
def test_label_smoothing_that_is_not_a_number_in_0_1_is_a_named_value_error(value):
    """A config file's `label_smoothing: null` failed with float()'s bare TypeError,
    naming no field; every non-number or out-of-range value is a ValueError naming it."""
    config = helpers.tiny_config()
    config.label_smoothing = value
    with pytest.raises(ValueError, match=r"^config: label_smoothing=.* is invalid; expected "
                                         r"0 <= label_smoothing < 1"):
        validate_config(config)


def test_a_single_class_classifier_is_refused_before_compiling(tmp_path, monkeypatch):
    """data.classes=(k,) left a one-class classifier: its softmax cross-entropy is 0 whatever the
    weights (also with label smoothing or mixing), so the run trained nothing and reported top-1
    1.0. Refused by check_config, the loop's pre-compilation check, naming data.classes; two
    classes still train."""
    monkeypatch.undo()  # the real pipeline: `digits` with a class subset
    helpers.register_tiny_model(monkeypatch)
    from experiments.configs import lenet5_digits

    config = lenet5_digits.get_config()
    config.data.classes = (3,)
    message = ("data: classes=(3,) is invalid; a classifier needs at least 2 classes (softmax "
               "cross-entropy over one class is 0 whatever the weights, so nothing would train)")
    with pytest.raises(ValueError) as checked:
        check_config(config)
    assert message in str(checked.value)
    _raises(config, tmp_path / "run", message)
    config.data.classes = (3, 1)
    assert check_config(config).data_info.num_classes == 2


def test_a_backbone_only_resnet_is_refused_by_check_config(monkeypatch):
    """`--config.model=resnet18 --config.model_kwargs.features_only=True` (a settable field, so
    model_kwargs_config declares it) builds a backbone whose output is a dict of feature maps:
    check_config passed it and the classification run failed in its first train step
    ("'dict' object has no attribute 'astype'"), after the workdir was written."""
    monkeypatch.undo()  # the real digits config (generated offline)
    from cnnjax.train.config import model_kwargs_config
    from experiments.configs import lenet5_digits

    config = lenet5_digits.get_config()
    config.model = "resnet18"
    config.model_kwargs = model_kwargs_config("resnet18")
    config.data.grey_to_rgb = True
    check_config(config)  # the classifier itself is fine on these images
    config.model_kwargs.features_only = True
    with pytest.raises(ValueError) as err:
        check_config(config)
    assert str(err.value).startswith(
        "config: model_kwargs.features_only=True is invalid; expected False (resnet18 with "
        "features_only=True is a backbone")


@pytest.mark.parametrize("task, model", [("detection", "lenet5"),
                                         ("classification", "yolo_v1_small")])
def test_a_model_of_another_task_is_named_before_the_tasks_own_fields(task, model):
    """--config.task=detection on lenet5_digits was refused for best_metric='top1' (no
    detection metric), as if the metric were the fault; the model's task is checked first."""
    config = default_config()
    config.model, config.task = model, task
    other = "classification" if task == "detection" else "detection"
    with pytest.raises(ValueError, match=rf"^config: model={model!r} is invalid; it is a "
                                         rf"{other} model and config.task={task!r} "
                                         rf"\(set config.task={other!r}, or pick one of \["):
        validate_config(config)
