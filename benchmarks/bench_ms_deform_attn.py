"""Benchmark: ms_deform_attn and flash_deform_attn (Deformable DETR, DCNv4), deformcp against the PyTorch fallback.

Run as ``python benchmarks/bench_ms_deform_attn.py`` (``--quick``: a smoke run at tiny sizes; harness.py: how every
benchmark runs). Options beyond every benchmark's: --ops, --cases encoder decoder, --dtype (one or more),
--deterministic, --max-row-time S (fewer timed calls, at least 5, where one call is slow; default 30 s a row).

The anchor is the pure-PyTorch fallback that the Deformable DETR family ships for machines without its CUDA
extension (mmcv's ``multi_scale_deformable_attn_pytorch``), written here from its formula (:func:`fallback`): value
split per level, each level reshaped to (N·M, D, H_l, W_l) and sampled with torch.nn.functional.grid_sample
(bilinear, zeros, align_corners=False) at ``2·loc − 1``, the levels' samples stacked, multiplied by the attention
weights and summed over the points. For flash_deform_attn the fallback applies the softmax to the logits first
(:func:`flash_fallback`). Its gradients come from torch autograd.

What is timed (Deformable DETR's sizes: N = 2 images, M = 8 heads of D = 32 channels, L = 4 levels, P = 4 points
per level and head):

- --device cpu (default): levels 64×64, 32×32, 16×16, 8×8 (S = 5440 pixels), float32, in two cases: the encoder
  (Lq = S = 5440 queries) and the decoder (Lq = 300); deformcp's NumPy path, deformcp's host backend (the CUDA
  sources compiled for the CPU: ``with deformcp.backend("host")``) and the fallback on the CPU.
- --device cuda: levels 100×134, 50×67, 25×34, 13×17 (S = 17821; encoder Lq = 17821, decoder 300), float32, float16
  and bfloat16; deformcp on CuPy arrays (bfloat16: on torch CUDA tensors, as CuPy has no bfloat16), the fallback on
  CUDA and, where it is importable, Deformable DETR's CUDA extension ``MultiScaleDeformableAttention`` (as built by
  Deformable-DETR's and the HuggingFace ports' ``ops/make.sh``; called through an autograd.Function as they do,
  im2col_step 64; flash_deform_attn: torch's softmax, then the extension), in the dtypes it accepts (it is probed
  once a dtype; what it refuses is noted). Exits with a message where CuPy sees no GPU.
- --quick: N 2, M 2, D 4, P 2, levels 6×5, 3×4, 2×2, 1×1 (encoder Lq = 47, decoder 5), the device's dtypes.

- forward:          ms_deform_attn / flash_deform_attn (torch: under no_grad)
- forward+backward: the forward, then the backward for every gradient (value, sampling_locations and
                    attention_weights; flash_deform_attn: value and sampling_loc_attn, the logits included) for a
                    random grad_output (torch: autograd with requires_grad on all of them, then backward)

Inputs (fixed seed; drawn in float64, rounded to the dtype): value N(0, 1); per query a reference point uniform in
[0, 1]², each of its M·L·P sampling locations that point plus N(0, 2²) pixels of its level (some fall outside their
level, where they read zeros); attention weights the softmax over each head's L·P points of N(0, 1) logits
(flash_deform_attn takes the logits); grad_output N(0, 1).

Verification, before anything is timed: every implementation's output (from forward+backward and from forward
alone) and gradients against the fallback in float64 on the same rounded inputs (on the anchor's device; without
torch, deformcp's NumPy path in float64), as ‖a − b‖ / ‖b‖. The location gradient is compared off cell edges: the
entries of points that lie within 1e-4 pixel of a pixel row or column are left out (0 on both sides), where the
bilinear weights' derivative jumps and float32 rounding of the pixel coordinate x·W_l − 0.5 may take either cell
(both answers are right). A deformcp error above the tolerance (float32 1e-4, float16 1e-2, bfloat16 5e-2, float64
1e-10), a deformcp result of another dtype, or an exception from a timed implementation stops the run (exit status
1); the fallback or the extension beyond those bounds is reported, not stopped on.

Memory: every implementation's peak of allocated memory above the level before the call, outputs included, in one
separate untimed call per phase after timing. deformcp on the CPU: tracemalloc (NumPy's buffers and Python objects,
as bench_deform_conv.py); the fallback on the CPU: torch's profiler (the CPU allocator's running total of what the
call allocated); on CUDA: CuPy's memory pool (a memory hook) plus torch's caching allocator (max_memory_allocated),
added (a bound from above for a call that uses both, as deformcp's bfloat16 on torch tensors does).

Results: printed, and written to benchmarks/results/ms_deform_attn[_cuda].{json,md}. Ratios are an implementation's
time (or peak memory) / the fallback's: below 1 is faster (smaller).
"""
from __future__ import annotations

