"""Resources: scratch memory under deformcp.workspace_limit and roi_align's chunking,
no leaks over thousands of host-backend calls, thread safety of both CPU paths, and a host kernel cache that
several threads or processes can populate at once and that rebuilds a damaged entry.

Memory is measured with tracemalloc, which sees NumPy's array allocations (NumPy reports them to it):
inputs are made before tracing starts, so ``peak − outputs`` is the call's extra memory.
"""
import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest

import deformcp
from deformcp import _host, _workspace, testing

REPO = pathlib.Path(__file__).resolve().parent.parent
needs_compiler = pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")


def traced_extra(fn):
    """(result, peak bytes NumPy allocated during fn() beyond its outputs)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outputs = [result] if isinstance(result, np.ndarray) else [a for a in result if a is not None]
    return result, peak - sum(a.nbytes for a in outputs)


def assert_bitwise_equal(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bits = f"u{actual.itemsize}"
    np.testing.assert_array_equal(np.ascontiguousarray(actual).view(bits), np.ascontiguousarray(expected).view(bits),
                                  err_msg=what)


# ------------------------------------------------------------------------------- (a) workspace limit

def conv_inputs(rng, N, C=16, H=12, W=12, C_out=4):
    """Many input channels and few output ones: the column buffers (C·9 values per output pixel) dominate
    everything else that scales with a chunk (outputs, gradients of the outputs: C_out per pixel)."""
    return dict(input=rng.standard_normal((N, C, H, W)), offset=1.5 * rng.standard_normal((N, 18, H, W)),
                weight=rng.standard_normal((C_out, C, 3, 3)), bias=rng.standard_normal(C_out),
                mask=rng.uniform(0, 1, (N, 9, H, W)))


def conv_call(backward, arrays, grad_output):
    if backward:
        return lambda: tuple(deformcp.deform_conv2d_backward(grad_output, **arrays, padding=1, deterministic=True))
    return lambda: deformcp.deform_conv2d(**arrays, padding=1)


def bytes_per_row(backend, backward, rng):
    """The workspace one output row needs, read from the error raised when the limit is too small for it."""
    arrays = conv_inputs(rng, 1)
    with deformcp.backend(backend), deformcp.workspace_limit(1), pytest.raises(ValueError) as error:
        conv_call(backward, arrays, np.ones((1, 4, 12, 12)))()
    op = "deform_conv2d_backward" if backward else "deform_conv2d"
    match = re.fullmatch(rf"{op}: one output row needs (\d+) bytes of workspace, more than the limit of 1 bytes; "
                         r"raise it with deformcp\.workspace_limit\(\.\.\.\)", str(error.value))
    assert match, str(error.value)
    return int(match.group(1))


#: Allowed extra memory, as a multiple of the limit, plus a fixed allowance for small per-call arrays
#: (reshaped weights, per-chunk index vectors, the allocator's rounding): the limit bounds a chunk's column
#: buffers (and, on the NumPy path, its sparse sampling matrices and a channels-last copy of its images); what
#: else scales with a chunk is an output-sized product (C_out = 4 against 16·9 column rows here), so half the
#: limit again covers it with room to spare.
WORKSPACE_FACTOR = 1.5
FIXED_ALLOWANCE = 64 * 2**10

WORKSPACE_CASES = [("numpy", False), ("numpy", True), ("host", False), ("host", True)]


@pytest.mark.parametrize("N, rows", [(24, 36), (3, 3)], ids=["images", "rows"])
@pytest.mark.parametrize("backend, backward", WORKSPACE_CASES)
def test_deform_conv2d_extra_memory_stays_under_the_workspace_limit(rng, backend, backward, N, rows):
    """24 images of 12 output rows under a limit of 36 rows' worth (chunks of several images), or 3 images under
    a limit of 3 rows' worth (chunks of 3 rows of one image): the call's extra memory stays within
    WORKSPACE_FACTOR × the limit, and the result is the unchunked one. (Few images for the second: each chunk
    leaves a few small tuples in CPython's free lists, which tracemalloc still counts.)"""
    if backend == "host" and _host.compiler() is None:
        pytest.skip("host backend: no C++ compiler found")
    limit = rows * bytes_per_row(backend, backward, rng)
    arrays = conv_inputs(rng, N)
    grad_output = rng.standard_normal((N, 4, 12, 12))
    call = conv_call(backward, arrays, grad_output)
    with deformcp.backend(backend):
        whole = call()                     # the default limit: one chunk (this also warms up the backend)
        with deformcp.workspace_limit(limit):
            chunked, extra = traced_extra(call)
    for got, want in zip(chunked if backward else [chunked], whole if backward else [whole]):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert extra <= WORKSPACE_FACTOR * limit + FIXED_ALLOWANCE, (
        f"extra memory {extra} bytes = {extra / limit:.2f} × the limit of {limit} bytes")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("host", marks=needs_compiler)])
