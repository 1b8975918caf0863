"""Property-based fuzzing of every public op with hypothesis.

Every op of the spec table ``deformcp.ops.SPECS`` and its backward. The functions, their array arguments, which
are differentiable, which take per-image box lists and which backwards take ``deterministic`` /
``needs_input_grad`` are read from the specs; what is written here per op is only what the specs cannot say: a
hypothesis strategy of valid calls (``STRATEGIES``) and the arrays that may be None without a None default.
``test_every_op_is_fuzzed`` fails for an op without them (and for an argument without mutations):

* Valid input (``test_valid_input_matches_the_float64_reference``): random shapes (zero-size batch,
  channels, boxes and outputs where the op allows them), layouts (strided, Fortran-order, negative-stride
  and zero-stride views, read-only arrays), dtypes (float16, float32, float64; bfloat16 where ml_dtypes is
  installed) and arguments (modes, paddings, align_corners, sampling ratios, output sizes, stride /
  padding / dilation / groups / offset groups, gamma, masks, trans_std, needs_input_grad subsets,
  deterministic, boxes as one array or per image where the spec takes both; for multi-scale deformable
  attention 1 to 3 levels, 1×1 and non-square ones among them, spatial_shapes as a tuple, list or NumPy
  integer array, level_start_index None or given, P points per level (0 now and then) or points_per_level
  with zeros among them, methods default / discrete, flash_deform_attn's num_points). The NumPy path in the dtype
  and the host backend must agree with the float64 NumPy reference, computed from the inputs rounded to the
  dtype as deformcp.testing does, within deformcp.testing.TOLERANCE (deformcp.testing.relative_error); outputs must
  have the dtype and shape, inputs must stay unmodified, every host output element must be written (outputs
  are NaN-poisoned), gradients must be None exactly where not asked for or where the input is absent, and
  deterministic=True must be bitwise reproducible on the host. Values are finite (non-finite values are
  tested in the op test files).
* Invalid input (``test_invalid_input_is_rejected_by_name``): one argument of a valid call is corrupted —
  wrong rank, a dimension changed or made 0 (mismatched batches included), an integer / bool / complex /
  object / string / datetime / other-float dtype, a non-array object (list, tuple, string, number, dict,
  NumPy scalar, 0-d array), a box batch index that is fractional, out of range or non-finite, a bad scalar
  (0, negative, NaN, ±inf, wrong type, wrong length, unknown mode; a count one larger, which may only be
  refused as a mismatch), a malformed per-level option (spatial_shapes nested wrongly, with zero, negative,
  huge, bool, float or string sizes; level_start_index not the cumulative sizes; points_per_level of the
  wrong length or sum) or one that does not fit the arrays (levels added, dropped, resized or reordered), or
  a valid variant that must be accepted (read-only or strided array, boxes as per-image arrays, NumPy
  integer / float / bool scalars, per-level options as tuples, lists or integer arrays, H and W swapped in
  every level, a point moved between levels).
  The call must succeed — and then the NumPy path and the host backend must agree — or raise ValueError or
  TypeError whose message contains the argument's name (for a changed dimension, the name of any argument
  of the call: a mismatch has two sides). Never another exception, a crash, or different results.
* Forked children (``test_forked_children_compute_what_the_parent_computes``): the parent runs a random valid
  case on the NumPy path and the host backend, then a child forked from it runs the case again and must return
  the same results within 30 s (the NumPy path's thread pool used to hang in such a child).
* Byte orders, derived indices, coercions: valid cases draw a byte order per array ('>f4' on a little-endian
  machine is converted on entry); deform_conv2d cases now and then take a stride and padding near 2**31 on an
  axis (every size fits an int, the tap positions do not; in float64 the offsets bring the taps back into the
  image); flags and sizes given as bools, strings, floats, None or 2**63 must be refused by name, never coerced.
* Bugs this fuzzing found, fixed, and kept as their own tests: None for a required array, a non-iterable
  needs_input_grad, real arguments that are not floats (fractions.Fraction, huge ints), deform_conv2d with
  C = 0 or C_out = 0, rois called "boxes" in deform_roi_pool's messages, huge sample counts (run in a
  subprocess: sampling_ratio=2**31 used to crash the interpreter); the host backend adding 16-bit input
  gradients in the storage type, keeping deform_conv2d's sampled columns in it and summing its bfloat16
  bias gradient in bfloat16 (now all in float32); ms_deform_attn's level offsets summed in int64, which
  level sizes up to (2**31 - 1)² made wrap around past the S check (run in a subprocess: a segmentation
  fault). Found by these strategies and mutations themselves: ms_deform_attn / flash_deform_attn with no
  points at all (a ZeroDivisionError on the NumPy path) and spatial_shapes nested one level too deep (an
  unnamed TypeError).

Judging a mismatch:

* Inputs within float32 rounding of a discontinuity (a sample on a pixel border or an integer
  coordinate, two samples tying for a max), or sums that cancel, legitimately differ between precisions.
  Coordinates of grid_sample and deform_conv2d, and the normalised locations of ms_deform_attn and
  flash_deform_attn (over levels of at most 5 × 5, so that x·W − 0.5 is exact), lie on a binary lattice
  (exact in every dtype, so borders are hit exactly and the same way); RoI ops use a spatial_scale with a
  long mantissa, so that no sample falls on a border by arithmetic accident; and a float16 / bfloat16 /
  float32 mismatch counts only if nudging the inputs by float32 rounding does not move the float64 reference
  by half as much (else the example is rejected as ill-conditioned: an event in the statistics). float64
  has no such allowance.
* The tolerance is TOLERANCE[dtype] plus the error of the reference itself rounded to the dtype (float16
  subnormal results cannot be closer).

Profiles (environment variable HYPOTHESIS_PROFILE, default "ci"):

    ci    max_examples=100 per test, deadline=None, derandomize=False: the whole file takes about 20 s on
          a 2-core machine (about 26 s with an empty host-kernel cache); a fresh random search every run.
    long  max_examples=2000 per test, otherwise the same: a soak run (about 10 minutes on 2 cores).

Neither keeps an example database (nothing is written into the checkout); a failure prints the
falsifying example and a ``@reproduce_failure`` blob to replay it. How many examples each test tried, and
the events (dtype, mode, empty sizes, mutation kind, ...), are printed by:

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py --hypothesis-show-statistics
"""
from __future__ import annotations

import decimal
import fractions
import inspect
import itertools
import math
import os
import pickle
import select
import struct
import subprocess
import sys
import textwrap
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, note, reject, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import deformcp  # noqa: E402
from deformcp import _host, testing  # noqa: E402
from deformcp.ops import SPECS, OpSpec  # noqa: E402
from deformcp.ops.ndimage import MODES as NDIMAGE_MODES  # noqa: E402

from conftest import to_backend  # noqa: E402

_COMMON = dict(deadline=None, derandomize=False, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HOST = _host.compiler() is not None
DTYPES = testing.dtypes("host")  # float32, float64, float16 (and bfloat16 with ml_dtypes)
SEEDS = st.integers(0, 2**32 - 1)


def between(lo: int, hi: int):
    """Integers lo..hi drawn evenly (st.integers favours lo heavily)."""
    return st.sampled_from(range(lo, hi + 1))


def empty_one_of(draw, *names):
    """None (4 times in 5), or which of the names to make a zero-size dimension."""
    return draw(st.sampled_from([None] * (4 * len(names)) + list(names)))


#: spatial_scale with a long mantissa: box coordinates times it never land on a pixel border exactly
SCALES = st.floats(0.2, 2.0).map(lambda s: s + math.pi * 2.0**-20)
FLOAT32_EPS = 2.0**-23


def lattice(values, bits: int):
    """values rounded to multiples of 2**-bits: sums with small integers are exact in every dtype."""
    return np.round(values * 2.0**bits) / 2.0**bits


def pair_form(draw, pair):
    """An int, tuple or list spelling of a pair of ints, as the ops accept."""
    forms = ["tuple", "list"] + (["int"] if pair[0] == pair[1] else [])
    form = draw(st.sampled_from(forms))
    return pair[0] if form == "int" else (tuple(pair) if form == "tuple" else list(pair))


# ------------------------------------------------------------------------------------------ layouts

LAYOUTS = ("contiguous", "strided", "fortran", "reversed", "broadcast")


class Layout(NamedTuple):
    kind: str
    axis: int
    readonly: bool


@st.composite
def layouts(draw, ndim: int, broadcast_axes):
    if ndim == 0:
        return Layout("contiguous", 0, draw(st.booleans()))
    kind = draw(st.sampled_from(LAYOUTS if broadcast_axes else LAYOUTS[:-1]))
    axis = draw(st.sampled_from(tuple(broadcast_axes) if kind == "broadcast" else tuple(range(ndim))))
    return Layout(kind, axis, draw(st.booleans()))


def constant_along(a, axis):
    """a with every slice along axis equal to the first (so that a zero-stride view can hold it)."""
    return a if a.shape[axis] == 0 else np.ascontiguousarray(np.broadcast_to(a.take([0], axis=axis), a.shape))


def view(a, layout: Layout):
    """A view holding a's values in the given layout (for "broadcast", a must be constant along axis)."""
    kind, axis, readonly = layout
    if kind == "broadcast" and a.shape[axis] > 0:
        v = np.broadcast_to(a.take([0], axis=axis), a.shape)  # stride 0, read-only
    elif kind == "strided":  # every other element of a NaN-filled buffer twice as long along axis
        shape = list(a.shape)
        shape[axis] *= 2
        wide = np.full(shape, np.nan, a.dtype)
        index = (slice(None),) * axis + (slice(None, None, 2),)
        wide[index] = a
        v = wide[index]
    elif kind == "fortran":
        v = np.asfortranarray(a)
    elif kind == "reversed":  # negative stride along axis
        v = np.flip(np.flip(a, axis).copy(), axis)
    else:
        v = a.copy()
    if readonly and v.flags.writeable:
        v.flags.writeable = False
    return v


#: dtypes that NumPy can hold in either byte order (ml_dtypes' bfloat16 has one)
SWAPPABLE = ("float16", "float32", "float64")


def byte_order(a, swapped: bool):
    """a, or a copy of it in the opposite byte order ('>f4' on a little-endian machine): the same values."""
    return a.astype(a.dtype.newbyteorder()) if swapped else a


def same_values(a, b) -> bool:
    return np.array_equal(np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64), equal_nan=True)


# ------------------------------------------------------------------------------------ valid cases

