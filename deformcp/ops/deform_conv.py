"""Deformable convolution v1 and v2 (modulated), forward and backward for all five inputs.

Dai et al., "Deformable Convolutional Networks", ICCV 2017, https://arxiv.org/abs/1703.06211 (v1);
Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168 (v2, the mask). Semantics of torchvision.ops.deform_conv2d.
Kernels: kernels/deform_conv.cu (im2col, col2im, coordinate gradients) around a GEMM (cuBLAS through
CuPy on the GPU, NumPy's BLAS on the host backend).
NumPy path: deformcp.reference.deform_conv.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate, _workspace
from .._types import Array, ArrayLike, Imported
from ..reference import deform_conv as reference
from ._call import backward, forward
from ._spec import Case, IntPair, OpSpec

FAMILY = "deform_conv"


class DeformConv2dGrads(NamedTuple):
    """Gradients of :func:`deform_conv2d`; None where an input is absent or its gradient not asked for."""

    input: Optional[Array]
    offset: Optional[Array]
    weight: Optional[Array]
    bias: Optional[Array]
    mask: Optional[Array]


class _Geometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    C_out: int
    groups: int
    offset_groups: int
    kh: int
    kw: int
    Ho: int
    Wo: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def sizes(self) -> tuple[int, ...]:
        """The kernels' DEFORM_CONV_SIZES up to Wo, before the chunk (n0, n_chunk, p0, p_count)."""
        return (self.N, self.C, self.H, self.W, self.offset_groups, self.kh, self.kw, self.Ho, self.Wo)

    @property
    def tap_extents(self) -> tuple[int, ...]:
        """Bounds on the magnitude of what the kernels compute from the tap position (ho·s_h − p_h + i·d_h and
        its partial sums; x likewise): their index type must hold these too."""
        return tuple((out - 1) * s + p + (k - 1) * d for out, k, s, p, d in zip(
            (self.Ho, self.Wo), (self.kh, self.kw), self.stride, self.padding, self.dilation))


#: Largest stride, padding or dilation: the kernels' widest index type (and the NumPy path's int64) must hold it.
INDEX_MAX = 2**63 - 1


def parse_conv_arguments(stride: IntPair, padding: IntPair, dilation: IntPair) -> tuple[tuple[int, int], ...]:
    """(stride, padding, dilation) as pairs of ints, checked: stride and dilation ≥ 1, padding ≥ 0, each at most
    INDEX_MAX (the function and deformcp.torch's DeformConv2d share these rules)."""
    return (_validate.pair("stride", stride, 1, INDEX_MAX), _validate.pair("padding", padding, 0, INDEX_MAX),
            _validate.pair("dilation", dilation, 1, INDEX_MAX))


