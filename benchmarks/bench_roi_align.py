"""Benchmark: roi_align and ps_roi_align (Mask R-CNN / R-FCN RoI pooling), deformcp against torchvision.

Run as ``python benchmarks/bench_roi_align.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how
every benchmark runs). Options beyond every benchmark's: --ops roi_align ps_roi_align, --cases
sampling_ratio=2 adaptive, --shape N C H W and --boxes K (for every case), --dtype, --deterministic,
--max-row-time S (fewer timed calls, at least 5, where one call is slow; default 30 s a row).

What is timed (the cases of the issues):

- sampling_ratio=2, roi_align: input 2×256×100×152 float32 (--device cuda: 2×256×200×304), 512 boxes
                (cuda: 1024), output 7×7, sampling_ratio 2, aligned=True, spatial_scale 1, pool_mode "avg"
- sampling_ratio=2, ps_roi_align: the same with 245 = 5·7·7 input channels (5 output channels),
                sampling_ratio 2, spatial_scale 1 (ps_roi_align has no ``aligned``: it always shifts by half
                a pixel)
- adaptive, roi_align: input 2×256×200×304 float32 (every device), 1000 boxes, sampling_ratio 0
                (detectron2's default: ceil(bin size) samples per bin and axis, so about 8×8 per bin here),
                otherwise as above
- --quick: input 2×4×12×16 (ps_roi_align: 2×245×12×16), 6 boxes, both cases

Boxes (K, 5) rows (batch index, x1, y1, x2, y2), in the input's dtype: batch index uniform in {0 … N−1},
width and height uniform in [8, 100] pixels (at most the image's size), placed uniformly inside the
image; fixed seed.

- forward:          roi_align (torchvision: under no_grad)
- forward+backward: roi_align then roi_align_backward (input gradient) for a random grad_output
                    (torchvision: autograd with requires_grad on the input, then backward)

--device cpu (default) times deformcp's NumPy path, deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``) and torchvision on the CPU. --device cuda times deformcp
on CuPy arrays against torchvision on CUDA (exits with a message where CuPy sees no GPU). torchvision is
optional: without it only deformcp is timed. Before anything is timed, every implementation's output
and input gradient are checked once against torchvision on the CPU in the timed dtype (or, without
torchvision, against deformcp's NumPy path in float64); a mismatch or an error stops the run (exit
status 1).

Results: printed, and written to benchmarks/results/roi_align[_cuda].{json,md}. Ratios are deformcp time
/ torchvision time: below 1 deformcp is faster.
"""
from __future__ import annotations

import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_roi_align.py: this folder is first on sys.path
    import harness

torch, torchvision = harness.optional_torchvision()

OPS = ("roi_align", "ps_roi_align")            # the ops of deformcp.ops.SPECS timed here (--ops: some)
PHASES = ("forward", "forward+backward")
OUTPUT_SIZE = (7, 7)
ALIGNED, SPATIAL_SCALE, POOL_MODE = True, 1.0, "avg"
PS_GROUPS = 5                                   # ps_roi_align output channels: C = 5 · 7 · 7 = 245
BOX_SIDE = (8.0, 100.0)                         # box width and height range, pixels
#: The cases (--cases: some): their ops, sampling_ratio, and per device (and --quick) the input shape and boxes.
CASES = {
    "sampling_ratio=2": {"ops": OPS, "sampling_ratio": 2,
                         "sizes": {"cpu": {"shape": (2, 256, 100, 152), "boxes": 512},
                                   "cuda": {"shape": (2, 256, 200, 304), "boxes": 1024},
                                   "quick": {"shape": (2, 4, 12, 16), "boxes": 6}}},
    "adaptive": {"ops": ("roi_align",), "sampling_ratio": 0,
                 "sizes": {"cpu": {"shape": (2, 256, 200, 304), "boxes": 1000},
                           "cuda": {"shape": (2, 256, 200, 304), "boxes": 1000},
                           "quick": {"shape": (2, 4, 12, 16), "boxes": 6}}},
}
MAX_ROW_TIME = 30.0                             # seconds of timed calls a row (the host backend's adaptive rows)
#: max_ratio: the most deformcp time / torchvision time may be; target: what the issue asks. Default sizes.
TARGETS = ({"op": "roi_align", "case": "sampling_ratio=2", "impl": "deformcp numpy", "phase": "forward",
            "max_ratio": 0.5, "target": "at least 2× faster than torchvision forward"},
           {"op": "roi_align", "case": "sampling_ratio=2", "impl": "deformcp numpy", "phase": "forward+backward",
            "max_ratio": 0.25, "target": "at least 4× faster than torchvision forward+backward"},
           {"op": "roi_align", "case": "adaptive", "impl": "deformcp numpy", "phase": "forward",
            "max_ratio": 0.5, "target": "at least 2× faster than torchvision forward"},
           {"op": "roi_align", "case": "adaptive", "impl": "deformcp numpy", "phase": "forward+backward",
            "max_ratio": 0.5, "target": "at least 2× faster than torchvision forward+backward"})
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
REFERENCE = "torchvision cpu" if torchvision is not None else "deformcp numpy float64"


