"""The index type of the kernels.

Every kernel is a template over its index type: ``int``, or ``long long`` once an element count, a size or
an array's length can pass 2**31 - 1 (:func:`deformcp._kernels.needs_index64`). Here, on the host backend:

- every op of ``deformcp.ops.SPECS``, forward and backward, gives bitwise the same results in its 64-bit
  instantiation (forced with :func:`deformcp._kernels.force_index64`) as in its 32-bit one, for float32 and
  float64, and the cases of a family's ops together launch every kernel of the family. The cases (``CASES``,
  one per op, calling the spec's functions) are what is written here per op; an op or a kernel family without
  one fails ``test_cases_cover_every_op_and_family``;
- the documented rule: sizes up to 2**31 - 1 → 32-bit, 2**31 → 64-bit, forced → 64-bit;
- :func:`deformcp._kernels.launch` picks the ``long long`` instantiation exactly then — by the number of work
  items and by an array's length (a lazily allocated array of more than 2**31 elements, whose indices do not
  fit an ``int``). The selection is observed by a spy around ``_kernels.get_function``; the kernels are real;
- ms_deform_attn and flash_deform_attn over a level that starts past 2**31 - 1 in value's S axis (a first level
  of 2**31 pixels, lazily allocated) give exact values there, forward and backward.

Kernels that scatter-add with atomics are bitwise reproducible only in a fixed order: their non-deterministic
launches here have at most 256 work items, i.e. one block, which the host backend runs on one thread.
"""
import functools
import importlib
import threading
from typing import NamedTuple

import numpy as np
import pytest

import deformcp
from deformcp import _host, _kernels, _sources, testing
from deformcp.ops import SPECS, OpSpec, deform_conv

pytestmark = pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")

DTYPES = ("float32", "float64")


# ------------------------------------------------------------------------------------------ the spy

class Launch(NamedTuple):
    family: str
    name: str
    dtype: str
    index64: bool
    expression: str          # the instantiation's name, e.g. "grid_sample_forward<float, long long>"
    int64_arguments: bool    # whether the kernel was passed any int64 scalar (the sizes, when 64-bit)


@pytest.fixture
def launches(monkeypatch):
    """Records every kernel that _kernels.launch selects and then runs (the real kernel)."""
    recorded = []
    real = _kernels.get_function

    def spy(backend, family, name, dtype, index64):
        kernel = real(backend, family, name, dtype, index64)

        def run(grid, block, args):
            recorded.append(Launch(family, name, _kernels.dtype_name(dtype), index64, kernel.name,
                                   any(isinstance(a, np.int64) for a in args)))
            return kernel(grid, block, args)

        return run

    monkeypatch.setattr(_kernels, "get_function", spy)
    return recorded


def check_selection(recorded, index64: bool):
    assert recorded, "no kernel was launched"
    for launch in recorded:
        assert launch.index64 is index64, launch
        assert launch.expression.endswith(", long long>" if index64 else ", int>"), launch
        assert launch.int64_arguments is index64, launch


def assert_bitwise_equal(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bits = f"u{actual.itemsize}"
    np.testing.assert_array_equal(np.ascontiguousarray(actual).view(bits), np.ascontiguousarray(expected).view(bits),
                                  err_msg=f"{what}: the 64-bit instantiation differs")


# ------------------------------------------------------------------------------------------ the cases
#
# A case builds its inputs once and returns run(), which calls its op (the spec's function and backward) on the
# current backend and returns {description: array}. Sizes keep each non-deterministic (atomic) launch to one
# block (≤ 256 work items).

def family_of(spec: OpSpec) -> str:
    """The kernel family of an op: the FAMILY of the deformcp.ops module that defines it."""
    return importlib.import_module(spec.function.__module__).FAMILY


def with_specials(a, rng, fraction=0.1):
    """A few coordinates far outside (±1e30) and non-finite: the out-of-range branches run too."""
    flat = a.reshape(-1)
    where = rng.choice(flat.size, max(4, int(fraction * flat.size)), replace=False)
    flat[where] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], len(where))
    return a


