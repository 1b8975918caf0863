"""What an op is, once: :class:`OpSpec`. Every consumer reads the table of specs (``deformcp.ops.SPECS``):
the front door (:mod:`deformcp.ops._call`), ``deformcp.testing.check``, ``deformcp.torch``, ``deformcp.jax``,
the benchmarks and the tests."""
from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from .._types import Array

#: An option that is one int or a pair (e.g. output_size, stride): the pair's two values, or the int twice.
IntPair = Union[int, tuple[int, int]]
#: Per-level sizes (H_l, W_l): an (L, 2) integer array of any framework (read on the host) or a sequence of pairs.
LevelShapes = Union[Sequence[Sequence[int]], Array]
#: A flat sequence of ints that may also come as a 1-D integer array of any framework (read on the host).
IntSequence = Union[Sequence[int], Array]


class Case(NamedTuple):
    """One parity configuration of an op: ``make(rng)`` → dict of float64 NumPy arrays (the op's array
    arguments by name, absent optional ones left out) and the op's other arguments, ``options``."""

    label: str
    make: Callable[[np.random.Generator], dict[str, np.ndarray[Any, np.dtype[np.float64]]]]
    options: Mapping[str, object]


class OpSpec(NamedTuple):
    """One op: its arrays, its checks and the two implementations of its forward and backward.

    ``config`` is what ``check`` returns (a named tuple of the checked options and sizes); the NumPy path
    (``reference*``, in deformcp.reference) and the kernel glue (``kernels*``) take it after the arrays.
    ``wanted`` has one bool per field of ``grads``: asked for and present.
    """

    name: str                    # the public function's name
    arrays: tuple[str, ...]      # its array arguments, in signature order
    grads: Callable[..., tuple[Optional[Array], ...]]  # the backward's named tuple class: one field per
    #                                                  differentiable array, in order
    check: Callable[..., Any]    # check(call, *arrays, **options) → config; raises ValueError/TypeError
    output: Callable[[Any], tuple[tuple[int, ...], str]]  # output(config) → (shape, layout) of the forward's result
    reference: Callable[..., Any]  # reference(*arrays, config) → result (NumPy path)
    reference_backward: Callable[..., Sequence[Any]]  # reference_backward(grad_output, *arrays, config, wanted)
    kernels: Callable[..., Any]  # kernels(call, *arrays, config) → result (host and CUDA backends)
    kernels_backward: Callable[..., Sequence[Any]]  # kernels_backward(call, grad_output, *arrays, config, wanted,
    #                                                 deterministic) → gradients
    function: Callable[..., Array]  # the public forward, e.g. deformcp.grid_sample
    backward: Callable[..., tuple[Optional[Array], ...]]  # the public backward, e.g. deformcp.grid_sample_backward
    cases: tuple[Case, ...]      # parity configurations (deformcp.testing.check, the tests)
    boxes: Optional[str] = None  # the array argument that also takes a list of per-image (L, 4) boxes
    batch: tuple[str, ...] = ()  # the arrays whose axis 0 is the batch N, as the result's: a call on stacked
    #                              batches folds into one call over the batch axis (deformcp.jax under jax.vmap)
    batch_size: Optional[str] = None  # the option whose first entry is N (affine_grid's size), if any

    @property
    def differentiable(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = vars(self.grads)["_fields"]  # the named tuple class's (a Callable to mypy)
        return fields

    @property
    def options(self) -> tuple[str, ...]:
        """The public function's other arguments, in signature order."""
        return tuple(p for p in inspect.signature(self.function).parameters if p not in self.arrays)

    @property
    def option_types(self) -> dict[str, object]:
        """The public function's type annotation of each option, in signature order."""
        hints = typing.get_type_hints(self.function)
        return {name: hints[name] for name in self.options}

    @property
    def deterministic(self) -> bool:
        """Whether the backward takes ``deterministic`` (it can scatter-add with atomics)."""
        return "deterministic" in inspect.signature(self.backward).parameters
