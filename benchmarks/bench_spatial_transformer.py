"""Benchmark: affine_grid + grid_sample (Spatial Transformer Networks), deformcp against PyTorch.

Run as ``python benchmarks/bench_spatial_transformer.py`` (``--quick``: a smoke run at tiny sizes;
harness.py: how every benchmark runs). Options beyond every benchmark's: --shape N C H W, --dtype,
--deterministic.

What is timed (input 8×64×56×56 float32, bilinear, zeros padding, align_corners=False, theta = identity
plus N(0, 0.05²), output size = input size; --quick: 2×3×9×11):

- forward:          affine_grid + grid_sample (torch: under no_grad)
- backward:         grid_sample_backward (input and grid gradients) + affine_grid_backward
                    (torch: torch.autograd.grad of a recorded graph, retain_graph=True)
- forward+backward: both of the above (torch: autograd with requires_grad on input and theta, then
                    backward with a random grad_output)

--device cpu (default) times deformcp's NumPy path, deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``) and torch on the CPU. --device cuda times deformcp on
CuPy arrays against torch on CUDA (exits with a message where CuPy sees no GPU). torch is optional:
without it only deformcp is timed.

Verification, before anything is timed (a deformcp mismatch stops the run, exit status 1): every
implementation's grid, output and input gradient against torch on the CPU in the timed dtype (without
torch: deformcp's NumPy path in float64). The bilinear weights' derivative jumps where a source
coordinate crosses a pixel boundary, so an ulp of difference in a float32 grid (affine_grid rounds
differently in every library) can put a sample in the next cell and change grad_theta by O(1 %) between
two correct float32 implementations; so grad_theta is checked against the reference differentiated at
the implementation's own grid.

Results: printed, and written to benchmarks/results/spatial_transformer[_cuda].{json,md}. Ratios are
deformcp time / torch time: below 1 deformcp is faster.
"""
from __future__ import annotations

import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_spatial_transformer.py: this folder is first on sys.path
    import harness
import deformcp  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional
    torch = F = None

OPS = ("affine_grid", "grid_sample")            # the ops of deformcp.ops.SPECS timed here
OPTIONS = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}
PHASES = ("forward", "backward", "forward+backward")
GRADS = ("input", "theta")
SHAPES = {"cpu": (8, 64, 56, 56), "cuda": (8, 64, 56, 56), "quick": (2, 3, 9, 11)}
#: max_ratio: the most deformcp time / torch time may be; target: what the issue asks. Default case only.
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 2.0,
            "target": "within 2× of torch forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1.0,
            "target": "at least as fast as torch forward+backward"})
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
REFERENCE = "torch cpu" if torch is not None else "deformcp numpy float64"


class Problem(harness.ArrayCase):
    """The arrays, NumPy: input (N, C, H, W), theta (N, 2, 3) near the identity, grad_output (N, C, H, W)."""

    def __init__(self, shape, dtype, seed):
        rng = np.random.default_rng(seed)
        self.shape = tuple(shape)
        identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        self.set_arrays({"input": rng.standard_normal(shape),
                         "theta": identity + 0.05 * rng.standard_normal((shape[0], 2, 3)),
                         "grad_output": rng.standard_normal(shape)}, dtype)

    def describe(self) -> str:
        return (f"input {'×'.join(map(str, self.shape))} {self.dtype}, {OPTIONS['mode']}, padding "
                f"{OPTIONS['padding_mode']}, align_corners={OPTIONS['align_corners']}, theta = identity + "
                "N(0, 0.05²), output size = input size")


class Deformcp(harness.DeformcpOp):
    """deformcp's affine_grid + grid_sample forward / backward through their specs, on one backend ("numpy",
    "host", or "cuda" for CuPy arrays)."""

    op, grads = "grid_sample", GRADS

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        super().__init__(backend, problem, deterministic, move)
        self.size, self.grid = problem.shape, None
        affine = harness.SPECS["affine_grid"]
        self.affine_grid, self.affine_grid_backward = affine.function, affine.backward

    def _grid(self):
        return self.affine_grid(self.a["theta"], self.size, align_corners=OPTIONS["align_corners"])

    def _forward(self):
        return self.forward_fn(self.a["input"], self._grid(), **OPTIONS)

    def _backward(self, grid):
        grad_input, grad_grid = self.backward_fn(self.a["grad_output"], self.a["input"], grid, **OPTIONS,
                                                 deterministic=self.deterministic)
        (grad_theta,) = self.affine_grid_backward(grad_grid, self.a["theta"], self.size,
                                                  align_corners=OPTIONS["align_corners"])
        return grad_input, grad_theta

    def backward(self):
        with deformcp.backend(self.cpu_backend):
            if self.grid is None:  # the forward's grid, made once (untimed) for the backward-only phase
                self.grid = self._grid()
            return self._backward(self.grid)

    def forward_backward(self):
        with deformcp.backend(self.cpu_backend):
            grid = self._grid()
            return self.forward_fn(self.a["input"], grid, **OPTIONS), self._backward(grid)

    def gradients(self, grads) -> dict:
        return dict(zip(self.grads, grads))

    def intermediates(self) -> dict:
        with deformcp.backend(self.cpu_backend):
            return {"grid": self._grid()}

    def grad_theta_at(self, grid: np.ndarray):
        """grad_theta with grid_sample differentiated at ``grid`` instead of at affine_grid(theta)."""
        with deformcp.backend(self.cpu_backend):
            return self._backward(np.asarray(grid, dtype=self.a["input"].dtype))[1]