def _check(call: _dispatch.Call, input: Imported, offset: Imported, weight: Imported, bias: Optional[Imported],
           mask: Optional[Imported], stride: IntPair, padding: IntPair, dilation: IntPair) -> _Geometry:
    _validate.floating("input", input, 4, "(N, C, H, W)")
    _validate.floating("weight", weight, 4, "(C_out, C / groups, kh, kw)")
    _validate.floating("offset", offset, 4, "(N, 2·G·kh·kw, H_out, W_out)")
    if mask is not None:
        _validate.floating("mask", mask, 4, "(N, G·kh·kw, H_out, W_out)")
    if bias is not None:
        _validate.floating("bias", bias, 1, "(C_out,)")
    _validate.same_dtype(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    stride, padding, dilation = parse_conv_arguments(stride, padding, dilation)
    N, C, H, W = input.shape
    C_out, C_group, kh, kw = weight.shape
    if C == 0:
        raise ValueError(f"input: expected at least one channel in (N, C, H, W), got {tuple(input.shape)}")
    if C_out == 0 or C_group == 0 or C % C_group or C_out % (C // C_group or 1):
        raise ValueError(f"weight: expected C_out > 0 and in-channels C / groups > 0 dividing C = {C}, with C_out "
                         f"divisible by groups, got weight shape {tuple(weight.shape)}")
    groups = C // C_group
    if kh == 0 or kw == 0:
        raise ValueError(f"weight: expected a non-empty kernel (kh, kw), got {tuple(weight.shape)}")
    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input: spatial size {(H, W)} with padding {padding} is smaller than the dilated "
                         f"kernel {(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}")
    K = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K):
        raise ValueError(f"offset: expected 2·G·kh·kw = a positive multiple of {2 * K} channels, "
                         f"got shape {tuple(offset.shape)}")
    G = offset.shape[1] // (2 * K)
    if C % G:
        raise ValueError(f"input: expected channels C = {C} divisible by the {G} offset groups given by offset's "
                         f"{offset.shape[1]} channels")
    _validate.shape("offset", offset, (N, 2 * G * K, Ho, Wo), "(N, 2·G·kh·kw, H_out, W_out)")
    if mask is not None:
        _validate.shape("mask", mask, (N, G * K, Ho, Wo), "(N, G·kh·kw, H_out, W_out)")
    if bias is not None:
        _validate.shape("bias", bias, (C_out,), "(C_out,)")
    geo = _Geometry(N, C, H, W, C_out, groups, G, kh, kw, Ho, Wo, stride, padding, dilation)
    if max(geo.tap_extents) > INDEX_MAX:
        raise ValueError(f"stride, padding, dilation: expected tap positions (H_out − 1)·stride + padding + (kh − 1)·"
                         f"dilation (W likewise) ≤ 2**63 - 1, got {max(geo.tap_extents)} from stride {stride}, padding "
                         f"{padding}, dilation {dilation}")
    return geo


def _output(geo: _Geometry) -> tuple[tuple[int, ...], str]:
    return (geo.N, geo.C_out, geo.Ho, geo.Wo), "(N, C_out, H_out, W_out)"


# ---------------------------------------------------------------------------------------- kernels

def _chunk_sizes(geo: _Geometry, n0: int, n1: int, r0: int, r1: int) -> tuple[int, ...]:
    """The kernels' DEFORM_CONV_SIZES for images [n0, n1), output rows [r0, r1) of each."""
    return (*geo.sizes, n0, n1 - n0, r0 * geo.Wo, (r1 - r0) * geo.Wo, *geo.stride, *geo.padding, *geo.dilation)


def _launch(call: _dispatch.Call, name: str, dtype: npt.DTypeLike, n: int, arrays: Sequence[object], geo: _Geometry,
            chunk: tuple[int, int, int, int], options: Sequence[int] = ()) -> None:
    """Launch a deform_conv kernel over a chunk (n0, n1, r0, r1), with an index type that holds the tap
    coordinates too."""
    _kernels.launch(call.backend, FAMILY, name, dtype, n, arrays, _chunk_sizes(geo, *chunk), options,
                    bounds=geo.tap_extents)


def _kernel_columns(call: _dispatch.Call, input: Imported, offset: Imported, mask: Optional[Imported], geo: _Geometry,
                    chunk: tuple[int, int, int, int]) -> Imported:
    """The sampled columns (C·kh·kw, n·rows·W_out) of a chunk (n0, n1, r0, r1), in the compute dtype."""
    n0, n1, r0, r1 = chunk
    n_columns = (n1 - n0) * (r1 - r0) * geo.Wo
    columns = _kernels.empty(call.xp, (geo.C * geo.taps, n_columns), _kernels.compute_dtype(input.dtype))
    _launch(call, "deform_conv_im2col", input.dtype, geo.C * n_columns,
            (input, offset, _kernels.NULL if mask is None else mask, columns), geo, chunk)
    return columns


