"""Benchmark: dcnv3 and dcnv4 (InternImage's DCNv3, DCNv4 core ops), deformcp against the PyTorch fallback.

Run as ``python benchmarks/bench_dcn.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how every benchmark
runs). Options beyond every benchmark's: --ops, --stages, --dtype (one or more), --deterministic.

The anchor is the pure-PyTorch fallback that InternImage ships for machines without its CUDA extension
(``dcnv3_core_pytorch``), written here from deformcp's formula (:func:`fallback`): the channels-last input padded,
the sampling grid the kernel's taps around each output pixel plus offset·offset_scale, normalised to [-1, 1] over
the padded input, one torch.nn.functional.grid_sample (bilinear, zeros, align_corners=False) on (N·G, Cg, H_pad,
W_pad), times the mask, summed over the taps. Tap p = i·k_h + j (i over the kernel's width, outer) and pad_w pads the
width, as deformcp's (and InternImage's CUDA op's) convention; InternImage's own PyTorch reference swaps pad_h and
pad_w, which the shapes here (pad_h = pad_w) do not see. For dcnv4 the fallback unpacks offset_mask (per group 2P
offsets then P mask values, groups back to back, then padding) and runs the same code (softmax=False, DCNv4's
default). Its gradients come from torch autograd.

What is timed (InternImage-T's four stages at a 224×224 image: N images, a 3×3 kernel, stride 1, pad 1, dilation 1,
offset_scale 1.0, group_channels Cg = 16):

- --device cpu (default): N = 2, stage1 56×56 with C = 64 (G = 4 groups), stage2 28×28, C = 128, G = 8; stage3
  14×14, C = 256, G = 16; stage4 7×7, C = 512, G = 32; float32, each for dcnv3 and dcnv4; deformcp's NumPy path,
  deformcp's host backend (the CUDA sources compiled for the CPU: ``with deformcp.backend("host")``) and the
  fallback on the CPU.
- --device cuda: the same stages with N = 32, in float32, float16 and bfloat16; deformcp on CuPy arrays (bfloat16:
  on torch CUDA tensors, as CuPy has no bfloat16) against the fallback on CUDA. Exits with a message where CuPy
  sees no GPU.
- --quick: N = 2, Cg = 4, stage1 6×5 with G = 2, stage2 3×4 with G = 4; the device's dtypes.

- forward:          dcnv3 / dcnv4 (torch: under no_grad)
- forward+backward: the forward, then the backward for every gradient (input, offset and mask; dcnv4: input and
                    offset_mask) for a random grad_output (torch: autograd with requires_grad on all of them, then
                    backward)

Inputs (fixed seed, the same numbers for both ops; drawn in float64, rounded to the dtype): input N(0, 1); offsets
N(0, 1) pixels (taps near the border fall outside, where they read zeros); DCNv3's mask the softmax over each
group's 9 taps of N(0, 1) logits; DCNv4's offset_mask the same offsets and mask packed, its padding (up to
ceil(3·G·P / 8)·8, as DCNv4's modules) zeros; grad_output N(0, 1).

Verification, before anything is timed: every implementation's output (from forward+backward and from forward
alone) and gradients against the fallback in float64 on the same rounded inputs (on the anchor's device; without
torch, deformcp's NumPy path in float64), and deformcp's NumPy path in float64 too, as ‖a − b‖ / ‖b‖. The offset
gradient (dcnv4: offset_mask's offset entries) is compared off cell edges: the pairs of taps whose pixel coordinate
lies within 1e-4 pixel of an integer are left out (0 on both sides), where the bilinear weights' derivative jumps and
rounding may take either cell (both answers are right). A deformcp error above the tolerance (float32 1e-4, float16
1e-2, bfloat16 5e-2, float64 1e-10), a deformcp result of another dtype, or an exception from a timed implementation
stops the run (exit status 1); the fallback beyond those bounds is reported, not stopped on.

Results: printed, and written to benchmarks/results/dcn[_cuda].{json,md}. Ratios are an implementation's time / the
fallback's: below 1 is faster.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_dcn.py: this folder is first on sys.path
    import harness

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional
    torch = F = None

#: DCNv3 is multi-scale deformable attention over one level: that benchmark's torch helpers serve here too
msda = harness.benchmark("ms_deform_attn")

OPS = ("dcnv3", "dcnv4")   # the ops of deformcp.ops.SPECS timed here (--ops: some)
PHASES = ("forward", "forward+backward")


class Stage(NamedTuple):
    """One stage's shapes: its name, the input's H × W, G groups of Cg channels."""

    name: str
    H: int
    W: int
    G: int
    Cg: int


STAGES = {"cpu": (Stage("stage1", 56, 56, 4, 16), Stage("stage2", 28, 28, 8, 16), Stage("stage3", 14, 14, 16, 16),
                  Stage("stage4", 7, 7, 32, 16)),
          "quick": (Stage("stage1", 6, 5, 2, 4), Stage("stage2", 3, 4, 4, 4))}
STAGES["cuda"] = STAGES["cpu"]
BATCH = {"cpu": 2, "cuda": 32, "quick": 2}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16", "bfloat16")}
#: The kernel's geometry (InternImage-T's DCNv3 layers); H_out = H, W_out = W
GEOMETRY = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1,
                offset_scale=1.0)
OFFSET_PX = 1.0          # offsets N(0, OFFSET_PX²) pixels
EDGE_PX = 1e-4           # offset gradients are compared off cell edges by this much (see the docstring)
#: deformcp NumPy path time / fallback time: the targets for the CPU cases (every op and stage, float32)
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than the torch fallback forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than the torch fallback forward+backward"})
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
#: The gradient that holds the offsets, per op.
OFFSETS = {"dcnv3": "offset", "dcnv4": "offset_mask"}


# ---------------------------------------------------------------------------------------------- inputs

def taps() -> int:
    """P, the kernel's taps."""
    return GEOMETRY["kernel_h"] * GEOMETRY["kernel_w"]


