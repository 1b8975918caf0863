"""Benchmark: deformcp.ndimage's affine_transform and map_coordinates (NumPy path) against scipy.ndimage.

Run as ``python benchmarks/bench_ndimage.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how every
benchmark runs). Options beyond every benchmark's: --dtype, --cases.

Cases (--cases), all on the CPU (SciPy's device):

- ``affine-order1``: affine_transform of one 512×512 float32 image (sinusoids of 40–200 px periods), a rotation by
  10° about its centre, order 1, mode "constant" (--quick: 23×29).
- ``affine-order3``: the same at order 3 with SciPy's prefilter (prefilter=True).
- ``volume-order1``, ``volume-order3``: affine_transform of one 128³ float32 volume (sinusoids), rotated by 10°
  about its centre in its last two axes, orders 1 and 3 (--quick: 7×6×5).
- ``map-order1``: map_coordinates of a 64³ float32 volume (standard normal) at 10⁶ points uniform inside it,
  order 1, mode "constant" (--quick: 6×7×5 at 500 points).
- ``channels-order1``: affine_transform of 8 channels of 512×512 float32 (a batch axis: one call), as
  ``affine-order1``, forward only; SciPy warps the channels one by one (--quick: 8×23×29).
- ``volume256-order1``, ``volume256-order3``: ``volume-order1``/``-order3`` on a 256³ volume, forward only, the
  host backend against SciPy (the target: faster than SciPy); the NumPy path, which takes 6–16× SciPy's time on a
  single channel, is timed at 128³ (--quick: 9×8×7).

Each case times the forward of deformcp (its NumPy path, and its host backend where a C++ compiler is found)
against scipy.ndimage's (the anchor; ratios are deformcp's time / SciPy's, below 1 deformcp is faster), and
deformcp's forward+backward (the gradients of the input and of the matrix and offset, or of the coordinates), which
SciPy does not have: its time is reported without a ratio.

Verification, before anything is timed (a mismatch stops the run, exit status 1): deformcp's output against
scipy.ndimage's on the same float32 arrays, and deformcp's gradients against its own NumPy path in float64.

Results: printed, and written to benchmarks/results/ndimage.{json,md}.
"""
from __future__ import annotations

import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_ndimage.py: this folder is first on sys.path
    import harness

try:
    import scipy.ndimage as ndimage
except ImportError:  # optional
    ndimage = None

OPS = ("affine_transform", "map_coordinates")   # the ops of deformcp.ops.SPECS timed here
#: The cases, in the order they run (see the module's docstring), and their options.
CASES = ("affine-order1", "affine-order3", "volume-order1", "volume-order3", "map-order1", "channels-order1",
         "volume256-order1", "volume256-order3")
#: Cases timed forward only (SciPy has no backward: the other cases time deformcp's), and those of them without the
#: NumPy path.
FORWARD_ONLY = ("channels-order1", "volume256-order1", "volume256-order3")
HOST_ONLY = ("volume256-order1", "volume256-order3")
OPTIONS = {"affine-order1": {"order": 1, "mode": "constant"},
           "affine-order3": {"order": 3, "mode": "constant", "prefilter": True},
           "volume-order1": {"order": 1, "mode": "constant"},
           "volume-order3": {"order": 3, "mode": "constant", "prefilter": True},
           "map-order1": {"order": 1, "mode": "constant"},
           "channels-order1": {"order": 1, "mode": "constant"},
           "volume256-order1": {"order": 1, "mode": "constant"},
           "volume256-order3": {"order": 3, "mode": "constant", "prefilter": True}}
#: Each case's size by run: the image's (H, W), or the volume's (D, H, W) and the number of points.
SIZES = {"affine": {"cpu": (512, 512), "quick": (23, 29)}, "volume": {"cpu": (128, 128, 128), "quick": (7, 6, 5)},
         "map": {"cpu": ((64, 64, 64), 10**6), "quick": ((6, 7, 5), 500)},
         "channels": {"cpu": (8, 512, 512), "quick": (8, 23, 29)},
         "volume256": {"cpu": (256, 256, 256), "quick": (9, 8, 7)}}
