"""Benchmark: affine_grid + grid_sample (Spatial Transformer Networks), deformcp against PyTorch, and an affine
warp against scipy.ndimage.

Run as ``python benchmarks/bench_spatial_transformer.py`` (``--quick``: a smoke run at tiny sizes;
harness.py: how every benchmark runs). Options beyond every benchmark's: --shape N C H W (the STN case), --dtype,
--deterministic, --cases.

Cases (--cases; --device cpu runs them all, --device cuda the STN case only):

- ``stn`` (input 8×64×56×56 float32, bilinear, zeros padding, align_corners=False, theta = identity plus
  N(0, 0.05²), output size = input size; --quick: 2×3×9×11): affine_grid + grid_sample, against torch
  - forward:          affine_grid + grid_sample (torch: under no_grad)
  - backward:         grid_sample_backward (input and grid gradients) + affine_grid_backward
                      (torch: torch.autograd.grad of a recorded graph, retain_graph=True)
  - forward+backward: both of the above (torch: autograd with requires_grad on input and theta, then
                      backward with a random grad_output)
- ``stn-mnist``: the same at 32×1×28×28 (a Spatial Transformer on MNIST), forward+backward.
- ``large-image``: grid_sample alone, 1×3×1024×1024 bilinear (the grid: affine_grid of a theta as above, made
  once), forward and forward+backward (input and grid gradients), against torch.
- ``nearest``: grid_sample alone, 8×64×56×56, mode "nearest", forward, against torch.
- ``bicubic``: grid_sample alone, 8×64×56×56, mode "bicubic", forward and forward+backward, against torch.
- ``volume``, ``volume-large``: grid_sample of volumes (3-D warps, trilinear), 2×4×64×64×64 and 1×1×128×128×128,
  at affine_grid's grid of a theta (N, 3, 4) near the identity, forward and forward+backward, against torch's 5-D
  grid_sample.
- ``warp``: an affine warp of one 2048×2048 float32 image (bilinear, zeros outside), deformcp's affine_grid +
  grid_sample against scipy.ndimage.affine_transform(order=1, mode="grid-constant") of the same warp: theta
  (normalised coordinates, x first) is converted to SciPy's matrix and offset (pixel indices, row first), and the
  two outputs are checked equal before timing. mode="grid-constant" is SciPy's zero padding that interpolates
  against the zeros, as grid_sample's "zeros" does; its default "constant" differs within a pixel of the border.
  The image is smooth (sinusoids), so that float32's rounding of the grid moves no output by more than float32's
  tolerance.
- ``tiny``: grid_sample alone on 1×4×8×8 (an 8×8 grid), forward and forward+backward: the cost of a call.

--device cpu (default) times deformcp's NumPy path, and for the STN cases deformcp's host backend (the CUDA
sources compiled for the CPU: ``with deformcp.backend("host")``), and torch on the CPU. --device cuda times
deformcp on CuPy arrays against torch on CUDA (exits with a message where CuPy sees no GPU). torch and scipy
are optional: without them only deformcp is timed.

Verification, before anything is timed (a deformcp mismatch stops the run, exit status 1): every
implementation's grid, output and input gradient against torch on the CPU in the timed dtype (without
torch: deformcp's NumPy path in float64); grid_sample's grid gradient against torch's at the same float32 grid;
the warp's output against SciPy's. The bilinear weights' derivative jumps where a source
coordinate crosses a pixel boundary, so an ulp of difference in a float32 grid (affine_grid rounds
differently in every library) can put a sample in the next cell and change grad_theta by O(1 %) between
two correct float32 implementations; so grad_theta is checked against the reference differentiated at
the implementation's own grid.

Results: printed, and written to benchmarks/results/spatial_transformer[_cuda].{json,md}. Ratios are
deformcp time / the case's anchor's time (torch, or scipy.ndimage for the warp): below 1 deformcp is faster.
"""
from __future__ import annotations

import sys
from typing import Optional

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
try:
    import scipy.ndimage as ndimage
except ImportError:  # optional
    ndimage = None

