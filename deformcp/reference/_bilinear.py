"""Bilinear sampling on the NumPy path: the vectorised twin of kernels/deformcp_common.cuh.

Sampling is a sparse linear map. Images are laid out channels-last, each followed by one row of zeros
(:func:`pixels_last`): an (n·(H·W + 1), C) matrix X. :func:`corners` gives each sample point's four
corner rows and weights (a corner outside the image points at its image's zero row), and
:func:`sampling_matrix` lays them out as a CSR matrix S, so that the forward is ``S @ X`` and the input
gradient is ``S.T @ G`` — a gather, so the NumPy path is deterministic. Coordinate gradients use the
same corners with the weights' derivatives. Work is done a few images at a time
(``_workspace.image_chunks``), so that X and its products stay in cache, and chunks run on a pool of
``_workspace.num_threads()`` threads (``DEFORMCP_NUM_THREADS``, default: the CPUs available, affinity and cgroup
quota counted; a forked child makes a pool of its own), with BLAS held to one thread meanwhile: NumPy releases
the GIL in its copies, gathers and products. Chunks write disjoint parts of the outputs, so results do not
depend on it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt
import scipy.sparse
import threadpoolctl

from .. import _workspace


class Corners(NamedTuple):
    """Per sample point, shape (..., 4), corners in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1)."""

    # y·W + x of each corner; H·W (the image's zero row) where outside (the name hides tuple.index, unused here)
    index: npt.NDArray[np.int64]  # type: ignore[assignment]
    weight: npt.NDArray[Any]      # interpolation weight, 0 where the corner is outside
    dweight_dy: Optional[npt.NDArray[Any]]  # derivative of weight with respect to y (from the right at integers)
    dweight_dx: Optional[npt.NDArray[Any]]  # derivative of weight with respect to x; both None without derivatives


def corners(y: npt.NDArray[Any], x: npt.NDArray[Any], H: Union[int, npt.NDArray[np.integer[Any]]],
            W: Union[int, npt.NDArray[np.integer[Any]]], closed_below: bool = False,
            derivatives: bool = True) -> Corners:
    """Bilinear corners of the samples at (y, x) over an H×W image (H and W ints, or int arrays broadcasting
    against y's shape: a size per sample).

    A sample is zero unless -1 < y < H and -1 < x < W (NaN and ±inf fall in "unless"); inside that
    range corners outside the image read zero. With ``closed_below``, samples at exactly -1 are set up
    too (they read 0 · row 0, with row 0's derivative from the right: torch's grid_sample). Same rule as
    ``bilinear_setup`` in the kernels. Without ``derivatives`` the weights' derivatives are not computed.
    """
    above = ((y >= -1) & (x >= -1)) if closed_below else ((y > -1) & (x > -1))
    valid = above & (y < H) & (x < W)
    y = np.where(valid, y, 0)
    x = np.where(valid, x, 0)
    fy, fx = np.floor(y), np.floor(x)
    ly, lx = y - fy, x - fx
    y0, x0 = fy.astype(np.int64), fx.astype(np.int64)
    # per axis (last axis: lower, upper row or column): whether it is inside, its weight, the weight's derivative
    in_y = np.stack([valid & (y0 >= 0), valid & (y0 < H - 1)], axis=-1)
    in_x = np.stack([x0 >= 0, x0 < W - 1], axis=-1)
    wy = np.where(in_y, np.stack([1 - ly, ly], axis=-1), 0)
    wx = np.where(in_x, np.stack([1 - lx, lx], axis=-1), 0)

    def pairs(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """(…, 2) × (…, 2) → (…, 4): a[i] · b[j] in the corner order (i, j) = (0, 0), (0, 1), (1, 0), (1, 1)."""
        products: npt.NDArray[Any] = a[..., :, None] * b[..., None, :]
        return products.reshape(*a.shape[:-1], 4)

    base = y0 * W + x0
    inside = (in_y[..., :, None] & in_x[..., None, :]).reshape(*base.shape, 4)
    index = np.where(inside, np.stack([base, base + 1, base + W, base + W + 1], axis=-1),
                     np.asarray(H * W)[..., None])
    if not derivatives:
        return Corners(index, pairs(wy, wx), None, None)
    sign = np.array([-1, 1], ly.dtype)
    return Corners(index, pairs(wy, wx), dweight_dy=pairs(in_y * sign, wx), dweight_dx=pairs(wy, in_x * sign))


@functools.lru_cache(maxsize=None)
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="deformcp")


# A forked child has none of its parent's pool threads, but would find the pool and wait for them forever.
os.register_at_fork(after_in_child=_pool.cache_clear)


@functools.lru_cache(maxsize=1)
def _blas(modules: int) -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries loaded (NumPy's, which the NumPy path calls, and any other), found again when modules were
    imported since the last call (``modules``: len(sys.modules); an import, scipy.linalg's say, may load another
    BLAS): finding them takes about 0.5 ms, limiting them then about 10 µs."""
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


def for_each_chunk(work: Callable[..., object], chunks: Sequence[tuple[object, ...]]) -> None:
    """Call work(*chunk) for every chunk (e.g. a range (start, stop)), concurrently on the thread pool. While the
    pool works, BLAS libraries (OpenBLAS, MKL, ...) run one thread per call, so that the pool's threads and theirs
    do not oversubscribe the CPUs (a process-wide setting, restored afterwards)."""
    threads = _workspace.num_threads()
    if threads <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            work(*chunk)
        return
    with _blas(len(sys.modules)).limit(limits=1, user_api="blas"):
        for done in _pool(threads).map(lambda chunk: work(*chunk), chunks):
            del done  # map re-raises a worker's exception here


def pixels_last(images: npt.NDArray[Any], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """(n, C, H, W) → (n·(H·W + 1), C) in dtype: each image's pixels as rows, then a row of zeros."""
    n, C, H, W = images.shape
    X = np.empty((n, H * W + 1, C), dtype)
    X[:, -1] = 0
    np.copyto(X[:, :-1], images.reshape(n, C, H * W).transpose(0, 2, 1))
    return X.reshape(n * (H * W + 1), C)


def to_channels_first(rows: npt.NDArray[Any], out: npt.NDArray[Any]) -> None:
    """Write (n·P, C) rows, or (n·(P + 1), C) with each image's zero row, into out (n, C, ...)."""
    n, C = out.shape[:2]
    P = int(np.prod(out.shape[2:]))
    np.copyto(out.reshape(n, C, P), rows.reshape(n, rows.shape[0] // n, C)[:, :P].transpose(0, 2, 1))


def sampling_matrix(rows: npt.NDArray[np.integer[Any]], values: npt.NDArray[Any],
                    n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix whose row p holds ``values[p, k]`` at column ``rows[p, k]``, for every k.

    The leading axes of ``rows`` are flattened into the matrix rows. Duplicate entries add up.
    """
    per_row = rows.shape[-1]
    n_rows = math.prod(rows.shape[:-1])
    return sparse_rows(values.reshape(-1), rows.reshape(-1), np.arange(n_rows + 1) * per_row, n_columns)


def sparse_rows(values: npt.NDArray[Any], columns: npt.NDArray[np.integer[Any]], indptr: npt.NDArray[np.integer[Any]],
                n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix from its three arrays (int32 indices where they fit), without scipy's copies and checks."""
    index_type = np.int32 if max(n_columns, len(columns)) < 2**31 else np.int64
    return scipy.sparse.csr_matrix((values, columns.astype(index_type), indptr.astype(index_type)),
                                   shape=(len(indptr) - 1, n_columns))
