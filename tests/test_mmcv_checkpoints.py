"""mmcv's checkpoints load into deformcp.torch's mmcv-named modules, built with mmcv's constructor arguments
(``deform_groups=``): state_dicts in mmcv's exact layout (its key names and shapes, random values, no ``bias`` where
mmcv's layer has none) load with strict=True, and the forward equals deformcp's functional calls with those weights,
written as mmcv's forward writes them (mmcv/ops/deform_conv.py, modulated_deform_conv.py, deform_roi_pool.py)."""
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import deformcp.torch as dtorch  # noqa: E402

C_IN, C_OUT, K, GROUPS, DEFORM_GROUPS = 4, 6, 3, 2, 2
CONV = dict(stride=1, padding=1, dilation=1)
POOL = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, gamma=0.1)
FC = 8


def random_state(generator, shapes):
    return {key: 0.1 * torch.randn(shape, dtype=torch.float64, generator=generator) for key, shape in shapes.items()}


def conv_offset(x, state, channels):
    offset = F.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], **CONV)
    assert offset.shape[1] == channels
    return offset


def deform_conv(x, offset, state, mask=None):
    return dtorch.deform_conv2d(x, offset, state["weight"], state.get("bias"), **CONV, mask=mask)


def modulated_forward(x, state):
    """mmcv's ModulatedDeformConv2dPack.forward: chunk the offset branch in three, the last the mask logits."""
    o1, o2, mask = torch.chunk(conv_offset(x, state, 3 * DEFORM_GROUPS * K * K), 3, dim=1)
    return deform_conv(x, torch.cat((o1, o2), dim=1), state, torch.sigmoid(mask))


def fc(x, state, prefix, layers):
    for i in layers[:-1]:
        x = F.relu(F.linear(x, state[f"{prefix}.{i}.weight"], state[f"{prefix}.{i}.bias"]))
    return F.linear(x, state[f"{prefix}.{layers[-1]}.weight"], state[f"{prefix}.{layers[-1]}.bias"])


def pool_forward(x, rois, state, modulated):
    """mmcv's (Modulated)DeformRoIPoolPack.forward."""
    pooled = dtorch.deform_roi_pool(x, rois, None, **POOL).view(rois.shape[0], -1)
    offset = fc(pooled, state, "offset_fc", (0, 2, 4)).view(rois.shape[0], 2, *POOL["output_size"])
    out = dtorch.deform_roi_pool(x, rois, offset, **POOL)
    if modulated:
        out = out * torch.sigmoid(fc(pooled, state, "mask_fc", (0, 2))).view(rois.shape[0], 1, *POOL["output_size"])
    return out


BINS = POOL["output_size"][0] * POOL["output_size"][1]
OFFSET_FC = {"offset_fc.0.weight": (FC, BINS * C_IN), "offset_fc.0.bias": (FC,), "offset_fc.2.weight": (FC, FC),
             "offset_fc.2.bias": (FC,), "offset_fc.4.weight": (2 * BINS, FC), "offset_fc.4.bias": (2 * BINS,)}
MASK_FC = {"mask_fc.0.weight": (FC, BINS * C_IN), "mask_fc.0.bias": (FC,), "mask_fc.2.weight": (BINS, FC),
           "mask_fc.2.bias": (BINS,)}
