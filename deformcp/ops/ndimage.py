"""scipy.ndimage's map_coordinates and affine_transform (orders 0, 1 and 3, every SciPy mode), forward and backward.

Conventions are SciPy's: index coordinates, first array axis first, 2-D and 3-D input; affine_transform's matrix
maps the output index to the input index. Input axes before the 2 or 3 that the coordinates (or the matrix) index
are batch axes: every image of the batch is sampled at the same points. Kernels: kernels/ndimage.cu. NumPy path:
deformcp.reference.ndimage. The public module is deformcp.ndimage.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TypeAlias, cast

import array_api_compat as compat
import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import ndimage as reference
from ._call import backward, forward
from ._spec import Case, OpSpec

FAMILY = "ndimage"
#: SciPy's modes; "grid-mirror" is SciPy's other name of "reflect".
MODES = ("constant", "nearest", "reflect", "mirror", "wrap", "grid-constant", "grid-wrap", "grid-mirror")
#: The kernels' mode codes (kernels/ndimage.cu's NDIMAGE_*), by canonical mode name.
_MODE_CODES = {"constant": 0, "nearest": 1, "reflect": 2, "mirror": 3, "wrap": 4, "grid-constant": 5, "grid-wrap": 6}
ORDERS = (0, 1, 3)
#: The kernels' prefilter initialisations (kernels/ndimage.cu's NDIMAGE_INIT_*).
_INIT_CODES = {"mirror": 0, "wrap": 1, "reflect": 2}
INPUT_LAYOUT = "(..., d0, d1) or (..., d0, d1, d2): batch axes, then the 2 or 3 sampled axes"
#: Points per thread of the affine gradient's deterministic reduction (kernels/ndimage.cu's partial sums).
AFFINE_CHUNK = 4096


class MapCoordinatesGrads(NamedTuple):
    """Gradients of :func:`map_coordinates`; a field is None where it was not asked for."""

    input: Optional[Array]
    coordinates: Optional[Array]


class AffineTransformGrads(NamedTuple):
    """Gradients of :func:`affine_transform`; a field is None where it was not asked for."""

    input: Optional[Array]
    matrix: Optional[Array]
    offset: Optional[Array]


class NdimageConfig(NamedTuple):
    shape: tuple[int, ...]      # the sampled axes' sizes (d0, d1[, d2])
    out_shape: tuple[int, ...]  # the output's, after the batch axes
    order: int
    mode: str                   # canonical: "grid-mirror" is "reflect"
    cval: float
    prefilter: bool
    batch: tuple[int, ...] = ()  # the input's leading (batch) axes, sampled alike

    @property
    def images(self) -> int:
        """The number of images sampled alike (1 without batch axes)."""
        return math.prod(self.batch)

    @property
    def prefiltered(self) -> bool:
        """Whether the taps read SciPy's spline coefficients of the input rather than the input."""
        return self.order > 1 and self.prefilter

    @property
    def npad(self) -> int:
        """How far SciPy pads the input on each side before its prefilter (and the coordinates shift)."""
        return reference.PREPAD if self.prefiltered and self.mode in ("nearest", "grid-constant") else 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes of the array the taps read (the padded coefficients where prefiltered), padded to three."""
        return tuple(n + 2 * self.npad for n in self.shape) + (1,) * (3 - len(self.shape))

    @property
    def options(self) -> tuple[int, int, int]:
        return (len(self.shape), self.order, _MODE_CODES[self.mode])


def _check_input(input: Imported) -> None:
    _validate.floating("input", input, getattr(input, "ndim", 0), INPUT_LAYOUT)
    if input.ndim < 2:
        raise ValueError(f"input: expected at least 2 axes {INPUT_LAYOUT}, got shape {tuple(input.shape)}")


def _check_sampled_axes(input: Imported, ndim: int, source: str) -> tuple[int, ...]:
    """input's batch axes, given the ndim (2 or 3) sampled axes that ``source`` says it has; the sampled axes
    must not be empty."""
    if ndim not in (2, 3) or ndim > input.ndim:
        raise ValueError(f"{source}: expected 2 or 3 sampled axes, at most input's {input.ndim}, got {ndim}")
    spatial = tuple(input.shape[input.ndim - ndim:])
    if any(n == 0 for n in spatial):
        raise ValueError(f"input: expected non-empty sampled axes (the last {ndim}) in {INPUT_LAYOUT}, got shape "
                         f"{tuple(input.shape)}")
    return tuple(input.shape[:input.ndim - ndim])


def _check_options(order: int, mode: str, cval: float, prefilter: bool) -> tuple[int, str, float, bool]:
    order = _validate.integer("order", order, minimum=0)
    if order not in ORDERS:
        raise ValueError(f"order: expected 0, 1 or 3 (SciPy's spline orders 2, 4 and 5 are not implemented), "
                         f"got {order}")
    _validate.choice("mode", mode, MODES)
    prefilter = _validate.flag("prefilter", prefilter)  # no effect at orders 0 and 1, as in SciPy
    return order, "reflect" if mode == "grid-mirror" else mode, _validate.real("cval", cval), prefilter


def _like_input(input: ArrayLike, value: ArrayLike) -> ArrayLike:
    """A number or (nested) sequence of numbers given for an array (SciPy's offset=0.0, a matrix as lists) as an
    array of input's framework, device and dtype; anything else as given (checked with the arrays)."""
    array = cast(Array, input)  # read only where _framework recognises input as an array
    if _dispatch._framework(input) is None or not isinstance(value, (numbers.Real, list, tuple)) \
            or isinstance(value, bool) or _validate.dtype_name(array.dtype) not in _validate.FLOAT_DTYPES:
        return value
    try:
        converted: Array = compat.array_namespace(array).asarray(value, dtype=array.dtype,
                                                                 device=compat.device(array))
        return converted
    except (TypeError, ValueError):  # ragged or not numbers: the array checks name it
        return value


def _acc_coordinates(xp: Any, coordinates: Imported, ndim: int) -> Imported:
    """coordinates (ndim, ...) as a C-contiguous (ndim, P) array in the compute dtype (the kernels' layout)."""
    acc = _kernels.compute_dtype(coordinates.dtype)
    return xp.ascontiguousarray(coordinates.reshape(ndim, math.prod(coordinates.shape[1:])).astype(acc, copy=False))


def _filter_kernels(call: _dispatch.Call, c: Imported, cfg: NdimageConfig, transpose: bool) -> None:
    """SciPy's spline prefilter (or its transpose) in place along every sampled axis of c (B, *sampled axes)
    (C-contiguous, compute dtype); the transpose runs the axes in reverse order."""
    init = _INIT_CODES[reference.FILTER_INIT[cfg.mode]]
    for axis in (range(c.ndim - 1, 0, -1) if transpose else range(1, c.ndim)):
        n = c.shape[axis]
        if n > 1:  # SciPy leaves lines of one element as they are
            lines = c.size // n
            _kernels.launch(call.backend, FAMILY, "ndimage_spline_filter", c.dtype, lines, (c,),
                            (lines, n, math.prod(c.shape[axis + 1:])), (init, int(transpose)))


def _values_kernels(call: _dispatch.Call, input: Imported, coordinates: Imported, cfg: NdimageConfig
                    ) -> tuple[Imported, Imported]:
    """(what the taps read (B, *sampled axes), coordinates (ndim, P) into it): input and coordinates as given, or
    where cfg prefilters, the spline coefficients of input padded by cfg.npad in the compute dtype and coordinates
    shifted."""
    xp = call.xp
    input = input.reshape((cfg.images, *cfg.shape))
    if not cfg.prefiltered:
        return xp.ascontiguousarray(input), coordinates
    acc = _kernels.compute_dtype(input.dtype)
    values = xp.ascontiguousarray(reference.pad(xp, input.astype(acc), cfg.npad, cfg.mode, cfg.cval))
    _filter_kernels(call, values, cfg, transpose=False)
    return values, coordinates + cfg.npad if cfg.npad else coordinates


def _sample_kernels(call: _dispatch.Call, input: Imported, coordinates: Imported, cfg: NdimageConfig) -> Imported:
    """input sampled at coordinates (ndim, P) in the compute dtype → (*batch, *out_shape) in input's dtype."""
    xp = call.xp
    P = coordinates.shape[1]
    values, coordinates = _values_kernels(call, input, coordinates, cfg)
    out = _kernels.empty(xp, (cfg.images, P), values.dtype)
    _kernels.launch(call.backend, FAMILY, "ndimage_map_forward", values.dtype, P, (values, coordinates, out),
                    (P, cfg.images, *cfg.sizes), cfg.options, (cfg.cval,))
    return out.reshape(cfg.batch + cfg.out_shape).astype(input.dtype, copy=False)


def _sample_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, coordinates: Imported,
                             cfg: NdimageConfig, want_input: bool, want_coordinates: bool, deterministic: bool
                             ) -> tuple[Optional[Imported], Optional[Imported]]:
    """→ (grad_input in input's dtype or None, grad_coordinates (ndim, P) in the compute dtype or None)."""
    xp = call.xp
    P = coordinates.shape[1]
    acc = _kernels.compute_dtype(input.dtype)
    values, coordinates = _values_kernels(call, input, coordinates, cfg)
    grad_output = xp.ascontiguousarray(grad_output.reshape(-1).astype(values.dtype, copy=False))
    grad_values = xp.zeros(values.shape, acc) if want_input else None  # summed in float32 for 16-bit input
    grad_coordinates = _kernels.empty(xp, (len(cfg.shape), P), acc) if want_coordinates else None
    scattered = None if deterministic else grad_values
    if scattered is not None or grad_coordinates is not None:
        _kernels.launch(call.backend, FAMILY, "ndimage_map_backward", values.dtype, P,
                        (grad_output, values, coordinates, _kernels.NULL if scattered is None else scattered,
                         _kernels.NULL if grad_coordinates is None else grad_coordinates),
                        (P, cfg.images, *cfg.sizes), cfg.options, (cfg.cval,))
    if deterministic and grad_values is not None and P > 0:
        _kernels.launch(call.backend, FAMILY, "ndimage_map_backward_input_deterministic", values.dtype, 1,
                        (grad_output, values, coordinates, grad_values), (P, cfg.images, *cfg.sizes), cfg.options,
                        (cfg.cval,))
    grad_input = None
    if grad_values is not None:
        if cfg.prefiltered:
            _filter_kernels(call, grad_values, cfg, transpose=True)
            grad_values = reference.pad_adjoint(xp, grad_values, cfg.npad, cfg.mode)
        grad_input = xp.ascontiguousarray(grad_values.astype(input.dtype, copy=False)).reshape(input.shape)
    return grad_input, grad_coordinates


