"""torchvision's `RandomResizedCrop.get_params` as a reference, run in a subprocess (torch's
triton import crashes once TensorFlow is loaded): `python -m tests.data.torchvision_resized_crop
IN.npz OUT.npz`.

IN holds `shapes` (int `[K, 2]`: height, width) and `seeds` (int `[S]`); OUT holds `boxes`
(int `[K, S, 4]`: the `(top, left, height, width)` that `get_params(image, scale=(0.08, 1.0),
ratio=(3/4, 4/3))`, torchvision's defaults, returns for each shape under `torch.manual_seed(s)`).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop


def main(src: str, dst: str) -> None:
    """Writes torchvision's crop boxes for the shapes and seeds in `src` to `dst`."""
    data = np.load(src)
    boxes = []
    for h, w in data["shapes"].tolist():
        image = torch.zeros(1, h, w)
        row = []
        for seed in data["seeds"].tolist():
            torch.manual_seed(seed)
            row.append(RandomResizedCrop.get_params(image, scale=[0.08, 1.0],
                                                    ratio=[3 / 4, 4 / 3]))
        boxes.append(row)
    np.savez(dst, boxes=np.array(boxes, np.int64))


if __name__ == "__main__":
    main(*sys.argv[1:3])
