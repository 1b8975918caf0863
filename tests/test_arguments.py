"""Flags and sizes in every front door: the NumPy-style functions (forward and backward), deformcp.torch's
functions and modules' constructors, and deformcp.jax's functions.

The rule: a flag is a bool (Python or NumPy), never an int, a str or None (torch's own functions refuse
``align_corners=1`` too; deformcp.torch's ``align_corners=None`` means False, as in torch); a size or count
is an int (Python or NumPy integer), never a bool, a float or a str, and at most 2**31 - 1. A wrong kind
is a TypeError and a wrong value a ValueError, both reading "<argument>: expected ..., got ..." with the
value that came; nothing is converted silently (``bool("False")`` is True, ``int(5.7)`` is 5).
"""
import re
from typing import NamedTuple

import numpy as np
import pytest

import deformcp

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import deformcp.jax as djax  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402

# ------------------------------------------------------------------------------------------------ calls

def arrays():
    """Small valid float32 arrays for every op (NumPy)."""
    rng = np.random.default_rng(0)
    f = np.float32
    return dict(
        theta=rng.standard_normal((1, 2, 3)).astype(f), grid_out=rng.standard_normal((1, 4, 4, 2)).astype(f),
        x=rng.standard_normal((1, 4, 6, 6)).astype(f), grid=rng.uniform(-1, 1, (1, 3, 3, 2)).astype(f),
        sampled=rng.standard_normal((1, 4, 3, 3)).astype(f), boxes=np.array([[0, 1, 1, 4, 5]], f),
        pooled=rng.standard_normal((1, 4, 2, 2)).astype(f), ps_pooled=rng.standard_normal((1, 1, 2, 2)).astype(f),
        offset=np.zeros((1, 2, 2, 2), f), conv_offset=np.zeros((1, 18, 6, 6), f),
        weight=rng.standard_normal((2, 4, 3, 3)).astype(f), conv_out=rng.standard_normal((1, 2, 6, 6)).astype(f),
        value=rng.standard_normal((1, 26, 2, 3)).astype(f), locations=rng.uniform(0, 1, (1, 3, 2, 2, 2, 2)).astype(f),
        attention=rng.uniform(0, 1, (1, 3, 2, 2, 2)).astype(f), loc_attn=rng.uniform(0, 1, (1, 3, 2, 12)).astype(f),
        attn_out=rng.standard_normal((1, 3, 6)).astype(f), dcn_x=rng.standard_normal((1, 4, 5, 4)).astype(f),
        dcn_offset=np.zeros((1, 4, 5, 36), f), dcn_mask=rng.uniform(0, 1, (1, 4, 5, 18)).astype(f),
        dcn_packed=rng.uniform(0, 1, (1, 4, 5, 56)).astype(f), dcn_out=rng.standard_normal((1, 4, 5, 4)).astype(f))


A = arrays()


CONV = dict(stride=1, padding=1, dilation=1)
LEVELS = dict(spatial_shapes=((4, 5), (2, 3)), level_start_index=None)  # S = 26 rows of value
DCN = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1, group=2,
           group_channels=2, offset_scale=1.0)
DPS = dict(output_dim=1, group_size=2, pooled_size=2, part_size=2, sample_per_part=2, trans_std=0.1, no_trans=False)