def test_deform_conv2d_workspace_limit_for_one_output_row(rng, backend, backward):
    """The limit one output row needs, as the error says, runs (one row a chunk); a byte less raises the
    ValueError that names the need and the limit."""
    per_row = bytes_per_row(backend, backward, rng)
    arrays = conv_inputs(rng, 3)
    grad_output = rng.standard_normal((3, 4, 12, 12))
    call = conv_call(backward, arrays, grad_output)
    op = "deform_conv2d_backward" if backward else "deform_conv2d"
    with deformcp.backend(backend):
        whole = call()
        with deformcp.workspace_limit(per_row):
            one_by_one = call()
        with deformcp.workspace_limit(per_row - 1), pytest.raises(
                ValueError, match=rf"^{op}: one output row needs {per_row} bytes of workspace, more than the limit "
                                  rf"of {per_row - 1} bytes; raise it with deformcp\.workspace_limit"):
            call()
    for got, want in zip(one_by_one if backward else [one_by_one], whole if backward else [whole]):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def roi_inputs(rng, K=1000, N=2, C=8, H=32, W=32):
    x1, y1 = rng.uniform(-4, W - 4, K), rng.uniform(-4, H - 4, K)
    boxes = np.stack([rng.integers(0, N, K), x1, y1, x1 + rng.uniform(1, 10, K), y1 + rng.uniform(1, 10, K)], 1)
    return rng.standard_normal((N, C, H, W)), boxes


#: Extra bytes allowed per sample of a chunk. One chunk's sample arrays (_Samples: four corner rows, weights
#: and both weight derivatives, 136 bytes; its CSR matrix, 48) and the temporaries that compute them come to
#: about 400 bytes per sample at their peak (measured over one chunk); 1 KiB leaves room for the previous
#: chunk's arrays, still referenced while the next chunk's are computed.
BYTES_PER_SAMPLE = 1024


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_roi_align_chunks_bound_the_sample_arrays(rng, monkeypatch, pool_mode, backward):
    """1000 boxes, 196 000 samples: with ROI_SAMPLES_PER_CHUNK = 4096 the NumPy path's extra memory is that of
    4096 samples (plus what scales with the boxes and the image), not of all of them; results unchanged."""
    x, boxes = roi_inputs(rng)
    K, (N, C, H, W) = len(boxes), x.shape
    kwargs = dict(output_size=7, sampling_ratio=2, pool_mode=pool_mode)
    grad_output = rng.standard_normal((K, C, 7, 7))
    call = (lambda: deformcp.roi_align_backward(grad_output, x, boxes, **kwargs).input) if backward else (
        lambda: deformcp.roi_align(x, boxes, **kwargs))
    total_samples = K * 7 * 7 * 2 * 2
    assert _workspace.ROI_SAMPLES_PER_CHUNK >= total_samples       # by default: one chunk
    whole, whole_extra = traced_extra(call)
    monkeypatch.setattr(_workspace, "ROI_SAMPLES_PER_CHUNK", 4096)
    chunked, extra = traced_extra(call)
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-13)
    per_box = 256 * K                                          # the boxes' geometry, computed for all at once
    images = 2 * N * (H * W + 1) * C * 8                       # channels-last copies of the image
    bound = BYTES_PER_SAMPLE * 4096 + per_box + images + FIXED_ALLOWANCE
    assert extra <= bound, f"extra memory {extra} bytes, more than {bound} for 4096-sample chunks"
    assert extra * 10 < whole_extra, f"chunked {extra} bytes against {whole_extra} in one chunk"


# ------------------------------------------------------------------------------------------ (b) leaks