import functools
import gc
import sys
from typing import Any, NamedTuple, Optional

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/bench_ms_deform_attn.py: this folder is first on sys.path
    import harness

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional
    torch = F = None

OPS = ("ms_deform_attn", "flash_deform_attn")   # the ops of deformcp.ops.SPECS timed here (--ops: some)
PHASES = ("forward", "forward+backward")
CASES = ("encoder", "decoder")                    # Lq = S (every pixel a query), Lq = the decoder's queries


class Size(NamedTuple):
    """A device's sizes: levels (H_l, W_l), images N, heads M, channels D, points P per level and head, and the
    decoder's queries."""

    levels: tuple
    N: int
    M: int
    D: int
    P: int
    decoder: int


SIZES = {"cpu": Size(((64, 64), (32, 32), (16, 16), (8, 8)), 2, 8, 32, 4, 300),
         "cuda": Size(((100, 134), (50, 67), (25, 34), (13, 17)), 2, 8, 32, 4, 300),
         "quick": Size(((6, 5), (3, 4), (2, 2), (1, 1)), 2, 2, 4, 2, 5)}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16", "bfloat16")}
OFFSET_PX = 2.0          # sampling locations: the query's reference point + N(0, OFFSET_PX²) pixels of the level
EDGE_PX = 1e-4           # location gradients are compared off cell edges by this much (see the docstring)
IM2COL_STEP = 64         # Deformable DETR's default for its CUDA extension
EXTENSION = "MSDA extension cuda"
#: deformcp NumPy path time / fallback time: the targets for the CPU cases (every op and case, float32)
TARGETS = ({"impl": "deformcp numpy", "phase": "forward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than the torch fallback forward"},
           {"impl": "deformcp numpy", "phase": "forward+backward", "max_ratio": 1 / 3,
            "target": "at least 3× faster than the torch fallback forward+backward"})
MEMORY_TARGET = "peak memory below the torch fallback's"
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
#: The gradient that holds the sampling locations, per op.
LOCATIONS = {"ms_deform_attn": "sampling_locations", "flash_deform_attn": "sampling_loc_attn"}


# ---------------------------------------------------------------------------------------------- inputs

