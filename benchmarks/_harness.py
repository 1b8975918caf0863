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
- :func:`relative_error`: ‖a − b‖ / ‖b‖ in float64, to check results before timing them.

Only the standard library and NumPy are needed; torch and threadpoolctl are reported when installed.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
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

from deformcp.testing import relative_error  # noqa: E402  (one definition of the error measure)


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


def command_line() -> str:
    """The command that ran this benchmark, with the ``env -u`` prefix where the BLAS overrides were
    unset (their presence is visible here, and in :func:`machine_info`)."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "<stdin>"
    command = " ".join(["python", script, *sys.argv[1:]])
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
    """Where the numbers came from. Call after importing the libraries being timed."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(),
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
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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