# ------------------------------------------------------------------------------------------ map_coordinates

def _check_map_coordinates(call: _dispatch.Call, input: Imported, coordinates: Imported, order: int, mode: str,
                           cval: float, prefilter: bool) -> NdimageConfig:
    _check_input(input)
    layout = "(ndim, ...): one row of indices per sampled axis, the last ndim = 2 or 3 of input's"
    _validate.floating("coordinates", coordinates, getattr(coordinates, "ndim", 0), layout)
    if coordinates.ndim == 0 or coordinates.shape[0] not in (2, 3) or coordinates.shape[0] > input.ndim:
        raise ValueError(f"coordinates: expected shape {layout} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(coordinates.shape)}")
    ndim = coordinates.shape[0]
    batch = _check_sampled_axes(input, ndim, "coordinates.shape[0]")
    _validate.same_dtype(input=input, coordinates=coordinates)
    order, mode, cval, prefilter = _check_options(order, mode, cval, prefilter)
    return NdimageConfig(tuple(input.shape[len(batch):]), tuple(coordinates.shape[1:]), order, mode, cval, prefilter,
                         batch)


def _map_coordinates_output(cfg: NdimageConfig) -> tuple[tuple[int, ...], str]:
    return cfg.batch + cfg.out_shape, "input.shape[:-ndim] + coordinates.shape[1:]"


