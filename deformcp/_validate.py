"""Argument checks shared by every op; failures read "<argument>: expected ..., got ...".

Errors are TypeError for a wrong kind of thing (dtype, type) and ValueError for a wrong value (rank,
shape, size, option).
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

#: dtypes every backend accepts; float16 and bfloat16 are computed in float32 on the NumPy path.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def floating(name: str, x, ndim: int, layout: str):
    """Check that x is a floating-point array of rank ndim; layout names the axes for messages."""
    if x is None:
        raise TypeError(f"{name}: expected an array {layout}, got None")
    if np.dtype(x.dtype).name not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point array ({', '.join(FLOAT_DTYPES)}), "
                        f"got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {layout}, got shape {tuple(x.shape)}")
    return x


def same_dtype(**arrays) -> None:
    present = {name: x for name, x in arrays.items() if x is not None}
    dtypes = {np.dtype(x.dtype) for x in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} is {x.dtype}" for name, x in present.items())
        raise TypeError(f"expected arrays of one dtype: {listing}")


def shape(name: str, x, expected: tuple, layout: str) -> None:
    """Check x.shape == expected (None entries match any size)."""
    actual = tuple(x.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {shown} for {layout}, got {actual}")


def choice(name: str, value, options) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def sizes(name: str, value, count: int) -> tuple[int, ...]:
    """A sequence of count non-negative integers."""
    try:
        items = tuple(operator.index(v) for v in value)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of {count} integers, got {value!r}") from None
    if len(items) != count:
        raise ValueError(f"{name}: expected {count} integers, got {len(items)}: {value!r}")
    if any(v < 0 for v in items):
        raise ValueError(f"{name}: expected non-negative sizes, got {items}")
    return items


def needs_grad(value, fields: tuple[str, ...]) -> tuple[bool, ...]:
    """A needs_input_grad argument: one bool per differentiable input, in ``fields`` order."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"needs_input_grad: expected {len(fields)} bools for {fields}, got {value!r}") from None
    if len(items) != len(fields) or not all(isinstance(v, (bool, np.bool_)) for v in items):
        raise ValueError(f"needs_input_grad: expected {len(fields)} bools for {fields}, got {value!r}")
    return tuple(bool(v) for v in items)


def real(name: str, value, positive: bool = False) -> float:
    """A finite real number (positive if asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not np.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name}: expected a finite {'positive ' if positive else ''}number, got {value!r:.50}")
    return number


def integer(name: str, value, maximum: int = 2**31 - 1) -> int:
    """An int of at most ``maximum`` (in magnitude: kernels take it as a C int)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}") from None
    if abs(value) > maximum:
        raise ValueError(f"{name}: expected an int of magnitude at most {maximum}, got {value}")
    return value


def rois(name: str, call, rois, input) -> None:
    """RoIs (K, 5) over input (N, C, H, W): a non-empty image where there are RoIs, and batch indices
    (column 0) that are integers in [0, N) — checked on the device, one synchronisation."""
    N, _, H, W = input.shape
    if not len(rois):
        return
    if H == 0 or W == 0:
        raise ValueError(f"input: expected non-empty spatial size H, W in (N, C, H, W), got {tuple(input.shape)}")
    xp = call.xp
    with call.device:
        index = rois[:, 0]
        bad = (index != xp.floor(index)) | ~(index >= 0) | ~(index < N)
        if bool(bad.any()):
            row = int(xp.argmax(bad))
            raise ValueError(f"{name}: expected batch indices (column 0) that are integers in [0, {N}), "
                             f"got {float(index[row])!r} in row {row}")
