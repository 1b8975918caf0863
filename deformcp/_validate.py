"""Argument checks shared by every op; failures read "<argument>: expected ..., got ...".

Errors are TypeError for a wrong kind of thing (dtype, type) and ValueError for a wrong value (rank,
shape, size, option). Flags are bools (Python or NumPy), never ints or strings; sizes and counts are ints
(Python or NumPy integers), never bools or floats; nothing is converted silently.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Sequence, Union, cast

import array_api_compat as compat
import numpy as np

from . import _dispatch
from ._types import Imported

#: dtypes every backend accepts; float16 and bfloat16 are computed in float32 on the NumPy path.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Largest size, count or option accepted: what a C int holds.
INT_MAX = 2**31 - 1


#: Python ints, or tuples of them nested to any depth (an integer array read on the host).
NestedInts = Union[int, tuple["NestedInts", ...]]

#: dtype_name's answers by dtype: NumPy builds a dtype's name anew on every access (about 1.5 µs).
_DTYPE_NAMES: dict[object, str] = {}


def dtype_name(dtype: object) -> str:
    """"float32", ... for a NumPy, CuPy or JAX dtype, or a torch dtype (torch.float32)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # not seen yet, or not hashable
        pass
    name = getattr(dtype, "name", None)
    name = name if isinstance(name, str) else str(dtype).rpartition(".")[2]
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


def floating(name: str, x: Imported, ndim: int, layout: str) -> Imported:
    """Check that x is a floating-point array of rank ndim; layout names the axes for messages."""
    if x is None:
        raise TypeError(f"{name}: expected an array {layout}, got None")
    if dtype_name(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point array ({', '.join(FLOAT_DTYPES)}), "
                        f"got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {layout}, got shape {tuple(x.shape)}")
    return x


def same_dtype(**arrays: Imported) -> None:
    present = {name: x for name, x in arrays.items() if x is not None}
    dtypes = {dtype_name(x.dtype) for x in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} is {x.dtype}" for name, x in present.items())
        raise TypeError(f"expected arrays of one dtype: {listing}")


