"""mimic_loss: golden values, finite differences, backend parity, zero-norm rows, extreme magnitudes,
non-finite input, bad input."""

import numpy as np
import pytest

import deformcp
from deformcp import _kernels, testing
from deformcp.ops import mimic_loss as M

from conftest import _require, assert_close, noncontiguous, run_both, to_backend

mimic_loss, mimic_loss_backward = M.mimic_loss, M.mimic_loss_backward

DTYPES = testing.dtypes()
SQRT_HALF = np.sqrt(0.5)


@pytest.fixture(params=["numpy", "host", "cuda"])
def where(request):
    """Every path: the NumPy reference, the host backend, CUDA (skipped without a GPU)."""
    if request.param != "numpy":
        _require(request.param)
    return request.param


def call(where, fn, *args, **kwargs):
    """fn on the path `where`, NumPy array arguments moved there."""
    moved = [to_backend(a, where) if isinstance(a, np.ndarray) else a for a in args]
    return testing.run(where, fn, *moved, **kwargs)


def features(rng, K, D, dtype="float64"):
    """Random (K, D) pairs with an all-zero row in each (where K allows) and rows far from unit scale."""
    f_a, f_b = rng.standard_normal((2, K, D))
    if K > 3:
        f_a[1] = 0
        f_b[3] = 0
    if K > 5:
        f_a[4] *= 1e3
        f_b[5] *= 1e-3
    return f_a.astype(dtype), f_b.astype(dtype)


# ------------------------------------------------------------------------------------------ golden values

