"""Which backend runs a call, and the round trip of the caller's arrays.

=====================================================  =========  ============================================
input arrays                                           backend    what runs
=====================================================  =========  ============================================
numpy.ndarray, or DLPack arrays on the CPU             "numpy"    vectorised NumPy (the reference)
the same, inside ``with deformcp.backend("host")``     "host"     kernels/*.cu compiled for the CPU
cupy.ndarray, or DLPack arrays on a CUDA device        "cuda"     kernels/*.cu through NVRTC
=====================================================  =========  ============================================

DLPack arrays (PyTorch tensors, JAX arrays, ...) are imported without a copy and results are handed back
in the caller's framework, also without a copy. NumPy arrays in non-native byte order are copied once into
native order on entry (:func:`native_byte_order`); results are always in native order. Anything else that
numpy.asarray makes a numeric array of (lists, tuples, memoryviews, objects with ``__array__``) is that NumPy
array (a list of floats is float64), then judged by the op's dtype rules; traced JAX values (inside jax.jit,
grad or vmap) are refused, naming deformcp.jax, which traces (:func:`_as_array`). Namespaces are told
apart with array-api-compat, which never imports CuPy, PyTorch or JAX itself.

bfloat16 (:func:`_bfloat16_import`, :func:`_bfloat16_export`). NumPy's bfloat16 is ml_dtypes' (without it a
bfloat16 argument is a TypeError saying to install ml_dtypes), and NumPy's DLPack has no bfloat16, so bfloat16
arrays on the CPU cross another way: PyTorch tensors as a same-size integer view (``x.view(torch.int16)`` →
``np.from_dlpack`` → ``.view(bfloat16)``, and back the same way), without a copy; JAX arrays through NumPy's
array protocol (``np.asarray``, a view on the CPU) and back through ``jax.device_put``, which, like JAX's
``from_dlpack``, copies unless the buffer is 64-byte aligned; arrays of other frameworks through
``np.asarray`` and back through their namespace's ``asarray`` (each may copy). On a CUDA device, where CuPy has
no bfloat16 arrays, a bfloat16 call takes one documented cast (:func:`_bfloat16_on_cuda`): its arrays are cast to
float32 by their own framework (exact), the op runs in float32 — as the kernels compute bfloat16 anyway — and
its floating results are rounded back to bfloat16; all its floating arrays must then be bfloat16 (a TypeError
naming them otherwise, never a silent promotion).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from types import TracebackType
from typing import Any, Callable, Iterator, NamedTuple, Optional, TypeVar

import array_api_compat as compat
import numpy as np
import numpy.typing as npt

from ._types import Array, Imported

_T = TypeVar("_T")

#: How to install PyTorch's CPU build (PyPI's Linux wheels bring several GB of CUDA libraries), for install hints.
TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"

BACKENDS = ("numpy", "host")
_CPU_BACKEND = contextvars.ContextVar("deformcp_cpu_backend", default="numpy")

_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED = 1, 2, 3, 13


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Select the backend that runs CPU arrays inside a ``with`` block.

    ``"numpy"`` (the default) is the vectorised NumPy path; ``"host"`` runs the CUDA sources of
    kernels/ compiled by the host C++ compiler. CuPy and CUDA DLPack arrays always run on the GPU.

    >>> import deformcp
    >>> with deformcp.backend("host"):        # deformcp.grid_sample(x, grid) here runs the host kernels
    ...     deformcp.current_backend()
    'host'
    >>> deformcp.current_backend()
    'numpy'
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    with scoped(_CPU_BACKEND, name):
        yield name


@contextlib.contextmanager
def scoped(variable: contextvars.ContextVar[_T], value: _T) -> Iterator[_T]:
    """Set a context variable for the duration of a ``with`` block (per thread and per task)."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def current_backend() -> str:
    """The backend that CPU arrays run on here: "numpy" or "host"."""
    return _CPU_BACKEND.get()


class Call(NamedTuple):
    """The arrays of one call, imported: ``arrays`` are numpy.ndarray or cupy.ndarray (None kept)."""

    backend: str                  # "numpy", "host" or "cuda"
    xp: Any                       # numpy or cupy
    arrays: tuple[Optional[Imported], ...]
    export: Callable[[Imported], Array]  # result array → the caller's framework
    device: Any                   # context manager making the arrays' device current


def _describe(x: object) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


#: What an array argument may be, for messages.
_EXPECTED_ARRAY = ("expected an array (numpy.ndarray, cupy.ndarray, an array supporting DLPack, or what numpy.asarray "
                   "makes a numeric array of)")

#: NumPy dtype kinds that an array-like may become (bool, ints, floats, complex): the op's dtype rules then judge
#: them, as they judge arrays.
_NUMERIC_KINDS = "biufc"


