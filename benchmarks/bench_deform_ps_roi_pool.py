"""Benchmark: deform_ps_roi_pool (Deformable ConvNets v1 deformable position-sensitive RoI pooling, the
Deformable R-FCN head), deformcp only: there is no anchor to compare with.

Run as ``python benchmarks/bench_deform_ps_roi_pool.py`` (``--quick``: a smoke run at tiny sizes; harness.py:
how every benchmark runs). Options beyond every benchmark's: --shape N H W, --rois K, --dtype, --trans /
--no-trans (only the variant with / without offsets; default both), --deterministic.

What is timed (the class-agnostic box-regression branch of a Deformable R-FCN head, as in the original
MXNet model: 7×7 position-sensitive score maps on a stride-16 feature map):

- deformable: input 2×392×50×76 float32 (392 = output_dim 8 · group_size 7², the 4 box coordinates of 2
  regression classes), 256 RoIs (--device cuda: 1024 RoIs on the same input), output_dim 8, group_size 7,
  pooled_size 7, part_size 7, sample_per_part 4, spatial_scale 1/16, trans_std 0.1; offsets (K, 2, 7, 7)
  = 0.5 · N(0, 1) (one class of offsets, shared by the 8 outputs; in units of trans_std · RoI width /
  height: each part moves by about 0.05 · the RoI's side).
- no_trans: the branch that predicts those offsets, the same pooling without offsets (no_trans=True,
  offset None): input 2×98×50×76 (output_dim 2 · 7²), output_dim 2, the same RoIs and other options.
- RoIs (K, 5) rows (batch index, x1, y1, x2, y2) in image coordinates (the feature map × 16: 800×1216
  pixels), in the input's dtype: batch index uniform in {0 … N−1}, width and height uniform in [64, 800]
  pixels (at most the image's size), placed uniformly inside the image. Input and grad_output N(0, 1).
  All drawn in float64 with a fixed seed, then rounded to the dtype.
- --quick: input 2×C×10×12 (the same channels), 6 RoIs.

- forward:          deform_ps_roi_pool
- forward+backward: deform_ps_roi_pool, then deform_ps_roi_pool_backward for the gradients of input and
                    offset (input only without offsets)

--device cpu (default) times deformcp's NumPy path and deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``); --device cuda times deformcp on CuPy arrays (exits with a
message where CuPy sees no GPU).

No anchor: the library whose DeformablePSROIPooling semantics deform_ps_roi_pool follows (mmcv, or the
original MXNet operator) cannot be installed here, and no installable library has the op, so only
deformcp is timed, without ratios.

Verification, before anything is timed (a deformcp error beyond the tolerance, an output of another
dtype, or an exception stops the run, exit status 1): every deformcp implementation's output (from
forward+backward and from forward alone) and its input and offset gradients against deformcp's NumPy path
in float64 on the same (rounded) inputs, as ‖a − b‖ / ‖b‖ (tolerance 1e-4 for float32, 1e-10 for float64).

Results: printed, and written to benchmarks/results/deform_ps_roi_pool[_cuda].{json,md}.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_deform_ps_roi_pool.py: this folder is first on sys.path
    import harness

OPS = ("deform_ps_roi_pool",)                  # the ops of deformcp.ops.SPECS timed here
PHASES = ("forward", "forward+backward")
GROUP_SIZE = POOLED_SIZE = PART_SIZE = 7
SAMPLE_PER_PART, SPATIAL_SCALE, TRANS_STD = 4, 1 / 16, 0.1
OUTPUT_DIM = {True: 8, False: 2}               # with offsets (box regression) / no_trans (the offset branch)
OFFSET_SCALE = 0.5                             # offsets = OFFSET_SCALE · N(0, 1), in units of trans_std · RoI size
ROI_SIDE = (64.0, 800.0)                       # RoI width and height range, image pixels
DEFAULTS = {"cpu": {"shape": (2, 50, 76), "rois": 256},
            "cuda": {"shape": (2, 50, 76), "rois": 1024},
            "quick": {"shape": (2, 10, 12), "rois": 6}}
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
REFERENCE = "deformcp numpy float64"
NO_ANCHOR = ("No anchor (mmcv, whose DeformablePSROIPooling semantics deform_ps_roi_pool follows, cannot be "
             "installed here)")
NO_TARGETS = "Targets: none (there is no anchor to set them against)."


# ---------------------------------------------------------------------------------------------- inputs

class Problem(harness.ArrayCase):
    """One variant's arrays, NumPy: input (N, output_dim·7², H, W), rois (K, 5), offset (K, 2, 7, 7) or None
    (no_trans), grad_output (K, output_dim, 7, 7). Both variants draw the same RoIs (same seed)."""

    def __init__(self, shape, K, dtype, trans: bool, seed: int):
        rng = np.random.default_rng([seed, 0])
        N, H, W = shape
        self.trans, self.output_dim, self.K = trans, OUTPUT_DIM[trans], K
        self.shape = (N, self.output_dim * GROUP_SIZE ** 2, H, W)
        rois = harness.random_rois(rng, K, N, H, W, ROI_SIDE, SPATIAL_SCALE)
        offset = OFFSET_SCALE * rng.standard_normal((K, 2, PART_SIZE, PART_SIZE))
        self.set_arrays({"input": rng.standard_normal(self.shape), "rois": rois, "offset": offset if trans else None,
                         "grad_output": rng.standard_normal((K, self.output_dim, POOLED_SIZE, POOLED_SIZE))}, dtype)

    @property
    def options(self) -> dict:
        """deform_ps_roi_pool's other arguments."""
        return {"output_dim": self.output_dim, "group_size": GROUP_SIZE, "pooled_size": POOLED_SIZE,
                "part_size": PART_SIZE, "sample_per_part": SAMPLE_PER_PART, "spatial_scale": SPATIAL_SCALE,
                "trans_std": TRANS_STD, "no_trans": not self.trans}

    @property
    def label(self) -> str:
        """Short name of the variant: its row label."""
        return ("deformable" if self.trans else "no_trans") + ("" if self.dtype == "float32" else f" {self.dtype}")

    def describe(self) -> str:
        N, C, H, W = self.shape
        return (f"input {N}×{C}×{H}×{W} {self.dtype}, {self.K} RoIs (sides {ROI_SIDE[0]:g}–{ROI_SIDE[1]:g} image "
                f"px, inside the image), output_dim {self.output_dim}, group_size {GROUP_SIZE}, pooled_size "
                f"{POOLED_SIZE}, part_size {PART_SIZE}, sample_per_part {SAMPLE_PER_PART}, spatial_scale "
                f"1/{1 / SPATIAL_SCALE:g}, trans_std {TRANS_STD:g}, "
                + (f"offsets (K, 2, {PART_SIZE}, {PART_SIZE}) {OFFSET_SCALE:g}·N(0, 1)" if self.trans
                   else "no_trans (no offsets)"))