class Case(NamedTuple):
    """A valid call: ``forward(**arrays, **options)``, ``backward(grad_output, **arrays, **options,
    **backward_options)``. A strategy gives the arrays, the options and how to judge them; :func:`valid_cases`
    adds what the spec decides (the backward's options, which gradients are present, boxes per image)."""

    arrays: dict                 # name → float64 array, or None for an absent optional input
    options: dict
    labels: tuple = ()           # events for the statistics
    broadcast_axes: dict = {}    # name → axes an array may be a zero-stride view along (default: all)
    perturb: tuple = ()          # coordinates and real options nudged to judge a float32 mismatch (RoI ops)
    values: tuple = ()           # value arrays nudged element by element to judge it (cancellation)
    backward_options: dict = {}  # needs_input_grad, deterministic (valid_cases)
    present: tuple = ()          # per gradient field: must it be an array (else None)? (valid_cases)


def listed(boxes, images):
    """Boxes (K, 5) as one (L, 4) array per image when images is not None."""
    if images is None:
        return boxes
    index = np.asarray(boxes[:, 0], np.float64)
    return [boxes[index == i, 1:] for i in range(images)]


def random_boxes(rng, N, H, W, K, scale, left_top_inside=False):
    """(K, 5) [index, x1, y1, x2, y2] in image coordinates (pixels / scale): inside, across and outside the
    image, some of zero size, some inverted (x2 < x1). left_top_inside: x1, y1 ≥ 0."""
    extent_x, extent_y = W / scale, H / scale
    x1 = rng.uniform(0 if left_top_inside else -0.5 * extent_x, 1.3 * extent_x, K)
    y1 = rng.uniform(0 if left_top_inside else -0.5 * extent_y, 1.3 * extent_y, K)
    w, h = rng.uniform(-0.2 * extent_x, extent_x, K), rng.uniform(-0.2 * extent_y, extent_y, K)
    zero = rng.random(K) < 0.15
    w[zero], h[zero] = 0.0, 0.0
    index = rng.integers(0, N, K) if N else np.zeros(K)
    return np.stack([index, x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64)


@st.composite
def roi_sizes(draw, channels=True):
    """N, C, H, W, K, one of them 0 now and then: K = 0 when N = 0; H or W may be 0 only without boxes."""
    N, C, K = draw(between(1, 3)), draw(between(1, 3)), draw(between(1, 6))
    H, W = draw(between(1, 7)), draw(between(1, 7))
    empty = empty_one_of(draw, "N", "K", "H", "W", *(["C"] if channels else []))
    if empty in ("N", "K", "H", "W"):
        K = 0
    N, C, H, W = (0 if empty == name else value for name, value in zip("NCHW", (N, C, H, W)))
    return N, C, H, W, K


def images_for(draw, boxes, N):
    """None (boxes as one array) or a number of per-image arrays covering the boxes' indices."""
    if not draw(st.booleans()):
        return None
    used = int(boxes[:, 0].max()) + 1 if len(boxes) else 0
    return draw(between(used, N))


def roi_labels(K, C, H, W, *more):
    return (f"K={'0' if K == 0 else '>0'}", *(["C=0"] if C == 0 else []), *(["H·W=0"] if H * W == 0 else []), *more)


@st.composite
def affine_grid_cases(draw, dtype):
    N, C, H, W = draw(between(1, 3)), draw(between(0, 3)), draw(between(1, 6)), draw(between(1, 6))
    empty = empty_one_of(draw, "N", "H", "W")
    N, H, W = (0 if empty == name else value for name, value in zip("NHW", (N, H, W)))
    form = draw(st.sampled_from(["tuple", "list", "int64 array", "numpy ints"]))
    size = {"tuple": (N, C, H, W), "list": [N, C, H, W], "int64 array": np.array([N, C, H, W]),
            "numpy ints": (np.int32(N), np.int64(C), np.uint8(H), np.int16(W))}[form]
    align = draw(st.booleans())
    theta = np.random.default_rng(draw(SEEDS)).standard_normal((N, 2, 3)) * draw(st.sampled_from([0.5, 1, 3]))
    return Case({"theta": theta}, {"size": size, "align_corners": align},
                labels=(f"size {form}", *(["empty"] if N * H * W == 0 else [])), values=("theta",))


@st.composite
def grid_sample_cases(draw, dtype):
    N, C, H, W, Ho, Wo = (draw(between(1, 3)), draw(between(1, 3)), draw(between(1, 6)), draw(between(1, 6)),
                          draw(between(1, 5)), draw(between(1, 5)))
    empty = empty_one_of(draw, "N", "C", "Ho", "Wo")
    N, C, Ho, Wo = (0 if empty == name else value for name, value in zip(("N", "C", "Ho", "Wo"), (N, C, Ho, Wo)))
    mode = draw(st.sampled_from(["bilinear", "nearest"]))
    padding = draw(st.sampled_from(["zeros", "border", "reflection"]))
    align = draw(st.booleans())
    spread, bits = draw(st.sampled_from([1.0, 1.25, 2.5])), draw(st.sampled_from([2, 3, 12]))
    rng = np.random.default_rng(draw(SEEDS))
    arrays = {"input": rng.standard_normal((N, C, H, W)),
              "grid": lattice(rng.uniform(-spread, spread, (N, Ho, Wo, 2)), bits)}
    return Case(arrays, {"mode": mode, "padding_mode": padding, "align_corners": align},
                labels=(f"{mode}/{padding}", *(["empty"] if N * C * Ho * Wo == 0 else [])),
                values=("input",))


@st.composite
def roi_align_cases(draw, dtype, position_sensitive=False):
    N, C, H, W, K = draw(roi_sizes())
    PH, PW = draw(between(1, 3 if position_sensitive else 4)), draw(between(1, 3 if position_sensitive else 4))
    if position_sensitive:
        C = min(C, 2) * PH * PW
    scale = draw(SCALES)
    rng = np.random.default_rng(draw(SEEDS))
    arrays = {"input": rng.standard_normal((N, C, H, W)), "boxes": random_boxes(rng, N, H, W, K, scale)}
    options = {"output_size": pair_form(draw, (PH, PW)), "spatial_scale": scale,
               "sampling_ratio": draw(between(-2, 4))}
    more = ()
    if not position_sensitive:
        options.update(aligned=draw(st.booleans()), pool_mode=draw(st.sampled_from(["avg", "max"])))
        more = (f"pool_mode={options['pool_mode']}",)
    return Case(arrays, options, labels=roi_labels(K, C, H, W, *more), broadcast_axes={"boxes": (0,)},
                perturb=("boxes", "input", "spatial_scale"), values=("input",))


@st.composite
def deform_conv2d_cases(draw, dtype):
    groups, G = draw(between(1, 3)), draw(between(1, 3))
    base = math.lcm(groups, G)
    C = base * draw(between(1, 2 if base <= 3 else 1))
    C_out = groups * draw(between(1, 2))  # C_out = 0 is refused (test_invalid_input_is_rejected_by_name)
    kh, kw = draw(between(1, 3)), draw(between(1, 3))
    stride = [draw(between(1, 3)), draw(between(1, 3))]
    padding = [draw(between(0, 2)), draw(between(0, 2))]
    dilation = (draw(between(1, 2)), draw(between(1, 2)))
    H = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0] + draw(between(0, 4)))
    W = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1] + draw(between(0, 4)))
    # now and then a stride and padding near 2**31 along an axis: every size fits an int, the tap positions
    # h·stride − pad + i·dilation do not (the kernels must take their 64-bit instantiation)
    huge_axes = draw(st.sampled_from([()] * 6 + [(0,), (1,), (0, 1)]))
    for axis in huge_axes:
        stride[axis] = draw(st.sampled_from([2**31 - 1, 2**31 + 5, 2**35]))
        padding[axis] = stride[axis] - 1 - draw(between(0, 2))
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    N = 0 if empty_one_of(draw, "N") else draw(between(1, 2))
    spread, bits = draw(st.sampled_from([0.5, 2.0, 4.0])), draw(st.sampled_from([1, 2, 12]))
    rng = np.random.default_rng(draw(SEEDS))
    offset = lattice(spread * rng.standard_normal((N, G, kh * kw, 2, Ho, Wo)), bits)
    if dtype == "float64":  # offsets (exact in float64) that bring the huge axes' taps back to h + i·dilation
        if 0 in huge_axes:
            offset[:, :, :, 0] += (np.arange(Ho) * (1 - stride[0]) + padding[0])[:, None]
        if 1 in huge_axes:
            offset[:, :, :, 1] += np.arange(Wo) * (1 - stride[1]) + padding[1]
    arrays = {"input": rng.standard_normal((N, C, H, W)),
              "offset": offset.reshape(N, 2 * G * kh * kw, Ho, Wo),
              "weight": rng.standard_normal((C_out, C // groups, kh, kw)),
              "bias": rng.standard_normal(C_out) if draw(st.booleans()) else None,
              "mask": rng.uniform(-0.5, 1.5, (N, G * kh * kw, Ho, Wo)) if draw(st.booleans()) else None}
    options = {"stride": pair_form(draw, stride), "padding": pair_form(draw, padding),
               "dilation": pair_form(draw, dilation)}
    return Case(arrays, options,
                labels=(f"groups={groups}", f"offset groups={G}", "v2 (mask)" if arrays["mask"] is not None else "v1",
                        *(["empty"] if N == 0 else []), *(["taps past 2**31"] if huge_axes else [])),
                values=("input", "weight", "bias", "mask"))


@st.composite
def deform_roi_pool_cases(draw, dtype):
    N, C, H, W, K = draw(roi_sizes())
    PH, PW = draw(between(1, 3)), draw(between(1, 3))
    scale = draw(SCALES)
    rng = np.random.default_rng(draw(SEEDS))
    spread = draw(st.sampled_from([0.3, 1.0, 3.0]))
    arrays = {"input": rng.standard_normal((N, C, H, W)), "rois": random_boxes(rng, N, H, W, K, scale),
              "offset": spread * rng.standard_normal((K, 2, PH, PW)) if draw(st.booleans()) else None,
              "mask": rng.uniform(-0.5, 1.5, (K, 1, PH, PW)) if draw(st.booleans()) else None}
    options = {"output_size": pair_form(draw, (PH, PW)), "spatial_scale": scale,
               "sampling_ratio": draw(between(-1, 3)),
               # no |gamma| < 1e-3: float32 would flush such a gamma (e.g. 1e-46) to 0
               "gamma": draw(st.just(0.0) | st.floats(1e-3, 1) | st.floats(-1, -1e-3))}
    return Case(arrays, options,
                labels=roi_labels(K, C, H, W, "offset" if arrays["offset"] is not None else "no offset",
                                  "mask" if arrays["mask"] is not None else "no mask"),
                broadcast_axes={"rois": (0,)}, perturb=("rois", "input", "offset", "spatial_scale", "gamma"),
                values=("input", "mask"))


@st.composite
def deform_ps_roi_pool_cases(draw, dtype):
    G, classes, per_class = draw(between(1, 3)), draw(between(1, 2)), draw(between(1, 2))
    output_dim = classes * per_class
    N, _, H, W, K = draw(roi_sizes(channels=False))
    P = draw(between(1, 4))
    part_size = draw(st.none() | between(1, 4))
    S = P if part_size is None else part_size
    no_trans = draw(st.booleans())
    trans_std = draw(st.just(0.0) | st.floats(0.01, 0.5) | st.floats(-0.5, -0.01))
    scale = draw(SCALES)
    rng = np.random.default_rng(draw(SEEDS))
    offset = rng.standard_normal((K, 2 * classes, S, S))
    offset_form = draw(st.sampled_from(["array", "None", "empty"])) if no_trans else "array"
    offset = {"array": offset, "None": None, "empty": np.zeros((0,))}[offset_form]
    moves = not no_trans and trans_std != 0
    # without moving samples, x1, y1 ≥ 0: a sample can then sit on the left/top border only at exactly -0.5
    arrays = {"input": rng.standard_normal((N, output_dim * G * G, H, W)),
              "rois": random_boxes(rng, N, H, W, K, scale, left_top_inside=not moves), "offset": offset}
    options = {"output_dim": output_dim, "group_size": G, "pooled_size": P, "part_size": part_size,
               "sample_per_part": draw(between(1, 3)), "spatial_scale": scale, "trans_std": trans_std,
               "no_trans": no_trans}
    return Case(arrays, options,
                labels=roi_labels(K, 1, H, W, "no_trans" if no_trans else "trans", f"offset {offset_form}"),
                broadcast_axes={"rois": (0,)}, perturb=("rois", "input", "offset", "spatial_scale", "trans_std"),
                values=("input",))


@st.composite
def mimic_loss_cases(draw, dtype):
    K = 0 if empty_one_of(draw, "K") else draw(between(1, 6))
    D = draw(between(2, 8))  # D = 1: every row is (anti)parallel, loss 0 or 2
    rng = np.random.default_rng(draw(SEEDS))
    f_a, f_b = rng.standard_normal((2, K, D))
    reach = 2 if np.dtype(dtype).itemsize == 2 else 6
    f_a *= 10.0 ** rng.uniform(-reach, reach, (K, 1))
    f_b *= 10.0 ** rng.uniform(-reach, reach, (K, 1))
    f_a[rng.random(K) < 0.15] = 0
    f_b[rng.random(K) < 0.15] = 0
    # no zero-stride views along D: constant rows are parallel, and the gradient of a parallel pair (0) is
    # rounding noise, not comparable by relative error
    return Case({"f_a": f_a, "f_b": f_b}, {},
                labels=(f"K={'0' if K == 0 else '>0'}",), broadcast_axes={"f_a": (0,), "f_b": (0,)},
                values=("f_a", "f_b"))


def level_starts(shapes) -> tuple:
    """The first row of each level (H_l, W_l) in value's S axis: the cumulative H_l·W_l."""
    return tuple(itertools.accumulate((h * w for h, w in shapes[:-1]), initial=0))


def integers_form(draw, values, forms=("tuple", "list", "int64 array", "int32 array")):
    """(form, values spelled that way): a tuple or list (of tuples or lists, for nested values) or a NumPy
    integer array, as the ops accept."""
    form = draw(st.sampled_from(forms))
    if form.endswith("array"):
        return form, np.array(values, form.split()[0])
    kind = tuple if form == "tuple" else list
    return form, kind(kind(v) if isinstance(v, tuple) else v for v in values)


@st.composite
def attention_levels(draw):
    """Levels and the options that describe them: (shapes, {spatial_shapes, level_start_index}, labels).
    1 to 3 levels, each 1..5 by 1..5 (1×1 and non-square ones among them): small enough that x·W_l − 0.5 of a
    lattice location is exact in every dtype's arithmetic."""
    shapes = tuple((draw(between(1, 5)), draw(between(1, 5))) for _ in range(draw(between(1, 3))))
    form, spatial_shapes = integers_form(draw, shapes)
    starts = None
    if draw(st.booleans()):
        starts = integers_form(draw, level_starts(shapes))[1]
    labels = (f"L={len(shapes)}", f"spatial_shapes {form}", *(["1×1 level"] if (1, 1) in shapes else []))
    return shapes, {"spatial_shapes": spatial_shapes, "level_start_index": starts}, labels


@st.composite
def attention_sizes(draw):
    """(N, Lq, M, D): N or Lq 0 now and then."""
    N, Lq, M, D = draw(between(1, 2)), draw(between(1, 4)), draw(between(1, 3)), draw(between(1, 4))
    empty = empty_one_of(draw, "N", "Lq")
    N, Lq = (0 if empty == name else value for name, value in zip(("N", "Lq"), (N, Lq)))
    return N, Lq, M, D


def sampling_lattice(draw, rng, shape):
    """Normalised locations in [-0.25, 1.25] on a binary lattice (multiples of 2**-bits): pixel coordinates
    x·W − 0.5 are exact in every dtype, so pixel borders and integer coordinates are hit exactly the same way
    by the float64 reference and by every dtype (coarse lattices hit them often)."""
    return lattice(rng.uniform(-0.25, 1.25, shape), draw(st.sampled_from([2, 3, 4, 12])))


@st.composite
def ms_deform_attn_cases(draw, dtype):
    shapes, options, labels = draw(attention_levels())
    N, Lq, M, D = draw(attention_sizes())
    L = len(shapes)
    if draw(st.booleans()):  # per-level point counts (RT-DETRv2), some of them 0
        points = tuple(draw(between(0, 3)) for _ in range(L))
        form, options["points_per_level"] = integers_form(draw, points, ("tuple", "list", "int64 array"))
        lead = (N, Lq, M, sum(points))
        labels += (f"points_per_level {form}", *(["T=0"] if sum(points) == 0 else []))
    else:
        P = 0 if empty_one_of(draw, "P") else draw(between(1, 3))
        options["points_per_level"] = None
        lead = (N, Lq, M, L, P)
        labels += ("P per level", *(["T=0"] if P == 0 else []))
    options["method"] = draw(st.sampled_from(["default", "discrete"]))
    rng = np.random.default_rng(draw(SEEDS))
    arrays = {"value": rng.standard_normal((N, sum(h * w for h, w in shapes), M, D)),
              "sampling_locations": sampling_lattice(draw, rng, lead + (2,)),
              "attention_weights": rng.uniform(-1, 1, lead)}
    return Case(arrays, options, labels=(*labels, f"method={options['method']}",
                                         *(["empty"] if N * Lq == 0 else [])),
                values=("value", "attention_weights"))


@st.composite
def flash_deform_attn_cases(draw, dtype):
    shapes, options, labels = draw(attention_levels())
    N, Lq, M, D = draw(attention_sizes())
    L, P = len(shapes), draw(between(1, 3))
    rng = np.random.default_rng(draw(SEEDS))
    locations = sampling_lattice(draw, rng, (N, Lq, M, 2 * L * P))
    logits = draw(st.sampled_from([1.0, 4.0])) * rng.standard_normal((N, Lq, M, L * P))
    # the locations are exact (a lattice); the logits need not be: softmax is smooth
    return Case({"value": rng.standard_normal((N, sum(h * w for h, w in shapes), M, D)),
                 "sampling_loc_attn": np.concatenate([locations, logits], axis=-1)},
                {**options, "num_points": P}, labels=(*labels, f"P={P}", *(["empty"] if N * Lq == 0 else [])),
                values=("value",))


def dcn_geometry(draw):
    """dcnv3 and dcnv4's options and sizes: kernels up to 3×3 (remove_center on odd square ones), strides, pads
    and dilations per axis, groups; offset_scale 1 or 0.5, so that with offsets on a binary lattice every tap's
    pixel coordinate is exact in every dtype. → (options, (N, H, W, H_out, W_out, P), labels)"""
    kh, kw = draw(between(1, 3)), draw(between(1, 3))
    remove_center = kh == kw and kh % 2 == 1 and kh > 1 and draw(st.booleans())
    (sh, sw), (ph, pw), (dh, dw) = ((draw(between(1, 2)), draw(between(1, 2))), (draw(between(0, 2)),
                                    draw(between(0, 2))), (draw(between(1, 2)), draw(between(1, 2))))
    H = max(1, dh * (kh - 1) + 1 - 2 * ph + draw(between(0, 4)))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw + draw(between(0, 4)))
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    N = 0 if empty_one_of(draw, "N") else draw(between(1, 2))
    options = {"kernel_h": kh, "kernel_w": kw, "stride_h": sh, "stride_w": sw, "pad_h": ph, "pad_w": pw,
               "dilation_h": dh, "dilation_w": dw, "group": draw(between(1, 3)), "group_channels": draw(between(1, 3)),
               "offset_scale": draw(st.sampled_from([1.0, 0.5])), "remove_center": remove_center}
    labels = (f"kernel {kh}x{kw}", *(["remove_center"] if remove_center else []), *(["empty"] if N == 0 else []))
    return options, (N, H, W, Ho, Wo, kh * kw - remove_center), labels


@st.composite
def dcnv3_cases(draw, dtype):
    options, (N, H, W, Ho, Wo, P), labels = dcn_geometry(draw)
    G, Cg = options["group"], options["group_channels"]
    rng = np.random.default_rng(draw(SEEDS))
    offset = lattice(draw(st.sampled_from([0.5, 2.0])) * rng.standard_normal((N, Ho, Wo, G * P * 2)),
                     draw(st.sampled_from([1, 2])))
    return Case({"input": rng.standard_normal((N, H, W, G * Cg)), "offset": offset,
                 "mask": rng.uniform(-0.5, 1.5, (N, Ho, Wo, G * P))}, options, labels=labels,
                values=("input", "mask"))


@st.composite
def dcnv4_cases(draw, dtype):
    options, (N, H, W, Ho, Wo, P), labels = dcn_geometry(draw)
    G, Cg = options["group"], options["group_channels"]
    options["softmax"] = draw(st.booleans())
    rng = np.random.default_rng(draw(SEEDS))
    offsets = lattice(draw(st.sampled_from([0.5, 2.0])) * rng.standard_normal((N, Ho, Wo, G, 2 * P)),
                      draw(st.sampled_from([1, 2])))
    # the modulation need not be on the lattice (the softmax is smooth); the padding is never read
    blocks = np.concatenate([offsets, rng.uniform(-0.5, 1.5, (N, Ho, Wo, G, P))], axis=-1)
    padding = rng.standard_normal((N, Ho, Wo, draw(between(0, 3))))
    return Case({"input": rng.standard_normal((N, H, W, G * Cg)),
                 "offset_mask": np.concatenate([blocks.reshape(N, Ho, Wo, 3 * G * P), padding], axis=-1)},
                options, labels=(*labels, f"softmax={options['softmax']}"), values=("input",))


@st.composite
def affine_sample_cases(draw, dtype):
    """Output sizes whose base grid is dyadic (align_corners: n − 1 a power of 2, else n), so that with a lattice
    theta every sampling location is exact in every dtype, as grid_sample's lattice grids are."""
    align = draw(st.booleans())
    sizes = [1, 2, 3, 5] if align else [1, 2, 4]
    N, C, H, W, Ho, Wo = (draw(between(1, 3)), draw(between(1, 3)), draw(between(1, 6)), draw(between(1, 6)),
                          draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes)))
    empty = empty_one_of(draw, "N", "C", "Ho", "Wo")
    N, C, Ho, Wo = (0 if empty == name else value for name, value in zip(("N", "C", "Ho", "Wo"), (N, C, Ho, Wo)))
    mode = draw(st.sampled_from(["bilinear", "nearest"]))  # bicubic: as grid_sample's strategy (its cancelling
    # coordinate gradients, exactly 0 where every tap reads one pixel, are not judged by relative error)
    rng = np.random.default_rng(draw(SEEDS))
    theta = lattice(np.eye(2, 3) + rng.uniform(-1.25, 1.25, (N, 2, 3)), draw(st.sampled_from([2, 3])))
    options = {"size": (N, C, Ho, Wo), "mode": mode, "padding_mode": draw(st.sampled_from(["zeros", "border",
                                                                                             "reflection"])),
               "align_corners": align}
    return Case({"input": rng.standard_normal((N, C, H, W)), "theta": theta}, options,
                labels=(mode, options["padding_mode"], *(["empty"] if N * C * Ho * Wo == 0 else [])),
                values=("input",))


