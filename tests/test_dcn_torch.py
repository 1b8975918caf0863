"""deformcp.torch's DCNv3 and DCNv4 modules: InternImage's ``DCNv3`` (classification/ops_dcnv3/modules/dcnv3.py) and
DCNv4's ``DCNv4`` (DCNv4_op/DCNv4/modules/dcnv4.py), their state_dict keys and shapes (written out below as those
modules build them), initialisation and round trip; the forward and every gradient against an independent
computation in plain torch from the module's own parameters (the projections, the depth-wise convolution, the
softmax, and a per-tap bilinear gather written here from deformcp.ops.dcn's formula), in float64, eager and
compiled; gradient flow at initialisation; bad constructor arguments named. The ops themselves (dcnv3 / dcnv4
tap by tap, every backend) are tested in test_dcn.py, their torch functions generically in test_torch.py."""
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import deformcp.torch as dtorch  # noqa: E402

#: float64 sums in another order: a few ulps apart.
TIGHT = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ reference

def taps(kernel_size, remove_center):
    """(i, j) of each tap p = i·k + j: i over the kernel's width (outer), j over its height, the centre left out
    with remove_center."""
    centre = kernel_size // 2
    return [(i, j) for i in range(kernel_size) for j in range(kernel_size)
            if not (remove_center and i == centre and j == centre)]


