"""The model registry: keywords a model does not take are named errors, not TypeErrors."""

import ast
import functools
import re
import sys
import textwrap

import flax.linen as nn
import numpy as np
import pytest

from cnnjax.models import (
    ModelArgumentError,
    UnknownModelError,
    create_model,
    list_models,
    model_info,
    registry,
    settable_fields,
)
from cnnjax.models.alexnet import AlexNet
from cnnjax.models.registry import register_model, registered_model
from cnnjax.models.resnet import ResNet18


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("resnet18", {"widht": 3}, r"create_model: widht=3 is invalid; model 'resnet18' does not "
                               r"take 'widht' \(unknown, or fixed by its name\); it takes "
                               r"\['act', 'drop_path_rate', 'features_only'"),
    # the keywords every model takes were left out of the list, and nothing was suggested ...
    ("resnet18", {"num_clases": 3}, r"model 'resnet18' does not take 'num_clases' .*; it takes "
                                    r"\[.*'zero_init_last_bn', 'num_classes', 'dtype', "
                                    r"'axis_name'\]\. Did you mean \"num_classes\"\?$"),
    # ... but a name merely like another is not one: param_dtype is not the compute dtype
    ("resnet18", {"param_dtype": "float32"}, r"does not take 'param_dtype' .*'axis_name'\]\.$"),
    # a keyword the model does not have is named as such, whatever its value
    ("lenet5", {"act": None}, r"model 'lenet5' does not take 'act'"),
    ("resnet20_cifar", {"depth": 32}, r"create_model: depth=32 is invalid; model "
                                      r"'resnet20_cifar' does not take 'depth'"),
])
def test_an_unknown_or_fixed_keyword_is_a_named_value_error(name, kwargs, message):
    with pytest.raises(ModelArgumentError, match=message) as caught:
        create_model(name, **kwargs)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("name", "kwargs"), [
    # each would build another registered network under this name
    ("densenet121", {"block_sizes": (6, 12, 32, 32)}),  # DenseNet-169
    ("densenet121", {"growth_rate": 48}),
    ("densenet121", {"bottleneck": False}),
    ("densenet161", {"num_init_features": 64}),
    ("vgg16", {"stages": ((64, 64), (128,))}),
    ("vgg16", {"batch_norm": True}),  # vgg16_bn
    ("nin", {"stages": ()}),
    ("nin_cifar", {"stages": ()}),
    ("plain20_cifar", {"shortcut": "A"}),  # resnet20_cifar
    ("alexnet", {"groups": (1, 2, 1, 2, 2)}),  # towers: alexnet_2tower's layout
    ("alexnet", {"widths": (96, 256, 384, 384, 256)}),
    ("alexnet_2tower", {"lrn": False}),
    ("alexnet_2tower", {"pool_size": 6}),
])
def test_a_name_fixes_its_architecture(name, kwargs):
    (field, _), = kwargs.items()
    with pytest.raises(ModelArgumentError, match=rf"model '{name}' does not take '{field}' "
                                                 r"\(unknown, or fixed by its name\)"):
        create_model(name, **kwargs)
    assert field not in settable_fields(name)


def test_a_cifar_resnet_takes_the_papers_shortcut_options_only():
    assert create_model("resnet20_cifar", shortcut="B").shortcut == "B"
    with pytest.raises(ValueError, match=r"^resnet20_cifar: shortcut='none' is invalid; "
                                         r"expected one of \['A', 'B', 'C'\] \(without "
                                         r"shortcuts it is plain20_cifar\)\.$"):
        create_model("resnet20_cifar", shortcut="none")
    # knobs that are not the architecture's identity stay settable
    assert create_model("densenet121", stem="cifar", drop_rate=0.1).stem == "cifar"

def test_settable_fields_leave_out_what_the_name_fixes_and_the_engine_sets():
    fields = settable_fields("resnet20_cifar")
    assert "depth" not in fields and not {"num_classes", "dtype", "axis_name"} & set(fields)
    assert fields["shortcut"].default == "A" and fields["drop_path_rate"].default == 0.0


class _Broken(nn.Module):
    num_classes: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes == 3:
            raise TypeError("a bug inside the model, not a keyword problem")


def test_a_type_error_inside_the_model_is_not_disguised():
    with (registered_model("test_broken_model", lambda **kw: _Broken(**kw), num_classes=2),
          pytest.raises(TypeError, match="a bug inside the model")):
        create_model("test_broken_model", num_classes=3)


@pytest.mark.slow  # ~30 s of abstract traces of five detectors
@pytest.mark.parametrize("name", ["yolo_v1", "yolo_v1_small", "rcnn_small", "fast_rcnn_small",
                                  "sppnet_small"])