def _map_coordinates_kernels(call: _dispatch.Call, input: Imported, coordinates: Imported,
                             cfg: NdimageConfig) -> Imported:
    return _sample_kernels(call, input, _acc_coordinates(call.xp, coordinates, len(cfg.shape)), cfg)


def _map_coordinates_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported,
                                      coordinates: Imported, cfg: NdimageConfig, wanted: tuple[bool, bool],
                                      deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    want_input, want_coordinates = wanted
    grad_input, grad_coordinates = _sample_kernels_backward(
        call, grad_output, input, _acc_coordinates(call.xp, coordinates, len(cfg.shape)), cfg, want_input,
        want_coordinates, deterministic)
    if grad_coordinates is not None:
        grad_coordinates = grad_coordinates.reshape(coordinates.shape).astype(coordinates.dtype, copy=False)
    return grad_input, grad_coordinates


def map_coordinates(input: ArrayLike, coordinates: ArrayLike, order: int = 1, mode: str = "constant",
                    cval: float = 0.0, prefilter: bool = True) -> Array:
    """Sample ``input`` at index coordinates, as scipy.ndimage.map_coordinates (orders 0, 1, 3), differentiably.

    Args:
        input (array[..., d0, d1] or array[..., d0, d1, d2]): the image or volume, after any number of batch axes
            (channels, frames, ...), each of whose images is sampled at the same coordinates.
        coordinates (array[ndim, ...]): row a holds the index along sampled axis a of every output point (first
            axis first: (row, column) for images); ndim = 2 or 3 says how many of input's last axes are sampled,
            the others being batch axes (ndim = input.ndim: SciPy's call). Same dtype as input; a Python list or
            number is taken in input's dtype.
        order (int): 0 reads the nearest element (``floor(c + 0.5)``, ties upwards), 1 interpolates linearly
            along each axis, 3 is the cubic B-spline (4 taps per axis). SciPy's spline orders 2, 4 and 5 are
            refused (ValueError). Default: 1 (SciPy's is 3).
        mode (str): how coordinates and taps beyond the input are read, SciPy's meanings: "constant" (cval
            outside [0, n − 1] along any axis, no interpolation beyond the edge), "grid-constant" (taps outside
            read cval, so samples within one step of the edge blend with it), "nearest" (the edge element),
            "reflect" = "grid-mirror" (d c b a | a b c d | d c b a), "mirror" (d c b | a b c d | c b a),
            "grid-wrap" (period n), "wrap" (SciPy's period n − 1: the first and last elements coincide).
            Default: "constant".
        cval (float): the value of "constant" and "grid-constant" outside. Default: 0.0.
        prefilter (bool): at order 3, True samples the spline that interpolates input (SciPy's spline_filter
            of order 3 in the same mode along each axis, "nearest" and "grid-constant" input first padded by 12
            elements with the edge values or cval, as SciPy pads it); False takes input as the spline's
            coefficients. No effect at orders 0 and 1. Default: True.

    Returns:
        array[...]: shape ``input.shape[:-ndim] + coordinates.shape[1:]``, input's dtype and framework.

    A NaN or ±inf coordinate gives cval (and gradient 0) in every mode — deformcp's rule; SciPy's result there
    depends on the mode. Coordinates beyond about 2^53 are folded as precisely as floating point allows.

    >>> import numpy as np, scipy.ndimage, deformcp.ndimage
    >>> x = np.arange(12.0).reshape(3, 4)
    >>> c = np.array([[0.5, 2.0, -0.5], [1.25, 3.0, 1.0]])     # rows: axis-0 and axis-1 indices
    >>> print(deformcp.ndimage.map_coordinates(x, c, mode="grid-constant", cval=10.0))
    [ 3.25 11.    5.5 ]
    >>> print(scipy.ndimage.map_coordinates(x, c, order=1, mode="grid-constant", cval=10.0))
    [ 3.25 11.    5.5 ]
    """
    coordinates = _like_input(input, coordinates)
    return forward(MAP_COORDINATES, locals())


