"""The benchmarks' harness: timing, verification, machine information, reports and results files.

Each ``bench_<name>.py`` of this folder times one op family of deformcp against its anchor (torch or
torchvision, optional: without it deformcp alone is timed; some ops have none) and builds on what is here.
It names the ops of the spec table (``deformcp.ops.SPECS``) that it times in a module-level ``OPS`` tuple
and calls them through their specs (``SPECS[op].function`` / ``.backward``); :func:`covered_ops` collects
those tuples, and every op of the table is timed by some benchmark (tests/test_bench_viz.py checks it).

- :func:`measure` / :func:`measure_interleaved`: warm-up calls (a count and a minimum time), then timed
  calls (``time.perf_counter``, ``sync`` before the clock starts and before it stops, for GPU work):
  a :class:`Timing` (median, quartiles, min, spread, other processes' load, :class:`OtherLoad`).
- :func:`verify` / :func:`check`: outputs and gradients against a reference before anything is timed;
  a binding mismatch raises :class:`VerificationFailed` (exit status 1).
- :class:`ArrayCase`, :class:`DeformcpOp`, :class:`TorchOp`: a case's arrays, deformcp's op on one backend
  (through its spec), the anchor through torch autograd; :func:`device_setup`, :func:`deformcp_impls`: what
  runs where.
- :func:`machine_info`, :func:`command_line`, :func:`blas_warning`: where the numbers come from.
- :func:`make_parser` / :func:`start` / :class:`Plan`: the options every benchmark takes; :class:`Run`:
  a benchmark's run (verify, then time, each case; :func:`time_phases`), its report
  (:func:`report_markdown`) and results files, ``results/<name>.{json,md}`` beside this file.
- :func:`main`: ``python -m deformcp bench``, the benchmarks one after the other with shared options
  (``--list``: which ops each times, :func:`covered_ops`).

Running: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_<name>.py [--device cuda]``
in a source checkout (it times the checkout's deformcp; the results record whether those variables were
set), with torch / torchvision installed for the ratios; ``python -m deformcp bench`` runs them all.
Installed, this folder is the package ``deformcp.benchmarks`` (``python -m deformcp.benchmarks.bench_<name>``).
Every benchmark takes --device, --repeat, --warmup, --quick (tiny sizes, no files), --interleave,
--torch-threads, --seed, --output and --no-save (:func:`add_arguments`), and verifies before it times.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Collection, Optional, Sequence

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
if not __package__:  # python benchmarks/bench_<name>.py: time the checkout's deformcp
    sys.path.insert(0, str(ROOT))
RESULTS_DIR = HERE / "results"
#: The benchmarks (bench_<name>.py), in the order ``python -m deformcp bench`` runs them.
BENCHMARKS = ("spatial_transformer", "roi_align", "deform_conv", "deform_roi_pool", "deform_ps_roi_pool",
              "mimic_loss", "ms_deform_attn", "dcn", "ndimage")
#: Environment variables that slow NumPy's BLAS on some machines; benchmarks run with them unset.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Thread-count variables recorded with the results.
THREAD_VARIABLES = ("DEFORMCP_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------------ timing

@dataclasses.dataclass
class Timing:
    """Wall-clock times of ``repeat`` calls, in seconds, and how busy other processes kept the CPUs."""

    samples: list[float]
    warmup: int
    others_busy: Optional[float] = None   # fraction of all CPUs used by other processes meanwhile

    @property
    def repeat(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def q25(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.samples, 75))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half lies within 5 %)."""
        return (self.q75 - self.q25) / self.median if self.median > 0 else 0.0

    def summary(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "q25_s": self.q25,
                "q75_s": self.q75, "spread": self.spread, "repeat": self.repeat, "warmup": self.warmup,
                "others_busy": self.others_busy, "samples_s": self.samples}


class OtherLoad:
    """Fraction of all CPUs that *other* processes used between start() and stop(): /proc/stat's busy
    time minus this process's own CPU time (Linux; None elsewhere). A multi-threaded library loses
    whole scheduler ticks when a core is taken, so a benchmark wants this near 0."""

    MIN_WINDOW = 0.3  # seconds; shorter windows give None

    def __init__(self):
        self._start = None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # minus idle, iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def start(self) -> "OtherLoad":
        self._start = self._read()
        return self

    def stop(self) -> Optional[float]:
        end = self._read()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        cpus = os.cpu_count() or 1
        if wall < self.MIN_WINDOW:  # /proc/stat counts in ticks (10 ms): too coarse for short windows
            return None
        return min(1.0, max(0.0, (busy - own) / (wall * cpus)))