def test_a_detectors_registered_min_input_size_is_exact(name):
    """As for the classifiers (tests/models/test_classic.py): the model initializes and its
    training loss traces at `min_input_size`, and one pixel less is refused, naming the layer
    (faster_rcnn_small's 18 is the smallest image with an anchor inside: its own test)."""
    import jax
    import jax.numpy as jnp

    from cnnjax.train.checks import check_input_size

    info = model_info(name)
    size, model = info.min_input_size, create_model(name)
    check_input_size(model, name, (size, size, 3), 1)
    with pytest.raises(ValueError, match="is invalid"):
        check_input_size(model, name, (size - 1, size - 1, 3), 1)
    key = jax.random.key(0)
    spec = jax.ShapeDtypeStruct
    images = spec((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(key, x, train=False), images)
    losses, _ = jax.eval_shape(
        lambda v, x, b, lab, ok: model.apply(v, x, b, lab, ok, train=True,
                                             method=type(model).loss,
                                             rngs={"dropout": key, "sample": key},
                                             mutable=["batch_stats"]),
        variables, images, spec((2, 3, 4), jnp.float32), spec((2, 3), jnp.int32),
        spec((2, 3), jnp.bool_))
    assert all(leaf.shape == () for leaf in jax.tree.leaves(losses))


@pytest.mark.parametrize("name,field", [
    ("resnet50", "stride_in_1x1"), ("resnet18", "features_only"), ("nin", "relu_logits"),
    ("fcn8s_vgg16", "learn_final_upsample"),
])
def test_a_switch_given_a_non_bool_is_refused(name, field):
    """A string such as "False" is truthy: taken as given, it silently meant True."""
    with pytest.raises(ValueError, match=rf": {field}='False' is invalid; expected True or False"):
        create_model(name, **{field: "False"})
    for field in ("lrn", "dropout_before_fc"):  # fixed by the AlexNet names, checked by the class
        with pytest.raises(ValueError, match=rf"^AlexNet: {field}='False' is invalid; expected "
                                             "True or False"):
            AlexNet(**{field: "False"})


@pytest.mark.parametrize("name,field", [
    ("nin", "relu_logits"), ("yolo_v1_small", "batch_norm"), ("alexnet_2tower", "lrn"),
])
def test_a_switch_given_a_numpy_bool_is_taken(name, field):
    """np.bool_ (a flag read from an array) was refused by some fields while the call flags
    (`train`) took it."""
    for value in (np.bool_(True), np.bool_(False)):
        try:
            model = create_model(name, **{field: value})
        except ValueError as error:  # a field the name fixes: the class's own check then
            assert "fixed by its name" in str(error)
            model = type(create_model(name))(**{field: value})
        assert getattr(model, field) == value


def test_stride_in_1x1_is_refused_for_basic_blocks():
    with pytest.raises(ValueError, match=r"^ResNet: stride_in_1x1=True is invalid; expected False "
                                         r"with basic blocks .*BasicBlock would ignore it"):
        ResNet18(stride_in_1x1=True)
    assert create_model("resnet50", stride_in_1x1=True).stride_in_1x1


@pytest.mark.parametrize("name, field, value", [
    ("resnet18", "stride_in_1x1", True), ("resnet34", "stride_in_1x1", True),
    ("preact_resnet164_cifar", "drop_rate", 0.3), ("preact_resnet1001_cifar", "drop_rate", 0.3),
    ("plain20_cifar", "drop_path_rate", 0.1), ("plain110_cifar", "zero_init_last_bn", True),
])
def test_a_field_whose_only_valid_value_is_the_default_is_not_offered(name, field, value):
    """A block-type option the registered net's blocks lack (resnet18's `stride_in_1x1`, a
    bottleneck net's `drop_rate`, a plain net's residual-branch options) was listed settable,
    so `model_kwargs_config` offered a knob that every non-default value broke; the name now
    fixes it."""
    assert field not in settable_fields(name)
    with pytest.raises(ModelArgumentError, match=rf"model '{name}' does not take '{field}'"):
        create_model(name, **{field: value})


@pytest.mark.parametrize("name,kwargs,message", [
    # Each was accepted here and failed only at init, in Python's or flax's words.
    ("resnet20_cifar", {"act": "relu"}, "resnet20_cifar: act='relu' is invalid; expected a "
                                        "callable activation"),
    ("densenet40_cifar", {"act": None}, "densenet40_cifar: act=None is invalid"),
    ("resnet20_cifar", {"dtype": "float33"}, "resnet20_cifar: dtype='float33' is invalid; "
                                             "expected None or a floating-point dtype"),
    ("resnet18", {"dtype": "int32"}, "resnet18: dtype='int32' is invalid"),
    ("lenet5", {"dtype": "float8_e4m3fn"}, "lenet5: dtype='float8_e4m3fn' is invalid"),
    # an int was an array axis at the first train-mode call: "axis 5 is out of bounds"
    ("resnet20_cifar", {"axis_name": 5}, "resnet20_cifar: axis_name=5 is invalid; expected None "
                                         "(no cross-device BatchNorm sync) or the name of"),
    ("resnet18", {"axis_name": ""}, "resnet18: axis_name='' is invalid"),
    ("densenet40_cifar", {"axis_name": ("batch", 0)}, "densenet40_cifar: axis_name=('batch', 0) "
                                                      "is invalid"),
    # without x64 it computed in float32, silently
    ("lenet5", {"dtype": "float64"}, "lenet5: dtype='float64' is invalid; expected a dtype JAX "
                                     "computes in: float64 needs"),
    ("fast_rcnn_small", {"backbone_stages": "abc"}, "FastRCNN: backbone_stages='abc' is invalid; "
                                                    "expected a non-empty sequence of non-empty"),
    ("sppnet_small", {"backbone_stages": 5}, "SPPNet: backbone_stages=5 is invalid"),
    ("rcnn_small", {"cnn_stages": ()}, "RCNN: cnn_stages=() is invalid"),
    ("faster_rcnn_small", {"backbone_stages": "abc"}, "FasterRCNN: backbone_stages='abc' is "
                                                      "invalid"),
    # Numeric strings were stored as they are: module fields take numbers.
    ("yolo_v1_small", {"negative_slope": "0.5"}, "YOLOv1: negative_slope='0.5' is invalid"),
    ("yolo_v1_small", {"score_threshold": "0.5"}, "YOLOv1: score_threshold='0.5' is invalid"),
    ("yolo_v1_small", {"lambda_coord": "5"}, "YOLOv1: lambda_coord='5' is invalid"),
    ("faster_rcnn_small", {"rpn_min_size": "1"}, "FasterRCNN: rpn_min_size='1' is invalid"),
])
def test_a_field_of_the_wrong_kind_is_refused_by_create_model(name, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        create_model(name, **kwargs)


@pytest.mark.parametrize("name", [18, None, ("resnet18",)])
def test_a_model_name_that_is_not_a_string_is_a_value_error(name):
    """difflib raised a bare TypeError ('int' object is not iterable)."""
    with pytest.raises(ValueError, match=rf"^create_model: name={re.escape(repr(name))} is "
                                         r"invalid; expected a str, one of \['alexnet'"):
        create_model(name)


def _native_spec(name: str, height: int | None = None, batch: int = 1):
    """An abstract float32 input for the classifier `name`: `batch` images of its native size,
    `height` rows if given."""
    import jax
    import jax.numpy as jnp

    h, w, c = model_info(name).input_shape
    return jax.ShapeDtypeStruct((batch, h if height is None else height, w, c), jnp.float32)


@pytest.mark.parametrize("name", list_models())
def test_an_image_without_pixels_is_refused_naming_the_model(name):
    """A 0-row image went through the CIFAR ResNets, pre-activation ResNets and ResNets with the
    CIFAR stem (3x3 convolutions keep 0x32 maps, the global mean of nothing is NaN): NaN logits,
    no error. Every classifier refuses it on entry, before anything is traced."""
    import jax

    model = create_model(name)
    owner = type(model).__name__
    x = _native_spec(name, height=0)
    with pytest.raises(ValueError, match=rf"^{owner}: input\.shape={re.escape(str(x.shape))} is "
                                         r"invalid; expected height and width >= 1"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def test_a_resnet_with_the_cifar_stem_refuses_an_image_without_pixels():
    """The same through the ImageNet ResNet with the CIFAR stem (no max pool to refuse it)."""
    import jax

    model = create_model("resnet18", stem="cifar", num_classes=3)
    x = _native_spec("resnet20_cifar", height=0)
    with pytest.raises(ValueError, match=r"^ResNet: input\.shape=\(1, 0, 32, 3\) is invalid"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def _stochastic_kwargs(name: str) -> dict | None:
    """Keywords under which the classifier `name` draws random masks in training (its default
    dropout, or a rate of 0.1), with the field that sets them; None if it has none."""
    fields = settable_fields(name)
    rates = [f for f in ("dropout_rate", "drop_rate", "drop_path_rate") if f in fields]
    for field in rates:
        if fields[field].default > 0:
            return {"field": field, "kwargs": {}}
    for field in rates:  # a plain net has no branch to drop, a bottleneck block no dropout
        try:
            create_model(name, **{field: 0.1})
        except ValueError:
            continue
        return {"field": field, "kwargs": {field: 0.1}}
    return None


STOCHASTIC = {n: _stochastic_kwargs(n) for n in list_models() if _stochastic_kwargs(n)}


#: One model per architecture class (classifiers, the FCNs' two backbones and the detectors).
ONE_PER_CLASS = ["lenet5", "alexnet", "zfnet", "vgg11", "nin", "googlenet", "googlenet_bn",
                 "densenet121", "resnet18", "resnet20_cifar", "wrn16_4_cifar", "fcn8s_vgg16",
                 "fcn8s_resnet18", "yolo_v1_small", "faster_rcnn_small", "fast_rcnn_small",
                 "sppnet_small", "rcnn_small"]


@pytest.mark.parametrize("train", ["False", 1, None])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_train_must_be_a_bool(name, train):
    """`train="False"` is truthy: it trained (dropout on, BatchNorm on batch statistics)."""
    import numpy as np

    model = create_model(name)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: train={re.escape(repr(train))}"
                                         r" is invalid; expected True or False"):
        model.apply({"params": {}}, np.zeros(_native_spec(name).shape, np.float32), train=train)


@pytest.mark.parametrize("flag", ["False", 1, None])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_return_features_must_be_a_bool(name, flag):
    """`return_features="False"` is truthy: the model returned `(logits, features)`."""
    import numpy as np

    model = create_model(name)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: return_features="
                                         rf"{re.escape(repr(flag))} is invalid; expected True or "
                                         r"False"):
        model.apply({"params": {}}, np.zeros(_native_spec(name).shape, np.float32),
                    return_features=flag)


@pytest.mark.parametrize("dtype", ["uint8", "int32", "bool"])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_integer_images_are_refused(name, dtype):
    """uint8 pixels 0..255 went through `jnp.asarray(x, dtype)` as floats 0..255, unnormalized:
    finite, confident, wrong logits. Refused before tracing, naming the model and the dtype."""
    import jax

    model = create_model(name)
    x = jax.ShapeDtypeStruct(_native_spec(name).shape, dtype)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: input\.dtype='{dtype}' is "
                                         r"invalid; expected floating-point images, normalized"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_channels_first_images_are_refused_by_their_layout(name):
    """NCHW images (PyTorch's layout) were read as 3 rows of 224 channels: resnet18 built a
    (7, 7, 224, 64) first kernel and gave logits; others failed on a pooling size. Refused
    before tracing, naming the layout; the same images in NHWC still build."""
    import jax

    model = create_model(name)
    nhwc = _native_spec(name).shape
    nchw = (nhwc[0], nhwc[3], nhwc[1], nhwc[2])
    x = jax.ShapeDtypeStruct(nchw, "float32")
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: input\.shape="
                                         rf"\({nchw[0]}, {nchw[1]}, {nchw[2]}, {nchw[3]}\) is "
                                         r"invalid; expected NHWC images .* looks like NCHW"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct(nhwc, "float32"))


@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_images_of_another_channel_count_than_initialized_are_a_value_error(name):
    """ResNets, CIFAR nets, DenseNets and the FCN-ResNets (a flax nn.Conv stem) gave flax's
    ScopeParamShapeError, no ValueError, naming neither the model nor the channels; the others
    (a cnnjax Conv2D first) name the layer. Grey images into an RGB-initialized model, or RGB
    into a grey one (lenet5)."""
    import jax

    model = create_model(name)
    native = _native_spec(name)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), native)
    built = native.shape[3]
    other = 1 if built == 3 else 3
    x = jax.ShapeDtypeStruct((*native.shape[:3], other), native.dtype)
    with pytest.raises(ValueError, match=rf"^\w+: input\.shape=\(\d+, \d+, \d+, {other}\) is "
                                         rf"invalid; its (kernel was created for {built} input "
                                         rf"channels|parameters were initialized for "
                                         rf"{built}-channel images \(first convolution "
                                         rf"'conv_init'\)), this input has {other}; "
                                         r"a (layer|model) takes the channel count it was "
                                         r"initialized with"):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)