def _forward_kernels(call: _dispatch.Call, input: Imported, offset: Imported, weight: Imported,
                     bias: Optional[Imported], mask: Optional[Imported], geo: _Geometry) -> Imported:
    """Columns, GEMMs and bias in the compute dtype (float32 for 16-bit input), rounded once at the end."""
    xp = call.xp
    input, offset = (xp.ascontiguousarray(a) for a in (input, offset))
    mask = None if mask is None else xp.ascontiguousarray(mask)
    dtype = _kernels.compute_dtype(input.dtype)
    N, Wo, Cq_out = geo.N, geo.Wo, geo.C_out // geo.groups
    rows_q = geo.C // geo.groups * geo.taps
    out = _kernels.empty(xp, (N, geo.C_out, geo.Ho, Wo), dtype)
    w = weight.reshape(geo.C_out, -1).astype(dtype, copy=False)
    per_row = (geo.C * geo.taps + geo.C_out) * Wo * dtype.itemsize  # columns and the product
    for chunk in _workspace.chunks(N, geo.Ho, per_row, "deform_conv2d"):
        n0, n1, r0, r1 = chunk
        columns = _kernel_columns(call, input, offset, mask, geo, chunk)
        for q in range(geo.groups):
            part = w[q * Cq_out:(q + 1) * Cq_out] @ columns[q * rows_q:(q + 1) * rows_q]
            out[n0:n1, q * Cq_out:(q + 1) * Cq_out, r0:r1] = part.reshape(Cq_out, n1 - n0, r1 - r0, Wo).transpose(
                1, 0, 2, 3)
        del columns, part  # before the next chunk allocates its own
    if bias is not None:
        out += bias.astype(dtype)[:, None, None]
    return out.astype(input.dtype, copy=False)


def _backward_kernels(call: _dispatch.Call, grad_output: Imported, input: Imported, offset: Imported, weight: Imported,
                      bias: Optional[Imported], mask: Optional[Imported], geo: _Geometry,
                      wanted: tuple[bool, bool, bool, bool, bool], deterministic: bool
                      ) -> tuple[Optional[Imported], ...]:
    """Columns, their gradient, the GEMMs and the input, weight and bias gradients' sums in the compute dtype
    (float32 for 16-bit input), rounded once at the end. The weight gradient adds up over the chunks; the
    deterministic input gradient adds each pixel's terms in the unchunked order whatever the chunks."""
    xp = call.xp
    want_input, want_offset, want_weight, want_bias, want_mask = wanted
    grad_output, input, offset = (xp.ascontiguousarray(a) for a in (grad_output, input, offset))
    mask = None if mask is None else xp.ascontiguousarray(mask)
    dtype = _kernels.compute_dtype(input.dtype)
    N, Wo, Cq_out = geo.N, geo.Wo, geo.C_out // geo.groups
    rows_q = geo.C // geo.groups * geo.taps
    w = weight.reshape(geo.C_out, -1).astype(dtype, copy=False)
    grad_input = xp.zeros(input.shape, dtype) if want_input else None
    grad_offset = _kernels.empty(xp, offset.shape, offset.dtype) if want_offset else None
    grad_mask = None
    if want_mask:
        assert mask is not None  # wanted: asked for and present
        grad_mask = _kernels.empty(xp, mask.shape, mask.dtype)
    grad_w = xp.zeros(w.shape, dtype) if want_weight else None
    per_row = (2 * geo.C * geo.taps + geo.C_out) * Wo * dtype.itemsize  # columns, their gradient, grad_output's
    for chunk in _workspace.chunks(N, geo.Ho, per_row, "deform_conv2d_backward"):
        n0, n1, r0, r1 = chunk
        n, P = n1 - n0, (r1 - r0) * Wo
        g_out = grad_output[n0:n1, :, r0:r1].reshape(n, geo.C_out, P).transpose(1, 0, 2).reshape(geo.C_out, -1)
        g_out = xp.ascontiguousarray(g_out, dtype)
        if grad_w is not None:  # want_weight
            columns = _kernel_columns(call, input, offset, mask, geo, chunk)
            for q in range(geo.groups):
                grad_w[q * Cq_out:(q + 1) * Cq_out] += (g_out[q * Cq_out:(q + 1) * Cq_out]
                                                        @ columns[q * rows_q:(q + 1) * rows_q].T)
            del columns
        if not (want_input or want_offset or want_mask):
            continue
        grad_columns = xp.empty((geo.C * geo.taps, n * P), dtype)
        for q in range(geo.groups):
            grad_columns[q * rows_q:(q + 1) * rows_q] = (w[q * Cq_out:(q + 1) * Cq_out].T
                                                         @ g_out[q * Cq_out:(q + 1) * Cq_out])
        null_mask = _kernels.NULL if mask is None else mask
        if want_input:
            _launch(call, "deform_conv_col2im", input.dtype, n * geo.C * (1 if deterministic else P),
                    (offset, null_mask, grad_columns, grad_input), geo, chunk, (deterministic,))
        if want_offset or want_mask:
            _launch(call, "deform_conv_col2im_coord", input.dtype, n * geo.offset_groups * geo.taps * P,
                    (input, offset, null_mask, grad_columns, _kernels.NULL if grad_offset is None else grad_offset,
                     _kernels.NULL if grad_mask is None else grad_mask), geo, chunk)
    grad_weight = None if grad_w is None else grad_w.reshape(weight.shape)
    grad_bias = grad_output.sum(axis=(0, 2, 3), dtype=dtype) if want_bias else None
    return tuple(None if g is None else g.astype(input.dtype, copy=False)
                 for g in (grad_input, grad_offset, grad_weight, grad_bias, grad_mask))


