"""Benchmark: deform_roi_pool (Deformable ConvNets v1/v2 RoI pooling, mmcv's DeformRoIPool semantics), deformcp
with torchvision.ops.roi_align as a reference point.

Run as ``python benchmarks/bench_deform_roi_pool.py`` (``--quick``: a smoke run at tiny sizes; harness.py:
how every benchmark runs). Options beyond every benchmark's: --shape N C H W, --rois K, --dtype, --mask /
--no-mask (only the variant with / without a mask; default both), --deterministic.

What is timed (the case of the issue):

- input 2×256×50×76 float32, 256 RoIs (--device cuda: 1024 RoIs on the same input), output 7×7,
  sampling_ratio 2, gamma 0.1, spatial_scale 1; offsets (K, 2, 7, 7) = 0.5 · N(0, 1) (in units of
  γ · RoI width / height: each bin moves by about 0.05 · the RoI's side, 0.4–3 px), without a mask (DCN v1,
  DeformRoIPool) and with one (DCN v2, ModulatedDeformRoIPool: mask (K, 1, 7, 7) = sigmoid(N(0, 1))).
- RoIs (K, 5) rows (batch index, x1, y1, x2, y2), in the input's dtype: batch index uniform in
  {0 … N−1}, width and height uniform in [8, 60] pixels (at most the image's size), placed uniformly
  inside the image. grad_output N(0, 1). All drawn in float64 with a fixed seed, then rounded to the dtype.
- --quick: input 2×4×10×12, 6 RoIs.

- forward:          deform_roi_pool
- forward+backward: deform_roi_pool, then deform_roi_pool_backward for the gradients of input, offset and
                    mask (where there is one)

--device cpu (default) times deformcp's NumPy path and deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``); --device cuda times deformcp on CuPy arrays (exits with a
message where CuPy sees no GPU).

The anchor: mmcv (the library whose semantics deform_roi_pool follows) cannot be installed here, so the
ratios are taken against torchvision.ops.roi_align (aligned=True, same output size, sampling_ratio and
spatial_scale; on the CPU, or on CUDA for --device cuda) on the same input and RoIs, when torchvision is
importable. That is the same pooling without the offsets (and without the mask): a reference point for
the cost of RoI pooling, **not the same op** — deform_roi_pool also computes every bin's shift, and its
backward also the offset and mask gradients, while roi_align's forward+backward (autograd, input with
requires_grad) computes the input gradient only. In the variant with a mask the anchor is the same plain
roi_align (timed again beside it).

Verification, before anything is timed (a deformcp error beyond the tolerance, an output of another
dtype, or an exception stops the run, exit status 1): every deformcp implementation's output (from
forward+backward and from forward alone) and its input, offset and mask gradients against deformcp's
NumPy path in float64 on the same (rounded) inputs, as ‖a − b‖ / ‖b‖ (tolerance 1e-4 for float32, 1e-10
for float64); and, with a zero offset and no mask, the output and input gradient of every deformcp
implementation, and of deformcp's NumPy path in float64, against torchvision's roi_align in float64 (on
the anchor's device).

Results: printed, and written to benchmarks/results/deform_roi_pool[_cuda].{json,md}. Ratios are
deformcp time / torchvision roi_align time: below 1 deformcp is faster — but see above: the two do not
compute the same thing.
"""
from __future__ import annotations

import argparse
import copy
import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_deform_roi_pool.py: this folder is first on sys.path
    import harness

torch, torchvision = harness.optional_torchvision()

OPS = ("deform_roi_pool",)                     # the ops of deformcp.ops.SPECS timed here
PHASES = ("forward", "forward+backward")
GRADS = harness.SPECS["deform_roi_pool"].differentiable   # input, offset, mask: the backward's fields
OUTPUT_SIZE = (7, 7)
SAMPLING_RATIO, SPATIAL_SCALE, GAMMA = 2, 1.0, 0.1
ALIGNED = True                                 # torchvision's roi_align: deform_roi_pool's geometry is aligned
OFFSET_SCALE = 0.5                             # offsets = OFFSET_SCALE · N(0, 1), in units of γ · RoI size
ROI_SIDE = (8.0, 60.0)                         # RoI width and height range, pixels
DEFAULTS = {"cpu": {"shape": (2, 256, 50, 76), "rois": 256},
            "cuda": {"shape": (2, 256, 50, 76), "rois": 1024},
            "quick": {"shape": (2, 4, 10, 12), "rois": 6}}
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
NO_TARGETS = ("Targets: none. torchvision's roi_align is a reference point for the cost of RoI pooling, not the "
              "same op (no offsets, no mask; its backward gives the input gradient only), so no ratio here is a "
              "pass/fail bar.")


# ---------------------------------------------------------------------------------------------- inputs