def small_calls(rng, dtype=np.float64):
    """Every op and its backward on tiny inputs, as (name, zero-argument function returning arrays)."""
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    theta, x = r(2, 2, 3), r(2, 3, 5, 6)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 4, 2)).astype(dtype)
    boxes = np.array([[0, 0.5, 0.5, 4, 3], [1, -1, 1, 6, 4.5], [1, 2, 2, 2, 2]], dtype)
    x_ps = r(2, 2 * 2 * 2, 5, 6)
    offset_pool, mask_pool = r(3, 2, 2, 2), rng.uniform(0, 1, (3, 1, 2, 2)).astype(dtype)
    x_dps, offset_dps = r(2, 2 * 2 * 2, 5, 6), r(3, 2, 2, 2)
    offset_conv, mask_conv = r(2, 18, 5, 6), rng.uniform(0, 1, (2, 9, 5, 6)).astype(dtype)
    weight, bias = r(4, 3, 3, 3), r(4)
    f_a, f_b = r(5, 7), r(5, 7)
    g_grid, g_sample, g_roi, g_ps, g_conv = r(2, 5, 6, 2), r(2, 3, 4, 4), r(3, 3, 2, 2), r(3, 2, 2, 2), r(2, 4, 5, 6)
    dps = dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=0.1)
    det = dict(deterministic=True)
    return [
        ("affine_grid", lambda: (deformcp.affine_grid(theta, (2, 3, 5, 6)),
                                 *deformcp.affine_grid_backward(g_grid, theta, (2, 3, 5, 6)))),
        ("grid_sample", lambda: (deformcp.grid_sample(x, grid),
                                 *deformcp.grid_sample_backward(g_sample, x, grid, **det))),
        ("roi_align", lambda: (deformcp.roi_align(x, boxes, 2, sampling_ratio=2),
                               *deformcp.roi_align_backward(g_roi, x, boxes, 2, sampling_ratio=2, **det))),
        ("roi_align max", lambda: (deformcp.roi_align(x, boxes, 2, pool_mode="max"),
                                   *deformcp.roi_align_backward(g_roi, x, boxes, 2, pool_mode="max", **det))),
        ("ps_roi_align", lambda: (deformcp.ps_roi_align(x_ps, boxes, 2),
                                  *deformcp.ps_roi_align_backward(g_ps, x_ps, boxes, 2, **det))),
        ("deform_roi_pool", lambda: (
            deformcp.deform_roi_pool(x, boxes, offset_pool, 2, mask=mask_pool),
            *deformcp.deform_roi_pool_backward(g_roi, x, boxes, offset_pool, 2, mask=mask_pool, **det))),
        ("deform_ps_roi_pool", lambda: (
            deformcp.deform_ps_roi_pool(x_dps, boxes, offset_dps, **dps),
            *deformcp.deform_ps_roi_pool_backward(g_ps, x_dps, boxes, offset_dps, **dps, **det))),
        ("deform_conv2d", lambda: (
            deformcp.deform_conv2d(x, offset_conv, weight, bias, padding=1, mask=mask_conv),
            *deformcp.deform_conv2d_backward(g_conv, x, offset_conv, weight, bias, padding=1, mask=mask_conv, **det))),
        ("mimic_loss", lambda: (deformcp.mimic_loss(f_a, f_b),
                                *deformcp.mimic_loss_backward(np.asarray(0.5, dtype), f_a, f_b))),
    ]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_compiler
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_host_repeated_calls_do_not_leak_memory_or_descriptors(rng):
    """2 160 host-backend calls (every op and its backward, 120 rounds) after 1 800 to warm up: resident
    memory grows by at most 1 MiB (under 500 bytes a call) and no file descriptor stays open.

    The warm-up loads the modules and lets the allocators settle: resident memory grows by about 1.3 MiB
    in the first 50 rounds, by about 50 KiB more up to round 250, then not at all up to round 600
    (measured). Uncontended this takes about half a second; every host launch runs an OpenMP team, and
    where other processes keep the cores busy a tiny call can take milliseconds instead of 0.1 ms."""
    calls = [f for _, f in small_calls(rng)]
    with deformcp.backend("host"):
        for _ in range(100):
            for f in calls:
                f()
        gc.collect()
        rss, descriptors = resident_bytes(), open_descriptors()
        for _ in range(120):
            for f in calls:
                f()
        gc.collect()
        grown = resident_bytes() - rss
        assert open_descriptors() == descriptors
    if _host.sanitizers():
        return   # AddressSanitizer holds freed memory in quarantine (~15 MiB here): only descriptors count
    assert grown <= 2**20, f"resident memory grew by {grown / 2**10:.0f} KiB over 2 160 calls"


# ---------------------------------------------------------------------------------------- (c) threads

def thread_calls(rng):
    """Calls big enough that the NumPy path splits them over its own thread pool (grid_sample's image
    chunks; ps_roi_align and deform_ps_roi_pool split any call by bins) and the host backend launches
    several blocks; backwards deterministic. Plus the small set."""
    x, grid = rng.standard_normal((6, 16, 40, 40)), rng.uniform(-1.1, 1.1, (6, 30, 30, 2))  # two NumPy chunks
    g = rng.standard_normal((6, 16, 30, 30))
    x_roi, boxes = roi_inputs(rng, K=60, C=16)
    g_roi = rng.standard_normal((60, 16, 3, 3))
    big = [
        ("grid_sample big", lambda: (deformcp.grid_sample(x, grid),
                                     *deformcp.grid_sample_backward(g, x, grid, deterministic=True))),
        ("roi_align big", lambda: (deformcp.roi_align(x_roi, boxes, 3, sampling_ratio=2),
                                   deformcp.roi_align_backward(g_roi, x_roi, boxes, 3, sampling_ratio=2,
                                                               deterministic=True).input)),
    ]
    return big + small_calls(rng)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("host", marks=needs_compiler)])