@st.composite
def ndimage_input(draw):
    """(input, rng): a 2-D or 3-D image of 1..5 per axis (size-1 axes among them)."""
    rng = np.random.default_rng(draw(SEEDS))
    shape = tuple(draw(between(1, 5)) for _ in range(draw(st.sampled_from([2, 3]))))
    return rng.standard_normal(shape), rng


def ndimage_options(draw):
    """order, mode (every SciPy name), cval (a lattice value) and prefilter. Order 3 is left to tests/test_ndimage.py:
    where its taps all read one value (a 1-element axis, "nearest" past an edge) its coordinate gradient is 0 only up
    to rounding, which relative errors cannot judge (as grid_sample's bicubic)."""
    return {"order": draw(st.sampled_from([0, 1])), "mode": draw(st.sampled_from(list(NDIMAGE_MODES))),
            "cval": draw(st.sampled_from([0.0, -0.75, 2.5])), "prefilter": draw(st.booleans())}


@st.composite
def map_coordinates_cases(draw, dtype):
    x, rng = draw(ndimage_input())
    out = tuple(draw(between(0 if draw(st.booleans()) else 1, 4)) for _ in range(draw(between(1, 2))))
    # index coordinates on a binary lattice, inside, on the border and outside every axis
    coordinates = lattice(rng.uniform(-1.5, 1.5, (x.ndim, *out)) * (np.array(x.shape) + 1)[:, None].reshape(
        (x.ndim,) + (1,) * len(out)) / 2 + (np.array(x.shape) - 1).reshape((x.ndim,) + (1,) * len(out)) / 2,
                          draw(st.sampled_from([1, 2, 3])))
    options = ndimage_options(draw)
    return Case({"input": x, "coordinates": coordinates}, options,
                labels=(f"{x.ndim}-D", f"order={options['order']}", options["mode"],
                        *(["empty"] if coordinates.size == 0 else [])), values=("input",))


