"""Benchmark: deform_conv2d (Deformable ConvNets v1/v2), deformcp against torchvision.ops.deform_conv2d.

Run as ``python benchmarks/bench_deform_conv.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how
every benchmark runs). Options beyond every benchmark's: --shape N C H W with --out-channels C_out (one case
instead of the defaults), --dtype (one or more of float32 float16 float64), --mask / --no-mask,
--deterministic, --max-row-time S (fewer timed calls, at least 5, where one call is slow; default 40 s a
row).

What is timed:

- --device cpu (default), the case of the issue: input 1×256×50×76 float32, weight 256×256×3×3, bias,
  stride 1, padding 1, dilation 1, one offset group, with a mask (DCN v2); deformcp's NumPy path,
  deformcp's host backend (the CUDA sources compiled for the CPU: ``with deformcp.backend("host")``)
  and torchvision on the CPU. Also the NumPy path's peak extra memory (tracemalloc, see below).
- --device cuda: inputs 2×128×100×152 (128 → 128 channels), 2×256×50×76, 2×512×25×38 and
  64×256×14×14 (C → C), 3×3, stride 1, padding 1, without a mask (DCN v1; --mask adds one), in float32
  and float16; deformcp on CuPy arrays against torchvision on CUDA (exits with a message where CuPy sees
  no GPU).
- --quick: input 1×4×8×10, 4 → 5 channels, the device's mask and dtypes.
- --large-image (CPU): input 1×128×200×304 (128 → 128; an FPN level of an 800×1216 image), with a mask and
  without, float32, under the default workspace limit (512 MiB: the NumPy path splits the image into
  ranges of output rows); deformcp's NumPy path against torchvision, in turns.
- --conv-floor (CPU): the four --device cuda shapes with a mask, float32; deformcp's NumPy path against
  torch.nn.functional.conv2d of the same shapes (weight, bias, stride, padding, dilation; forward+backward:
  the input, weight and bias gradients), in turns. The bilinear sampling (the columns, the offset and mask
  gradients) is the work a deformable convolution adds to a convolution: the ratio says how close the NumPy
  path comes to that floor.

Inputs (fixed seed): input N(0, 1); weight N(0, 1) / sqrt(C_in·3·3); bias N(0, 1); offsets N(0, 2²)
(realistic deformations: a sample moves about 2 pixels, and some leave the image) rounded to odd multiples
of 1/512 px (float32 holds every sample position exactly and none is an integer: the offset gradient jumps
at integer coordinates, and a position rounded across one would differ from the float64 reference); mask
sigmoid(N(0, 1)); grad_output N(0, 1). All are drawn in float64 and rounded to the timed dtype.

- forward:          deform_conv2d (torchvision: under no_grad)
- forward+backward: deform_conv2d, then deform_conv2d_backward for all five gradients (input, offset,
                    weight, bias, mask; mask only where there is one) for grad_output (torchvision:
                    autograd with requires_grad on all five, then backward)

Verification: before anything is timed, every implementation's output (from forward+backward and from
forward alone) and every gradient is compared with torchvision in float64 on the same (rounded) inputs
(on CUDA where torch has CUDA, else on the CPU; without torchvision, deformcp's NumPy path in float64),
as ‖a − b‖ / ‖b‖. A deformcp error above 1e-4 (float32; float16: 1e-2, float64: 1e-10), a deformcp
output of another dtype, or an exception from any timed implementation stops the run (exit status 1).
torchvision itself beyond those bounds is reported, not stopped on. On the CPU deformcp's NumPy path on
float64 inputs is compared with torchvision as well (information only).

Memory (--device cpu): the NumPy path's peak of traced memory above the level before the call, for
forward and for forward+backward, measured with tracemalloc in a separate untimed call (NumPy registers
its array buffers with tracemalloc, also from worker threads; what C/C++ code mallocs by itself, such as
scipy.sparse's sparsetools temporaries, is not traced). The outputs are part of the peak.

Results: printed, and written to benchmarks/results/deform_conv[_cuda|_large|_floor].{json,md}. Ratios are
deformcp time / torchvision time (--conv-floor: / conv2d time): below 1 deformcp is faster. The tables give
each row's median, quartiles, min and max.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_deform_conv.py: this folder is first on sys.path
    import harness

torch, torchvision = harness.optional_torchvision()
if torch is None:  # torch alone still gives the conv2d floor
    try:
        import torch
    except ImportError:
        torch = None

OPS = ("deform_conv2d",)                                   # the ops of deformcp.ops.SPECS timed here
PHASES = ("forward", "forward+backward")
GRADS = harness.SPECS["deform_conv2d"].differentiable      # input, offset, weight, bias, mask
KERNEL, STRIDE, PADDING, DILATION = (3, 3), 1, 1, 1
OFFSET_STD = 2.0                                            # offsets ~ N(0, OFFSET_STD²) pixels
#: offsets are rounded to odd multiples of half this (px): float32 then holds every sample position exactly and
#: none is an integer, so the offset gradient's jumps at integer coordinates fall alike in float32, in the float64
#: reference and in torchvision (whose one-sided derivative at an integer is not deformcp's)
OFFSET_STEP = 2.0**-8
#: (N, C_in, H, W, C_out) cases per device; the CPU one is the target case (with a mask, float32)
CASES = {"cpu": ((1, 256, 50, 76, 256),),
         "cuda": ((2, 128, 100, 152, 128), (2, 256, 50, 76, 256), (2, 512, 25, 38, 512),
                  (64, 256, 14, 14, 256)),
         "quick": ((1, 4, 8, 10, 5),),
         "large": ((1, 128, 200, 304, 128),)}
CASES["floor"] = CASES["cuda"]
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16")}
MASK = {"cpu": True, "cuda": False}
#: The runs beside the default one: --large-image and --conv-floor (CPU, float32), their anchors and results names.
MODES = {"large": {"anchor": "torchvision", "masks": (True, False), "results": "deform_conv_large"},
         "floor": {"anchor": "torch conv2d", "masks": (True,), "results": "deform_conv_floor"}}
#: deformcp NumPy path time / torchvision CPU time: the targets for the default CPU case
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 0.5,
            "target": "at least 2× faster than torchvision forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than torchvision forward+backward"})
#: --large-image: deformcp NumPy path / torchvision CPU, each case, under the default workspace limit
LARGE_TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 0.5,
                  "target": "at least 2× faster than torchvision forward"},
                 {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 0.5,
                  "target": "at least 2× faster than torchvision forward+backward"})
#: --conv-floor: deformcp NumPy path / torch conv2d of the same shapes, each case
FLOOR_TARGETS = ({"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 2.5,
                  "target": "forward+backward within 2.5× of conv2d's"},)
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}


# ---------------------------------------------------------------------------------------------- inputs

def output_size(size: int, k: int) -> int:
    return (size + 2 * PADDING - DILATION * (k - 1) - 1) // STRIDE + 1


class Problem(harness.ArrayCase):
    """One case's arrays, NumPy: input (N, C, H, W), offset (N, 2·kh·kw, H_out, W_out), weight
    (C_out, C, kh, kw), bias (C_out,), mask (N, kh·kw, H_out, W_out) or None, grad_output."""

    def __init__(self, shape, c_out, dtype, mask, seed, index=0):
        rng = np.random.default_rng([seed, index])
        N, C, H, W = shape
        kh, kw = KERNEL
        Ho, Wo = output_size(H, kh), output_size(W, kw)
        self.shape, self.c_out, self.has_mask = tuple(shape), c_out, mask
        self.out_shape = (N, c_out, Ho, Wo)
        x = rng.standard_normal(shape)
        weight = rng.standard_normal((c_out, C, kh, kw)) / np.sqrt(C * kh * kw)
        bias = rng.standard_normal(c_out)
        offset = OFFSET_STD * rng.standard_normal((N, 2 * kh * kw, Ho, Wo))
        offset = (np.floor(offset / OFFSET_STEP) + 0.5) * OFFSET_STEP
        m = 1.0 / (1.0 + np.exp(-rng.standard_normal((N, kh * kw, Ho, Wo)))) if mask else None
        grad_output = rng.standard_normal(self.out_shape)
        self.set_arrays({"input": x, "offset": offset, "weight": weight, "bias": bias, "mask": m,
                         "grad_output": grad_output}, dtype)

    @property
    def label(self) -> str:
        """Short name of the case: its row label and key."""
        N, C, H, W = self.shape
        return (f"{N}×{C}×{H}×{W} {C}→{self.c_out} {'v2 (mask)' if self.has_mask else 'v1 (no mask)'} "
                f"{self.dtype}")

    def describe(self) -> str:
        N, C, H, W = self.shape
        kh, kw = KERNEL
        return (f"input {N}×{C}×{H}×{W} {self.dtype}, weight {self.c_out}×{C}×{kh}×{kw} with bias, stride "
                f"{STRIDE}, padding {PADDING}, dilation {DILATION}, 1 offset group, offsets N(0, "
                f"{OFFSET_STD:g}²) half-way between the points of a 1/{1 / OFFSET_STEP:g} px grid, "
                + ("mask sigmoid(N(0, 1)) (v2)" if self.has_mask else "no mask (v1)")
                + f"; output {'×'.join(map(str, self.out_shape))}")

    def columns_bytes(self) -> int:
        """Size of an im2col column matrix (C·kh·kw × N·H_out·W_out) in this dtype, for scale."""
        N, C = self.shape[:2]
        Ho, Wo = self.out_shape[2:]
        return C * KERNEL[0] * KERNEL[1] * N * Ho * Wo * np.dtype(self.dtype).itemsize


class Deformcp(harness.DeformcpOp):
    """deformcp.deform_conv2d forward / forward+backward (all five gradients) through its spec, on one backend
    ("numpy", "host", or "cuda" for CuPy arrays)."""

    op = "deform_conv2d"
    options = {"stride": STRIDE, "padding": PADDING, "dilation": DILATION}


def torchvision_op(device, problem: Problem) -> harness.TorchOp:
    """torchvision.ops.deform_conv2d on one device, through autograd on input, offset, weight, bias and mask."""
    def call(t):
        return torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=STRIDE,
                                             padding=PADDING, dilation=DILATION, mask=t["mask"])

    return harness.TorchOp(call, problem.arrays, GRADS, device)


def conv2d_op(problem: Problem) -> harness.TorchOp:
    """torch.nn.functional.conv2d of the case's shapes on the CPU, through autograd on input, weight and bias."""
    def call(t):
        return torch.nn.functional.conv2d(t["input"], t["weight"], t["bias"], stride=STRIDE, padding=PADDING,
                                          dilation=DILATION)

    return harness.TorchOp(call, problem.arrays, ("input", "weight", "bias"), "cpu")