def forward_calls(ns, a):
    """op name → a call of namespace ns's forward function (deformcp, deformcp.torch or deformcp.jax) on the
    arrays a, with keyword overrides."""
    return {
        "affine_grid": lambda **o: ns.affine_grid(a["theta"], **{"size": (1, 1, 4, 4), **o}),
        "grid_sample": lambda **o: ns.grid_sample(a["x"], a["grid"], **o),
        "affine_sample": lambda **o: ns.affine_sample(a["x"], a["theta"], **{"size": (1, 1, 3, 3), **o}),
        "roi_align": lambda **o: ns.roi_align(a["x"], a["boxes"], **{"output_size": 2, **o}),
        "ps_roi_align": lambda **o: ns.ps_roi_align(a["x"], a["boxes"], **{"output_size": 2, **o}),
        "deform_conv2d": lambda **o: ns.deform_conv2d(a["x"], a["conv_offset"], a["weight"], **{**CONV, **o}),
        "deform_roi_pool": lambda **o: ns.deform_roi_pool(a["x"], a["boxes"], a["offset"], **{"output_size": 2, **o}),
        "deform_ps_roi_pool": lambda **o: ns.deform_ps_roi_pool(a["x"], a["boxes"], a["offset"], **{**DPS, **o}),
        "ms_deform_attn": lambda **o: ns.ms_deform_attn(a["value"], sampling_locations=a["locations"],
                                                        attention_weights=a["attention"], **{**LEVELS, **o}),
        "flash_deform_attn": lambda **o: ns.flash_deform_attn(a["value"], sampling_loc_attn=a["loc_attn"],
                                                              **{**LEVELS, "num_points": 2, **o}),
        "dcnv3": lambda **o: ns.dcnv3(a["dcn_x"], a["dcn_offset"], a["dcn_mask"], **{**DCN, **o}),
        "dcnv4": lambda **o: ns.dcnv4(a["dcn_x"], a["dcn_packed"], **{**DCN, **o}),
    }


def plain_calls():
    """op name → a call of the NumPy-style function (forward or backward) with keyword overrides."""
    a = A
    return {
        **forward_calls(deformcp, a),
        "affine_grid_backward": lambda **o: deformcp.affine_grid_backward(
            a["grid_out"], a["theta"], **{"size": (1, 1, 4, 4), "align_corners": False, **o}),
        "grid_sample_backward": lambda **o: deformcp.grid_sample_backward(a["sampled"], a["x"], a["grid"], **o),
        "affine_sample_backward": lambda **o: deformcp.affine_sample_backward(
            a["sampled"], a["x"], a["theta"], **{"size": (1, 1, 3, 3), **o}),
        "roi_align_backward": lambda **o: deformcp.roi_align_backward(a["pooled"], a["x"], a["boxes"],
                                                                      **{"output_size": 2, **o}),
        "ps_roi_align_backward": lambda **o: deformcp.ps_roi_align_backward(a["ps_pooled"], a["x"], a["boxes"],
                                                                            **{"output_size": 2, **o}),
        "deform_conv2d_backward": lambda **o: deformcp.deform_conv2d_backward(
            a["conv_out"], a["x"], a["conv_offset"], a["weight"], **{**CONV, **o}),
        "deform_roi_pool_backward": lambda **o: deformcp.deform_roi_pool_backward(
            a["pooled"], a["x"], a["boxes"], a["offset"], **{"output_size": 2, **o}),
        "deform_ps_roi_pool_backward": lambda **o: deformcp.deform_ps_roi_pool_backward(
            a["ps_pooled"], a["x"], a["boxes"], a["offset"], **{**DPS, **o}),
        "mimic_loss_backward": lambda **o: deformcp.mimic_loss_backward(np.float32(1.0), a["sampled"][0, 0],
                                                                        a["sampled"][0, 1], **o),
        "ms_deform_attn_backward": lambda **o: deformcp.ms_deform_attn_backward(
            a["attn_out"], a["value"], sampling_locations=a["locations"], attention_weights=a["attention"],
            **{**LEVELS, **o}),
        "flash_deform_attn_backward": lambda **o: deformcp.flash_deform_attn_backward(
            a["attn_out"], a["value"], sampling_loc_attn=a["loc_attn"], **{**LEVELS, "num_points": 2, **o}),
        "dcnv3_backward": lambda **o: deformcp.dcnv3_backward(a["dcn_out"], a["dcn_x"], a["dcn_offset"], a["dcn_mask"],
                                                              **{**DCN, **o}),
        "dcnv4_backward": lambda **o: deformcp.dcnv4_backward(a["dcn_out"], a["dcn_x"], a["dcn_packed"],
                                                              **{**DCN, **o}),
    }