@st.composite
def affine_transform_cases(draw, dtype):
    x, rng = draw(ndimage_input())
    n = x.ndim
    form = draw(st.sampled_from(["(n, n)", "(n,)", "(n, n + 1)", "(n + 1, n + 1)"]))
    linear = lattice(rng.uniform(-1.25, 1.25, (n, n)), 2)
    matrix = {"(n, n)": linear, "(n,)": np.diag(linear).copy(),
              "(n, n + 1)": np.concatenate([linear, lattice(rng.uniform(-2, 2, (n, 1)), 2)], axis=1),
              "(n + 1, n + 1)": np.block([[linear, lattice(rng.uniform(-2, 2, (n, 1)), 2)],
                                          [np.zeros((1, n)), np.ones((1, 1))]])}[form]
    output_shape = tuple(draw(between(1, 4)) for _ in range(n))
    options = {**ndimage_options(draw), "output_shape": output_shape}
    return Case({"input": x, "matrix": matrix, "offset": lattice(rng.uniform(-2, 2, n), 2)}, options,
                labels=(f"{n}-D", f"matrix {form}", f"order={options['order']}", options["mode"]),
                broadcast_axes={"matrix": ()} if form == "(n + 1, n + 1)" else {},  # its bottom row is fixed
                values=("input",))


#: op name → strategy(dtype) of its valid calls: what only the op knows (shapes, options, how to judge a mismatch)
STRATEGIES = {
    "affine_grid": affine_grid_cases,
    "grid_sample": grid_sample_cases,
    "roi_align": roi_align_cases,
    "ps_roi_align": lambda dtype: roi_align_cases(dtype, position_sensitive=True),
    "deform_conv2d": deform_conv2d_cases,
    "deform_roi_pool": deform_roi_pool_cases,
    "deform_ps_roi_pool": deform_ps_roi_pool_cases,
    "mimic_loss": mimic_loss_cases,
    "ms_deform_attn": ms_deform_attn_cases,
    "flash_deform_attn": flash_deform_attn_cases,
    "dcnv3": dcnv3_cases,
    "dcnv4": dcnv4_cases,
    "affine_sample": affine_sample_cases,
    "map_coordinates": map_coordinates_cases,
    "affine_transform": affine_transform_cases,
}

#: op name → array arguments that may be None although they have no None default (the rest: the signature)
NONE_WITHOUT_DEFAULT = {"deform_ps_roi_pool": ("offset",)}  # offset=None with no_trans=True


def takes(function: Callable, argument: str) -> bool:
    return argument in inspect.signature(function).parameters


def optional_arrays(spec: OpSpec) -> tuple:
    """The spec's array arguments that may be None: None by default, or listed in NONE_WITHOUT_DEFAULT."""
    parameters = inspect.signature(spec.function).parameters
    return tuple(n for n in spec.arrays
                 if parameters[n].default is None or n in NONE_WITHOUT_DEFAULT.get(spec.name, ()))


class Op(NamedTuple):
    """An op as the tests call it: ``forward(**arrays, **options)`` and ``backward(grad_output, ...)``, where
    options may hold ``images``: the spec's boxes argument, a (K, 5) array, is then passed as that many
    per-image (L, 4) arrays."""

    spec: OpSpec
    forward: Callable
    backward: Callable


def op_of(spec: OpSpec) -> Op:
    if spec.boxes is None:
        return Op(spec, spec.function, spec.backward)

    def forward(images=None, **arguments):
        return spec.function(**{**arguments, spec.boxes: listed(arguments[spec.boxes], images)})

    def backward(grad_output, images=None, **arguments):
        return spec.backward(grad_output, **{**arguments, spec.boxes: listed(arguments[spec.boxes], images)})

    return Op(spec, forward, backward)


OPS = {name: op_of(spec) for name, spec in SPECS.items()}
#: read from the specs once (inspect.signature, per example, would cost about a second per run)
OPTIONAL = {name: optional_arrays(spec) for name, spec in SPECS.items()}
NEEDS_INPUT_GRAD = {name for name, spec in SPECS.items() if takes(spec.backward, "needs_input_grad")}
DETERMINISTIC = {name for name, spec in SPECS.items() if spec.deterministic}


@st.composite
def valid_cases(draw, name: str, dtype, listing=True):
    """A valid call of op name: its strategy's case, completed from the spec — arrays in signature order, the
    backward's needs_input_grad (a subset) and deterministic where it takes them, which gradients must be
    arrays, and (listing) boxes now and then as per-image arrays where the op takes them."""
    spec = SPECS[name]
    case = draw(STRATEGIES[name](dtype))
    assert sorted(case.arrays) == sorted(spec.arrays), f"{name}'s strategy gives {sorted(case.arrays)}"
    arrays = {n: case.arrays[n] for n in spec.arrays}
    absent = [n for n, a in arrays.items() if a is None and n not in OPTIONAL[name]]
    assert not absent, f"{name}'s strategy leaves out required arrays {absent}"
    backward_options, needs = {}, (True,) * len(spec.differentiable)
    if name in NEEDS_INPUT_GRAD:
        needs = backward_options["needs_input_grad"] = draw(st.tuples(*[st.booleans()] * len(needs)))
    if name in DETERMINISTIC:
        backward_options["deterministic"] = draw(st.booleans())
    present = tuple(wanted and arrays[n] is not None for wanted, n in zip(needs, spec.differentiable))
    options, labels = dict(case.options), case.labels
    if spec.boxes is not None:
        images = images_for(draw, arrays[spec.boxes], arrays["input"].shape[0]) if listing else None
        if images is not None:
            options["images"] = images
        labels += ("boxes per image" if images is not None else "boxes (K, 5)",)
    return case._replace(arrays=arrays, options=options, labels=labels, backward_options=backward_options,
                         present=present)


def test_every_op_is_fuzzed():
    """Every spec has a strategy (and a three-readers call where its backward scatter-adds), every argument
    of every public function has its mutations, and nothing here names an op or array the specs do not have:
    a new op fails here instead of going unfuzzed."""
    missing, stale = sorted(set(SPECS) - set(STRATEGIES)), sorted(set(STRATEGIES) - set(SPECS))
    assert not missing and not stale, f"ops without a strategy: {missing}; strategies of no op: {stale}"
    assert len(FUNCTIONS) == 2 * len(SPECS), "two public functions of the specs share a name"
    assert set(THREE_READERS) == DETERMINISTIC, f"THREE_READERS {sorted(THREE_READERS)} vs {sorted(DETERMINISTIC)}"
    arguments = {n for spec in SPECS.values() for fn in (spec.function, spec.backward)
                 for n in inspect.signature(fn).parameters if n not in spec.arrays and n != "grad_output"}
    assert arguments <= set(SCALAR_KINDS), f"arguments without mutations: {sorted(arguments - set(SCALAR_KINDS))}"
    for name, arrays in NONE_WITHOUT_DEFAULT.items():
        assert name in SPECS and set(arrays) <= set(SPECS[name].arrays), (name, arrays)


# ----------------------------------------------------------------------------------- parity checks

def as_fields(result):
    return tuple(result) if isinstance(result, tuple) else (result,)


def errors_against(outputs, references, dtype, where: str) -> list[Optional[float]]:
    """Relative error of every output (forward, then each gradient field) against the reference, None
    where the reference is None; checks the type, dtype and shape of each, and None exactly there."""
    errors = []
    for i, (got, want) in enumerate(zip(outputs, references)):
        if want is None:
            assert got is None, f"{where}: output {i} should be None"
            errors.append(None)
            continue
        assert type(got) is np.ndarray, f"{where}: output {i} is {type(got).__name__}"
        assert got.dtype == dtype, f"{where}: output {i} has dtype {got.dtype}, expected {dtype}"
        assert got.shape == want.shape, f"{where}: output {i} has shape {got.shape}, expected {want.shape}"
        errors.append(testing.relative_error(got, want))
    return errors