@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_training_on_a_batch_of_no_images_is_refused(name):
    """BatchNorm's batch statistics of 0 images are NaN (0/0) and replaced the running ones
    (`vgg11_bn` below); a batch of 0 has nothing to train on in any model. Eval on it works
    (tests/models/test_classic.py::test_a_batch_of_no_images_gives_no_rows_of_logits)."""
    import jax

    model = create_model(name)
    x = _native_spec(name, batch=0)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: train=True is invalid; a "
                                         r"batch of 0 images has nothing to train on"):
        jax.eval_shape(lambda x: model.apply({"params": {}}, x, train=True,
                                             rngs={"dropout": jax.random.key(1)},
                                             mutable=["batch_stats"]), x)


def test_batchnorm_running_statistics_survive_a_refused_empty_training_batch():
    """The reproduction: vgg11_bn's layout at 1/16 width trained on a batch of 0 wrote NaN into
    every BatchNorm's running mean and variance; now it raises, and the same model still
    evaluates the empty batch to 0 rows of logits."""
    import jax
    import jax.numpy as jnp

    from cnnjax.models.vgg import VGG

    model = VGG(stages=((4,), (8,)), batch_norm=True, hidden_features=8, num_classes=3,
                pool_size=None, dropout_rate=0.0)
    variables = model.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))
    empty = jnp.zeros((0, 8, 8, 3))
    with pytest.raises(ValueError, match=r"^VGG: train=True is invalid; a batch of 0 images"):
        model.apply(variables, empty, train=True, mutable=["batch_stats"])
    assert model.apply(variables, empty).shape == (0, 3)


