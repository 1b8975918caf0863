"""deformcp — deformable sampling operators for NumPy, CuPy and any DLPack array, forward and backward.

Ops (each ``<op>_backward`` returns a named tuple of gradients):

- ``affine_grid``, ``grid_sample`` — Spatial Transformer Networks (torch.nn.functional's conventions), images and
  volumes; ``affine_sample`` — the two in one, without the grid
- ``roi_align``, ``ps_roi_align`` — Mask R-CNN's RoIAlign and its position-sensitive form (torchvision; mmcv's
  max pooling)
- ``deform_conv2d`` — Deformable ConvNets v1 and v2 (torchvision)
- ``deform_roi_pool`` — deformable (modulated) RoI pooling (mmcv)
- ``deform_ps_roi_pool`` — DCNv1's deformable position-sensitive RoI pooling
- ``mimic_loss`` — DCNv2's feature-mimicking loss
- ``ms_deform_attn``, ``flash_deform_attn`` — multi-scale deformable attention (Deformable DETR, RT-DETRv2's
  per-level points and nearest sampling; DCNv4's FlashDeformAttn with its softmax fused)
- ``dcnv3``, ``dcnv4`` — InternImage's DCNv3 and FlashInternImage's DCNv4, channels-last

NumPy arrays run on a vectorised NumPy path (the float64 reference), CuPy arrays on CUDA kernels compiled at run
time by NVRTC, and ``with deformcp.backend("host"):`` runs the same CUDA sources on the CPU through the host C++
compiler. DLPack arrays (PyTorch, JAX, ...) come back in their own framework; ``deformcp.torch`` and
``deformcp.jax`` add autograd (``deformcp.torch``'s ops are torch.library ops: torch.compile, torch.export), and
``deformcp.onnx`` exports deformcp.torch models to ONNX. Conventions: README.md and docs/conventions.md.
"""
from ._dispatch import backend, current_backend
from ._types import Array as Array  # noqa: F401  (the array types: deformcp._types; not in __all__)
from ._types import ArrayLike as ArrayLike  # noqa: F401
from ._workspace import get_workspace_limit, workspace_limit
from .ops.affine_sample import AffineSampleGrads, affine_sample, affine_sample_backward
from .ops.dcn import DCNv3Grads, DCNv4Grads, dcnv3, dcnv3_backward, dcnv4, dcnv4_backward
from .ops.deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from .ops.deform_ps_roi_pool import DeformPSRoIPoolGrads, deform_ps_roi_pool, deform_ps_roi_pool_backward
from .ops.mimic_loss import MimicLossGrads, mimic_loss, mimic_loss_backward
from .ops.ms_deform_attn import (
    FlashDeformAttnGrads,
    MSDeformAttnGrads,
    flash_deform_attn,
    flash_deform_attn_backward,
    ms_deform_attn,
    ms_deform_attn_backward,
)
from .ops.roi_align import (
    DeformRoIPoolGrads,
    RoIAlignGrads,
    deform_roi_pool,
    deform_roi_pool_backward,
    ps_roi_align,
    ps_roi_align_backward,
    roi_align,
    roi_align_backward,
)
from .ops.spatial_transformer import (
    AffineGridGrads,
    GridSampleGrads,
    affine_grid,
    affine_grid_backward,
    grid_sample,
    grid_sample_backward,
)

__version__ = "0.1.0"

__all__ = [
    "backend", "current_backend", "workspace_limit", "get_workspace_limit",
    "deform_conv2d", "deform_conv2d_backward", "DeformConv2dGrads",
    "deform_roi_pool", "deform_roi_pool_backward", "DeformRoIPoolGrads",
    "deform_ps_roi_pool", "deform_ps_roi_pool_backward", "DeformPSRoIPoolGrads",
    "mimic_loss", "mimic_loss_backward", "MimicLossGrads",
    "ms_deform_attn", "ms_deform_attn_backward", "MSDeformAttnGrads",
    "flash_deform_attn", "flash_deform_attn_backward", "FlashDeformAttnGrads",
    "dcnv3", "dcnv3_backward", "DCNv3Grads", "dcnv4", "dcnv4_backward", "DCNv4Grads",
    "affine_grid", "affine_grid_backward", "AffineGridGrads",
    "grid_sample", "grid_sample_backward", "GridSampleGrads",
    "affine_sample", "affine_sample_backward", "AffineSampleGrads",
    "roi_align", "roi_align_backward", "ps_roi_align", "ps_roi_align_backward", "RoIAlignGrads",
]