#: The targets: the host backend faster than SciPy on the 256³ volume.
TARGETS = tuple({"case": case, "impl": "deformcp host", "phase": "forward", "max_ratio": 1.0,
                 "target": "faster than scipy.ndimage.affine_transform"} for case in HOST_ONLY)
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


class AffineProblem(harness.ArrayCase):
    """affine_transform's arrays, NumPy: a smooth input, an image (H, W), a volume (D, H, W) or channels of an image
    (C, H, W), the matrix (n, n) of a rotation in its last two axes and its offset (n,) (about the centre),
    grad_output (the input's shape)."""

    def __init__(self, case: str, shape, dtype, seed):
        rng = np.random.default_rng(seed)
        self.case, self.shape, self.options = case, tuple(shape), OPTIONS[case]
        self.channels = case.startswith("channels")
        sampled = self.shape[1:] if self.channels else self.shape
        axes = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij", sparse=True)
        image = sum(np.sin(2 * np.pi * (sum(a / rng.uniform(40, 200) for a in axes) + rng.uniform()))
                    for _ in range(4))
        angle = np.deg2rad(10.0)
        matrix = np.eye(len(sampled))
        matrix[-2:, -2:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        centre = (np.array(sampled) - 1) / 2
        self.set_arrays({"input": image, "matrix": matrix, "offset": centre - matrix @ centre,
                         "grad_output": rng.standard_normal(shape)}, dtype)

    def describe(self) -> str:
        o = self.options
        what = "image's channels (one call)" if self.channels else "volume" if len(self.shape) == 3 else "image"
        return (f"{self.case}: affine_transform of one {'×'.join(map(str, self.shape))} {self.dtype} {what}, a "
                f"rotation by 10° about its centre, order {o['order']}, mode {o['mode']!r}"
                + (", prefilter=True" if o.get("prefilter") else ""))


class MapProblem(harness.ArrayCase):
    """map_coordinates' arrays, NumPy: a volume input (D, H, W), coordinates (3, P) uniform inside it,
    grad_output (P,)."""

    def __init__(self, case: str, shape, points: int, dtype, seed):
        rng = np.random.default_rng(seed)
        self.case, self.shape, self.points, self.options = case, tuple(shape), points, OPTIONS[case]
        coordinates = rng.uniform(0, np.array(shape)[:, None] - 1, (len(shape), points))
        self.set_arrays({"input": rng.standard_normal(shape), "coordinates": coordinates,
                         "grad_output": rng.standard_normal(points)}, dtype)

    def describe(self) -> str:
        o = self.options
        return (f"{self.case}: map_coordinates of a {'×'.join(map(str, self.shape))} {self.dtype} volume at "
                f"{self.points} points uniform inside it, order {o['order']}, mode {o['mode']!r}")


class Deformcp(harness.DeformcpOp):
    """deformcp.ndimage's op of the problem, forward / backward through its spec, on one CPU backend."""

    def __init__(self, backend: str, problem, move=None):
        self.op = "affine_transform" if isinstance(problem, AffineProblem) else "map_coordinates"
        self.options = problem.options
        super().__init__(backend, problem, move=move)


class Scipy:
    """scipy.ndimage's op of the problem, forward only (it has no backward)."""

    def __init__(self, problem):
        self.a, self.options = problem.arrays, problem.options
        self.affine = isinstance(problem, AffineProblem)

    def forward(self):
        if self.affine and self.a["matrix"].shape[0] < self.a["input"].ndim:  # channels: one call each
            return np.stack([ndimage.affine_transform(x, self.a["matrix"], self.a["offset"], **self.options)
                             for x in self.a["input"]])
        if self.affine:
            return ndimage.affine_transform(self.a["input"], self.a["matrix"], self.a["offset"], **self.options)
        return ndimage.map_coordinates(self.a["input"], self.a["coordinates"], **self.options)

    def forward_backward(self):
        return self.forward(), None

    def gradients(self, grads) -> dict:
        return {}


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "ndimage", max_row_time=20.0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="the arrays' dtype (default float32)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=None, metavar="CASE",
                        help=f"the cases to run: {', '.join(CASES)} (default: all)")
    return parser