OPS = ("affine_grid", "grid_sample", "affine_sample")  # the ops of deformcp.ops.SPECS timed here
OPTIONS = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}
PHASES = ("forward", "backward", "forward+backward")
GRADS = ("input", "theta")
SHAPES = {"cpu": (8, 64, 56, 56), "cuda": (8, 64, 56, 56), "quick": (2, 3, 9, 11)}
#: The cases, in the order they run (see the module's docstring).
CASES = ("stn", "stn-mnist", "large-image", "nearest", "bicubic", "volume", "volume-large", "warp", "tiny")
#: Each case's shape (N, C, H, W) by size: the device's, or --quick's.
SIZES = {"stn-mnist": {"cpu": (32, 1, 28, 28), "quick": (4, 1, 7, 6)},
         "large-image": {"cpu": (1, 3, 1024, 1024), "quick": (1, 3, 17, 19)},
         "nearest": {"cpu": (8, 64, 56, 56), "quick": (2, 5, 9, 11)},
         "bicubic": {"cpu": (8, 64, 56, 56), "quick": (2, 5, 9, 11)},
         "warp": {"cpu": (1, 1, 2048, 2048), "quick": (1, 1, 23, 29)},
         "tiny": {"cpu": (1, 4, 8, 8), "quick": (1, 4, 8, 8)},
         "volume": {"cpu": (2, 4, 64, 64, 64), "quick": (2, 2, 5, 6, 7)},
         "volume-large": {"cpu": (1, 1, 128, 128, 128), "quick": (1, 1, 6, 5, 4)}}
#: The phases each case times.
CASE_PHASES = {"stn": ("forward", "backward", "forward+backward"), "stn-mnist": ("forward+backward",),
               "large-image": ("forward", "forward+backward"), "nearest": ("forward",),
               "bicubic": ("forward", "forward+backward"), "warp": ("forward",),
               "tiny": ("forward", "forward+backward"), "volume": ("forward", "forward+backward"),
               "volume-large": ("forward", "forward+backward")}
#: max_ratio: the most deformcp numpy's time / the anchor's time may be; target: what the issue asks. Default sizes.
TARGETS = tuple({"case": case, "impl": "deformcp numpy", "phase": phase, "max_ratio": ratio, "target": target}
                for case, phase, ratio, target in (
                    ("stn", "forward", 2.0, "within 2× of torch forward"),
                    ("stn", "forward+backward", 1.0, "at least as fast as torch forward+backward"),
                    ("stn-mnist", "forward+backward", 2.0, "within 2× of torch forward+backward"),
                    ("large-image", "forward", 1.0, "at least as fast as torch forward"),
                    ("large-image", "forward+backward", 1.0, "at least as fast as torch forward+backward"),
                    ("nearest", "forward", 1.0, "at least as fast as torch forward"),
                    ("volume", "forward", 1.0, "at least as fast as torch forward"),
                    ("volume", "forward+backward", 1.0, "at least as fast as torch forward+backward"),
                    ("volume-large", "forward", 1.0, "at least as fast as torch forward"),
                    ("volume-large", "forward+backward", 1.0, "at least as fast as torch forward+backward"),
                    ("warp", "forward", 1.0, "faster than scipy.ndimage.affine_transform(order=1)")))
#: The tiny case's target: deformcp's median forward call, in seconds (not a ratio: torch's take a few µs).
TINY_TARGET_S = 50e-6
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
REFERENCE = "torch cpu" if torch is not None else "deformcp numpy float64"


class Problem(harness.ArrayCase):
    """The arrays, NumPy: input (N, C, H, W), theta (N, 2, 3) near the identity, grad_output (N, C, H, W)."""

    def __init__(self, shape, dtype, seed, case: str = "stn"):
        rng = np.random.default_rng(seed)
        self.case, self.shape = case, tuple(shape)
        self.set_arrays({"input": rng.standard_normal(shape), "theta": affine_theta(rng, shape[0]),
                         "grad_output": rng.standard_normal(shape)}, dtype)

    def describe(self) -> str:
        return (f"{self.case}: affine_grid + grid_sample, input {'×'.join(map(str, self.shape))} {self.dtype}, "
                f"{OPTIONS['mode']}, padding {OPTIONS['padding_mode']}, align_corners={OPTIONS['align_corners']}, "
                "theta = identity + N(0, 0.05²), output size = input size")


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


class DeformcpFused(harness.DeformcpOp):
    """deformcp.affine_sample (the two steps in one, no grid) forward / backward through its spec, on one
    backend; its grid (for the verification only) is affine_grid's."""

    op, grads = "affine_sample", GRADS

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        self.options = {"size": problem.shape, **OPTIONS}
        super().__init__(backend, problem, deterministic, move)

    def backward(self):
        with deformcp.backend(self.cpu_backend):
            return self._backward()

    def intermediates(self) -> dict:
        with deformcp.backend(self.cpu_backend):
            return {"grid": deformcp.affine_grid(self.a["theta"], self.options["size"],
                                                 align_corners=OPTIONS["align_corners"])}


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


# ---------------------------------------------------------------------------------- grid_sample alone