# ------------------------------------------------------------------------------------------------ memory

def traced_peak(fn) -> dict:
    """Peak traced memory above the level before ``fn()``, and what its result holds (tracemalloc)."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        current, peak = tracemalloc.get_traced_memory()
        del result
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return {"peak_extra_bytes": peak - base, "result_bytes": current - after,
            "left_behind_bytes": after - base}


def format_bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "deform_conv", max_row_time=40.0)
    harness.add_case_arguments(parser, "one case instead of the device's defaults (cpu: 1 256 50 76; cuda: four)",
                               ("--out-channels", "with --shape: C_out (default C)"),
                               "deformcp.deform_conv2d_backward", ("float32", "float16", "float64"))
    parser.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                        help="with a mask (DCN v2) or without (v1) (default cpu: with; cuda: without; "
                             "--large-image: both)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--large-image", dest="mode", action="store_const", const="large",
                       help="CPU: 1×128×200×304 under the default workspace limit against torchvision, in turns")
    modes.add_argument("--conv-floor", dest="mode", action="store_const", const="floor",
                       help="CPU: the four GPU shapes against torch's conv2d of the same shapes, in turns")
    return parser


def mode_of(args):
    """MODES' entry of --large-image or --conv-floor, or None."""
    return MODES.get(args.mode)


