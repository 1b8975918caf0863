"""DCNv3 and DCNv4: what is specific to them. The parity harness (tests/test_parity.py), the JAX and torch tests
and the fuzzers cover them through the spec table (backends, dtypes, non-contiguous inputs, finite differences,
needs_input_grad, deterministic); here: an independent float64 implementation written from the formula (a gather
per tap), the depth-wise convolution they are at zero offsets, hand-computed values, DCNv4 against DCNv3,
non-finite offsets and bad input."""
import numpy as np
import pytest

import deformcp
from deformcp import testing

from conftest import to_backend

GEOMETRIES = [
    # kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, offset_scale, remove_center
    (3, 3, 1, 1, 1, 1, 1, 1, 1.0, False),
    (2, 3, 2, 1, 1, 2, 1, 2, 0.5, False),
    (3, 2, 1, 2, 0, 1, 2, 1, 1.5, False),
    (3, 3, 2, 2, 2, 1, 1, 1, 1.0, True),
    (5, 5, 1, 1, 2, 2, 1, 1, 0.25, True),
]
NAMES = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
         "offset_scale", "remove_center")


def options(geometry, G, Cg):
    return {**dict(zip(NAMES, geometry)), "group": G, "group_channels": Cg}


def output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    return (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1


def taps(kh, kw, remove_center):
    """(i, j) per tap: i over the kernel's width (outer), j over its height."""
    return [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and (i, j) == (kw // 2, kh // 2))]


def bilinear(x, y, X):
    """X (N, H, W, G, Cg) sampled at pixel (x, y) (N, Ho, Wo, G): 0 outside the open (−1, H) × (−1, W), corners
    outside read 0."""
    N, H, W, G, _ = X.shape
    n, g = np.arange(N)[:, None, None, None], np.arange(G)
    with np.errstate(invalid="ignore"):
        valid = (y > -1) & (x > -1) & (y < H) & (x < W)
        y0, x0 = np.floor(y), np.floor(x)
    out = 0
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = y0 + a, x0 + b
        weight = (1 - np.abs(y - yy)) * (1 - np.abs(x - xx))
        inside = valid & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        rows, columns = (np.where(inside, v, 0).astype(np.int64) for v in (yy, xx))
        out = out + np.where(inside, weight, 0)[..., None] * X[n, rows, columns, g]
    return out


def dcnv3_by_taps(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                  group, group_channels, offset_scale, remove_center=False):
    """The op from its formula, x = w_out·s_w − pad_w + c_w + (i·d_w − c_w + Δx)·offset_scale, one tap at a time."""
    N, H, W, _ = input.shape
    Ho, Wo = output_size(H, W, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    tap_list = taps(kernel_h, kernel_w, remove_center)
    P = len(tap_list)
    X = input.reshape(N, H, W, group, group_channels)
    off, m = offset.reshape(N, Ho, Wo, group, P, 2), mask.reshape(N, Ho, Wo, group, P)
    cw, ch = (dilation_w * (kernel_w - 1)) // 2, (dilation_h * (kernel_h - 1)) // 2
    w_out, h_out = np.arange(Wo)[:, None], np.arange(Ho)[:, None, None]
    out = 0
    for p, (i, j) in enumerate(tap_list):
        x = w_out * stride_w - pad_w + cw + (i * dilation_w - cw + off[..., p, 0]) * offset_scale
        y = h_out * stride_h - pad_h + ch + (j * dilation_h - ch + off[..., p, 1]) * offset_scale
        out = out + m[..., p, None] * bilinear(x, y, X)
    return out.reshape(N, Ho, Wo, group * group_channels)


def random_case(rng, geometry, N=2, H=6, W=7, G=2, Cg=3, spread=1.5):
    kh, kw, sh, sw, ph, pw, dh, dw, _, remove_center = geometry
    Ho, Wo = output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    P = kh * kw - remove_center
    return (rng.standard_normal((N, H, W, G * Cg)), rng.normal(0, spread, (N, Ho, Wo, G * P * 2)),
            rng.uniform(-1, 1, (N, Ho, Wo, G * P)))


def on(backend, fn, *arrays, **kwargs):
    return testing.to_numpy(testing.run(backend, fn, *(to_backend(a, backend) for a in arrays), **kwargs))


# ------------------------------------------------------------------------------------------ the formula

@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"{g[0]}x{g[1]}-s{g[2]}{g[3]}-p{g[4]}{g[5]}-d{g[6]}{g[7]}-"
                                                      f"scale{g[8]}-rc{int(g[9])}" for g in GEOMETRIES])
def test_matches_the_formula_tap_by_tap(any_backend, rng, geometry):
    input, offset, mask = random_case(rng, geometry)
    kwargs = options(geometry, 2, 3)
    expected = dcnv3_by_taps(input, offset, mask, **kwargs)
    np.testing.assert_allclose(on(any_backend, deformcp.dcnv3, input, offset, mask, **kwargs), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [(2, 3, 2, 1, 1, 2, 1, 2, 1.0, False), (3, 1, 1, 3, 2, 0, 2, 1, 1.0, False),
                                      (3, 3, 1, 1, 1, 1, 1, 1, 1.0, True)])
def test_zero_offsets_are_a_depthwise_convolution(any_backend, rng, geometry):
    """Zero offsets, offset_scale 1, one group: each output pixel sums the zero-padded input at its taps, weighted by
    the mask (a depth-wise convolution whose weights vary per pixel). Non-square kernels, stride, dilation and
    pad_h ≠ pad_w: the taps' order and the padding are each axis' own (InternImage's pure-PyTorch reference swaps
    pad_h and pad_w; its CUDA op, and deformcp, do not)."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, remove_center = geometry
    N, H, W, C = 2, 5, 7, 4
    Ho, Wo = output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    tap_list = taps(kh, kw, remove_center)
    x = rng.standard_normal((N, H, W, C))
    mask = rng.uniform(-1, 1, (N, Ho, Wo, len(tap_list)))
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    expected = np.zeros((N, Ho, Wo, C))
    for p, (i, j) in enumerate(tap_list):
        window = padded[:, j * dh:j * dh + (Ho - 1) * sh + 1:sh, i * dw:i * dw + (Wo - 1) * sw + 1:sw]
        expected += mask[..., p, None] * window
    out = on(any_backend, deformcp.dcnv3, x, np.zeros((N, Ho, Wo, 2 * len(tap_list))), mask,
             **options(geometry, 1, C))
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


def test_hand_computed_values(any_backend):
    """A 1×1 kernel on [[1, 2], [3, 4]]: output (0, 0) samples (x, y) = (0.5, 0.25): 0.75·1.5 + 0.25·3.5 = 2, times
    its mask 2; (0, 1) samples x = −0.5: half of pixel (0, 0), 0.5; (1, 0) samples x = −1 exactly and (1, 1)
    y = 2 = H: outside the open (−1, H) × (−1, W), 0. Offset gradients at (0, 0): 2·(0.75·1 + 0.25·1) = 2 for Δx and
    2·(0.5·2 + 0.5·2) = 4 for Δy; at x = −1 exactly, 0."""
    x = np.array([1.0, 2, 3, 4]).reshape(1, 2, 2, 1)
    offset = np.array([[[0.5, 0.25], [-1.5, 0]], [[-1, 0], [0, 1]]]).reshape(1, 2, 2, 2)
    mask = np.array([2.0, 1, 1, 1]).reshape(1, 2, 2, 1)
    kwargs = options((1, 1, 1, 1, 0, 0, 1, 1, 1.0, False), 1, 1)
    out = on(any_backend, deformcp.dcnv3, x, offset, mask, **kwargs)
    np.testing.assert_allclose(out.ravel(), [4.0, 0.5, 0.0, 0.0], rtol=1e-15, atol=0)
    grads = testing.run(any_backend, deformcp.dcnv3_backward, to_backend(np.ones((1, 2, 2, 1)), any_backend),
                        *(to_backend(a, any_backend) for a in (x, offset, mask)), **kwargs)
    grad_offset = testing.to_numpy(grads.offset).reshape(4, 2)
    np.testing.assert_allclose(grad_offset[0], [2.0, 4.0], rtol=1e-15)
    np.testing.assert_array_equal(grad_offset[2], [0.0, 0.0])
    np.testing.assert_allclose(testing.to_numpy(grads.mask).ravel(), [2.0, 0.5, 0.0, 0.0], rtol=1e-15)


# ---------------------------------------------------------------------------------------------- DCNv4

def pack(offset, mask, G, P, padding):
    """DCNv4's offset_mask from DCNv3's offset and mask: per group 2P offsets then P mask values, then padding."""
    N, Ho, Wo = offset.shape[:3]
    blocks = np.concatenate([offset.reshape(N, Ho, Wo, G, 2 * P), mask.reshape(N, Ho, Wo, G, P)], axis=-1)
    return np.concatenate([blocks.reshape(N, Ho, Wo, 3 * G * P), np.full((N, Ho, Wo, padding), np.nan)], axis=-1)


@pytest.mark.parametrize("softmax", [False, True])
def test_dcnv4_is_dcnv3_with_offsets_and_mask_packed(any_backend, rng, softmax):
    """dcnv4 on the packed array equals dcnv3 (softmax: on the mask soft-maxed over each group's taps), gradients
    too; the padding (NaN here) is never read and gets gradient 0."""
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    G, P = 2, 9
    input, offset, mask = random_case(rng, geometry, G=G)
    kwargs = options(geometry, G, 3)
    weights = mask
    if softmax:
        grouped = mask.reshape(*mask.shape[:3], G, P)
        weights = (np.exp(grouped) / np.exp(grouped).sum(-1, keepdims=True)).reshape(mask.shape)
    offset_mask = pack(offset, mask, G, P, padding=5)
    out = on(any_backend, deformcp.dcnv4, input, offset_mask, **kwargs, softmax=softmax)
    np.testing.assert_allclose(out, deformcp.dcnv3(input, offset, weights, **kwargs), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    grads = testing.run(any_backend, deformcp.dcnv4_backward, *(to_backend(a, any_backend) for a in
                                                                 (g, input, offset_mask)), **kwargs, softmax=softmax)
    expected = deformcp.dcnv3_backward(g, input, offset, weights, **kwargs)
    np.testing.assert_allclose(testing.to_numpy(grads.input), expected.input, rtol=1e-12, atol=1e-12)
    grad = testing.to_numpy(grads.offset_mask)
    blocks = grad[..., :3 * G * P].reshape(*grad.shape[:3], G, 3 * P)
    np.testing.assert_allclose(blocks[..., :2 * P].reshape(expected.offset.shape), expected.offset, rtol=1e-12,
                               atol=1e-12)
    grad_mask = expected.mask.reshape(*grad.shape[:3], G, P)
    if softmax:  # through the softmax: a ⊙ (g − Σ a·g)
        a = weights.reshape(grad_mask.shape)
        grad_mask = a * (grad_mask - (a * grad_mask).sum(-1, keepdims=True))
    np.testing.assert_allclose(blocks[..., 2 * P:], grad_mask, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(grad[..., 3 * G * P:], 0)


# ------------------------------------------------------------------------------------- special input

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_offsets_sample_zero_with_no_gradient(any_backend, rng, bad):
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    input, offset, mask = random_case(rng, geometry, G=1)
    offset[0, 1, 2, 2 * 4] = bad  # image 0, pixel (1, 2), the centre tap's Δx
    kwargs = options(geometry, 1, 3)
    clean = offset.copy()
    clean[0, 1, 2, 2 * 4:2 * 4 + 2] = 0
    masked = mask.copy()
    masked[0, 1, 2, 4] = 0  # the tap contributes nothing
    out = on(any_backend, deformcp.dcnv3, input, offset, mask, **kwargs)
    np.testing.assert_allclose(out, deformcp.dcnv3(input, clean, masked, **kwargs), rtol=1e-12, atol=1e-12)
    grads = testing.run(any_backend, deformcp.dcnv3_backward, *(to_backend(a, any_backend) for a in
                                                                 (np.ones(out.shape), input, offset, mask)), **kwargs)
    for name in ("input", "offset", "mask"):
        assert np.isfinite(testing.to_numpy(getattr(grads, name))).all(), name
    np.testing.assert_array_equal(testing.to_numpy(grads.offset)[0, 1, 2, 8:10], 0)
    np.testing.assert_array_equal(testing.to_numpy(grads.mask)[0, 1, 2, 4], 0)


def test_empty_batch(rng):
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    input, offset, mask = (a[:0] for a in random_case(rng, geometry))
    out = deformcp.dcnv3(input, offset, mask, **options(geometry, 2, 3))
    assert out.shape == (0, 6, 7, 6)


@pytest.mark.parametrize("kernel, message", [((2, 2), "kernel_h = 2, kernel_w = 2"),
                                             ((3, 1), "kernel_h = 3, kernel_w = 1")])
def test_remove_center_needs_an_odd_square_kernel(rng, kernel, message):
    x = rng.standard_normal((1, 4, 4, 2))
    with pytest.raises(ValueError, match=rf"^remove_center: expected an odd square kernel.*{message}"):
        deformcp.dcnv3(x, np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 1)), *kernel, 1, 1, 1, 1, 1, 1, 1, 2, 1.0,
                       remove_center=True)


def test_bad_input_is_named(rng):
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    input, offset, mask = random_case(rng, geometry)
    kwargs = options(geometry, 2, 3)
    with pytest.raises(ValueError, match=r"^input: expected G·Cg = 2·4 = 8 channels"):
        deformcp.dcnv3(input, offset, mask, **{**kwargs, "group_channels": 4})
    with pytest.raises(ValueError, match=r"^offset: expected shape \(2, 6, 7, 36\)"):
        deformcp.dcnv3(input, offset[..., :-2], mask, **kwargs)
    with pytest.raises(ValueError, match=r"^mask: expected shape \(2, 6, 7, 18\)"):
        deformcp.dcnv3(input, offset, mask[:, :-1], **kwargs)
    with pytest.raises(ValueError, match=r"^offset_mask: expected P_pad ≥ 3·G·P = 54"):
        deformcp.dcnv4(input, offset[..., :50], **kwargs)
    with pytest.raises(ValueError, match=r"^stride_h: expected a positive int, got 0"):
        deformcp.dcnv3(input, offset, mask, **{**kwargs, "stride_h": 0})
    with pytest.raises(ValueError, match=r"^offset_scale: expected a finite number, got nan"):
        deformcp.dcnv3(input, offset, mask, **{**kwargs, "offset_scale": float("nan")})
    with pytest.raises(TypeError, match=r"^expected arrays of one dtype"):
        deformcp.dcnv3(input, offset.astype(np.float32), mask, **kwargs)
    with pytest.raises(ValueError, match=r"^input: expected H and W for which the output has H_out, W_out ≥ 1"):
        deformcp.dcnv3(input[:, :1, :1], offset, mask, **{**kwargs, "pad_h": 0, "pad_w": 0})