def case_affine_grid(op, rng, dtype):
    theta = rng.standard_normal((3, 2, 3)).astype(dtype)
    grad = rng.standard_normal((3, 9, 11, 2)).astype(dtype)
    theta_3d = rng.standard_normal((3, 3, 4)).astype(dtype)
    grad_3d = rng.standard_normal((3, 4, 5, 6, 3)).astype(dtype)

    def run():
        out = {}
        for align in (False, True):
            out[f"affine_grid align={align}"] = op.function(theta, (3, 2, 9, 11), align)
            out[f"affine_grid_backward align={align}"] = op.backward(grad, theta, (3, 2, 9, 11), align).theta
            out[f"affine_grid 3-D align={align}"] = op.function(theta_3d, (3, 2, 4, 5, 6), align)
            out[f"affine_grid_backward 3-D align={align}"] = op.backward(grad_3d, theta_3d, (3, 2, 4, 5, 6),
                                                                         align).theta
        return out
    return run


def case_grid_sample(op, rng, dtype):
    x = rng.standard_normal((2, 3, 6, 7)).astype(dtype)
    small = with_specials(rng.uniform(-1.3, 1.3, (2, 8, 8, 2)), rng).astype(dtype)   # 128 work items
    large = rng.uniform(-1.3, 1.3, (2, 20, 20, 2)).astype(dtype)                      # 800: several blocks
    g_small = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
    g_large = rng.standard_normal((2, 3, 20, 20)).astype(dtype)
    v = rng.standard_normal((2, 3, 4, 5, 6)).astype(dtype)
    v_grid = with_specials(rng.uniform(-1.3, 1.3, (2, 4, 5, 6, 3)), rng).astype(dtype)
    v_grad = rng.standard_normal((2, 3, 4, 5, 6)).astype(dtype)

    def run():
        out = {}
        for mode in ("bilinear", "nearest"):
            for padding in ("zeros", "border", "reflection"):
                for align in (False, True):
                    o = dict(mode=mode, padding_mode=padding, align_corners=align)
                    tag = f"{mode}-{padding}-align={align}"
                    out[f"grid_sample {tag}"] = op.function(x, large, **o)
                    out[f"grid_sample specials {tag}"] = op.function(x, small, **o)
                    g = op.backward(g_small, x, small, **o)
                    out[f"grid_sample_backward input {tag}"], out[f"grid_sample_backward grid {tag}"] = g
                    g = op.backward(g_large, x, large, **o, deterministic=True)
                    out[f"grid_sample_backward det input {tag}"], out[f"grid_sample_backward det grid {tag}"] = g
        for mode in ("bilinear", "nearest"):  # volumes
            tag = f"3-D {mode}"
            out[f"grid_sample {tag}"] = op.function(v, v_grid, mode=mode)
            g = op.backward(v_grad, v, v_grid, mode=mode)
            out[f"grid_sample_backward input {tag}"], out[f"grid_sample_backward grid {tag}"] = g
            g = op.backward(v_grad, v, v_grid, mode=mode, deterministic=True)
            out[f"grid_sample_backward det input {tag}"], out[f"grid_sample_backward det grid {tag}"] = g
        return out
    return run


def random_boxes(rng, N, H, W, K):
    x1, y1 = rng.uniform(-3, W + 1, K), rng.uniform(-3, H + 1, K)
    w, h = rng.uniform(0, W, K), rng.uniform(0, H, K)
    w[::4] = 0
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1)


def case_roi_align(op, rng, dtype):
    x = rng.standard_normal((2, 3, 9, 7)).astype(dtype)
    boxes = random_boxes(rng, 2, 9, 7, 6).astype(dtype)
    g = rng.standard_normal((6, 3, 2, 3)).astype(dtype)          # 108 work items

    def run():
        out = {}
        for mode in ("avg", "max"):
            for aligned in (False, True):
                for ratio in (-1, 2):
                    o = dict(output_size=(2, 3), spatial_scale=0.7, sampling_ratio=ratio, aligned=aligned,
                             pool_mode=mode)
                    tag = f"{mode}-aligned={aligned}-ratio={ratio}"
                    out[f"roi_align {tag}"] = op.function(x, boxes, **o)
                    for det in (False, True):
                        out[f"roi_align_backward det={det} {tag}"] = op.backward(g, x, boxes, **o,
                                                                                 deterministic=det).input
        return out
    return run