def affine_theta(rng, N: int, d: int = 2) -> np.ndarray:
    """(N, d, d + 1) float64: the identity plus N(0, 0.05²)."""
    return np.eye(d, d + 1) + 0.05 * rng.standard_normal((N, d, d + 1))


class GridSampleProblem(harness.ArrayCase):
    """grid_sample's arrays, NumPy: input (N, C, *S), grid (N, *S, d) (affine_grid of :func:`affine_theta`, or
    uniform in [-1, 1) with ``uniform``), grad_output (N, C, *S), S the image's (H, W) or the volume's (D, H, W);
    ``options`` of grid_sample."""

    def __init__(self, case: str, shape, dtype, seed, mode: str = "bilinear", uniform: bool = False):
        rng = np.random.default_rng(seed)
        self.case, self.shape, self.uniform = case, tuple(shape), uniform
        self.options = {**OPTIONS, "mode": mode}
        N, d = shape[0], len(shape) - 2
        grid = (rng.uniform(-1, 1, (N, *shape[2:], d)) if uniform else
                deformcp.affine_grid(affine_theta(rng, N, d), shape, align_corners=OPTIONS["align_corners"]))
        self.set_arrays({"input": rng.standard_normal(shape), "grid": grid, "grad_output": rng.standard_normal(shape)},
                        dtype)

    def describe(self) -> str:
        grid = "uniform in [-1, 1)" if self.uniform else "affine_grid of identity + N(0, 0.05²)"
        o = self.options
        return (f"{self.case}: grid_sample, input {'×'.join(map(str, self.shape))} {self.dtype}, {o['mode']}, "
                f"padding {o['padding_mode']}, align_corners={o['align_corners']}, grid {grid}")


class DeformcpGridSample(harness.DeformcpOp):
    """deformcp.grid_sample / grid_sample_backward through the spec, on one backend."""

    op = "grid_sample"

    def __init__(self, backend: str, problem: GridSampleProblem, deterministic=False, move=None):
        self.options = problem.options
        super().__init__(backend, problem, deterministic, move)


class TorchGridSample(harness.TorchOp):
    """torch.nn.functional.grid_sample through autograd on input and grid."""

    def __init__(self, device, problem: GridSampleProblem):
        options = problem.options
        super().__init__(lambda t: F.grid_sample(t["input"], t["grid"], **options), problem.arrays, ("input", "grid"),
                         device)


# --------------------------------------------------------------------------------- the warp vs SciPy

def warp_theta() -> np.ndarray:
    """(1, 2, 3): rotate by 10°, scale by 0.9, shift by (0.05, -0.03) (normalised coordinates)."""
    angle = np.deg2rad(10.0)
    rotation = 0.9 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([rotation, [[0.05], [-0.03]]], axis=1)[None]