def padded_size(G: int) -> int:
    """DCNv4's offset_mask channels: 3·G·P rounded up to a multiple of 8, as its modules."""
    return -(-3 * G * taps() // 8) * 8


class Problem(harness.ArrayCase):
    """One op's arrays, NumPy: input (N, H, W, G·Cg); offset (N, H, W, G·P·2) and mask (N, H, W, G·P), or dcnv4's
    offset_mask (N, H, W, ceil(3·G·P / 8)·8); grad_output (N, H, W, G·Cg) (H_out = H, W_out = W here)."""

    def __init__(self, op, stage: Stage, N: int, dtype, seed):
        rng = np.random.default_rng([seed, [s.name for s in STAGES["cpu"]].index(stage.name)])  # alike for both ops
        self.op, self.stage, self.N = op, stage, N
        H, W, G, P = stage.H, stage.W, stage.G, taps()
        arrays = {"input": rng.standard_normal((N, H, W, G * stage.Cg))}
        offset = OFFSET_PX * rng.standard_normal((N, H, W, G, 2 * P))
        mask = msda.softmax(rng.standard_normal((N, H, W, G, P)))
        if op == "dcnv4":
            packed = np.concatenate([offset, mask], axis=-1).reshape(N, H, W, 3 * G * P)
            padding = np.zeros((N, H, W, padded_size(G) - 3 * G * P))
            arrays["offset_mask"] = np.concatenate([packed, padding], axis=-1)
        else:
            arrays["offset"], arrays["mask"] = offset.reshape(N, H, W, 2 * G * P), mask.reshape(N, H, W, G * P)
        arrays["grad_output"] = rng.standard_normal((N, H, W, G * stage.Cg))
        self.set_arrays(arrays, dtype)

    @property
    def options(self) -> dict:
        """The op's arguments beside its arrays."""
        options = {**GEOMETRY, "group": self.stage.G, "group_channels": self.stage.Cg}
        return {**options, "softmax": False} if self.op == "dcnv4" else options

    @property
    def label(self) -> str:
        """The case's name in rows and keys: "stage1 float32"."""
        return f"{self.stage.name} {self.dtype}"

    @property
    def key(self) -> str:
        return f"{self.op} {self.label}"

    def pairs(self) -> np.ndarray:
        """The (Δx, Δy) offsets (N, H_out, W_out, G, P, 2) in float64."""
        G, P = self.stage.G, taps()
        if self.op == "dcnv4":
            blocks = self.arrays["offset_mask"][..., :3 * G * P].reshape(*self.heads(), 3 * P)
            return blocks[..., :2 * P].reshape(*self.heads(), P, 2).astype(np.float64)
        return self.arrays["offset"].reshape(*self.heads(), P, 2).astype(np.float64)

    def heads(self) -> tuple[int, int, int, int]:
        """(N, H_out, W_out, G)."""
        return self.N, self.stage.H, self.stage.W, self.stage.G

    def edges(self) -> np.ndarray:
        """Where the offset gradient is not compared, in its shape: both entries of every tap whose pixel coordinate
        (deformcp's formula, float64) lies within EDGE_PX of an integer (where the bilinear weights' derivative
        jumps)."""
        g = GEOMETRY
        N, Ho, Wo, G = self.heads()
        P, scale = taps(), g["offset_scale"]
        ch, cw = (g["dilation_h"] * (g["kernel_h"] - 1)) >> 1, (g["dilation_w"] * (g["kernel_w"] - 1)) >> 1
        i, j = np.divmod(np.arange(P), g["kernel_h"])                   # tap p = i·k_h + j, i over the width
        start_x = cw - g["pad_w"] + np.arange(Wo) * g["stride_w"] - cw * scale
        start_y = ch - g["pad_h"] + np.arange(Ho) * g["stride_h"] - ch * scale
        pairs = self.pairs()
        x = start_x[:, None, None] + (i * g["dilation_w"] + pairs[..., 0]) * scale
        y = start_y[:, None, None, None] + (j * g["dilation_h"] + pairs[..., 1]) * scale
        near = (np.abs(x - np.round(x)) < EDGE_PX) | (np.abs(y - np.round(y)) < EDGE_PX)   # (N, Ho, Wo, G, P)
        near = np.repeat(near[..., None], 2, axis=-1).reshape(N, Ho, Wo, G, 2 * P)
        if self.op == "dcnv3":
            return near.reshape(N, Ho, Wo, G * 2 * P)
        blocks = np.concatenate([near, np.zeros((N, Ho, Wo, G, P), bool)], axis=-1)   # the mask: compared everywhere
        padding = np.zeros((N, Ho, Wo, padded_size(G) - 3 * G * P), bool)
        return np.concatenate([blocks.reshape(N, Ho, Wo, 3 * G * P), padding], axis=-1)

    def describe(self) -> str:
        s = self.stage
        what = ("offset_mask packed (offsets and mask, softmax=False)" if self.op == "dcnv4"
                else "offset and mask")
        return (f"{self.op}, {s.name}: input {self.N}×{s.H}×{s.W}×{s.G * s.Cg} (N×H×W×C) {self.dtype}, G = {s.G} "
                f"groups of Cg = {s.Cg}, 3×3 kernel, stride 1, pad 1, dilation 1, {what}")


# ------------------------------------------------------------------------------------------- implementations

class Deformcp(harness.DeformcpOp):
    """deformcp's dcnv3 / dcnv4 (``problem.op``) forward / forward+backward (every gradient) through its spec, on one
    backend ("numpy", "host", or "cuda" for CuPy arrays or torch CUDA tensors)."""

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        self.op, self.options = problem.op, problem.options
        super().__init__(backend, problem, deterministic, move)


def fallback(input, pairs, weights, G: int, Cg: int):
    """DCNv3's sampling with grid_sample, in the manner of InternImage's ``dcnv3_core_pytorch`` (:data:`GEOMETRY`):
    input (N, H, W, G·Cg), pairs (N, H_out, W_out, G, P, 2) of (Δx, Δy) pixels, weights (N, H_out, W_out, G, P)
    → (N, H_out, W_out, G·Cg)."""
    g = GEOMETRY
    (kh, kw), (sh, sw) = (g["kernel_h"], g["kernel_w"]), (g["stride_h"], g["stride_w"])
    (ph, pw), (dh, dw), scale = (g["pad_h"], g["pad_w"]), (g["dilation_h"], g["dilation_w"]), g["offset_scale"]
    N, H, W, _ = input.shape
    Ho, Wo, P = pairs.shape[1], pairs.shape[2], kh * kw
    padded = F.pad(input, (0, 0, pw, pw, ph, ph))                     # channels-last: (C), (W: pad_w), (H: pad_h)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    ch, cw = (dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1
    like = {"dtype": input.dtype, "device": input.device}
    tap = torch.arange(P, device=input.device)
    tap_x = (tap // kh * dw - cw).to(input.dtype)                     # tap p = i·k_h + j: i over the width, outer
    tap_y = (tap % kh * dh - ch).to(input.dtype)
    centre_x = torch.arange(Wo, **like) * sw + (cw + 0.5)             # padded pixel + 0.5: grid_sample's centres
    centre_y = torch.arange(Ho, **like) * sh + (ch + 0.5)
    x = centre_x.view(Wo, 1, 1) + (tap_x + pairs[..., 0]) * scale     # (N, H_out, W_out, G, P)
    y = centre_y.view(Ho, 1, 1, 1) + (tap_y + pairs[..., 1]) * scale
    grid = torch.stack([2 * x / Wp - 1, 2 * y / Hp - 1], dim=-1)      # [0, W_pad] → [-1, 1] (align_corners=False)
    grid = grid.view(N, Ho * Wo, G, P, 2).transpose(1, 2).reshape(N * G, Ho * Wo, P, 2)
    image = padded.view(N, Hp * Wp, G * Cg).transpose(1, 2).reshape(N * G, Cg, Hp, Wp)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.reshape(N, Ho * Wo, G, P).transpose(1, 2).reshape(N * G, 1, Ho * Wo, P)
    out = (sampled * weights).sum(-1).view(N, G * Cg, Ho * Wo)        # (N·G, Cg, H_out·W_out, P) summed over taps
    return out.transpose(1, 2).reshape(N, Ho, Wo, G * Cg).contiguous()


def dcnv3_fallback(input, offset, mask, G: int, Cg: int):
    """:func:`fallback` for dcnv3's offset (N, H_out, W_out, G·P·2) and mask (N, H_out, W_out, G·P)."""
    N, Ho, Wo, _ = offset.shape
    return fallback(input, offset.view(N, Ho, Wo, G, -1, 2), mask.view(N, Ho, Wo, G, -1), G, Cg)


def dcnv4_fallback(input, offset_mask, G: int, Cg: int):
    """:func:`fallback` for dcnv4's offset_mask (N, H_out, W_out, P_pad): per group 2P offsets then P mask values,
    groups back to back, the padding not read."""
    N, Ho, Wo, _ = offset_mask.shape
    P = taps()
    blocks = offset_mask[..., :3 * G * P].view(N, Ho, Wo, G, 3 * P)
    return fallback(input, blocks[..., :2 * P].reshape(N, Ho, Wo, G, P, 2), blocks[..., 2 * P:], G, Cg)


def fallback_op(device, problem: Problem) -> Any:
    """The fallback (:func:`dcnv3_fallback`, :func:`dcnv4_fallback`) on one device, through autograd on the op's
    differentiable arrays (bfloat16 too)."""
    G, Cg = problem.stage.G, problem.stage.Cg
    if problem.op == "dcnv4":
        return msda.Anchor(lambda t: dcnv4_fallback(t["input"], t["offset_mask"], G, Cg), problem, device)
    return msda.Anchor(lambda t: dcnv3_fallback(t["input"], t["offset"], t["mask"], G, Cg), problem, device)


# ------------------------------------------------------------------------------------------------ verification

def reference(setup: harness.DeviceSetup, problem: Problem) -> tuple[Any, str]:
    """(implementation, name) of the reference: the fallback in float64 on the anchor's device, or without torch
    deformcp's NumPy path in float64."""
    problem64 = problem.astype(np.float64)
    if torch is None:
        return Deformcp("numpy", problem64), "deformcp numpy float64"
    device = setup.torch_device if setup.torch_device is not None else "cpu"
    return fallback_op(device, problem64), f"torch fallback {torch.device(device).type} float64"


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Output and gradients of ``impls`` (and, against the fallback, deformcp's NumPy path in float64) against
    :func:`reference`, the offset gradient off cell edges; raises harness.VerificationFailed for a deformcp
    mismatch, a wrong dtype or an error."""
    impl, name = reference(setup, problem)
    recorded, offsets, edges = msda.Recorded(impl), OFFSETS[problem.op], problem.edges()

    def expected_at(own):
        return {msda.off_edges(offsets): np.where(edges, 0.0, recorded.seen[offsets].astype(np.float64))}

    checks = [(n, msda.Checked(i, offsets, edges), problem.dtype, n.startswith("deformcp")) for n, i in impls.items()]
    if torch is not None:
        checks.append(("deformcp numpy float64", msda.Checked(Deformcp("numpy", problem.astype(np.float64)), offsets,
                                                              edges), "float64", True))
    grads = [g for g in harness.SPECS[problem.op].differentiable if g != offsets]
    return harness.verify(problem.key, name, recorded, checks, TOLERANCE, notes, grads=grads, timed=impls,
                          expected_at=expected_at)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "dcn")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    names = [s.name for s in STAGES["cpu"]]
    parser.add_argument("--stages", nargs="+", choices=names, default=names,
                        help="InternImage-T's stages: 56×56, 28×28, 14×14, 7×7 (--quick: the first two, tiny)")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16", "float64"), default=None,
                        help="dtypes to time (default cpu: float32; cuda: float32 float16 bfloat16)")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to deformcp's backward functions")
    return parser


def problems(args) -> list[Problem]:
    """The cases, dtype by dtype (float32 first), op by op, stage by stage."""
    dtypes = args.dtype or DTYPES[args.device]
    if "bfloat16" in dtypes:
        import ml_dtypes  # noqa: F401  (NumPy's bfloat16)
    size = "quick" if args.quick else args.device
    return [Problem(op, stage, BATCH[size], dtype, args.seed) for dtype in dtypes for op in OPS if op in args.ops
            for stage in STAGES[size] if stage.name in args.stages]


def build(setup: harness.DeviceSetup, problem: Problem, args, notes=None) -> dict:
    """deformcp's implementations on the setup's device (bfloat16 on CUDA: on torch tensors), and the fallback where
    torch runs."""
    def make(backend, move):
        return Deformcp(backend, problem, args.deterministic, move)

    device = setup.torch_device
    if setup.device == "cuda" and problem.dtype == "bfloat16":
        if device is None:
            (notes if notes is not None else []).append(f"{problem.key} skipped: bfloat16 on CUDA goes through torch "
                                                        "CUDA tensors, and torch has no CUDA here")
            return {}
        impls = {"deformcp cuda": make("cuda", functools.partial(msda.tensor, device=device))}
    else:
        impls = harness.deformcp_impls(setup, make)
    if device is not None:
        impls[f"torch fallback {setup.device}"] = fallback_op(device, problem)
    return impls


def report(run: harness.Run, problems: list[Problem]) -> tuple[str, list]:
    records, baseline, args = run.records, run.baseline, run.args
    headers = ["op", "case", "phase", "implementation", *harness.timing_headers(baseline)]
    rows = [[r.extra["op"], r.extra["case_id"], r.phase, r.impl, *harness.timing_cells(records, r, baseline)]
            for r in records]
    default_case = (args.device == "cpu" and not args.quick and {p.dtype for p in problems} == {"float32"})
    targets = []
    if args.device == "cpu":
        targets = harness.evaluate_targets([{"op": p.op, "case_id": p.label, **t} for p in problems for t in TARGETS],
                                           records, baseline, default_case, missing="no torch")
    else:
        run.notes.append("Targets: set for the CPU cases (float32) only")
    case_lines = ["Cases:", "", *(f"- {p.key}: {p.describe()}" for p in problems), "",
                  f"Inputs: input N(0, 1); offsets N(0, {OFFSET_PX:g}²) pixels; DCNv3's mask the softmax over each "
                  f"group's {taps()} taps of N(0, 1) logits; DCNv4's offset_mask the same offsets and mask packed "
                  "(per group 2P offsets then P mask values), its padding to ceil(3·G·P / 8)·8 zeros; grad_output "
                  "N(0, 1); drawn in float64, rounded to the dtype; fixed seed. forward+backward = the op, then its "
                  "backward for every gradient (torch: autograd on all of them). The torch fallback (InternImage's "
                  "dcnv3_core_pytorch, pad_h and pad_w as deformcp's): the input padded, one grid_sample (bilinear, "
                  "zeros, align_corners=False) on (N·G, Cg, H_pad, W_pad) at the taps plus offset·offset_scale "
                  "normalised to [-1, 1], times the mask, summed over the taps (dcnv4: offset_mask unpacked first)."]
    markdown = harness.report_markdown(
        title="dcnv3 and dcnv4", case_lines=case_lines, run=run, compared="op, case and phase",
        no_baseline=harness.no_baseline("torch", torch), headers=headers, rows=rows, targets=targets,
        verification=f"relative errors ‖a − b‖ / ‖b‖ against the torch fallback in float64 (without torch, deformcp "
                     f"numpy in float64); offset gradients off cell edges (±{EDGE_PX:g} px)")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torch", torch))
    if run is None:
        return 2
    args = run.args
    cases = problems(args)
    for problem in cases:
        impls = build(run.setup, problem, args, run.notes)
        if impls and not run.measure(problem, impls, verify, PHASES, extra={"op": problem.op, "case_id": problem.label},
                                     label=f"{problem.key:<22} "):
            return 1
    run.finish()
    markdown, targets = report(run, cases)
    size = "quick" if args.quick else args.device
    run.save("dcn", markdown, {
        "cases": [{"key": p.key, "op": p.op, "stage": p.stage.name, "description": p.describe(), "dtype": p.dtype}
                  for p in cases],
        "N": BATCH[size], "stages": [s._asdict() for s in STAGES[size]], "geometry": GEOMETRY,
        "offset_px": OFFSET_PX, "edge_px": EDGE_PX,
        "anchor": "torch fallback: grid_sample from the formula, as InternImage's dcnv3_core_pytorch, autograd"},
        targets, compared="op, case and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
