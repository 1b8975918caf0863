"""Benchmark: deform_conv2d (Deformable ConvNets v1/v2), deformcp against torchvision.ops.deform_conv2d.

Run with OpenBLAS's CPU overrides unset, in the command only (these machines set OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which slow NumPy's BLAS; the results header records whether they were set), with a
Python that has torchvision (the main environment has torch but no torchvision; /opt/tv is a separate
virtual environment with torch and torchvision, made by
``python3 -m venv /opt/tv && /opt/tv/bin/pip install torch torchvision numpy scipy array-api-compat``):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /opt/tv/bin/python benchmarks/bench_deform_conv.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_deform_conv.py --device cuda
    python benchmarks/bench_deform_conv.py --quick          # smoke run: 3 repeats, no files

Options: those of every benchmark (--device, --repeat N (default 30), --warmup N (default 3 calls, and
at least 0.25 s of calls), --quick, --interleave, --torch-threads N, --seed, --output NAME), and
--shape N C H W with --out-channels C_out (one case instead of the defaults), --dtype (one or more of
float32 float16 float64), --mask / --no-mask, --deterministic (deformcp's deterministic backward),
--max-row-time S (fewer timed calls, at least 5, where one call is slow; default 40 s a row).

What is timed:

- --device cpu (default), the case of the issue: input 1×256×50×76 float32, weight 256×256×3×3, bias,
  stride 1, padding 1, dilation 1, one offset group, with a mask (DCN v2); deformcp's NumPy path,
  deformcp's host backend (the CUDA sources compiled for the CPU: ``with deformcp.backend("host")``)
  and torchvision on the CPU. Also the NumPy path's peak extra memory (tracemalloc, see below).
- --device cuda: inputs 2×128×100×152 (128 → 128 channels), 2×256×50×76, 2×512×25×38 and
  64×256×14×14 (C → C), 3×3, stride 1, padding 1, without a mask (DCN v1; --mask adds one), in float32
  and float16; deformcp on CuPy arrays against torchvision on CUDA (exits with a message where CuPy sees
  no GPU).

Inputs (fixed seed): input N(0, 1); weight N(0, 1) / sqrt(C_in·3·3); bias N(0, 1); offsets N(0, 2²)
(realistic deformations: a sample moves about 2 pixels, and some leave the image); mask
sigmoid(N(0, 1)); grad_output N(0, 1). All are drawn in float64 and rounded to the timed dtype.

- forward:          deform_conv2d (torchvision: under no_grad)
- forward+backward: deform_conv2d, then deform_conv2d_backward for all five gradients (input, offset,
                    weight, bias, mask; mask only where there is one) for grad_output (torchvision:
                    autograd with requires_grad on all five, then backward)

Verification: before anything is timed, every implementation's output (from forward+backward and from
forward alone) and every gradient is compared with torchvision in float64 on the same (rounded) inputs
(on CUDA where torch has CUDA, else on the CPU; without torchvision, deformcp's NumPy path in float64),
as ‖a − b‖ / ‖b‖. A deformcp error above 1e-4 (float32; float16: 1e-2, float64: 1e-10), a deformcp
output of another dtype, or an exception from any timed implementation stops the run. torchvision itself
beyond those bounds is reported, not stopped on. On the CPU deformcp's NumPy path on float64 inputs is compared as well (information only).

Memory (--device cpu): the NumPy path's peak of traced memory above the level before the call, for
forward and for forward+backward, measured with tracemalloc in a separate untimed call (NumPy registers
its array buffers with tracemalloc, also from worker threads; what C/C++ code mallocs by itself, such as
scipy.sparse's sparsetools temporaries, is not traced). The outputs are part of the peak.

Results: printed, and written to benchmarks/results/deform_conv[_cuda].{json,md} (--quick writes nothing
unless --output is given). Ratios are deformcp time / torchvision time: below 1 deformcp is faster.
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import tracemalloc

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))   # _harness (which puts the checkout's deformcp first on the path)

import _harness  # noqa: E402
import deformcp  # noqa: E402

torch, torchvision = _harness.optional_torchvision()

PHASES = ("forward", "forward+backward")
GRADS = ("input", "offset", "weight", "bias", "mask")      # deform_conv2d_backward's fields, in order
KERNEL, STRIDE, PADDING, DILATION = (3, 3), 1, 1, 1
OFFSET_STD = 2.0                                            # offsets ~ N(0, OFFSET_STD²) pixels
#: (N, C_in, H, W, C_out) cases per device; the CPU one is the target case (with a mask, float32)
CASES = {"cpu": ((1, 256, 50, 76, 256),),
         "cuda": ((2, 128, 100, 152, 128), (2, 256, 50, 76, 256), (2, 512, 25, 38, 512),
                  (64, 256, 14, 14, 256))}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16")}
MASK = {"cpu": True, "cuda": False}
#: deformcp NumPy path time / torchvision CPU time: the targets for the default CPU case
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 0.5,
            "target": "at least 2× faster than torchvision forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than torchvision forward+backward"})
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}
FUNCTIONS = ("deform_conv2d", "deform_conv2d_backward")


# ---------------------------------------------------------------------------------------------- inputs

def output_size(size: int, k: int) -> int:
    return (size + 2 * PADDING - DILATION * (k - 1) - 1) // STRIDE + 1


class Problem(_harness.ArrayCase):
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
                f"{OFFSET_STD:g}²), " + ("mask sigmoid(N(0, 1)) (v2)" if self.has_mask else "no mask (v1)")
                + f"; output {'×'.join(map(str, self.out_shape))}")

    def columns_bytes(self) -> int:
        """Size of an im2col column matrix (C·kh·kw × N·H_out·W_out) in this dtype, for scale."""
        N, C = self.shape[:2]
        Ho, Wo = self.out_shape[2:]
        return C * KERNEL[0] * KERNEL[1] * N * Ho * Wo * np.dtype(self.dtype).itemsize


# ------------------------------------------------------------------------------------ deformcp callables

class Deformcp(_harness.DeformcpOp):
    """deformcp.deform_conv2d forward / forward+backward on one backend ("numpy", "host", or "cuda" for
    CuPy arrays)."""

    op, grads = "deform_conv2d", GRADS

    def _forward(self):
        a = self.a
        return self.forward_fn(a["input"], a["offset"], a["weight"], a["bias"], stride=STRIDE,
                               padding=PADDING, dilation=DILATION, mask=a["mask"])

    def forward_backward(self):
        """The output and the named tuple of the five gradients (all requested: the default)."""
        a = self.a
        with deformcp.backend(self.cpu_backend):
            out = self._forward()
            grads = self.backward_fn(a["grad_output"], a["input"], a["offset"], a["weight"], a["bias"],
                                     stride=STRIDE, padding=PADDING, dilation=DILATION, mask=a["mask"],
                                     deterministic=self.deterministic)
            return out, grads


# --------------------------------------------------------------------------------- torchvision callables

class Torchvision:
    """torchvision.ops.deform_conv2d on one device, through autograd on input, offset, weight, bias and
    mask."""

    def __init__(self, device, problem: Problem):
        self.t = {k: None if v is None else torch.from_numpy(v).to(device) for k, v in problem.arrays.items()}
        self.leaves = [self.t[k] for k in GRADS if self.t[k] is not None]
        for leaf in self.leaves:
            leaf.requires_grad_(True)

    def _forward(self):
        t = self.t
        return torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=STRIDE,
                                             padding=PADDING, dilation=DILATION, mask=t["mask"])

    def forward(self):
        with torch.no_grad():
            return self._forward()

    def forward_backward(self):
        for leaf in self.leaves:
            leaf.grad = None
        out = self._forward()
        out.backward(self.t["grad_output"])
        return out.detach(), tuple(None if self.t[k] is None else self.t[k].grad for k in GRADS)

    def gradients(self, grads) -> dict:
        return dict(zip(GRADS, grads))


# ------------------------------------------------------------------------------------------ verification

def reference(problem: Problem, functions: dict | None, torch_device) -> tuple[str | None, object]:
    """What every implementation is checked against, and its name: torchvision in float64 on the same
    (rounded) inputs, on CUDA where torch can run there, else on the CPU; without torchvision, deformcp's
    NumPy path in float64."""
    problem64 = problem.astype(np.float64)
    if torchvision is not None:
        device = torch_device if torch_device is not None else "cpu"
        return f"torchvision {torch.device(device).type} float64", Torchvision(device, problem64)
    if functions is not None:
        return "deformcp numpy float64", Deformcp("numpy", problem64, functions)
    return None, None


def verify(problem: Problem, impls: dict, reference_name, reference, info_impls) -> dict:
    """Relative errors of every implementation against ``reference``; exits before any timing when a
    deformcp implementation is beyond the dtype's tolerance or returns another dtype, or when a timed
    implementation raises. ``info_impls``: (name, impl, dtype) checked for information only."""
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()]
    checks += [(name, impl, dtype, False) for name, impl, dtype in info_impls]
    return _harness.verify(problem.label, reference_name, reference, checks, TOLERANCE, NOTES, timed=impls)


NOTES: list[str] = []   # notes gathered on the way (verification beyond tolerance, cut repeats)


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


# ------------------------------------------------------------------------------------------------- setup

def build(setup: _harness.DeviceSetup, problem: Problem, functions, deterministic) -> dict:
    """The implementations to time on the setup's device: deformcp's (see _harness.deformcp_impls), and
    torchvision where it can run."""
    impls = {} if functions is None else _harness.deformcp_impls(
        setup, lambda backend, move: Deformcp(backend, problem, functions, deterministic, move))
    if torchvision is not None and setup.torch_device is not None:
        impls[f"torchvision {setup.device}"] = Torchvision(setup.torch_device, problem)
    return impls


# ----------------------------------------------------------------------------------------------- report

def report(records, baseline, problems, machine, errors, reference_name, notes, method, default_case,
           memory, device) -> tuple[str, list]:
    show_memory = bool(memory)
    headers = ["case", "phase", "implementation", *_harness.timing_headers(baseline)]
    headers += ["peak extra memory (tracemalloc)"] if show_memory else []
    rows = []
    for r in records:
        row = [r.extra["case_id"], r.phase, r.impl, *_harness.timing_cells(records, r, baseline)]
        if show_memory:
            traced = memory.get(r.extra["case_id"], {}).get(r.phase) if r.impl == "deformcp numpy" else None
            row.append(format_bytes(traced["peak_extra_bytes"]) if traced else "—")
        rows.append(row)
    # the targets are for the CPU case; other CPU cases show them as not applicable
    targets = [{**t, "case_id": problems[0].label} for t in TARGETS] if device == "cpu" else []
    targets = _harness.evaluate_targets(targets, records, baseline, default_case,
                                        missing="no torchvision or no deformcp")
    case_lines = ["Cases:", "", *(f"- {p.label}: {p.describe()}" for p in problems), "",
                  *_harness.source_lines(machine.get("deformcp_sources") or {}),
                  "Inputs: input N(0, 1), weight N(0, 1)/sqrt(C·3·3), bias N(0, 1), offsets N(0, "
                  f"{OFFSET_STD:g}²) px, mask sigmoid(N(0, 1)), grad_output N(0, 1); drawn in float64, rounded "
                  "to the dtype; fixed seed. forward+backward = deform_conv2d, then deform_conv2d_backward "
                  "for the gradients of input, offset, weight, bias and mask (where there is one) "
                  "(torchvision: autograd on all of them)."]
    if show_memory:
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
        notes = [*notes, "Targets: the issue sets them for the CPU case (1×256×50×76 float32 with a mask) "
                         "only"]
    markdown = _harness.report_markdown(
        title="deform_conv2d", case_lines=case_lines, command=_harness.command_line(this_python=True),
        method=method, machine=machine, baseline=baseline, compared="case and phase",
        no_baseline=_harness.no_baseline("torchvision", torchvision), headers=headers, rows=rows,
        targets=targets, verification=f"relative errors ‖a − b‖ / ‖b‖ against {reference_name}",
        errors=errors, notes=notes)
    return markdown, targets


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = _harness.make_parser(__doc__, "deform_conv", _harness.TORCHVISION_PYTHON, max_row_time=40.0)
    parser.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                        help="one case instead of the device's defaults (cpu: 1 256 50 76; cuda: four)")
    parser.add_argument("--out-channels", type=int, default=None, help="with --shape: C_out (default C)")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "float64"), default=None,
                        help="dtypes to time (default cpu: float32; cuda: float32 float16)")
    parser.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                        help="with a mask (DCN v2) or without (v1) (default cpu: with; cuda: without)")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to deformcp.deform_conv2d_backward")
    args = parser.parse_args(argv)
    NOTES.clear()
    if args.out_channels is not None and args.shape is None:
        parser.error("--out-channels needs --shape")
    plan = _harness.start(parser, args, torch)
    if plan is None:
        return 2

    functions, missing = _harness.deformcp_functions(FUNCTIONS, "deformcp.deform_conv")
    if functions is None:
        NOTES.append(f"deformcp not timed: {missing}")
    if torchvision is None:
        print(_harness.NO_TORCHVISION)
    if functions is None and torchvision is None:
        print(f"nothing to time: {missing}, and no torchvision", file=sys.stderr)
        return 2

    cases = ([(*args.shape, args.out_channels or args.shape[1])] if args.shape else CASES[args.device])
    dtypes = args.dtype or DTYPES[args.device]
    mask = MASK[args.device] if args.mask is None else args.mask
    default_case = (args.device == "cpu" and tuple(cases) == CASES["cpu"] and list(dtypes) == ["float32"]
                    and mask)
    setup = _harness.device_setup(args.device, torch if torchvision is not None else None)
    NOTES.extend(setup.notes)
    for note in NOTES:
        print(f"note: {note}")
    problems = [Problem(case[:4], case[4], dtype, mask, args.seed, index)
                for index, case in enumerate(cases) for dtype in dtypes]

    records, errors, memory, reference_name, busy_before = [], {}, {}, None, None
    for problem in problems:
        print(f"\n{problem.label}: {problem.describe()}")
        impls = build(setup, problem, functions, args.deterministic)
        if not impls:
            print("  nothing to time here")
            continue
        baseline = next((name for name in impls if name.startswith("torchvision")), None)
        reference_name, reference_impl = reference(problem, functions, setup.torch_device)
        info = []
        if args.device == "cpu" and functions is not None and problem.dtype != "float64" and torchvision:
            info.append(("deformcp numpy on float64 inputs", Deformcp("numpy", problem.astype(np.float64),
                                                                      functions), "float64"))
        print(f"verifying against {reference_name} (relative errors) ...")
        errors.update(verify(problem, impls, reference_name, reference_impl, info))
        del reference_impl, info
        _harness.release_device_memory(args.device, torch)

        if "deformcp numpy" in impls:
            numpy_impl = impls["deformcp numpy"]
            memory[problem.label] = {"forward": traced_peak(numpy_impl.forward),
                                     "forward+backward": traced_peak(numpy_impl.forward_backward)}
            print("  deformcp numpy peak extra memory (tracemalloc): " + ", ".join(
                f"{phase} {format_bytes(m['peak_extra_bytes'])}" for phase, m in memory[problem.label].items()))

        if busy_before is None:
            busy_before = _harness.check_load()
            print(plan.describe())
        records += _harness.time_phases(plan, impls, PHASES, setup.sync, problem.label, baseline,
                                        extra={"case_id": problem.label}, notes=NOTES)
        del impls
        _harness.release_device_memory(args.device, torch)

    if not records:
        print("nothing was timed", file=sys.stderr)
        return 2
    busy_after = _harness.cpu_busy()
    machine = _harness.machine_info({**setup.info, "torchvision": getattr(torchvision, "__version__", None),
                                     "deformcp_sources": _harness.source_state(),
                                     "cpu_busy_before": busy_before, "cpu_busy_after": busy_after})
    baseline = next((r.impl for r in records if r.impl.startswith("torchvision")), None)
    method = plan.method() + (", deformcp backward with deterministic=True" if args.deterministic else "")
    markdown, targets = report(records, baseline, problems, machine, errors, reference_name, NOTES, method,
                               default_case, memory, args.device)
    print()
    print(markdown)
    payload = _harness.results_payload(
        _harness.command_line(this_python=True),
        {"cases": [{"label": p.label, "description": p.describe(), "shape": p.shape, "out_channels": p.c_out,
                    "dtype": p.dtype, "mask": p.has_mask} for p in problems],
         "kernel": KERNEL, "stride": STRIDE, "padding": PADDING, "dilation": DILATION, "offset_groups": 1,
         "offset_std": OFFSET_STD, "seed": args.seed, "device": args.device,
         "deterministic": args.deterministic, "max_row_time_s": args.max_row_time,
         "memory_tracemalloc": memory},
        plan=plan, baseline=baseline, compared="case and phase", machine=machine, errors=errors,
        targets=targets, notes=NOTES, records=records)
    _harness.save_results(args, "deform_conv", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
