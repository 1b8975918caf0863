"""One parity harness over the spec table (deformcp.ops.SPECS): every op, every parity case, every kernel backend
against the NumPy path (the float64 reference), forward and backward, with poisoned outputs and inputs checked
unmodified; non-contiguous inputs; needs_input_grad subsets; deterministic backwards. Per-op files keep what is
specific to their op: golden values, conventions, finite differences, special inputs, bad input."""
import inspect
import itertools

import numpy as np
import pytest

from deformcp import testing
from deformcp.ops import SPECS

from conftest import assert_close, noncontiguous, run_both, to_backend

CASES = [(spec, case) for spec in SPECS.values() for case in spec.cases]
CASE_IDS = [f"{spec.name}-{case.label}" for spec, case in CASES]
DTYPES = testing.dtypes()


def _inputs(case, rng, dtype="float64"):
    return {name: a.astype(dtype) for name, a in case.make(rng).items()}


def _grad_output(spec, case, arrays, rng):
    shape = np.shape(spec.function(**arrays, **case.options))
    return rng.standard_normal(shape).astype(next(iter(arrays.values())).dtype)


def _run_both(backend, fn, arrays: dict, options: dict, *leading, **extra):
    """run_both for a function called with keyword arrays: the arrays travel positionally through run_both."""
    names = list(arrays)

    def call(*values):
        return fn(*values[:len(leading)], **dict(zip(names, values[len(leading):])), **options, **extra)

    return run_both(backend, call, *leading, *arrays.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec, case", CASES, ids=CASE_IDS)
def test_backend_matches_numpy(backend, rng, spec, case, dtype):
    arrays = _inputs(case, rng, dtype)
    out, expected = _run_both(backend, spec.function, arrays, case.options)
    assert_close(out, expected, dtype)
    grad_output = _grad_output(spec, case, arrays, rng)
    for deterministic in (False, True) if spec.deterministic else (None,):
        extra = {} if deterministic is None else {"deterministic": deterministic}
        grads, expected_grads = _run_both(backend, spec.backward, arrays, case.options, grad_output, **extra)
        assert type(grads) is spec.grads and grads._fields == spec.differentiable
        for name, got, want in zip(spec.differentiable, grads, expected_grads):
            assert (got is None) == (want is None) == (name not in arrays), name
            if want is not None:
                assert_close(got, want, dtype)


def _strided(a):
    return noncontiguous(a) if a.ndim else a  # a 0-d array has no stride to break


@pytest.mark.parametrize("spec, case", CASES, ids=CASE_IDS)
def test_noncontiguous_inputs(any_backend, rng, spec, case):
    """Strided views of every array (and of grad_output) give the contiguous arrays' results."""
    arrays = _inputs(case, rng)
    grad_output = _grad_output(spec, case, arrays, rng)
    views = {name: _strided(to_backend(a, any_backend)) for name, a in arrays.items()}
    expected = testing.run(any_backend, spec.function, **{k: to_backend(a, any_backend) for k, a in arrays.items()},
                           **case.options)
    expected_grads = testing.run(any_backend, spec.backward, to_backend(grad_output, any_backend),
                                 **{k: to_backend(a, any_backend) for k, a in arrays.items()}, **case.options)
    with testing.poisoned_outputs():
        out = testing.run(any_backend, spec.function, **views, **case.options)
        grads = testing.run(any_backend, spec.backward, _strided(to_backend(grad_output, any_backend)),
                            **views, **case.options)
    assert_close(out, testing.to_numpy(expected), "float64")
    for got, want in zip(grads, expected_grads):
        if want is not None:
            assert_close(got, testing.to_numpy(want), "float64")


def _needs_subsets(spec):
    if "needs_input_grad" not in inspect.signature(spec.backward).parameters:
        return []
    n = len(spec.differentiable)  # none, each alone, and all but each one
    return [needs for needs in itertools.product((False, True), repeat=n) if sum(needs) <= 1 or sum(needs) == n - 1]


NEEDS = [(spec, case, needs) for spec, case in CASES if case is spec.cases[-1] for needs in _needs_subsets(spec)]


@pytest.mark.parametrize("spec, case, needs", NEEDS,
                         ids=[f"{s.name}-{''.join('1' if n else '0' for n in needs)}" for s, _, needs in NEEDS])
def test_backward_computes_only_what_is_asked(any_backend, rng, spec, case, needs):
    """needs_input_grad: the gradients asked for equal those of the full backward; the others are None."""
    arrays = _inputs(case, rng)
    grad_output = _grad_output(spec, case, arrays, rng)
    full = spec.backward(grad_output, **arrays, **case.options)
    moved = {k: to_backend(a, any_backend) for k, a in arrays.items()}
    with testing.poisoned_outputs():
        grads = testing.run(any_backend, spec.backward, to_backend(grad_output, any_backend), **moved,
                            **case.options, needs_input_grad=needs)
    for name, got, want, asked in zip(spec.differentiable, grads, full, needs):
        if not asked or name not in arrays:
            assert got is None, name
        else:
            assert_close(got, want, "float64")


DETERMINISTIC = [(spec, case) for spec, case in CASES if spec.deterministic]


@pytest.mark.parametrize("spec, case", DETERMINISTIC, ids=[f"{s.name}-{c.label}" for s, c in DETERMINISTIC])
def test_deterministic_backward_is_bitwise_reproducible(backend, rng, spec, case):
    """deterministic=True: the NumPy path's gradients, and bitwise the same from run to run."""
    arrays = _inputs(case, rng, "float32")
    grad_output = _grad_output(spec, case, arrays, rng)
    grads, expected = _run_both(backend, spec.backward, arrays, case.options, grad_output, deterministic=True)
    moved = {k: to_backend(a, backend) for k, a in arrays.items()}
    again = testing.run(backend, spec.backward, to_backend(grad_output, backend), **moved, **case.options,
                        deterministic=True)
    for got, want, repeat in zip(grads, expected, again):
        if want is not None:
            assert_close(got, want, "float32")
            np.testing.assert_array_equal(testing.to_numpy(got), testing.to_numpy(repeat))


def test_every_op_has_parity_cases_and_a_unique_label():
    for spec in SPECS.values():
        assert spec.cases, spec.name
        labels = [case.label for case in spec.cases]
        assert len(set(labels)) == len(labels), spec.name
        for case in spec.cases:
            assert set(case.make(np.random.default_rng(0))) <= set(spec.arrays)
            assert set(case.options) <= set(spec.options)