def case_ps_roi_align(op, rng, dtype):
    x_ps = rng.standard_normal((2, 2 * 2 * 3, 9, 7)).astype(dtype)
    boxes = random_boxes(rng, 2, 9, 7, 6).astype(dtype)
    g_ps = rng.standard_normal((6, 2, 2, 3)).astype(dtype)       # 72 work items

    def run():
        out = {}
        for ratio in (-1, 2):
            out[f"ps_roi_align ratio={ratio}"] = op.function(x_ps, boxes, (2, 3), 0.7, ratio)
            for det in (False, True):
                out[f"ps_roi_align_backward det={det} ratio={ratio}"] = op.backward(g_ps, x_ps, boxes, (2, 3), 0.7,
                                                                                    ratio, det).input
        return out
    return run


def case_deform_roi_pool(op, rng, dtype):
    x = rng.standard_normal((2, 3, 9, 7)).astype(dtype)
    boxes = random_boxes(rng, 2, 9, 7, 6).astype(dtype)
    g = rng.standard_normal((6, 3, 2, 3)).astype(dtype)          # 108 work items
    offset = rng.standard_normal((6, 2, 2, 3)).astype(dtype)
    mask = rng.uniform(0, 1, (6, 1, 2, 3)).astype(dtype)

    def run():
        out = {}
        for m in (None, mask):
            for off in (None, offset):
                o = dict(output_size=(2, 3), spatial_scale=0.7, sampling_ratio=2, gamma=0.3, mask=m)
                tag = f"offset={off is not None}-mask={m is not None}"
                out[f"deform_roi_pool {tag}"] = op.function(x, boxes, off, **o)
                for det in (False, True):
                    grads = op.backward(g, x, boxes, off, **o, deterministic=det)
                    for name, grad in zip(grads._fields, grads):
                        if grad is not None:
                            out[f"deform_roi_pool_backward {name} det={det} {tag}"] = grad
        return out
    return run


