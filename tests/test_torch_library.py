"""deformcp.torch's ops as torch.library ops (deformcp::<op>, deformcp::<op>_backward): opcheck over the spec
table, torch.compile (fullgraph, no graph breaks, outputs and gradients equal eager), torch.export, torch.fx and
torch.func transforms."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformcp.torch as dtorch  # noqa: E402
from deformcp import testing  # noqa: E402
from deformcp.ops import SPECS  # noqa: E402

from conftest import assert_close  # noqa: E402

#: The devices the ops run on: the CPU, and CUDA where torch and CuPy see a GPU (benchmarks/gpu_session.sh runs
#: the tests with "cuda" in their id).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or testing.gpu_available() is not None, reason="CUDA: no GPU for torch and CuPy"))]


def _tensors(spec, case, rng, dtype=torch.float64):
    arrays = case.make(rng)
    return {name: None if name not in arrays else torch.from_numpy(arrays[name]).to(dtype) for name in spec.arrays}


def _op_arguments(spec, tensors, options):
    entry = dtorch._OPS[spec.name]
    return (*tensors.values(), *(dtorch._schema_value(option, kind, options[option]) for option, kind in entry.kinds))


#: Every op with an empty batch (no images, or no RoIs / rows): what opcheck must also handle.
DCN_OPTIONS = {"kernel_h": 3, "kernel_w": 3, "stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1, "dilation_h": 1,
               "dilation_w": 1, "group": 2, "group_channels": 3, "offset_scale": 1.0, "remove_center": False}
EMPTY = {
    "affine_grid": lambda: ({"theta": torch.zeros(0, 2, 3)}, {"size": (0, 1, 3, 4), "align_corners": False}),
    "grid_sample": lambda: ({"input": torch.zeros(0, 2, 3, 4), "grid": torch.zeros(0, 5, 6, 2)},
                            {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}),
    "roi_align": lambda: ({"input": torch.randn(1, 2, 5, 5), "boxes": torch.zeros(0, 5)},
                          {"output_size": 2, "spatial_scale": 1.0, "sampling_ratio": 2, "aligned": True,
                           "pool_mode": "avg"}),
    "ps_roi_align": lambda: ({"input": torch.randn(1, 8, 5, 5), "boxes": torch.zeros(0, 5)},
                             {"output_size": 2, "spatial_scale": 1.0, "sampling_ratio": 2}),
    "deform_roi_pool": lambda: ({"input": torch.randn(1, 2, 5, 5), "rois": torch.zeros(0, 5),
                                 "offset": torch.zeros(0, 2, 2, 2), "mask": None},
                                {"output_size": 2, "spatial_scale": 1.0, "sampling_ratio": 2, "gamma": 0.1}),
    "deform_conv2d": lambda: ({"input": torch.zeros(0, 4, 5, 5), "offset": torch.zeros(0, 18, 5, 5),
                               "weight": torch.randn(2, 4, 3, 3), "bias": torch.randn(2), "mask": None},
                              {"stride": 1, "padding": 1, "dilation": 1}),
    "deform_ps_roi_pool": lambda: ({"input": torch.randn(1, 8, 5, 5), "rois": torch.zeros(0, 5),
                                    "offset": torch.zeros(0, 2, 2, 2)},
                                   {"output_dim": 2, "group_size": 2, "pooled_size": 2, "part_size": 2,
                                    "sample_per_part": 2, "spatial_scale": 1.0, "trans_std": 0.1, "no_trans": False}),
    "mimic_loss": lambda: ({"f_a": torch.zeros(0, 5), "f_b": torch.zeros(0, 5)}, {}),
    "ms_deform_attn": lambda: ({"value": torch.zeros(0, 7, 2, 3), "sampling_locations": torch.zeros(0, 4, 2, 2, 3, 2),
                                "attention_weights": torch.zeros(0, 4, 2, 2, 3)},
                               {"spatial_shapes": [(2, 3), (1, 1)], "level_start_index": [0, 6],
                                "points_per_level": None, "method": "default"}),
    "flash_deform_attn": lambda: ({"value": torch.randn(1, 7, 2, 3), "sampling_loc_attn": torch.zeros(1, 0, 2, 18)},
                                  {"spatial_shapes": [(2, 3), (1, 1)], "level_start_index": None, "num_points": 3}),
    "dcnv3": lambda: ({"input": torch.zeros(0, 4, 5, 6), "offset": torch.zeros(0, 4, 5, 36),
                       "mask": torch.zeros(0, 4, 5, 18)}, DCN_OPTIONS),
    "dcnv4": lambda: ({"input": torch.zeros(0, 4, 5, 6), "offset_mask": torch.zeros(0, 4, 5, 56)},
                      {**DCN_OPTIONS, "softmax": False}),
    "affine_sample": lambda: ({"input": torch.zeros(0, 2, 3, 4), "theta": torch.zeros(0, 2, 3)},
                              {"size": (0, 2, 5, 6), "mode": "bilinear", "padding_mode": "zeros",
                               "align_corners": False}),
    "map_coordinates": lambda: ({"input": torch.randn(4, 5), "coordinates": torch.zeros(2, 0, 3)},
                                {"order": 1, "mode": "reflect", "cval": 0.0, "prefilter": True}),
    "affine_transform": lambda: ({"input": torch.randn(4, 5), "matrix": torch.randn(2, 2), "offset": torch.zeros(2)},
                                 {"output_shape": (0, 3), "order": 1, "mode": "constant", "cval": 0.5,
                                  "prefilter": True}),
}


def test_every_op_is_a_library_op_with_an_empty_case():
    assert set(EMPTY) == set(SPECS)
    for name in SPECS:
        assert hasattr(torch.ops.deformcp, name) and hasattr(torch.ops.deformcp, f"{name}_backward")


def _opcheck(spec, tensors, options):
    for name, t in tensors.items():
        if t is not None and name in spec.differentiable:
            t.requires_grad_()
    result = torch.library.opcheck(getattr(torch.ops.deformcp, spec.name).default,
                                   _op_arguments(spec, tensors, options))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(SPECS))
def test_opcheck(name, dtype, device, rng):
    """Schema, fake kernel, autograd registration and AOT dispatch (dynamic shapes) of each op's last parity
    case (deform_conv2d's: the irregular configuration)."""
    spec = SPECS[name]
    case = spec.cases[-1]
    tensors = {k: None if t is None else t.to(device) for k, t in _tensors(spec, case, rng, dtype).items()}
    _opcheck(spec, tensors, case.options)


@pytest.mark.parametrize("name", list(SPECS))
def test_opcheck_empty_batch(name):
    tensors, options = EMPTY[name]()
    _opcheck(SPECS[name], tensors, options)


# ------------------------------------------------------------------------------------- a model of them all

class Net(torch.nn.Module):
    """ModulatedDeformConv2dPack, a SpatialTransformer, grid_sample, RoIAlign on per-image boxes, ps_roi_align
    and DeformRoIPool, in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = dtorch.ModulatedDeformConv2dPack(3, 8, 3, padding=1)
        torch.nn.init.normal_(self.conv.conv_offset.weight, std=0.1)  # offsets and masks that vary
        self.stn = dtorch.SpatialTransformer(8)
        self.roi = dtorch.RoIAlign(3, 1.0, 2, aligned=True)
        self.pool = dtorch.DeformRoIPool(3, 8, 16, sampling_ratio=2)
        torch.nn.init.normal_(self.pool.offset_fc[-1].weight, std=0.1)

    def forward(self, x, boxes):
        """boxes: a list of per-image (L, 4) tensors, or (K, 5) RoIs."""
        y = torch.relu(self.conv(x))
        y = self.stn(y)
        z = dtorch.grid_sample(y, torch.tanh(y[:, :2].permute(0, 2, 3, 1)))
        pooled = self.roi(z, boxes)
        if isinstance(boxes, list):
            boxes = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        ps = dtorch.ps_roi_align(z.repeat(1, 9, 1, 1), boxes, 3)
        return pooled.square().mean() + ps.mean() + self.pool(z, boxes).mean()


def _inputs(rng, N=2, as_list=True):
    x = torch.from_numpy(rng.standard_normal((N, 3, 12, 12)))
    boxes = [torch.from_numpy(np.array([[1.0, 1.5, 8.0, 9.0], [0.5, 2.0, 6.5, 10.0]][:1 + i % 2])) for i in range(N)]
    if not as_list:  # the same three RoIs, in images 0 and 1, whatever the batch size
        boxes = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes[:2])])
    return x, boxes


def _value_and_grads(model, x, boxes):
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x, boxes)
    out.backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    for got, want in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        assert_close(got.cpu().numpy(), want.cpu().numpy(), "float64")


def test_model_has_no_graph_breaks(rng):
    model = Net().double()
    explanation = torch._dynamo.explain(model)(*_inputs(rng))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_equals_eager(backend, device, rng):
    """fullgraph=True: outputs and gradients (input and every parameter) equal eager, with per-image box lists
    and with (K, 5) RoIs."""
    torch._dynamo.reset()
    model = Net().double().to(device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for as_list in (True, False):
        x, boxes = _inputs(rng, 2, as_list)
        x, boxes = x.to(device), [b.to(device) for b in boxes] if as_list else boxes.to(device)
        _assert_same(_value_and_grads(compiled, x, boxes), _value_and_grads(model, x, boxes))


def test_a_new_batch_size_recompiles_at_most_once(rng):
    """(K, 5) RoIs, batch sizes 2, 3, 4, 5, 2: one compile with static shapes, one with a dynamic batch (the fake
    kernels run deformcp's checks on the symbolic sizes: checks become guards, no size is fixed), then none. A list
    of per-image boxes is as long as the batch, and its length is part of the graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Net().double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for N in (2, 3, 4, 5, 2):
        x, rois = _inputs(rng, N, as_list=False)
        _assert_same(_value_and_grads(compiled, x, rois), _value_and_grads(model, x, rois))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("name", list(SPECS))
def test_every_function_compiles_with_fullgraph(name, rng):
    """Each function alone (its last parity case): compiled with fullgraph, value and gradients equal eager."""
    torch._dynamo.reset()
    spec = SPECS[name]
    fn, primals = _function(spec, spec.cases[-1], rng)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, fn):
        leaves = [p.clone().requires_grad_() for p in primals]
        out = function(*leaves)
        results.append((out.detach(), torch.autograd.grad(out.sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    assert_close(out.numpy(), expected.numpy(), "float64")
    for got, want in zip(grads, expected_grads):
        assert_close(got.numpy(), want.numpy(), "float64")


@pytest.mark.parametrize("option, value, message", [("aligned", 1, "aligned: expected a bool"),
                                                    ("output_size", 2.0, "output_size: expected"),
                                                    ("spatial_scale", "1", "spatial_scale: expected a real")])
def test_a_compiled_call_refuses_a_bad_option_by_name(option, value, message, rng):
    """In a traced call deformcp's option types are checked before the schema could coerce them (1 → True)."""
    torch._dynamo.reset()
    x, boxes = torch.randn(1, 2, 6, 6), torch.tensor([[0.0, 1, 1, 4, 4]])
    options = {"output_size": 2, "aligned": True, option: value}
    compiled = torch.compile(lambda x, b: dtorch.roi_align(x, b, **options), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=message):
        compiled(x, boxes)


def test_a_compiled_call_refuses_a_bool_for_an_optional_int():
    torch._dynamo.reset()
    x, rois, offset = torch.randn(1, 8, 6, 6), torch.tensor([[0.0, 1, 1, 4, 4]]), torch.zeros(1, 2, 2, 2)
    compiled = torch.compile(lambda x, r, o: dtorch.deform_ps_roi_pool(x, r, o, 2, 2, 2, part_size=True),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="part_size: expected an int"):
        compiled(x, rois, offset)


def test_export_runs_and_equals_eager(rng):
    model = Net().double()
    x, boxes = _inputs(rng)
    program = torch.export.export(model, (x, boxes))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"deformcp.deform_conv2d.default", "deformcp.roi_align.default", "deformcp.grid_sample.default",
            "deformcp.ps_roi_align.default", "deformcp.deform_roi_pool.default",
            "deformcp.affine_grid.default"} <= targets
    assert_close(program.module()(x, boxes).detach().numpy(), model(x, boxes).detach().numpy(), "float64")


def test_export_with_a_dynamic_batch(rng):
    """The program exported at batch 3 with a dynamic batch runs at batch 2 and 5, equal to eager."""
    model = Net().double()
    x, rois = _inputs(rng, 3, as_list=False)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (x, rois), dynamic_shapes=({0: batch}, None))
    for N in (2, 5):
        x, rois = _inputs(rng, N, as_list=False)
        assert_close(program.module()(x, rois).detach().numpy(), model(x, rois).detach().numpy(), "float64")


def test_fx_symbolic_trace(rng):
    """torch.fx traces the modules and functions: the deformcp ops are nodes of the graph."""
    model = Net().double()
    x, boxes = _inputs(rng)
    graph_module = torch.fx.symbolic_trace(model, concrete_args={"boxes": boxes})
    assert_close(graph_module(x, boxes).detach().numpy(), model(x, boxes).detach().numpy(), "float64")
    targets = {str(node.target) for node in graph_module.graph.nodes}
    assert any("deform_conv2d" in t for t in targets) and any("roi_align" in t for t in targets)


# ----------------------------------------------------------------------------------------------- torch.func

def _function(spec, case, rng):
    tensors = _tensors(spec, case, rng)
    names = [name for name in spec.differentiable if tensors[name] is not None]

    def fn(*differentiable):
        return getattr(dtorch, spec.name)(**{**tensors, **dict(zip(names, differentiable))}, **case.options)
    return fn, tuple(tensors[name] for name in names)


@pytest.mark.parametrize("name", list(SPECS))
def test_func_vjp_and_grad_equal_autograd(name, rng):
    spec = SPECS[name]
    fn, primals = _function(spec, spec.cases[-1], rng)
    out, vjp = torch.func.vjp(fn, *primals)
    cotangent = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    func_grads = vjp(cotangent)
    leaves = [p.clone().requires_grad_() for p in primals]
    expected = torch.autograd.grad(fn(*leaves), leaves, cotangent)
    for got, want in zip(func_grads, expected):  # detach: the gradients are marked against double backward
        assert_close(got.detach().numpy(), want.numpy(), "float64")
    grads = torch.func.grad(lambda *p: (fn(*p) * cotangent).sum(), argnums=tuple(range(len(primals))))(*primals)
    for got, want in zip(grads, expected):
        assert_close(got.detach().numpy(), want.numpy(), "float64")


@pytest.mark.parametrize("name", list(SPECS))
def test_func_vmap_equals_a_loop(name, rng):
    """vmap over a new leading axis of every differentiable array: each slice's result, stacked."""
    spec = SPECS[name]
    fn, primals = _function(spec, spec.cases[-1], rng)
    batch = [tuple(p * s for p in primals) for s in (1.0, -0.5, 2.0)]
    stacked = [torch.stack(column) for column in zip(*batch)]
    assert_close(torch.func.vmap(fn)(*stacked).numpy(), torch.stack([fn(*b) for b in batch]).numpy(), "float64")


# ------------------------------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("device, low", [("cpu", torch.bfloat16), pytest.param(
    "cuda", torch.float16, marks=DEVICES[1].marks)], ids=["cpu", "cuda"])
