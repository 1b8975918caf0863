"""deformcp.torch's multi-scale deformable attention: ``MSDeformAttn`` (Deformable DETR's module: parameters,
initialisation, forward) against a reference module written here from torch.nn.functional.grid_sample (one
grid_sample per level, then the attention-weighted sum: Deformable DETR's PyTorch formulation), in float64, eager
and compiled; the functions ``ms_deform_attn`` / ``flash_deform_attn`` called as Deformable DETR calls its
``MSDeformAttnFunction`` (im2col_step, spatial_shapes as a tensor); and deformcp.jax's gradient against deformcp's
NumPy backward. The generic tests (gradcheck, opcheck, compile, export, vmap, bfloat16 of every op) are in
test_torch.py, test_torch_library.py, test_jax.py and test_bfloat16.py."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import deformcp  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402

#: Levels (H_l, W_l): non-square, a 1×1 level, one taller than wide.
SHAPES = [(5, 7), (1, 1), (4, 3)]
STARTS = [0, 35, 36]
S = sum(h * w for h, w in SHAPES)
#: float64 sums in another order (grid_sample per level, then a weighted sum): a few ulps apart.
TIGHT = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ reference

def reference_attention(value, shapes, locations, weights):
    """Deformable DETR's formulation with torch ops: value (N, S, M, D), locations (N, Lq, M, L, P, 2) in [0, 1],
    weights (N, Lq, M, L, P) → (N, Lq, M·D). Level l of head m is sampled by grid_sample (bilinear, zeros,
    align_corners=False) at 2·loc − 1."""
    N, _, M, D = value.shape
    Lq, P = locations.shape[1], locations.shape[4]
    out, start = 0, 0
    for level, (H, W) in enumerate(shapes):
        image = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        grid = 2 * locations[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2) - 1
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight = weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Lq, P)
        out = out + (sampled * weight).sum(-1)  # (N·M, D, Lq)
        start += H * W
    return out.reshape(N, M * D, Lq).transpose(1, 2)


class ReferenceMSDeformAttn(torch.nn.Module):
    """Deformable DETR's MSDeformAttn with the attention computed by reference_attention: the same four Linear
    layers (load a state_dict of deformcp's), offsets normalised by (W_l, H_l) for points, by w·h / (2P) for
    boxes, the logits soft-maxed over each head's L·P points, padded inputs' values zeroed."""

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.M, self.L, self.P = n_heads, n_levels, n_points
        self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = torch.nn.Linear(d_model, d_model)
        self.output_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, shapes, padding_mask=None):
        N, Lq, C = query.shape
        M, L, P = self.M, self.L, self.P
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = torch.where(padding_mask[..., None], torch.zeros_like(value), value)
        value = value.reshape(N, -1, M, C // M)
        offsets = self.sampling_offsets(query).reshape(N, Lq, M, L, P, 2)
        logits = self.attention_weights(query).reshape(N, Lq, M, L * P)
        weights = torch.softmax(logits, dim=-1).reshape(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            wh = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)  # (L, 2)
            locations = reference_points[:, :, None, :, None, :] + offsets / wh[:, None, :]
        else:
            centre, size = reference_points[..., :2], reference_points[..., 2:]
            locations = centre[:, :, None, :, None, :] + offsets * size[:, :, None, :, None, :] / (2 * P)
        return self.output_proj(reference_attention(value, shapes, locations, weights))


# -------------------------------------------------------------------------------------------------- inputs

def make_module(rng, d_model=12, n_heads=3, n_points=2):
    """deformcp's module in float64 with random parameters (offsets of a few pixels, uneven attention)."""
    module = dtorch.MSDeformAttn(d_model, len(SHAPES), n_heads, n_points).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.from_numpy(rng.standard_normal(tuple(parameter.shape)) * 0.3))
    return module


def reference_of(module):
    reference = ReferenceMSDeformAttn(module.d_model, module.n_levels, module.n_heads, module.n_points).double()
    reference.load_state_dict(module.state_dict())
    return reference