def case_deform_conv(op, rng, dtype):
    N, C, H, W, G, kh, kw = 2, 4, 6, 5, 2, 3, 3
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    offset = with_specials(2 * rng.standard_normal((N, 2 * G * kh * kw, H, W)), rng, 0.02).astype(dtype)
    mask = rng.uniform(0, 1, (N, G * kh * kw, H, W)).astype(dtype)
    weight = rng.standard_normal((3, C, kh, kw)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    grad = rng.standard_normal((N, 3, H, W)).astype(dtype)      # col2im: N·C·H·W = 240 work items

    def run():
        out = {}
        for m in (None, mask):
            tag = f"mask={m is not None}"
            out[f"deform_conv2d {tag}"] = op.function(x, offset, weight, bias, padding=1, mask=m)
            for det in (False, True):
                grads = op.backward(grad, x, offset, weight, bias, padding=1, mask=m, deterministic=det)
                for name, g in zip(grads._fields, grads):
                    if g is not None:
                        out[f"deform_conv2d_backward {name} det={det} {tag}"] = g
        return out
    return run


def case_deform_ps_roi_pool(op, rng, dtype):
    x = rng.standard_normal((2, 4 * 2 * 2, 7, 8)).astype(dtype)
    rois = random_boxes(rng, 2, 7 / 0.6, 8 / 0.6, 5).astype(dtype)
    offset = rng.standard_normal((5, 2 * 2, 3, 3)).astype(dtype)
    g = rng.standard_normal((5, 4, 3, 3)).astype(dtype)         # 180 work items

    def run():
        out = {}
        for no_trans in (False, True):
            o = dict(output_dim=4, group_size=2, pooled_size=3, part_size=3, sample_per_part=3, spatial_scale=0.6,
                     trans_std=0.2, no_trans=no_trans)
            out[f"deform_ps_roi_pool no_trans={no_trans}"] = op.function(x, rois, offset, **o)
            for det in (False, True):
                grads = op.backward(g, x, rois, offset, **o, deterministic=det)
                out[f"deform_ps_roi_pool_backward input det={det} no_trans={no_trans}"] = grads.input
                out[f"deform_ps_roi_pool_backward offset det={det} no_trans={no_trans}"] = grads.offset
        return out
    return run


def case_mimic_loss(op, rng, dtype):
    f_a, f_b = rng.standard_normal((2, 300, 17)).astype(dtype)   # 300 rows: two blocks
    f_a[3] = 0
    f_b[7, 2] = np.nan
    g = np.asarray(rng.standard_normal(), dtype)

    def run():
        grads = op.backward(g, f_a, f_b)
        return {"mimic_loss": op.function(f_a, f_b), "mimic_loss_backward f_a": grads.f_a,
                "mimic_loss_backward f_b": grads.f_b}
    return run


#: Levels of the attention cases: non-square, 1×1 and taller than wide (S = 48).
LEVELS = ((5, 7), (1, 1), (4, 3))


def attention_locations(rng, shape, dtype):
    """Normalised locations in and around [0, 1], some of them special (NaN, ±inf, ±1e30)."""
    return with_specials(rng.uniform(-0.2, 1.2, shape), rng).astype(dtype)


def case_ms_deform_attn(op, rng, dtype):
    N, M, D = 2, 2, 3
    value = rng.standard_normal((N, 48, M, D)).astype(dtype)
    layouts = {  # points_per_level → locations (N, Lq, M, …, 2) of a small and a large call
        None: [(N, Lq, M, 3, 2) for Lq in (5, 40)],
        (2, 0, 3): [(N, Lq, M, 5) for Lq in (5, 40)],
    }
    arrays = {}
    for points, shapes in layouts.items():
        for size, shape in zip(("small", "large"), shapes):
            arrays[points, size] = (attention_locations(rng, shape + (2,), dtype),
                                    rng.uniform(-1, 1, shape).astype(dtype),
                                    rng.standard_normal((N, shape[1], M * D)).astype(dtype))

    def run():   # small: 60 work items in the value gradient (atomics: one block); large: 480
        out = {}
        for method in ("default", "discrete"):
            for (points, size), (locations, weights, grad) in arrays.items():
                o = dict(points_per_level=points, method=method)
                tag = f"{method}-points_per_level={points}-{size}"
                out[f"ms_deform_attn {tag}"] = op.function(value, LEVELS, None, locations, weights, **o)
                for det in ((False, True) if size == "small" else (True,)):
                    grads = op.backward(grad, value, LEVELS, (0, 35, 36), locations, weights, **o, deterministic=det)
                    for name, g in zip(grads._fields, grads):
                        out[f"ms_deform_attn_backward {name} det={det} {tag}"] = g
        return out
    return run


def case_flash_deform_attn(op, rng, dtype):
    N, M, D, P = 2, 2, 3, 2
    value = rng.standard_normal((N, 48, M, D)).astype(dtype)
    calls = {}
    for size, Lq in (("small", 5), ("large", 40)):
        locations = attention_locations(rng, (N, Lq, M, 2 * 3 * P), dtype)
        logits = (2 * rng.standard_normal((N, Lq, M, 3 * P))).astype(dtype)
        calls[size] = (np.concatenate([locations, logits], axis=-1), rng.standard_normal((N, Lq, M * D)).astype(dtype))

    def run():
        out = {}
        for size, (packed, grad) in calls.items():
            out[f"flash_deform_attn {size}"] = op.function(value, LEVELS, None, packed, P)
            for det in ((False, True) if size == "small" else (True,)):
                grads = op.backward(grad, value, LEVELS, None, packed, P, deterministic=det)
                out[f"flash_deform_attn_backward value det={det} {size}"] = grads.value
                out[f"flash_deform_attn_backward sampling_loc_attn det={det} {size}"] = grads.sampling_loc_attn
        return out
    return run


def case_dcn(op, rng, dtype):
    """dcnv3, or dcnv4 without and with its softmax, on one 3×4 image of 2 groups of 2 channels with 3×3 taps (48
    work items in the input gradient: its atomics run in one block), offsets with specials among them."""
    N, H, W, G, Cg, P = 1, 3, 4, 2, 2, 9
    geometry = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1,
                    group=G, group_channels=Cg, offset_scale=1.0)
    input = rng.standard_normal((N, H, W, G * Cg)).astype(dtype)
    offsets = with_specials(rng.normal(0, 1.5, (N, H, W, G, 2 * P)), rng).astype(dtype)
    mask = rng.uniform(-1, 1, (N, H, W, G, P)).astype(dtype)
    grad = rng.standard_normal((N, H, W, G * Cg)).astype(dtype)
    if op.name == "dcnv3":
        calls = {"": ((input, offsets.reshape(N, H, W, -1), mask.reshape(N, H, W, -1)), {})}
    else:
        packed = np.concatenate([offsets, mask], axis=-1).reshape(N, H, W, -1)
        calls = {f"softmax={softmax}": ((input, packed), {"softmax": softmax}) for softmax in (False, True)}

    def run():
        out = {}
        for tag, (arrays, options) in calls.items():
            out[f"{op.name} {tag}"] = op.function(*arrays, **geometry, **options)
            for det in (False, True):
                grads = op.backward(grad, *arrays, **geometry, **options, deterministic=det)
                for name, g in zip(grads._fields, grads):
                    out[f"{op.name}_backward {name} det={det} {tag}"] = g
        return out
    return run