def module_calls():
    """module name → its constructor with keyword overrides."""
    return {
        "RoIAlign": lambda **o: dtorch.RoIAlign(**{"output_size": 2, **o}),
        "PSRoIAlign": lambda **o: dtorch.PSRoIAlign(**{"output_size": 2, **o}),
        "DeformConv2d": lambda **o: dtorch.DeformConv2d(**{"in_channels": 4, "out_channels": 2, "kernel_size": 3,
                                                           **o}),
        "DeformConv2dPack": lambda **o: dtorch.DeformConv2dPack(**{"in_channels": 4, "out_channels": 2,
                                                                   "kernel_size": 3, **o}),
        "DeformRoIPool": lambda **o: dtorch.DeformRoIPool(**{"output_size": 2, "output_channels": 4,
                                                             "deform_fc_channels": 8, **o}),
        "ModulatedDeformRoIPool": lambda **o: dtorch.ModulatedDeformRoIPool(
            **{"output_size": 2, "output_channels": 4, "deform_fc_channels": 8, **o}),
        "SpatialTransformer": lambda **o: dtorch.SpatialTransformer(**{"in_channels": 3, **o}),
        "MSDeformAttn": lambda **o: dtorch.MSDeformAttn(**{"d_model": 8, "n_levels": 2, "n_heads": 2, "n_points": 2,
                                                           **o}),
        "DCNv3": lambda **o: dtorch.DCNv3(**{"channels": 8, "group": 2, **o}),
        "DCNv4": lambda **o: dtorch.DCNv4(**{"channels": 32, "group": 2, **o}),
    }


DOORS = {"numpy": plain_calls(), "torch": forward_calls(dtorch, {k: torch.from_numpy(v) for k, v in A.items()}),
         "torch module": module_calls(), "jax": forward_calls(djax, A)}

# The arguments of each kind, per front door and op.
FLAGS = {
    "numpy": {"affine_grid": ["align_corners"], "affine_grid_backward": ["align_corners"],
              "grid_sample": ["align_corners"], "grid_sample_backward": ["align_corners", "deterministic"],
              "affine_sample": ["align_corners"], "affine_sample_backward": ["align_corners", "deterministic"],
              "roi_align": ["aligned"], "roi_align_backward": ["aligned", "deterministic"],
              "ps_roi_align_backward": ["deterministic"], "deform_conv2d_backward": ["deterministic"],
              "deform_roi_pool_backward": ["deterministic"], "deform_ps_roi_pool": ["no_trans"],
              "deform_ps_roi_pool_backward": ["no_trans", "deterministic"],
              "ms_deform_attn_backward": ["deterministic"], "flash_deform_attn_backward": ["deterministic"],
              "dcnv3": ["remove_center"], "dcnv3_backward": ["remove_center", "deterministic"],
              "dcnv4": ["remove_center", "softmax"], "dcnv4_backward": ["remove_center", "softmax", "deterministic"]},
    "torch": {"affine_grid": ["align_corners"], "grid_sample": ["align_corners"], "affine_sample": ["align_corners"],
              "roi_align": ["aligned"],
              "deform_ps_roi_pool": ["no_trans"], "dcnv3": ["remove_center"], "dcnv4": ["remove_center", "softmax"]},
    "torch module": {"RoIAlign": ["aligned"], "DeformConv2d": ["bias"], "DeformConv2dPack": ["bias"],
                     "SpatialTransformer": ["align_corners"], "DCNv3": ["center_feature_scale", "remove_center"],
                     "DCNv4": ["center_feature_scale", "remove_center", "output_bias", "without_pointwise"]},
    "jax": {"affine_grid": ["align_corners"], "grid_sample": ["align_corners", "deterministic"],
            "affine_sample": ["align_corners", "deterministic"],
            "roi_align": ["aligned", "deterministic"], "ps_roi_align": ["deterministic"],
            "deform_conv2d": ["deterministic"], "deform_roi_pool": ["deterministic"],
            "deform_ps_roi_pool": ["no_trans", "deterministic"], "ms_deform_attn": ["deterministic"],
            "flash_deform_attn": ["deterministic"], "dcnv3": ["remove_center", "deterministic"],
            "dcnv4": ["remove_center", "softmax", "deterministic"]},
}
# ints (positive unless listed in SIGNED) and ints-or-pairs
_ROI_INTS = {"output_size": "pair", "sampling_ratio": "int"}
_CONV_PAIRS = {"stride": "pair", "padding": "pair", "dilation": "pair"}
_DPS_INTS = {name: "int" for name in ("output_dim", "group_size", "pooled_size", "part_size", "sample_per_part")}
_FUNCTION_INTS = {"affine_grid": {"size": "sizes"}, "affine_sample": {"size": "optional sizes"},
                  "roi_align": _ROI_INTS, "ps_roi_align": _ROI_INTS,
                  "deform_conv2d": _CONV_PAIRS, "deform_roi_pool": _ROI_INTS, "deform_ps_roi_pool": _DPS_INTS,
                  "ms_deform_attn": {"spatial_shapes": "level shapes"},
                  "flash_deform_attn": {"spatial_shapes": "level shapes", "num_points": "int"},
                  **{op: {name: "int" for name in DCN if name != "offset_scale"} for op in ("dcnv3", "dcnv4")}}