def bilinear(value, x, y):
    """value (N, H, W, G, Cg) sampled at pixel (x, y) (N, Ho, Wo, G, P) → (N, Ho, Wo, G, P, Cg): the four
    neighbours' weights, a neighbour outside the image reading 0, and 0 outside the open (−1, H) × (−1, W)."""
    N, H, W, G, Cg = value.shape
    rows = value.reshape(N, H * W, G, Cg)
    x0, y0 = torch.floor(x), torch.floor(y)
    inside = (x > -1) & (x < W) & (y > -1) & (y < H)
    n = torch.arange(N).view(N, 1, 1, 1, 1).expand(x.shape)
    g = torch.arange(G).view(1, 1, 1, G, 1).expand(x.shape)
    out = 0
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            valid = inside & (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long()
            gathered = rows[n, index, g]  # (N, Ho, Wo, G, P, Cg)
            out = out + gathered * torch.where(valid, weight, torch.zeros_like(weight))[..., None]
    return out


def dcn_reference(value, offsets, mask, kernel_size, pad, dilation, offset_scale, remove_center):
    """value (N, H, W, G, Cg), offsets (N, H, W, G, P, 2) as (Δx, Δy), mask (N, H, W, G, P) → (N, H, W, G·Cg), stride
    1: tap (i, j) of the output pixel (h, w) samples x = (c − pad + w − c·scale) + (i·d + Δx)·scale, c = (d·(k −
    1)) >> 1, y likewise with h and j (deformcp.ops.dcn's formula)."""
    N, H, W, G, Cg = value.shape
    c = (dilation * (kernel_size - 1)) >> 1
    ij = torch.tensor(taps(kernel_size, remove_center), dtype=value.dtype)  # (P, 2)
    start_x = (c - pad + torch.arange(W, dtype=value.dtype) - c * offset_scale).view(1, 1, W, 1, 1)
    start_y = (c - pad + torch.arange(H, dtype=value.dtype) - c * offset_scale).view(1, H, 1, 1, 1)
    x = start_x + (ij[:, 0] * dilation + offsets[..., 0]) * offset_scale
    y = start_y + (ij[:, 1] * dilation + offsets[..., 1]) * offset_scale
    sampled = bilinear(value, x, y)
    return (sampled * mask[..., None]).sum(4).reshape(N, H, W, G * Cg)


def blend(x, x_proj, query, parameters, group_channels):
    scale = torch.sigmoid(F.linear(query, parameters["center_feature_scale_proj_weight"],
                                   parameters["center_feature_scale_proj_bias"]))
    scale = scale.repeat_interleave(group_channels, -1)
    return x * (1 - scale) + x_proj * scale


def reference_dcnv3(module, input):
    """InternImage's DCNv3 forward in plain torch, from the module's parameters by their state_dict names."""
    p = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    N, H, W, C = input.shape
    G, Cg, k = module.group, module.group_channels, module.kernel_size
    P = k * k - module.remove_center
    x = F.linear(input, p["input_proj.weight"], p["input_proj.bias"])
    dw = p["dw_conv.0.weight"].shape[-1]
    features = F.conv2d(input.permute(0, 3, 1, 2), p["dw_conv.0.weight"], p["dw_conv.0.bias"],
                        padding=(dw - 1) // 2, groups=C)
    if module.norm_layer == "LN":
        features = F.layer_norm(features.permute(0, 2, 3, 1), (C,), p["dw_conv.1.1.weight"], p["dw_conv.1.1.bias"],
                                eps=1e-6)
    else:  # eval mode: the running statistics
        features = F.batch_norm(features, buffers["dw_conv.1.0.running_mean"], buffers["dw_conv.1.0.running_var"],
                                p["dw_conv.1.0.weight"], p["dw_conv.1.0.bias"], training=False,
                                eps=1e-5).permute(0, 2, 3, 1)
    features = {"GELU": F.gelu, "ReLU": F.relu, "SiLU": F.silu}[module.act_layer](features)
    offsets = F.linear(features, p["offset.weight"], p["offset.bias"]).reshape(N, H, W, G, P, 2)
    mask = torch.softmax(F.linear(features, p["mask.weight"], p["mask.bias"]).reshape(N, H, W, G, P), -1)
    out = dcn_reference(x.reshape(N, H, W, G, Cg), offsets, mask, k, module.pad, module.dilation,
                        module.offset_scale, module.remove_center)
    if module.center_feature_scale:
        out = blend(out, x, features, p, Cg)
    return F.linear(out, p["output_proj.weight"], p["output_proj.bias"])


def reference_dcnv4(module, input, shape):
    """DCNv4's forward in plain torch, from the module's parameters by their state_dict names: offset_mask's
    per-group blocks [2P offsets, P modulation scalars] used unbounded, its padding unread."""
    p = dict(module.named_parameters())
    N, L, C = input.shape
    H, W = shape
    G, Cg, k = module.group, module.group_channels, module.kernel_size
    P = k * k - module.remove_center
    pointwise = not module.without_pointwise
    x = F.linear(input, p["value_proj.weight"], p["value_proj.bias"]) if pointwise else input
    x = x.reshape(N, H, W, C)
    features = input.reshape(N, H, W, C)
    if module.dw_kernel_size is not None:
        dw = module.dw_kernel_size
        features = F.conv2d(features.permute(0, 3, 1, 2), p["offset_mask_dw.weight"], p["offset_mask_dw.bias"],
                            padding=(dw - 1) // 2, groups=C).permute(0, 2, 3, 1)
    offset_mask = F.linear(features, p["offset_mask.weight"], p["offset_mask.bias"])
    assert offset_mask.shape[-1] == math.ceil(3 * G * P / 8) * 8
    blocks = offset_mask[..., :3 * G * P].reshape(N, H, W, G, 3 * P)
    offsets, mask = blocks[..., :2 * P].reshape(N, H, W, G, P, 2), blocks[..., 2 * P:]
    out = dcn_reference(x.reshape(N, H, W, G, Cg), offsets, mask, k, module.pad, module.dilation,
                        module.offset_scale, module.remove_center)
    if module.center_feature_scale:
        out = blend(out, x, out, p, Cg)
    out = out.reshape(N, L, C)
    return F.linear(out, p["output_proj.weight"], p.get("output_proj.bias")) if pointwise else out


# -------------------------------------------------------------------------------------------------- helpers

def randomise(module, rng, scale=0.3):
    """module in float64 with random parameters (offsets of a few pixels: taps inside, across and outside the
    borders; uneven modulation) and, for BatchNorm, random running statistics."""
    module = module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.from_numpy(rng.standard_normal(tuple(parameter.shape)) * scale))
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.from_numpy(rng.standard_normal(tuple(buffer.shape)) * 0.1))
            elif name.endswith("running_var"):
                buffer.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, tuple(buffer.shape))))
    return module


def value_and_grads(call, module, input):
    """call(module, input)'s output, and the gradients of a fixed linear functional of it with respect to the input
    and every parameter (in named_parameters order)."""
    input = input.clone().requires_grad_()
    out = call(module, input)
    weights = torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape))
    names, parameters = zip(*module.named_parameters())
    grads = torch.autograd.grad((out * weights).sum(), (input, *parameters))
    return out.detach(), dict(zip(("input", *names), grads))


def assert_same(got, want, **tolerance):
    (out, grads), (expected, expected_grads) = got, want
    torch.testing.assert_close(out, expected, **tolerance)
    assert list(grads) == list(expected_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], **tolerance,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def shapes(module):
    return [(name, tuple(t.shape)) for name, t in module.state_dict().items()]


