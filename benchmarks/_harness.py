"""Shared timing helpers for deformcp's benchmarks (benchmarks/bench_<op>.py).

Run every benchmark with OpenBLAS's CPU overrides unset, in the command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_<op>.py

(these machines set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow NumPy's BLAS). Whether they
were set is recorded in every results file (:func:`machine_info`).

What is here:

- :func:`measure`: warm-up calls (a count and a minimum time), then ``repeat`` timed calls
  (``time.perf_counter``), with an optional ``sync`` callable run before the clock starts and before
  it stops (GPU work is asynchronous: pass ``cupy.cuda.Device().synchronize`` /
  ``torch.cuda.synchronize``). Returns a :class:`Timing` (median, quartiles, min, spread, and how
  busy other processes kept the CPUs meanwhile, :class:`OtherLoad`).
  :func:`measure_interleaved` times several callables in turns instead.
- :func:`cpu_busy`, :func:`busy_warning`: is the machine quiet enough to benchmark?
- :class:`Record`: one result row (case, implementation, phase, timing, free-form extras).
- :func:`machine_info`: platform, CPU count, library versions, thread settings, BLAS env overrides;
  :func:`command_line`, :func:`blas_warning`.
- :func:`markdown_table`, :func:`machine_markdown`, :func:`format_seconds`, :func:`ratio_text`: reporting.
- :func:`write_results`: ``benchmarks/results/<name>.json`` and ``benchmarks/results/<name>.md``.
- :func:`relative_error`: ‖a − b‖ / ‖b‖ in float64, to check results before timing them;
  :func:`to_numpy`, :func:`errors_text`.

What a bench_<op>.py script shares (each compares deformcp with a torch-based baseline):

- :func:`make_parser` / :func:`add_arguments` (--device, --repeat, --warmup, --quick, --interleave,
  --torch-threads, --seed, --output, optionally --max-row-time) and :func:`start`, which turns them into
  a :class:`Plan` (how to time) after the checks every run makes first (BLAS overrides, --device cuda
  without a GPU).
- :func:`optional_torchvision`, :func:`deformcp_functions`: what there is to time.
- :func:`device_setup`: what can run on ``--device`` (deformcp's host backend, torch on CUDA), the
  synchronisation to time CUDA work with, and the machine entries (:class:`DeviceSetup`);
  :func:`deformcp_impls`: deformcp's implementations there; :func:`release_device_memory`.
- :class:`ArrayCase`: a case's NumPy inputs in one dtype; :class:`DeformcpOp`: deformcp's op on them;
  :func:`random_rois`: RoIs inside an image.
- :func:`verify`, :func:`check`: outputs and gradients against a reference before timing.
- :func:`time_phases`: time each phase of a set of implementations, printing a line per result.
- :func:`ratio`, :func:`timing_headers`, :func:`timing_cells`, :func:`evaluate_targets`,
  :func:`report_markdown`, :func:`results_payload`, :func:`save_results`: the results files;
  :func:`source_state`, :func:`source_lines`: which deformcp was timed.

Only the standard library and NumPy are needed; torch and threadpoolctl are reported when installed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # benchmark the checkout's deformcp
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: Environment variables that slow NumPy's BLAS on these machines; benchmarks run with them unset.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Thread-count variables recorded with the results.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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

import deformcp  # noqa: E402
from deformcp import _bench  # noqa: E402  (one place for machine details)
from deformcp.testing import relative_error  # noqa: E402  (one definition of the error measure)


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or torch array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return a.get() if hasattr(a, "get") else np.asarray(a)


def errors_text(errors: dict) -> str:
    """``name 1.2e-06, name 3.4e-07``: relative errors as printed and reported."""
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def check(impl, dtype: str, expected_out, expected_grads: dict) -> tuple[dict, list[str]]:
    """``impl``'s relative errors against the expected output and the gradients in ``expected_grads``
    (name → NumPy array, or None where there is no such gradient), and what is wrong besides (another
    dtype, a gradient missing or unexpected). ``impl`` has forward(), forward_backward() → (output,
    gradients) and gradients(gradients) → {name: array or None}."""
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
    return errors, problems


def verify(title: str, reference_name: Optional[str], reference, checks, tolerance: dict, notes: list, *,
           grads: Optional[Sequence[str]] = None, timed: Collection[str] = ()) -> dict:
    """Relative errors of each of ``checks`` ((name, implementation, dtype, binding); implementations as
    in :func:`check`) against ``reference`` (such an implementation, run once; None: nothing to verify
    against), on its output and its gradients ``grads`` (default: all it returns): {"<title>: <name>":
    errors}. Exits before any timing when a binding one is beyond ``tolerance[dtype]``, returns another
    dtype, or raises, or when one of ``timed`` raises (it could not be timed either); what is wrong with
    the others goes to ``notes``, information only."""
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
          f"{tuple(expected_out.shape)} (|max| {np.abs(expected_out).max():.3g}); "
          + ", ".join(f"grad_{k} |max| {np.abs(v).max():.3g}" for k, v in expected.items() if v is not None))
    for name, impl, dtype, binding in checks:
        limit = tolerance[dtype]
        key = f"{title}: {name}"
        try:
            checked, problems = check(impl, dtype, expected_out, expected)
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
        sys.exit(f"verification failed ({title}; reference {reference_name}) for {'; '.join(failed)}: not timing "
                 "wrong code")
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
    on one backend: "numpy", "host", or "cuda" for CuPy arrays (``move`` takes the arrays there). A
    subclass names the ``op`` (``functions[op]`` and ``functions[op + "_backward"]`` are timed) and the
    backward's ``grads`` fields, and defines ``_forward()`` and ``forward_backward()`` → (output, the
    backward's named tuple), for :func:`time_phases` and :func:`check`."""

    op: str
    grads: Sequence[str]

    def __init__(self, backend: str, case: ArrayCase, functions: dict, deterministic=False, move=None):
        move = move or _unmoved
        self.backend = backend
        self.cpu_backend = "numpy" if backend == "cuda" else backend
        self.deterministic = deterministic
        self.forward_fn, self.backward_fn = functions[self.op], functions[self.op + "_backward"]
        self.a = {k: None if v is None else move(v) for k, v in case.arrays.items()}

    def forward(self):
        with deformcp.backend(self.cpu_backend):
            return self._forward()

    def gradients(self, grads) -> dict:
        return {name: getattr(grads, name) for name in self.grads}