@pytest.mark.parametrize("x, train, message", [
    ((2, "float32"), "False", r"train='False' is invalid; expected True or False"),
    ((0, "float32"), True, r"train=True is invalid; a batch of 0 images has nothing to train on"),
    ((2, "uint8"), False, r"input\.dtype='uint8' is invalid; expected floating-point images"),
])
def test_vgg_features_on_its_own_checks_its_call_as_the_models_do(x, train, message):
    """`VGGFeatures` is the detectors' trunk and a public module: on its own, train='False'
    moved its BatchNorm running means (by up to 0.18), a batch of 0 wrote NaN into them and uint8
    pixels ran unnormalized (block2 up to 139); now the same ValueErrors as the models'."""
    import jax
    import jax.numpy as jnp

    from cnnjax.models.vgg import VGGFeatures

    trunk = VGGFeatures(stages=((4,), (8,)), batch_norm=True)
    variables = trunk.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))
    batch, dtype = x
    with pytest.raises(ValueError, match=rf"^VGGFeatures: {message}"):
        trunk.apply(variables, jnp.zeros((batch, 8, 8, 3), dtype), train,
                    mutable=["batch_stats"])


def test_every_classifier_with_random_masks_is_covered():
    assert sorted(n for n in list_models()
                  if n not in STOCHASTIC) == ["lenet5"] + [f"plain{d}_cifar"
                                                          for d in (110, 20, 32, 44, 56)]


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_training_without_a_dropout_key_is_refused_naming_the_rate(name):
    """flax raised InvalidRngError ("Dropout_0 needs PRNG for 'dropout'") from inside the layer;
    the model now says which of its settings needs the key, and how to pass it, before tracing."""
    import numpy as np

    field, kwargs = STOCHASTIC[name]["field"], STOCHASTIC[name]["kwargs"]
    model = create_model(name, **kwargs)
    x = np.zeros(_native_spec(name).shape, np.float32)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: train=True is invalid; "
                                         rf"{field}=[0-9.]+ draws random masks in training: pass "
                                         r"rngs=\{'dropout': key\} to apply, or train=False"):
        model.apply({"params": {}}, x, train=True)