def allowed_error(reference, dtype) -> float:
    """TOLERANCE[dtype], plus the error of the reference itself rounded to the dtype: what the dtype cannot
    represent (float16 subnormals, about 1e-7 .. 6e-5) is not the op's error."""
    return testing.TOLERANCE[dtype.name] + testing.relative_error(reference.astype(dtype), reference)


def run_numpy(fn, *args, **kwargs):
    return testing.run("numpy", fn, *args, **kwargs)


def explained_by_rounding(op: Op, case: Case, exact: dict, grad_output, references, observed: float) -> bool:
    """Whether nudging the inputs by float32 rounding (8 ulps at random) moves the float64 reference by half
    the observed error or more: the example is ill-conditioned at the precision of the computation — a
    sample on a border or two samples tying for a max (case.perturb: coordinates, nudged by 8 ulps of their
    largest magnitude, and real options), or sums that cancel (case.values and grad_output: each element
    nudged by 8 ulps of itself) — and the mismatch is rounding, not a bug."""
    rng = np.random.default_rng(0)
    nudge = 8 * FLOAT32_EPS

    def nudged(a, scale):
        return a + rng.uniform(-1, 1, a.shape) * nudge * scale

    for _ in range(16):
        arrays, options = dict(exact), dict(case.options)
        for name in case.perturb:
            if name in options:
                options[name] = options[name] * (1 + nudge * rng.uniform(-1, 1))
            elif arrays.get(name) is not None and arrays[name].size:
                moved = nudged(arrays[name], np.max(np.abs(arrays[name])))
                if name == op.spec.boxes:  # the batch index stays
                    moved[:, 0] = arrays[name][:, 0]
                arrays[name] = moved
        for name in case.values:
            if arrays.get(name) is not None:
                arrays[name] = nudged(arrays[name], np.abs(arrays[name]))
        g = nudged(grad_output, np.abs(grad_output))
        outputs = (run_numpy(op.forward, **arrays, **options),
                   *as_fields(run_numpy(op.backward, g, **arrays, **options, **case.backward_options)))
        change = max([testing.relative_error(m, r) for m, r in zip(outputs, references) if r is not None])
        if change >= observed / 2:
            return True
    return False


def check_parity(data, op: Op, case: Case, dtype: str):
    dtype = np.dtype(dtype)
    arrays, layout = dict(case.arrays), {}
    for name, a in arrays.items():
        if a is not None:
            axes = case.broadcast_axes.get(name, tuple(range(a.ndim)))
            layout[name] = data.draw(layouts(a.ndim, axes), label=f"layout of {name}")
            if layout[name].kind == "broadcast":
                arrays[name] = constant_along(a, layout[name].axis)
    cast = {n: None if a is None else a.astype(dtype) for n, a in arrays.items()}
    exact = {n: None if a is None else a.astype(np.float64) for n, a in cast.items()}
    reference = run_numpy(op.forward, **exact, **case.options)
    rng = np.random.default_rng(data.draw(SEEDS, label="grad_output seed"))
    grad_output = np.asarray(rng.standard_normal(np.shape(reference))).astype(dtype)
    grad_layout = data.draw(layouts(grad_output.ndim, ()), label="layout of grad_output")
    reference_grads = as_fields(run_numpy(op.backward, grad_output.astype(np.float64), **exact, **case.options,
                                          **case.backward_options))
    assert tuple(g is not None for g in reference_grads) == case.present, "gradients None where asked for"
    references = (reference, *reference_grads)
    tolerance = testing.TOLERANCE[dtype.name]
    swapped = {n: a is not None and dtype.name in SWAPPABLE and data.draw(st.booleans(), label=f"{n} byte-swapped")
               for n, a in {**cast, "grad_output": grad_output}.items()}
    if any(swapped.values()):
        event("byte-swapped arrays")
    numpy_too = dtype != np.float64 or any(swapped.values())  # float64 native is the reference itself
    for backend in (["numpy"] if numpy_too else []) + (["host"] if HOST else []):
        views = {n: None if a is None else view(byte_order(a, swapped[n]), layout[n]) for n, a in cast.items()}
        g = view(byte_order(grad_output, swapped["grad_output"]), grad_layout)
        with testing.poisoned_outputs():
            out = testing.run(backend, op.forward, **views, **case.options)
            grads = as_fields(testing.run(backend, op.backward, g, **views, **case.options, **case.backward_options))
        for name, a in cast.items():
            if a is not None:
                assert same_values(views[name], a), f"{backend} modified {name}"
        assert same_values(g, grad_output), f"{backend} modified grad_output"
        outputs = (out, *grads)
        errors = errors_against(outputs, references, dtype, f"{backend} {dtype.name}")
        failing = [i for i, e in enumerate(errors) if e is not None and e > allowed_error(references[i], dtype)]
        if failing:
            worst = max(errors[i] for i in failing)
            if dtype != np.float64 and explained_by_rounding(
                    op, case, exact, grad_output.astype(np.float64), references, worst):
                event("rejected: ill-conditioned, float32 rounding explains the mismatch")
                reject()
            raise AssertionError(f"{backend} {dtype.name}: relative errors (output, gradients...) {errors} > "
                                 f"tolerance {tolerance}")
        if backend == "host" and case.backward_options.get("deterministic"):
            again = as_fields(testing.run(backend, op.backward, g, **views, **case.options, **case.backward_options))
            for first, second in zip(grads, again):
                if first is not None:
                    np.testing.assert_array_equal(first, second, err_msg="deterministic=True is not reproducible")


@pytest.mark.parametrize("name", list(SPECS))
@given(data=st.data())
def test_valid_input_matches_the_float64_reference(name, data):
    op = OPS[name]
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    case = data.draw(valid_cases(name, dtype), label="case")
    for label in (f"dtype={dtype}", *case.labels):
        event(label)
    check_parity(data, op, case, dtype)


# ----------------------------------------------------------------------------------- forked children

#: A process that runs requested cases, then runs each again in a child forked from itself, and answers with
#: both results. It is a fresh interpreter with deformcp's threads only (pytest's has JAX's, which fork does not
#: tolerate either). Messages are pickles behind an 8-byte length, on stdin and stdout.
FORK_SERVER = textwrap.dedent("""
    import os, pickle, select, signal, struct, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_fuzz import HOST, OPS, as_fields
    from deformcp import testing

    def run_all(name, arrays, options, backward_options):
        op, results = OPS[name], []
        for backend in ["numpy"] + (["host"] if HOST else []):
            out = testing.run(backend, op.forward, **arrays, **options)
            grad_output = np.ones_like(out)
            grads = as_fields(testing.run(backend, op.backward, grad_output, **arrays, **options, **backward_options))
            results.append((out, grads))
        return results

    def in_forked_child(work, timeout):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                payload = pickle.dumps(("result", work()))
            except BaseException as error:
                payload = pickle.dumps(("raised", repr(error)))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
            os._exit(0)
        os.close(write)
        chunks, deadline = [], time.monotonic() + timeout
        with os.fdopen(read, "rb") as pipe:
            while True:
                if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return ("hung", f"still running after {timeout} s")
                chunk = pipe.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        status = os.waitpid(pid, 0)[1]
        return pickle.loads(b"".join(chunks)) if status == 0 and chunks else ("died", f"wait status {status}")

    def receive():
        header = sys.stdin.buffer.read(8)
        return pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", header)[0])) if header else None

    while (request := receive()) is not None:
        expected = run_all(*request)
        answer = pickle.dumps((expected, in_forked_child(lambda: run_all(*request), timeout=30)))
        sys.stdout.buffer.write(struct.pack("<Q", len(answer)) + answer)
        sys.stdout.buffer.flush()
""")