def map_coordinates_backward(grad_output: ArrayLike, input: ArrayLike, coordinates: ArrayLike, order: int = 1,
                             mode: str = "constant", cval: float = 0.0, prefilter: bool = True,
                             needs_input_grad: Sequence[bool] = (True, True),
                             deterministic: bool = False) -> MapCoordinatesGrads:
    """Gradients of :func:`map_coordinates` with respect to input and coordinates.

    Args:
        grad_output (array[...]): gradient of the loss with respect to the output (the output's shape).
        input, coordinates, order, mode, cval, prefilter: as given to :func:`map_coordinates`.
        needs_input_grad (pair of bool): which of (input, coordinates) to differentiate. Default: both.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the input gradient with atomics
            (float sums may differ in the last bits between runs); True adds the points in order in one thread:
            bitwise identical run to run, and slow on a GPU. The NumPy path is always deterministic. Default: False.

    Returns:
        MapCoordinatesGrads: ``input`` (input's shape) and ``coordinates`` (coordinates' shape, summed over the
        batch), None where not asked for. The coordinate gradient is 0 at order 0, at non-finite coordinates,
        where "constant" gives cval, and where "nearest" clamps; a fold of the mode (mirror, reflect) flips its
        sign. At an integer coordinate the derivative is the one from the right. At order 3 with prefilter the
        input gradient goes through the prefilter's transpose (the filter is linear; the padding's transpose
        adds the padded borders back onto the edges).
    """
    coordinates = _like_input(input, coordinates)
    return MapCoordinatesGrads(*backward(MAP_COORDINATES, locals()))


