"""The model zoo: classic CNN architectures as Flax modules, created by name through the registry."""

from cnnjax.models.registry import ModelInfo, create_model, list_models, model_info, register_model

# Importing each architecture module registers its models.
# (model modules are added below as they land)
from cnnjax.models import resnet  # noqa: E402,F401  (ResNet-18..152)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