@pytest.fixture(scope="module")
def fork_server():
    """A FORK_SERVER process (DEFORMCP_NUM_THREADS=2: its pool and OpenMP use threads), and a function that sends
    it a request and returns its answer, failing when none comes within a minute."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "OMP_NUM_THREADS")}
    env.update(DEFORMCP_NUM_THREADS="2", PYTHONPATH=os.path.dirname(tests), PYTHONFAULTHANDLER="1")
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, tests], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)

    def ask(request):
        message = pickle.dumps(request)
        server.stdin.write(struct.pack("<Q", len(message)) + message)
        server.stdin.flush()
        if not select.select([server.stdout], [], [], 60)[0]:
            pytest.fail("the fork server gave no answer within 60 s")
        header = server.stdout.read(8)
        assert len(header) == 8, f"the fork server died (exit status {server.poll()})"
        return pickle.loads(server.stdout.read(struct.unpack("<Q", header)[0]))

    yield ask
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=min(settings().max_examples, 25))
@given(data=st.data())
def test_forked_children_compute_what_the_parent_computes(fork_server, name, data):
    """A process runs a random valid case on the NumPy path and the host backend (starting their threads where
    the case has several chunks or blocks), then a child forked from it runs the case again: the same results
    within 30 s (the NumPy path's thread pool used to hang such a child)."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    case = data.draw(valid_cases(name, dtype), label="case")
    arrays = {n: None if a is None else a.astype(dtype) for n, a in case.arrays.items()}
    expected, (outcome, child) = fork_server((name, arrays, case.options, case.backward_options))
    assert outcome == "result", f"the forked child {outcome}: {child}"
    for (out, grads), (want, want_grads) in zip(child, expected):
        assert_results_agree((out, *grads), (want, *want_grads), "forked child vs parent")


# ----------------------------------------------------------------------------------- invalid input

class Call(NamedTuple):
    """A valid call of a public function: ``fn(**kwargs)``."""

    fn: Callable
    kwargs: dict
    arrays: tuple      # names of the array arguments
    optional: tuple    # array arguments that may be None
    spec: OpSpec


#: public function name → (its op's spec, whether it is the backward): every op's forward and backward
FUNCTIONS = {fn.__name__: (spec, fn is spec.backward)
             for spec in SPECS.values() for fn in (spec.function, spec.backward)}


def functions_of(*ops: str) -> list[str]:
    """The names of these ops' forwards and backwards."""
    return [fn.__name__ for name in ops for fn in (SPECS[name].function, SPECS[name].backward)]


@st.composite
def valid_calls(draw, function: str):
    """A valid float64 call of a public function (boxes as one (K, 5) array)."""
    spec, backward = FUNCTIONS[function]
    case = draw(valid_cases(spec.name, "float64", listing=False))
    kwargs = {**case.arrays, **case.options}
    arrays = spec.arrays
    if backward:
        shape = np.shape(run_numpy(spec.function, **kwargs))
        grad_output = np.asarray(np.random.default_rng(draw(SEEDS)).standard_normal(shape))
        kwargs = {"grad_output": grad_output, **kwargs, **case.backward_options}
        arrays = ("grad_output", *arrays)
    return Call(spec.backward if backward else spec.function, kwargs, arrays, OPTIONAL[spec.name], spec)


class Mutation(NamedTuple):
    name: str       # the argument changed
    kind: str       # what was done (an event)
    value: object
    expect: str     # "ok": must succeed with the same values; "valid": must succeed; "refused": must raise,
    #                 naming the argument (never coerced); "named": succeed or name the argument; "related":
    #                 succeed or name any argument of the call
    same_as: Optional[dict] = None  # "ok": arguments of an equivalent call (default: the unchanged call)


BAD_DTYPES = ["int8", "int32", "int64", "uint8", "bool", "complex64", "complex128", "object", "<U3", "S3",
              "datetime64[s]", "timedelta64[s]", "float16", "float32"] + (["bfloat16"] if "bfloat16" in DTYPES else [])
SCALAR_KINDS = {
    "size": "size", "align_corners": "flag", "aligned": "flag", "no_trans": "flag", "deterministic": "flag",
    "mode": "choice", "padding_mode": "choice", "pool_mode": "choice",
    "output_size": "pair", "stride": "pair", "dilation": "pair", "padding": "pair0",
    "spatial_scale": "positive real", "gamma": "real", "trans_std": "real",
    "sampling_ratio": "int", "output_dim": "positive int", "group_size": "positive int",
    "pooled_size": "positive int", "sample_per_part": "positive int", "part_size": "part_size",
    "needs_input_grad": "needs", "method": "choice", "num_points": "positive int",
    "spatial_shapes": "levels", "level_start_index": "starts", "points_per_level": "points",
    "order": "order", "cval": "real", "prefilter": "flag", "output_shape": "shape",
    "kernel_h": "positive int", "kernel_w": "positive int", "stride_h": "positive int", "stride_w": "positive int",
    "dilation_h": "positive int", "dilation_w": "positive int", "pad_h": "int ≥ 0", "pad_w": "int ≥ 0",
    "group": "positive int", "group_channels": "positive int", "offset_scale": "real", "remove_center": "flag",
    "softmax": "flag",
}


def with_dtype(a, dtype):
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(dtype)
    except (TypeError, ValueError):
        return np.zeros(a.shape, dtype)


def scalar_mutations(name, value, kwargs):
    """(value, expect) pairs for a scalar argument of the call with arguments kwargs (a non-iterable
    needs_input_grad has its own test below)."""
    kind = SCALAR_KINDS[name]
    if kind == "flag":
        return [(v, "refused") for v in (0, 1, None, "True", "False", 1.0, [True], np.int64(1))] + [
            (np.bool_(value), "ok")]
    if kind == "choice":
        return [(v, "named") for v in ("", value.upper(), value + " ", None, 0, value.encode(), [value],
                                       "nonsense")] + [(np.str_(value), "ok")]
    if kind in ("pair", "pair0"):
        bad = [-1, (0, -1), (1,), (1, 2, 3), (), 1.5, 5.7, (1.0, 1), "ab", "3", None, (1, None), {1: 2},
               [np.float64(1), 1], 1j, True, np.True_, (True, 1), (1, False), 2**63, (1, -2**63)]
        if kind == "pair":
            bad += [0, (0, 1), (1, 0)]
        pair = (value, value) if isinstance(value, int) else tuple(value)
        variants = [(tuple(np.int64(v) for v in pair), "ok"), (list(pair), "ok"), (np.int64(pair[0]), "valid")]
        return [(v, "refused") for v in bad] + [(np.array([1, 1]), "named")] + variants[:3 if pair[0] == pair[1] else 2]
    if kind in ("positive real", "real"):
        bad = [math.nan, math.inf, -math.inf, 10**400, "0.5", None, True, 1j, [0.5], decimal.Decimal("0.5")]
        if kind == "positive real":
            bad += [0, 0.0, -0.5, -1e-300]
        return [(v, "refused") for v in bad] + [(np.float64(value), "ok"), (np.float32(value), "valid"),
                                              (int(max(1, round(value))), "valid"), (fractions.Fraction(1, 3), "valid")]
    if kind == "int":  # sampling_ratio: at most 2**16 in magnitude
        return [(v, "refused") for v in (2.0, 2.5, "2", None, [2], np.float64(2.0), 1j, True, np.True_, 2**16 + 1,
                                         -2**31, 2**31, 2**63, 10**30)] + [
            (np.int64(value), "ok"), (np.int8(value), "ok"), (-7, "valid"), (0, "valid")]
    if kind == "positive int":
        # beyond 2**31 - 1 (a C int) every count is refused, sample_per_part beyond 2**16
        huge = [2**31, 2**63, 10**30] + ([2**16 + 1] if name == "sample_per_part" else [])
        return [(v, "refused") for v in (0, -1, -100, 2.0, 1.5, "2", None, [2], True, np.True_, *huge)] + [
            (np.int64(value), "ok"), (value + 1, "related")]  # value + 1: valid, or a mismatch named
    if kind == "int ≥ 0":  # dcnv3 and dcnv4's pads
        return [(v, "refused") for v in (-1, -100, 2.0, 1.5, "2", None, [2], True, np.True_, 2**31, 2**63)] + [
            (np.int64(value), "ok"), (value + 1, "related")]  # value + 1: valid, or a mismatch named
    if kind == "part_size":
        return [(v, "refused") for v in (0, -1, 2.0, "2", [2], True)] + [(None, "related")] + (
            [(np.int16(value), "ok")] if value is not None else [])
    if kind == "needs":
        n = len(value)
        return [(v, "refused") for v in ((True,) * (n - 1), (True,) * (n + 1), (1,) * n, ("yes",) * n, (), "ab",
                                         (None,) * n, [[True]] * n)] + [
            (list(value), "ok"), (np.array(value, bool), "ok"), (tuple(np.bool_(v) for v in value), "ok")]
    if kind == "size":  # affine_grid's output size; affine_sample's, where None means the input's
        N, C, H, W = (int(v) for v in value)
        optional = [(None, "valid")] if "input" in kwargs else [(None, "refused")]
        return optional + [(v, "refused") for v in (
                                         (N, C, H), (N, C, H, W, 1), (N, C, -1, W), (N, C, H, 1.5), (N + 1, C, H, W),
                                         "abcd", (N, C, H, None), 4, {}, (N, C, H, W * 1.0), (N, C, True, W),
                                         (N, np.True_, H, W), (N, C, H, np.float64(W)), (N, C, H, str(W)),
                                         (N, C, 2**63, W))] + [
            (list(value), "ok"), (np.array([N, C, H, W]), "ok"), (tuple(np.int16(v) for v in (N, C, H, W)), "ok")]
    if kind in ("levels", "starts", "points"):
        return level_mutations(kind, value, kwargs)
    if kind == "order":  # ndimage's spline order: 0, 1 or 3
        return [(v, "refused") for v in (-1, 2, 4, 5, 1.0, "1", None, True, np.True_, [1], 2**63)] + [
            (np.int64(value), "ok"), (np.int8(value), "ok")]
    if kind == "shape":  # affine_transform's output_shape: one size per input axis
        shape = tuple(int(v) for v in value)
        return [(v, "refused") for v in (shape + (1,), shape[:-1], (-1,) * len(shape), (1.5,) * len(shape),
                                         "ab", 3, (True,) * len(shape), (2**63,) * len(shape))] + [
            (list(shape), "ok"), (tuple(np.int64(v) for v in shape), "ok"), (None, "related")]
    raise AssertionError(kind)


def level_mutations(kind, value, kwargs):
    """(value, expect) pairs for the per-level options of multi-scale deformable attention: spatial_shapes
    ("levels": (H_l, W_l) per level), level_start_index ("starts") and points_per_level ("points"), each a
    sequence or an integer array (or None for the last two). A wrong size or count of levels is a mismatch
    with value's S or the locations' layout ("related"); a malformed option must be refused by name."""
    shapes = [tuple(row) for row in np.asarray(kwargs["spatial_shapes"]).tolist()]
    L, starts = len(shapes), level_starts(shapes)
    malformed = [None, "ab", 3, 2.5, {}]
    if kind == "levels":
        (H, W), rest = shapes[0], shapes[1:]
        bad = [(), [()], tuple(v for row in shapes for v in row), [(H, W, 1), *rest], [((H, W),), *rest],
               [((H, W), (H, W)), *rest], [(H, (W,)), *rest], np.array(shapes)[None], [(0, W), *rest],
               [(H, 0), *rest], [(-H, W), *rest], [(H, -1), *rest], [(2**31, W), *rest], [(H, 2**63), *rest],
               [(True, W), *rest], [(H, np.True_), *rest], [(float(H), W), *rest], [(H, np.float64(W)), *rest],
               [(str(H), W), *rest], [(H, None), *rest], np.array(shapes, float), np.array(shapes) > 0]
        related = [[(H + 1, W), *rest], [*shapes, (1, 1)], shapes[::-1], np.array(shapes).T, shapes[:-1]]
        same = [tuple(shapes), [list(row) for row in shapes], np.array(shapes), np.array(shapes, np.int32),
                np.array(shapes, np.uint16), [tuple(np.int64(v) for v in row) for row in shapes],
                [np.array(row) for row in shapes]]
        # H and W swapped in every level: the same S and starts, another (valid) call
        return ([(v, "refused") for v in malformed + bad] + [(v, "related") for v in related]
                + [([(w, h) for h, w in shapes], "valid")] + [(v, "ok") for v in same])
    if kind == "starts":  # must equal the cumulative H_l·W_l; None computes them
        bad = [(*starts[:-1], starts[-1] + 1), (1, *starts[1:]), starts[:-1], (*starts, starts[-1] + 1), [starts],
               tuple(float(s) for s in starts), (False, *starts[1:]), (*starts[:-1], str(starts[-1])),
               np.array(starts, float), np.array(starts)[None]]
        same = [None, starts, list(starts), np.array(starts), np.array(starts, np.int32),
                tuple(np.int64(s) for s in starts)]
        return [(v, "refused") for v in malformed[1:] + bad] + [(v, "ok") for v in same]
    # points: P_l per level, or None (the locations then have an L and a P axis); a well-formed count that
    # does not fit the locations is a mismatch, named points_per_level where it is given
    if value is None:
        P = kwargs["sampling_locations"].shape[4]
        points = (P,) * L
        others = [(points, "related")]  # a count per level, but locations shaped (N, Lq, M, L, P, 2)
    else:
        points = tuple(int(v) for v in value)
        others = [(None, "related"), (list(points), "ok"), (np.array(points), "ok"),
                  (tuple(np.int64(v) for v in points), "ok"), (np.array(points, np.uint8), "ok")]
        if L > 1 and sum(points):  # one point moved to the next level: the same ΣP_l, another valid call
            i = next(i for i, p in enumerate(points) if p)
            moved = list(points)
            moved[i], moved[(i + 1) % L] = moved[i] - 1, moved[(i + 1) % L] + 1
            others.append((tuple(moved), "valid"))
    first, rest = points[0], points[1:]
    others.append(((first + 1, *rest), "related" if value is None else "refused"))
    bad = [points[:-1], (*points, 0), (*points, 1), (-1, *rest), (2**31, *rest), (2**63, *rest), (float(first), *rest),
           (True, *rest), (np.True_, *rest), (str(first), *rest), (None, *rest), [points], np.array(points, float)]
    return [(v, "refused") for v in malformed[1:] + bad] + others


@st.composite
def mutations(draw, call: Call):
    name = draw(st.sampled_from(sorted(call.kwargs)), label="argument")
    value = call.kwargs[name]
    if name not in call.arrays:
        new, expect = draw(st.sampled_from(scalar_mutations(name, value, call.kwargs)), label="value")
        return Mutation(name, f"{SCALAR_KINDS[name]} {expect}", new, expect)
    rng = np.random.default_rng(draw(SEEDS))
    if value is None:  # an absent optional array: give one (of some shape) or keep it absent
        shape = tuple(draw(st.lists(between(0, 4), max_size=5)))
        return Mutation(name, "optional given", rng.standard_normal(shape), "related")
    kinds = ["rank", "dimension", "zero-size", "dtype", "object", "read-only", "strided"]
    if name in call.optional:
        kinds.append("None (optional)")
    if name == call.spec.boxes:
        kinds += (["box index"] if len(value) else []) + ["per-image list"]
    kind = draw(st.sampled_from(kinds), label="mutation")
    if kind == "rank":
        if value.ndim >= 2 and draw(st.booleans()):
            new = value.reshape(value.shape[:-2] + (value.shape[-2] * value.shape[-1],))
        elif value.ndim == 1 and draw(st.booleans()):
            new = np.asarray(value[0] if value.size else 0.0, value.dtype)
        else:
            new = value[..., None]
        return Mutation(name, kind, new, "named")
    if kind in ("dimension", "zero-size"):
        if value.ndim == 0:
            return Mutation(name, "rank", value[None], "named")
        axis = draw(between(0, value.ndim - 1))
        size = value.shape[axis]
        choices = [0] if kind == "zero-size" and size else sorted({1, size + 1, size + 2, max(size - 1, 1)} - {size})
        shape = list(value.shape)
        shape[axis] = draw(st.sampled_from(choices))
        return Mutation(name, kind, np.resize(value, shape), "related")
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in BAD_DTYPES if d != value.dtype.name]))
        return Mutation(name, f"dtype {dtype}", with_dtype(value, dtype), "named")
    if kind == "object":
        objects = {"list": lambda: value.tolist(), "tuple": lambda: tuple(value.tolist()) if value.ndim else (),
                   "string": lambda: "input", "float": lambda: 1.5, "int": lambda: 3, "dict": lambda: {},
                   "object": object, "bytes": lambda: b"\x00" * 8, "NumPy scalar": lambda: np.float64(1.0),
                   "0-d array": lambda: np.asarray(1.0), "list of arrays": lambda: [value],
                   "memoryview": lambda: memoryview(np.ascontiguousarray(value))}
        which = draw(st.sampled_from(sorted(objects)))
        return Mutation(name, f"object {which}", objects[which](), "named")
    if kind == "read-only":
        new = value.copy()
        new.flags.writeable = False
        return Mutation(name, kind, new, "ok")
    if kind == "strided":
        return Mutation(name, kind, view(value, Layout("strided", draw(between(0, value.ndim - 1)), False))
                        if value.ndim else value, "ok")
    if kind == "None (optional)":
        return Mutation(name, kind, None, "related")
    if kind == "box index":
        new = value.copy()
        row = draw(between(0, len(value) - 1))
        N = call.kwargs["input"].shape[0]
        new[row, 0] = draw(st.sampled_from([0.5, N - 0.5, N, N + 3, -1, -0.5, math.nan, math.inf, -math.inf, 1e10,
                                            2.0**53]))
        return Mutation(name, kind, new, "named")
    assert kind == "per-image list"
    N = call.kwargs["input"].shape[0]
    used = int(value[:, 0].max()) + 1 if len(value) else 0
    order = np.argsort(value[:, 0], kind="stable")  # per-image boxes are taken image by image
    return Mutation(name, kind, listed(value, draw(between(used, N))), "ok", {**call.kwargs, name: value[order]})