# ----------------------------------------------------------------------------------------- affine_transform

def _check_affine_transform(call: _dispatch.Call, input: Imported, matrix: Imported, offset: Imported,
                            output_shape: Optional[Sequence[int]], order: int, mode: str, cval: float,
                            prefilter: bool) -> NdimageConfig:
    _check_input(input)
    forms = ("(n,) diagonal, (n, n), (n, n + 1) or (n + 1, n + 1) homogeneous for n = 2 or 3 sampled axes, "
             "the last n of input's (a square matrix is (n, n) unless n + 1 is input.ndim, as in SciPy)")
    _validate.floating("matrix", matrix, getattr(matrix, "ndim", 0), forms)
    n = _sampled_axes(matrix.shape, input.ndim)
    if n is None:
        raise ValueError(f"matrix: expected shape {forms}, for input of shape {tuple(input.shape)}; got "
                         f"{tuple(matrix.shape)}")
    batch = _check_sampled_axes(input, n, "matrix")
    _validate.floating("offset", offset, getattr(offset, "ndim", 0), f"() or ({n},)")
    if tuple(offset.shape) not in ((), (n,)):
        raise ValueError(f"offset: expected shape () or ({n},) for a matrix of {n} sampled axes, got "
                         f"{tuple(offset.shape)}")
    _validate.same_dtype(input=input, matrix=matrix, offset=offset)
    spatial = tuple(input.shape[len(batch):])
    if output_shape is None:
        out_shape = spatial
    else:  # the sampled axes' sizes, or SciPy's whole shape (the batch axes' sizes first)
        whole = len(batch) + n
        count = whole if batch and hasattr(output_shape, "__len__") and len(output_shape) == whole else n
        out_shape = _validate.sizes("output_shape", output_shape, count)
        if count != n:
            if out_shape[:len(batch)] != batch:
                raise ValueError(f"output_shape: expected the batch axes' sizes {batch} before the {n} sampled "
                                 f"axes' (or the {n} alone), got {out_shape}")
            out_shape = out_shape[len(batch):]
    _validate.output_fits("output_shape", batch + out_shape, input.dtype)
    order, mode, cval, prefilter = _check_options(order, mode, cval, prefilter)
    return NdimageConfig(spatial, out_shape, order, mode, cval, prefilter, batch)


def _sampled_axes(matrix_shape: Sequence[int], input_ndim: int) -> Optional[int]:
    """How many trailing input axes a matrix of this shape maps (SciPy's forms; a square matrix is linear unless
    it is homogeneous for every input axis, SciPy's reading), or None where no form fits."""
    shape = tuple(matrix_shape)
    if len(shape) == 1:
        n = shape[0]
    elif len(shape) == 2 and shape[1] == shape[0] + 1:
        n = shape[0]
    elif len(shape) == 2 and shape[0] == shape[1]:
        n = shape[0] - 1 if shape[0] == input_ndim + 1 else shape[0]
    else:
        return None
    return n if n in (2, 3) and n <= input_ndim else None


def _affine_transform_output(cfg: NdimageConfig) -> tuple[tuple[int, ...], str]:
    return cfg.batch + cfg.out_shape, "input's batch axes + output_shape (the sampled axes' sizes by default)"


def _affine_coordinates_kernels(call: _dispatch.Call, matrix: Imported, offset: Imported,
                                cfg: NdimageConfig) -> Imported:
    """The sampled coordinates (ndim, P) in the compute dtype, and [M | shift] (kernels/ndimage.cu)."""
    xp = call.xp
    ndim, P = len(cfg.shape), math.prod(cfg.out_shape)
    acc = _kernels.compute_dtype(matrix.dtype)
    coordinates = _kernels.empty(xp, (ndim, P), acc)
    _kernels.launch(call.backend, FAMILY, "ndimage_affine_coordinates", matrix.dtype, P,
                    (reference.transform(xp, matrix, offset, ndim, acc), coordinates),
                    (P, *cfg.out_shape, *(1,) * (3 - ndim)), (ndim,))
    return coordinates