def _framework(x: object) -> Optional[str]:
    """The framework of an array that deformcp imports (NumPy, CuPy, or any array supporting DLPack); None for
    anything else."""
    if type(x) is np.ndarray or compat.is_numpy_array(x):  # the first test: the common case's fast path
        return "numpy"
    if compat.is_cupy_array(x):
        return "cupy"
    if compat.is_torch_array(x):
        return "torch"
    if compat.is_jax_array(x):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return type(x).__module__.split(".")[0]
    return None


def _as_array(name: str, x: object) -> Any:
    """x itself if deformcp imports it (:func:`_framework`), else ``numpy.asarray(x)`` (lists, tuples, memoryviews,
    objects with ``__array__``, scalars) if that is numeric. TypeError naming the argument for a traced JAX value
    (the array functions run on concrete arrays: deformcp.jax traces) and for what NumPy cannot make a numeric
    array of (strings, ragged sequences, objects)."""
    if type(x) is np.ndarray:
        return x
    jax = sys.modules.get("jax")  # None where it is not imported (or blocked)
    if jax is not None and isinstance(x, getattr(jax.core, "Tracer", ())):
        raise TypeError(f"{name}: a traced JAX value (inside jax.jit, grad or vmap); call the function of the same "
                        "name in deformcp.jax instead (e.g. deformcp.jax.grid_sample for deformcp.grid_sample)")
    if _framework(x) is not None:
        return x
    try:
        array = np.asarray(x)
    except Exception as error:  # NumPy's ValueError for ragged sequences, or whatever an __array__ raises
        raise TypeError(f"{name}: {_EXPECTED_ARRAY}, got {_describe(x)} (numpy.asarray: {error})") from None
    if array.dtype.kind not in _NUMERIC_KINDS and not _is_bfloat16(array):
        raise TypeError(f"{name}: {_EXPECTED_ARRAY}, got {_describe(x)} {x!r:.50} (numpy.asarray: dtype "
                        f"{array.dtype})")
    return array


def _device(framework: str, x: Any) -> tuple[str, int]:
    if framework == "numpy":
        return ("cpu", 0)
    if framework == "cupy":
        return ("cuda", x.device.id)
    kind, index = x.__dlpack_device__()
    if kind in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        return ("cpu", 0)
    if kind in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        return ("cuda", int(index))
    raise ValueError(f"unsupported DLPack device type {kind}: deformcp runs on the CPU and on CUDA devices")


def _import(name: str, x: Any, framework: str, device: str) -> Imported:
    if framework == "numpy":
        return native_byte_order(x)
    if framework == "cupy":
        return x
    if framework == "torch" and x.requires_grad:
        raise ValueError(f"{name}: the tensor requires grad; pass tensor.detach(), or use the autograd "
                         "wrappers in deformcp.torch")
    if _is_bfloat16(x):
        if device == "cpu":
            return _bfloat16_import(name, x)
        namespace = compat.array_namespace(x)
        x = namespace.astype(x, namespace.float32)
    try:
        if device == "cpu":
            return np.from_dlpack(x)
        import cupy
        return cupy.from_dlpack(x)
    except ImportError:
        raise RuntimeError(f"{name}: a CUDA array needs CuPy (pip install 'deformcp[cuda12]')") from None
    except (BufferError, TypeError, RuntimeError) as error:
        raise TypeError(f"{name}: cannot import {_describe(x)} through DLPack: {error}") from error


def native_byte_order(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """x itself, or a copy in the machine's byte order when its dtype is byte-swapped (``'>f8'`` on a
    little-endian machine): every backend reads arrays in native order, so results come out native too."""
    if x.dtype.isnative:
        return x
    return x.astype(x.dtype.newbyteorder("="))


def _exporter(framework: str, template: Any, to_bfloat16: bool = False) -> Callable[[Imported], Array]:
    """result array → the caller's framework; with to_bfloat16, floating results are rounded to bfloat16."""
    if framework in ("numpy", "cupy"):
        return lambda result: result
    namespace = compat.array_namespace(template)

    def export(result: Imported) -> Array:
        if result.dtype.name == "bfloat16":
            return _bfloat16_export(result, template, namespace)
        exported: Array = namespace.from_dlpack(result)
        if to_bfloat16 and result.dtype.kind == "f":
            rounded: Array = namespace.astype(exported, template.dtype)
            return rounded
        return exported
    return export


# bfloat16 (see the module docstring): the only code that handles it

def _is_bfloat16(x: object) -> bool:
    """Whether x (an array of any framework) holds bfloat16: "torch.bfloat16", JAX's "bfloat16", ..."""
    return "bfloat16" in str(getattr(x, "dtype", ""))


def _bfloat16_dtype(name: str) -> np.dtype[Any]:
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{name}: a bfloat16 array needs ml_dtypes, which gives NumPy its bfloat16 dtype "
                        "(pip install ml_dtypes)") from None
    bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bfloat16