# ------------------------------------------------------------------------------------------ public

def deform_conv2d(input: ArrayLike, offset: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                  mask: Optional[ArrayLike] = None) -> Array:
    """Deformable convolution: ``y(p) = Σ_k w_k · x(p + p_k + Δp_k) · Δm_k`` (+ bias).

    v1 (Dai et al. 2017, https://arxiv.org/abs/1703.06211) without ``mask``; v2 (Zhu et al. 2019,
    https://arxiv.org/abs/1811.11168) with it. Same as torchvision.ops.deform_conv2d.

    Args:
        input (array[N, C, H, W]): input images.
        offset (array[N, 2·G·kh·kw, H_out, W_out]): sampling offsets; channel g·2·kh·kw + 2k is Δy and
            the next Δx of kernel tap k = i·kw + j in offset group g; input channel c belongs to offset
            group c // (C / G).
        weight (array[C_out, C / groups, kh, kw]): convolution weights; groups = C / weight.shape[1].
        bias (array[C_out] or None): added to every output. Default: None.
        stride, padding, dilation (int or pair of int): as in a regular convolution. Defaults: 1, 0, 1.
        mask (array[N, G·kh·kw, H_out, W_out] or None): modulation scalars of v2, channel g·kh·kw + k.
            Default: None.

    Returns:
        array[N, C_out, H_out, W_out] with H_out = (H + 2·pad_h − (dil_h·(kh − 1) + 1)) // stride_h + 1.

    Tap k of output (h, w) samples y = h·stride_h − pad_h + i·dil_h + Δy (x likewise). A sample with
    y ≤ −1, y ≥ H, x ≤ −1 or x ≥ W is 0 (NaN and ±inf too); otherwise it is bilinear with the corners
    outside the image reading 0. The work is done in chunks under :func:`deformcp.workspace_limit`: several
    whole images, or ranges of output rows of one image when an image alone does not fit.

    >>> import numpy as np, deformcp
    >>> rng = np.random.default_rng(0)
    >>> x = rng.random((2, 8, 10, 10), np.float32)
    >>> w = rng.random((16, 8, 3, 3), np.float32)
    >>> offset = rng.standard_normal((2, 2 * 9, 10, 10), np.float32)
    >>> deformcp.deform_conv2d(x, offset, w, padding=1).shape
    (2, 16, 10, 10)
    >>> shifted = deformcp.deform_conv2d(x, np.ones_like(offset), w, padding=1)   # every tap moved by (1, 1)
    >>> bool(np.allclose(shifted[:, :, :-1, :-1], deformcp.deform_conv2d(x, 0 * offset, w, padding=1)[:, :, 1:, 1:]))
    True

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(DEFORM_CONV2D, locals())


def deform_conv2d_backward(grad_output: ArrayLike, input: ArrayLike, offset: ArrayLike, weight: ArrayLike,
                           bias: Optional[ArrayLike] = None, stride: IntPair = 1, padding: IntPair = 0,
                           dilation: IntPair = 1, mask: Optional[ArrayLike] = None,
                           needs_input_grad: Sequence[bool] = (True, True, True, True, True),
                           deterministic: bool = False) -> DeformConv2dGrads:
    """Gradients of :func:`deform_conv2d` for input, offset, weight, bias and mask.

    Args:
        grad_output (array[N, C_out, H_out, W_out]): gradient of the loss with respect to the output.
        input, offset, weight, bias, stride, padding, dilation, mask: as given to :func:`deform_conv2d`.
        needs_input_grad (five bools): which of (input, offset, weight, bias, mask) to differentiate.
            Default: all.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the input gradient with
            atomics; True gives each input plane to one thread (bitwise reproducible, and the same whatever
            the workspace limit). The offset, mask, weight and bias gradients never use atomics; the NumPy
            path is deterministic. Default: False.

    Returns:
        DeformConv2dGrads: ``input``, ``offset``, ``weight``, ``bias`` and ``mask``, None for an absent bias
        or mask and for gradients not asked for.

    The offset gradient is the derivative of the bilinear sample: at an integer coordinate it is taken
    from the right (the cell whose lower corner the sample is on); it is 0 where the sample is 0, i.e. at
    y ≤ −1 and y ≥ H (x likewise), and for NaN or ±inf offsets — so exactly at y = −1 the gradient is 0,
    and just above it the lower corners (row −1) read 0 while row 0 counts.

    The weight gradient (every backend) adds up the partial sums of the chunks that the workspace limit
    makes, and so does the NumPy path's input gradient when an image is split into ranges of output rows:
    their last bits can depend on the limit.
    """
    return DeformConv2dGrads(*backward(DEFORM_CONV2D, locals()))


# ------------------------------------------------------------------------------------------- spec

def _conv_inputs(rng: np.random.Generator, modulated: bool) -> dict[str, npt.NDArray[np.float64]]:
    """The irregular configuration: kernel 3×2, stride 2×1, padding 1×0, dilation 2×1, groups 2, offset
    groups 3, offsets of a few pixels."""
    N, C, H, W, C_out, G, kh, kw = 2, 6, 9, 8, 4, 3, 3, 2
    Ho, Wo = (H + 2 - (2 * 2 + 1)) // 2 + 1, (W - (kw - 1) - 1) + 1
    arrays = {"input": rng.standard_normal((N, C, H, W)),
              "offset": 2 * rng.standard_normal((N, 2 * G * kh * kw, Ho, Wo)),
              "weight": rng.standard_normal((C_out, C // 2, kh, kw)), "bias": rng.standard_normal(C_out)}
    if modulated:
        arrays["mask"] = rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo))
    return arrays


_PARITY_OPTIONS = {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1)}

DEFORM_CONV2D = OpSpec(
    name="deform_conv2d", arrays=("input", "offset", "weight", "bias", "mask"), grads=DeformConv2dGrads,
    check=_check, output=_output, reference=reference.deform_conv2d,
    reference_backward=reference.deform_conv2d_backward, kernels=_forward_kernels, kernels_backward=_backward_kernels,
    function=deform_conv2d, backward=deform_conv2d_backward, batch=("input", "offset", "mask"),
    cases=(Case("v1", lambda rng: _conv_inputs(rng, modulated=False), _PARITY_OPTIONS),
           Case("v2", lambda rng: _conv_inputs(rng, modulated=True), _PARITY_OPTIONS)))

SPECS = (DEFORM_CONV2D,)