def problems(args) -> list:
    size = "quick" if args.quick else "cpu"
    made = []
    for case in (c for c in CASES if c in (args.cases or CASES)):
        if case.startswith(("affine", "volume", "channels")):
            made.append(AffineProblem(case, SIZES[case.split("-")[0]][size], args.dtype, args.seed))
        else:
            made.append(MapProblem(case, *SIZES["map"][size], args.dtype, args.seed))
    return made


def build(setup: harness.DeviceSetup, problem, args) -> dict:
    """deformcp's NumPy path and host backend (harness.deformcp_impls), and scipy.ndimage where it is installed."""
    impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, move))
    if problem.case in HOST_ONLY:
        impls.pop("deformcp numpy")
    if ndimage is not None:
        impls["scipy.ndimage"] = Scipy(problem)
    return impls


def verify_gradients(setup, problem, impls: dict, args, notes: list) -> dict:
    """deformcp's outputs and every gradient against its NumPy path in float64."""
    checks = [(name, impl, problem.dtype, True) for name, impl in impls.items() if name.startswith("deformcp")]
    return harness.verify(f"{problem.case} forward+backward", "deformcp numpy float64",
                          Deformcp("numpy", problem.astype(np.float64)), checks, TOLERANCE, notes, timed=impls)


def verify(setup, problem, impls: dict, args, notes: list) -> dict:
    """Every output against scipy.ndimage's on the same arrays (without SciPy: deformcp's NumPy path in float64),
    then deformcp's gradients (:func:`verify_gradients`) where the backward is timed."""
    ref, ref_name = ((Scipy(problem), "scipy.ndimage") if ndimage is not None else
                     (Deformcp("numpy", problem.astype(np.float64)), "deformcp numpy float64"))
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()]
    errors = harness.verify(f"{problem.case} forward", ref_name, ref, checks, TOLERANCE, notes, grads=(),
                            timed=impls)
    if problem.case in FORWARD_ONLY:
        return errors
    return {**errors, **verify_gradients(setup, problem, impls, args, notes)}


def report(run: harness.Run, problems: list) -> tuple[str, list]:
    anchor = "scipy.ndimage" if ndimage is not None else None
    targets = harness.evaluate_targets([t for t in TARGETS if t["case"] in {p.case for p in problems}], run.records,
                                       anchor, not run.args.quick, missing="no anchor")
    headers = ["case", "phase", "implementation", *harness.timing_headers("scipy.ndimage")]
    rows = [[r.extra["case"], r.phase, r.impl, *harness.timing_cells(run.records, r, anchor)] for r in run.records]
    markdown = harness.report_markdown(
        title="deformcp.ndimage: affine_transform and map_coordinates",
        case_lines=[f"Case {p.describe()}." for p in problems], run=run,
        compared="case and phase (forward+backward: SciPy has no backward, deformcp's time alone)",
        no_baseline=harness.no_baseline("scipy", ndimage), headers=headers, rows=rows, targets=targets,
        verification="forward: relative errors against scipy.ndimage; forward+backward: against deformcp numpy "
                     "float64", no_targets="No targets in the cases run: the ratios are information.")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, anchor=("scipy", ndimage))
    if run is None:
        return 2
    cases = problems(run.args)
    for problem in cases:
        if not run.measure(problem, build(run.setup, problem, run.args), verify, ("forward",),
                           extra={"case": problem.case}, label=f"{problem.case:<14} "):
            return 1
        if problem.case in FORWARD_ONLY:
            continue
        deformcp_only = {k: v for k, v in build(run.setup, problem, run.args).items() if k.startswith("deformcp")}
        if not run.measure(problem, deformcp_only, verify_gradients, ("forward+backward",),
                           extra={"case": problem.case}, label=f"{problem.case:<14} "):
            return 1
    run.finish()
    markdown, targets = report(run, cases)
    run.save("ndimage", markdown, {
        "cases": {p.case: p.describe() for p in cases}, "shapes": {p.case: p.shape for p in cases},
        "options": {p.case: p.options for p in cases}, "anchor": "scipy.ndimage" if ndimage is not None else None,
        "dtype": cases[0].dtype if cases else None, "max_row_time_s": run.args.max_row_time}, targets,
        compared="case and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