def shape(name: str, x: Imported, expected: tuple[Optional[int], ...], layout: str) -> None:
    """Check x.shape == expected (None entries match any size)."""
    actual = tuple(x.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = ("(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "")
                 + ")")
        raise ValueError(f"{name}: expected shape {shown} for {layout}, got {actual}")


def grad_output(grad_output: Imported, expected_shape: tuple[int, ...], layout: str, **like: Imported) -> None:
    """Check a backward's grad_output: a floating-point array of expected_shape (layout names its axes) and of
    the dtype of the one array in ``like`` (named as given, e.g. ``input=input``)."""
    floating("grad_output", grad_output, len(expected_shape), layout)
    shape("grad_output", grad_output, expected_shape, layout)
    same_dtype(grad_output=grad_output, **like)


def choice(name: str, value: object, options: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")


def flag(name: str, value: object) -> bool:
    """A bool (Python or NumPy); an int, a str or None is a TypeError, as in torch (no truthiness)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _is_bool(value: object) -> bool:
    """A bool, NumPy bool or 0-d bool array/tensor: operator.index would take some of these for 0 and 1."""
    return isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")).endswith("bool")


def _index(value: Any) -> Optional[int]:
    """value as an int (a Python or NumPy integer, anything with __index__), never a bool; None if it is not one.
    A traced size (torch.SymInt, in a compiled graph) stays as it is, symbolic."""
    if _is_bool(value):
        return None
    if type(value).__name__ == "SymInt":
        return cast(int, value)  # a torch.SymInt stands for an int
    try:
        return operator.index(value)
    except TypeError:
        return None


def _items(value: Any) -> tuple[Optional[tuple[int, ...]], Optional[int], object]:
    """The items of a tuple or list as ints; for the first that is not an int, (None, index, item)."""
    items: list[int] = []
    for i, v in enumerate(value):
        number = _index(v)
        if number is None:
            return None, i, v
        items.append(number)
    return tuple(items), None, None


def sizes(name: str, value: object, count: int, maximum: int = INT_MAX) -> tuple[int, ...]:
    """A sequence of count integers in [0, maximum] (kernels take sizes as C ints); bools are not sizes."""
    try:
        items, bad, item = _items(value)
    except TypeError:  # not iterable
        raise TypeError(f"{name}: expected a sequence of {count} integers, got {type(value).__name__} "
                        f"{value!r}") from None
    if items is None:
        raise TypeError(f"{name}: expected a sequence of {count} integers, got {value!r} "
                        f"({type(item).__name__} {item!r} at index {bad})")
    if len(items) != count:
        raise ValueError(f"{name}: expected {count} integers, got {len(items)}: {value!r}")
    if any(v < 0 for v in items):
        raise ValueError(f"{name}: expected non-negative sizes, got {items}")
    if any(v > maximum for v in items):
        raise ValueError(f"{name}: expected sizes of at most {maximum}, got {items}")
    return items


def pair(name: str, value: object, minimum: int = 1, maximum: int = INT_MAX) -> tuple[int, int]:
    """An int, or a tuple or list of two, each in [minimum, maximum], as a pair; bools are not ints."""
    if isinstance(value, (tuple, list)):
        items, bad, item = _items(value)
        if items is None:
            raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r} "
                            f"({type(item).__name__} {item!r} at index {bad})")
        if len(items) != 2:
            raise ValueError(f"{name}: expected an int or a pair of ints, got {len(items)} ints: {value!r}")
    else:
        number = _index(value)
        if number is None:
            raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r} (a {type(value).__name__})")
        items = (number, number)
    if min(items) < minimum or max(items) > maximum:
        kind = {0: "non-negative int", 1: "positive int"}.get(minimum)
        expected = (f"a {kind} or a pair of {kind}s" if kind else f"an int or a pair of ints ≥ {minimum}")
        raise ValueError(f"{name}: expected {expected}" + (f", each at most {maximum}" if max(items) > maximum else "")
                         + f", got {value!r}")
    return items


def needs_grad(value: Any, fields: tuple[str, ...]) -> tuple[bool, ...]:
    """A needs_input_grad argument: one bool per differentiable input, in ``fields`` order."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"needs_input_grad: expected {len(fields)} bools for {fields}, got {value!r}") from None
    if len(items) != len(fields):
        raise ValueError(f"needs_input_grad: expected {len(fields)} bools for {fields}, got {value!r}")
    if not all(isinstance(v, (bool, np.bool_)) for v in items):
        raise TypeError(f"needs_input_grad: expected {len(fields)} bools for {fields}, got {value!r}")
    return tuple(bool(v) for v in items)


def real(name: str, value: object, positive: bool = False) -> float:
    """A finite real number (positive if asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name}: expected a finite {'positive ' if positive else ''}number, got {value!r:.50}")
    return number


def integer(name: str, value: object, maximum: int = INT_MAX, minimum: Optional[int] = None) -> int:
    """An int in [minimum, maximum]; minimum None: of magnitude at most ``maximum`` (kernels take it as a C int).
    Bools are not ints."""
    number = _index(value)
    if number is None:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is None:
        if abs(number) > maximum:
            raise ValueError(f"{name}: expected an int of magnitude at most {maximum}, got {number}")
    elif number < minimum:
        expected = "a positive int" if minimum == 1 else f"an int ≥ {minimum}"
        raise ValueError(f"{name}: expected {expected}, got {number}")
    elif number > maximum:
        raise ValueError(f"{name}: expected an int of at most {maximum}, got {number}")
    return number


def host_integers(name: str, value: Any, call: Optional[_dispatch.Call]) -> Any:
    """Integers given as an integer array of any framework and device, or as a (nested) sequence of ints, as
    (nested) tuples of Python ints, read on the host: a GPU array costs one device→host copy, a sequence none.
    In a traced call (``call`` None) a sequence's items may be symbolic sizes; bools and floats are refused.
    Typed Any: the nesting (a flat tuple, or rows of pairs) is what the caller asked for and checks."""
    if isinstance(value, (list, tuple)):
        items: list[NestedInts] = []
        for i, item in enumerate(value):
            if isinstance(item, (list, tuple)) or hasattr(item, "__dlpack__"):
                items.append(host_integers(f"{name}[{i}]", item, call))
                continue
            number = _index(item)
            if number is None:
                raise TypeError(f"{name}: expected integers, got {type(item).__name__} {item!r} at index {i}")
            items.append(number)
        return tuple(items)
    framework = _dispatch._framework(value)
    if call is None or framework is None:
        raise TypeError(f"{name}: expected an integer array or a sequence of ints, got {type(value).__name__}")
    if compat.is_cupy_array(value):
        value = value.get()
    elif not compat.is_numpy_array(value):
        if _dispatch._device(framework, value)[0] == "cuda":
            import cupy
            value = cupy.from_dlpack(value).get()
        else:
            value = np.from_dlpack(value)
    if value.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {value.dtype}")
    return _python_ints(value.tolist())


def _python_ints(items: object) -> NestedInts:
    return tuple(_python_ints(i) for i in items) if isinstance(items, list) else cast(int, items)  # tolist's ints


def output_fits(name: str, shape: tuple[int, ...], dtype: Any) -> None:
    """Check that an output of this shape and dtype can exist (bytes within NumPy's limit); name is the
    argument that sets its size."""
    elements = math.prod(max(n, 1) for n in shape)  # NumPy refuses such a shape even with a zero in it
    if elements * np.dtype(dtype).itemsize > np.iinfo(np.intp).max:
        raise ValueError(f"{name}: expected an output that fits in memory, got one of shape {tuple(shape)} "
                         f"({elements} elements)")


#: Axes of a RoI op's RoIs, and of one image's boxes in a per-image list.
ROIS_LAYOUT = "(K, 5) [batch_index, x1, y1, x2, y2]"
PER_IMAGE_LAYOUT = "(L, 4) [x1, y1, x2, y2]"


def boxes_to_rois(name: str, boxes: Imported, input: Imported) -> Imported:
    """boxes as RoIs (K, 5) [batch_index, x1, y1, x2, y2]. An array is returned as it is; a list or tuple of
    per-image arrays (L, 4) [x1, y1, x2, y2] of input's dtype, at most one per image of input (N, C, H, W), is
    checked (named ``name[i]``) and concatenated in the arrays' own namespace (NumPy, CuPy, jax.numpy), image
    i's boxes with batch index i; an empty list gives no RoIs."""
    if not isinstance(boxes, (list, tuple)):
        return boxes
    floating("input", input, 4, "(N, C, H, W)")
    named = {f"{name}[{i}]": b for i, b in enumerate(boxes)}
    for label, b in named.items():
        floating(label, b, 2, PER_IMAGE_LAYOUT)
        shape(label, b, (None, 4), PER_IMAGE_LAYOUT)
    same_dtype(input=input, **named)
    if len(boxes) > input.shape[0]:
        raise ValueError(f"{name}: expected at most N = {input.shape[0]} per-image arrays (input's batch), "
                         f"got {len(boxes)}")
    xp, device, dtype = compat.array_namespace(input, *boxes), compat.device(input), input.dtype
    return xp.concat([xp.zeros((0, 5), dtype=dtype, device=device)] + [
        xp.concat([xp.full((b.shape[0], 1), i, dtype=dtype, device=device), b], axis=1) for i, b in enumerate(boxes)])


def prepare_boxes(name: str, **arrays: object) -> tuple[_dispatch.Call, tuple[Optional[Imported], ...]]:
    """Import the arrays of a RoI op's call (:func:`_dispatch.prepare`, in the order given), ``arrays[name]``
    being its boxes (:func:`boxes_to_rois`; a list's arrays are imported one by one, then concatenated);
    ``arrays`` must hold ``input``. Returns (call, the imported arrays in order, the RoIs (K, 5) at name's
    place)."""
    boxes = arrays[name]
    if not isinstance(boxes, (list, tuple)):
        call = _dispatch.prepare(**arrays)
        return call, call.arrays
    named: dict[str, object] = {}
    for key, value in arrays.items():
        named.update({f"{name}[{i}]": b for i, b in enumerate(boxes)} if key == name else {key: value})
    call = _dispatch.prepare(**named)
    imported = dict(zip(named, call.arrays))
    with call.device:
        rois = boxes_to_rois(name, [imported[f"{name}[{i}]"] for i in range(len(boxes))], imported["input"])
    return call, tuple(rois if key == name else imported[key] for key in arrays)


def rois(name: str, call: Optional[_dispatch.Call], rois: Imported, input: Imported) -> None:
    """RoIs (K, 5) over input (N, C, H, W): a non-empty image where there are RoIs, and batch indices
    (column 0) that are integers in [0, N) — checked on the device, one synchronisation; with call None (arrays
    that are shapes only, as in a traced graph), the shapes alone."""
    N, _, H, W = input.shape
    K = rois.shape[0]
    if K == 0:
        return
    if H == 0 or W == 0:
        raise ValueError(f"input: expected non-empty spatial size H, W in (N, C, H, W), got {tuple(input.shape)}")
    if N == 0:  # no batch index can be valid: said from the shapes alone (deformcp.jax checks at trace time)
        raise ValueError(f"{name}: expected no RoIs for an empty batch (input N = 0), got {K}")
    if call is None:
        return
    xp = call.xp
    with call.device:
        index = rois[:, 0]
        bad = (index != xp.floor(index)) | ~(index >= 0) | ~(index < N)
        if bool(bad.any()):
            row = int(xp.argmax(bad))
            raise ValueError(f"{name}: expected batch indices (column 0) that are integers in [0, {N}), "
                             f"got {float(index[row])!r} in row {row}")
