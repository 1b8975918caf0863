"""The ops: public functions, argument checks, kernel glue and one :class:`~deformcp.ops._spec.OpSpec` per op.

``SPECS`` maps each op's name to its spec, in the order of the package docstring; everything that serves
every op (deformcp.testing, deformcp.torch, deformcp.jax, the benchmarks, the tests) reads it. The modules
follow the kernel families of kernels/*.cu.
"""
from . import (
               affine_sample,
               dcn,
               deform_conv,
               deform_ps_roi_pool,
               mimic_loss,
               ms_deform_attn,
               ndimage,
               roi_align,
               spatial_transformer,
)
from ._spec import Case, OpSpec

SPECS: dict[str, OpSpec] = {spec.name: spec for module in (spatial_transformer, affine_sample, roi_align, deform_conv,
                                                            deform_ps_roi_pool, mimic_loss, ms_deform_attn, dcn,
                                                            ndimage)
                            for spec in module.SPECS}

__all__ = ["SPECS", "OpSpec", "Case"]
