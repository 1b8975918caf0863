"""The host backend's machinery: launch interface, disk cache, several modules in one process, threads."""
import pathlib
import re
import shutil

import numpy as np
import pytest

from deformcp import _host, _kernels, _sources

pytestmark = pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(tmp_path))
    return tmp_path / "host"


def affine_grid_with(fn, theta, H, W, grid, block):
    N = theta.shape[0]
    out = np.full((N, H, W, 2), np.nan, theta.dtype)
    fn(grid, block, (theta, out, np.int32(N), np.int32(H), np.int32(W), np.int32(1)))
    return out


@pytest.mark.parametrize("grid, block", [((1,), (1,)), ((3,), (7,)), ((2, 2), (5, 3)), ((1000,), (256,))])
def test_any_launch_shape_covers_the_work(rng, grid, block):
    """Kernels are grid-stride loops: every (grid, block) writes every output, with the same values."""
    theta = rng.standard_normal((3, 2, 3))
    fn = _kernels.get_function("host", "spatial_transformer", "affine_grid_forward", np.float64, False)
    reference = affine_grid_with(fn, theta, 5, 7, (1,), (256,))
    np.testing.assert_array_equal(affine_grid_with(fn, theta, 5, 7, grid, block), reference)
    assert not np.isnan(reference).any()


def test_modules_are_cached_on_disk_by_content(fresh_cache, rng):
    first = _host.module("spatial_transformer", "double", "int")
    built = sorted(p.name for p in fresh_cache.iterdir())
    assert [pathlib.Path(p).suffix for p in built] == [".cpp", ".sha256", ".so"]
    stamp = first.path.stat().st_mtime_ns
    _host._module.cache_clear()  # a new process: the library is found on disk, not rebuilt
    again = _host.module("spatial_transformer", "double", "int")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp


def test_flags_change_the_cache_key(fresh_cache, monkeypatch):
    plain = _host.module("spatial_transformer", "float", "int").path
    monkeypatch.setattr(_host, "BASE_FLAGS", (*_host.BASE_FLAGS, "-DDEFORMCP_TEST_FLAG=1"))
    flagged = _host.module("spatial_transformer", "float", "int").path
    assert flagged != plain and plain.exists() and flagged.exists()


def test_several_modules_in_one_process(rng):
    theta = rng.standard_normal((2, 2, 3))
    results = {}
    for dtype in (np.float64, np.float32, np.float16):
        for index64 in (False, True):
            fn = _kernels.get_function("host", "spatial_transformer", "affine_grid_forward", dtype, index64)
            index = np.int64 if index64 else np.int32
            out = np.full((2, 3, 4, 2), np.nan, dtype)
            fn((1,), (64,), (theta.astype(dtype), out, index(2), index(3), index(4), np.int32(0)))
            results[dtype, index64] = out
    for (dtype, _), out in results.items():
        tolerance = {np.float64: 1e-15, np.float32: 1e-6, np.float16: 2e-3}[dtype]
        np.testing.assert_allclose(out.astype(np.float64), results[np.float64, False], rtol=tolerance,
                                   atol=tolerance * 8)


def test_kernel_arguments_are_checked():
    fn = _kernels.get_function("host", "spatial_transformer", "affine_grid_forward", np.float64, False)
    theta = np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match="array arguments must be C-contiguous"):
        fn((1,), (1,), (theta[::2], np.zeros((2, 1, 1, 2)), np.int32(2), np.int32(1), np.int32(1), np.int32(0)))
    with pytest.raises(TypeError, match="kernel arguments must be NumPy arrays or NumPy scalars, got int"):
        fn((1,), (1,), (theta, np.zeros((4, 1, 1, 2)), 4, np.int32(1), np.int32(1), np.int32(0)))


def test_compile_errors_are_reported(fresh_cache):
    """The compiler, its exit status and what it printed."""
    with pytest.raises(RuntimeError, match=r"^host compilation of broken failed: the C\+\+ compiler "
                                           rf"{re.escape(_host.compiler())} exited with status 1:\n(.|\n)*error"):
        _host._build("this is not C++", "broken")


#: Records, for every block, the address of the thread-local threadIdx: one address per OS thread that ran blocks.
THREAD_PROBE = """
template <typename T, typename I>
__global__ void thread_of_block(T* out, I n) {
  if (threadIdx.x == 0 && (I)blockIdx.x < n) out[blockIdx.x] = T((long long)&threadIdx);
}
"""


@pytest.fixture(scope="module")
def thread_probe(tmp_path_factory):
    """The probe, compiled and launched through deformcp._kernels as kernels/*.cu are (its family in a folder
    that stands in for kernels/)."""
    folder = tmp_path_factory.mktemp("probe-kernels")
    shutil.copy(_sources.kernel_dir() / _sources.COMMON_HEADER, folder / _sources.COMMON_HEADER)
    (folder / "thread_probe.cu").write_text(THREAD_PROBE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_sources, "kernel_dir", lambda: folder)
        return _kernels.get_function("host", "thread_probe", "thread_of_block", np.float64, False)


@pytest.mark.parametrize("threads", [1, 3])
def test_num_threads_sets_the_openmp_threads(thread_probe, monkeypatch, threads):
    """DEFORMCP_NUM_THREADS is the number of OpenMP threads a launch runs on (64 blocks, a static schedule:
    every thread gets blocks), whatever the machine's CPU count."""
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", str(threads))
    out = np.zeros(64)
    thread_probe((64,), (32,), (out, np.int32(64)))
    assert out.all() and len(set(out)) == threads


@pytest.mark.parametrize("atomics, deterministic", [("", True), ("0", True), ("1", False)])
def test_the_backward_runs_the_deterministic_kernels_unless_asked_for_atomics(rng, monkeypatch, atomics,
                                                                              deterministic):
    """deterministic=False on the host backend: the deterministic kernels (faster on the CPU) unless
    DEFORMCP_HOST_ATOMICS=1 asks for the atomic ones that CUDA runs; the gradients equal either way."""
    import deformcp

    launched = []
    real_launch = _kernels.launch

    def recording_launch(backend, family, name, *args, **kwargs):
        launched.append(name)
        return real_launch(backend, family, name, *args, **kwargs)

    monkeypatch.setattr(_kernels, "launch", recording_launch)
    monkeypatch.setenv("DEFORMCP_HOST_ATOMICS", atomics)
    x, grid = rng.standard_normal((2, 3, 5, 6)), rng.uniform(-1.2, 1.2, (2, 4, 3, 2))
    grad_output = rng.standard_normal((2, 3, 4, 3))
    with deformcp.backend("host"):
        grads = deformcp.grid_sample_backward(grad_output, x, grid)
    expected_grads = deformcp.grid_sample_backward(grad_output, x, grid)
    # the input gradient: scattered by grid_sample_backward (with the grid's), or gathered per plane
    assert ("grid_sample_backward_input_deterministic" in launched) == deterministic
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_host_atomics_refuses_other_values(monkeypatch, rng):
    import deformcp

    monkeypatch.setenv("DEFORMCP_HOST_ATOMICS", "yes")
    x, grid = rng.standard_normal((1, 1, 3, 3)), rng.uniform(-1, 1, (1, 2, 2, 2))
    with deformcp.backend("host"), pytest.raises(ValueError, match="DEFORMCP_HOST_ATOMICS: expected 0 or 1"):
        deformcp.grid_sample_backward(np.ones((1, 1, 2, 2)), x, grid)
