"""Helpers shared by the detector model tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def assert_eager_detect_equals_jitted(model: Any, variables: Any, x: Any) -> None:
    """`model.apply(..., method="detect")` run eagerly (concrete boxes, checked) gives the
    detections it gives under jit (traced boxes), at least one of them valid."""
    jitted = jax.jit(lambda v, x: model.apply(v, x, method="detect"))(variables, x)
    eager = model.apply(variables, x, method="detect")
    assert bool(jitted.valid.any())
    np.testing.assert_array_equal(eager.valid, jitted.valid)
    np.testing.assert_array_equal(eager.classes, jitted.classes)
    np.testing.assert_allclose(eager.scores, jitted.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager.boxes, jitted.boxes, rtol=1e-5, atol=1e-4)
