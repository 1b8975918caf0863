"""deformcp.torch: autograd through the one Function built from each op's spec (gradcheck in float64,
equality with the NumPy functions, non-contiguous tensors, partial needs_input_grad, no double backward),
the nn.Modules (torchvision state_dict compatibility, zero-initialised offset branches equal plain
convolution / RoIAlign / identity), a small training run, and the import rules.

The per-op tests run over the spec table (deformcp.ops.SPECS): every op and every parity case of its spec
(``spec.cases``), so an op added to the table is covered here without editing this file. The spec cases
are random, and some ops are not differentiable everywhere in some of their arrays (sample coordinates:
bilinear kinks at integer pixels, borders, nearest rounding): gradcheck keeps those arrays constant on the
spec cases (KINKED, by name, with the reason) and checks them on small inputs kept away from the kinks
(SMOOTH_CASES)."""
import inspect
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformcp  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402
from deformcp.ops import SPECS  # noqa: E402

# ------------------------------------------------------------------------------------------- spec cases

SPEC_CASES = [pytest.param(spec, case, id=f"{spec.name}-{case.label}") for spec in SPECS.values()
              for case in spec.cases]


def make(spec, case, rng):
    """A spec case's arrays (float64 NumPy, by name in signature order, absent optional ones left out) and
    the differentiable ones among them."""
    made = case.make(rng)
    assert set(made) <= set(spec.arrays), (spec.name, case.label, sorted(made))
    arrays = {name: made[name] for name in spec.arrays if name in made}
    return arrays, tuple(name for name in spec.differentiable if name in arrays)


#: Arrays that gradcheck keeps constant on the spec cases, with the reason: at the cases' random inputs the
#: op may not be differentiable in them, and a finite difference that straddles a kink would fail now and
#: then (the seed is fresh each run). Keys: an op's name (all its cases) or a case's id. SMOOTH_CASES
#: gradchecks each of these arrays (test_kinked_arrays_are_gradchecked_elsewhere).
KINKED = {
    "grid_sample": {"grid": "sample coordinates: bilinear kinks at integer pixels, clamping and reflection at "
                            "the borders, nearest's jumps at half pixels"},
    "deform_conv2d": {"offset": "sample coordinates: bilinear kinks at integer pixels and where samples leave "
                                "the image"},
    "deform_roi_pool": {"offset": "sample coordinates: bilinear kinks at integer pixels and clamping at the "
                                  "borders, a jump to 0 where a sample goes beyond one pixel out"},
    "deform_ps_roi_pool": {"offset": "sample coordinates: bilinear kinks at integer pixels and clamping at the "
                                     "borders, jumps where samples are skipped (half a pixel out)"},
    "mimic_loss-zero-rows-and-scaled-rows": dict.fromkeys(("f_a", "f_b"), "the case's all-zero rows: cos jumps "
                                                                          "there (taken as 0 at a zero row)"),
    "ms_deform_attn": {"sampling_locations": "sample coordinates: bilinear kinks at integer pixels and where "
                                             "samples leave a level, nearest's jumps (method discrete)"},
    "flash_deform_attn": {"sampling_loc_attn": "its sample coordinates: bilinear kinks at integer pixels and where "
                                               "samples leave a level"},
    "affine_sample": {"theta": "its sample coordinates: bilinear kinks at integer pixels, clamping and reflection "
                               "at the borders, nearest's jumps at half pixels"},
    "affine_transform": {"matrix": "a homogeneous matrix's bottom row must stay [0, …, 0, 1]: gradcheck's "
                                   "perturbations of it are refused (the finite differences: tests/test_ndimage.py)"},
}


def kinked(spec, case):
    return {**KINKED.get(spec.name, {}), **KINKED.get(f"{spec.name}-{case.label}", {})}


# -------------------------------------------------------------------------- smooth inputs for gradcheck
#
# Every case: (op name, arrays by argument name, options). Inputs are float64 and kept away from the kinks
# of bilinear sampling (sample coordinates never within 0.1 pixel of an integer, nor, where skipping or
# reflection happens at half pixels, of a half-integer), so that gradcheck's finite differences are valid
# for every differentiable array, the KINKED ones included.

def away_from_kinks(rng, shape, half_too=False):
    """Fractional parts in [0.2, 0.8] (or [0.15, 0.35] ∪ [0.65, 0.85] with half_too) plus an integer in {-1, 0, 1}."""
    if half_too:
        frac = rng.uniform(0.15, 0.35, shape) + 0.5 * rng.integers(0, 2, shape)
    else:
        frac = rng.uniform(0.2, 0.8, shape)
    return rng.integers(-1, 2, shape) + frac


