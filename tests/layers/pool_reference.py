"""A float64 NumPy pooling reference (PyTorch's window rule), for the layer and model tests."""

import numpy as np


def windows_1d(n, k, s, p, ceil_mode):
    """Window starts (unpadded coordinates) by PyTorch's rule, written as a walk over windows.

    Full windows step from -p while they fit in the padded input; ceil mode adds one partial
    window if input is left uncovered, unless that window would start in the right padding.
    """
    starts, start = [], -p
    while start + k <= n + p:
        starts.append(start)
        start += s
    if ceil_mode and starts[-1] + k < n + p and start < n:
        starts.append(start)
    return starts


def pool_reference(x, kernel, stride, padding, ceil_mode, mode, count_include_pad=True):
    """float64 max or average pooling of NHWC `x` over the windows `windows_1d` walks, per axis
    `(kernel, stride, padding)` pairs; an average divides by the window's overlap with the padded
    input (`count_include_pad`) or with the input."""
    x = x.astype(np.float64)
    n, h, w, c = x.shape
    rows = windows_1d(h, kernel[0], stride[0], padding[0], ceil_mode)
    cols = windows_1d(w, kernel[1], stride[1], padding[1], ceil_mode)
    out = np.zeros((n, len(rows), len(cols), c))
    for i, r in enumerate(rows):
        for j, q in enumerate(cols):
            r0, r1 = max(r, 0), min(r + kernel[0], h)
            q0, q1 = max(q, 0), min(q + kernel[1], w)
            window = x[:, r0:r1, q0:q1]
            if mode == "max":
                out[:, i, j] = window.max(axis=(1, 2))
            else:
                if count_include_pad:  # Overlap with the padded input [-p, n + p).
                    dh = min(r + kernel[0], h + padding[0]) - r
                    dw = min(q + kernel[1], w + padding[1]) - q
                else:
                    dh, dw = r1 - r0, q1 - q0
                out[:, i, j] = window.sum(axis=(1, 2)) / (dh * dw)
    return out