@pytest.mark.parametrize("pattern", [123, None, ["resnet*"]])
def test_a_list_models_pattern_that_is_not_a_string_is_a_value_error(pattern):
    """fnmatch raised a bare TypeError ("expected str, bytes or os.PathLike object")."""
    message = f"list_models: pattern={pattern!r} is invalid; expected a shell-style str"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        list_models(pattern)


def test_name_keyword_names_the_flax_module():
    """`create_model(name, /, ...)`: `name=` is the module's own name, as for any flax module (it
    was a TypeError, "got multiple values for argument 'name'")."""
    model = create_model("lenet5", name="backbone")
    assert model.name == "backbone"
    assert type(model).__name__ == "LeNet5"


@pytest.mark.parametrize("name", ["vgg11", "lenet5", "nin_cifar"])
def test_a_model_called_directly_below_its_smallest_input_says_the_input_is_too_small(name):
    """Called directly (the engine refuses the size first, naming the model), a model one
    pixel below its smallest input got only its layer's complaint about a window larger than
    its input, which reads as a bad layer setting (reviews BA, BH): the message now says what
    that means inside a network and where a model's smallest input is found."""
    import jax
    import jax.numpy as jnp

    size = model_info(name).min_input_size - 1
    model = create_model(name)
    images = jax.ShapeDtypeStruct((1, size, size, model_info(name).input_shape[2]), jnp.float32)
    with pytest.raises(ValueError, match=r"kernel_size=.* is invalid; .*; inside a network this "
                                         r"means its input is too small \(cnnjax\.models\.registry"
                                         r"\.min_input_size gives a registered model's smallest "
                                         r"input side\)\."):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