def _affine_transform_kernels(call: _dispatch.Call, input: Imported, matrix: Imported, offset: Imported,
                              cfg: NdimageConfig) -> Imported:
    return _sample_kernels(call, input, _affine_coordinates_kernels(call, matrix, offset, cfg), cfg)


def _affine_transform_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported,
                                       matrix: Imported, offset: Imported, cfg: NdimageConfig,
                                       wanted: tuple[bool, bool, bool], deterministic: bool
                                       ) -> tuple[Optional[Imported], Optional[Imported], Optional[Imported]]:
    xp = call.xp
    want_input, want_matrix, want_offset = wanted
    coordinates = _affine_coordinates_kernels(call, matrix, offset, cfg)
    grad_input, gc = _sample_kernels_backward(call, grad_output, input, coordinates, cfg, want_input,
                                              want_matrix or want_offset, deterministic)
    if gc is None:
        return grad_input, None, None
    ndim, P = gc.shape
    chunks = -(-P // AFFINE_CHUNK)
    partials = _kernels.empty(xp, (chunks, ndim * (ndim + 1)), "float64")  # summed in float64
    _kernels.launch(call.backend, FAMILY, "ndimage_affine_partial_sums", matrix.dtype, chunks, (gc, partials),
                    (chunks, AFFINE_CHUNK, P, *cfg.out_shape, *(1,) * (3 - ndim)), (ndim,))
    grad = xp.sum(partials, axis=0).reshape(ndim, ndim + 1)
    grad_matrix, grad_offset = reference.transform_gradients(xp, grad, matrix, offset)
    return grad_input, grad_matrix if want_matrix else None, grad_offset if want_offset else None


def affine_transform(input: ArrayLike, matrix: ArrayLike, offset: ArrayLike = 0.0,
                     output_shape: Optional[Sequence[int]] = None, order: int = 1, mode: str = "constant",
                     cval: float = 0.0, prefilter: bool = True) -> Array:
    """Resample ``input`` under an affine map, as scipy.ndimage.affine_transform (orders 0, 1, 3), differentiably.

    The output element at index o reads input at ``matrix @ o + offset`` ("pull" resampling: the matrix maps
    output indices to input indices; give the inverse of a "push" transform).

    Args:
        input (array[..., d0, d1] or array[..., d0, d1, d2]): the image or volume, after any number of batch axes,
            each of whose images is resampled alike.
        matrix (array): SciPy's forms, for the ndim = 2 or 3 sampled axes (input's last; the others are batch
            axes): (ndim, ndim) the linear map; (ndim,) its diagonal; (ndim, ndim + 1) or (ndim + 1, ndim + 1)
            (bottom row [0, ..., 0, 1], else ValueError) homogeneous, whose last column is the offset (offset is
            then ignored). A square matrix reads as SciPy reads it: (ndim + 1, ndim + 1) homogeneous only where
            ndim = input.ndim, else (n, n) linear over the last n axes. Same dtype as input; a Python list is taken
            in input's dtype.
        offset (array[()] or array[ndim]): added to every input index (a scalar: the same on each axis). Same
            dtype as input; a Python number or list is taken in input's dtype. Default: 0.0.
        output_shape (sequence of ints, optional): the sampled axes' output sizes (ndim ints), or SciPy's whole
            output shape (input's batch sizes, then those). Default: input's shape.
        order, mode, cval, prefilter: as :func:`map_coordinates` (orders 0, 1 and 3; SciPy's modes).

    Returns:
        array[..., *output_shape]: input's batch axes, then the sampled axes' output sizes; input's dtype and
        framework.

    The coordinates are summed as SciPy sums them (``Σ_l o_l · matrix[h, l]``, then the offset); a diagonal
    matrix is applied as the full matrix would be, where SciPy's separable path may round differently in the
    last bit.

    >>> import numpy as np, scipy.ndimage, deformcp.ndimage
    >>> x = np.arange(12.0).reshape(3, 4)
    >>> m = np.array([[0.5, 0.25], [0.0, 0.75]])
    >>> print(deformcp.ndimage.affine_transform(x, m, offset=[0.5, 0.25])[2])
    [6.25 8.   9.75 0.  ]
    >>> print(scipy.ndimage.affine_transform(x, m, offset=[0.5, 0.25], order=1)[2])
    [6.25 8.   9.75 0.  ]
    """
    matrix, offset = _like_input(input, matrix), _like_input(input, offset)
    return forward(AFFINE_TRANSFORM, locals())


def affine_transform_backward(grad_output: ArrayLike, input: ArrayLike, matrix: ArrayLike, offset: ArrayLike = 0.0,
                              output_shape: Optional[Sequence[int]] = None, order: int = 1, mode: str = "constant",
                              cval: float = 0.0, prefilter: bool = True,
                              needs_input_grad: Sequence[bool] = (True, True, True),
                              deterministic: bool = False) -> AffineTransformGrads:
    """Gradients of :func:`affine_transform` with respect to input, matrix and offset.

    Args:
        grad_output (array[..., *output_shape]): gradient of the loss with respect to the output.
        input, matrix, offset, output_shape, order, mode, cval, prefilter: as given to :func:`affine_transform`.
        needs_input_grad (triple of bool): which of (input, matrix, offset) to differentiate. Default: all.
        deterministic (bool): as :func:`map_coordinates_backward` (the input gradient's order of addition).
            Default: False.

    Returns:
        AffineTransformGrads: ``input``, ``matrix`` and ``offset``, each of the shape it was given in (a diagonal
        matrix gets the diagonal of the gradient, a scalar offset the sum over the axes, a homogeneous matrix 0 in
        its last row, and offset 0 where a homogeneous matrix ignores it; matrix and offset summed over the
        batch); None where not asked for. The matrix
        and offset gradients are the coordinate gradients (as :func:`map_coordinates_backward`) reduced over the
        output in one deterministic reduction in float64: fixed chunks of points summed in order, then the chunks.
    """
    matrix, offset = _like_input(input, matrix), _like_input(input, offset)
    return AffineTransformGrads(*backward(AFFINE_TRANSFORM, locals()))


# ------------------------------------------------------------------------------------------- specs

#: A case's inputs from a random generator (Case.make).
_MakeInputs: TypeAlias = Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]