def make_inputs(rng, N=2, Lq=5, d_model=12, boxes=False, masked=False):
    """query (N, Lq, C), reference_points (N, Lq, L, 2 or 4), input_flatten (N, S, C), padding mask or None."""
    query = torch.from_numpy(rng.standard_normal((N, Lq, d_model)))
    if boxes:
        reference = torch.from_numpy(np.concatenate([rng.uniform(0.1, 0.9, (N, Lq, len(SHAPES), 2)),
                                                     rng.uniform(0.1, 0.6, (N, Lq, len(SHAPES), 2))], -1))
    else:
        reference = torch.from_numpy(rng.uniform(-0.05, 1.05, (N, Lq, len(SHAPES), 2)))
    flatten = torch.from_numpy(rng.standard_normal((N, S, d_model)))
    mask = torch.from_numpy(rng.uniform(size=(N, S)) < 0.3) if masked else None
    return query, reference, flatten, mask


def value_and_grads(module, inputs, call):
    """call(module, query, reference_points, input_flatten, mask)'s output and its gradients (a random linear
    functional's) with respect to the three input tensors and every parameter."""
    query, reference, flatten, mask = (t.clone().requires_grad_() if t is not None and t.is_floating_point() else t
                                       for t in inputs)
    out = call(module, query, reference, flatten, mask)
    weights = torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape))
    grads = torch.autograd.grad((out * weights).sum(), (query, reference, flatten, *module.parameters()))
    return out.detach(), grads


def assert_same(got, want, **tolerance):
    (out, grads), (expected, expected_grads) = got, want
    torch.testing.assert_close(out, expected, **tolerance)
    assert len(grads) == len(expected_grads)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(g, e, **tolerance, msg=lambda m, i=i: f"gradient {i}: {m}")


def deformcp_call(module, query, reference, flatten, mask, shapes=SHAPES, starts=STARTS):
    return module(query, reference, flatten, shapes, starts, mask)


def reference_call(module, query, reference, flatten, mask):
    return module(query, reference, flatten, SHAPES, mask)


# ------------------------------------------------------------------------------------------------- the module

