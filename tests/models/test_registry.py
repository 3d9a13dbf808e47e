"""The model registry: keywords a model does not take are named errors, not TypeErrors."""

import flax.linen as nn
import pytest

from cnnjax.models import ModelArgumentError, create_model, settable_fields
from cnnjax.models.registry import registered_model


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("resnet18", {"widht": 3}, r"create_model: widht=3 is invalid; model 'resnet18' does not "
                               r"take 'widht' \(unknown, or fixed by its name\); its settable "
                               r"fields are \['act', 'drop_path_rate', 'features_only'"),
    ("resnet20_cifar", {"depth": 32}, r"create_model: depth=32 is invalid; model "
                                      r"'resnet20_cifar' does not take 'depth'"),
])
def test_an_unknown_or_fixed_keyword_is_a_named_value_error(name, kwargs, message):
    with pytest.raises(ModelArgumentError, match=message) as caught:
        create_model(name, **kwargs)
    assert isinstance(caught.value, ValueError)


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