def _unmoved(array):
    return array


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
    return (f"warning: {listing} set; NumPy's BLAS runs slower. Rerun as "
            f"env -u {' -u '.join(BLAS_OVERRIDES)} python {' '.join(sys.argv)}")


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


def command_line(this_python: bool = False) -> str:
    """The command that ran this benchmark, with the ``env -u`` prefix where the BLAS overrides were
    unset (their presence is visible here, and in :func:`machine_info`). ``this_python``: this
    interpreter's path instead of ``python`` where it is not the ``python`` on PATH (the torchvision
    comparisons run under a separate environment's Python)."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "<stdin>"
    python = "python"
    if this_python:
        on_path = shutil.which("python")
        if not (on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable)):
            python = sys.executable
    command = " ".join([python, script, *sys.argv[1:]])
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


def machine_info(extra: Optional[dict] = None) -> dict:
    """Where the numbers came from. Call after importing the libraries being timed. An ``extra`` entry
    "torchvision" (its version) is also named beside torch's (:func:`machine_markdown` lists torch)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _bench._cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": _module_version("torch"),
        "cupy": _module_version("cupy"),
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
        f"- python {info.get('python')}, numpy {info.get('numpy')}, scipy {info.get('scipy')}, "
        f"torch {info.get('torch') or 'not installed'}"
        + (f", cupy {info['cupy']}" if info.get("cupy") else ""),
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
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def source_state() -> dict:
    """Which deformcp was timed: the checkout's commit, and its files under deformcp/ and kernels/ that
    differ from it (git; empty where git is not available)."""
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


# ------------------------------------------------------------------------------------ a bench_<op>.py run

#: --max-row-time never cuts a row below this many timed calls
MIN_REPEAT = 5
#: What ``python`` scripts timing torchvision run under (see their docstrings)
TORCHVISION_PYTHON = "/opt/tv/bin/python"
NO_TORCHVISION = ("torchvision is not installed: timing deformcp only, no ratios (run with a Python that has "
                  f"torchvision, e.g. {TORCHVISION_PYTHON})")


