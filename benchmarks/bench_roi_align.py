"""Benchmark: roi_align and ps_roi_align (Mask R-CNN / R-FCN RoI pooling), deformcp against torchvision.

Run with OpenBLAS's CPU overrides unset, in the command only (these machines set OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which slow NumPy's BLAS; the results header records whether they were set), with a
Python that has torchvision (the main environment has torch but no torchvision; /opt/tv is a separate
virtual environment with torch and torchvision, made by
``python3 -m venv /opt/tv && /opt/tv/bin/pip install torch torchvision numpy scipy array-api-compat``):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /opt/tv/bin/python benchmarks/bench_roi_align.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_roi_align.py --device cuda
    python benchmarks/bench_roi_align.py --quick          # smoke run: 3 repeats, no files

Options: --repeat N (timed calls per row, default 30), --warmup N (default 3 calls, and at least
0.25 s of calls), --interleave (time the implementations in turns instead of back to back),
--torch-threads N, --ops roi_align ps_roi_align, --shape N C H W, --boxes K, --dtype float32|float64,
--deterministic (deformcp's deterministic input gradient), --seed, --output NAME.

What is timed (the case of the issue):

- roi_align:    input 2×256×100×152 float32 (--device cuda: 2×256×200×304), 512 boxes (cuda: 1024),
                output 7×7, sampling_ratio 2, aligned=True, spatial_scale 1, pool_mode "avg"
- ps_roi_align: the same with 245 = 5·7·7 input channels (5 output channels), sampling_ratio 2,
                spatial_scale 1 (ps_roi_align has no ``aligned``: it always shifts by half a pixel)

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
torchvision, against deformcp's NumPy path in float64); a mismatch or an error stops the run.

Results: printed, and written to benchmarks/results/roi_align[_cuda].{json,md} (--quick writes nothing
unless --output is given). Ratios are deformcp time / torchvision time: below 1 deformcp is faster.
"""
from __future__ import annotations

import pathlib
import sys
import traceback

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))   # _harness (which puts the checkout's deformcp first on the path)

import _harness  # noqa: E402
import deformcp  # noqa: E402
from _harness import to_numpy  # noqa: E402

torch, torchvision = _harness.optional_torchvision()

OPS = ("roi_align", "ps_roi_align")
PHASES = ("forward", "forward+backward")
OUTPUT_SIZE = (7, 7)
SAMPLING_RATIO, ALIGNED, SPATIAL_SCALE, POOL_MODE = 2, True, 1.0, "avg"
PS_GROUPS = 5                                   # ps_roi_align output channels: C = 5 · 7 · 7 = 245
BOX_SIDE = (8.0, 100.0)                         # box width and height range, pixels
DEFAULTS = {"cpu": {"shape": (2, 256, 100, 152), "boxes": 512},
            "cuda": {"shape": (2, 256, 200, 304), "boxes": 1024}}
#: max_ratio: the most deformcp time / torchvision time may be; target: what the issue asks. Default case.
TARGETS = ({"op": "roi_align", "impl": "deformcp numpy", "phase": "forward", "max_ratio": 0.5,
            "target": "at least 2× faster than torchvision forward"},
           {"op": "roi_align", "impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 0.25,
            "target": "at least 4× faster than torchvision forward+backward"})
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
FUNCTIONS = ("roi_align", "roi_align_backward", "ps_roi_align", "ps_roi_align_backward")


# ---------------------------------------------------------------------------------------------- inputs