WEIGHT = {"weight": (C_OUT, C_IN // GROUPS, K, K)}


def offset_branch(channels):
    return {"conv_offset.weight": (channels, C_IN, K, K), "conv_offset.bias": (channels,)}


#: name → (the module as mmcv's code builds it, mmcv's state_dict shapes, the forward as mmcv computes it from
#: (x, the offset / mask inputs, rois) and the state). mmcv's DeformConv2d(Pack) have no bias (bias=False is their
#: default and the only value they allow); ModulatedDeformConv2dPack has one unless bias=False.
MODULES = {
    "DeformConv2d": (
        lambda: dtorch.DeformConv2d(C_IN, C_OUT, K, **CONV, groups=GROUPS, deform_groups=DEFORM_GROUPS),
        WEIGHT,
        lambda x, offset, rois, state: deform_conv(x, offset, state)),
    "DeformConv2dPack": (
        lambda: dtorch.DeformConv2dPack(C_IN, C_OUT, K, **CONV, groups=GROUPS, deform_groups=DEFORM_GROUPS),
        {**WEIGHT, **offset_branch(2 * DEFORM_GROUPS * K * K)},
        lambda x, offset, rois, state: deform_conv(x, conv_offset(x, state, 2 * DEFORM_GROUPS * K * K), state)),
    "ModulatedDeformConv2dPack": (
        lambda: dtorch.ModulatedDeformConv2dPack(C_IN, C_OUT, K, **CONV, groups=GROUPS, deform_groups=DEFORM_GROUPS),
        {**WEIGHT, "bias": (C_OUT,), **offset_branch(3 * DEFORM_GROUPS * K * K)},
        lambda x, offset, rois, state: modulated_forward(x, state)),
    "ModulatedDeformConv2dPack-bias=False": (
        lambda: dtorch.ModulatedDeformConv2dPack(C_IN, C_OUT, K, **CONV, groups=GROUPS, deform_groups=DEFORM_GROUPS,
                                                 bias=False),
        {**WEIGHT, **offset_branch(3 * DEFORM_GROUPS * K * K)},
        lambda x, offset, rois, state: modulated_forward(x, state)),
    "DeformRoIPoolPack": (
        lambda: dtorch.DeformRoIPoolPack(POOL["output_size"], C_IN, FC, POOL["spatial_scale"], POOL["sampling_ratio"],
                                         POOL["gamma"]),
        OFFSET_FC,
        lambda x, offset, rois, state: pool_forward(x, rois, state, modulated=False)),
    "ModulatedDeformRoIPoolPack": (
        lambda: dtorch.ModulatedDeformRoIPoolPack(POOL["output_size"], C_IN, FC, POOL["spatial_scale"],
                                                  POOL["sampling_ratio"], POOL["gamma"]),
        {**OFFSET_FC, **MASK_FC},
        lambda x, offset, rois, state: pool_forward(x, rois, state, modulated=True)),
}


@pytest.mark.parametrize("name", MODULES)
def test_an_mmcv_state_dict_loads_strictly_and_gives_the_functional_forward(name):
    build, shapes, forward = MODULES[name]
    generator = torch.Generator().manual_seed(0)
    state = random_state(generator, shapes)
    layer = build().double()
    layer.load_state_dict(state, strict=True)
    saved = layer.state_dict()
    assert {key: tuple(v.shape) for key, v in saved.items()} == shapes  # mmcv's layout, also when saved again
    assert all(torch.equal(saved[key], state[key]) for key in state)
    x = torch.randn(2, C_IN, 7, 8, dtype=torch.float64, generator=generator)
    offset = torch.randn(2, 2 * DEFORM_GROUPS * K * K, 7, 8, dtype=torch.float64, generator=generator)
    rois = torch.tensor([[0, 0.5, 1.0, 11.0, 12.0], [1, 2.0, 0.0, 9.0, 6.5], [1, 1.0, 1.5, 15.0, 13.0]],
                        dtype=torch.float64)
    arguments = {"DeformConv2d": (x, offset)}.get(name, (x, rois) if "RoIPool" in name else (x,))
    with torch.no_grad():
        torch.testing.assert_close(layer(*arguments), forward(x, offset, rois, state), rtol=0, atol=0)


def test_a_bias_free_state_dict_drops_the_bias_that_the_layer_was_built_with():
    """mmcv's DeformConv2dPack(c, c, 3) has no bias, deformcp's (torchvision's default) has one: the checkpoint
    loads as it is, and the layer then has no bias; a state_dict with a bias still loads into it as before."""
    layer = dtorch.DeformConv2dPack(C_IN, C_OUT, K, padding=1)
    assert layer.bias is not None
    state = {key: value for key, value in layer.state_dict().items() if key != "bias"}
    layer.load_state_dict(state, strict=True)
    assert layer.bias is None and "bias" not in layer.state_dict() and "bias=False" in repr(layer)
    with_bias = dtorch.DeformConv2dPack(C_IN, C_OUT, K, padding=1)
    with_bias.load_state_dict(dtorch.DeformConv2dPack(C_IN, C_OUT, K, padding=1).state_dict(), strict=True)
    assert with_bias.bias is not None


@pytest.mark.parametrize("module", [dtorch.DeformConv2d, dtorch.DeformConv2dPack, dtorch.ModulatedDeformConv2dPack])
def test_deform_groups_is_offset_groups(module):
    assert module(C_IN, C_OUT, K, deform_groups=2).offset_groups == 2
    with pytest.raises(TypeError, match=r"^offset_groups, deform_groups: expected one of them \(deform_groups is "
                                        r"mmcv's name for offset_groups\), got both: offset_groups=2, "
                                        r"deform_groups=2$"):
        module(C_IN, C_OUT, K, offset_groups=2, deform_groups=2)
    with pytest.raises(ValueError, match=r"^in_channels: expected a multiple of deform_groups = 3, got 4$"):
        module(C_IN, C_OUT, K, deform_groups=3)


def test_deform_conv2d_checks_its_offset_groups_against_the_offset():
    layer = dtorch.DeformConv2d(C_IN, C_OUT, K, padding=1, deform_groups=2).double()
    x = torch.zeros(1, C_IN, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^offset: expected 2·offset_groups·kh·kw = 36 channels "
                                         r"\(offset_groups = 2\), got shape \(1, 18, 5, 5\)$"):
        layer(x, torch.zeros(1, 18, 5, 5, dtype=torch.float64))
    assert layer(x, torch.zeros(1, 36, 5, 5, dtype=torch.float64)).shape == (1, C_OUT, 5, 5)
    unchecked = dtorch.DeformConv2d(C_IN, C_OUT, K, padding=1).double()  # G read from the offset
    assert unchecked(x, torch.zeros(1, 18, 5, 5, dtype=torch.float64)).shape == (1, C_OUT, 5, 5)