def make_parser(doc: str, results_name: str, python: str = "python",
                max_row_time: Optional[float] = None) -> argparse.ArgumentParser:
    """The parser of benchmarks/bench_<results_name>.py: the first paragraph of its docstring ``doc``, a
    "Run as" line with ``python``, and :func:`add_arguments`' options."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Run as: env -u {' -u '.join(BLAS_OVERRIDES)} {python} "
                                            f"benchmarks/bench_{results_name}.py")
    add_arguments(parser, results_name, max_row_time)
    return parser


def add_arguments(parser: argparse.ArgumentParser, results_name: str,
                  max_row_time: Optional[float] = None) -> None:
    """The options every benchmark takes; ``results_name`` is the default results name. With a
    ``max_row_time`` (seconds), also --max-row-time with that default (see :func:`time_phases`)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first, and at least 0.25 s of them (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 repeats, 1 warm-up call; writes no files unless --output is given")
    parser.add_argument("--interleave", action="store_true",
                        help="time the implementations in turns, one call each per round (evens out drifting "
                             "machine load; every call then starts with caches holding the others' data)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="results name: benchmarks/results/<name>.{json,md}, or a path without suffix "
                             f"(default {results_name}, or {results_name}_cuda)")
    if max_row_time is not None:
        parser.add_argument("--max-row-time", type=float, default=max_row_time,
                            help=f"seconds of timed calls a row may take: fewer calls (at least {MIN_REPEAT}) "
                                 f"where one call is slower (default {max_row_time:g}; 0: no limit)")


@dataclasses.dataclass
class Plan:
    """How every row is timed: ≥ ``warmup`` warm-up calls and ≥ ``warmup_time`` seconds of them, then
    ``repeat`` timed calls, the implementations back to back or (``interleave``) in turns. Where the
    script has --max-row-time (``max_row_time`` not None), one untimed call first and, with a limit
    (> 0), fewer timed calls where they would take longer (see :func:`time_phases`)."""

    repeat: int
    warmup: int
    warmup_time: float
    interleave: bool
    max_row_time: Optional[float] = None

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
                   "untimed call first)" if self.limited else ""))

    def time(self, fns: dict[str, Callable[[], Any]], sync=None) -> dict[str, Timing]:
        if self.interleave:
            return measure_interleaved(fns, repeat=self.repeat, warmup=self.warmup, sync=sync,
                                       warmup_time=self.warmup_time)
        return {name: measure(fn, repeat=self.repeat, warmup=self.warmup, sync=sync,
                              warmup_time=self.warmup_time)
                for name, fn in fns.items()}


def start(parser: argparse.ArgumentParser, args: argparse.Namespace, torch=None) -> Optional[Plan]:
    """The :class:`Plan` of :func:`add_arguments`' options, after what every run does first: check
    them, apply --torch-threads (``torch``: the module, or None), warn about BLAS overrides. None, with a
    message, where --device cuda has no GPU to run on."""
    repeat = args.repeat or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if repeat < 1 or warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error("--torch-threads must be at least 1")
        if torch is not None:
            torch.set_num_threads(args.torch_threads)
    warning = blas_warning()
    if warning:
        print(warning, file=sys.stderr)
    if args.device == "cuda":
        from deformcp.testing import gpu_available

        problem = gpu_available()
        if problem:
            print(f"--device cuda: {problem}. Nothing timed; run without --device cuda for the CPU "
                  "benchmark.", file=sys.stderr)
            return None
    return Plan(repeat, warmup, 0.0 if args.quick else 0.25, args.interleave,
                getattr(args, "max_row_time", None))


def optional_torchvision() -> tuple[Any, Any]:
    """The modules torch and torchvision (torchvision.ops imported), or None, None where torchvision is
    not installed."""
    try:
        import torch
        import torchvision
        import torchvision.ops  # noqa: F401
    except ImportError:
        return None, None
    return torch, torchvision


