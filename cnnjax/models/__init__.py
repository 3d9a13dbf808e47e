"""The model zoo: classic CNN architectures as Flax modules, created by name through the registry."""

from cnnjax.models.registry import ModelInfo, create_model, list_models, model_info, register_model

# Importing each architecture module registers its models.
# (model modules are added below as they land)
from cnnjax.models import alexnet  # noqa: E402,F401  (AlexNet, ZFNet)
from cnnjax.models import densenet  # noqa: E402,F401  (DenseNet-121/169/201)
from cnnjax.models import googlenet  # noqa: E402,F401  (GoogLeNet / Inception v1)
from cnnjax.models import lenet  # noqa: E402,F401  (LeNet-5)
from cnnjax.models import nin  # noqa: E402,F401  (Network in Network)
from cnnjax.models import resnet  # noqa: E402,F401  (ResNet-18..152)
from cnnjax.models import resnet_cifar  # noqa: E402,F401  (CIFAR ResNets, plain nets)
from cnnjax.models import vgg  # noqa: E402,F401  (VGG-11..19, _bn)
from cnnjax.models import fcn  # noqa: E402,F401  (FCN-32s/16s/8s)
from cnnjax.models.heads import replace_head  # noqa: E402

__all__ = [
    "ModelInfo", "create_model", "list_models", "model_info", "register_model", "replace_head",
]
