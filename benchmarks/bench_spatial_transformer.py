"""Benchmark: affine_grid + grid_sample (Spatial Transformer Networks), deformcp against PyTorch.

Run with OpenBLAS's CPU overrides unset, in the command only (these machines set OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which slow NumPy's BLAS; the results header records whether they were set):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_spatial_transformer.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_spatial_transformer.py --device cuda
    python benchmarks/bench_spatial_transformer.py --quick          # smoke run: 3 repeats, no files

Options: --repeat N (timed calls per row, default 30), --warmup N (default 3 calls, and at least
0.25 s of calls), --interleave (time the implementations in turns instead of back to back),
--torch-threads N, --shape N C H W, --dtype float32|float64, --seed, --output NAME.

What is timed (input 8×64×56×56 float32, bilinear, zeros padding, align_corners=False, theta = identity
plus a small random perturbation, output size = input size):

- forward:          affine_grid + grid_sample (torch: under no_grad)
- backward:         grid_sample_backward (input and grid gradients) + affine_grid_backward
                    (torch: torch.autograd.grad of a recorded graph, retain_graph=True)
- forward+backward: both of the above (torch: autograd with requires_grad on input and theta, then
                    backward with a random grad_output)

--device cpu (default) times deformcp's NumPy path, deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``) and torch on the CPU. --device cuda times deformcp on
CuPy arrays against torch on CUDA (exits with a message where CuPy sees no GPU). torch is optional:
without it only deformcp is timed. Before anything is timed, every implementation's output and
gradients are checked once against torch (or, without torch, against deformcp's float64 NumPy path);
a mismatch stops the run.

Results: printed, and written to benchmarks/results/spatial_transformer[_cuda].{json,md} (--quick
writes nothing unless --output is given). Ratios are deformcp time / torch time: below 1 deformcp
is faster.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))   # _harness (which puts the checkout's deformcp first on the path)

import _harness  # noqa: E402
import deformcp  # noqa: E402
from _harness import to_numpy  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional
    torch = F = None

MODE, PADDING, ALIGN_CORNERS = "bilinear", "zeros", False
PHASES = ("forward", "backward", "forward+backward")
DEFAULT_SHAPE = (8, 64, 56, 56)
#: max_ratio: the most deformcp time / torch time may be; target: what the issue asks. Default case only.
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 2.0,
            "target": "within 2× of torch forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1.0,
            "target": "at least as fast as torch forward+backward"})
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


# ---------------------------------------------------------------------------------------------- inputs

def make_inputs(shape, dtype, seed):
    """input (N, C, H, W), theta (N, 2, 3) near the identity, grad_output (N, C, H, W); NumPy."""
    rng = np.random.default_rng(seed)
    N = shape[0]
    x = rng.standard_normal(shape).astype(dtype)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    theta = (identity + 0.05 * rng.standard_normal((N, 2, 3))).astype(dtype)
    grad_output = rng.standard_normal(shape).astype(dtype)
    return x, theta, grad_output


# ------------------------------------------------------------------------------------ deformcp callables

class Deformcp:
    """deformcp's STN forward/backward on one backend ("numpy", "host", or "cuda" for CuPy arrays)."""

    def __init__(self, backend: str, x, theta, grad_output, size):
        self.backend = backend
        self.cpu_backend = "numpy" if backend == "cuda" else backend
        self.x, self.theta, self.grad_output, self.size = x, theta, grad_output, tuple(size)
        self.grid = None

    def _forward(self):
        grid = deformcp.affine_grid(self.theta, self.size, align_corners=ALIGN_CORNERS)
        out = deformcp.grid_sample(self.x, grid, mode=MODE, padding_mode=PADDING, align_corners=ALIGN_CORNERS)
        return grid, out

    def _backward(self, grid):
        grad_input, grad_grid = deformcp.grid_sample_backward(
            self.grad_output, self.x, grid, mode=MODE, padding_mode=PADDING, align_corners=ALIGN_CORNERS,
            needs_input_grad=(True, True))
        (grad_theta,) = deformcp.affine_grid_backward(grad_grid, self.theta, self.size,
                                                      align_corners=ALIGN_CORNERS)
        return grad_input, grad_theta

    def astype(self, dtype) -> "Deformcp":
        """The same implementation on inputs cast to dtype."""
        return Deformcp(self.backend, *(a.astype(dtype) for a in (self.x, self.theta, self.grad_output)),
                        self.size)

    def affine_grid(self):
        with deformcp.backend(self.cpu_backend):
            return deformcp.affine_grid(self.theta, self.size, align_corners=ALIGN_CORNERS)

    def forward(self):
        with deformcp.backend(self.cpu_backend):
            return self._forward()[1]

    def backward(self):
        with deformcp.backend(self.cpu_backend):
            if self.grid is None:  # the forward's grid, made once (untimed) for the backward-only phase
                self.grid = deformcp.affine_grid(self.theta, self.size, align_corners=ALIGN_CORNERS)
            return self._backward(self.grid)

    def forward_backward(self):
        with deformcp.backend(self.cpu_backend):
            grid, out = self._forward()
            return (out, *self._backward(grid))