def v3_input(rng, N=2, H=5, W=6, C=8):
    return torch.from_numpy(rng.standard_normal((N, H, W, C)))


def v4_input(rng, N=2, H=5, W=6, C=8):
    return torch.from_numpy(rng.standard_normal((N, H * W, C)))


# ---------------------------------------------------------------------------------------- state_dict keys

#: InternImage's DCNv3(): channels 64, kernel 3 (dw_kernel_size None: 3), group 4, P = 9, LN, GELU.
DCNV3_KEYS = [
    ("dw_conv.0.weight", (64, 1, 3, 3)), ("dw_conv.0.bias", (64,)),
    ("dw_conv.1.1.weight", (64,)), ("dw_conv.1.1.bias", (64,)),
    ("offset.weight", (4 * 9 * 2, 64)), ("offset.bias", (4 * 9 * 2,)),
    ("mask.weight", (4 * 9, 64)), ("mask.bias", (4 * 9,)),
    ("input_proj.weight", (64, 64)), ("input_proj.bias", (64,)),
    ("output_proj.weight", (64, 64)), ("output_proj.bias", (64,)),
]

#: DCNv3(channels=32, kernel_size=3, dw_kernel_size=5, group=2, norm_layer="BN", center_feature_scale=True,
#: remove_center=True): P = 8; the module's own parameters first (torch's state_dict order), BatchNorm2d's buffers.
DCNV3_OPTIONS_KEYS = [
    ("center_feature_scale_proj_weight", (2, 32)), ("center_feature_scale_proj_bias", (2,)),
    ("dw_conv.0.weight", (32, 1, 5, 5)), ("dw_conv.0.bias", (32,)),
    ("dw_conv.1.0.weight", (32,)), ("dw_conv.1.0.bias", (32,)), ("dw_conv.1.0.running_mean", (32,)),
    ("dw_conv.1.0.running_var", (32,)), ("dw_conv.1.0.num_batches_tracked", ()),
    ("offset.weight", (2 * 8 * 2, 32)), ("offset.bias", (2 * 8 * 2,)),
    ("mask.weight", (2 * 8, 32)), ("mask.bias", (2 * 8,)),
    ("input_proj.weight", (32, 32)), ("input_proj.bias", (32,)),
    ("output_proj.weight", (32, 32)), ("output_proj.bias", (32,)),
]

#: DCNv4's DCNv4(): channels 64, kernel 3, group 4: K = 4·9 = 36, offset_mask ceil(3·36 / 8)·8 = 112 outputs.
DCNV4_KEYS = [
    ("offset_mask.weight", (112, 64)), ("offset_mask.bias", (112,)),
    ("value_proj.weight", (64, 64)), ("value_proj.bias", (64,)),
    ("output_proj.weight", (64, 64)), ("output_proj.bias", (64,)),
]

#: DCNv4(channels=64, group=4, dw_kernel_size=3, center_feature_scale=True, remove_center=True, output_bias=False):
#: K = 4·8 = 32, offset_mask 96 outputs, output_proj without bias.
DCNV4_OPTIONS_KEYS = [
    ("center_feature_scale_proj_weight", (4, 64)), ("center_feature_scale_proj_bias", (4,)),
    ("offset_mask_dw.weight", (64, 1, 3, 3)), ("offset_mask_dw.bias", (64,)),
    ("offset_mask.weight", (96, 64)), ("offset_mask.bias", (96,)),
    ("value_proj.weight", (64, 64)), ("value_proj.bias", (64,)),
    ("output_proj.weight", (64, 64)),
]


def test_dcnv3_state_dict_has_internimages_keys_and_shapes():
    module = dtorch.DCNv3()
    assert shapes(module) == DCNV3_KEYS
    assert isinstance(module.dw_conv[0], torch.nn.Conv2d) and module.dw_conv[0].groups == 64
    assert module.dw_conv[0].padding == (1, 1)
    assert isinstance(module.dw_conv[1][1], torch.nn.LayerNorm) and module.dw_conv[1][1].eps == 1e-6
    assert isinstance(module.dw_conv[2], torch.nn.GELU)
    assert all(isinstance(getattr(module, name), torch.nn.Linear)
               for name in ("offset", "mask", "input_proj", "output_proj"))
    assert (module.group_channels, module.dw_kernel_size) == (16, 3)
    options = dtorch.DCNv3(channels=32, kernel_size=3, dw_kernel_size=5, group=2, norm_layer="BN",
                           center_feature_scale=True, remove_center=True)
    assert shapes(options) == DCNV3_OPTIONS_KEYS
    assert options.dw_conv[0].padding == (2, 2) and isinstance(options.dw_conv[1][0], torch.nn.BatchNorm2d)
    assert "channels=64, kernel_size=3, dw_kernel_size=3, stride=1, pad=1, dilation=1, group=4" in repr(module)
    for act, kind in (("ReLU", torch.nn.ReLU), ("SiLU", torch.nn.SiLU)):
        layer = dtorch.DCNv3(8, group=2, act_layer=act).dw_conv[2]
        assert isinstance(layer, kind) and layer.inplace


