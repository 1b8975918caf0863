"""The array types of the public API: :data:`Array` (what every function returns) and :data:`ArrayLike` (what its
array arguments take).

deformcp hands results back in the caller's framework — a numpy.ndarray for NumPy inputs, a cupy.ndarray,
a torch.Tensor, a jax.Array, or any other DLPack array — so no one concrete class can name a result. Python's
type system has no way to say "the framework of the inputs" (that would take a type variable over the array
class itself, and a type variable bound to the inputs' class would also claim their shape, which numpy's stubs
now track and which the ops change). So :class:`Array` is a structural Protocol: the members that every
supported framework's array has and that a caller of deformcp reads — ``shape`` (a tuple of ints: numpy's tuple,
torch's Size, JAX's tuple), ``ndim``, ``dtype`` (the framework's own dtype object, hence ``object``) and
``__dlpack__``. numpy.ndarray, torch.Tensor and jax.Array satisfy it as their stubs stand, so a user script
passes them and reads a result's shape without a cast; ``numpy.asarray(result)`` or the framework's own
``from_dlpack`` gives the concrete array back (NumPy's stubs take any object there). CuPy ships no type
information, so to a type checker its arrays are ``Any`` and pass everywhere.

:data:`ArrayLike` adds what :func:`numpy.asarray` makes a numeric array of, as deformcp takes it (README, API):
objects with ``__array__``, (nested) lists and tuples of numbers or arrays, memoryviews and Python or NumPy
scalars. Strings, which deformcp refuses, are not array-likes here either: :class:`NestedSequence` asks for a
``__contains__`` that takes any object, which lists and tuples have and ``str`` has not.

deformcp.torch's functions take and return ``torch.Tensor`` and deformcp.jax's ``jax.Array``: their framework
is known. Internal NumPy code is typed with ``numpy.typing.NDArray``.
"""
from __future__ import annotations

from typing import Any, Protocol, TypeAlias, Union

import numpy as np


class Array(Protocol):
    """An array of any supported framework: numpy.ndarray, cupy.ndarray, torch.Tensor, jax.Array, or any array
    with ``__dlpack__``, as deformcp returns it (in the inputs' framework)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> object: ...

    def __dlpack__(self) -> object: ...


class SupportsArray(Protocol):
    """An object that NumPy converts through ``__array__``."""

    def __array__(self) -> np.ndarray[tuple[int, ...], np.dtype[np.generic]]: ...


#: A Python or NumPy number (a 0-d array-like).
Scalar: TypeAlias = Union[bool, int, float, complex, np.number, np.bool_]


class NestedSequence(Protocol):
    """A list or tuple (nested to any depth) of numbers or arrays; not a str (whose ``__contains__`` takes only
    strings)."""

    def __len__(self) -> int: ...

    def __contains__(self, value: object, /) -> bool: ...

    def __getitem__(self, index: int, /) -> Union[Scalar, NestedSequence, Array, SupportsArray]: ...


#: What an array argument of deformcp's functions takes: an :class:`Array`, or what numpy.asarray makes a numeric
#: array of (objects with ``__array__``, nested lists and tuples, memoryviews, scalars).
ArrayLike: TypeAlias = Union[Array, SupportsArray, NestedSequence, memoryview, Scalar]

#: An array as deformcp's backends hold it inside a call: a numpy.ndarray (NumPy path, host kernels) or a
#: cupy.ndarray (CUDA kernels). CuPy ships no type information, so to mypy any union with its arrays is Any:
#: this alias names that one place (the kernels' glue code), where NumPy code uses numpy.typing.NDArray.
Imported: TypeAlias = Any

__all__ = ["Array", "ArrayLike", "Imported", "NestedSequence", "Scalar", "SupportsArray"]