def case_grid_sample(rng, mode="bilinear", padding_mode="zeros", align_corners=False):
    N, C, H, W, Ho, Wo = 2, 2, 4, 5, 3, 4
    # pixel coordinates from -1.x to size + 0.x, including outside ones, then normalised
    px = rng.integers(-1, W + 1, (N, Ho, Wo)) + away_from_kinks(rng, (N, Ho, Wo), half_too=True) % 1
    py = rng.integers(-1, H + 1, (N, Ho, Wo)) + away_from_kinks(rng, (N, Ho, Wo), half_too=True) % 1
    if align_corners:
        gx, gy = 2 * px / (W - 1) - 1, 2 * py / (H - 1) - 1
    else:
        gx, gy = (2 * px + 1) / W - 1, (2 * py + 1) / H - 1
    arrays = {"input": rng.standard_normal((N, C, H, W)), "grid": np.stack([gx, gy], axis=-1)}
    return "grid_sample", arrays, dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def case_affine_sample(rng, mode="bilinear"):
    """A translation by a fraction of a pixel in [0.2, 0.8] per axis (output size the input's): every sample sits that
    far from its cell's edges, and small changes of theta keep it inside."""
    N, C, H, W = 2, 2, 4, 5
    shift = away_from_kinks(rng, (N, 2)) % 1  # pixels (x, y)
    theta = np.zeros((N, 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = 2 * shift / np.array([W, H])
    return "affine_sample", {"input": rng.standard_normal((N, C, H, W)), "theta": theta}, dict(
        size=None, mode=mode, padding_mode="zeros", align_corners=False)


def case_affine_transform(rng):
    """SciPy's affine_transform by the identity and an offset in [0.2, 0.8] per axis: samples away from the kinks."""
    return "affine_transform", {"input": rng.standard_normal((4, 5)), "matrix": np.eye(2),
                                "offset": away_from_kinks(rng, (2,)) % 1}, dict(
        output_shape=None, order=1, mode="constant", cval=0.0, prefilter=True)


def boxes(rng, N, H, W, K):
    x1, y1 = rng.uniform(-2, W - 2, K), rng.uniform(-2, H - 2, K)
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + rng.uniform(0.5, W / 2, K),
                     y1 + rng.uniform(0.5, H / 2, K)], axis=1)


