"""deformcp.jax: every op through jax.custom_vjp + jax.pure_callback, on JAX's CPU backend, in float64.

For each op: the forward equals the deformcp (NumPy) function, jax.grad of a random linear functional
matches directional central finite differences for each differentiable argument, and jax.jit gives the
results of the eager calls. Inputs are placed away from the kinks of bilinear sampling (sample
coordinates at least 0.15 pixel from every integer and half-integer), so the finite differences are
those of a smooth function. The CUDA route cannot run here; its plumbing is checked with a stand-in for
CuPy.
"""
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import deformcp  # noqa: E402
import deformcp.jax as djax  # noqa: E402

from conftest import directional_derivative  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 in JAX for this module only (restored afterwards)."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def safe_fraction(rng, shape):
    """Fractional parts at least 0.15 from 0, 0.5 and 1: in [0.15, 0.35] or [0.65, 0.85]."""
    f = rng.uniform(0.15, 0.35, shape)
    return np.where(rng.random(shape) < 0.5, f, f + 0.5)


def safe_shift(rng, shape, low=-1, high=1):
    """Pixel shifts n + f, n an integer in [low, high], f a safe fraction."""
    return rng.integers(low, high + 1, shape) + safe_fraction(rng, shape)


class Case(NamedTuple):
    jax_fn: Callable       # arrays -> JAX array
    numpy_fn: Callable     # arrays -> NumPy array (the deformcp function)
    arrays: tuple          # NumPy float64 arrays (None kept)
    diff: tuple            # indices of the differentiable arrays


# ------------------------------------------------------------------------------------------------ cases

def affine_grid_case(rng, align_corners):
    size = (2, 3, 4, 5)
    return Case(lambda t: djax.affine_grid(t, size, align_corners),
                lambda t: deformcp.affine_grid(t, size, align_corners),
                (rng.standard_normal((2, 2, 3)),), (0,))


def grid_sample_case(rng, mode, padding_mode, align_corners):
    N, C, H, W, Ho, Wo = 2, 3, 5, 6, 4, 3
    # Pixel coordinates in [-1, size) at safe fractions, normalised back.
    x = rng.integers(-1, W, (N, Ho, Wo)) + safe_fraction(rng, (N, Ho, Wo))
    y = rng.integers(-1, H, (N, Ho, Wo)) + safe_fraction(rng, (N, Ho, Wo))
    if align_corners:
        gx, gy = 2 * x / (W - 1) - 1, 2 * y / (H - 1) - 1
    else:
        gx, gy = (2 * x + 1) / W - 1, (2 * y + 1) / H - 1
    options = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return Case(lambda i, g: djax.grid_sample(i, g, **options), lambda i, g: deformcp.grid_sample(i, g, **options),
                (rng.standard_normal((N, C, H, W)), np.stack([gx, gy], axis=-1)), (0, 1))


def random_boxes(rng, N, H, W, K):
    x1, y1 = rng.uniform(-2, W - 2, K), rng.uniform(-2, H - 2, K)
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + rng.uniform(1, W, K), y1 + rng.uniform(1, H, K)], axis=1)


def roi_align_case(rng, aligned, sampling_ratio):
    options = dict(output_size=(2, 3), spatial_scale=0.8, sampling_ratio=sampling_ratio, aligned=aligned)
    return Case(lambda i, b: djax.roi_align(i, b, **options), lambda i, b: deformcp.roi_align(i, b, **options),
                (rng.standard_normal((2, 4, 7, 8)), random_boxes(rng, 2, 7, 8, 5)), (0,))


def ps_roi_align_case(rng):
    options = dict(output_size=(2, 3), spatial_scale=0.8, sampling_ratio=2)
    return Case(lambda i, b: djax.ps_roi_align(i, b, **options), lambda i, b: deformcp.ps_roi_align(i, b, **options),
                (rng.standard_normal((2, 2 * 2 * 3, 7, 8)), random_boxes(rng, 2, 7, 8, 5)), (0,))


