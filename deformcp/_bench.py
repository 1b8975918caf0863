"""python -m deformcp bench: time deformcp's ops against torch / torchvision where they are installed.

A compact, self-contained suite (the scripts under benchmarks/ in the source tree go further: more
cases, results files). It times "forward" and "forward+backward" (every gradient the op has) of deformcp's
NumPy path and host backend (--device cpu), or of deformcp's NumPy path and CUDA kernels on CuPy arrays
(--device cuda), and of the anchor (torch or torchvision on the same device) when importable: the median
of --repeat calls after warm-up calls, synchronising the GPU before the clock starts and before it stops.
Before timing, every implementation's outputs and gradients are compared with deformcp's NumPy path on
the same inputs (relative error ‖a − b‖ / ‖b‖, deformcp.testing.relative_error); a mismatch is marked in
the table and makes the exit status 1.

The ops, on the shapes of their issues (float32, fixed seed):

- grid_sample      affine_grid + grid_sample, input 8×64×56×56, theta = identity + N(0, 0.05²), bilinear,
                   zeros padding, align_corners=False; anchor torch.nn.functional
- roi_align        input 2×256×100×152 (cuda: 2×256×200×304), 512 boxes (cuda: 1024) of 8–100 px, output
                   7×7, sampling_ratio 2, aligned=True; anchor torchvision.ops.roi_align
- deform_conv2d    input 1×256×50×76 (cuda: 2×256×50×76), weight 256×256×3×3, bias, padding 1, offsets
                   N(0, 2²), mask sigmoid(N(0, 1)) (DCN v2); anchor torchvision.ops.deform_conv2d
- deform_roi_pool  input 2×256×50×76, 256 RoIs (cuda: 1024) of 8–60 px, output 7×7, sampling_ratio 2,
                   gamma 0.1, offsets 0.5·N(0, 1), no mask; reference point torchvision.ops.roi_align
                   (aligned) on the same RoIs: the same pooling without the offsets, not the same op
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

OPS = ("grid_sample", "roi_align", "deform_conv2d", "deform_roi_pool")
PHASES = ("forward", "forward+backward")
#: Largest accepted relative error of a float32 implementation against the float32 NumPy path.
TOLERANCE = 1e-4
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
DEFAULT_REPEAT = 20
QUICK_REPEAT = 2

#: Shapes per op and size ("cpu", "cuda": the issues' cases; "quick": tiny, for tests and CI).
SHAPES = {
    "grid_sample": {"cpu": {"shape": (8, 64, 56, 56)}, "cuda": {"shape": (8, 64, 56, 56)},
                    "quick": {"shape": (2, 3, 9, 11)}},
    "roi_align": {"cpu": {"shape": (2, 256, 100, 152), "boxes": 512},
                  "cuda": {"shape": (2, 256, 200, 304), "boxes": 1024},
                  "quick": {"shape": (2, 4, 12, 16), "boxes": 6}},
    "deform_conv2d": {"cpu": {"shape": (1, 256, 50, 76), "out_channels": 256},
                      "cuda": {"shape": (2, 256, 50, 76), "out_channels": 256},
                      "quick": {"shape": (1, 4, 8, 10), "out_channels": 5}},
    "deform_roi_pool": {"cpu": {"shape": (2, 256, 50, 76), "boxes": 256},
                        "cuda": {"shape": (2, 256, 50, 76), "boxes": 1024},
                        "quick": {"shape": (2, 4, 10, 12), "boxes": 6}},
}

EPILOG = """\
For fair NumPy timings, run with OpenBLAS's CPU overrides unset, in the command only (some machines set
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow NumPy's BLAS; see README.md, Benchmarks):

  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m deformcp bench