def case_deform_conv2d(rng, mask=True, stride=1, padding=1, dilation=1):
    """C_in 4 in 2 groups, 2 offset groups, 3×3 kernel. Sample positions are integers (h·stride − pad +
    i·dilation) plus the offsets, whose fractional parts are in [0.2, 0.8]."""
    N, C, H, W, C_out, G, kh, kw = 1, 4, 4, 4, 2, 2, 3, 3
    s, p, d = (torch.nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    Ho, Wo = ((H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1, (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1)
    arrays = {"input": rng.standard_normal((N, C, H, W)),
              "offset": away_from_kinks(rng, (N, 2 * G * kh * kw, Ho, Wo)),
              "weight": rng.standard_normal((C_out, C // 2, kh, kw)),
              "bias": rng.standard_normal(C_out)}
    if mask:
        arrays["mask"] = rng.uniform(0.1, 1.0, (N, G * kh * kw, Ho, Wo))
    return "deform_conv2d", arrays, dict(stride=stride, padding=padding, dilation=dilation)


def case_deform_roi_pool(rng, mask=True, gamma=0.1):
    """RoIs 4×4 pixels at integer corners, 2×2 bins of 2×2 samples one pixel apart: sample x = x1 + shift +
    integer, with the bin's shift γ·roi_w·Δx = integer + [0.2, 0.8] (y likewise)."""
    N, C, H, W, K, P = 2, 2, 9, 10, 3, 2
    x1, y1 = rng.integers(0, W - 4, K), rng.integers(0, H - 4, K)
    rois = np.stack([rng.integers(0, N, K), x1, y1, x1 + 4, y1 + 4], axis=1).astype(np.float64)
    offset = away_from_kinks(rng, (K, 2, P, P)) / (gamma * 4)
    arrays = {"input": rng.standard_normal((N, C, H, W)), "rois": rois, "offset": offset}
    if mask:
        arrays["mask"] = rng.uniform(0.1, 1.0, (K, 1, P, P))
    return "deform_roi_pool", arrays, dict(output_size=P, spatial_scale=1.0, sampling_ratio=2, gamma=gamma)


def case_deform_ps_roi_pool(rng):
    """RoIs with round(x2) − round(x1) + 1 = 4, 2×2 bins of 2×2 samples one pixel apart, starting at
    round(x1) − 0.5 + shift: shift = trans_std·roi_w·Δx = 0.5 + integer + frac, frac in [0.15, 0.35] ∪
    [0.65, 0.85], keeps samples away from integers (clamping, bilinear) and half-integers (skipping)."""
    N, output_dim, G, P, K, H, W, trans_std = 1, 2, 2, 2, 3, 6, 7, 0.1
    x1, y1 = rng.integers(0, W - 4, K), rng.integers(0, H - 4, K)
    rois = np.stack([np.zeros(K), x1, y1, x1 + 3, y1 + 3], axis=1).astype(np.float64)
    offset = (0.5 + away_from_kinks(rng, (K, 2 * 2, P, P), half_too=True)) / (trans_std * 4)
    arrays = {"input": rng.standard_normal((N, output_dim * G * G, H, W)), "rois": rois, "offset": offset}
    return "deform_ps_roi_pool", arrays, dict(output_dim=output_dim, group_size=G, pooled_size=P, part_size=P,
                                              sample_per_part=2, spatial_scale=1.0, trans_std=trans_std)


def level_locations(rng, shape, H, W):
    """(*shape, 2) normalised (x, y) on an H×W level whose pixel coordinates x·W − 0.5 and y·H − 0.5 are an integer
    from −1 to the size plus a fraction in [0.2, 0.8]: away from bilinear kinks and from nearest's jumps (at the
    same integers), some samples outside the level."""
    px = rng.integers(-1, W + 1, shape) + rng.uniform(0.2, 0.8, shape)
    py = rng.integers(-1, H + 1, shape) + rng.uniform(0.2, 0.8, shape)
    return np.stack([(px + 0.5) / W, (py + 0.5) / H], axis=-1)


def case_ms_deform_attn(rng, points_per_level=None, method="default"):
    """Levels 3×4, 1×1 and 2×3; 2 points per level or points_per_level."""
    N, Lq, M, D, shapes = 2, 3, 2, 3, ((3, 4), (1, 1), (2, 3))
    points = points_per_level or (2,) * len(shapes)
    locations = np.concatenate([level_locations(rng, (N, Lq, M, P), H, W) for (H, W), P in zip(shapes, points)], 3)
    weights = rng.uniform(-1, 1, (N, Lq, M, sum(points)))
    if points_per_level is None:
        locations, weights = locations.reshape(N, Lq, M, len(shapes), 2, 2), weights.reshape(N, Lq, M, len(shapes), 2)
    arrays = {"value": rng.standard_normal((N, sum(H * W for H, W in shapes), M, D)),
              "sampling_locations": locations, "attention_weights": weights}
    return "ms_deform_attn", arrays, dict(spatial_shapes=shapes, level_start_index=None,
                                          points_per_level=points_per_level, method=method)


def case_flash_deform_attn(rng):
    """Levels 3×4 and 2×3, P = 2: per head 4 (x, y) pairs, then 4 logits."""
    N, Lq, M, D, P, shapes = 2, 3, 2, 3, 2, ((3, 4), (2, 3))
    locations = np.concatenate([level_locations(rng, (N, Lq, M, P), H, W) for H, W in shapes], 3)
    logits = 2 * rng.standard_normal((N, Lq, M, len(shapes) * P))
    arrays = {"value": rng.standard_normal((N, sum(H * W for H, W in shapes), M, D)),
              "sampling_loc_attn": np.concatenate([locations.reshape(N, Lq, M, -1), logits], -1)}
    return "flash_deform_attn", arrays, dict(spatial_shapes=shapes, level_start_index=None, num_points=P)


def case_mimic_loss(rng):
    return "mimic_loss", {"f_a": rng.standard_normal((4, 5)), "f_b": rng.standard_normal((4, 5))}, {}


SMOOTH_CASES = {
    "grid_sample": lambda rng: case_grid_sample(rng),
    "grid_sample-align_corners": lambda rng: case_grid_sample(rng, align_corners=True),
    "grid_sample-border": lambda rng: case_grid_sample(rng, padding_mode="border"),
    "grid_sample-reflection": lambda rng: case_grid_sample(rng, padding_mode="reflection"),
    "grid_sample-reflection-align_corners": lambda rng: case_grid_sample(rng, padding_mode="reflection",
                                                                         align_corners=True),
    "grid_sample-nearest": lambda rng: case_grid_sample(rng, mode="nearest"),
    "affine_sample": lambda rng: case_affine_sample(rng),
    "affine_sample-bicubic": lambda rng: case_affine_sample(rng, mode="bicubic"),
    "affine_transform": lambda rng: case_affine_transform(rng),
    "deform_conv2d-v2": lambda rng: case_deform_conv2d(rng),
    "deform_conv2d-v1": lambda rng: case_deform_conv2d(rng, mask=False),
    "deform_conv2d-strided": lambda rng: case_deform_conv2d(rng, stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "deform_roi_pool": lambda rng: case_deform_roi_pool(rng, mask=False),
    "deform_roi_pool-mask": lambda rng: case_deform_roi_pool(rng),
    "deform_ps_roi_pool": lambda rng: case_deform_ps_roi_pool(rng),
    "mimic_loss": lambda rng: case_mimic_loss(rng),
    "ms_deform_attn": lambda rng: case_ms_deform_attn(rng),
    "ms_deform_attn-points_per_level": lambda rng: case_ms_deform_attn(rng, points_per_level=(3, 1, 2)),
    "ms_deform_attn-discrete": lambda rng: case_ms_deform_attn(rng, method="discrete"),
    "flash_deform_attn": lambda rng: case_flash_deform_attn(rng),
}


# -------------------------------------------------------------------------------------------- helpers

def tensors(arrays, differentiable, dtype=torch.float64, layout=lambda t: t):
    """Leaf tensors with requires_grad on the differentiable ones; layout may make views."""
    return {name: layout(torch.from_numpy(np.array(a)).to(dtype)).requires_grad_(name in differentiable)
            for name, a in arrays.items()}


def call_torch(op, args, options):
    return getattr(dtorch, op)(**args, **options)


def torch_grads(op, args, options, grad_output):
    out = call_torch(op, args, options)
    out.backward(grad_output)
    return out, {name: t.grad for name, t in args.items() if t.requires_grad}


def gradcheck(op, args, options, names, fast_mode=False):
    """torch.autograd.gradcheck of op with respect to args[name] for name in names (the others constant).

    In fast mode gradcheck compares one random projection v·J·u of each Jacobian, and scales atol by
    sum(u)·sum(v): for these sparse Jacobians that would let relative errors of 1e-3 through. The arrays
    checked in fast mode enter the ops linearly (piecewise, with max pooling), so central differences are
    exact up to rounding (relative errors below 1e-7 measured) and rtol alone bounds the error: atol is 0."""
    def fn(*ts):
        return call_torch(op, {**args, **dict(zip(names, ts))}, options)

    inputs = [args[name].detach().requires_grad_() for name in names]
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=0.0 if fast_mode else 1e-6, rtol=1e-4,
                                    fast_mode=fast_mode)


# ------------------------------------------------------------------------------------------------ tests

#: Parameters of a deformcp.torch function that the deformcp function does not have, accepted for drop-in use with
#: the anchor's call and ignored: Deformable DETR's MSDeformAttnFunction.apply(..., im2col_step).
EXTRA_PARAMETERS = {"ms_deform_attn": ["im2col_step"], "flash_deform_attn": ["im2col_step"], "dcnv3": ["im2col_step"],
                    "dcnv4": ["im2col_step", "d_stride", "block_thread"]}


def test_every_spec_has_a_torch_function():
    """An op added to SPECS needs its function in deformcp.torch, with the deformcp function's arguments (names
    and order: _apply passes them on by name; defaults may follow torch, e.g. align_corners=None), and only the
    EXTRA_PARAMETERS besides, each defaulting to None."""
    assert set(SPECS) <= set(dtorch.__all__)
    for name, spec in SPECS.items():
        function = getattr(dtorch, name)
        assert callable(function) and not isinstance(function, type), name
        parameters = inspect.signature(function).parameters
        extra = EXTRA_PARAMETERS.get(name, [])
        assert [p for p in parameters if p not in extra] == list(inspect.signature(spec.function).parameters), name
        assert all(parameters[p].default is None for p in extra), name
    for name in set(dtorch.__all__) - set(SPECS):
        assert issubclass(getattr(dtorch, name), torch.nn.Module), name


@pytest.mark.parametrize("spec, case", SPEC_CASES)
def test_gradcheck_spec_cases(spec, case, rng):
    """gradcheck with respect to every differentiable array of the case but the KINKED ones, in fast mode (see
    gradcheck): the full Jacobians of the spec cases would take minutes. SMOOTH_CASES are checked entry by
    entry."""
    arrays, differentiable = make(spec, case, rng)
    constant = kinked(spec, case)
    names = [name for name in differentiable if name not in constant]
    if not names:
        pytest.skip("every differentiable array is KINKED here: " + "; ".join(f"{k}: {v}" for k, v in constant.items()))
    assert gradcheck(spec.name, tensors(arrays, ()), case.options, names, fast_mode=True)


@pytest.mark.parametrize("case", SMOOTH_CASES)
def test_gradcheck_smooth_cases(case, rng):
    op, arrays, options = SMOOTH_CASES[case](rng)
    names = [name for name in SPECS[op].differentiable if name in arrays]
    assert gradcheck(op, tensors(arrays, ()), options, names)


def test_kinked_arrays_are_gradchecked_elsewhere():
    """Every KINKED key names an op or a spec case, and each array it keeps constant is a differentiable array
    of the op that some SMOOTH_CASES entry gradchecks."""
    ids = {f"{spec.name}-{case.label}": spec for spec in SPECS.values() for case in spec.cases}
    rng = np.random.default_rng(0)
    smooth = {(op, name) for op, arrays, _ in (make_case(rng) for make_case in SMOOTH_CASES.values())
              for name in arrays}
    for key, arrays in KINKED.items():
        spec = SPECS[key] if key in SPECS else ids[key]
        for name in arrays:
            assert name in spec.differentiable and (spec.name, name) in smooth, (key, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec, case", SPEC_CASES)
def test_matches_numpy_functions(spec, case, dtype, rng):
    """Forward and every gradient equal (bitwise) the deformcp functions called on NumPy arrays."""
    arrays, differentiable = make(spec, case, rng)
    args = tensors(arrays, differentiable, dtype)
    numpy_args = {name: t.detach().numpy() for name, t in args.items()}
    expected = spec.function(**numpy_args, **case.options)
    grad_output = rng.standard_normal(np.shape(expected)).astype(expected.dtype)
    out, grads = torch_grads(spec.name, args, case.options, torch.from_numpy(grad_output))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    expected_grads = spec.backward(grad_output, **numpy_args, **case.options)
    assert set(grads) == set(differentiable)
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == args[name].shape
        np.testing.assert_array_equal(grad.numpy(), getattr(expected_grads, name), err_msg=name)


def noncontiguous(t):
    """The same values in a view that is not contiguous (every other element of a wider buffer)."""
    wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


@pytest.mark.parametrize("spec, case", SPEC_CASES)
def test_noncontiguous_tensors(spec, case, rng):
    """Non-contiguous inputs and grad_output give the results of contiguous ones."""
    arrays, differentiable = make(spec, case, rng)
    reference_args = tensors(arrays, differentiable)
    grad_output = torch.from_numpy(rng.standard_normal(call_torch(spec.name, reference_args, case.options).shape))
    expected, expected_grads = torch_grads(spec.name, reference_args, case.options, grad_output)
    args = tensors(arrays, differentiable, layout=lambda t: noncontiguous(t) if t.ndim else t)
    out, grads = torch_grads(spec.name, args, case.options,
                             noncontiguous(grad_output) if grad_output.ndim else grad_output)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(differentiable)
    for name in differentiable:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("spec, case", SPEC_CASES)
def test_only_the_inputs_that_require_grad_get_one(spec, case, rng, monkeypatch):
    """With one differentiable array requiring grad, the backward asks for that gradient only
    (needs_input_grad) and gives the value of the backward that computes them all."""
    arrays, differentiable = make(spec, case, rng)
    full = tensors(arrays, differentiable)
    grad_output = torch.from_numpy(rng.standard_normal(call_torch(spec.name, full, case.options).shape))
    _, expected = torch_grads(spec.name, full, case.options, grad_output)
    asked = []
    run_backward = dtorch._call.run_backward

    def spy(spec, grad_output, arrays, options, needs_input_grad, deterministic):
        asked.append(needs_input_grad)
        return run_backward(spec, grad_output, arrays, options, needs_input_grad, deterministic)

    monkeypatch.setattr(dtorch._call, "run_backward", spy)
    for wanted in differentiable:
        args = tensors(arrays, (wanted,))
        asked.clear()
        _, grads = torch_grads(spec.name, args, case.options, grad_output)
        assert asked == [tuple(name == wanted for name in spec.differentiable)]
        assert set(grads) == {wanted}
        torch.testing.assert_close(grads[wanted], expected[wanted], rtol=1e-12, atol=1e-12)
        assert all(t.grad is None for name, t in args.items() if name != wanted)


def test_boxes_as_a_list_per_image(rng):
    x = torch.from_numpy(rng.standard_normal((2, 8, 6, 7)))
    per_image = [torch.from_numpy(boxes(rng, 1, 6, 7, k)[:, 1:]) for k in (2, 3)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(per_image)])
    for op in (dtorch.roi_align, dtorch.ps_roi_align):
        torch.testing.assert_close(op(x, per_image, 2, 1.0, 2), op(x, rois, 2, 1.0, 2), rtol=0, atol=0)
    torch.testing.assert_close(dtorch.RoIAlign(2, 1.0, 2, aligned=True)(x, per_image),
                               dtorch.roi_align(x, rois, 2, 1.0, 2, True), rtol=0, atol=0)
    torch.testing.assert_close(dtorch.PSRoIAlign(2, 1.0, 2)(x, per_image), dtorch.ps_roi_align(x, rois, 2, 1.0, 2),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_list_of_boxes_gives_an_empty_result(dtype, rng):
    """As in the NumPy functions (and torchvision): no boxes, an empty result of the input's dtype, and a zero
    gradient. An empty list used to raise a ValueError here only."""
    x = torch.from_numpy(rng.standard_normal((2, 8, 6, 7))).to(dtype).requires_grad_()
    calls = {"roi_align": lambda b: dtorch.roi_align(x, b, 2),
             "ps_roi_align": lambda b: dtorch.ps_roi_align(x, b, 2),
             "deform_roi_pool": lambda b: dtorch.deform_roi_pool(x, b, output_size=2),
             "deform_ps_roi_pool": lambda b: dtorch.deform_ps_roi_pool(x, b, None, 2, 2, 2, no_trans=True),
             "RoIAlign": lambda b: dtorch.RoIAlign(2)(x, b),
             "PSRoIAlign": lambda b: dtorch.PSRoIAlign(2)(x, b),
             "DeformRoIPool": lambda b: dtorch.DeformRoIPool(2, 8, 16).to(dtype)(x, b),
             "ModulatedDeformRoIPool": lambda b: dtorch.ModulatedDeformRoIPool(2, 8, 16).to(dtype)(x, b)}
    for name, call in calls.items():
        out = call([])
        channels = 2 if name in ("ps_roi_align", "PSRoIAlign", "deform_ps_roi_pool") else 8
        assert out.shape == (0, channels, 2, 2) and out.dtype == dtype, name
        expected = call(torch.zeros((0, 5), dtype=dtype))
        assert out.shape == expected.shape
        x.grad = None
        out.sum().backward()
        assert x.grad is not None and not x.grad.any(), name
    np_input = x.detach().numpy()
    assert deformcp.roi_align(np_input, [], 2).shape == (0, 8, 2, 2)


# ---------------------------------------------------------------------------------- no double backward

@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_double_backward_raises(spec, rng):
    """Differentiating a gradient of any op (computed with create_graph=True) raises at the point of use, with
    respect to any of the op's differentiable inputs or grad_output, whether grad_output requires grad or not, by
    torch.autograd.grad (also with allow_unused=True), backward() and nested torch.func.grad; the gradient itself
    is the first-order one."""
    case = spec.cases[0]
    arrays, differentiable = make(spec, case, rng)
    args = tensors(arrays, differentiable)
    inputs = [args[name] for name in differentiable]
    out = call_torch(spec.name, args, case.options)
    cotangent = torch.from_numpy(rng.standard_normal(out.shape))
    expected = torch.autograd.grad(out, inputs, cotangent, retain_graph=True)
    message = f"deformcp.torch.{spec.name}: double backward is not supported"
    for grad_output in (cotangent, cotangent.clone().requires_grad_()):
        grads = torch.autograd.grad(out, inputs, grad_output, create_graph=True, retain_graph=True)
        for name, g, want in zip(differentiable, grads, expected):
            torch.testing.assert_close(g.detach(), want, rtol=0, atol=0, msg=name)
            targets = inputs + [grad_output] * grad_output.requires_grad
            for target in targets:
                with pytest.raises(RuntimeError, match=message):
                    torch.autograd.grad(g.sum(), target, retain_graph=True)
                with pytest.raises(RuntimeError, match=message):
                    torch.autograd.grad(g.sum(), target, retain_graph=True, allow_unused=True)
            with pytest.raises(RuntimeError, match=message):
                g.sum().backward(retain_graph=True)
    # the gradient of a sum with another path to the input: this op's second-order terms are never dropped
    first = inputs[0]
    g, = torch.autograd.grad(call_torch(spec.name, args, case.options).sum() + (first ** 3).sum(), first,
                             create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(g.sum(), first)

    def loss(t):
        return (call_torch(spec.name, {**args, differentiable[0]: t}, case.options) * cotangent).sum()

    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(lambda t: torch.func.grad(loss)(t).sum())(first.detach())


# ------------------------------------------------------------------------------- settings and plain API

@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_runs_under_the_forward_settings(deterministic, monkeypatch):
    """The backend and workspace limit in force at the forward are those of the backward (wherever the backward
    runs), the backward passes deterministic=torch.are_deterministic_algorithms_enabled(), and needs_input_grad
    names the differentiable arrays that require grad. Spies on the front door that deformcp.torch calls."""
    calls = []

    def fake_forward(spec, arrays, options):
        calls.append(("forward", spec.name, deformcp.current_backend(), deformcp.get_workspace_limit()))
        input, grid = arrays["input"], arrays["grid"]
        assert not input.requires_grad and not grid.requires_grad
        return torch.zeros(input.shape[:2] + grid.shape[1:3], dtype=input.dtype)

    def fake_backward(spec, grad_output, arrays, options, needs_input_grad, deterministic):
        calls.append(("backward", spec.name, deformcp.current_backend(), deformcp.get_workspace_limit(),
                      deterministic, needs_input_grad, options))
        assert not grad_output.requires_grad and all(not t.requires_grad for t in arrays.values())
        return spec.grads(*(torch.full(arrays[name].shape, 1.0, dtype=torch.float64) if needed else None
                            for name, needed in zip(spec.differentiable, needs_input_grad)))

    monkeypatch.setattr(dtorch._call, "run_forward", fake_forward)
    monkeypatch.setattr(dtorch._call, "run_backward", fake_backward)
    options = dict(mode="nearest", padding_mode="border", align_corners=True)
    for requires, expected_needs in (((True, False), (True, False)), ((False, True), (False, True)),
                                     ((True, True), (True, True))):
        x = torch.zeros(1, 2, 3, 3, dtype=torch.float64, requires_grad=requires[0])
        grid = torch.zeros(1, 2, 2, 2, dtype=torch.float64, requires_grad=requires[1])
        calls.clear()
        with deformcp.backend("host"), deformcp.workspace_limit(12345):
            out = dtorch.grid_sample(x, grid, **options)
        assert deformcp.current_backend() != "host" and deformcp.get_workspace_limit() != 12345
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            with deformcp.workspace_limit(999):
                out.sum().backward()
        finally:
            torch.use_deterministic_algorithms(previous)
        assert calls == [("forward", "grid_sample", "host", 12345),
                         ("backward", "grid_sample", "host", 12345, deterministic, expected_needs, options)]
        for t, required in zip((x, grid), requires):
            assert (t.grad is not None) == required
            if required:
                torch.testing.assert_close(t.grad, torch.ones_like(t), rtol=0, atol=0)


def test_plain_api_refuses_tensors_that_require_grad():
    x = torch.zeros(1, 2, 3, 3, requires_grad=True)
    grid = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"input: the tensor requires grad; pass tensor.detach\(\), or use the "
                                         r"autograd wrappers in deformcp.torch"):
        deformcp.grid_sample(x, grid)
    assert isinstance(deformcp.grid_sample(x.detach(), grid), torch.Tensor)


def test_import_rules(tmp_path):
    """import deformcp imports neither torch nor deformcp.torch; without torch, import deformcp.torch
    raises an ImportError that says what is missing."""
    code = textwrap.dedent("""
        import sys
        import deformcp
        assert "torch" not in sys.modules and "deformcp.torch" not in sys.modules, sorted(sys.modules)
        sys.modules["torch"] = None
        try:
            import deformcp.torch
        except ImportError as error:
            print(error)
        else:
            raise AssertionError("import deformcp.torch worked without torch")
    """)
    env = {"PYTHONPATH": str(__import__("pathlib").Path(deformcp.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "deformcp.torch needs PyTorch" in result.stdout
    # the extra, and the CPU build (a bare pip install torch brings several GB of CUDA libraries on Linux)
    assert "pip install 'deformcp[torch]'" in result.stdout
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu;" in result.stdout


# ------------------------------------------------------------------------------------------------ modules

def test_deform_conv2d_module(rng):
    layer = dtorch.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2).double()
    assert layer.weight.shape == (6, 2, 3, 3) and layer.bias.shape == (6,)
    assert dict(layer.named_parameters()).keys() == {"weight", "bias"}
    assert "DeformConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2)" in repr(layer)
    assert dtorch.DeformConv2d(2, 2, 1, bias=False).bias is None
    x = torch.from_numpy(rng.standard_normal((2, 4, 5, 5)))
    offset = torch.from_numpy(rng.standard_normal((2, 2 * 2 * 9, 5, 5)))
    mask = torch.from_numpy(rng.uniform(0, 1, (2, 2 * 9, 5, 5)))
    torch.testing.assert_close(layer(x, offset, mask),
                               dtorch.deform_conv2d(x, offset, layer.weight, layer.bias, 1, 1, 1, mask))


def test_deform_conv2d_matches_torchvision_and_shares_its_state_dict(rng):
    torchvision = pytest.importorskip("torchvision")
    ours = dtorch.DeformConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2).double()
    theirs = torchvision.ops.DeformConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2).double()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], value, rtol=0, atol=0)
    ours.load_state_dict(torchvision.ops.DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2).double().state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.from_numpy(rng.standard_normal((2, 4, 7, 7))).requires_grad_()
    offset = torch.from_numpy(rng.standard_normal((2, 2 * 2 * 9, 4, 4)) * 2).requires_grad_()
    mask = torch.from_numpy(rng.uniform(0, 1, (2, 2 * 9, 4, 4))).requires_grad_()
    results = []
    for layer in (ours, theirs):
        out = layer(x, offset, mask)
        grads = torch.autograd.grad(out, (x, offset, mask, layer.weight, layer.bias),
                                    torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape)))
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)
    no_bias = dtorch.DeformConv2d(4, 6, 3, bias=False)
    torchvision.ops.DeformConv2d(4, 6, 3, bias=False).load_state_dict(no_bias.state_dict())


def test_roi_align_matches_torchvision(rng):
    torchvision = pytest.importorskip("torchvision")
    x = torch.from_numpy(rng.standard_normal((2, 12, 9, 11))).requires_grad_()
    rois = torch.from_numpy(boxes(rng, 2, 9, 11, 6))
    tv = torchvision.ops
    for ours, theirs in ((dtorch.RoIAlign((2, 3), 0.5, 2, aligned=True), tv.RoIAlign((2, 3), 0.5, 2, True)),
                         (dtorch.RoIAlign(2, 1.0, -1), tv.RoIAlign(2, 1.0, -1)),
                         (dtorch.PSRoIAlign((2, 3), 1.0, 2), tv.PSRoIAlign((2, 3), 1.0, 2))):
        results = []
        for layer in (ours, theirs):
            out = layer(x, rois)
            results.append((out, torch.autograd.grad(out, x, torch.ones_like(out))))
        torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_modules_start_as_a_regular_convolution(modulated, rng):
    """Zero-initialised offset (and mask) branch: DeformConv2dPack is conv2d, ModulatedDeformConv2dPack
    (masks sigmoid(0) = 0.5, the DCNv2 initialisation) conv2d with halved weights; gradients reach the
    offset branch."""
    cls = dtorch.ModulatedDeformConv2dPack if modulated else dtorch.DeformConv2dPack
    layer = cls(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, offset_groups=2).double()
    assert layer.conv_offset.out_channels == (3 if modulated else 2) * 2 * 9
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    assert layer.weight.abs().sum() > 0
    x = torch.from_numpy(rng.standard_normal((2, 4, 7, 8))).requires_grad_()
    out = layer(x)
    scale = 0.5 if modulated else 1.0
    expected = torch.nn.functional.conv2d(x, scale * layer.weight, layer.bias, layer.stride, layer.padding,
                                          layer.dilation, layer.groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    layer.reset_parameters()
    assert not layer.conv_offset.weight.any()


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_roi_pool_modules_start_as_roi_align(modulated, rng):
    """The zero-initialised last offset layer gives offsets 0: aligned RoIAlign (times the initial mask 0.5
    for the modulated module); gradients reach the branches."""
    cls = dtorch.ModulatedDeformRoIPool if modulated else dtorch.DeformRoIPool
    layer = cls((2, 3), 3, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2).double()
    assert (dtorch.ModulatedDeformRoIPoolPack if modulated else dtorch.DeformRoIPoolPack) is cls
    assert layer.offset_fc[-1].out_features == 2 * 6 and not layer.offset_fc[-1].weight.any()
    x = torch.from_numpy(rng.standard_normal((2, 3, 9, 11))).requires_grad_()
    rois = torch.from_numpy(boxes(rng, 2, 18, 22, 5))
    out = layer(x, rois)
    expected = dtorch.roi_align(x, rois, (2, 3), 0.5, 2, aligned=True) * (0.5 if modulated else 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert layer.offset_fc[-1].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    if modulated:
        assert layer.mask_fc[2].out_features == 6 and layer.mask_fc[2].weight.grad.abs().sum() > 0


def test_spatial_transformer_starts_as_the_identity(rng):
    layer = dtorch.SpatialTransformer(3).double()
    x = torch.from_numpy(rng.standard_normal((2, 3, 6, 7))).requires_grad_()
    torch.testing.assert_close(layer.theta(x), torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=x.dtype).expand(2, 2, 3))
    out = layer(x)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert layer.fc_loc.weight.grad.abs().sum() > 0
    custom = dtorch.SpatialTransformer(3, output_size=(4, 5), localization=torch.nn.Flatten(),
                                       localization_features=3 * 6 * 7).double()
    assert custom(x).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="localization_features"):
        dtorch.SpatialTransformer(3, localization=torch.nn.Flatten())


def test_a_few_training_steps_lower_the_loss():
    """conv → ModulatedDeformConv2dPack → pool → linear on fixed random data: Adam lowers the loss, and the
    offset branch learns."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            dtorch.ModulatedDeformConv2dPack(8, 8, 3, padding=1, offset_groups=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
        x, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy machine
    try:
        for _ in range(15):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.9 * losses[0], losses
    assert net[2].conv_offset.weight.abs().sum() > 0


def test_mimic_loss_in_a_graph(rng):
    """mimic_loss returns a 0-d tensor that composes with other losses."""
    f_a = torch.from_numpy(rng.standard_normal((3, 4))).requires_grad_()
    f_b = torch.from_numpy(rng.standard_normal((3, 4)))
    loss = 2 * dtorch.mimic_loss(f_a, f_b) + f_a.sum()
    assert loss.shape == ()
    loss.backward()
    expected = (1 - torch.nn.functional.cosine_similarity(f_a, f_b, dim=1)).sum()
    torch.testing.assert_close(dtorch.mimic_loss(f_a.detach(), f_b), expected.detach())
    assert f_b.grad is None and f_a.grad.shape == (3, 4)