def scipy_matrix(theta: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's (matrix, offset) of affine_transform for affine_grid's theta (2, 3) with align_corners=False and
    output size = input size: theta maps normalised (x, y), x = (2·column + 1) / W − 1, of the output to the input's;
    SciPy maps (row, column) pixel indices of the output to the input's."""
    to_normalised = np.array([[2 / W, 0, 1 / W - 1], [0, 2 / H, 1 / H - 1], [0, 0, 1]])
    pixels = np.linalg.inv(to_normalised) @ np.vstack([theta, [0, 0, 1]]) @ to_normalised  # (x, y, 1) → (x, y, 1)
    swap = [1, 0]  # (x, y) → (row, column)
    return pixels[np.ix_(swap, swap)], pixels[swap, 2]


class WarpProblem(harness.ArrayCase):
    """One smooth image (1, 1, H, W) (sinusoids of 40–200 px periods) and :func:`warp_theta`."""

    def __init__(self, shape, dtype, seed):
        rng = np.random.default_rng(seed)
        self.case, self.shape = "warp", tuple(shape)
        H, W = shape[2:]
        y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij", sparse=True)
        image = sum(np.sin(2 * np.pi * (x / rng.uniform(40, 200) + y / rng.uniform(40, 200) + rng.uniform()))
                    for _ in range(4))
        self.set_arrays({"input": image[None, None], "theta": warp_theta()}, dtype)

    def describe(self) -> str:
        return (f"warp: one {'×'.join(map(str, self.shape[2:]))} {self.dtype} image, bilinear, zeros outside: deformcp "
                "affine_grid + grid_sample (align_corners=False) vs scipy.ndimage.affine_transform(order=1, "
                "mode='grid-constant') of the same warp (rotation 10°, scale 0.9, shift)")


class _ForwardOnly:
    """An implementation timed forward only: forward_backward gives no gradients."""

    def forward_backward(self):
        return self.forward(), None

    def gradients(self, grads) -> dict:
        return {}


class DeformcpWarp(_ForwardOnly):
    """deformcp.affine_grid + grid_sample of the warp, on one backend."""

    def __init__(self, backend: str, problem: WarpProblem, move=None):
        move = move or (lambda a: a)
        self.backend = "numpy" if backend == "cuda" else backend
        self.image, self.theta, self.shape = move(problem.arrays["input"]), move(problem.arrays["theta"]), problem.shape
        self.affine_grid = harness.SPECS["affine_grid"].function
        self.grid_sample = harness.SPECS["grid_sample"].function

    def forward(self):
        with deformcp.backend(self.backend):
            grid = self.affine_grid(self.theta, self.shape, align_corners=OPTIONS["align_corners"])
            return self.grid_sample(self.image, grid, **OPTIONS)[0, 0]


class ScipyWarp(_ForwardOnly):
    """scipy.ndimage.affine_transform(order=1, mode="grid-constant") of the warp."""

    def __init__(self, problem: WarpProblem):
        self.image = problem.arrays["input"][0, 0]
        self.matrix, self.offset = scipy_matrix(warp_theta()[0], *problem.shape[2:])

    def forward(self):
        return ndimage.affine_transform(self.image, self.matrix, self.offset, order=1, mode="grid-constant")


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "spatial_transformer", max_row_time=20.0)
    harness.add_case_arguments(parser, "input shape of the stn case (default 8 64 56 56; --quick 2 3 9 11)",
                               deterministic="deformcp.grid_sample_backward")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=None, metavar="CASE",
                        help=f"the cases to run: {', '.join(CASES)} (default: all; --device cuda: stn)")
    return parser


def case_names(args) -> list[str]:
    """The cases to run, in :data:`CASES`' order: --cases, or all (--device cuda: stn alone)."""
    chosen = args.cases or (CASES if args.device == "cpu" else ("stn",))
    if args.device != "cpu" and set(chosen) != {"stn"}:
        print(f"note: --device {args.device} runs the stn case only (the others time the NumPy path)")
    return [case for case in CASES if case in chosen and (case == "stn" or args.device == "cpu")]


def problems(args) -> list:
    """The problems of :func:`case_names`, the STN case first."""
    size = "quick" if args.quick else args.device
    made = []
    for case in case_names(args):
        if case == "stn":
            made.append(Problem(args.shape or SHAPES[size], args.dtype, args.seed))
        elif case == "stn-mnist":
            made.append(Problem(SIZES[case][size], args.dtype, args.seed, case))
        elif case == "warp":
            made.append(WarpProblem(SIZES[case][size], args.dtype, args.seed))
        else:
            made.append(GridSampleProblem(case, SIZES[case][size], args.dtype, args.seed,
                                          mode=case if case in ("nearest", "bicubic") else "bilinear",
                                          uniform=case == "tiny"))
    return made


def anchor_name(problem, setup: harness.DeviceSetup) -> Optional[str]:
    """The name of the problem's anchor (torch on the device, or SciPy for the warp); None where it cannot run."""
    if isinstance(problem, WarpProblem):
        return "scipy.ndimage" if ndimage is not None else None
    return f"torch {setup.device}" if setup.torch_device is not None else None


def build(setup: harness.DeviceSetup, problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls; the NumPy path alone for the
    grid_sample cases and the warp), and the anchor where it runs."""
    if isinstance(problem, Problem):
        impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, args.deterministic,
                                                                             move))
        fused = harness.deformcp_impls(setup, lambda backend, move: DeformcpFused(backend, problem,
                                                                                  args.deterministic, move))
        impls.update({name.replace("deformcp", "deformcp fused"): impl for name, impl in fused.items()})
    else:
        make = DeformcpWarp if isinstance(problem, WarpProblem) else DeformcpGridSample
        impls = {"deformcp numpy": make("numpy", problem)}
    anchor = anchor_name(problem, setup)
    if anchor is not None:
        impls[anchor] = (ScipyWarp(problem) if isinstance(problem, WarpProblem) else
                         (Torch if isinstance(problem, Problem) else TorchGridSample)(setup.torch_device, problem))
    return impls


def reference(problem: Problem):
    """What the STN implementations are checked against (:data:`REFERENCE`): torch on the CPU in the timed
    dtype, or without torch deformcp's NumPy path in float64."""
    if torch is not None:
        return Torch("cpu", problem)
    return Deformcp("numpy", problem.astype(np.float64))