def deform_conv2d_case(rng, modulated):
    # groups 2, offset groups 2, kernel 3×3, stride (2, 1), padding 1, dilation (1, 2): H_out = W_out = 3.
    N, C, H, W, C_out, G = 2, 4, 6, 5, 4, 2
    options = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    input, weight = rng.standard_normal((N, C, H, W)), rng.standard_normal((C_out, C // 2, 3, 3))
    offset = safe_shift(rng, (N, 2 * G * 9, 3, 3), -2, 1)  # taps sit at integers: samples stay off them
    bias = rng.standard_normal(C_out) if modulated else None
    mask = rng.uniform(0.2, 1.0, (N, G * 9, 3, 3)) if modulated else None
    return Case(lambda i, o, w, b, m: djax.deform_conv2d(i, o, w, b, mask=m, **options),
                lambda i, o, w, b, m: deformcp.deform_conv2d(i, o, w, b, mask=m, **options),
                (input, offset, weight, bias, mask), (0, 1, 2) + ((3, 4) if modulated else ()))


def deform_roi_pool_case(rng, modulated):
    # RoIs of (PH·s) × (PW·s) pixels at integer corners: every sample sits at corner + integer + γ·size·Δ,
    # so offsets Δ = (n + f) / (γ·size) put all samples at safe fractions.
    K, PH, PW, s, gamma = 4, 2, 3, 2, 0.1
    x1, y1 = rng.integers(0, 4, K), rng.integers(0, 4, K)
    rois = np.stack([rng.integers(0, 2, K), x1, y1, x1 + PW * s, y1 + PH * s], axis=1).astype(np.float64)
    offset = np.stack([safe_shift(rng, (K, PH, PW)) / (gamma * PW * s),
                       safe_shift(rng, (K, PH, PW)) / (gamma * PH * s)], axis=1)
    mask = rng.uniform(0.2, 1.0, (K, 1, PH, PW)) if modulated else None
    options = dict(output_size=(PH, PW), spatial_scale=1.0, sampling_ratio=s, gamma=gamma)
    return Case(lambda i, r, o, m: djax.deform_roi_pool(i, r, o, mask=m, **options),
                lambda i, r, o, m: deformcp.deform_roi_pool(i, r, o, mask=m, **options),
                (rng.standard_normal((2, 3, 8, 9)), rois, offset, mask), (0, 2) + ((3,) if modulated else ()))


def deform_ps_roi_pool_case(rng, no_trans):
    # RoIs P·spp pixels wide at integer corners (sub-bins of 1 pixel): samples at corner − 0.5 + integer +
    # trans_std·size·Δ; Δ = (n + f + 0.5) / (trans_std·size) puts them at safe fractions (away from the
    # integer clamps and the half-integer skip borders).
    K, P, spp, trans_std, classes = 4, 2, 2, 0.1, 2
    size = P * spp
    x1, y1 = rng.integers(0, 5, K), rng.integers(0, 4, K)
    rois = np.stack([rng.integers(0, 2, K), x1, y1, x1 + size - 1, y1 + size - 1], axis=1).astype(np.float64)
    offset = None if no_trans else (safe_shift(rng, (K, 2 * classes, P, P)) + 0.5) / (trans_std * size)
    options = dict(output_dim=2, group_size=2, pooled_size=P, part_size=P, sample_per_part=spp, spatial_scale=1.0,
                   trans_std=trans_std, no_trans=no_trans)
    return Case(lambda i, r, o: djax.deform_ps_roi_pool(i, r, o, **options),
                lambda i, r, o: deformcp.deform_ps_roi_pool(i, r, o, **options),
                (rng.standard_normal((2, 2 * 2 * 2, 8, 9)), rois, offset), (0,) if no_trans else (0, 2))


def mimic_loss_case(rng):
    return Case(djax.mimic_loss, deformcp.mimic_loss, tuple(rng.standard_normal((2, 5, 7))), (0, 1))


CASES = {
    "affine_grid": lambda rng: affine_grid_case(rng, False),
    "affine_grid-align_corners": lambda rng: affine_grid_case(rng, True),
    "grid_sample-bilinear-zeros": lambda rng: grid_sample_case(rng, "bilinear", "zeros", False),
    "grid_sample-bilinear-border-align_corners": lambda rng: grid_sample_case(rng, "bilinear", "border", True),
    "grid_sample-bilinear-reflection": lambda rng: grid_sample_case(rng, "bilinear", "reflection", False),
    "grid_sample-nearest-zeros-align_corners": lambda rng: grid_sample_case(rng, "nearest", "zeros", True),
    "roi_align-aligned": lambda rng: roi_align_case(rng, True, 2),
    "roi_align-adaptive": lambda rng: roi_align_case(rng, False, -1),
    "ps_roi_align": ps_roi_align_case,
    "deform_conv2d-v1": lambda rng: deform_conv2d_case(rng, False),
    "deform_conv2d-v2": lambda rng: deform_conv2d_case(rng, True),
    "deform_roi_pool": lambda rng: deform_roi_pool_case(rng, False),
    "deform_roi_pool-mask": lambda rng: deform_roi_pool_case(rng, True),
    "deform_ps_roi_pool": lambda rng: deform_ps_roi_pool_case(rng, False),
    "deform_ps_roi_pool-no_trans": lambda rng: deform_ps_roi_pool_case(rng, True),
    "mimic_loss": mimic_loss_case,
}


@pytest.fixture(params=list(CASES))
def case(request, rng):
    return CASES[request.param](rng)


def functional(case, rng):
    """A random linear functional of the op's output, and its weights."""
    weights = rng.standard_normal(np.shape(case.numpy_fn(*case.arrays)))
    return (lambda *arrays: jnp.sum(weights * case.jax_fn(*arrays))), weights


# ------------------------------------------------------------------------------------------------ tests

def test_forward_equals_numpy(case):
    actual = case.jax_fn(*case.arrays)
    expected = case.numpy_fn(*case.arrays)
    assert isinstance(actual, jax.Array) and actual.dtype == expected.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(actual), expected)


def test_grad_matches_finite_differences(case, rng):
    loss, _ = functional(case, rng)
    grads = jax.grad(loss, argnums=case.diff)(*case.arrays)
    for index, grad in zip(case.diff, grads):
        direction = rng.standard_normal(case.arrays[index].shape)
        numeric = directional_derivative(lambda *a: float(loss(*a)), case.arrays, index, direction)
        analytic = float(np.sum(np.asarray(grad) * direction))
        assert grad.shape == case.arrays[index].shape
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (index, analytic, numeric)


def test_jit_equals_eager(case, rng):
    loss, _ = functional(case, rng)
    np.testing.assert_array_equal(np.asarray(jax.jit(case.jax_fn)(*case.arrays)),
                                  np.asarray(case.jax_fn(*case.arrays)))
    eager = jax.grad(loss, argnums=case.diff)(*case.arrays)
    jitted = jax.jit(jax.grad(loss, argnums=case.diff))(*case.arrays)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


def test_max_pooling_gradient_equals_deformcp_backward(rng):
    """mmcv's max RoIAlign: piecewise linear in the input (no finite differences across its ties): the VJP
    is deformcp's backward, under jit too."""
    input, boxes = rng.standard_normal((2, 4, 7, 8)), random_boxes(rng, 2, 7, 8, 5)
    options = dict(output_size=(2, 3), spatial_scale=0.8, sampling_ratio=2, aligned=False, pool_mode="max")
    weights = rng.standard_normal((5, 4, 2, 3))
    expected = deformcp.roi_align_backward(weights, input, boxes, **options).input
    grad = jax.jit(jax.grad(lambda x: jnp.sum(weights * djax.roi_align(x, boxes, **options))))(input)
    np.testing.assert_array_equal(np.asarray(grad), expected)
    np.testing.assert_array_equal(np.asarray(djax.roi_align(input, boxes, **options)),
                                  deformcp.roi_align(input, boxes, **options))


def test_boxes_as_a_list_of_per_image_arrays(rng):
    input, boxes = rng.standard_normal((2, 4, 7, 8)), random_boxes(rng, 2, 7, 8, 5)
    per_image = [boxes[boxes[:, 0] == n, 1:] for n in range(2)]
    expected = deformcp.roi_align(input, per_image, 2, sampling_ratio=2)
    np.testing.assert_array_equal(np.asarray(djax.roi_align(input, per_image, 2, sampling_ratio=2)), expected)


def test_only_the_differentiated_inputs_get_gradients(rng, monkeypatch):
    """jax.grad with respect to some inputs asks deformcp for those gradients only (symbolic zeros); the
    others, and non-differentiable boxes, get zeros."""
    asked = []

    def spy(original):
        def backward(*args, **kwargs):
            asked.append(kwargs.get("needs_input_grad"))
            return original(*args, **kwargs)
        return backward

    reference = deformcp.grid_sample_backward
    monkeypatch.setattr(deformcp, "grid_sample_backward", spy(reference))
    monkeypatch.setattr(deformcp, "deform_conv2d_backward", spy(deformcp.deform_conv2d_backward))
    sample = CASES["grid_sample-bilinear-zeros"](rng)
    loss, weights = functional(sample, rng)
    grad_grid = jax.grad(loss, argnums=1)(*sample.arrays)
    assert asked == [(False, True)]
    expected = reference(weights, *sample.arrays).grid
    np.testing.assert_array_equal(np.asarray(grad_grid), expected)
    conv = CASES["deform_conv2d-v2"](rng)
    loss, _ = functional(conv, rng)
    jax.jit(jax.grad(loss, argnums=2))(*conv.arrays)
    assert asked[1:] == [(False, False, True, False, False)]

    roi = CASES["roi_align-aligned"](rng)
    loss, _ = functional(roi, rng)
    grad_input, grad_boxes = jax.grad(loss, argnums=(0, 1))(*roi.arrays)
    assert not np.any(np.asarray(grad_boxes)) and grad_boxes.shape == roi.arrays[1].shape
    assert np.any(np.asarray(grad_input))


def test_vmap_runs_sequentially(rng):
    sample = CASES["grid_sample-bilinear-zeros"](rng)
    input, grid = (a[:, None] for a in sample.arrays)  # a vmapped axis of 2 over batches of 1
    out = jax.vmap(sample.jax_fn)(input, grid)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], sample.numpy_fn(*sample.arrays))
    grads = jax.vmap(jax.grad(lambda i, g: jnp.sum(sample.jax_fn(i, g)), argnums=1))(input, grid)
    expected = deformcp.grid_sample_backward(np.ones((2, 3, 4, 3)), *sample.arrays).grid
    np.testing.assert_allclose(np.asarray(grads)[:, 0], expected, rtol=1e-13, atol=1e-13)


