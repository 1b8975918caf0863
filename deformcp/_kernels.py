"""Loading, compiling and launching kernels/*.cu, on the GPU (CuPy + NVRTC) and on the CPU (host backend).

Every kernel family is one file, ``kernels/<family>.cu``, preceded by the shared ``deformcp_common.cuh``
(concatenated, not ``#include``-d, so that editing the header changes every cache key; :mod:`deformcp._sources`
finds and reads them). Kernels are
templates ``name<T, I>``: ``T`` the storage type (:data:`C_TYPES`), ``I`` the index type (``int``, or
``long long`` once an index can pass 2**31 - 1). Shapes are run-time arguments, never baked into the
source. A module is compiled once per (family, dtype, index type, device) and memoised; CuPy caches the
CUDA binaries on disk, :mod:`deformcp._host` caches the host shared libraries.

Compilations are logged to the ``deformcp.kernels`` logger: INFO for a build, DEBUG for a module loaded from a
cache (the library configures no handler: ``logging.basicConfig(level=logging.INFO)`` shows them).
"""
from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
import time
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import numpy.typing as npt

from . import _sources
from ._types import Imported

#: A compiled kernel: ``kernel(grid, block, args)``, a cupy.RawKernel or a :class:`deformcp._host.HostKernel`.
Kernel = Callable[[tuple[int], tuple[int], tuple[object, ...]], None]

#: NumPy dtype name → C type of the kernel template instantiation.
C_TYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65536  # kernels are grid-stride loops, so any n is covered whatever the cap
INT32_MAX = 2**31 - 1
#: Pass for a pointer argument the kernel may skip (it tests for nullptr).
NULL = np.uint64(0)
#: When set, :func:`empty` fills new kernel outputs with NaN (see deformcp.testing.poisoned_outputs).
POISON_OUTPUTS = contextvars.ContextVar("deformcp_poison_outputs", default=False)
log = logging.getLogger("deformcp.kernels")


def empty(xp: Any, shape: Sequence[int], dtype: npt.DTypeLike) -> Imported:
    """An output array for a kernel to fill completely (NaN-filled while outputs are poisoned)."""
    out = xp.empty(shape, dtype)
    if POISON_OUTPUTS.get():
        out.fill(np.nan)
    return out


