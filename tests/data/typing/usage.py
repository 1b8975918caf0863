"""A user script that calls every public function of deformcp (deformcp.__all__), deformcp.torch and deformcp.jax
with NumPy arrays, tensors and JAX arrays, reads results' shapes and the gradients' named-tuple fields.
tests/test_typing.py checks it with ``mypy --strict`` (no casts, no ignores); it also runs."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

import deformcp
import deformcp.jax as djax
import deformcp.torch as dtorch
from deformcp import Array

rng = np.random.default_rng(0)


def ones(shape: tuple[int, ...]) -> np.ndarray[tuple[int, ...], np.dtype[np.float64]]:
    return np.ones(shape)


def checked(grad: Array | None) -> tuple[int, ...]:
    assert grad is not None
    return grad.shape


# ------------------------------------------------------------------------------------------- NumPy
x = rng.random((2, 3, 8, 8))
theta = np.array([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]]).repeat(2, axis=0)
with deformcp.backend("numpy"), deformcp.workspace_limit(1 << 26):
    print(deformcp.current_backend(), deformcp.get_workspace_limit())
    grid = deformcp.affine_grid(theta, x.shape, align_corners=False)
    n, h, w, two = grid.shape
    assert (n, h, w, two) == (2, 8, 8, 2)
    ag = deformcp.affine_grid_backward(ones(grid.shape), theta, x.shape)
    assert isinstance(ag, deformcp.AffineGridGrads)
    print(checked(ag.theta))
    y = deformcp.grid_sample(x, grid, mode="bicubic", padding_mode="border")
    gs: deformcp.GridSampleGrads = deformcp.grid_sample_backward(np.ones_like(y), x, grid,
                                                                 needs_input_grad=(True, False), deterministic=True)
    print(y.shape, y.ndim, y.dtype, checked(gs.input), gs.grid is None)
    fused = deformcp.affine_sample(x, theta, (2, 3, 6, 5), mode="nearest", align_corners=True)
    asg: deformcp.AffineSampleGrads = deformcp.affine_sample_backward(ones(fused.shape), x, theta, (2, 3, 6, 5),
                                                                      needs_input_grad=(False, True))
    print(fused.shape, asg.input is None, checked(asg.theta))

boxes = np.array([[0, 1.0, 1.0, 6.0, 6.0], [1, 0.0, 0.0, 4.0, 7.0]])
pooled = deformcp.roi_align(x, boxes, (2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
ra: deformcp.RoIAlignGrads = deformcp.roi_align_backward(ones(pooled.shape), x, boxes, 2)
print(pooled.shape, checked(ra.input))
per_image = [np.array([[1.0, 1.0, 6.0, 6.0]]), np.array([[0.0, 0.0, 4.0, 7.0]])]
xs = rng.random((2, 4, 8, 8))
ps = deformcp.ps_roi_align(xs, per_image, 2)
print(ps.shape, checked(deformcp.ps_roi_align_backward(ones(ps.shape), xs, per_image, 2).input))

weight, offset = rng.random((4, 3, 3, 3)), np.zeros((2, 18, 8, 8))
conv = deformcp.deform_conv2d(x, offset, weight, None, stride=1, padding=(1, 1), mask=np.ones((2, 9, 8, 8)))
dc: deformcp.DeformConv2dGrads = deformcp.deform_conv2d_backward(ones(conv.shape), x, offset, weight, padding=1)
print(conv.shape, checked(dc.input), checked(dc.offset), checked(dc.weight), dc.bias, dc.mask)

drp = deformcp.deform_roi_pool(x, boxes, None, output_size=3, gamma=0.1)
drg: deformcp.DeformRoIPoolGrads = deformcp.deform_roi_pool_backward(ones(drp.shape), x, boxes, output_size=3)
print(drp.shape, checked(drg.input), drg.offset, drg.mask)

xp = rng.random((2, 2 * 9, 8, 8))
dps = deformcp.deform_ps_roi_pool(xp, boxes, None, output_dim=2, group_size=3, pooled_size=3, no_trans=True)
dpg = deformcp.deform_ps_roi_pool_backward(ones(dps.shape), xp, boxes, None, 2, 3, 3, no_trans=True)
assert isinstance(dpg, deformcp.DeformPSRoIPoolGrads)
print(dps.shape, checked(dpg.input))

loss = deformcp.mimic_loss(rng.random((5, 7)), rng.random((5, 7)))
ml: deformcp.MimicLossGrads = deformcp.mimic_loss_backward(np.ones(()), rng.random((5, 7)), rng.random((5, 7)))
print(loss.shape, float(np.asarray(loss)), checked(ml.f_a), checked(ml.f_b))

shapes = [(4, 4), (2, 2)]
value = rng.random((1, 20, 2, 3))
locations, weights = rng.random((1, 5, 2, 2, 2, 2)), rng.random((1, 5, 2, 2, 2))
attn = deformcp.ms_deform_attn(value, shapes, None, locations, weights, method="default")
ms: deformcp.MSDeformAttnGrads = deformcp.ms_deform_attn_backward(ones(attn.shape), value, np.array(shapes),
                                                                   [0, 16], locations, weights)
print(attn.shape, checked(ms.value), checked(ms.sampling_locations), checked(ms.attention_weights))
packed = rng.random((1, 5, 2, 2 * 2 * 3))
flash = deformcp.flash_deform_attn(value, shapes, [0, 16], packed, num_points=2)
fg: deformcp.FlashDeformAttnGrads = deformcp.flash_deform_attn_backward(ones(flash.shape), value, shapes, None,
                                                                         packed, 2)
print(flash.shape, checked(fg.value), checked(fg.sampling_loc_attn))
dx, d_off, d_mask = rng.random((1, 5, 6, 4)), rng.random((1, 5, 6, 2 * 9 * 2)), rng.random((1, 5, 6, 2 * 9))
geometry = (3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)
v3 = deformcp.dcnv3(dx, d_off, d_mask, *geometry)
v3g: deformcp.DCNv3Grads = deformcp.dcnv3_backward(ones(v3.shape), dx, d_off, d_mask, *geometry, remove_center=False)
d_packed = rng.random((1, 5, 6, 56))
v4 = deformcp.dcnv4(dx, d_packed, *geometry, softmax=True)
v4g: deformcp.DCNv4Grads = deformcp.dcnv4_backward(ones(v4.shape), dx, d_packed, *geometry, softmax=True)
print(v3.shape, checked(v3g.input), checked(v3g.offset), checked(v3g.mask), checked(v4g.offset_mask))

# ------------------------------------------------------------------------------------------- torch
t = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
t_theta = torch.tensor(theta, requires_grad=True)
t_grid = dtorch.affine_grid(t_theta, t.shape)
t_y: torch.Tensor = dtorch.grid_sample(t, t_grid, align_corners=None)
t_grads = torch.autograd.grad(t_y.sum(), [t, t_theta])
print(t_y.shape, [g.shape for g in t_grads])
print(dtorch.affine_sample(t, t_theta, (2, 3, 4, 4), align_corners=True).shape)
t_boxes = torch.tensor(boxes)
print(dtorch.roi_align(t, t_boxes, 2).shape, dtorch.ps_roi_align(torch.tensor(xs), list(torch.tensor(
    [[[1.0, 1.0, 6.0, 6.0]], [[0.0, 0.0, 4.0, 7.0]]], dtype=torch.float64)), 2).shape)
print(dtorch.deform_conv2d(t, torch.zeros(2, 18, 8, 8).double(), torch.tensor(weight), padding=1).shape)
print(dtorch.deform_roi_pool(t, t_boxes, output_size=3).shape,
      dtorch.deform_ps_roi_pool(torch.tensor(xp), t_boxes, None, 2, 3, 3, no_trans=True).shape)
print(dtorch.mimic_loss(torch.rand(5, 7), torch.rand(5, 7)).item())
print(dtorch.dcnv3(torch.tensor(dx), torch.tensor(d_off), torch.tensor(d_mask), *geometry, 256).shape,
      dtorch.dcnv4(torch.tensor(dx), torch.tensor(d_packed), *geometry, softmax=False).shape)
t_value = torch.tensor(value)
print(dtorch.ms_deform_attn(t_value, torch.tensor(shapes), None, torch.tensor(locations), torch.tensor(weights)).shape,
      dtorch.flash_deform_attn(t_value, shapes, None, torch.tensor(packed), 2).shape)
image = torch.rand(6, 7, dtype=torch.float64)
print(dtorch.map_coordinates(image, torch.rand(2, 3, 4, dtype=torch.float64) * 5).shape,
      dtorch.affine_transform(image, torch.eye(2, dtype=torch.float64), 0.5, output_shape=(4, 4)).shape)

layers: list[torch.nn.Module] = [  # every module, built
    dtorch.DeformConv2d(3, 4, 3, padding=1), dtorch.DeformConv2dPack(3, 4, 3, padding=1, deform_groups=1),
    dtorch.ModulatedDeformConv2dPack(3, 4, (3, 3), padding=1), dtorch.RoIAlign(2, aligned=True),
    dtorch.PSRoIAlign((2, 2)), dtorch.DeformRoIPool(2, 3, deform_fc_channels=8),
    dtorch.DeformRoIPoolPack(2, 3, deform_fc_channels=8), dtorch.ModulatedDeformRoIPool(2, 3, deform_fc_channels=8),
    dtorch.ModulatedDeformRoIPoolPack(2, 3, deform_fc_channels=8), dtorch.SpatialTransformer(3, output_size=(4, 4)),
    dtorch.MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2), dtorch.DCNv3(8, group=2),
    dtorch.DCNv4(32, group=2)]
offset_layer = dtorch.DeformConv2d(3, 4, 3, padding=1)
print(offset_layer(t.float(), torch.zeros(2, 18, 8, 8)).shape,
      dtorch.ModulatedDeformConv2dPack(3, 4, 3, padding=1)(t.float()).shape)
print(dtorch.RoIAlign(2)(t, t_boxes).shape, dtorch.PSRoIAlign(2)(torch.tensor(xs), t_boxes).shape,
      dtorch.DeformRoIPool(2, 3, deform_fc_channels=8)(t.float(), t_boxes.float()).shape)
stn = dtorch.SpatialTransformer(3, output_size=(4, 4))
print(stn(t.float()).shape, stn.theta(t.float()).shape, len(layers))
attention = dtorch.MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
query, ref = torch.rand(1, 5, 8), torch.rand(1, 5, 2, 2)
print(attention(query, ref, torch.rand(1, 20, 8), shapes, [0, 16]).shape)

# ------------------------------------------------------------------------------------------- JAX
j_x = jnp.asarray(x, dtype=jnp.float32)
j_grid = djax.affine_grid(jnp.asarray(theta, dtype=jnp.float32), x.shape)
print(djax.grid_sample(j_x, j_grid, deterministic=True).shape)
print(djax.affine_sample(j_x, jnp.asarray(theta, dtype=jnp.float32), mode="nearest").shape)
j_boxes = jnp.asarray(boxes, dtype=jnp.float32)
print(djax.roi_align(j_x, j_boxes, 2).shape, djax.ps_roi_align(jnp.asarray(xs, dtype=jnp.float32), j_boxes, 2).shape)
print(djax.deform_conv2d(j_x, jnp.zeros((2, 18, 8, 8)), jnp.ones((4, 3, 3, 3)), padding=1).shape)
print(djax.deform_roi_pool(j_x, j_boxes, output_size=3).shape,
      djax.deform_ps_roi_pool(jnp.asarray(xp, dtype=jnp.float32), j_boxes, None, 2, 3, 3, no_trans=True).shape)
print(djax.mimic_loss(jnp.ones((5, 7)), jnp.ones((5, 7))).shape)
j_value = jnp.asarray(value, dtype=jnp.float32)
print(djax.ms_deform_attn(j_value, shapes, None, jnp.asarray(locations, dtype=jnp.float32),
                          jnp.asarray(weights, dtype=jnp.float32)).shape,
      djax.flash_deform_attn(j_value, shapes, None, jnp.asarray(packed, dtype=jnp.float32), 2).shape)
print(djax.dcnv3(jnp.asarray(dx), jnp.asarray(d_off), jnp.asarray(d_mask), *geometry).shape,
      djax.dcnv4(jnp.asarray(dx), jnp.asarray(d_packed), *geometry, deterministic=True).shape)
j_image = jnp.ones((6, 7))
print(djax.map_coordinates(j_image, jnp.ones((2, 3, 4))).shape,
      djax.affine_transform(j_image, jnp.eye(2), 0.5, output_shape=(4, 4)).shape)