class Torch(harness.TorchOp):
    """torch.nn.functional.affine_grid + grid_sample on one device, through autograd on input and theta."""

    def __init__(self, device, problem: Problem):
        self.size, self.graph = list(problem.shape), None
        super().__init__(lambda t: F.grid_sample(t["input"], self._grid(t["theta"]), **OPTIONS), problem.arrays,
                         GRADS, device)

    def _grid(self, theta):
        return F.affine_grid(theta, self.size, align_corners=OPTIONS["align_corners"])

    def backward(self):
        if self.graph is None:  # one recorded forward (untimed), differentiated again on every call
            self.graph = self.call(self.t)
        return torch.autograd.grad(self.graph, (self.t["input"], self.t["theta"]), self.t["grad_output"],
                                   retain_graph=True)

    def intermediates(self) -> dict:
        with torch.no_grad():
            return {"grid": self._grid(self.t["theta"])}

    def grad_theta_at(self, grid: np.ndarray):
        """grad_theta with grid_sample differentiated at ``grid`` instead of at affine_grid(theta)."""
        x = self.t["input"].detach()
        grid = torch.from_numpy(np.asarray(grid)).to(device=x.device, dtype=x.dtype).requires_grad_(True)
        (grad_grid,) = torch.autograd.grad(F.grid_sample(x, grid, **OPTIONS), grid, self.t["grad_output"])
        theta = self.t["theta"].detach().clone().requires_grad_(True)
        (grad_theta,) = torch.autograd.grad(self._grid(theta), theta, grad_grid)
        return grad_theta


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "spatial_transformer")
    harness.add_case_arguments(parser, "input shape (default 8 64 56 56; --quick 2 3 9 11)",
                               deterministic="deformcp.grid_sample_backward")
    return parser


def problems(args) -> list[Problem]:
    return [Problem(args.shape or SHAPES["quick" if args.quick else args.device], args.dtype, args.seed)]


def build(setup: harness.DeviceSetup, problem: Problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls), and torch where it runs."""
    impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, args.deterministic, move))
    if setup.torch_device is not None:
        impls[f"torch {setup.device}"] = Torch(setup.torch_device, problem)
    return impls


def reference(problem: Problem):
    """What the implementations are checked against (:data:`REFERENCE`): torch on the CPU in the timed
    dtype, or without torch deformcp's NumPy path in float64."""
    if torch is not None:
        return Torch("cpu", problem)
    return Deformcp("numpy", problem.astype(np.float64))


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Grid, output, grad_input and grad_theta (at each implementation's own grid) against
    :func:`reference`; raises harness.VerificationFailed for a deformcp mismatch."""
    ref = reference(problem)
    expected_grid = harness.to_numpy(ref.intermediates()["grid"])

    def expected_at(own):
        return {"grid": expected_grid, "grad_theta": harness.to_numpy(ref.grad_theta_at(own["grid"]))}

    checks = [(impl_name, impl, problem.dtype, impl_name.startswith("deformcp")) for impl_name, impl in impls.items()]
    return harness.verify("affine_grid + grid_sample", REFERENCE, ref, checks, TOLERANCE, notes, grads=("input",),
                          timed=impls, expected_at=expected_at)


def report(run: harness.Run, problem: Problem) -> tuple[str, list]:
    headers = ["phase", "implementation", *harness.timing_headers(run.baseline)]
    rows = [[r.phase, r.impl, *harness.timing_cells(run.records, r, run.baseline)] for r in run.records]
    default_case = problem.shape == SHAPES[run.args.device] and problem.dtype == "float32"
    targets = harness.evaluate_targets(TARGETS, run.records, run.baseline, default_case, missing="no torch")
    markdown = harness.report_markdown(
        title="affine_grid + grid_sample", case_lines=[f"Case: {problem.describe()}."], run=run,
        compared="phase", no_baseline=harness.no_baseline("torch", torch), headers=headers, rows=rows,
        targets=targets, verification=f"relative errors against {REFERENCE}; grad_theta at each "
                                      "implementation's own grid, see the script")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torch", torch))
    if run is None:
        return 2
    (problem,) = problems(run.args)
    if not run.measure(problem, build(run.setup, problem, run.args), verify, PHASES):
        return 1
    run.finish()
    markdown, targets = report(run, problem)
    run.save("spatial_transformer", markdown, {"case": problem.describe(), "shape": problem.shape,
                                               "dtype": problem.dtype, **OPTIONS}, targets, compared="phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
