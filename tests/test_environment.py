"""Environment variables and the compiler: every mistake is an error that names the variable, what was expected
and what came (DEFORMCP_NUM_THREADS, DEFORMCP_CACHE_DIR, CXX), and a compiler that fails says so."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import deformcp
from deformcp import __main__ as cli
from deformcp import _host

needs_compiler = pytest.mark.skipif(_host.available() is not None, reason="host backend: no C++ compiler found")


def host_affine_grid():
    """A host-backend op; its module is built unless this process already loaded it from this cache."""
    with deformcp.backend("host"):
        return deformcp.affine_grid(np.zeros((1, 2, 3)), (1, 1, 2, 2))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache: host modules are built (and the compiler looked for) anew."""
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "host"


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5", "2 threads"])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("host", marks=needs_compiler)])
def test_num_threads_must_be_a_positive_integer(monkeypatch, rng, backend, value):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", value)
    x = rng.standard_normal((2, 3, 8, 8))
    grid = rng.uniform(-1, 1, (2, 4, 4, 2))
    with deformcp.backend(backend):
        with pytest.raises(ValueError, match=rf"^DEFORMCP_NUM_THREADS: expected a positive integer .*, "
                                             rf"got {re.escape(repr(value))}$"):
            deformcp.grid_sample(x, grid)


@pytest.mark.parametrize("value, threads", [("1", 1), ("3", 3), (" 2 ", 2), ("", None)])
def test_num_threads_is_read_for_both_backends(monkeypatch, value, threads):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", value)
    expected = threads or deformcp._workspace.available_cpus()
    assert deformcp._workspace.num_threads() == expected
    assert _host.threads() == expected  # this process has not forked: OpenMP is there


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point deformcp at cgroup files under tmp_path (v2's cpu.max and v1's cfs pair, absent until written)."""
    from deformcp import _workspace

    paths = {"v2": tmp_path / "cpu.max", "quota": tmp_path / "cfs_quota_us", "period": tmp_path / "cfs_period_us"}
    monkeypatch.setattr(_workspace, "CGROUP_V2_CPU_MAX", str(paths["v2"]))
    monkeypatch.setattr(_workspace, "CGROUP_V1_CPU", (str(paths["quota"]), str(paths["period"])))
    _workspace.cgroup_cpu_quota.cache_clear()
    yield paths
    _workspace.cgroup_cpu_quota.cache_clear()


@pytest.mark.parametrize("files, quota", [
    ({"v2": "150000 100000\n"}, 2), ({"v2": "100000 100000"}, 1), ({"v2": "50000 100000"}, 1),
    ({"v2": "max 100000\n"}, None), ({"v2": "garbage"}, None), ({}, None),
    ({"quota": "300000\n", "period": "100000\n"}, 3), ({"quota": "-1", "period": "100000"}, None),
])
def test_cgroup_cpu_quota_caps_the_threads(cgroup, monkeypatch, files, quota):
    """A container's CPU quota (cgroup v2 cpu.max, or v1's cfs files) rounded up caps the default thread count, as
    the affinity mask does; without a quota the affinity mask alone decides. DEFORMCP_NUM_THREADS overrides both."""
    from deformcp import _workspace

    for name, text in files.items():
        cgroup[name].write_text(text)
    assert _workspace.cgroup_cpu_quota() == quota
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("DEFORMCP_NUM_THREADS", raising=False)
    assert _workspace.num_threads() == (min(affinity, quota) if quota else affinity)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "5")
    assert _workspace.num_threads() == 5


def test_blas_runs_one_thread_while_the_pool_works(monkeypatch):
    """Inside the NumPy path's pool workers BLAS is held to one thread (no oversubscription: pool threads × BLAS
    threads), and restored after, also when a worker raises."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from deformcp.reference import _bilinear

    def blas_threads():
        return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]

    def failing(a, b):
        raise KeyError(a)

    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    inside = []
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        _bilinear.for_each_chunk(lambda a, b: inside.append(blas_threads()), [(i, i + 1) for i in range(4)])
        with pytest.raises(KeyError):
            _bilinear.for_each_chunk(failing, [(0, 1), (1, 2)])
        after = blas_threads()
    assert before and set(before) == {2}, before
    assert inside == [[1] * len(before)] * 4
    assert after == before