def test_state_dict_has_deformable_detrs_keys_and_shapes():
    module = dtorch.MSDeformAttn()  # d_model 256, 4 levels, 8 heads, 4 points
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == {"sampling_offsets.weight": (8 * 4 * 4 * 2, 256), "sampling_offsets.bias": (8 * 4 * 4 * 2,),
                      "attention_weights.weight": (8 * 4 * 4, 256), "attention_weights.bias": (8 * 4 * 4,),
                      "value_proj.weight": (256, 256), "value_proj.bias": (256,),
                      "output_proj.weight": (256, 256), "output_proj.bias": (256,)}
    assert all(isinstance(getattr(module, name), torch.nn.Linear)
               for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"))
    assert "d_model=256, n_levels=4, n_heads=8, n_points=4" in repr(module)


def test_initialisation_is_deformable_detrs():
    """sampling_offsets: weight 0, bias = head m's direction (cos, sin)(2πm/M) over its larger coordinate's
    magnitude, times p + 1, the same at every level; attention_weights 0 (uniform attention); value_proj and
    output_proj Xavier-uniform with bias 0."""
    M, L, P, C = 8, 3, 4, 16
    module = dtorch.MSDeformAttn(C, L, M, P)
    assert not module.sampling_offsets.weight.any()
    angles = 2 * np.pi * np.arange(M) / M
    directions = np.stack([np.cos(angles), np.sin(angles)], -1)
    directions /= np.abs(directions).max(-1, keepdims=True)
    expected = directions[:, None, None, :] * np.arange(1, P + 1)[None, None, :, None] * np.ones((1, L, 1, 1))
    bias = module.sampling_offsets.bias.detach()
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, torch.from_numpy(expected.reshape(-1)).float())  # float32's tolerance
    by_head = bias.view(M, L, P, 2)
    torch.testing.assert_close(by_head[1, 2, 3], torch.tensor([4.0, 4.0]))  # 45°: (1, 1), point p = 3: times 4
    torch.testing.assert_close(by_head[4, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)  # 180°
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    for linear in (module.value_proj, module.output_proj):
        bound = math.sqrt(6 / (C + C))
        assert not linear.bias.any()
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 4
    fresh = dtorch.MSDeformAttn(C, L, M, P)
    torch.testing.assert_close(fresh.sampling_offsets.bias, module.sampling_offsets.bias, rtol=0, atol=0)


def test_uniform_attention_at_initialisation(rng):
    """With the initial parameters the attention is uniform, 1 / (L·P) per point."""
    module = dtorch.MSDeformAttn(12, len(SHAPES), 3, 2).double()
    captured = []
    handle = module.attention_weights.register_forward_hook(lambda m, i, out: captured.append(out))
    query, reference, flatten, _ = make_inputs(rng)
    module(query, reference, flatten, SHAPES, STARTS)
    handle.remove()
    assert not captured[0].any()  # logits 0: softmax gives 1 / (L·P)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_module_equals_the_grid_sample_reference(boxes, masked, rng):
    """Output and gradients (query, reference_points, input_flatten, every parameter) equal the reference module
    with the same state_dict, for reference points (N, Lq, L, 2) and boxes (N, Lq, L, 4), with and without a
    padding mask."""
    module = make_module(rng)
    inputs = make_inputs(rng, boxes=boxes, masked=masked)
    assert_same(value_and_grads(module, inputs, deformcp_call),
                value_and_grads(reference_of(module), inputs, reference_call), **TIGHT)


def test_padding_mask_zeroes_the_padded_values(rng):
    """The padded inputs do not matter: changing them changes neither the output nor the other gradients, and
    their own gradient is 0."""
    module = make_module(rng)
    query, reference, flatten, mask = make_inputs(rng, masked=True)
    assert mask.any() and not mask.all()
    changed = torch.where(mask[..., None], flatten + 100, flatten)
    (out, grads), (out2, grads2) = (value_and_grads(module, (query, reference, x, mask), deformcp_call)
                                    for x in (flatten, changed))
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    assert not grads[2][mask].any()
    without = value_and_grads(module, (query, reference, flatten, None), deformcp_call)
    assert not torch.equal(without[0], out)


def test_spatial_shapes_as_a_tensor_or_a_list(rng):
    """Deformable DETR passes spatial_shapes (L, 2) and level_start_index (L,) as int64 tensors: the same results
    as lists (bitwise), level_start_index None too."""
    module = make_module(rng)
    inputs = make_inputs(rng, boxes=False)
    expected = value_and_grads(module, inputs, deformcp_call)
    for shapes, starts in ((torch.tensor(SHAPES), torch.tensor(STARTS)), (torch.tensor(SHAPES), None),
                           (SHAPES, None), (np.array(SHAPES), np.array(STARTS))):
        got = value_and_grads(module, inputs, lambda *a, s=shapes, i=starts: deformcp_call(*a, shapes=s, starts=i))
        assert_same(got, expected, rtol=0, atol=0)


def test_a_tensor_spatial_shapes_is_read_once(rng):
    """spatial_shapes and level_start_index given as tensors are each read once (one .tolist(); no DLPack
    import for the argument check), through the function and the module."""
    reads = []

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.tolist, torch.Tensor.__dlpack__, torch.Tensor.item, torch.Tensor.numpy):
                reads.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    shapes, starts = torch.tensor(SHAPES), torch.tensor(STARTS)
    module = make_module(rng)
    query, reference, flatten, _ = make_inputs(rng)
    with Reads():
        module(query, reference, flatten, shapes, starts)
    integer_reads = [read for read in reads if read[1] == torch.int64]
    assert integer_reads == [("tolist", torch.int64)] * 2, reads


def test_bad_heads_and_reference_points_are_named(rng):
    with pytest.raises(ValueError, match=r"^d_model: expected a multiple of n_heads = 3, got 8"):
        dtorch.MSDeformAttn(8, 2, 3, 2)
    with pytest.raises(TypeError, match=r"^n_heads: expected an int"):
        dtorch.MSDeformAttn(8, 2, 2.0, 2)
    module = make_module(rng)
    query, reference, flatten, _ = make_inputs(rng)
    for bad in (reference[..., :1], torch.cat([reference, reference[..., :1]], -1), reference[:, :, :2]):
        with pytest.raises(ValueError, match=r"^reference_points: expected \(2, 5, 3, 2\) points or \(2, 5, 3, 4\) "
                                             r"boxes"):
            module(query, bad, flatten, SHAPES, STARTS)
    with pytest.raises(ValueError, match=r"^level_start_index: expected \(0, 35, 36\)"):
        module(query, reference, flatten, SHAPES, [0, 35, 37])
    with pytest.raises(ValueError, match=r"^value: expected S = "):
        module(query, reference, flatten[:, 1:], SHAPES, None)


