"""Arrays in non-native byte order ('>f8' on a little-endian machine): every op on every backend computes what
it computes for the same values in native order, and returns native-order arrays.

Before the byte order was normalised on entry, the host backend read a '>f8' array as native doubles
(heap-buffer-overflow under AddressSanitizer, garbage or an abort without) and the NumPy path computed a
'>f8' call in float32 (compute_dtype did not recognise the dtype as float64).
"""
import numpy as np
import pytest

import deformcp
from deformcp import _kernels, testing
from deformcp.ops import SPECS

from conftest import run_both

SWAPPED = [np.dtype(">f8"), np.dtype(">f4")] if np.little_endian else [np.dtype("<f8"), np.dtype("<f4")]


def _swapped(arrays: dict, dtype: np.dtype) -> dict:
    return {name: a.astype(dtype) for name, a in arrays.items()}


def _assert_native_equal(result, expected, exact=True):
    """Same dtype (native order) and values: bitwise, or to a few units in the last place where host atomics
    may add in another order."""
    for got, want in zip(result if isinstance(result, tuple) else (result,),
                         expected if isinstance(expected, tuple) else (expected,)):
        if want is None:
            assert got is None
            continue
        assert got.dtype.isnative and got.dtype == want.dtype
        if exact:
            np.testing.assert_array_equal(testing.to_numpy(got), want)
        else:
            np.testing.assert_allclose(testing.to_numpy(got), want, rtol=8 * np.finfo(want.dtype).eps,
                                       atol=8 * np.finfo(want.dtype).eps * max(1.0, float(np.abs(want).max(initial=0))))


@pytest.mark.parametrize("dtype", SWAPPED, ids=str)
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("backend", ["numpy", "host"])
def test_swapped_byte_order_gives_the_native_result(name, backend, dtype, rng):
    if backend == "host":
        from deformcp import _host
        if _host.compiler() is None:
            pytest.skip("host backend: no C++ compiler found")
    spec = SPECS[name]
    native_dtype = dtype.newbyteorder("=")
    for case in spec.cases:
        options = case.options
        native = {k: a.astype(native_dtype) for k, a in case.make(rng).items()}
        swapped = _swapped(native, dtype)
        expected = testing.run(backend, spec.function, **native, **options)
        grad_output = rng.standard_normal(expected.shape).astype(native_dtype)
        expected_grads = testing.run(backend, spec.backward, grad_output, **native, **options)
        with testing.poisoned_outputs():
            out = testing.run(backend, spec.function, **swapped, **options)
            grads = testing.run(backend, spec.backward, grad_output.astype(dtype), **swapped, **options)
        _assert_native_equal(out, expected)
        _assert_native_equal(tuple(grads), tuple(expected_grads), exact=backend == "numpy")
        for k, a in swapped.items():  # inputs untouched, still swapped
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, native[k])


def test_swapped_float64_computes_in_float64(rng):
    """The NumPy path picks float64 arithmetic for '>f8' as for '<f8' (a float32 result differs by ~1e-8)."""
    x = rng.standard_normal((1, 2, 9, 11))
    grid = rng.uniform(-1, 1, (1, 5, 7, 2))
    native = deformcp.grid_sample(x, grid)
    swapped = deformcp.grid_sample(x.astype(SWAPPED[0]), grid.astype(SWAPPED[0]))
    np.testing.assert_array_equal(swapped, native)
    assert _kernels.compute_dtype(swapped.dtype) == np.float64


@pytest.mark.parametrize("backend", ["host"])
def test_swapped_per_image_boxes(backend, rng):
    """Per-image box lists are imported one array at a time: each is normalised too."""
    x = rng.standard_normal((2, 3, 10, 12))
    boxes = [np.array([[1.0, 2.0, 7.5, 8.0]]), np.array([[0.5, 0.0, 11.0, 9.0], [3.0, 3.0, 4.0, 6.0]])]
    swapped = [b.astype(SWAPPED[0]) for b in boxes]
    actual, expected = run_both(backend, deformcp.roi_align, x.astype(SWAPPED[0]), swapped, 3, 1.0, 2, True)
    reference = deformcp.roi_align(x, boxes, 3, 1.0, 2, True)
    np.testing.assert_array_equal(expected, reference)
    np.testing.assert_allclose(testing.to_numpy(actual), reference, rtol=1e-12, atol=1e-12)