class Problem(harness.ArrayCase):
    """One op's arrays, NumPy: input (N, C, H, W), boxes (K, 5), grad_output (K, C_out, 7, 7)."""

    def __init__(self, op, case, shape, K, dtype, seed):
        rng = np.random.default_rng([seed, OPS.index(op)])
        N, C, H, W = shape
        if op == "ps_roi_align":
            C = PS_GROUPS * OUTPUT_SIZE[0] * OUTPUT_SIZE[1]
        self.op, self.case, self.shape = op, case, (N, C, H, W)
        self.sampling_ratio = CASES[case]["sampling_ratio"]
        c_out = C // (OUTPUT_SIZE[0] * OUTPUT_SIZE[1]) if op == "ps_roi_align" else C
        self.set_arrays({"input": rng.standard_normal(self.shape),
                         "boxes": harness.random_rois(rng, K, N, H, W, BOX_SIDE, SPATIAL_SCALE),
                         "grad_output": rng.standard_normal((K, c_out, *OUTPUT_SIZE))}, dtype)

    @property
    def kwargs(self) -> dict:
        if self.op == "ps_roi_align":
            return {"spatial_scale": SPATIAL_SCALE, "sampling_ratio": self.sampling_ratio}
        return {"spatial_scale": SPATIAL_SCALE, "sampling_ratio": self.sampling_ratio, "aligned": ALIGNED}

    def describe(self) -> str:
        K = self.arrays["boxes"].shape[0]
        adaptive = " (adaptive)" if self.sampling_ratio <= 0 else ""
        text = (f"{self.case}, {self.op}: input {'×'.join(map(str, self.shape))} {self.dtype}, {K} boxes "
                f"(sides {BOX_SIDE[0]:g}–{BOX_SIDE[1]:g} px, inside the image), output "
                f"{OUTPUT_SIZE[0]}×{OUTPUT_SIZE[1]}, sampling_ratio {self.sampling_ratio}{adaptive}, "
                f"spatial_scale {SPATIAL_SCALE:g}")
        return text + (f", aligned={ALIGNED}, pool_mode {POOL_MODE}" if self.op == "roi_align" else "")


class Deformcp(harness.DeformcpOp):
    """deformcp's RoI op (``problem.op``) forward / forward+backward (the input gradient) through its spec, on
    one backend ("numpy", "host", or "cuda" for CuPy arrays)."""

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        self.op = problem.op
        self.options = {"output_size": OUTPUT_SIZE, **problem.kwargs,
                        **({"pool_mode": POOL_MODE} if problem.op == "roi_align" else {})}
        super().__init__(backend, problem, deterministic, move)


def torchvision_op(device, problem: Problem) -> harness.TorchOp:
    """torchvision.ops.roi_align / ps_roi_align on one device, through autograd on the input."""
    fn, kwargs = getattr(torchvision.ops, problem.op), problem.kwargs
    return harness.TorchOp(lambda t: fn(t["input"], t["boxes"], OUTPUT_SIZE, **kwargs), problem.arrays, ("input",),
                           device)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "roi_align", max_row_time=MAX_ROW_TIME)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    harness.add_case_arguments(parser, "roi_align input shape of every case (default sampling_ratio=2: 2 256 100 152, "
                                       "cuda 2 256 200 304; adaptive: 2 256 200 304; --quick 2 4 12 16); "
                                       "ps_roi_align uses C = 245",
                               ("--boxes", "number of boxes of every case (default sampling_ratio=2: 512, cuda "
                                           "1024; adaptive: 1000; --quick 6)"))
    return parser