def verify(setup, problem, impls: dict, args, notes: list) -> dict:
    """Each implementation against the case's reference (:func:`verify_stn` for the STN cases; torch on the CPU
    for grid_sample alone, or deformcp in float64 without torch; SciPy for the warp, or deformcp in float64 without
    it); raises harness.VerificationFailed for a deformcp mismatch."""
    if isinstance(problem, Problem):
        return verify_stn(setup, problem, impls, args, notes)
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()]
    if isinstance(problem, WarpProblem):
        ref, ref_name, grads = (ScipyWarp(problem), "scipy.ndimage", ()) if ndimage is not None else (
            DeformcpWarp("numpy", problem.astype(np.float64)), "deformcp numpy float64", ())
        return harness.verify(problem.case, ref_name, ref, checks, TOLERANCE, notes, grads=grads, timed=impls)
    ref, ref_name = ((TorchGridSample("cpu", problem), "torch cpu") if torch is not None else
                     (DeformcpGridSample("numpy", problem.astype(np.float64)), "deformcp numpy float64"))
    return harness.verify(problem.case, ref_name, ref, checks, TOLERANCE, notes, grads=("input", "grid"), timed=impls)


def verify_stn(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Grid, output, grad_input and grad_theta (at each implementation's own grid) against
    :func:`reference`; raises harness.VerificationFailed for a deformcp mismatch."""
    ref = reference(problem)
    expected_grid = harness.to_numpy(ref.intermediates()["grid"])

    def expected_at(own):
        return {"grid": expected_grid, "grad_theta": harness.to_numpy(ref.grad_theta_at(own["grid"]))}

    checks = [(impl_name, impl, problem.dtype, impl_name.startswith("deformcp")) for impl_name, impl in impls.items()]
    return harness.verify(f"{problem.case}: affine_grid + grid_sample", REFERENCE, ref, checks, TOLERANCE, notes,
                          grads=("input",), timed=impls, expected_at=expected_at)


def report(run: harness.Run, problems: list) -> tuple[str, list]:
    anchors = {p.case: anchor_name(p, run.setup) for p in problems}
    headers = ["case", "phase", "implementation", *harness.timing_headers("anchor")]
    rows = [[r.extra["case"], r.phase, r.impl, *harness.timing_cells(run.records, r, anchors[r.extra["case"]])]
            for r in run.records]
    stn = problems[0] if problems[0].case == "stn" else None
    targets = []
    for case in anchors:
        default = (not run.args.quick and (case != "stn" or (stn.shape == SHAPES[run.args.device]
                                                            and stn.dtype == "float32")))
        targets += harness.evaluate_targets([t for t in TARGETS if t["case"] == case], run.records, anchors[case],
                                            default, missing="no anchor")
    lines = [f"Case {p.describe()}." for p in problems]
    tiny = [r for r in run.records if r.extra["case"] == "tiny" and r.impl == "deformcp numpy" and r.phase == "forward"]
    if tiny and not run.args.quick:
        median = tiny[0].timing.median
        lines += [f"Target of the tiny case: deformcp numpy's median grid_sample call at most "
                  f"{TINY_TARGET_S * 1e6:.0f} µs: {harness.format_seconds(median)} — "
                  f"{'met' if median <= TINY_TARGET_S else 'MISSED'} "
                  "(forward+backward: two calls, for information)."]
    markdown = harness.report_markdown(
        title="affine_grid + grid_sample", case_lines=lines, run=run, compared="case and phase (the anchor: torch, "
        "or scipy.ndimage for the warp)", no_baseline=harness.no_baseline("torch", torch), headers=headers, rows=rows,
        targets=targets, verification=f"relative errors against {REFERENCE} (the warp: against scipy.ndimage); "
                                      "grad_theta at each implementation's own grid, see the script")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torch", torch))
    if run is None:
        return 2
    cases = problems(run.args)
    for problem in cases:
        phases = CASE_PHASES[problem.case]
        if not run.measure(problem, build(run.setup, problem, run.args), verify, phases, extra={"case": problem.case},
                           label=f"{problem.case:<11} "):
            return 1
    run.finish()
    markdown, targets = report(run, cases)
    run.save("spatial_transformer", markdown, {
        "cases": {p.case: p.describe() for p in cases}, "shapes": {p.case: p.shape for p in cases},
        "anchors": {p.case: anchor_name(p, run.setup) for p in cases}, "dtype": cases[0].dtype if cases else None,
        **OPTIONS, "max_row_time_s": run.args.max_row_time}, targets, compared="case and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
