"""torchvision's `Resize(n)` + `CenterCrop(size)` as a reference, run in a subprocess (torch's
triton import crashes once TensorFlow is loaded): `python -m tests.data.torchvision_center_crop
IN.npz OUT.npz`.

IN holds `cases` (int `[K, 3]`: h, w, size), `crop_fraction`, and `image_<k>` (float32 HWC in
[0, 1]) for the cases whose pixels are compared. OUT holds `resized` (`[K, 2]`, the output size
of `torchvision.transforms.functional.resize(image, n)`), `offsets` (`[K, 2]`, the top/left
corner `center_crop` takes, read from an image of row/column indices) and `crop_<k>`.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torchvision.transforms.functional as F


def main(src: str, dst: str) -> None:
    """Writes torchvision's sizes, offsets and crops for the cases in `src` to `dst`."""
    data = np.load(src)
    crop_fraction = float(data["crop_fraction"])
    out: dict[str, np.ndarray] = {}
    resized, offsets = [], []
    for k, (h, w, size) in enumerate(data["cases"].tolist()):
        n = int(round(size / crop_fraction))
        new_h, new_w = F.resize(torch.zeros(1, h, w), n, antialias=True).shape[1:]
        rows = torch.arange(new_h, dtype=torch.float64).view(1, new_h, 1).expand(1, new_h, new_w)
        cols = torch.arange(new_w, dtype=torch.float64).view(1, 1, new_w).expand(1, new_h, new_w)
        top = F.center_crop(rows, [size, size])[0, 0, 0]
        left = F.center_crop(cols, [size, size])[0, 0, 0]
        resized.append((new_h, new_w))
        offsets.append((int(top), int(left)))
        if f"image_{k}" in data:
            image = torch.from_numpy(data[f"image_{k}"]).permute(2, 0, 1)
            crop = F.center_crop(F.resize(image, n, antialias=True), [size, size])
            out[f"crop_{k}"] = crop.permute(1, 2, 0).numpy()
    np.savez(dst, resized=np.array(resized), offsets=np.array(offsets), **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