def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Problem(harness.ArrayCase):
    """One op's arrays, NumPy: value (N, S, M, D); sampling_locations (N, Lq, M, L, P, 2) and attention_weights
    (N, Lq, M, L, P), or flash_deform_attn's sampling_loc_attn (N, Lq, M, L·P·3); grad_output (N, Lq, M·D)."""

    def __init__(self, op, case, size: Size, dtype, seed):
        rng = np.random.default_rng([seed, OPS.index(op), CASES.index(case)])
        self.op, self.case, self.size = op, case, size
        N, M, D, P, L = size.N, size.M, size.D, size.P, len(size.levels)
        self.S = sum(h * w for h, w in size.levels)
        self.Lq = Lq = self.S if case == "encoder" else size.decoder
        reference = rng.uniform(0.0, 1.0, (N, Lq, 1, 1, 1, 2))
        locations = reference + OFFSET_PX * rng.standard_normal((N, Lq, M, L, P, 2)) / self.pixels()
        logits = rng.standard_normal((N, Lq, M, L * P))
        arrays = {"value": rng.standard_normal((N, self.S, M, D))}
        if op == "flash_deform_attn":
            arrays["sampling_loc_attn"] = np.concatenate([locations.reshape(N, Lq, M, 2 * L * P), logits], axis=-1)
        else:
            arrays["sampling_locations"] = locations
            arrays["attention_weights"] = softmax(logits).reshape(N, Lq, M, L, P)
        arrays["grad_output"] = rng.standard_normal((N, Lq, M * D))
        self.set_arrays(arrays, dtype)

    def pixels(self) -> np.ndarray:
        """(L, 1, 2): each level's (W_l, H_l), to scale normalised (x, y) locations of (…, L, P, 2) to pixels."""
        return np.array([(w, h) for h, w in self.size.levels], np.float64)[:, None, :]

    @property
    def label(self) -> str:
        """The case's name in rows and keys: "encoder float32"."""
        return f"{self.case} {self.dtype}"

    @property
    def key(self) -> str:
        return f"{self.op} {self.label}"

    @property
    def options(self) -> dict:
        """The op's arguments beside its arrays."""
        options = {"spatial_shapes": self.size.levels, "level_start_index": None}
        return {**options, "num_points": self.size.P} if self.op == "flash_deform_attn" else options

    def locations(self) -> np.ndarray:
        """The sampling locations (N, Lq, M, L, P, 2) in float64."""
        if self.op == "flash_deform_attn":
            packed = self.arrays["sampling_loc_attn"].astype(np.float64)
            return packed[..., :packed.shape[-1] // 3 * 2].reshape(*packed.shape[:3], len(self.size.levels),
                                                                    self.size.P, 2)
        return self.arrays["sampling_locations"].astype(np.float64)

    def edges(self) -> np.ndarray:
        """Where the location gradient is not compared, in its shape: both entries of every point within EDGE_PX
        pixel of a pixel row or column (where the bilinear weights' derivative jumps)."""
        pixel = self.locations() * self.pixels() - 0.5
        near = np.broadcast_to((np.abs(pixel - np.round(pixel)) < EDGE_PX).any(axis=-1, keepdims=True), pixel.shape)
        if self.op != "flash_deform_attn":
            return near
        packed = self.arrays["sampling_loc_attn"]
        mask = np.zeros(packed.shape, bool)   # the logits' gradient is continuous: compared everywhere
        mask[..., :2 * len(self.size.levels) * self.size.P] = near.reshape(*packed.shape[:3], -1)
        return mask

    def describe(self) -> str:
        N, M, D, P = self.size.N, self.size.M, self.size.D, self.size.P
        levels = ", ".join(f"{h}×{w}" for h, w in self.size.levels)
        what = ("sampling_loc_attn packed (locations and logits, softmax in the op)" if self.op == "flash_deform_attn"
                else "sampling_locations and attention_weights")
        return (f"{self.op}, {self.case}: value {N}×{self.S}×{M}×{D} (N×S×M×D) {self.dtype}, levels {levels}, "
                f"Lq = {self.Lq} queries, {P} points per level and head, {what}")


# ------------------------------------------------------------------------------------------- implementations

class Deformcp(harness.DeformcpOp):
    """deformcp's ms_deform_attn / flash_deform_attn (``problem.op``) forward / forward+backward (every gradient)
    through its spec, on one backend ("numpy", "host", or "cuda" for CuPy arrays or torch CUDA tensors)."""

    def __init__(self, backend: str, problem: Problem, deterministic=False, move=None):
        self.op, self.options = problem.op, problem.options
        super().__init__(backend, problem, deterministic, move)