def deformcp_functions(names: Sequence[str], module: str) -> tuple[Optional[dict], Optional[str]]:
    """deformcp's functions ``names``, from deformcp or else from ``module`` (written but not exported
    yet?); or None and why not."""
    found = {name: getattr(deformcp, name, None) for name in names}
    if all(callable(f) for f in found.values()):
        return found, None
    try:
        imported = importlib.import_module(module)
    except Exception as e:
        return None, (f"deformcp has no {', '.join(n for n, f in found.items() if not callable(f))} and "
                      f"import {module} failed ({type(e).__name__}: {e})")
    missing = [name for name in names if not callable(getattr(imported, name, None))]
    if missing:
        return None, f"{module} lacks {', '.join(missing)}"
    return {name: getattr(imported, name) for name in names}, None


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

        setup = DeviceSetup("cpu", {"device": "cpu"}, [], host=_host.compiler() is not None,
                            torch_device="cpu" if torch is not None else None)
        if not setup.host:
            setup.notes.append("deformcp host skipped: no C++ compiler found (set CXX)")
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


def check_load() -> Optional[float]:
    """:func:`cpu_busy`, printing :func:`busy_warning`'s warning where there is one."""
    busy = cpu_busy()
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


def report_markdown(*, title: str, case_lines: Sequence[str], command: str, method: str, machine: dict,
                    baseline: Optional[str], compared: str, no_baseline: str, headers: Sequence[str],
                    rows: Sequence[Sequence[Any]], targets: Sequence[dict], verification: str,
                    errors: dict[str, dict], notes: Sequence[str]) -> str:
    """The results markdown. ``compared``: what a ratio keeps alike ("phase"); ``no_baseline``: why
    there is no baseline, where ``baseline`` is None ("No torch baseline (torch is not installed)");
    ``verification``: what the errors are ("relative errors against torch cpu"); ``errors``: per
    implementation (a line each), the relative errors."""
    lines = [
        f"# deformcp benchmark: {title}",
        "",
        *case_lines,
        "",
        f"Command: `{command}`. Timing: {method}.",
        "",
        machine_markdown(machine),
        "",
        (f"Ratio = implementation's median / {baseline}'s median for the same {compared}: **below 1 is "
         f"faster than {baseline}**." if baseline
         else f"**{no_baseline}: deformcp times only, no ratios.**"),
        "",
        markdown_table(headers, rows),
        "",
        "Targets:",
        "",
        *(" ".join(["-", *(str(v) for k, v in t.items() if k not in TARGET_FIELDS)])
          + f": {t['target']} (ratio ≤ {t['max_ratio']:g}): "
          + (f"{t['ratio']:.2f}× — " if t["ratio"] is not None else "") + t["status"]
          for t in targets),
        "",
        f"Verification before timing ({verification}):",
        "",
        *(f"- {name}: {errors_text(e)}" for name, e in errors.items()),
    ]
    if notes:
        lines += ["", *(f"Note: {n}" for n in notes)]
    return "\n".join(lines)


def no_baseline(library: str, module) -> str:
    """Why there is no ``library`` baseline (``module``: the imported module, or None)."""
    why = f"{library} is not installed" if module is None else f"{library} cannot run on this device"
    return f"No {library} baseline ({why})"


def results_payload(command: str, case: dict, *, plan: Plan, baseline: Optional[str], compared: str,
                    machine: dict, errors: dict, targets: list, notes: list, records: Sequence[Record]) -> dict:
    """The results JSON: the command, the ``case``'s entries, then how it was timed and the results."""
    return {"command": command, **case, "baseline": baseline, "interleave": plan.interleave,
            "repeat": plan.repeat, "warmup": plan.warmup,
            "ratio_meaning": f"implementation median / baseline median, same {compared}; < 1 is faster",
            "machine": machine, "verification": errors, "targets": targets, "notes": notes,
            "results": [r.to_dict() for r in records]}


def save_results(args: argparse.Namespace, results_name: str, payload: dict, markdown: str) -> None:
    """:func:`write_results` under --output, or else ``results_name`` (``_cuda`` added for --device
    cuda) except with --quick, which writes nothing."""
    name = args.output or (None if args.quick else results_name + ("_cuda" if args.device == "cuda" else ""))
    if name:
        json_path, md_path = write_results(name, payload, markdown)
        print(f"\nwrote {json_path} and {md_path}")
