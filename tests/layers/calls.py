"""What flax's method interceptors and `capture_intermediates` see of one layer call."""

from typing import Any

import flax.linen as nn


def calls_and_intermediates(layer: nn.Module, variables: Any, x: Any,
                            mutable: tuple[str, ...] = ()) -> tuple[list, Any, Any]:
    """Applies `layer` once with `capture_intermediates`: the (class name, method) of every
    intercepted call, the output, and the mutated collections (`intermediates` among them)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        seen.append((type(context.module).__name__, context.method_name))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        y, state = layer.apply(variables, x, capture_intermediates=True,
                               mutable=[*mutable, "intermediates"])
    return seen, y, state