def test_concurrent_calls_from_four_threads_match_sequential_calls(rng, backend):
    calls = thread_calls(rng)
    with deformcp.backend(backend):
        expected = [f() for _, f in calls]
    barrier = threading.Barrier(4)
    errors = []

    def worker(t):
        try:
            with deformcp.backend(backend):            # a context variable: each thread sets its own
                barrier.wait()
                for round_ in range(3):
                    for i in np.random.default_rng(t * 10 + round_).permutation(len(calls)):
                        name, f = calls[i]
                        for got, want in zip(f(), expected[i]):
                            if want is not None:
                                assert_bitwise_equal(got, want, f"{name} in thread {t}")
        except BaseException as error:                  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------- (c) the kernel cache

def cache_files(folder):
    """Names in a host cache folder, and any scratch directory a build left behind."""
    entries = sorted(p.name for p in (folder / "host").iterdir())
    return entries, [name for name in entries if (folder / "host" / name).is_dir()]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty DEFORMCP_CACHE_DIR and no module memoised in this process."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(folder))
    _host._module.cache_clear()
    yield folder
    _host._module.cache_clear()   # modules of the temporary folder are not kept for later tests


def grid_sample_case(rng):
    x, grid = rng.standard_normal((2, 3, 7, 8)), rng.uniform(-1.2, 1.2, (2, 5, 6, 2))
    g = rng.standard_normal((2, 3, 5, 6))
    return lambda: (deformcp.grid_sample(x, grid), *deformcp.grid_sample_backward(g, x, grid, deterministic=True))


