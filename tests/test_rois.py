"""Boxes of the RoI ops: a (K, 5) array, a list of per-image (L, 4) arrays, or an empty list. Every RoI op, in
every front door (the NumPy functions, deformcp.torch's functions and modules, deformcp.jax), gives for each
the output and input gradient of the (K, 5) array they stand for (_validate.boxes_to_rois)."""
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import deformcp  # noqa: E402
import deformcp.jax as djax  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402

N, C, H, W = 3, 8, 7, 8
#: Boxes per image: image 1 has none.
PER_IMAGE = (2, 0, 3)


class Op(NamedTuple):
    options: dict                       # the op's options, in every front door
    offset: bool                        # takes a per-RoI offset (K, 2, 2, 2) after the boxes
    channels: int                       # output channels
    module: Optional[Callable] = None   # deformcp.torch module taking (input, rois), if there is one


OPS = {
    "roi_align": Op(dict(output_size=2, sampling_ratio=2, aligned=True), False, C,
                    lambda: dtorch.RoIAlign(2, 1.0, 2, aligned=True)),
    "ps_roi_align": Op(dict(output_size=2, sampling_ratio=2), False, C // 4, lambda: dtorch.PSRoIAlign(2, 1.0, 2)),
    "deform_roi_pool": Op(dict(output_size=2, sampling_ratio=2, gamma=0.1), True, C,
                          lambda: dtorch.DeformRoIPool(2, C, 16, sampling_ratio=2)),
    "deform_ps_roi_pool": Op(dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=0.1), True,
                             2),
}


def per_image_boxes(rng):
    """[x1, y1, x2, y2] per image, float32, PER_IMAGE[i] boxes for image i."""
    boxes = []
    for L in PER_IMAGE:
        x1, y1 = rng.uniform(-2, W - 2, L), rng.uniform(-2, H - 2, L)
        boxes.append(np.stack([x1, y1, x1 + rng.uniform(0.5, W / 2, L), y1 + rng.uniform(0.5, H / 2, L)],
                              axis=1).astype(np.float32))
    return boxes


def stacked(boxes):
    """The (K, 5) [batch_index, x1, y1, x2, y2] array of per-image boxes."""
    return np.concatenate([np.zeros((0, 5), np.float32)] + [
        np.concatenate([np.full((len(b), 1), i, np.float32), b], axis=1) for i, b in enumerate(boxes)])


def run_numpy(name):
    op = OPS[name]

    def run(x, boxes, offset, g):
        args = (x, boxes) + ((offset,) if op.offset else ())
        return (getattr(deformcp, name)(*args, **op.options),
                getattr(deformcp, f"{name}_backward")(g, *args, **op.options).input)
    return run


def run_torch(name):
    op = OPS[name]

    def run(x, boxes, offset, g):
        x = torch.from_numpy(x).requires_grad_()
        boxes = [torch.from_numpy(b) for b in boxes] if isinstance(boxes, list) else torch.from_numpy(boxes)
        out = getattr(dtorch, name)(x, boxes, *((torch.from_numpy(offset),) if op.offset else ()), **op.options)
        out.backward(torch.from_numpy(g))
        return out.detach().numpy(), x.grad.numpy()
    return run


def run_torch_module(name):
    torch.manual_seed(0)
    module = OPS[name].module()

    def run(x, boxes, offset, g):  # a deformable module makes its own offsets
        x = torch.from_numpy(x).requires_grad_()
        boxes = [torch.from_numpy(b) for b in boxes] if isinstance(boxes, list) else torch.from_numpy(boxes)
        out = module(x, boxes)
        out.backward(torch.from_numpy(g))
        return out.detach().numpy(), x.grad.numpy()
    return run


def run_jax(name):
    op = OPS[name]

    def run(x, boxes, offset, g):
        boxes = [jnp.asarray(b) for b in boxes] if isinstance(boxes, list) else jnp.asarray(boxes)
        more = (jnp.asarray(offset),) if op.offset else ()
        out, vjp = jax.vjp(lambda x: getattr(djax, name)(x, boxes, *more, **op.options), jnp.asarray(x))
        return np.asarray(out), np.asarray(vjp(jnp.asarray(g))[0])
    return run


DOORS = {"numpy": run_numpy, "torch": run_torch, "torch module": run_torch_module, "jax": run_jax}
FORMS = ("array", "list", "empty list")


def cases():
    for name, op in OPS.items():
        for door in DOORS:
            if door == "torch module" and op.module is None:
                continue
            for form in FORMS:
                yield pytest.param(name, door, form, id=f"{name}-{door}-{form}")


@pytest.mark.parametrize("name, door, form", list(cases()))
def test_boxes_in_every_form_give_the_results_of_the_array(rng, name, door, form):
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    per_image = per_image_boxes(rng)
    rois = stacked(per_image) if form != "empty list" else np.zeros((0, 5), np.float32)
    boxes = {"array": rois, "list": per_image, "empty list": []}[form]
    K = len(rois)
    offset = rng.standard_normal((K, 2, 2, 2)).astype(np.float32)
    g = rng.standard_normal((K, OPS[name].channels, 2, 2)).astype(np.float32)
    run = DOORS[door](name)
    # the (K, 5) array through the NumPy function (a module: through the same module)
    want_out, want_grad = (run if door == "torch module" else run_numpy(name))(x, rois, offset, g)
    out, grad = run(x, boxes, offset, g)
    assert out.shape == (K, OPS[name].channels, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(grad, want_grad)
