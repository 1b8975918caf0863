"""ONNX export of models that use deformcp.torch: its ops become the standard ONNX operators.

Import it explicitly (it needs PyTorch, onnxscript and onnx; onnxruntime runs the exported models)::

    import deformcp.onnx

    deformcp.onnx.export(model.eval(), (x,), "model.onnx")        # opset 20 unless opset_version= says

    # or, the same, through torch's exporter with the translation table
    torch.onnx.export(model.eval(), (x,), "model.onnx", dynamo=True, opset_version=20,
                      custom_translation_table=deformcp.onnx.TRANSLATIONS)

Which ops become which ONNX operator, from which opset, and which have none:

>>> import torch
>>> import deformcp.onnx
>>> deformcp.onnx.MIN_OPSET["deform_conv2d"]
('DeformConv', 19)
>>> torch.ops.deformcp.grid_sample.default in deformcp.onnx.TRANSLATIONS
True
>>> deformcp.onnx.UNSUPPORTED["ms_deform_attn"]
'multi-scale deformable attention has no ONNX operator'

:func:`export` is ``torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATIONS)`` (your own
``custom_translation_table`` entries are added to it, and win), with two differences: ``opset_version`` defaults
to 20 (AffineGrid's) and must be at least 16, and an op or mode that has no ONNX equivalent raises
:class:`UnsupportedExportError` naming it, rather than the exporter's ConversionError that carries that
message. ``TRANSLATIONS`` maps each ``torch.ops.deformcp.<op>.default`` (the ops that deformcp.torch's
functions and modules call) to a function that the dynamo exporter (torch.export, then onnxscript) calls to
emit the op's ONNX nodes at the model's opset; pass it yourself to combine it with other tables or exporter
options. The legacy TorchScript exporter (``dynamo=False``) is not supported.

What each op becomes (opset: the least ``opset_version`` that the export accepts):

- ``affine_sample`` → ``AffineGrid`` and ``GridSample`` (opset ≥ 20), as the two ops below.
- ``grid_sample`` → ``GridSample`` (opset ≥ 16; volumes, 5-D input, from opset 20). mode "bilinear" → "bilinear"
  (opsets 16–19) or "linear" (opset ≥ 20, where ONNX renamed it), "bicubic" → "bicubic" or "cubic" (the same
  kernel, A = −0.75), "nearest" → "nearest"; padding_mode as is; align_corners → 0/1.
  ONNX and onnxruntime round "nearest" half to even, as deformcp and PyTorch.
- ``affine_grid`` → ``AffineGrid`` (opset ≥ 20); size becomes an int64 tensor, align_corners 0/1. With
  align_corners=True a 1-pixel axis (H or W = 1) has no agreed base coordinate (torch and deformcp: 0,
  onnxruntime: +1, ONNX's reference implementation: −1), so theta's column for that axis is zeroed first (a Mul
  by a constant), which gives torch's grid on every runtime.
- ``roi_align`` with pool_mode "avg" → ``RoiAlign`` (opset ≥ 16): boxes (K, 5) are split into rois
  (K, 4) = boxes[:, 1:] and batch_indices = int64(boxes[:, 0]); aligned=True → coordinate_transformation_mode
  "half_pixel" (the −0.5 pixel shift), False → "output_half_pixel" (no shift, boxes at least 1×1 pixel);
  sampling_ratio ≤ 0 → 0 (adaptive, ceil(bin size) per axis and box, in both); spatial_scale, output_size →
  output_height, output_width. pool_mode "max" raises: ONNX's "max" (as onnxruntime runs it) takes, for each
  sample, the largest of its four bilinear-weighted corners w·v rather than the interpolated value Σ w·v, so it
  cannot give mmcv's (deformcp's) max over interpolated samples.
- ``deform_conv2d`` → ``DeformConv`` (opset ≥ 19): the layouts are the same (offset channel g·2·kh·kw + 2k is
  Δy and the next Δx of tap k = i·kw + j in offset group g, as in torchvision and ONNX's reference
  implementation; mask channel g·kh·kw + k), so offset and mask pass unchanged; pads = [pad_h, pad_w, pad_h,
  pad_w], strides, dilations, kernel_shape = weight.shape[2:], group = C_in / weight.shape[1], offset_group =
  offset.shape[1] / (2·kh·kw).
- ``ps_roi_align``, ``deform_roi_pool``, ``deform_ps_roi_pool``, ``mimic_loss``, ``ms_deform_attn``,
  ``flash_deform_attn``: no ONNX operator; exporting a model that calls them raises
  :class:`UnsupportedExportError` naming the op.

Shapes. A dynamic batch (``dynamic_shapes``) exports: deformcp.torch's fake kernels keep symbolic sizes symbolic.
Sizes that become attributes (kernel size, channel counts of deform_conv2d, affine_grid's size with
align_corners=True) must be static and are said so by name. Limits. deformcp's border-case rules for non-finite
values are its own (docs/conventions.md): with NaN or ±inf in a grid onnxruntime's GridSample gives other values;
a NaN or ±inf box, or a batch index outside [0, N), makes onnxruntime's RoiAlign raise. onnxruntime (1.30, 1.32)
has no CPU kernel for RoiAlign-22: a model with roi_align exported at opset 22 or 23 is valid ONNX (ONNX's
reference implementation runs it, with deformcp's values) but does not load there; use opset 20 or 21 for
onnxruntime. Dtypes: onnxruntime's CPU kernels for these operators take float32 and float64. The tests
(tests/test_onnx.py) run every mapped op and mode in onnxruntime against deformcp.torch.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeAlias, Union, cast

try:
    import torch
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    from deformcp._dispatch import TORCH_CPU_INSTALL
    raise ImportError(f"deformcp.onnx needs PyTorch, which could not be imported ({_error}); install it with "
                      f"pip install 'deformcp[torch,onnx]', or PyTorch's CPU build (without the CUDA libraries, "
                      f"several GB) with {TORCH_CPU_INSTALL}, then pip install 'deformcp[onnx]' (onnx, onnxscript, "
                      "and onnxruntime, which runs the exported models)") from _error
try:
    import onnxscript
    import onnxscript.evaluator
    from onnxscript import ir
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("deformcp.onnx needs onnxscript (and onnx), which could not be imported "
                      f"({_error}); install them with pip install 'deformcp[onnx]' (onnx, onnxscript, and "
                      "onnxruntime, which runs the exported models)") from _error

import deformcp.torch  # noqa: F401  (registers torch.ops.deformcp.<op>)

__all__ = ["export", "TRANSLATIONS", "MIN_OPSET", "UNSUPPORTED", "DEFAULT_OPSET", "UnsupportedExportError"]

#: The opset_version that :func:`export` uses unless told otherwise (AffineGrid needs 20).
DEFAULT_OPSET = 20

#: Per mapped op: (ONNX operator, least opset version that has it with the attributes used).
MIN_OPSET = {"grid_sample": ("GridSample", 16), "affine_grid": ("AffineGrid", 20), "roi_align": ("RoiAlign", 16),
             "deform_conv2d": ("DeformConv", 19), "affine_sample": ("AffineGrid and GridSample", 20)}

#: The ops with no ONNX equivalent, and why.
UNSUPPORTED = {
    "ps_roi_align": "position-sensitive RoIAlign has no ONNX operator",
    "deform_roi_pool": "deformable RoI pooling has no ONNX operator",
    "deform_ps_roi_pool": "deformable position-sensitive RoI pooling has no ONNX operator",
    "mimic_loss": "the feature-mimicking loss (a training loss) has no ONNX operator",
    "ms_deform_attn": "multi-scale deformable attention has no ONNX operator",
    "flash_deform_attn": "multi-scale deformable attention (DCNv4's FlashDeformAttn) has no ONNX operator",
    "dcnv3": "InternImage's DCNv3 has no ONNX operator",
    "dcnv4": "DCNv4 has no ONNX operator",
    "map_coordinates": "SciPy's map_coordinates has no ONNX operator (GridSample takes normalised grids)",
    "affine_transform": "SciPy's affine_transform has no ONNX operator",
}


class UnsupportedExportError(NotImplementedError):
    """A deformcp op, or one of its modes, that has no ONNX equivalent (or none at the requested opset)."""


#: A graph value as the dynamo exporter hands it to a translation (an onnxscript ir.Value whose shape the exporter
#: has set; ir.Value's shape is Optional) and as onnxscript's ops return it (typed Any there).
_Value: TypeAlias = Any


def _opset(name: str) -> onnxscript.values.Opset:
    """The ONNX opset of the model being built (the exporter's), checked to have op ``name``'s operator."""
    recorder = onnxscript.evaluator.default()
    version = getattr(getattr(recorder, "opset", None), "version", None)
    if not isinstance(version, int):
        raise RuntimeError(f"deformcp.onnx: the translation of deformcp.{name} runs inside "
                           "torch.onnx.export(..., dynamo=True) (or deformcp.onnx.export), which it could not "
                           "find")
    operator, least = MIN_OPSET[name]
    if version < least:
        raise UnsupportedExportError(f"deformcp.{name} exports as ONNX {operator}, which needs opset_version >= "
                                     f"{least}; the graph is being built at opset {version}")
    return onnxscript.values.Opset("", version)


def _static(name: str, what: str, value: object) -> int:
    if not isinstance(value, int):
        raise UnsupportedExportError(f"deformcp.{name}: {what} must be static for ONNX export, got the dynamic "
                                     f"dimension {value}")
    return value


# ------------------------------------------------------------------------------------------ translations

def _grid_sample(input: _Value, grid: _Value, mode: str, padding_mode: str, align_corners: bool) -> _Value:
    op = _opset("grid_sample")
    if len(input.shape) == 5 and mode == "bicubic":
        raise UnsupportedExportError("deformcp.grid_sample of a volume with mode 'bicubic' (tricubic) cannot be "
                                     "exported to ONNX: onnxruntime's GridSample takes cubic sampling in 4-D only")
    if len(input.shape) == 5 and op.version < 20:
        raise UnsupportedExportError("deformcp.grid_sample of a volume (5-D input) exports as ONNX GridSample, "
                                     f"which takes volumes from opset 20; the graph is being built at opset "
                                     f"{op.version}")
    if op.version >= 20:  # GridSample-20 renamed them
        mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    return op.GridSample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=int(align_corners))


def _affine_grid(theta: _Value, size: Sequence[object], align_corners: bool) -> _Value:
    op = _opset("affine_grid")
    if align_corners:
        theta = _one_pixel_axes(op, theta, size[2:][::-1])
    return op.AffineGrid(theta, list(size), align_corners=int(align_corners))


def _affine_sample(input: _Value, theta: _Value, size: Optional[Sequence[object]], mode: str, padding_mode: str,
                   align_corners: bool) -> _Value:
    """AffineGrid, then GridSample (ONNX has no fused sampler: the runtime holds the grid); size None: the input's
    (static) shape."""
    _opset("affine_sample")
    if size is None:
        size = [_static("affine_sample", "the input's shape (size=None)", d) for d in input.shape]
    return _grid_sample(input, _affine_grid(theta, size, align_corners), mode, padding_mode, align_corners)


def _one_pixel_axes(op: onnxscript.values.Opset, theta: _Value, spatial: Sequence[object]) -> _Value:
    """theta for ONNX's AffineGrid with align_corners=1, whose base grid has no agreed value on a 1-pixel axis
    (torch and deformcp put it at 0; onnxruntime at +1, ONNX's reference implementation at −1): theta's column
    for each such axis (spatial: the sizes W, H, (D)) is zeroed, which makes the grid independent of that value,
    as it is where the value is 0."""
    keep = [_static("affine_grid", "size (with align_corners=True)", d) != 1 for d in spatial]
    return theta if all(keep) else op.Mul(theta, [float(k) for k in keep] + [1.0])


def _roi_align(input: _Value, boxes: _Value, output_size: Sequence[int], spatial_scale: float, sampling_ratio: int,
               aligned: bool, pool_mode: str) -> _Value:
    op = _opset("roi_align")
    if pool_mode != "avg":
        raise UnsupportedExportError(
            f"deformcp.roi_align with pool_mode={pool_mode!r} cannot be exported to ONNX: ONNX RoiAlign's "
            "'max' (as onnxruntime runs it) takes the largest bilinear-weighted corner of each sample, not the "
            "largest interpolated sample (mmcv's and deformcp's max pooling); only pool_mode='avg' exports")
    PH, PW = output_size
    rois = op.Slice(boxes, [1], [5], [1])
    batch_indices = op.Cast(op.Gather(boxes, op.Constant(value_int=0), axis=1), to=ir.DataType.INT64)
    return op.RoiAlign(input, rois, batch_indices,
                       coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
                       mode="avg", output_height=PH, output_width=PW, sampling_ratio=max(sampling_ratio, 0),
                       spatial_scale=float(spatial_scale))


def _deform_conv2d(input: _Value, offset: _Value, weight: _Value, bias: Optional[_Value], mask: Optional[_Value],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> _Value:
    name = "deform_conv2d"
    op = _opset(name)
    kh, kw = (_static(name, "the kernel size", d) for d in weight.shape[2:])
    groups = _static(name, "the input channels", input.shape[1]) // _static(name, "weight's channels",
                                                                            weight.shape[1])
    offset_groups = _static(name, "offset's channels", offset.shape[1]) // (2 * kh * kw)
    return op.DeformConv(input, weight, offset, bias, mask, kernel_shape=[kh, kw], strides=list(stride),
                         pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation),
                         group=groups, offset_group=offset_groups)


def _unsupported(name: str) -> Callable[..., NoReturn]:
    def translation(*args: object, **kwargs: object) -> NoReturn:
        raise UnsupportedExportError(f"deformcp.{name} cannot be exported to ONNX: {UNSUPPORTED[name]}")
    translation.__name__ = translation.__qualname__ = f"{name}_unsupported"
    return translation


_FUNCTIONS: dict[str, Callable[..., _Value]] = {
    "grid_sample": _grid_sample, "affine_grid": _affine_grid, "affine_sample": _affine_sample, "roi_align": _roi_align,
    "deform_conv2d": _deform_conv2d, **{name: _unsupported(name) for name in UNSUPPORTED}}

#: torch.onnx.export's ``custom_translation_table`` for every deformcp op (``torch.ops.deformcp.<op>.default``).
TRANSLATIONS: dict[Callable[..., Any], Callable[..., _Value]] = {
    getattr(torch.ops.deformcp, name).default: function for name, function in _FUNCTIONS.items()}


# ------------------------------------------------------------------------------------------------ export

def _unsupported_cause(error: Optional[BaseException]) -> Optional[UnsupportedExportError]:
    """The UnsupportedExportError among error's causes, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UnsupportedExportError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def export(model: Union[torch.nn.Module, torch.export.ExportedProgram], args: tuple[Any, ...] = (),
           f: Union[str, os.PathLike[str], None] = None, *, opset_version: int = DEFAULT_OPSET,
           custom_translation_table: Optional[dict[Callable[..., Any], Callable[..., Any]]] = None,
           **kwargs: Any) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export(model, args, f, dynamo=True, opset_version=opset_version,
    custom_translation_table=TRANSLATIONS | custom_translation_table, **kwargs)``: the ONNXProgram.

    Args:
        model, args, f, kwargs: as torch.onnx.export (``dynamo=False`` is refused).
        opset_version (int): at least 16 (GridSample, RoiAlign); deform_conv2d needs 19, affine_grid 20.
            Default: 20.
        custom_translation_table (dict or None): more translations, added to (and overriding) TRANSLATIONS.

    Raises:
        UnsupportedExportError: the model calls a deformcp op (or mode) with no ONNX equivalent, or one whose
            ONNX operator the opset lacks; the message names it.
    """
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("deformcp.onnx.export: only the dynamo exporter (dynamo=True) is supported")
    if not isinstance(opset_version, int) or isinstance(opset_version, bool) or opset_version < 16:
        raise ValueError(f"opset_version: expected an int >= 16 (GridSample, and RoiAlign's "
                         f"coordinate_transformation_mode), got {opset_version!r}")
    table = {**TRANSLATIONS, **(custom_translation_table or {})}
    try:
        program = torch.onnx.export(model, args, f, dynamo=True, opset_version=opset_version,
                                    custom_translation_table=table, **kwargs)
        return cast(torch.onnx.ONNXProgram, program)  # None only from the legacy exporter (dynamo=False)
    except Exception as error:
        cause = _unsupported_cause(error)
        if cause is None:
            raise
        raise UnsupportedExportError(*cause.args) from error
