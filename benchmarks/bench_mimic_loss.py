"""Benchmark: mimic_loss (Deformable ConvNets v2's feature-mimicking loss), deformcp against PyTorch.

Run as ``python benchmarks/bench_mimic_loss.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how
every benchmark runs). Options beyond every benchmark's: --rois K, --features D, --dtype.

What is timed (DCN v2's R-CNN feature mimicking: one 1024-d fc feature of the head per RoI, of the
deformable network (f_a) and of the RoI cropped from the image (f_b)):

- f_a, f_b (K, D) float32, K = 512 RoIs (--device cuda: 2048, four images of 512), D = 1024 features;
  --quick: 6×16.
- Features as after the head's ReLU, and alike row for row: f_a = relu(z), f_b = relu(z + 0.5·ε), z and ε
  N(0, 1) (cos about 0.9, loss about 0.1 a row). No row is all zeros (a row that the draw leaves all zero,
  possible only for tiny D, gets a 1 in its first entry): deformcp takes cos = 0 for such a row, torch's
  cosine_similarity clamps the norms with an eps, so the two would disagree there by convention, not by
  error. grad_output: a scalar N(0, 1). All drawn in float64 with a fixed seed, then rounded to the dtype.

- forward:          mimic_loss (torch: ``(1 − cosine_similarity(f_a, f_b, dim=1)).sum()`` under no_grad)
- forward+backward: mimic_loss, then mimic_loss_backward for the gradients of f_a and f_b (torch: that
                    expression through autograd with requires_grad on f_a and f_b, then backward with
                    grad_output)

--device cpu (default) times deformcp's NumPy path, deformcp's host backend (the CUDA sources compiled
for the CPU: ``with deformcp.backend("host")``) and torch on the CPU. --device cuda times deformcp on
CuPy arrays against torch on CUDA (exits with a message where CuPy sees no GPU). torch is optional:
without it only deformcp is timed.

Verification, before anything is timed (a deformcp error beyond the tolerance, an output of another
dtype, or an exception stops the run, exit status 1): every implementation's loss (from forward+backward
and from forward alone) and its f_a and f_b gradients against the torch expression in float64 on the CPU
on the same (rounded) inputs, as ‖a − b‖ / ‖b‖ (tolerance 1e-4 for float32, 1e-10 for float64; the timed
torch anchor is information only); deformcp's NumPy path in float64 too. Without torch, against
deformcp's NumPy path in float64.

Results: printed, and written to benchmarks/results/mimic_loss[_cuda].{json,md}. Ratios are deformcp time
/ torch time: below 1 deformcp is faster.
"""
from __future__ import annotations

import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_mimic_loss.py: this folder is first on sys.path
    import harness

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional
    torch = F = None

OPS = ("mimic_loss",)                          # the ops of deformcp.ops.SPECS timed here
PHASES = ("forward", "forward+backward")
GRADS = harness.SPECS["mimic_loss"].differentiable   # f_a, f_b: the backward's fields
NOISE = 0.5                                    # f_b = relu(z + NOISE·ε), f_a = relu(z)
DEFAULTS = {"cpu": {"rois": 512, "features": 1024},
            "cuda": {"rois": 2048, "features": 1024},
            "quick": {"rois": 6, "features": 16}}
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
REFERENCE = "torch cpu float64" if torch is not None else "deformcp numpy float64"
NO_TARGETS = "Targets: none set for mimic_loss."


# ---------------------------------------------------------------------------------------------- inputs

class Problem(harness.ArrayCase):
    """The arrays, NumPy: f_a, f_b (K, D) without all-zero rows, grad_output () (the loss is a scalar)."""

    def __init__(self, K, D, dtype, seed):
        rng = np.random.default_rng(seed)
        self.K, self.D = K, D
        z = rng.standard_normal((K, D))
        f_a = np.maximum(z, 0.0)
        f_b = np.maximum(z + NOISE * rng.standard_normal((K, D)), 0.0)
        for f in (f_a, f_b):
            f[~f.any(axis=1), 0] = 1.0         # no all-zero row: the anchor's convention differs there
        self.set_arrays({"f_a": f_a, "f_b": f_b, "grad_output": rng.standard_normal(())}, dtype)

    def set_arrays(self, arrays: dict, dtype) -> None:
        super().set_arrays(arrays, dtype)
        self.arrays["grad_output"] = self.arrays["grad_output"].reshape(())   # 0-d, as the loss

    def describe(self) -> str:
        return (f"f_a, f_b {self.K}×{self.D} {self.dtype} (K RoIs × D features): f_a = relu(z), f_b = relu(z + "
                f"{NOISE:g}·ε), z, ε N(0, 1), no all-zero row; grad_output a scalar N(0, 1)")