# ------------------------------------------------------------------------------------------------ compiled

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_compiled_module_equals_the_reference(boxes, backend, rng):
    """torch.compile(fullgraph=True) with spatial_shapes a list: no graph break, output and gradients equal eager
    (bitwise with aot_eager) and the reference; a padding mask included."""
    torch._dynamo.reset()
    module = make_module(rng)
    inputs = make_inputs(rng, boxes=boxes, masked=True)
    explanation = torch._dynamo.explain(module)(*inputs[:3], SHAPES, STARTS, inputs[3])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got = value_and_grads(compiled, inputs, deformcp_call)
    exact = dict(rtol=0, atol=0) if backend == "aot_eager" else TIGHT
    assert_same(got, value_and_grads(module, inputs, deformcp_call), **exact)
    assert_same(got, value_and_grads(reference_of(module), inputs, reference_call), **TIGHT)


def test_compiled_with_a_tensor_spatial_shapes_breaks_the_graph_and_runs(rng):
    """A tensor spatial_shapes must be read on the host: under torch.compile that is a graph break (data
    dependent), and the results still equal eager; fullgraph needs a list."""
    torch._dynamo.reset()
    module = make_module(rng)
    inputs = make_inputs(rng)
    tensors = lambda *a: deformcp_call(*a, shapes=torch.tensor(SHAPES), starts=torch.tensor(STARTS))  # noqa: E731
    compiled = torch.compile(module, backend="aot_eager")
    assert_same(value_and_grads(compiled, inputs, tensors), value_and_grads(module, inputs, deformcp_call),
                rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ functions

def attention_inputs(rng, N=3, Lq=4, M=2, D=3, P=2):
    value = torch.from_numpy(rng.standard_normal((N, S, M, D)))
    locations = torch.from_numpy(rng.uniform(-0.1, 1.1, (N, Lq, M, len(SHAPES), P, 2)))
    weights = torch.from_numpy(rng.uniform(0, 1, (N, Lq, M, len(SHAPES), P)))
    return value, locations, weights


def test_im2col_step_is_accepted_and_ignored(rng):
    """Deformable DETR's call MSDeformAttnFunction.apply(value, shapes, level_start_index, locations, weights,
    im2col_step): any batch size (3 with im2col_step 64, or 2), the result of the call without it."""
    value, locations, weights = attention_inputs(rng, N=3)
    expected = dtorch.ms_deform_attn(value, SHAPES, STARTS, locations, weights)
    for step in (64, 2, None):
        got = dtorch.ms_deform_attn(value, torch.tensor(SHAPES), torch.tensor(STARTS), locations, weights, step)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    packed = torch.cat([locations.flatten(3), weights.flatten(3)], -1)
    torch.testing.assert_close(dtorch.flash_deform_attn(value, SHAPES, None, packed, 2, 64),
                               dtorch.flash_deform_attn(value, SHAPES, None, packed, 2), rtol=0, atol=0)


def test_function_equals_the_grid_sample_reference(rng):
    """ms_deform_attn's output and gradients (value, locations, weights) equal the grid_sample formulation."""
    value, locations, weights = (t.requires_grad_() for t in attention_inputs(rng))
    out = dtorch.ms_deform_attn(value, SHAPES, STARTS, locations, weights)
    expected = reference_attention(value, SHAPES, locations, weights)
    torch.testing.assert_close(out, expected, **TIGHT)
    cotangent = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    grads = torch.autograd.grad(out, (value, locations, weights), cotangent)
    expected_grads = torch.autograd.grad(expected, (value, locations, weights), cotangent)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TIGHT)


