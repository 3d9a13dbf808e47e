"""cnnjax.analysis: output sizes, parameters, FLOPs, receptive fields and equivariance of CNNs;
also calibration, confusion matrices, common corruptions / robustness and attribution maps.

The model-level entry points live in submodules of the same name (so the package attribute
is not ambiguous between function and module):

    from cnnjax.analysis.summary import summary                   # per-layer table, CLI
    from cnnjax.analysis.receptive_field import receptive_field   # final (size, jump, start)
    from cnnjax.analysis.effective_receptive_field import effective_receptive_field  # Luo 2016
    from cnnjax.analysis import attribution  # saliency ... Grad-CAM of a trained classifier
"""

from typing import Any

from cnnjax.analysis.equivariance import (
    ShiftError,
    equivariance_error,
    invariance_error,
    shift_image,
)
from cnnjax.analysis.receptive_field import ReceptiveField, stack_receptive_field
from cnnjax.analysis.shapes import (
    conv_macs,
    conv_output_size,
    conv_params,
    conv_transpose_output_size,
    pool_output_size,
    same_padding,
)

# Imported on first use: keeps `import cnnjax.analysis` free of JAX and `python -m` of these
# submodules clean.
_LAZY = {
    "Summary": "summary",
    "LayerRow": "summary",
    "EffectiveReceptiveField": "effective_receptive_field",
    "MapStatistics": "effective_receptive_field",
    "feature_receptive_field": "effective_receptive_field",
    "map_statistics": "effective_receptive_field",
    "plot_effective_receptive_field": "effective_receptive_field",
    "theoretical_bounds": "effective_receptive_field",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"cnnjax.analysis.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'cnnjax.analysis' has no attribute {name!r}")


__all__ = [
    "EffectiveReceptiveField",
    "LayerRow",
    "MapStatistics",
    "ReceptiveField",
    "ShiftError",
    "Summary",
    "conv_macs",
    "conv_output_size",
    "conv_params",
    "conv_transpose_output_size",
    "equivariance_error",
    "feature_receptive_field",
    "invariance_error",
    "map_statistics",
    "plot_effective_receptive_field",
    "pool_output_size",
    "same_padding",
    "shift_image",
    "stack_receptive_field",
    "theoretical_bounds",
]
