"""The one call path of every op: import the arrays (:func:`deformcp._dispatch.prepare`), check them
(``spec.check``), run the NumPy path or the kernels, and hand the result back in the caller's framework.
The public functions are ``return forward(SPEC, locals())`` and ``return backward(SPEC, locals())``."""
from __future__ import annotations

from typing import Optional

from .. import _dispatch, _validate, _workspace
from .._types import Array, Imported
from ._spec import OpSpec

#: The backward's own arguments (not the forward's options).
_BACKWARD_ARGUMENTS = ("grad_output", "needs_input_grad", "deterministic")


def _split(spec: OpSpec, arguments: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    arrays = {name: arguments[name] for name in spec.arrays}
    options = {k: v for k, v in arguments.items() if k not in spec.arrays and k not in _BACKWARD_ARGUMENTS}
    return arrays, options


def _prepare(spec: OpSpec, named: dict[str, object]) -> tuple[_dispatch.Call, tuple[Optional[Imported], ...]]:
    if spec.boxes:
        return _validate.prepare_boxes(spec.boxes, **named)
    call = _dispatch.prepare(**named)
    return call, call.arrays


def forward(spec: OpSpec, arguments: dict[str, object]) -> Array:
    """The public forward ``spec.name`` called with ``arguments`` (its locals())."""
    return run_forward(spec, *_split(spec, arguments))


def backward(spec: OpSpec, arguments: dict[str, object]) -> tuple[Optional[Array], ...]:
    """The public backward of ``spec`` called with ``arguments`` (its locals())."""
    arrays, options = _split(spec, arguments)
    every = (True,) * len(spec.differentiable)
    return run_backward(spec, arguments["grad_output"], arrays, options, arguments.get("needs_input_grad", every),
                        arguments.get("deterministic", False))


def run_forward(spec: OpSpec, arrays: dict[str, object], options: dict[str, object]) -> Array:
    """``spec``'s forward on ``arrays`` (by name; None where absent) with the other arguments ``options``."""
    call, imported = _prepare(spec, arrays)
    config = spec.check(call, *imported, **options)
    with call.device:
        if call.backend == "numpy":
            out = spec.reference(*imported, config)
        else:
            out = spec.kernels(call, *imported, config)
    return call.export(out)


def run_backward(spec: OpSpec, grad_output: object, arrays: dict[str, object], options: dict[str, object],
                 needs_input_grad: object, deterministic: object = False) -> tuple[Optional[Array], ...]:
    """``spec``'s gradients (its ``grads`` named tuple; None where not asked for, or where the array is
    absent). needs_input_grad: one bool per differentiable array (``spec.differentiable``)."""
    call, (imported_grad_output, *imported) = _prepare(spec, {"grad_output": grad_output, **arrays})
    config = spec.check(call, *imported, **options)
    fields = spec.differentiable
    asked = _validate.needs_grad(needs_input_grad, fields)
    named = dict(zip(spec.arrays, imported))
    wanted = tuple(w and named[field] is not None for w, field in zip(asked, fields))
    # the host backend's deterministic kernels are also its faster ones (_workspace.host_atomics)
    deterministic = _validate.flag("deterministic", deterministic) or (call.backend == "host"
                                                                       and not _workspace.host_atomics())
    shape, layout = spec.output(config)
    _validate.grad_output(imported_grad_output, shape, layout, **{spec.arrays[0]: imported[0]})
    if not any(wanted):
        return spec.grads(*(None for _ in fields))
    with call.device:
        if call.backend == "numpy":
            grads = spec.reference_backward(imported_grad_output, *imported, config, wanted)
        else:
            grads = spec.kernels_backward(call, imported_grad_output, *imported, config, wanted, deterministic)
    return spec.grads(*(None if g is None or not w else call.export(g) for g, w in zip(grads, wanted)))


def output_shape(spec: OpSpec, arrays: dict[str, object], options: dict[str, object]) -> tuple[int, ...]:
    """The shape of ``spec``'s forward result, raising its argument errors (nothing runs)."""
    call, imported = _prepare(spec, arrays)
    return spec.output(spec.check(call, *imported, **options))[0]