def problems(args) -> list[Problem]:
    return [Problem(op, case, *harness.case_size(args, CASES[case]["sizes"], "boxes"), args.dtype, args.seed)
            for case in CASES if case in args.cases for op in CASES[case]["ops"] if op in args.ops]


def build(setup: harness.DeviceSetup, problem: Problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls), and torchvision where it
    runs."""
    impls = harness.deformcp_impls(
        setup, lambda backend, move: Deformcp(backend, problem, args.deterministic, move))
    if setup.torch_device is not None:
        impls[f"torchvision {setup.device}"] = torchvision_op(setup.torch_device, problem)
    return impls


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Output and input gradient against :data:`REFERENCE`; raises harness.VerificationFailed for a
    deformcp mismatch or error."""
    reference = (torchvision_op("cpu", problem) if torchvision is not None
                 else Deformcp("numpy", problem.astype(np.float64)))
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()]
    return harness.verify(f"{problem.case} {problem.op}", REFERENCE, reference, checks, TOLERANCE, notes, timed=impls)


def report(run: harness.Run, problems: list[Problem]) -> tuple[str, list]:
    baseline, records = run.baseline, run.records
    timed = {(p.op, p.case) for p in problems}
    headers = ["case", "op", "phase", "implementation", *harness.timing_headers(baseline)]
    rows = [[r.extra["case"], r.extra["op"], r.phase, r.impl, *harness.timing_cells(records, r, baseline)]
            for r in records]
    default_case = run.args.dtype == "float32" and all(
        harness.case_size(run.args, CASES[p.case]["sizes"], "boxes")
        == tuple(CASES[p.case]["sizes"][run.args.device].values()) for p in problems)
    targets = harness.evaluate_targets([t for t in TARGETS if (t["op"], t["case"]) in timed], records, baseline,
                                       default_case, missing="no torchvision")
    if ("ps_roi_align", "sampling_ratio=2") in timed and baseline:  # roi_align's bar, for ps_roi_align too
        for t in TARGETS[:2]:
            value = harness.ratio(records, baseline, t["impl"], t["phase"], op="ps_roi_align", case=t["case"])
            if value is not None:
                targets.append({"op": "ps_roi_align", "case": t["case"], "impl": t["impl"], "phase": t["phase"],
                                "max_ratio": t["max_ratio"], "ratio": value, "status": "information only (" +
                                ("within" if value <= t["max_ratio"] else "beyond") + " roi_align's bar)",
                                "target": t["target"]})
    markdown = harness.report_markdown(
        title="roi_align and ps_roi_align",
        case_lines=["Cases:", "", *(f"- {p.describe()}" for p in problems), "",
                    "Boxes: (K, 5) rows (batch index, x1, y1, x2, y2) in the input's dtype, batch index uniform "
                    "over the batch, sides uniform in [8, 100] px, wholly inside the image; fixed seed. "
                    "forward+backward = forward, then the input gradient for a random grad_output "
                    "(torchvision: autograd)."],
        run=run, compared="case, op and phase", no_baseline=harness.no_baseline("torchvision", torchvision),
        headers=headers, rows=rows, targets=targets, verification=f"relative errors against {REFERENCE}")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torchvision", torchvision))
    if run is None:
        return 2
    cases = problems(run.args)
    for problem in cases:
        if not run.measure(problem, build(run.setup, problem, run.args), verify, PHASES,
                           extra={"op": problem.op, "case": problem.case}, label=f"{problem.case} {problem.op:<13} "):
            return 1
    run.finish()
    markdown, targets = report(run, cases)
    run.save("roi_align", markdown, {
        "cases": [p.describe() for p in cases], "ops": [p.op for p in cases],
        "sizes": {c: dict(zip(("shape", "boxes"), harness.case_size(run.args, CASES[c]["sizes"], "boxes")))
                  for c in run.args.cases},
        "sampling_ratio": {c: CASES[c]["sampling_ratio"] for c in run.args.cases},
        "dtype": run.args.dtype, "output_size": OUTPUT_SIZE, "aligned": ALIGNED, "spatial_scale": SPATIAL_SCALE,
        "pool_mode": POOL_MODE, "ps_channels": PS_GROUPS * np.prod(OUTPUT_SIZE), "box_side_px": BOX_SIDE,
        "max_row_time_s": run.args.max_row_time}, targets, compared="case, op and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
