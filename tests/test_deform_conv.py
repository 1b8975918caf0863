"""deform_conv2d v1/v2: regular-convolution equivalence, boundary gradients, finite differences for all five
inputs, backend parity on the irregular configuration, special offsets, determinism, workspace, bad input."""
import re

import numpy as np
import pytest

import deformcp
from deformcp import _host, _kernels, _workspace, testing

from conftest import assert_close, directional_derivative, run_both, to_backend

needs_compiler = pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")
#: The irregular configuration: kernel 3×2, stride 2×1, padding 1×0, dilation 2×1, groups 2, offset groups 3.
IRREGULAR = dict(C=6, C_out=4, groups=2, G=3, kh=3, kw=2, stride=(2, 1), padding=(1, 0), dilation=(2, 1))


def output_size(H, W, kh, kw, stride, padding, dilation):
    return ((H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1,
            (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1)


def make_inputs(rng, N, H=9, W=8, modulated=True, C=6, C_out=4, groups=2, G=3, kh=3, kw=2, stride=(2, 1),
                padding=(1, 0), dilation=(2, 1), offset_scale=2.0, smooth=False):
    """Random inputs; with smooth, every sample coordinate keeps 0.05 away from integers (so that finite
    differences do not straddle a kink of the bilinear weights)."""
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
    offset = offset_scale * rng.standard_normal((N, 2 * G * kh * kw, Ho, Wo))
    if smooth:
        offset = np.floor(offset) + np.clip(offset - np.floor(offset), 0.05, 0.95)
    arrays = dict(input=rng.standard_normal((N, C, H, W)), offset=offset,
                  weight=rng.standard_normal((C_out, C // groups, kh, kw)), bias=rng.standard_normal(C_out),
                  mask=rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo)) if modulated else None)
    return arrays, dict(stride=stride, padding=padding, dilation=dilation)


def regular_conv(x, weight, bias, stride, padding, dilation, groups):
    """An independent grouped convolution: one strided slice of the padded input per kernel tap."""
    N, C, H, W = x.shape
    C_out, Cg, kh, kw = weight.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out = np.zeros((N, C_out, Ho, Wo))
    per_group = C_out // groups
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dilation[0]:i * dilation[0] + stride[0] * (Ho - 1) + 1:stride[0],
                            j * dilation[1]:j * dilation[1] + stride[1] * (Wo - 1) + 1:stride[1]]
            for q in range(groups):
                out[:, q * per_group:(q + 1) * per_group] += np.einsum(
                    "oc,nchw->nohw", weight[q * per_group:(q + 1) * per_group, :, i, j], window[:, q * Cg:(q + 1) * Cg])
    return out + bias[:, None, None]


# --------------------------------------------------------------------------- references and boundaries

@pytest.mark.parametrize("modulated", [False, True])
def test_zero_offsets_unit_mask_is_a_regular_convolution(rng, modulated):
    arrays, conv = make_inputs(rng, 2, modulated=modulated, **{k: v for k, v in IRREGULAR.items()
                                                               if k not in ("stride", "padding", "dilation")},
                               stride=(2, 1), padding=(1, 0), dilation=(2, 1))
    arrays["offset"][:] = 0
    if modulated:
        arrays["mask"][:] = 1
    expected = regular_conv(arrays["input"], arrays["weight"], arrays["bias"], groups=2, **conv)
    np.testing.assert_allclose(deformcp.deform_conv2d(**arrays, **conv), expected, atol=1e-12)
    torch = pytest.importorskip("torch")
    reference = torch.nn.functional.conv2d(*(torch.tensor(arrays[k]) for k in ("input", "weight", "bias")),
                                           groups=2, **conv).numpy()
    np.testing.assert_allclose(expected, reference, atol=1e-12)


def test_offsets_pushing_every_sample_outside_leave_the_bias(rng):
    arrays, conv = make_inputs(rng, 2)
    arrays["offset"][:, 0::2] = 1e3  # every Δy far below the image
    out = deformcp.deform_conv2d(**arrays, **conv)
    np.testing.assert_array_equal(out, np.broadcast_to(arrays["bias"][:, None, None], out.shape[1:])[None].repeat(2, 0))
    grads = deformcp.deform_conv2d_backward(rng.standard_normal(out.shape), **arrays, **conv)
    for name in ("input", "offset", "weight", "mask"):
        assert not np.any(getattr(grads, name)), name


@pytest.mark.parametrize("dy, value, gradient", [
    (-1.0, 0.0, 0.0),        # y = -1: zero, and zero gradient
    (-0.5, 0.5, 1.0),        # y in (-1, 0): (1 + y)·x[row 0] — row -1 reads 0
    (0.0, 1.0, -1.0 + 4.0),  # y = 0 exactly: the derivative is taken from the right, x[row 1] − x[row 0]
    (2.0, 9.0, -9.0),        # y = H − 1: row H (outside) reads 0, so d/dy = 0 − x[row 2]
    (2.5, 4.5, -9.0),        # y in (H − 1, H): (H − y)·x[row 2]
    (3.0, 0.0, 0.0),         # y = H: zero, and zero gradient
])
def test_gradient_convention_at_the_borders(dy, value, gradient):
    """One 1×1 tap at output (0, 0) over a 3×1 image [1, 4, 9]: the sample's value and d/dΔy."""
    x = np.array([1.0, 4.0, 9.0]).reshape(1, 1, 3, 1)
    weight = np.ones((1, 1, 1, 1))
    offset = np.zeros((1, 2, 3, 1))
    offset[0, 0, 0, 0] = dy
    for backend in ("numpy", "host"):
        with deformcp.backend(backend):
            out = deformcp.deform_conv2d(x, offset, weight)
            grads = deformcp.deform_conv2d_backward(np.eye(3)[0].reshape(1, 1, 3, 1), x, offset, weight)
        assert out[0, 0, 0, 0] == pytest.approx(value, abs=1e-15), backend
        assert grads.offset[0, 0, 0, 0] == pytest.approx(gradient, abs=1e-15), backend
        # x = 0 exactly in a 1-pixel-wide image: from the right, column 1 (outside) reads 0, so d/dΔx = −value
        assert grads.offset[0, 1, 0, 0] == pytest.approx(-value, abs=1e-15), backend


def test_matches_torchvision_when_installed(rng):
    torchvision = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    arrays, conv = make_inputs(rng, 3)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    out = torchvision.ops.deform_conv2d(**tensors, **conv)
    grad_output = rng.standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(deformcp.deform_conv2d(**arrays, **conv), out.detach().numpy(), atol=1e-12)
    grads = deformcp.deform_conv2d_backward(grad_output, **arrays, **conv)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(getattr(grads, name), tensor.grad.numpy(), atol=1e-12, err_msg=name)


# ------------------------------------------------------------------------------- finite differences (float64)

@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("trial", range(3))
def test_finite_differences_all_five_inputs(rng, modulated, trial):
    arrays, conv = make_inputs(rng, 2, modulated=modulated, smooth=True)
    out = deformcp.deform_conv2d(**arrays, **conv)
    grad_output = rng.standard_normal(out.shape)
    grads = deformcp.deform_conv2d_backward(grad_output, **arrays, **conv)
    names = [name for name in ("input", "offset", "weight", "bias", "mask") if arrays[name] is not None]

    def loss(*values):
        return np.sum(grad_output * deformcp.deform_conv2d(**dict(arrays, **dict(zip(names, values))), **conv))

    for index, name in enumerate(names):
        direction = rng.standard_normal(arrays[name].shape)
        numeric = directional_derivative(loss, [arrays[n] for n in names], index, direction)
        assert np.sum(getattr(grads, name) * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8), name
    assert grads.mask is None if not modulated else grads.mask.shape == arrays["mask"].shape


# ------------------------------------------------------------------------------------ backends vs NumPy

def run_conv_both(backend, arrays, conv, grad_output, **backward_options):
    order = ("input", "offset", "weight", "bias")
    args = [arrays[k] for k in order]
    out, expected = run_both(backend, deformcp.deform_conv2d, *args, **conv, mask=arrays["mask"])
    grads, expected_grads = run_both(backend, deformcp.deform_conv2d_backward, grad_output, *args, **conv,
                                     mask=arrays["mask"], **backward_options)
    return out, expected, grads, expected_grads


@pytest.mark.parametrize("N", [0, 1, 33])
@pytest.mark.parametrize("modulated", [False, True])
def test_irregular_configuration_matches_numpy(backend, rng, N, modulated):
    arrays, conv = make_inputs(rng, N, modulated=modulated)
    grad_output = rng.standard_normal((N, 4, *output_size(9, 8, 3, 2, **conv)))
    out, expected, grads, expected_grads = run_conv_both(backend, arrays, conv, grad_output)
    assert out.shape == expected.shape == grad_output.shape
    assert_close(out, expected, "float64")
    for name in ("input", "offset", "weight", "bias", "mask"):
        got, want = getattr(grads, name), getattr(expected_grads, name)
        assert (got is None) == (want is None) == (arrays[name] is None), name
        if want is not None:
            assert_close(got, want, "float64")


def test_nonfinite_offsets(backend, rng):
    """NaN and ±inf offsets sample 0 and get zero gradient; no read outside the input (ASan run)."""
    arrays, conv = make_inputs(rng, 2)
    offset = arrays["offset"]
    offset.reshape(-1)[::3] = np.nan
    offset.reshape(-1)[1::7] = np.inf
    offset.reshape(-1)[2::11] = -np.inf
    offset.reshape(-1)[4::13] = 1e30
    grad_output = rng.standard_normal((2, 4, *output_size(9, 8, 3, 2, **conv)))
    out, expected, grads, expected_grads = run_conv_both(backend, arrays, conv, grad_output)
    assert np.all(np.isfinite(expected))
    assert_close(out, expected, "float64")
    for got, want in zip(grads, expected_grads):
        assert np.all(np.isfinite(want))
        assert_close(got, want, "float64")


def test_deterministic_backward_is_bitwise_reproducible(backend, rng):
    arrays, conv = make_inputs(rng, 4, H=16, W=16, offset_scale=0.5)  # many samples land on each pixel
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    grad_output = rng.standard_normal((4, 4, *output_size(16, 16, 3, 2, **conv))).astype(np.float32)
    args = [to_backend(a, backend) for a in (grad_output, arrays["input"], arrays["offset"], arrays["weight"],
                                             arrays["bias"])]
    runs = [testing.run(backend, deformcp.deform_conv2d_backward, *args, **conv,
                        mask=to_backend(arrays["mask"], backend), deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(testing.to_numpy(a), testing.to_numpy(b))


@pytest.mark.parametrize("backend_name", ["numpy", "host"])
def test_workspace_limit_chunks_the_batch(rng, backend_name):
    arrays, conv = make_inputs(rng, 7)
    grad_output = rng.standard_normal((7, 4, *output_size(9, 8, 3, 2, **conv)))
    with deformcp.backend(backend_name):
        whole = (deformcp.deform_conv2d(**arrays, **conv),
                 *deformcp.deform_conv2d_backward(grad_output, **arrays, **conv))
        with deformcp.workspace_limit(70_000):  # one to seven images a chunk, depending on backend and pass
            chunked = (deformcp.deform_conv2d(**arrays, **conv),
                       *deformcp.deform_conv2d_backward(grad_output, **arrays, **conv))
        with deformcp.workspace_limit(100), pytest.raises(ValueError, match=r"deform_conv2d: one output row needs "
                                                                           r"\d+ bytes of workspace, more than the "
                                                                           r"limit of 100 bytes"):
            deformcp.deform_conv2d(**arrays, **conv)
    assert deformcp.get_workspace_limit() == 512 * 2**20
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def conv_outputs(arrays, conv, grad_output, deterministic=False):
    """The forward and all five gradients of one configuration."""
    return (deformcp.deform_conv2d(**arrays, **conv),
            *deformcp.deform_conv2d_backward(grad_output, **arrays, **conv, deterministic=deterministic))


def one_row_needs(op, call):
    """The workspace one output row needs, read from the ValueError that a 1-byte limit raises."""
    with deformcp.workspace_limit(1), pytest.raises(ValueError) as error:
        call()
    match = re.fullmatch(rf"{op}: one output row needs (\d+) bytes of workspace, more than the limit of 1 bytes; "
                         r"raise it with deformcp\.workspace_limit\(\.\.\.\)", str(error.value))
    assert match, str(error.value)
    return int(match.group(1))


@pytest.fixture
def recorded_chunks(monkeypatch):
    """Every chunk list that _workspace.chunks hands out (the real function)."""
    recorded, real = [], _workspace.chunks

    def spy(*args, **kwargs):
        recorded.append(real(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(_workspace, "chunks", spy)
    return recorded


@pytest.mark.parametrize("backend_name, deterministic", [
    ("numpy", False), pytest.param("host", False, marks=needs_compiler),
    pytest.param("host", True, marks=needs_compiler)])
def test_workspace_limit_splits_one_image_into_output_rows(rng, recorded_chunks, backend_name, deterministic):
    """Limits of one, two and four output rows' workspace: every image runs in ranges of its output rows
    (forward, all five gradients), with the results of the unsplit call; inputs are left unmodified."""
    arrays, conv = make_inputs(rng, 2, H=13, W=11)  # Ho × Wo = 6 × 10
    grad_output = rng.standard_normal((2, 4, 6, 10))
    before = {k: v.copy() for k, v in arrays.items()}, grad_output.copy()
    with deformcp.backend(backend_name):
        whole = conv_outputs(arrays, conv, grad_output, deterministic)
        forward_row = one_row_needs("deform_conv2d", lambda: deformcp.deform_conv2d(**arrays, **conv))
        backward_row = one_row_needs("deform_conv2d_backward", lambda: deformcp.deform_conv2d_backward(
            grad_output, **arrays, **conv, deterministic=deterministic))
        recorded_chunks.clear()
        for rows in (1, 2, 4):
            with testing.poisoned_outputs():
                with deformcp.workspace_limit(rows * forward_row):
                    out = deformcp.deform_conv2d(**arrays, **conv)
                with deformcp.workspace_limit(rows * backward_row):
                    grads = deformcp.deform_conv2d_backward(grad_output, **arrays, **conv, deterministic=deterministic)
            for name, got, want in zip(("output", *grads._fields), (out, *grads), whole):
                np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13, err_msg=f"{name}, {rows} rows")
    # each limit splits every image into consecutive ranges of at most that many rows
    assert len(recorded_chunks) == 6, "one forward and one backward chunk list per limit"
    for chunks, rows in zip(recorded_chunks, (1, 1, 2, 2, 4, 4)):
        assert all(n1 == n0 + 1 for n0, n1, _, _ in chunks), chunks
        for n in (0, 1):
            ranges = [(r0, r1) for n0, _, r0, r1 in chunks if n0 == n]
            assert len(ranges) > 1 and max(r1 - r0 for r0, r1 in ranges) <= rows, chunks
            assert [r for pair in ranges for r in pair] == [0, *[r for _, r1 in ranges[:-1] for r in (r1, r1)], 6]
    for name, value in before[0].items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=f"{name} modified")
    np.testing.assert_array_equal(grad_output, before[1], err_msg="grad_output modified")


def test_fpn_level_image_runs_under_the_default_workspace_limit(rng, recorded_chunks):
    """One 1×128×200×304 float32 image (an FPN level of an 800×1216 input; 3×3 kernel, padding 1, C_out 128) on
    the NumPy path: its columns alone pass the default 512 MiB, so forward and backward split it into ranges of
    output rows, with the unsplit results; the weight gradient, summed over the ranges in float32, is within
    float32's tolerance of the float64 reference."""
    arrays = dict(input=rng.standard_normal((1, 128, 200, 304), np.float32),
                  offset=2 * rng.standard_normal((1, 18, 200, 304), np.float32),
                  weight=rng.standard_normal((128, 128, 3, 3), np.float32) / 30,
                  bias=rng.standard_normal(128, np.float32),
                  mask=rng.uniform(0, 1, (1, 9, 200, 304)).astype(np.float32))
    grad_output = rng.standard_normal((1, 128, 200, 304), np.float32)
    assert deformcp.get_workspace_limit() == 512 * 2**20
    split = conv_outputs(arrays, dict(padding=1), grad_output)
    assert len(recorded_chunks) == 2 and all(len(chunks) > 1 for chunks in recorded_chunks), recorded_chunks
    with deformcp.workspace_limit(2**32):
        whole = conv_outputs(arrays, dict(padding=1), grad_output)
        assert [len(chunks) for chunks in recorded_chunks[2:]] == [1, 1]
        reference = deformcp.deform_conv2d_backward(grad_output.astype(np.float64), **{
            k: v.astype(np.float64) for k, v in arrays.items()}, padding=1,
            needs_input_grad=(False, False, True, False, False)).weight
    for name, got, want in zip(("output", "input", "offset", "weight", "bias", "mask"), split, whole):
        assert got.dtype == np.float32 and np.all(np.isfinite(got)), name
        assert_close(got, want, "float32")
    assert_close(split[3], reference, "float32")


@pytest.mark.parametrize("block_bytes, tasks", [(1, 1), (1, 3), (2000, 2)])
def test_numpy_path_blocks_and_tasks_give_the_same_results(rng, monkeypatch, block_bytes, tasks):
    """The NumPy path's blocks (one output row each with a 1-byte block size, or a few rows, or whole images) and
    tasks (each with its own weight gradient) give the results of the default ones, irregular configuration."""
    arrays, conv = make_inputs(rng, 3, H=13, W=11)
    grad_output = rng.standard_normal((3, 4, *output_size(13, 11, 3, 2, **conv)))
    whole = conv_outputs(arrays, conv, grad_output)
    monkeypatch.setattr(_workspace, "DEFORM_CONV_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(_workspace, "DEFORM_CONV_TASKS", tasks)
    for name, got, want in zip(("output", "input", "offset", "weight", "bias", "mask"),
                               conv_outputs(arrays, conv, grad_output), whole):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13, err_msg=name)


def test_numpy_path_results_do_not_depend_on_the_threads(rng, monkeypatch):
    """One thread or three: the same blocks and tasks, bitwise the same forward and gradients (float32)."""
    arrays, conv = make_inputs(rng, 2, H=21, W=17)
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    grad_output = rng.standard_normal((2, 4, *output_size(21, 17, 3, 2, **conv))).astype(np.float32)
    monkeypatch.setattr(_workspace, "DEFORM_CONV_BLOCK_BYTES", 1)  # a block per output row: several tasks
    runs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
        runs.append(conv_outputs(arrays, conv, grad_output))
    for name, a, b in zip(("output", "input", "offset", "weight", "bias", "mask"), *runs):
        np.testing.assert_array_equal(a, b, err_msg=name)


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_host_kernels_over_row_ranges_are_bitwise_one_launch(rng, dtype):
    """im2col, the deterministic col2im and col2im_coord launched over ranges of output rows (what a small
    workspace limit does) give bitwise what one launch over both images gives: each range's columns, the input
    gradient added range after range (the same adds in the same order), each range's offset and mask gradients."""
    from deformcp.ops import deform_conv as dc
    arrays, conv = make_inputs(rng, 2, H=13, W=11)
    x, offset, weight, bias, mask = (arrays[k].astype(dtype) for k in ("input", "offset", "weight", "bias", "mask"))
    geo = dc._check(None, x, offset, weight, bias, mask, **conv)
    P, rows_k = geo.Ho * geo.Wo, geo.C * geo.taps
    grad_columns = rng.standard_normal((rows_k, 2 * P)).astype(dtype)
    whole_chunk, ranges = (0, 2, 0, geo.Ho), [(0, 1), (1, 4), (4, 6)]

    def run(chunk, grad_cols, grad_input, grad_offset, grad_mask):
        columns = np.full((rows_k, grad_cols.shape[1]), np.nan, dtype)
        sizes, n = dc._chunk_sizes(geo, *chunk), chunk[1] - chunk[0]
        for name, work, arguments, options in (
                ("deform_conv_im2col", columns.size, (x, offset, mask, columns), ()),
                ("deform_conv_col2im", n * geo.C, (offset, mask, grad_cols, grad_input), (1,)),
                ("deform_conv_col2im_coord", n * geo.offset_groups * geo.taps * grad_cols.shape[1] // n,
                 (x, offset, mask, grad_cols, grad_offset, grad_mask), ())):
            _kernels.launch("host", dc.FAMILY, name, dtype, work, arguments, sizes, options)
        return columns

    def outputs():
        return np.zeros(x.shape, dtype), np.full(offset.shape, np.nan, dtype), np.full(mask.shape, np.nan, dtype)

    whole = outputs()
    whole_columns = run(whole_chunk, grad_columns, *whole)
    split = outputs()
    for n in (0, 1):
        for r0, r1 in ranges:
            part = slice(n * P + r0 * geo.Wo, n * P + r1 * geo.Wo)
            columns = run((n, n + 1, r0, r1), np.ascontiguousarray(grad_columns[:, part]), *split)
            np.testing.assert_array_equal(columns, whole_columns[:, part], err_msg=f"columns of {n}, {r0}:{r1}")
    assert not np.isnan(whole_columns).any() and not any(np.isnan(a).any() for a in whole)
    for name, got, want in zip(("input", "offset", "mask"), split, whole):
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"), err_msg=name)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    arrays, conv = make_inputs(rng, 2)
    x, offset, weight, mask = arrays["input"], arrays["offset"], arrays["weight"], arrays["mask"]

    def call(**changes):
        merged = dict(arrays, **conv)
        merged.update(changes)
        return deformcp.deform_conv2d(**merged)

    cases = [
        (ValueError, r"offset: expected 2·G·kh·kw = a positive multiple of 12 channels, got shape \(2, 35, 4, 7\)",
         dict(offset=offset[:, :35])),
        (ValueError, r"mask: expected shape \(2, 18, 4, 7\) for \(N, G·kh·kw, H_out, W_out\), got \(2, 17, 4, 7\)",
         dict(mask=mask[:, :17])),
        (ValueError, r"offset: expected shape \(2, 36, 4, 7\) for \(N, 2·G·kh·kw, H_out, W_out\), got \(2, 36, 3, 7\)",
         dict(offset=offset[:, :, :3])),
        (ValueError, r"weight: expected C_out > 0 and in-channels C / groups > 0 dividing C = 6, .* got weight shape "
                     r"\(4, 4, 3, 2\)",
         dict(weight=np.zeros((4, 4, 3, 2)))),
        (ValueError, r"input: expected channels C = 6 divisible by the 4 offset groups",
         dict(offset=np.zeros((2, 48, 4, 7)), mask=None)),
        (ValueError, r"padding: expected a non-negative int or a pair of non-negative ints, got \(-1, 0\)",
         dict(padding=(-1, 0))),
        (ValueError, r"stride: expected a positive int or a pair of positive ints, got 0", dict(stride=0)),
        (TypeError, r"dilation: expected an int or a pair of ints, got 1.5", dict(dilation=1.5)),
        (ValueError, r"bias: expected shape \(4,\) for \(C_out,\), got \(3,\)", dict(bias=np.zeros(3))),
        (TypeError, r"expected arrays of one dtype: input is float64, offset is float32",
         dict(offset=offset.astype(np.float32))),
        (ValueError, r"input: expected a 4-D array \(N, C, H, W\), got shape \(6, 9, 8\)", dict(input=x[0])),
        (ValueError, r"input: spatial size \(2, 2\) with padding \(1, 0\) is smaller than the dilated kernel \(5, 2\)",
         dict(input=x[:, :, :2, :2])),
        (TypeError, r"weight: expected a floating-point array", dict(weight=weight.astype(np.int32))),
    ]
    for error, message, changes in cases:
        with pytest.raises(error, match=message):
            call(**changes)
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 4, 4, 7\)"):
        deformcp.deform_conv2d_backward(np.zeros((2, 4, 4, 6)), **arrays, **conv)
    with pytest.raises(ValueError, match=r"needs_input_grad: expected 5 bools"):
        deformcp.deform_conv2d_backward(np.zeros((2, 4, 4, 7)), **arrays, **conv, needs_input_grad=(True,))
    with pytest.raises(ValueError, match=r"workspace_limit: expected a positive number of bytes, got 0"):
        with deformcp.workspace_limit(0):
            pass


@pytest.mark.parametrize("change, error, message", [
    (dict(stride=True), TypeError, r"^stride: expected an int or a pair of ints, got True \(a bool\)$"),
    (dict(padding=False), TypeError, r"^padding: expected an int or a pair of ints, got False \(a bool\)$"),
    (dict(dilation=True), TypeError, r"^dilation: expected an int or a pair of ints, got True \(a bool\)$"),
    (dict(stride=(2, True)), TypeError,
     r"^stride: expected an int or a pair of ints, got \(2, True\) \(bool True at index 1\)$"),
    (dict(dilation=np.True_), TypeError,
     r"^dilation: expected an int or a pair of ints, got (np\.)?True_? \(a bool\)$"),
    (dict(stride=2**63), ValueError,
     r"^stride: expected a positive int or a pair of positive ints, each at most 9223372036854775807, "
     r"got 9223372036854775808$"),
    (dict(padding=(0, 2**64)), ValueError,
     r"^padding: expected a non-negative int or a pair of non-negative ints, each at most 9223372036854775807, "
     r"got \(0, 18446744073709551616\)$"),
    (dict(dilation=(1, -2**70)), ValueError,
     r"^dilation: expected a positive int or a pair of positive ints, got \(1, -1180"),
    # each fits int64, the tap positions (H_out − 1)·stride + padding + (kh − 1)·dilation do not
    (dict(stride=(2**62, 1), padding=(2**62, 1)), ValueError,
     r"^stride, padding, dilation: expected tap positions \(H_out − 1\)·stride \+ padding \+ \(kh − 1\)·dilation "
     r"\(W likewise\) ≤ 2\*\*63 - 1, got 13835058055282163714 from stride \(4611686018427387904, 1\)"),
])
@pytest.mark.parametrize("backend_name", ["numpy", pytest.param("host", marks=needs_compiler)])
def test_rejects_bool_and_oversized_conv_parameters(rng, backend_name, change, error, message):
    """Bools are not sizes (operator.index(True) is 1); sizes past the 64-bit index raise a ValueError naming
    the argument, not an OverflowError from deep inside."""
    arrays, conv = make_inputs(rng, 1, H=6, W=5, modulated=False, C=2, C_out=2, groups=1, G=1, kh=3, kw=3,
                               stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    conv.update(change)
    if "padding" in change and "stride" in change:  # H_out = 3 with these: offsets of that size
        arrays["offset"] = rng.standard_normal((1, 18, 3, 5))
    with deformcp.backend(backend_name):
        with pytest.raises(error, match=message):
            deformcp.deform_conv2d(**arrays, **conv)
        with pytest.raises(error, match=message):
            deformcp.deform_conv2d_backward(rng.standard_normal((1, 2, 6, 5)), **arrays, **conv)