_DCN_MODULE_INTS = {name: "int" for name in ("channels", "kernel_size", "stride", "pad", "dilation", "group",
                                             "dw_kernel_size")}
INTS = {
    "numpy": {**_FUNCTION_INTS, **{f"{op}_backward": kinds for op, kinds in _FUNCTION_INTS.items()}},
    "torch": _FUNCTION_INTS,
    "torch module": {
        "RoIAlign": _ROI_INTS, "PSRoIAlign": _ROI_INTS,
        "DeformConv2d": {"in_channels": "int", "out_channels": "int", "kernel_size": "pair", **_CONV_PAIRS,
                         "groups": "int", "offset_groups": "int", "deform_groups": "int"},
        "DeformConv2dPack": {"offset_groups": "int", "deform_groups": "int"},
        "DeformRoIPool": {"output_size": "pair", "output_channels": "int", "deform_fc_channels": "int",
                          "sampling_ratio": "int"},
        "ModulatedDeformRoIPool": {"output_size": "pair", "output_channels": "int", "deform_fc_channels": "int"},
        "SpatialTransformer": {"in_channels": "int", "output_size": "pair", "hidden_channels": "int"},
        "MSDeformAttn": {name: "int" for name in ("d_model", "n_levels", "n_heads", "n_points")},
        "DCNv3": _DCN_MODULE_INTS, "DCNv4": _DCN_MODULE_INTS},
    "jax": _FUNCTION_INTS,
}
#: (door, op, argument) where None is allowed (and so not a bad value).
NONE_ALLOWED = {("torch", "affine_grid", "align_corners"), ("torch", "grid_sample", "align_corners"),
                ("torch", "affine_sample", "align_corners"),
                ("torch module", "SpatialTransformer", "align_corners"),
                ("torch module", "SpatialTransformer", "output_size"),
                ("numpy", "deform_ps_roi_pool", "part_size"), ("numpy", "deform_ps_roi_pool_backward", "part_size"),
                ("torch", "deform_ps_roi_pool", "part_size"), ("jax", "deform_ps_roi_pool", "part_size"),
                *(("torch module", module, groups) for module in ("DeformConv2d", "DeformConv2dPack")
                  for groups in ("offset_groups", "deform_groups")),
                ("torch module", "DCNv3", "dw_kernel_size"), ("torch module", "DCNv4", "dw_kernel_size")}




class Bad(NamedTuple):
    argument: str
    value: object
    error: type
    shown: str    # what the message must show of the value that came
    named: str = ""  # the name the message starts with, where not the argument's (an item of it: "name[0]")


def bad_flags(door, op, argument):
    values = ["False", 1, 0, 1.0] + ([] if (door, op, argument) in NONE_ALLOWED else [None])
    return [Bad(argument, v, TypeError, repr(v)) for v in values]


HUGE = [2**31, 2**63, 2**64, -2**63]
#: deform_conv2d's stride, padding and dilation go up to 2**63 - 1 (deform_conv.INDEX_MAX, a 64-bit index).
CONV_HUGE = [2**63, 2**64, -2**63]