class Deformcp(harness.DeformcpOp):
    """deformcp.mimic_loss forward / forward+backward (the gradients of f_a and f_b) through its spec, on one
    backend ("numpy", "host", or "cuda" for CuPy arrays)."""

    op = "mimic_loss"


def torch_op(device, problem: Problem) -> harness.TorchOp:
    """The anchor: ``(1 − cosine_similarity(f_a, f_b, dim=1)).sum()`` on one device, through autograd on f_a
    and f_b."""
    return harness.TorchOp(lambda t: (1 - F.cosine_similarity(t["f_a"], t["f_b"], dim=1)).sum(), problem.arrays,
                           GRADS, device)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "mimic_loss")
    parser.add_argument("--rois", type=harness.positive, default=None,
                        help="K, rows of f_a and f_b (default 512; cuda 2048; --quick 6)")
    parser.add_argument("--features", type=harness.positive, default=None,
                        help="D, features a row (default 1024; --quick 16)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    return parser


def case_size(args) -> tuple[int, int]:
    """--rois and --features, or their defaults for --quick or --device."""
    chosen = DEFAULTS["quick" if args.quick else args.device]
    return args.rois or chosen["rois"], args.features or chosen["features"]


def problems(args) -> list[Problem]:
    return [Problem(*case_size(args), args.dtype, args.seed)]


def build(setup: harness.DeviceSetup, problem: Problem, args) -> dict:
    """deformcp's implementations on the setup's device (harness.deformcp_impls), and torch where it runs."""
    impls = harness.deformcp_impls(setup, lambda backend, move: Deformcp(backend, problem, False, move))
    if setup.torch_device is not None:
        impls[f"torch {setup.device}"] = torch_op(setup.torch_device, problem)
    return impls


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Every implementation of ``impls`` (and deformcp's NumPy path in float64) against :data:`REFERENCE` on
    the same (rounded) inputs: loss, and the gradients of f_a and f_b. Raises harness.VerificationFailed for a
    deformcp mismatch or wrong dtype, or where a timed implementation raises."""
    problem64 = problem.astype(np.float64)
    reference = torch_op("cpu", problem64) if torch is not None else Deformcp("numpy", problem64)
    checks = [(name, impl, problem.dtype, name.startswith("deformcp")) for name, impl in impls.items()]
    if torch is not None:
        checks.append(("deformcp numpy float64", Deformcp("numpy", problem64), "float64", True))
    return harness.verify("mimic_loss", REFERENCE, reference, checks, TOLERANCE, notes, timed=impls)


def report(run: harness.Run, problem: Problem) -> str:
    headers = ["phase", "implementation", *harness.timing_headers(run.baseline)]
    rows = [[r.phase, r.impl, *harness.timing_cells(run.records, r, run.baseline)] for r in run.records]
    case_lines = [
        f"Case: {problem.describe()}.", "",
        "L = Σ_k [1 − cos(f_a[k], f_b[k])]. forward+backward = mimic_loss, then mimic_loss_backward for the "
        "gradients of f_a and f_b; torch: (1 − cosine_similarity(f_a, f_b, dim=1)).sum() through autograd. "
        "No row is all zeros: there deformcp takes cos = 0 and torch clamps the norms, different conventions.",
    ]
    return harness.report_markdown(
        title="mimic_loss", case_lines=case_lines, run=run, compared="phase",
        no_baseline=harness.no_baseline("torch", torch), headers=headers, rows=rows, targets=[],
        no_targets=NO_TARGETS, verification=f"relative errors ‖a − b‖ / ‖b‖ against {REFERENCE}: loss and the f_a "
                                             "and f_b gradients")


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torch", torch))
    if run is None:
        return 2
    (problem,) = problems(run.args)
    if not run.measure(problem, build(run.setup, problem, run.args), verify, PHASES):
        return 1
    run.finish()
    run.save("mimic_loss", report(run, problem), {
        "case": problem.describe(), "rois": problem.K, "features": problem.D, "dtype": problem.dtype,
        "noise": NOISE, "anchor": "torch: (1 - torch.nn.functional.cosine_similarity(f_a, f_b, dim=1)).sum(), "
                                  "autograd"}, [], compared="phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