def case_spec(op, rng, dtype):
    """Every case of the op's spec on its own inputs: the forward and the backward (atomic and deterministic)."""
    calls = []
    for case in op.cases:
        arrays = {name: np.asarray(a, dtype) for name, a in case.make(rng).items()}
        grad = rng.standard_normal(np.shape(op.function(**arrays, **case.options))).astype(dtype)
        calls.append((case, arrays, grad))

    def run():
        out = {}
        for case, arrays, grad in calls:
            out[f"{op.name} {case.label}"] = op.function(**arrays, **case.options)
            for det in (False, True):
                grads = op.backward(grad, **arrays, **case.options, deterministic=det)
                for name, g in zip(grads._fields, grads):
                    out[f"{op.name}_backward {name} det={det} {case.label}"] = g
        return out
    return run


#: op name → case(spec, rng, dtype) → run; the cases of a family's ops together must launch every kernel of it
CASES = {
    "affine_sample": case_spec,
    "map_coordinates": case_spec,
    "affine_transform": case_spec,
    "affine_grid": case_affine_grid,
    "grid_sample": case_grid_sample,
    "roi_align": case_roi_align,
    "ps_roi_align": case_ps_roi_align,
    "deform_roi_pool": case_deform_roi_pool,
    "deform_conv2d": case_deform_conv,
    "deform_ps_roi_pool": case_deform_ps_roi_pool,
    "mimic_loss": case_mimic_loss,
    "ms_deform_attn": case_ms_deform_attn,
    "flash_deform_attn": case_flash_deform_attn,
    "dcnv3": case_dcn,
    "dcnv4": case_dcn,
}


def test_cases_cover_every_op_and_family():
    missing, stale = sorted(set(SPECS) - set(CASES)), sorted(set(CASES) - set(SPECS))
    assert not missing and not stale, f"ops without an index64 case: {missing}; cases of no op: {stale}"
    assert sorted({family_of(spec) for spec in SPECS.values()}) == _sources.families()