def test_float32_stays_float32(rng):
    input, grid = (a.astype(np.float32) for a in CASES["grid_sample-bilinear-zeros"](rng).arrays)
    out = djax.grid_sample(input, grid)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), deformcp.grid_sample(input, grid))
    grads = jax.grad(lambda i, g: jnp.sum(djax.grid_sample(i, g)), argnums=(0, 1))(input, grid)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]


def test_bad_arguments_raise_deformcp_errors_at_trace_time(rng):
    input, grid = CASES["grid_sample-bilinear-zeros"](rng).arrays
    with pytest.raises(ValueError, match="mode: expected one of"):
        djax.grid_sample(input, grid, mode="bicubic")
    with pytest.raises(ValueError, match="grid: expected"):
        jax.jit(djax.grid_sample)(input, grid[..., :1])
    with pytest.raises(TypeError, match="one dtype"):
        djax.roi_align(input, random_boxes(rng, 2, 5, 6, 3).astype(np.float32), 2)
    with pytest.raises(TypeError, match="spatial_scale: expected a Python value"):
        jax.jit(lambda x, b, s: djax.roi_align(x, b, 2, spatial_scale=s))(input, random_boxes(rng, 2, 5, 6, 3), 0.5)


def test_value_errors_come_from_the_callback(rng):
    input, _ = CASES["grid_sample-bilinear-zeros"](rng).arrays
    boxes = random_boxes(rng, 2, 5, 6, 3)
    boxes[1, 0] = 7
    with pytest.raises(Exception, match=r"batch indices \(column 0\) that are integers in \[0, 2\)"):
        jax.block_until_ready(djax.roi_align(input, boxes, 2))


