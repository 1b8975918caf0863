"""Fork safety: a process forked after its parent ran deformcp must not hang.

Threads do not survive fork: the NumPy path's cached thread pool and the host backend's OpenMP threads are gone
in the child, and a child that waits for them hangs. Each scenario runs in a subprocess of its own (its own
session, killed with its children on timeout), with ``DEFORMCP_NUM_THREADS=2`` so that the parent uses several
threads whatever the machine: the parent runs an op over several chunks / OpenMP blocks (or torch's OpenMP
threads), then forked children run the op and must return the parent's result.
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from deformcp import _host

REPO = pathlib.Path(__file__).resolve().parent.parent
#: Seconds a scenario may take in all (imports, the parent's ops, its children's) before it counts as hung.
TIMEOUT = 60

#: Shared by the scenarios: one grid_sample over 2 images of 16 × 128 × 128 float32 (1 MiB each: two chunks on
#: the NumPy path) onto a 32 × 32 grid (8 blocks of 256 threads on the host backend).
OP = textwrap.dedent("""
    import sys
    import numpy as np
    import deformcp
    from deformcp import _host, _workspace

    def run(backend, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 16, 128, 128)).astype(np.float32)
        grid = rng.uniform(-1.1, 1.1, (2, 32, 32, 2)).astype(np.float32)
        assert len(_workspace.image_chunks(*x.shape, x.itemsize)) > 1
        with deformcp.backend(backend):
            return deformcp.grid_sample(x, grid)

    def threads(backend):
        return _host.threads() if backend == "host" else _workspace.num_threads()
""")

#: The parent runs the op, then two forked pool workers run it; prints the thread counts parent / children.
WITH_POOL = OP + textwrap.dedent("""
    import multiprocessing

    def child(backend):
        return run(backend), threads(backend)

    backend = sys.argv[1]
    expected = run(backend)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(child, [backend] * 2).get(timeout=30)
    for out, _ in results:
        np.testing.assert_array_equal(out, expected)
    print("threads", threads(backend), *(n for _, n in results))
""")

#: A torch DataLoader whose forked workers run the op in __getitem__, after the parent ran it.
WITH_DATALOADER = OP + textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Sampled(Dataset):
        def __init__(self, backend):
            self.backend = backend

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return run(self.backend, seed=i)

    backend = sys.argv[1]
    expected = [run(backend, seed=i) for i in range(4)]
    loader = DataLoader(Sampled(backend), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=30)
    items = [item.numpy() for item in loader]
    assert len(items) == 4
    for out, want in zip(items, expected):
        np.testing.assert_array_equal(out, want)
    print("threads", threads(backend))
""")

#: The parent runs torch's CPU ops, not deformcp: OpenMP threads of the libgomp that host libraries then bind to.
#: A torch DataLoader's forked workers run the op on the host backend.
AFTER_TORCH = OP + textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Sampled(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return run("host", seed=i), threads("host")

    torch.randn(1 << 22).exp().sum()  # an elementwise op over 4M elements: torch's OpenMP threads
    loader = DataLoader(Sampled(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=30)
    items = list(loader)
    for i, (out, _) in enumerate(items):
        np.testing.assert_array_equal(out.numpy(), run("host", seed=i))
    print("threads", *(int(n) for _, n in items))
""")

#: A parent that has not loaded OpenMP forks: its children may start OpenMP's threads themselves.
BEFORE_OPENMP = OP + textwrap.dedent("""
    import multiprocessing

    def child(_):
        return run("host"), threads("host")

    loaded = _host._libgomp_loaded()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(child, [0, 1]).get(timeout=30)
    for out, _ in results:
        np.testing.assert_array_equal(out, run("host"))
    print("libgomp", int(loaded), "threads", *(n for _, n in results))
""")


def run_scenario(script: str, backend: str) -> str:
    """Run script with argument backend; fail on a non-zero exit or when it has not finished within TIMEOUT."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "OMP_NUM_THREADS")}
    env.update(DEFORMCP_NUM_THREADS="2", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    with subprocess.Popen([sys.executable, "-c", script, backend], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output = process.communicate(timeout=TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the scenario and the children it forked
            output = process.communicate()[0]
            pytest.fail(f"{backend}: still running after {TIMEOUT} s (a forked child hangs):\n{output[-5000:]}")
    assert process.returncode == 0, f"{backend}: exit code {process.returncode}:\n{output[-5000:]}"
    return output


@pytest.fixture(params=["numpy", "host"])
def cpu_backend(request):
    """The NumPy path or the host backend, its modules built here first (the scenario's time is for forking)."""
    if request.param == "host":
        request.getfixturevalue("host_built")
    return request.param


def test_forked_children_run_ops_after_the_parent(cpu_backend):
    output = run_scenario(WITH_POOL, cpu_backend)
    counts = output.split("threads")[-1].split()
    # The parent runs 2 threads; on the host backend a child of a parent with libgomp loaded runs single-threaded
    # (libgomp's threads are lost in fork), on the NumPy path it starts a fresh pool of 2.
    assert counts == (["2", "1", "1"] if cpu_backend == "host" else ["2", "2", "2"]), output


def test_torch_dataloader_fork_workers_run_ops(cpu_backend):
    pytest.importorskip("torch")
    output = run_scenario(WITH_DATALOADER, cpu_backend)
    assert output.split("threads")[-1].split() == ["2"], output


@pytest.fixture
def host_built():
    """The host modules the scenarios use, built here first."""
    if _host.compiler() is None:
        pytest.skip("host backend: no C++ compiler found")
    namespace = {}
    exec(OP, namespace)
    namespace["run"]("host")


def test_dataloader_workers_run_host_ops_after_torch_used_openmp(host_built):
    """torch's OpenMP threads are lost in fork like deformcp's: workers run host launches single-threaded."""
    pytest.importorskip("torch")
    output = run_scenario(AFTER_TORCH, "host")
    assert output.split("threads")[-1].split() == ["1"] * 4, output


def test_children_of_a_parent_without_openmp_use_threads(host_built):
    output = run_scenario(BEFORE_OPENMP, "host")
    loaded, counts = output.split("libgomp")[-1].split("threads")
    assert counts.split() == (["1", "1"] if int(loaded) else ["2", "2"]), output
