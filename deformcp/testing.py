"""Parity checks that users run on their own machine: every op, forward and backward, through every
available backend on fresh random inputs, against the float64 NumPy reference.

>>> from deformcp import testing
>>> results = testing.check(ops=["roi_align"], backends=["numpy"], seed=0)   # check(): every op and backend
>>> print(testing.format_results(results))    # what ``python -m deformcp check`` prints
op         backend  dtype     forward err  backward err  tolerance
roi_align  numpy    float32   ...          ...           1e-05      ok
roi_align  numpy    float64   ...          ...           1e-12      ok
...
>>> all(r.ok for r in results)
True

The ops and their parity configurations are those of the spec table, ``deformcp.ops.SPECS``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
import numpy.typing as npt

from . import _dispatch, _kernels
from ._types import Imported
from .ops import SPECS, OpSpec

_T = TypeVar("_T")

#: Largest accepted ‖result − reference‖ / ‖reference‖ per dtype (the reference is float64 NumPy).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


class CheckResult(NamedTuple):
    op: str
    backend: str
    dtype: str
    forward_error: float   # worst relative error over the option grid
    backward_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.forward_error <= self.tolerance and self.backward_error <= self.tolerance


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel runs, so an element it fails to write shows."""
    with _dispatch.scoped(_kernels.POISON_OUTPUTS, True):
        yield


def gpu_available() -> str | None:
    """None when CuPy sees a CUDA device, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no runtime library, ...
        return f"no usable CUDA device: {type(e).__name__}: {e}"
    return None if count > 0 else "no CUDA device"


#: Backends besides the NumPy reference, in the order check runs them.
BACKENDS = ("host", "cuda")
#: Dtypes check runs where nothing rules them out (see :func:`dtype_problem`).
DTYPES = ("float32", "float64", "float16", "bfloat16")


def backend_problem(backend: str) -> str | None:
    """None when ``backend`` ("host" or "cuda") can run here, else why not."""
    from . import _host

    problems = {"host": _host.available, "cuda": gpu_available}
    if backend not in problems:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return problems[backend]()


def available_backends() -> list[str]:
    """Backends besides the NumPy reference that can run here: "host" and/or "cuda"."""
    return [b for b in BACKENDS if backend_problem(b) is None]


def dtype_problem(dtype: str, backend: str | None = None) -> str | None:
    """None when ``dtype`` is checked on ``backend``, else why not: bfloat16 needs ml_dtypes (NumPy's
    bfloat16), and "cuda" has none (CuPy has no bfloat16 array type; the kernels are compiled for it all the
    same)."""
    if dtype != "bfloat16":
        return None
    if backend == "cuda":
        return "CuPy has no bfloat16 arrays"
    if importlib.util.find_spec("ml_dtypes") is None:
        return "ml_dtypes is not installed"
    import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy)
    return None


def dtypes(backend: str | None = None) -> tuple[str, ...]:
    """Dtypes checked on ``backend``: those of :data:`DTYPES` that :func:`dtype_problem` allows."""
    return tuple(d for d in DTYPES if dtype_problem(d, backend) is None)


def skipped(backends: Sequence[str]) -> list[str]:
    """What :func:`check` over ``backends`` leaves out, one line each with why: the backends of
    :data:`BACKENDS` that are not in ``backends`` and cannot run here, and the dtypes ruled out on those run."""
    lines = [f"{b}: skipped ({backend_problem(b)})" for b in BACKENDS if b not in backends and backend_problem(b)]
    return lines + [f"{d} on {b}: skipped ({dtype_problem(d, b)})"
                    for b in backends for d in DTYPES if dtype_problem(d, b)]


def relative_error(actual: object, reference: object) -> float:
    """‖actual − reference‖ / ‖reference‖ in float64 (absolute where the reference is 0); inf on NaN."""
    got = np.asarray(to_numpy(actual), dtype=np.float64)
    want = np.asarray(reference, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    difference = np.linalg.norm((got - want).ravel())
    if not np.isfinite(difference):
        return float("inf")
    scale = np.linalg.norm(want.ravel())
    return float(difference / scale) if scale > 0 else float(difference)


def to_numpy(a: Any) -> npt.NDArray[Any]:
    host: npt.NDArray[Any] = a.get() if hasattr(a, "get") else np.asarray(a)  # CuPy's .get(): a NumPy array
    return host


def to_backend(a: npt.NDArray[np.float64], backend: str, dtype: str) -> Imported:
    """A float64 NumPy array cast to dtype and moved to where backend runs."""
    a = a.astype(dtype)
    if backend == "cuda":
        import cupy
        return cupy.asarray(a)
    return a


def run(backend: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call fn with the CPU backend set to backend ("numpy" or "host"; "cuda" follows the arrays)."""
    with _dispatch.backend("numpy" if backend == "cuda" else backend):
        return fn(*args, **kwargs)


def _check_one(spec: OpSpec, backend: str, dtype: str, rng: np.random.Generator) -> CheckResult:
    forward_error = backward_error = 0.0
    for case in spec.cases:
        # the reference sees the inputs as rounded to dtype, so only the arithmetic differs
        arrays = {name: a.astype(dtype).astype(np.float64) for name, a in case.make(rng).items()}
        reference = spec.function(**arrays, **case.options)
        grad_output = rng.standard_normal(reference.shape).astype(dtype).astype(np.float64)
        reference_grads = spec.backward(grad_output, **arrays, **case.options)
        moved = {name: to_backend(a, backend, dtype) for name, a in arrays.items()}
        with poisoned_outputs():
            out = run(backend, spec.function, **moved, **case.options)
            grads = run(backend, spec.backward, to_backend(grad_output, backend, dtype), **moved, **case.options)
        forward_error = max(forward_error, relative_error(out, reference))
        for got, want in zip(grads, reference_grads):
            if want is not None:
                backward_error = max(backward_error, relative_error(got, want))
    return CheckResult(spec.name, backend, dtype, forward_error, backward_error, TOLERANCE[dtype])


def check(ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None, seed: Optional[int] = None,
          progress: Optional[Callable[[int, int, str], object]] = None) -> list[CheckResult]:
    """Run the parity cases of the ops (all, or those named in ops) on backends (default: all available).

    ``progress(n, total, label)``, where given, is called before each op × backend ("grid_sample/host"),
    n counting from 1."""
    rng = np.random.default_rng(seed)
    unknown = set(ops or ()) - set(SPECS)
    if unknown:
        raise ValueError(f"ops: unknown {sorted(unknown)}; known: {sorted(SPECS)}")
    selected = [SPECS[name] for name in (ops or SPECS)]
    pairs = list(itertools.product(selected, backends or available_backends()))
    results = []
    for n, (spec, backend) in enumerate(pairs, 1):
        if progress is not None:
            progress(n, len(pairs), f"{spec.name}/{backend}")
        results += [_check_one(spec, backend, dtype, rng) for dtype in dtypes(backend)]
    return results


def format_results(results: Sequence[CheckResult]) -> str:
    rows = [("op", "backend", "dtype", "forward err", "backward err", "tolerance", "")]
    rows += [(r.op, r.backend, r.dtype, f"{r.forward_error:.2e}", f"{r.backward_error:.2e}",
              f"{r.tolerance:.0e}", "ok" if r.ok else "MISMATCH") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