class Problem:
    """One op's arrays, NumPy: input (N, C, H, W), boxes (K, 5), grad_output (K, C_out, 7, 7)."""

    def __init__(self, op, shape, K, dtype, seed):
        rng = np.random.default_rng([seed, OPS.index(op)])
        N, C, H, W = shape
        if op == "ps_roi_align":
            C = PS_GROUPS * OUTPUT_SIZE[0] * OUTPUT_SIZE[1]
        self.op, self.shape, self.dtype = op, (N, C, H, W), dtype
        self.x = rng.standard_normal(self.shape).astype(dtype)
        self.boxes = _harness.random_rois(rng, K, N, H, W, BOX_SIDE, SPATIAL_SCALE).astype(dtype)
        c_out = C // (OUTPUT_SIZE[0] * OUTPUT_SIZE[1]) if op == "ps_roi_align" else C
        self.grad_output = rng.standard_normal((K, c_out, *OUTPUT_SIZE)).astype(dtype)

    @property
    def kwargs(self) -> dict:
        if self.op == "ps_roi_align":
            return {"spatial_scale": SPATIAL_SCALE, "sampling_ratio": SAMPLING_RATIO}
        return {"spatial_scale": SPATIAL_SCALE, "sampling_ratio": SAMPLING_RATIO, "aligned": ALIGNED}

    def describe(self) -> str:
        K = self.boxes.shape[0]
        text = (f"{self.op}: input {'×'.join(map(str, self.shape))} {self.dtype}, {K} boxes "
                f"(sides {BOX_SIDE[0]:g}–{BOX_SIDE[1]:g} px, inside the image), output "
                f"{OUTPUT_SIZE[0]}×{OUTPUT_SIZE[1]}, sampling_ratio {SAMPLING_RATIO}, "
                f"spatial_scale {SPATIAL_SCALE:g}")
        return text + (f", aligned={ALIGNED}, pool_mode {POOL_MODE}" if self.op == "roi_align" else "")

    def astype(self, dtype) -> "Problem":
        other = object.__new__(Problem)
        other.op, other.shape, other.dtype = self.op, self.shape, np.dtype(dtype).name
        other.x, other.boxes, other.grad_output = (a.astype(dtype) for a in (self.x, self.boxes,
                                                                             self.grad_output))
        return other


# ------------------------------------------------------------------------------------ deformcp callables

class Deformcp:
    """deformcp's RoI op forward / forward+backward on one backend ("numpy", "host", or "cuda" for CuPy
    arrays)."""

    def __init__(self, backend: str, problem: Problem, functions: dict, deterministic=False, move=None):
        move = move or (lambda a: a)
        self.backend = backend
        self.cpu_backend = "numpy" if backend == "cuda" else backend
        self.problem, self.functions, self.deterministic = problem, functions, deterministic
        self.x, self.boxes, self.grad_output = (move(a) for a in (problem.x, problem.boxes,
                                                                  problem.grad_output))
        self.forward_fn = functions[problem.op]
        self.backward_fn = functions[problem.op + "_backward"]
        self.kwargs = dict(problem.kwargs)
        if problem.op == "roi_align":
            self.kwargs["pool_mode"] = POOL_MODE

    def forward(self):
        with deformcp.backend(self.cpu_backend):
            return self.forward_fn(self.x, self.boxes, OUTPUT_SIZE, **self.kwargs)

    def forward_backward(self):
        with deformcp.backend(self.cpu_backend):
            out = self.forward_fn(self.x, self.boxes, OUTPUT_SIZE, **self.kwargs)
            grads = self.backward_fn(self.grad_output, self.x, self.boxes, OUTPUT_SIZE, **self.kwargs,
                                     deterministic=self.deterministic)
            return out, grads.input


# --------------------------------------------------------------------------------- torchvision callables

class Torchvision:
    """torchvision.ops.roi_align / ps_roi_align on one device, through autograd."""

    def __init__(self, device, problem: Problem):
        self.fn = getattr(torchvision.ops, problem.op)
        self.kwargs = problem.kwargs
        self.x = torch.from_numpy(problem.x).to(device).requires_grad_(True)
        self.boxes = torch.from_numpy(problem.boxes).to(device)
        self.grad_output = torch.from_numpy(problem.grad_output).to(device)

    def forward(self):
        with torch.no_grad():
            return self.fn(self.x, self.boxes, OUTPUT_SIZE, **self.kwargs)

    def forward_backward(self):
        self.x.grad = None
        out = self.fn(self.x, self.boxes, OUTPUT_SIZE, **self.kwargs)
        out.backward(self.grad_output)
        return out.detach(), self.x.grad


# ------------------------------------------------------------------------------------------ verification

class Reference:
    """What every implementation is checked against: torchvision on the CPU in the timed dtype, or without
    torchvision deformcp's NumPy path in float64."""

    def __init__(self, problem: Problem, functions: dict | None):
        if torchvision is not None:
            self.name = "torchvision cpu"
            self.impl = Torchvision("cpu", problem)
        elif functions is not None:
            self.name = "deformcp numpy float64"
            self.impl = Deformcp("numpy", problem.astype(np.float64), functions)
        else:
            self.name, self.impl = None, None

    def forward_backward(self):
        return [to_numpy(a) for a in self.impl.forward_backward()]


