"""Golden reference data for roi_align / ps_roi_align from torchvision, for tests without torchvision.

Generate it, from the repository root, with a Python that has torch and torchvision:

    python benchmarks/torchvision_reference.py            # writes tests/data/torchvision_roi_align.npz
    python benchmarks/torchvision_reference.py --list     # prints the cases of the existing file

Every case is computed by torchvision.ops.roi_align / ps_roi_align on the CPU in float64: the forward
output, and the input gradient (autograd) for a random grad_output. The cases are small random problems
covering: roi_align (pool_mode "avg", the only one torchvision has) with aligned False/True, sampling_ratio
-1/0/1/3, spatial_scale 1 and 0.5, non-square output sizes; boxes inside the image, partly outside,
wholly outside, larger than the image, of zero size (a point) and zero width; samples exactly on the
edges of the valid range (−1, H, W); inverted boxes (x2 < x1); no boxes at all; and ps_roi_align with
sampling_ratio -1/0/1/2, spatial_scale 1 and 0.5 and several output sizes. No case produces NaN or inf
(checked here): ps_roi_align divides by the number of samples, which is 0 for a zero-size box with
adaptive sampling (sampling_ratio <= 0), so zero-size boxes appear in ps_roi_align only with
sampling_ratio > 0; and inverted boxes appear with aligned=True only with sampling_ratio > 0
(with adaptive sampling the per-bin sample count is negative and torchvision's CPU kernel raises).

File layout (np.load(path) needs no allow_pickle):

- ``index``: a 0-d unicode array holding JSON: {"generator", "torch", "torchvision", "seed",
  "layout", "cases": [{"name", "op", "output_size": [ph, pw], "spatial_scale", "sampling_ratio",
  "aligned" (roi_align only), "pool_mode" (roi_align only), "box_kinds": [one label per box row],
  "description", "shapes": {array: shape}}, ...]}
- for each case name: ``<name>.input`` (N, C, H, W), ``<name>.boxes`` (K, 5) rows (batch index, x1, y1,
  x2, y2), ``<name>.grad_output`` (K, C_out, ph, pw), ``<name>.output`` (K, C_out, ph, pw),
  ``<name>.grad_input`` (N, C, H, W); all float64. Inputs and grad_output are multiples of 1/32 in
  [−4, 4) (exact in float32 too); boxes are unrounded float64.

Reading it::

    data = np.load("tests/data/torchvision_roi_align.npz")
    for case in json.loads(str(data["index"]))["cases"]:
        x, boxes = data[case["name"] + ".input"], data[case["name"] + ".boxes"]
        ...
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "tests" / "data" / "torchvision_roi_align.npz"
FIELDS = ("input", "boxes", "grad_output", "output", "grad_input")
SEED = 20240611
MAX_BYTES = 300_000


def dyadic(rng, shape):
    """Random multiples of 1/32 in [−4, 4): exact in float32 and float64, and they compress well."""
    return rng.integers(-128, 128, shape).astype(np.float64) / 32.0


# ------------------------------------------------------------------------------------------------- boxes

def mixed_boxes(rng, N, H, W, spatial_scale, zero_size=True):
    """Boxes of every kind, in image coordinates (feature size / spatial_scale), and their labels."""
    h, w = H / spatial_scale, W / spatial_scale          # the image's size
    boxes, kinds = [], []

    def add(kind, x1, y1, x2, y2):
        boxes.append([rng.integers(0, N), x1, y1, x2, y2])
        kinds.append(kind)

    for _ in range(3):
        x1, y1 = rng.uniform(0, 0.7 * w), rng.uniform(0, 0.7 * h)
        add("inside", x1, y1, rng.uniform(x1 + 0.5, w), rng.uniform(y1 + 0.5, h))
    add("partly outside (left, top)", rng.uniform(-0.4 * w, -0.05 * w), rng.uniform(-0.4 * h, -0.05 * h),
        rng.uniform(0.2 * w, 0.6 * w), rng.uniform(0.2 * h, 0.6 * h))
    add("partly outside (right, bottom)", rng.uniform(0.4 * w, 0.8 * w), rng.uniform(0.4 * h, 0.8 * h),
        rng.uniform(1.05 * w, 1.4 * w), rng.uniform(1.05 * h, 1.4 * h))
    add("larger than the image", rng.uniform(-0.3 * w, -0.1 * w), rng.uniform(-0.3 * h, -0.1 * h),
        rng.uniform(1.1 * w, 1.3 * w), rng.uniform(1.1 * h, 1.3 * h))
    x1 = rng.uniform(1.3 * w, 1.6 * w)
    add("wholly outside (right)", x1, rng.uniform(0, 0.5 * h), x1 + rng.uniform(1, 0.5 * w), rng.uniform(0.6 * h, h))
    y2 = rng.uniform(-0.6 * h, -0.3 * h)
    add("wholly outside (above)", rng.uniform(0, 0.5 * w), y2 - rng.uniform(1, 0.5 * h), rng.uniform(0.6 * w, w), y2)
    if zero_size:
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        add("zero size (a point)", x, y, x, y)
        x, y1 = rng.uniform(0, w), rng.uniform(0, 0.5 * h)
        add("zero width", x, y1, x, rng.uniform(y1 + 1, h))
    return np.array(boxes, dtype=np.float64), kinds


def edge_boxes(rng, N, H, W, aligned):
    """spatial_scale 1, sampling_ratio 1, output (1, 1): each box's single sample sits at its centre (boxes
    2 px wide; aligned=True shifts the sample by −0.5, so its boxes are shifted by +0.5), placed exactly on or
    just beyond the edges of the valid range −1 ≤ x ≤ W, −1 ≤ y ≤ H (all coordinates dyadic, so exact in
    any evaluation order)."""
    shift = 0.5 if aligned else 0.0
    centres = [("x = −1", -1.0, H / 2), ("x = −1.5 (beyond)", -1.5, H / 2), ("x = −0.5", -0.5, H / 2),
               ("x = W", float(W), H / 2), ("x = W + 0.5 (beyond)", W + 0.5, H / 2),
               ("x = W − 0.5", W - 0.5, H / 2), ("x = W − 1", W - 1.0, H / 2),
               ("y = −1", W / 2, -1.0), ("y = H", W / 2, float(H)), ("y = H + 0.25 (beyond)", W / 2, H + 0.25),
               ("x = −1, y = H (corner)", -1.0, float(H)), ("x = W, y = −1 (corner)", float(W), -1.0),
               ("x = 0, y = 0", 0.0, 0.0)]
    boxes = [[rng.integers(0, N), cx - 1.0 + shift, cy - 1.0 + shift, cx + 1.0 + shift, cy + 1.0 + shift]
             for _, cx, cy in centres]
    return np.array(boxes, dtype=np.float64), [f"sample at {label}" for label, _, _ in centres]


def inverted_boxes(rng, N, H, W):
    """Boxes with x2 < x1 and/or y2 < y1 (torchvision: aligned=False makes them 1 px; aligned=True keeps
    the negative size)."""
    boxes, kinds = [], []
    for kind, flip_x, flip_y in (("x2 < x1", True, False), ("y2 < y1", False, True), ("both", True, True),
                                 ("x2 < x1", True, False), ("both", True, True)):
        x1, y1 = rng.uniform(0, 0.6 * W), rng.uniform(0, 0.6 * H)
        x2, y2 = x1 + rng.uniform(1, 0.4 * W), y1 + rng.uniform(1, 0.4 * H)
        if flip_x:
            x1, x2 = x2, x1
        if flip_y:
            y1, y2 = y2, y1
        boxes.append([rng.integers(0, N), x1, y1, x2, y2])
        kinds.append(f"inverted ({kind})")
    x1, y1 = rng.uniform(0, 0.5 * W), rng.uniform(0, 0.5 * H)
    boxes.append([rng.integers(0, N), x1, y1, x1 + 3.0, y1 + 2.0])
    kinds.append("inside (normal)")
    return np.array(boxes, dtype=np.float64), kinds


# ------------------------------------------------------------------------------------------------- cases

def case_specs():
    """(name, op, params, input shape, boxes maker) for every case."""
    specs = []
    sizes = [(3, 5), (2, 2), (4, 3), (1, 1), (5, 2), (7, 7), (2, 4), (3, 3)]
    i = 0
    for aligned in (False, True):
        for sampling_ratio in (-1, 0, 1, 3):
            for spatial_scale in (1.0, 0.5):
                size = sizes[i % len(sizes)]
                shape = (2, 2, 6 + i % 4, 7 + (3 * i) % 5)
                name = f"roi_align_{i:02d}"
                specs.append((name, "roi_align", {"output_size": size, "spatial_scale": spatial_scale,
                                                  "sampling_ratio": sampling_ratio, "aligned": aligned},
                              shape, "mixed"))
                i += 1
    specs += [
        ("roi_align_edges", "roi_align", {"output_size": (1, 1), "spatial_scale": 1.0, "sampling_ratio": 1,
                                          "aligned": False}, (1, 2, 5, 6), "edges"),
        ("roi_align_edges_aligned", "roi_align", {"output_size": (1, 1), "spatial_scale": 1.0,
                                                  "sampling_ratio": 1, "aligned": True}, (1, 2, 5, 6), "edges"),
        ("roi_align_inverted", "roi_align", {"output_size": (2, 3), "spatial_scale": 1.0, "sampling_ratio": -1,
                                             "aligned": False}, (2, 2, 8, 9), "inverted"),
        # (no inverted boxes with aligned=True and adaptive sampling: the sample count per bin is then
        # ceil(negative) and torchvision's CPU kernel raises "cannot create std::vector larger than
        # max_size()")
        ("roi_align_inverted_aligned_sr2", "roi_align", {"output_size": (3, 2), "spatial_scale": 1.0,
                                                         "sampling_ratio": 2, "aligned": True},
         (2, 2, 8, 9), "inverted"),
        ("roi_align_no_boxes", "roi_align", {"output_size": (3, 5), "spatial_scale": 1.0, "sampling_ratio": 2,
                                             "aligned": True}, (2, 2, 5, 6), "none"),
        ("roi_align_single_channel", "roi_align", {"output_size": (7, 7), "spatial_scale": 0.25,
                                                   "sampling_ratio": -1, "aligned": True}, (1, 1, 6, 8),
         "mixed"),
    ]
    ps = [(-1, 1.0, (2, 3), 2), (-1, 0.5, (3, 3), 1), (0, 1.0, (1, 2), 3), (0, 0.5, (2, 2), 2),
          (1, 1.0, (3, 2), 1), (1, 0.5, (2, 3), 2), (2, 1.0, (3, 3), 1), (2, 0.5, (1, 1), 3)]
    for j, (sampling_ratio, spatial_scale, size, c_out) in enumerate(ps):
        shape = (2, c_out * size[0] * size[1], 5 + j % 3, 6 + (2 * j) % 4)
        specs.append((f"ps_roi_align_{j:02d}", "ps_roi_align",
                      {"output_size": size, "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio},
                      shape, "mixed" if sampling_ratio > 0 else "mixed, no zero size"))
    return specs


def make_boxes(kind, rng, shape, params):
    N, _, H, W = shape
    if kind == "edges":
        return edge_boxes(rng, N, H, W, params["aligned"])
    if kind == "inverted":
        return inverted_boxes(rng, N, H, W)
    if kind == "none":
        return np.zeros((0, 5)), []
    if kind in ("mixed", "mixed, no zero size"):
        return mixed_boxes(rng, N, H, W, params["spatial_scale"], zero_size=(kind == "mixed"))
    raise ValueError(f"unknown box kind {kind!r}")


def run_torchvision(op, x, boxes, grad_output_shape_fn, rng, params):
    import torch
    import torchvision.ops

    fn = getattr(torchvision.ops, op)
    kwargs = {"spatial_scale": params["spatial_scale"], "sampling_ratio": params["sampling_ratio"]}
    if op == "roi_align":
        kwargs["aligned"] = params["aligned"]
    xt = torch.from_numpy(x).requires_grad_(True)
    out = fn(xt, torch.from_numpy(boxes), list(params["output_size"]), **kwargs)
    grad_output = dyadic(rng, tuple(out.shape))
    (grad_input,) = torch.autograd.grad(out, xt, torch.from_numpy(grad_output), allow_unused=True)
    grad_input = np.zeros_like(x) if grad_input is None else grad_input.numpy()
    return grad_output, out.detach().numpy(), grad_input


def generate(seed=SEED) -> tuple[dict, dict]:
    import torch
    import torchvision

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    arrays, cases = {}, []
    for name, op, params, shape, kind in case_specs():
        x = dyadic(rng, shape)
        boxes, kinds = make_boxes(kind, rng, shape, params)
        grad_output, out, grad_input = run_torchvision(op, x, boxes, None, rng, params)
        for field, value in zip(FIELDS, (x, boxes, grad_output, out, grad_input)):
            if not np.all(np.isfinite(value)):
                raise RuntimeError(f"{name}: {field} is not finite; change the case")
            arrays[f"{name}.{field}"] = np.ascontiguousarray(value, dtype=np.float64)
        entry = {"name": name, "op": op, "output_size": list(params["output_size"]),
                 "spatial_scale": params["spatial_scale"], "sampling_ratio": params["sampling_ratio"]}
        if op == "roi_align":
            entry.update(aligned=params["aligned"], pool_mode="avg")
        entry["box_kinds"] = kinds
        entry["description"] = {"mixed": "boxes of every kind", "mixed, no zero size":
                                "boxes of every kind but zero size (adaptive sampling would divide by 0)",
                                "edges": "single samples exactly on / just beyond the valid range's edges",
                                "inverted": "inverted boxes (x2 < x1 and/or y2 < y1)",
                                "none": "no boxes (K = 0)"}[kind]
        entry["shapes"] = {field: list(arrays[f"{name}.{field}"].shape) for field in FIELDS}
        cases.append(entry)
    index = {"generator": "benchmarks/torchvision_reference.py", "command":
             "python benchmarks/torchvision_reference.py", "torch": torch.__version__,
             "torchvision": torchvision.__version__, "seed": seed, "dtype": "float64", "device": "cpu",
             "layout": "<name>.{input,boxes,grad_output,output,grad_input}; boxes rows (batch, x1, y1, x2, y2)",
             "cases": cases}
    return index, arrays


def describe(index: dict) -> str:
    lines = [f"torch {index['torch']}, torchvision {index['torchvision']}, seed {index['seed']}, "
             f"{len(index['cases'])} cases"]
    for c in index["cases"]:
        params = (f"out {tuple(c['output_size'])} scale {c['spatial_scale']:g} sr {c['sampling_ratio']}"
                  + (f" aligned {c['aligned']}" if c["op"] == "roi_align" else ""))
        s = c["shapes"]
        lines.append(f"  {c['name']:<32} {params:<40} input {tuple(s['input'])} boxes {tuple(s['boxes'])} "
                     f"output {tuple(s['output'])}  [{c['description']}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_PATH)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--list", action="store_true", help="print the cases of the existing file and stop")
    args = parser.parse_args(argv)
    if args.list:
        with np.load(args.output) as data:
            print(describe(json.loads(str(data["index"]))))
        return 0
    index, arrays = generate(args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, index=np.array(json.dumps(index)), **arrays)
    size = args.output.stat().st_size
    print(describe(index))
    print(f"wrote {args.output} ({size / 1000:.1f} kB)")
    if size > MAX_BYTES:
        print(f"warning: larger than {MAX_BYTES / 1000:.0f} kB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