def dtype_name(dtype: npt.DTypeLike) -> str:
    """"float32", ... for a dtype or a dtype name ("bfloat16" also without ml_dtypes installed)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def compute_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """The dtype arithmetic runs in for arrays of ``dtype``: float64 for float64, else float32 (float16 and
    bfloat16 are computed in float32). It is the kernels' ``acc_t<T>``: buffers that many terms are added
    into (scatter-added gradients, deform_conv2d's columns) are allocated in it and rounded to ``dtype`` once,
    at the end; the NumPy path computes in it too."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def c_type(dtype: npt.DTypeLike) -> str:
    return C_TYPES[dtype_name(dtype)]


def index_type(index64: bool) -> str:
    return "long long" if index64 else "int"


def name_expression(name: str, dtype: npt.DTypeLike, index64: bool) -> str:
    return f"{name}<{c_type(dtype)}, {index_type(index64)}>"


#: When set, every launch uses the 64-bit index instantiation (see :func:`force_index64`).
FORCE_INDEX64 = contextvars.ContextVar("deformcp_force_index64", default=False)


def needs_index64(*sizes: int) -> bool:
    """The rule for the index type: 64-bit when an element count, a size, an array's length or a magnitude
    a kernel derives from several sizes (``bounds`` of :func:`launch`) can pass 2**31 - 1 (so that every index,
    offset and coordinate computed from them fits), or when forced."""
    return FORCE_INDEX64.get() or max(sizes, default=0) > INT32_MAX


def force_index64() -> ContextManager[bool]:
    """Context manager: run every kernel's 64-bit index instantiation, whatever the sizes (for testing that
    it computes what the 32-bit one does)."""
    from ._dispatch import scoped
    return scoped(FORCE_INDEX64, True)


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options shared by the CUDA backend and the compile check (the -arch flag excluded)."""
    options = ["--std=c++17"]
    try:
        from cuda import pathfinder
        include = pathfinder.find_nvidia_header_directory("cudart")
    except Exception:  # no CUDA headers from a wheel: CuPy falls back to the toolkit's own
        include = None
    if include:
        options.append(f"-I{include}")
    return tuple(options)


def _cupy_cache_entries() -> set[str]:
    """The files of CuPy's on-disk kernel cache (``CUPY_CACHE_DIR``, by default ``~/.cupy/kernel_cache``)."""
    try:
        return set(os.listdir(os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")))
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)
def _cuda_module(family: str, dtype: str, index64: bool, device_id: int) -> Any:  # a cupy.RawModule
    import cupy

    names = [name_expression(k, dtype, index64) for k in _sources.kernel_names(family)]
    cached, start = _cupy_cache_entries(), time.perf_counter()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=_sources.source(family), options=nvrtc_options(), name_expressions=names)
        module.compile()
    seconds = time.perf_counter() - start
    # NVRTC ran when CuPy wrote a new cache entry, or always when CuPy caches in memory only
    built = bool(_cupy_cache_entries() - cached) or os.environ.get("CUPY_CACHE_IN_MEMORY", "0") != "0"
    log.log(logging.INFO if built else logging.DEBUG, "cuda: %s %s for device %d in %.2f s",
            "built by NVRTC" if built else "loaded from CuPy's cache", name_expression(family, dtype, index64),
            device_id, seconds)
    return module


def get_function(backend: str, family: str, name: str, dtype: npt.DTypeLike, index64: bool) -> Kernel:
    """A compiled kernel, callable as ``fn(grid, block, args)`` like :class:`cupy.RawKernel`."""
    expression = name_expression(name, dtype, index64)
    if backend == "cuda":
        import cupy

        device_id = cupy.cuda.Device().id
        kernel: Kernel = _cuda_module(family, dtype_name(dtype), index64, device_id).get_function(expression)
        return kernel
    if backend == "host":
        from . import _host

        return _host.module(family, c_type(dtype), index_type(index64)).get_function(expression)
    raise ValueError(f"backend: expected 'cuda' or 'host', got {backend!r}")


def launch(backend: str, family: str, name: str, dtype: npt.DTypeLike, n: int, arrays: Sequence[object],
           sizes: Sequence[int], options: Sequence[int] = (), reals: Sequence[float] = (),
           bounds: Sequence[int] = ()) -> None:
    """Run kernel ``name<dtype, I>`` of ``family`` over ``n`` work items; nothing when ``n == 0``.

    Every kernel takes its parameters in four runs: ``arrays`` (device arrays for "cuda", NumPy
    arrays for "host", or :data:`NULL`), ``sizes`` (passed as the index type ``I``), ``options``
    (passed as ``int``) and ``reals`` (passed as ``double``). ``I`` is ``long long`` when ``n``, a
    size, an array's element count or one of ``bounds`` passes 2**31 - 1, else ``int``. ``bounds`` (not
    passed to the kernel) are magnitudes the kernel derives in ``I`` from several sizes together, such as
    deform_conv's tap positions ``ho·stride − pad + i·dilation``.
    """
    if n == 0:
        return
    index64 = needs_index64(n, *sizes, *(getattr(a, "size", 0) for a in arrays), *bounds)
    index = np.int64 if index64 else np.int32
    fn = get_function(backend, family, name, dtype, index64)
    blocks = min(math.ceil(n / THREADS_PER_BLOCK), MAX_BLOCKS)
    args = (*arrays, *(index(s) for s in sizes), *(np.int32(o) for o in options), *(np.float64(r) for r in reals))
    fn((blocks,), (THREADS_PER_BLOCK,), args)
