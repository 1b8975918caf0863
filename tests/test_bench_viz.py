"""python -m deformcp bench (deformcp._bench) and python -m deformcp viz (deformcp.viz)."""
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import deformcp
from deformcp import _bench, _host, testing, viz

PACKAGE_ROOT = pathlib.Path(deformcp.__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(text):
    """json.loads refusing NaN and ±Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _subprocess(code, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------------------------------------------ bench

def test_bench_quick_writes_json_with_every_op(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--quiet", "--json", str(path)]
    for op in _bench.OPS:
        argv += ["--op", op]
    assert _bench.main(argv) == 0
    out = capsys.readouterr().out
    payload = _strict_json(path.read_text())
    assert payload["device"] == "cpu" and payload["quick"] and payload["repeat"] == _bench.QUICK_REPEAT
    for key in ("python", "numpy", "processor", "cpu_count", "blas_overrides", "host_compiler", "torch"):
        assert key in payload["machine"]
    assert set(payload["cases"]) == set(_bench.OPS)
    impls = {"deformcp numpy"} | ({"deformcp host"} if _host.compiler() else set())
    for op in _bench.OPS:
        for phase in _bench.PHASES:
            rows = {r["impl"]: r for r in payload["records"] if r["op"] == op and r["phase"] == phase}
            assert impls <= set(rows), (op, phase, sorted(rows))
            for record in rows.values():
                assert record["ok"], record
                assert record["median_s"] > 0 and len(record["samples_s"]) == _bench.QUICK_REPEAT
            anchors = [r for r in rows.values() if r["anchor"]]
            assert len(anchors) <= 1
            if anchors:  # a ratio for every implementation, 1 for the anchor itself
                assert all(r["ratio"] > 0 for r in rows.values())
                assert anchors[0]["ratio"] == pytest.approx(1.0)
        assert op in out
    if payload["machine"]["torch"] is not None:  # torch.nn.functional: grid_sample's anchor
        assert any(r["op"] == "grid_sample" and r["impl"] == "torch cpu" and r["anchor"] for r in payload["records"])
    assert f"wrote {path}" in out and "reference" in out


def test_bench_json_to_stdout_keeps_the_table_on_stderr(capsys):
    assert _bench.main(["--quick", "--quiet", "--op", "roi_align", "--repeat", "1", "--json", "-"]) == 0
    captured = capsys.readouterr()
    payload = _strict_json(captured.out)
    assert {r["op"] for r in payload["records"]} == {"roi_align"}
    assert all(r["repeat"] == 1 for r in payload["records"])
    assert "roi_align" in captured.err and "÷ anchor" in captured.err


@pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")
def test_bench_marks_a_mismatch_and_exits_1(capsys, monkeypatch):
    """A host result 1 % off the NumPy path is marked in the table and makes the run exit 1."""
    original = _bench.CASES["roi_align"]

    def skewed(size, rng):
        case = original(size, rng)
        run = case.run

        def off_on_host(arrays, backward):
            results = run(arrays, backward)
            if deformcp.current_backend() == "host":
                results["output"] = results["output"] * 1.01
            return results

        case.run = off_on_host
        return case

    monkeypatch.setitem(_bench.CASES, "roi_align", skewed)
    assert _bench.main(["--quick", "--quiet", "--op", "roi_align"]) == 1
    out = capsys.readouterr().out
    host_rows = [line for line in out.splitlines() if line.startswith("roi_align") and "deformcp host" in line]
    assert host_rows and all("MISMATCH output" in line for line in host_rows)
    assert "FAILED: roi_align deformcp host" in out


def test_bench_cuda_without_a_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(testing, "gpu_available", lambda: "CuPy is not installed")
    assert _bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CuPy is not installed" in err and "Nothing timed" in err


@pytest.mark.skipif(testing.gpu_available() is None, reason="a GPU is present")
def test_bench_cuda_here_exits_2(capsys):
    assert _bench.main(["--device", "cuda"]) == 2
    assert testing.gpu_available() in capsys.readouterr().err


def test_bench_help_names_options_and_the_blas_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m deformcp bench")
    for text in ("--op", "--repeat", "--quick", "--json", "--device", "--quiet", "OPENBLAS_CORETYPE",
                 "OPENBLAS_L2_SIZE", "2×256×100×152", "1×256×50×76"):
        assert text in out


def test_bench_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench.main(["--op", "no_such_op"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_progress_bar_draws_in_place_and_clears():
    stream = io.StringIO()
    progress = _bench.Progress(4, enabled=True, stream=stream, width=70)
    progress.start("roi_align forward: deformcp numpy")
    progress.step()
    progress.update(0.5)  # throttled: within 0.1 s of the last draw
    assert "[" in progress.line() and "38%" in progress.line() and "1/4" in progress.line()
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r[") and "25%  1/4  roi_align forward" in text and text.endswith("\r")
    assert all(len(chunk) <= 69 for chunk in text.split("\r"))
    silent = io.StringIO()
    off = _bench.Progress(4, enabled=False, stream=silent)
    off.start("x"), off.update(0.5), off.step(), off.close()
    assert silent.getvalue() == ""


# -------------------------------------------------------------------------------------------------- viz

def _regular(point, dilation=1):
    py, px = point
    layer2 = np.array([(py + dilation * i, px + dilation * j) for i in (-1, 0, 1) for j in (-1, 0, 1)], float)
    return layer2


def test_sampling_locations_zero_offsets_are_the_regular_5x5_patch():
    for offsets in ((None, None), (np.zeros((1, 18, 9, 11)), np.zeros((18, 9, 11)))):
        for dilation in (1, 2):
            loc = viz.sampling_locations(*offsets, point=(4, 5), dilation=dilation)
            np.testing.assert_array_equal(loc.point, [4, 5])
            np.testing.assert_array_equal(loc.layer2, _regular((4, 5), dilation))
            assert loc.layer1.shape == (9, 9, 2)
            for k in range(9):  # each layer-2 sample's own 3×3 grid, in deform_conv2d's tap order
                np.testing.assert_array_equal(loc.layer1[k], _regular(loc.layer2[k], dilation))
            points, counts = np.unique(loc.layer1.reshape(-1, 2), axis=0, return_counts=True)
            steps = dilation * np.arange(-2, 3)
            expected = np.array([(4 + i, 5 + j) for i in steps for j in steps], float)
            np.testing.assert_array_equal(points, expected)
            assert counts.sum() == 81 and counts.max() == 9  # the centre: once per layer-2 tap


def test_sampling_locations_follow_known_offset_shifts():
    H, W, point = 12, 14, (6, 7)
    offset2 = np.zeros((1, 18, H, W))
    offset2[0, 0::2] = 1.5     # every tap of layer 2: Δy = 1.5, Δx = −0.25
    offset2[0, 1::2] = -0.25
    offset1 = np.zeros((1, 18, H, W))
    offset1[0, 0::2] = -0.5    # every tap of layer 1: Δy = −0.5, Δx = 2
    offset1[0, 1::2] = 2.0
    regular = viz.sampling_locations(None, None, point)
    moved2 = viz.sampling_locations(None, offset2, point)
    np.testing.assert_allclose(moved2.layer2, regular.layer2 + [1.5, -0.25])
    np.testing.assert_allclose(moved2.layer1, regular.layer1 + [1.5, -0.25])
    both = viz.sampling_locations(offset1, offset2, point)
    np.testing.assert_allclose(both.layer2, regular.layer2 + [1.5, -0.25])
    np.testing.assert_allclose(both.layer1, regular.layer1 + [1.0, 1.75])

    # one tap of layer 2 at the output point: only that tap and its 9 layer-1 samples move (Δy, then Δx)
    one = np.zeros((1, 18, H, W))
    one[0, 2 * 5, 6, 7], one[0, 2 * 5 + 1, 6, 7] = 2.0, -3.0   # tap 5 = (i, j) = (1, 2): right of the centre
    one[0, :, 0, 0] = 9.0                                      # another location's offsets do not matter
    loc = viz.sampling_locations(None, one, point)
    np.testing.assert_array_equal(loc.layer2[5], [6 + 0 + 2.0, 7 + 1 - 3.0])
    np.testing.assert_array_equal(np.delete(loc.layer2, 5, axis=0), np.delete(regular.layer2, 5, axis=0))
    np.testing.assert_array_equal(loc.layer1[5], regular.layer1[5] + [2.0, -3.0])

    # layer 1's offsets are read where layer 2 samples: at a fractional location, interpolated bilinearly
    ramp = np.zeros((1, 18, H, W))
    ramp[0, 0::2] = np.arange(W, dtype=float)[None, None, :] * 0.1   # Δy = 0.1 · x
    loc = viz.sampling_locations(ramp, offset2, point)
    np.testing.assert_allclose(loc.layer1[..., 0], moved2.layer1[..., 0] + 0.1 * moved2.layer2[:, None, 1])


def test_sampling_locations_are_where_stacked_deform_conv2d_reads():
    """Two stacked deform_conv2d with one-hot weights on an input linear in y (or x) read exactly
    sampling_locations' 81 points: the layout (Δy then Δx per tap) and the bilinear reading of layer 1's
    offsets at layer 2's fractional samples."""
    rng = np.random.default_rng(0)
    H, W, point = 16, 18, (8, 9)
    offset1 = 0.6 * rng.standard_normal((1, 18, H, W))
    offset2 = 0.6 * rng.standard_normal((1, 18, H, W))
    loc = viz.sampling_locations(offset1, offset2, point)
    assert (np.abs(loc.layer1 - point).max()) < 6  # all inside: bilinear sampling of a ramp is exact there
    w1 = np.zeros((9, 1, 3, 3))
    w1[np.arange(9), 0, np.arange(9) // 3, np.arange(9) % 3] = 1.0           # channel l = tap l
    w2 = np.zeros((81, 9, 3, 3))
    for k in range(9):
        for l in range(9):
            w2[9 * k + l, l, k // 3, k % 3] = 1.0                             # channel 9k + l: tap k of map l
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    for axis, ramp in enumerate((yy, xx)):
        layer1 = deformcp.deform_conv2d(ramp[None, None], offset1, w1, padding=1)
        layer2 = deformcp.deform_conv2d(layer1, offset2, w2, padding=1)
        np.testing.assert_allclose(layer2[0, :, point[0], point[1]], loc.layer1[..., axis].ravel(), atol=1e-9)


def test_sampling_locations_rejects_bad_offsets_and_points():
    with pytest.raises(ValueError, match=r"offset1: expected .*\(1, 18, H, W\)"):
        viz.sampling_locations(np.zeros((1, 36, 4, 4)), None, (1, 1))
    with pytest.raises(ValueError, match="same map size"):
        viz.sampling_locations(np.zeros((18, 4, 4)), np.zeros((18, 5, 4)), (1, 1))
    with pytest.raises(ValueError, match="point"):
        viz.sampling_locations(None, np.zeros((18, 4, 4)), (1.5, 1))
    with pytest.raises(ValueError, match="point"):
        viz.sampling_locations(None, np.zeros((18, 4, 4)), (4, 0))


def test_builtin_example_spreads_over_the_object():
    image, offset1, offset2, point = viz.example()
    H, W = image.shape
    assert offset1.shape == offset2.shape == (1, 18, H, W) and 0 <= image.min() and image.max() <= 1
    deformable = viz.sampling_locations(offset1, offset2, point).layer1.reshape(-1, 2)
    regular = viz.sampling_locations(None, None, point).layer1.reshape(-1, 2)
    assert np.ptp(deformable, axis=0).min() > 3 * np.ptp(regular, axis=0).max()   # a wider receptive field
    inside = np.all((deformable > -1) & (deformable < [H, W]), axis=1)
    assert inside.all()
    bright = image[np.round(deformable[:, 0]).astype(int), np.round(deformable[:, 1]).astype(int)]
    assert np.mean(bright > 0.5) > 0.9                                             # on the object


def test_viz_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sampling.png"
    assert viz.main(["--output", str(path)]) == 0
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1024
    assert f"wrote {path}" in capsys.readouterr().out

    # given offsets and an RGB image
    H, W = 20, 24
    rng = np.random.default_rng(1)
    np.save(tmp_path / "o1.npy", rng.standard_normal((1, 18, H, W)).astype(np.float32))
    np.save(tmp_path / "o2.npy", rng.standard_normal((1, 18, H, W)).astype(np.float32))
    np.save(tmp_path / "image.npy", rng.random((H, W, 3)))
    given = tmp_path / "given.png"
    assert viz.main(["--offset1", str(tmp_path / "o1.npy"), "--offset2", str(tmp_path / "o2.npy"), "--image",
                     str(tmp_path / "image.npy"), "--point", "10", "12", "--output", str(given), "--dpi", "60"]) == 0
    assert given.read_bytes().startswith(PNG_SIGNATURE)

    # a wrong image size: a clear error, exit 2, nothing written
    np.save(tmp_path / "small.npy", rng.random((5, 5)))
    bad = tmp_path / "bad.png"
    assert viz.main(["--offset1", str(tmp_path / "o1.npy"), "--image", str(tmp_path / "small.npy"),
                     "--output", str(bad)]) == 2
    assert "--image: expected (H, W) or (H, W, 3) with H × W = 20×24" in capsys.readouterr().err
    assert not bad.exists()


def test_viz_without_matplotlib_exits_2_with_the_message(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from deformcp import viz\n"
            "sys.exit(viz.main(['--output', 'out.png']))\n")
    result = _subprocess(code, tmp_path)
    assert result.returncode == 2, result.stderr
    assert viz.MISSING_MATPLOTLIB in result.stderr
    assert viz.MISSING_MATPLOTLIB == "python -m deformcp viz needs matplotlib: pip install 'deformcp[viz]'"
    assert not (tmp_path / "out.png").exists()


def test_importing_bench_and_viz_loads_neither_matplotlib_nor_torch(tmp_path):
    code = ("import sys, deformcp._bench, deformcp.viz\n"
            "print(sorted(m for m in ('matplotlib', 'torch', 'torchvision', 'cupy') if m in sys.modules))\n")
    result = _subprocess(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