def measure(fn: Callable[[], Any], repeat: int = 20, warmup: int = 2,
            sync: Optional[Callable[[], None]] = None, min_time: float = 0.0,
            warmup_time: float = 0.0) -> Timing:
    """Time ``fn()`` after untimed warm-up calls (compilation, caches, allocator, thread pools): at
    least ``warmup`` calls and at least ``warmup_time`` seconds of them (torch's CPU kernels, for one,
    take some 50 ms of calls to settle).

    ``sync`` runs before the clock starts and before it stops (asynchronous devices). With
    ``min_time`` > 0, the timed calls go on past ``repeat`` until their total reaches ``min_time``
    seconds (at most 10 × repeat calls), which steadies the median of very short calls.
    """
    return measure_interleaved({"fn": fn}, repeat, warmup, sync, min_time, warmup_time)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 20, warmup: int = 2,
                        sync: Optional[Callable[[], None]] = None, min_time: float = 0.0,
                        warmup_time: float = 0.0) -> dict[str, Timing]:
    """Like :func:`measure` for several callables, timed in turns (one call of each per round), so
    that a change in the machine's load during the run touches every one of them alike."""
    if repeat < 1:
        raise ValueError(f"repeat: expected at least 1, got {repeat}")
    sync = sync or (lambda: None)
    warmed = {name: 0 for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        while warmed[name] < warmup or time.perf_counter() - start < warmup_time:
            fn()
            sync()
            warmed[name] += 1
    samples: dict[str, list[float]] = {name: [] for name in fns}
    load = OtherLoad().start()
    rounds = 0
    while rounds < repeat or (min(sum(s) for s in samples.values()) < min_time and rounds < 10 * repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    others = load.stop()
    return {name: Timing(s, warmed[name], others) for name, s in samples.items()}


@dataclasses.dataclass
class Record:
    """One result: ``impl`` running ``phase`` of ``case`` took ``timing``."""

    case: str                       # e.g. "8x64x56x56 bilinear zeros"
    impl: str                       # e.g. "deformcp numpy", "torch cpu"
    phase: str                      # e.g. "forward", "forward+backward"
    timing: Timing
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"case": self.case, "impl": self.impl, "phase": self.phase, **self.timing.summary(),
                **self.extra}


# ------------------------------------------------------------------------------------------------ checks

import deformcp  # noqa: E402  (after the checkout's folder is on the path)
from deformcp.ops import SPECS  # noqa: E402  (the op table: what each benchmark times and calls)
from deformcp.testing import relative_error  # noqa: E402  (one definition of the error measure)


class VerificationFailed(Exception):
    """A timed implementation disagrees with the reference, returns another dtype or raises: nothing is
    timed (a benchmark's ``main`` then exits with status 1)."""


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or torch array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return a.get() if hasattr(a, "get") else np.asarray(a)


def errors_text(errors: dict) -> str:
    """``name 1.2e-06, name 3.4e-07``: relative errors as printed and reported."""
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def check(impl, dtype: str, expected_out, expected_grads: dict, expected_at=None) -> tuple[dict, list[str]]:
    """``impl``'s relative errors against the expected output and the gradients in ``expected_grads``
    (name → NumPy array, or None where there is no such gradient), and what is wrong besides (another
    dtype, a gradient missing or unexpected). ``impl`` has forward(), forward_backward() → (output,
    gradients) and gradients(gradients) → {name: array or None}. ``expected_at(intermediates)``:
    expected results that depend on the implementation's own ``intermediates()`` ({name: array}; a name
    is an intermediate's or ``grad_<name>``)."""
    out, grads = impl.forward_backward()
    grads = {k: None if v is None else to_numpy(v) for k, v in impl.gradients(grads).items()}
    out, forward_only = to_numpy(out), to_numpy(impl.forward())   # CuPy arrays and CUDA tensors too
    problems = []
    for what, value in (("output", out), ("output (forward only)", forward_only),
                        *((f"grad_{k}", v) for k, v in grads.items() if v is not None)):
        if value.dtype != np.dtype(dtype):
            problems.append(f"{what} dtype {value.dtype}, expected {dtype}")
    errors = {"output": relative_error(out, expected_out),
              "output (forward only)": relative_error(forward_only, expected_out)}
    for name, expected in expected_grads.items():
        got = grads.get(name)
        if expected is None:
            if got is not None:
                problems.append(f"grad {name} returned though there is no {name}")
            continue
        if got is None:
            problems.append(f"grad {name} is None")
            errors[f"grad_{name}"] = float("inf")
            continue
        errors[f"grad_{name}"] = relative_error(got, expected)
    if expected_at is not None:
        own = {k: to_numpy(v) for k, v in impl.intermediates().items()}
        results = {**own, **{f"grad_{k}": v for k, v in grads.items()}}
        errors.update({name: relative_error(results[name], expected)
                       for name, expected in expected_at(own).items()})
    return errors, problems


def verify(title: str, reference_name: Optional[str], reference, checks, tolerance: dict, notes: list, *,
           grads: Optional[Sequence[str]] = None, timed: Collection[str] = (), expected_at=None) -> dict:
    """Relative errors of each of ``checks`` ((name, implementation, dtype, binding); implementations as
    in :func:`check`, with ``expected_at``) against ``reference`` (such an implementation, run once; None:
    nothing to verify against), on its output and its gradients ``grads`` (default: all it returns):
    {"<title>: <name>": errors}. Raises :class:`VerificationFailed`, before any timing, when a binding one
    is beyond ``tolerance[dtype]``, returns another dtype, or raises, or when one of ``timed`` raises (it
    could not be timed either); what is wrong with the others goes to ``notes``, information only."""
    errors, failed = {}, []
    if reference is None:
        print("  nothing to verify against")
        return errors
    start = time.perf_counter()
    expected_out, expected = reference.forward_backward()
    expected = {k: None if v is None else to_numpy(v) for k, v in reference.gradients(expected).items()}
    if grads is not None:
        expected = {k: expected.get(k) for k in grads}
    expected_out = to_numpy(expected_out)
    print(f"  {title}: reference {reference_name} ({time.perf_counter() - start:.1f} s): output "
          f"{tuple(expected_out.shape)} (|max| {np.abs(expected_out).max(initial=0):.3g}); "
          + ", ".join(f"grad_{k} |max| {np.abs(v).max(initial=0):.3g}" for k, v in expected.items()
                      if v is not None))
    for name, impl, dtype, binding in checks:
        limit = tolerance[dtype]
        key = f"{title}: {name}"
        try:
            checked, problems = check(impl, dtype, expected_out, expected, expected_at)
        except Exception as e:
            print(f"    {name:<28} RAISED {type(e).__name__}: {e}")
            traceback.print_exc()
            if binding or name in timed:
                failed.append(f"{name} raised {type(e).__name__}: {e}")
            else:
                notes.append(f"{key} raised {type(e).__name__}: {e} (information only)")
            continue
        errors[key] = checked
        wrong = [k for k, v in checked.items() if not v <= limit] + problems
        verdict = ""
        if wrong:
            verdict = (f"  {'FAILED' if binding else 'beyond'} ({', '.join(wrong)}; tolerance {limit:g})"
                       + ("" if binding else ": information only"))
        print(f"    {name:<28} {errors_text(checked)}{verdict}")
        if binding and wrong:
            failed.append(f"{name}: {', '.join(wrong)} (tolerance {limit:g})")
        elif wrong:
            notes.append(f"{key} beyond tolerance {limit:g} ({', '.join(wrong)}); information only (the run "
                         "stops only for a timed deformcp implementation)")
    if failed:
        raise VerificationFailed(f"verification failed ({title}; reference {reference_name}) for "
                                 f"{'; '.join(failed)}: not timing wrong code")
    return errors


# ------------------------------------------------------------------------------ cases and implementations

class ArrayCase:
    """Base of a benchmark case whose inputs are NumPy ``arrays`` (name → array, or None where the case
    has no such input), all of one ``dtype``."""

    dtype: str
    arrays: dict

    def set_arrays(self, arrays: dict, dtype) -> None:
        """``arrays`` (drawn in float64) rounded to ``dtype``, C-contiguous."""
        self.dtype = np.dtype(dtype).name
        self.arrays = {k: None if v is None else np.ascontiguousarray(v.astype(self.dtype))
                       for k, v in arrays.items()}

    def astype(self, dtype):
        """The same case with its arrays rounded to ``dtype``."""
        other = copy.copy(self)
        other.set_arrays(self.arrays, dtype)
        return other


class DeformcpOp:
    """Base of deformcp's forward / forward+backward of one op on an :class:`ArrayCase`'s arrays (``a``),
    on one backend: "numpy", "host", or "cuda" for CuPy arrays (``move`` takes the arrays there).

    A subclass names the ``op``, a name of ``deformcp.ops.SPECS``: its spec's ``function`` and ``backward``
    (``forward_fn``, ``backward_fn``) are what is timed. ``options``: the public function's other
    arguments, by name; the default ``_forward()`` → output and ``_backward()`` → the backward's named tuple
    call the spec's functions with the case's arrays named as the spec's ``arrays`` (those the case has;
    ``grad_output`` first for the backward, and ``deterministic`` where the backward takes it). A subclass
    with another sequence of calls defines its own. ``grads``: the gradients checked (:func:`check`);
    default the spec's differentiable arrays."""

    op: str
    options: Optional[dict] = None
    grads: Optional[Sequence[str]] = None

    def __init__(self, backend: str, case: ArrayCase, deterministic=False, move=None):
        move = move or _unmoved
        self.backend = backend
        self.cpu_backend = "numpy" if backend == "cuda" else backend
        self.deterministic = deterministic
        self.spec = SPECS[self.op]
        self.forward_fn, self.backward_fn = self.spec.function, self.spec.backward
        self.grads = tuple(self.grads or self.spec.differentiable)
        self.options = dict(self.options or {})
        self.a = {k: None if v is None else move(v) for k, v in case.arrays.items()}

    def arrays(self) -> dict:
        """The case's arrays that the op takes, by the names of the spec's ``arrays``."""
        return {name: self.a[name] for name in self.spec.arrays if name in self.a}

    def _forward(self):
        return self.forward_fn(**self.arrays(), **self.options)

    def _backward(self):
        extra = {"deterministic": self.deterministic} if self.spec.deterministic else {}
        return self.backward_fn(self.a["grad_output"], **self.arrays(), **self.options, **extra)

    def forward(self):
        with deformcp.backend(self.cpu_backend):
            return self._forward()

    def forward_backward(self):
        """The output and the backward's named tuple of gradients."""
        with deformcp.backend(self.cpu_backend):
            return self._forward(), self._backward()

    def gradients(self, grads) -> dict:
        return {name: getattr(grads, name) for name in self.grads}


def _unmoved(array):
    return array


class TorchOp:
    """The anchor: ``call(tensors)`` (a torch function of the case's arrays as tensors on ``device``)
    through autograd on the arrays ``leaves`` (those present): forward under no_grad; forward_backward
    → (output, the leaves' gradients for the array grad_output)."""

    def __init__(self, call: Callable[[dict], Any], arrays: dict, leaves: Sequence[str], device):
        import torch

        self.torch, self.call, self.leaves = torch, call, tuple(leaves)
        self.t = {k: None if v is None else torch.from_numpy(v).to(device) for k, v in arrays.items()}
        for name in self.leaves:
            if self.t[name] is not None:
                self.t[name].requires_grad_(True)

    def forward(self):
        with self.torch.no_grad():
            return self.call(self.t)

    def forward_backward(self):
        for name in self.leaves:
            if self.t[name] is not None:
                self.t[name].grad = None
        out = self.call(self.t)
        out.backward(self.t["grad_output"])
        return out.detach(), tuple(None if self.t[name] is None else self.t[name].grad for name in self.leaves)

    def gradients(self, grads) -> dict:
        return dict(zip(self.leaves, grads))


def random_rois(rng: np.random.Generator, K: int, N: int, H: int, W: int, sides: tuple[float, float],
                spatial_scale: float = 1.0) -> np.ndarray:
    """(K, 5) float64 rows (batch index, x1, y1, x2, y2) in image coordinates (feature map size /
    spatial_scale): batch index uniform in 0 … N−1, sides uniform in ``sides`` (at most the image's
    side), RoIs wholly inside the image."""
    image_h, image_w = H / spatial_scale, W / spatial_scale
    w = rng.uniform(*sides, K).clip(max=image_w)
    h = rng.uniform(*sides, K).clip(max=image_h)
    x1 = rng.uniform(0.0, 1.0, K) * (image_w - w)
    y1 = rng.uniform(0.0, 1.0, K) * (image_h - h)
    batch = rng.integers(0, N, K).astype(np.float64)
    return np.stack([batch, x1, y1, x1 + w, y1 + h], axis=1)


# ----------------------------------------------------------------------------------------------- machine

def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def _module_version(name: str) -> Optional[str]:
    """Version of an imported module (None where it is not imported: not installed, or not used)."""
    module = sys.modules.get(name)
    return getattr(module, "__version__", None) if module is not None else None


def blas_overrides() -> dict[str, Optional[str]]:
    """The BLAS override variables and their values (None where unset)."""
    return {name: os.environ.get(name) for name in BLAS_OVERRIDES}


def blas_warning() -> Optional[str]:
    """A warning line when a BLAS override is set, else None."""
    present = {k: v for k, v in blas_overrides().items() if v is not None}
    if not present:
        return None
    listing = ", ".join(f"{k}={v}" for k, v in present.items())
    return (f"warning: {listing} set; NumPy's BLAS runs slower, the NumPy path's timings are not fair. Rerun "
            f"as env -u {' -u '.join(BLAS_OVERRIDES)} {_command()}")


@functools.cache
def warn_blas() -> None:
    """Print :func:`blas_warning`'s warning, where there is one, once a process."""
    warning = blas_warning()
    if warning:
        print(warning, file=sys.stderr)


def cpu_busy(interval: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs that other processes keep busy, sampled over ``interval`` seconds."""
    load = OtherLoad().start()
    time.sleep(interval)
    return load.stop()


def busy_warning(busy: Optional[float], threshold: float = 0.1) -> Optional[str]:
    if busy is None or busy <= threshold:
        return None
    return (f"warning: other processes keep {busy:.0%} of the CPUs busy; timings will be noisy and "
            "multi-threaded libraries slowed (run on a quiet machine)")


#: What :func:`main` was given (``python -m deformcp bench`` run in a process, a test's say), else None.
_BENCH_ARGV: Optional[list] = None


def _command(this_python: bool = False) -> str:
    """This process's command line: ``python -m <module>`` or ``python <script>``, then its arguments."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if _BENCH_ARGV is not None:
        arguments = ["-m", "deformcp", "bench", *_BENCH_ARGV]
    elif spec is not None:
        arguments = ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    else:
        arguments = [os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "<stdin>", *sys.argv[1:]]
    python = "python"
    if this_python:
        on_path = shutil.which("python")
        if not (on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable)):
            python = sys.executable
    return " ".join([python, *arguments])


def command_line(this_python: bool = False) -> str:
    """The command that ran this benchmark, with the ``env -u`` prefix where the BLAS overrides were
    unset (their presence is visible here, and in :func:`machine_info`). ``this_python``: this
    interpreter's path instead of ``python`` where it is not the ``python`` on PATH (the torchvision
    comparisons may run under another environment's Python)."""
    command = _command(this_python)
    if any(v is not None for v in blas_overrides().values()):
        overrides = ", ".join(f"{k}={v}" for k, v in blas_overrides().items() if v is not None)
        return f"{command}  (with {overrides} set)"
    return f"env -u {' -u '.join(BLAS_OVERRIDES)} {command}"


def thread_info() -> dict:
    """Threads each library will use: torch, threadpoolctl's view of BLAS/OpenMP (when installed)."""
    info: dict[str, Any] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    try:
        import threadpoolctl
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    else:
        info["threadpools"] = [{k: pool.get(k) for k in ("user_api", "internal_api", "num_threads",
                                                          "version", "architecture")}
                               for pool in threadpoolctl.threadpool_info()]
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(extra: Optional[dict] = None) -> dict:
    """Where the numbers came from. Call after importing the libraries being timed. An ``extra`` entry
    "torchvision" (its version) is also named beside torch's (:func:`machine_markdown` lists torch)."""
    from deformcp import _host

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "deformcp": deformcp.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": _module_version("torch"),
        "cupy": _module_version("cupy"),
        "host_compiler": _host.compiler() if _host.available() is None else None,
        "blas_overrides": blas_overrides(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": thread_info(),
    }
    info.update(extra or {})
    if info.get("torchvision"):
        info["torch"] = f"{info['torch']}, torchvision {info['torchvision']}"
    return info


# --------------------------------------------------------------------------------------------- reporting

def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def ratio_text(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, columns padded so that it also reads as plain text."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells[1:])])


def machine_markdown(info: dict) -> str:
    """Markdown bullet list of :func:`machine_info`'s main fields."""
    threads = info.get("threads", {})
    overrides = info.get("blas_overrides", {})
    set_ = {k: v for k, v in overrides.items() if v is not None}
    pools = threads.get("threadpools")
    if isinstance(pools, list):
        pools = ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in pools) or "none loaded"
    lines = [
        f"- machine: {info.get('processor')}, {info.get('cpu_count')} CPUs "
        f"({info.get('cpus_usable')} usable), {info.get('platform')}",
        f"- deformcp {info.get('deformcp')}, python {info.get('python')}, numpy {info.get('numpy')}, scipy "
        f"{info.get('scipy')}, torch {info.get('torch') or 'not used'}"
        + (f", cupy {info['cupy']}" if info.get("cupy") else "")
        + (f"; host backend compiler {info['host_compiler']}" if info.get("host_compiler") else ""),
        f"- threads: torch {threads.get('torch_threads', '—')}, OMP_NUM_THREADS="
        f"{threads.get('OMP_NUM_THREADS') or 'unset'}, threadpools: {pools}",
        "- BLAS overrides: " + (", ".join(f"{k}={v} (SET: NumPy BLAS slowed)" for k, v in set_.items())
                                if set_ else f"{', '.join(BLAS_OVERRIDES)} unset (as required)"),
    ]
    busy = [info.get(k) for k in ("cpu_busy_before", "cpu_busy_after")]
    if any(b is not None for b in busy):
        lines.append("- other processes' load: "
                     + " / ".join("—" if b is None else f"{b:.0%}" for b in busy)
                     + " of the CPUs before / after the run"
                     + (" (NOISY: timings unreliable)" if any(b is not None and b > 0.1 for b in busy)
                        else ""))
    for key in ("device", "gpu"):
        if info.get(key):
            lines.append(f"- {key}: {info[key]}")
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, directory: pathlib.Path = RESULTS_DIR
                  ) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<directory>/<name>.json`` (``payload`` plus a timestamp) and ``<name>.md``; a name with a
    directory part (``/tmp/run1``) is written there instead."""
    target = pathlib.Path(name)
    if target.parent != pathlib.Path("."):
        directory, name = target.parent, target.name
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **payload}
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def source_state() -> dict:
    """Which deformcp was timed: the checkout's commit, and its files under deformcp/ and kernels/ that
    differ from it (git; empty outside a git checkout)."""
    if not (ROOT / ".git").exists():
        return {}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "deformcp", "kernels"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "uncommitted": [line[3:] for line in changed]}


def source_lines(sources: dict) -> list[str]:
    """The results' line saying which deformcp was timed (:func:`source_state`) and a blank line; none
    where git did not say."""
    if not sources.get("commit"):
        return []
    changes = (f" with uncommitted changes to {', '.join(sources['uncommitted'])}" if sources.get("uncommitted")
               else " (deformcp/ and kernels/ unmodified)")
    return [f"deformcp: the checkout at {sources['commit']}{changes}", ""]


def _finite(value):
    """``value`` with every NaN or ±inf float (the relative error of mismatched shapes, say) as a string:
    strict JSON has no such numbers."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Timing):
        return value.summary()
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -------------------------------------------------------------------------------- a bench_<name>.py run