def problems(args) -> list[Problem]:
    cases = [(*args.shape, args.out_channels or args.shape[1])] if args.shape else CASES[
        "quick" if args.quick else args.mode or args.device]
    masks = ((MASK[args.device],) if not mode_of(args) else mode_of(args)["masks"]) if args.mask is None else (
        args.mask,)
    return [Problem(case[:4], case[4], dtype, mask, args.seed, index)
            for index, case in enumerate(cases) for mask in masks for dtype in args.dtype or DTYPES[args.device]]


def build(setup: harness.DeviceSetup, problem: Problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls), and torchvision where it
    runs."""
    if mode_of(args):  # the NumPy path against the mode's anchor
        impls = {"deformcp numpy": Deformcp("numpy", problem, args.deterministic)}
        if args.mode == "floor" and torch is not None:
            impls["torch conv2d cpu"] = conv2d_op(problem)
        elif args.mode == "large" and torchvision is not None:
            impls["torchvision cpu"] = torchvision_op("cpu", problem)
        return impls
    impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, args.deterministic, move))
    if torchvision is not None and setup.torch_device is not None:
        impls[f"torchvision {setup.device}"] = torchvision_op(setup.torch_device, problem)
    return impls


def reference_name(setup: harness.DeviceSetup) -> str:
    if torchvision is None:
        return "deformcp numpy float64"
    return f"torchvision {'cpu' if setup.torch_device is None else torch.device(setup.torch_device).type} float64"


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Every implementation against :func:`reference_name` on the same (rounded) inputs: torchvision in
    float64 (on the anchor's device), or without it deformcp's NumPy path in float64; on the CPU also
    deformcp's NumPy path on float64 inputs, information only. Raises harness.VerificationFailed for a
    deformcp mismatch or wrong dtype, or where a timed implementation raises."""
    problem64 = problem.astype(np.float64)
    if torchvision is not None:
        reference = torchvision_op(setup.torch_device if setup.torch_device is not None else "cpu", problem64)
    else:
        reference = Deformcp("numpy", problem64)
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()
              if name != "torch conv2d cpu"]  # another op: timed, not compared
    if setup.device == "cpu" and problem.dtype != "float64" and torchvision is not None:
        checks.append(("deformcp numpy on float64 inputs", Deformcp("numpy", problem64), "float64", False))
    return harness.verify(problem.label, reference_name(setup), reference, checks, TOLERANCE, notes,
                          timed=[name for name, *_ in checks])