Ratio = implementation's median / the anchor's median for the same op and phase: below 1 is faster.
Exit status: 0, 1 when an implementation disagrees with the NumPy path or fails, 2 when --device cuda
has no GPU. The benchmarks/ scripts of the source tree time more cases and write results files."""


# ----------------------------------------------------------------------------------------------- inputs

def _boxes(rng, K, N, H, W, side) -> np.ndarray:
    """(K, 5) rows (batch index, x1, y1, x2, y2): sides uniform in ``side`` (at most the image's), boxes
    wholly inside the image."""
    w = rng.uniform(*side, K).clip(max=W)
    h = rng.uniform(*side, K).clip(max=H)
    x1 = rng.uniform(0.0, 1.0, K) * (W - w)
    y1 = rng.uniform(0.0, 1.0, K) * (H - h)
    return np.stack([rng.integers(0, N, K).astype(np.float64), x1, y1, x1 + w, y1 + h], axis=1)


def _dims(shape) -> str:
    return "×".join(map(str, shape))


@dataclasses.dataclass
class Case:
    """One op's benchmark: NumPy float32 ``arrays``; ``run(arrays, backward)`` → named deformcp results
    ("output", "grad_<array>", and intermediates such as "grid"); the anchor: ``anchor_fn(torch_modules,
    tensors)`` → output, or (output, named intermediates), differentiated with respect to
    ``anchor_leaves``; ``anchor_reference(arrays)`` → the NumPy results the anchor is checked against
    (None: the NumPy path's own); ``reference_at(results, arrays)`` → references that depend on an
    implementation's own intermediates (NumPy results in, NumPy path's results out)."""

    op: str
    description: str
    arrays: dict
    run: Callable[[dict, bool], dict]
    anchor_module: str                         # "torch" or "torchvision": what the anchor needs
    anchor_label: str                          # e.g. "torchvision", "torchvision roi_align"
    anchor_fn: Callable[[Any, dict], Any]
    anchor_leaves: tuple
    anchor_reference: Optional[Callable[[dict], dict]] = None
    anchor_note: str = ""
    reference_at: Optional[Callable[[dict, dict], dict]] = None


def _case_grid_sample(size: str, rng) -> Case:
    import deformcp

    shape = SHAPES["grid_sample"][size]["shape"]
    N = shape[0]
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    arrays = {"input": rng.standard_normal(shape), "theta": identity + 0.05 * rng.standard_normal((N, 2, 3)),
              "grad_output": rng.standard_normal(shape)}
    options = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}

    def run(a, backward):
        grid = deformcp.affine_grid(a["theta"], shape, align_corners=False)
        out = deformcp.grid_sample(a["input"], grid, **options)
        if not backward:
            return {"output": out}
        grad_input, grad_grid = deformcp.grid_sample_backward(a["grad_output"], a["input"], grid, **options)
        (grad_theta,) = deformcp.affine_grid_backward(grad_grid, a["theta"], shape, align_corners=False)
        return {"output": out, "grad_input": grad_input, "grad_theta": grad_theta, "grid": grid}

    def anchor(tm, t):
        F = tm.torch.nn.functional
        grid = F.affine_grid(t["theta"], list(shape), align_corners=False)
        return F.grid_sample(t["input"], grid, **options), {"grid": grid}

    def reference_at(results, a):
        # The bilinear weights' derivative jumps where a sample crosses a pixel boundary, so one ulp of
        # difference in a float32 grid (affine_grid rounds differently in every library) can move a sample
        # to the next cell and grad_theta by O(1 %) between two correct float32 implementations. So
        # grad_theta is checked against the NumPy path differentiated at the implementation's own grid
        # (the grid itself is checked against the NumPy path's).
        grid = results["grid"]
        _, grad_grid = deformcp.grid_sample_backward(a["grad_output"], a["input"], grid, **options,
                                                     needs_input_grad=(False, True))
        (grad_theta,) = deformcp.affine_grid_backward(grad_grid, a["theta"], shape, align_corners=False)
        return {"grad_theta": grad_theta}

    return Case("grid_sample", f"affine_grid + grid_sample: input {_dims(shape)} float32, theta = identity + "
                "N(0, 0.05²), bilinear, zeros padding, align_corners=False, output size = input size; "
                "backward: input and theta gradients (grad_theta checked at each implementation's own grid)",
                arrays, run, "torch", "torch", anchor, ("input", "theta"), reference_at=reference_at)


def _case_roi_align(size: str, rng) -> Case:
    import deformcp

    shape, K = SHAPES["roi_align"][size]["shape"], SHAPES["roi_align"][size]["boxes"]
    N, C, H, W = shape
    arrays = {"input": rng.standard_normal(shape), "boxes": _boxes(rng, K, N, H, W, (8.0, 100.0)),
              "grad_output": rng.standard_normal((K, C, 7, 7))}
    options = {"spatial_scale": 1.0, "sampling_ratio": 2, "aligned": True}

    def run(a, backward):
        out = deformcp.roi_align(a["input"], a["boxes"], (7, 7), **options)
        if not backward:
            return {"output": out}
        grads = deformcp.roi_align_backward(a["grad_output"], a["input"], a["boxes"], (7, 7), **options)
        return {"output": out, "grad_input": grads.input}

    def anchor(tm, t):
        return tm.torchvision.ops.roi_align(t["input"], t["boxes"], (7, 7), **options)

    return Case("roi_align", f"roi_align: input {_dims(shape)} float32, {K} boxes of 8–100 px inside the image, "
                "output 7×7, sampling_ratio 2, aligned=True, spatial_scale 1; backward: input gradient",
                arrays, run, "torchvision", "torchvision", anchor, ("input",))


def _case_deform_conv2d(size: str, rng) -> Case:
    import deformcp

    shape, c_out = SHAPES["deform_conv2d"][size]["shape"], SHAPES["deform_conv2d"][size]["out_channels"]
    N, C, H, W = shape
    arrays = {"input": rng.standard_normal(shape),
              "offset": 2.0 * rng.standard_normal((N, 18, H, W)),
              "weight": rng.standard_normal((c_out, C, 3, 3)) / np.sqrt(C * 9),
              "bias": rng.standard_normal(c_out),
              "mask": 1.0 / (1.0 + np.exp(-rng.standard_normal((N, 9, H, W)))),
              "grad_output": rng.standard_normal((N, c_out, H, W))}
    options = {"stride": 1, "padding": 1, "dilation": 1}

    def run(a, backward):
        out = deformcp.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **options)
        if not backward:
            return {"output": out}
        grads = deformcp.deform_conv2d_backward(a["grad_output"], a["input"], a["offset"], a["weight"],
                                                a["bias"], mask=a["mask"], **options)
        return {"output": out, **{f"grad_{name}": getattr(grads, name)
                                  for name in ("input", "offset", "weight", "bias", "mask")}}

    def anchor(tm, t):
        return tm.torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"],
                                                mask=t["mask"], **options)

    return Case("deform_conv2d", f"deform_conv2d (v2): input {_dims(shape)} float32, weight "
                f"{c_out}×{C}×3×3 with bias, stride 1, padding 1, offsets N(0, 2²), mask sigmoid(N(0, 1)); "
                "backward: input, offset, weight, bias and mask gradients",
                arrays, run, "torchvision", "torchvision", anchor, ("input", "offset", "weight", "bias", "mask"))


def _case_deform_roi_pool(size: str, rng) -> Case:
    import deformcp

    shape, K = SHAPES["deform_roi_pool"][size]["shape"], SHAPES["deform_roi_pool"][size]["boxes"]
    N, C, H, W = shape
    arrays = {"input": rng.standard_normal(shape), "rois": _boxes(rng, K, N, H, W, (8.0, 60.0)),
              "offset": 0.5 * rng.standard_normal((K, 2, 7, 7)),
              "grad_output": rng.standard_normal((K, C, 7, 7))}
    options = {"output_size": 7, "spatial_scale": 1.0, "sampling_ratio": 2, "gamma": 0.1}

    def run(a, backward):
        out = deformcp.deform_roi_pool(a["input"], a["rois"], a["offset"], **options)
        if not backward:
            return {"output": out}
        grads = deformcp.deform_roi_pool_backward(a["grad_output"], a["input"], a["rois"], a["offset"],
                                                  needs_input_grad=(True, True, False), **options)
        return {"output": out, "grad_input": grads.input, "grad_offset": grads.offset}

    def anchor(tm, t):
        return tm.torchvision.ops.roi_align(t["input"], t["rois"], (7, 7), spatial_scale=1.0, sampling_ratio=2,
                                            aligned=True)

    def anchor_reference(a):  # what the anchor computes, on deformcp's NumPy path
        kwargs = {"spatial_scale": 1.0, "sampling_ratio": 2, "aligned": True}
        out = deformcp.roi_align(a["input"], a["rois"], (7, 7), **kwargs)
        grads = deformcp.roi_align_backward(a["grad_output"], a["input"], a["rois"], (7, 7), **kwargs)
        return {"output": out, "grad_input": grads.input}

    return Case("deform_roi_pool", f"deform_roi_pool (v1): input {_dims(shape)} float32, {K} RoIs of 8–60 px "
                "inside the image, output 7×7, sampling_ratio 2, gamma 0.1, offsets 0.5·N(0, 1), no mask; "
                "backward: input and offset gradients",
                arrays, run, "torchvision", "torchvision roi_align", anchor, ("input",), anchor_reference,
                anchor_note="the anchor is torchvision.ops.roi_align (aligned) on the same input "
                            "and RoIs: the same pooling without the offsets (its backward: the input gradient "
                            "only), a reference point rather than the same op; it is checked against "
                            "deformcp.roi_align")


CASES = {"grid_sample": _case_grid_sample, "roi_align": _case_roi_align, "deform_conv2d": _case_deform_conv2d,
         "deform_roi_pool": _case_deform_roi_pool}


def make_case(op: str, size: str, seed: int) -> Case:
    """The ``op``'s case in ``size`` ("cpu", "cuda" or "quick"), arrays drawn in float64 from ``seed`` and
    rounded to float32."""
    case = CASES[op](size, np.random.default_rng([seed, OPS.index(op)]))
    case.arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in case.arrays.items()}
    return case


# -------------------------------------------------------------------------------------- implementations

def to_numpy(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or torch array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return a.get() if hasattr(a, "get") else np.asarray(a)


class DeformcpImpl:
    """deformcp on one backend: "numpy", "host", or "cuda" (arrays moved to CuPy)."""

    anchor = False

    def __init__(self, backend: str, case: Case):
        import deformcp

        self._deformcp, self.case = deformcp, case
        self.name = f"deformcp {backend}"
        self.cpu_backend = "numpy" if backend == "cuda" else backend
        if backend == "cuda":
            import cupy

            self.arrays = {k: cupy.asarray(v) for k, v in case.arrays.items()}
        else:
            self.arrays = case.arrays

    def _run(self, backward):
        with self._deformcp.backend(self.cpu_backend):
            return self.case.run(self.arrays, backward)

    def forward(self):
        return self._run(False)

    def forward_backward(self):
        return self._run(True)


class TorchImpl:
    """The case's anchor through torch autograd on ``device`` (forward under no_grad)."""

    anchor = True

    def __init__(self, modules, device: str, case: Case):
        torch = modules.torch
        self.torch, self.modules, self.case = torch, modules, case
        self.name = f"{case.anchor_label} {device}"
        self.t = {k: torch.from_numpy(v).to(device) for k, v in case.arrays.items()}
        for leaf in case.anchor_leaves:
            self.t[leaf].requires_grad_(True)

    def _call(self):
        out = self.case.anchor_fn(self.modules, self.t)
        return out if isinstance(out, tuple) else (out, {})

    def forward(self):
        with self.torch.no_grad():
            return {"output": self._call()[0]}

    def forward_backward(self):
        for leaf in self.case.anchor_leaves:
            self.t[leaf].grad = None
        out, extra = self._call()
        out.backward(self.t["grad_output"])
        return {"output": out.detach(), **{k: v.detach() for k, v in extra.items()},
                **{f"grad_{leaf}": self.t[leaf].grad for leaf in self.case.anchor_leaves}}


@dataclasses.dataclass
class TorchModules:
    """torch and torchvision where importable (None where not), and why not."""

    torch: Any = None
    torchvision: Any = None
    problems: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, wanted: set) -> "TorchModules":
        modules = cls()
        for name, module in (("torch", "torch"), ("torchvision", "torchvision.ops")):
            if name not in wanted:
                continue
            try:
                importlib.import_module(module)
                setattr(modules, name, sys.modules[name])
            except Exception as e:  # not installed, or broken (a torchvision built for another torch)
                modules.problems[name] = ("not installed" if isinstance(e, ModuleNotFoundError)
                                          else f"import failed ({type(e).__name__}: {e})")
        return modules