@needs_compiler
def test_host_cache_populated_from_two_threads_at_once(fresh_cache, rng, monkeypatch):
    """Both threads miss the cache and compile the same module concurrently; both succeed, with the same
    results (those of the NumPy path), and the cache holds one library and its source, no scratch."""
    builds, real_build = [], _host._build

    def build(unit, stem):
        start = time.monotonic()
        path = real_build(unit, stem)
        builds.append((start, time.monotonic()))
        return path

    monkeypatch.setattr(_host, "_build", build)
    call = grid_sample_case(rng)
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def worker(i):
        try:
            with deformcp.backend("host"):
                barrier.wait()
                results[i] = call()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert len(builds) == 2 and max(s for s, _ in builds) < min(e for _, e in builds), (
        f"the two builds did not overlap: {builds}")
    for a, b in zip(*results):
        assert_bitwise_equal(a, b)
    for got, want in zip(results[0], testing.run("host", call)):   # now memoised; against the NumPy path too
        assert_bitwise_equal(got, want)
    for got, want in zip(results[0], testing.run("numpy", call)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    entries, scratch = cache_files(fresh_cache)
    assert not scratch and sorted(pathlib.Path(e).suffix for e in entries) == [".cpp", ".sha256", ".so"]


CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import numpy as np
    import deformcp
    from deformcp import _host

    folder, me = pathlib.Path(sys.argv[1]), sys.argv[2]
    (folder / f"ready-{me}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    start = time.monotonic()
    module = _host.module("spatial_transformer", "double", "int")
    built = time.monotonic()
    rng = np.random.default_rng(5)
    x, grid = rng.standard_normal((2, 3, 7, 8)), rng.uniform(-1.2, 1.2, (2, 5, 6, 2))
    with deformcp.backend("host"):
        out = deformcp.grid_sample(x, grid)
        grads = deformcp.grid_sample_backward(np.ones_like(out), x, grid, deterministic=True)
    np.savez(folder / f"result-{me}.npz", out=out, input=grads.input, grid=grads.grid)
    print(start, built, module.path, flush=True)
""")


@needs_compiler
def test_host_cache_populated_from_two_processes_at_once(fresh_cache, tmp_path):
    """Two processes released together compile the same module into one cache folder: both succeed, their
    results agree bitwise, one library and its source remain."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DEFORMCP_CACHE_DIR=str(fresh_cache), PYTHONPATH=str(REPO))
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(i)], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a child did not start"
            time.sleep(0.005)
        (tmp_path / "go").touch()
        outputs = [c.communicate(timeout=300) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    for c, (_, err) in zip(children, outputs):
        assert c.returncode == 0, err[-5000:]
    spans = [tuple(map(float, out.split()[:2])) for out, _ in outputs]   # (build start, build end) each
    paths = {out.split()[2] for out, _ in outputs}
    assert len(paths) == 1
    first, second = (np.load(tmp_path / f"result-{i}.npz") for i in range(2))
    rng = np.random.default_rng(5)                   # the children's inputs, run here from their library
    x, grid = rng.standard_normal((2, 3, 7, 8)), rng.uniform(-1.2, 1.2, (2, 5, 6, 2))
    with deformcp.backend("host"):
        out = deformcp.grid_sample(x, grid)
        here = dict(out=out, **deformcp.grid_sample_backward(np.ones_like(out), x, grid, deterministic=True)._asdict())
    for name in ("out", "input", "grid"):
        assert_bitwise_equal(first[name], second[name], name)
        assert_bitwise_equal(first[name], here[name], name)
    entries, scratch = cache_files(fresh_cache)
    assert not scratch and len(entries) == 3, entries
    # released together, each found no library and compiled it: the builds overlapped
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


DAMAGE = {
    "garbage": lambda content: b"this is not a shared library\n" * 100,
    "empty": lambda content: b"",
    "headers only": lambda content: content[:64],
    "truncated": lambda content: content[:len(content) // 2],
    "no digest": lambda content: content,  # an intact library whose digest is missing: rebuilt all the same
}

REBUILD_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import deformcp

    arrays = np.load(sys.argv[1])
    with deformcp.backend("host"):
        out = deformcp.grid_sample(arrays["x"], arrays["grid"])
        grads = deformcp.grid_sample_backward(arrays["g"], arrays["x"], arrays["grid"], deterministic=True)
    np.savez(sys.argv[2], out=out, input=grads.input, grid=grads.grid)
""")


@needs_compiler
@pytest.mark.parametrize("damage", ["garbage", "empty", "headers only", "truncated", "no digest"])
def test_host_damaged_cache_entry_is_rebuilt(fresh_cache, tmp_path, monkeypatch, rng, damage):
    """A cached library whose bytes are not those its build wrote is built again, and the op gives its results.

    The damaged entry is a copy (with its .cpp and digest) in a second cache folder: a library this process has
    loaded once is found by dlopen under its path without reading the file again, and damaging a loaded library
    in place could crash the process. A truncated library is loaded by a child process, since loading it used to
    crash (SIGBUS inside dlopen, which maps a library cut after its program headers past the end of the file)."""
    x, grid = rng.standard_normal((2, 3, 7, 8)), rng.uniform(-1.2, 1.2, (2, 5, 6, 2))
    g = rng.standard_normal((2, 3, 5, 6))

    def call():
        with deformcp.backend("host"):
            return (deformcp.grid_sample(x, grid), *deformcp.grid_sample_backward(g, x, grid, deterministic=True))

    expected = call()
    (library,) = (fresh_cache / "host").glob("*.so")
    other = tmp_path / "other"
    (other / "host").mkdir(parents=True)
    copy = other / "host" / library.name
    shutil.copy(library.with_suffix(".cpp"), copy.with_suffix(".cpp"))
    if damage != "no digest":
        shutil.copy(library.with_suffix(".sha256"), copy.with_suffix(".sha256"))
    content = library.read_bytes()
    copy.write_bytes(DAMAGE[damage](content))
    if damage == "truncated":
        np.savez(tmp_path / "inputs.npz", x=x, grid=grid, g=g)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(DEFORMCP_CACHE_DIR=str(other), PYTHONPATH=str(REPO))
        child = subprocess.run([sys.executable, "-c", REBUILD_CHILD, str(tmp_path / "inputs.npz"),
                                str(tmp_path / "result.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
        assert child.returncode == 0, f"the child exited with {child.returncode}:\n{child.stderr[-3000:]}"
        result = np.load(tmp_path / "result.npz")
        again = (result["out"], result["input"], result["grid"])
    else:
        monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(other))
        _host._module.cache_clear()
        again = call()
        assert _host.module("spatial_transformer", "double", "int").path == copy
    for got, want in zip(again, expected):
        assert_bitwise_equal(got, want)
    # a whole library, as its build wrote it (its length may differ: with the sanitizers' -g, the debug
    # information names the compiler's working directory, the child's here)
    assert copy.read_bytes()[:4] == b"\x7fELF" and _host._intact(copy)
    entries, scratch = cache_files(other)
    assert not scratch and len(entries) == 3