def test_a_blas_loaded_after_the_pool_first_ran_is_held_too():
    """A fresh process runs the pool, then imports scipy.linalg (its own OpenBLAS): inside the pool's next run both
    BLAS libraries run one thread (the libraries are looked up again once modules were imported)."""
    code = """if True:
        import os
        os.environ["DEFORMCP_NUM_THREADS"] = "2"
        import threadpoolctl
        from deformcp.reference import _bilinear
        def blas():
            return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
        _bilinear.for_each_chunk(lambda a, b: None, [(0, 1), (1, 2)])
        before = len(blas())
        import scipy.linalg
        inside = []
        _bilinear.for_each_chunk(lambda a, b: inside.append(blas()), [(0, 1), (1, 2)])
        print(before, len(blas()), inside)
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(deformcp.__file__)),
                                                          os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    before, after, inside = result.stdout.split(" ", 2)
    if int(after) <= int(before):
        pytest.skip("scipy.linalg loaded no BLAS of its own here")
    assert inside.strip() == str([[1] * int(after)] * 2)


@needs_compiler
def test_an_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    """DEFORMCP_CACHE_DIR under a file: neither the folder nor anything in it can be made."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(blocker))
    with pytest.raises(RuntimeError, match=rf"^DEFORMCP_CACHE_DIR={re.escape(repr(str(blocker)))}: the host kernel "
                                           rf"cache {re.escape(str(blocker / 'host'))} cannot be written "
                                           rf"\(Not a directory\): set DEFORMCP_CACHE_DIR to a folder you can write$"):
        host_affine_grid()


@needs_compiler
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_names_the_variable(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(folder))
    with pytest.raises(RuntimeError, match=r"the host kernel cache .* cannot be written \(Permission denied\): "
                                           r"set DEFORMCP_CACHE_DIR to a folder you can write$"):
        host_affine_grid()


@pytest.mark.parametrize("value, problem", [("/nonexistent/c++", "no executable file"),
                                            ("notacompiler", "not a program on PATH"),
                                            ("g++ -m64", "not a program on PATH")])
def test_an_invalid_cxx_is_an_error_not_a_fallback(fresh_cache, monkeypatch, value, problem):
    monkeypatch.setenv("CXX", value)
    message = (rf"^CXX={re.escape(repr(value))} is {problem}: set CXX to a C\+\+ compiler \(one program, a name on "
               rf"PATH or a path\), or unset it to use the first of c\+\+, g\+\+, clang\+\+ on PATH$")
    with pytest.raises(RuntimeError, match=message):
        _host.compiler()
    with pytest.raises(RuntimeError, match=message):
        host_affine_grid()
    assert re.match(message, _host.available())
    assert not fresh_cache.exists()


@needs_compiler
@pytest.mark.parametrize("value", ["", "  "])
def test_an_unset_or_empty_cxx_finds_a_compiler(monkeypatch, value):
    monkeypatch.setenv("CXX", value)
    found = _host.compiler()
    assert found is not None and os.path.basename(found) in _host.DEFAULT_COMPILERS
    monkeypatch.delenv("CXX")
    assert _host.compiler() == found


def test_no_compiler_says_to_install_one_or_set_cxx(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no c++, g++ or clang++
    assert _host.compiler() is None
    assert _host.available() == _host.NO_COMPILER
    with pytest.raises(RuntimeError, match=r"^the host backend needs a C\+\+ compiler: none of c\+\+, g\+\+, "
                                           r"clang\+\+ is on PATH \(install one, or set CXX to a C\+\+ compiler\)$"):
        host_affine_grid()


@pytest.mark.skipif(shutil.which("false") is None, reason="no false(1)")
def test_a_compiler_that_fails_silently_is_named_with_its_status(fresh_cache, monkeypatch):
    false = shutil.which("false")
    monkeypatch.setenv("CXX", false)
    with pytest.raises(RuntimeError, match=rf"^host compilation of spatial_transformer-double-int failed: the C\+\+ "
                                           rf"compiler {re.escape(false)} exited with status 1 without a message \(is "
                                           rf"it a C\+\+ compiler\? set CXX to one\)$"):
        host_affine_grid()


@pytest.mark.parametrize("value", ["notacompiler", "/nonexistent/c++"])
def test_info_reports_an_invalid_cxx(capsys, monkeypatch, value):
    monkeypatch.setenv("CXX", value)
    assert cli.main(["info"]) == 0
    host = [line for line in capsys.readouterr().out.splitlines() if line.startswith("backend host")]
    assert len(host) == 1 and re.search(rf"\bunavailable: CXX={re.escape(repr(value))} is ", host[0]), host


def test_info_reports_no_compiler(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^backend host +unavailable: {re.escape(_host.NO_COMPILER)}$", out, re.MULTILINE), out
