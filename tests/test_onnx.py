"""deformcp.onnx: models that use deformcp.torch export (torch.onnx's dynamo exporter) to the standard ONNX operators,
and onnxruntime (CPU) runs them with deformcp.torch's results: GridSample (every mode × padding × align_corners,
opsets 16 and 20), AffineGrid (1-pixel axes too), RoiAlign (aligned or not, sampling ratios, per-image box lists),
DeformConv (v1/v2, groups, offset groups, stride/padding/dilation, the modules); the ops and modes with no ONNX
equivalent raise an error naming them."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformcp  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402
from deformcp.ops import SPECS  # noqa: E402

from conftest import assert_close  # noqa: E402

# torch.onnx's exporter warns about its own use of torch.utils._pytree
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

try:
    import onnx
    import onnxruntime

    import deformcp.onnx as donnx
except ImportError as _error:  # onnx, onnxruntime or onnxscript (the test extra has them)
    ONNX_MISSING = f"ONNX export: {_error} (pip install onnx onnxruntime onnxscript)"
else:
    ONNX_MISSING = None
needs_onnx = pytest.mark.skipif(ONNX_MISSING is not None, reason=str(ONNX_MISSING))


class Call(torch.nn.Module):
    """A model that calls one deformcp.torch function with fixed options."""

    def __init__(self, function, **options):
        super().__init__()
        self.function, self.options = function, options

    def forward(self, *args):
        return self.function(*args, **self.options)


def _tensor(a, dtype=torch.float32):
    return torch.from_numpy(np.asarray(a)).to(dtype)


def _flat(args):
    for a in args:
        yield from (_flat(a) if isinstance(a, (list, tuple)) else (a,))


def _export_and_run(model, args, op_type, tmp_path, opset_version=20, dtype="float32"):
    """Export model (deformcp.onnx.export, to a file), check that the graph holds the standard op_type and only
    standard operators at opset_version, run it with onnxruntime and compare with deformcp.torch's eager output.
    Returns the op_type nodes."""
    model = model.eval()
    path = tmp_path / "model.onnx"
    donnx.export(model, args, path, opset_version=opset_version, verbose=False)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {("", opset_version)}
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "a non-standard operator"
    assert not proto.functions, "a custom function"
    nodes = [n for n in proto.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, [n.op_type for n in proto.graph.node]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _flat(args))}
    assert len(feeds) == len(list(_flat(args)))
    (actual,) = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*args).numpy()
    assert actual.dtype == expected.dtype
    assert_close(actual, expected, dtype)
    return nodes, proto


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("missing, expected", [
    ("onnxscript", ["deformcp.onnx needs onnxscript", "pip install 'deformcp[onnx]'"]),
    ("torch", ["deformcp.onnx needs PyTorch", "pip install 'deformcp[torch,onnx]'",
               "pip install torch --index-url https://download.pytorch.org/whl/cpu, then pip install "
               "'deformcp[onnx]'"]),
])
def test_import_error_names_what_to_install(missing, expected, tmp_path):
    """Without onnxscript or torch, import deformcp.onnx raises an ImportError that says what to install (for torch,
    also its CPU build: a bare pip install torch brings several GB of CUDA libraries on Linux)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{missing!r}] = None
        try:
            import deformcp.onnx
        except ImportError as error:
            print(error)
        else:
            raise AssertionError("import deformcp.onnx worked without {missing}")
    """)
    env = {"PYTHONPATH": str(Path(deformcp.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, (text, result.stdout)


@needs_onnx
def test_every_op_is_translated_or_refused():
    """Every deformcp op has an entry in TRANSLATIONS: a mapping (MIN_OPSET) or a refusal (UNSUPPORTED)."""
    assert set(donnx.MIN_OPSET) | set(donnx.UNSUPPORTED) == set(SPECS)
    assert not set(donnx.MIN_OPSET) & set(donnx.UNSUPPORTED)
    assert set(donnx.TRANSLATIONS) == {getattr(torch.ops.deformcp, name).default for name in SPECS}


# -------------------------------------------------------------------------------------------------- GridSample

@needs_onnx
@pytest.mark.parametrize("opset_version", [16, 20])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample(rng, tmp_path, mode, padding_mode, align_corners, opset_version):
    x = _tensor(rng.standard_normal((2, 3, 7, 9)))
    grid = _tensor(rng.uniform(-1.4, 1.4, (2, 5, 6, 2)))  # past the borders: every padding mode matters
    model = Call(dtorch.grid_sample, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    (node,), _ = _export_and_run(model, (x, grid), "GridSample", tmp_path, opset_version)
    onnx_mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode) if opset_version >= 20 else mode
    assert _attributes(node) == {"mode": onnx_mode.encode(), "padding_mode": padding_mode.encode(),
                                 "align_corners": int(align_corners)}


@needs_onnx
@pytest.mark.parametrize("volume", [False, True])
def test_affine_sample(rng, tmp_path, volume):
    """affine_sample exports as AffineGrid then GridSample (opset 20), equal to eager; refused below opset 20."""
    if volume:
        theta, x, size = torch.eye(3, 4) + 0.3 * _tensor(rng.standard_normal((2, 3, 4))), (
            _tensor(rng.standard_normal((2, 3, 4, 5, 6)))), (2, 3, 3, 4, 5)
    else:
        theta, x, size = torch.eye(2, 3) + 0.3 * _tensor(rng.standard_normal((2, 2, 3))), (
            _tensor(rng.standard_normal((2, 3, 7, 9)))), None
    model = Call(dtorch.affine_sample, size=size, mode="bilinear", padding_mode="reflection")
    _export_and_run(model, (x, theta), "GridSample", tmp_path, 20)
    with pytest.raises(donnx.UnsupportedExportError, match="affine_sample exports as ONNX AffineGrid and GridSample"):
        donnx.export(model, (x, theta), str(tmp_path / "v16.onnx"), opset_version=16)


@needs_onnx
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_volumes(rng, tmp_path, mode, align_corners):
    """A 3-D spatial transformer (AffineGrid and GridSample of a volume) at opset 20; refused at opset 16."""
    theta, x = _tensor(rng.standard_normal((2, 3, 4))), _tensor(rng.standard_normal((2, 3, 4, 5, 6)))
    size = (2, 3, 3, 1, 5) if align_corners else (2, 3, 3, 4, 5)  # a 1-pixel axis: the align_corners rule

    class Transformer(torch.nn.Module):
        def forward(self, theta, x):
            return dtorch.grid_sample(x, dtorch.affine_grid(theta, size, align_corners), mode, "border",
                                      align_corners)

    _export_and_run(Transformer(), (theta, x), "GridSample", tmp_path, 20)
    grid = _tensor(rng.uniform(-1.2, 1.2, (2, 3, 4, 5, 3)))
    with pytest.raises(donnx.UnsupportedExportError, match="volume .*from opset 20"):
        donnx.export(Call(dtorch.grid_sample, mode=mode), (x, grid), str(tmp_path / "v16.onnx"), opset_version=16)
    with pytest.raises(donnx.UnsupportedExportError, match="volume with mode 'bicubic'"):
        donnx.export(Call(dtorch.grid_sample, mode="bicubic"), (x, grid), str(tmp_path / "cubic.onnx"))


@needs_onnx
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_nearest_rounds_half_to_even(tmp_path, align_corners):
    """Samples exactly halfway between pixels: onnxruntime rounds half to even, as deformcp (and torch)."""
    H, W = (3, 5) if align_corners else (4, 8)  # normalised coordinates of the half pixels exact in float32
    half = np.arange(W - 1) + 0.5, np.arange(H - 1) + 0.5  # x, y pixel coordinates k + 0.5
    if align_corners:
        gx, gy = (2 * c / (n - 1) - 1 for c, n in zip(half, (W, H)))
    else:
        gx, gy = ((2 * c + 1) / n - 1 for c, n in zip(half, (W, H)))
    grid = np.stack(np.meshgrid(gx, gy), axis=-1)[None]
    x = _tensor(np.arange(H * W).reshape(1, 1, H, W))
    model = Call(dtorch.grid_sample, mode="nearest", align_corners=align_corners)
    _export_and_run(model, (x, _tensor(grid)), "GridSample", tmp_path)
    ix, iy = np.rint(half[0]), np.rint(half[1])  # half to even: 0.5 → 0, 1.5 → 2, 2.5 → 2
    expected = (iy[:, None] * W + ix[None, :])[None, None]
    np.testing.assert_array_equal(model(x, _tensor(grid)).numpy(), expected)
    assert not np.array_equal(np.floor(half[0] + 0.5), ix), "the test cannot tell half-to-even from half-up"


# -------------------------------------------------------------------------------------------------- AffineGrid

@needs_onnx
@pytest.mark.parametrize("size", [(2, 3, 5, 7), (2, 3, 1, 4), (2, 3, 4, 1), (2, 3, 1, 1)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid(rng, tmp_path, size, align_corners):
    theta = _tensor(rng.standard_normal((2, 2, 3)))
    model = Call(dtorch.affine_grid, size=size, align_corners=align_corners)
    (node,), proto = _export_and_run(model, (theta,), "AffineGrid", tmp_path)
    assert _attributes(node) == {"align_corners": int(align_corners)}
    if align_corners and 1 in size[2:]:
        # runtimes disagree on a 1-pixel axis's base coordinate under align_corners=1 (onnxruntime +1, ONNX's
        # reference −1, torch 0); the exported graph does not depend on it: ONNX's reference gives torch's grid too
        from onnx.reference import ReferenceEvaluator

        with np.errstate(divide="ignore"):  # the reference divides by size − 1 = 0
            (actual,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: theta.numpy()})
        assert_close(actual, model(theta).numpy(), "float32")


# ---------------------------------------------------------------------------------------------------- RoiAlign

def _boxes(rng, N, K, H, W, scale=1.0):
    """K boxes [batch_index, x1, y1, x2, y2] in image coordinates (feature map × 1 / scale): some partly outside
    the image, some smaller than a pixel (the 1×1 clamp without aligned)."""
    x1, y1 = rng.uniform(-2, W - 1, K), rng.uniform(-2, H - 1, K)
    w, h = rng.uniform(0.2, W, K), rng.uniform(0.2, H, K)
    w[0] = h[0] = 0.4
    boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1) / scale
    return np.concatenate([rng.integers(0, N, (K, 1)), boxes], axis=1)


@needs_onnx
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align(rng, tmp_path, aligned, sampling_ratio):
    N, H, W, scale = 2, 9, 11, 0.5
    x = _tensor(rng.standard_normal((N, 3, H, W)))
    boxes = _tensor(_boxes(rng, N, 6, H, W, scale))
    model = Call(dtorch.roi_align, output_size=(3, 2), spatial_scale=scale, sampling_ratio=sampling_ratio,
                 aligned=aligned)
    (node,), _ = _export_and_run(model, (x, boxes), "RoiAlign", tmp_path)
    attributes = _attributes(node)
    assert attributes["coordinate_transformation_mode"] == (b"half_pixel" if aligned else b"output_half_pixel")
    assert attributes["mode"] == b"avg" and attributes["sampling_ratio"] == max(sampling_ratio, 0)
    assert (attributes["output_height"], attributes["output_width"]) == (3, 2)
    assert attributes["spatial_scale"] == scale


@needs_onnx
def test_roi_align_module_with_per_image_boxes(rng, tmp_path):
    """RoIAlign with a list of per-image (L, 4) boxes (torchvision's form): one model input per image."""
    x = _tensor(rng.standard_normal((2, 4, 10, 12)))
    boxes = [_tensor(_boxes(rng, 1, L, 10, 12)[:, 1:]) for L in (3, 2)]
    model = dtorch.RoIAlign(4, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    _export_and_run(model, (x, boxes), "RoiAlign", tmp_path)


@needs_onnx
def test_roi_align_max_is_refused(rng):
    x = _tensor(rng.standard_normal((1, 2, 6, 6)))
    boxes = _tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    model = Call(dtorch.roi_align, output_size=2, sampling_ratio=2, pool_mode="max").eval()
    with pytest.raises(donnx.UnsupportedExportError, match=r"deformcp\.roi_align with pool_mode='max'"):
        donnx.export(model, (x, boxes), verbose=False)


@needs_onnx
def test_onnxruntime_roi_align_max_is_not_mmcvs(rng):
    """Why max is refused: onnxruntime's RoiAlign max of one sample is its largest bilinear-weighted corner w·v,
    where mmcv's (deformcp's) is the interpolated value Σ w·v. (Should this fail, onnxruntime changed: the
    mapping of pool_mode='max' could be reconsidered.)"""
    helper = onnx.helper
    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="max", output_height=1,
                            output_width=1, sampling_ratio=1, coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "roi_align_max", [
        helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 1, 4, 4]),
        helper.make_tensor_value_info("rois", onnx.TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("batch_indices", onnx.TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)  # opset 16's IR
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its own warning that max mode is wrong
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.uniform(1, 2, (1, 1, 4, 4)).astype(np.float32)
    box = np.array([[0.8, 0.8, 2.4, 2.6]], np.float32)  # one sample, at (y, x) = (1.2, 1.1) after the shift
    (ort_max,) = session.run(None, {"X": x, "rois": box, "batch_indices": np.zeros(1, np.int64)})
    ly, lx = 0.2, 0.1
    weights = np.array([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx])
    corners = x[0, 0, 1:3, 1:3].ravel()
    mmcv = dtorch.roi_align(_tensor(x), _tensor([[0, *box[0]]]), 1, 1.0, 1, True, "max").numpy()
    np.testing.assert_allclose(mmcv.ravel(), [weights @ corners], rtol=1e-6)
    np.testing.assert_allclose(ort_max.ravel(), [np.max(weights * corners)], rtol=1e-6)


# -------------------------------------------------------------------------------------------------- DeformConv

class DeformConv(torch.nn.Module):
    """deform_conv2d(x, offset, weight, [bias], [mask]): the absent ones are not model inputs."""

    def __init__(self, stride, padding, dilation, with_bias, with_mask):
        super().__init__()
        self.options = dict(stride=stride, padding=padding, dilation=dilation)
        self.with_bias, self.with_mask = with_bias, with_mask

    def forward(self, x, offset, weight, *rest):
        rest = list(rest)
        bias = rest.pop(0) if self.with_bias else None
        mask = rest.pop(0) if self.with_mask else None
        return dtorch.deform_conv2d(x, offset, weight, bias, mask=mask, **self.options)


def _pair(v):
    return (v, v) if isinstance(v, int) else v


#: (C_in, C_out, groups, offset groups, kernel, stride, padding, dilation, mask, bias)
DEFORM_CONV_CASES = {
    "v1": (4, 6, 1, 1, (3, 3), 1, 1, 1, False, True),
    "v2": (4, 6, 1, 1, (3, 3), 1, 1, 1, True, True),
    "v2-groups-offset_groups-strided-dilated": (4, 6, 2, 2, (3, 2), (2, 1), (1, 2), (2, 1), True, False),
    "v1-offset_groups-no_bias": (8, 4, 2, 4, (2, 3), 2, 0, 1, False, False),
    "v2-3-groups-padded": (6, 3, 3, 3, (3, 3), (1, 2), 2, (1, 2), True, True),
    "1x1": (3, 5, 1, 3, (1, 1), 1, 0, 1, True, True),
}


@needs_onnx
@pytest.mark.parametrize("case, dtype", [(case, "float32") for case in DEFORM_CONV_CASES]
                         + [("v2", "float64"), ("v2-groups-offset_groups-strided-dilated", "float64")])
def test_deform_conv2d(rng, tmp_path, case, dtype):
    C_in, C_out, groups, G, (kh, kw), stride, padding, dilation, with_mask, with_bias = DEFORM_CONV_CASES[case]
    H, W = 9, 8
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    t = {"float32": torch.float32, "float64": torch.float64}[dtype]
    args = (_tensor(rng.standard_normal((2, C_in, H, W)), t),
            _tensor(2 * rng.standard_normal((2, 2 * G * kh * kw, Ho, Wo)), t),  # samples leave the image too
            _tensor(rng.standard_normal((C_out, C_in // groups, kh, kw)), t),
            _tensor(rng.standard_normal(C_out), t) if with_bias else None,
            _tensor(rng.uniform(0, 1, (2, G * kh * kw, Ho, Wo)), t) if with_mask else None)
    model = DeformConv(stride, padding, dilation, with_bias, with_mask)
    (node,), _ = _export_and_run(model, tuple(a for a in args if a is not None), "DeformConv", tmp_path, dtype=dtype)
    # X, W, offset, then B ("" when absent but mask follows) and mask
    present = [True, True, True] + ([with_bias] if with_bias or with_mask else []) + ([True] if with_mask else [])
    assert [bool(name) for name in node.input] == present
    assert _attributes(node) == {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [ph, pw, ph, pw],
                                 "dilations": [dh, dw], "group": groups, "offset_group": G}


@needs_onnx
@pytest.mark.parametrize("module", [dtorch.DeformConv2dPack, dtorch.ModulatedDeformConv2dPack])
def test_deform_conv2d_modules(tmp_path, module):
    torch.manual_seed(0)
    layer = module(4, 6, 3, stride=1, padding=2, dilation=2, groups=2, offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.5)  # not the zero init: real offsets and masks
    torch.nn.init.normal_(layer.conv_offset.bias, std=0.5)
    x = torch.randn(2, 4, 8, 7)
    _export_and_run(layer, (x,), "DeformConv", tmp_path)


# ------------------------------------------------------------------------------------------------------ opsets

class EveryOp(torch.nn.Module):
    """Each mapped op whose ONNX operator the opset has, on its own inputs; one output per op."""

    def __init__(self, opset_version):
        super().__init__()
        self.opset_version = opset_version

    def forward(self, x, grid, boxes, theta, offset, weight):
        outputs = [dtorch.grid_sample(x, grid, "bilinear", "reflection"),
                   dtorch.roi_align(x, boxes, (2, 3), 0.5, 0, True)]
        if self.opset_version >= 19:
            outputs.append(dtorch.deform_conv2d(x, offset, weight, padding=1, dilation=(1, 2)))
        if self.opset_version >= 20:
            outputs.append(dtorch.affine_grid(theta, (2, 3, 4, 5), True))
        return tuple(outputs)


@needs_onnx
@pytest.mark.parametrize("opset_version", [16, 17, 18, 19, 21, 22, 23])
def test_opsets(rng, tmp_path, opset_version):
    """Every opset from 16 (below 18 torch.onnx builds at 18 and converts down) to 23: the nodes and the values.
    onnxruntime (1.30, 1.32) has no CPU kernel for RoiAlign-22: there the model runs in ONNX's reference
    implementation instead."""
    args = (_tensor(rng.standard_normal((2, 3, 6, 7))), _tensor(rng.uniform(-1.2, 1.2, (2, 4, 5, 2))),
            _tensor(_boxes(rng, 2, 4, 6, 7, 0.5)), _tensor(rng.standard_normal((2, 2, 3))),
            _tensor(rng.standard_normal((2, 18, 6, 5))), _tensor(rng.standard_normal((4, 3, 3, 3))))
    model = EveryOp(opset_version).eval()
    program = donnx.export(model, args, opset_version=opset_version, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain == ""] == [("", opset_version)]
    expected_ops = {"GridSample", "RoiAlign"} | ({"DeformConv"} if opset_version >= 19 else set()) | (
        {"AffineGrid"} if opset_version >= 20 else set())
    assert expected_ops <= {n.op_type for n in proto.graph.node}
    feeds = {i.name: a.numpy() for i, a in zip(proto.graph.input, args) if i.name}
    try:
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:
        if opset_version < 22 or "RoiAlign(22)" not in str(error):
            raise
        from onnx.reference import ReferenceEvaluator

        actual = ReferenceEvaluator(proto).run(None, feeds)
    else:
        actual = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*args)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e.numpy(), "float32")


# ------------------------------------------------------------------------------- unsupported ops, opsets, API

def _unsupported_cases():
    x, rois = torch.randn(1, 8, 6, 6), torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    levels = [(2, 3), (1, 1)]  # (H_l, W_l): value has 7 rows
    dcn = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1, group=2,
               group_channels=2, offset_scale=1.0)
    return {
        "ps_roi_align": (Call(dtorch.ps_roi_align, output_size=2), (x, rois)),
        "deform_roi_pool": (Call(dtorch.deform_roi_pool, output_size=2), (x, rois, torch.zeros(1, 2, 2, 2))),
        "deform_ps_roi_pool": (Call(dtorch.deform_ps_roi_pool, output_dim=2, group_size=2, pooled_size=2),
                               (x, rois, torch.zeros(1, 2, 2, 2))),
        "mimic_loss": (Call(dtorch.mimic_loss), (torch.randn(3, 4), torch.randn(3, 4))),
        "ms_deform_attn": (Call(lambda v, loc, w: dtorch.ms_deform_attn(v, levels, [0, 6], loc, w)),
                           (torch.randn(1, 7, 2, 3), torch.rand(1, 4, 2, 2, 2, 2), torch.rand(1, 4, 2, 2, 2))),
        "flash_deform_attn": (Call(lambda v, packed: dtorch.flash_deform_attn(v, levels, None, packed, 2)),
                              (torch.randn(1, 7, 2, 3), torch.rand(1, 4, 2, 12))),
        "dcnv3": (Call(dtorch.dcnv3, **dcn),
                  (torch.randn(1, 4, 5, 4), torch.zeros(1, 4, 5, 36), torch.rand(1, 4, 5, 18))),
        "dcnv4": (Call(dtorch.dcnv4, **dcn), (torch.randn(1, 4, 5, 4), torch.rand(1, 4, 5, 56))),
        "map_coordinates": (Call(dtorch.map_coordinates), (torch.randn(5, 6), 4 * torch.rand(2, 3, 4))),
        "affine_transform": (Call(dtorch.affine_transform), (torch.randn(5, 6), torch.eye(2), torch.zeros(2))),
    }


@needs_onnx
def test_every_unsupported_op_has_a_case():
    assert set(_unsupported_cases()) == set(donnx.UNSUPPORTED)


@needs_onnx
@pytest.mark.parametrize("name", sorted(donnx.UNSUPPORTED) if ONNX_MISSING is None else [])
def test_unsupported_op_raises_naming_it(name):
    model, args = _unsupported_cases()[name]
    with pytest.raises(donnx.UnsupportedExportError, match=rf"deformcp\.{name} cannot be exported to ONNX"):
        donnx.export(model.eval(), args, verbose=False)


@needs_onnx
def test_unsupported_op_through_torch_onnx_export():
    """Through torch.onnx.export with the table, the exporter's error carries the message."""
    model, args = _unsupported_cases()["ps_roi_align"]
    with pytest.raises(Exception, match=r"deformcp\.ps_roi_align cannot be exported to ONNX"):
        torch.onnx.export(model.eval(), args, dynamo=True, verbose=False,
                          custom_translation_table=donnx.TRANSLATIONS)


@needs_onnx
@pytest.mark.parametrize("name, opset_version, operator", [("deform_conv2d", 18, "DeformConv"),
                                                           ("affine_grid", 19, "AffineGrid"),
                                                           ("deform_conv2d", 17, "DeformConv")])
def test_opset_without_the_operator(name, opset_version, operator):
    if name == "deform_conv2d":
        model, args = Call(dtorch.deform_conv2d), (torch.randn(1, 2, 5, 5), torch.randn(1, 18, 3, 3),
                                                   torch.randn(2, 2, 3, 3))
    else:
        model, args = Call(dtorch.affine_grid, size=(1, 1, 3, 4)), (torch.randn(1, 2, 3),)
    least = donnx.MIN_OPSET[name][1]
    with pytest.raises(donnx.UnsupportedExportError, match=rf"deformcp\.{name} exports as ONNX {operator}, which "
                                                          rf"needs opset_version >= {least}"):
        donnx.export(model.eval(), args, opset_version=opset_version, verbose=False)


@needs_onnx
def test_export_arguments():
    model, args = Call(dtorch.grid_sample), (torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="opset_version: expected an int >= 16"):
        donnx.export(model, args, opset_version=15)
    with pytest.raises(ValueError, match="only the dynamo exporter"):
        donnx.export(model, args, dynamo=False)


@needs_onnx
def test_torch_onnx_export_with_the_table(rng, tmp_path):
    """The documented second way: torch.onnx.export(dynamo=True, custom_translation_table=TRANSLATIONS), on a
    model that combines the ops (SpatialTransformer: AffineGrid then GridSample, then a DCNv2 layer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(dtorch.SpatialTransformer(3, align_corners=True),
                                dtorch.ModulatedDeformConv2dPack(3, 4, 3, padding=1)).eval()
    torch.nn.init.normal_(model[0].fc_loc.weight, std=0.1)
    torch.nn.init.normal_(model[1].conv_offset.weight, std=0.5)
    x = _tensor(rng.standard_normal((2, 3, 8, 10)))
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, opset_version=20, verbose=False,
                      custom_translation_table=donnx.TRANSLATIONS)
    proto = onnx.load(path)
    assert {"AffineGrid", "GridSample", "DeformConv"} <= {n.op_type for n in proto.graph.node}
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(actual, model(x).numpy(), "float32")


@needs_onnx
@pytest.mark.parametrize("name", ["grid_sample", "roi_align", "deform_conv2d"])
def test_a_dynamic_batch_exports(name, rng, tmp_path):
    """Exported at batch 2 with a dynamic batch, the model runs at batch 5 in onnxruntime, equal to eager."""
    def arrays(N):
        x = _tensor(rng.standard_normal((N, 4, 9, 8)))
        if name == "grid_sample":
            return (x, _tensor(rng.uniform(-1.1, 1.1, (N, 5, 6, 2)))), ({0: batch}, {0: batch})
        if name == "roi_align":
            return (x, _tensor([[0, 1.0, 1.5, 6.0, 7.0], [N - 1, 0.5, 0.0, 7.5, 8.5]])), ({0: batch}, None)
        offset = _tensor(rng.standard_normal((N, 18, 9, 8)))
        return (x, offset, _tensor(rng.standard_normal((3, 4, 3, 3)))), ({0: batch}, {0: batch}, None)

    batch = torch.export.Dim("batch", min=2, max=64)
    options = {"grid_sample": {}, "roi_align": {"output_size": 3, "sampling_ratio": 2, "aligned": True},
               "deform_conv2d": {"padding": 1}}[name]
    model = Call(getattr(dtorch, name), **options).eval()
    args, dynamic = arrays(2)
    donnx.export(model, args, tmp_path / "model.onnx", dynamic_shapes=(dynamic,))  # forward(*args)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    args, _ = arrays(5)
    (actual,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})
    with torch.no_grad():
        assert_close(actual, model(*args).numpy(), "float32")