def test_cuda_route_plumbing(rng, monkeypatch):
    """Where JAX runs on a GPU and CuPy sees one, the callbacks move the operands with CuPy and back. Here
    a stand-in for CuPy (NumPy underneath) records the moves; the real route needs a GPU."""
    moved = []
    fake = types.SimpleNamespace(asarray=lambda a: moved.append("in") or np.array(a),
                                 asnumpy=lambda a: moved.append("out") or np.asarray(a))
    monkeypatch.setattr(djax, "_cupy", lambda: fake)
    monkeypatch.setattr(djax, "_cuda_ready", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert djax._where((jnp.zeros(1, jnp.bfloat16),)).backend == "numpy"  # CuPy has no bfloat16
    conv = CASES["deform_conv2d-v1"](rng)
    assert djax._where(conv.arrays).backend == "cuda"
    out = conv.jax_fn(*conv.arrays)
    np.testing.assert_array_equal(np.asarray(out), conv.numpy_fn(*conv.arrays))
    assert moved == ["in"] * 3 + ["out"]  # input, offset, weight (bias and mask are None)
    grads = jax.grad(lambda *a: jnp.sum(conv.jax_fn(*a)), argnums=(0, 1))(*conv.arrays)
    expected = deformcp.deform_conv2d_backward(np.ones(out.shape), *conv.arrays[:4], stride=(2, 1), padding=1,
                                               dilation=(1, 2))
    np.testing.assert_allclose(np.asarray(grads[0]), expected.input, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(grads[1]), expected.offset, rtol=1e-13, atol=1e-13)
    assert moved.count("out") == 1 + 1 + 2  # forward, forward again under grad, two gradients


def test_backend_and_workspace_limit_are_captured_at_trace_time():
    with deformcp.backend("host"), deformcp.workspace_limit(1 << 20):
        where = djax._where(())
    assert where == djax._Where("host", 1 << 20)


def test_import_without_jax_says_how_to_install():
    code = ("import sys; sys.modules['jax'] = None\n"
            "import deformcp\n"
            "try:\n    import deformcp.jax\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "ImportError: deformcp.jax needs JAX" in result.stdout and "pip install" in result.stdout


def mismatches(rng):
    """(name, function of arrays, arrays, expected message) for arguments whose shapes disagree with each
    other: deformcp's plain function raises a ValueError naming the argument; so must deformcp.jax, at trace
    time (these used to pass tracing and surface from the callback as a JaxRuntimeError)."""
    x, grid = CASES["grid_sample-bilinear-zeros"](rng).arrays            # input (2, 3, 5, 6)
    conv = CASES["deform_conv2d-v2"](rng).arrays                         # input, offset, weight, bias, mask
    pool = CASES["deform_roi_pool-mask"](rng).arrays                     # input, rois (4, 5), offset, mask
    ps = CASES["deform_ps_roi_pool"](rng).arrays                         # input, rois (4, 5), offset
    boxes = random_boxes(rng, 2, 5, 6, 3)
    conv_options = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    ps_options = dict(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2, trans_std=0.1)
    return [
        ("grid_sample", lambda i, g: djax.grid_sample(i, g), (x, grid[:1]), r"^grid: expected batch size N = 2"),
        ("affine_grid", lambda t: djax.affine_grid(t, (3, 1, 4, 4)), (rng.standard_normal((2, 2, 3)),),
         r"^size: expected N = 2 \(theta's batch\)"),
        ("mimic_loss", djax.mimic_loss, (rng.standard_normal((2, 5)), rng.standard_normal((3, 5))),
         r"^f_b: expected shape \(2, 5\)"),
        ("deform_conv2d-offset", lambda *a: djax.deform_conv2d(*a[:4], mask=a[4], **conv_options),
         (conv[0], conv[1][:1]) + conv[2:], r"^offset: expected shape \(2, "),
        ("deform_conv2d-mask", lambda *a: djax.deform_conv2d(*a[:4], mask=a[4], **conv_options),
         conv[:4] + (conv[4][:1],), r"^mask: expected shape \(2, "),
        ("deform_roi_pool-offset", lambda i, r, o, m: djax.deform_roi_pool(i, r, o, (2, 3), mask=m),
         (pool[0], pool[1], pool[2][:3], pool[3]), r"^offset: expected shape \(4, 2, 2, 3\)"),
        ("deform_roi_pool-mask", lambda i, r, o, m: djax.deform_roi_pool(i, r, o, (2, 3), mask=m),
         (pool[0], pool[1], pool[2], pool[3][:3]), r"^mask: expected shape \(4, 1, 2, 3\)"),
        ("deform_ps_roi_pool-offset", lambda i, r, o: djax.deform_ps_roi_pool(i, r, o, **ps_options),
         (ps[0], ps[1], ps[2][:3]), r"^offset: expected shape \(4, \*, 2, 2\)"),
        ("roi_align-empty-batch", lambda i, b: djax.roi_align(i, b, 2), (x[:0], boxes),
         r"^boxes: expected no RoIs for an empty batch \(input N = 0\), got 3"),
        ("roi_align-empty-image", lambda i, b: djax.roi_align(i, b, 2), (x[:, :, :0], boxes),
         r"^input: expected non-empty spatial size H, W"),
        ("ps_roi_align-empty-batch", lambda i, b: djax.ps_roi_align(i, b, 1), (x[:0], boxes),
         r"^boxes: expected no RoIs for an empty batch"),
        ("roi_align-more-images-than-input", lambda i, *b: djax.roi_align(i, list(b), 2), (x,) + (boxes[:, 1:],) * 3,
         r"^boxes: expected at most N = 2 per-image arrays \(input's batch\), got 3"),
        ("roi_align-per-image-shape", lambda i, b: djax.roi_align(i, [b], 2), (x, boxes),
         r"^boxes\[0\]: expected shape \(\*, 4\)"),
        ("deform_roi_pool-per-image-rank", lambda i, r: djax.deform_roi_pool(i, [r], None, 2), (x, boxes[0, 1:]),
         r"^rois\[0\]: expected a 2-D array"),
    ]


MISMATCHES = [name for name, *_ in mismatches(np.random.default_rng(0))]


@pytest.mark.parametrize("name", MISMATCHES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mismatched_shapes_raise_deformcp_errors_at_trace_time(name, jit, rng):
    """The forward's own argument checks run at trace time on stand-ins of the arrays (shapes and dtypes),
    so the user gets deformcp's ValueError, eagerly and under jax.jit, and no callback runs."""
    _, fn, arrays, message = next(m for m in mismatches(rng) if m[0] == name)
    with pytest.raises(ValueError, match=message) as error:
        jax.block_until_ready((jax.jit(fn) if jit else fn)(*arrays))
    assert type(error.value) is ValueError


def test_the_trace_time_check_reads_no_data(rng, monkeypatch):
    """The stand-ins are zero-stride views of one zero: a huge batch costs no memory at trace time."""
    seen = []
    original = djax._stand_in

    def recording(a):
        s = original(a)
        seen.append(s)
        return s

    monkeypatch.setattr(djax, "_stand_in", recording)
    x = jax.ShapeDtypeStruct((4096, 64, 256, 256), jnp.float32)  # 64 GiB if it were allocated
    grid = jax.ShapeDtypeStruct((4096, 8, 8, 2), jnp.float32)
    out = jax.eval_shape(djax.grid_sample, x, grid)
    assert out.shape == (4096, 64, 8, 8) and out.dtype == jnp.float32
    assert [s.shape for s in seen] == [x.shape, grid.shape] and all(s.strides == (0,) * s.ndim for s in seen)


def test_deterministic_must_be_a_bool_at_trace_time(rng):
    input, grid = CASES["grid_sample-bilinear-zeros"](rng).arrays
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool, got int 1"):
        djax.grid_sample(input, grid, deterministic=1)


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align", "deform_roi_pool"])
def test_an_empty_list_of_boxes_gives_an_empty_result(op, rng):
    input = rng.standard_normal((2, 4, 5, 6))
    out = getattr(djax, op)(input, [], output_size=2)
    expected = getattr(deformcp, op)(input, [], output_size=2)
    assert out.shape == expected.shape == ((0, 1, 2, 2) if op == "ps_roi_align" else (0, 4, 2, 2))
    grad = jax.grad(lambda x: jnp.sum(getattr(djax, op)(x, [], output_size=2)))(input)
    np.testing.assert_array_equal(np.asarray(grad), np.zeros_like(input))