def test_dcnv4_state_dict_has_dcnv4s_keys_and_shapes():
    assert shapes(dtorch.DCNv4()) == DCNV4_KEYS
    options = dtorch.DCNv4(channels=64, group=4, dw_kernel_size=3, center_feature_scale=True, remove_center=True,
                           output_bias=False)
    assert shapes(options) == DCNV4_OPTIONS_KEYS
    assert options.K == 32 and options.offset_mask_dw.groups == 64
    assert shapes(dtorch.DCNv4(without_pointwise=True)) == DCNV4_KEYS[:2]
    # K·3 already a multiple of 8: no padding (group 8, kernel 3: 216)
    assert shapes(dtorch.DCNv4(64, group=8))[0] == ("offset_mask.weight", (216, 64))


def test_initialisation_is_internimages():
    """offset, mask (DCNv3) and offset_mask (DCNv4) 0; the projections Xavier-uniform with bias 0; the center
    feature scale's parameters 0 in float32."""
    C = 32
    bound = math.sqrt(6 / (C + C))
    v3 = dtorch.DCNv3(C, group=2, center_feature_scale=True)
    v4 = dtorch.DCNv4(C, group=2, center_feature_scale=True)
    for module, zero, projections in ((v3, ("offset", "mask"), ("input_proj", "output_proj")),
                                      (v4, ("offset_mask",), ("value_proj", "output_proj"))):
        for name in zero:
            linear = getattr(module, name)
            assert not linear.weight.any() and not linear.bias.any(), name
        for name in projections:
            linear = getattr(module, name)
            assert not linear.bias.any(), name
            assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 4, name
        for name in ("center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
            parameter = getattr(module, name)
            assert parameter.dtype == torch.float32 and not parameter.any(), name


def test_uniform_modulation_and_zero_offsets_at_initialisation(rng):
    """With the initial parameters DCNv3 samples each tap at its pixel with modulation 1/P: the sampled values are
    the 3×3 mean (zeros outside) of input_proj's, per channel."""
    module = dtorch.DCNv3(8, group=2).double()
    captured = []
    module.output_proj.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    input = v3_input(rng)
    module(input)
    values = module.input_proj(input).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(values, 3, stride=1, padding=1, count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(captured[0], expected, **TIGHT)


# ------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("make", [lambda: dtorch.DCNv3(8, group=2, center_feature_scale=True, norm_layer="BN"),
                                  lambda: dtorch.DCNv4(8, group=2, dw_kernel_size=3, center_feature_scale=True)],
                         ids=["DCNv3", "DCNv4"])
def test_state_dict_round_trip(make, rng):
    """A state_dict saved and loaded (strict) into a fresh module gives the same module: its tensors and its
    output, bitwise."""
    module = randomise(make(), rng).eval()
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = make().double().eval()
    fresh.load_state_dict(torch.load(buffer))
    for (name, a), (other, b) in zip(module.state_dict().items(), fresh.state_dict().items()):
        assert name == other
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    input = v3_input(rng) if isinstance(module, dtorch.DCNv3) else v4_input(rng, H=5, W=5)
    torch.testing.assert_close(fresh(input), module(input), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="center_feature_scale_proj_weight"):
        type(module)(8, group=2).load_state_dict(module.state_dict())


# ------------------------------------------------------------------------------------------ the forward

DCNV3_CASES = {
    "default": dict(),
    "remove_center-dw5-scale0.5-dilation2-cfs": dict(remove_center=True, dw_kernel_size=5, offset_scale=0.5,
                                                     dilation=2, pad=2, center_feature_scale=True),
    "kernel5-BN-ReLU": dict(kernel_size=5, pad=2, norm_layer="BN", act_layer="ReLU"),
    "SiLU-one-group": dict(group=1, act_layer="SiLU", center_feature_scale=True),
}


def dcnv3_call(module, input):
    return module(input)