def _image(rng: np.random.Generator, ndim: int, batch: tuple[int, ...] = ()) -> npt.NDArray[np.float64]:
    return rng.standard_normal(batch + ((5, 6) if ndim == 2 else (4, 5, 3)))


def _map_inputs(ndim: int, batch: tuple[int, ...] = ()) -> _MakeInputs:
    """Coordinates from 1.5 to 4.5 steps before the input to as far past it (non-finite ones: tests/test_ndimage.py)."""
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        input = _image(rng, ndim, batch)
        coordinates = rng.uniform(-1.5, 1.5, (ndim, 7, 3)) * (1 + 2 * rng.random((ndim, 1, 1))) \
            + rng.uniform(0, 1, (ndim, 7, 3)) * (max(input.shape[len(batch):]) - 1)
        return {"input": input, "coordinates": coordinates}
    return make


def _affine_inputs(ndim: int, matrix_shape: tuple[int, ...], offset_shape: tuple[int, ...],
                   out_shape: tuple[int, ...], batch: tuple[int, ...] = ()) -> _MakeInputs:
    """A random affine map of the output onto the input, reaching a step or two past its edges (its matrix gradient
    sums every point's coordinate gradient: where most points fall outside, those sums cancel to a small fraction
    of their terms, too ill-conditioned in float32 to compare two implementations). A scalar offset only where its
    gradient is 0 (order 0, or a homogeneous matrix): its gradient sums every coordinate gradient, as ill-posed."""
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        input = _image(rng, ndim, batch)
        spatial = np.array(input.shape[len(batch):])
        reach = (spatial - 1) / (np.array(out_shape) - 1)
        m = np.diag(reach * rng.uniform(0.7, 1.2, ndim) * rng.choice([-1, 1], ndim))
        if len(matrix_shape) == 2:
            m += rng.uniform(-0.3, 0.3, (ndim, ndim))
        shift = (spatial - 1) / 2 - m @ ((np.array(out_shape) - 1) / 2) + rng.uniform(-1, 1, ndim)
        if len(matrix_shape) == 1:
            matrix, offset = np.diag(m), shift
        elif matrix_shape == (ndim, ndim):
            matrix, offset = m, np.asarray(np.mean(shift)) if offset_shape == () else shift
        else:  # homogeneous: the offset is ignored
            matrix, offset = np.concatenate([m, shift[:, None]], axis=1), rng.uniform(-2, 2, offset_shape)
            if matrix_shape[0] == ndim + 1:
                matrix = np.concatenate([matrix, [[0] * ndim + [1]]])
        return {"input": input, "matrix": matrix, "offset": offset}
    return make