@pytest.mark.parametrize("low_first", [False, True], ids=["float32-first", "low-first"])
@pytest.mark.parametrize("name", list(SPECS))
def test_autocast_runs_in_the_first_arrays_dtype(name, low_first, device, low, rng):
    """Under torch.autocast (CPU bfloat16, CUDA float16), the other floating arrays are cast to the first array's
    dtype (the input's), the result has that dtype and equals the call with the arrays cast beforehand, outside
    autocast."""
    spec = SPECS[name]
    case = spec.cases[-1]
    tensors = _tensors(spec, case, rng, torch.float32)
    first = spec.arrays[0]
    first_dtype, other_dtype = (low, torch.float32) if low_first else (torch.float32, low)
    mixed = {k: None if t is None else t.to(device, first_dtype if k == first else other_dtype)
             for k, t in tensors.items()}
    function = getattr(dtorch, name)
    with torch.autocast(device, dtype=low):
        out = function(**mixed, **case.options)
    expected = function(**{k: None if t is None else t.to(first_dtype) for k, t in mixed.items()}, **case.options)
    assert out.dtype == first_dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if sum(t is not None for t in mixed.values()) > 1:  # outside autocast, mixed dtypes stay an error
        with pytest.raises(TypeError, match="one dtype"):
            function(**mixed, **case.options)


def test_autocast_model_trains(rng):
    """The model of every module under CPU bfloat16 autocast: forward and backward run, the parameters' gradients
    are float32 and finite."""
    model = Net()
    x, boxes = _inputs(rng)
    x, boxes = x.float(), [b.float() for b in boxes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, boxes)
    loss.backward()
    for parameter in model.parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32
        assert torch.isfinite(parameter.grad).all()