@pytest.mark.parametrize("typo,expected", [
    ("lenet6", ["lenet5"]),  # not alexnet, googlenet, densenet169, densenet161 as well
    ("lenet", ["lenet5"]),
    ("resnet-18", ["resnet18"]),
    ("ResNet50", ["resnet50"]),
    ("vgg_16", ["vgg16"]),
    ("googlnet", ["googlenet"]),
    ("resnet18_cifar", ["resnet110_cifar", "resnet20_cifar", "resnet32_cifar",
                        "resnet44_cifar", "resnet56_cifar"]),
    ("mobilenet_v2", None),  # nothing like it: no "did you mean"
])
def test_an_unknown_model_name_suggests_only_plausible_names(typo, expected):
    with pytest.raises(UnknownModelError) as err:
        create_model(typo)
    message = str(err.value)
    assert message == f"create_model: unknown model name={typo!r}; {err.value.valid}"
    assert err.value.valid.endswith(
        f"valid names: {list_models(task=None)}; a model your own module registers is named "
        '"<module>:<name>" (e.g. "mypkg.models:mynet"), which imports that module first')
    if expected is None:
        assert "did you mean" not in message
    else:
        suggested = re.search(r"did you mean (\[.*?\])\?", message).group(1)
        assert sorted(ast.literal_eval(suggested)) == sorted(expected)


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """A package of the user's own, `own_models_pkg`, whose `models` module registers
    `own_tiny_net` (with a `num_classes` field without default) when imported; it is
    unregistered and forgotten afterwards."""
    package = tmp_path / "own_models_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent("""
        import flax.linen as nn
        from cnnjax.models import register_model

        @register_model("own_tiny_net", input_shape=(8, 8, 1), min_input_size=4, num_classes=3)
        class OwnTinyNet(nn.Module):
            num_classes: int
            width: int = 4
            dtype: object = None
            axis_name: object = None

            @nn.compact
            def __call__(self, x, train=False, return_features=False):
                x = nn.relu(nn.Conv(self.width, (3, 3))(x)).mean(axis=(1, 2))
                return nn.Dense(self.num_classes, name="head")(x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "own_models_pkg.models"
    registry._REGISTRY.pop("own_tiny_net", None)
    for module in ("own_models_pkg.models", "own_models_pkg"):
        sys.modules.pop(module, None)


def test_a_model_named_with_its_module_is_found_by_importing_that_module(own_package):
    assert own_package not in sys.modules
    model = create_model(f"{own_package}:own_tiny_net", width=2)
    assert own_package in sys.modules
    assert (type(model).__name__, model.num_classes, model.width) == ("OwnTinyNet", 3, 2)
    assert model_info(f"{own_package}:own_tiny_net").input_shape == (8, 8, 1)
    # Its settable fields are found although num_classes has no default.
    assert list(settable_fields(f"{own_package}:own_tiny_net")) == ["width"]
    assert list(settable_fields("own_tiny_net")) == ["width"]  # once imported, by name too


def test_a_module_that_cannot_be_imported_is_named_with_the_remedy():
    with pytest.raises(UnknownModelError, match=re.escape(
            "create_model: unknown model name='not_a_pkg_xyz.models:mynet'; its module "
            "'not_a_pkg_xyz.models' cannot be imported here (ModuleNotFoundError: No module "
            "named 'not_a_pkg_xyz'); install its package or add its directory to PYTHONPATH")):
        create_model("not_a_pkg_xyz.models:mynet")


def test_a_module_that_registers_no_such_model_says_so(own_package):
    with pytest.raises(UnknownModelError, match=re.escape(
            f"name='{own_package}:own_tiny_nett'; module '{own_package}' registers no model "
            "'own_tiny_nett'; did you mean ['own_tiny_net']?")):
        create_model(f"{own_package}:own_tiny_nett")


@pytest.mark.parametrize(("source", "error", "message"), [
    ("raise RuntimeError('my own bug')\n", RuntimeError, "my own bug"),
    # not "cannot be imported here ... add its directory to PYTHONPATH": the module was found
    ("import some_missing_dependency_xyz\n", ModuleNotFoundError, "some_missing_dependency_xyz"),
])
def test_an_error_inside_the_users_module_is_raised_as_itself(tmp_path, monkeypatch, source,
                                                              error, message):
    (tmp_path / "own_broken_module_xyz.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error, match=message):
        create_model("own_broken_module_xyz:mynet")
    sys.modules.pop("own_broken_module_xyz", None)


class _Net(nn.Module):
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((_Net,), {}, r"register_model: name=<class .*_Net'> is invalid; expected a name: write "
                  r"@register_model\("),
    ((None,), {}, r"name=None is invalid; expected a non-empty str without whitespace"),
    ((5,), {}, r"name=5 is invalid"),
    (("",), {}, r"name='' is invalid"),
    (("my net",), {}, r"name='my net' is invalid"),
    (("pkg:net",), {}, r"name='pkg:net' is invalid; expected .* or \":\""),
    (("t_net",), {"input_shape": 32}, r"input_shape=32 is invalid; expected a sequence"),
    (("t_net",), {"input_shape": (32, 32)}, r"input_shape=\(32, 32\) is invalid; expected the "
                                             r"native \(height, width, channels\)"),
    (("t_net",), {"min_input_size": -1}, r"min_input_size=-1 is invalid; expected a positive "
                                          r"int, .* at most the native input's 224"),
    (("t_net",), {"min_input_size": "8"}, r"min_input_size='8' is invalid"),
    (("t_net",), {"input_shape": (32, 32, 3), "min_input_size": 64},
     r"min_input_size=64 is invalid; .* at most the native input's 32"),
    (("t_net",), {"num_classes": 0}, r"num_classes=0 is invalid; expected a positive integer"),
    (("t_net",), {"num_classes": 1.5}, r"num_classes=1.5 is invalid"),
    (("t_net",), {"paper": 5}, r"paper=5 is invalid; expected a str"),
])
def test_register_model_refuses_a_bad_argument_where_it_is_written(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_model(*args, **kwargs)
    assert "t_net" not in list_models(task=None)


@pytest.mark.parametrize("factory", [None, _Net()])
def test_register_model_refuses_what_is_not_a_model_factory(factory):
    with pytest.raises(ValueError, match=r"register_model: factory=(None|_Net\(\.\.\.\)) is "
                                         r"invalid; expected a model class or a function"):
        register_model("t_net")(factory)
    assert "t_net" not in list_models(task=None)


def test_the_default_smallest_input_is_32_or_the_native_side_if_smaller():
    with (registered_model("t_small", _Net, input_shape=(28, 28, 1)) as small,
          registered_model("t_large", _Net, input_shape=(96, 64, 3)) as large):
        assert (small.min_input_size, large.min_input_size) == (28, 32)


def test_a_taken_name_is_refused_naming_its_owner_and_the_remedy():
    with pytest.raises(ValueError, match=r"register_model: name='resnet18' is invalid; it is "
                                         r"already registered \(by .* of "
                                         r"cnnjax.models.resnet\); registry names are global: "
                                         r"pick another name"):
        register_model("resnet18")(_Net)
    assert model_info("resnet18").factory is not _Net


def test_an_unknown_model_error_re_raised_with_its_message_alone_keeps_it():
    """ml_collections re-raises an error from a config file as `type(err)(text)`: the one
    argument was taken as the name, and a missing `valid` hid the message behind a TypeError."""
    with pytest.raises(UnknownModelError) as caught:
        create_model("lenet6")
    again = type(caught.value)(str(caught.value))
    assert str(again) == again.valid == str(caught.value)


@pytest.mark.parametrize("name", [":own_tiny_net", "own_models_pkg.models:", "a:b:own_tiny_net",
                                  "own_models_pkg.models::own_tiny_net"])
def test_a_malformed_module_name_is_refused_with_the_form(name):
    with pytest.raises(UnknownModelError, match=re.escape(
            f"name={name!r}; expected \"<module>:<name>\", a module path and a registered name "
            "joined by one \":\"")):
        create_model(name)


def test_the_module_named_must_be_the_one_that_registered_the_model(own_package):
    create_model(f"{own_package}:own_tiny_net")  # imported and registered
    assert create_model("own_models_pkg:own_tiny_net").width == 4  # a package above it
    with pytest.raises(UnknownModelError, match=re.escape(
            "module 'own_models_pkg.models' registers no model 'lenet5'; cnnjax.models.lenet "
            "does: name it 'lenet5'")):
        create_model(f"{own_package}:lenet5")
    with pytest.raises(UnknownModelError, match=re.escape(
            "module 'textwrap' registers no model 'own_tiny_net'; own_models_pkg.models does: "
            "name it 'own_models_pkg.models:own_tiny_net'")):
        create_model("textwrap:own_tiny_net")


def test_reloadable_name_carries_the_module_of_a_model_outside_cnnjax(own_package):
    create_model(f"{own_package}:own_tiny_net")
    assert registry.reloadable_name("own_tiny_net") == f"{own_package}:own_tiny_net"
    assert registry.reloadable_name(f"{own_package}:own_tiny_net") == f"{own_package}:own_tiny_net"
    assert registry.reloadable_name("resnet18") == "resnet18"
    with registered_model("t_here", _Net) as info:  # registered by this test module
        assert info.module == __name__
        assert registry.reloadable_name("t_here") == f"{__name__}:t_here"


def test_a_reloaded_module_registers_its_models_again_another_module_may_not(own_package):
    import importlib

    create_model(f"{own_package}:own_tiny_net")
    importlib.reload(sys.modules[own_package])  # a notebook's autoreload
    assert model_info("own_tiny_net").factory is sys.modules[own_package].OwnTinyNet
    with pytest.raises(ValueError, match=r"register_model: name='own_tiny_net' is invalid; it "
                                         r"is already registered \(by .* of "
                                         r"own_models_pkg.models\); registry names are global"):
        register_model("own_tiny_net", input_shape=(8, 8, 1))(_Net)


class _NoClasses(nn.Module):
    """A model without the `num_classes` field every model must have."""

    @nn.compact
    def __call__(self, x, train=False):
        return x


def test_a_model_lacking_num_classes_is_a_named_error_not_a_type_error():
    """It said the model "does not take 'num_classes' (unknown, or fixed by its name); it takes
    ['num_classes', 'dtype', 'axis_name']", offering the keyword it refused."""
    with registered_model("t_noclasses", _NoClasses):
        assert settable_fields("t_noclasses") == {}
        assert registry.missing_engine_fields("t_noclasses") == [
            "num_classes", "dtype", "axis_name"]
        with pytest.raises(ModelArgumentError) as caught:
            create_model("t_noclasses")
    assert str(caught.value) == (
        "create_model: num_classes=1000 is invalid; model 't_noclasses' lacks the fields "
        "'num_classes', 'dtype' and 'axis_name', which every model declares: num_classes: int, "
        "dtype: Any = jnp.float32 and axis_name: str | None = None, and uses them "
        "(docs/conventions.md, \"Fields every model has\").")
    assert caught.value.keyword == "num_classes"


class _NoAxisName(nn.Module):
    """A model declaring `num_classes` and `dtype` but not `axis_name`."""

    num_classes: int = 10
    dtype: object = None
    width: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("factory", [
    _NoAxisName,  # the class itself
    functools.partial(_NoAxisName, width=8),  # a variant
    lambda **kwargs: _NoAxisName(**kwargs),  # a function: read from the model it builds
], ids=["class", "partial", "function"])
def test_a_missing_engine_field_is_named_by_create_model_as_missing(factory):
    """The engine passes `axis_name` to every model; a model without the field is named as
    lacking it, not as refusing an "unknown" keyword that its own list then offered."""
    with registered_model("t_noaxis", factory):
        assert registry.missing_engine_fields("t_noaxis") == ["axis_name"]
        with pytest.raises(ModelArgumentError, match=re.escape(
                "create_model: axis_name='batch' is invalid; model 't_noaxis' lacks the field "
                "'axis_name', which every model declares: ")):
            create_model("t_noaxis", axis_name="batch")
        with pytest.raises(ModelArgumentError) as unknown:  # a true unknown keyword's list
            create_model("t_noaxis", depth=3)
    assert str(unknown.value).endswith("it takes ['width', 'num_classes', 'dtype'].")


def test_every_registered_model_declares_the_engine_fields():
    """The engine sets the three fields on every zoo model."""
    assert {name: registry.missing_engine_fields(name) for name in list_models(task=None)
            if registry.missing_engine_fields(name)} == {}


def _needs_a_width(num_classes: int, width: int) -> nn.Module:
    """A function factory with a required argument besides `num_classes`."""
    return _NoAxisName(num_classes=num_classes, width=width)


def _validates_its_defaults(num_classes: int = 10, width: int = 0) -> nn.Module:
    """A function factory whose own defaults fail its validation (a ValueError, not a TypeError)."""
    if width < 1:
        raise ValueError(f"width={width} is invalid; expected >= 1")
    return _NoAxisName(num_classes=num_classes, width=width)


@pytest.mark.parametrize("factory, probe_error", [
    (_needs_a_width, "TypeError: _needs_a_width() missing 1 required positional argument: "
                     "'width'"),
    (_validates_its_defaults, "ValueError: width=0 is invalid; expected >= 1"),
], ids=["required-argument", "invalid-defaults"])
def test_a_misspelled_keyword_is_named_when_the_model_cannot_be_built_with_defaults(
        factory, probe_error):
    """The error path probes the model built with defaults to list its fields; a factory that
    cannot be built so raised the probe's own error, naming neither the misspelled keyword nor
    the model."""
    with registered_model("t_needs", factory):
        assert registry.missing_engine_fields("t_needs") == []
        assert create_model("t_needs", width=2).width == 2
        with pytest.raises(ModelArgumentError) as caught:
            create_model("t_needs", widht=2)
    assert str(caught.value) == (
        "create_model: widht=2 is invalid; model 't_needs' does not take 'widht' (unknown, or "
        f"fixed by its name); its settable fields cannot be listed, as building it with only "
        f"num_classes raised {probe_error}.")
    assert caught.value.keyword == "widht"