@pytest.mark.parametrize("options", DCNV3_CASES.values(), ids=DCNV3_CASES.keys())
def test_dcnv3_equals_the_reference(options, rng):
    """Output and gradients (input and every parameter) equal the plain-torch computation from the module's own
    parameters, in float64."""
    module = randomise(dtorch.DCNv3(8, **{"group": 2, **options}), rng).eval()
    input = v3_input(rng)
    assert_same(value_and_grads(dcnv3_call, module, input), value_and_grads(reference_dcnv3, module, input),
                **TIGHT)


DCNV4_CASES = {
    "default-square": (dict(), None),
    "dw-cfs-no-output-bias": (dict(dw_kernel_size=3, center_feature_scale=True, output_bias=False), (5, 6)),
    "without_pointwise-remove_center": (dict(without_pointwise=True, remove_center=True), (6, 5)),
    "kernel5-dilation1-scale2-dw5": (dict(kernel_size=5, pad=2, offset_scale=2.0, dw_kernel_size=5), (3, 10)),
}


@pytest.mark.parametrize("options, shape", DCNV4_CASES.values(), ids=DCNV4_CASES.keys())
def test_dcnv4_equals_the_reference(options, shape, rng):
    """Output and gradients (input and every parameter) equal the plain-torch computation, in float64: the square
    image (shape None) and given (H, W)."""
    module = randomise(dtorch.DCNv4(8, **{"group": 2, **options}), rng)
    H, W = shape or (5, 5)
    input = v4_input(rng, H=H, W=W)
    assert_same(value_and_grads(lambda m, x: m(x, shape), module, input),
                value_and_grads(lambda m, x: reference_dcnv4(m, x, (H, W)), module, input), **TIGHT)


def test_dcnv4_accepts_flash_intern_images_call_and_ignores_extra_options(rng):
    """FlashInternImage builds DCNv4(channels=, group=, offset_scale=, dw_kernel_size=, output_bias=) and its
    variants pass more options, which DCNv4's module takes in **kwargs and ignores."""
    module = dtorch.DCNv4(channels=16, group=1, offset_scale=1.0, dw_kernel_size=None, output_bias=False,
                          act_layer="GELU", norm_layer="LN")
    assert module.output_proj.bias is None
    assert shapes(module) == shapes(dtorch.DCNv4(channels=16, group=1, output_bias=False))
    assert module(torch.randn(2, 16, 16), (4, 4)).shape == (2, 16, 16)


# ----------------------------------------------------------------------------------------- gradient flow

@pytest.mark.parametrize("make, input", [
    (lambda: dtorch.DCNv3(8, group=2, center_feature_scale=True), lambda: torch.randn(2, 5, 6, 8)),
    (lambda: dtorch.DCNv4(8, group=2, dw_kernel_size=3, center_feature_scale=True), lambda: torch.randn(2, 25, 8)),
], ids=["DCNv3", "DCNv4"])
def test_gradients_reach_every_parameter(make, input):
    """float32, as built: backward runs from the initialisation (zero offsets: taps at integer pixels), every
    parameter gets a finite gradient, the offset branch a non-zero one, and an SGD step moves it."""
    torch.manual_seed(0)
    module, x = make(), input().requires_grad_()
    module(x).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    branch = module.offset if isinstance(module, dtorch.DCNv3) else module.offset_mask
    assert branch.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    before = branch.weight.detach().clone()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not torch.equal(branch.weight, before)


# ------------------------------------------------------------------------------------------------ compiled

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("which", ["DCNv3", "DCNv4"])
def test_compiled_module_equals_eager_and_the_reference(which, backend, rng):
    """torch.compile(fullgraph=True): no graph break, output and gradients equal eager (bitwise with aot_eager)
    and the reference."""
    torch._dynamo.reset()
    if which == "DCNv3":
        module = randomise(dtorch.DCNv3(8, group=2, center_feature_scale=True), rng)
        input, call, reference = v3_input(rng), dcnv3_call, reference_dcnv3
    else:
        module = randomise(dtorch.DCNv4(8, group=2, dw_kernel_size=3, center_feature_scale=True), rng)
        input, call = v4_input(rng), (lambda m, x: m(x, (5, 6)))
        reference = lambda m, x: reference_dcnv4(m, x, (5, 6))  # noqa: E731
    explanation = torch._dynamo.explain(lambda x: call(module, x))(input)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got = value_and_grads(call, compiled, input)
    exact = dict(rtol=0, atol=0) if backend == "aot_eager" else TIGHT
    eager = value_and_grads(call, module, input)
    got = (got[0], {name.removeprefix("_orig_mod."): g for name, g in got[1].items()})
    assert_same(got, eager, **exact)
    assert_same(got, value_and_grads(reference, module, input), **TIGHT)