def fallback(value, levels, locations, weights):
    """Multi-scale deformable attention from its formula with grid_sample (mmcv's
    ``multi_scale_deformable_attn_pytorch``): value (N, S, M, D), locations (N, Lq, M, L, P, 2) normalised (x, y),
    weights (N, Lq, M, L, P) → (N, Lq, M·D)."""
    N, S, M, D = value.shape
    Lq, L, P = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1                 # [0, 1] over a level's outer edges → grid_sample's [-1, 1]
    samples = []
    for level, ((H, W), pixels) in enumerate(zip(levels, value.split([h * w for h, w in levels], dim=1))):
        image = pixels.permute(0, 2, 3, 1).reshape(N * M, D, H, W)            # (N, H·W, M, D) → (N·M, D, H, W)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)  # (N·M, Lq, P, (x, y))
        samples.append(F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(samples, dim=3).flatten(3)                           # (N·M, D, Lq, L·P), level-major
    weights = weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    return (sampled * weights).sum(-1).view(N, M * D, Lq).transpose(1, 2).contiguous()


def unpack(packed, L: int, P: int):
    """flash_deform_attn's (N, Lq, M, L·P·3) → locations (N, Lq, M, L, P, 2), the softmax of the logits (…, L, P)."""
    N, Lq, M, _ = packed.shape
    locations = packed[..., :2 * L * P].reshape(N, Lq, M, L, P, 2)
    return locations, packed[..., 2 * L * P:].softmax(-1).reshape(N, Lq, M, L, P)


def flash_fallback(value, levels, packed, P: int):
    """:func:`fallback` for flash_deform_attn's packed array: the softmax of the logits first."""
    return fallback(value, levels, *unpack(packed, len(levels), P))


def tensor(array: np.ndarray, device):
    """A NumPy array as a torch tensor on ``device``; bfloat16 (ml_dtypes, which torch.from_numpy refuses) through
    float32, exactly."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(array).to(device)


class Anchor(harness.TorchOp):
    """harness.TorchOp on a problem's arrays, bfloat16 ones too: ``call(tensors)`` through autograd on the op's
    differentiable arrays."""

    def __init__(self, call, problem: Problem, device):
        self.torch, self.call = torch, call
        self.leaves = harness.SPECS[problem.op].differentiable
        self.t = {k: tensor(v, device).requires_grad_(k in self.leaves) for k, v in problem.arrays.items()}


def fallback_op(device, problem: Problem) -> Anchor:
    """The fallback (:func:`fallback`, :func:`flash_fallback`) on one device."""
    levels, P = problem.size.levels, problem.size.P
    if problem.op == "flash_deform_attn":
        return Anchor(lambda t: flash_fallback(t["value"], levels, t["sampling_loc_attn"], P), problem, device)
    return Anchor(lambda t: fallback(t["value"], levels, t["sampling_locations"], t["attention_weights"]), problem,
                  device)


def extension() -> tuple[Any, Optional[str]]:
    """Deformable DETR's CUDA extension (the module MultiScaleDeformableAttention), or None and why not."""
    try:
        import MultiScaleDeformableAttention as module
    except Exception as e:  # not built here, or built for another torch
        return None, (f"{EXTENSION} skipped: Deformable DETR's CUDA extension MultiScaleDeformableAttention does not "
                      f"import ({type(e).__name__}: {e})")
    return module, None


@functools.lru_cache(maxsize=None)
def extension_function(module):
    """Deformable DETR's MSDeformAttnFunction over the extension ``module``."""
    class MSDeformAttnFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights, step):
            ctx.step = step
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return module.ms_deform_attn_forward(value, shapes, starts, locations, weights, step)

        @staticmethod
        def backward(ctx, grad_output):
            value, shapes, starts, locations, weights = ctx.saved_tensors
            grad_value, grad_locations, grad_weights = module.ms_deform_attn_backward(
                value, shapes, starts, locations, weights, grad_output.contiguous(), ctx.step)
            return grad_value, None, None, grad_locations, grad_weights, None

    return MSDeformAttnFunction


def extension_op(module, device, problem: Problem) -> Anchor:
    """The extension on one device (flash_deform_attn: torch's softmax of the logits, then the extension)."""
    levels, P = problem.size.levels, problem.size.P
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    starts = torch.tensor(np.cumsum([0] + [h * w for h, w in levels[:-1]]), dtype=torch.int64, device=device)
    function = extension_function(module)

    def attend(value, locations, weights):
        return function.apply(value, shapes, starts, locations.contiguous(), weights.contiguous(), IM2COL_STEP)

    if problem.op == "flash_deform_attn":
        return Anchor(lambda t: attend(t["value"], *unpack(t["sampling_loc_attn"], len(levels), P)), problem, device)
    return Anchor(lambda t: attend(t["value"], t["sampling_locations"], t["attention_weights"]), problem, device)


@functools.lru_cache(maxsize=None)
def extension_refuses(module, device, op: str, dtype: str) -> Optional[str]:
    """Why the extension cannot run ``op`` in ``dtype`` (a tiny forward+backward), or None where it can."""
    try:
        extension_op(module, device, Problem(op, "decoder", SIZES["quick"], dtype, 0)).forward_backward()
    except Exception as e:
        return f"{EXTENSION} skipped for {op} {dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


# ------------------------------------------------------------------------------------------------ verification

def readable(a):
    """A torch bfloat16 tensor as a NumPy (ml_dtypes) bfloat16 array, which harness.check can read; else ``a``."""
    if torch is not None and isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16:
        import ml_dtypes

        return a.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return a


def off_edges(location: str) -> str:
    """The name of the location gradient compared off cell edges."""
    return f"grad_{location} off cell edges"