def _map_cases() -> Iterator[Case]:
    """Every order and mode in 2-D and 3-D (order 3 with SciPy's prefilter), and order 3 on coefficients."""
    for ndim in (2, 3):
        for order in ORDERS:
            for mode in (m for m in MODES if m != "grid-mirror"):
                yield Case(f"{ndim}d-order={order}-{mode}", _map_inputs(ndim),
                           {"order": order, "mode": mode, "cval": 0.5, "prefilter": True})
        for mode in ("mirror", "grid-constant"):
            yield Case(f"{ndim}d-order=3-{mode}-prefilter=False", _map_inputs(ndim),
                       {"order": 3, "mode": mode, "cval": 0.5, "prefilter": False})
        for batch, order, mode in (((3,), 1, "reflect"), ((2, 1), 3, "nearest"), ((2,), 3, "wrap"),
                                   ((2,), 0, "constant")):  # images sampled alike; "nearest" pads before its prefilter
            yield Case(f"{ndim}d-batch{batch}-order={order}-{mode}", _map_inputs(ndim, batch),
                       {"order": order, "mode": mode, "cval": 0.5, "prefilter": True})


def _affine_cases() -> Iterator[Case]:
    for ndim in (2, 3):
        out_shape = (6, 4) if ndim == 2 else (3, 4, 5)
        for m, o, order, mode, prefilter in (
                ((ndim, ndim), (ndim,), 1, "constant", True), ((ndim,), (ndim,), 1, "grid-constant", True),
                ((ndim, ndim + 1), (), 1, "mirror", True), ((ndim + 1, ndim + 1), (ndim,), 1, "grid-wrap", True),
                ((ndim, ndim), (ndim,), 1, "wrap", True), ((ndim, ndim), (), 0, "reflect", True),
                ((ndim, ndim), (ndim,), 3, "nearest", True), ((ndim,), (ndim,), 3, "reflect", True),
                ((ndim, ndim + 1), (), 3, "grid-constant", True), ((ndim, ndim), (ndim,), 3, "wrap", False)):
            yield Case(f"{ndim}d-matrix{m}-offset{o}-order={order}-{mode}" + ("" if prefilter else "-prefilter=False"),
                       _affine_inputs(ndim, m, o, out_shape),
                       {"order": order, "mode": mode, "cval": -0.5, "prefilter": prefilter, "output_shape": out_shape})
        for m, order, mode in (((ndim, ndim + 1), 1, "grid-constant"), ((ndim, ndim), 3, "grid-constant")):
            make = _affine_inputs(ndim, m, (ndim,), out_shape, batch=(2,))
            yield Case(f"{ndim}d-batch(2,)-matrix{m}-order={order}-{mode}", make,
                       {"order": order, "mode": mode, "cval": -0.5, "prefilter": True, "output_shape": out_shape})


MAP_COORDINATES = OpSpec(
    name="map_coordinates", arrays=("input", "coordinates"), grads=MapCoordinatesGrads,
    check=_check_map_coordinates, output=_map_coordinates_output, reference=reference.map_coordinates,
    reference_backward=reference.map_coordinates_backward, kernels=_map_coordinates_kernels,
    kernels_backward=_map_coordinates_kernels_backward, function=map_coordinates, backward=map_coordinates_backward,
    cases=tuple(_map_cases()))

AFFINE_TRANSFORM = OpSpec(
    name="affine_transform", arrays=("input", "matrix", "offset"), grads=AffineTransformGrads,
    check=_check_affine_transform, output=_affine_transform_output, reference=reference.affine_transform,
    reference_backward=reference.affine_transform_backward, kernels=_affine_transform_kernels,
    kernels_backward=_affine_transform_kernels_backward, function=affine_transform,
    backward=affine_transform_backward, cases=tuple(_affine_cases()))

SPECS = (MAP_COORDINATES, AFFINE_TRANSFORM)