# ---------------------------------------------------------------------------------------- bad arguments

BAD = [
    # (module, keyword arguments, error, message start)
    ("DCNv3", dict(channels=10, group=4), ValueError, r"channels: expected a multiple of group = 4, got 10"),
    ("DCNv4", dict(channels=10, group=4), ValueError, r"channels: expected a multiple of group = 4, got 10"),
    ("DCNv3", dict(kernel_size=4, remove_center=True, pad=2, dilation=2), ValueError,
     r"remove_center: expected an odd kernel_size"),
    ("DCNv4", dict(kernel_size=4, remove_center=True), ValueError, r"remove_center: expected an odd kernel_size"),
    ("DCNv3", dict(stride=2), ValueError, r"stride: expected 1 \(the offsets are predicted at each input pixel"),
    ("DCNv4", dict(pad=0), ValueError, r"pad: expected dilation·\(kernel_size − 1\) / 2 = 1 \(.*\), got 0"),
    ("DCNv3", dict(dilation=2), ValueError, r"pad: expected dilation·\(kernel_size − 1\) / 2 = 2"),
    ("DCNv3", dict(kernel_size=2), ValueError, r"kernel_size: expected dilation·\(kernel_size − 1\) even"),
    ("DCNv3", dict(dw_kernel_size=4), ValueError, r"dw_kernel_size: expected an odd int"),
    ("DCNv4", dict(dw_kernel_size=2), ValueError, r"dw_kernel_size: expected an odd int"),
    ("DCNv3", dict(act_layer="Tanh"), ValueError, r"act_layer: expected one of \('ReLU', 'SiLU', 'GELU'\)"),
    ("DCNv3", dict(norm_layer="GN"), ValueError, r"norm_layer: expected one of \('LN', 'BN'\), got 'GN'"),
    ("DCNv3", dict(channels=0), ValueError, r"channels: expected a positive int, got 0"),
    ("DCNv4", dict(pad=-1), ValueError, r"pad: expected an int ≥ 0, got -1"),
    ("DCNv3", dict(group=2**31), ValueError, r"group: expected an int of at most"),
    ("DCNv3", dict(group=2.0), TypeError, r"group: expected an int, got float 2.0"),
    ("DCNv4", dict(channels=True), TypeError, r"channels: expected an int, got bool True"),
    ("DCNv3", dict(kernel_size="3"), TypeError, r"kernel_size: expected an int, got str '3'"),
    ("DCNv4", dict(dw_kernel_size=3.0), TypeError, r"dw_kernel_size: expected an int, got float 3.0"),
    ("DCNv3", dict(offset_scale="1"), TypeError, r"offset_scale: expected a real number, got str '1'"),
    ("DCNv4", dict(offset_scale=math.inf), ValueError, r"offset_scale: expected a finite number"),
    ("DCNv3", dict(remove_center=1), TypeError, r"remove_center: expected a bool, got int 1"),
    ("DCNv3", dict(center_feature_scale=None), TypeError, r"center_feature_scale: expected a bool, got NoneType"),
    ("DCNv4", dict(output_bias="False"), TypeError, r"output_bias: expected a bool, got str 'False'"),
    ("DCNv4", dict(without_pointwise=0), TypeError, r"without_pointwise: expected a bool, got int 0"),
]


@pytest.mark.parametrize("name, options, error, message", BAD,
                         ids=[f"{name}-{next(iter(options))}={list(options.values())[0]!r}"
                              for name, options, *_ in BAD])
def test_bad_constructor_arguments_are_named(name, options, error, message):
    with pytest.raises(error, match="^" + message):
        getattr(dtorch, name)(**{"channels": 8, "group": 2, **options})


def test_dcnv4_bad_shape_is_named(rng):
    module = dtorch.DCNv4(8, group=2).double()
    with pytest.raises(ValueError, match=r"^input: expected a square image \(L = H·W with H = W\) when shape is "
                                         r"None, got shape \(2, 30, 8\)"):
        module(v4_input(rng))
    with pytest.raises(ValueError, match=r"^shape: expected \(H, W\) with H·W = L = 30 \(input \(N, L, C\)\), got "
                                         r"\(6, 6\)"):
        module(v4_input(rng), (6, 6))
    with pytest.raises(TypeError, match=r"^shape"):
        module(v4_input(rng), (5.0, 6))