class Problem(harness.ArrayCase):
    """One variant's arrays, NumPy: input (N, C, H, W), rois (K, 5), offset (K, 2, PH, PW), mask
    (K, 1, PH, PW) or None, grad_output (K, C, PH, PW). Both variants draw the same arrays (same seed); the
    one without a mask leaves it out."""

    def __init__(self, shape, K, dtype, mask: bool, seed: int):
        rng = np.random.default_rng([seed, 0])
        N, C, H, W = shape
        PH, PW = OUTPUT_SIZE
        self.shape, self.K, self.has_mask = tuple(shape), K, mask
        self.zero_offset = False
        x = rng.standard_normal(shape)
        rois = harness.random_rois(rng, K, N, H, W, ROI_SIDE, SPATIAL_SCALE)
        offset = OFFSET_SCALE * rng.standard_normal((K, 2, PH, PW))
        m = 1.0 / (1.0 + np.exp(-rng.standard_normal((K, 1, PH, PW))))
        grad_output = rng.standard_normal((K, C, PH, PW))
        self.set_arrays({"input": x, "rois": rois, "offset": offset, "mask": m if mask else None,
                         "grad_output": grad_output}, dtype)

    def without_offset(self) -> "Problem":
        """The same input, RoIs and grad_output with a zero offset and no mask: plain aligned RoIAlign."""
        other = copy.copy(self)
        other.has_mask, other.zero_offset = False, True
        other.arrays = {**self.arrays, "offset": np.zeros_like(self.arrays["offset"]), "mask": None}
        return other

    @property
    def label(self) -> str:
        """Short name of the variant: its row label."""
        if self.zero_offset:
            return f"zero offset, no mask {self.dtype}"
        return ("v2 (mask)" if self.has_mask else "v1 (no mask)") + ("" if self.dtype == "float32" else
                                                                      f" {self.dtype}")

    def describe(self) -> str:
        N, C, H, W = self.shape
        return (f"input {N}×{C}×{H}×{W} {self.dtype}, {self.K} RoIs (sides {ROI_SIDE[0]:g}–{ROI_SIDE[1]:g} px, "
                f"inside the image), output {OUTPUT_SIZE[0]}×{OUTPUT_SIZE[1]}, sampling_ratio {SAMPLING_RATIO}, "
                f"spatial_scale {SPATIAL_SCALE:g}, gamma {GAMMA:g}, "
                + ("zero offset" if self.zero_offset else f"offsets {OFFSET_SCALE:g}·N(0, 1)") + ", "
                + ("mask sigmoid(N(0, 1)) (v2)" if self.has_mask else "no mask (v1)"))


class Deformcp(harness.DeformcpOp):
    """deformcp.deform_roi_pool forward / forward+backward (the gradients of input, offset and mask) through
    its spec, on one backend ("numpy", "host", or "cuda" for CuPy arrays)."""

    op = "deform_roi_pool"
    options = {"output_size": OUTPUT_SIZE, "spatial_scale": SPATIAL_SCALE, "sampling_ratio": SAMPLING_RATIO,
               "gamma": GAMMA}


def roi_align_op(device, problem: Problem) -> harness.TorchOp:
    """The anchor: torchvision.ops.roi_align (aligned=True) on one device, through autograd on the input.
    Ignores the offset and the mask: not the same op (see the module's docstring)."""
    def call(t):
        return torchvision.ops.roi_align(t["input"], t["rois"], OUTPUT_SIZE, spatial_scale=SPATIAL_SCALE,
                                         sampling_ratio=SAMPLING_RATIO, aligned=ALIGNED)

    return harness.TorchOp(call, problem.arrays, ("input",), device)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "deform_roi_pool")
    harness.add_case_arguments(parser, "input shape (default 2 256 50 76; --quick 2 4 10 12)",
                               ("--rois", "number of RoIs (default 256; cuda 1024; --quick 6)"),
                               "deformcp.deform_roi_pool_backward")
    parser.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                        help="only the variant with a mask (v2) or without (v1) (default: both)")
    return parser


def problems(args) -> list[Problem]:
    shape, K = harness.case_size(args, DEFAULTS, "rois")
    masks = (False, True) if args.mask is None else (args.mask,)
    return [Problem(shape, K, args.dtype, mask, args.seed) for mask in masks]


def build(setup: harness.DeviceSetup, problem: Problem, args, anchor=True) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls), and (``anchor``)
    torchvision's roi_align where it runs."""
    impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, args.deterministic, move))
    if anchor and torchvision is not None and setup.torch_device is not None:
        impls[f"torchvision roi_align {setup.device}"] = roi_align_op(setup.torch_device, problem)
    return impls


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Every deformcp implementation of ``impls`` against deformcp's NumPy path in float64 on the same
    (rounded) inputs: output, and the gradients of input, offset and mask."""
    reference = Deformcp("numpy", problem.astype(np.float64))
    checks = [(name, impl, problem.dtype, True) for name, impl in impls.items() if name.startswith("deformcp")]
    return harness.verify(problem.label, "deformcp numpy float64", reference, checks, TOLERANCE, notes, grads=GRADS)


def verify_zero_offset(setup: harness.DeviceSetup, problem: Problem, args, notes: list) -> dict:
    """With a zero offset and no mask, deform_roi_pool is aligned RoIAlign: every deformcp implementation (in
    the timed dtype), deformcp's NumPy path in float64 and the timed torchvision anchor (information only)
    against torchvision's roi_align in float64 — output and input gradient."""
    if torchvision is None:
        notes.append("no zero-offset check against torchvision's roi_align (torchvision is not installed)")
        print("  zero offset: torchvision is not installed, no check against roi_align")
        return {}
    plain = problem.without_offset()
    device = setup.torch_device if setup.torch_device is not None else "cpu"
    reference_name = f"torchvision roi_align {torch.device(device).type} float64"
    reference = roi_align_op(device, plain.astype(np.float64))
    checks = [(name, impl, plain.dtype, True) for name, impl in build(setup, plain, args, anchor=False).items()]
    if plain.dtype != "float64":
        checks.append(("deformcp numpy float64", Deformcp("numpy", plain.astype(np.float64)), "float64", True))
    if setup.torch_device is not None:
        checks.append((f"torchvision roi_align {setup.device}", roi_align_op(setup.torch_device, plain),
                       plain.dtype, False))
    return harness.verify(plain.label, reference_name, reference, checks, TOLERANCE, notes, grads=("input",))