def bad_ints(door, op, argument, kind):
    if kind in ("sizes", "optional sizes"):  # the output size (N, C, H, W): H is the bad one (affine_sample's may
        # be None: the input's)
        return ([Bad(argument, (1, 1, v, 4), TypeError, repr(v)) for v in (True, 5.7, "3", None)]
                + [Bad(argument, None, TypeError, "None")] * (kind == "sizes")
                + [Bad(argument, (True, 1, 4, 4), TypeError, "True")]
                + [Bad(argument, (1, 1, v, 4), ValueError, str(v)) for v in HUGE])
    if kind == "level shapes":  # ms_deform_attn's (H_l, W_l) rows: W_0 is the bad one
        return ([Bad(argument, ((4, v), (2, 3)), TypeError, shown, f"{argument}[0]")
                 for v, shown in ((True, "True"), (np.True_, "True"), (5.7, "5.7"), ("3", "'3'"), (None, "None"))]
                + [Bad(argument, None, TypeError, "None")]
                + [Bad(argument, ((4, v), (2, 3)), ValueError, str(v)) for v in HUGE])
    cases = [Bad(argument, v, TypeError, shown) for v, shown in ((True, "True"), (np.True_, "True"), (5.7, "5.7"),
                                                                  ("3", "'3'"))]
    if (door, op, argument) not in NONE_ALLOWED:
        cases.append(Bad(argument, None, TypeError, "None"))
    cases += [Bad(argument, v, ValueError, str(v)) for v in (CONV_HUGE if argument in _CONV_PAIRS else HUGE)]
    if kind == "pair":
        cases += [Bad(argument, (2, True), TypeError, "True"), Bad(argument, (2, 5.7), TypeError, "5.7"),
                  Bad(argument, [2**63, 2], ValueError, str(2**63))]
    return cases


def cases():
    for door, ops in FLAGS.items():
        for op, names in ops.items():
            for name in names:
                for bad in bad_flags(door, op, name):
                    yield pytest.param(door, op, bad, id=f"{door}-{op}-{name}={bad.value!r}")
    for door, ops in INTS.items():
        for op, kinds in ops.items():
            for name, kind in kinds.items():
                for bad in bad_ints(door, op, name, kind):
                    yield pytest.param(door, op, bad, id=f"{door}-{op}-{name}={bad.value!r}")


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("door, op, bad", list(cases()))
def test_bad_flags_and_sizes_are_named_errors(door, op, bad):
    pattern = rf"^{re.escape(bad.named or bad.argument)}: expected .*got .*{re.escape(bad.shown)}"
    with pytest.raises(bad.error, match=pattern):
        DOORS[door][op](**{bad.argument: bad.value})


#: deformcp.ndimage's options (order, mode, cval, prefilter, output_shape) are mutated by tests/test_fuzz.py in the
#: plain functions and checked by the same code in every door; its tests are tests/test_ndimage.py.
NDIMAGE = {"map_coordinates", "affine_transform"}


def test_every_door_and_op_is_covered():
    """The tables above name every function of each front door that has flags or sizes."""
    assert set(FLAGS["jax"]) | set(INTS["jax"]) == set(djax.__all__) - {"mimic_loss"} - NDIMAGE
    assert set(FLAGS["torch"]) | set(INTS["torch"]) == set(djax.__all__) - {"mimic_loss"} - NDIMAGE
    modules = {name for name in dtorch.__all__ if name[0].isupper()} - {"DeformRoIPoolPack",
                                                                        "ModulatedDeformRoIPoolPack",
                                                                        "ModulatedDeformConv2dPack"}
    assert set(FLAGS["torch module"]) | set(INTS["torch module"]) == modules
    plain = {name for name in deformcp.__all__ if name.split("_backward")[0] in djax.__all__} - {"mimic_loss"}
    assert set(FLAGS["numpy"]) | set(INTS["numpy"]) | {"mimic_loss_backward"} == plain


def test_mmcv_positional_roi_align_is_refused():
    """mmcv's RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode, aligned): given positionally to
    deformcp's (torchvision's order, pool_mode last) it used to run average pooling with aligned=True."""
    with pytest.raises(TypeError, match=r"^aligned: expected a bool, got str 'max'"):
        dtorch.RoIAlign(7, 1 / 16, 0, "max")
    with pytest.raises(TypeError, match=r"^aligned: expected a bool, got str 'avg'"):
        dtorch.RoIAlign(7, 1 / 16, 0, "avg", True)


