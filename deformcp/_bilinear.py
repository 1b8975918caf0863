"""Bilinear sampling on the NumPy path: the vectorised twin of kernels/deformcp_common.cuh.

Sampling is a sparse linear map. For P sample points over planes of H×W pixels, :func:`corners` gives
each point's four corner indices and weights, and :func:`sampling_matrix` lays them out as a CSR matrix
S (P × pixels, four entries a row) so that the forward is ``S @ X`` with X laid out (pixels, channels),
and the input gradient is ``S.T @ G`` — a gather, so the NumPy path is deterministic. The coordinate
gradients use the same sparsity with the weights' derivatives.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse

_CORNER_DY = np.array([0, 0, 1, 1])
_CORNER_DX = np.array([0, 1, 0, 1])


class Corners(NamedTuple):
    """Per sample point (shape (..., 4), corners (y0, x0), (y0, x1), (y1, x0), (y1, x1))."""

    index: np.ndarray       # y * W + x of each corner (int64), 0 where the corner is outside
    weight: np.ndarray      # interpolation weight, 0 where the corner is outside
    dweight_dy: np.ndarray  # derivative of weight with respect to y
    dweight_dx: np.ndarray  # derivative of weight with respect to x


def corners(y: np.ndarray, x: np.ndarray, H: int, W: int) -> Corners:
    """Bilinear corners of the samples at (y, x) over an H×W plane.

    A sample is zero unless -1 < y < H and -1 < x < W (NaN and ±inf included in "unless"); inside
    that range corners outside the plane read as zero. Same rule as ``bilinear_setup`` in the kernels.
    """
    valid = (y > -1) & (y < H) & (x > -1) & (x < W)
    y = np.where(valid, y, 0)
    x = np.where(valid, x, 0)
    fy, fx = np.floor(y), np.floor(x)
    ly, lx = y - fy, x - fx
    hy, hx = 1 - ly, 1 - lx
    cy = fy.astype(np.int64)[..., None] + _CORNER_DY
    cx = fx.astype(np.int64)[..., None] + _CORNER_DX
    inside = valid[..., None] & (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)

    def masked(*values):
        return np.where(inside, np.stack(values, axis=-1), 0)

    return Corners(index=np.where(inside, cy * W + cx, 0),
                   weight=masked(hy * hx, hy * lx, ly * hx, ly * lx),
                   dweight_dy=masked(-hx, -lx, hx, lx),
                   dweight_dx=masked(-hy, hy, -ly, ly))


def sampling_matrix(columns: np.ndarray, values: np.ndarray, n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix with row p holding ``values[p, k]`` at column ``columns[p, k]`` (k < columns.shape[-1]).

    Duplicate or zero entries are fine; rows are the leading axes of ``columns`` flattened.
    """
    per_row = columns.shape[-1]
    n_rows = columns.size // per_row if per_row else 0
    indptr = np.arange(0, n_rows * per_row + 1, per_row, dtype=np.int64)
    return scipy.sparse.csr_matrix((values.reshape(-1), columns.reshape(-1), indptr),
                                   shape=(n_rows, n_columns))