# ---------------------------------------------------------------------------------------------- timing

def measure(fn: Callable[[], Any], repeat: int, warmup: int, warmup_time: float = 0.0,
            sync: Optional[Callable[[], None]] = None, tick: Optional[Callable[[float], None]] = None
            ) -> tuple[list[float], int]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after at least ``warmup`` untimed calls and
    ``warmup_time`` seconds of them; ``sync`` runs before the clock starts and before it stops
    (asynchronous GPU work). Returns the samples and the number of warm-up calls."""
    sync = sync or (lambda: None)
    tick = tick or (lambda fraction: None)
    start, warmed = time.perf_counter(), 0
    while warmed < warmup or time.perf_counter() - start < warmup_time:
        fn()
        sync()
        warmed += 1
    samples = []
    for i in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
        tick((i + 1) / repeat)
    return samples, warmed


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


class Progress:
    """A one-line text progress bar: ``[#####.....]  42%  3/8  roi_align forward deformcp host``, redrawn
    in place with a carriage return (at most every 0.1 s) and cleared by :meth:`close`; silent when not
    ``enabled``."""

    def __init__(self, total: int, enabled: bool, stream=None, width: Optional[int] = None):
        self.total, self.enabled = max(total, 1), enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self.done, self.fraction, self.label, self._last, self._drawn = 0, 0.0, "", 0.0, False

    def start(self, label: str) -> None:
        self.label, self.fraction = label, 0.0
        self._draw(force=True)

    def update(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self._draw()

    def step(self) -> None:
        self.done, self.fraction = min(self.done + 1, self.total), 0.0
        self._draw(force=True)

    def line(self) -> str:
        share = (self.done + self.fraction) / self.total
        bar = 24
        filled = int(round(share * bar))
        text = f"[{'#' * filled}{'.' * (bar - filled)}] {share * 100:3.0f}%  {self.done}/{self.total}  {self.label}"
        return text[:max(self.width - 1, 10)]

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r" + self.line().ljust(max(self.width - 1, 10)))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * max(self.width - 1, 10) + "\r")
            self.stream.flush()
            self._drawn = False


# ------------------------------------------------------------------------------------------ verification

def verify(impl, reference: dict, reference_at=None, arrays=None) -> tuple[dict, list[str]]:
    """Relative errors of ``impl``'s forward+backward results (and forward-only output) against
    ``reference`` (NumPy; updated by ``reference_at(results, arrays)`` where given), and the names beyond
    :data:`TOLERANCE` (results of another shape or NaN count as infinitely far)."""
    from deformcp.testing import relative_error

    results = {k: to_numpy(v) for k, v in impl.forward_backward().items()}
    if reference_at is not None:
        reference = {**reference, **{k: to_numpy(v) for k, v in reference_at(results, arrays).items()}}
    errors = {name: relative_error(results[name], reference[name]) for name in reference if name in results}
    errors["output (forward only)"] = relative_error(to_numpy(impl.forward()["output"]), reference["output"])
    bad = [name for name, error in errors.items() if not error <= TOLERANCE]
    return errors, bad


# ----------------------------------------------------------------------------------------------- machine

def _version(distribution: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(distribution)
    except Exception:
        return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def blas_warning() -> Optional[str]:
    present = {k: os.environ[k] for k in BLAS_OVERRIDES if os.environ.get(k) is not None}
    if not present:
        return None
    listing = ", ".join(f"{k}={v}" for k, v in present.items())
    return (f"{listing} set: NumPy's BLAS runs slower, the NumPy path's timings are not fair. Rerun as "
            f"env -u {' -u '.join(BLAS_OVERRIDES)} python -m deformcp bench ...")


def machine_info(device: str, modules: TorchModules, gpu: Optional[str]) -> dict:
    import deformcp
    from deformcp import _host

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "deformcp": deformcp.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": getattr(modules.torch, "__version__", None),
        "torchvision": getattr(modules.torchvision, "__version__", None),
        "torch_threads": modules.torch.get_num_threads() if modules.torch is not None else None,
        "cupy": getattr(sys.modules.get("cupy"), "__version__", None),
        "host_compiler": _host.compiler() if _host.available() is None else None,
        "device": device,
        "gpu": gpu,
        "blas_overrides": {k: os.environ.get(k) for k in BLAS_OVERRIDES},
        "threads": {k: os.environ.get(k) for k in ("DEFORMCP_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS")},
    }
    return info


# ------------------------------------------------------------------------------------------------- run

def _build(case: Case, device: str, host: bool, modules: TorchModules, notes: list) -> list:
    """The implementations of ``case`` to time on ``device``: deformcp's NumPy path, then its host backend
    (cpu) or CUDA kernels (cuda), then the anchor where it can run."""
    impls = [DeformcpImpl("numpy", case)]
    if device == "cpu" and host:
        impls.append(DeformcpImpl("host", case))
    if device == "cuda":
        impls.append(DeformcpImpl("cuda", case))
    needed = case.anchor_module
    if getattr(modules, needed) is None:
        note = f"{needed} {modules.problems.get(needed, 'not importable')}: no anchor, no ratios"
    elif modules.torch is None:
        note = f"torch {modules.problems.get('torch', 'not importable')}: no anchor, no ratios"
    elif device == "cuda" and not modules.torch.cuda.is_available():
        note = f"torch {modules.torch.__version__} has no CUDA device here: no anchor, no ratios"
    else:
        impls.append(TorchImpl(modules, device, case))
        note = case.anchor_note
    if note:
        notes.append(f"{case.op}: {note}")
    return impls


def _cuda_sync(modules: TorchModules) -> Callable[[], None]:
    """Wait for all work on the current CUDA device: CuPy's streams and, where torch uses it, torch's."""
    import cupy

    cuda = cupy.cuda.Device()
    torch_cuda = modules.torch is not None and modules.torch.cuda.is_available()

    def sync():
        cuda.synchronize()                      # cudaDeviceSynchronize: every stream of the device ...
        if torch_cuda:
            modules.torch.cuda.synchronize()    # ... and torch's

    return sync


def run(ops, device: str, repeat: int, warmup: int, warmup_time: float, seed: int, quick: bool,
        progress: Progress | None = None, notes: Optional[list] = None) -> tuple[list[dict], dict]:
    """Verify and time ``ops`` on ``device``; the records (one per op, phase and implementation) and the
    cases' descriptions."""
    from deformcp import _host

    notes = notes if notes is not None else []
    size = "quick" if quick else device
    modules = TorchModules.load({"torch"} | {CASES_ANCHOR[op] for op in ops})
    host = device == "cpu" and _host.available() is None
    if device == "cpu" and not host:
        notes.append(f"deformcp host skipped: {_host.available()}")
    sync = _cuda_sync(modules) if device == "cuda" else None

    cases = [make_case(op, size, seed) for op in ops]
    built = [(case, _build(case, device, host, modules, notes)) for case in cases]
    if progress is not None:
        progress.total = max(sum(len(impls) * (1 + len(PHASES)) for _, impls in built), 1)
    progress = progress or Progress(1, False)
    records, descriptions = [], {}
    for case, impls in built:
        anchor = next((impl.name for impl in impls if impl.anchor), None)
        descriptions[case.op] = {"description": case.description, "anchor": anchor,
                                 "anchor_note": case.anchor_note or None}
        verified = {}
        try:  # the NumPy path's results: what the implementations are checked against
            reference = {k: to_numpy(v) for k, v in impls[0].forward_backward().items()}
            anchor_reference = ({k: to_numpy(v) for k, v in case.anchor_reference(case.arrays).items()}
                                if case.anchor_reference else reference)
            failure = None
        except Exception as e:
            failure = f"the NumPy path failed ({type(e).__name__}: {e})"
        for impl in impls:
            progress.start(f"{case.op}: verifying {impl.name}")
            try:
                if failure:
                    raise RuntimeError(failure)
                if impl.anchor and case.anchor_reference:
                    errors, bad = verify(impl, anchor_reference)
                else:
                    errors, bad = verify(impl, reference, case.reference_at, case.arrays)
                verified[impl.name] = {"errors": errors, "mismatch": bad, "error": None}
            except Exception as e:
                verified[impl.name] = {"errors": {}, "mismatch": [], "error": f"{type(e).__name__}: {e}"}
            progress.step()
        for phase in PHASES:
            for impl in impls:
                check = verified[impl.name]
                record = {"op": case.op, "phase": phase, "impl": impl.name, "anchor": impl.anchor,
                          "median_s": None, "min_s": None, "q25_s": None, "q75_s": None, "repeat": 0,
                          "warmup": 0, "samples_s": [], "ratio": None, "errors": check["errors"],
                          "mismatch": check["mismatch"], "error": check["error"],
                          "ok": check["error"] is None and not check["mismatch"]}
                if check["error"] is None:
                    progress.start(f"{case.op} {phase}: {impl.name}")
                    fn = impl.forward if phase == "forward" else impl.forward_backward
                    try:
                        samples, warmed = measure(fn, repeat, warmup, warmup_time, sync, progress.update)
                        record.update(median_s=statistics.median(samples), min_s=min(samples),
                                      q25_s=float(np.percentile(samples, 25)),
                                      q75_s=float(np.percentile(samples, 75)), repeat=len(samples),
                                      warmup=warmed, samples_s=samples)
                    except Exception as e:
                        record.update(error=f"{type(e).__name__}: {e}", ok=False)
                progress.step()
                records.append(record)
        for phase in PHASES:
            base = next((r["median_s"] for r in records if r["op"] == case.op and r["phase"] == phase
                         and r["anchor"]), None)
            for r in records:
                if r["op"] == case.op and r["phase"] == phase and base and r["median_s"] is not None:
                    r["ratio"] = r["median_s"] / base
    progress.close()
    return records, descriptions


#: Which library each op's anchor needs.
CASES_ANCHOR = {"grid_sample": "torch", "roi_align": "torchvision", "deform_conv2d": "torchvision",
                "deform_roi_pool": "torchvision"}


# --------------------------------------------------------------------------------------------- reporting

def check_text(record: dict) -> str:
    if record["error"]:
        return f"ERROR {record['error']}"[:80]
    if record["mismatch"]:
        return "MISMATCH " + ", ".join(f"{k} {record['errors'][k]:.1e}" for k in record["mismatch"])
    if record["impl"] == "deformcp numpy":
        return "reference"
    worst = max(record["errors"].values(), default=0.0)
    return f"ok ({worst:.0e})"


def table(records: list[dict]) -> str:
    headers = ["op", "phase", "implementation", "median", "÷ anchor", "check vs NumPy path"]
    rows = [[r["op"], r["phase"], r["impl"], format_seconds(r["median_s"]),
             "anchor" if r["anchor"] else ("—" if r["ratio"] is None else f"{r['ratio']:.2f}×"), check_text(r)]
            for r in records]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    right = {3, 4}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


# ------------------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deformcp bench", description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS, metavar="NAME",
                        help=f"only this op (repeatable): {', '.join(OPS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: deformcp's NumPy path and host backend, torch on the CPU (default); cuda: "
                             "deformcp's NumPy path and CUDA kernels (CuPy), torch on CUDA, the GPU shapes")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help=f"timed calls per row; the median is reported (default {DEFAULT_REPEAT}, "
                             f"--quick {QUICK_REPEAT})")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed calls first, and at least 0.25 s of them (default 2; --quick: 1 call)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny shapes, {QUICK_REPEAT} repeats, 1 warm-up call: a smoke run for tests and CI "
                             "(timings meaningless)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the records and machine information as JSON to PATH ('-': stdout, the "
                             "table then goes to stderr)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is not a TTY)")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ops = [op for op in OPS if op in (args.op or OPS)]
    repeat = args.repeat if args.repeat is not None else (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeat < 1 or warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")
    warmup_time = 0.0 if args.quick else 0.25
    out = sys.stderr if args.json == "-" else sys.stdout

    gpu = None
    if args.device == "cuda":
        from deformcp.testing import gpu_available

        problem = gpu_available()
        if problem:
            print(f"python -m deformcp bench --device cuda: {problem}. Nothing timed; run without --device cuda "
                  "for the CPU benchmark.", file=sys.stderr)
            return 2
        import cupy

        device = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
        gpu = (f"{name.decode() if isinstance(name, bytes) else name} (compute capability "
               f"{device.compute_capability}), CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")

    notes: list[str] = []
    warning = blas_warning()
    if warning:
        notes.append(warning)
        if not args.quiet:
            print(f"warning: {warning}", file=sys.stderr)
    progress = Progress(1, enabled=not args.quiet and sys.stderr.isatty())
    started = time.perf_counter()
    records, descriptions = run(ops, args.device, repeat, warmup, warmup_time, args.seed, args.quick, progress,
                                notes)
    elapsed = time.perf_counter() - started
    modules = TorchModules(sys.modules.get("torch"), sys.modules.get("torchvision"))
    machine = machine_info(args.device, modules, gpu)

    print(f"deformcp {machine['deformcp']} bench, device {args.device}"
          + (f" ({gpu})" if gpu else f" ({machine['processor']}, {machine['cpus_usable']} CPUs usable)")
          + f": median of {repeat} timed calls after ≥ {warmup} warm-up calls"
          + (f" and ≥ {warmup_time:g} s" if warmup_time else "") + (", --quick shapes" if args.quick else ""),
          file=out)
    for op, entry in descriptions.items():
        print(f"- {entry['description']}; anchor: {entry['anchor'] or 'none'}", file=out)
    print(file=out)
    print(table(records), file=out)
    print("\nRatio = median / the anchor's median, same op and phase: below 1 is faster. Check = largest relative "
          f"error against deformcp's NumPy path (tolerance {TOLERANCE:g}).", file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    failed = sorted({(r["op"], r["impl"]) for r in records if not r["ok"]})
    if failed:
        print("\nFAILED: " + "; ".join(f"{op} {impl}" for op, impl in failed), file=out)

    if args.json:
        payload = {
            "benchmark": "python -m deformcp bench",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "device": args.device, "quick": args.quick, "repeat": repeat, "warmup": warmup,
            "warmup_time_s": warmup_time, "seed": args.seed, "elapsed_s": elapsed,
            "dtype": "float32", "tolerance": TOLERANCE,
            "ratio_meaning": "implementation median / anchor median, same op and phase; < 1 is faster",
            "machine": machine, "cases": descriptions, "notes": notes, "records": records,
        }
        text = json.dumps(_finite(payload), indent=2, allow_nan=False, default=_jsonable) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            try:
                with open(args.json, "w") as f:
                    f.write(text)
            except OSError as e:
                print(f"error: cannot write --json {args.json}: {e}", file=sys.stderr)
                return 2
            print(f"\nwrote {args.json}", file=out)
    return 1 if failed else 0


def _finite(value):
    """``value`` with every NaN or ±inf float (a relative error of mismatched shapes, say) as a string:
    strict JSON has no such numbers."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