class Checked:
    """An implementation as harness.check reads it: bfloat16 tensors as NumPy arrays (:func:`readable`), and its
    location gradient off cell edges (``edges``: where it is set to 0) as an intermediate."""

    def __init__(self, impl, location: str, edges: np.ndarray):
        self.impl, self.location, self.edges = impl, location, edges

    def forward(self):
        return readable(self.impl.forward())

    def forward_backward(self):
        out, grads = self.impl.forward_backward()
        return readable(out), grads

    def gradients(self, grads) -> dict:
        return {name: readable(g) for name, g in self.impl.gradients(grads).items()}

    def intermediates(self) -> dict:
        _, grads = self.impl.forward_backward()
        gradient = harness.to_numpy(self.gradients(grads)[self.location]).astype(np.float64)
        return {off_edges(self.location): np.where(self.edges, 0.0, gradient)}


class Recorded:
    """The reference, keeping the gradients that harness.verify reads from it (``seen``)."""

    def __init__(self, impl):
        self.impl, self.seen = impl, {}

    def forward_backward(self):
        return self.impl.forward_backward()

    def gradients(self, grads) -> dict:
        self.seen = {k: None if g is None else harness.to_numpy(g) for k, g in self.impl.gradients(grads).items()}
        return self.seen


def reference(setup: harness.DeviceSetup, problem: Problem) -> tuple[Any, str]:
    """(implementation, name) of the reference: the fallback in float64 on the anchor's device, or without torch
    deformcp's NumPy path in float64."""
    problem64 = problem.astype(np.float64)
    if torch is None:
        return Deformcp("numpy", problem64), "deformcp numpy float64"
    device = setup.torch_device if setup.torch_device is not None else "cpu"
    return fallback_op(device, problem64), f"torch fallback {torch.device(device).type} float64"


def verify(setup, problem: Problem, impls: dict, args, notes: list) -> dict:
    """Output and gradients against :func:`reference` (the location gradient off cell edges); raises
    harness.VerificationFailed for a deformcp mismatch, a wrong dtype or an error."""
    impl, name = reference(setup, problem)
    recorded, location, edges = Recorded(impl), LOCATIONS[problem.op], problem.edges()

    def expected_at(own):
        return {off_edges(location): np.where(edges, 0.0, recorded.seen[location].astype(np.float64))}

    checks = [(n, Checked(i, location, edges), problem.dtype, n.startswith("deformcp")) for n, i in impls.items()]
    grads = [g for g in harness.SPECS[problem.op].differentiable if g != location]
    return harness.verify(problem.key, name, recorded, checks, TOLERANCE, notes, grads=grads, timed=impls,
                          expected_at=expected_at)


# ------------------------------------------------------------------------------------------------ memory

def torch_cpu_peak(fn) -> Optional[int]:
    """Peak bytes that torch's CPU allocator held for ``fn()`` above its level before (torch's profiler: each
    allocation event carries the running total of what was allocated while profiling); None where this torch's
    profiler does not say."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
        del result
    try:
        stack, peak = list(profiler.profiler.kineto_results.experimental_event_tree()), 0
    except AttributeError:
        return None
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def cuda_peak(fn, setup: harness.DeviceSetup) -> int:
    """Peak bytes of CuPy's memory pool plus torch's CUDA caching allocator (where torch has CUDA) for ``fn()``,
    above their levels before."""
    from cupy.cuda import memory_hook

    class PoolPeak(memory_hook.MemoryHook):
        name = "PoolPeak"

        def __init__(self):
            self.level = self.peak = 0

        def malloc_postprocess(self, **kwargs):
            self.level += kwargs["mem_size"]
            self.peak = max(self.peak, self.level)

        def free_postprocess(self, **kwargs):
            self.level -= kwargs["mem_size"]

    gc.collect()
    setup.sync()
    device = setup.torch_device
    if device is not None:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PoolPeak() as pool:
        result = fn()
        setup.sync()
        del result
    return pool.peak + (torch.cuda.max_memory_allocated(device) - base if device is not None else 0)


def peak_memory(setup: harness.DeviceSetup, name: str, fn) -> Optional[int]:
    """``fn()``'s peak of allocated memory above the level before, in bytes (see the module docstring)."""
    if setup.device == "cuda":
        return cuda_peak(fn, setup)
    if name.startswith("deformcp"):
        return harness.benchmark("deform_conv").traced_peak(fn)["peak_extra_bytes"]
    return torch_cpu_peak(fn)