def mode_targets(args, problems: list[Problem]) -> tuple[list[dict], bool]:
    """The targets of this run, one set per case, and whether they apply (the run's default cases)."""
    if mode_of(args):
        chosen = LARGE_TARGETS if args.mode == "large" else FLOOR_TARGETS
        applies = not (args.shape or args.dtype or args.quick) and args.mask is None
        return [{**t, "case_id": p.label} for p in problems for t in chosen], applies
    # the targets are for the CPU case; other CPU cases show them as not applicable
    targets = [{**t, "case_id": problems[0].label} for t in TARGETS] if args.device == "cpu" else []
    default_case = (args.device == "cpu" and [(*p.shape, p.c_out) for p in problems] == list(CASES["cpu"])
                    and [p.dtype for p in problems] == ["float32"] and problems[0].has_mask)
    return targets, default_case


def report(run: harness.Run, problems: list[Problem], memory: dict) -> tuple[str, list]:
    records, baseline, args = run.records, run.baseline, run.args
    headers = ["case", "phase", "implementation", *harness.timing_headers(baseline)]
    headers.insert(6, "max")
    headers += ["peak extra memory (tracemalloc)"] if memory else []
    rows = []
    for r in records:
        cells = harness.timing_cells(records, r, baseline)
        cells.insert(3, harness.format_seconds(r.timing.max))
        row = [r.extra["case_id"], r.phase, r.impl, *cells]
        if memory:
            traced = memory.get(r.extra["case_id"], {}).get(r.phase) if r.impl == "deformcp numpy" else None
            row.append(format_bytes(traced["peak_extra_bytes"]) if traced else "—")
        rows.append(row)
    targets, applies = mode_targets(args, problems)
    anchor = MODES[args.mode]["anchor"] if mode_of(args) else "torchvision"
    targets = harness.evaluate_targets(targets, records, baseline, applies, missing=f"no {anchor}")
    anchor_calls = ("torch conv2d: autograd on input, weight and bias" if args.mode == "floor"
                    else "torchvision: autograd on all of them")
    case_lines = ["Cases:", "", *(f"- {p.label}: {p.describe()}" for p in problems), "",
                  "Inputs: input N(0, 1), weight N(0, 1)/sqrt(C·3·3), bias N(0, 1), offsets N(0, "
                  f"{OFFSET_STD:g}²) px half-way between the points of a 1/{1 / OFFSET_STEP:g} px grid, mask "
                  "sigmoid(N(0, 1)), grad_output N(0, 1); drawn in float64, rounded to the dtype; fixed seed. "
                  "forward+backward = deform_conv2d, then deform_conv2d_backward "
                  "for the gradients of input, offset, weight, bias and mask (where there is one) "
                  f"({anchor_calls}). Workspace limit: {harness.deformcp.get_workspace_limit() / 2**20:g} MiB."]
    if memory:
        case_lines += ["", "Memory of deformcp's NumPy path (tracemalloc: NumPy buffers and Python objects, in "
                       "a separate untimed call; peak above the level before the call, outputs included):", ""]
        for p in problems:
            per = memory.get(p.label)
            if not per:
                continue
            inputs = sum(v.nbytes for k, v in p.arrays.items() if v is not None and k != "grad_output")
            case_lines += [f"- {p.label}: " + "; ".join(
                f"{phase} peak {format_bytes(m['peak_extra_bytes'])} (results "
                f"{format_bytes(m['result_bytes'])})" for phase, m in per.items())
                + f". For scale: inputs {format_bytes(inputs)}, one im2col column matrix "
                  f"(C·3·3 × N·H_out·W_out) {format_bytes(p.columns_bytes())}"]
    if not targets:
        run.notes.append("Targets: the issue sets them for the CPU case (1×256×50×76 float32 with a mask) only")
    title = {"large": "deform_conv2d, large image", "floor": "deform_conv2d against conv2d"}.get(args.mode)
    markdown = harness.report_markdown(
        title=title or "deform_conv2d", case_lines=case_lines, run=run, compared="case and phase",
        no_baseline=harness.no_baseline(anchor, torch if args.mode == "floor" else torchvision),
        headers=headers, rows=rows, targets=targets,
        verification=f"relative errors ‖a − b‖ / ‖b‖ against {reference_name(run.setup)}")
    return markdown, targets


