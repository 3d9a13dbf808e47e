"""The model zoo: classic CNN architectures as Flax modules, created by name through the registry.

Importing this package imports every architecture module, which registers its models. Detectors
(YOLO v1, R-CNN, SPP-net, Fast R-CNN, Faster R-CNN) are tagged `task="detection"` and the FCNs
`task="segmentation"`: `list_models()` lists the classifiers, `list_models(task="detection")`
the detectors, `list_models(task="segmentation")` the dense predictors.
"""

from cnnjax.models import (  # noqa: F401  (imported to register their models)
    alexnet,  # AlexNet (torchvision layout, two-tower paper version), ZFNet
    densenet,  # DenseNet-121/161/169/201, the CIFAR DenseNets and DenseNet-BCs
    faster_rcnn,  # Faster R-CNN (RPN + RoIAlign box head) on a VGG-style backbone
    fcn,  # FCN-32s/16s/8s on VGG-16 and ResNet backbones
    googlenet,  # GoogLeNet / Inception v1, and torchvision's BatchNorm variant (googlenet_bn)
    lenet,  # LeNet-5
    nin,  # Network in Network (ImageNet and CIFAR)
    preact_resnet,  # pre-activation ResNet-110/164/1001 and Wide ResNets (WRN-d-k) for CIFAR
    rcnn,  # R-CNN, SPP-net and Fast R-CNN on external proposals (windows or selective search)
    resnet,  # ResNet-18/34/50/101/152
    resnet_cifar,  # CIFAR ResNet-20..110 and plain nets
    vgg,  # VGG-11/13/16/19 with and without BatchNorm
    yolo,  # YOLO v1 (paper network and a small variant)
)
from cnnjax.models.heads import freeze_backbone, replace_head, trainable_mask
from cnnjax.models.registry import (
    TASKS,
    ModelArgumentError,
    ModelInfo,
    UnknownModelError,
    create_model,
    list_models,
    model_info,
    register_model,
    settable_fields,
)

__all__ = [
    "TASKS",
    "ModelArgumentError",
    "ModelInfo",
    "UnknownModelError",
    "create_model",
    "freeze_backbone",
    "list_models",
    "model_info",
    "register_model",
    "replace_head",
    "settable_fields",
    "trainable_mask",
]