def _bfloat16_on_cuda(present: dict[str, Any]) -> bool:
    """Whether a call on a CUDA device is a bfloat16 call (run in float32: see the module docstring). TypeError
    when some of its floating arrays are bfloat16 and others are not."""
    dtypes = {name: str(x.dtype).rpartition(".")[2] for name, x in present.items() if "float" in str(x.dtype)}
    if "bfloat16" not in dtypes.values():
        return False
    if set(dtypes.values()) != {"bfloat16"}:
        listing = ", ".join(f"{name} is {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"a bfloat16 call needs every floating array in bfloat16: {listing}")
    return True


def _bfloat16_import(name: str, x: Any) -> npt.NDArray[Any]:
    """The bfloat16 DLPack array x on the CPU as a NumPy bfloat16 array: PyTorch's through an int16 view (the
    same memory), the others' through np.asarray (JAX's on the CPU: a view of its buffer)."""
    dtype = _bfloat16_dtype(name)
    if compat.is_torch_array(x):
        import torch
        return np.from_dlpack(x.view(torch.int16)).view(dtype)
    imported: Optional[npt.NDArray[Any]]
    try:
        imported = np.asarray(x)
        gave: object = imported.dtype
    except Exception as error:  # whatever the framework's __array__ raises
        imported, gave = None, error
    if imported is None or imported.dtype != dtype:
        raise TypeError(f"{name}: cannot import the bfloat16 {_describe(x)}: NumPy's DLPack has no bfloat16, "
                        f"and np.asarray gave {gave!r}; cast it to float32")
    return imported


def _bfloat16_export(result: npt.NDArray[Any], template: Any, namespace: Any) -> Array:
    """A NumPy bfloat16 result in the framework of template: PyTorch's through an int16 view (the same memory),
    JAX's through jax.device_put (a view where 64-byte aligned, as JAX's from_dlpack), others' through
    namespace.asarray."""
    if compat.is_torch_array(template):
        import torch
        import torch.utils.dlpack
        return torch.utils.dlpack.from_dlpack(result.view(np.int16)).view(torch.bfloat16)
    if compat.is_jax_array(template):
        import jax
        placed: Array = jax.device_put(result, next(iter(template.devices())))
        return placed
    converted: Array = namespace.asarray(result)
    return converted


def prepare(**named: object) -> Call:
    """Import the named arrays of one call (None values pass through) and choose its backend. Array-likes
    become NumPy arrays (:func:`_as_array`).

    Raises TypeError for non-arrays, traced JAX values and mixed frameworks, ValueError for arrays on different
    devices.
    """
    given = {name: x for name, x in named.items() if x is not None}
    if not given:
        raise TypeError(f"{next(iter(named))}: expected an array, got None")
    present = {name: _as_array(name, x) for name, x in given.items()}
    # _as_array gave x itself where it has a framework, else a NumPy array: never None here
    frameworks = {name: _framework(x) or "numpy" for name, x in present.items()}
    if len(set(frameworks.values())) > 1:
        listing = ", ".join(f"{name} is {_describe(given[name])}" for name in frameworks)
        raise TypeError(f"all arrays of one call must come from one framework: {listing}")
    devices = {name: _device(frameworks[name], x) for name, x in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {kind}:{index}" for name, (kind, index) in devices.items())
        raise ValueError(f"all arrays of one call must be on one device: {listing}")
    first = next(iter(present))
    framework, (device, device_id) = frameworks[first], devices[first]
    to_bfloat16 = device == "cuda" and _bfloat16_on_cuda(present)
    arrays = tuple(_import(name, present[name], framework, device) if name in present else None for name in named)
    if device == "cuda":
        import cupy
        return Call("cuda", cupy, arrays, _exporter(framework, present[first], to_bfloat16),
                    _CudaContext(framework, device_id))
    return Call(current_backend(), np, arrays, _exporter(framework, present[first]), contextlib.nullcontext())


class _CudaContext:
    """The arrays' device, and for PyTorch tensors the producer's current stream, so that deformcp's kernels
    are ordered after the work that made the inputs and before the work that uses the outputs. Re-entrant:
    an op enters it several times."""

    def __init__(self, framework: str, device_id: int) -> None:
        self.framework, self.device_id = framework, device_id
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> _CudaContext:
        import cupy

        stack = contextlib.ExitStack()
        stack.enter_context(cupy.cuda.Device(self.device_id))
        if self.framework == "torch":
            import torch
            stream = torch.cuda.current_stream(self.device_id)
            stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, self.device_id))
        self._stacks.append(stack)
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> Optional[bool]:
        return self._stacks.pop().__exit__(exc_type, exc, traceback)
