"""deform_ps_roi_pool (DCNv1 deformable position-sensitive RoI pooling): golden values, a loop-by-loop port
of the original operator, finite differences, backend parity, special RoIs and offsets, determinism, bad
input."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

import deformcp
from deformcp import _workspace, deform_ps_roi_pool, deform_ps_roi_pool_backward, testing

from conftest import assert_close, directional_derivative, noncontiguous, run_both, to_backend

SCALE = 1 / 5 ** 0.5  # irrational: sample coordinates never hit a pixel border exactly by arithmetic accident


def ramp(H, W, offset=1.0):
    """A 1×1×H×W image whose pixel (y, x) holds y·W + x + offset."""
    return np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W) + offset


def pool(x, rois, offset=None, output_dim=1, group_size=1, pooled_size=1, **kwargs):
    return deform_ps_roi_pool(x, np.asarray(rois, np.float64), offset, output_dim, group_size, pooled_size, **kwargs)


def pool_backward(grad, x, rois, offset=None, output_dim=1, group_size=1, pooled_size=1, **kwargs):
    return deform_ps_roi_pool_backward(grad, x, np.asarray(rois, np.float64), offset, output_dim, group_size,
                                       pooled_size, **kwargs)


# ------------------------------------------------------------------------------------------ golden values

@pytest.mark.parametrize("box, kwargs, expected", [
    # start = 0 - 0.5, end = (3 + 1) - 0.5: roi 4, sub-bin 2; samples at -0.5 and 1.5 per axis (not centred),
    # -0.5 clamps to 0: pixels (0, 0), (0, 1.5), (1.5, 0), (1.5, 1.5) → 1, 2.5, 7, 8.5
    ([0, 0, 0, 3, 3], dict(sample_per_part=2, no_trans=True), (1 + 2.5 + 7 + 8.5) / 4),
    # corners round half away from zero: 0.5 → 1 and 2.5 → 3 (NumPy's half-to-even would give 0 and 2);
    # box 1..3: start 0.5, roi 3, one sample at (0.5, 0.5)
    ([0, 0.5, 0.5, 2.5, 2.5], dict(sample_per_part=1, no_trans=True), 0.5 * 4 + 0.5 + 1),
    # -0.5 → -1, 1.5 → 2: start -1.5, roi 4, samples -1.5 (skipped, not counted) and 0.5
    ([0, -0.5, -0.5, 1.5, 1.5], dict(sample_per_part=2, no_trans=True), 0.5 * 4 + 0.5 + 1),
    # box 2..6 on a 4×4 image: start 1.5, roi 5, sub-bin 2.5: samples 1.5 and 4.0 > W - 0.5 (skipped)
    ([0, 2, 2, 6, 6], dict(sample_per_part=2, no_trans=True), 1.5 * 4 + 1.5 + 1),
    # a sample exactly at W - 0.5 is counted, and clamped to W - 1: box 0..7 → start -0.5, roi 8, sub 4
    ([0, 0, 0, 7, 7], dict(sample_per_part=2, no_trans=True), (1 + 4 + 13 + 16) / 4),
    # box entirely outside: no sample counted → 0
    ([0, 5, 5, 8, 8], dict(sample_per_part=2, no_trans=True), 0.0),
    # spatial_scale applies after rounding: box 0..7 at 0.5 → start -0.5, end 3.5
    ([0, 0, 0, 7, 7], dict(sample_per_part=2, spatial_scale=0.5, no_trans=True), (1 + 2.5 + 7 + 8.5) / 4),
    # inverted box x2 < x1: end - start = 0.5 - 1.5 < 0.1, so the RoI is 0.1 wide; start 1.5, one sample there
    ([0, 2, 2, 0, 0], dict(sample_per_part=1, no_trans=True), 1.5 * 4 + 1.5 + 1),
])
def test_golden_without_offsets(box, kwargs, expected):
    out = pool(ramp(4, 4), [box], **kwargs)
    assert out.shape == (1, 1, 1, 1)
    assert out[0, 0, 0, 0] == pytest.approx(expected, abs=1e-12)


def test_golden_offset_moves_the_bin():
    # box 0..3: start -0.5, roi 4; trans = offset · trans_std; w = -0.5 + 0.25·4 = 0.5, h = -0.5 + 0.375·4 = 1
    offset = np.array([[[[0.5]], [[0.75]]]])  # channel 0 = Δx, 1 = Δy
    assert pool(ramp(4, 4), [[0, 0, 0, 3, 3]], offset, sample_per_part=1, trans_std=0.5)[0, 0, 0, 0] == \
        pytest.approx(1 * 4 + 0.5 + 1, abs=1e-12)
    # trans_std = 0 (the default) ignores the offset; no_trans ignores it too
    assert pool(ramp(4, 4), [[0, 0, 0, 3, 3]], offset, sample_per_part=1)[0, 0, 0, 0] == 1.0
    ignored = pool(ramp(4, 4), [[0, 0, 0, 3, 3]], offset, sample_per_part=1, trans_std=0.5, no_trans=True)
    assert ignored[0, 0, 0, 0] == 1.0


def test_golden_position_sensitive_channels_classes_and_parts():
    # G = P = 2, output_dim 2, two classes; input channel c holds the constant 10·c + 1, so a bin with any
    # counted sample reads exactly the value of its channel (ctop·2 + ph)·2 + pw
    x = (10.0 * np.arange(8) + 1)[None, :, None, None] * np.ones((1, 8, 6, 6))
    box = [[0, 0, 0, 5, 5]]
    offset = np.zeros((1, 4, 2, 2))
    out = pool(x, box, offset, output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=1.0)
    np.testing.assert_allclose(out[0], 10.0 * np.arange(8).reshape(2, 2, 2) + 1, atol=1e-12)
    # class 0 (output channel 0), part (1, 0) (bin ph = 1, pw = 0) moved far off the image: that bin pools
    # to 0; nothing else changes
    offset[0, 0, 1, 0] = 100.0
    moved = pool(x, box, offset, output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=1.0)
    expected = out.copy()
    expected[0, 0, 1, 0] = 0
    np.testing.assert_array_equal(moved, expected)
    # part_size 1 < pooled_size: one offset pair for all four bins of class 1
    offset1 = np.zeros((1, 4, 1, 1))
    offset1[0, 3] = -50.0  # Δy of class 1
    moved = pool(x, box, offset1, output_dim=2, group_size=2, pooled_size=2, part_size=1, sample_per_part=2,
                 trans_std=1.0)
    expected = out.copy()
    expected[0, 1] = 0
    np.testing.assert_array_equal(moved, expected)
    # group_size 1 < pooled_size: every bin of output channel ctop reads input channel ctop
    y = pool(x[:, :2], box, None, output_dim=2, group_size=1, pooled_size=3, sample_per_part=2, no_trans=True)
    np.testing.assert_allclose(y[0], [np.full((3, 3), 1.0), np.full((3, 3), 11.0)], atol=1e-12)


def test_golden_parts_use_exact_integer_division():
    """part = floor(ph·S / P) exactly: at P = S = 22 bin 13 uses part 13 (the original's float arithmetic
    computes 13 / 22 · 22 = 12.99999 and reads part 12)."""
    x = np.ones((1, 1, 30, 30))
    offset = np.zeros((1, 2, 22, 22))
    offset[0, 0, 13, :] = 1000.0   # part row 13 off the image
    out = pool(x, [[0, 0, 0, 29, 29]], offset, pooled_size=22, sample_per_part=1, trans_std=1.0)
    assert np.all(out[0, 0, 13] == 0)
    np.testing.assert_allclose(out[0, 0, np.arange(22) != 13], 1, atol=1e-12)


def test_golden_input_gradient():
    # the first golden case: samples (0, 0), (0, 1.5), (1.5, 0), (1.5, 1.5), each with weight 1/4
    grad = pool_backward(np.ones((1, 1, 1, 1)), ramp(4, 4), [[0, 0, 0, 3, 3]], sample_per_part=2, no_trans=True)
    expected = np.zeros((4, 4))
    expected[0, 0] = 0.25
    expected[0, 1] = expected[0, 2] = expected[1, 0] = expected[2, 0] = 0.125
    expected[1:3, 1:3] = 0.0625
    np.testing.assert_allclose(grad.input[0, 0], expected, atol=1e-15)
    assert grad.offset is None
    # skipped samples get nothing, and the counted one gets all: box 2..6 counts only (1.5, 1.5)
    grad = pool_backward(np.ones((1, 1, 1, 1)), ramp(4, 4), [[0, 2, 2, 6, 6]], sample_per_part=2, no_trans=True)
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 0.25
    np.testing.assert_allclose(grad.input[0, 0], expected, atol=1e-15)


@pytest.mark.parametrize("dx, dy, value, grad_x, grad_y", [
    # w = -0.5 + 4·Δx, h = -0.5 + 4·Δy (trans_std 1, roi 4); plane x² + 10·y²
    # at (1, 1), integer coordinates: derivative from the right (x: 4 - 1 = 3, y: 40 - 10 = 30), times roi 4
    (0.375, 0.375, 11.0, 12.0, 120.0),
    # w = -0.25 is counted but clamped to 0: no x-gradient (the original code reports the slope there)
    (0.0625, 0.375, 10.0, 0.0, 120.0),
    # w = W - 1 exactly is clamped: no x-gradient
    (0.875, 0.375, 19.0, 0.0, 120.0),
    # a non-integer point: bilinear slopes (x between 1 and 2: 4 - 1; y between 1 and 2: 40 - 10)
    (0.5, 0.5, 0.5 * (1 + 4) + 0.5 * (10 + 40), 12.0, 120.0),
])
def test_golden_offset_gradient(dx, dy, value, grad_x, grad_y):
    yy, xx = np.mgrid[0:4, 0:4].astype(np.float64)
    plane = (xx ** 2 + 10 * yy ** 2)[None, None]
    offset = np.array([[[[dx]], [[dy]]]])
    box = [[0, 0, 0, 3, 3]]
    assert pool(plane, box, offset, sample_per_part=1, trans_std=1.0)[0, 0, 0, 0] == pytest.approx(value)
    grad = pool_backward(np.ones((1, 1, 1, 1)), plane, box, offset, sample_per_part=1, trans_std=1.0)
    np.testing.assert_allclose(grad.offset[0, :, 0, 0], [grad_x, grad_y], atol=1e-12)
    for backend, deterministic in itertools.product(testing.available_backends(), (False, True)):
        got = testing.run(backend, deform_ps_roi_pool_backward, *(to_backend(a, backend) for a in (
            np.ones((1, 1, 1, 1)), plane, np.array(box, np.float64), offset)), 1, 1, 1, sample_per_part=1,
            trans_std=1.0, deterministic=deterministic)
        np.testing.assert_allclose(testing.to_numpy(got.offset)[0, :, 0, 0], [grad_x, grad_y], atol=1e-12)


# ---------------------------------------------------------------------- a port of the original operator

def c_round(v):
    r = math.trunc(v)
    return r + math.copysign(1, v) if abs(v - r) >= 0.5 else r


def original_samples(rois, offset, output_dim, G, P, S, spp, scale, trans_std, no_trans):
    """Per output (k, ctop, ph, pw): the input channel and the sample coordinates (h, w), loop by loop as in
    DeformablePSROIPoolForwardKernel."""
    nc = 1 if no_trans else offset.shape[1] // 2
    for k, roi in enumerate(rois):
        start_w, start_h = c_round(roi[1]) * scale - 0.5, c_round(roi[2]) * scale - 0.5
        end_w, end_h = (c_round(roi[3]) + 1) * scale - 0.5, (c_round(roi[4]) + 1) * scale - 0.5
        roi_w, roi_h = max(end_w - start_w, 0.1), max(end_h - start_h, 0.1)
        bin_w, bin_h = roi_w / P, roi_h / P
        for ctop, ph, pw in itertools.product(range(output_dim), range(P), range(P)):
            part_h, part_w = math.floor(Fraction(ph, P) * S), math.floor(Fraction(pw, P) * S)
            cls = ctop // (output_dim // nc)
            tx = 0 if no_trans else offset[k, 2 * cls, part_h, part_w] * trans_std
            ty = 0 if no_trans else offset[k, 2 * cls + 1, part_h, part_w] * trans_std
            wstart = pw * bin_w + start_w + tx * roi_w
            hstart = ph * bin_h + start_h + ty * roi_h
            gw, gh = min(max(pw * G // P, 0), G - 1), min(max(ph * G // P, 0), G - 1)
            sub_w, sub_h = bin_w / spp, bin_h / spp
            points = [(hstart + ih * sub_h, wstart + iw * sub_w)
                      for ih in range(spp) for iw in range(spp)]
            yield (k, ctop, ph, pw), int(roi[0]), (ctop * G + gh) * G + gw, points


def original_forward(x, rois, offset, output_dim, G, P, S, spp, scale, trans_std, no_trans):
    H, W = x.shape[2:]
    out = np.zeros((len(rois), output_dim, P, P))
    for where, n, c, points in original_samples(rois, offset, output_dim, G, P, S, spp, scale, trans_std, no_trans):
        total, count = 0.0, 0
        for h, w in points:
            if w < -0.5 or w > W - 0.5 or h < -0.5 or h > H - 0.5:
                continue
            w, h = min(max(w, 0.0), W - 1.0), min(max(h, 0.0), H - 1.0)
            x1, x2, y1, y2 = math.floor(w), math.ceil(w), math.floor(h), math.ceil(h)
            dx, dy = w - x1, h - y1
            p = x[n, c]
            total += ((1 - dx) * (1 - dy) * p[y1, x1] + (1 - dx) * dy * p[y2, x1] + dx * (1 - dy) * p[y1, x2]
                      + dx * dy * p[y2, x2])
            count += 1
        out[where] = total / count if count else 0.0
    return out


def random_rois(rng, N, H, W, K, scale=SCALE, inside_left_top=False):
    """RoIs inside, across and outside an image seen at spatial_scale, some degenerate or inverted."""
    low = 0 if inside_left_top else -6 / scale
    x1, y1 = rng.uniform(low, (W + 2) / scale, K), rng.uniform(low, (H + 2) / scale, K)
    w, h = rng.uniform(-2, W / scale, K), rng.uniform(-2, H / scale, K)
    w[::5] = 0.0
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1)


CASES = [  # output_dim, group_size, pooled_size, part_size, sample_per_part, num_classes, no_trans
    (2, 3, 3, 3, 2, 1, False),
    (4, 2, 3, 2, 3, 2, False),    # two classes, G < P, S < P
    (3, 1, 4, 5, 1, 3, False),    # three classes, G = 1, S > P
    (2, 4, 3, 3, 4, 1, False),    # G > P
    (2, 2, 4, 4, 2, 1, True),
    (1, 3, 3, 2, 3, 1, True),
]
CASE_IDS = [f"dim{d}-G{g}-P{p}-S{s}-spp{n}-cls{c}{'-notrans' if t else ''}" for d, g, p, s, n, c, t in CASES]


def make_case(rng, case, N=2, H=7, W=8, K=7):
    """Inputs for one of CASES. Without offsets, RoIs start at x1, y1 >= 0: a sample can then sit on the
    -0.5 border only at exactly -0.5 (exact in every precision and order of operations), never within
    the last bit of it, so that float32 and float64 count the same samples."""
    output_dim, G, P, S, spp, nc, no_trans = case
    x = rng.standard_normal((N, output_dim * G * G, H, W))
    rois = random_rois(rng, N, H, W, K, inside_left_top=no_trans)
    offset = rng.standard_normal((K, 2 * nc, S, S))
    kwargs = dict(output_dim=output_dim, group_size=G, pooled_size=P, part_size=S, sample_per_part=spp,
                  spatial_scale=SCALE, trans_std=0.3, no_trans=no_trans)
    return x, rois, offset, kwargs


def positional(kwargs):
    return (kwargs["output_dim"], kwargs["group_size"], kwargs["pooled_size"], kwargs["part_size"],
            kwargs["sample_per_part"], kwargs["spatial_scale"], kwargs["trans_std"], kwargs["no_trans"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_port_of_the_original(rng, case):
    x, rois, offset, kwargs = make_case(rng, case)
    rois[::3, 1:] = np.round(rois[::3, 1:]) + 0.5   # exact halves: C's rounding matters
    out = deform_ps_roi_pool(x, rois, offset, **kwargs)
    np.testing.assert_allclose(out, original_forward(x, rois, offset, *positional(kwargs)), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- finite differences (float64)

def kinks(rois, offset, kwargs, H, W):
    """(How close any sample comes to a point where the output is not differentiable, the fraction of
    samples counted). Kinks: the skip borders -0.5, size - 0.5 (every sample) and the integers of
    [0, size - 1] (counted samples: bilinear kinks and clamps)."""
    args = positional(kwargs)
    distance, counted, total = np.inf, 0, 0
    for _, _, _, points in original_samples(rois, offset, args[0], *args[1:5], *args[5:]):
        for h, w in points:
            total += 1
            counted += -0.5 <= h <= H - 0.5 and -0.5 <= w <= W - 0.5
            for v, size in ((h, H), (w, W)):
                distance = min(distance, abs(v + 0.5), abs(v - size + 0.5))
                if -0.5 <= v <= size - 0.5:
                    distance = min(distance, abs(v - round(v)))
    return distance, counted / total


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("trial", range(3))
def test_finite_differences(rng, case, trial):
    """Input and offset gradients against central differences, with RoIs across the border (samples
    skipped and clamped) and offsets drawn until every sample is 1e-4 away from a kink (the differences
    move samples by about 1e-5) and at least a third of them are counted."""
    H, W, K = 7, 8, 5
    for _ in range(500):
        x, _, offset, kwargs = make_case(rng, case, H=H, W=W, K=K)
        kwargs["trans_std"] = 0.1
        x1, y1 = rng.uniform(-3, W - 3, K) / SCALE, rng.uniform(-3, H - 3, K) / SCALE
        rois = np.stack([rng.integers(0, 2, K), x1, y1, x1 + rng.uniform(2, W, K) / SCALE,
                         y1 + rng.uniform(2, H, K) / SCALE], axis=1)
        if kwargs["no_trans"]:  # then the output is linear in the input: no kinks to avoid
            break
        distance, counted = kinks(rois, offset, kwargs, H, W)
        if distance > 1e-4 and counted > 1 / 3:
            break
    else:
        pytest.fail("no kink-free configuration drawn")
    grad_output = rng.standard_normal((K, kwargs["output_dim"], kwargs["pooled_size"], kwargs["pooled_size"]))
    grads = deform_ps_roi_pool_backward(grad_output, x, rois, offset, **kwargs)

    def loss(x, offset):
        return np.sum(grad_output * deform_ps_roi_pool(x, rois, offset, **kwargs))

    for index, grad in enumerate(grads):
        direction = rng.standard_normal(grad.shape)
        numeric = directional_derivative(loss, (x, offset), index, direction)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    assert np.any(grads.offset) != kwargs["no_trans"]


# ------------------------------------------------------------------------------------ backends vs NumPy

def test_offset_none_or_ignored_without_trans(backend, rng):
    x, rois, offset, kwargs = make_case(rng, CASES[4])
    grad_output = rng.standard_normal((len(rois), 2, 4, 4))
    with_offset = deform_ps_roi_pool(x, rois, offset, **kwargs)
    for name in ("numpy", backend):
        for given in (None, offset, np.zeros((0,)), np.full((3, 3), np.nan), np.array(1.0)):  # not read: any shape
            args = [to_backend(a, name) for a in (grad_output, x, rois, given)]
            assert_close(testing.run(name, deform_ps_roi_pool, *args[1:], **kwargs), with_offset, "float64")
            grads = testing.run(name, deform_ps_roi_pool_backward, *args, **kwargs)
            if given is None:
                assert grads.offset is None
            else:
                assert grads.offset.shape == given.shape and not np.any(testing.to_numpy(grads.offset))


# ------------------------------------------------------------------------------ special RoIs and offsets

def special_rois(H, W):
    """NaN and ±inf coordinates, far outside, huge, degenerate and inverted RoIs."""
    return np.array([
        [0, np.nan, 1, 4, 5], [1, 1, np.inf, 4, 5], [0, -np.inf, -np.inf, np.inf, np.inf], [1, 1, 1, 4, np.nan],
        [0, 1e6, 1e6, 1e6 + 5, 1e6 + 5],          # far outside
        [1, -1e30, -1e30, 1e30, 1e30],            # huge
        [0, 3, 3, 3, 3], [1, 5, 2, 1, 1],         # one pixel, inverted (at least 0.1 wide)
        [0, -2 * W, -2 * H, 4 * W, 4 * H],        # larger than the image on every side
        [1, 0, 0, W - 1, H - 1],                  # the whole image
    ], np.float64)


@pytest.mark.parametrize("no_trans", [False, True])
def test_special_rois(backend, rng, no_trans):
    """Non-finite RoIs pool to 0 and get no gradient; the rest is defined, equal on every backend, and
    reads nothing outside the input (checked under ASan)."""
    H, W = 6, 5
    x = rng.standard_normal((2, 2 * 4, H, W))
    rois = special_rois(H, W)
    offset = 0.5 * rng.standard_normal((len(rois), 2, 2, 2))
    kwargs = dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=3, trans_std=0.2, no_trans=no_trans)
    out, expected = run_both(backend, deform_ps_roi_pool, x, rois, offset, **kwargs)
    assert np.all(np.isfinite(expected))
    assert np.all(expected[:5] == 0)          # non-finite and far outside
    assert np.any(expected[5:] != 0)
    assert_close(out, expected, "float64")
    grad_output = rng.standard_normal(expected.shape)
    for deterministic in (False, True):
        grads, expected_grads = run_both(backend, deform_ps_roi_pool_backward, grad_output, x, rois, offset,
                                         deterministic=deterministic, **kwargs)
        assert np.all(np.isfinite(expected_grads.input)) and np.all(np.isfinite(expected_grads.offset))
        assert np.all(expected_grads.offset[:5] == 0)
        assert_close(grads.input, expected_grads.input, "float64")
        assert_close(grads.offset, expected_grads.offset, "float64")
    # a NaN RoI contributes no input gradient: the same gradient as without it
    alone = pool_backward(grad_output[5:], x, rois[5:], offset[5:], **kwargs)
    np.testing.assert_allclose(expected_grads.input, alone.input, atol=1e-14)


def test_non_finite_offsets(backend, rng):
    """A NaN or ±inf offset (or 0·inf with trans_std 0) moves its samples to NaN/±inf: they are skipped,
    the bins pool to 0 and nothing gets a gradient from them; other parts are unaffected."""
    H, W = 6, 7
    x = rng.standard_normal((1, 2, H, W))
    rois = np.array([[0, 1, 1, 5, 4]] * 4, np.float64)
    offset = 0.1 * rng.standard_normal((4, 2, 2, 2))
    offset[0, 0, 0, 0] = np.nan
    offset[1, 1, 1, 1] = np.inf
    offset[2, 0, 1, 0] = -np.inf
    kwargs = dict(output_dim=2, group_size=1, pooled_size=2, sample_per_part=2, trans_std=0.3)
    out, expected = run_both(backend, deform_ps_roi_pool, x, rois, offset, **kwargs)
    assert np.all(expected[0, :, 0, 0] == 0) and np.all(expected[1, :, 1, 1] == 0) and np.all(expected[2, :, 1, 0] == 0)
    assert np.all(expected[3] != 0)
    assert_close(out, expected, "float64")
    grad_output = rng.standard_normal(expected.shape)
    for deterministic in (False, True):
        grads, expected_grads = run_both(backend, deform_ps_roi_pool_backward, grad_output, x, rois, offset,
                                         deterministic=deterministic, **kwargs)
        assert np.all(np.isfinite(expected_grads.input)) and np.all(np.isfinite(expected_grads.offset))
        assert expected_grads.offset[0, 0, 0, 0] == expected_grads.offset[0, 1, 0, 0] == 0
        assert_close(grads.input, expected_grads.input, "float64")
        assert_close(grads.offset, expected_grads.offset, "float64")
    # trans_std = 0 with an infinite offset: 0·inf is NaN, the bin is skipped
    zero_std = pool(x, rois[1:2], offset[1:2], output_dim=2, pooled_size=2, sample_per_part=2)
    assert np.all(zero_std[0, :, 1, 1] == 0) and np.all(zero_std[0, :, 0, 0] != 0)


def test_empty_and_noncontiguous(backend, rng):
    x, rois, offset, kwargs = make_case(rng, CASES[0])
    with deformcp.backend("numpy" if backend == "cuda" else backend):
        out = deform_ps_roi_pool(*(noncontiguous(to_backend(a, backend)) for a in (x, rois, offset)), **kwargs)
    assert_close(out, deform_ps_roi_pool(x, rois, offset, **kwargs), "float64")
    for N in (2, 0):  # no RoIs, over a batch and over an empty one
        x = rng.standard_normal((N, 2 * 9, 7, 8))
        out, expected = run_both(backend, deform_ps_roi_pool, x, np.zeros((0, 5)), np.zeros((0, 2, 3, 3)), **kwargs)
        assert out.shape == expected.shape == (0, 2, 3, 3)
        for deterministic in (False, True):
            grads, _ = run_both(backend, deform_ps_roi_pool_backward, np.zeros((0, 2, 3, 3)), x, np.zeros((0, 5)),
                                np.zeros((0, 2, 3, 3)), deterministic=deterministic, **kwargs)
            assert grads.input.shape == x.shape and not np.any(testing.to_numpy(grads.input))
            assert grads.offset.shape == (0, 2, 3, 3)


def test_deterministic_backward_is_bitwise_reproducible(backend, rng):
    x = rng.standard_normal((2, 8 * 9, 20, 20)).astype(np.float32)
    rois = np.concatenate([random_rois(rng, 2, 20, 20, 32, scale=0.5)] * 3).astype(np.float32)  # overlapping
    offset = rng.standard_normal((96, 2 * 2, 3, 3)).astype(np.float32)
    grad_output = rng.standard_normal((96, 8, 3, 3)).astype(np.float32)
    args = [to_backend(a, backend) for a in (grad_output, x, rois, offset)]
    runs = [[testing.to_numpy(g) for g in testing.run(backend, deform_ps_roi_pool_backward, *args, 8, 3, 3,
                                                      sample_per_part=3, spatial_scale=0.5, trans_std=0.2,
                                                      deterministic=True)] for _ in range(3)]
    for other in runs[1:]:
        for got, first in zip(other, runs[0]):
            np.testing.assert_array_equal(got, first)


def test_numpy_path_chunks_do_not_change_results(rng, monkeypatch):
    x, rois, offset, kwargs = make_case(rng, CASES[1], K=12)
    grad_output = rng.standard_normal((12, 4, 3, 3))
    whole = deform_ps_roi_pool(x, rois, offset, **kwargs), deform_ps_roi_pool_backward(grad_output, x, rois, offset,
                                                                                        **kwargs)
    monkeypatch.setattr(_workspace, "PS_ROI_SAMPLES_PER_CHUNK", 100)
    chunked = deform_ps_roi_pool(x, rois, offset, **kwargs), deform_ps_roi_pool_backward(grad_output, x, rois, offset,
                                                                                          **kwargs)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=1e-15)
    for got, want in zip(chunked[1], whole[1]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_parity_check_passes():
    results = testing.check(ops=["deform_ps_roi_pool"])
    assert all(r.ok for r in results), testing.format_results(results)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    x, rois = rng.standard_normal((2, 8, 5, 5)), np.array([[0, 1.0, 1, 3, 3], [1, 0, 0, 2, 2]])
    offset = np.zeros((2, 2, 2, 2))
    f, b = deform_ps_roi_pool, deform_ps_roi_pool_backward
    cases = [
        (ValueError, r"rois: expected shape \(\*, 5\) for \(K, 5\) \[batch_index, x1, y1, x2, y2\], got \(2, 4\)",
         lambda: f(x, rois[:, 1:], offset, 2, 2, 2)),
        (ValueError, r"rois: expected a 2-D array", lambda: f(x, rois[0], offset, 2, 2, 2)),
        (ValueError, r"rois: expected batch indices \(column 0\) that are integers in \[0, 2\), got 2.0 in row 1",
         lambda: f(x, np.array([[0, 1.0, 1, 3, 3], [2, 0, 0, 2, 2]]), offset, 2, 2, 2)),
        (ValueError, r"rois: expected batch indices .* got 0.5 in row 0",
         lambda: f(x, np.array([[0.5, 1.0, 1, 3, 3], [0, 0, 0, 2, 2]]), offset, 2, 2, 2)),
        (ValueError, r"rois: expected batch indices .* got nan in row 1",
         lambda: f(x, np.array([[0, 1.0, 1, 3, 3], [np.nan, 0, 0, 2, 2]]), offset, 2, 2, 2)),
        (ValueError, r"input: expected a 4-D array \(N, C, H, W\), got shape \(8, 5, 5\)",
         lambda: f(x[0], rois, offset, 2, 2, 2)),
        (ValueError, r"input: expected C = output_dim·group_size² = 3·2² = 12 channels in \(N, C, H, W\), "
                     r"got shape \(2, 8, 5, 5\)", lambda: f(x, rois, offset, 3, 2, 2)),
        (ValueError, r"offset: expected an array \(K, 2·num_classes, part_size, part_size\) \(None only with "
                     r"no_trans=True\), got None", lambda: f(x, rois, None, 2, 2, 2)),
        (ValueError, r"offset: expected shape \(2, \*, 2, 2\) for \(K, 2·num_classes, part_size, part_size\), "
                     r"got \(2, 2, 3, 3\)", lambda: f(x, rois, np.zeros((2, 2, 3, 3)), 2, 2, 2)),
        (ValueError, r"offset: expected shape \(2, \*, 3, 3\) .* got \(2, 2, 2, 2\)",
         lambda: f(x, rois, offset, 2, 2, 2, part_size=3)),
        (ValueError, r"offset: expected shape \(2, \*, 2, 2\) .* got \(1, 2, 2, 2\)",
         lambda: f(x, rois, offset[:1], 2, 2, 2)),
        (ValueError, r"offset: expected an even, positive number 2·num_classes of channels .* got shape "
                     r"\(2, 3, 2, 2\)",
         lambda: f(x, rois, np.zeros((2, 3, 2, 2)), 2, 2, 2)),
        (ValueError, r"offset: expected a 4-D array", lambda: f(x, rois, offset[0], 2, 2, 2)),
        (ValueError, r"output_dim: expected a multiple of num_classes = offset.shape\[1\] / 2 = 3, got 2",
         lambda: f(x, rois, np.zeros((2, 6, 2, 2)), 2, 2, 2)),
        (ValueError, r"output_dim: expected a positive int, got 0", lambda: f(x, rois, offset, 0, 2, 2)),
        (ValueError, r"group_size: expected a positive int, got -2", lambda: f(x, rois, offset, 2, -2, 2)),
        (ValueError, r"pooled_size: expected a positive int, got 0", lambda: f(x, rois, offset, 2, 2, 0)),
        (ValueError, r"part_size: expected a positive int, got 0", lambda: f(x, rois, offset, 2, 2, 2, 0)),
        (ValueError, r"sample_per_part: expected a positive int, got 0",
         lambda: f(x, rois, offset, 2, 2, 2, sample_per_part=0)),
        (TypeError, r"pooled_size: expected an int, got float 2.0", lambda: f(x, rois, offset, 2, 2, 2.0)),
        (TypeError, r"pooled_size: expected an int, got tuple \(2, 2\)", lambda: f(x, rois, offset, 2, 2, (2, 2))),
        (ValueError, r"spatial_scale: expected a finite positive number, got 0",
         lambda: f(x, rois, offset, 2, 2, 2, spatial_scale=0)),
        (ValueError, r"trans_std: expected a finite number, got nan",
         lambda: f(x, rois, offset, 2, 2, 2, trans_std=float("nan"))),
        (TypeError, r"no_trans: expected a bool, got int 1", lambda: f(x, rois, offset, 2, 2, 2, no_trans=1)),
        (TypeError, r"expected arrays of one dtype: input is float64, rois is float32, offset is float64",
         lambda: f(x, rois.astype(np.float32), offset, 2, 2, 2)),
        (TypeError, r"offset: expected a floating-point array .*got dtype int64",
         lambda: f(x, rois, offset.astype(np.int64), 2, 2, 2)),
        # a list is per-image boxes, each an array
        (ValueError, r"rois\[0\]: expected a 2-D array \(L, 4\)", lambda: f(x, rois.tolist(), offset, 2, 2, 2)),
        (ValueError, r"input: expected non-empty spatial size H, W in \(N, C, H, W\), got \(2, 8, 0, 5\)",
         lambda: f(np.zeros((2, 8, 0, 5)), rois, offset, 2, 2, 2)),
        (ValueError, r"grad_output: expected shape \(2, 2, 2, 2\) for \(K, output_dim, P, P\), got \(2, 2, 3, 3\)",
         lambda: b(np.zeros((2, 2, 3, 3)), x, rois, offset, 2, 2, 2)),
        (TypeError, r"deterministic: expected a bool",
         lambda: b(np.zeros((2, 2, 2, 2)), x, rois, offset, 2, 2, 2, deterministic="yes")),
        (ValueError, r"needs_input_grad: expected 2 bools for \('input', 'offset'\), got \(True,\)",
         lambda: b(np.zeros((2, 2, 2, 2)), x, rois, offset, 2, 2, 2, needs_input_grad=(True,))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