def verify(problem: Problem, impls: dict, reference: Reference) -> dict:
    """Relative errors of every implementation against ``reference``; exits before any timing when one
    is beyond the dtype's tolerance or raises."""
    errors, failed = {}, []
    tolerance = TOLERANCE[problem.dtype]
    if reference.impl is None:
        print("  nothing to verify against")
        return errors
    expected_out, expected_grad = reference.forward_backward()
    print(f"  {problem.op}: reference {reference.name}: output {tuple(expected_out.shape)} "
          f"(|max| {np.abs(expected_out).max():.3g}), grad_input {tuple(expected_grad.shape)} "
          f"(|max| {np.abs(expected_grad).max():.3g})")
    for name, impl in impls.items():
        try:
            out, grad_input = (to_numpy(a) for a in impl.forward_backward())
            forward_only = to_numpy(impl.forward())
        except Exception as e:
            print(f"  {name:<16} RAISED {type(e).__name__}: {e}")
            traceback.print_exc()
            errors[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(f"{name} ({problem.op}: raised {type(e).__name__}: {e})")
            continue
        checked = {"output": _harness.relative_error(out, expected_out),
                   "output (forward only)": _harness.relative_error(forward_only, expected_out),
                   "grad_input": _harness.relative_error(grad_input, expected_grad)}
        errors[name] = checked
        bad = [k for k, v in checked.items() if not v <= tolerance]
        shapes = "" if not bad else (f"  shapes: output {tuple(np.shape(out))}, grad_input "
                                     f"{tuple(np.shape(grad_input))}")
        print(f"  {name:<16} {_harness.errors_text(checked)}"
              + (f"  FAILED ({', '.join(bad)}){shapes}" if bad else ""))
        if bad:
            failed.append(f"{name} ({problem.op}: {', '.join(bad)})")
    if failed:
        sys.exit(f"verification failed for {'; '.join(failed)} (tolerance {tolerance:g}; case: "
                 f"{problem.describe()}): not timing wrong code")
    return errors


# ------------------------------------------------------------------------------------------------- setup

def build(setup: _harness.DeviceSetup, problem: Problem, functions: dict | None, deterministic) -> dict:
    """The implementations to time on the setup's device: deformcp's NumPy path and host backend (cpu) or
    deformcp on CuPy arrays (cuda), where deformcp has the functions, and torchvision where it can run."""
    impls = {} if functions is None else _harness.deformcp_impls(
        setup, lambda backend, move: Deformcp(backend, problem, functions, deterministic, move))
    if setup.torch_device is not None:
        impls[f"torchvision {setup.device}"] = Torchvision(setup.torch_device, problem)
    return impls


# ----------------------------------------------------------------------------------------------- report

def report(records, ops, baseline, cases, machine, errors, reference_name, notes, method, default_case
           ) -> tuple[str, list]:
    headers = ["op", "phase", "implementation", *_harness.timing_headers(baseline)]
    rows = [[r.extra["op"], r.phase, r.impl, *_harness.timing_cells(records, r, baseline)] for r in records]
    targets = _harness.evaluate_targets([t for t in TARGETS if t["op"] in ops], records, baseline, default_case,
                                        missing="no torchvision or no deformcp")
    if "ps_roi_align" in ops and baseline:  # roi_align's bar, shown for ps_roi_align too (not a target)
        for t in TARGETS:
            value = _harness.ratio(records, baseline, t["impl"], t["phase"], op="ps_roi_align")
            if value is not None:
                targets.append({"op": "ps_roi_align", "impl": t["impl"], "phase": t["phase"],
                                "max_ratio": t["max_ratio"], "ratio": value, "status": "information only (" +
                                ("within" if value <= t["max_ratio"] else "beyond") + " roi_align's bar)",
                                "target": t["target"]})
    markdown = _harness.report_markdown(
        title="roi_align and ps_roi_align",
        case_lines=["Cases:", "", *(f"- {case}" for case in cases), "",
                    "Boxes: (K, 5) rows (batch index, x1, y1, x2, y2) in the input's dtype, batch index uniform "
                    "over the batch, sides uniform in [8, 100] px, wholly inside the image; fixed seed. "
                    "forward+backward = forward, then the input gradient for a random grad_output "
                    "(torchvision: autograd)."],
        command=_harness.command_line(this_python=True), method=method, machine=machine, baseline=baseline, compared="op and phase",
        no_baseline=_harness.no_baseline("torchvision", torchvision), headers=headers, rows=rows,
        targets=targets, verification=f"relative errors against {reference_name}",
        errors={f"{op} {name}": e for op, per_op in errors.items() for name, e in per_op.items()}, notes=notes)
    return markdown, targets


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = _harness.make_parser(__doc__, "roi_align", _harness.TORCHVISION_PYTHON)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                        help="roi_align input shape (default 2 256 100 152; cuda 2 256 200 304); "
                             "ps_roi_align uses C = 245")
    parser.add_argument("--boxes", type=int, default=None, help="number of boxes (default 512; cuda 1024)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to deformcp's backward functions")
    args = parser.parse_args(argv)
    ops = [op for op in OPS if op in args.ops]
    plan = _harness.start(parser, args, torch)
    if plan is None:
        return 2

    functions, missing = _harness.deformcp_functions(FUNCTIONS, "deformcp.roi_align")
    notes = []
    if functions is None:
        notes.append(f"deformcp not timed: {missing}")
    if torchvision is None:
        print(_harness.NO_TORCHVISION)
    if functions is None and torchvision is None:
        print(f"nothing to time: {missing}, and no torchvision", file=sys.stderr)
        return 2

    defaults = DEFAULTS[args.device]
    shape = tuple(args.shape or defaults["shape"])
    K = args.boxes or defaults["boxes"]
    default_case = (shape == defaults["shape"] and K == defaults["boxes"] and args.dtype == "float32")
    setup = _harness.device_setup(args.device, torch)
    notes += setup.notes
    for note in notes:
        print(f"note: {note}")

    problems = {op: Problem(op, shape, K, args.dtype, args.seed) for op in ops}
    impls = {op: build(setup, problems[op], functions, args.deterministic) for op in ops}
    baseline = next((name for name in impls[ops[0]] if name.startswith("torchvision")), None)
    cases = [problems[op].describe() for op in ops]
    for case in cases:
        print(case)

    errors, reference_name = {}, None
    for op in ops:
        reference = Reference(problems[op], functions)
        reference_name = reference.name
        print(f"verifying {op} against {reference.name} (relative errors) ...")
        errors[op] = verify(problems[op], impls[op], reference)

    busy_before = _harness.check_load()
    print(plan.describe())
    records = []
    for op in ops:
        records += _harness.time_phases(plan, impls[op], PHASES, setup.sync, problems[op].describe(), baseline,
                                        extra={"op": op}, label=f"{op:<13} ")

    busy_after = _harness.cpu_busy()
    device_info = setup.info if args.device == "cpu" else {
        **setup.info, "torch_cuda_available": setup.torch_device is not None}
    machine = _harness.machine_info({**device_info, "torchvision": getattr(torchvision, "__version__", None),
                                     "cpu_busy_before": busy_before, "cpu_busy_after": busy_after})
    method = plan.method() + (", deformcp backward with deterministic=True" if args.deterministic else "")
    markdown, targets = report(records, ops, baseline, cases, machine, errors, reference_name, notes, method,
                               default_case)
    print()
    print(markdown)
    payload = _harness.results_payload(
        _harness.command_line(this_python=True), {"cases": cases, "ops": ops, "shape": shape, "boxes": K, "dtype": args.dtype,
                         "output_size": OUTPUT_SIZE, "sampling_ratio": SAMPLING_RATIO, "aligned": ALIGNED,
                         "spatial_scale": SPATIAL_SCALE, "pool_mode": POOL_MODE,
                         "ps_channels": PS_GROUPS * OUTPUT_SIZE[0] * OUTPUT_SIZE[1], "box_side_px": BOX_SIDE,
                         "seed": args.seed, "device": args.device, "deterministic": args.deterministic},
        plan=plan, baseline=baseline, compared="op and phase", machine=machine, errors=errors, targets=targets,
        notes=notes, records=records)
    _harness.save_results(args, "roi_align", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
