"""Shared fixtures: the backends under test, a fresh-but-reproducible random generator, comparisons."""
import os

import numpy as np
import pytest

from deformcp import _dispatch, _host, testing

#: The host backend runs its atomic backward kernels where a test asks for deterministic=False, as the CUDA backend
#: does (by default it runs the deterministic ones, faster on the CPU), so that every kernel runs in the tests.
os.environ.setdefault("DEFORMCP_HOST_ATOMICS", "1")

#: One seed per test session, fresh each run; set DEFORMCP_TEST_SEED to replay a run.
SEED = int(os.environ.get("DEFORMCP_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)


def pytest_report_header(config):
    return [f"deformcp: CUDA backend: {testing.gpu_available() or 'available'}"]


def pytest_terminal_summary(terminalreporter):
    """The seed, last (``pytest -q`` prints no header): a failure of this run replays with it."""
    terminalreporter.write_line(f"deformcp: random seed {SEED} (replay with DEFORMCP_TEST_SEED={SEED})")


@pytest.fixture
def rng(request):
    """A generator seeded from the session seed and the test's id: fresh per run, replayable."""
    return np.random.default_rng([SEED, *request.node.nodeid.encode()])


@pytest.fixture
def imported(monkeypatch):
    """Every array each call imported, as the NumPy path or the kernels read it (recorded around prepare)."""
    seen = []
    real_prepare = _dispatch.prepare

    def recording_prepare(**named):
        call = real_prepare(**named)
        seen.extend(call.arrays)
        return call

    monkeypatch.setattr(_dispatch, "prepare", recording_prepare)
    return seen


def _require(backend):
    if backend == "host" and _host.compiler() is None:
        pytest.skip("host backend: no C++ compiler found")
    if backend == "cuda":
        reason = testing.gpu_available()
        if reason:
            pytest.skip(f"CUDA backend: {reason}")


@pytest.fixture(params=["host", "cuda"])
def backend(request):
    """A kernel backend: "host" (kernels/*.cu on the CPU) or "cuda" (skipped without a GPU)."""
    _require(request.param)
    return request.param


@pytest.fixture(params=["numpy", "host", "cuda"])
def any_backend(request):
    """Every backend: the NumPy path, the host backend and the CUDA backend (skipped where unavailable)."""
    _require(request.param)
    return request.param


def to_backend(a, backend):
    """Move a NumPy array where backend runs (keeping dtype, shape and strides' contiguity kind)."""
    if backend == "cuda" and a is not None:
        if a.dtype.name not in testing.dtypes("cuda"):
            pytest.skip(f"CUDA backend: CuPy has no {a.dtype.name} arrays")
        import cupy
        return cupy.asarray(a)
    return a


def assert_close(actual, expected, dtype):
    """Relative error of the finite values within deformcp.testing.TOLERANCE[dtype]; NaN and ±inf in
    identical positions."""
    actual = np.asarray(testing.to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg="non-finite positions differ")
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg="non-finite values differ")
    error = testing.relative_error(actual[finite], expected[finite])
    assert error <= testing.TOLERANCE[np.dtype(dtype).name], f"relative error {error:.3e}"


def noncontiguous(a):
    """A view of a copy of a with the same values and no contiguity (every other element of a
    twice-as-wide buffer along the last axis)."""
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    wide = xp.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    wide[..., 1::2] = np.nan
    view = wide[..., ::2]
    assert not view.flags.c_contiguous or a.size <= 1
    return view


def directional_derivative(f, args, index, direction, step=1e-6):
    plus, minus = list(args), list(args)
    plus[index] = args[index] + step * direction
    minus[index] = args[index] - step * direction
    return (f(*plus) - f(*minus)) / (2 * step)


def run_both(backend, fn, *args, **kwargs):
    """fn on the NumPy path and on backend (outputs poisoned); every input checked unmodified on both."""
    is_array = [isinstance(a, np.ndarray) for a in args]
    snapshot = [a.copy() if array else None for a, array in zip(args, is_array)]
    moved = [to_backend(a, backend) if array else a for a, array in zip(args, is_array)]
    expected = fn(*args, **kwargs)
    with testing.poisoned_outputs():
        actual = testing.run(backend, fn, *moved, **kwargs)
    for before, used, given in zip(snapshot, moved, args):
        if before is not None:
            np.testing.assert_array_equal(given, before, err_msg="the NumPy path modified an input")
            np.testing.assert_array_equal(testing.to_numpy(used), before, err_msg=f"{backend} modified an input")
    return actual, expected