def measure_memory(setup: harness.DeviceSetup, impls: dict) -> dict:
    """{implementation: {phase: peak bytes}}, one untimed call each."""
    return {name: {phase: peak_memory(setup, name, getattr(impl, harness.PHASE_METHODS[phase])) for phase in PHASES}
            for name, impl in impls.items()}


def format_bytes(n) -> str:
    return harness.benchmark("deform_conv").format_bytes(n)


# ------------------------------------------------------------------------------------------- the benchmark

def parser():
    parser = harness.make_parser(__doc__, "ms_deform_attn", max_row_time=30.0)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="encoder: every pixel a query (Lq = S); decoder: 300 queries (--quick: 5)")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16", "float64"), default=None,
                        help="dtypes to time (default cpu: float32; cuda: float32 float16 bfloat16)")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to deformcp's backward functions")
    return parser


def problems(args) -> list[Problem]:
    """The cases, dtype by dtype (float32 first), op by op."""
    dtypes = args.dtype or DTYPES[args.device]
    if "bfloat16" in dtypes:
        import ml_dtypes  # noqa: F401  (NumPy's bfloat16)
    size = SIZES["quick" if args.quick else args.device]
    return [Problem(op, case, size, dtype, args.seed) for dtype in dtypes for op in OPS if op in args.ops
            for case in CASES if case in args.cases]


def build(setup: harness.DeviceSetup, problem: Problem, args, module=None, notes: Optional[list] = None) -> dict:
    """deformcp's implementations on the setup's device (bfloat16 on CUDA: on torch tensors), the fallback where
    torch runs, and the extension ``module`` where given and it takes the problem's dtype (else a line in
    ``notes``)."""
    def make(backend, move):
        return Deformcp(backend, problem, args.deterministic, move)

    device = setup.torch_device
    if setup.device == "cuda" and problem.dtype == "bfloat16":
        if device is None:
            (notes if notes is not None else []).append(f"{problem.key} skipped: bfloat16 on CUDA goes through torch "
                                                        "CUDA tensors, and torch has no CUDA here")
            return {}
        impls = {"deformcp cuda": make("cuda", functools.partial(tensor, device=device))}
    else:
        impls = harness.deformcp_impls(setup, make)
    if device is not None:
        impls[f"torch fallback {setup.device}"] = fallback_op(device, problem)
        refused = module is not None and extension_refuses(module, device, problem.op, problem.dtype)
        if module is not None and not refused:
            impls[EXTENSION] = extension_op(module, device, problem)
        elif refused and notes is not None and refused not in notes:
            notes.append(refused)
    return impls


def memory_targets(problems: list[Problem], memory: dict, baseline: Optional[str], default_case: bool) -> list:
    """The memory target (:data:`MEMORY_TARGET`) of every case, in harness.evaluate_targets' form."""
    targets = []
    for p in problems:
        for phase in PHASES:
            peaks = memory.get(p.key, {})
            mine, base = peaks.get("deformcp numpy", {}).get(phase), peaks.get(baseline, {}).get(phase)
            value = mine / base if mine is not None and base else None
            status = ("no torch fallback memory" if value is None else ("met" if value < 1 else "MISSED")
                      if default_case else "not applicable: the targets are set for the default case")
            targets.append({"op": p.op, "case_id": p.label, "impl": "deformcp numpy", "phase": phase,
                            "measure": "peak memory", "max_ratio": 1.0, "ratio": value, "status": status,
                            "target": MEMORY_TARGET})
    return targets


