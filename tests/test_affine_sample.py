"""affine_sample: grid_sample(input, affine_grid(theta, size)) without the grid, against the two-step form on every
backend, against torch's, by finite differences; theta's gradient reproducible bitwise; no grid in memory."""
import itertools
import tracemalloc

import numpy as np
import pytest

import deformcp
from deformcp import testing

from conftest import directional_derivative, to_backend

CONFIGS = list(itertools.product((False, True), ("bilinear", "nearest", "bicubic"), ("zeros", "border", "reflection"),
                                 (False, True)))


def ids(configs):
    return [f"{'volume' if v else 'image'}-{m}-{p}-{'align' if a else 'noalign'}" for v, m, p, a in configs]


def problem(rng, volume, size_given=True):
    """(input, theta near the identity, output size) of an image (2, 3, 7, 9) or a volume (2, 3, 4, 5, 6)."""
    if volume:
        identity, x, size = np.eye(3, 4), rng.standard_normal((2, 3, 4, 5, 6)), (2, 3, 3, 4, 5)
    else:
        identity, x, size = np.eye(2, 3), rng.standard_normal((2, 3, 7, 9)), (2, 3, 6, 8)
    theta = identity + 0.4 * rng.standard_normal((2, *identity.shape))
    return x, theta, size if size_given else None


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("volume, mode, padding, align", CONFIGS, ids=ids(CONFIGS))
def test_equals_the_two_step_form(any_backend, rng, volume, mode, padding, align, deterministic):
    x, theta, size = problem(rng, volume, size_given=mode != "nearest")
    grid = deformcp.affine_grid(theta, x.shape if size is None else size, align)
    expected = deformcp.grid_sample(x, grid, mode, padding, align)
    grad_output = rng.standard_normal(expected.shape)
    grad_input, grad_grid = deformcp.grid_sample_backward(grad_output, x, grid, mode, padding, align)
    grad_theta = deformcp.affine_grid_backward(grad_grid, theta, x.shape if size is None else size, align).theta
    x_b, theta_b, g_b = (to_backend(a, any_backend) for a in (x, theta, grad_output))
    out = testing.run(any_backend, deformcp.affine_sample, x_b, theta_b, size, mode, padding, align)
    grads = testing.run(any_backend, deformcp.affine_sample_backward, g_b, x_b, theta_b, size, mode, padding, align,
                        deterministic=deterministic)
    for got, want in ((out, expected), (grads.input, grad_input), (grads.theta, grad_theta)):
        np.testing.assert_allclose(testing.to_numpy(got), want, rtol=1e-12, atol=1e-12)


TORCH_CONFIGS = [c for c in CONFIGS if not (c[0] and c[1] == "bicubic")]  # torch has no tricubic


@pytest.mark.parametrize("volume, mode, padding, align", TORCH_CONFIGS[::3], ids=ids(TORCH_CONFIGS[::3]))
def test_matches_torch(rng, volume, mode, padding, align):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, theta, size = problem(rng, volume)
    tx, ttheta = torch.tensor(x, requires_grad=True), torch.tensor(theta, requires_grad=True)
    out = F.grid_sample(tx, F.affine_grid(ttheta, size, align_corners=align), mode, padding, align)
    grad_output = rng.standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(deformcp.affine_sample(x, theta, size, mode, padding, align), out.detach().numpy(),
                               atol=1e-12)
    grads = deformcp.affine_sample_backward(grad_output, x, theta, size, mode, padding, align)
    np.testing.assert_allclose(grads.input, tx.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(grads.theta, ttheta.grad.numpy(), atol=1e-11)


@pytest.mark.parametrize("volume, mode", [(False, "bilinear"), (False, "bicubic"), (True, "bilinear")])
def test_finite_differences(rng, volume, mode):
    x, theta, size = problem(rng, volume)
    grad_output = rng.standard_normal((2, 3, *size[2:]))
    grads = deformcp.affine_sample_backward(grad_output, x, theta, size, mode, "reflection")

    def loss(x, theta):
        return np.sum(grad_output * deformcp.affine_sample(x, theta, size, mode, "reflection"))

    for index, grad in enumerate(grads):
        direction = rng.standard_normal(grad.shape)
        numeric = directional_derivative(loss, (x, theta), index, direction)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("volume", [False, True])
def test_theta_gradient_is_reproducible_bitwise(backend, rng, volume):
    """theta's gradient is reduced in a fixed order, also where the input gradient is scattered with atomics."""
    x, theta, size = problem(rng, volume)
    x, theta = x.astype(np.float32), theta.astype(np.float32)
    grad_output = rng.standard_normal((2, 3, *size[2:])).astype(np.float32)
    args = [to_backend(a, backend) for a in (grad_output, x, theta)]
    first, second = (testing.to_numpy(testing.run(backend, deformcp.affine_sample_backward, *args, size).theta)
                     for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_keeps_no_grid_in_memory(rng):
    """On the host backend the fused forward and backward allocate less than the grid that the two-step form
    stores (N·H_out·W_out·2 values)."""
    if testing.backend_problem("host"):
        pytest.skip(testing.backend_problem("host"))
    x, theta = rng.standard_normal((1, 1, 8, 8)), np.eye(2, 3)[None]
    size = (1, 1, 256, 256)
    grid_bytes = 256 * 256 * 2 * 8
    grad_output = rng.standard_normal((1, 1, 256, 256))
    with deformcp.backend("host"):
        deformcp.affine_sample_backward(grad_output, x, theta, size)  # compiled before measuring
        for call in (lambda: deformcp.affine_sample(x, theta, size),
                     lambda: deformcp.affine_sample_backward(grad_output, x, theta, size)):
            tracemalloc.start()
            call()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            output_bytes = 256 * 256 * 8
            assert peak < output_bytes + grid_bytes / 2, peak


def test_bad_input(rng):
    x, theta = rng.standard_normal((2, 3, 4, 5)), np.zeros((2, 2, 3))
    volume = rng.standard_normal((2, 3, 4, 4, 4))
    cases = [
        (ValueError, r"theta: expected shape \(N, 3, 4\) for input \(N, C, D, H, W\)",
         lambda: deformcp.affine_sample(volume, theta)),
        (ValueError, r"theta: expected shape \(N, 2, 3\) for input \(N, C, H, W\)",
         lambda: deformcp.affine_sample(x, np.zeros((2, 3, 4)))),
        (ValueError, r"theta: expected batch size N = 2 \(input's\), got 1",
         lambda: deformcp.affine_sample(x, theta[:1])),
        (TypeError, r"expected arrays of one dtype: input is float64, theta is float32",
         lambda: deformcp.affine_sample(x, theta.astype(np.float32))),
        (ValueError, r"size: expected 4 integers, got 5", lambda: deformcp.affine_sample(x, theta, (2, 3, 4, 5, 6))),
        (ValueError, r"size: expected N = 2", lambda: deformcp.affine_sample(x, theta, (3, 3, 4, 5))),
        (ValueError, r"padding_mode: expected one of", lambda: deformcp.affine_sample(x, theta, padding_mode="wrap")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