class Deformcp(harness.DeformcpOp):
    """deformcp.deform_ps_roi_pool forward / forward+backward (the gradients of input and offset) through its
    spec, on one backend ("numpy", "host", or "cuda" for CuPy arrays)."""

    op = "deform_ps_roi_pool"

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        self.options = problem.options
        super().__init__(backend, problem, deterministic, move)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "deform_ps_roi_pool")
    parser.add_argument("--shape", type=harness.positive, nargs=3, default=None, metavar=("N", "H", "W"),
                        help="input batch and feature map size (default 2 50 76; --quick 2 10 12); the channels "
                             "are output_dim·7²")
    parser.add_argument("--rois", type=harness.positive, default=None,
                        help="number of RoIs (default 256; cuda 1024; --quick 6)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--trans", action=argparse.BooleanOptionalAction, default=None,
                        help="only the variant with offsets (deformable) or without (no_trans) (default: both)")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to deformcp.deform_ps_roi_pool_backward")
    return parser


def problems(args) -> list[Problem]:
    shape, K = harness.case_size(args, DEFAULTS, "rois")
    variants = (True, False) if args.trans is None else (args.trans,)
    return [Problem(shape, K, args.dtype, trans, args.seed) for trans in variants]


def build(setup: harness.DeviceSetup, problem: Problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls)."""
    return harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, args.deterministic, move))


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Every deformcp implementation of ``impls`` against deformcp's NumPy path in float64 on the same
    (rounded) inputs: output, and the gradients of input and offset."""
    reference = Deformcp("numpy", problem.astype(np.float64))
    checks = [(name, impl, problem.dtype, True) for name, impl in impls.items() if name.startswith("deformcp")]
    return harness.verify(problem.label, REFERENCE, reference, checks, TOLERANCE, notes, timed=impls)