def outcome(backend: str, fn, kwargs):
    """(result, None) or (None, exception)."""
    try:
        with testing.poisoned_outputs():
            return testing.run(backend, fn, **kwargs), None
    except Exception as error:  # judged by the caller: only ValueError and TypeError are allowed
        return None, error


def assert_results_agree(got, want, where):
    for i, (a, b) in enumerate(zip(as_fields(got), as_fields(want))):
        assert (a is None) == (b is None), f"{where}: output {i} None on one side only"
        if a is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, \
            f"{where}: output {i} {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        finite = np.isfinite(b.astype(np.float64))
        assert np.array_equal(np.isfinite(a.astype(np.float64)), finite), f"{where}: output {i} non-finite differ"
        tolerance = testing.TOLERANCE.get(a.dtype.name, 1e-12)
        error = testing.relative_error(a[finite], b[finite])
        assert error <= tolerance, f"{where}: output {i} relative error {error:.3e} > {tolerance}"


@pytest.mark.parametrize("function", FUNCTIONS)
@given(data=st.data())
def test_invalid_input_is_rejected_by_name(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    mutation = data.draw(mutations(call), label="mutation")
    event(f"{mutation.kind} ({mutation.name})" if mutation.kind.startswith(("object", "dtype")) else mutation.kind)
    kwargs = {**call.kwargs, mutation.name: mutation.value}
    note(f"{function}({mutation.name}={mutation.value!r:.200})")
    result, error = outcome("numpy", call.fn, kwargs)
    if HOST:
        host_result, host_error = outcome("host", call.fn, kwargs)
        assert type(host_error) is type(error), f"numpy path: {error!r}; host backend: {host_error!r}"
        if error is None:
            assert_results_agree(host_result, result, "host vs numpy")
    if error is None:
        assert mutation.expect != "refused", f"{mutation.name}={mutation.value!r:.100} was accepted (coerced)"
        if mutation.expect == "ok":  # the same values: the same result as the unchanged call
            expected = run_numpy(call.fn, **(mutation.same_as or call.kwargs))
            assert_results_agree(result, expected, "mutated vs original")
        event("accepted")
        return
    assert mutation.expect not in ("ok", "valid"), f"a valid variant was refused: {error!r}"
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    names = [mutation.name] if mutation.expect in ("named", "refused") else list(call.kwargs)
    assert any(n in message for n in names), f"message does not name {' or '.join(names)}: {message!r}"
    event("rejected by name")


# ----------------------------------------------------- bugs this fuzzing found: fixed ones, then open ones

@pytest.mark.parametrize("function", FUNCTIONS)
@given(data=st.data())
def test_none_for_a_required_array_is_a_named_type_error(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    name = data.draw(st.sampled_from([n for n in call.arrays if n not in call.optional]), label="argument")
    with pytest.raises((TypeError, ValueError), match=name):
        call.fn(**{**call.kwargs, name: None})


@pytest.mark.parametrize("function", [SPECS[name].backward.__name__ for name in SPECS if name in NEEDS_INPUT_GRAD])
@given(data=st.data())
def test_needs_input_grad_that_is_not_iterable_is_named(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    value = data.draw(st.sampled_from([None, True, 1, 1.5]), label="needs_input_grad")
    with pytest.raises((TypeError, ValueError), match="needs_input_grad"):
        call.fn(**{**call.kwargs, "needs_input_grad": value})


#: the real-valued options of any op
REALS = sorted(n for n, kind in SCALAR_KINDS.items() if kind in ("real", "positive real"))


@pytest.mark.parametrize("function", [f for f, (spec, _) in FUNCTIONS.items() if set(spec.options) & set(REALS)])
@given(data=st.data())
def test_real_arguments_that_are_not_floats(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    name = data.draw(st.sampled_from([n for n in REALS if n in call.kwargs]))
    value = data.draw(st.sampled_from([fractions.Fraction(1, 3), 10**400]), label="value")
    try:
        call.fn(**{**call.kwargs, name: value})
    except (TypeError, ValueError) as error:
        assert name in str(error), f"message does not name {name}: {error}"
    else:
        assert value != 10**400, f"{name}={value} (not a finite float) was accepted"


@pytest.mark.parametrize("function", functions_of("deform_conv2d"))
@given(data=st.data())
def test_deform_conv2d_with_no_input_channels(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    x = call.kwargs["input"]
    with pytest.raises((TypeError, ValueError), match="input|weight"):
        call.fn(**{**call.kwargs, "input": np.zeros((x.shape[0], 0, *x.shape[2:]))})


@pytest.mark.parametrize("function", functions_of("deform_roi_pool"))
@given(data=st.data())
def test_deform_roi_pool_errors_name_rois(function, data):
    call = data.draw(valid_calls(function), label="valid call")
    rois = call.kwargs["rois"]
    bad = data.draw(st.sampled_from([rois[None], rois.astype(np.float32), rois[:, :4], [rois[:, 1:].astype(np.int64)]]),
                    label="rois")
    with pytest.raises((TypeError, ValueError), match="rois"):
        call.fn(**{**call.kwargs, "rois": bad})


#: ms_deform_attn with level sizes summing to 2**64 + 2: four levels of (2**31 - 1)² pixels and one of
#: 14329 × 1198958 = 2**34 - 2, and value of S = 2.
WRAPPING_LEVELS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, deformcp
    levels = [(2**31 - 1, 2**31 - 1)] * 4 + [(14329, 1198958)]
    with deformcp.backend(sys.argv[1]):
        try:
            deformcp.ms_deform_attn(np.ones((1, 2, 1, 1)), levels, None, np.full((1, 1, 1, 5, 1, 2), 0.5),
                                    np.ones((1, 1, 1, 5, 1)))
        except ValueError as error:
            print("REFUSED", error)
        else:
            print("ACCEPTED")
""")


@pytest.mark.parametrize("backend", ["numpy", "host"])
def test_attention_level_sizes_summing_past_int64_are_refused(backend):
    """The level offsets were an int64 running sum: sizes summing to 2**64 + 2 passed as S = 2, and the call
    read far outside value (a segmentation fault on the NumPy path). Run in a subprocess; now refused, naming
    value (its S)."""
    if backend == "host" and not HOST:
        pytest.skip("host backend: no C++ compiler found")
    done = subprocess.run([sys.executable, "-c", WRAPPING_LEVELS_SCRIPT, backend], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"the interpreter died (exit status {done.returncode}): {done.stderr[-500:]}"
    assert done.stdout.startswith("REFUSED value: expected S = ΣH_l·W_l = 18446744073709551618 rows"), done.stdout


SIXTEEN_BIT = [d for d in DTYPES if np.dtype(d).itemsize == 2]


def one_sample_rois(dtype, corner=0.5):
    """Three RoIs of image 0, each one point: with corner 0.5, one sample at pixel (0, 0)."""
    return np.tile(np.array([0, corner, corner, corner, corner]), (3, 1)).astype(dtype)


def deform_conv2d_three_readers(x, g, dtype):
    # a 1×1 kernel with padding (0, 1) has three outputs along x; offsets Δx = 1, 0, -1 move all three onto
    # pixel (0, 0)
    offset = np.zeros((1, 2, 1, 3), dtype)
    offset[0, 1] = [1, 0, -1]
    return (g.reshape(1, 1, 1, 3), x, offset, np.ones((1, 1, 1, 1), dtype)), {"padding": (0, 1)}


DCN_ONE_PIXEL = {"kernel_h": 1, "kernel_w": 1, "stride_h": 1, "stride_w": 1, "pad_h": 0, "pad_w": 1, "dilation_h": 1,
                 "dilation_w": 1, "group": 1, "group_channels": 1, "offset_scale": 1.0}

#: op name → (x, g, dtype) → (args, kwargs) of a backward call in which three outputs read the one pixel of x
#: with weight 1, their gradients g: one per op whose backward scatter-adds (spec.deterministic)
THREE_READERS = {
    "grid_sample": lambda x, g, dtype: ((g.reshape(1, 1, 1, 3), x, np.zeros((1, 1, 3, 2), dtype)), {}),
    "roi_align": lambda x, g, dtype: ((g.reshape(3, 1, 1, 1), x, one_sample_rois(dtype), 1), {"sampling_ratio": 1}),
    "ps_roi_align": lambda x, g, dtype: ((g.reshape(3, 1, 1, 1), x, one_sample_rois(dtype), 1),
                                         {"sampling_ratio": 1}),
    "deform_roi_pool": lambda x, g, dtype: ((g.reshape(3, 1, 1, 1), x, one_sample_rois(dtype), None, 1),
                                            {"sampling_ratio": 1}),
    # rounded, inclusive corners: the bin is [-0.5, 0.5), its one sample at -0.5 reads pixel 0
    "deform_ps_roi_pool": lambda x, g, dtype: (
        (g.reshape(3, 1, 1, 1), x, one_sample_rois(dtype, corner=0), np.zeros((3, 2, 1, 1), dtype)),
        {"output_dim": 1, "group_size": 1, "pooled_size": 1, "sample_per_part": 1}),
    "deform_conv2d": deform_conv2d_three_readers,
    # three queries of one 1×1 level, each one point at its centre (pixel (0, 0) exactly), weight 1 (one logit
    # soft-maxes to 1)
    "ms_deform_attn": lambda x, g, dtype: ((g.reshape(1, 3, 1), x.reshape(1, 1, 1, 1), ((1, 1),), None,
                                            np.full((1, 3, 1, 1, 1, 2), 0.5, dtype), np.ones((1, 3, 1, 1, 1), dtype)),
                                           {}),
    "flash_deform_attn": lambda x, g, dtype: ((g.reshape(1, 3, 1), x.reshape(1, 1, 1, 1), ((1, 1),), None,
                                               np.tile(np.array([0.5, 0.5, 0], dtype), (1, 3, 1, 1)), 1), {}),
    # a 1×1 kernel over the 1×1 image padded to 3 columns, the offsets (1, 0, −1) moving every tap to pixel 0
    "dcnv3": lambda x, g, dtype: ((g.reshape(1, 1, 3, 1), x, np.array([[[[1, 0], [0, 0], [-1, 0]]]], dtype),
                                   np.ones((1, 1, 3, 1), dtype)), DCN_ONE_PIXEL),
    "dcnv4": lambda x, g, dtype: ((g.reshape(1, 1, 3, 1), x, np.array([[[[1, 0, 1], [0, 0, 1], [-1, 0, 1]]]],
                                                                          dtype)), DCN_ONE_PIXEL),
    # a zero theta: every location at the centre of the 1×1 image (align_corners=False: pixel 0 exactly)
    "affine_sample": lambda x, g, dtype: ((g.reshape(1, 1, 1, 3), x, np.zeros((1, 2, 3), dtype)),
                                          {"size": (1, 1, 1, 3)}),
    # three points at index (0, 0) of a 1×1 image
    "map_coordinates": lambda x, g, dtype: ((g, x.reshape(1, 1), np.zeros((2, 3), dtype)), {}),
    # a 1×3 output whose every index the zero matrix maps to (0, 0)
    "affine_transform": lambda x, g, dtype: ((g.reshape(1, 3), x.reshape(1, 1), np.zeros((2, 2), dtype),
                                              np.zeros(2, dtype)), {"output_shape": (1, 3)}),
}


def three_readers_of_one_pixel(name, dtype):
    """A backward call in which three outputs read the one pixel of a 1×1 image with weight 1, with output
    gradients 1024, 0.5 and -1022 (-1024 in bfloat16): they sum to 2.5 (0.5), but 1024 + 0.5 rounds to 1024
    in 16 bits. Returns (backward, args, kwargs); the image's gradient is the first field of the result."""
    x = np.full((1, 1, 1, 1), 0.75, dtype)  # the input gradients do not depend on it
    g = np.array([1024, 0.5, -1022], dtype)
    return (SPECS[name].backward, *THREE_READERS[name](x, g, dtype))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("name", [name for name in SPECS if name in DETERMINISTIC])
def test_16_bit_input_gradients_accumulate_in_float32(backend, name, dtype, deterministic):
    backward, args, kwargs = three_readers_of_one_pixel(name, dtype)
    exact = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args]
    expected = backward(*exact, **kwargs)[0]
    assert float(expected.ravel()[0]) == (2.5 if dtype == "float16" else 0.5)
    assert testing.relative_error(backward(*args, **kwargs)[0], expected) == 0  # NumPy path: float32
    moved = [to_backend(a, backend) if isinstance(a, np.ndarray) else a for a in args]
    got = testing.run(backend, backward, *moved, deterministic=deterministic, **kwargs)[0]
    assert testing.relative_error(got, expected) == 0, got


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16_bit_deform_conv2d_columns_in_float32(backend, dtype):
    # two channels sampled half-way between pixels 1 | 1 + ε and 1 + ε | 1 + 2ε (ε = one 16-bit ulp of 1):
    # 1 + ε/2 and 1 + 3ε/2 round to 1 and 1 + 2ε, so weights (1, -1) would give -2ε instead of -ε
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    x = np.array([[1, 1 + eps], [1 + eps, 1 + 2 * eps]]).reshape(1, 2, 1, 2).astype(dtype)
    weight = np.array([1.0, -1.0]).reshape(1, 2, 1, 1).astype(dtype)
    offset = np.zeros((1, 2, 1, 2), dtype)
    offset[0, 1] = 0.5  # Δx
    expected = deformcp.deform_conv2d(x.astype(np.float64), offset.astype(np.float64), weight.astype(np.float64))
    assert testing.relative_error(deformcp.deform_conv2d(x, offset, weight), expected) == 0  # NumPy path: float32
    got = testing.run(backend, deformcp.deform_conv2d, *(to_backend(a, backend) for a in (x, offset, weight)))
    assert testing.relative_error(got, expected) <= testing.TOLERANCE[dtype], got


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16_bit_deform_conv2d_bias_gradient_sums_in_float32(backend, dtype):
    x, offset, weight = np.zeros((1, 1, 1, 3), dtype), np.zeros((1, 2, 1, 3), dtype), np.ones((1, 1, 1, 1), dtype)
    bias = np.zeros(1, dtype)
    # sums to 1; 256 + 1 rounds to 256 in bfloat16 (2048 + 1 to 2048 in float16)
    top = 256 if dtype == "bfloat16" else 2048
    grad_output = np.array([[[[top, 1, -top]]]], dtype)
    assert float(deformcp.deform_conv2d_backward(grad_output, x, offset, weight, bias).bias[0]) == 1
    got = testing.run(backend, deformcp.deform_conv2d_backward,
                      *(to_backend(a, backend) for a in (grad_output, x, offset, weight, bias))).bias
    assert float(testing.to_numpy(got)[0]) == 1, got


# Huge sample counts per bin: each case runs in a subprocess (one of them is a segmentation fault). Passing
# means: a ValueError / TypeError naming the argument, or a result within 5 % of the same pooling sampled
# densely (sampling_ratio 256 / sample_per_part 64), within 60 s.
HUGE_COUNT_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import numpy as np, deformcp
    warnings.simplefilter("ignore")
    backend, function, name, value = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6))
    boxes = np.array([[0, 0.7, 0.9, 4.6, 5.3]])
    if function == "deform_ps_roi_pool":
        call = lambda v: deformcp.deform_ps_roi_pool(x, boxes, None, 1, 2, 2, **{name: v}, no_trans=True)
        dense = 64
    else:
        call = lambda v: getattr(deformcp, function)(x, boxes, output_size=2, **{name: v})
        dense = 256
    with deformcp.backend(backend):
        try:
            out = call(value)
        except (TypeError, ValueError) as error:
            print("NAMED" if name in str(error) else "UNNAMED", type(error).__name__, error)
            sys.exit(0)
        except Exception as error:
            print("OTHER", type(error).__name__, error)
            sys.exit(0)
    reference = call(dense)
    error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    print("CLOSE" if error < 0.05 else "WRONG", f"relative error {error:.3g} from the densely sampled result")
""")
HUGE_COUNT_CASES = [
    ("numpy", "roi_align", "sampling_ratio", 2**31, "segmentation fault"),
    ("numpy", "deform_roi_pool", "sampling_ratio", 2**31, "segmentation fault"),
    ("numpy", "roi_align", "sampling_ratio", 2**31 - 1, "ValueError('negative dimensions are not allowed')"),
    ("numpy", "roi_align", "sampling_ratio", 10**30, "silently returns zeros"),
    ("host", "roi_align", "sampling_ratio", 2**31, "OverflowError (Python integer out of bounds for int32)"),
    ("numpy", "deform_ps_roi_pool", "sample_per_part", 10**30, "ValueError('Maximum allowed size exceeded')"),
    ("host", "deform_ps_roi_pool", "sample_per_part", 10**30, "OverflowError (int too large to convert to C long)"),
]


@pytest.mark.parametrize("backend, function, name, value, bug", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}={case[3]}") for case in HUGE_COUNT_CASES])
def test_huge_sample_counts(backend, function, name, value, bug):
    if backend == "host" and not HOST:
        pytest.skip("host backend: no C++ compiler found")
    try:
        done = subprocess.run([sys.executable, "-c", HUGE_COUNT_SCRIPT, backend, function, name, str(value)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{function}({name}={value}) on {backend}: still running after 60 s")
    assert done.returncode == 0, f"the interpreter died (exit status {done.returncode}): {done.stderr[-500:]}"
    verdict = done.stdout.strip()
    assert verdict.startswith(("NAMED", "CLOSE")), verdict