#: --max-row-time never cuts a row below this many timed calls
MIN_REPEAT = 5

def make_parser(doc: str, results_name: str, max_row_time: Optional[float] = None) -> argparse.ArgumentParser:
    """The parser of bench_<results_name>.py: the first paragraph of its docstring ``doc``, how to run it,
    and :func:`add_arguments`' options."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Run as: env -u {' -u '.join(BLAS_OVERRIDES)} python "
                                            f"benchmarks/bench_{results_name}.py (installed: python -m "
                                            f"deformcp.benchmarks.bench_{results_name})")
    add_arguments(parser, results_name, max_row_time)
    return parser


def add_arguments(parser: argparse.ArgumentParser, results_name: Optional[str] = None,
                  max_row_time: Optional[float] = None) -> None:
    """The options every benchmark takes; ``results_name`` is the default results name (None: the options
    of ``python -m deformcp bench``). With a ``max_row_time`` (seconds), also --max-row-time with that
    default (see :func:`time_phases`)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: deformcp's NumPy path and host backend, the anchor on the CPU (default); "
                             "cuda: deformcp on CuPy arrays, the anchor on CUDA, the GPU shapes")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first, and at least 0.25 s of them (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes, 3 repeats, 1 warm-up call (timings meaningless); writes "
                             "no files unless --output is given")
    parser.add_argument("--interleave", action="store_true",
                        help="time the implementations in turns, one call each per round (evens out drifting "
                             "machine load; every call then starts with caches holding the others' data)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="keep N other processes busy (one CPU each, a plain Python loop) while this one "
                             "runs: timings under a concurrent load (default 0)")
    if results_name is None:
        parser.add_argument("--output", default=None, metavar="FOLDER",
                            help="write FOLDER/<benchmark>.{json,md} (default: no files)")
        return
    parser.add_argument("--output", default=None,
                        help="results name: results/<name>.{json,md} beside the scripts, or a path without "
                             f"suffix (default {results_name}, or {results_name}_cuda)")
    parser.add_argument("--no-save", action="store_true", help="write no results files")
    if max_row_time is not None:
        parser.add_argument("--max-row-time", type=float, default=max_row_time,
                            help=f"seconds of timed calls a row may take: fewer calls (at least {MIN_REPEAT}) "
                                 f"where one call is slower (default {max_row_time:g}; 0: no limit)")


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_case_arguments(parser: argparse.ArgumentParser, shape_help: str, count: Optional[tuple[str, str]] = None,
                       deterministic: str = "deformcp's backward functions", dtypes=("float32", "float64")) -> None:
    """The options that choose a benchmark's case: --shape N C H W, ``count`` (option, help: --boxes, say),
    --dtype (one of ``dtypes``; several where ``dtypes`` has float16), --deterministic (passed to
    ``deterministic``)."""
    parser.add_argument("--shape", type=positive, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                        help=shape_help)
    if count:
        parser.add_argument(count[0], type=positive, default=None, help=count[1])
    several = "float16" in dtypes
    parser.add_argument("--dtype", choices=dtypes, nargs="+" if several else None,
                        default=None if several else "float32",
                        help="dtypes to time (default cpu: float32; cuda: float32 float16)" if several else None)
    parser.add_argument("--deterministic", action="store_true", help=f"pass deterministic=True to {deterministic}")


