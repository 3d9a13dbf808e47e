"""cnnjax.analysis: output sizes, parameters, FLOPs, receptive fields and equivariance of CNNs.

The two model-level entry points live in submodules of the same name (so the package attribute
is not ambiguous between function and module):

    from cnnjax.analysis.summary import summary                   # per-layer table, CLI
    from cnnjax.analysis.receptive_field import receptive_field   # final (size, jump, start)
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

_LAZY = {"Summary", "LayerRow"}  # imported on first use: keeps `python -m ...summary` clean


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cnnjax.analysis import summary as _summary_module

        return getattr(_summary_module, name)
    raise AttributeError(f"module 'cnnjax.analysis' has no attribute {name!r}")


__all__ = [
    "LayerRow",
    "ReceptiveField",
    "ShiftError",
    "Summary",
    "conv_macs",
    "conv_output_size",
    "conv_params",
    "conv_transpose_output_size",
    "equivariance_error",
    "invariance_error",
    "pool_output_size",
    "same_padding",
    "shift_image",
    "stack_receptive_field",
]
