"""SciPy-style calls for scientific code: scipy.ndimage's map_coordinates and affine_transform, differentiable.

Same names, arguments, defaults and conventions as scipy.ndimage (index coordinates, first array axis first, 2-D and
3-D sampling, the affine matrix mapping output indices to input indices, SciPy's modes "constant", "grid-constant",
"nearest", "reflect" = "grid-mirror", "mirror", "wrap", "grid-wrap"), for orders 0, 1 and 3 (the cubic B-spline,
with SciPy's prefilter or without; the default order is 1, SciPy's 3); results equal SciPy's on float64 input. Input
axes before the 2 or 3 that the coordinates or the matrix index are batch axes (channels, frames): every image is
sampled at the same points in one call. Unlike SciPy, each has a backward (``<name>_backward``: the gradients of the
input and of the coordinates, or of the matrix and offset), and runs on every deformcp backend (the NumPy path, the
host backend, CUDA) for NumPy, CuPy and DLPack arrays. A NaN or ±inf coordinate samples cval with gradient 0.

>>> import numpy as np, scipy.ndimage, deformcp.ndimage
>>> x = np.random.default_rng(0).random((6, 7))
>>> c = np.array([[1.5, -0.25, 5.5], [2.25, 3.0, 6.75]])
>>> for mode in ("constant", "grid-constant", "reflect", "mirror", "wrap", "grid-wrap", "nearest"):
...     ours = deformcp.ndimage.map_coordinates(x, c, mode=mode, cval=2.0)
...     assert np.allclose(ours, scipy.ndimage.map_coordinates(x, c, order=1, mode=mode, cval=2.0), 0, 1e-15)
>>> cubic = deformcp.ndimage.map_coordinates(x, c, order=3, mode="nearest")
>>> assert np.allclose(cubic, scipy.ndimage.map_coordinates(x, c, order=3, mode="nearest"), 0, 1e-14)
>>> g = deformcp.ndimage.map_coordinates_backward(np.ones(3), x, c, order=3, mode="grid-constant")
>>> g.input.shape, g.coordinates.shape
((6, 7), (2, 3))
"""
from .ops.ndimage import (
    AffineTransformGrads,
    MapCoordinatesGrads,
    affine_transform,
    affine_transform_backward,
    map_coordinates,
    map_coordinates_backward,
)

__all__ = ["map_coordinates", "map_coordinates_backward", "MapCoordinatesGrads",
           "affine_transform", "affine_transform_backward", "AffineTransformGrads"]
