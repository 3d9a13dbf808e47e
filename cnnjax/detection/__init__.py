"""Detection primitives (anchors, box coding, anchor labelling and sampling, losses, proposals,
RoI targets, YOLO targets/loss), fixed-size NMS post-processing and host-side mAP evaluation.

Pure, jit-able functions with static shapes. Boxes follow `cnnjax.layers.roi`: `(x1, y1, x2, y2)`
in continuous image pixels (a box covering pixels 0..15 is `(0, 0, 16, 16)`, width `x2 - x1`).
Import from the submodules (`from cnnjax.detection.anchors import anchor_grid`).
"""
