"""python -m deformcp --version | info | check."""
import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest

import deformcp
from deformcp import __main__ as cli
from deformcp import _host, _nvrtc, _sources, testing
from deformcp.ops import SPECS, Case

needs_compiler = pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")


def test_info_lists_backends_and_caches(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for field in ("deformcp", "numpy", "backend host", "backend cuda", "host cache", "kernel families", "nvrtc"):
        assert field in out
    assert "spatial_transformer" in out


@needs_compiler
def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--backend", "host", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    ops = SPECS
    assert {"affine_grid", "grid_sample", "roi_align", "ps_roi_align"} <= set(ops)
    for op in ops:
        assert sum(line.split()[0] == op for line in out.splitlines() if line.strip()) == len(testing.dtypes())
    assert "MISMATCH" not in out and f"{len(ops) * len(testing.dtypes())} passed, 0 failed" in out


@needs_compiler
def test_check_fails_on_a_mismatch(capsys, monkeypatch):
    """An op whose host result is off by 1e-3 must be reported and make check exit non-zero."""
    def off_on_host(theta, size, align_corners):
        grid = deformcp.affine_grid(theta, size, align_corners)
        return grid * 1.001 if deformcp.current_backend() == "host" else grid

    monkeypatch.setitem(SPECS, "skewed", SPECS["affine_grid"]._replace(
        name="skewed", function=off_on_host,
        cases=(Case("skewed", lambda rng: {"theta": rng.standard_normal((2, 2, 3))},
                    {"size": (2, 1, 3, 4), "align_corners": False}),)))
    assert cli.main(["check", "--backend", "host", "--op", "skewed"]) == 1
    rows = {line.split()[2]: line for line in capsys.readouterr().out.splitlines() if line.startswith("skewed")}
    # 1e-3 is past the float32 and float64 tolerances, within float16's and bfloat16's
    assert "MISMATCH" in rows["float32"] and "MISMATCH" in rows["float64"]
    assert "MISMATCH" not in rows["float16"]


def test_check_rejects_unknown_ops(capsys):
    assert cli.main(["check", "--op", "no_such_op", "--backend", "host"]) == 2
    assert "unknown ['no_such_op']" in capsys.readouterr().err


def test_relative_error_flags_nan():
    assert testing.relative_error(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == float("inf")
    assert testing.relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0


def test_check_without_a_usable_backend_says_why(capsys, monkeypatch):
    """An invalid CXX (and no GPU) leaves only the reference: check names CXX instead of crashing."""
    if testing.gpu_available() is None:
        pytest.skip("a GPU is available: check has a backend")
    monkeypatch.setenv("CXX", "not-a-compiler-deformcp")
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "no backend besides the NumPy reference is available:"
    assert out[1].startswith("host: skipped (CXX='not-a-compiler-deformcp' is not a program on PATH")
    assert out[2] == f"cuda: skipped ({testing.gpu_available()})"


def test_version():
    result = subprocess.run([sys.executable, "-m", "deformcp", "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"deformcp {deformcp.__version__}\n", "")


@needs_compiler
def test_check_reports_progress_and_skips(capsys, monkeypatch):
    """Not on a terminal: one progress line per op × backend on stderr; what was left out is said, with why."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ml_dtypes" else find_spec(name, *a))
    monkeypatch.setattr(testing, "gpu_available", lambda: "no usable CUDA device: FakeError: unplugged")
    assert cli.main(["check", "--op", "affine_grid", "--op", "mimic_loss", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["check 1/2: affine_grid/host", "check 2/2: mimic_loss/host"]
    out = captured.out.splitlines()
    assert out[-3:] == ["6 passed, 0 failed", "cuda: skipped (no usable CUDA device: FakeError: unplugged)",
                        "bfloat16 on host: skipped (ml_dtypes is not installed)"]
    assert not any("bfloat16" in line for line in out[:-3])


def test_skipped_names_bfloat16_on_cuda():
    assert "bfloat16 on cuda: skipped (CuPy has no bfloat16 arrays)" in testing.skipped(["cuda"])
    assert testing.dtypes("cuda") == ("float32", "float64", "float16")


def test_progress_on_a_terminal_rewrites_one_line(monkeypatch):
    """On a terminal: one line rewritten in place (a bar, n/total, the item), cleared at the end."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with cli.Progress("check") as progress:
        progress(1, 4, "affine_grid/host")
        progress(3, 4, "roi_align/cuda")
    written = sys.stderr.getvalue()
    first, second, cleared, rest = written.split("\r")[1:]
    assert first == "check [....................] 1/4 affine_grid/host"
    assert second.rstrip() == "check [##########..........] 3/4 roi_align/cuda" and "\n" not in written
    assert cleared == " " * len(first) and rest == ""


def test_check_backend_cuda_without_a_gpu_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(testing, "gpu_available", lambda: "no usable CUDA device: FakeError: unplugged")
    assert cli.main(["check", "--backend", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("check --backend cuda: no usable CUDA device: FakeError: unplugged. Nothing checked; run "
                            "without --backend cuda to check the other backends.\n")


@pytest.mark.skipif(testing.gpu_available() is None, reason="a GPU is present")
def test_check_backend_cuda_here_exits_2_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "deformcp", "check", "--backend", "cuda"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"check --backend cuda: {testing.gpu_available()}. Nothing checked; run "
                                          "without --backend cuda to check the other backends."]


@pytest.mark.skipif(_nvrtc.available() is not None, reason="no NVRTC")
def test_info_kernels_reports_progress(capsys, monkeypatch):
    """One progress line per kernel family × architecture (the compilations themselves stubbed out)."""
    compiled = []
    monkeypatch.setattr(_nvrtc, "compile_family", lambda *key: compiled.append(key) or [])
    assert cli.main(["info", "--kernels"]) == 0
    families = _sources.families()
    assert capsys.readouterr().err.splitlines() == [
        f"kernels {n}/{len(families) * len(_nvrtc.ARCHITECTURES)}: {family} {arch}"
        for n, (arch, family) in enumerate(((a, f) for a in _nvrtc.ARCHITECTURES for f in families), 1)]
    assert len(compiled) == len(families) * len(_nvrtc.ARCHITECTURES) * 8  # 4 dtypes × 2 index types