# --------------------------------------------------------------------------------------- torch callables

class Torch:
    """torch.nn.functional.affine_grid + grid_sample on one device, through autograd."""

    def __init__(self, device, x, theta, grad_output, size):
        self.x = torch.from_numpy(x).to(device).requires_grad_(True)
        self.theta = torch.from_numpy(theta).to(device).requires_grad_(True)
        self.grad_output = torch.from_numpy(grad_output).to(device)
        self.size = list(size)
        self.graph = None

    def _forward(self):
        grid = F.affine_grid(self.theta, self.size, align_corners=ALIGN_CORNERS)
        return F.grid_sample(self.x, grid, mode=MODE, padding_mode=PADDING, align_corners=ALIGN_CORNERS)

    def affine_grid(self):
        with torch.no_grad():
            return F.affine_grid(self.theta, self.size, align_corners=ALIGN_CORNERS)

    def forward(self):
        with torch.no_grad():
            return self._forward()

    def backward(self):
        if self.graph is None:  # one recorded forward (untimed), differentiated again on every call
            self.graph = self._forward()
        return torch.autograd.grad(self.graph, (self.x, self.theta), self.grad_output, retain_graph=True)

    def forward_backward(self):
        self.x.grad = self.theta.grad = None
        out = self._forward()
        out.backward(self.grad_output)
        return out.detach(), self.x.grad, self.theta.grad


# ------------------------------------------------------------------------------------------ verification
#
# The bilinear weights' derivative jumps where a source coordinate crosses a pixel boundary, so an ulp of
# difference in a float32 grid (affine_grid rounds differently in every library) can put a sample in
# the next cell and change grad_theta by O(1 %) between two correct float32 implementations (measured:
# torch float32 itself is 7e-3 off its float64 result on the default case). So grad_theta is checked
# against torch evaluated at the implementation's own grid, where both compute the same source
# coordinates; without torch, it is checked on float64 inputs through the same backend against the
# float64 NumPy path. The end-to-end grad_theta difference is printed for information only.

class Reference:
    """Gradients to check against, on the CPU: torch in the timed dtype, or without torch deformcp's
    NumPy path in float64."""

    def __init__(self, x, theta, grad_output, size):
        self.size = tuple(size)
        if torch is not None:
            self.name = "torch cpu"
            self.x, self.theta, self.grad_output = (torch.from_numpy(a) for a in (x, theta, grad_output))
        else:
            self.name = "deformcp numpy float64"
            self.x, self.theta, self.grad_output = (a.astype(np.float64) for a in (x, theta, grad_output))

    def forward_backward(self):
        if torch is not None:
            return [to_numpy(a) for a in Torch("cpu", *(a.numpy() for a in (self.x, self.theta,
                                                                             self.grad_output)),
                                               self.size).forward_backward()]
        return [to_numpy(a) for a in Deformcp("numpy", self.x, self.theta, self.grad_output,
                                              self.size).forward_backward()]

    def grid(self):
        return to_numpy(F.affine_grid(self.theta, list(self.size), align_corners=ALIGN_CORNERS)
                        if torch is not None else deformcp.affine_grid(self.theta, self.size, ALIGN_CORNERS))

    def grad_theta_at(self, grid: np.ndarray) -> np.ndarray:
        """torch's grad_theta with grid_sample differentiated at ``grid`` instead of at affine_grid(theta)."""
        grid = torch.from_numpy(grid.astype(self.x.numpy().dtype)).requires_grad_(True)
        out = F.grid_sample(self.x, grid, mode=MODE, padding_mode=PADDING, align_corners=ALIGN_CORNERS)
        (grad_grid,) = torch.autograd.grad(out, grid, self.grad_output)
        theta = self.theta.clone().requires_grad_(True)
        grid = F.affine_grid(theta, list(self.size), align_corners=ALIGN_CORNERS)
        (grad_theta,) = torch.autograd.grad(grid, theta, grad_grid)
        return grad_theta.numpy()


