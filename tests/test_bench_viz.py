"""python -m deformcp bench (the harness of benchmarks/, deformcp.benchmarks) and python -m deformcp viz
(deformcp.viz).

The benchmarks' smoke test: every benchmark runs at its --quick (tiny) size on the NumPy path and the
host backend, each implementation verified against its reference before it is timed, and every op of the
spec table (deformcp.ops.SPECS) is declared and called by some benchmark; and a deliberately wrong
implementation, passed through a benchmark's own verification, stops it.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import deformcp
from deformcp import __main__ as cli
from deformcp import _host, testing, viz
from deformcp.ops import SPECS

PACKAGE_ROOT = pathlib.Path(deformcp.__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
harness = cli.benchmarks_harness()


def _strict_json(text):
    """json.loads refusing NaN and ±Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _subprocess(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ bench

def _counted(calls, key, fn):
    @functools.wraps(fn)  # keeps the signature (OpSpec.deterministic reads it)
    def counting(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return counting


def test_bench_quick_verifies_and_times_every_benchmark(tmp_path, capsys, monkeypatch):
    """The smoke test: python -m deformcp bench --quick runs every benchmark's cases at tiny sizes, each
    implementation (NumPy path, host backend, the anchor where installed) verified first; every op of the
    spec table has its public forward and backward (SPECS[op].function / .backward) called by them."""
    calls = {(op, part): 0 for op in SPECS for part in ("function", "backward")}
    for op, spec in list(SPECS.items()):
        monkeypatch.setitem(SPECS, op, spec._replace(function=_counted(calls, (op, "function"), spec.function),
                                                     backward=_counted(calls, (op, "backward"), spec.backward)))
    assert cli.main(["bench", "--quick", "--repeat", "1", "--warmup", "0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    uncalled = sorted(f"SPECS[{op!r}].{part}" for (op, part), n in calls.items() if n == 0)
    assert not uncalled, f"no benchmark calls {', '.join(uncalled)} (through deformcp.ops.SPECS)"
    impls = {"deformcp numpy"} | ({"deformcp host"} if _host.compiler() else set())
    for name in harness.BENCHMARKS:
        assert f"{name}: ok" in out
        payload = _strict_json((tmp_path / f"{name}.json").read_text())
        assert (tmp_path / f"{name}.md").read_text().startswith("# deformcp benchmark: ")
        assert payload["quick"] and payload["device"] == "cpu" and payload["repeat"] == 1
        assert f"python -m deformcp bench --quick --repeat 1 --warmup 0 --output {tmp_path}" in payload["command"]
        for key in ("deformcp", "processor", "cpu_count", "blas_overrides", "host_compiler", "torch", "threads"):
            assert key in payload["machine"], key
        tolerance = harness.benchmark(name).TOLERANCE["float32"]
        verified = {key.rpartition(": ")[2] for key in payload["verification"]}
        assert impls <= verified, (name, sorted(verified))
        for key, errors in payload["verification"].items():
            if "deformcp" in key.rpartition(": ")[2]:
                assert errors and all(0 <= e <= tolerance for e in errors.values()), (name, key, errors)
        timed = {(r["phase"], r["impl"]) for r in payload["results"]}
        assert {(phase, impl) for phase in ("forward", "forward+backward") for impl in impls} <= timed
        assert all(r["median_s"] > 0 and r["q25_s"] <= r["median_s"] <= r["q75_s"] for r in payload["results"])
        anchors = {r["impl"] for r in payload["results"] if not r["impl"].startswith("deformcp")}
        declared = set(payload.get("anchors", {}).values()) - {None}  # a benchmark with an anchor per case
        assert anchors == (declared or ({payload["baseline"]} if payload["baseline"] else set()))


def test_every_op_of_the_spec_table_is_timed_by_a_benchmark():
    """Each benchmark declares the ops it times (bench_<name>.OPS, names of deformcp.ops.SPECS), and together
    they cover the table: a new op needs a benchmark case (the smoke test above checks that they are called)."""
    covered = harness.covered_ops()
    assert list(covered) == list(harness.BENCHMARKS)
    missing = harness.untimed_ops(covered)
    assert not missing, (f"no benchmark times {', '.join(missing)}: add a case for it to a benchmarks/bench_<name>.py "
                         "(its OPS) and list a new benchmark in harness.BENCHMARKS")
    timed = [op for ops in covered.values() for op in ops]
    assert sorted(timed) == sorted(SPECS), covered    # each op once, and only ops of the table


def test_bench_list_and_ops_as_names(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, ops in harness.covered_ops().items():
        assert f"{name}  " in out and ", ".join(ops) in out
    assert harness.benchmarks_named(["mimic_loss", "grid_sample", "ps_roi_align", "roi_align"]) == (
        ["spatial_transformer", "roi_align", "mimic_loss"], [])
    assert harness.benchmarks_named(["deform_conv2d", "nope"]) == (["deform_conv"], ["nope"])


class Skewed:
    """A deliberately wrong implementation: ``impl`` with its output 1 % too large."""

    def __init__(self, impl):
        self.impl = impl

    def forward(self):
        return self.impl.forward() * 1.01

    def forward_backward(self):
        out, grads = self.impl.forward_backward()
        return out * 1.01, grads

    def __getattr__(self, name):  # gradients(), intermediates()
        return getattr(self.impl, name)


@pytest.mark.parametrize("name", harness.BENCHMARKS)
def test_a_wrong_implementation_fails_verification_and_is_not_timed(name, capsys):
    """Through each benchmark's own verification (the one its main runs before timing): deformcp's NumPy
    path passes, the same 1 % off fails, and a run given the wrong one times nothing."""
    bench = harness.benchmark(name)
    run = harness.Run.begin(bench.parser(), ["--quick", "--repeat", "1", "--warmup", "0"])
    args = run.args
    problem = bench.problems(args)[0]
    right = bench.build(run.setup, problem, args)["deformcp numpy"]
    errors = bench.verify(run.setup, problem, {"deformcp numpy": right}, args, [])
    assert errors and all(max(e.values()) < 1e-4 for e in errors.values())
    with pytest.raises(harness.VerificationFailed, match=r"deformcp skewed: output, .*not timing wrong code"):
        bench.verify(run.setup, problem, {"deformcp skewed": Skewed(right)}, args, [])
    assert not run.measure(problem, {"deformcp skewed": Skewed(right)}, bench.verify, ("forward",))
    assert run.records == [] and "verification failed" in capsys.readouterr().err


def test_bench_script_runs_from_the_checkout(tmp_path):
    """python benchmarks/bench_<name>.py: the harness and the checkout's deformcp from the script's folder."""
    script = PACKAGE_ROOT / "benchmarks" / "bench_deform_roi_pool.py"
    result = _subprocess([str(script), "--quick", "--repeat", "1", "--output", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    payload = _strict_json((tmp_path / "run.json").read_text())
    assert payload["benchmark"] == "run" and "bench_deform_roi_pool.py --quick" in payload["command"]
    assert f"wrote {tmp_path / 'run.json'}" in result.stdout


def test_background_load_keeps_cpus_busy_while_the_benchmark_runs(tmp_path):
    """--background-load 2: two other processes busy during the run (the harness's measure of other load sees
    them), gone when it exits."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(PACKAGE_ROOT / 'benchmarks')!r})\n"
        "import argparse, harness\n"
        "parser = argparse.ArgumentParser(); harness.add_arguments(parser, 'probe')\n"
        "args = parser.parse_args(['--background-load', '2'])\n"
        "harness.start(parser, args)\n"
        "load = harness.OtherLoad().start(); time.sleep(1.0)\n"
        "print(load.stop())\n")
    result = _subprocess([str(probe)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    busy = float(result.stdout.split()[-1])
    assert busy > 0.5 * min(2, os.cpu_count()) / os.cpu_count()
    for _ in range(50):  # killed at exit: gone within moments
        spinning = subprocess.run(["pgrep", "-f", "end = time.monotonic"], capture_output=True, text=True)
        if not spinning.stdout.strip():
            break
        time.sleep(0.1)
    assert spinning.stdout.strip() == ""


def test_interleaved_timing_takes_turns_and_reports_quartiles():
    calls = []
    timings = harness.measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                          repeat=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3     # warm-up of each, then one call of each per round
    for timing in timings.values():
        assert timing.repeat == 3 and timing.warmup == 1
        assert timing.min <= timing.q25 <= timing.median <= timing.q75 <= timing.max


def test_results_json_is_strict(tmp_path):
    json_path, md_path = harness.write_results(str(tmp_path / "r"), {"errors": {"output": float("inf")}}, "# r")
    assert _strict_json(json_path.read_text())["errors"] == {"output": "inf"}
    assert md_path.read_text() == "# r\n"


def test_bench_cuda_without_a_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(testing, "gpu_available", lambda: "CuPy is not installed")
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CuPy is not installed" in err and "Nothing timed" in err


@pytest.mark.skipif(testing.gpu_available() is None, reason="a GPU is present")
def test_bench_cuda_here_exits_2(capsys):
    assert cli.main(["bench", "--device", "cuda", "roi_align"]) == 2
    assert testing.gpu_available() in capsys.readouterr().err


def test_bench_help_names_benchmarks_options_and_the_blas_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m deformcp bench")
    for text in (*harness.BENCHMARKS, "--repeat", "--quick", "--interleave", "--output", "--device",
                 "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        assert text in out


def test_bench_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "no_such_op"])
    assert exit_.value.code == 2
    assert "unknown benchmark no_such_op" in capsys.readouterr().err


def test_the_checkout_benchmarks_are_the_package_deformcp_benchmarks():
    assert harness.__name__ == "deformcp.benchmarks.harness"
    assert pathlib.Path(harness.__file__).resolve() == PACKAGE_ROOT / "benchmarks" / "harness.py"
    assert harness.benchmark("roi_align").__name__ == "deformcp.benchmarks.bench_roi_align"


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
        for j in range(9):
            w2[9 * k + j, j, k // 3, k % 3] = 1.0                             # channel 9k + j: tap k of map j
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
    result = _subprocess(["-c", code], tmp_path)
    assert result.returncode == 2, result.stderr
    assert viz.MISSING_MATPLOTLIB in result.stderr
    assert viz.MISSING_MATPLOTLIB == "python -m deformcp viz needs matplotlib: pip install 'deformcp[viz]'"
    assert not (tmp_path / "out.png").exists()


def test_importing_bench_and_viz_loads_neither_matplotlib_nor_torch(tmp_path):
    heavy = ("matplotlib", "torch", "torchvision", "cupy")
    code = f"import sys, deformcp.__main__ as cli, deformcp.viz; cli.benchmarks_harness(); print([m for m in {heavy} " \
           "if m in sys.modules])"
    result = _subprocess(["-c", code], tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