def main(argv=None) -> int:
    mode = parser().parse_args(argv).mode
    anchor = ("torch", torch) if mode == "floor" else ("torchvision", torchvision)
    run = harness.Run.begin(parser(), argv, torch, anchor=anchor)
    if run is None:
        return 2
    args = run.args
    if args.out_channels is not None and args.shape is None:
        print("--out-channels needs --shape", file=sys.stderr)
        return 2
    if mode and args.device != "cpu":
        print("--large-image and --conv-floor time the CPU", file=sys.stderr)
        return 2
    if mode:
        run.plan.interleave = True  # deformcp and its anchor in turns, one call each per round
    cases, memory = problems(args), {}
    for problem in cases:
        impls = build(run.setup, problem, args)
        if "deformcp numpy" in impls:
            numpy_impl = impls["deformcp numpy"]
            memory[problem.label] = {"forward": traced_peak(numpy_impl.forward),
                                     "forward+backward": traced_peak(numpy_impl.forward_backward)}
            print(f"{problem.label}: deformcp numpy peak extra memory (tracemalloc): " + ", ".join(
                f"{phase} {format_bytes(m['peak_extra_bytes'])}" for phase, m in memory[problem.label].items()))
        if not run.measure(problem, impls, verify, PHASES, extra={"case_id": problem.label}):
            return 1
    run.finish()
    markdown, targets = report(run, cases, memory)
    run.save(mode_of(args)["results"] if mode else "deform_conv", markdown, {
        "mode": args.mode,
        "cases": [{"label": p.label, "description": p.describe(), "shape": p.shape, "out_channels": p.c_out,
                   "dtype": p.dtype, "mask": p.has_mask} for p in cases],
        "kernel": KERNEL, "stride": STRIDE, "padding": PADDING, "dilation": DILATION, "offset_groups": 1,
        "offset_std": OFFSET_STD, "offset_step": OFFSET_STEP,
        "max_row_time_s": args.max_row_time, "memory_tracemalloc": memory},
        targets, compared="case and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
