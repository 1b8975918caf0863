"""python -m deformcp info | check."""
import numpy as np
import pytest

import deformcp
from deformcp import __main__ as cli
from deformcp import _host, testing
from deformcp.ops import SPECS, Case


def test_info_lists_backends_and_caches(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for field in ("deformcp", "numpy", "backend host", "backend cuda", "host cache", "kernel families", "nvrtc"):
        assert field in out
    assert "spatial_transformer" in out


@pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")
def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--backend", "host", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    ops = SPECS
    assert {"affine_grid", "grid_sample", "roi_align", "ps_roi_align"} <= set(ops)
    for op in ops:
        assert sum(line.split()[0] == op for line in out.splitlines() if line.strip()) == len(testing.dtypes())
    assert "MISMATCH" not in out and f"{len(ops) * len(testing.dtypes())} passed, 0 failed" in out


@pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")
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
    out = capsys.readouterr().out
    assert "host: CXX='not-a-compiler-deformcp'" in out and "cuda:" in out