def report(run: harness.Run, problems: list[Problem]) -> str:
    records, baseline = run.records, run.baseline
    headers = ["variant", "phase", "implementation", *harness.timing_headers(baseline)]
    rows = [[r.extra["variant"], r.phase, r.impl, *harness.timing_cells(records, r, baseline)] for r in records]
    case_lines = [
        "Cases (a Deformable R-FCN head's box-regression branch and the branch that predicts its offsets):", "",
        *(f"- {p.label}: {p.describe()}" for p in problems), "",
        "RoIs: (K, 5) rows (batch index, x1, y1, x2, y2) in image coordinates (feature map × 16) in the input's "
        f"dtype, batch index uniform over the batch, sides uniform in [{ROI_SIDE[0]:g}, {ROI_SIDE[1]:g}] px, wholly "
        f"inside the image. Offsets = {OFFSET_SCALE:g}·N(0, 1) in units of trans_std·RoI width/height (parts move by "
        f"about {TRANS_STD * OFFSET_SCALE:g}·the RoI's side); input and grad_output N(0, 1); drawn in float64, "
        "rounded to the dtype; fixed seed. forward+backward = deform_ps_roi_pool, then deform_ps_roi_pool_backward "
        "for the gradients of input and offset (input only for no_trans).",
        "",
        "**No anchor.** mmcv (whose DeformablePSROIPooling semantics deform_ps_roi_pool follows) cannot be "
        "installed here and no installable library has the op: deformcp's implementations only, verified against "
        "deformcp's NumPy path in float64.",
    ]
    return harness.report_markdown(
        title="deform_ps_roi_pool (no anchor)", case_lines=case_lines, run=run, compared="variant and phase",
        no_baseline=NO_ANCHOR, headers=headers, rows=rows, targets=[], no_targets=NO_TARGETS,
        verification="relative errors ‖a − b‖ / ‖b‖: deformcp against its NumPy path in float64 on the same "
                     "rounded inputs (output and the input and offset gradients)")


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv)
    if run is None:
        return 2
    args = run.args
    shape, K = harness.case_size(args, DEFAULTS, "rois")
    cases = problems(args)
    for problem in cases:
        if not run.measure(problem, build(run.setup, problem, args), verify, PHASES, extra={"variant": problem.label},
                           label=f"{problem.label:<10} "):
            return 1
    run.finish()
    run.save("deform_ps_roi_pool", report(run, cases), {
        "cases": [{"variant": p.label, "description": p.describe(), "shape": p.shape, "no_trans": not p.trans,
                   "output_dim": p.output_dim} for p in cases],
        "shape": shape, "rois": K, "dtype": args.dtype, "group_size": GROUP_SIZE, "pooled_size": POOLED_SIZE,
        "part_size": PART_SIZE, "sample_per_part": SAMPLE_PER_PART, "spatial_scale": SPATIAL_SCALE,
        "trans_std": TRANS_STD, "offset_scale": OFFSET_SCALE, "roi_side_px": ROI_SIDE,
        "anchor": "none: mmcv (DeformablePSROIPooling) cannot be installed here; deformcp only"}, [],
        compared="variant and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