def test_torch_does_not_convert_flags_and_sizes():
    theta = torch.from_numpy(A["theta"])
    with pytest.raises(TypeError, match=r"^align_corners: expected a bool, got str 'False'"):
        dtorch.affine_grid(theta, (1, 1, 4, 4), "False")
    with pytest.raises(TypeError, match=r"^size: expected a sequence of 4 integers, got \(1, 1, 5.7, 4\)"):
        dtorch.affine_grid(theta, (1, 1, 5.7, 4))
    # None means False, as in torch.nn.functional
    torch.testing.assert_close(dtorch.affine_grid(theta, (1, 1, 4, 4), None),
                               torch.from_numpy(deformcp.affine_grid(A["theta"], (1, 1, 4, 4), False)))


def test_numpy_integers_and_bools_are_accepted():
    """NumPy integers are sizes and NumPy bools are flags, in every front door, with the results of Python's."""
    x, boxes = A["x"], A["boxes"]
    expected = deformcp.roi_align(x, boxes, (2, 3), sampling_ratio=2, aligned=True)
    options = dict(output_size=(np.int64(2), np.int32(3)), sampling_ratio=np.int16(2), aligned=np.bool_(True))
    np.testing.assert_array_equal(deformcp.roi_align(x, boxes, **options), expected)
    np.testing.assert_array_equal(dtorch.roi_align(torch.from_numpy(x), torch.from_numpy(boxes), **options).numpy(),
                                  expected)
    np.testing.assert_array_equal(dtorch.RoIAlign(**options)(torch.from_numpy(x), torch.from_numpy(boxes)).numpy(),
                                  expected)
    np.testing.assert_array_equal(np.asarray(djax.roi_align(x, boxes, **options)), expected)
    grid = deformcp.affine_grid(A["theta"], (1, 1, 4, 4))
    np.testing.assert_array_equal(deformcp.affine_grid(A["theta"], np.array([1, 1, 4, 4])), grid)


@pytest.mark.parametrize("door", ["numpy", "torch", "jax"])
def test_an_output_too_big_for_any_array_names_its_size(door):
    """Sizes each within a C int whose product is not (NumPy used to raise an unnamed "array is too big")."""
    side = 2**31 - 1
    with pytest.raises(ValueError, match=r"^output_size: expected an output that fits in memory, got one of shape "
                                         rf"\(1, 4, {side}, {side}\)"):
        DOORS[door]["roi_align"](output_size=side)
    with pytest.raises(ValueError, match=r"^pooled_size: expected an output that fits in memory"):
        DOORS[door]["deform_ps_roi_pool"](pooled_size=side, part_size=None, no_trans=True)


def test_needs_input_grad_of_non_bools_is_a_type_error():
    with pytest.raises(TypeError, match=r"^needs_input_grad: expected 2 bools for \('input', 'grid'\), got \(1, 1\)"):
        DOORS["numpy"]["grid_sample_backward"](needs_input_grad=(1, 1))
    with pytest.raises(ValueError, match=r"^needs_input_grad: expected 2 bools"):
        DOORS["numpy"]["grid_sample_backward"](needs_input_grad=(True,))


def test_module_constructors_check_what_they_store():
    """Errors come from the constructor, not from the first forward; bad channel counts are named."""
    with pytest.raises(ValueError, match=r"^in_channels: expected a multiple of groups = 3, got 4"):
        dtorch.DeformConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match=r"^in_channels: expected a multiple of offset_groups = 3, got 4"):
        dtorch.DeformConv2dPack(4, 6, 3, offset_groups=3)
    with pytest.raises(ValueError, match=r"^pool_mode: expected one of \('avg', 'max'\), got 'sum'"):
        dtorch.RoIAlign(2, pool_mode="sum")
    with pytest.raises(ValueError, match=r"^mode: expected one of"):
        dtorch.SpatialTransformer(3, mode="area")
    with pytest.raises(ValueError, match=r"^gamma: expected a finite number, got nan"):
        dtorch.DeformRoIPool(2, 4, gamma=float("nan"))