def report(run: harness.Run, problems: list[Problem]) -> str:
    records, baseline = run.records, run.baseline
    headers = ["variant", "phase", "implementation", *harness.timing_headers(baseline)]
    rows = [[r.extra["variant"], r.phase, r.impl, *harness.timing_cells(records, r, baseline)] for r in records]
    case_lines = [
        "Cases:", "", *(f"- {p.label}: {p.describe()}" for p in problems), "",
        "RoIs: (K, 5) rows (batch index, x1, y1, x2, y2) in the input's dtype, batch index uniform over the "
        f"batch, sides uniform in [{ROI_SIDE[0]:g}, {ROI_SIDE[1]:g}] px, wholly inside the image. Offsets (K, 2, 7, 7) "
        f"= {OFFSET_SCALE:g}·N(0, 1) in units of γ·RoI width/height (bins move by about "
        f"{GAMMA * OFFSET_SCALE:g}·the RoI's side); mask (K, 1, 7, 7) = sigmoid(N(0, 1)); grad_output N(0, 1); "
        "drawn in float64, rounded to the dtype; fixed seed. forward+backward = deform_roi_pool, then "
        "deform_roi_pool_backward for the gradients of input, offset and mask (where there is one).",
        "",
        "**The anchor is not the same op.** mmcv (whose DeformRoIPool semantics deform_roi_pool follows) is not "
        "installable here, so the ratios are against torchvision.ops.roi_align (aligned=True, same output size, "
        "sampling_ratio and spatial_scale, same input and RoIs): the same RoI pooling *without* the offsets and "
        "the mask, a reference point for what RoI pooling costs. deform_roi_pool does more: it shifts every "
        "bin, multiplies by the mask, and its backward also returns the offset and mask gradients, while "
        "roi_align's forward+backward (autograd, input with requires_grad) returns the input gradient only. "
        "The variant with a mask is compared with the same plain roi_align, timed again beside it.",
    ]
    return harness.report_markdown(
        title="deform_roi_pool (anchor: torchvision roi_align, not the same op)", case_lines=case_lines, run=run,
        compared="variant and phase", no_baseline=harness.no_baseline("torchvision", torchvision), headers=headers,
        rows=rows, targets=[], no_targets=NO_TARGETS,
        verification="relative errors ‖a − b‖ / ‖b‖: deformcp against its NumPy path in float64 on the same "
                     "rounded inputs (output and the input, offset and mask gradients); with a zero offset and no "
                     "mask, against torchvision's roi_align in float64 (output and input gradient)")


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torchvision", torchvision))
    if run is None:
        return 2
    args = run.args
    shape, K = harness.case_size(args, DEFAULTS, "rois")
    if torchvision is not None and run.setup.torch_device is None:
        run.notes.append(f"torchvision's roi_align cannot run on {args.device} here: deformcp times only, no ratios")
    cases = problems(args)
    print("verifying with a zero offset and no mask (relative errors) ...")
    if not run.verified(lambda: verify_zero_offset(run.setup, cases[0], args, run.notes)):
        return 1
    for problem in cases:
        if not run.measure(problem, build(run.setup, problem, args), verify, PHASES, extra={"variant": problem.label},
                           label=f"{problem.label:<13} "):
            return 1
    run.finish()
    run.save("deform_roi_pool", report(run, cases), {
        "cases": [{"variant": p.label, "description": p.describe(), "mask": p.has_mask} for p in cases],
        "shape": shape, "rois": K, "dtype": args.dtype, "output_size": OUTPUT_SIZE,
        "sampling_ratio": SAMPLING_RATIO, "spatial_scale": SPATIAL_SCALE, "gamma": GAMMA,
        "offset_scale": OFFSET_SCALE, "roi_side_px": ROI_SIDE,
        "anchor": (f"torchvision.ops.roi_align (aligned={ALIGNED}, same output size, sampling_ratio, "
                   "spatial_scale, input and RoIs): the same pooling without the offsets and the mask, input "
                   "gradient only; a reference point, not the same op")}, [], compared="variant and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