def recording(spec: OpSpec, called: set) -> OpSpec:
    """spec with its function and backward adding their names to called when called."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            called.add(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper
    return spec._replace(function=wrap(spec.function), backward=wrap(spec.backward))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", _sources.families())
def test_forced_index64_is_bitwise_identical(family, dtype, rng, launches):
    """Every op of the family, forward and backward, in its 32-bit and its forced 64-bit instantiation."""
    ops = [spec for spec in SPECS.values() if family_of(spec) == family]
    assert ops, f"no op of deformcp.ops.SPECS uses the kernel family {family}"
    missing = [spec.name for spec in ops if spec.name not in CASES]
    assert not missing, f"ops of {family} without an index64 case: {missing}"
    called = set()
    runs = [CASES[spec.name](recording(spec, called), rng, np.dtype(dtype)) for spec in ops]
    with deformcp.backend("host"):
        plain = [run() for run in runs]
        plain_launches = list(launches)
        launches.clear()
        with _kernels.force_index64():
            forced = [run() for run in runs]
        forced_launches = list(launches)
    check_selection(plain_launches, False)
    check_selection(forced_launches, True)
    assert [(x.family, x.name, x.dtype) for x in forced_launches] == [(x.family, x.name, x.dtype)
                                                                      for x in plain_launches]
    assert called == {fn.__name__ for spec in ops for fn in (spec.function, spec.backward)}, called
    exercised = {x.name for x in plain_launches if x.family == family}
    missing = set(_sources.kernel_names(family)) - exercised
    assert not missing, f"kernels of {family} that no case launched: {sorted(missing)}"
    assert {x.family for x in plain_launches} == {family}
    for expected, actual in zip(plain, forced):
        assert expected.keys() == actual.keys()
        for what in expected:
            assert_bitwise_equal(actual[what], expected[what], f"{what} ({dtype})")


# ----------------------------------------------------------------------------------------- the rule

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("sizes, expected", [
    ((), False), ((0,), False), ((1, 2, 3), False), ((INT32_MAX,), False), ((INT32_MAX, INT32_MAX, 7), False),
    ((2**31,), True), ((3, 2**31, 0), True), ((2**40,), True), ((np.int64(2**31),), True),
    ((np.int64(INT32_MAX),), False),
])
def test_needs_index64_rule(sizes, expected):
    assert _kernels.needs_index64(*sizes) == expected
    with _kernels.force_index64():
        assert _kernels.needs_index64(*sizes) == True  # noqa: E712  (NumPy sizes give NumPy bools)
    assert _kernels.needs_index64(*sizes) == expected


def test_force_index64_is_scoped():
    """Forcing holds inside the with block (nested too), ends on an exception, and does not reach other
    threads (a context variable)."""
    assert _kernels.needs_index64(1) is False
    seen_in_thread = []
    with _kernels.force_index64():
        with _kernels.force_index64():
            assert _kernels.needs_index64(1) is True
        assert _kernels.needs_index64(1) is True
        thread = threading.Thread(target=lambda: seen_in_thread.append(_kernels.needs_index64(1)))
        thread.start()
        thread.join()
    assert seen_in_thread == [False]
    assert _kernels.needs_index64(1) is False
    with pytest.raises(ZeroDivisionError), _kernels.force_index64():
        raise ZeroDivisionError
    assert _kernels.needs_index64(1) is False


@pytest.mark.parametrize("n, index64", [(12, False), (INT32_MAX, False), (2**31, True)])
def test_launch_picks_long_long_by_the_number_of_work_items(n, index64, rng, launches):
    """affine_grid's kernel launched directly over n work items (a grid-stride loop: extra threads find no
    work) selects by n, and computes what the ordinary launch computes."""
    theta = rng.standard_normal((2, 2, 3)).astype(np.float32)
    with deformcp.backend("host"):
        expected = deformcp.affine_grid(theta, (2, 1, 3, 4))
    launches.clear()
    out = np.full((2, 3, 4, 2), np.nan, np.float32)
    _kernels.launch("host", "spatial_transformer", "affine_grid_forward", out.dtype, n, (theta, out), (2, 3, 4), (0,))
    check_selection(launches, index64)
    assert_bitwise_equal(out, expected, f"affine_grid over n = {n}")


def lazy_zeros(shape, dtype):
    """Zeros whose pages are mapped only when touched (calloc → mmap): a long array that costs nothing."""
    try:
        return np.zeros(shape, dtype)
    except MemoryError:
        pytest.skip(f"cannot reserve {np.prod(shape) * np.dtype(dtype).itemsize / 2**30:.1f} GiB of address space")


@pytest.mark.parametrize("H, W, y, index64", [
    (1, INT32_MAX, 0, False),           # 2**31 - 1 elements: int
    (65536, 33000, 65472, True),        # 2**31 + 15 204 352 elements; the sampled pixel's index 2 160 576 004
])
def test_launch_picks_long_long_by_array_length(H, W, y, index64, launches):
    """roi_align over one float16 plane of about 2**31 pixels (4 GiB of address space, a few pages touched):
    a box around pixel (y, 4) reads exactly that pixel, and the backward writes exactly there — with the
    32-bit index where the plane has 2**31 - 1 elements, with the 64-bit one past that, where the pixel's
    flat index does not fit an int."""
    x = lazy_zeros((1, 1, H, W), np.float16)
    x[0, 0, y, 4] = 3
    box = np.array([[0, 0, y - 32, 8, y + 32] if y else [0, 0, 0, 8, 0]], np.float16)
    grad_output = np.full((1, 1, 1, 1), 2, np.float16)
    with deformcp.backend("host"):
        out = deformcp.roi_align(x, box, 1, sampling_ratio=1)
        grads = [deformcp.roi_align_backward(grad_output, x, box, 1, sampling_ratio=1, deterministic=det).input
                 for det in (False, True)]
    check_selection(launches, index64)
    assert {x.name for x in launches} == {"roi_align_forward", "roi_align_backward"}
    assert out.item() == 3
    for grad in grads:
        window = grad[0, 0, max(y - 2, 0):y + 3, 0:9].astype(np.float64)
        assert grad[0, 0, y, 4] == 2 and window.sum() == 2
        del grad
    del x, grads


#: Multi-scale deformable attention with a first level of 2**31 pixels: the second level starts at row 2**31 of
#: value's S axis, past int.
BIG_LEVELS = ((65536, 32768), (4, 4))
#: Two queries, one point per level (x, y): query 0 at the centres of level 0's last pixel (65535, 32767) and
#: of level 1's pixel (1, 1); query 1 in level 0's zeros and half-way between level 1's pixels (1, 1) and (1, 2).
BIG_LOCATIONS = [[(1 - 2**-16, 1 - 2**-17), (0.375, 0.375)], [(0.5, 0.5), (0.5, 0.375)]]
#: Rows of value's S axis that hold 2 (level 0's last pixel), 3 and 5 (level 1's pixels (1, 1) and (1, 2)).
BIG_PIXELS = {2**31 - 1: 2.0, 2**31 + 5: 3.0, 2**31 + 6: 5.0}
#: ms_deform_attn with attention weights (1, 2) and (0.5, 1), and flash_deform_attn with logits 0 (weights 1/2),
#: under output gradients 1: the output, the value gradient's non-zero rows (query 1's level-0 point spreads a
#: weight of 0.5 over four zero pixels, rows 32767 and 32768, columns 16383 and 16384, 1/8 each), and the
#: gradients of the weights or logits and of the locations (x·W_l, y·H_l: at level 0's edge the derivative from
#: the right reads the zero outside, −2·32768 and −2·65536).
BIG_EXPECTED = {
    "ms_deform_attn": dict(
        out=[8, 4], value={2**31 - 1: 1, 2**31 + 5: 2.5, 2**31 + 6: 0.5}, weights=[[2, 3], [0, 4]],
        locations=[[(-65536, -131072), (16, -24)], [(0, 0), (8, -16)]]),
    "flash_deform_attn": dict(
        out=[2.5, 2], value={2**31 - 1: 0.5, 2**31 + 5: 0.75, 2**31 + 6: 0.25}, weights=[[-0.25, 0.25], [-1, 1]],
        locations=[[(-32768, -65536), (4, -6)], [(0, 0), (4, -8)]]),
}


@pytest.mark.parametrize("name", ["ms_deform_attn", "flash_deform_attn"])
def test_attention_level_start_past_int32_uses_long_long(name, launches):
    """value float32 (1, 2**31 + 16, 1, 1) (8 GiB of address space, a few pages touched; its gradient the same)
    whose second level starts at row 2**31: the host backend launches the long long kernels (a level start cast
    to int would wrap), and forward and backward (atomic and deterministic) give the exact values above."""
    value = lazy_zeros((1, 2**31 + 16, 1, 1), np.float32)
    for row, v in BIG_PIXELS.items():
        value[0, row, 0, 0] = v
    locations = np.array(BIG_LOCATIONS, np.float32).reshape(1, 2, 1, 2, 1, 2)
    expected = BIG_EXPECTED[name]
    grad_output = np.ones((1, 2, 1), np.float32)
    spec = SPECS[name]
    if name == "ms_deform_attn":
        arrays = (locations, np.array([[1, 2], [0.5, 1]], np.float32).reshape(1, 2, 1, 2, 1))
        options = {}
    else:
        arrays = (np.concatenate([locations.reshape(1, 2, 1, 4), np.zeros((1, 2, 1, 2), np.float32)], axis=-1),)
        options = {"num_points": 1}
    with deformcp.backend("host"), testing.poisoned_outputs():
        out = spec.function(value, BIG_LEVELS, None, *arrays, **options)
        grads = [spec.backward(grad_output, value, BIG_LEVELS, (0, 2**31), *arrays, **options, deterministic=det)
                 for det in (False, True)]
    check_selection(launches, True)
    fused = {"flash_deform_attn_backward_softmax"}
    assert {x.name for x in launches} == set(_sources.kernel_names("ms_deform_attn")) - (
        fused if name == "ms_deform_attn" else set())
    np.testing.assert_array_equal(out.reshape(2), expected["out"])
    tail = np.zeros(19)  # the last 3 rows of level 0 and the 16 of level 1
    for row, want in expected["value"].items():
        tail[row - (2**31 - 3)] = want
    for g in grads:
        grad_value = g.value.reshape(-1)
        np.testing.assert_array_equal(grad_value[2**31 - 3:], tail)
        for row in (32767, 32768):
            np.testing.assert_array_equal(grad_value[row * 32768 + 16382:row * 32768 + 16386], [0, 0.125, 0.125, 0])
        if name == "ms_deform_attn":
            gradients = {"weights": g.attention_weights, "locations": g.sampling_locations}
        else:
            packed = g.sampling_loc_attn.reshape(2, 6)
            gradients = {"weights": packed[:, 4:], "locations": packed[:, :4]}
        np.testing.assert_array_equal(gradients["weights"].reshape(2, 2), expected["weights"])
        np.testing.assert_array_equal(gradients["locations"].reshape(2, 2, 2), expected["locations"])
        del grad_value, g
    del value, grads


# ------------------------------------------------------------------- derived quantities: deform_conv's taps

def huge_stride_conv(rng):
    """deform_conv2d over a 5×5 image with stride_h = 2**31 - 1 and padding_h = 2**31 - 2: H_out = 3, and tap i of
    output row ho sits at y = ho·stride_h − padding_h + i, up to 2**31 + 2 (row 2), past int; every size alone fits
    an int. Offsets bring rows 0 and 2 back onto the image, so every output reads pixels. Returns the arrays,
    the convolution, and the offsets of the same samples with stride 1 and padding (0, 1) (a reference that
    never leaves int)."""
    stride, padding = (2**31 - 1, 1), (2**31 - 2, 1)
    ho = np.arange(3).reshape(3, 1, 1, 1)
    i = np.arange(3).reshape(1, 3, 1, 1)
    base_y = ho * stride[0] - padding[0] + i                                 # (ho, i, 1, 1), int64
    dy = np.broadcast_to(-(ho * stride[0] - padding[0]), (3, 3, 3, 5)) + rng.uniform(-1.2, 1.2, (3, 3, 3, 5))
    dx = rng.uniform(-1.5, 1.5, (3, 3, 3, 5))                                # (ho, i, j, wo)
    offset = np.stack([dy, dx], axis=2).transpose(1, 3, 2, 0, 4).reshape(1, 18, 3, 5)
    sample_y = base_y + offset.reshape(3, 3, 2, 3, 5)[:, :, 0].transpose(2, 0, 1, 3)  # exact in float64
    assert np.all((sample_y > -1.5) & (sample_y < 6.5)) and base_y.max() > 2**31 - 1
    small = offset.copy()
    small.reshape(3, 3, 2, 3, 5)[:, :, 0] = (sample_y - (ho + i)).transpose(1, 2, 0, 3)
    arrays = dict(input=rng.standard_normal((1, 2, 5, 5)), offset=offset, weight=rng.standard_normal((3, 2, 3, 3)),
                  bias=rng.standard_normal(3), mask=rng.uniform(0, 1, (1, 9, 3, 5)))
    return arrays, dict(stride=stride, padding=padding), small


def test_deform_conv_tap_positions_past_int32_use_long_long(rng, launches):
    """Tap positions past 2**31 - 1 with every size below it: the host backend launches the long long kernels and
    gives, forward and backward (atomic and deterministic), what the NumPy path gives and what stride 1 with the
    same sample points gives."""
    arrays, conv, small_offset = huge_stride_conv(rng)
    grad_output = rng.standard_normal((1, 3, 3, 5))
    before = {k: v.copy() for k, v in arrays.items()}
    reference = (deformcp.deform_conv2d(**arrays, **conv),
                 *deformcp.deform_conv2d_backward(grad_output, **arrays, **conv))
    same_samples = dict(arrays, offset=small_offset)
    plain = (deformcp.deform_conv2d(**same_samples, padding=(0, 1)),
             *deformcp.deform_conv2d_backward(grad_output, **same_samples, padding=(0, 1)))
    assert np.all(reference[0] != arrays["bias"][:, None, None])   # every output reads the image
    for got, want in zip(reference, plain):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with deformcp.backend("host"), testing.poisoned_outputs():
        host = [(deformcp.deform_conv2d(**arrays, **conv),
                 *deformcp.deform_conv2d_backward(grad_output, **arrays, **conv, deterministic=det))
                for det in (False, True)]
    check_selection(launches, True)
    assert {x.name for x in launches} == set(_sources.kernel_names(deform_conv.FAMILY))
    for results in host:
        for name, got, want in zip(("output", *SPECS["deform_conv2d"].differentiable), results, reference):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    for name, value in before.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=f"{name} modified")