def test_flash_deform_attn_is_ms_deform_attn_with_the_softmax_inside(rng):
    """flash_deform_attn(value, ..., [locations, logits]) equals ms_deform_attn with softmax(logits) over each
    head's L·P points: output and gradients of value, locations and logits."""
    value, locations, _ = attention_inputs(rng)
    N, Lq, M, L, P, _ = locations.shape
    logits = torch.from_numpy(2 * rng.standard_normal((N, Lq, M, L * P)))
    packed = torch.cat([locations.flatten(3), logits], -1).requires_grad_()
    value.requires_grad_()
    out = dtorch.flash_deform_attn(value, torch.tensor(SHAPES), None, packed, P)
    split_locations = packed[..., :2 * L * P].reshape(N, Lq, M, L, P, 2)
    weights = torch.softmax(packed[..., 2 * L * P:], -1).reshape(N, Lq, M, L, P)
    expected = dtorch.ms_deform_attn(value, SHAPES, None, split_locations, weights)
    torch.testing.assert_close(out, expected, **TIGHT)
    cotangent = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    for got, want in zip(torch.autograd.grad(out, (value, packed), cotangent),
                         torch.autograd.grad(expected, (value, packed), cotangent)):
        torch.testing.assert_close(got, want, **TIGHT)


def test_points_per_level_as_a_list_or_a_tensor(rng):
    """RT-DETRv2's per-level point counts: keyword-only, a list or an integer tensor, the same result."""
    value = torch.from_numpy(rng.standard_normal((2, S, 2, 3)))
    locations = torch.from_numpy(rng.uniform(0, 1, (2, 4, 2, 6, 2)))
    weights = torch.from_numpy(rng.uniform(0, 1, (2, 4, 2, 6)))
    expected = deformcp.ms_deform_attn(value.numpy(), SHAPES, None, locations.numpy(), weights.numpy(),
                                       points_per_level=(3, 1, 2), method="discrete")
    for points in ([3, 1, 2], torch.tensor([3, 1, 2])):
        got = dtorch.ms_deform_attn(value, SHAPES, None, locations, weights, points_per_level=points,
                                    method="discrete")
        np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(TypeError, match="positional"):
        dtorch.ms_deform_attn(value, SHAPES, None, locations, weights, None, (3, 1, 2))


def test_bad_level_options_are_named(rng):
    value, locations, weights = attention_inputs(rng)
    with pytest.raises(TypeError, match=r"^spatial_shapes\[0\]: expected integers, got float 5.0"):
        dtorch.ms_deform_attn(value, torch.tensor(SHAPES, dtype=torch.float32), None, locations, weights)
    with pytest.raises(ValueError, match=r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)"):
        dtorch.ms_deform_attn(value, [5, 7, 1, 1, 4, 3], None, locations, weights)
    with pytest.raises(ValueError, match=r"^level_start_index: expected \(0, 35, 36\)"):
        dtorch.ms_deform_attn(value, SHAPES, torch.tensor([0, 35, 35]), locations, weights)
    with pytest.raises(ValueError, match=r"^spatial_shapes: expected \(H_l, W_l\) pairs, flattened, got 5 values"):
        torch.ops.deformcp.ms_deform_attn(value, locations, weights, [5, 7, 1, 1, 4], None, None, "default")
    compiled = torch.compile(lambda v, loc, w: dtorch.ms_deform_attn(v, [(5, 7), (1, 1), (4, 3, 1)], None, loc, w),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"spatial_shapes: expected rows \(H_l, W_l\) of two ints"):
        compiled(value, locations, weights)


# -------------------------------------------------------------------------------------------------------- JAX

def test_jax_grad_equals_the_numpy_backward(rng):
    """jax.grad through deformcp.jax.ms_deform_attn (spatial_shapes and level_start_index as concrete JAX integer
    arrays, made static) equals deformcp.ms_deform_attn_backward on NumPy arrays, in float64."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import deformcp.jax as djax

    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        value, locations, weights = (t.numpy() for t in attention_inputs(rng))
        cotangent = rng.standard_normal((value.shape[0], locations.shape[1], value.shape[2] * value.shape[3]))
        shapes, starts = jnp.asarray(SHAPES), jnp.asarray(STARTS)

        def loss(v, loc, w):
            return jnp.sum(cotangent * djax.ms_deform_attn(v, shapes, starts, loc, w))

        grads = jax.grad(loss, argnums=(0, 1, 2))(value, locations, weights)
        expected = deformcp.ms_deform_attn_backward(cotangent, value, SHAPES, STARTS, locations, weights)
        for got, name in zip(grads, expected._fields):
            assert got.dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(got), getattr(expected, name), err_msg=name)
        jitted = jax.jit(jax.grad(loss))(value, locations, weights)
        np.testing.assert_allclose(np.asarray(jitted), expected.value, **TIGHT)
    finally:
        jax.config.update("jax_enable_x64", previous)
