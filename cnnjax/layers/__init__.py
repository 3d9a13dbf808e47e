"""CNN building blocks in NHWC: convolutions, pooling, RoI ops, local response normalization,
BatchNorm (checked for one value per channel; a masked variant synced by counts), stochastic
depth and a fully connected layer whose bias gradient sums in float32."""

from cnnjax.layers.batch_norm import BatchNorm, MaskedBatchNorm
from cnnjax.layers.conv import (
    Conv2D,
    ConvTranspose2D,
    LocallyConnected2D,
    TiledConv2D,
    bilinear_kernel_1d,
    bilinear_upsample_init,
)
from cnnjax.layers.dense import Dense
from cnnjax.layers.norm import LocalResponseNorm
from cnnjax.layers.padding import PADDING_MODES, pad_nhwc
from cnnjax.layers.pooling import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    avg_pool2d,
    global_avg_pool,
    global_max_pool,
    max_pool2d,
    spatial_pyramid_pool,
)
from cnnjax.layers.regularization import DropPath, check_drop_rate, stochastic_depth_rates
from cnnjax.layers.roi import box_iou, nms, roi_align, roi_pool, roi_spatial_pyramid_pool

__all__ = [
    "PADDING_MODES",
    "BatchNorm",
    "Conv2D",
    "ConvTranspose2D",
    "Dense",
    "DropPath",
    "LocalResponseNorm",
    "LocallyConnected2D",
    "MaskedBatchNorm",
    "TiledConv2D",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "avg_pool2d",
    "bilinear_kernel_1d",
    "bilinear_upsample_init",
    "box_iou",
    "check_drop_rate",
    "global_avg_pool",
    "global_max_pool",
    "max_pool2d",
    "nms",
    "pad_nhwc",
    "roi_align",
    "roi_pool",
    "roi_spatial_pyramid_pool",
    "spatial_pyramid_pool",
    "stochastic_depth_rates",
]