# (f_a row, f_b row, loss, ∂L/∂f_a, ∂L/∂f_b) with ∂L/∂a = cos·a/|a|² − b/(|a||b|)
GOLDEN = {
    "parallel": ([1, 2, 2], [3, 6, 6], 0.0, [0, 0, 0], [0, 0, 0]),
    "opposite": ([1, -1, 0.5], [-2, 2, -1], 2.0, [0, 0, 0], [0, 0, 0]),
    "orthogonal": ([1, 0, 0], [0, 2, 0], 1.0, [0, -1, 0], [-0.5, 0, 0]),
    "45 degrees": ([1, 0, 0], [1, 1, 0], 1 - SQRT_HALF, [0, -SQRT_HALF, 0], [-SQRT_HALF / 2, SQRT_HALF / 2, 0]),
    "zero f_a": ([0, 0, 0], [1, 2, 3], 1.0, [0, 0, 0], [0, 0, 0]),
    "zero f_b": ([-1, 5, 2], [0, -0.0, 0], 1.0, [0, 0, 0], [0, 0, 0]),
    "both zero": ([0, 0, 0], [0, 0, 0], 1.0, [0, 0, 0], [0, 0, 0]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_row(where, case, dtype):
    a, b, loss, grad_a, grad_b = GOLDEN[case]
    f_a, f_b = np.array([a], dtype), np.array([b], dtype)
    tolerance = 1e-15 if dtype == "float64" else 1e-6
    out = call(where, mimic_loss, f_a, f_b)
    assert out.shape == () and out.dtype == dtype
    assert float(out) == pytest.approx(loss, abs=tolerance)
    grads = call(where, mimic_loss_backward, np.array(2.0, dtype), f_a, f_b)
    assert isinstance(grads, M.MimicLossGrads)
    np.testing.assert_allclose(testing.to_numpy(grads.f_a), [2 * np.array(grad_a)], atol=tolerance)
    np.testing.assert_allclose(testing.to_numpy(grads.f_b), [2 * np.array(grad_b)], atol=tolerance)


def test_golden_sum(where):
    f_a = np.array([GOLDEN[case][0] for case in GOLDEN], dtype=np.float64)
    f_b = np.array([GOLDEN[case][1] for case in GOLDEN], dtype=np.float64)
    assert float(call(where, mimic_loss, f_a, f_b)) == pytest.approx(7 - SQRT_HALF, abs=1e-14)
    grads = call(where, mimic_loss_backward, np.array(-1.0), f_a, f_b)
    np.testing.assert_allclose(grads.f_a, -np.array([GOLDEN[case][3] for case in GOLDEN]), atol=1e-15)
    np.testing.assert_allclose(grads.f_b, -np.array([GOLDEN[case][4] for case in GOLDEN]), atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_and_power_of_two_rows_are_exact(where, rng, dtype):
    """a = b gives exactly 0 and gradient exactly 0; b = 2^k·a too (power-of-two scaling is exact)."""
    # |entries| in [0.5, 4]: divided by 1024 they stay normal numbers even in float16
    f_a = (rng.uniform(0.5, 4, (40, 13)) * rng.choice([-1, 1], (40, 13))).astype(dtype)
    for f_b in (f_a.copy(), (f_a.astype(np.float64) * 8).astype(dtype), (f_a.astype(np.float64) / 1024).astype(dtype)):
        assert float(call(where, mimic_loss, f_a, f_b)) == 0.0
        grads = call(where, mimic_loss_backward, np.array(1.0, dtype), f_a, f_b)
        assert np.all(testing.to_numpy(grads.f_a).astype(np.float64) == 0)
        assert np.all(testing.to_numpy(grads.f_b).astype(np.float64) == 0)


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    f_a, f_b = rng.standard_normal((2, 12, 9))
    ta, tb = torch.tensor(f_a, requires_grad=True), torch.tensor(f_b, requires_grad=True)
    loss = (1 - torch.nn.functional.cosine_similarity(ta, tb, dim=1)).sum()
    loss.backward(torch.tensor(0.7, dtype=torch.float64))
    assert float(mimic_loss(f_a, f_b)) == pytest.approx(loss.item(), rel=1e-14)
    grads = mimic_loss_backward(np.array(0.7), f_a, f_b)
    np.testing.assert_allclose(grads.f_a, ta.grad.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grads.f_b, tb.grad.numpy(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------- finite differences (float64)

@pytest.mark.parametrize("trial", range(4))
def test_finite_differences(rng, trial):
    f_a, f_b = features(rng, 7, 11)
    g = rng.standard_normal(())
    grads = mimic_loss_backward(g, f_a, f_b)
    zero_rows = {0: ~np.any(f_a, axis=1), 1: ~np.any(f_b, axis=1)}
    assert zero_rows[0].any() and zero_rows[1].any()
    assert np.all(grads.f_a[zero_rows[0] | zero_rows[1]] == 0)
    assert np.all(grads.f_b[zero_rows[0] | zero_rows[1]] == 0)
    for index, grad in enumerate(grads):
        # a zero feature turns into a direction when perturbed (the loss jumps from 1 to 1 − cos): its own
        # rows are left out; the other input's rows facing it are kept (the loss stays 1 there: gradient 0)
        # each row's step in proportion to the row (rows of 1e-3 and 1e3 alike): truncation error ~1e-12
        direction = rng.standard_normal(grad.shape) * np.abs((f_a, f_b)[index]).max(axis=1, keepdims=True)
        direction[zero_rows[index]] = 0
        step = 1e-6
        args_plus, args_minus = [f_a, f_b], [f_a, f_b]
        args_plus[index] = args_plus[index] + step * direction
        args_minus[index] = args_minus[index] - step * direction
        numeric = g * (mimic_loss(*args_plus) - mimic_loss(*args_minus)) / (2 * step)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


# ------------------------------------------------------------------------------------ backends vs NumPy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, D", [(1, 1), (9, 37), (300, 5)])
def test_backend_matches_numpy(backend, rng, dtype, K, D):
    f_a, f_b = features(rng, K, D, dtype)
    out, expected = run_both(backend, mimic_loss, f_a, f_b)
    assert out.shape == expected.shape == () and out.dtype == expected.dtype == dtype
    assert_close(out, expected, dtype)
    grad_output = np.array(rng.standard_normal(), dtype)
    grads, expected_grads = run_both(backend, mimic_loss_backward, grad_output, f_a, f_b)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape == (K, D) and got.dtype == want.dtype == dtype
        assert_close(got, want, dtype)
    again = testing.run(backend, mimic_loss_backward, *(to_backend(a, backend) for a in (grad_output, f_a, f_b)))
    for first, second in zip(grads, again):  # one thread per row, no atomics: bitwise reproducible
        np.testing.assert_array_equal(testing.to_numpy(first), testing.to_numpy(second))


def test_matches_float64_reference(rng):
    """The NumPy path in each dtype (float16 and bfloat16 computed in float32) against float64."""
    for dtype in DTYPES:
        f_a, f_b = features(rng, 20, 16, dtype)
        reference = mimic_loss(f_a.astype(np.float64), f_b.astype(np.float64))
        assert_close(mimic_loss(f_a, f_b), reference, dtype)
        g = np.array(0.5, dtype)
        for got, want in zip(mimic_loss_backward(g, f_a, f_b),
                             mimic_loss_backward(g.astype(np.float64), f_a.astype(np.float64), f_b.astype(np.float64))):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype, scales", [
    ("float32", (1e30, 1e-30)), ("float32", (1e-25, 1e-25)),
    ("float64", (1e300, 1e-300)), ("float64", (1e-300, 1e-300)),
])
def test_extreme_magnitudes(where, rng, dtype, scales):
    """Rows whose |a|²·|b|² over- or underflows the naive formula: cos is scale-invariant, the gradient
    scales as 1/s."""
    x, y = rng.standard_normal((2, 6, 10))
    f_a, f_b = (x * scales[0]).astype(dtype), (y * scales[1]).astype(dtype)
    with np.errstate(all="ignore"):
        naive = np.sum(f_a * f_a, axis=1) * np.sum(f_b * f_b, axis=1)
    assert not np.any(np.isfinite(naive) & (naive > 0))  # |a|²·|b|² is inf, NaN or 0 in dtype
    # the reference: unscaled values (as rounded to dtype) in float64
    x, y = f_a.astype(np.float64) / scales[0], f_b.astype(np.float64) / scales[1]
    assert_close(call(where, mimic_loss, f_a, f_b), mimic_loss(x, y), dtype)
    grads = call(where, mimic_loss_backward, np.array(1.0, dtype), f_a, f_b)
    expected = mimic_loss_backward(np.array(1.0), x, y)
    for got, want, scale in zip(grads, expected, scales):
        got = testing.to_numpy(got).astype(np.float64) * scale
        assert np.all(np.isfinite(got))
        assert_close(got, want, dtype)


@pytest.mark.parametrize("D", [5, 0])
def test_no_rows(backend, rng, monkeypatch, D):
    """K = 0: the loss is 0 and the gradients are empty, without compiling or launching a kernel."""
    def no_kernels(*args, **kwargs):
        raise AssertionError("a kernel was launched for K = 0")

    monkeypatch.setattr(_kernels, "get_function", no_kernels)
    f = np.zeros((0, D), np.float32)
    out, expected = run_both(backend, mimic_loss, f, f)
    assert out.shape == expected.shape == () and float(out) == float(expected) == 0.0 and out.dtype == np.float32
    grads, _ = run_both(backend, mimic_loss_backward, np.array(1.0, np.float32), f, f)
    assert grads.f_a.shape == grads.f_b.shape == (0, D)


def test_empty_features(where):
    """D = 0: every row is a zero-norm row (loss 1, no gradient entries)."""
    f = np.zeros((4, 0))
    assert float(call(where, mimic_loss, f, f)) == 4.0
    grads = call(where, mimic_loss_backward, np.array(1.0), f, f)
    assert grads.f_a.shape == grads.f_b.shape == (4, 0)


def test_noncontiguous_inputs(where, rng):
    f_a, f_b = features(rng, 9, 7)
    a_view, b_view = (noncontiguous(to_backend(a, where)) for a in (f_a, f_b))
    transposed = to_backend(np.asfortranarray(f_b), where)  # column-major
    grad_output = to_backend(np.array([0.0, 1.25, 0.0]), where)[1, ...]  # a 0-d view into a larger buffer
    with deformcp.backend("numpy" if where == "cuda" else where):
        out = mimic_loss(a_view, transposed)
        grads = mimic_loss_backward(grad_output, a_view, b_view)
    assert_close(out, mimic_loss(f_a, f_b), "float64")
    for got, want in zip(grads, mimic_loss_backward(np.array(1.25), f_a, f_b)):
        assert_close(got, want, "float64")


def test_numpy_scalar_grad_output(where, rng):
    f_a, f_b = features(rng, 3, 4, "float32")
    grads = call(where, mimic_loss_backward, np.float32(2.0), f_a, f_b)
    for got, want in zip(grads, mimic_loss_backward(np.array(2.0, np.float32), f_a, f_b)):
        assert_close(got, want, "float32")


# --------------------------------------------------------------------------- non-finite input

NAN, INF = np.nan, np.inf

# (f_a row, f_b row) that must give NaN: NaN and ±inf are never hidden, not even by the zero-norm rule
NONFINITE = {
    "nan in f_a": ([1, NAN, 2], [1, 2, 3]),
    "nan in f_b": ([1, 2, 3], [NAN, 0, 0]),
    "inf in f_a": ([INF, 1, 2], [1, 2, 3]),
    "-inf in f_b, no overlap": ([0, 1, 2], [-INF, 0, 0]),
    "zero f_a, nan in f_b": ([0, 0, 0], [1, NAN, 3]),
    "nan in f_a, zero f_b": ([NAN, 0, 0], [0, 0, 0]),
    "zero f_a, inf in f_b": ([0, 0, 0], [0, INF, 0]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_propagates(where, rng, case, dtype):
    a, b = NONFINITE[case]
    good_a, good_b = rng.standard_normal((2, 3))
    while abs(good_a @ good_b) > 0.9 * np.linalg.norm(good_a) * np.linalg.norm(good_b):
        # a nearly parallel pair's gradient is a difference of nearly equal terms: too ill-conditioned to
        # hold float32 to float64 within the tolerance
        good_a, good_b = rng.standard_normal((2, 3))
    f_a, f_b = np.array([good_a, a, [0, 0, 0]], dtype), np.array([good_b, b, [1, 2, 3]], dtype)
    assert np.isnan(float(call(where, mimic_loss, f_a, f_b)))
    grads = call(where, mimic_loss_backward, np.array(1.0, dtype), f_a, f_b)
    expected = mimic_loss_backward(np.array(1.0), f_a[[0, 2]].astype(np.float64), f_b[[0, 2]].astype(np.float64))
    for got, want in zip(grads, expected):
        got = testing.to_numpy(got).astype(np.float64)
        assert np.all(np.isnan(got[1])), "the non-finite row's gradient must be NaN"
        assert_close(got[[0, 2]], want, dtype)  # the other rows, the zero-norm row too, are unaffected


def test_nonfinite_grad_output(where, rng):
    f_a, f_b = features(rng, 6, 4)
    for g in (np.nan, np.inf):  # zero-norm rows too: their gradient is 0·g
        for grad in call(where, mimic_loss_backward, np.array(g), f_a, f_b):
            assert not np.any(np.isfinite(testing.to_numpy(grad)))


# ------------------------------------------------------------------------------------------- frameworks

def test_torch_round_trip(where):
    torch = pytest.importorskip("torch")
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    device = "cuda" if where == "cuda" else "cpu"
    f_a = torch.tensor([[1.0, 0.0], [1.0, 2.0]], device=device)
    f_b = torch.tensor([[0.0, 3.0], [2.0, 4.0]], device=device)
    with deformcp.backend("numpy" if where == "cuda" else where):
        out = mimic_loss(f_a, f_b)
        grads = mimic_loss_backward(torch.tensor(1.0, device=device), f_a, f_b)
    assert isinstance(out, torch.Tensor) and out.shape == () and out.item() == pytest.approx(1.0)
    assert isinstance(grads.f_a, torch.Tensor) and grads.f_a.shape == (2, 2)
    np.testing.assert_allclose(grads.f_a.cpu().numpy(), [[0, -1], [0, 0]], atol=1e-7)


def test_parity_check_passes():
    results = testing.check(ops=["mimic_loss"])
    assert results and all(r.ok for r in results), testing.format_results(results)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    f_a, f_b = rng.standard_normal((2, 3, 4))
    g = np.array(1.0)
    cases = [
        (ValueError, r"f_a: expected a 2-D array \(K, D\), got shape \(4,\)",
         lambda: mimic_loss(f_a[0], f_b[0])),
        (ValueError, r"f_b: expected a 2-D array \(K, D\), got shape \(1, 3, 4\)",
         lambda: mimic_loss(f_a, f_b[None])),
        (ValueError, r"f_b: expected shape \(3, 4\) for \(K, D\), f_a's shape, got \(3, 5\)",
         lambda: mimic_loss(f_a, np.zeros((3, 5)))),
        (ValueError, r"f_b: expected shape \(3, 4\) for \(K, D\), f_a's shape, got \(2, 4\)",
         lambda: mimic_loss_backward(g, f_a, f_b[:2])),
        (TypeError, r"f_a: expected a floating-point array .*got dtype int64",
         lambda: mimic_loss(f_a.astype(np.int64), f_b)),
        (TypeError, r"f_b: expected a floating-point array .*got dtype bool",
         lambda: mimic_loss(f_a, f_b > 0)),
        (TypeError, r"expected arrays of one dtype: f_a is float32, f_b is float64",
         lambda: mimic_loss(f_a.astype(np.float32), f_b)),
        (TypeError, r"f_a: expected an array .*got builtins.str",
         lambda: mimic_loss("f_a", f_b)),
        (ValueError, r"grad_output: expected a 0-D array \(\) \(the loss is a scalar\), got shape \(1,\)",
         lambda: mimic_loss_backward(np.ones(1), f_a, f_b)),
        (ValueError, r"grad_output: expected a 0-D array .*got shape \(3, 4\)",
         lambda: mimic_loss_backward(np.ones((3, 4)), f_a, f_b)),
        (TypeError, r"grad_output: expected a floating-point array .*got dtype int64",
         lambda: mimic_loss_backward(np.array(1), f_a, f_b)),
        (TypeError, r"expected arrays of one dtype: grad_output is float32, f_a is float64",
         lambda: mimic_loss_backward(np.array(1.0, np.float32), f_a, f_b)),
        (TypeError, r"grad_output: expected an array .*got builtins.str",
         lambda: mimic_loss_backward("g", f_a, f_b)),
        (ValueError, r"needs_input_grad: expected 2 bools for \('f_a', 'f_b'\)",
         lambda: mimic_loss_backward(g, f_a, f_b, needs_input_grad=(True,))),
    ]
    for error, message, fn in cases:
        with pytest.raises(error, match=message):
            fn()


def test_rejects_mixed_frameworks(rng):
    torch = pytest.importorskip("torch")
    f_a, f_b = rng.standard_normal((2, 3, 4))
    with pytest.raises(TypeError, match="all arrays of one call must come from one framework"):
        mimic_loss(torch.tensor(f_a), f_b)


def test_host_backend_rejects_bad_input_too(rng):
    with deformcp.backend("host"), pytest.raises(ValueError, match=r"f_b: expected shape \(2, 3\)"):
        mimic_loss(rng.standard_normal((2, 3)), rng.standard_normal((3, 2)))