def report(run: harness.Run, problems: list[Problem], memory: dict) -> tuple[str, list]:
    records, baseline, args = run.records, run.baseline, run.args
    with_extension = any(r.impl == EXTENSION for r in records)
    headers = ["op", "case", "phase", "implementation", *harness.timing_headers(baseline), "peak memory",
               f"memory ÷ {baseline}" if baseline else "memory ratio", *([f"÷ {EXTENSION}"] if with_extension else [])]
    rows = []
    for r in records:
        peaks = memory.get(f"{r.extra['op']} {r.extra['case_id']}", {})
        mine, base = peaks.get(r.impl, {}).get(r.phase), peaks.get(baseline, {}).get(r.phase)
        rows.append([r.extra["op"], r.extra["case_id"], r.phase, r.impl, *harness.timing_cells(records, r, baseline),
                     format_bytes(mine), harness.ratio_text(mine / base if mine is not None and base else None),
                     *([harness.ratio_text(harness.ratio(records, EXTENSION, r.impl, r.phase, **r.extra))]
                       if with_extension else [])])
    default_case = (args.device == "cpu" and not args.quick and {p.dtype for p in problems} == {"float32"})
    targets = []
    if args.device == "cpu":
        targets = harness.evaluate_targets([{"op": p.op, "case_id": p.label, **t} for p in problems for t in TARGETS],
                                           records, baseline, default_case, missing="no torch")
        targets += memory_targets(problems, memory, baseline, default_case)
    else:
        run.notes.append("Targets: set for the CPU cases (float32) only")
    size = problems[0].size if problems else SIZES[args.device]
    case_lines = ["Cases:", "", *(f"- {p.key}: {p.describe()}" for p in problems), "",
                  f"Inputs: value N(0, 1); locations a reference point per query, uniform in [0, 1]², plus N(0, "
                  f"{OFFSET_PX:g}²) pixels of each level; attention weights the softmax of N(0, 1) logits over each "
                  f"head's {len(size.levels) * size.P} points (flash_deform_attn: the logits); grad_output N(0, 1); "
                  "drawn in float64, rounded to the dtype; fixed seed. forward+backward = the op, then its backward "
                  "for every gradient (torch: autograd on all of them). The torch fallback: per level grid_sample "
                  "(bilinear, zeros, align_corners=False) at 2·loc − 1, stacked, times the weights, summed "
                  "(mmcv's multi_scale_deformable_attn_pytorch; flash_deform_attn: softmax first).",
                  "",
                  "Peak memory: allocated above the level before one untimed call, outputs included — deformcp on "
                  "the CPU by tracemalloc, torch on the CPU by its profiler's allocator totals, on CUDA CuPy's pool "
                  "plus torch's caching allocator."]
    markdown = harness.report_markdown(
        title="ms_deform_attn and flash_deform_attn", case_lines=case_lines, run=run, compared="op, case and phase",
        no_baseline=harness.no_baseline("torch", torch), headers=headers, rows=rows, targets=targets,
        verification=f"relative errors ‖a − b‖ / ‖b‖ against the torch fallback in float64 (without torch, deformcp "
                     f"numpy in float64); location gradients off cell edges (±{EDGE_PX:g} px)")
    return markdown, targets


def main(argv=None) -> int:
    run = harness.Run.begin(parser(), argv, torch, anchor=("torch", torch))
    if run is None:
        return 2
    args, module = run.args, None
    if args.device == "cuda" and run.setup.torch_device is not None:
        module, why = extension()
        if why:
            print(f"note: {why}")
            run.notes.append(why)
    cases, memory = problems(args), {}
    for problem in cases:
        impls = build(run.setup, problem, args, module, run.notes)
        if not impls:
            continue
        kept = dict(impls)   # run.measure empties impls; memory is measured after timing
        if not run.measure(problem, impls, verify, PHASES, extra={"op": problem.op, "case_id": problem.label},
                           label=f"{problem.key:<34} "):
            return 1
        memory[problem.key] = measure_memory(run.setup, kept)
        print(f"  {problem.key}: peak memory " + "; ".join(
            f"{name} " + ", ".join(f"{phase} {format_bytes(v)}" for phase, v in peaks.items())
            for name, peaks in memory[problem.key].items()))
        del kept
        harness.release_device_memory(args.device, torch)
    run.finish()
    markdown, targets = report(run, cases, memory)
    size = SIZES["quick" if args.quick else args.device]
    run.save("ms_deform_attn", markdown, {
        "cases": [{"key": p.key, "op": p.op, "case": p.case, "description": p.describe(), "Lq": p.Lq,
                   "dtype": p.dtype} for p in cases],
        "levels": size.levels, "N": size.N, "M": size.M, "D": size.D, "P": size.P, "offset_px": OFFSET_PX,
        "edge_px": EDGE_PX, "im2col_step": IM2COL_STEP, "max_row_time_s": args.max_row_time,
        "memory_peak_bytes": memory}, targets, compared="op, case and phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