def case_size(args: argparse.Namespace, defaults: dict, count: str) -> tuple[tuple, int]:
    """--shape and the option ``count`` ("boxes", say), or their ``defaults`` for --quick or --device
    (``defaults[size]["shape"]``, ``defaults[size][count]``)."""
    chosen = defaults["quick" if args.quick else args.device]
    return tuple(args.shape or chosen["shape"]), getattr(args, count) or chosen[count]


def forwarded(args: argparse.Namespace) -> list[str]:
    """:func:`add_arguments`' options in ``args`` as a command line for a benchmark (not --output)."""
    argv = ["--device", args.device, "--seed", str(args.seed)]
    for option in ("repeat", "warmup", "torch_threads", "background_load"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv + [f"--{flag}" for flag in ("quick", "interleave") if getattr(args, flag)]


@dataclasses.dataclass
class Plan:
    """How every row is timed: ≥ ``warmup`` warm-up calls and ≥ ``warmup_time`` seconds of them, then
    ``repeat`` timed calls, the implementations back to back or (``interleave``) in turns. Where the
    script has --max-row-time (``max_row_time`` not None), one untimed call first and, with a limit
    (> 0), fewer timed calls where they would take longer (see :func:`time_phases`). ``quick``: a smoke
    run, without sampling the machine's load."""

    repeat: int
    warmup: int
    warmup_time: float
    interleave: bool
    max_row_time: Optional[float] = None
    quick: bool = False

    @property
    def limited(self) -> bool:
        return self.max_row_time is not None and self.max_row_time > 0

    def describe(self) -> str:
        """The line printed before timing."""
        return (f"timing: {self.warmup} warm-up calls (and ≥ {self.warmup_time:g} s) + {self.repeat} timed "
                "calls each, " + ("implementations in turns (--interleave)" if self.interleave
                                  else "back to back")
                + (f"; at most {self.max_row_time:g} s of timed calls a row (≥ {MIN_REPEAT} calls)"
                   if self.limited else ""))

    def method(self) -> str:
        """The results' description of the timing."""
        return (f"≥ {self.warmup} warm-up calls and ≥ {self.warmup_time:g} s, then {self.repeat} timed calls "
                "per row, " + ("implementations in turns" if self.interleave else "each row's calls back to back")
                + (f", at most {self.max_row_time:g} s of timed calls a row (≥ {MIN_REPEAT} calls; one extra "
                   "untimed call first)" if self.limited else "") + (" (--quick)" if self.quick else ""))

    def time(self, fns: dict[str, Callable[[], Any]], sync=None) -> dict[str, Timing]:
        if self.interleave:
            return measure_interleaved(fns, repeat=self.repeat, warmup=self.warmup, sync=sync,
                                       warmup_time=self.warmup_time)
        return {name: measure(fn, repeat=self.repeat, warmup=self.warmup, sync=sync,
                              warmup_time=self.warmup_time)
                for name, fn in fns.items()}

    def load(self) -> Optional[float]:
        """:func:`cpu_busy` (None in a quick run)."""
        return None if self.quick else cpu_busy()


def start(parser: argparse.ArgumentParser, args: argparse.Namespace, torch=None) -> Optional[Plan]:
    """The :class:`Plan` of :func:`add_arguments`' options, after what every run does first: check
    them, apply --torch-threads (``torch``: the module, or None), warn about BLAS overrides. None, with a
    message, where --device cuda has no GPU to run on."""
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if repeat < 1 or warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error("--torch-threads must be at least 1")
        if torch is not None:
            torch.set_num_threads(args.torch_threads)
    warn_blas()
    if args.background_load < 0:
        parser.error("--background-load must be at least 0")
    start_background_load(args.background_load)
    if args.device == "cuda":
        problem = gpu_problem()
        if problem:
            print(problem, file=sys.stderr)
            return None
    return Plan(repeat, warmup, 0.0 if args.quick else 0.25, args.interleave,
                getattr(args, "max_row_time", None), args.quick)


#: A process of --background-load: busy until killed when the benchmark exits, and for an hour at most.
SPIN = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end:\n    pass"


def start_background_load(processes: int) -> None:
    """Start ``processes`` processes that keep a CPU busy each until this process exits."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(processes)]
    if spinners:
        atexit.register(lambda: [spinner.kill() for spinner in spinners])


def gpu_problem() -> Optional[str]:
    """Why --device cuda cannot run here, as a message; None where it can."""
    from deformcp.testing import gpu_available

    problem = gpu_available()
    return problem and (f"--device cuda: {problem}. Nothing timed; run without --device cuda for the CPU "
                        "benchmark.")


def optional_torchvision() -> tuple[Any, Any]:
    """The modules torch and torchvision (torchvision.ops imported), or None, None where torchvision is
    not installed or does not import (a build for another torch, say)."""
    try:
        import torch
        import torchvision
        import torchvision.ops  # noqa: F401
    except Exception:
        return None, None
    return torch, torchvision


@dataclasses.dataclass
class DeviceSetup:
    """What runs on the benchmark's device (see :func:`device_setup`)."""

    device: str                      # "cpu" or "cuda"
    info: dict                       # machine_info entries: device, and on CUDA gpu and torch_cuda
    notes: list[str]                 # what cannot run here
    sync: Optional[Callable[[], None]] = None  # run around timed calls (CUDA)
    host: bool = False               # cpu: deformcp's host backend can be compiled
    torch_device: Any = None         # where the torch baseline runs; None: it cannot run here


def device_setup(device: str, torch=None) -> DeviceSetup:
    """``device`` "cpu": whether deformcp's host backend has a compiler. "cuda": CuPy's current device,
    and whether ``torch`` (the module, or None) can run there too; ``sync`` then waits for both."""
    if device == "cpu":
        from deformcp import _host

        problem = _host.available()
        setup = DeviceSetup("cpu", {"device": "cpu"}, [], host=problem is None,
                            torch_device="cpu" if torch is not None else None)
        if problem:
            setup.notes.append(f"deformcp host skipped: {problem}")
        return setup
    import cupy

    cuda = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(cuda.id)["name"]
    info = {"device": f"cuda:{cuda.id}", "torch_cuda": torch.version.cuda if torch is not None else None,
            "gpu": f"{name.decode() if isinstance(name, bytes) else name} (compute capability "
                   f"{cuda.compute_capability}), CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"}
    torch_cuda = torch is not None and torch.cuda.is_available()
    notes = []
    if torch is not None and not torch_cuda:
        notes.append(f"torch {torch.__version__} has no CUDA device here: deformcp times only")

    def sync():
        cuda.synchronize()                   # cudaDeviceSynchronize: every stream of the device, CuPy's ...
        if torch_cuda:
            torch.cuda.synchronize(cuda.id)  # ... and torch's (its caching allocator included)

    return DeviceSetup("cuda", info, notes, sync, torch_device=torch.device("cuda", cuda.id) if torch_cuda else None)


def deformcp_impls(setup: DeviceSetup, make: Callable[[str, Callable], Any]) -> dict:
    """deformcp's implementations to time on the setup's device: its NumPy path and host backend (cpu; the
    host backend where it compiles) or deformcp on CuPy arrays (cuda). ``make(backend, move)`` makes one
    ("numpy", "host" or "cuda"; ``move`` takes a NumPy input where the backend wants it)."""
    if setup.device == "cpu":
        impls = {"deformcp numpy": make("numpy", _unmoved)}
        if setup.host:
            impls["deformcp host"] = make("host", _unmoved)
        return impls
    import cupy

    return {"deformcp cuda": make("cuda", cupy.asarray)}


def release_device_memory(device: str, torch=None) -> None:
    """Collect garbage, and on CUDA hand CuPy's and ``torch``'s (the module, or None) cached blocks back."""
    gc.collect()
    if device != "cuda":
        return
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_load(plan: Plan) -> Optional[float]:
    """``plan.load()``, printing :func:`busy_warning`'s warning where there is one."""
    busy = plan.load()
    warning = busy_warning(busy)
    if warning:
        print(warning, file=sys.stderr)
    return busy


#: The method of an implementation object that each phase times.
PHASE_METHODS = {"forward": "forward", "backward": "backward", "forward+backward": "forward_backward"}


def time_phases(plan: Plan, impls: dict, phases: Sequence[str], sync, case: str, baseline: Optional[str],
                extra: Optional[dict] = None, label: str = "", notes: Optional[list] = None) -> list[Record]:
    """Time each implementation's method of every phase (:data:`PHASE_METHODS`), printing a line per
    result (``label`` first); the Records of ``case`` with ``extra``. With ``plan.max_row_time``, see
    :func:`time_limited`; ``notes`` gets a line for every row it cuts short."""
    extra, records = extra or {}, []
    for phase in phases:
        fns = {name: getattr(impl, PHASE_METHODS[phase]) for name, impl in impls.items()}
        if plan.max_row_time is None:
            timings = plan.time(fns, sync)
        else:
            timings = time_limited(plan, fns, sync, f"{case} {phase}", notes if notes is not None else [])
        records += [Record(case, name, phase, timing, dict(extra)) for name, timing in timings.items()]
        for name, timing in timings.items():
            value = ratio(records, baseline, name, phase, **extra) if name != baseline else None
            calls = "" if plan.max_row_time is None else f"  ({timing.repeat} calls)"
            print(f"  {label}{phase:<17} {name:<16} median {format_seconds(timing.median):>10}{calls}  "
                  f"spread {timing.spread * 100:4.1f}%  other load {load_text(timing)}"
                  + ("" if value is None else f"  {value:.2f}× {baseline}"))
    return records


def time_limited(plan: Plan, fns: dict[str, Callable[[], Any]], sync, row: str, notes: list) -> dict[str, Timing]:
    """``plan.time(fns, sync)`` after one untimed probe call of each (counted as a warm-up call), with
    fewer timed calls (at least :data:`MIN_REPEAT`; interleaved, the fewest any needs) for those whose
    ``plan.repeat`` calls would take longer than ``plan.max_row_time`` seconds (0: no limit), noted in
    ``notes`` (``row`` names the row)."""
    sync = sync or (lambda: None)
    repeats = {}
    for name, fn in fns.items():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds = time.perf_counter() - start
        repeats[name] = plan.repeat
        if plan.limited and plan.repeat > MIN_REPEAT and seconds * plan.repeat > plan.max_row_time:
            repeats[name] = max(MIN_REPEAT, int(plan.max_row_time / seconds))
            notes.append(f"{row} {name}: {repeats[name]} timed calls instead of {plan.repeat} (one call took "
                         f"{format_seconds(seconds)}; --max-row-time {plan.max_row_time:g} s)")
    if plan.interleave:
        timings = dataclasses.replace(plan, repeat=min(repeats.values())).time(fns, sync)
    else:
        timings = {name: dataclasses.replace(plan, repeat=repeats[name]).time({name: fn}, sync)[name]
                   for name, fn in fns.items()}
    for timing in timings.values():
        timing.warmup += 1                                   # the probe call
    return timings


def load_text(timing: Timing) -> str:
    return "—" if timing.others_busy is None else f"{timing.others_busy:.0%}"


def ratio(records: Sequence[Record], baseline: Optional[str], impl: str, phase: str, **extra) -> Optional[float]:
    """``impl``'s median / ``baseline``'s median for ``phase`` (and records whose extra has ``extra``'s
    entries, such as op=...); None where either is missing."""
    def median(name):
        found = [r for r in records if r.impl == name and r.phase == phase
                 and all(r.extra.get(k) == v for k, v in extra.items())]
        return found[0].timing.median if found else None

    mine, base = median(impl), median(baseline)
    return mine / base if mine is not None and base is not None else None


def timing_headers(baseline: Optional[str]) -> list[str]:
    """The results table's timing columns (after the columns naming the row)."""
    return ["median", "p25–p75", "min", "runs", "other load", f"÷ {baseline}" if baseline else "ratio"]


def timing_cells(records: Sequence[Record], record: Record, baseline: Optional[str]) -> list:
    """``record``'s cells under :func:`timing_headers`, its ratio to the baseline's alike record."""
    t = record.timing
    return [format_seconds(t.median), f"{format_seconds(t.q25)}–{format_seconds(t.q75)}",
            format_seconds(t.min), t.repeat, load_text(t),
            ratio_text(ratio(records, baseline, record.impl, record.phase, **record.extra))]


#: A target's own entries; the others (impl, phase, op ...) say which result it is about.
TARGET_FIELDS = ("max_ratio", "ratio", "status", "target")


def evaluate_targets(targets: Sequence[dict], records: Sequence[Record], baseline: Optional[str],
                     default_case: bool, missing: str) -> list[dict]:
    """Each target (``impl``, ``phase``, any extra entries such as ``op``, ``max_ratio``: the most
    implementation / baseline may be, ``target``: what that means) with its ``ratio`` and ``status``:
    met, MISSED, ``missing`` (no ratio), or not applicable outside the default case."""
    evaluated = []
    for target in targets:
        where = {k: v for k, v in target.items() if k not in TARGET_FIELDS}
        value = ratio(records, baseline, **where)
        limit = target["max_ratio"]
        status = (missing if value is None else ("met" if value <= limit else "MISSED") if default_case
                  else "not applicable: the targets are set for the default case")
        evaluated.append({**where, "max_ratio": limit, "ratio": value, "status": status,
                          "target": target["target"]})
    return evaluated


def report_markdown(*, title: str, case_lines: Sequence[str], run: "Run", compared: str, no_baseline: str,
                    headers: Sequence[str], rows: Sequence[Sequence[Any]], targets: Sequence[dict],
                    verification: str, no_targets: Optional[str] = None) -> str:
    """The results markdown of ``run``. ``compared``: what a ratio keeps alike ("phase"); ``no_baseline``:
    why there is no baseline, where the run has none ("No torch baseline (torch is not installed)");
    ``verification``: what the errors are ("relative errors against torch cpu"); ``no_targets``: the line
    in place of the targets where there are none."""
    baseline = run.baseline
    lines = [
        f"# deformcp benchmark: {title}",
        "",
        *case_lines,
        "",
        *source_lines(run.machine.get("deformcp_sources") or {}),
        f"Command: `{command_line(this_python=True)}`. Timing: {run.method()}.",
        "",
        machine_markdown(run.machine),
        "",
        (f"Ratio = implementation's median / {baseline}'s median for the same {compared}: **below 1 is "
         f"faster than {baseline}**." if baseline
         else f"**{no_baseline}: deformcp times only, no ratios.**"),
        "",
        markdown_table(headers, rows),
        "",
        *([no_targets] if no_targets and not targets else ["Targets:", ""]),
        *(" ".join(["-", *(str(v) for k, v in t.items() if k not in TARGET_FIELDS)])
          + f": {t['target']} (ratio ≤ {t['max_ratio']:g}): "
          + (f"{t['ratio']:.2f}× — " if t["ratio"] is not None else "") + t["status"]
          for t in targets),
        "",
        f"Verification before timing ({verification}):",
        "",
        *(f"- {name}: {errors_text(e)}" for name, e in run.errors.items()),
    ]
    if run.notes:
        lines += ["", *(f"Note: {n}" for n in run.notes)]
    return "\n".join(lines)


def no_baseline(library: str, module) -> str:
    """Why there is no ``library`` baseline (``module``: the imported module, or None)."""
    why = f"{library} is not installed" if module is None else f"{library} cannot run on this device"
    return f"No {library} baseline ({why})"


@dataclasses.dataclass
class Run:
    """One benchmark run: its options, :class:`Plan` and :class:`DeviceSetup`, and what it found (notes,
    verification errors, timing records, the machine)."""

    args: argparse.Namespace
    plan: Plan
    setup: DeviceSetup
    torch: Any = None
    notes: list = dataclasses.field(default_factory=list)
    errors: dict = dataclasses.field(default_factory=dict)
    records: list = dataclasses.field(default_factory=list)
    baseline: Optional[str] = None
    busy: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def begin(cls, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, torch=None,
              anchor: Optional[tuple[str, Any]] = None) -> Optional["Run"]:
        """``argv`` parsed by ``parser``, then :func:`start` (None where it says there is nothing to run),
        and what runs on --device: the anchor too where its library (``anchor``: name, module or None) is
        importable and ``torch`` (the module) can run there."""
        args = parser.parse_args(argv)
        plan = start(parser, args, torch)
        if plan is None:
            return None
        library = anchor[1] if anchor else None
        if anchor and library is None:
            print(f"{anchor[0]} is not installed (or does not import): timing deformcp only, no ratios")
        setup = device_setup(args.device, torch if library is not None else None)
        for note in setup.notes:
            print(f"note: {note}")
        return cls(args, plan, setup, torch, list(setup.notes))

    def method(self) -> str:
        """How the rows were timed, for the results."""
        return self.plan.method() + (", deformcp backward with deterministic=True"
                                     if getattr(self.args, "deterministic", False) else "")

    def verified(self, verify: Callable[[], dict]) -> bool:
        """Keep ``verify()``'s errors; False, with the message, where it raises :class:`VerificationFailed`."""
        try:
            self.errors.update(verify())
        except VerificationFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return False
        finally:
            release_device_memory(self.args.device, self.torch)
        return True

    def measure(self, problem, impls: dict, verify, phases: Sequence[str], extra: Optional[dict] = None,
                label: str = "") -> bool:
        """Verify ``impls`` on ``problem`` (``verify(setup, problem, impls, args, notes)`` → errors), then
        time their ``phases`` (:func:`time_phases`; ``extra``, ``label``) and empty ``impls`` (their arrays
        freed before the next case); False where verification failed. The anchor (an implementation not
        named "deformcp ...") is the baseline."""
        print(f"verifying {problem.describe()} (relative errors) ...")
        if not self.verified(lambda: verify(self.setup, problem, impls, self.args, self.notes)):
            return False
        baseline = next((name for name in impls if not name.startswith("deformcp")), None)
        self.baseline = self.baseline or baseline
        if "before" not in self.busy:
            self.busy["before"] = check_load(self.plan)
            print(self.plan.describe())
        self.records += time_phases(self.plan, impls, phases, self.setup.sync, problem.describe(), baseline,
                                    extra, label, self.notes)
        impls.clear()
        release_device_memory(self.args.device, self.torch)
        return True

    def finish(self) -> None:
        """The machine's entries, after timing."""
        self.busy["after"] = self.plan.load()
        info = dict(self.setup.info)
        if self.args.device == "cuda":
            info["torch_cuda_available"] = self.setup.torch_device is not None
        self.machine = machine_info({**info, "torchvision": _module_version("torchvision"),
                                     "deformcp_sources": source_state(), "cpu_busy_before": self.busy.get("before"),
                                     "cpu_busy_after": self.busy["after"]})

    def save(self, results_name: str, markdown: str, case: dict, targets: list, compared: str) -> None:
        """Print ``markdown`` and write the results (:func:`save_results`): the command, the ``case``'s
        entries, then how it was timed and the results."""
        print()
        print(markdown)
        payload = {"command": command_line(this_python=True), **case, "seed": self.args.seed,
                   "device": self.args.device, "deterministic": getattr(self.args, "deterministic", False),
                   "baseline": self.baseline, "interleave": self.plan.interleave, "repeat": self.plan.repeat,
                   "warmup": self.plan.warmup, "quick": self.plan.quick,
                   "ratio_meaning": f"implementation median / baseline median, same {compared}; < 1 is faster",
                   "machine": self.machine, "verification": self.errors, "targets": targets, "notes": self.notes,
                   "results": [r.to_dict() for r in self.records]}
        save_results(self.args, results_name, payload, markdown)


def save_results(args: argparse.Namespace, results_name: str, payload: dict, markdown: str) -> None:
    """:func:`write_results` under --output, or else ``results_name`` (``_cuda`` added for --device
    cuda) in :data:`RESULTS_DIR`; nothing with --no-save, or with --quick and no --output."""
    name = args.output or (None if args.quick or args.no_save
                           else results_name + ("_cuda" if args.device == "cuda" else ""))
    if name and not args.output and not RESULTS_DIR.is_dir():
        print(f"\nno results files: {RESULTS_DIR} does not exist (an installed deformcp); --output writes them")
    elif name:
        json_path, md_path = write_results(name, payload, markdown)
        print(f"\nwrote {json_path} and {md_path}")


# --------------------------------------------------------------------------------- python -m deformcp bench

def benchmark(name: str):
    """The module bench_<name> of this folder."""
    return importlib.import_module(f".bench_{name}", __package__) if __package__ else importlib.import_module(
        f"bench_{name}")


def covered_ops() -> dict[str, tuple[str, ...]]:
    """The ops of ``deformcp.ops.SPECS`` that each benchmark times (its module's ``OPS``), by benchmark, in
    :data:`BENCHMARKS`' order. Imports every benchmark (and with them torch, where installed). Raises
    ValueError for a benchmark without ``OPS`` or with a name that is not in the table."""
    covered = {}
    for name in BENCHMARKS:
        ops = getattr(benchmark(name), "OPS", None)
        if not ops:
            raise ValueError(f"bench_{name}.py: no OPS (the ops of deformcp.ops.SPECS it times)")
        unknown = [op for op in ops if op not in SPECS]
        if unknown:
            raise ValueError(f"bench_{name}.py: OPS names {', '.join(unknown)}, not in deformcp.ops.SPECS "
                             f"({', '.join(SPECS)})")
        covered[name] = tuple(ops)
    return covered


def untimed_ops(covered: Optional[dict] = None) -> list[str]:
    """The ops of ``deformcp.ops.SPECS`` that no benchmark times (``covered``: :func:`covered_ops`)."""
    timed = {op for ops in (covered or covered_ops()).values() for op in ops}
    return [op for op in SPECS if op not in timed]


def list_benchmarks() -> int:
    """``python -m deformcp bench --list``: each benchmark and the ops it times; 1 where an op of the table
    has no benchmark."""
    covered = covered_ops()
    width = max(map(len, covered))
    for name, ops in covered.items():
        print(f"{name:<{width}}  {', '.join(ops)}")
    missing = untimed_ops(covered)
    if missing:
        print(f"not timed by any benchmark: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def benchmarks_named(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The benchmarks that ``names`` (benchmarks, or ops of the table: the benchmark that times each)
    choose, in :data:`BENCHMARKS`' order, and the names that are neither."""
    wanted, unknown, covered = set(), [], None
    for name in names:
        if name in BENCHMARKS:
            wanted.add(name)
            continue
        covered = covered or covered_ops()
        found = {bench for bench, ops in covered.items() if name in ops}
        wanted |= found
        if not found:
            unknown.append(name)
    return [name for name in BENCHMARKS if name in wanted], unknown


def parser() -> argparse.ArgumentParser:
    """``python -m deformcp bench``'s options."""
    parser = argparse.ArgumentParser(
        prog="python -m deformcp bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time deformcp's ops against torch / torchvision where they are installed: the benchmarks\n"
                    f"{', '.join(BENCHMARKS)} (benchmarks/bench_<name>.py), one after the other\n"
                    "(--list: the ops each times; every op of deformcp.ops.SPECS is timed by one).\n"
                    "Each first checks every implementation's outputs and gradients against its reference (a\n"
                    "mismatch stops it: exit status 1), then reports medians and quartiles, ratios to the anchor\n"
                    "and the machine.",
        epilog=f"Run with OpenBLAS's CPU overrides unset, in the command only:\n\n"
               f"  env -u {' -u '.join(BLAS_OVERRIDES)} python -m deformcp bench [NAME ...]\n\n"
               "Exit status: 0; 1 when an implementation disagrees with its reference or a benchmark fails; "
               "2 when --device cuda has no GPU.\nThe scripts take more options (shapes, dtypes, "
               "--deterministic): python benchmarks/bench_<name>.py --help.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"only these benchmarks: {', '.join(BENCHMARKS)}, or those that time these ops "
                             "(default: all)")
    parser.add_argument("--list", action="store_true", help="list each benchmark and the ops it times, then exit")
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deformcp bench``: run the benchmarks ``NAME ...`` (default all) with the shared options;
    the exit status is the worst of theirs."""
    bench_parser = parser()
    args = bench_parser.parse_args(argv)
    if args.list:
        return list_benchmarks()
    names, unknown = benchmarks_named(args.names)
    if unknown:
        bench_parser.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)}, or an "
                           f"op: {', '.join(SPECS)})")
    if args.device == "cuda" and gpu_problem():
        print(gpu_problem(), file=sys.stderr)
        return 2
    global _BENCH_ARGV
    _BENCH_ARGV, codes = (None if argv is None else list(argv)), {}
    try:
        for name in names or BENCHMARKS:
            print(f"\n========== {name} ==========\n", flush=True)
            output = ["--output", str(pathlib.Path(args.output) / name)] if args.output else ["--no-save"]
            try:
                codes[name] = benchmark(name).main([*forwarded(args), *output])
            except Exception:
                traceback.print_exc()
                codes[name] = 1
            sys.stdout.flush()
    finally:
        _BENCH_ARGV = None
    print("\n" + "\n".join(f"{name}: " + ("ok" if code == 0 else f"FAILED (exit status {code})")
                             for name, code in codes.items()))
    return max(codes.values())