def verify(impls: dict, reference: Reference, dtype: str) -> dict:
    """Relative errors of every implementation against ``reference``; exits before any timing when one
    is beyond the dtype's tolerance."""
    errors, failed = {}, []
    tolerance = TOLERANCE[dtype]
    expected = reference.forward_backward()
    expected_grid = reference.grid()
    for name, impl in impls.items():
        out, grad_input, grad_theta = (to_numpy(a) for a in impl.forward_backward())
        grid = to_numpy(impl.affine_grid())
        checked = {
            "grid": _harness.relative_error(grid, expected_grid),
            "output": _harness.relative_error(out, expected[0]),
            "output (forward only)": _harness.relative_error(to_numpy(impl.forward()), expected[0]),
            "grad_input": _harness.relative_error(grad_input, expected[1]),
        }
        if torch is not None:
            checked["grad_theta"] = _harness.relative_error(grad_theta, reference.grad_theta_at(grid))
        else:  # see above: float64 inputs through the same backend
            grad_theta64 = to_numpy(impl.astype(np.float64).forward_backward()[2])
            checked["grad_theta (float64 inputs)"] = _harness.relative_error(grad_theta64, expected[2])
        errors[name] = {**checked, "grad_theta end-to-end (info)": _harness.relative_error(grad_theta,
                                                                                          expected[2])}
        bad = [k for k, v in checked.items()
               if not v <= (TOLERANCE["float64"] if "float64" in k else tolerance)]
        print(f"  {name:<16} {_harness.errors_text(errors[name])}"
              + (f"  FAILED ({', '.join(bad)})" if bad else ""))
        if bad:
            failed.append(name)
    if failed:
        sys.exit(f"verification failed for {', '.join(failed)} (tolerance {tolerance:g}): not timing wrong "
                 "code")
    return errors


# ------------------------------------------------------------------------------------------------- setup

def build(setup: _harness.DeviceSetup, x, theta, grad_output, size) -> dict:
    """The implementations to time on the setup's device: deformcp's NumPy path and host backend (cpu) or
    deformcp on CuPy arrays (cuda), and torch where it can run."""
    impls = _harness.deformcp_impls(
        setup, lambda backend, move: Deformcp(backend, *(move(a) for a in (x, theta, grad_output)), size))
    if setup.torch_device is not None:
        impls[f"torch {setup.device}"] = Torch(setup.torch_device, x, theta, grad_output, size)
    return impls


# ----------------------------------------------------------------------------------------------- report

def report(records, baseline, case, machine, errors, reference_name, notes, method, default_case
           ) -> tuple[str, list]:
    headers = ["phase", "implementation", *_harness.timing_headers(baseline)]
    rows = [[r.phase, r.impl, *_harness.timing_cells(records, r, baseline)] for r in records]
    targets = _harness.evaluate_targets(TARGETS, records, baseline, default_case, missing="no torch")
    markdown = _harness.report_markdown(
        title="affine_grid + grid_sample", case_lines=[f"Case: {case}."], command=_harness.command_line(),
        method=method, machine=machine, baseline=baseline, compared="phase",
        no_baseline=_harness.no_baseline("torch", torch), headers=headers, rows=rows, targets=targets,
        verification=f"relative errors against {reference_name}; grad_theta is checked "
                     + ("at each implementation's own grid" if torch is not None else "on float64 inputs")
                     + ", see the script",
        errors=errors, notes=notes)
    return markdown, targets


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = _harness.make_parser(__doc__, "spatial_transformer")
    parser.add_argument("--shape", type=int, nargs=4, default=DEFAULT_SHAPE, metavar=("N", "C", "H", "W"))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    plan = _harness.start(parser, args, torch)
    if plan is None:
        return 2
    if torch is None:
        print("torch is not installed: timing deformcp only, no ratios (pip install torch to compare)")

    shape = tuple(args.shape)
    x, theta, grad_output = make_inputs(shape, args.dtype, args.seed)
    case = (f"input {'×'.join(map(str, shape))} {args.dtype}, {MODE}, padding {PADDING}, "
            f"align_corners={ALIGN_CORNERS}, theta = identity + N(0, 0.05²), output size = input size")
    setup = _harness.device_setup(args.device, torch)
    impls = build(setup, x, theta, grad_output, shape)
    notes = setup.notes
    baseline = next((name for name in impls if name.startswith("torch")), None)
    for note in notes:
        print(f"note: {note}")
    print(case)

    reference = Reference(x, theta, grad_output, shape)
    print(f"verifying against {reference.name} (relative errors) ...")
    errors = verify(impls, reference, args.dtype)

    busy_before = _harness.check_load()
    print(plan.describe())
    records = _harness.time_phases(plan, impls, PHASES, setup.sync, case, baseline)

    busy_after = _harness.cpu_busy()
    machine = _harness.machine_info({**setup.info, "cpu_busy_before": busy_before,
                                     "cpu_busy_after": busy_after})
    markdown, targets = report(records, baseline, case, machine, errors, reference.name, notes, plan.method(),
                               shape == DEFAULT_SHAPE and args.dtype == "float32")
    print()
    print(markdown)
    payload = _harness.results_payload(
        _harness.command_line(), {"case": case, "shape": shape, "dtype": args.dtype, "mode": MODE,
                                  "padding_mode": PADDING, "align_corners": ALIGN_CORNERS, "seed": args.seed,
                                  "device": args.device},
        plan=plan, baseline=baseline, compared="phase", machine=machine, errors=errors, targets=targets,
        notes=notes, records=records)
    _harness.save_results(args, "spatial_transformer", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
